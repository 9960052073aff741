// Activations to 8 bits exactly as llama.cpp's x86 CPU backend quantizes them, and the run-time choice of
// the q8gemm.c build (AVX2 or AVX-512 VNNI) that multiplies them.
//
// Q8_0 / Q8_1 (blocks of 32, for Q8_0, Q5_0 and Q4_1 weights; its AVX2 quantize_row_q8_0/_q8_1):
//     amax = max |x|;  d = amax / 127 (stored as fp16);  q = round_half_even(x * (127 / amax))
//     Q8_1 also s = fp16(d * sum q)   (d here the fp32 value)
// Q8_K (blocks of 256, for the k-quants; x86 uses quantize_row_q8_K_ref):
//     max = the x of largest |x| (first one);  iscale = -127 / max;  q = min(127, nearest_int(iscale * x))
//     (nearest_int: + 12582912.0f, low mantissa bits: round half to even);  d = 1 / iscale (fp32)
// Both also give the block sums of q over 16 and 32 values (the weights' offsets and mins need them).
#include <immintrin.h>
#include "kernels.h"
#include "q8.h"
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

static int hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

static float fp16_round(float x) { return _cvtsh_ss(_cvtss_sh(x, 0)); }

// 32 int32 (4 x 8, in order) -> 32 int8 in order, plus the sums of the two halves.
static void pack32(__m256i i0, __m256i i1, __m256i i2, __m256i i3, int8_t* q, int32_t* s16) {
  s16[0] = hsum8(_mm256_add_epi32(i0, i1));
  s16[1] = hsum8(_mm256_add_epi32(i2, i3));
  __m256i a = _mm256_packs_epi32(i0, i1), b = _mm256_packs_epi32(i2, i3);
  a = _mm256_packs_epi16(a, b);
  a = _mm256_permutevar8x32_epi32(a, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256((__m256i*)q, a);
}

// One row, blocks of 32: q [I], d/s [I/32], bs16 [I/16], bs32 [I/32].
static void quant_row_32(const float* x, long I, int8_t* q, float* d, float* s, int32_t* bs16, int32_t* bs32) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (long b = 0; b < I / 32; b++) {
    const float* v = x + b * 32;
    __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
           v3 = _mm256_loadu_ps(v + 24);
    __m256 m = _mm256_andnot_ps(sign, v0);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v1));
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v2));
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v3));
    const float amax = hmax8(m);
    const float dd = amax / 127.f;
    const float id = amax != 0.0f ? 127.f / amax : 0.0f;
    const __m256 mul = _mm256_set1_ps(id);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    pack32(i0, i1, i2, i3, q + b * 32, bs16 + b * 2);
    bs32[b] = bs16[b * 2] + bs16[b * 2 + 1];
    d[b] = fp16_round(dd);
    s[b] = fp16_round(dd * (float)bs32[b]);
  }
}

// One row, blocks of 256: q [I], d [I/256], bs16 [I/16], bs32 [I/32].
static void quant_row_256(const float* x, long I, int8_t* q, float* d, int32_t* bs16, int32_t* bs32) {
  for (long b = 0; b < I / 256; b++) {
    const float* v = x + b * 256;
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 256; j++) {
      float ax = v[j] < 0 ? -v[j] : v[j];
      if (ax > amax) { amax = ax; max = v[j]; }
    }
    int8_t* qb = q + b * 256;
    if (amax == 0.0f) {
      d[b] = 0.0f;
      memset(qb, 0, 256);
      for (int j = 0; j < 16; j++) bs16[b * 16 + j] = 0;
      for (int j = 0; j < 8; j++) bs32[b * 8 + j] = 0;
      continue;
    }
    const float iscale = -127.f / max;
    const __m256 is = _mm256_set1_ps(iscale), magic = _mm256_set1_ps(12582912.f);
    const __m256i lowbits = _mm256_set1_epi32(0x007fffff), half = _mm256_set1_epi32(0x00400000),
                  top = _mm256_set1_epi32(127);
    for (int j = 0; j < 256; j += 32) {
      __m256i i[4];
      for (int t = 0; t < 4; t++) {
        __m256 val = _mm256_add_ps(_mm256_mul_ps(is, _mm256_loadu_ps(v + j + 8 * t)), magic);
        i[t] = _mm256_min_epi32(_mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(val), lowbits), half), top);
      }
      pack32(i[0], i[1], i[2], i[3], qb + j, bs16 + b * 16 + j / 16);
      bs32[b * 8 + j / 32] = bs16[b * 16 + j / 16] + bs16[b * 16 + j / 16 + 1];
    }
    d[b] = 1.0f / iscale;
  }
}

// Quantize n rows of x [n, I]: kind 0 (blocks of 32) or 1 (blocks of 256). Exposed for the tests.
void dw_q8_quantize(const float* x, long n, long I, int kind, int8_t* q, float* d, float* s, int32_t* bs16,
                    int32_t* bs32) {
  #pragma omp parallel for schedule(static) if (n > 8)
  for (long r = 0; r < n; r++) {
    if (kind == 0)
      quant_row_32(x + r * I, I, q + r * I, d + r * (I / 32), s + r * (I / 32), bs16 + r * (I / 16), bs32 + r * (I / 32));
    else
      quant_row_256(x + r * I, I, q + r * I, d + r * (I / 256), bs16 + r * (I / 16), bs32 + r * (I / 32));
  }
}

static dw_q8mm_fn impl = dw_q8mm_avx2;

// 0: AVX2, 1: AVX-512 VNNI on ymm, 2: on zmm (the caller checked the CPU's flags). Returns the previous one.
int dw_q8_set_isa(int isa) {
  int old = impl == dw_q8mm_vnni512 ? 2 : impl == dw_q8mm_vnni256 ? 1 : 0;
  impl = isa == 2 ? dw_q8mm_vnni512 : isa == 1 ? dw_q8mm_vnni256 : dw_q8mm_avx2;
  return old;
}

// y [n, O] = L applied to x [n, I]: the activations quantized (into each form a segment needs), then the
// chosen ISA's GEMM. Returns 0, or 1 when the scratch could not be allocated (y not written then).
int dw_q8linear(const dw_q8lin_t* L, const float* x, long n, float* y) {
  const long I = L->I;
  int need[2] = {0, 0};
  for (long i = 0; i < L->nseg; i++) need[L->seg[i].act ? 1 : 0] = 1;
  // per form: q [n I] int8, d [n I/32] float, s [n I/32] float, bs16 [n I/16], bs32 [n I/32] int32
  size_t per = (size_t)n * I + 16 + sizeof(float) * 2 * n * (I / 32) + sizeof(int32_t) * (n * (I / 16) + n * (I / 32));
  per = (per + 63) / 64 * 64;
  char* buf = (char*)malloc(per * (need[0] + need[1]) + 64);
  if (!buf) return 1;
  dw_q8act_t A[2];
  char* p = buf;
  for (int k = 0; k < 2; k++) {
    if (!need[k]) { memset(&A[k], 0, sizeof(A[k])); continue; }
    int8_t* q = (int8_t*)p;
    float* d = (float*)(p + ((n * I + 15) / 16) * 16);
    float* s = d + n * (I / 32);
    int32_t* bs16 = (int32_t*)(s + n * (I / 32));
    int32_t* bs32 = bs16 + n * (I / 16);
    dw_q8_quantize(x, n, I, k, q, d, s, bs16, bs32);
    A[k] = (dw_q8act_t){q, d, s, bs16, bs32};
    p += per;
  }
  impl(L, &A[0], &A[1], n, y);
  free(buf);
  return 0;
}
