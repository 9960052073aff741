// Peak 8-bit multiply-add rate of one core, registers only (no memory traffic): the compute bound behind
// issue 26's per-row costs. Build and run: gcc -O2 -mavx2 -mfma -mavx512f -mavx512bw -mavx512vl -mavx512vnni
// benchmarks/int8_peak.c -o /tmp/int8_peak && /tmp/int8_peak   (drop the avx512 flags on an AVX2-only CPU)
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define N 200000000L
int main(void) {
  __m256i a = _mm256_set1_epi8(3), w = _mm256_set1_epi8(5), ones = _mm256_set1_epi16(1);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  double t = now();
  for (long i = 0; i < N / 8; i++) {   // maddubs + add16 (the Q5_0/Q4 inner step), 8 chains
    __asm__ volatile("" : "+x"(a), "+x"(w));
    c0 = _mm256_add_epi16(c0, _mm256_maddubs_epi16(w, a)); c1 = _mm256_add_epi16(c1, _mm256_maddubs_epi16(w, a));
    c2 = _mm256_add_epi16(c2, _mm256_maddubs_epi16(w, a)); c3 = _mm256_add_epi16(c3, _mm256_maddubs_epi16(w, a));
    c4 = _mm256_add_epi16(c4, _mm256_maddubs_epi16(w, a)); c5 = _mm256_add_epi16(c5, _mm256_maddubs_epi16(w, a));
    c6 = _mm256_add_epi16(c6, _mm256_maddubs_epi16(w, a)); c7 = _mm256_add_epi16(c7, _mm256_maddubs_epi16(w, a));
  }
  double dt = now() - t;
  printf("avx2 maddubs+add16:        %.1f GMAC/s per core (32 MACs each)\n", N * 32 / dt / 1e9);
  t = now();
  for (long i = 0; i < N / 8; i++) {   // Q8_0 on AVX2: sign + maddubs + madd + add32
    __asm__ volatile("" : "+x"(a), "+x"(w));
    __m256i aw = _mm256_abs_epi8(w);
#define S(c) c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w)), ones))
    S(c0); S(c1); S(c2); S(c3); S(c4); S(c5); S(c6); S(c7);
  }
  dt = now() - t;
  printf("avx2 sign+maddubs+madd+add: %.1f GMAC/s per core\n", N * 32 / dt / 1e9);
#ifdef __AVX512VNNI__
  __m512i A = _mm512_set1_epi8(3), W = _mm512_set1_epi8(5);
  __m512i d0 = _mm512_setzero_si512(), d1 = d0, d2 = d0, d3 = d0, d4 = d0, d5 = d0, d6 = d0, d7 = d0;
  t = now();
  for (long i = 0; i < N / 8; i++) {
    __asm__ volatile("" : "+v"(A), "+v"(W));
    d0 = _mm512_dpbusd_epi32(d0, W, A); d1 = _mm512_dpbusd_epi32(d1, W, A); d2 = _mm512_dpbusd_epi32(d2, W, A);
    d3 = _mm512_dpbusd_epi32(d3, W, A); d4 = _mm512_dpbusd_epi32(d4, W, A); d5 = _mm512_dpbusd_epi32(d5, W, A);
    d6 = _mm512_dpbusd_epi32(d6, W, A); d7 = _mm512_dpbusd_epi32(d7, W, A);
  }
  dt = now() - t;
  printf("vnni512 vpdpbusd zmm:      %.1f GMAC/s per core (64 MACs each)\n", N * 64 / dt / 1e9);
  d0 = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(d0, d1), _mm512_add_epi32(d2, d3)),
                        _mm512_add_epi32(_mm512_add_epi32(d4, d5), _mm512_add_epi32(d6, d7)));
  c0 = _mm256_add_epi32(c0, _mm512_castsi512_si256(d0));
#endif
  c0 = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
                        _mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7)));
  printf("(checksum %d)\n", _mm256_extract_epi32(c0, 0));
  return 0;
}
