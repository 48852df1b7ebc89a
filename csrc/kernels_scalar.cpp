// Portable C++ kernels: the baseline every CPU runs, and the plainest statement of what the vector kernels compute.
//
// int8 tiles here hold signed codes (no +128 shift): tile[kb][r][j] = q_x[r][4 kb + j].
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"

namespace hf_sparse {
namespace {

constexpr int kTile = 16;

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Per-token symmetric quantization, bit for bit as hf_sparse.quantization.numerics does it in torch:
// inv = (1 / amax) * 127 (torch's `127 / t` is reciprocal-then-multiply), q = clamp(round_half_even(x * inv)),
// scale = amax / 127. A token holding inf or NaN gets scale NaN, so its outputs are NaN.
inline void token_params(const float* x, int64_t k, float* inv, float* scale) {
  uint32_t amax_bits = 0;
  for (int64_t i = 0; i < k; ++i) {
    const uint32_t b = bits_of(x[i]) & 0x7fffffffu;
    amax_bits = b > amax_bits ? b : amax_bits;
  }
  if (amax_bits >= 0x7f800000u) {
    *inv = 0.0f;
    *scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float amax = float_of(amax_bits);
  *inv = amax > 0.0f ? (1.0f / amax) * 127.0f : 0.0f;
  *scale = amax / 127.0f;
}

inline int8_t quantize(float v, float inv) {
  float r = std::nearbyint(v * inv);
  r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
  return static_cast<int8_t>(r != r ? 0.0f : r);
}

inline float activate(float v, int act) {
  if (act == kActGelu) return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
  if (act == kActTanh) return std::tanh(v);
  return v;
}

// y = ((float)acc * scale_x) * scale_w + bias, in this order, as numerics.int8_linear_reference does.
inline void store_i8(const Output& out, int64_t row, int64_t n, int32_t acc, float sx, const float* scale,
                     const float* bias) {
  if (out.yi) {
    out.yi[row * out.ldy + n] = acc;
    return;
  }
  float v = static_cast<float>(acc) * sx;
  v = v * scale[n];
  if (bias) v = v + bias[n];
  out.y[row * out.ldy + n] = activate(v, out.act);
}

void quant_tile(const float* x, int64_t ldx, int rows, int64_t k, int mtp, void* tile_, float* sx) {
  int8_t* tile = static_cast<int8_t*>(tile_);
  const int64_t kb = (k + 3) / 4;
  std::memset(tile, 0, static_cast<size_t>(kb) * mtp * 4);
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    float inv;
    token_params(xr, k, &inv, &sx[r]);
    for (int64_t i = 0; i < k; ++i) tile[((i >> 2) * mtp + r) * 4 + (i & 3)] = quantize(xr[i], inv);
  }
}

void quant_rows(const float* x, int64_t ldx, int rows, int64_t k, void* out_, int64_t ldo, float* sx) {
  int8_t* out = static_cast<int8_t*>(out_);
  const int64_t kp = (k + 3) / 4 * 4;
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    int8_t* o = out + r * ldo;
    float inv;
    token_params(xr, k, &inv, &sx[r]);
    for (int64_t i = 0; i < k; ++i) o[i] = quantize(xr[i], inv);
    for (int64_t i = k; i < kp; ++i) o[i] = 0;
  }
}

void i8_sparse(const SparseI8& w, const void* tile_, int mtp, int rows, const float* sx, int64_t n0, int64_t n1,
               const Output& out) {
  if (w.quads) return i8_quads_portable(w, tile_, 1, 0, mtp, rows, sx, n0, n1, out);
  const int8_t* tile = static_cast<const int8_t*>(tile_);
  int32_t acc[kTile];
  for (int64_t n = n0; n < n1; ++n) {
    for (int r = 0; r < rows; ++r) acc[r] = 0;
    for (int64_t p = 0; p < w.panels; ++p) {
      for (int32_t b = w.ptr[p * w.n + n]; b < w.ptr[p * w.n + n + 1]; ++b) {
        int64_t c = w.cols[b];
        c = c < w.kb ? c : w.kb - 1;  // never read outside the tile, whatever the indices hold
        int8_t q[4];
        std::memcpy(q, &w.values[b], 4);
        const int8_t* t = tile + c * mtp * 4;
        for (int r = 0; r < rows; ++r) {
          acc[r] += t[r * 4] * q[0] + t[r * 4 + 1] * q[1] + t[r * 4 + 2] * q[2] + t[r * 4 + 3] * q[3];
        }
      }
    }
    for (int r = 0; r < rows; ++r) store_i8(out, out.m0 + r, n, acc[r], sx[r], w.scale, w.bias);
  }
}

void i8_dense(const DenseI8& w, const void* xq_, int64_t ldq, int rows, const float* sx, int64_t p0, int64_t p1,
              const Output& out) {
  const int8_t* xq = static_cast<const int8_t*>(xq_);
  for (int r = 0; r < rows; ++r) {
    const int8_t* xr = xq + r * ldq;
    for (int64_t p = p0; p < p1; ++p) {
      int32_t acc[16] = {0};
      const int8_t* panel = w.packed + p * w.kb * 64;
      for (int64_t b = 0; b < w.kb; ++b) {
        const int8_t* wb = panel + b * 64;
        const int8_t* xb = xr + b * 4;
        for (int c = 0; c < 16; ++c) {
          acc[c] += xb[0] * wb[c * 4] + xb[1] * wb[c * 4 + 1] + xb[2] * wb[c * 4 + 2] + xb[3] * wb[c * 4 + 3];
        }
      }
      for (int c = 0; c < 16 && p * 16 + c < w.n; ++c) {
        store_i8(out, out.m0 + r, p * 16 + c, acc[c], sx[r], w.scale, w.bias);
      }
    }
  }
}

void f32_tile(const float* x, int64_t ldx, int rows, int64_t k, int mtp, float* tile) {
  for (int64_t i = 0; i < k; ++i) {
    for (int r = 0; r < mtp; ++r) tile[i * mtp + r] = r < rows ? x[r * ldx + i] : 0.0f;
  }
}

void f32_sparse(const SparseF32& w, const float* tile, int mtp, int rows, int64_t n0, int64_t n1, const Output& out) {
  float acc[kTile];
  for (int64_t n = n0; n < n1; ++n) {
    for (int r = 0; r < rows; ++r) acc[r] = 0.0f;
    for (int64_t p = 0; p < w.panels; ++p) {
      for (int32_t b = w.ptr[p * w.n + n]; b < w.ptr[p * w.n + n + 1]; ++b) {
        int64_t c = w.cols[b];
        c = c < w.k ? c : w.k - 1;
        const float v = w.values[b];
        const float* t = tile + c * mtp;
        for (int r = 0; r < rows; ++r) acc[r] += v * t[r];
      }
    }
    for (int r = 0; r < rows; ++r) {
      float v = acc[r];
      if (w.bias) v = v + w.bias[n];
      out.y[(out.m0 + r) * out.ldy + n] = activate(v, out.act);
    }
  }
}

const IsaKernels kTable = {
    "scalar", 1, kTile, 1, 0, quant_tile, quant_rows, i8_sparse, i8_dense, 0, nullptr, f32_tile, f32_sparse,
    nullptr, nullptr,
};

}  // namespace

void i8_quads_portable(const SparseI8& w, const void* tile_, int act_bytes, int act_offset, int mtp, int rows,
                       const float* sx, int64_t n0, int64_t n1, const Output& out) {
  const char* tile = static_cast<const char*>(tile_);
  const int64_t k_max = w.kb * 4 - 1;
  // code of feature f of token r: element (f / 4, r, f % 4) of the [kb][mtp][4] tile, minus the shift
  const auto code = [&](int64_t f, int r) -> int32_t {
    const char* p = tile + (((f >> 2) * mtp + r) * 4 + (f & 3)) * act_bytes;
    if (act_bytes == 2) {
      int16_t v;
      std::memcpy(&v, p, 2);
      return v - act_offset;
    }
    return (act_offset ? static_cast<int32_t>(static_cast<uint8_t>(*p)) : static_cast<int32_t>(*p)) - act_offset;
  };
  for (int64_t n = n0; n < n1; ++n) {
    for (int r = 0; r < rows; ++r) {
      int32_t acc = 0;
      for (int64_t p = 0; p < w.panels; ++p) {
        for (int32_t e = w.ptr[p * w.n + n]; e < w.ptr[p * w.n + n + 1]; ++e) {
          int8_t q[4];
          std::memcpy(q, &w.values[e], 4);
          for (int i = 0; i < 4; ++i) {
            int64_t f = w.cols[4 * static_cast<int64_t>(e) + i];
            f = f < k_max ? f : k_max;  // never read outside the tile, whatever the indices hold
            acc += code(f, r) * q[i];
          }
        }
      }
      store_i8(out, out.m0 + r, n, acc, sx[r], w.scale, w.bias);
    }
  }
}

const IsaKernels* scalar_kernels() { return &kTable; }

}  // namespace hf_sparse
