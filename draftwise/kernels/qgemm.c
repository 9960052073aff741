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
// Scales s and offsets m (m may be absent), in one of three forms (fmt), all giving the same fp32 values:
//   0: fp32 [ceil(O/16)][I/G][16];  1: fp16 [ceil(O/16)][I/G][16] (where every value is an fp16, as
//   Q8_0/Q5_0/Q4_1 scales are);  2: base fp32 [ceil(O/16)][I/G/per][16] times int8 [ceil(O/16)][I/G][16]
//   (the k-quants: fp16 d or -dmin per 256 weights times a small integer per group; their fp32 product,
//   computed here, is exactly the value gguf's dequantization uses).
// n < 40: register tiles (1 row x 64 columns; from 2 rows, up to 6 x 16: measured faster than 2 x 32,
// whose 16 accumulators spill) dequantize in registers as the panel streams (read once per call);
// n >= 40: each panel is dequantized chunk by chunk into L1 as floats and row tiles of 6 pass over it.
#include <immintrin.h>
#include "kernels.h"
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

typedef struct {
  const void* Q; int bits;           // values, 8 or 4 bits (layouts above)
  int fmt;                           // scale form (above)
  const void* S; const void* M;      // per-group values (fmt 0, 1) or per-super bases (fmt 2); M may be NULL
  const int8_t* SC; const int8_t* MC;  // fmt 2: per-group integers
  long G, NG, per;                   // group size, groups per row, groups per super (fmt 2)
  long qs, ss, cs;                   // per-panel strides: Q bytes, S/M elements, SC/MC bytes
} qw_t;

// The 16 scales (or offsets) of panel p, group g.
AI void scale16(const qw_t* w, const void* vals, const int8_t* ints, long p, long g, __m256* v0, __m256* v1) {
  if (w->fmt == 0) {
    const float* s = (const float*)vals + p * w->ss + g * 16;
    *v0 = _mm256_loadu_ps(s); *v1 = _mm256_loadu_ps(s + 8);
  } else if (w->fmt == 1) {
    const uint16_t* s = (const uint16_t*)vals + p * w->ss + g * 16;
    *v0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)s));
    *v1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + 8)));
  } else {
    const float* d = (const float*)vals + p * w->ss + (g / w->per) * 16;
    const int8_t* c = ints + p * w->cs + g * 16;
    *v0 = _mm256_mul_ps(_mm256_loadu_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)c))));
    *v1 = _mm256_mul_ps(_mm256_loadu_ps(d + 8),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(c + 8)))));
  }
}

// acc = fma(blk, s, acc), then acc = fma(xs, m, acc): the end of group g for R rows x 16 columns of panel p.
AI void group_end(int R, __m256 (*blk)[2], __m256 (*acc)[2], const qw_t* w, long p, long g, const float* xs) {
  __m256 s0, s1;
  scale16(w, w->S, w->SC, p, g, &s0, &s1);
  UNROLL for (int r = 0; r < R; r++) {
    acc[r][0] = _mm256_fmadd_ps(blk[r][0], s0, acc[r][0]);
    acc[r][1] = _mm256_fmadd_ps(blk[r][1], s1, acc[r][1]);
  }
  if (w->M) {
    __m256 m0, m1;
    scale16(w, w->M, w->MC, p, g, &m0, &m1);
    UNROLL for (int r = 0; r < R; r++) {
      __m256 xv = _mm256_broadcast_ss(xs + r * w->NG + g);
      acc[r][0] = _mm256_fmadd_ps(xv, m0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, m1, acc[r][1]);
    }
  }
}

// R rows x (16 C) columns: C consecutive panels from panel b, streaming their quantized values. xs: the
// rows' per-group sums of x (NG per row) when there are offsets.
AI void qtile(const int R, const int C, const int BITS, const qw_t* w, const float* x, long ldx, const float* xs,
              float* y, long ldy, const float* bias, long O, long b) {
  __m256 blk[6][4][2], acc[6][4][2];
  UNROLL for (int r = 0; r < R; r++)
    UNROLL for (int c = 0; c < C; c++) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
  const long G = w->G, qs = w->qs;
  const int8_t* Q = (const int8_t*)w->Q + b * qs;
  for (long g = 0; g < w->NG; g++) {
    UNROLL for (int r = 0; r < R; r++)
      UNROLL for (int c = 0; c < C; c++) blk[r][c][0] = blk[r][c][1] = _mm256_setzero_ps();
    long i0 = g * G;
    if (BITS == 8) {
      for (long i = i0; i < i0 + G; i++) {
        UNROLL for (int c = 0; c < C; c++) {
          const int8_t* q = Q + c * qs + i * 16;
          PF(q);
          __m256 w0, w1;
          deq8(q, &w0, &w1);
          UNROLL for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_broadcast_ss(x + r * ldx + i);
            blk[r][c][0] = _mm256_fmadd_ps(xv, w0, blk[r][c][0]);
            blk[r][c][1] = _mm256_fmadd_ps(xv, w1, blk[r][c][1]);
          }
        }
      }
    } else {
      for (long i = i0; i < i0 + G; i += 2) {
        UNROLL for (int c = 0; c < C; c++) {
          const uint8_t* q = (const uint8_t*)Q + c * qs + (i / 2) * 16;
          PF(q);
          __m256 l0, l1, h0, h1;
          deq4(q, &l0, &l1, &h0, &h1);
          UNROLL for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_broadcast_ss(x + r * ldx + i);
            blk[r][c][0] = _mm256_fmadd_ps(xv, l0, blk[r][c][0]);
            blk[r][c][1] = _mm256_fmadd_ps(xv, l1, blk[r][c][1]);
          }
          UNROLL for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_broadcast_ss(x + r * ldx + i + 1);
            blk[r][c][0] = _mm256_fmadd_ps(xv, h0, blk[r][c][0]);
            blk[r][c][1] = _mm256_fmadd_ps(xv, h1, blk[r][c][1]);
          }
        }
      }
    }
    UNROLL for (int c = 0; c < C; c++) {
      __m256 bc[6][2], ac[6][2];
      UNROLL for (int r = 0; r < R; r++) { bc[r][0] = blk[r][c][0]; bc[r][1] = blk[r][c][1]; ac[r][0] = acc[r][c][0]; ac[r][1] = acc[r][c][1]; }
      group_end(R, bc, ac, w, b + c, g, xs);
      UNROLL for (int r = 0; r < R; r++) { acc[r][c][0] = ac[r][0]; acc[r][c][1] = ac[r][1]; }
    }
  }
  UNROLL for (int c = 0; c < C; c++) {
    long o = (b + c) * 16;
    int valid = (int)(O - o < 16 ? O - o : 16);
    UNROLL for (int r = 0; r < R; r++) store16(y + r * ldy + c * 16, acc[r][c][0], acc[r][c][1], bias ? bias + c * 16 : 0, valid);
  }
}

#define QT(R, C, BITS) \
static void qt_##R##_##C##_##BITS(const qw_t* w, const float* x, long ldx, const float* xs, float* y, long ldy, \
                                  const float* bias, long O, long b) { \
  qtile(R, C, BITS, w, x, ldx, xs, y, ldy, bias, O, b); \
}
typedef void (*qt_fn)(const qw_t*, const float*, long, const float*, float*, long, const float*, long, long);
QT(1, 4, 8) QT(1, 4, 4) QT(1, 1, 8) QT(1, 1, 4) QT(2, 1, 8) QT(2, 1, 4)
QT(3, 1, 8) QT(3, 1, 4) QT(4, 1, 8) QT(4, 1, 4) QT(5, 1, 8) QT(5, 1, 4) QT(6, 1, 8) QT(6, 1, 4)
static const qt_fn one_panel[2][7] = {
  {0, qt_1_1_4, qt_2_1_4, qt_3_1_4, qt_4_1_4, qt_5_1_4, qt_6_1_4},
  {0, qt_1_1_8, qt_2_1_8, qt_3_1_8, qt_4_1_8, qt_5_1_8, qt_6_1_8}};

// Large n: R rows x 16 columns of panel p over one dequantized chunk P [kc][16] (floats of q) that starts
// at column k0; accm [R][16] carries each row's sum between groups and chunks.
AI void btile(const int R, const qw_t* w, long p, const float* x, long ldx, const float* P, long k0, long kc,
              const float* xs, float* accm) {
  const long G = w->G;
  for (long g0 = 0; g0 < kc; g0 += G) {
    __m256 blk[6][2], acc[6][2];
    UNROLL for (int r = 0; r < R; r++) blk[r][0] = blk[r][1] = _mm256_setzero_ps();
    for (long i = g0; i < g0 + G; i++) {
      __m256 w0 = _mm256_load_ps(P + i * 16), w1 = _mm256_load_ps(P + i * 16 + 8);
      UNROLL for (int r = 0; r < R; r++) {
        __m256 xv = _mm256_broadcast_ss(x + r * ldx + k0 + i);
        blk[r][0] = _mm256_fmadd_ps(xv, w0, blk[r][0]);
        blk[r][1] = _mm256_fmadd_ps(xv, w1, blk[r][1]);
      }
    }
    UNROLL for (int r = 0; r < R; r++) { acc[r][0] = _mm256_loadu_ps(accm + r * 16); acc[r][1] = _mm256_loadu_ps(accm + r * 16 + 8); }
    group_end(R, blk, acc, w, p, (k0 + g0) / G, xs);
    UNROLL for (int r = 0; r < R; r++) { _mm256_storeu_ps(accm + r * 16, acc[r][0]); _mm256_storeu_ps(accm + r * 16 + 8, acc[r][1]); }
  }
}

#define BT(R) \
static void bt_##R(const qw_t* w, long p, const float* x, long ldx, const float* P, long k0, long kc, \
                   const float* xs, float* accm) { btile(R, w, p, x, ldx, P, k0, kc, xs, accm); }
BT(1) BT(2) BT(3) BT(4) BT(5) BT(6)
typedef void (*bt_fn)(const qw_t*, long, const float*, long, const float*, long, long, const float*, float*);
static const bt_fn btiles[7] = {0, bt_1, bt_2, bt_3, bt_4, bt_5, bt_6};

// Columns [k0, k0 + kc) of panel p, dequantized to floats (exact small integers) in P [kc][16].
static void dequant_chunk(const qw_t* w, long p, long k0, long kc, float* P) {
  if (w->bits == 8) {
    const int8_t* q = (const int8_t*)w->Q + p * w->qs + k0 * 16;
    for (long i = 0; i < kc; i++) {
      __m256 w0, w1; deq8(q + i * 16, &w0, &w1);
      _mm256_store_ps(P + i * 16, w0); _mm256_store_ps(P + i * 16 + 8, w1);
    }
  } else {
    const uint8_t* q = (const uint8_t*)w->Q + p * w->qs + (k0 / 2) * 16;
    for (long i = 0; i < kc; i += 2) {
      __m256 l0, l1, h0, h1; deq4(q + (i / 2) * 16, &l0, &l1, &h0, &h1);
      _mm256_store_ps(P + i * 16, l0); _mm256_store_ps(P + i * 16 + 8, l1);
      _mm256_store_ps(P + i * 16 + 16, h0); _mm256_store_ps(P + i * 16 + 24, h1);
    }
  }
}

// y[n, O] = x[n, I] @ W^T (+ bias). Q: values (bits 8 or 4); fmt, S, SC, M, MC: scales and offsets (the
// forms above; M NULL: none; SC/MC only for fmt 2 with per groups per super); G: group size.
void dw_qlinear(const float* x, long n, long I, const void* Q, int bits, int fmt, const void* S, const int8_t* SC,
                const void* M, const int8_t* MC, long G, long per, const float* bias_padded, long O, float* y) {
  long OB = (O + 15) / 16, NG = I / G;
  qw_t w = {Q, bits, fmt, S, M, SC, MC, G, NG, per > 0 ? per : 1, bits == 8 ? I * 16 : I * 8,
            fmt == 2 ? (NG / (per > 0 ? per : 1)) * 16 : NG * 16, NG * 16};
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
  int bi = bits == 8;
  if (n == 1) {                      // wide tiles: 4 panels at once (8 independent FMA chains)
    long groups = (OB + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (long p = 0; p < groups; p++) {
      long b = p * 4;
      if (b + 4 <= OB)
        (bi ? qt_1_4_8 : qt_1_4_4)(&w, x, I, xs, y + b * 16, O, bias_padded ? bias_padded + b * 16 : 0, O, b);
      else
        for (long c = b; c < OB; c++)
          one_panel[bi][1](&w, x, I, xs, y + c * 16, O, bias_padded ? bias_padded + c * 16 : 0, O, c);
    }
  } else if (n < DW_QBIG) {          // row tiles of up to 6 dequantize in registers as they go
    #pragma omp parallel for schedule(static)
    for (long b = 0; b < OB; b++)
      for (long j = 0; j < n; j += 6)
        one_panel[bi][n - j < 6 ? n - j : 6](&w, x + j * I, I, xs ? xs + j * NG : 0, y + j * O + b * 16, O,
                                             bias_padded ? bias_padded + b * 16 : 0, O, b);
  } else {                           // more rows: chunks dequantized once into L1, row tiles of 6 over them
    #pragma omp parallel
    {
      float* P = (float*)aligned_alloc(64, DW_QKC * 16 * sizeof(float));
      float* accm = (float*)aligned_alloc(64, ((n * 16 * sizeof(float) + 63) / 64) * 64);
      #pragma omp for schedule(static)
      for (long b = 0; b < OB; b++) {
        memset(accm, 0, n * 16 * sizeof(float));
        for (long k0 = 0; k0 < I; k0 += DW_QKC) {
          long kc = I - k0 < DW_QKC ? I - k0 : DW_QKC;
          dequant_chunk(&w, b, k0, kc, P);
          for (long j = 0; j < n; j += 6)
            btiles[n - j < 6 ? n - j : 6](&w, b, x + j * I, I, P, k0, kc, xs ? xs + j * NG : 0,
                                          accm + j * 16);
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
