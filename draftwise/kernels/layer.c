// One decoder layer of the CPU fp32 fast path in a single call: the same kernels, in the same order,
// as layer_forward with the NATIVE glue (models/transformer.py) runs them one Python call at a time,
// so the results are bit for bit those of that path. At one token on the 0.5B a layer's dozen ATen and
// ctypes calls cost about as much as its attention; here they cost one call.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"


static int lin(const dw_lin_t* l, const float* x, long n, float* y) {
  if (l->bits == 1)
    return dw_q8linear((const dw_q8lin_t*)l->Q, x, n, y);
  if (l->bits == 32)
    dw_linear(x, n, l->I, (const float*)l->Q, (const float*)l->bias, l->O, y);
  else
    dw_qlinear(x, n, l->I, l->Q, (int)l->bits, (int)l->fmt, l->S, (const int8_t*)l->SC, l->M,
               (const int8_t*)l->MC, l->G, l->per, (const float*)l->bias, l->O, y);
  return 0;
}

// xo [n, D] = layer(x [n, D]); cos/sin [n, Dh] (the rows' positions); K/V: this layer's cache, kv head j,
// slot t at K[j * hs + t * Dh]; this pass's keys/values go to slots [start, start + n) and the queries
// attend to slots [0, start + n) under mask (additive [n, start + n], rows ldm apart; NULL: all visible).
// Returns 0, or 1 when its scratch could not be allocated (xo not written then).
int dw_layer(const dw_layer_t* L, const float* x, long n, const float* cos_, const float* sin_, float* K, float* V,
             long hs, long start, const float* mask, long ldm, float* xo) {
  long D = L->D, H = L->H, Hkv = L->Hkv, Dh = L->Dh, F = L->F, C = (H + 2 * Hkv) * Dh;
  float* h = (float*)malloc(sizeof(float) * n * (2 * D + C + H * Dh + 3 * F));   // all scratch, one block
  if (!h) return 1;
  float *qkv = h + n * D, *att = qkv + n * C, *t = att + n * H * Dh, *gu = t + n * D, *act = gu + n * 2 * F;
  if (L->attn_norm) dw_rms_norm(x, n, D, L->attn_norm, L->eps, h);
  else memcpy(h, x, sizeof(float) * n * D);
  if (lin(&L->qkv, h, n, qkv)) { free(h); return 1; }
  dw_rope(qkv, n, C, H, Dh, cos_, sin_);
  dw_rope(qkv + H * Dh, n, C, Hkv, Dh, cos_, sin_);
  for (long r = 0; r < n; r++)
    for (long j = 0; j < Hkv; j++) {
      memcpy(K + j * hs + (start + r) * Dh, qkv + r * C + (H + j) * Dh, sizeof(float) * Dh);
      memcpy(V + j * hs + (start + r) * Dh, qkv + r * C + (H + Hkv + j) * Dh, sizeof(float) * Dh);
    }
  if (dw_attention(qkv, n, C, H, Hkv, Dh, K, V, hs, start + n, mask, ldm, L->scale, att)) {
    free(h);
    return 1;
  }
  if (lin(&L->o, att, n, t)) { free(h); return 1; }
  dw_add_rms_norm(x, t, n, D, L->mlp_norm, L->eps, xo, h);
  if (lin(&L->gate_up, h, n, gu)) { free(h); return 1; }
  dw_swiglu(gu, n, F, act);
  if (lin(&L->down, act, n, t)) { free(h); return 1; }
  for (long i = 0; i < n * D; i++) xo[i] = xo[i] + t[i];
  free(h);
  return 0;
}
