// draftwise fused non-matmul steps for CPU fp32 (AVX2): one call instead of a handful of ATen ops
// each (dispatch, not arithmetic, dominates them at these sizes). Every row is computed on its own,
// so a row's result does not depend on how many rows a call has.
#include <immintrin.h>
#include "kernels.h"
#include "common.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

// Sum of squares of x[0..D), a fixed order: 8 lanes in parallel, then the lanes in order, then the tail.
static inline float sumsq(const float* x, long D) {
  __m256 acc = _mm256_setzero_ps();
  long i = 0;
  for (; i + 8 <= D; i += 8) { __m256 v = _mm256_loadu_ps(x + i); acc = _mm256_fmadd_ps(v, v, acc); }
  float lanes[8], s = 0.0f;
  _mm256_storeu_ps(lanes, acc);
  for (int k = 0; k < 8; k++) s += lanes[k];
  for (; i < D; i++) s += x[i] * x[i];
  return s;
}

// y = x / sqrt(mean(x^2) + eps) * w, per row of length D (rows may be heads: w has D entries).
void dw_rms_norm(const float* x, long rows, long D, const float* w, float eps, float* y) {
  for (long r = 0; r < rows; r++) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    float inv = 1.0f / sqrtf(sumsq(xr, D) / (float)D + eps);
    for (long i = 0; i < D; i++) yr[i] = w[i] * (xr[i] * inv);
  }
}

// xo = x + y (residual), then h = rms_norm(xo) * w; rows of length D.
void dw_add_rms_norm(const float* x, const float* y, long rows, long D, const float* w, float eps, float* xo,
                     float* h) {
  for (long i = 0; i < rows * D; i++) xo[i] = x[i] + y[i];
  dw_rms_norm(xo, rows, D, w, eps, h);
}

// Rotary embedding in place on x: rows of `heads` heads of Dh values, rows ld floats apart, with
// cos/sin [rows, Dh] (Hugging Face's rotate-half form: x * cos + rotate_half(x) * sin, the same
// products and sums as its ATen ops).
void dw_rope(float* x, long rows, long ld, long heads, long Dh, const float* cos_, const float* sin_) {
  long half = Dh / 2;
  for (long r = 0; r < rows; r++) {
    const float* c = cos_ + r * Dh;
    const float* s = sin_ + r * Dh;
    for (long h = 0; h < heads; h++) {
      float* v = x + r * ld + h * Dh;
      for (long i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * c[i] + (-b) * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

// exp(x) for 8 lanes: Cody-Waite reduction x = k ln2 + r, a degree-6 polynomial for exp(r) (Cephes'
// expf coefficients, ~1 ulp), times 2^k. Inputs below -87.3 (masked scores: -inf) give exactly 0;
// inputs above 88.3 are clamped (finite).
static inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447505531f);
  __m256 dead = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^k in two halves (k may reach 128 or -127 at the clamps, beyond one exponent field)
  __m256i ki = _mm256_cvtps_epi32(k);
  __m256i k1 = _mm256_srai_epi32(ki, 1), k2 = _mm256_sub_epi32(ki, k1);
  __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, _mm256_set1_epi32(127)), 23));
  __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, _mm256_set1_epi32(127)), 23));
  return _mm256_andnot_ps(dead, _mm256_mul_ps(_mm256_mul_ps(p, s1), s2));
}

static inline float hsum8(__m256 v) {      // lanes added in order 0..7
  float l[8], s = 0.0f;
  _mm256_storeu_ps(l, v);
  for (int k = 0; k < 8; k++) s += l[k];
  return s;
}

// Lane i of the result = hsum8(a[i]) to the bit (0 + lane 0 + lane 1 + ... + lane 7, in that order):
// the 8 x 8 transpose puts lane k of every accumulator in one vector, then the adds run in hsum8's order.
static inline __m256 reduce8(const __m256* a) {
  __m256 t0 = _mm256_unpacklo_ps(a[0], a[1]), t1 = _mm256_unpackhi_ps(a[0], a[1]);
  __m256 t2 = _mm256_unpacklo_ps(a[2], a[3]), t3 = _mm256_unpackhi_ps(a[2], a[3]);
  __m256 t4 = _mm256_unpacklo_ps(a[4], a[5]), t5 = _mm256_unpackhi_ps(a[4], a[5]);
  __m256 t6 = _mm256_unpacklo_ps(a[6], a[7]), t7 = _mm256_unpackhi_ps(a[6], a[7]);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  __m256 r[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                 _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                 _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                 _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
  __m256 sum = _mm256_setzero_ps();
  UNROLL for (int k = 0; k < 8; k++) sum = _mm256_add_ps(sum, r[k]);
  return sum;
}

// Scores of query qv against keys [t0, t1) of Kh into s (dot * scale + mask), each key its own chain over
// d in order, its lanes summed in order (hsum8), then the tail of d; returns their max. With Dh a multiple
// of 8: 8 keys per pass, reduced together (reduce8: the same bits).
static inline float scores1(const float* qv, const float* Kh, long Dh, long t0, long t1, const float* mr, float scale,
                            float* s) {
  float mx = -INFINITY;
  long t = t0;
  if (Dh % 8 == 0) {
    __m256 sc = _mm256_set1_ps(scale), m8 = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= t1; t += 8) {
      const float* k0 = Kh + t * Dh;
      __m256 a[8];
      UNROLL for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
      for (long d = 0; d < Dh; d += 8) {
        __m256 qd = _mm256_loadu_ps(qv + d);
        UNROLL for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + j * Dh + d), a[j]);
      }
      __m256 st = _mm256_add_ps(_mm256_mul_ps(reduce8(a), sc), mr ? _mm256_loadu_ps(mr + t) : _mm256_setzero_ps());
      _mm256_storeu_ps(s + t, st);
      m8 = _mm256_max_ps(m8, st);
    }
    float l[8];
    _mm256_storeu_ps(l, m8);
    for (int k = 0; k < 8; k++) if (l[k] > mx) mx = l[k];
  }
  for (; t < t1; t++) {
    const float* kt = Kh + t * Dh;
    __m256 a = _mm256_setzero_ps();
    long d = 0;
    for (; d + 8 <= Dh; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qv + d), _mm256_loadu_ps(kt + d), a);
    float dot = hsum8(a);
    for (; d < Dh; d++) dot += qv[d] * kt[d];
    float st = dot * scale + (mr ? mr[t] : 0.0f);
    s[t] = st;
    if (st > mx) mx = st;
  }
  return mx;
}

// The same for two queries of one kv head at once (each key read once for both; 4 keys per pass, the
// 2 x 4 chains reduced together): every score is the same operation sequence as in scores1.
static inline void scores2(const float* q0, const float* q1, const float* Kh, long Dh, long T, const float* mr,
                           float scale, float* s0, float* s1, float* mx0, float* mx1) {
  float m0 = -INFINITY, m1 = -INFINITY;
  long t = 0;
  if (Dh % 8 == 0)
    for (; t + 4 <= T; t += 4) {
      const float* k0 = Kh + t * Dh;
      __m256 a[8];                   // a[j]: q0 . key t + j, a[4 + j]: q1 . key t + j
      UNROLL for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
      for (long d = 0; d < Dh; d += 8) {
        __m256 x0 = _mm256_loadu_ps(q0 + d), x1 = _mm256_loadu_ps(q1 + d);
        UNROLL for (int j = 0; j < 4; j++) {
          __m256 kv = _mm256_loadu_ps(k0 + j * Dh + d);
          a[j] = _mm256_fmadd_ps(x0, kv, a[j]);
          a[4 + j] = _mm256_fmadd_ps(x1, kv, a[4 + j]);
        }
      }
      float dots[8];
      _mm256_storeu_ps(dots, reduce8(a));
      for (int j = 0; j < 4; j++) {
        float m = mr ? mr[t + j] : 0.0f;
        float st0 = dots[j] * scale + m, st1 = dots[4 + j] * scale + m;
        s0[t + j] = st0; s1[t + j] = st1;
        if (st0 > m0) m0 = st0;
        if (st1 > m1) m1 = st1;
      }
    }
  float r0 = scores1(q0, Kh, Dh, t, T, mr, scale, s0), r1 = scores1(q1, Kh, Dh, t, T, mr, scale, s1);
  *mx0 = r0 > m0 ? r0 : m0;
  *mx1 = r1 > m1 ? r1 : m1;
}

// s[0, Tp) (scores, -inf from T on) -> exp(s - mx) in place; returns 1 / sum. The sum runs over the visible
// slots (mr NULL: all; else those whose mask is not -inf) in 8 lanes by their RANK among the visible slots
// mod 8, each lane in rank order, so a tree node whose ancestors sit at scattered slots sums exactly as
// the one-token step does with the same keys at consecutive slots (lanes by slot index broke that: a
// node after its siblings got other bits than decoding it, which 8-bit activations then amplified).
static inline float softmax_row(float* s, long T, long Tp, float mx, const float* mr) {
  for (long t = T; t < Tp; t++) s[t] = -INFINITY;
  long f = 0;                        // slots before f are all visible: rank = slot, summed 8 at a time
  if (!mr) f = T;
  else while (f < T && mr[f] != -INFINITY) f++;
  const long f8 = f / 8 * 8;
  __m256 m8 = _mm256_set1_ps(mx), l8 = _mm256_setzero_ps();
  for (long t = 0; t < Tp; t += 8) {
    __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(s + t), m8));
    _mm256_store_ps(s + t, p);
    if (t + 8 <= f8) l8 = _mm256_add_ps(l8, p);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, l8);
  long k = f8;
  for (long t = f8; t < T; t++)
    if (!mr || mr[t] != -INFINITY) { lanes[k & 7] += s[t]; k++; }
  return 1.0f / hsum8(_mm256_loadu_ps(lanes));
}

// o[d] = inv * sum_t p[t] V[t, d] for NQ (1 or 2) rows of weights sharing V: chains over t in order,
// 32 values per pass for two rows, 64 for one.
static inline void weighted_sum(int NQ, const float* const* p, const float* Vh, long Dh, long T, const float* inv,
                                float* const* o) {
  long d = 0;
  if (NQ == 2) {
    for (; d + 32 <= Dh; d += 32) {
      __m256 a[2][4];
      UNROLL for (int k = 0; k < 4; k++) a[0][k] = a[1][k] = _mm256_setzero_ps();
      for (long t = 0; t < T; t++) {
        __m256 p0 = _mm256_broadcast_ss(p[0] + t), p1 = _mm256_broadcast_ss(p[1] + t);
        const float* vt = Vh + t * Dh + d;
        UNROLL for (int k = 0; k < 4; k++) {
          __m256 v = _mm256_loadu_ps(vt + 8 * k);
          a[0][k] = _mm256_fmadd_ps(p0, v, a[0][k]);
          a[1][k] = _mm256_fmadd_ps(p1, v, a[1][k]);
        }
      }
      for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(o[0] + d + 8 * k, _mm256_mul_ps(a[0][k], _mm256_set1_ps(inv[0])));
        _mm256_storeu_ps(o[1] + d + 8 * k, _mm256_mul_ps(a[1][k], _mm256_set1_ps(inv[1])));
      }
    }
  } else {
    for (; d + 64 <= Dh; d += 64) {
      __m256 a[8];
      UNROLL for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
      for (long t = 0; t < T; t++) {
        __m256 p0 = _mm256_broadcast_ss(p[0] + t);
        const float* vt = Vh + t * Dh + d;
        UNROLL for (int k = 0; k < 8; k++) a[k] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(vt + 8 * k), a[k]);
      }
      for (int k = 0; k < 8; k++) _mm256_storeu_ps(o[0] + d + 8 * k, _mm256_mul_ps(a[k], _mm256_set1_ps(inv[0])));
    }
  }
  for (int i = 0; i < NQ; i++) {
    long e = d;
    for (; e + 8 <= Dh; e += 8) {
      __m256 a = _mm256_setzero_ps();
      for (long t = 0; t < T; t++) a = _mm256_fmadd_ps(_mm256_broadcast_ss(p[i] + t), _mm256_loadu_ps(Vh + t * Dh + e), a);
      _mm256_storeu_ps(o[i] + e, _mm256_mul_ps(a, _mm256_set1_ps(inv[i])));
    }
    for (; e < Dh; e++) {
      float a = 0.0f;
      for (long t = 0; t < T; t++) a = fmaf(p[i][t], Vh[t * Dh + e], a);
      o[i][e] = a * inv[i];
    }
  }
}

// Attention of n query rows against T keys/values. q: row r, head h at q[r * ldq + h * Dh]; K, V: kv head
// j, slot t at K[j * hs + t * Dh] (query head h reads kv head h / (H / Hkv)); mask: additive [n, T] rows
// ldm apart (0 or -inf), or NULL (everything visible); out [n, H * Dh]. Per (row, head):
//   s_t = (q . k_t) * scale + mask_t,  p_t = exp(s_t - max s),  out = (sum_t p_t v_t) / (sum_t p_t)
// with every sum in slot order (the sum of p in 8 lanes by t mod 8): a masked slot adds exact zeros, so a
// row's result is the same whatever T beyond its visible slots, n, or the other rows are (a tree pass
// gives a node the bits of the one-token step at its place; slots after a row's last visible one are
// skipped, which a causal prefill halves its work by). Work items are pairs of query heads that
// share a kv head (keys and values read once for both); a pair's arithmetic per head is the same
// sequence as a lone head's. Returns 0, or 1 when a thread's score rows could not be allocated.
int dw_attention(const float* q, long n, long ldq, long H, long Hkv, long Dh, const float* K, const float* V,
                 long hs, long T, const float* mask, long ldm, float scale, float* out) {
  long g = H / Hkv, pairs = (g + 1) / 2, Tp = (T + 7) / 8 * 8;
  int failed = 0;
  #pragma omp parallel
  {
    float* s = (float*)aligned_alloc(32, sizeof(float) * 2 * Tp);
    if (!s) {
      #pragma omp atomic write
      failed = 1;
    }
    #pragma omp for schedule(static)
    for (long it = 0; it < n * Hkv * pairs; it++) {
      if (!s) continue;
      long r = it / (Hkv * pairs), j = (it / pairs) % Hkv, h = j * g + (it % pairs) * 2;
      int nq = h + 1 < (j + 1) * g ? 2 : 1;
      const float* Kh = K + j * hs;
      const float* Vh = V + j * hs;
      const float* mr = mask ? mask + r * ldm : 0;
      const float* q0 = q + r * ldq + h * Dh;
      long Tr = T;                   // masked slots after the row's last visible one add exact zeros: skip
      while (mr && Tr > 1 && mr[Tr - 1] == -INFINITY) Tr--;
      long Tq = (Tr + 7) / 8 * 8;
      float* s1 = s + Tp;
      float mx[2], inv[2];
      if (nq == 2) scores2(q0, q0 + Dh, Kh, Dh, Tr, mr, scale, s, s1, &mx[0], &mx[1]);
      else mx[0] = scores1(q0, Kh, Dh, 0, Tr, mr, scale, s);
      inv[0] = softmax_row(s, Tr, Tq, mx[0], mr);
      if (nq == 2) inv[1] = softmax_row(s1, Tr, Tq, mx[1], mr);
      const float* p[2] = {s, s1};
      float* o[2] = {out + r * H * Dh + h * Dh, out + r * H * Dh + (h + 1) * Dh};
      weighted_sum(nq, p, Vh, Dh, Tr, inv, o);
    }
    free(s);
  }
  return failed;
}

// out[r, i] = silu(gate[r, i]) * up[r, i] with gate_up [n, 2 I] (gate first), silu(x) = x / (1 + exp(-x)).
void dw_swiglu(const float* gu, long n, long I, float* out) {
  for (long r = 0; r < n; r++) {
    const float* gr = gu + r * 2 * I;
    const float* ur = gr + I;
    float* o = out + r * I;
    long i = 0;
    for (; i + 8 <= I; i += 8) {
      __m256 gv = _mm256_loadu_ps(gr + i);
      __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      __m256 sg = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(sg, _mm256_loadu_ps(ur + i)));
    }
    for (; i < I; i++) o[i] = gr[i] / (1.0f + expf(-gr[i])) * ur[i];
  }
}

// ---------------------------------------------------------------------- row reductions over logits
// ATen's argmax / topk over the last axis of a [n, 151936] fp32 tensor took 1.8-8 ms for n = 3..8 on the
// 2-core CPU under load (a speculative step verifies n rows): here each row is one or two streaming passes,
// rows in turn (~20 us a row: less than a parallel region's start).

// The row's largest value, or NaN when it holds a NaN.
static float row_max(const float* p, long V) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, nan = _mm256_setzero_ps();
  long i = 0;
  for (; i + 16 <= V; i += 16) {
    __m256 a = _mm256_loadu_ps(p + i), b = _mm256_loadu_ps(p + i + 8);
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
  }
  m0 = _mm256_max_ps(m0, m1);
  float t[8], best = -INFINITY;
  _mm256_storeu_ps(t, m0);
  for (int j = 0; j < 8; j++) best = t[j] > best ? t[j] : best;
  int has_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < V; i++) {
    if (p[i] != p[i]) has_nan = 1;
    best = p[i] > best ? p[i] : best;
  }
  return has_nan ? NAN : best;
}

// out[r] = the first index of row r's largest value (torch.argmax's choice); rows ld apart. A row holding
// a NaN gets -1 (the caller falls back to torch, which treats NaN as the largest value).
void dw_argmax_rows(const float* x, long n, long V, long ld, int64_t* out) {
  for (long r = 0; r < n; r++) {
    const float* p = x + r * ld;
    float best = row_max(p, V);
    if (best != best) { out[r] = -1; continue; }
    const __m256 b = _mm256_set1_ps(best);
    long i = 0, at = -1;
    for (; i + 8 <= V && at < 0; i += 8) {
      int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + i), b, _CMP_EQ_OQ));
      if (m) at = i + __builtin_ctz(m);
    }
    for (; i < V && at < 0; i++) if (p[i] == best) at = i;
    out[r] = at;
  }
}

// idx[r, 0..k) = the indices of row r's k largest values, largest first (equal values: lower index first).
void dw_topk_rows(const float* x, long n, long V, long ld, long k, int64_t* idx) {
  for (long r = 0; r < n; r++) {
    const float* p = x + r * ld;
    float val[64];
    int64_t* id = idx + r * k;
    long have = 0;
    float thr = -INFINITY;                 // the kth value once k are held
    for (long i = 0; i < V; i++) {
      if (have == k && !(p[i] > thr)) {    // fast path: skip 8 at a time below the threshold
        if ((i & 7) == 0 && i + 8 <= V) {
          const __m256 t = _mm256_set1_ps(thr);
          while (i + 8 <= V && !_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + i), t, _CMP_GT_OQ))) i += 8;
          if (i >= V) break;
          if (!(p[i] > thr)) continue;
        } else continue;
      }
      float v = p[i];
      long j = have < k ? have++ : k - 1;  // insert v, kept sorted (stable: after equal values)
      while (j > 0 && val[j - 1] < v) { val[j] = val[j - 1]; id[j] = id[j - 1]; j--; }
      val[j] = v; id[j] = i;
      if (have == k) thr = val[k - 1];
    }
  }
}

// ---- suffix-array search (datastore.longest_match, whose Python form is the reference)
// How the suffix of stream[0..n) at `start` compares with pat[0..m): -1 smaller, 0 equal, 1 larger (a suffix
// that ends first is smaller); *lcp = their common prefix.
static int sa_compare(const int32_t* stream, long n, long start, const int32_t* pat, long m, long* lcp) {
  long avail = n - start < m ? n - start : m;
  for (long j = 0; j < avail; j++)
    if (stream[start + j] != pat[j]) { *lcp = j; return stream[start + j] < pat[j] ? -1 : 1; }
  *lcp = avail;
  return avail == m ? 0 : -1;
}

static long sa_at(const void* sa, int sa64, long i) {
  return sa64 ? (long)((const int64_t*)sa)[i] : (long)((const int32_t*)sa)[i];
}

// The first suffix-array index in [lo, hi) whose suffix is >= pat (upper: > pat) on m tokens.
static long sa_bound(const int32_t* stream, long n, const void* sa, int sa64, const int32_t* pat, long m, int upper,
                     long lo, long hi) {
  long lcp;
  while (lo < hi) {
    long mid = lo + (hi - lo) / 2;
    int sign = sa_compare(stream, n, sa_at(sa, sa64, mid), pat, m, &lcp);
    if (sign < 0 || (upper && sign == 0)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// out[0..3) = (length, lo, hi): the longest prefix of pat[0..m) (at least min_len tokens) that occurs in the
// stream and the suffix-array range [lo, hi) of its occurrences; (0, 0, 0) when none does.
void dw_sa_longest_match(const int32_t* stream, long n, const void* sa, int sa64, const int32_t* pat, long m,
                         long min_len, int64_t* out) {
  out[0] = out[1] = out[2] = 0;
  if (n == 0 || m < min_len) return;
  long i = sa_bound(stream, n, sa, sa64, pat, m, 0, 0, n), best = 0, lcp;
  for (long j = i - 1; j <= i; j++)
    if (j >= 0 && j < n) {
      sa_compare(stream, n, sa_at(sa, sa64, j), pat, m, &lcp);
      if (lcp > best) best = lcp;
    }
  if (best < min_len) return;
  long lo = sa_bound(stream, n, sa, sa64, pat, best, 0, 0, i + 1 < n ? i + 1 : n);
  long hi = sa_bound(stream, n, sa, sa64, pat, best, 1, lo > i - 1 ? lo : i - 1, n);
  out[0] = best; out[1] = lo; out[2] = hi;
}
