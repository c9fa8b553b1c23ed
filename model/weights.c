/* Weight loading. Every format goes through one filling loop: for each
 * tensor the model needs, a format-specific source writes fp32 values of the
 * expected shape into a host buffer, which is then uploaded to the backend.
 * Shapes are checked against the config before anything is read. */
#include "model/model-internal.h"
#include "model/weights.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/quant.h"
#include "model/weights-internal.h"


/* ---- config -------------------------------------------------------------- */

int model_config_check(const model_config_t *c, char *err, size_t errlen) {
#define POS(f, max)                                                                  \
  if (c->f <= 0 || c->f > (max))                                                     \
    return model__errf(err, errlen, -EINVAL, "model config: %s = %d is out of range (1..%d)", #f, \
                (int)c->f, (int)(max));
  POS(n_layers, 1024);
  POS(n_embd, 1 << 16);
  POS(n_ff, 1 << 18);
  POS(n_heads, 1024);
  POS(n_kv_heads, 1024);
  POS(head_dim, 1024);
  POS(n_vocab, 1 << 22);
  POS(n_ctx_train, 1 << 24);
#undef POS
  if (c->n_heads % c->n_kv_heads)
    return model__errf(err, errlen, -EINVAL, "model config: %d query heads not divisible by %d KV heads",
                c->n_heads, c->n_kv_heads);
  if (c->head_dim % 2)
    return model__errf(err, errlen, -EINVAL, "model config: head_dim %d must be even", c->head_dim);
  if (!(c->rms_eps > 0) || !(c->rope_theta > 0) || !isfinite(c->rope_theta))
    return model__errf(err, errlen, -EINVAL, "model config: rms_eps and rope_theta must be positive");
  return 0;
}

static int gguf_int(const model_gguf_t *g, const char *arch, const char *key, bool required,
                    int64_t dflt, int32_t *out, char *err, size_t errlen) {
  char full[128];
  snprintf(full, sizeof full, "%s.%s", arch, key);
  int64_t v;
  int rc = model_gguf_get_i64(g, full, &v);
  if (rc == -ENOENT && !required) v = dflt;
  else if (rc == -ENOENT) return model__errf(err, errlen, -EINVAL, "gguf: missing metadata key %s", full);
  else if (rc) return model__errf(err, errlen, -EINVAL, "gguf: metadata key %s is not an integer", full);
  if (v < INT32_MIN || v > INT32_MAX)
    return model__errf(err, errlen, -EINVAL, "gguf: metadata key %s out of range", full);
  *out = (int32_t)v;
  return 0;
}

static int gguf_float(const model_gguf_t *g, const char *arch, const char *key, double dflt,
                      float *out, char *err, size_t errlen) {
  char full[128];
  snprintf(full, sizeof full, "%s.%s", arch, key);
  double v;
  int rc = model_gguf_get_f64(g, full, &v);
  if (rc == -ENOENT) v = dflt;
  else if (rc) return model__errf(err, errlen, -EINVAL, "gguf: metadata key %s is not a number", full);
  *out = (float)v;
  return 0;
}

int model_config_from_gguf(model_config_t *c, const model_gguf_t *g, char *err, size_t errlen) {
  memset(c, 0, sizeof *c);
  model_gguf_str_t arch;
  if (model_gguf_get_str(g, "general.architecture", &arch))
    return model__errf(err, errlen, -EINVAL, "gguf: missing general.architecture");
  if (!model_gguf_str_eq(arch, "llama") && !model_gguf_str_eq(arch, "mistral"))
    return model__errf(err, errlen, -ENOTSUP, "gguf: architecture '%.*s' is not supported (llama only)",
                (int)(arch.len > 32 ? 32 : arch.len), arch.ptr);
  snprintf(c->arch, sizeof c->arch, "%.*s", (int)arch.len, arch.ptr);
  int rc;
  if ((rc = gguf_int(g, c->arch, "block_count", true, 0, &c->n_layers, err, errlen)) ||
      (rc = gguf_int(g, c->arch, "embedding_length", true, 0, &c->n_embd, err, errlen)) ||
      (rc = gguf_int(g, c->arch, "feed_forward_length", true, 0, &c->n_ff, err, errlen)) ||
      (rc = gguf_int(g, c->arch, "attention.head_count", true, 0, &c->n_heads, err, errlen)) ||
      (rc = gguf_int(g, c->arch, "context_length", false, 4096, &c->n_ctx_train, err, errlen)))
    return rc;
  if ((rc = gguf_int(g, c->arch, "attention.head_count_kv", false, c->n_heads, &c->n_kv_heads,
                     err, errlen)))
    return rc;
  if (c->n_heads <= 0 || c->n_embd % c->n_heads)
    return model__errf(err, errlen, -EINVAL, "gguf: embedding_length not divisible by head_count");
  if ((rc = gguf_int(g, c->arch, "attention.key_length", false, c->n_embd / c->n_heads,
                     &c->head_dim, err, errlen)))
    return rc;
  if ((rc = gguf_float(g, c->arch, "attention.layer_norm_rms_epsilon", 1e-5, &c->rms_eps, err,
                       errlen)) ||
      (rc = gguf_float(g, c->arch, "rope.freq_base", 10000.0, &c->rope_theta, err, errlen)))
    return rc;
  const model_gguf_kv_t *toks = model_gguf_find(g, "tokenizer.ggml.tokens");
  int32_t nv = 0;
  if ((rc = gguf_int(g, c->arch, "vocab_size", false, toks ? (int64_t)toks->arr_len : 0, &nv,
                     err, errlen)))
    return rc;
  c->n_vocab = nv;
  const model_gguf_tensor_t *e = model_gguf_tensor(g, "token_embd.weight");
  if (e && e->ne[1] != (uint64_t)c->n_vocab && c->n_vocab == 0) c->n_vocab = (int32_t)e->ne[1];
  c->tied_embeddings = model_gguf_tensor(g, "output.weight") == NULL;
  return model_config_check(c, err, errlen);
}

static int json_int(const cJSON *root, const char *key, bool required, int32_t dflt,
                    int32_t *out, char *err, size_t errlen) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
  if (!v || cJSON_IsNull(v)) {
    if (required) return model__errf(err, errlen, -EINVAL, "config.json: missing '%s'", key);
    *out = dflt;
    return 0;
  }
  if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
      fabs(v->valuedouble) > INT32_MAX)
    return model__errf(err, errlen, -EINVAL, "config.json: '%s' must be an integer", key);
  *out = (int32_t)v->valuedouble;
  return 0;
}

static int json_float(const cJSON *root, const char *key, double dflt, float *out, char *err,
                      size_t errlen) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
  if (!v || cJSON_IsNull(v)) {
    *out = (float)dflt;
    return 0;
  }
  if (!cJSON_IsNumber(v)) return model__errf(err, errlen, -EINVAL, "config.json: '%s' must be a number", key);
  *out = (float)v->valuedouble;
  return 0;
}

int model_config_from_json(model_config_t *c, const char *json, char *err, size_t errlen) {
  memset(c, 0, sizeof *c);
  cJSON *root = cJSON_Parse(json);
  if (!root || !cJSON_IsObject(root)) {
    cJSON_Delete(root);
    return model__errf(err, errlen, -EINVAL, "config.json: not a JSON object");
  }
  int rc = 0;
  const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
  const char *arch = cJSON_IsString(mt) ? mt->valuestring : "llama";
  if (strcmp(arch, "llama") && strcmp(arch, "mistral")) {
    rc = model__errf(err, errlen, -ENOTSUP, "config.json: model_type '%.32s' is not supported (llama only)",
              arch);
    goto out;
  }
  snprintf(c->arch, sizeof c->arch, "%s", arch);
  if ((rc = json_int(root, "num_hidden_layers", true, 0, &c->n_layers, err, errlen)) ||
      (rc = json_int(root, "hidden_size", true, 0, &c->n_embd, err, errlen)) ||
      (rc = json_int(root, "intermediate_size", true, 0, &c->n_ff, err, errlen)) ||
      (rc = json_int(root, "num_attention_heads", true, 0, &c->n_heads, err, errlen)) ||
      (rc = json_int(root, "num_key_value_heads", false, c->n_heads, &c->n_kv_heads, err,
                     errlen)) ||
      (rc = json_int(root, "vocab_size", true, 0, &c->n_vocab, err, errlen)) ||
      (rc = json_int(root, "max_position_embeddings", false, 4096, &c->n_ctx_train, err,
                     errlen)) ||
      (rc = json_float(root, "rms_norm_eps", 1e-5, &c->rms_eps, err, errlen)) ||
      (rc = json_float(root, "rope_theta", 10000.0, &c->rope_theta, err, errlen)))
    goto out;
  if (c->n_heads <= 0) {
    rc = model__errf(err, errlen, -EINVAL, "config.json: num_attention_heads must be positive");
    goto out;
  }
  if ((rc = json_int(root, "head_dim", false, c->n_embd / c->n_heads, &c->head_dim, err, errlen)))
    goto out;
  const cJSON *tie = cJSON_GetObjectItemCaseSensitive(root, "tie_word_embeddings");
  c->tied_embeddings = cJSON_IsTrue(tie);
  const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
  if (cJSON_IsObject(rs)) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
    if (!cJSON_IsString(type)) type = cJSON_GetObjectItemCaseSensitive(rs, "type");
    if (!cJSON_IsString(type) || strcmp(type->valuestring, "llama3")) {
      rc = model__errf(err, errlen, -ENOTSUP, "config.json: only llama3 rope_scaling is supported");
      goto out;
    }
    if ((rc = json_float(rs, "factor", 8.0, &c->rope_factor, err, errlen)) ||
        (rc = json_float(rs, "low_freq_factor", 1.0, &c->rope_low_freq_factor, err, errlen)) ||
        (rc = json_float(rs, "high_freq_factor", 4.0, &c->rope_high_freq_factor, err, errlen)) ||
        (rc = json_int(rs, "original_max_position_embeddings", false, 8192, &c->rope_orig_ctx, err,
                       errlen)))
      goto out;
  }
  rc = model_config_check(c, err, errlen);
out:
  cJSON_Delete(root);
  return rc;
}

/* ---- RoPE frequencies ---------------------------------------------------- */

static void rope_freqs(const model_config_t *c, float *inv_freq) {
  int32_t half = c->head_dim / 2;
  for (int32_t i = 0; i < half; i++) {
    double f = pow((double)c->rope_theta, -2.0 * i / c->head_dim);
    if (c->rope_factor > 0) {
      double lo_wl = c->rope_orig_ctx / c->rope_low_freq_factor;
      double hi_wl = c->rope_orig_ctx / c->rope_high_freq_factor;
      double wl = 2 * M_PI / f;
      if (wl > lo_wl) {
        f /= c->rope_factor;
      } else if (wl >= hi_wl) {
        double smooth = (c->rope_orig_ctx / wl - c->rope_low_freq_factor) /
                        (c->rope_high_freq_factor - c->rope_low_freq_factor);
        f = (1 - smooth) * f / c->rope_factor + smooth * f;
      }
    }
    inv_freq[i] = (float)f;
  }
  /* slot [half]: powf(base, -2/D), the ratio of GGML's theta recurrence
   * (0 when the frequencies are rescaled and the recurrence does not apply) */
  inv_freq[half] = c->rope_factor > 0 ? 0.0f : powf(c->rope_theta, -2.0f / (float)c->head_dim);
}

/* ---- the filling loop ---------------------------------------------------- */

void model__narrow(float *host, size_t n, k_dtype_t t) {
  uint16_t *h = (uint16_t *)host;
  if (t == K_BF16)
    for (size_t i = 0; i < n; i++) h[i] = model_f32_to_bf16(host[i]);
  else if (t == K_F16)
    for (size_t i = 0; i < n; i++) h[i] = model_f32_to_f16(host[i]);
}

/* A tensor of unquantised type t in backend memory: generated there when the
 * source and the backend can, else filled in fp32 on the host, narrowed to
 * t and uploaded. */
static int alloc_fill(model_weights_t *w, const model__wsrc_t *src, const char *name,
                      int64_t rows, int64_t cols, bool optional, k_dtype_t t, void **dst,
                      float *host, char *err, size_t errlen) {
  size_t n = (size_t)rows * (size_t)cols, bytes = n * k_dtype_bytes(t);
  int rc = -ENOTSUP;
  if (src->fill_device && w->be->ops->fill_dummy) {
    if (!(*dst = w->be->ops->alloc(w->be, bytes)))
      return model__errf(err, errlen, -ENOMEM, "out of memory loading %s (%zu bytes)", name, bytes);
    w->bytes += bytes;
    rc = src->fill_device(src->ctx, name, rows, cols, w->be, *dst, t);
    if (rc != -ENOTSUP) return rc ? model__errf(err, errlen, rc, "cannot generate %s", name) : 0;
  }
  rc = src->fill(src->ctx, name, rows, cols, host, err, errlen);
  if (rc == -ENOENT && optional) return rc;
  if (rc) return rc;
  if (!*dst) {
    if (!(*dst = w->be->ops->alloc(w->be, bytes)))
      return model__errf(err, errlen, -ENOMEM, "out of memory loading %s (%zu bytes)", name, bytes);
    w->bytes += bytes;
  }
  model__narrow(host, n, t);
  return w->be->ops->upload(w->be, *dst, host, bytes);
}

/* A weight matrix: in its stored type when the source can hand out a view
 * and the backend computes on that type, else dequantised to the backend's
 * dense type. */
static int load_matrix(model_weights_t *w, const model__wsrc_t *src, const char *name,
                       k_weight_t *kw, int64_t rows, int64_t cols, bool optional, float *host,
                       char *err, size_t errlen) {
  kw->rows = rows;
  kw->cols = cols;
  if (src->view) {
    k_dtype_t type;
    const void *data;
    int rc = src->view(src->ctx, name, rows, cols, &type, &data, err, errlen);
    if (rc == -ENOENT && optional) return rc;
    if (rc && rc != -ENOTSUP) return rc;
    if (!rc && (w->be->weight_types & (1u << type)) && type != K_F32) {
      size_t bytes = (size_t)rows * k_row_bytes(type, cols);
      kw->type = type;
      if (src->view_persists && w->be->host_memory) { /* use the mapping in place */
        kw->data = (void *)data;
        kw->borrowed = true;
        return 0;
      }
      kw->data = w->be->ops->alloc(w->be, bytes);
      if (!kw->data)
        return model__errf(err, errlen, -ENOMEM, "out of memory loading %s (%zu bytes)", name, bytes);
      w->bytes += bytes;
      return w->be->ops->upload(w->be, kw->data, data, bytes);
    }
  }
  kw->type = w->be->dense_type;
  return alloc_fill(w, src, name, rows, cols, optional, kw->type, &kw->data, host, err, errlen);
}

/* The backend's faster copy of a matrix the matmuls read, where it has one. */
static int pack_matrix(model_weights_t *w, const char *name, k_weight_t *kw, bool data_read,
                       char *err, size_t errlen) {
  int rc = w->be->ops->weight_pack ? w->be->ops->weight_pack(w->be, kw, data_read) : 0;
  return rc ? model__errf(err, errlen, rc, "cannot pack %s for the backend", name) : 0;
}

int model__weights_load(model_weights_t *w, const model_config_t *c, const model__wsrc_t *src,
                        k_backend_t *be, char *err, size_t errlen) {
  memset(w, 0, sizeof *w);
  int rc = model_config_check(c, err, errlen);
  if (rc) return rc;
  w->cfg = *c;
  w->be = be;
  int64_t E = c->n_embd, F = c->n_ff, D = c->head_dim;
  int64_t QD = (int64_t)c->n_heads * D, KD = (int64_t)c->n_kv_heads * D;
  int64_t biggest = (int64_t)c->n_vocab * E;
  if (F * E > biggest) biggest = F * E;
  if (QD * E > biggest) biggest = QD * E;
  float *host = malloc((size_t)biggest * sizeof(float));
  w->layers = calloc((size_t)c->n_layers, sizeof *w->layers);
  w->inv_freq = malloc((size_t)(D / 2 + 1) * sizeof(float));
  if (!host || !w->layers || !w->inv_freq) {
    free(host);
    model_weights_destroy(w);
    return model__errf(err, errlen, -ENOMEM, "out of memory allocating weights");
  }
  rope_freqs(c, w->inv_freq);
  if (src->rope_factors) {
    rc = src->rope_factors(src->ctx, w->inv_freq, (int32_t)(D / 2), err, errlen);
    if (rc) goto fail;
  }

  if ((rc = load_matrix(w, src, "token_embd", &w->tok_embd, c->n_vocab, E, false, host, err,
                        errlen)))
    goto fail;
  if ((rc = alloc_fill(w, src, "output_norm", 1, E, false, K_F32, (void **)&w->out_norm, host,
                       err, errlen)))
    goto fail;
  rc = c->tied_embeddings ? -ENOENT
                          : load_matrix(w, src, "output", &w->output, c->n_vocab, E, true, host,
                                        err, errlen);
  if (rc == -ENOENT) { /* tied: the LM head's matmuls read it packed, embed row by row */
    if ((rc = pack_matrix(w, "token_embd", &w->tok_embd, true, err, errlen))) goto fail;
    w->output = w->tok_embd;
    w->cfg.tied_embeddings = true;
  } else if (rc || (rc = pack_matrix(w, "output", &w->output, false, err, errlen))) {
    goto fail;
  }
  for (int32_t l = 0; l < c->n_layers; l++) {
    model_layer_t *L = &w->layers[l];
    char nm[64];
#define MAT(field, tname, r, cc)                                                         \
  snprintf(nm, sizeof nm, "blk.%d." tname, l);                                           \
  if ((rc = load_matrix(w, src, nm, &L->field, r, cc, false, host, err, errlen)) ||          \
      (rc = pack_matrix(w, nm, &L->field, false, err, errlen)))                                  \
    goto fail;
#define VEC(field, tname)                                                                \
  snprintf(nm, sizeof nm, "blk.%d." tname, l);                                           \
  if ((rc = alloc_fill(w, src, nm, 1, E, false, K_F32, (void **)&L->field, host, err, errlen))) goto fail;
    VEC(attn_norm, "attn_norm");
    MAT(wq, "attn_q", QD, E);
    MAT(wk, "attn_k", KD, E);
    MAT(wv, "attn_v", KD, E);
    MAT(wo, "attn_output", E, QD);
    VEC(ffn_norm, "ffn_norm");
    MAT(w_gate, "ffn_gate", F, E);
    MAT(w_up, "ffn_up", F, E);
    MAT(w_down, "ffn_down", E, F);
#undef MAT
#undef VEC
  }
  free(host);
  return 0;
fail:
  free(host);
  model_weights_destroy(w);
  return rc;
}

static void free_mem(k_backend_t *be, void *p) {
  if (be && p) be->ops->free(be, p);
}

static void free_weight(k_backend_t *be, k_weight_t *kw) {
  if (!kw->borrowed) free_mem(be, kw->data);
  free_mem(be, kw->packed);
}

void model_weights_destroy(model_weights_t *w) {
  if (!w) return;
  k_backend_t *be = w->be;
  if (w->output.data != w->tok_embd.data) free_weight(be, &w->output);
  free_weight(be, &w->tok_embd);
  free_mem(be, w->out_norm);
  if (w->layers) {
    for (int32_t l = 0; l < w->cfg.n_layers; l++) {
      model_layer_t *L = &w->layers[l];
      free_mem(be, L->attn_norm);
      free_mem(be, L->ffn_norm);
      free_weight(be, &L->wq);
      free_weight(be, &L->wk);
      free_weight(be, &L->wv);
      free_weight(be, &L->wo);
      free_weight(be, &L->w_gate);
      free_weight(be, &L->w_up);
      free_weight(be, &L->w_down);
    }
  }
  free(w->layers);
  free(w->inv_freq);
  memset(w, 0, sizeof *w);
}

/* ---- GGUF source --------------------------------------------------------- */

/* The tensor `name`.weight, its shape checked against [rows][cols]. */
static int gguf_lookup(const model_gguf_t *g, const char *name, int64_t rows, int64_t cols,
                       const model_gguf_tensor_t **out, char *err, size_t errlen) {
  char full[96];
  snprintf(full, sizeof full, "%s.weight", name);
  const model_gguf_tensor_t *t = model_gguf_tensor(g, full);
  if (!t) return model__errf(err, errlen, -ENOENT, "gguf: missing tensor %s", full);
  uint64_t n = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
  if (t->ne[0] != (uint64_t)cols || n != (uint64_t)(rows * cols))
    return model__errf(err, errlen, -EINVAL,
                "gguf: tensor %s has shape [%llu, %llu], expected [%lld, %lld] (shape mismatch)",
                full, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], (long long)cols,
                (long long)rows);
  char tb[16];
  if (!model_ggml_block_elems(t->type))
    return model__errf(err, errlen, -ENOTSUP,
                "gguf: tensor %s has type %s, which pressd cannot load "
                "(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                full, model_ggml_type_name(t->type, tb));
  *out = t;
  return 0;
}

static int gguf_fill(void *ctx, const char *name, int64_t rows, int64_t cols, float *dst,
                     char *err, size_t errlen) {
  const model_gguf_tensor_t *t = NULL;
  int rc = gguf_lookup(ctx, name, rows, cols, &t, err, errlen);
  if (rc) return rc;
  char tb[16];
  if (model_dequant(t->type, t->data, dst, (size_t)(rows * cols)))
    return model__errf(err, errlen, -EINVAL, "gguf: tensor %s: cannot dequantise %s data", name,
                model_ggml_type_name(t->type, tb));
  return 0;
}

static int gguf_view(void *ctx, const char *name, int64_t rows, int64_t cols, k_dtype_t *type,
                     const void **data, char *err, size_t errlen) {
  const model_gguf_tensor_t *t = NULL;
  int rc = gguf_lookup(ctx, name, rows, cols, &t, err, errlen);
  if (rc) return rc;
  switch (t->type) {
  case MODEL_GGML_F32: *type = K_F32; break;
  case MODEL_GGML_F16: *type = K_F16; break;
  case MODEL_GGML_BF16: *type = K_BF16; break;
  case MODEL_GGML_Q8_0: *type = K_Q8_0; break;
  case MODEL_GGML_Q4_0: *type = K_Q4_0; break;
  case MODEL_GGML_Q4_1: *type = K_Q4_1; break;
  default: return -ENOTSUP;
  }
  *data = t->data;
  return 0;
}

static int gguf_rope_factors(void *ctx, float *inv_freq, int32_t n, char *err, size_t errlen) {
  const model_gguf_t *g = ctx;
  const model_gguf_tensor_t *t = model_gguf_tensor(g, "rope_freqs.weight");
  if (!t) return 0;
  if (t->type != MODEL_GGML_F32 || t->ne[0] != (uint64_t)n)
    return model__errf(err, errlen, -EINVAL, "gguf: rope_freqs.weight must be F32 [%d]", n);
  const float *f = t->data;
  for (int32_t i = 0; i < n; i++) inv_freq[i] /= f[i];
  inv_freq[n] = 0.0f;
  return 0;
}

int model_weights_from_gguf(model_weights_t *w, const model_gguf_t *g, k_backend_t *be,
                            char *err, size_t errlen) {
  model_config_t c;
  int rc = model_config_from_gguf(&c, g, err, errlen);
  if (rc) {
    memset(w, 0, sizeof *w);
    return rc;
  }
  model__wsrc_t src = {.ctx = (void *)g,
                       .fill = gguf_fill,
                       .view = gguf_view,
                       .view_persists = true,
                       .rope_factors = gguf_rope_factors};
  return model__weights_load(w, &c, &src, be, err, errlen);
}

/* ---- dummy source -------------------------------------------------------- */

static uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

float model_dummy_value(uint64_t seed, uint32_t tensor, uint64_t i, float scale) {
  uint64_t h = splitmix64(splitmix64(seed ^ ((uint64_t)tensor << 40)) + i);
  /* uniform in [-scale, scale) */
  return ((float)(h >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * scale;
}

typedef struct dummy_ctx {
  uint64_t seed;
  int32_t n_embd;
} dummy_ctx_t;

/* A dummy tensor: offset + uniform [-scale, scale) from its name. Norms are
 * 1 ± 0.1; matrices have std 1/sqrt(cols), so activations keep their scale
 * layer to layer. The id comes from the name: stable across backends. */
static uint32_t dummy_tensor(const char *name, int64_t cols, float *scale, float *offset) {
  uint32_t id = 2166136261u;
  for (const char *p = name; *p; p++) id = (id ^ (uint8_t)*p) * 16777619u;
  bool norm = strstr(name, "norm") != NULL;
  *scale = norm ? 0.1f : sqrtf(3.0f / (float)cols);
  *offset = norm ? 1.0f : 0.0f;
  return id;
}

static int dummy_fill(void *ctx, const char *name, int64_t rows, int64_t cols, float *dst,
                      char *err, size_t errlen) {
  (void)err, (void)errlen;
  const dummy_ctx_t *d = ctx;
  float scale, offset;
  uint32_t id = dummy_tensor(name, cols, &scale, &offset);
  size_t n = (size_t)rows * (size_t)cols;
  for (size_t i = 0; i < n; i++) dst[i] = offset + model_dummy_value(d->seed, id, i, scale);
  return 0;
}

static int dummy_fill_device(void *ctx, const char *name, int64_t rows, int64_t cols,
                             k_backend_t *be, void *dst, k_dtype_t t) {
  const dummy_ctx_t *d = ctx;
  float scale, offset;
  uint32_t id = dummy_tensor(name, cols, &scale, &offset);
  return be->ops->fill_dummy(be, dst, t, 0, rows * cols, d->seed, id, scale, offset);
}

int model_weights_dummy(model_weights_t *w, const model_config_t *c, uint64_t seed,
                        k_backend_t *be, char *err, size_t errlen) {
  dummy_ctx_t d = {seed, c->n_embd};
  model__wsrc_t src = {.ctx = &d, .fill = dummy_fill, .fill_device = dummy_fill_device};
  return model__weights_load(w, c, &src, be, err, errlen);
}
