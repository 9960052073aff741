// Everything the kernel library exports: its structs and functions, declared once. Every .c file
// includes this header (the compiler checks each definition against it) and the Python bindings
// (draftwise/kernels/__init__.py) read their ctypes signatures from it; tests/test_kernel_header.py
// checks the ctypes structs field by field. Pointers cross as void*, sizes as long.
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

typedef struct {                     // one linear: prepacked fp32 (bits 32), GGUF blocks with fp32
                                     // activations (bits 8, 4) or with 8-bit ones (bits 1: Q is a dw_q8lin_t)
  long bits, fmt, G, per, I, O;
  const void *Q, *S, *M, *SC, *MC, *bias;
} dw_lin_t;

typedef struct {
  long D, H, Hkv, Dh, F;             // hidden size, heads, kv heads, head dim, MLP size
  float eps, scale;                  // RMSNorm epsilon, attention scale
  const float *attn_norm, *mlp_norm; // attn_norm NULL: no input norm
  dw_lin_t qkv, o, gate_up, down;
} dw_layer_t;

// ---- functions (one declaration a line; see each definition for its contract)
void dw_linear(const float* x, long n, long I, const float* P, const float* bias_padded, long O, float* y);
void dw_qlinear(const float* x, long n, long I, const void* Q, int bits, int fmt, const void* S, const int8_t* SC, const void* M, const int8_t* MC, long G, long per, const float* bias_padded, long O, float* y);
void dw_rms_norm(const float* x, long rows, long D, const float* w, float eps, float* y);
void dw_add_rms_norm(const float* x, const float* y, long rows, long D, const float* w, float eps, float* xo, float* h);
void dw_rope(float* x, long rows, long ld, long heads, long Dh, const float* cos_, const float* sin_);
int dw_attention(const float* q, long n, long ldq, long H, long Hkv, long Dh, const float* K, const float* V, long hs, long T, const float* mask, long ldm, float scale, float* out);
void dw_swiglu(const float* gu, long n, long I, float* out);
int dw_layer(const dw_layer_t* L, const float* x, long n, const float* cos_, const float* sin_, float* K, float* V, long hs, long start, const float* mask, long ldm, float* xo);
void dw_argmax_rows(const float* x, long n, long V, long ld, int64_t* out);
void dw_topk_rows(const float* x, long n, long V, long ld, long k, int64_t* idx);
int dw_q8linear(const dw_q8lin_t* L, const float* x, long n, float* y);
void dw_q8_quantize(const float* x, long n, long I, int kind, int8_t* q, float* d, float* s, int32_t* bs16, int32_t* bs32);
int dw_q8_set_isa(int isa);
void dw_sa_longest_match(const int32_t* stream, long n, const void* sa, int sa64, const int32_t* pat, long m, long min_len, int64_t* out);
