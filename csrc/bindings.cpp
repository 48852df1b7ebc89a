// Python bindings (nanobind, no libtorch): hf_sparse._C.
//
// Two ways in:
//  * Packed: built once per weight from arrays (DLPack, zero-copy in, validated, copied into memory it owns).
//    Its tensors() are zero-copy torch views of that memory; run() takes raw addresses of x and of the output,
//    which hf_sparse.ops checks first (importing an array through DLPack costs ~3 us, too much per call).
//    The kernels read a private copy of the row pointers and clamp column indices, so even tensors edited in
//    place cannot make them read outside their buffers.
//  * *_raw(): the torch-op path for arbitrary tensors. hf_sparse.ops checks dtypes, shapes and contiguity; these
//    check the row pointers (start, end, order) before any kernel runs.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "scratch.h"
#include "attention.h"
#include "common.h"
#include "embeddings.h"
#include "encoder_layer.h"
#include "isa.h"
#include "jit_block4.h"
#include "linear.h"
#include "thread_pool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace hf_sparse {
namespace {

constexpr int kAbiVersion = 13;

enum Kind : int { kI8Sparse = 0, kI8Dense = 1, kF32Sparse = 2, kI8Csr = 3 };  // kI8Csr: SparseI8 with quads

template <class T>
using In1 = nb::ndarray<const T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

struct FreeDeleter {
  void operator()(void* p) const { scratch_aligned_free(p); }
};
using Owned = std::unique_ptr<char, FreeDeleter>;

// 64-byte aligned copy of `bytes` bytes of src (uninitialised when src is null); huge pages from 2 MB (scratch.h).
Owned alloc_copy(const void* src, size_t bytes) {
  char* p = static_cast<char*>(scratch_aligned_malloc(bytes ? bytes : 1));
  if (!p) throw std::bad_alloc();
  if (bytes && src) std::memcpy(p, src, bytes);
  return Owned(p);
}

std::string str(int64_t v) { return std::to_string(v); }

// ptr (count + 1 entries) must start at 0, never decrease and end at nnz: then every range the kernels walk lies
// inside cols and values.
void check_ptr(const int32_t* ptr, int64_t count, int64_t nnz, const char* what) {
  if (ptr[0] != 0) throw nb::value_error((std::string(what) + ": ptr[0] is " + str(ptr[0]) + ", must be 0").c_str());
  for (int64_t i = 0; i < count; ++i) {
    if (ptr[i + 1] < ptr[i]) {
      throw nb::value_error((std::string(what) + ": ptr decreases at index " + str(i + 1) + " (" + str(ptr[i]) +
                             " -> " + str(ptr[i + 1]) + ")")
                                .c_str());
    }
  }
  if (ptr[count] != nnz) {
    throw nb::value_error((std::string(what) + ": ptr[-1] is " + str(ptr[count]) + " but there are " + str(nnz) +
                           " stored entries")
                              .c_str());
  }
}

int64_t panels_of(int kind, int64_t k) {
  const int64_t cols = kind == kF32Sparse ? k : (k + 3) / 4;  // fp32: features; int8: 4-blocks (quads: 4 features)
  return (cols + kPanel - 1) / kPanel;
}

void check_dims(int64_t n, int64_t k) {
  if (n < 0) throw nb::value_error(("out_features must be >= 0, got " + str(n)).c_str());
  if (k < 1 || k > kMaxInFeatures) {
    throw nb::value_error(("in_features must be in [1, " + str(kMaxInFeatures) + "], got " + str(k)).c_str());
  }
}

void check_mask_kind(int kind, const char* where) {
  if (kind != kMaskNone && kind != kMaskAdd && kind != kMaskKeep) {
    throw nb::value_error((std::string(where) + ": unknown mask kind " + str(kind)).c_str());
  }
}

int clamp_threads(int nthreads) { return nthreads < 1 ? 1 : (nthreads > 1024 ? 1024 : nthreads); }

Output make_output(uintptr_t out, int64_t ldy, int act, bool accum) {
  if (act != kActNone && act != kActGelu && act != kActTanh) {
    throw nb::value_error(("unknown activation code " + str(act)).c_str());
  }
  Output o;
  if (accum) {
    o.yi = reinterpret_cast<int32_t*>(out);
  } else {
    o.y = reinterpret_cast<float*>(out);
  }
  o.ldy = ldy;
  o.act = act;
  return o;
}

class Packed {
 public:
  // All arrays are copied. Sparse kinds: ptr (column panels * n + 1,) int32, cols (nnz,) uint16, values (nnz,)
  // int32 (4 int8 codes) or float32; int8 CSR: cols (4 nnz,) input features, 4 per entry of values (nnz,) int32.
  // Dense int8: values = the (panels, kb, 16, 4) int8 panels, flattened.
  Packed(int kind, int64_t n, int64_t k, In1<int32_t> ptr, In1<uint16_t> cols, nb::ndarray<nb::c_contig> values,
         In1<int32_t> weight_sum, In1<float> scale, In1<float> bias, bool has_bias)
      : kind_(kind), n_(n), k_(k), kb_((k + 3) / 4), has_bias_(has_bias) {
    check_dims(n, k);
    const int64_t panels = (n + 15) / 16;
    if (kind == kI8Sparse || kind == kF32Sparse || kind == kI8Csr) {
      const bool i8 = kind != kF32Sparse;
      const int64_t per = kind == kI8Csr ? 4 : 1;  // column indices per entry
      const char* what = kind == kI8Sparse ? "int8 4-block weight" : (i8 ? "int8 CSR weight" : "fp32 CSR weight");
      panels_ = panels_of(kind, k);
      const int64_t count = panels_ * n;
      if (static_cast<int64_t>(ptr.shape(0)) != count + 1) {
        throw nb::value_error((std::string(what) + ": ptr has " + str(ptr.shape(0)) + " entries, expected " +
                               str(count + 1) + " (column panels x out_features + 1)")
                                  .c_str());
      }
      const int64_t ncols = static_cast<int64_t>(cols.shape(0));
      if (ncols % per) {
        throw nb::value_error((std::string(what) + ": cols has " + str(ncols) +
                               " entries, not a multiple of 4 (4 input features per stored entry)")
                                  .c_str());
      }
      nnz_ = ncols / per;
      check_ptr(ptr.data(), count, nnz_, what);
      const int64_t col_limit = kind == kI8Sparse ? kb_ : k;
      const uint16_t* c = cols.data();
      for (int64_t b = 0; b < ncols; ++b) {
        if (c[b] >= col_limit) {
          throw nb::value_error((std::string(what) + ": cols[" + str(b) + "] = " + str(c[b]) + " is out of range (" +
                                 (kind == kI8Sparse ? "4-blocks per row: " : "in_features: ") + str(col_limit) + ")")
                                    .c_str());
        }
      }
      const nb::dlpack::dtype vtype = i8 ? nb::dtype<int32_t>() : nb::dtype<float>();
      if (values.ndim() != 1 || static_cast<int64_t>(values.shape(0)) != nnz_ || values.dtype() != vtype) {
        throw nb::value_error((std::string(what) + ": values must be 1-D " +
                               (i8 ? "int32 (4 int8 codes each)" : "float32") + " with one entry per " +
                               (per == 4 ? "4 column indices (" : "column index (") + str(nnz_) + ")")
                                  .c_str());
      }
      ptr_kernel_ = alloc_copy(ptr.data(), (count + 1) * 4);
      ptr_public_ = alloc_copy(ptr.data(), (count + 1) * 4);
      // Entries before each row, over all panels: balances the rows given to each thread.
      prefix_ = alloc_copy(nullptr, (n + 1) * 8);
      int64_t* prefix = reinterpret_cast<int64_t*>(prefix_.get());
      const int32_t* p = ptr.data();
      prefix[0] = 0;
      for (int64_t r = 0; r < n; ++r) {
        int64_t c = 0;
        for (int64_t q = 0; q < panels_; ++q) c += p[q * n + r + 1] - p[q * n + r];
        prefix[r + 1] = prefix[r] + c;
      }
      cols_ = alloc_copy(cols.data(), ncols * 2);
      values_ = alloc_copy(values.data(), nnz_ * 4);
    } else if (kind == kI8Dense) {
      const int64_t expect = panels * kb_ * 64;
      if (values.dtype() != nb::dtype<int8_t>() || static_cast<int64_t>(values.size()) != expect) {
        throw nb::value_error(("int8 dense weight: packed panels must hold " + str(expect) +
                               " int8 values (ceil(out/16) x ceil(in/4) x 16 x 4), got " + str(values.size()))
                                  .c_str());
      }
      values_ = alloc_copy(values.data(), expect);
    } else {
      throw nb::value_error(("unknown packed kind " + str(kind)).c_str());
    }
    if (kind != kF32Sparse) {
      if (static_cast<int64_t>(weight_sum.shape(0)) != n || static_cast<int64_t>(scale.shape(0)) != n) {
        throw nb::value_error(("int8 weight: weight_sum and weight_scale must have out_features = " + str(n) +
                               " entries, got " + str(weight_sum.shape(0)) + " and " + str(scale.shape(0)))
                                  .c_str());
      }
      wsum_ = alloc_copy(weight_sum.data(), n * 4);
      scale_ = alloc_copy(scale.data(), n * 4);
    }
    if (has_bias) {
      if (static_cast<int64_t>(bias.shape(0)) != n) {
        throw nb::value_error(
            ("bias must have out_features = " + str(n) + " entries, got " + str(bias.shape(0))).c_str());
      }
      bias_ = alloc_copy(bias.data(), n * 4);
    }
    // Kernel views
    if (kind == kI8Sparse || kind == kI8Csr) {
      si8_ = SparseI8{n,
                      k,
                      kb_,
                      panels_,
                      as<int32_t>(ptr_kernel_),
                      as<uint16_t>(cols_),
                      as<int32_t>(values_),
                      as<int32_t>(wsum_),
                      as<float>(scale_),
                      has_bias ? as<float>(bias_) : nullptr,
                      as<int64_t>(prefix_),
                      kind == kI8Csr};
      jit_ = JitBlock4::build(si8_);  // null where it cannot run: the loops then do
      if (jit_) si8_.jit = jit_->groups();
    } else if (kind == kI8Dense) {
      di8_ = DenseI8{n, k, kb_, panels, as<int8_t>(values_), as<int32_t>(wsum_), as<float>(scale_),
                     has_bias ? as<float>(bias_) : nullptr};
    } else {
      sf32_ = SparseF32{n,
                        k,
                        panels_,
                        as<int32_t>(ptr_kernel_),
                        as<uint16_t>(cols_),
                        as<float>(values_),
                        has_bias ? as<float>(bias_) : nullptr,
                        as<int64_t>(prefix_)};
    }
  }

  // y (m, n) = x (m, k) @ W^T (+ epilogue); x and y are row-major with row strides k and n.
  void run(uintptr_t x, int64_t m, uintptr_t out, int act, int nthreads, bool accum) const {
    if (m < 0) throw nb::value_error("number of rows must be >= 0");
    if (accum && kind_ == kF32Sparse) throw nb::value_error("accumulators exist only for int8 weights");
    const Output o = make_output(out, n_, act, accum);
    nb::gil_scoped_release release;
    forward(reinterpret_cast<const float*>(x), k_, m, o, clamp_threads(nthreads));
  }

  // run() for rows ldx floats apart (ldx >= in_features), e.g. the first token of every sequence (BERT's pooler).
  void run_rows(uintptr_t x, int64_t ldx, int64_t m, uintptr_t out, int act, int nthreads) const {
    if (m < 0) throw nb::value_error("number of rows must be >= 0");
    if (ldx < k_) throw nb::value_error(("row stride " + str(ldx) + " < in_features " + str(k_)).c_str());
    const Output o = make_output(out, n_, act, false);
    nb::gil_scoped_release release;
    forward(reinterpret_cast<const float*>(x), ldx, m, o, clamp_threads(nthreads));
  }

  // The product without the GIL or argument checks (callers checked them): also for worker threads.
  void forward(const float* x, int64_t ldx, int64_t m, const Output& o, int nthreads) const {
    if (kind_ == kI8Sparse || kind_ == kI8Csr) {
      linear_i8_sparse(si8_, x, ldx, m, o, nthreads);
    } else if (kind_ == kI8Dense) {
      linear_i8_dense(di8_, x, ldx, m, o, nthreads);
    } else {
      linear_f32_sparse(sf32_, x, ldx, m, o, nthreads);
    }
  }

  // Fused FFN: y (m, second.n) = second(act1(first(x))), both int8 4-block or CSR, first.n == second.k.
  static void run_ffn(const Packed& first, const Packed& second, uintptr_t x, int64_t m, uintptr_t out, int act1,
                      int act2, int nthreads) {
    if (m < 0) throw nb::value_error("number of rows must be >= 0");
    check_ffn(first, second);
    make_output(0, 0, act1, false);  // checks the code
    const Output o = make_output(out, second.n_, act2, false);
    const float* xf = reinterpret_cast<const float*>(x);
    nb::gil_scoped_release release;
    linear_i8_ffn(first.si8_, act1, second.si8_, xf, first.k_, m, o, clamp_threads(nthreads));
  }

  static void check_ffn(const Packed& first, const Packed& second) {
    const auto sparse = [](const Packed& p) { return p.kind_ == kI8Sparse || p.kind_ == kI8Csr; };
    if (!sparse(first) || !sparse(second)) {
      throw nb::value_error("the fused FFN takes two int8 sparse weights (4-block or CSR)");
    }
    if (first.n_ != second.k_) {
      throw nb::value_error(("the first weight has " + str(first.n_) + " outputs but the second takes " +
                             str(second.k_) + " inputs")
                                .c_str());
    }
  }

  int64_t out_features() const { return n_; }
  int64_t in_features() const { return k_; }
  const SparseI8& sparse_i8() const { return si8_; }

  nb::dict tensors(nb::handle self) const {
    nb::dict d;
    const auto put = [&](const char* name, const Owned& buf, nb::dlpack::dtype dt,
                         std::initializer_list<size_t> shape) {
      if (!buf) return;
      d[name] = nb::ndarray<nb::pytorch>(buf.get(), shape.size(), shape.begin(), self, nullptr, dt).cast();
    };
    const size_t n = static_cast<size_t>(n_);
    if (kind_ != kI8Dense) {
      put("ptr", ptr_public_, nb::dtype<int32_t>(), {static_cast<size_t>(panels_ * n_ + 1)});
      put("cols", cols_, nb::dtype<uint16_t>(), {static_cast<size_t>(kind_ == kI8Csr ? 4 * nnz_ : nnz_)});
      put("values", values_, kind_ != kF32Sparse ? nb::dtype<int32_t>() : nb::dtype<float>(),
          {static_cast<size_t>(nnz_)});
    } else {
      put("panels", values_, nb::dtype<int8_t>(),
          {static_cast<size_t>((n_ + 15) / 16), static_cast<size_t>(kb_), size_t{16}, size_t{4}});
    }
    put("weight_sum", wsum_, nb::dtype<int32_t>(), {n});
    put("weight_scale", scale_, nb::dtype<float>(), {n});
    put("bias", bias_, nb::dtype<float>(), {n});
    return d;
  }

  int kind() const { return kind_; }
  int64_t nnz() const { return nnz_; }
  int64_t jit_bytes() const { return jit_ ? static_cast<int64_t>(jit_->bytes()) : 0; }

 private:
  template <class T>
  static const T* as(const Owned& p) {
    return reinterpret_cast<const T*>(p.get());
  }

  int kind_;
  int64_t n_, k_, kb_, nnz_ = 0, panels_ = 0;
  bool has_bias_;
  // The kernels read ptr_kernel_, a private copy: editing the public `ptr` tensor cannot send them out of bounds.
  Owned ptr_kernel_, ptr_public_, prefix_, cols_, values_, wsum_, scale_, bias_;
  SparseI8 si8_{};
  std::unique_ptr<JitBlock4> jit_;  // generated code for si8_ (4-block on AVX-512 VNNI), or null
  DenseI8 di8_{};
  SparseF32 sf32_{};
};

// ------------------------------------------------------------------------------------------------------------------
// A whole encoder layer (encoder_layer.h) over packed weights: Q/K/V packed together (no activation), the attention
// output, and the FFN (fused: both int8 4-block; or two calls through a hidden buffer). Built once per layer;
// run() takes the addresses of x, y, the mask and the LayerNorm parameters, which hf_sparse.nn checks first.

thread_local ScratchBuffer t_ffn_hidden;  // the unfused FFN's hidden activations, per thread

class EncoderLayerPlan {
 public:
  EncoderLayerPlan(nb::object qkv, nb::object out, nb::object first, nb::object second, bool ffn_fused, int act_out,
                   int act1, int act2, int64_t heads, int64_t head_dim, double scale)
      : qkv_obj_(qkv), out_obj_(out), first_obj_(first), second_obj_(second) {
    const Packed& q = nb::cast<const Packed&>(qkv);
    const Packed& o = nb::cast<const Packed&>(out);
    const Packed& f1 = nb::cast<const Packed&>(first);
    const Packed& f2 = nb::cast<const Packed&>(second);
    for (int act : {act_out, act1, act2}) make_output(0, 0, act, false);  // checks the codes
    if (heads < 1 || head_dim < 1) throw nb::value_error("encoder layer: heads and head_dim must be >= 1");
    const int64_t width = heads * head_dim, hidden = o.out_features();
    if (q.out_features() != 3 * width || o.in_features() != width || q.in_features() != hidden ||
        f1.in_features() != hidden || f2.out_features() != hidden || f1.out_features() != f2.in_features()) {
      throw nb::value_error(("encoder layer: sizes do not chain (qkv " + str(q.in_features()) + " -> " +
                             str(q.out_features()) + ", out " + str(o.in_features()) + " -> " + str(hidden) +
                             ", ffn " + str(f1.in_features()) + " -> " + str(f1.out_features()) + " -> " +
                             str(f2.out_features()) + ", heads x head_dim " + str(width) + ")")
                                .c_str());
    }
    if (ffn_fused) Packed::check_ffn(f1, f2);
    const Packed *pq = &q, *po = &o, *p1 = &f1, *p2 = &f2;
    call_.qkv = [pq](const float* x, int64_t m, float* y, int nt) {
      pq->forward(x, pq->in_features(), m, plain(y, pq), nt);
    };
    if (q.kind() == kI8Sparse || q.kind() == kI8Csr) {  // the kernels that can write the attention's packed Q/K/V
      call_.qkv_packed = [pq](const float* x, int64_t m, const QkvPackedOut& p, int nt) {
        Output out;
        out.qkv = &p;
        pq->forward(x, pq->in_features(), m, out, nt);
      };
    }
    call_.out = [po, act_out](const float* x, int64_t m, float* y, int nt) {
      Output out = plain(y, po);
      out.act = act_out;
      po->forward(x, po->in_features(), m, out, nt);
    };
    if (ffn_fused) {
      call_.ffn = [p1, p2, act1, act2](const float* x, int64_t m, float* y, int nt) {
        Output out = plain(y, p2);
        out.act = act2;
        linear_i8_ffn(p1->sparse_i8(), act1, p2->sparse_i8(), x, p1->in_features(), m, out, nt);
      };
    } else {
      call_.ffn = [p1, p2, act1, act2](const float* x, int64_t m, float* y, int nt) {
        float* h = reinterpret_cast<float*>(t_ffn_hidden.get(static_cast<size_t>(m * p1->out_features()) * 4));
        Output mid = plain(h, p1);
        mid.act = act1;
        p1->forward(x, p1->in_features(), m, mid, nt);
        Output out = plain(y, p2);
        out.act = act2;
        p2->forward(h, p2->in_features(), m, out, nt);
      };
    }
    if (ffn_fused && q.kind() == kI8Sparse && o.kind() == kI8Sparse && f1.kind() == kI8Sparse &&
        f2.kind() == kI8Sparse) {  // (int8 4-block: the feature-major path)
      call_.w_qkv = &q.sparse_i8();
      call_.w_out = &o.sparse_i8();
      call_.w_ffn1 = &f1.sparse_i8();
      call_.w_ffn2 = &f2.sparse_i8();
      call_.act_out = act_out;
      call_.act1 = act1;
      call_.act2 = act2;
    }
    call_.hidden = hidden;
    call_.width = width;
    call_.heads = heads;
    call_.head_dim = head_dim;
    call_.scale = static_cast<float>(scale);
  }

  int64_t hidden() const { return call_.hidden; }

  // This layer's call: y = layer(x) for batch sequences of seq tokens; norms: addresses of gamma1, beta1, gamma2,
  // beta2 (float32, hidden each).
  EncoderLayerCall call(uintptr_t x, uintptr_t y, int64_t batch, int64_t seq, int mask_kind, uintptr_t mask,
                        int64_t mask_sb, int64_t mask_sh, int64_t mask_sq, const uintptr_t* norms, double eps1,
                        double eps2, int64_t chunk_tokens, bool split_sequences, bool pack_qkv,
                        bool feature_major, bool attention_int8) const {
    if (batch < 0 || seq < 0) throw nb::value_error("encoder layer: batch and seq must be >= 0");
    check_mask_kind(mask_kind, "encoder layer");
    EncoderLayerCall c = call_;
    c.x = reinterpret_cast<const float*>(x);
    c.y = reinterpret_cast<float*>(y);
    c.batch = batch;
    c.seq = seq;
    c.mask_kind = mask_kind;
    c.mask = reinterpret_cast<const void*>(mask);
    c.mask_sb = mask_sb;
    c.mask_sh = mask_sh;
    c.mask_sq = mask_sq;
    c.gamma1 = reinterpret_cast<const float*>(norms[0]);
    c.beta1 = reinterpret_cast<const float*>(norms[1]);
    c.gamma2 = reinterpret_cast<const float*>(norms[2]);
    c.beta2 = reinterpret_cast<const float*>(norms[3]);
    c.eps1 = static_cast<float>(eps1);
    c.eps2 = static_cast<float>(eps2);
    c.chunk_tokens = std::max<int64_t>(1, chunk_tokens);
    c.split_sequences = split_sequences;
    c.pack_qkv = pack_qkv;
    c.feature_major = feature_major;
    c.attention_int8 = attention_int8;
    return c;
  }

  // y = layer(x); profile: 0 or the address of kLayerSteps int64 counters (ns added). Returns encoder_layer's
  // LayerParallelism flags.
  int run(uintptr_t x, uintptr_t y, int64_t batch, int64_t seq, int mask_kind, uintptr_t mask, int64_t mask_sb,
          int64_t mask_sh, int64_t mask_sq, const std::vector<uintptr_t>& norms, double eps1, double eps2,
          int64_t chunk_tokens, bool split_sequences, bool pack_qkv, bool feature_major, bool attention_int8,
          int nthreads, uintptr_t profile) const {
    if (norms.size() != 4) throw nb::value_error("encoder layer: 4 LayerNorm parameter addresses expected");
    const EncoderLayerCall c = call(x, y, batch, seq, mask_kind, mask, mask_sb, mask_sh, mask_sq, norms.data(), eps1,
                                    eps2, chunk_tokens, split_sequences, pack_qkv, feature_major, attention_int8);
    nb::gil_scoped_release release;
    return encoder_layer(c, clamp_threads(nthreads), reinterpret_cast<int64_t*>(profile));
  }

 private:
  static Output plain(float* y, const Packed* p) {
    Output o;
    o.y = y;
    o.ldy = p->out_features();
    return o;
  }

  nb::object qkv_obj_, out_obj_, first_obj_, second_obj_;  // keep the packed weights alive
  EncoderLayerCall call_;
};

// Encoder layers run one after the other in one call (encoder_stack): layer l reads layer l-1's output. The
// intermediate outputs alternate between y and `scratch` (both (batch * seq, hidden) float32, neither aliasing x)
// so that the last layer writes y.
class EncoderStackPlan {
 public:
  explicit EncoderStackPlan(const std::vector<nb::object>& layers) : layer_objs_(layers) {
    if (layers.empty()) throw nb::value_error("encoder stack: no layers");
    for (const nb::object& o : layers) plans_.push_back(&nb::cast<const EncoderLayerPlan&>(o));
    for (size_t l = 1; l < plans_.size(); ++l) {  // each layer reads the previous one's rows
      if (plans_[l]->hidden() != plans_[0]->hidden()) {
        throw nb::value_error(("encoder stack: layer " + str(static_cast<int64_t>(l)) + " is " +
                               str(plans_[l]->hidden()) + " wide, layer 0 " + str(plans_[0]->hidden()))
                                  .c_str());
      }
    }
  }

  // norms: 4 LayerNorm parameter addresses per layer (as EncoderLayer.run), eps: eps1, eps2 per layer.
  int run(uintptr_t x, uintptr_t y, uintptr_t scratch, int64_t batch, int64_t seq, int mask_kind, uintptr_t mask,
          int64_t mask_sb, int64_t mask_sh, int64_t mask_sq, const std::vector<uintptr_t>& norms,
          const std::vector<double>& eps, int64_t chunk_tokens, bool split_sequences, bool pack_qkv,
          bool feature_major, bool attention_int8, int nthreads, uintptr_t profile) const {
    const size_t n = plans_.size();
    if (norms.size() != 4 * n || eps.size() != 2 * n) {
      throw nb::value_error(("encoder stack: " + str(static_cast<int64_t>(4 * n)) + " LayerNorm addresses and " +
                             str(static_cast<int64_t>(2 * n)) + " eps values expected")
                                .c_str());
    }
    std::vector<EncoderLayerCall> calls;
    calls.reserve(n);
    uintptr_t in = x;
    for (size_t l = 0; l < n; ++l) {
      const uintptr_t out = (n - 1 - l) % 2 == 0 ? y : scratch;
      calls.push_back(plans_[l]->call(in, out, batch, seq, mask_kind, mask, mask_sb, mask_sh, mask_sq,
                                      norms.data() + 4 * l, eps[2 * l], eps[2 * l + 1], chunk_tokens,
                                      split_sequences, pack_qkv, feature_major, attention_int8));
      in = out;
    }
    nb::gil_scoped_release release;
    return encoder_stack(calls.data(), static_cast<int>(n), clamp_threads(nthreads),
                         reinterpret_cast<int64_t*>(profile));
  }

 private:
  std::vector<nb::object> layer_objs_;  // keep the layers (and their packed weights) alive
  std::vector<const EncoderLayerPlan*> plans_;
};

// ------------------------------------------------------------------------------------------------------------------
// Raw entry points for the torch ops (tensors checked in Python, row pointers checked here).

// quads: int8 CSR (cols holds 4 input features per entry; the Python op checked them).
void i8_sparse_raw(uintptr_t x, int64_t m, uintptr_t ptr, uintptr_t cols, uintptr_t values, uintptr_t wsum,
                   uintptr_t scale, uintptr_t bias, int64_t n, int64_t k, int64_t nnz, uintptr_t out, int act,
                   int nthreads, bool accum, bool quads) {
  check_dims(n, k);
  const int32_t* p = reinterpret_cast<const int32_t*>(ptr);
  const int64_t panels = panels_of(kI8Sparse, k);
  check_ptr(p, panels * n, nnz, quads ? "int8 CSR weight" : "int8 4-block weight");
  const SparseI8 w{n,
                   k,
                   (k + 3) / 4,
                   panels,
                   p,
                   reinterpret_cast<const uint16_t*>(cols),
                   reinterpret_cast<const int32_t*>(values),
                   reinterpret_cast<const int32_t*>(wsum),
                   reinterpret_cast<const float*>(scale),
                   reinterpret_cast<const float*>(bias),
                   nullptr,
                   quads};
  const Output o = make_output(out, n, act, accum);
  nb::gil_scoped_release release;
  linear_i8_sparse(w, reinterpret_cast<const float*>(x), k, m, o, clamp_threads(nthreads));
}

void i8_ffn_raw(uintptr_t x, int64_t m, const std::vector<uintptr_t>& w1, const std::vector<uintptr_t>& w2,
                int64_t k, int64_t hidden, int64_t n, int64_t nnz1, int64_t nnz2, uintptr_t out, int act1, int act2,
                int nthreads, bool quads1, bool quads2) {
  // w1, w2: addresses of ptr, cols, values, weight_sum, weight_scale, bias (0: none).
  if (w1.size() != 6 || w2.size() != 6) throw nb::value_error("i8_ffn_raw: 6 arrays per weight");
  check_dims(hidden, k);
  check_dims(n, hidden);
  const auto view = [](const std::vector<uintptr_t>& a, int64_t rows, int64_t cols, int64_t nnz, const char* what,
                       bool quads) {
    const int32_t* p = reinterpret_cast<const int32_t*>(a[0]);
    const int64_t panels = panels_of(kI8Sparse, cols);
    check_ptr(p, panels * rows, nnz, what);
    return SparseI8{rows,
                    cols,
                    (cols + 3) / 4,
                    panels,
                    p,
                    reinterpret_cast<const uint16_t*>(a[1]),
                    reinterpret_cast<const int32_t*>(a[2]),
                    reinterpret_cast<const int32_t*>(a[3]),
                    reinterpret_cast<const float*>(a[4]),
                    reinterpret_cast<const float*>(a[5]),
                    nullptr,
                    quads};
  };
  const SparseI8 first = view(w1, hidden, k, nnz1, "first int8 sparse weight", quads1);
  const SparseI8 second = view(w2, n, hidden, nnz2, "second int8 sparse weight", quads2);
  make_output(0, 0, act1, false);
  const Output o = make_output(out, n, act2, false);
  nb::gil_scoped_release release;
  linear_i8_ffn(first, act1, second, reinterpret_cast<const float*>(x), k, m, o, clamp_threads(nthreads));
}

void i8_dense_raw(uintptr_t x, int64_t m, uintptr_t panels, uintptr_t wsum, uintptr_t scale, uintptr_t bias,
                  int64_t n, int64_t k, uintptr_t out, int act, int nthreads, bool accum) {
  check_dims(n, k);
  const DenseI8 w{n, k, (k + 3) / 4, (n + 15) / 16, reinterpret_cast<const int8_t*>(panels),
                  reinterpret_cast<const int32_t*>(wsum), reinterpret_cast<const float*>(scale),
                  reinterpret_cast<const float*>(bias)};
  const Output o = make_output(out, n, act, accum);
  nb::gil_scoped_release release;
  linear_i8_dense(w, reinterpret_cast<const float*>(x), k, m, o, clamp_threads(nthreads));
}

void f32_sparse_raw(uintptr_t x, int64_t m, uintptr_t ptr, uintptr_t cols, uintptr_t values, uintptr_t bias,
                    int64_t n, int64_t k, int64_t nnz, uintptr_t out, int act, int nthreads) {
  check_dims(n, k);
  const int32_t* p = reinterpret_cast<const int32_t*>(ptr);
  const int64_t panels = panels_of(kF32Sparse, k);
  check_ptr(p, panels * n, nnz, "fp32 CSR weight");
  const SparseF32 w{n,
                    k,
                    panels,
                    p,
                    reinterpret_cast<const uint16_t*>(cols),
                    reinterpret_cast<const float*>(values),
                    reinterpret_cast<const float*>(bias),
                    nullptr};
  const Output o = make_output(out, n, act, false);
  nb::gil_scoped_release release;
  linear_f32_sparse(w, reinterpret_cast<const float*>(x), k, m, o, clamp_threads(nthreads));
}

// Multi-head self-attention; hf_sparse.ops.attention checks shapes, strides and dtypes first.
void attention_raw(uintptr_t q, uintptr_t k, uintptr_t v, int64_t ldq, int64_t ldk, int64_t ldv, uintptr_t out,
                   int64_t ldo, int64_t batch, int64_t seq, int64_t heads, int64_t d, double scale, bool causal,
                   int mask_kind, uintptr_t mask, int64_t mask_sb, int64_t mask_sh, int64_t mask_sq, bool int8,
                   int nthreads) {
  if (batch < 0 || seq < 0 || heads < 0 || d < 0) throw nb::value_error("attention: sizes must be >= 0");
  check_mask_kind(mask_kind, "attention");
  AttnCall c;
  c.q = reinterpret_cast<const float*>(q);
  c.k = reinterpret_cast<const float*>(k);
  c.v = reinterpret_cast<const float*>(v);
  c.ldq = ldq;
  c.ldk = ldk;
  c.ldv = ldv;
  c.out = reinterpret_cast<float*>(out);
  c.ldo = ldo;
  c.batch = batch;
  c.seq = seq;
  c.heads = heads;
  c.d = d;
  c.scale = static_cast<float>(scale);
  c.causal = causal;
  c.mask_kind = mask_kind;
  c.mask = reinterpret_cast<const void*>(mask);
  c.mask_sb = mask_sb;
  c.mask_sh = mask_sh;
  c.mask_sq = mask_sq;
  if (int8) c.kernels = &active_attn_int8_kernels();
  nb::gil_scoped_release release;
  attention(c, clamp_threads(nthreads));
}

void add_layernorm_raw(uintptr_t x, int64_t ldx, uintptr_t res, int64_t ldr, int64_t rows, int64_t n,
                       uintptr_t gamma, uintptr_t beta, double eps, uintptr_t y, int64_t ldy, int nthreads) {
  if (rows < 0 || n < 1) throw nb::value_error("add_layernorm: rows must be >= 0 and n >= 1");
  nb::gil_scoped_release release;
  add_layernorm(reinterpret_cast<const float*>(x), ldx, reinterpret_cast<const float*>(res), ldr, rows, n,
                reinterpret_cast<const float*>(gamma), reinterpret_cast<const float*>(beta), static_cast<float>(eps),
                reinterpret_cast<float*>(y), ldy, clamp_threads(nthreads));
}

EmbedTable embed_table(int64_t rows, uintptr_t f32, uintptr_t codes, uintptr_t scale, const char* name) {
  if (rows < 1 || (f32 == 0) == (codes == 0) || (codes != 0 && scale == 0)) {
    throw nb::value_error((std::string("embed_layernorm: the ") + name +
                           " table needs rows >= 1 and either float32 rows or int8 codes with scales").c_str());
  }
  return EmbedTable{rows, reinterpret_cast<const float*>(f32), reinterpret_cast<const int8_t*>(codes),
                    reinterpret_cast<const float*>(scale)};
}

// Tables as (rows, float32 address, int8 codes address, scales address), unused addresses 0; type rows 0: no
// token types. Returns None, or (tensor name, b, s, value, limit) for the first index outside its table.
nb::object embed_layernorm_raw(int64_t batch, int64_t seq, int64_t n, uintptr_t ids, int64_t ids_sb, int64_t ids_ss,
                               int64_t vocab, uintptr_t word, uintptr_t word_codes, uintptr_t word_scale,
                               int64_t positions, uintptr_t position, uintptr_t position_codes,
                               uintptr_t position_scale, uintptr_t pos_ids, int64_t pos_sb, int64_t pos_ss,
                               int64_t padding_idx, int64_t past, int64_t types, uintptr_t type, uintptr_t type_codes,
                               uintptr_t type_scale, uintptr_t type_ids, int64_t type_sb, int64_t type_ss,
                               int64_t type_ids_len, bool type_by_position, uintptr_t gamma, uintptr_t beta,
                               double eps, uintptr_t y, int nthreads) {
  if (batch < 0 || seq < 0 || n < 1 || ids == 0 || gamma == 0 || beta == 0 || y == 0) {
    throw nb::value_error("embed_layernorm: batch and seq must be >= 0, n >= 1, with ids, LayerNorm and output");
  }
  EmbedCall c;
  c.batch = batch;
  c.seq = seq;
  c.n = n;
  c.ids = reinterpret_cast<const int64_t*>(ids);
  c.ids_sb = ids_sb;
  c.ids_ss = ids_ss;
  c.word = embed_table(vocab, word, word_codes, word_scale, "word");
  c.position = embed_table(positions, position, position_codes, position_scale, "position");
  if (types > 0) {
    c.type = embed_table(types, type, type_codes, type_scale, "token type");
    if (type_ids == 0) throw nb::value_error("embed_layernorm: a token type table without token type ids");
  }
  c.pos_ids = reinterpret_cast<const int64_t*>(pos_ids);
  c.pos_sb = pos_sb;
  c.pos_ss = pos_ss;
  c.padding_idx = padding_idx;
  c.past = past;
  c.type_ids = reinterpret_cast<const int64_t*>(type_ids);
  c.type_sb = type_sb;
  c.type_ss = type_ss;
  c.type_ids_len = type_ids_len;
  c.type_by_position = type_by_position;
  c.gamma = reinterpret_cast<const float*>(gamma);
  c.beta = reinterpret_cast<const float*>(beta);
  c.eps = static_cast<float>(eps);
  c.y = reinterpret_cast<float*>(y);
  EmbedError err;
  {
    nb::gil_scoped_release release;
    err = embed_layernorm(c, clamp_threads(nthreads));
  }
  if (err.tensor == nullptr) return nb::none();
  return nb::make_tuple(err.tensor, err.b, err.s, err.value, err.limit);
}

void quantize_raw(uintptr_t x, int64_t m, int64_t k, uintptr_t q, uintptr_t scale) {
  check_dims(0, k);
  nb::gil_scoped_release release;
  quantize_rows_i8(reinterpret_cast<const float*>(x), k, m, k, reinterpret_cast<int8_t*>(q),
                   reinterpret_cast<float*>(scale));
}

// Whether all n elements of elem_bytes bytes at ptr are nonzero (an integer or bool padding mask without padding):
// the check a base model's fast path makes, without a torch op (~50-75 us cold after a forward's kernels).
bool all_nonzero_raw(uintptr_t ptr, int64_t n, int64_t elem_bytes) {
  if ((ptr == 0 && n > 0) || n < 0 || elem_bytes < 1 || elem_bytes > 8) {
    throw nb::value_error("all_nonzero: a buffer of n >= 0 elements of 1 to 8 bytes");
  }
  const auto* p = reinterpret_cast<const unsigned char*>(ptr);
  for (int64_t i = 0; i < n; ++i, p += elem_bytes) {
    unsigned char any = 0;
    for (int64_t j = 0; j < elem_bytes; ++j) any |= p[j];
    if (!any) return false;
  }
  return true;
}

}  // namespace
}  // namespace hf_sparse

NB_MODULE(_C, m) {
  using namespace hf_sparse;
  m.doc() = "hf_sparse sparse CPU kernels (use hf_sparse.ops, which checks arguments before calling in here)";
  // Packed weights held by modules that outlive the interpreter's teardown are reported as leaks otherwise.
  nb::set_leak_warnings(false);
  m.def("abi_version", []() { return kAbiVersion; });
  m.attr("MAX_IN_FEATURES") = kMaxInFeatures;
  m.attr("PANEL") = kPanel;
  m.attr("ACT_NONE") = static_cast<int>(kActNone);
  m.attr("ACT_GELU") = static_cast<int>(kActGelu);
  m.attr("ACT_TANH") = static_cast<int>(kActTanh);
  m.attr("KIND_INT8_SPARSE") = static_cast<int>(kI8Sparse);
  m.attr("KIND_INT8_DENSE") = static_cast<int>(kI8Dense);
  m.attr("KIND_FP32_SPARSE") = static_cast<int>(kF32Sparse);

  m.def("isa", &active_isa_name, "The instruction set the kernels use now.");
  m.def(
      "set_isa", [](const std::string& name) { set_isa(name); }, "name"_a,
      "Use another instruction set ('auto' = the fastest this CPU runs).");
  m.def("supported_isas", &supported_isa_names, "Instruction sets this build can run on this CPU, fastest first.");
  m.def("all_isas", &all_isa_names);
  m.def("cpu_features", []() {
    const CpuFeatures f = cpu_features();
    nb::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx_vnni"] = f.avx_vnni;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512dq"] = f.avx512dq;
    d["avx512vl"] = f.avx512vl;
    d["avx512_vnni"] = f.avx512_vnni;
    d["avx512_bf16"] = f.avx512_bf16;
    d["avx512_vbmi"] = f.avx512_vbmi;
    return d;
  });
  m.def("set_jit", &set_jit_enabled, "on"_a, "Use the generated 4-block code where a weight has it.");
  m.def("jit_enabled", &jit_enabled);
  m.def("jit_available", &jit_available, "Whether int8 4-block weights packed now get generated code.");
  m.def("jit_calls", &jit_calls, "Tiles run through generated 4-block code so far.");
  m.def("jit_pair_calls", &jit_pair_calls, "Products that ran two tiles through each group's generated code.");
  m.def("set_spin_us", &set_spin_us, "us"_a);
  m.def("spin_us", &spin_us);
  m.def("pool_size", &pool_size);
  m.def(
      "set_threads_backend",
      [](const std::string& name) {
        if (name == "auto") return set_backend(kBackendAuto);
        if (name == "pool") return set_backend(kBackendPool);
        if (name == "openmp") return set_backend(kBackendOpenMP);
        throw nb::value_error(("unknown threads backend '" + name + "'; known: auto, pool, openmp").c_str());
      },
      "name"_a);
  m.def("threads_backend", []() { return std::string(backend_name()); });
  m.def("kernel_calls", []() {
    nb::dict d;
    for (const auto& kv : kernel_calls()) d[kv.first.c_str()] = kv.second;
    return d;
  }, "Kernel calls so far per instruction set.");

  nb::class_<Packed>(m, "Packed")
      .def(nb::init<int, int64_t, int64_t, In1<int32_t>, In1<uint16_t>, nb::ndarray<nb::c_contig>, In1<int32_t>,
                    In1<float>, In1<float>, bool>(),
           "kind"_a, "out_features"_a, "in_features"_a, "ptr"_a, "cols"_a, "values"_a, "weight_sum"_a, "scale"_a,
           "bias"_a, "has_bias"_a)
      .def("run", &Packed::run, "x"_a, "m"_a, "out"_a, "act"_a, "nthreads"_a, "accumulators"_a)
      .def("run_rows", &Packed::run_rows, "x"_a, "ldx"_a, "m"_a, "out"_a, "act"_a, "nthreads"_a)
      .def_static("run_ffn", &Packed::run_ffn, "first"_a, "second"_a, "x"_a, "m"_a, "out"_a, "act1"_a, "act2"_a,
                  "nthreads"_a)
      .def("tensors", [](nb::handle self) { return nb::cast<const Packed&>(self).tensors(self); })
      .def_prop_ro("kind", &Packed::kind)
      .def_prop_ro("nnz", &Packed::nnz)
      .def_prop_ro("jit_bytes", &Packed::jit_bytes);

  nb::class_<EncoderLayerPlan>(m, "EncoderLayer")
      .def(nb::init<nb::object, nb::object, nb::object, nb::object, bool, int, int, int, int64_t, int64_t, double>(),
           "qkv"_a, "out"_a, "first"_a, "second"_a, "ffn_fused"_a, "act_out"_a, "act1"_a, "act2"_a, "heads"_a,
           "head_dim"_a, "scale"_a)
      .def("run", &EncoderLayerPlan::run, "x"_a, "y"_a, "batch"_a, "seq"_a, "mask_kind"_a, "mask"_a, "mask_sb"_a,
           "mask_sh"_a, "mask_sq"_a, "norms"_a, "eps1"_a, "eps2"_a, "chunk_tokens"_a, "split_sequences"_a,
           "pack_qkv"_a, "feature_major"_a, "attention_int8"_a, "nthreads"_a, "profile"_a);
  nb::class_<EncoderStackPlan>(m, "EncoderStack")
      .def(nb::init<const std::vector<nb::object>&>(), "layers"_a)
      .def("run", &EncoderStackPlan::run, "x"_a, "y"_a, "scratch"_a, "batch"_a, "seq"_a, "mask_kind"_a, "mask"_a,
           "mask_sb"_a, "mask_sh"_a, "mask_sq"_a, "norms"_a, "eps"_a, "chunk_tokens"_a, "split_sequences"_a,
           "pack_qkv"_a, "feature_major"_a, "attention_int8"_a, "nthreads"_a, "profile"_a);
  m.attr("LAYER_STEPS") = nb::make_tuple("qkv", "wait", "attention", "out", "norm1", "ffn", "norm2");
  m.attr("LAYER_PARALLELISM") = nb::make_tuple(nb::make_tuple("sequences", static_cast<int>(kSequenceParallel)),
                                               nb::make_tuple("tokens", static_cast<int>(kTokenParallel)),
                                               nb::make_tuple("steps", static_cast<int>(kStepParallel)));
  m.attr("LAYER_PACKED_QKV") = static_cast<int>(kPackedQkv);
  m.attr("LAYER_FEATURE_MAJOR") = static_cast<int>(kFeatureMajor);
  m.attr("PACKED_QKV_MIN_SEQ") = kMinPackedSeq;

  m.def("i8_sparse_raw", &i8_sparse_raw);
  m.def("i8_ffn_raw", &i8_ffn_raw);
  m.def("i8_dense_raw", &i8_dense_raw);
  m.def("f32_sparse_raw", &f32_sparse_raw);
  m.def("quantize_raw", &quantize_raw);
  m.def("attention_raw", &attention_raw);
  m.def("add_layernorm_raw", &add_layernorm_raw);
  m.def("embed_layernorm_raw", &embed_layernorm_raw);
  m.def("embed_calls", &embed_calls, "Fused embeddings calls so far.");
  m.def("all_nonzero_raw", &all_nonzero_raw, "ptr"_a, "n"_a, "elem_bytes"_a);
  m.attr("MASK_NONE") = static_cast<int>(kMaskNone);
  m.attr("MASK_ADD") = static_cast<int>(kMaskAdd);
  m.attr("MASK_KEEP") = static_cast<int>(kMaskKeep);
  m.def("quads_few_variant", &quads_few_variant,
        "The int8 CSR few-token kernel of the active instruction set: avx512_vbmi, avx512_vnni or none.");
  m.def("attention_isa",
        [](bool int8) { return std::string((int8 ? active_attn_int8_kernels() : active_attn_kernels()).name); },
        "int8"_a, "The attention (and LayerNorm) kernels in use: avx512_bf16, avx2 or scalar; with int8: "
        "avx512_vnni_int8, avx2_int8 or scalar_int8.");
  m.def("attention_calls", [](bool layernorm) {
    nb::dict d;
    for (const auto& kv : attention_calls(layernorm)) d[kv.first.c_str()] = kv.second;
    return d;
  }, "layernorm"_a, "Attention (or add_layernorm) calls so far per kernel name.");
}
