// GGUF block weights with 8-bit activations (llama.cpp's CPU scheme): shared by q8quant.c (activation
// quantization and the run-time ISA dispatch), q8gemm.c (compiled once per ISA) and layer.c.
#pragma once
#include <stdint.h>
#include "kernels.h"

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
