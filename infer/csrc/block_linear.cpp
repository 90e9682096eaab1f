// y = x @ W.T for weights stored in blocks of 32 input columns, on AVX2.
//
// q4: 4-bit codes q in [0, 15], w = q * scale + minimum, scale and minimum fp16 per block.
//     Row n's block b is 16 bytes at codes[n][16 b]: byte j holds column 32 b + j in its low
//     nibble and column 32 b + 16 + j in its high nibble.
// q8: int8 codes q in [-127, 127], w = q * scale, scale fp16 per block.
//
// Each row of x is quantized on the fly per block of 32, so a block's dot product is integer
// arithmetic and one float multiply-add. q4 rounds x to int8 (a = round(x / ax), ax =
// max|x| / 127): unsigned x signed byte products summed in pairs (maddubs), then in fours
// (madd). q8 rounds x to int16 (ax = max|x| / 32767) and multiplies 16-bit pairs (madd) with
// the codes widened to 16 bits: the same instruction count per block, and its rounding of x
// becomes negligible next to the weights' own (with int8 x, on SmolLM2-135M the mean KL
// divergence of q8's next-token distribution from fp32's was 0.011, of which 0.003 is the
// weights' rounding; with int16 x, 0.003). q4's 4-bit weights dominate its error either way.
// Output rows are split across threads; a thread passes over its weight rows once per 4 rows of x (a layer's share, up to about 1 MB for SmolLM2-135M, stays in L2/L3 between
// passes: going column by column through all rows of x measured 10% slower at 16 rows).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;

struct QuantizedInput16 {
  std::vector<int16_t> codes;  // (m, k)
  std::vector<float> scale;    // (m, k / 32)
};

struct QuantizedInput {
  std::vector<int8_t> codes;  // (m, k)
  std::vector<float> scale;   // (m, k / 32)
  std::vector<float> sum;     // (m, k / 32): scale * sum of the block's codes (for q4's minimum)
};

float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rounds the 32 floats at src to integers in [-levels, levels] (q[j]: columns 8 j .. 8 j + 7,
// as int32) and returns the block's scale, max|x| / levels.
inline float round_block(const float* src, float levels, __m256i q[4]) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(src + 8 * j);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[j]));
  }
  const float top = horizontal_max(amax);
  const __m256 inverse = _mm256_set1_ps(top > 0.0f ? levels / top : 0.0f);
  for (int j = 0; j < 4; ++j)
    q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return top / levels;
}

void quantize_rows(const float* x, int64_t m, int64_t k, QuantizedInput& out) {
  const int64_t nb = k / BLOCK;
  out.codes.resize(m * k);
  out.scale.resize(m * nb);
  out.sum.resize(m * nb);
  for (int64_t i = 0; i < m * nb; ++i) {
    __m256i q[4];
    const float scale = round_block(x + i * BLOCK, 127.0f, q);
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    // int32 -> int16 -> int8 packs work per 128-bit lane; the permute restores column order.
    const __m256i q01 = _mm256_packs_epi32(q[0], q[1]);
    const __m256i q23 = _mm256_packs_epi32(q[2], q[3]);
    __m256i bytes = _mm256_packs_epi16(q01, q23);
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.codes.data() + i * BLOCK), bytes);
    out.scale[i] = scale;
    out.sum[i] = scale * horizontal_sum(_mm256_cvtepi32_ps(total));
  }
}

void quantize_rows16(const float* x, int64_t m, int64_t k, QuantizedInput16& out) {
  const int64_t nb = k / BLOCK;
  out.codes.resize(m * k);
  out.scale.resize(m * nb);
  for (int64_t i = 0; i < m * nb; ++i) {
    __m256i q[4];
    out.scale[i] = round_block(x + i * BLOCK, 32767.0f, q);
    // Stored in the order q8_rows widens the weight codes in (unpack within 128-bit lanes):
    // columns 0-7 and 16-23, then 8-15 and 24-31. packs works per lane; the permute joins them.
    for (int h = 0; h < 2; ++h) {
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[h], q[h + 2]), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.codes.data() + i * BLOCK + 16 * h), packed);
    }
  }
}

// One F16C instruction; c10::Half's own conversion is portable bit manipulation.
inline float half_to_float(c10::Half h) { return _cvtsh_ss(h.x); }

inline __m256 block_dot(__m256i w_unsigned, __m256i a_signed) {
  const __m256i pairs = _mm256_maddubs_epi16(w_unsigned, a_signed);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// Writes y[r][n] for rows r in [0, rows) of the quantized input and output columns [n0, n1).
// Two accumulators per row (even and odd blocks): one chain of dependent multiply-adds
// would wait on the previous block's result (4 cycles each) and cap a row at that rate.
template <int rows>
void q4_rows(const QuantizedInput& in, int64_t row0, int64_t k, const uint8_t* codes, const c10::Half* scale,
             const c10::Half* minimum, int64_t n0, int64_t n1, float* y, int64_t n) {
  const int64_t nb = k / BLOCK;
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t col = n0; col < n1; ++col) {
    const uint8_t* w = codes + col * (k / 2);
    const c10::Half* s = scale + col * nb;
    const c10::Half* mn = minimum + col * nb;
    __m256 acc[rows][2];
    float offset[rows][2];
    for (int r = 0; r < rows; ++r)
      for (int e = 0; e < 2; ++e) acc[r][e] = _mm256_setzero_ps(), offset[r][e] = 0.0f;
    auto step = [&](int64_t b, int e) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * 16));
      const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
      const float sb = half_to_float(s[b]), mb = half_to_float(mn[b]);
      for (int r = 0; r < rows; ++r) {
        const int64_t i = (row0 + r) * nb + b;
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in.codes.data() + i * BLOCK));
        acc[r][e] = _mm256_fmadd_ps(block_dot(q, a), _mm256_set1_ps(sb * in.scale[i]), acc[r][e]);
        offset[r][e] += mb * in.sum[i];
      }
    };
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) step(b, 0), step(b + 1, 1);
    if (b < nb) step(b, 0);
    for (int r = 0; r < rows; ++r)
      y[(row0 + r) * n + col] = horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1])) + offset[r][0] + offset[r][1];
  }
}

template <int rows>
void q8_rows(const QuantizedInput16& in, int64_t row0, int64_t k, const int8_t* codes, const c10::Half* scale,
             int64_t n0, int64_t n1, float* y, int64_t n) {
  const int64_t nb = k / BLOCK;
  for (int64_t col = n0; col < n1; ++col) {
    const int8_t* w = codes + col * k;
    const c10::Half* s = scale + col * nb;
    __m256 acc[rows][2];
    for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    auto step = [&](int64_t b, int e) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * BLOCK));
      // Sign-extended to 16 bits within each 128-bit lane (cheaper than a lane-crossing widen):
      // columns 0-7 and 16-23, then 8-15 and 24-31, the order quantize_rows16 stores x in.
      const __m256i sign = _mm256_cmpgt_epi8(_mm256_setzero_si256(), q);
      const __m256i w_low = _mm256_unpacklo_epi8(q, sign);
      const __m256i w_high = _mm256_unpackhi_epi8(q, sign);
      const float sb = half_to_float(s[b]);
      for (int r = 0; r < rows; ++r) {
        const int64_t i = (row0 + r) * nb + b;
        const int16_t* a = in.codes.data() + i * BLOCK;
        const __m256i a_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
        const __m256i a_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16));
        // |sum| <= 32 * 127 * 32767 < 2^31
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w_low, a_low), _mm256_madd_epi16(w_high, a_high));
        acc[r][e] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(sb * in.scale[i]), acc[r][e]);
      }
    };
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) step(b, 0), step(b + 1, 1);
    if (b < nb) step(b, 0);
    for (int r = 0; r < rows; ++r) y[(row0 + r) * n + col] = horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1]));
  }
}

void check_input(const at::Tensor& x, int64_t k, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": x must be a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, op, ": x must be (rows, ", k, "), got ", x.sizes());
  TORCH_CHECK(k % BLOCK == 0, op, ": in_features must be a multiple of 32, got ", k);
}

// Output columns per task: enough work per task that threads do not fight over cache lines.
constexpr int64_t GRAIN = 16;

at::Tensor q4_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum) {
  const int64_t n = codes.size(0), k = codes.size(1) * 2;
  check_input(x_in, k, "tunewright::q4_linear");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "q4_linear: codes must be contiguous uint8");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && minimum.scalar_type() == at::kHalf && scale.is_contiguous() &&
              minimum.is_contiguous() && scale.numel() == n * (k / BLOCK) && minimum.numel() == n * (k / BLOCK),
              "q4_linear: scale and minimum must be contiguous fp16 of shape (", n, ", ", k / BLOCK, ")");
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  QuantizedInput in;
  quantize_rows(x.data_ptr<float>(), m, k, in);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const c10::Half* s = scale.data_ptr<c10::Half>();
  const c10::Half* mn = minimum.data_ptr<c10::Half>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, n, GRAIN, [&](int64_t n0, int64_t n1) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) q4_rows<4>(in, r, k, w, s, mn, n0, n1, out, n);
    switch (m - r) {
      case 3: q4_rows<3>(in, r, k, w, s, mn, n0, n1, out, n); break;
      case 2: q4_rows<2>(in, r, k, w, s, mn, n0, n1, out, n); break;
      case 1: q4_rows<1>(in, r, k, w, s, mn, n0, n1, out, n); break;
    }
  });
  return y;
}

at::Tensor q8_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scale) {
  const int64_t n = codes.size(0), k = codes.size(1);
  check_input(x_in, k, "tunewright::q8_linear");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous(), "q8_linear: codes must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.numel() == n * (k / BLOCK),
              "q8_linear: scale must be contiguous fp16 of shape (", n, ", ", k / BLOCK, ")");
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  QuantizedInput16 in;
  quantize_rows16(x.data_ptr<float>(), m, k, in);
  const int8_t* w = codes.data_ptr<int8_t>();
  const c10::Half* s = scale.data_ptr<c10::Half>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, n, GRAIN, [&](int64_t n0, int64_t n1) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) q8_rows<4>(in, r, k, w, s, n0, n1, out, n);
    switch (m - r) {
      case 3: q8_rows<3>(in, r, k, w, s, n0, n1, out, n); break;
      case 2: q8_rows<2>(in, r, k, w, s, n0, n1, out, n); break;
      case 1: q8_rows<1>(in, r, k, w, s, n0, n1, out, n); break;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(tunewright, m) {
  m.def("q4_linear(Tensor x, Tensor codes, Tensor scale, Tensor minimum) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor codes, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tunewright, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
}
