// draftwise fused non-matmul steps for CPU fp32 (AVX2): one call instead of a handful of ATen ops
// each (dispatch, not arithmetic, dominates them at these sizes). Every row is computed on its own,
// so a row's result does not depend on how many rows a call has.
#include <immintrin.h>
#include <math.h>

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
