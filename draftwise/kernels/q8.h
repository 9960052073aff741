// GGUF block weights with 8-bit activations (llama.cpp's CPU scheme): shared by q8quant.c (activation
// quantization and the run-time ISA dispatch), q8gemm.c (compiled once per ISA) and layer.c.
#pragma once
#include <stdint.h>

// One row segment of a linear: rows of one GGUF block type. Values are stored unsigned, u = q + bias,
// per 16-row panel p = o / 16, in steps of 4 columns: byte (p, k / 4, o % 16, k % 4), 64 bytes a step
// (vals 0: [O/16][I/4][64] uint8); with vals 1 two consecutive steps share 64 bytes, the even step in the
// low nibbles and the odd one in the high nibbles ([O/16][I/8][64], u in 0..15).
// Per output row o and column k, the weight is
//     D[o, k / SS] * SC[o, k / SB] * q[o, k]  (+ M[o, k / SS] * MN[o, k / 32]   mkind 2, Q4_K)
//                                            (+ M[o, k / SS]                    mkind 1, Q4_1)
// with SC, MN 1 where absent; D and M are fp16 (the file's own d, m, -dmin), SC and MN small integers.
typedef struct {
  long O;                   // rows in this segment (a multiple of 16 unless it is the last one)
  long act;                 // activation blocks: 0 = Q8_0/Q8_1 (32 values), 1 = Q8_K (256 values)
  long vals;                // 0: one byte per value; 1: nibble-packed
  long bias;                // u = q + bias
  long SB, SS;              // sub-block (SC/MN granularity) and super-block (D/M) sizes, in columns
  long mkind;               // 0: no offsets; 1: Q4_1 (M x the activation block's s); 2: Q4_K (mins)
  const void* U;
  const int8_t* SC;         // [O/16][I/SB][16] or NULL
  const int8_t* MN;         // [O/16][I/32][16] or NULL
  const uint16_t* D;        // [O/16][I/SS][16] fp16
  const uint16_t* M;        // [O/16][I/SS][16] fp16 or NULL
} dw_q8seg_t;

#define DW_Q8_MAXSEG 4
typedef struct {
  long I, O, nseg;
  const float* bias;        // [ceil(O/16) * 16] or NULL
  dw_q8seg_t seg[DW_Q8_MAXSEG];
} dw_q8lin_t;

// n rows of activations, quantized per block of 32 (act 0) or 256 (act 1) values.
typedef struct {
  const int8_t* q;          // [n][I]
  const float* d;           // [n][I / block]: the block's scale (Q8_0/Q8_1: its fp16 value)
  const float* s;           // [n][I / 32]: Q8_1's fp16(d * sum q), act 0 only
  const int32_t* bs16;      // [n][I / 16]: sums of q over 16 values
  const int32_t* bs32;      // [n][I / 32]: sums of q over 32 values
} dw_q8act_t;

typedef void (*dw_q8mm_fn)(const dw_q8lin_t* L, const dw_q8act_t* A32, const dw_q8act_t* A256, long n, float* y);
void dw_q8mm_avx2(const dw_q8lin_t*, const dw_q8act_t*, const dw_q8act_t*, long, float*);
void dw_q8mm_vnni256(const dw_q8lin_t*, const dw_q8act_t*, const dw_q8act_t*, long, float*);
void dw_q8mm_vnni512(const dw_q8lin_t*, const dw_q8act_t*, const dw_q8act_t*, long, float*);
int dw_q8linear(const dw_q8lin_t* L, const float* x, long n, float* y);
