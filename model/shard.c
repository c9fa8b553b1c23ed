/* Tensor-parallel shards of a model's weights (Megatron-style): each rank
 * keeps its query and KV heads, its MLP columns and its vocabulary rows, so
 * that a forward needs one all-reduce after the attention output projection,
 * one after the MLP down projection and one after the embedding lookup. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "model/model-internal.h"
#include "model/quant.h"
#include "model/weights-internal.h"
#include "model/weights.h"

static uint32_t ggml_type(k_dtype_t t) {
  switch (t) {
  case K_F32: return MODEL_GGML_F32;
  case K_F16: return MODEL_GGML_F16;
  case K_BF16: return MODEL_GGML_BF16;
  case K_Q8_0: return MODEL_GGML_Q8_0;
  case K_Q4_0: return MODEL_GGML_Q4_0;
  case K_Q4_1: return MODEL_GGML_Q4_1;
  }
  return MODEL_GGML_F32;
}

static bool quantised(k_dtype_t t) { return t == K_Q8_0 || t == K_Q4_0 || t == K_Q4_1; }

/* Rows [r0, r0 + nr) and columns [c0, c0 + nc) of the matrix src (memory of
 * src_be) as a matrix of dst->be, followed by zero_rows rows of zeros. */
static int slice(model_weights_t *dst, const k_weight_t *src, k_backend_t *src_be, int64_t r0,
                 int64_t nr, int64_t c0, int64_t nc, int64_t zero_rows, const char *what,
                 k_weight_t *out, char *err, size_t errlen) {
  k_backend_t *be = dst->be;
  const k_dtype_t t = src->type;
  const bool keep = (be->weight_types & (1u << t)) && (t != K_F32 || be->dense_type == K_F32);
  const k_dtype_t ot = keep ? t : be->dense_type;
  const bool cols = c0 != 0 || nc != src->cols;
  if (quantised(t) && cols && (c0 % K_QBLOCK || nc % K_QBLOCK))
    return model__errf(err, errlen, -EINVAL,
                       "tensor parallelism: %s splits inside a quantisation block (columns %lld + "
                       "%lld); choose a tensor-parallel size that divides it in multiples of %d",
                       what, (long long)c0, (long long)nc, K_QBLOCK);
  *out = (k_weight_t){.type = ot, .rows = nr + zero_rows, .cols = nc};
  const size_t src_row = k_row_bytes(t, src->cols);
  if (keep && !cols && !zero_rows && be->host_memory && src_be->host_memory) {
    out->data = (char *)src->data + (size_t)r0 * src_row; /* a view, no copy */
    out->borrowed = true;
    return 0;
  }
  const size_t part_row = k_row_bytes(t, nc), col_off = k_row_bytes(t, c0);
  const size_t out_row = keep ? part_row : (size_t)nc * k_dtype_bytes(ot);
  const size_t out_bytes = (size_t)(nr + zero_rows) * out_row;
  char *rows = NULL, *host = calloc(1, out_bytes > 0 ? out_bytes : 1);
  float *f32 = keep ? NULL : malloc((size_t)nc * sizeof(float));
  int rc = 0;
  if (!host || (!keep && !f32)) {
    rc = -ENOMEM;
    goto done;
  }
  const char *base = (const char *)src->data + (size_t)r0 * src_row;
  if (!src_be->host_memory) { /* bring the rows to the host first */
    if (!(rows = malloc((size_t)nr * src_row))) {
      rc = -ENOMEM;
      goto done;
    }
    if ((rc = src_be->ops->download(src_be, rows, base, (size_t)nr * src_row))) goto done;
    base = rows;
  }
  for (int64_t r = 0; r < nr; r++) {
    const char *from = base + (size_t)r * src_row + col_off;
    char *to = host + (size_t)r * out_row;
    if (keep) {
      memcpy(to, from, part_row);
      continue;
    }
    if ((rc = model_dequant(ggml_type(t), from, f32, (size_t)nc))) goto done;
    model__narrow(f32, (size_t)nc, ot);
    memcpy(to, f32, out_row);
  }
  if (!(out->data = be->ops->alloc(be, out_bytes))) {
    rc = -ENOMEM;
    goto done;
  }
  dst->bytes += out_bytes;
  rc = be->ops->upload(be, out->data, host, out_bytes);
done:
  free(host);
  free(f32);
  free(rows);
  if (rc) return model__errf(err, errlen, rc, "tensor parallelism: cannot shard %s", what);
  return 0;
}

/* A replicated fp32 vector of n elements. */
static int replicate(model_weights_t *dst, const float *src, k_backend_t *src_be, int64_t n,
                     float **out, char *err, size_t errlen) {
  k_backend_t *be = dst->be;
  size_t bytes = (size_t)n * sizeof(float);
  float *host = malloc(bytes);
  int rc = host ? src_be->ops->download(src_be, host, src, bytes) : -ENOMEM;
  if (!rc && !(*out = be->ops->alloc(be, bytes))) rc = -ENOMEM;
  if (!rc) {
    dst->bytes += bytes;
    rc = be->ops->upload(be, *out, host, bytes);
  }
  free(host);
  return rc ? model__errf(err, errlen, rc, "tensor parallelism: cannot copy a norm") : 0;
}

int model_weights_shard(model_weights_t *dst, const model_weights_t *src, int32_t rank,
                        int32_t n_ranks, k_backend_t *be, char *err, size_t errlen) {
  memset(dst, 0, sizeof *dst);
  const model_config_t *c = &src->cfg;
  if (n_ranks < 1 || rank < 0 || rank >= n_ranks)
    return model__errf(err, errlen, -EINVAL, "tensor parallelism: rank %d of %d", rank, n_ranks);
  if (src->shard.n_ranks > 1)
    return model__errf(err, errlen, -EINVAL, "tensor parallelism: the weights are a shard already");
  if (c->n_kv_heads % n_ranks || c->n_ff % n_ranks || c->n_vocab < n_ranks)
    return model__errf(err, errlen, -EINVAL,
                       "tensor parallelism: --tensor-parallel-size %d must divide the model's %d "
                       "KV heads and %d MLP columns",
                       n_ranks, c->n_kv_heads, c->n_ff);
  k_backend_t *sbe = src->be;
  const int64_t D = c->head_dim, E = c->n_embd;
  const int32_t hq = c->n_heads / n_ranks, hkv = c->n_kv_heads / n_ranks, ff = c->n_ff / n_ranks;
  const int32_t v0 = (int32_t)((int64_t)c->n_vocab * rank / n_ranks);
  const int32_t v1 = (int32_t)((int64_t)c->n_vocab * (rank + 1) / n_ranks);
  dst->cfg = *c;
  dst->cfg.n_heads = hq;
  dst->cfg.n_kv_heads = hkv;
  dst->cfg.n_ff = ff;
  dst->cfg.n_vocab = v1 - v0;
  dst->shard = (model_shard_t){
      .rank = rank, .n_ranks = n_ranks,
      .q_head0 = hq * rank, .kv_head0 = hkv * rank,
      .n_heads_all = c->n_heads, .n_kv_heads_all = c->n_kv_heads,
      .ff0 = ff * rank, .n_ff_all = c->n_ff,
      .vocab0 = v0, .n_vocab_all = c->n_vocab,
  };
  dst->be = be;
  dst->layers = calloc((size_t)c->n_layers, sizeof *dst->layers);
  dst->inv_freq = malloc((size_t)(D / 2 + 1) * sizeof(float));
  if (!dst->layers || !dst->inv_freq) {
    model_weights_destroy(dst);
    return model__errf(err, errlen, -ENOMEM, "out of memory sharding the weights");
  }
  memcpy(dst->inv_freq, src->inv_freq, (size_t)(D / 2 + 1) * sizeof(float));
  int rc;
  const int64_t q0 = (int64_t)hq * rank * D, nq = (int64_t)hq * D;
  const int64_t k0 = (int64_t)hkv * rank * D, nk = (int64_t)hkv * D;
  const int64_t f0 = (int64_t)ff * rank;
  /* the embedding: this rank's vocabulary rows and a zero row; the LM head
   * the same rows (a view of the embedding when tied) */
  if ((rc = slice(dst, &src->tok_embd, sbe, v0, v1 - v0, 0, E, 1, "token_embd", &dst->tok_embd,
                  err, errlen)))
    goto fail;
  if (c->tied_embeddings) {
    dst->output = dst->tok_embd;
    dst->output.rows = v1 - v0;
  } else if ((rc = slice(dst, &src->output, sbe, v0, v1 - v0, 0, E, 0, "output", &dst->output,
                         err, errlen))) {
    goto fail;
  }
  if ((rc = replicate(dst, src->out_norm, sbe, E, &dst->out_norm, err, errlen))) goto fail;
  for (int32_t l = 0; l < c->n_layers; l++) {
    const model_layer_t *S = &src->layers[l];
    model_layer_t *L = &dst->layers[l];
    if ((rc = replicate(dst, S->attn_norm, sbe, E, &L->attn_norm, err, errlen)) ||
        (rc = replicate(dst, S->ffn_norm, sbe, E, &L->ffn_norm, err, errlen)) ||
        (rc = slice(dst, &S->wq, sbe, q0, nq, 0, E, 0, "attn_q", &L->wq, err, errlen)) ||
        (rc = slice(dst, &S->wk, sbe, k0, nk, 0, E, 0, "attn_k", &L->wk, err, errlen)) ||
        (rc = slice(dst, &S->wv, sbe, k0, nk, 0, E, 0, "attn_v", &L->wv, err, errlen)) ||
        (rc = slice(dst, &S->wo, sbe, 0, E, q0, nq, 0, "attn_output", &L->wo, err, errlen)) ||
        (rc = slice(dst, &S->w_gate, sbe, f0, ff, 0, E, 0, "ffn_gate", &L->w_gate, err, errlen)) ||
        (rc = slice(dst, &S->w_up, sbe, f0, ff, 0, E, 0, "ffn_up", &L->w_up, err, errlen)) ||
        (rc = slice(dst, &S->w_down, sbe, 0, E, f0, ff, 0, "ffn_down", &L->w_down, err, errlen)))
      goto fail;
  }
  return 0;
fail:
  model_weights_destroy(dst);
  return rc;
}
