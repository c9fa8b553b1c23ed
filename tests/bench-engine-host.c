/* The engine's own cost per step, without the model: the host work a GPU
 * step waits on (scheduling, block tables, sequence views, compression
 * bookkeeping, detokenising and posting events), measured with a backend
 * whose compute ops do nothing and whose sample op returns fixed ids.
 *
 * Workload: BENCH_SEQS requests (default 256) of BENCH_PROMPT random prompt
 * tokens (512) and BENCH_OUT tokens out (128), all at once, as the gpu-8b
 * benchmark sends them; a model of Llama 3 8B's layer and KV-head counts
 * (32 x 8) with tiny widths; the default model's tokenizer (PRESSD_MODEL).
 * BENCH_KV=kvcompress adds KV-Compress at 8x (scores are all zero: the
 * planner's cost, not its choices).
 *
 * Prints one JSON object: steps, decode steps, the engine's busy time per
 * step and the time outside the model's forward per step. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/backend.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "scheduler/engine.h"
#include "tests/test.h"

static k_ops_t null_ops;

static int n_matmul(k_backend_t *be, float *y, const float *x, const k_weight_t *w, int64_t m) {
  return 0;
}
static int n_rmsnorm(k_backend_t *be, float *y, const float *x, const float *g, int64_t m,
                     int64_t n, float eps) {
  return 0;
}
static int n_rope(k_backend_t *be, float *x, const int32_t *pos, int64_t m, int32_t n_heads,
                  int32_t head_dim, const float *inv_freq) {
  return 0;
}
static int n_silu_mul(k_backend_t *be, float *y, const float *gate, const float *up, int64_t n) {
  return 0;
}
static int n_add(k_backend_t *be, float *y, const float *x, int64_t n) { return 0; }
static int n_embed(k_backend_t *be, float *y, const k_weight_t *t, const int32_t *ids,
                   int64_t m) {
  return 0;
}
/* Positions as kv_write writes them, and a pseudo-random score for every
 * new KV (what a pass of attention would have added), so that the
 * compression planner ranks and sorts as it would. K and V stay unwritten. */
static int n_kv_write(k_backend_t *be, const k_kv_arena_t *kv, const float *k, const float *v,
                      const k_attn_args_t *a) {
  for (int32_t s = 0; s < a->n_seqs; s++) {
    const k_seq_kv_t *q = &a->seqs[s];
    const int32_t rows = a->q_start[s + 1] - a->q_start[s];
    for (int32_t h = 0; h < a->n_kv_heads; h++) {
      const int32_t ctx = k_attn_ctx(a, q, h), *table = k_attn_table(a, q, h);
      for (int32_t j = ctx - rows; j < ctx; j++) {
        const int64_t slot = (int64_t)table[j / kv->block_size] * kv->block_size +
                             j % kv->block_size;
        uint64_t x = (uint64_t)slot * 0x9e3779b97f4a7c15ull + (uint64_t)a->layer;
        x ^= x >> 29;
        kv->pos[slot] = a->q_pos[a->q_start[s] + j - (ctx - rows)]; /* host memory */
        kv->score[slot] = (float)(x % 100000) * 1e-5f;
      }
    }
  }
  return 0;
}
static int n_attention(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  return 0;
}
static int n_sample(k_backend_t *be, int32_t *ids, const float *x, int64_t m, int64_t n,
                    const k_draw_t *draws) {
  for (int64_t r = 0; r < m; r++) ids[r] = 1000 + (int32_t)(r % 500);
  return 0;
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int env_int(const char *name, int dflt) {
  const char *v = getenv(name);
  return v && *v ? atoi(v) : dflt;
}

int main(void) {
  const int seqs = env_int("BENCH_SEQS", 256), prompt = env_int("BENCH_PROMPT", 512),
            out = env_int("BENCH_OUT", 128);
  const char *kv = getenv("BENCH_KV");
  const bool compress = kv && !strcmp(kv, "kvcompress");
  const char *path = test_model_path();
  if (!path) {
    fprintf(stderr, "bench-engine-host: set PRESSD_MODEL (for the tokenizer)\n");
    return 1;
  }
  char err[256];
  model_gguf_t g;
  model_tok_t *tok = NULL;
  if (model_gguf_open(&g, path, err, sizeof err) || model_tok_from_gguf(&tok, &g, err, sizeof err))
    FAIL_AT("%s", err);
  k_backend_t *be = NULL;
  CHECK_INT_EQ(k_cpu_backend_new(&be, env_int("BENCH_THREADS", 0)), 0);
  null_ops = *be->ops;
  null_ops.matmul = n_matmul;
  null_ops.matmul_n = NULL;
  null_ops.rmsnorm = n_rmsnorm;
  null_ops.rope = n_rope;
  null_ops.silu_mul = n_silu_mul;
  null_ops.add = n_add;
  null_ops.embed = n_embed;
  null_ops.kv_write = n_kv_write;
  null_ops.attention = n_attention;
  null_ops.sample = n_sample;
  const k_ops_t *own = be->ops;
  be->ops = &null_ops;

  const model_config_t c = {.arch = "llama", .n_layers = 32, .n_embd = 64, .n_ff = 128,
                            .n_heads = 8, .n_kv_heads = 8, .head_dim = 8, .n_vocab = 49152,
                            .n_ctx_train = 8192, .rms_eps = 1e-5f, .rope_theta = 500000.0f};
  model_weights_t w;
  if (model_weights_dummy(&w, &c, 1, be, err, sizeof err)) FAIL_AT("%s", err);
  const int32_t len = prompt + out;
  sched_engine_config_t ec = {
      .max_num_seqs = seqs, .max_num_batched_tokens = 8192, .max_model_len = len + 16,
      .max_waiting = seqs, .kv_cache_memory = (int64_t)seqs * (len + 32) * c.n_layers *
                                                  c.n_kv_heads * c.head_dim * 2 * 4};
  sched_engine_t *e;
  if (sched_engine_new(&e, &ec, &w, be, tok, err, sizeof err)) FAIL_AT("%s", err);
  uint64_t rng = 5;
  for (int i = 0; i < seqs; i++) {
    sched_request_t *r = sched_request_new();
    CHECK(r != NULL);
    r->id = (uint64_t)i + 1;
    r->n_prompt = prompt;
    r->prompt = malloc((size_t)prompt * sizeof *r->prompt);
    for (int j = 0; j < prompt; j++) {
      rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
      r->prompt[j] = 1000 + (int32_t)(rng % 20000);
    }
    r->max_tokens = out;
    r->ignore_eos = true;
    r->sample.temperature = 0.0f;
    if (compress) {
      r->kvc.plan.policy = KV_POLICY_KVCOMPRESS;
      r->kvc.plan.ratio = 8;
    }
    CHECK_INT_EQ(sched_engine_submit(e, r), 0);
  }
  const double t0 = now_s();
  CHECK_INT_EQ(sched_engine_start(e), 0);
  int left = seqs;
  uint64_t events = 0;
  while (left > 0) {
    sched_event_t evs[64];
    size_t n = sched_engine_poll(e, evs, 64);
    for (size_t k = 0; k < n; k++) {
      events++;
      if (evs[k].finish != SCHED_FINISH_NONE) left--;
      sched_event_clear(&evs[k]);
    }
    if (!n) nanosleep(&(struct timespec){.tv_nsec = 100000}, NULL);
    if (now_s() - t0 > 600) FAIL_AT("not done in 600 s");
  }
  const double wall = now_s() - t0;
  sched_stats_t st;
  sched_engine_stats(e, &st);
  const double steps = (double)st.steps;
  printf("{\"bench\": \"engine-host\", \"seqs\": %d, \"prompt\": %d, \"out\": %d, "
         "\"kv\": \"%s\", \"steps\": %llu, \"events\": %llu, \"wall_s\": %.3f, "
         "\"busy_ms_per_step\": %.4f, \"outside_forward_ms_per_step\": %.4f, "
         "\"forward_ms_per_step\": %.4f, \"compress_s\": %.3f}\n",
         seqs, prompt, out, compress ? "kvcompress 8x" : "none", (unsigned long long)st.steps,
         (unsigned long long)events, wall, st.busy_seconds * 1e3 / steps,
         (st.busy_seconds - st.forward_seconds) * 1e3 / steps, st.forward_seconds * 1e3 / steps,
         st.kv_compress_seconds);
  sched_engine_free(e);
  model_weights_destroy(&w);
  be->ops = own;
  k_backend_free(be);
  model_tok_free(tok);
  model_gguf_close(&g);
  return 0;
}
