// draftwise fp32 small-n GEMM for CPU (AVX2 + FMA), prepacked weights.
// y[n, O] = x[n, I] @ W^T (+ bias), with W prepacked as [ceil(O/16)][I][16].
// The weight is streamed once per call. Rows of x are split into groups of 6 (and a remainder);
// a group of R rows runs a register tile of R x 16 outputs (R <= 6: 2R accumulators), and for
// R <= 3 a tile of R x 32 outputs (4R accumulators) so that enough independent FMA chains hide
// the FMA latency. Every output row is computed by the same sequence of operations whatever n
// is, so results are bit-identical between one-token steps and tree verification.
#include <immintrin.h>
#include "kernels.h"
#include "common.h"
#include <omp.h>
#include <stdlib.h>

#ifndef DW_KC
#define DW_KC 128
#endif
#ifndef DW_BIG_N
#define DW_BIG_N 12
#endif


// The inner loop every 16-column tile shares: over columns i < K of the panel P, the accumulators
// a0/a1 of rows r < R take x[r, i] * P[i, 0..15] in one FMA each (PF: a prefetch, or (void)0).
#define PANEL_FMA(R, K, PF) \
  for (long i = 0; i < (K); i++) { \
    PF; \
    __m256 w0 = _mm256_loadu_ps(P + i * 16), w1 = _mm256_loadu_ps(P + i * 16 + 8); \
    UNROLL for (int r = 0; r < R; r++) { \
      __m256 xv = _mm256_broadcast_ss(x + r * ldx + i); \
      a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]); a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]); \
    } \
  }

#define K16(R) \
static inline void k16_##R(const float* x, long ldx, const float* P, long I, float* y, long ldy, \
                           const float* bias, int valid) { \
  __m256 a0[R], a1[R]; \
  UNROLL for (int r = 0; r < R; r++) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); } \
  PANEL_FMA(R, I, _mm_prefetch((const char*)(P + i * 16 + 512), _MM_HINT_T0)) \
  UNROLL for (int r = 0; r < R; r++) store16(y + r * ldy, a0[r], a1[r], bias, valid); \
}

#define K32(R) \
static inline void k32_##R(const float* x, long ldx, const float* P0, const float* P1, long I, float* y, \
                           long ldy, const float* bias, int valid1) { \
  __m256 a0[R], a1[R], a2[R], a3[R]; \
  UNROLL for (int r = 0; r < R; r++) { a0[r] = a1[r] = a2[r] = a3[r] = _mm256_setzero_ps(); } \
  for (long i = 0; i < I; i++) { \
    _mm_prefetch((const char*)(P0 + i * 16 + 512), _MM_HINT_T0); _mm_prefetch((const char*)(P1 + i * 16 + 512), _MM_HINT_T0); \
    __m256 w0 = _mm256_loadu_ps(P0 + i * 16), w1 = _mm256_loadu_ps(P0 + i * 16 + 8); \
    __m256 w2 = _mm256_loadu_ps(P1 + i * 16), w3 = _mm256_loadu_ps(P1 + i * 16 + 8); \
    UNROLL for (int r = 0; r < R; r++) { \
      __m256 xv = _mm256_broadcast_ss(x + r * ldx + i); \
      a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]); a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]); \
      a2[r] = _mm256_fmadd_ps(xv, w2, a2[r]); a3[r] = _mm256_fmadd_ps(xv, w3, a3[r]); \
    } \
  } \
  UNROLL for (int r = 0; r < R; r++) { \
    store16(y + r * ldy, a0[r], a1[r], bias, 16); \
    store16(y + r * ldy + 16, a2[r], a3[r], bias ? bias + 16 : 0, valid1); \
  } \
}

// Accumulating tile for the blocked large-n path: the R x 16 partial sums live in acc between
// K-chunks. fp32 stores and loads are exact, so each output element still sees the same FMA
// sequence over i as in k16/k32: results stay bit-identical to the small-n path.
#define KA(R) \
static inline void ka_##R(const float* x, long ldx, const float* P, long kc, float* acc, int first) { \
  __m256 a0[R], a1[R]; \
  UNROLL for (int r = 0; r < R; r++) { \
    if (first) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); } \
    else { a0[r] = _mm256_loadu_ps(acc + r * 16); a1[r] = _mm256_loadu_ps(acc + r * 16 + 8); } \
  } \
  PANEL_FMA(R, kc, (void)0) \
  UNROLL for (int r = 0; r < R; r++) { _mm256_storeu_ps(acc + r * 16, a0[r]); _mm256_storeu_ps(acc + r * 16 + 8, a1[r]); } \
}

K16(1) K16(2) K16(3) K16(4) K16(5) K16(6)
KA(1) KA(2) KA(3) KA(4) KA(5) KA(6)

static void tile_acc(long R, const float* x, long ldx, const float* P, long kc, float* acc, int first) {
  switch (R) {
    case 1: ka_1(x, ldx, P, kc, acc, first); break;
    case 2: ka_2(x, ldx, P, kc, acc, first); break;
    case 3: ka_3(x, ldx, P, kc, acc, first); break;
    case 4: ka_4(x, ldx, P, kc, acc, first); break;
    case 5: ka_5(x, ldx, P, kc, acc, first); break;
    default: ka_6(x, ldx, P, kc, acc, first); break;
  }
}

// Large n: for each 16-column block, K-chunks of DW_KC weight rows stay in L1 while every row
// group of x passes over them (the small-n order streams all of x once per block instead).
static void linear_big(const float* x, long n, long I, const float* P, const float* bias, long O, float* y) {
  long OB = (O + 15) / 16;
  #pragma omp parallel
  {
    float* acc = (float*)aligned_alloc(64, ((n * 16 * sizeof(float) + 63) / 64) * 64);
    #pragma omp for schedule(static)
    for (long b = 0; b < OB; b++) {
      const float* Pb = P + b * I * 16;
      int valid = (int)((O - b * 16) < 16 ? (O - b * 16) : 16);
      const float* bb = bias ? bias + b * 16 : 0;
      for (long k0 = 0; k0 < I; k0 += DW_KC) {
        long kc = I - k0 < DW_KC ? I - k0 : DW_KC;
        for (long j = 0; j < n; j += 6)
          tile_acc(n - j < 6 ? n - j : 6, x + j * I + k0, I, Pb + k0 * 16, kc, acc + j * 16, k0 == 0);
      }
      for (long j = 0; j < n; j++)
        store16(y + j * O + b * 16, _mm256_loadu_ps(acc + j * 16), _mm256_loadu_ps(acc + j * 16 + 8), bb, valid);
    }
    free(acc);
  }
}
K32(1) K32(2) K32(3)

static void tile16(long R, const float* x, long I, const float* P, float* y, long O, const float* b, int valid) {
  switch (R) {
    case 1: k16_1(x, I, P, I, y, O, b, valid); break;
    case 2: k16_2(x, I, P, I, y, O, b, valid); break;
    case 3: k16_3(x, I, P, I, y, O, b, valid); break;
    case 4: k16_4(x, I, P, I, y, O, b, valid); break;
    case 5: k16_5(x, I, P, I, y, O, b, valid); break;
    default: k16_6(x, I, P, I, y, O, b, valid); break;
  }
}

void dw_linear(const float* x, long n, long I, const float* P, const float* bias_padded, long O, float* y) {
  long OB = (O + 15) / 16;
  if (n <= 3) {                      // wide tiles: two 16-column blocks at once
    long pairs = (OB + 1) / 2;
    #pragma omp parallel for schedule(static)
    for (long p = 0; p < pairs; p++) {
      long b = 2 * p;
      const float* bb = bias_padded ? bias_padded + b * 16 : 0;
      if (b + 1 < OB) {
        int valid1 = (int)((O - (b + 1) * 16) < 16 ? (O - (b + 1) * 16) : 16);
        const float* P0 = P + b * I * 16;
        const float* P1 = P0 + I * 16;
        switch (n) {
          case 1: k32_1(x, I, P0, P1, I, y + b * 16, O, bb, valid1); break;
          case 2: k32_2(x, I, P0, P1, I, y + b * 16, O, bb, valid1); break;
          default: k32_3(x, I, P0, P1, I, y + b * 16, O, bb, valid1); break;
        }
      } else {
        int valid = (int)((O - b * 16) < 16 ? (O - b * 16) : 16);
        tile16(n, x, I, P + b * I * 16, y + b * 16, O, bb, valid);
      }
    }
    return;
  }
  if (n >= DW_BIG_N) { linear_big(x, n, I, P, bias_padded, O, y); return; }
  #pragma omp parallel for schedule(static)
  for (long b = 0; b < OB; b++) {
    const float* Pb = P + b * I * 16;
    int valid = (int)((O - b * 16) < 16 ? (O - b * 16) : 16);
    const float* bb = bias_padded ? bias_padded + b * 16 : 0;
    for (long j = 0; j < n; j += 6)   // groups of 6 rows, then the remainder (measured best)
      tile16(n - j < 6 ? n - j : 6, x + j * I, I, Pb, y + j * O + b * 16, O, bb, valid);
  }
}
