// XNOR-popcount kernels for binary (W1A1) convolutions on the CPU.
//
// Bit convention: bit 1 = -1, bit 0 = +1, so for +-1 vectors a, w of length K
//   a . w = K - 2 * popcount(a XOR w).
// Activations are packed per pixel along channels (NHWC, ceil(C/64) words per
// pixel, unused high bits 0); weights as K = KH*KW*Cw words per output in the
// same tap order, stored eight outputs side by side ([ceil(O/8), K, 8]) so that
// SIMD lanes hold different outputs. Zero padding (border taps contribute 0, the semantics of F.conv2d on a
// signed input) is handled by reading all-zero words (+1 values) for taps
// outside the image and subtracting that tap's contribution
//   corr[o, tap] = C - 2 * popcount(w[o, tap])
// so every result is the exact integer dot product of the training model.
//
// One source, several instruction sets: the ISA-specific popcount is selected at
// run time (AVX-512 VPOPCNTDQ, AVX2 nibble lookup (Mula et al. 2018), scalar
// popcnt, portable C), each compiled with GCC/Clang target attributes, so one
// build serves every x86-64 CPU and tests can run each path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ZOO_X86 1
#else
#define ZOO_X86 0
#endif

namespace {

enum Isa : int64_t { kAuto = 0, kGeneric = 1, kPopcnt = 2, kAvx2 = 3, kAvx512 = 4 };

bool isa_supported(int64_t isa) {
  switch (isa) {
    case kGeneric:
      return true;
#if ZOO_X86
    case kPopcnt:
      return __builtin_cpu_supports("popcnt");
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#endif
    default:
      return false;
  }
}

int64_t best_isa() {
  for (int64_t isa : {kAvx512, kAvx2, kPopcnt}) {
    if (isa_supported(isa)) return isa;
  }
  return kGeneric;
}

// ---- popcount(a XOR b) over n words, one version per instruction set ----

uint64_t xor_popcount_generic(const uint64_t* a, const uint64_t* b, int64_t n) {
  uint64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t v = a[i] ^ b[i];  // SWAR popcount, no popcnt instruction needed
    v = v - ((v >> 1) & 0x5555555555555555ULL);
    v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    total += (v * 0x0101010101010101ULL) >> 56;
  }
  return total;
}

#if ZOO_X86
__attribute__((target("popcnt"))) uint64_t xor_popcount_popcnt(const uint64_t* a, const uint64_t* b, int64_t n) {
  uint64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += _mm_popcnt_u64(a[i] ^ b[i]);
  return total;
}

__attribute__((target("avx2,popcnt"))) uint64_t xor_popcount_avx2(const uint64_t* a, const uint64_t* b, int64_t n) {
  const __m256i lookup = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                          2, 3, 2, 3, 3, 4);
  const __m256i low_mask = _mm256_set1_epi8(0x0f);
  __m256i acc = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i)));
    __m256i lo = _mm256_shuffle_epi8(lookup, _mm256_and_si256(v, low_mask));
    __m256i hi = _mm256_shuffle_epi8(lookup, _mm256_and_si256(_mm256_srli_epi16(v, 4), low_mask));
    acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256()));
  }
  uint64_t total = static_cast<uint64_t>(_mm256_extract_epi64(acc, 0)) + _mm256_extract_epi64(acc, 1) +
                   _mm256_extract_epi64(acc, 2) + _mm256_extract_epi64(acc, 3);
  for (; i < n; ++i) total += _mm_popcnt_u64(a[i] ^ b[i]);
  return total;
}

__attribute__((target("avx512f,avx512vpopcntdq"))) uint64_t xor_popcount_avx512(const uint64_t* a, const uint64_t* b,
                                                                                 int64_t n) {
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m512i v = _mm512_xor_si512(_mm512_loadu_si512(a + i), _mm512_loadu_si512(b + i));
    acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(v));
  }
  if (i < n) {
    const __mmask8 tail = static_cast<__mmask8>((1u << (n - i)) - 1);
    __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi64(tail, a + i), _mm512_maskz_loadu_epi64(tail, b + i));
    acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(v));
  }
  return static_cast<uint64_t>(_mm512_reduce_add_epi64(acc));
}
#endif

// ---- counts[o] = popcount(row XOR w[o]) for all outputs of one pixel ----
// Weights come as ``lanes`` [ceil(O/8), K, 8]: eight outputs side by side, so each activation word is
// compared with eight outputs' words at once and no horizontal sums are needed (what makes short rows,
// e.g. 64 channels, fast). ``counts`` has room for ceil(O/8) * 8 entries.

void pixel_counts_generic(const uint64_t* row, const uint64_t* lanes, int64_t outputs, int64_t k, int64_t* counts) {
  const int64_t blocks = (outputs + 7) / 8;
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const uint64_t* w = lanes + b * k * 8;
    for (int64_t i = 0; i < k; ++i) {
      for (int j = 0; j < 8; ++j) acc[j] += static_cast<int64_t>(xor_popcount_generic(row + i, w + i * 8 + j, 1));
    }
    std::copy_n(acc, 8, counts + b * 8);
  }
}

#if ZOO_X86
__attribute__((target("popcnt"))) void pixel_counts_popcnt(const uint64_t* row, const uint64_t* lanes,
                                                           int64_t outputs, int64_t k, int64_t* counts) {
  const int64_t blocks = (outputs + 7) / 8;
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const uint64_t* w = lanes + b * k * 8;
    for (int64_t i = 0; i < k; ++i) {
      for (int j = 0; j < 8; ++j) acc[j] += static_cast<int64_t>(_mm_popcnt_u64(row[i] ^ w[i * 8 + j]));
    }
    std::copy_n(acc, 8, counts + b * 8);
  }
}

// Per-64-bit-lane popcount of a 256-bit vector (nibble lookup, Mula et al. 2018).
__attribute__((target("avx2"))) inline __m256i popcount_lanes_avx2(__m256i v) {
  const __m256i lookup = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                          2, 3, 2, 3, 3, 4);
  const __m256i low_mask = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_shuffle_epi8(lookup, _mm256_and_si256(v, low_mask));
  const __m256i hi = _mm256_shuffle_epi8(lookup, _mm256_and_si256(_mm256_srli_epi16(v, 4), low_mask));
  return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}

__attribute__((target("avx2,popcnt"))) void pixel_counts_avx2(const uint64_t* row, const uint64_t* lanes,
                                                              int64_t outputs, int64_t k, int64_t* counts) {
  const int64_t blocks = (outputs + 7) / 8;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint64_t* w = lanes + b * k * 8;
    __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;
    for (int64_t i = 0; i < k; ++i) {
      const __m256i a = _mm256_set1_epi64x(static_cast<long long>(row[i]));
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * 8));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * 8 + 4));
      acc0 = _mm256_add_epi64(acc0, popcount_lanes_avx2(_mm256_xor_si256(a, w0)));
      acc1 = _mm256_add_epi64(acc1, popcount_lanes_avx2(_mm256_xor_si256(a, w1)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(counts + b * 8), acc0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(counts + b * 8 + 4), acc1);
  }
}

// Four blocks of eight outputs share each broadcast activation word.
__attribute__((target("avx512f,avx512vpopcntdq"))) void pixel_counts_avx512(const uint64_t* row, const uint64_t* lanes,
                                                                            int64_t outputs, int64_t k,
                                                                            int64_t* counts) {
  const int64_t blocks = (outputs + 7) / 8, stride = k * 8;
  int64_t b = 0;
  for (; b + 4 <= blocks; b += 4) {
    const uint64_t* w0 = lanes + b * stride;
    __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t i = 0; i < k; ++i) {
      const __m512i a = _mm512_set1_epi64(static_cast<long long>(row[i]));
      acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(w0 + i * 8))));
      acc1 = _mm512_add_epi64(acc1,
                              _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(w0 + stride + i * 8))));
      acc2 = _mm512_add_epi64(
          acc2, _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(w0 + 2 * stride + i * 8))));
      acc3 = _mm512_add_epi64(
          acc3, _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(w0 + 3 * stride + i * 8))));
    }
    _mm512_storeu_si512(counts + b * 8, acc0);
    _mm512_storeu_si512(counts + (b + 1) * 8, acc1);
    _mm512_storeu_si512(counts + (b + 2) * 8, acc2);
    _mm512_storeu_si512(counts + (b + 3) * 8, acc3);
  }
  for (; b < blocks; ++b) {
    const uint64_t* w0 = lanes + b * stride;
    __m512i acc = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; ++i) {
      const __m512i a = _mm512_set1_epi64(static_cast<long long>(row[i]));
      acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(w0 + i * 8))));
    }
    _mm512_storeu_si512(counts + b * 8, acc);
  }
}
#endif

using XorPopcount = uint64_t (*)(const uint64_t*, const uint64_t*, int64_t);
using PixelCounts = void (*)(const uint64_t*, const uint64_t*, int64_t, int64_t, int64_t*);

int64_t resolve(int64_t isa) {
  if (isa == kAuto) isa = best_isa();
  TORCH_CHECK(isa_supported(isa), "zoo xnor: instruction set ", isa, " is not supported by this CPU");
  return isa;
}

XorPopcount select_kernel(int64_t isa) {
  switch (resolve(isa)) {
#if ZOO_X86
    case kPopcnt:
      return xor_popcount_popcnt;
    case kAvx2:
      return xor_popcount_avx2;
    case kAvx512:
      return xor_popcount_avx512;
#endif
    default:
      return xor_popcount_generic;
  }
}

PixelCounts select_pixel_kernel(int64_t isa) {
  switch (resolve(isa)) {
#if ZOO_X86
    case kPopcnt:
      return pixel_counts_popcnt;
    case kAvx2:
      return pixel_counts_avx2;
    case kAvx512:
      return pixel_counts_avx512;
#endif
    default:
      return pixel_counts_generic;
  }
}

// ---- packing ----

// sign bits of (x - threshold[c]) for a float [N, C, H, W] tensor -> int64 [N, H, W, ceil(C/64)];
// bit 1 where NOT (x - threshold >= 0), i.e. where the training model's sign gives -1.
at::Tensor pack_signs(const at::Tensor& x, const at::Tensor& threshold) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "pack_signs: expected a float [N, C, H, W] tensor");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), cw = (c + 63) / 64;
  at::Tensor nhwc = x.permute({0, 2, 3, 1}).contiguous();
  at::Tensor thr = threshold.numel() ? threshold.to(at::kFloat).contiguous() : at::zeros({c}, x.options());
  TORCH_CHECK(thr.numel() == c, "pack_signs: threshold must have C = ", c, " entries");
  at::Tensor out = at::empty({n, h, w, cw}, x.options().dtype(at::kLong));
  const float* src = nhwc.data_ptr<float>();
  const float* t = thr.data_ptr<float>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, n * h * w, 64, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* px = src + p * c;
      for (int64_t word = 0; word < cw; ++word) {
        uint64_t bits = 0;
        const int64_t c0 = word * 64, c1 = std::min(c, c0 + 64);
        for (int64_t ch = c0; ch < c1; ++ch) bits |= static_cast<uint64_t>(!(px[ch] - t[ch] >= 0.f)) << (ch - c0);
        dst[p * cw + word] = bits;
      }
    }
  });
  return out;
}

// ---- convolution ----

// out[n, oh, ow, o] = scale[o] * dot(n, oh, ow, o) + bias[o], with the exact integer dot product of the
// +-1 input (zero-padded) and the +-1 weights. Returns a float [N, OH, OW, O] tensor.
at::Tensor binary_conv2d(const at::Tensor& x_bits, const at::Tensor& w_lanes, const at::Tensor& corr, int64_t channels,
                         int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                         int64_t dil_h, int64_t dil_w, const at::Tensor& scale, const at::Tensor& bias, int64_t isa) {
  TORCH_CHECK(x_bits.dim() == 4 && x_bits.scalar_type() == at::kLong, "binary_conv2d: x_bits must be int64 [N,H,W,Cw]");
  const int64_t n = x_bits.size(0), h = x_bits.size(1), w = x_bits.size(2), cw = x_bits.size(3);
  const int64_t o_count = corr.size(0), taps = kh * kw, k_words = taps * cw;
  TORCH_CHECK(cw == (channels + 63) / 64, "binary_conv2d: input has ", cw, " words per pixel, expected ",
              (channels + 63) / 64, " for ", channels, " channels");
  TORCH_CHECK(w_lanes.sizes() == at::IntArrayRef({(o_count + 7) / 8, k_words, 8}) && w_lanes.scalar_type() == at::kLong,
              "binary_conv2d: w_lanes must be int64 [ceil(O/8), KH*KW*Cw, 8]");
  TORCH_CHECK(corr.sizes() == at::IntArrayRef({o_count, taps}), "binary_conv2d: corr must be [O, KH*KW]");
  const int64_t oh = (h + 2 * pad_h - dil_h * (kh - 1) - 1) / stride_h + 1;
  const int64_t ow = (w + 2 * pad_w - dil_w * (kw - 1) - 1) / stride_w + 1;
  TORCH_CHECK(oh > 0 && ow > 0, "binary_conv2d: input ", h, "x", w, " is too small for the kernel");
  const PixelCounts pixel_counts = select_pixel_kernel(isa);

  at::Tensor xb = x_bits.contiguous(), wl = w_lanes.contiguous();
  at::Tensor cr = corr.to(at::kInt).contiguous();
  at::Tensor sc = scale.to(at::kFloat).contiguous(), bi = bias.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({n, oh, ow, o_count}, scale.options().dtype(at::kFloat));
  const uint64_t* xp = reinterpret_cast<const uint64_t*>(xb.data_ptr<int64_t>());
  const uint64_t* lp = reinterpret_cast<const uint64_t*>(wl.data_ptr<int64_t>());
  const int32_t* cp = cr.data_ptr<int32_t>();
  const float* sp = sc.data_ptr<float>();
  const float* bp = bi.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t full = taps * channels;

  at::parallel_for(0, n * oh * ow, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> row(k_words);
    std::vector<int64_t> counts((o_count + 7) / 8 * 8);
    std::vector<int64_t> missing;
    missing.reserve(taps);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / (oh * ow), y = (p / ow) % oh, x = p % ow;
      missing.clear();
      for (int64_t i = 0; i < kh; ++i) {
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t iy = y * stride_h - pad_h + i * dil_h, ix = x * stride_w - pad_w + j * dil_w;
          uint64_t* dst = row.data() + (i * kw + j) * cw;
          if (iy < 0 || iy >= h || ix < 0 || ix >= w) {
            std::fill(dst, dst + cw, 0);
            missing.push_back(i * kw + j);
          } else {
            std::copy_n(xp + ((b * h + iy) * w + ix) * cw, cw, dst);
          }
        }
      }
      pixel_counts(row.data(), lp, o_count, k_words, counts.data());
      float* dst = op + p * o_count;
      const int64_t* c = counts.data();
      if (missing.empty()) {  // interior pixel: a loop the compiler vectorizes
        for (int64_t o = 0; o < o_count; ++o) dst[o] = sp[o] * static_cast<float>(full - 2 * c[o]) + bp[o];
      } else {
        for (int64_t o = 0; o < o_count; ++o) {
          int64_t dot = full - 2 * c[o];
          for (int64_t tap : missing) dot -= cp[o * taps + tap];
          dst[o] = sp[o] * static_cast<float>(dot) + bp[o];
        }
      }
    }
  });
  return out;
}

int64_t xor_popcount_count(const at::Tensor& a, const at::Tensor& b, int64_t isa) {
  TORCH_CHECK(a.scalar_type() == at::kLong && b.scalar_type() == at::kLong && a.numel() == b.numel(),
              "xor_popcount: expected two int64 tensors of the same size");
  at::Tensor ac = a.contiguous(), bc = b.contiguous();
  return static_cast<int64_t>(select_kernel(isa)(reinterpret_cast<const uint64_t*>(ac.data_ptr<int64_t>()),
                                                 reinterpret_cast<const uint64_t*>(bc.data_ptr<int64_t>()), a.numel()));
}

bool supported(int64_t isa) { return isa_supported(isa); }

}  // namespace

TORCH_LIBRARY(zoo_xnor, m) {
  m.def("pack_signs(Tensor x, Tensor threshold) -> Tensor", &pack_signs);
  m.def(
      "binary_conv2d(Tensor x_bits, Tensor w_lanes, Tensor corr, int channels, int kh, int kw, int stride_h, "
      "int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, Tensor scale, Tensor bias, int isa) -> Tensor",
      &binary_conv2d);
  m.def("xor_popcount(Tensor a, Tensor b, int isa) -> int", &xor_popcount_count);
  m.def("supported(int isa) -> bool", &supported);
  m.def("best_isa() -> int", &best_isa);
  m.def("loaded() -> bool", [] { return true; });
}
