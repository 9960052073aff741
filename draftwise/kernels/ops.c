// draftwise fused non-matmul steps for CPU fp32 (AVX2): one call instead of a handful of ATen ops
// each (dispatch, not arithmetic, dominates them at these sizes). Every row is computed on its own,
// so a row's result does not depend on how many rows a call has.
#include <immintrin.h>
#include <math.h>
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

// Attention of n query rows against T keys/values. q: row r, head h at q[r * ldq + h * Dh]; K, V: kv head
// j, slot t at K[j * hs + t * Dh] (query head h reads kv head h / (H / Hkv)); mask: additive [n, T] rows
// ldm apart (0 or -inf), or NULL (everything visible); out [n, H * Dh]. Per (row, head):
//   s_t = (q . k_t) * scale + mask_t,  p_t = exp(s_t - max s),  out = (sum_t p_t v_t) / (sum_t p_t)
// with every sum in slot order (the sum of p in 8 lanes by t mod 8) and one thread per (row, head): a
// masked slot adds exact zeros, so a row's result is the same whatever T beyond its visible slots, n,
// or the other rows are (a tree pass gives a node the bits of the one-token step at its place).
// Returns 0, or 1 when a thread's score row could not be allocated.
int dw_attention(const float* q, long n, long ldq, long H, long Hkv, long Dh, const float* K, const float* V,
                 long hs, long T, const float* mask, long ldm, float scale, float* out) {
  long g = H / Hkv, Tp = (T + 7) / 8 * 8;
  int failed = 0;
  #pragma omp parallel
  {
    float* s = (float*)aligned_alloc(32, sizeof(float) * Tp);
    if (!s) {
      #pragma omp atomic write
      failed = 1;
    }
    #pragma omp for schedule(static)
    for (long rh = 0; rh < n * H; rh++) {
      if (!s) continue;
      long r = rh / H, h = rh % H;
      const float* qv = q + r * ldq + h * Dh;
      const float* Kh = K + (h / g) * hs;
      const float* Vh = V + (h / g) * hs;
      const float* mr = mask ? mask + r * ldm : 0;
      float mx = -INFINITY;
      long t = 0;
      for (; t + 4 <= T; t += 4) {   // 4 keys at a time: independent chains, each key's own order
        const float* k0 = Kh + t * Dh;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        long d = 0;
        for (; d + 8 <= Dh; d += 8) {
          __m256 qd = _mm256_loadu_ps(qv + d);
          a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + d), a0);
          a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + Dh + d), a1);
          a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + 2 * Dh + d), a2);
          a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + 3 * Dh + d), a3);
        }
        float dots[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
        for (int j = 0; j < 4; j++) {
          for (long e = d; e < Dh; e++) dots[j] += qv[e] * k0[j * Dh + e];
          float st = dots[j] * scale + (mr ? mr[t + j] : 0.0f);
          s[t + j] = st;
          if (st > mx) mx = st;
        }
      }
      for (; t < T; t++) {
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
      for (t = T; t < Tp; t++) s[t] = -INFINITY;
      __m256 m8 = _mm256_set1_ps(mx), l8 = _mm256_setzero_ps();
      for (t = 0; t < Tp; t += 8) {
        __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(s + t), m8));
        _mm256_store_ps(s + t, p);
        l8 = _mm256_add_ps(l8, p);
      }
      __m256 iv = _mm256_set1_ps(1.0f / hsum8(l8));
      float* o = out + r * H * Dh + h * Dh;
      long d = 0;
      for (; d + 64 <= Dh; d += 64) {  // 64 values at a time: 8 chains over t
        __m256 a[8];
        for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
        for (t = 0; t < T; t++) {
          __m256 p = _mm256_broadcast_ss(s + t);
          const float* vt = Vh + t * Dh + d;
          for (int k = 0; k < 8; k++) a[k] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * k), a[k]);
        }
        for (int k = 0; k < 8; k++) _mm256_storeu_ps(o + d + 8 * k, _mm256_mul_ps(a[k], iv));
      }
      for (; d + 8 <= Dh; d += 8) {
        __m256 a = _mm256_setzero_ps();
        for (t = 0; t < T; t++) a = _mm256_fmadd_ps(_mm256_broadcast_ss(s + t), _mm256_loadu_ps(Vh + t * Dh + d), a);
        _mm256_storeu_ps(o + d, _mm256_mul_ps(a, iv));
      }
      for (; d < Dh; d++) {
        float a = 0.0f;
        for (t = 0; t < T; t++) a = fmaf(s[t], Vh[t * Dh + d], a);
        o[d] = a * _mm256_cvtss_f32(iv);
      }
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
