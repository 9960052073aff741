// draftwise block-quantized small-n GEMM for CPU (AVX2 + FMA): a GGUF model's own weights, kept
// quantized, with fp32 activations and fp32 accumulation.
// y[n, O] = x[n, I] @ W^T (+ bias), W[o, i] = s[o, g] * q[o, i] (+ m[o, g]), g = i / G.
// Prepacked as Q int8 [ceil(O/16)][I][16], S and M fp32 [ceil(O/16)][I/G][16] (M may be NULL).
// Each step dequantizes 16 weights in registers exactly as gguf does (float(q) * s, then + m: built
// with -ffp-contract=off so the two roundings stay two) and then runs the fp32 kernel's own
// accumulation (acc = fma(x, w, acc) over i in order, then + bias). So every output equals what the
// fp32 kernel computes on the dequantized weights, bit for bit, whatever n is; the weight stream is
// 1-1.5 bytes per weight instead of 4. n < 12: row tiles of 6 (2 x 16 columns for n <= 2) dequantize
// as they stream; n >= 12: each panel is dequantized once into cache and handed to gemm.c's panel code
// (its K-blocked order from 12 rows on). A panel is streamed from memory once per call.
#include <immintrin.h>
#include "common.h"
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

void dw_panel(const float* x, long n, long I, const float* Pb, const float* bb, long O, int valid, float* yb,
              float* acc);                                            // gemm.c


static inline void deq16(const int8_t* q, const float* s, const float* m, __m256* w0, __m256* w1) {
  // two 8-byte loads that fold into the sign-extensions (no 16-byte load + shift)
  __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q)));
  __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8))));
  *w0 = _mm256_mul_ps(f0, _mm256_loadu_ps(s));
  *w1 = _mm256_mul_ps(f1, _mm256_loadu_ps(s + 8));
  if (m) { *w0 = _mm256_add_ps(*w0, _mm256_loadu_ps(m)); *w1 = _mm256_add_ps(*w1, _mm256_loadu_ps(m + 8)); }
}

// R rows x 16 columns of one panel.
#define QK16(R) \
static inline void qk16_##R(const float* x, long ldx, const int8_t* Q, const float* S, const float* M, long I, \
                            long G, float* y, long ldy, const float* bias, int valid) { \
  __m256 a0[R], a1[R]; \
  for (int r = 0; r < R; r++) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); } \
  for (long g = 0, i = 0; i < I; g++) { \
    const float* s = S + g * 16; const float* m = M ? M + g * 16 : 0; \
    for (long e = i + G; i < e; i++) { \
      _mm_prefetch((const char*)(Q + i * 16 + 1024), _MM_HINT_T0); \
      __m256 w0, w1; deq16(Q + i * 16, s, m, &w0, &w1); \
      for (int r = 0; r < R; r++) { \
        __m256 xv = _mm256_broadcast_ss(x + r * ldx + i); \
        a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]); a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]); \
      } \
    } \
  } \
  for (int r = 0; r < R; r++) store16(y + r * ldy, a0[r], a1[r], bias, valid); \
}

// R rows x 32 columns (two panels): more independent FMA chains for n <= 3.
#define QK32(R) \
static inline void qk32_##R(const float* x, long ldx, const int8_t* Q0, const float* S0, const float* M0, \
                            const int8_t* Q1, const float* S1, const float* M1, long I, long G, float* y, long ldy, \
                            const float* bias, int valid1) { \
  __m256 a0[R], a1[R], a2[R], a3[R]; \
  for (int r = 0; r < R; r++) { a0[r] = a1[r] = a2[r] = a3[r] = _mm256_setzero_ps(); } \
  for (long g = 0, i = 0; i < I; g++) { \
    const float* s0 = S0 + g * 16; const float* m0 = M0 ? M0 + g * 16 : 0; \
    const float* s1 = S1 + g * 16; const float* m1 = M1 ? M1 + g * 16 : 0; \
    for (long e = i + G; i < e; i++) { \
      _mm_prefetch((const char*)(Q0 + i * 16 + 1024), _MM_HINT_T0); \
      _mm_prefetch((const char*)(Q1 + i * 16 + 1024), _MM_HINT_T0); \
      __m256 w0, w1, w2, w3; deq16(Q0 + i * 16, s0, m0, &w0, &w1); deq16(Q1 + i * 16, s1, m1, &w2, &w3); \
      for (int r = 0; r < R; r++) { \
        __m256 xv = _mm256_broadcast_ss(x + r * ldx + i); \
        a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]); a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]); \
        a2[r] = _mm256_fmadd_ps(xv, w2, a2[r]); a3[r] = _mm256_fmadd_ps(xv, w3, a3[r]); \
      } \
    } \
  } \
  for (int r = 0; r < R; r++) { \
    store16(y + r * ldy, a0[r], a1[r], bias, 16); \
    store16(y + r * ldy + 16, a2[r], a3[r], bias ? bias + 16 : 0, valid1); \
  } \
}

QK16(1) QK16(2) QK16(3) QK16(4) QK16(5) QK16(6)
QK32(1) QK32(2)

static void qtile16(long R, const float* x, long I, const int8_t* Q, const float* S, const float* M, long G,
                    float* y, long O, const float* b, int valid) {
  switch (R) {
    case 1: qk16_1(x, I, Q, S, M, I, G, y, O, b, valid); break;
    case 2: qk16_2(x, I, Q, S, M, I, G, y, O, b, valid); break;
    case 3: qk16_3(x, I, Q, S, M, I, G, y, O, b, valid); break;
    case 4: qk16_4(x, I, Q, S, M, I, G, y, O, b, valid); break;
    case 5: qk16_5(x, I, Q, S, M, I, G, y, O, b, valid); break;
    default: qk16_6(x, I, Q, S, M, I, G, y, O, b, valid); break;
  }
}

void dw_qlinear(const float* x, long n, long I, const int8_t* Q, const float* S, const float* M, long G,
                const float* bias_padded, long O, float* y) {
  long OB = (O + 15) / 16, NG = I / G;
  if (n <= 2) {                      // wide tiles: two panels at once (3 rows x 4 accumulators would spill)
    long pairs = (OB + 1) / 2;
    #pragma omp parallel for schedule(static)
    for (long p = 0; p < pairs; p++) {
      long b = 2 * p;
      const float* bb = bias_padded ? bias_padded + b * 16 : 0;
      const int8_t* Q0 = Q + b * I * 16;
      const float* S0 = S + b * NG * 16;
      const float* M0 = M ? M + b * NG * 16 : 0;
      if (b + 1 < OB) {
        int valid1 = (int)((O - (b + 1) * 16) < 16 ? (O - (b + 1) * 16) : 16);
        const int8_t* Q1 = Q0 + I * 16;
        const float* S1 = S0 + NG * 16;
        const float* M1 = M ? M0 + NG * 16 : 0;
        switch (n) {
          case 1: qk32_1(x, I, Q0, S0, M0, Q1, S1, M1, I, G, y + b * 16, O, bb, valid1); break;
          default: qk32_2(x, I, Q0, S0, M0, Q1, S1, M1, I, G, y + b * 16, O, bb, valid1); break;
        }
      } else {
        int valid = (int)((O - b * 16) < 16 ? (O - b * 16) : 16);
        qtile16(n, x, I, Q0, S0, M0, G, y + b * 16, O, bb, valid);
      }
    }
    return;
  }
  if (n < 12) {                      // row tiles of 6 dequantize in registers as they go
    #pragma omp parallel for schedule(static)
    for (long b = 0; b < OB; b++) {
      int valid = (int)((O - b * 16) < 16 ? (O - b * 16) : 16);
      for (long j = 0; j < n; j += 6)
        qtile16(n - j < 6 ? n - j : 6, x + j * I, I, Q + b * I * 16, S + b * NG * 16, M ? M + b * NG * 16 : 0, G,
                y + j * O + b * 16, O, bias_padded ? bias_padded + b * 16 : 0, valid);
    }
    return;
  }
  // more rows: dequantize each panel once into cache-resident fp32, then the fp32 kernel's own panel
  // code (same values, same order: same results as on the dequantized weights)
  #pragma omp parallel
  {
    float* P = (float*)aligned_alloc(64, ((I * 16 * sizeof(float) + 63) / 64) * 64);
    float* acc = (float*)aligned_alloc(64, ((n * 16 * sizeof(float) + 63) / 64) * 64);
    #pragma omp for schedule(static)
    for (long b = 0; b < OB; b++) {
      const int8_t* Qb = Q + b * I * 16;
      const float* Sb = S + b * NG * 16;
      const float* Mb = M ? M + b * NG * 16 : 0;
      for (long g = 0, i = 0; i < I; g++)
        for (long e = i + G; i < e; i++) {
          __m256 w0, w1;
          deq16(Qb + i * 16, Sb + g * 16, Mb ? Mb + g * 16 : 0, &w0, &w1);
          _mm256_store_ps(P + i * 16, w0); _mm256_store_ps(P + i * 16 + 8, w1);
        }
      int valid = (int)((O - b * 16) < 16 ? (O - b * 16) : 16);
      dw_panel(x, n, I, P, bias_padded ? bias_padded + b * 16 : 0, O, valid, y + b * 16, acc);
    }
    free(acc);
    free(P);
  }
}
