// Fused training kernels of the binary activation quantizer (sign with the EDE/DTE estimator),
// each one pass over memory instead of the several passes of eager PyTorch:
//   sign_values(x)                  = x >= 0 ? +1 : -1                       (sign(0) = +1)
//   channel_std(x)                  = unbiased std per channel of NCHW x, clamped at 1e-8,
//                                     from double-precision sums of x and x^2 (shape [1, C, 1, 1])
//   sign_and_std(x)                 = both, reading x once (the DTE forward)
//   tanh_grad(x, slope, scale, g)   = g * scale_c * (1 - tanh(slope_c * x)^2)  (EDE/DTE backward)
//   hardtanh_sign_std(p)            = out = clamp(p, -1, 1), sign(out) and channel_std(out), reading p once
//   hardtanh_sign_grad(out, slope, scale, g_out, g_sign)
//                                   = (g_out + tanh_grad(out, slope, scale, g_sign)) * (|out| < 1): the
//                                     backward of a hardtanh whose output also feeds a sign, one pass
// slope and scale hold one value or one per channel (dim 1 of NCHW). tanh is SLEEF's 3.5-ULP
// vector tanh (as exported by libtorch_cpu; several times faster than the 1-ULP one), so the
// surrogate gradient matches eager PyTorch to a few units in the last place.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

void check_float(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, what, ": expected a float32 CPU tensor");
}

at::Tensor sign_values(const at::Tensor& x) {
  check_float(x, "sign_values");
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, in.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = src[i] >= 0.f ? 1.f : -1.f;
  });
  return out;
}

// clamp(p, -1, 1) into ``clamped``, then the sign values and moments of the clamped plane.
void clamped_plane_moments_scalar(const float* p, int64_t count, float* clamped, float* values, double* sum,
                                  double* sum_sq);

// Sum and sum of squares of one plane, writing its sign values when ``values`` is not null.
void plane_moments_scalar(const float* p, int64_t count, float* values, double* sum, double* sum_sq) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, q[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent partial sums
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    for (int j = 0; j < 8; ++j) {
      s[j] += p[i + j];
      q[j] += p[i + j] * p[i + j];
    }
  }
  for (; i < count; ++i) {
    s[0] += p[i];
    q[0] += p[i] * p[i];
  }
  if (values != nullptr) {
    for (int64_t k = 0; k < count; ++k) values[k] = p[k] >= 0.f ? 1.f : -1.f;
  }
  for (int j = 0; j < 8; ++j) {  // the plane in float, the total in double
    *sum += s[j];
    *sum_sq += q[j];
  }
}

#if ZOO_X86
__attribute__((target("avx512f"))) void plane_moments_avx512(const float* p, int64_t count, float* values,
                                                             double* sum, double* sum_sq) {
  const __m512 one = _mm512_set1_ps(1.f), minus_one = _mm512_set1_ps(-1.f), zero = _mm512_setzero_ps();
  __m512 s = zero, q = zero;
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 v = _mm512_loadu_ps(p + i);
    s = _mm512_add_ps(s, v);
    q = _mm512_fmadd_ps(v, v, q);
    if (values != nullptr) {
      const __mmask16 nonneg = _mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ);  // NaN -> -1, as eager
      _mm512_storeu_ps(values + i, _mm512_mask_blend_ps(nonneg, minus_one, one));
    }
  }
  *sum += _mm512_reduce_add_ps(s);
  *sum_sq += _mm512_reduce_add_ps(q);
  if (i < count) plane_moments_scalar(p + i, count - i, values == nullptr ? nullptr : values + i, sum, sum_sq);
}
#endif

void clamped_plane_moments_scalar(const float* p, int64_t count, float* clamped, float* values, double* sum,
                                  double* sum_sq) {
  for (int64_t k = 0; k < count; ++k) clamped[k] = std::min(std::max(p[k], -1.f), 1.f);
  plane_moments_scalar(clamped, count, values, sum, sum_sq);
}

#if ZOO_X86
__attribute__((target("avx512f"))) void clamped_plane_moments_avx512(const float* p, int64_t count, float* clamped,
                                                                     float* values, double* sum, double* sum_sq) {
  const __m512 one = _mm512_set1_ps(1.f), minus_one = _mm512_set1_ps(-1.f), zero = _mm512_setzero_ps();
  __m512 s = zero, q = zero;
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_loadu_ps(p + i), minus_one), one);
    _mm512_storeu_ps(clamped + i, v);
    s = _mm512_add_ps(s, v);
    q = _mm512_fmadd_ps(v, v, q);
    const __mmask16 nonneg = _mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ);
    _mm512_storeu_ps(values + i, _mm512_mask_blend_ps(nonneg, minus_one, one));
  }
  *sum += _mm512_reduce_add_ps(s);
  *sum_sq += _mm512_reduce_add_ps(q);
  if (i < count) clamped_plane_moments_scalar(p + i, count - i, clamped + i, values + i, sum, sum_sq);
}
#endif

// sign values of x (when ``values`` is not null) and the unbiased per-channel std, one pass per channel;
// with ``clamped``, of clamp(x, -1, 1), written there
void sign_std_pass(const at::Tensor& in, float* values, float* stds, float* clamped = nullptr) {
  const int64_t n = in.size(0), c = in.size(1), plane = in.size(2) * in.size(3), count = n * plane;
  const float* src = in.data_ptr<float>();
  auto moments = plane_moments_scalar;
  auto clamped_moments = clamped_plane_moments_scalar;
#if ZOO_X86
  if (__builtin_cpu_supports("avx512f")) {
    moments = plane_moments_avx512;
    clamped_moments = clamped_plane_moments_avx512;
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
  for (int64_t ch = 0; ch < c; ++ch) {
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t b = 0; b < n; ++b) {
      sum += sums[b * c + ch];
      sum_sq += sums_sq[b * c + ch];
    }
    const double mean = sum / count;
    const double var = std::max(sum_sq / count - mean * mean, 0.0) * count / std::max<int64_t>(count - 1, 1);
    stds[ch] = std::max(static_cast<float>(std::sqrt(var)), 1e-8f);
  }
}

at::Tensor channel_std(const at::Tensor& x) {
  check_float(x, "channel_std");
  TORCH_CHECK(x.dim() == 4, "channel_std: expected an NCHW tensor");
  at::Tensor in = x.contiguous();
  at::Tensor stds = at::empty({1, in.size(1), 1, 1}, in.options());
  sign_std_pass(in, nullptr, stds.data_ptr<float>());
  return stds;
}

std::tuple<at::Tensor, at::Tensor> sign_and_std(const at::Tensor& x) {
  check_float(x, "sign_and_std");
  TORCH_CHECK(x.dim() == 4, "sign_and_std: expected an NCHW tensor");
  at::Tensor in = x.contiguous();
  at::Tensor values = at::empty_like(in), stds = at::empty({1, in.size(1), 1, 1}, in.options());
  sign_std_pass(in, values.data_ptr<float>(), stds.data_ptr<float>());
  return {values, stds};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hardtanh_sign_std(const at::Tensor& x) {
  check_float(x, "hardtanh_sign_std");
  TORCH_CHECK(x.dim() == 4, "hardtanh_sign_std: expected an NCHW tensor");
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in), values = at::empty_like(in);
  at::Tensor stds = at::empty({1, in.size(1), 1, 1}, in.options());
  sign_std_pass(in, values.data_ptr<float>(), stds.data_ptr<float>(), out.data_ptr<float>());
  return {out, values, stds};
}

// out[i] = g[i] * scale * (1 - tanh(slope * x[i])^2) over a span, one slope/scale; with ``pass``
// (the gradient of a hardtanh output x that also feeds the sign): (pass[i] + that) * (|x[i]| < 1)
void tanh_grad_span_scalar(const float* x, const float* g, const float* pass, float slope, float scale, float* out,
                           int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float u = std::tanh(slope * x[i]);
    const float d = g[i] * (scale - scale * u * u);
    out[i] = pass == nullptr ? d : (std::fabs(x[i]) < 1.f ? pass[i] + d : 0.f);
  }
}

#if ZOO_X86
__attribute__((target("avx512f"))) void tanh_grad_span_avx512(const float* x, const float* g, const float* pass,
                                                              float slope, float scale, float* out, int64_t count) {
  const __m512 vs = _mm512_set1_ps(slope), vk = _mm512_set1_ps(scale), one = _mm512_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512 u = Sleef_tanhf16_u35avx512f(_mm512_mul_ps(v, vs));
    const __m512 d = _mm512_mul_ps(_mm512_loadu_ps(g + i), _mm512_sub_ps(vk, _mm512_mul_ps(_mm512_mul_ps(vk, u), u)));
    if (pass == nullptr) {
      _mm512_storeu_ps(out + i, d);
    } else {
      const __mmask16 inside = _mm512_cmp_ps_mask(_mm512_abs_ps(v), one, _CMP_LT_OQ);
      _mm512_storeu_ps(out + i, _mm512_maskz_add_ps(inside, _mm512_loadu_ps(pass + i), d));
    }
  }
  tanh_grad_span_scalar(x + i, g + i, pass == nullptr ? nullptr : pass + i, slope, scale, out + i, count - i);
}

__attribute__((target("avx2,fma"))) void tanh_grad_span_avx2(const float* x, const float* g, const float* pass,
                                                             float slope, float scale, float* out, int64_t count) {
  const __m256 vs = _mm256_set1_ps(slope), vk = _mm256_set1_ps(scale), one = _mm256_set1_ps(1.f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 u = Sleef_tanhf8_u35avx2(_mm256_mul_ps(v, vs));
    const __m256 d = _mm256_mul_ps(_mm256_loadu_ps(g + i), _mm256_sub_ps(vk, _mm256_mul_ps(_mm256_mul_ps(vk, u), u)));
    if (pass == nullptr) {
      _mm256_storeu_ps(out + i, d);
    } else {
      const __m256 inside = _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), one, _CMP_LT_OQ);
      _mm256_storeu_ps(out + i, _mm256_and_ps(inside, _mm256_add_ps(_mm256_loadu_ps(pass + i), d)));
    }
  }
  tanh_grad_span_scalar(x + i, g + i, pass == nullptr ? nullptr : pass + i, slope, scale, out + i, count - i);
}
#endif

using TanhSpan = void (*)(const float*, const float*, const float*, float, float, float*, int64_t);

TanhSpan select_tanh_span() {
#if ZOO_X86
  if (__builtin_cpu_supports("avx512f")) return tanh_grad_span_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return tanh_grad_span_avx2;
#endif
  return tanh_grad_span_scalar;
}

// tanh_grad, or with ``pass`` defined the hardtanh_sign backward (see the top of the file)
at::Tensor tanh_grad_pass(const char* name, const at::Tensor& x, const at::Tensor& slope, const at::Tensor& scale,
                          const at::Tensor& grad, const at::Tensor& pass) {
  check_float(x, name);
  check_float(grad, name);
  TORCH_CHECK(x.sizes() == grad.sizes(), name, ": x and grad must have the same shape");
  at::Tensor ps;
  if (pass.defined()) {
    check_float(pass, name);
    TORCH_CHECK(x.sizes() == pass.sizes(), name, ": x and the output gradient must have the same shape");
    ps = pass.contiguous();
  }
  at::Tensor xs = x.contiguous(), gs = grad.contiguous();
  at::Tensor sl = slope.to(at::kFloat).contiguous().view(-1), sc = scale.to(at::kFloat).contiguous().view(-1);
  const int64_t c = sl.numel();
  TORCH_CHECK(sc.numel() == c, name, ": slope and scale must have the same size");
  TORCH_CHECK(c == 1 || (x.dim() >= 2 && x.size(1) == c), name, ": per-channel slope needs x.size(1) == ", c);
  const int64_t outer = c == 1 ? 1 : x.size(0);
  const int64_t plane = c == 1 ? x.numel() : x.numel() / (x.size(0) * c);
  at::Tensor out = at::empty_like(xs);
  const float *xp = xs.data_ptr<float>(), *gp = gs.data_ptr<float>();
  const float* pp = ps.defined() ? ps.data_ptr<float>() : nullptr;
  const float *slp = sl.data_ptr<float>(), *scp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const TanhSpan span = select_tanh_span();
  // work items: (sample, channel) planes, or chunks of the whole tensor for one slope
  const int64_t chunk = c == 1 ? (1 << 14) : plane;
  const int64_t items = c == 1 ? (x.numel() + chunk - 1) / chunk : outer * c;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ch = c == 1 ? 0 : item % c;
      const int64_t start = item * chunk, count = std::min(chunk, x.numel() - start);
      span(xp + start, gp + start, pp == nullptr ? nullptr : pp + start, slp[ch], scp[ch], op + start, count);
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
  m.def("loaded() -> bool", [] { return true; });
}
