/* The engine on CUDA: continuous batching, sampling on the device and KV
 * compression (scores read back into the planner's host mirror, moves on
 * the device) with dummy weights of the SmolLM2-135M shape, against the
 * same engine on the CPU backend.
 *
 * Requests of ~700 prompt tokens, each with a compression policy (global
 * KV-Compress, ZigZagKV layer budgets, DBudgetKV, StreamingLLM, none) and
 * compressed again every 8 decode steps, greedy and seeded temperature
 * sampling (one with penalties, applied on the device), one greedy request
 * asking for log-probabilities (worked out on the device), all at once. On
 * each backend: every request ends with its 32 tokens, the compressed ones
 * evicted KVs and kept no more than their budget, StreamingLLM (no scores)
 * kept exactly what the CPU kept, the log-probabilities are consistent, and
 * every KV block is back in the pool afterwards. How far the tokens agree with the
 * CPU's (bf16 against fp32, and plans that rank near-equal scores
 * differently) is printed, not required.
 *
 * The engine runs again on CUDA with its decode steps as CUDA graphs: every
 * request still ends as it should; how far its tokens match the eager
 * run's is printed.
 *
 * The tokenizer (ids to text, end of generation) comes from
 * PRESSD_TOKENIZER (scripts/gpu-check: .gpu-deps/tokenizer.gguf) or
 * PRESSD_MODEL; without either the test skips. */
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
#include "tests/cuda/gpu-test.h"
#include "tests/test.h"

enum { N_REQ = 6, N_OUT = 32, MAX_PROMPT = 800 };

typedef struct out {
  int32_t tokens[N_OUT + 1];
  int32_t n, kept, evicted;
  int32_t logprobs; /* asked (-1: none) */
  sched_finish_t finish;
  bool done;
} out_t;

static model_tok_t *g_tok;
static int32_t g_prompt[N_REQ][MAX_PROMPT];
static int32_t g_n[N_REQ];

static const model_config_t smollm2 = {
    .arch = "llama", .n_layers = 30, .n_embd = 576, .n_ff = 1536, .n_heads = 9,
    .n_kv_heads = 3, .head_dim = 64, .n_vocab = 49152, .n_ctx_train = 8192, .rms_eps = 1e-5f,
    .rope_theta = 100000.0f, .tied_embeddings = true};

/* Request i's compression: 0, 1 global KV-Compress 4x; 2 ZigZagKV 4x;
 * 3 DBudgetKV; 4 StreamingLLM 4x; 5 none. Requests 1 and 5 sample at
 * temperature 0.8 (seeded), 5 with repetition and frequency penalties; the
 * others are greedy, 0 with the top 5 log-probabilities. */
static sched_request_t *request(int i, out_t *o) {
  sched_request_t *r = sched_request_new();
  CHECK(r != NULL);
  r->id = (uint64_t)i + 1;
  r->user = o;
  r->n_prompt = g_n[i];
  r->prompt = malloc((size_t)g_n[i] * sizeof *r->prompt);
  memcpy(r->prompt, g_prompt[i], (size_t)g_n[i] * sizeof *r->prompt);
  r->max_tokens = N_OUT;
  r->ignore_eos = true;
  r->logprobs = o->logprobs = i == 0 ? 5 : -1;
  r->sample.temperature = i == 1 || i == 5 ? 0.8f : 0.0f;
  if (i == 5) {
    r->sample.repetition_penalty = 1.2f;
    r->sample.frequency_penalty = 0.3f;
  }
  r->sample.seed = 77 + (uint64_t)i;
  r->sample.has_seed = true;
  static const kv_policy_t pol[N_REQ] = {KV_POLICY_KVCOMPRESS, KV_POLICY_KVCOMPRESS,
                                         KV_POLICY_KVCOMPRESS, KV_POLICY_DBUDGET,
                                         KV_POLICY_STREAMING,  KV_POLICY_NONE};
  r->kvc.plan.policy = pol[i];
  if (pol[i] != KV_POLICY_DBUDGET && pol[i] != KV_POLICY_NONE) r->kvc.plan.ratio = 4;
  if (i == 2) r->kvc.plan.layer_budget = KV_LAYER_ZIGZAG;
  r->kvc.interval = 8;
  return r;
}

static void run(k_backend_t *be, out_t *o, bool graphs) {
  char err[256];
  model_weights_t w;
  if (model_weights_dummy(&w, &smollm2, 4321, be, err, sizeof err))
    FAIL_AT("dummy weights on %s: %s", be->ops->name, err);
  sched_engine_config_t c = {.max_num_seqs = 8, .max_num_batched_tokens = 1024,
                             .max_model_len = 1024, .max_waiting = 16,
                             .kv_cache_memory = 512ll << 20, .debug_checks = true,
                             .graphs = graphs};
  sched_engine_t *e;
  if (sched_engine_new(&e, &c, &w, be, g_tok, err, sizeof err))
    FAIL_AT("%s: %s", be->ops->name, err);
  CHECK_INT_EQ(sched_engine_start(e), 0);
  memset(o, 0, N_REQ * sizeof *o); /* request() sets logprobs */
  for (int i = 0; i < N_REQ; i++) CHECK_INT_EQ(sched_engine_submit(e, request(i, &o[i])), 0);
  time_t deadline = time(NULL) + 600;
  for (int left = N_REQ; left > 0;) {
    sched_event_t evs[16];
    size_t n = sched_engine_poll(e, evs, 16);
    for (size_t k = 0; k < n; k++) {
      out_t *x = evs[k].user;
      if (evs[k].n_tokens == 1 && x->n <= N_OUT) x->tokens[x->n++] = evs[k].token;
      if (evs[k].n_tokens == 1 && x->logprobs >= 0) { /* greedy: the token is the top one */
        CHECK_INT_EQ(evs[k].n_top, x->logprobs);
        CHECK_INT_EQ(evs[k].top[0].token, evs[k].token);
        CHECK_NEAR(evs[k].top[0].logprob, evs[k].logprob, 1e-6);
        CHECK(evs[k].logprob <= 0.0f && evs[k].logprob > -30.0f);
        for (int32_t j = 1; j < evs[k].n_top; j++)
          CHECK(evs[k].top[j].logprob <= evs[k].top[j - 1].logprob);
      }
      if (evs[k].finish != SCHED_FINISH_NONE) {
        x->done = true;
        x->finish = evs[k].finish;
        x->kept = evs[k].kv_tokens_kept;
        x->evicted = evs[k].kv_tokens_evicted;
        left--;
      }
      sched_event_clear(&evs[k]);
    }
    if (!n) nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
    if (time(NULL) > deadline) FAIL_AT("%s: the engine did not finish in 600 s", be->ops->name);
  }
  sched_stats_t st;
  sched_engine_stats(e, &st);
  CHECK_INT_EQ(st.running, 0);
  CHECK_INT_EQ(st.kv_blocks_used, 0);
  fprintf(stderr, "   %s: %llu steps (%llu as graphs), %llu compressions, %llu KV blocks freed\n",
          be->ops->name, (unsigned long long)st.steps, (unsigned long long)st.graph_steps,
          (unsigned long long)st.kv_compressions, (unsigned long long)st.kv_blocks_freed);
  if (graphs) CHECK(st.graph_steps >= N_OUT - 1);
  CHECK(st.kv_compressions >= 2 * (N_REQ - 1));
  sched_engine_free(e);
  model_weights_destroy(&w);
  for (int i = 0; i < N_REQ; i++) {
    CHECK(o[i].done);
    CHECK_INT_EQ(o[i].finish, SCHED_FINISH_LENGTH);
    CHECK_INT_EQ(o[i].n, N_OUT);
    const int32_t held = g_n[i] + N_OUT - 1; /* the last token's KV is never written */
    if (i == 5) {
      CHECK_INT_EQ(o[i].evicted, 0);
      continue;
    }
    if (o[i].evicted <= 0) FAIL_AT("%s: request %d evicted nothing", be->ops->name, i);
    CHECK_INT_EQ(o[i].kept + o[i].evicted, held);
    if (i != 3 && o[i].kept > held / 4 + 2 * 16 + 128)
      FAIL_AT("%s: request %d kept %d of %d at 4x", be->ops->name, i, o[i].kept, held);
  }
}

int main(void) {
  k_backend_t *gpu = NULL, *cpu = NULL;
  int rc = gpu_test_open("test-cuda-engine", &gpu);
  if (rc) return rc;
  const char *path = getenv("PRESSD_TOKENIZER");
  if (!path || !*path) path = test_model_path();
  if (!path) {
    fprintf(stderr, "skip: no tokenizer (PRESSD_TOKENIZER or PRESSD_MODEL)\n");
    k_backend_free(gpu);
    return TEST_SKIP;
  }
  char err[256];
  model_gguf_t g;
  if (model_gguf_open(&g, path, err, sizeof err)) FAIL_AT("%s", err);
  if (model_tok_from_gguf(&g_tok, &g, err, sizeof err)) FAIL_AT("%s", err);
  uint64_t rng = 99;
  for (int i = 0; i < N_REQ; i++) {
    g_n[i] = 640 + 20 * i;
    for (int32_t j = 0; j < g_n[i]; j++) g_prompt[i][j] = 100 + rng_int(&rng, 30000);
  }
  CHECK_INT_EQ(k_cpu_backend_new(&cpu, 0), 0);
  static out_t on_gpu[N_REQ], on_cpu[N_REQ], on_graphs[N_REQ];
  run(gpu, on_gpu, false);
  run(cpu, on_cpu, false);
  /* decode steps as CUDA graphs: 6 sequences run as 8 rows (cuBLASLt may
   * then pick other kernels than for 6, so near-ties may go the other way) */
  run(gpu, on_graphs, true);
  for (int i = 0; i < N_REQ; i++) {
    int32_t same = 0;
    while (same < N_OUT && on_graphs[i].tokens[same] == on_gpu[i].tokens[same]) same++;
    fprintf(stderr, "   request %d with graphs: the first %d of %d tokens those of eager steps\n",
            i, same, N_OUT);
  }
  for (int i = 0; i < N_REQ; i++) {
    int32_t same = 0;
    while (same < N_OUT && on_gpu[i].tokens[same] == on_cpu[i].tokens[same]) same++;
    fprintf(stderr, "   request %d: kept %d / %d (CUDA / CPU), evicted %d / %d, "
                    "the first %d of %d tokens the same\n",
            i, on_gpu[i].kept, on_cpu[i].kept, on_gpu[i].evicted, on_cpu[i].evicted, same, N_OUT);
  }
  /* StreamingLLM keeps positions, not scores: the same on both */
  CHECK_INT_EQ(on_gpu[4].kept, on_cpu[4].kept);
  CHECK_INT_EQ(on_gpu[4].evicted, on_cpu[4].evicted);
  k_backend_free(cpu);
  k_backend_free(gpu);
  model_tok_free(g_tok);
  model_gguf_close(&g);
  fprintf(stderr, "cuda-engine: all passed\n");
  return 0;
}
