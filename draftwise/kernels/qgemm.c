// draftwise block-quantized GEMM for CPU (AVX2 + FMA): a GGUF model's own weights, kept quantized,
// with fp32 activations and fp32 arithmetic (the activations are never quantized).
//
// y[n, O] = x[n, I] @ W^T (+ bias), W[o, i] = s[o, g] * q[o, i] (+ m[o, g]), g = i / G, q a small integer.
// Per output element the kernel computes, over the groups g in order,
//     blk = sum_{i in g} x[i] * q[i]          (an FMA chain over i in order, from 0)
//     acc = fma(blk, s[g], acc);  acc = fma(xs[g], m[g], acc)      (xs[g] = sum_{i in g} x[i], when m)
// then + bias: the scale multiplies once per group, not once per weight, so a weight costs one
// int->float conversion and one FMA per row. Every output element sees this same sequence of
// operations whatever n is and whichever tile computes it (one-token steps and tree passes agree bit
// for bit). It is not the fp32 kernel's order on the dequantized weights (those differ in the last
// bits, ~1e-7 relative).
//
// Prepacked layouts, per 16-column panel (b = o / 16):
//   bits 8: Q int8  [ceil(O/16)][I][16]                 q as it is (Q8_0, Q5_0 - 16, Q6_K - 32)
//   bits 4: Q uint8 [ceil(O/16)][I/2][16]               q[2j] | q[2j+1] << 4, q in 0..15 (Q4_K, Q4_1)
//   S, M fp32 [ceil(O/16)][I/G][16] (M may be NULL).
// n < 12: register tiles (1 row x 64 columns, 2 x 32, up to 6 x 16) dequantize in registers as the
// panel streams (read once per call); n >= 12: each panel is dequantized chunk by chunk into L1 as
// floats and all row tiles of 6 pass over the chunk.
#include <immintrin.h>
#include "common.h"
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef DW_QBIG
#define DW_QBIG 40                   // rows from which the chunked large-n path runs
#endif
#ifndef DW_QKC
#define DW_QKC 256                   // K-chunk of the large-n path (a multiple of every group size)
#endif

#define AI static inline __attribute__((always_inline))
#ifndef DW_PF
#define DW_PF 1024                   // prefetch distance (bytes) along each streamed panel
#endif
#define PF(q) _mm_prefetch((const char*)(q) + DW_PF, _MM_HINT_T0)

// 16 values of column i (bits 8), or columns i and i + 1 (bits 4: lo = i, hi = i + 1), as floats.
AI void deq8(const int8_t* q, __m256* w0, __m256* w1) {
  *w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q)));
  *w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8))));
}

AI void deq4(const uint8_t* q, __m256* lo0, __m256* lo1, __m256* hi0, __m256* hi1) {
  const __m256i mask = _mm256_set1_epi32(15);
  __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)q));
  __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8)));
  *lo0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)); *hi0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
  *lo1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)); *hi1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
}

// acc = fma(blk, s, acc), then acc = fma(xs, m, acc): the end of one group for R rows x 16 columns.
AI void group_end(int R, __m256 (*blk)[2], __m256 (*acc)[2], const float* s, const float* m, const float* xs,
                  long NG) {
  __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
  for (int r = 0; r < R; r++) {
    acc[r][0] = _mm256_fmadd_ps(blk[r][0], s0, acc[r][0]);
    acc[r][1] = _mm256_fmadd_ps(blk[r][1], s1, acc[r][1]);
  }
  if (m) {
    __m256 m0 = _mm256_loadu_ps(m), m1 = _mm256_loadu_ps(m + 8);
    for (int r = 0; r < R; r++) {
      __m256 xv = _mm256_broadcast_ss(xs + r * NG);
      acc[r][0] = _mm256_fmadd_ps(xv, m0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, m1, acc[r][1]);
    }
  }
}

// R rows x (16 C) columns (C consecutive panels from panel b), streaming the quantized panels.
// qs: bytes per panel (I * 16 or I * 8); ss: floats per panel of S/M (NG * 16).
AI void qtile(const int R, const int C, const int BITS, const float* x, long ldx, const void* Qv, long qs,
              const float* S, const float* M, long ss, const float* xs, long NG, long I, long G,
              float* y, long ldy, const float* bias, long O, long b) {
  __m256 blk[6][4][2], acc[6][4][2];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
  const int8_t* Q = (const int8_t*)Qv;
  for (long g = 0; g < NG; g++) {
    for (int r = 0; r < R; r++)
      for (int c = 0; c < C; c++) blk[r][c][0] = blk[r][c][1] = _mm256_setzero_ps();
    long i0 = g * G;
    if (BITS == 8) {
      for (long i = i0; i < i0 + G; i++) {
        for (int c = 0; c < C; c++) {
          const int8_t* q = Q + c * qs + i * 16;
          PF(q);
          __m256 w0, w1;
          deq8(q, &w0, &w1);
          for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_broadcast_ss(x + r * ldx + i);
            blk[r][c][0] = _mm256_fmadd_ps(xv, w0, blk[r][c][0]);
            blk[r][c][1] = _mm256_fmadd_ps(xv, w1, blk[r][c][1]);
          }
        }
      }
    } else {
      for (long i = i0; i < i0 + G; i += 2) {
        for (int c = 0; c < C; c++) {
          const uint8_t* q = (const uint8_t*)Q + c * qs + (i / 2) * 16;
          PF(q);
          __m256 l0, l1, h0, h1;
          deq4(q, &l0, &l1, &h0, &h1);
          for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_broadcast_ss(x + r * ldx + i);
            blk[r][c][0] = _mm256_fmadd_ps(xv, l0, blk[r][c][0]);
            blk[r][c][1] = _mm256_fmadd_ps(xv, l1, blk[r][c][1]);
          }
          for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_broadcast_ss(x + r * ldx + i + 1);
            blk[r][c][0] = _mm256_fmadd_ps(xv, h0, blk[r][c][0]);
            blk[r][c][1] = _mm256_fmadd_ps(xv, h1, blk[r][c][1]);
          }
        }
      }
    }
    for (int c = 0; c < C; c++) {
      __m256 bc[6][2], ac[6][2];
      for (int r = 0; r < R; r++) { bc[r][0] = blk[r][c][0]; bc[r][1] = blk[r][c][1]; ac[r][0] = acc[r][c][0]; ac[r][1] = acc[r][c][1]; }
      group_end(R, bc, ac, S + c * ss + g * 16, M ? M + c * ss + g * 16 : 0, xs ? xs + g : 0, NG);
      for (int r = 0; r < R; r++) { acc[r][c][0] = ac[r][0]; acc[r][c][1] = ac[r][1]; }
    }
  }
  for (int c = 0; c < C; c++) {
    long o = (b + c) * 16;
    int valid = (int)(O - o < 16 ? O - o : 16);
    for (int r = 0; r < R; r++) store16(y + r * ldy + c * 16, acc[r][c][0], acc[r][c][1], bias ? bias + c * 16 : 0, valid);
  }
}

#define QT(R, C, BITS) \
static void qt_##R##_##C##_##BITS(const float* x, long ldx, const void* Q, long qs, const float* S, const float* M, \
                                  long ss, const float* xs, long NG, long I, long G, float* y, long ldy, \
                                  const float* bias, long O, long b) { \
  qtile(R, C, BITS, x, ldx, Q, qs, S, M, ss, xs, NG, I, G, y, ldy, bias, O, b); \
}
typedef void (*qt_fn)(const float*, long, const void*, long, const float*, const float*, long, const float*, long,
                      long, long, float*, long, const float*, long, long);
QT(1, 4, 8) QT(1, 4, 4) QT(2, 2, 8) QT(2, 2, 4) QT(1, 1, 8) QT(1, 1, 4) QT(2, 1, 8) QT(2, 1, 4)
QT(3, 1, 8) QT(3, 1, 4) QT(4, 1, 8) QT(4, 1, 4) QT(5, 1, 8) QT(5, 1, 4) QT(6, 1, 8) QT(6, 1, 4)
static const qt_fn one_panel[2][7] = {
  {0, qt_1_1_4, qt_2_1_4, qt_3_1_4, qt_4_1_4, qt_5_1_4, qt_6_1_4},
  {0, qt_1_1_8, qt_2_1_8, qt_3_1_8, qt_4_1_8, qt_5_1_8, qt_6_1_8}};

// Large n: R rows x 16 columns over one dequantized chunk P [kc][16] (floats of q) starting at column k0;
// acc [R][16] in memory carries each row's sum between groups and chunks.
AI void btile(const int R, const float* x, long ldx, const float* P, long kc, long G, const float* s,
              const float* m, const float* xs, long NG, float* accm) {
  for (long g0 = 0; g0 < kc; g0 += G) {
    __m256 blk[6][2], acc[6][2];
    for (int r = 0; r < R; r++) blk[r][0] = blk[r][1] = _mm256_setzero_ps();
    for (long i = g0; i < g0 + G; i++) {
      __m256 w0 = _mm256_load_ps(P + i * 16), w1 = _mm256_load_ps(P + i * 16 + 8);
      for (int r = 0; r < R; r++) {
        __m256 xv = _mm256_broadcast_ss(x + r * ldx + i);
        blk[r][0] = _mm256_fmadd_ps(xv, w0, blk[r][0]);
        blk[r][1] = _mm256_fmadd_ps(xv, w1, blk[r][1]);
      }
    }
    for (int r = 0; r < R; r++) { acc[r][0] = _mm256_loadu_ps(accm + r * 16); acc[r][1] = _mm256_loadu_ps(accm + r * 16 + 8); }
    long g = g0 / G;
    group_end(R, blk, acc, s + g * 16, m ? m + g * 16 : 0, xs ? xs + g : 0, NG);
    for (int r = 0; r < R; r++) { _mm256_storeu_ps(accm + r * 16, acc[r][0]); _mm256_storeu_ps(accm + r * 16 + 8, acc[r][1]); }
  }
}

#define BT(R) \
static void bt_##R(const float* x, long ldx, const float* P, long kc, long G, const float* s, const float* m, \
                   const float* xs, long NG, float* accm) { btile(R, x, ldx, P, kc, G, s, m, xs, NG, accm); }
BT(1) BT(2) BT(3) BT(4) BT(5) BT(6)
typedef void (*bt_fn)(const float*, long, const float*, long, long, const float*, const float*, const float*, long,
                      float*);
static const bt_fn btiles[7] = {0, bt_1, bt_2, bt_3, bt_4, bt_5, bt_6};

// Columns [k0, k0 + kc) of one panel, dequantized to floats (exact small integers) in P [kc][16].
static void dequant_chunk(int bits, const void* Qb, long k0, long kc, float* P) {
  if (bits == 8) {
    const int8_t* q = (const int8_t*)Qb + k0 * 16;
    for (long i = 0; i < kc; i++) {
      __m256 w0, w1; deq8(q + i * 16, &w0, &w1);
      _mm256_store_ps(P + i * 16, w0); _mm256_store_ps(P + i * 16 + 8, w1);
    }
  } else {
    const uint8_t* q = (const uint8_t*)Qb + (k0 / 2) * 16;
    for (long i = 0; i < kc; i += 2) {
      __m256 l0, l1, h0, h1; deq4(q + (i / 2) * 16, &l0, &l1, &h0, &h1);
      _mm256_store_ps(P + i * 16, l0); _mm256_store_ps(P + i * 16 + 8, l1);
      _mm256_store_ps(P + i * 16 + 16, h0); _mm256_store_ps(P + i * 16 + 24, h1);
    }
  }
}

// bits: 8 or 4 (see the layouts above). xs: NULL, or when M is given, scratch is computed here.
void dw_qlinear(const float* x, long n, long I, const void* Q, int bits, const float* S, const float* M, long G,
                const float* bias_padded, long O, float* y) {
  long OB = (O + 15) / 16, NG = I / G, qs = bits == 8 ? I * 16 : I * 8, ss = NG * 16;
  float* xs = 0;
  if (M) {                           // per row and group: sum of x in order (the offsets' factor)
    xs = (float*)malloc(sizeof(float) * n * NG);
    for (long r = 0; r < n; r++)
      for (long g = 0; g < NG; g++) {
        float t = 0.0f;
        for (long i = g * G; i < (g + 1) * G; i++) t += x[r * I + i];
        xs[r * NG + g] = t;
      }
  }
  const char* Qc = (const char*)Q;
  int bi = bits == 8;
  if (n <= 2) {                      // wide tiles: 4 panels for one row, 2 panels for two rows
    const int C = n == 1 ? 4 : 2;
    qt_fn wide = n == 1 ? (bi ? qt_1_4_8 : qt_1_4_4) : (bi ? qt_2_2_8 : qt_2_2_4);
    long groups = (OB + C - 1) / C;
    #pragma omp parallel for schedule(static)
    for (long p = 0; p < groups; p++) {
      long b = p * C;
      const float* bb = bias_padded ? bias_padded + b * 16 : 0;
      if (b + C <= OB)
        wide(x, I, Qc + b * qs, qs, S + b * ss, M ? M + b * ss : 0, ss, xs, NG, I, G, y + b * 16, O, bb, O, b);
      else
        for (long c = b; c < OB; c++)
          one_panel[bi][n](x, I, Qc + c * qs, qs, S + c * ss, M ? M + c * ss : 0, ss, xs, NG, I, G, y + c * 16, O,
                           bias_padded ? bias_padded + c * 16 : 0, O, c);
    }
  } else if (n < DW_QBIG) {          // row tiles of up to 6 dequantize in registers as they go
    #pragma omp parallel for schedule(static)
    for (long b = 0; b < OB; b++)
      for (long j = 0; j < n; j += 6)
        one_panel[bi][n - j < 6 ? n - j : 6](x + j * I, I, Qc + b * qs, qs, S + b * ss, M ? M + b * ss : 0, ss,
                                             xs ? xs + j * NG : 0, NG, I, G, y + j * O + b * 16, O,
                                             bias_padded ? bias_padded + b * 16 : 0, O, b);
  } else {                           // more rows: chunks dequantized once into L1, row tiles of 6 over them
    #pragma omp parallel
    {
      float* P = (float*)aligned_alloc(64, DW_QKC * 16 * sizeof(float));
      float* accm = (float*)aligned_alloc(64, ((n * 16 * sizeof(float) + 63) / 64) * 64);
      #pragma omp for schedule(static)
      for (long b = 0; b < OB; b++) {
        memset(accm, 0, n * 16 * sizeof(float));
        const float* Sb = S + b * ss;
        const float* Mb = M ? M + b * ss : 0;
        for (long k0 = 0; k0 < I; k0 += DW_QKC) {
          long kc = I - k0 < DW_QKC ? I - k0 : DW_QKC;
          dequant_chunk(bits, Qc + b * qs, k0, kc, P);
          for (long j = 0; j < n; j += 6)
            btiles[n - j < 6 ? n - j : 6](x + j * I + k0, I, P, kc, G, Sb + (k0 / G) * 16, Mb ? Mb + (k0 / G) * 16 : 0,
                                          xs ? xs + j * NG + k0 / G : 0, NG, accm + j * 16);
        }
        int valid = (int)((O - b * 16) < 16 ? (O - b * 16) : 16);
        for (long j = 0; j < n; j++)
          store16(y + j * O + b * 16, _mm256_loadu_ps(accm + j * 16), _mm256_loadu_ps(accm + j * 16 + 8),
                  bias_padded ? bias_padded + b * 16 : 0, valid);
      }
      free(accm);
      free(P);
    }
  }
  free(xs);
}
