// Shared by gemm.c and qgemm.c.
#pragma once
#include <immintrin.h>

// Put before a loop over a tile's rows, panels or accumulators: unrolled early, the tile's accumulator
// arrays become registers (otherwise GCC kept them in memory and stored every accumulator on every step
// of the inner loop: measured 3-11% slower at the same arithmetic).
#define UNROLL _Pragma("GCC unroll 8")

// Store a 16-column result row (+ bias), only the first `valid` columns when the panel is partial.
static inline void store16(float* y, __m256 a0, __m256 a1, const float* bias, int valid) {
  if (bias) { a0 = _mm256_add_ps(a0, _mm256_loadu_ps(bias)); a1 = _mm256_add_ps(a1, _mm256_loadu_ps(bias + 8)); }
  if (valid == 16) { _mm256_storeu_ps(y, a0); _mm256_storeu_ps(y + 8, a1); return; }
  float tmp[16];
  _mm256_storeu_ps(tmp, a0); _mm256_storeu_ps(tmp + 8, a1);
  for (int c = 0; c < valid; c++) y[c] = tmp[c];
}
