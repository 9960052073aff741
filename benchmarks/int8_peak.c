// Peak 8-bit multiply-add rate of one core, registers only (no memory traffic): the compute bound behind
// issue 26's per-row costs. Build and run: gcc -O2 -mavx2 -mfma -mavx512f -mavx512bw -mavx512vl -mavx512vnni
// benchmarks/int8_peak.c -o /tmp/int8_peak && /tmp/int8_peak   (drop the avx512 flags on an AVX2-only CPU)
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define N 400000000L
// Eight independent chains with eight different weight registers; the empty asm makes every register
// opaque each iteration, so the compiler can neither hoist nor merge the multiplies.
#define OPAQUE8(x) __asm__ volatile("" : "+x"(x##0), "+x"(x##1), "+x"(x##2), "+x"(x##3), "+x"(x##4), "+x"(x##5), "+x"(x##6), "+x"(x##7))
int main(void) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a = _mm256_set1_epi8(3);
  __m256i w0 = _mm256_set1_epi8(1), w1 = _mm256_set1_epi8(2), w2 = _mm256_set1_epi8(3), w3 = _mm256_set1_epi8(4);
  __m256i w4 = _mm256_set1_epi8(5), w5 = _mm256_set1_epi8(6), w6 = _mm256_set1_epi8(7), w7 = _mm256_set1_epi8(-8);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  double t = now();
  for (long i = 0; i < N / 256; i++) {     // maddubs + add16: the 4-/5-/6-bit weights' inner step
    OPAQUE8(w);
#define U(k) c##k = _mm256_add_epi16(c##k, _mm256_maddubs_epi16(w##k, a))
    U(0); U(1); U(2); U(3); U(4); U(5); U(6); U(7);
  }
  double dt = now() - t;
  printf("avx2 maddubs + add16:              %6.1f GMAC/s per core\n", N / dt / 1e9);
  t = now();
  for (long i = 0; i < N / 256; i++) {     // Q8_0 on AVX2: sign + maddubs + madd + add32 (|w| precomputed)
    OPAQUE8(w);
#define S(k) c##k = _mm256_add_epi32(c##k, _mm256_madd_epi16(_mm256_maddubs_epi16(w##k, _mm256_sign_epi8(a, w##k)), ones))
    S(0); S(1); S(2); S(3); S(4); S(5); S(6); S(7);
  }
  dt = now() - t;
  printf("avx2 sign + maddubs + madd + add32: %6.1f GMAC/s per core\n", N / dt / 1e9);
#ifdef __AVX512VNNI__
  __m512i A = _mm512_set1_epi8(3);
  __m512i W0 = _mm512_set1_epi8(1), W1 = _mm512_set1_epi8(2), W2 = _mm512_set1_epi8(3), W3 = _mm512_set1_epi8(4);
  __m512i W4 = _mm512_set1_epi8(5), W5 = _mm512_set1_epi8(6), W6 = _mm512_set1_epi8(7), W7 = _mm512_set1_epi8(9);
  __m512i d0 = _mm512_setzero_si512(), d1 = d0, d2 = d0, d3 = d0, d4 = d0, d5 = d0, d6 = d0, d7 = d0;
  t = now();
  for (long i = 0; i < N / 512; i++) {
    __asm__ volatile("" : "+v"(W0), "+v"(W1), "+v"(W2), "+v"(W3), "+v"(W4), "+v"(W5), "+v"(W6), "+v"(W7));
#define V(k) d##k = _mm512_dpbusd_epi32(d##k, W##k, A)
    V(0); V(1); V(2); V(3); V(4); V(5); V(6); V(7);
  }
  dt = now() - t;
  printf("vnni512 vpdpbusd zmm:              %6.1f GMAC/s per core\n", N / dt / 1e9);
  d0 = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(d0, d1), _mm512_add_epi32(d2, d3)),
                        _mm512_add_epi32(_mm512_add_epi32(d4, d5), _mm512_add_epi32(d6, d7)));
  c0 = _mm256_add_epi32(c0, _mm512_castsi512_si256(d0));
#endif
  c0 = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
                        _mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7)));
  printf("(checksum %d)\n", _mm256_extract_epi32(c0, 0));
  return 0;
}
