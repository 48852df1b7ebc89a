// A minimal x86-64 machine-code emitter: the handful of instructions the generated 4-block kernels need
// (jit_block4.cpp), encoded by hand (Intel SDM vol. 2, "EVEX encoding"). Baseline code only.
//
// Memory operands are [base + disp] with a base that needs no SIB byte (not rsp / r12) and always an explicit
// displacement (mod 01 or 10, so rbp / r13 are fine too). EVEX memory operands use the compressed disp8 form
// (disp / N in one byte, N = the memory operand's size) when it fits, disp32 otherwise.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace hf_sparse {

enum Gpr : int {
  kRax = 0, kRcx = 1, kRdx = 2, kRbx = 3, kRsp = 4, kRbp = 5, kRsi = 6, kRdi = 7, kR8 = 8, kR9 = 9, kR10 = 10
};

class X86Emitter {
 public:
  std::vector<uint8_t> code;

  size_t size() const { return code.size(); }

  // vpxord zmm(r), zmm(r), zmm(r): r = 0
  void vpxord_zero(int r) {
    evex(1, 1, r, r, r, true, false);
    byte(0xEF);
    byte(0xC0 | ((r & 7) << 3) | (r & 7));
  }
  // vmovdqa32 zmm(r), [base + disp] (64-byte aligned)
  void vmovdqa32_load(int r, int base, int32_t disp) {
    evex(1, 1, r, 0, base, false, false);
    byte(0x6F);
    mem(r, base, disp, 64);
  }
  // vmovdqa32 [base + disp], zmm(r)
  void vmovdqa32_store(int base, int32_t disp, int r) {
    evex(1, 1, r, 0, base, false, false);
    byte(0x7F);
    mem(r, base, disp, 64);
  }
  // vpdpbusd zmm(acc), zmm(u8), dword [base + disp]{1to16}
  void vpdpbusd_bcst(int acc, int u8, int base, int32_t disp) {
    evex(2, 1, acc, u8, base, false, true);
    byte(0x50);
    mem(acc, base, disp, 4);
  }
  // prefetcht1 [rip + disp]: disp counts from the end of this 7-byte instruction
  void prefetcht1_rip(int32_t disp) {
    byte(0x0F);
    byte(0x18);
    byte(0x15);
    u32(static_cast<uint32_t>(disp));
  }
  // prefetcht1 [base + disp32] (base not rsp/r12: no SIB)
  void prefetcht1_base(int base, int32_t disp) {
    if (base & 8) byte(0x41);
    byte(0x0F);
    byte(0x18);
    byte(static_cast<uint8_t>(0x80 | (2 << 3) | (base & 7)));
    u32(static_cast<uint32_t>(disp));
  }
  // mov dst, src (64-bit)
  void mov(int dst, int src) {
    byte(0x48 | (src & 8 ? 4 : 0) | (dst & 8 ? 1 : 0));
    byte(0x89);
    byte(0xC0 | ((src & 7) << 3) | (dst & 7));
  }
  // test a, b (64-bit)
  void test(int a, int b) {
    byte(0x48 | (b & 8 ? 4 : 0) | (a & 8 ? 1 : 0));
    byte(0x85);
    byte(0xC0 | ((b & 7) << 3) | (a & 7));
  }
  // add dst, imm32 (64-bit, sign-extended)
  void add(int dst, int32_t imm) {
    byte(0x48 | (dst & 8 ? 1 : 0));
    byte(0x81);
    byte(0xC0 | (dst & 7));
    u32(static_cast<uint32_t>(imm));
  }
  // mov dst32, imm32
  void mov_imm32(int dst, uint32_t imm) {
    if (dst & 8) byte(0x41);
    byte(0xB8 | (dst & 7));
    u32(imm);
  }
  // dec r32
  void dec32(int r) {
    if (r & 8) byte(0x41);
    byte(0xFF);
    byte(0xC8 | (r & 7));
  }
  // jnz to an earlier offset of this buffer
  void jnz_back(size_t target) {
    byte(0x0F);
    byte(0x85);
    const int64_t rel = static_cast<int64_t>(target) - static_cast<int64_t>(code.size() + 4);
    u32(static_cast<uint32_t>(static_cast<int32_t>(rel)));
  }
  void ret() { byte(0xC3); }

 private:
  void byte(uint8_t b) { code.push_back(b); }
  void u32(uint32_t v) {
    uint8_t b[4];
    std::memcpy(b, &v, 4);
    code.insert(code.end(), b, b + 4);
  }
  // EVEX prefix of a 512-bit instruction: map mm (1: 0F, 2: 0F38), pp (1: 66), ModRM.reg operand `reg` and
  // EVEX.vvvv operand `vvvv` (vector registers 0-31; 0 when unused), ModRM.rm operand `rm` (a vector register
  // with rm_vec, else the base GPR of a memory operand), W0, no masking. Every extension bit is stored inverted.
  void evex(int mm, int pp, int reg, int vvvv, int rm, bool rm_vec, bool bcst) {
    uint8_t p0 = static_cast<uint8_t>(mm);
    if (!(reg & 8)) p0 |= 0x80;               // R
    if (!(rm_vec && (rm & 16))) p0 |= 0x40;   // X: bit 4 of a vector rm (no index register in memory forms)
    if (!(rm & 8)) p0 |= 0x20;                // B
    if (!(reg & 16)) p0 |= 0x10;              // R'
    const uint8_t p1 = static_cast<uint8_t>(((~vvvv & 15) << 3) | 0x04 | pp);
    const uint8_t p2 = static_cast<uint8_t>(0x40 | (bcst ? 0x10 : 0) | (vvvv & 16 ? 0 : 0x08));  // L'L = 512
    byte(0x62);
    byte(p0);
    byte(p1);
    byte(p2);
  }
  // ModRM (+ disp) of [base + disp] with ModRM.reg = reg; n: the EVEX disp8 scale.
  void mem(int reg, int base, int32_t disp, int n) {
    const uint8_t rr = static_cast<uint8_t>(((reg & 7) << 3) | (base & 7));
    if (disp % n == 0 && disp / n >= -128 && disp / n <= 127) {
      byte(0x40 | rr);
      byte(static_cast<uint8_t>(static_cast<int8_t>(disp / n)));
    } else {
      byte(0x80 | rr);
      u32(static_cast<uint32_t>(disp));
    }
  }
};

}  // namespace hf_sparse
