// draftwise fp32 small-n GEMM for CPU (AVX2 + FMA), prepacked weights.
// y[n, O] = x[n, I] @ W^T (+ bias), with W prepacked as [ceil(O/16)][I][16].
// The weight is streamed once per call; rows of x are processed in register tiles of up to
// 6 rows x 16 outputs (12 ymm accumulators), so the cost grows slowly with n for small n.
#include <immintrin.h>
#include <omp.h>

#define KERNEL(R) \
static inline void mk##R(const float* x, long ldx, const float* P, long I, float* y, long ldy, const float* bias, int valid) { \
  __m256 a0[R], a1[R]; \
  for (int r = 0; r < R; r++) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); } \
  for (long i = 0; i < I; i++) { \
    __m256 w0 = _mm256_loadu_ps(P + i * 16); __m256 w1 = _mm256_loadu_ps(P + i * 16 + 8); \
    for (int r = 0; r < R; r++) { __m256 xv = _mm256_broadcast_ss(x + r * ldx + i); \
      a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]); a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]); } \
  } \
  float tmp[16]; \
  for (int r = 0; r < R; r++) { \
    if (bias) { a0[r] = _mm256_add_ps(a0[r], _mm256_loadu_ps(bias)); a1[r] = _mm256_add_ps(a1[r], _mm256_loadu_ps(bias + 8)); } \
    if (valid == 16) { _mm256_storeu_ps(y + r * ldy, a0[r]); _mm256_storeu_ps(y + r * ldy + 8, a1[r]); } \
    else { _mm256_storeu_ps(tmp, a0[r]); _mm256_storeu_ps(tmp + 8, a1[r]); for (int c = 0; c < valid; c++) y[r * ldy + c] = tmp[c]; } \
  } \
}
KERNEL(1) KERNEL(2) KERNEL(3) KERNEL(4) KERNEL(5) KERNEL(6)
void dw_linear(const float* x, long n, long I, const float* P, const float* bias_padded, long O, float* y) {
  long OB = (O + 15) / 16;
  #pragma omp parallel for schedule(static)
  for (long b = 0; b < OB; b++) {
    const float* Pb = P + b * I * 16;
    int valid = (int)((O - b * 16) < 16 ? (O - b * 16) : 16);
    const float* bb = bias_padded ? bias_padded + b * 16 : 0;
    for (long j = 0; j < n; j += 6) {
      long R = n - j < 6 ? n - j : 6;
      const float* xj = x + j * I; float* yj = y + j * O + b * 16;
      switch (R) {
        case 1: mk1(xj, I, Pb, I, yj, O, bb, valid); break;
        case 2: mk2(xj, I, Pb, I, yj, O, bb, valid); break;
        case 3: mk3(xj, I, Pb, I, yj, O, bb, valid); break;
        case 4: mk4(xj, I, Pb, I, yj, O, bb, valid); break;
        case 5: mk5(xj, I, Pb, I, yj, O, bb, valid); break;
        default: mk6(xj, I, Pb, I, yj, O, bb, valid); break;
      }
    }
  }
}
