// draftwise GEMM for GGUF block weights with 8-bit activations: the GGUF model as llama.cpp's CPU backend
// computes it. Compiled once per instruction set (Q8_ISA): 0 = AVX2 (vpmaddubsw + vpmaddwd, 8 lanes),
// 1 = AVX-512 VNNI on ymm (vpdpbusd, 8 lanes), 2 = AVX-512 VNNI on zmm (vpdpbusd, 16 lanes).
//
// Layouts: q8.h. Per output element (row r, output o) and super-block sp of SS columns:
//     dot_j  = sum_{k in sub-block j} u[o, k] * qa[r, k] - bias * bsum_j[r]       (int32, exact)
//     isum   = sum_j SC[o, j] * dot_j;  imin = sum_j MN[o, j] * bsum32_j[r]        (int32, exact)
//     acc    = fma(float(isum), D[o, sp] * da[r, sp], acc)
//     acc    = fma(float(imin), M[o, sp] * da[r, sp], acc)     (Q4_K)
//     acc    = fma(M[o, sp], sa[r, sp], acc)                    (Q4_1)
// then + bias. The integer parts are exact whatever the order, and the fp32 part is one fixed sequence
// per element: every row's output is bit-identical for any n, any tile and any of the three ISAs.
// On AVX2, Q8_0 values (bias 128) would overflow vpmaddubsw's int16 pairs, so there the stored byte is
// turned back into the signed q and multiplied as |q| x sign(q) * qa (llama.cpp's trick): same integers.
#include <immintrin.h>
#include "kernels.h"
#include "common.h"
#include "q8.h"
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define AI static inline __attribute__((always_inline))

#if Q8_ISA == 2
#define VL 16
typedef __m512i VI;
typedef __m512 VF;
#define LOADU(p) _mm512_loadu_si512((const void*)(p))
#define SET1(x) _mm512_set1_epi32(x)
#define ZERO() _mm512_setzero_si512()
#define ZEROF() _mm512_setzero_ps()
#define ADD(a, b) _mm512_add_epi32(a, b)
#define SUB(a, b) _mm512_sub_epi32(a, b)
#define MULLO(a, b) _mm512_mullo_epi32(a, b)
#define AND(a, b) _mm512_and_si512(a, b)
#define SRLI16(a, c) _mm512_srli_epi16(a, c)
#define SET1B(x) _mm512_set1_epi8(x)
#define CVT(a) _mm512_cvtepi32_ps(a)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define MULF(a, b) _mm512_mul_ps(a, b)
#define SET1F(x) _mm512_set1_ps(x)
#define I8TO32(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p)))
#define PH(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p)))
#define DOT(acc, w, a) _mm512_dpbusd_epi32(acc, w, a)
#define LOADF(p) _mm512_load_ps(p)
#define STOREF(p, v) _mm512_store_ps(p, v)
#define FN dw_q8mm_vnni512
#else
#define VL 8
typedef __m256i VI;
typedef __m256 VF;
#define LOADU(p) _mm256_loadu_si256((const __m256i*)(p))
#define SET1(x) _mm256_set1_epi32(x)
#define ZERO() _mm256_setzero_si256()
#define ZEROF() _mm256_setzero_ps()
#define ADD(a, b) _mm256_add_epi32(a, b)
#define SUB(a, b) _mm256_sub_epi32(a, b)
#define MULLO(a, b) _mm256_mullo_epi32(a, b)
#define AND(a, b) _mm256_and_si256(a, b)
#define SRLI16(a, c) _mm256_srli_epi16(a, c)
#define SET1B(x) _mm256_set1_epi8(x)
#define CVT(a) _mm256_cvtepi32_ps(a)
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define MULF(a, b) _mm256_mul_ps(a, b)
#define SET1F(x) _mm256_set1_ps(x)
#define I8TO32(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p)))
#define PH(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p)))
#define LOADF(p) _mm256_load_ps(p)
#define STOREF(p, v) _mm256_store_ps(p, v)
#if Q8_ISA == 1
#define DOT(acc, w, a) _mm256_dpbusd_epi32(acc, w, a)
#define FN dw_q8mm_vnni256
#else
#define DOT(acc, w, a) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1)))
#define FN dw_q8mm_avx2
#endif
#endif
#define PF(p) _mm_prefetch((const char*)(p) + Q8_PF, _MM_HINT_T0)
#define H (16 / VL)                  // vectors per 16-row panel
#define VB (64 / H)                  // bytes of one step per vector

#ifndef Q8_RC
#define Q8_RC 64                     // rows per chunk (large n): the chunk's activations stay in cache
#endif
#ifndef Q8_PF
#define Q8_PF 2048                   // software prefetch distance along each streamed panel (bytes)
#endif
#if Q8_ISA == 0
#ifndef Q8_RMAX
#define RMAX 4                       // rows per tile (16 ymm registers: see F16)
#else
#define RMAX Q8_RMAX                 // experiments (-DQ8_RMAX=2: the two-row tiles of before)
#endif
#define CP 1                         // panels per tile
#elif Q8_ISA == 1
#define RMAX 4
#define CP 1
#else
#define RMAX 4
#define CP 2
#endif

// The kinds of segment, as compile-time shapes of the tile below.
enum { K_Q8_0, K_Q5_0, K_Q4_1, K_Q6_K, K_Q4_K };

#if Q8_ISA == 0
// AVX2: vpmaddubsw's int16 pair sums are added in int16 for F steps before vpmaddwd widens them: exact while
// F x 2 x max(u) x 127 < 32768 (4-bit: 8 steps; Q5_0: 4; Q6_K: 2; Q8_0's |q| up to 128: 1). Tiles of 3-4 rows
// widen every step (F = 1): their int16 sums would need as many registers again as the int32 ones, and
// spilled; one pass of 4 rows over a panel beat two passes of 2 (2-core Zen 3, two interleaved runs: 0.5B
// t(4) 25.6-30.7 -> 22.8-23.3 ms, t(8) 45.4-54.1 -> 38.3-41.3; 1.5B t(4) 66.3-76.1 -> 57.7-59.0, t(8)
// 122-127 -> 111-114; benchmarks/results/avx2-zen3/tn-rows4/).
#define F16(KIND, R) ((R) > 2 ? 1 : (KIND) == K_Q4_1 || (KIND) == K_Q4_K ? 8 : (KIND) == K_Q5_0 ? 4 \
                      : (KIND) == K_Q6_K ? 2 : 1)
#else
#define F16(KIND, R) 1
#endif

// R rows (from r0) x C panels (from b) of segment s, y at the segment's first column.
AI void tile(const int R, const int C, const int KIND, const dw_q8seg_t* s, long I, const dw_q8act_t* a, long r0,
             long b, float* y, long ldy, const float* bias) {
  const int NIB = KIND == K_Q4_1 || KIND == K_Q4_K;
  const int SGN = KIND == K_Q8_0 && Q8_ISA == 0;       // AVX2: |q| x sign(q) * qa
  const int HAS_SC = KIND == K_Q6_K || KIND == K_Q4_K;
  const int MK = KIND == K_Q4_1 ? 1 : KIND == K_Q4_K ? 2 : 0;
  const int F = F16(KIND, R);
  const long SB = KIND == K_Q6_K ? 16 : 32, SS = (KIND == K_Q6_K || KIND == K_Q4_K) ? 256 : 32;
  const int bias_q = SGN ? 0 : (int)s->bias;
  const long nsup = I / SS, nsub = SS / SB, psb = NIB ? I * 8 : I * 16;
  const int32_t* bsum = SB == 16 ? a->bs16 : a->bs32;
  const long nbs = I / SB;
  // fp32 accumulators: in registers where a block is one sub-block (Q8_0, Q5_0, Q4_1), in memory for the
  // k-quants (updated once per 256 columns; their registers hold the super-block's integer sums instead)
  float accm[4][4 * 16] __attribute__((aligned(64)));
  VF accr[4][4][H];
  UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++) {
    STOREF(&accm[r][c * 16 + h * VL], ZEROF());
    accr[r][c][h] = ZEROF();
  }
  const uint8_t* U = (const uint8_t*)s->U + b * psb;
  const VI m4 = SET1B(0x0F);
#if Q8_ISA == 0
  const VI x80 = SET1B((char)0x80), ones = _mm256_set1_epi16(1);
#endif
  for (long sp = 0; sp < nsup; sp++) {
    VI isum[4][4][H];
    if (HAS_SC) UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++)
      isum[r][c][h] = ZERO();
    for (long j = 0; j < nsub; j++) {
      const long k0 = sp * SS + j * SB;
      VI acc[4][4][H];
      UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++)
        acc[r][c][h] = ZERO();
      const long KF = NIB && F == 1 ? 8 : 4 * F;                 // columns per group
      for (long kf = k0; kf < k0 + SB; kf += KF) {              // F steps summed before widening (AVX2)
#if Q8_ISA == 0
        VI a16[4][4][H];
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++)
          a16[r][c][h] = ZERO();
#define ACC(r, c, h, w, av) a16[r][c][h] = _mm256_add_epi16(a16[r][c][h], _mm256_maddubs_epi16(w, av))
#else
#define ACC(r, c, h, w, av) acc[r][c][h] = DOT(acc[r][c][h], w, av)
#endif
        if (NIB) {
          UNROLL for (long k = kf; k < kf + KF; k += 8) {
            VI lo[4][H], hi[4][H];
            UNROLL for (int c = 0; c < C; c++) {
              PF(U + c * psb + (k / 8) * 64);
              UNROLL for (int h = 0; h < H; h++) {
                VI v = LOADU(U + c * psb + (k / 8) * 64 + h * VB);
                lo[c][h] = AND(v, m4); hi[c][h] = AND(SRLI16(v, 4), m4);
              }
            }
            UNROLL for (int r = 0; r < R; r++) {
              const int8_t* q = a->q + (r0 + r) * I + k;
              VI a0 = SET1(*(const int32_t*)q), a1 = SET1(*(const int32_t*)(q + 4));
              UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++) {
                ACC(r, c, h, lo[c][h], a0);
                ACC(r, c, h, hi[c][h], a1);
              }
            }
          }
        } else {
          UNROLL for (long k = kf; k < kf + 4 * F; k += 4) {
            VI w[4][H];
            UNROLL for (int c = 0; c < C; c++) {
              PF(U + c * psb + k * 16);
              UNROLL for (int h = 0; h < H; h++) w[c][h] = LOADU(U + c * psb + k * 16 + h * VB);
            }
#if Q8_ISA == 0
            if (SGN) {
              UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++) w[c][h] = _mm256_xor_si256(w[c][h], x80);
              UNROLL for (int r = 0; r < R; r++) {
                VI av = SET1(*(const int32_t*)(a->q + (r0 + r) * I + k));
                UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++)
                  ACC(r, c, h, _mm256_abs_epi8(w[c][h]), _mm256_sign_epi8(av, w[c][h]));
              }
              continue;
            }
#endif
            UNROLL for (int r = 0; r < R; r++) {
              VI av = SET1(*(const int32_t*)(a->q + (r0 + r) * I + k));
              UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++) ACC(r, c, h, w[c][h], av);
            }
          }
        }
#undef ACC
#if Q8_ISA == 0
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++)
          acc[r][c][h] = ADD(acc[r][c][h], _mm256_madd_epi16(a16[r][c][h], ones));
#endif
      }
      // end of sub-block j: bias correction, then the sub-block scale (k-quants) or the block's fp32 step
      const long jb = k0 / SB;
      UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++) {
        if (HAS_SC) {
          VI sc = I8TO32(s->SC + (b + c) * nbs * 16 + jb * 16 + h * VL);
          UNROLL for (int r = 0; r < R; r++) {
            VI d = acc[r][c][h];
            if (bias_q) d = SUB(d, SET1(bias_q * bsum[(r0 + r) * nbs + jb]));
            isum[r][c][h] = ADD(isum[r][c][h], MULLO(sc, d));
          }
        } else {
          VF D = PH(s->D + (b + c) * nsup * 16 + sp * 16 + h * VL), M = ZEROF();
          if (MK == 1) M = PH(s->M + (b + c) * nsup * 16 + sp * 16 + h * VL);
          UNROLL for (int r = 0; r < R; r++) {
            VI d = acc[r][c][h];
            if (bias_q) d = SUB(d, SET1(bias_q * bsum[(r0 + r) * nbs + jb]));
            VF t = FMA(CVT(d), MULF(D, SET1F(a->d[(r0 + r) * nsup + sp])), accr[r][c][h]);
            if (MK == 1) t = FMA(M, SET1F(a->s[(r0 + r) * nsup + sp]), t);
            accr[r][c][h] = t;
          }
        }
      }
    }
    if (HAS_SC) {                    // end of super-block sp (k-quants): mins, then the fp32 part
      UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++) {
        VF D = PH(s->D + (b + c) * nsup * 16 + sp * 16 + h * VL), M = ZEROF();
        VI imin[4];
        if (MK == 2) {
          M = PH(s->M + (b + c) * nsup * 16 + sp * 16 + h * VL);
          UNROLL for (int r = 0; r < R; r++) imin[r] = ZERO();
          for (long j = 0; j < SS / 32; j++) {
            VI mn = I8TO32(s->MN + (b + c) * (I / 32) * 16 + (sp * (SS / 32) + j) * 16 + h * VL);
            UNROLL for (int r = 0; r < R; r++)
              imin[r] = ADD(imin[r], MULLO(mn, SET1(a->bs32[(r0 + r) * (I / 32) + sp * (SS / 32) + j])));
          }
        }
        UNROLL for (int r = 0; r < R; r++) {
          float* am = &accm[r][c * 16 + h * VL];
          VF da = SET1F(a->d[(r0 + r) * nsup + sp]);
          VF t = FMA(CVT(isum[r][c][h]), MULF(D, da), LOADF(am));
          if (MK == 2) t = FMA(CVT(imin[r]), MULF(M, da), t);
          STOREF(am, t);
        }
      }
    }
  }
  if (!HAS_SC)
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) UNROLL for (int h = 0; h < H; h++)
      STOREF(&accm[r][c * 16 + h * VL], accr[r][c][h]);
  UNROLL for (int c = 0; c < C; c++) {
    long o = (b + c) * 16;
    int valid = (int)(s->O - o < 16 ? s->O - o : 16);
    UNROLL for (int r = 0; r < R; r++)
      store16(y + r * ldy + o, _mm256_load_ps(&accm[r][c * 16]), _mm256_load_ps(&accm[r][c * 16 + 8]),
              bias ? bias + o : 0, valid);
  }
}

// Tiles: R rows x C panels, for each kind.
#define TILE(K, R, C) \
static void t_##K##_##R##_##C(const dw_q8seg_t* s, long I, const dw_q8act_t* a, long r0, long b, float* y, long ldy, \
                              const float* bias) { tile(R, C, K, s, I, a, r0, b, y, ldy, bias); }
#if CP == 2
#define WIDE_TILES(K) TILE(K, 1, 2) TILE(K, 2, 2) TILE(K, 3, 2) TILE(K, 4, 2)
#else
#define WIDE_TILES(K)
#endif
#define KIND_TILES(K) TILE(K, 1, 1) TILE(K, 2, 1) TILE(K, 3, 1) TILE(K, 4, 1) TILE(K, 1, 4) WIDE_TILES(K)
KIND_TILES(K_Q8_0) KIND_TILES(K_Q5_0) KIND_TILES(K_Q4_1) KIND_TILES(K_Q6_K) KIND_TILES(K_Q4_K)
typedef void (*tile_fn)(const dw_q8seg_t*, long, const dw_q8act_t*, long, long, float*, long, const float*);
// [kind][0..3]: 1..4 rows x CP panels; [kind][4]: 1 row x 4 panels; [kind][5]: 1 row x 1 panel
#define CAT(a, b) a##b
#define TN(K, R, C) CAT(t_##K##_##R##_, C)
#define ROW(K) {TN(K, 1, CP), TN(K, 2, CP), TN(K, 3, CP), TN(K, 4, CP), t_##K##_1_4, t_##K##_1_1}
static const tile_fn tiles[5][6] = {ROW(K_Q8_0), ROW(K_Q5_0), ROW(K_Q4_1), ROW(K_Q6_K), ROW(K_Q4_K)};
static const tile_fn tiles1[5][4] = {
  {t_K_Q8_0_1_1, t_K_Q8_0_2_1, t_K_Q8_0_3_1, t_K_Q8_0_4_1}, {t_K_Q5_0_1_1, t_K_Q5_0_2_1, t_K_Q5_0_3_1, t_K_Q5_0_4_1},
  {t_K_Q4_1_1_1, t_K_Q4_1_2_1, t_K_Q4_1_3_1, t_K_Q4_1_4_1}, {t_K_Q6_K_1_1, t_K_Q6_K_2_1, t_K_Q6_K_3_1, t_K_Q6_K_4_1},
  {t_K_Q4_K_1_1, t_K_Q4_K_2_1, t_K_Q4_K_3_1, t_K_Q4_K_4_1}};

static int kind_of(const dw_q8seg_t* s) {
  if (s->mkind == 2) return K_Q4_K;
  if (s->mkind == 1) return K_Q4_1;
  if (s->SB == 16) return K_Q6_K;
  return s->bias == 128 ? K_Q8_0 : K_Q5_0;
}

// y[n, O] = dequantized W [O, I] applied to the quantized activations (A32 / A256 per segment) (+ bias).
void FN(const dw_q8lin_t* L, const dw_q8act_t* A32, const dw_q8act_t* A256, long n, float* y) {
  const long I = L->I, O = L->O;
  const long per = n == 1 ? 4 : CP;                   // panels per work item
  long first[DW_Q8_MAXSEG + 1], col[DW_Q8_MAXSEG];   // first work item, first output column per segment
  first[0] = 0;
  long c0 = 0;
  for (long i = 0; i < L->nseg; i++) {
    long ob = (L->seg[i].O + 15) / 16;
    first[i + 1] = first[i] + (ob + per - 1) / per;
    col[i] = c0;
    c0 += L->seg[i].O;
  }
  const long items = first[L->nseg];
  #pragma omp parallel
  for (long r0 = 0; r0 < n; r0 += Q8_RC) {
    const long rn = n - r0 < Q8_RC ? n - r0 : Q8_RC;
    #pragma omp for schedule(static)
    for (long it = 0; it < items; it++) {
      long si = 0;
      while (it >= first[si + 1]) si++;
      const dw_q8seg_t* s = &L->seg[si];
      const int kind = kind_of(s);
      const dw_q8act_t* a = s->act ? A256 : A32;
      float* ys = y + col[si];
      const float* bs = L->bias ? L->bias + col[si] : 0;
      const long ob = (s->O + 15) / 16, b = (it - first[si]) * per;
      if (b + per <= ob) {
        if (n == 1) tiles[kind][4](s, I, a, 0, b, ys, O, bs);
        else
          for (long r = r0; r < r0 + rn; r += RMAX) {
            long R = r0 + rn - r < RMAX ? r0 + rn - r : RMAX;
            tiles[kind][R - 1](s, I, a, r, b, ys + r * O, O, bs);
          }
      } else {
        for (long p = b; p < ob; p++)
          for (long r = r0; r < r0 + rn; r += RMAX) {
            long R = r0 + rn - r < RMAX ? r0 + rn - r : RMAX;
            tiles1[kind][R - 1](s, I, a, r, p, ys + r * O, O, bs);
          }
      }
    }
  }
}
