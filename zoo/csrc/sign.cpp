// Fused training kernels of the binary quantizers (sign with the EDE/DTE estimator, IMB weights),
// each one pass over memory instead of the several passes of eager PyTorch:
//   sign_values(x)                  = x >= 0 ? +1 : -1                       (sign(0) = +1)
//   channel_std(x)                  = unbiased std per channel (dim 1) of 4-D x, clamped at 1e-8, from sums
//                                     of x and x^2 (float per plane or block of rows, totalled in double;
//                                     shape [1, C, 1, 1])
//   sign_and_std(x)                 = both, reading x once (the DTE forward)
//   tanh_grad(x, slope, scale, g)   = g * scale_c * (1 - tanh(slope_c * x)^2)  (EDE/DTE backward)
//   hardtanh_sign_std(p)            = out = clamp(p, -1, 1), sign(out) and channel_std(out), reading p once
//   hardtanh_sign_grad(out, slope, scale, g_out, g_sign)
//                                   = (g_out + tanh_grad(out, slope, scale, g_sign)) * (|out| < 1): the
//                                     backward of a hardtanh whose output also feeds a sign, one pass
//   imb_forward(w)                  = IMB of a weight viewed as [out channels, fan-in], per row j:
//                                     w_hat = (w - mean_j) / std_j (unbiased, std_j >= 1e-12),
//                                     s_j = 2^round(log2(mean_j |w_hat|)), values sign(w_hat) s_j, and
//                                     DTE's sigma_j = std_j(w_hat) (>= 1e-8)
//   imb_backward(g, w_hat, std, s, slope, scale)
//                                   = its gradient: with h = g s_j scale_j (1 - tanh(slope_j w_hat)^2),
//                                     (h - mean_j h - w_hat sum_j(h w_hat) / (n - 1)) / std_j
// slope and scale hold one value or one per channel (dim 1 of NCHW; the row of imb_backward).
// The activation kernels read 4-D x in its own layout, NCHW or channels_last (NHWC, as
// torch.channels_last training stores activations), and return their outputs in that layout; the other
// tensor arguments are read in x's layout. NHWC runs the per-channel statistics and slopes along the
// innermost dim instead of converting to NCHW and back (two extra passes per kernel).
// The activation kernels take float32 or bfloat16 (bf16 autocast training): bf16 values are widened
// to float32, all arithmetic runs in float32 and results are rounded back to nearest even, as
// c10::BFloat16 does; the statistics are float32 for either. The IMB kernels take float32 (weights).
// tanh is SLEEF's 3.5-ULP vector tanh (as exported by libtorch_cpu; several times faster than the
// 1-ULP one), so the surrogate gradient matches eager PyTorch to a few units in the last place.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ZOO_X86 1
// SLEEF's vector tanh as libtorch_cpu exports it (sleef.h declares these only for -mavx2/-mavx512f builds)
#pragma GCC push_options
#pragma GCC target("avx512f")
extern "C" __m512 Sleef_tanhf16_u35avx512f(__m512);
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
extern "C" __m256 Sleef_tanhf8_u35avx2(__m256);
#pragma GCC pop_options
#else
#define ZOO_X86 0
#endif

namespace {

using BF16 = c10::BFloat16;

void check_tensor(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), what,
              ": expected a float32 or bfloat16 CPU tensor, got ", x.scalar_type(), " on ", x.device());
}

void check_same_dtype(const at::Tensor& x, const at::Tensor& other, const char* what) {
  TORCH_CHECK(x.scalar_type() == other.scalar_type(), what, ": tensors must share one dtype, got ",
              x.scalar_type(), " and ", other.scalar_type());
}

// NHWC when x is 4-D and stored channels_last (but not also NCHW-contiguous, as 1x1 maps are), else NCHW
at::MemoryFormat layout_of(const at::Tensor& x) {
  const bool nhwc = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// ``body(T())`` with T = float or BF16 for x's dtype (a generic lambda takes the tag).
template <typename Body>
void dispatch(const at::Tensor& x, Body&& body) {
  if (x.scalar_type() == at::kBFloat16) {
    body(BF16());
  } else {
    body(float());
  }
}

inline float widen(float v) { return v; }
inline float widen(BF16 v) { return static_cast<float>(v); }
template <typename T>
inline T narrow(float v) {
  return static_cast<T>(v);  // BF16: round to nearest even (c10)
}

#if ZOO_X86
// 16 (AVX-512) or 8 (AVX2) lanes of float32 from float32 or bf16 memory, and back (bf16: nearest even,
// NaN kept quiet, as c10::BFloat16)
__attribute__((target("avx512f"), always_inline)) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"), always_inline)) inline __m512 load16(const BF16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx512f"), always_inline)) inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
__attribute__((target("avx512f"), always_inline)) inline void store16(BF16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

__attribute__((target("avx2,fma"), always_inline)) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"), always_inline)) inline __m256 load8(const BF16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx2,fma"), always_inline)) inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
__attribute__((target("avx2,fma"), always_inline)) inline void store8(BF16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000), nan);
  const __m256i high = _mm256_srli_epi32(rounded, 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#endif

// The widest vector path this CPU has, capped by $ZOO_SIGN_ISA (avx512, avx2 or scalar; read on every
// call, so tests can run the narrower paths on a wide CPU).
enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

Isa vector_isa() {
  Isa cap = Isa::avx512;
  if (const char* env = std::getenv("ZOO_SIGN_ISA")) {
    const std::string name(env);
    TORCH_CHECK(name == "avx512" || name == "avx2" || name == "scalar",
                "ZOO_SIGN_ISA must be avx512, avx2 or scalar, got '", name, "'");
    cap = name == "avx512" ? Isa::avx512 : name == "avx2" ? Isa::avx2 : Isa::scalar;
  }
#if ZOO_X86
  if (cap >= Isa::avx512 && __builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (cap >= Isa::avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::scalar;
}

at::Tensor sign_values(const at::Tensor& x) {
  check_tensor(x, "sign_values");
  at::Tensor in = x.contiguous(layout_of(x));
  at::Tensor out = at::empty_like(in);
  dispatch(in, [&](auto tag) {
    using T = decltype(tag);
    const T* src = in.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    const T one(1.f), minus_one(-1.f);
    at::parallel_for(0, in.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dst[i] = widen(src[i]) >= 0.f ? one : minus_one;
    });
  });
  return out;
}

// Sum and sum of squares of one plane, writing its sign values when ``values`` is not null.
template <typename T>
void plane_moments_scalar(const T* p, int64_t count, T* values, double* sum, double* sum_sq) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, q[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent partial sums
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const float v = widen(p[i + j]);
      s[j] += v;
      q[j] += v * v;
    }
  }
  for (; i < count; ++i) {
    const float v = widen(p[i]);
    s[0] += v;
    q[0] += v * v;
  }
  if (values != nullptr) {
    const T one(1.f), minus_one(-1.f);
    for (int64_t k = 0; k < count; ++k) values[k] = widen(p[k]) >= 0.f ? one : minus_one;
  }
  for (int j = 0; j < 8; ++j) {  // the plane in float, the total in double
    *sum += s[j];
    *sum_sq += q[j];
  }
}

// clamp(p, -1, 1) into ``clamped``, then the sign values and moments of the clamped plane.
template <typename T>
void clamped_plane_moments_scalar(const T* p, int64_t count, T* clamped, T* values, double* sum, double* sum_sq) {
  for (int64_t k = 0; k < count; ++k) clamped[k] = narrow<T>(std::min(std::max(widen(p[k]), -1.f), 1.f));
  plane_moments_scalar(clamped, count, values, sum, sum_sq);
}

#if ZOO_X86
template <typename T>
__attribute__((target("avx512f"))) void plane_moments_avx512(const T* p, int64_t count, T* values, double* sum,
                                                             double* sum_sq) {
  const __m512 one = _mm512_set1_ps(1.f), minus_one = _mm512_set1_ps(-1.f), zero = _mm512_setzero_ps();
  __m512 s = zero, q = zero;
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 v = load16(p + i);
    s = _mm512_add_ps(s, v);
    q = _mm512_fmadd_ps(v, v, q);
    if (values != nullptr) {
      const __mmask16 nonneg = _mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ);  // NaN -> -1, as eager
      store16(values + i, _mm512_mask_blend_ps(nonneg, minus_one, one));
    }
  }
  *sum += _mm512_reduce_add_ps(s);
  *sum_sq += _mm512_reduce_add_ps(q);
  if (i < count) plane_moments_scalar(p + i, count - i, values == nullptr ? nullptr : values + i, sum, sum_sq);
}

template <typename T>
__attribute__((target("avx512f"))) void clamped_plane_moments_avx512(const T* p, int64_t count, T* clamped, T* values,
                                                                     double* sum, double* sum_sq) {
  const __m512 one = _mm512_set1_ps(1.f), minus_one = _mm512_set1_ps(-1.f), zero = _mm512_setzero_ps();
  __m512 s = zero, q = zero;
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    // clamping a bf16 value to [-1, 1] gives a bf16 value, so the statistics see exactly what is stored
    const __m512 v = _mm512_min_ps(_mm512_max_ps(load16(p + i), minus_one), one);
    store16(clamped + i, v);
    s = _mm512_add_ps(s, v);
    q = _mm512_fmadd_ps(v, v, q);
    const __mmask16 nonneg = _mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ);
    store16(values + i, _mm512_mask_blend_ps(nonneg, minus_one, one));
  }
  *sum += _mm512_reduce_add_ps(s);
  *sum_sq += _mm512_reduce_add_ps(q);
  if (i < count) clamped_plane_moments_scalar(p + i, count - i, clamped + i, values + i, sum, sum_sq);
}
#endif

// The unbiased std per channel (float32, >= 1e-8) of ``count`` values each, from the partial sums of
// ``blocks`` blocks laid out [block][channel], summed over the blocks in order: the same for any thread count
void finish_stds(const std::vector<double>& sums, const std::vector<double>& sums_sq, int64_t blocks, int64_t c,
                 int64_t count, float* stds) {
  for (int64_t ch = 0; ch < c; ++ch) {
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      sum += sums[b * c + ch];
      sum_sq += sums_sq[b * c + ch];
    }
    const double mean = sum / count;
    const double var = std::max(sum_sq / count - mean * mean, 0.0) * count / std::max<int64_t>(count - 1, 1);
    stds[ch] = std::max(static_cast<float>(std::sqrt(var)), 1e-8f);
  }
}

// NHWC rows of c channels: per-channel float sums and sums of squares into s and q, the sign values into
// ``values`` (kValues); with kClamp of clamp(p, -1, 1), written to ``clamped``. The portable loop (and the
// channels past the last multiple of 8 in rows_moments_avx2).
template <typename T, bool kValues, bool kClamp>
__attribute__((always_inline)) inline void rows_moments_body(const T* __restrict__ p, int64_t rows, int64_t c,
                                                             T* __restrict__ values, T* __restrict__ clamped,
                                                             float* __restrict__ s, float* __restrict__ q) {
  const T one(1.f), minus_one(-1.f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * c;
    for (int64_t k = 0; k < c; ++k) {
      float v = widen(p[o + k]);
      if (kClamp) {
        v = std::min(std::max(v, -1.f), 1.f);
        clamped[o + k] = narrow<T>(v);  // exact: a clamped bf16 value is a bf16 value
      }
      s[k] += v;
      q[k] += v * v;
      if (kValues) values[o + k] = v >= 0.f ? one : minus_one;
    }
  }
}

template <typename T, bool kValues, bool kClamp>
void rows_moments_scalar(const T* p, int64_t rows, int64_t c, T* values, T* clamped, float* s, float* q) {
  rows_moments_body<T, kValues, kClamp>(p, rows, c, values, clamped, s, q);
}

#if ZOO_X86
// 8 channels at a time; the clamp as in clamped_plane_moments_avx512
template <typename T, bool kValues, bool kClamp>
__attribute__((target("avx2,fma"))) void rows_moments_avx2(const T* p, int64_t rows, int64_t c, T* values,
                                                           T* clamped, float* s, float* q) {
  const __m256 one = _mm256_set1_ps(1.f), minus_one = _mm256_set1_ps(-1.f), zero = _mm256_setzero_ps();
  const int64_t vec = c - c % 8;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * c;
    for (int64_t k = 0; k < vec; k += 8) {
      __m256 v = load8(p + o + k);
      if (kClamp) {
        v = _mm256_min_ps(_mm256_max_ps(v, minus_one), one);
        store8(clamped + o + k, v);
      }
      _mm256_storeu_ps(s + k, _mm256_add_ps(_mm256_loadu_ps(s + k), v));
      _mm256_storeu_ps(q + k, _mm256_fmadd_ps(v, v, _mm256_loadu_ps(q + k)));
      if (kValues) store8(values + o + k, _mm256_blendv_ps(minus_one, one, _mm256_cmp_ps(v, zero, _CMP_GE_OQ)));
    }
    if (vec < c) {
      rows_moments_body<T, kValues, kClamp>(p + o + vec, 1, c - vec, kValues ? values + o + vec : nullptr,
                                            kClamp ? clamped + o + vec : nullptr, s + vec, q + vec);
    }
  }
}
#endif

// sign_std_pass for NHWC x: blocks of whole rows (a fixed size, so the sums do not depend on the thread
// count), each block's per-channel moments in float, then in double per block
template <typename T, bool kValues, bool kClamp>
void sign_std_pass_nhwc(const at::Tensor& in, T* values, float* stds, T* clamped) {
  const int64_t c = in.size(1), rows = in.numel() / c;
  const int64_t rows_per_block = std::max<int64_t>(1, 8192 / c), blocks = (rows + rows_per_block - 1) / rows_per_block;
  const T* src = in.data_ptr<T>();
  auto moments = rows_moments_scalar<T, kValues, kClamp>;
#if ZOO_X86
  if (vector_isa() >= Isa::avx2) moments = rows_moments_avx2<T, kValues, kClamp>;
#endif
  std::vector<double> sums(blocks * c, 0.0), sums_sq(blocks * c, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(c), q(c);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(s.begin(), s.end(), 0.f);
      std::fill(q.begin(), q.end(), 0.f);
      const int64_t offset = b * rows_per_block * c, count = std::min(rows_per_block, rows - b * rows_per_block);
      moments(src + offset, count, c, kValues ? values + offset : nullptr, kClamp ? clamped + offset : nullptr,
              s.data(), q.data());
      std::copy(s.begin(), s.end(), sums.begin() + b * c);
      std::copy(q.begin(), q.end(), sums_sq.begin() + b * c);
    }
  });
  finish_stds(sums, sums_sq, blocks, c, rows, stds);
}

// sign values of x (when ``values`` is not null) and the unbiased per-channel std (float32), one pass per
// channel; with ``clamped``, of clamp(x, -1, 1), written there
template <typename T>
void sign_std_pass(const at::Tensor& in, T* values, float* stds, T* clamped = nullptr) {
  if (layout_of(in) == at::MemoryFormat::ChannelsLast) {
    if (clamped != nullptr) return sign_std_pass_nhwc<T, true, true>(in, values, stds, clamped);
    if (values != nullptr) return sign_std_pass_nhwc<T, true, false>(in, values, stds, nullptr);
    return sign_std_pass_nhwc<T, false, false>(in, nullptr, stds, nullptr);
  }
  const int64_t n = in.size(0), c = in.size(1), plane = in.size(2) * in.size(3), count = n * plane;
  const T* src = in.data_ptr<T>();
  auto moments = plane_moments_scalar<T>;
  auto clamped_moments = clamped_plane_moments_scalar<T>;
#if ZOO_X86
  if (vector_isa() == Isa::avx512) {  // the statistics have no AVX2 path: narrower CPUs take the portable loops
    moments = plane_moments_avx512<T>;
    clamped_moments = clamped_plane_moments_avx512<T>;
  }
#endif
  // planes in memory order (a contiguous stream, which the prefetchers follow), each plane's moments
  // into its own slot, then per channel summed over the batch in order: the same sums for any thread count
  std::vector<double> sums(n * c, 0.0), sums_sq(n * c, 0.0);
  at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t offset = item * plane;
      if (clamped != nullptr) {
        clamped_moments(src + offset, plane, clamped + offset, values + offset, &sums[item], &sums_sq[item]);
      } else {
        moments(src + offset, plane, values == nullptr ? nullptr : values + offset, &sums[item], &sums_sq[item]);
      }
    }
  });
  finish_stds(sums, sums_sq, n, c, count, stds);
}

at::Tensor new_stds(const at::Tensor& in) { return at::empty({1, in.size(1), 1, 1}, in.options().dtype(at::kFloat)); }

void check_4d(const at::Tensor& x, const char* what) {
  check_tensor(x, what);
  TORCH_CHECK(x.dim() == 4, what, ": expected a 4-D (NCHW or channels_last) tensor, got ", x.dim(), " dims");
}

at::Tensor channel_std(const at::Tensor& x) {
  check_4d(x, "channel_std");
  at::Tensor in = x.contiguous(layout_of(x));
  at::Tensor stds = new_stds(in);
  dispatch(in, [&](auto tag) {
    using T = decltype(tag);
    sign_std_pass<T>(in, nullptr, stds.data_ptr<float>());
  });
  return stds;
}

std::tuple<at::Tensor, at::Tensor> sign_and_std(const at::Tensor& x) {
  check_4d(x, "sign_and_std");
  at::Tensor in = x.contiguous(layout_of(x));
  at::Tensor values = at::empty_like(in), stds = new_stds(in);
  dispatch(in, [&](auto tag) {
    using T = decltype(tag);
    sign_std_pass<T>(in, values.data_ptr<T>(), stds.data_ptr<float>());
  });
  return {values, stds};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hardtanh_sign_std(const at::Tensor& x) {
  check_4d(x, "hardtanh_sign_std");
  at::Tensor in = x.contiguous(layout_of(x));
  at::Tensor out = at::empty_like(in), values = at::empty_like(in), stds = new_stds(in);
  dispatch(in, [&](auto tag) {
    using T = decltype(tag);
    sign_std_pass<T>(in, values.data_ptr<T>(), stds.data_ptr<float>(), out.data_ptr<T>());
  });
  return {out, values, stds};
}

// out[i] = g[i] * scale * (1 - tanh(slope * x[i])^2) over a span, one slope/scale (*slope, *scale) or with
// kLanes one per element (slope[i], scale[i]); with ``pass`` (the gradient of a hardtanh output x that also
// feeds the sign): (pass[i] + that) * (|x[i]| < 1)
template <typename T, bool kLanes>
void tanh_grad_span_scalar(const T* x, const T* g, const T* pass, const float* slope, const float* scale, T* out,
                           int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float v = widen(x[i]), sk = scale[kLanes ? i : 0];
    const float u = std::tanh(slope[kLanes ? i : 0] * v);
    const float d = widen(g[i]) * (sk - sk * u * u);
    out[i] = narrow<T>(pass == nullptr ? d : (std::fabs(v) < 1.f ? widen(pass[i]) + d : 0.f));
  }
}

#if ZOO_X86
template <typename T, bool kLanes>
__attribute__((target("avx512f"))) void tanh_grad_span_avx512(const T* x, const T* g, const T* pass,
                                                              const float* slope, const float* scale, T* out,
                                                              int64_t count) {
  const __m512 one = _mm512_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 vs = kLanes ? load16(slope + i) : _mm512_set1_ps(*slope);
    const __m512 vk = kLanes ? load16(scale + i) : _mm512_set1_ps(*scale);
    const __m512 v = load16(x + i);
    const __m512 u = Sleef_tanhf16_u35avx512f(_mm512_mul_ps(v, vs));
    const __m512 d = _mm512_mul_ps(load16(g + i), _mm512_sub_ps(vk, _mm512_mul_ps(_mm512_mul_ps(vk, u), u)));
    if (pass == nullptr) {
      store16(out + i, d);
    } else {
      const __mmask16 inside = _mm512_cmp_ps_mask(_mm512_abs_ps(v), one, _CMP_LT_OQ);
      store16(out + i, _mm512_maskz_add_ps(inside, load16(pass + i), d));
    }
  }
  tanh_grad_span_scalar<T, kLanes>(x + i, g + i, pass == nullptr ? nullptr : pass + i, kLanes ? slope + i : slope,
                                   kLanes ? scale + i : scale, out + i, count - i);
}

template <typename T, bool kLanes>
__attribute__((target("avx2,fma"))) void tanh_grad_span_avx2(const T* x, const T* g, const T* pass,
                                                             const float* slope, const float* scale, T* out,
                                                             int64_t count) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 vs = kLanes ? load8(slope + i) : _mm256_set1_ps(*slope);
    const __m256 vk = kLanes ? load8(scale + i) : _mm256_set1_ps(*scale);
    const __m256 v = load8(x + i);
    const __m256 u = Sleef_tanhf8_u35avx2(_mm256_mul_ps(v, vs));
    const __m256 d = _mm256_mul_ps(load8(g + i), _mm256_sub_ps(vk, _mm256_mul_ps(_mm256_mul_ps(vk, u), u)));
    if (pass == nullptr) {
      store8(out + i, d);
    } else {
      const __m256 inside = _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), one, _CMP_LT_OQ);
      store8(out + i, _mm256_and_ps(inside, _mm256_add_ps(load8(pass + i), d)));
    }
  }
  tanh_grad_span_scalar<T, kLanes>(x + i, g + i, pass == nullptr ? nullptr : pass + i, kLanes ? slope + i : slope,
                                   kLanes ? scale + i : scale, out + i, count - i);
}
#endif

template <typename T>
using TanhSpan = void (*)(const T*, const T*, const T*, const float*, const float*, T*, int64_t);

template <typename T, bool kLanes>
TanhSpan<T> select_tanh_span() {
#if ZOO_X86
  const Isa isa = vector_isa();
  if (isa == Isa::avx512) return tanh_grad_span_avx512<T, kLanes>;
  if (isa == Isa::avx2) return tanh_grad_span_avx2<T, kLanes>;
#endif
  return tanh_grad_span_scalar<T, kLanes>;
}

// tanh_grad, or with ``pass`` defined the hardtanh_sign backward (see the top of the file)
at::Tensor tanh_grad_pass(const char* name, const at::Tensor& x, const at::Tensor& slope, const at::Tensor& scale,
                          const at::Tensor& grad, const at::Tensor& pass) {
  check_tensor(x, name);
  check_same_dtype(x, grad, name);
  TORCH_CHECK(x.sizes() == grad.sizes(), name, ": x and grad must have the same shape");
  const at::MemoryFormat layout = layout_of(x);  // every input is read in x's layout
  at::Tensor ps;
  if (pass.defined()) {
    check_same_dtype(x, pass, name);
    TORCH_CHECK(x.sizes() == pass.sizes(), name, ": x and the output gradient must have the same shape");
    ps = pass.contiguous(layout);
  }
  at::Tensor xs = x.contiguous(layout), gs = grad.contiguous(layout);
  at::Tensor sl = slope.to(at::kFloat).contiguous().view(-1), sc = scale.to(at::kFloat).contiguous().view(-1);
  const int64_t c = sl.numel();
  TORCH_CHECK(sc.numel() == c, name, ": slope and scale must have the same size");
  TORCH_CHECK(c == 1 || (x.dim() >= 2 && x.size(1) == c), name, ": per-channel slope needs x.size(1) == ", c);
  const bool nhwc = c > 1 && layout == at::MemoryFormat::ChannelsLast;
  // work items: chunks of the whole tensor for one slope; (sample, channel) planes of NCHW; for NHWC, chunks
  // of whole rows, with the slopes and scales repeated along a chunk so that each element has its own
  const int64_t chunk = c == 1 ? (1 << 14) : nhwc ? c * std::max<int64_t>(1, 1024 / c) : x.numel() / (x.size(0) * c);
  const int64_t items = (x.numel() + chunk - 1) / chunk;
  std::vector<float> slopes, scales;
  if (nhwc) {
    slopes.resize(chunk);
    scales.resize(chunk);
    for (int64_t i = 0; i < chunk; ++i) {
      slopes[i] = sl.data_ptr<float>()[i % c];
      scales[i] = sc.data_ptr<float>()[i % c];
    }
  }
  at::Tensor out = at::empty_like(xs);
  dispatch(xs, [&](auto tag) {
    using T = decltype(tag);
    const T *xp = xs.data_ptr<T>(), *gp = gs.data_ptr<T>();
    const T* pp = ps.defined() ? ps.data_ptr<T>() : nullptr;
    const float *slp = sl.data_ptr<float>(), *scp = sc.data_ptr<float>();
    T* op = out.data_ptr<T>();
    const TanhSpan<T> span = nhwc ? select_tanh_span<T, true>() : select_tanh_span<T, false>();
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t ch = c == 1 || nhwc ? 0 : item % c;
        const int64_t start = item * chunk, count = std::min(chunk, x.numel() - start);
        const float* slope_at = nhwc ? slopes.data() : slp + ch;
        const float* scale_at = nhwc ? scales.data() : scp + ch;
        span(xp + start, gp + start, pp == nullptr ? nullptr : pp + start, slope_at, scale_at, op + start, count);
      }
    });
  });
  return out;
}

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, what,
              ": expected a 2-D float32 CPU tensor (output channels x fan-in), got ", x.scalar_type(), " of ",
              x.dim(), " dims on ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> imb_forward(const at::Tensor& w) {
  check_rows(w, "imb_forward");
  at::Tensor in = w.contiguous();
  const int64_t rows = in.size(0), n = in.size(1);
  at::Tensor values = at::empty_like(in), w_hat = at::empty_like(in);
  at::Tensor stds = at::empty({rows}, in.options()), scales = at::empty({rows}, in.options());
  at::Tensor sigmas = at::empty({rows}, in.options());
  const float* src = in.data_ptr<float>();
  float *vp = values.data_ptr<float>(), *hp = w_hat.data_ptr<float>();
  float *stdp = stds.data_ptr<float>(), *scp = scales.data_ptr<float>(), *sgp = sigmas.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* p = src + r * n;
      float *h = hp + r * n, *v = vp + r * n;
      double sum = 0.0;
      for (int64_t i = 0; i < n; ++i) sum += p[i];
      const float mean = static_cast<float>(sum / n);
      double centred = 0.0;  // two passes, as torch.std
      for (int64_t i = 0; i < n; ++i) centred += static_cast<double>(p[i] - mean) * (p[i] - mean);
      const float std = std::max(static_cast<float>(std::sqrt(centred / std::max<int64_t>(n - 1, 1))), 1e-12f);
      double abs_sum = 0.0, h_sum = 0.0, h_sq = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        h[i] = (p[i] - mean) / std;
        abs_sum += std::fabs(h[i]);
        h_sum += h[i];
        h_sq += static_cast<double>(h[i]) * h[i];
      }
      // 2^round(log2(mean |w_hat|)), round half to even as torch.round
      const float scale = std::exp2(std::nearbyint(std::log2(static_cast<float>(abs_sum / n))));
      for (int64_t i = 0; i < n; ++i) v[i] = h[i] >= 0.f ? scale : -scale;
      const double h_mean = h_sum / n;
      const double var = std::max(h_sq / n - h_mean * h_mean, 0.0) * n / std::max<int64_t>(n - 1, 1);
      stdp[r] = std;
      scp[r] = scale;
      sgp[r] = std::max(static_cast<float>(std::sqrt(var)), 1e-8f);
    }
  });
  return {values, w_hat, stds, scales, sigmas};
}

at::Tensor imb_backward(const at::Tensor& grad, const at::Tensor& w_hat, const at::Tensor& stds,
                        const at::Tensor& scales, const at::Tensor& slope, const at::Tensor& scale) {
  check_rows(grad, "imb_backward");
  check_rows(w_hat, "imb_backward");
  TORCH_CHECK(grad.sizes() == w_hat.sizes(), "imb_backward: grad and w_hat must have the same shape");
  const int64_t rows = w_hat.size(0), n = w_hat.size(1);
  at::Tensor gs = grad.contiguous(), hs = w_hat.contiguous();
  at::Tensor sd = stds.to(at::kFloat).contiguous().view(-1), ss = scales.to(at::kFloat).contiguous().view(-1);
  at::Tensor sl = slope.to(at::kFloat).contiguous().view(-1), sc = scale.to(at::kFloat).contiguous().view(-1);
  TORCH_CHECK(sd.numel() == rows && ss.numel() == rows, "imb_backward: one std and one scale per row");
  TORCH_CHECK(sl.numel() == sc.numel() && (sl.numel() == 1 || sl.numel() == rows),
              "imb_backward: slope and scale must hold one value or one per row");
  at::Tensor out = at::empty_like(hs);
  const float *gp = gs.data_ptr<float>(), *hp = hs.data_ptr<float>(), *sdp = sd.data_ptr<float>();
  const float *ssp = ss.data_ptr<float>(), *slp = sl.data_ptr<float>(), *scp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool per_row = sl.numel() != 1;
  const TanhSpan<float> span = select_tanh_span<float, false>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = per_row ? r : 0;
      const float* h = hp + r * n;
      float* o = op + r * n;
      const float scale_r = ssp[r] * scp[c];
      span(h, gp + r * n, nullptr, slp + c, &scale_r, o, n);  // the gradient of w_hat
      double sum = 0.0, dot = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        sum += o[i];
        dot += static_cast<double>(o[i]) * h[i];
      }
      const float mean = static_cast<float>(sum / n), inv_std = 1.f / sdp[r];
      // through std_j, unless it was clamped (no gradient there)
      const float proj = sdp[r] > 1e-12f ? static_cast<float>(dot / std::max<int64_t>(n - 1, 1)) : 0.f;
      for (int64_t i = 0; i < n; ++i) o[i] = (o[i] - mean - h[i] * proj) * inv_std;
    }
  });
  return out;
}

at::Tensor tanh_grad(const at::Tensor& x, const at::Tensor& slope, const at::Tensor& scale, const at::Tensor& grad) {
  return tanh_grad_pass("tanh_grad", x, slope, scale, grad, at::Tensor());
}

at::Tensor hardtanh_sign_grad(const at::Tensor& out, const at::Tensor& slope, const at::Tensor& scale,
                              const at::Tensor& grad_out, const at::Tensor& grad_sign) {
  return tanh_grad_pass("hardtanh_sign_grad", out, slope, scale, grad_sign, grad_out);
}

}  // namespace

TORCH_LIBRARY(zoo_sign, m) {
  m.def("sign_values(Tensor x) -> Tensor", &sign_values);
  m.def("channel_std(Tensor x) -> Tensor", &channel_std);
  m.def("sign_and_std(Tensor x) -> (Tensor, Tensor)", &sign_and_std);
  m.def("tanh_grad(Tensor x, Tensor slope, Tensor scale, Tensor grad) -> Tensor", &tanh_grad);
  m.def("hardtanh_sign_std(Tensor x) -> (Tensor, Tensor, Tensor)", &hardtanh_sign_std);
  m.def("hardtanh_sign_grad(Tensor out, Tensor slope, Tensor scale, Tensor grad_out, Tensor grad_sign) -> Tensor",
        &hardtanh_sign_grad);
  m.def("imb_forward(Tensor w) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", &imb_forward);
  m.def("imb_backward(Tensor grad, Tensor w_hat, Tensor std, Tensor scale_imb, Tensor slope, Tensor scale) -> Tensor",
        &imb_backward);
  m.def("loaded() -> bool", [] { return true; });
}
