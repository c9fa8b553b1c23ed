/* Model hyper-parameters and weights for the Llama family, loaded from a
 * GGUF file, a safetensors directory (config.json + *.safetensors), or made
 * up deterministically from a seed (--load-format dummy). Weights live in
 * backend memory in the backend's compute type. */
#ifndef PRESSD_MODEL_WEIGHTS_H
#define PRESSD_MODEL_WEIGHTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"
#include "model/gguf.h"

typedef struct model_config {
  char arch[32];
  int32_t n_layers;
  int32_t n_embd;
  int32_t n_ff;
  int32_t n_heads;
  int32_t n_kv_heads;
  int32_t head_dim;
  int32_t n_vocab;
  int32_t n_ctx_train;
  float rms_eps;
  float rope_theta;
  bool tied_embeddings;
  /* Llama-3 RoPE scaling (rope_type "llama3"); factor 0 = off. */
  float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
  int32_t rope_orig_ctx;
} model_config_t;

typedef struct model_layer {
  float *attn_norm; /* backend memory [n_embd] */
  float *ffn_norm;  /* backend memory [n_embd] */
  k_weight_t wq;    /* [n_heads * head_dim][n_embd] */
  k_weight_t wk;    /* [n_kv_heads * head_dim][n_embd] */
  k_weight_t wv;    /* [n_kv_heads * head_dim][n_embd] */
  k_weight_t wo;    /* [n_embd][n_heads * head_dim] */
  k_weight_t w_gate, w_up; /* [n_ff][n_embd] */
  k_weight_t w_down;       /* [n_embd][n_ff] */
} model_layer_t;

/* Under tensor parallelism a rank's weights hold its share (model/shard):
 * cfg counts the rank's query and KV heads, MLP columns and vocabulary rows;
 * the shard says where they sit among all of them. */
typedef struct model_shard {
  int32_t rank, n_ranks;        /* n_ranks 0 or 1: unsharded */
  int32_t q_head0, kv_head0;    /* first query / KV head of this rank */
  int32_t n_heads_all, n_kv_heads_all;
  int32_t ff0, n_ff_all;        /* MLP columns [ff0, ff0 + cfg.n_ff) */
  int32_t vocab0, n_vocab_all;  /* vocabulary rows [vocab0, vocab0 + cfg.n_vocab) */
} model_shard_t;

typedef struct model_weights {
  model_config_t cfg;
  model_shard_t shard;
  k_backend_t *be;       /* borrows */
  k_weight_t tok_embd;   /* [n_vocab][n_embd]; a shard has one more row, all zeros */
  float *out_norm;       /* backend memory [n_embd] */
  k_weight_t output;     /* [n_vocab][n_embd]; aliases tok_embd when tied */
  model_layer_t *layers; /* owns: [n_layers] */
  float *inv_freq;       /* owns (host): [head_dim / 2] RoPE frequencies, scaling applied */
  size_t bytes;          /* backend memory held */
} model_weights_t;

/* Hyper-parameters from GGUF metadata ("llama" architecture family). */
int model_config_from_gguf(model_config_t *c, const model_gguf_t *g, char *err, size_t errlen);
/* Hyper-parameters from a Hugging Face config.json text. */
int model_config_from_json(model_config_t *c, const char *json, char *err, size_t errlen);
/* Sanity of the numbers (positive, divisible, bounded). */
int model_config_check(const model_config_t *c, char *err, size_t errlen);

/* On a host-memory backend, quantised and 16-bit tensors are used in place
 * from the GGUF mapping: g must outlive w. */
int model_weights_from_gguf(model_weights_t *w, const model_gguf_t *g, k_backend_t *be,
                            char *err, size_t errlen);
int model_weights_from_safetensors(model_weights_t *w, const char *dir, k_backend_t *be,
                                   char *err, size_t errlen);
/* Deterministic pseudo-random weights for a config: the same seed gives the
 * same values on every backend (value = f(seed, tensor, index)). */
int model_weights_dummy(model_weights_t *w, const model_config_t *c, uint64_t seed,
                        k_backend_t *be, char *err, size_t errlen);
void model_weights_destroy(model_weights_t *w); /* NULL-safe, half-init safe */

/* Rank `rank` of n_ranks's share of src (Megatron-style), in backend be:
 * query/KV heads and the rows of wq, wk, wv; the same heads' columns of wo;
 * MLP columns of w_gate/w_up rows and w_down columns; vocabulary rows of the
 * embedding (plus a zero row, the lookup of ids outside the slice) and of
 * the LM head; norms replicated. Heads and MLP columns must divide evenly
 * (KV heads by n_ranks), and column slices of quantised matrices must fall
 * on 32-element blocks. Row slices of host memory are used in place when be
 * is a host-memory backend: src must then outlive dst. Types be does not
 * compute on are dequantised to be->dense_type. */
int model_weights_shard(model_weights_t *dst, const model_weights_t *src, int32_t rank,
                        int32_t n_ranks, k_backend_t *be, char *err, size_t errlen);

/* The value a dummy tensor holds at index i (host reference for tests and for
 * backends that generate on the device). */
float model_dummy_value(uint64_t seed, uint32_t tensor, uint64_t i, float scale);

#endif
