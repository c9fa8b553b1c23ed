/* The continuous-batching engine on the default model (CPU backend, 2
 * threads), driven through its public surface: submit, a notify callback
 * that signals a condvar, poll, abort, stats.
 *
 *   - concurrent requests give token-identical outputs to each run alone
 *     (the CPU kernels are batch-invariant, so exact equality);
 *   - forced preemption (a KV pool for ~1.5 sequences) changes nothing;
 *   - stop strings never leak into the text; EOS; logprobs;
 *   - aborts return every block; bad requests and a full queue are refused;
 *   - chunked prefill (32-token budget) equals a 512-token budget;
 *   - a KV pool smaller than the prompt: compressed between prefill chunks
 *     (the tokens pressd eval-kv gets), refused uncompressed.
 *
 * `test-engine --bench` instead times the batch picker alone (no model) at
 * 1, 64, 256 and 1024 running sequences; it is not part of the suite. */
#include <errno.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include "kernels/comm.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "paged/pool.h"
#include "scheduler/engine-internal.h"
#include "scheduler/engine.h"
#include "scheduler/kveval.h"
#include "tests/test.h"
#include "tests/graph-check.h"

static model_gguf_t g;
static model_weights_t w;
static k_backend_t *be;
static model_tok_t *tok;
static char err[256];

/* ---- driving the engine ---------------------------------------------------- */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int notified;

static void on_notify(void *ctx) {
  (void)ctx;
  pthread_mutex_lock(&mu);
  notified = 1;
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
}

#define MAX_OUT 256

typedef struct out {
  int32_t tokens[MAX_OUT];
  float logprob[MAX_OUT];
  double top_sum[MAX_OUT]; /* the top alternatives' ids and log-probabilities, summed */
  int32_t n;
  char text[8192];
  size_t n_text;
  int events;
  bool done;
  sched_finish_t finish;
  int32_t prompt_tokens, completion_tokens;
  int32_t kv_kept, kv_evicted;
  int32_t logprobs; /* what the request asked, for the checks in collect() */
} out_t;

static void collect(sched_event_t *ev) {
  out_t *o = ev->user;
  CHECK(o != NULL && !o->done);
  CHECK(ev->text != NULL && strlen(ev->text) == ev->text_len);
  CHECK(o->n_text + ev->text_len < sizeof o->text);
  memcpy(o->text + o->n_text, ev->text, ev->text_len);
  o->n_text += ev->text_len;
  o->text[o->n_text] = 0;
  o->events++;
  if (ev->n_tokens == 1) {
    CHECK(o->n < MAX_OUT);
    o->logprob[o->n] = ev->logprob;
    o->top_sum[o->n] = 0.0;
    for (int32_t j = 0; j < ev->n_top; j++)
      o->top_sum[o->n] += (double)ev->top[j].logprob * 1e3 + ev->top[j].token;
    o->tokens[o->n++] = ev->token;
    if (o->logprobs >= 0) { /* the chosen greedy token is the top one */
      CHECK_INT_EQ(ev->n_top, o->logprobs);
      if (o->logprobs > 0) {
        CHECK_INT_EQ(ev->top[0].token, ev->token);
        CHECK_NEAR(ev->top[0].logprob, ev->logprob, 1e-6);
      }
      double mass = 0.0;
      for (int32_t j = 0; j < ev->n_top; j++) {
        CHECK(ev->top[j].logprob <= 0.0f);
        if (j) CHECK(ev->top[j].logprob <= ev->top[j - 1].logprob);
        mass += exp(ev->top[j].logprob);
      }
      CHECK(mass <= 1.0 + 1e-5);
      CHECK(ev->logprob <= 0.0f);
    }
  }
  if (ev->finish != SCHED_FINISH_NONE) {
    o->done = true;
    o->finish = ev->finish;
    o->prompt_tokens = ev->prompt_tokens;
    o->completion_tokens = ev->completion_tokens;
    o->kv_kept = ev->kv_tokens_kept;
    o->kv_evicted = ev->kv_tokens_evicted;
    CHECK_INT_EQ(o->completion_tokens, o->n);
  }
  sched_event_clear(ev);
}

/* Poll and collect until pred(ctx); fails after 300 s without an event. */
static void run_until(sched_engine_t *e, bool (*pred)(void *), void *ctx) {
  time_t deadline = time(NULL) + 300;
  sched_event_t evs[16];
  while (!pred(ctx)) {
    size_t n = sched_engine_poll(e, evs, 16);
    for (size_t i = 0; i < n; i++) collect(&evs[i]);
    if (n) {
      deadline = time(NULL) + 300;
      continue;
    }
    pthread_mutex_lock(&mu);
    if (!notified) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_sec += 1;
      pthread_cond_timedwait(&cv, &mu, &ts);
    }
    notified = 0;
    pthread_mutex_unlock(&mu);
    if (time(NULL) > deadline) FAIL_AT("the engine made no progress for 300 s");
  }
}

typedef struct outs_ref {
  out_t *o;
  int n;
} outs_ref_t;

static bool all_done(void *ctx) {
  outs_ref_t *r = ctx;
  for (int i = 0; i < r->n; i++)
    if (!r->o[i].done) return false;
  return true;
}

static bool has_events(void *ctx) { return ((out_t *)ctx)->events >= 3; }

static sched_engine_config_t config(void) {
  return (sched_engine_config_t){
      .max_num_seqs = 16,
      .max_num_batched_tokens = 512,
      .max_model_len = 256,
      .max_waiting = 64,
      .kv_cache_memory = 64ll << 20,
      .notify = on_notify,
      .debug_checks = true, /* every step's KV accounting, in every test */
  };
}

static sched_engine_t *engine(const sched_engine_config_t *c, bool start) {
  sched_engine_t *e;
  if (sched_engine_new(&e, c, &w, be, tok, err, sizeof err)) FAIL_AT("%s", err);
  if (start) CHECK_INT_EQ(sched_engine_start(e), 0);
  return e;
}

typedef struct spec {
  const int32_t *ids;
  int32_t n;
  int32_t max_tokens;
  bool ignore_eos;
  float temperature;
  const char *stop[2];
  int32_t logprobs;
  bool no_top_p; /* with a temperature: top_p 1 (drawn on the backend), else 0.9 */
  bool penalties; /* repetition 1.3, presence 0.2, frequency 0.4 */
} spec_t;

static sched_request_t *request(uint64_t id, out_t *o, const spec_t *sp) {
  sched_request_t *r = sched_request_new();
  CHECK(r != NULL);
  memset(o, 0, sizeof *o);
  o->logprobs = sp->logprobs;
  r->id = id;
  r->user = o;
  r->n_prompt = sp->n;
  r->prompt = malloc((size_t)sp->n * sizeof *r->prompt);
  memcpy(r->prompt, sp->ids, (size_t)sp->n * sizeof *r->prompt);
  r->max_tokens = sp->max_tokens;
  r->ignore_eos = sp->ignore_eos;
  r->logprobs = sp->logprobs;
  r->sample.temperature = sp->temperature;
  r->sample.seed = 1234; /* the same draws for every run of a prompt */
  r->sample.has_seed = true;
  if (sp->temperature > 0 && !sp->no_top_p) r->sample.top_p = 0.9f;
  if (sp->penalties) {
    r->sample.repetition_penalty = 1.3f;
    r->sample.presence_penalty = 0.2f;
    r->sample.frequency_penalty = 0.4f;
  }
  for (int i = 0; i < 2 && sp->stop[i]; i++) r->n_stop++;
  if (r->n_stop) {
    r->stop = calloc((size_t)r->n_stop, sizeof *r->stop);
    for (int32_t i = 0; i < r->n_stop; i++) r->stop[i] = strdup(sp->stop[i]);
  }
  return r;
}

static void submit(sched_engine_t *e, uint64_t id, out_t *o, const spec_t *sp) {
  sched_request_t *r = request(id, o, sp);
  int rc = sched_engine_submit(e, r);
  if (rc) FAIL_AT("submit: %d", rc);
}

static void check_idle(sched_engine_t *e) {
  sched_stats_t st;
  sched_engine_stats(e, &st);
  CHECK_INT_EQ(st.running, 0);
  CHECK_INT_EQ(st.waiting, 0);
  CHECK_INT_EQ(st.kv_blocks_used, 0);
}

static void check_same(const out_t *a, const out_t *b) {
  CHECK_INT_EQ(a->n, b->n);
  for (int32_t i = 0; i < a->n; i++)
    if (a->tokens[i] != b->tokens[i])
      FAIL_AT("token %d differs: %d vs %d (\"%s\" vs \"%s\")", i, a->tokens[i], b->tokens[i],
              a->text, b->text);
  CHECK_STR_EQ(a->text, b->text);
  CHECK_INT_EQ(a->finish, b->finish);
  for (int32_t i = 0; a->logprobs >= 0 && b->logprobs >= 0 && i < a->n; i++)
    if (memcmp(&a->logprob[i], &b->logprob[i], sizeof a->logprob[i]) ||
        a->top_sum[i] != b->top_sum[i])
      FAIL_AT("token %d: log-probabilities %.9g vs %.9g", i, a->logprob[i], b->logprob[i]);
}

/* ---- prompts ---------------------------------------------------------------- */

#define N_PROMPTS 8
static const char *texts[N_PROMPTS] = {
    "Hello",
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three colours:",
    ("The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. "
     "Then the dog woke up and said"),
    "Q: What is 12 times 12?\nA:",
    "In 1492, Columbus sailed the ocean blue. Historians today describe his voyages as",
};
static int32_t ids[N_PROMPTS][128];
static int32_t n_ids[N_PROMPTS];
static int32_t long_ids[256];
static int32_t n_long;
/* Reference outputs: greedy, except prompt 7 (temperature and top-p) and
 * prompt 5 (temperature alone), drawn by the backend's sample op, or by the
 * host sampler where the backend has none, the same tokens either way.
 * Prompts 5 and 6 have penalties (applied by the backend's penalize op, or
 * by the host sampler). Prompt 3 asks for logprobs (sampled on the host). */
static out_t alone[N_PROMPTS];

static spec_t spec_of(int i) {
  return (spec_t){.ids = ids[i], .n = n_ids[i], .max_tokens = 24, .ignore_eos = true,
                  .temperature = i == 7 ? 0.8f : i == 5 ? 1.0f : 0.0f,
                  .logprobs = i == 3 ? 5 : -1, .no_top_p = i == 5,
                  .penalties = i == 5 || i == 6};
}

static void encode(const char *text, int32_t *out, int32_t cap, int32_t *n) {
  size_t got;
  CHECK_INT_EQ(model_tok_encode(tok, text, strlen(text), false, out, (size_t)cap, &got), 0);
  *n = (int32_t)got;
}

static void make_prompts(void) {
  for (int i = 0; i < N_PROMPTS; i++) encode(texts[i], ids[i], 128, &n_ids[i]);
  char buf[4096] = "";
  for (int i = 0; i < 12; i++) {
    strcat(buf, texts[(i * 5) % N_PROMPTS]);
    strcat(buf, " ");
  }
  encode(buf, long_ids, 256, &n_long);
  if (n_long < 100 || n_long > 220) FAIL_AT("long prompt of %d tokens", n_long);
}

/* ---- tests ------------------------------------------------------------------- */

/* (a) each prompt alone, then all at once, through the same engine. */
static void test_batched_equals_alone(void) {
  sched_engine_config_t c = config();
  sched_engine_t *e = engine(&c, true);
  for (int i = 0; i < N_PROMPTS; i++) {
    spec_t sp = spec_of(i);
    submit(e, (uint64_t)i, &alone[i], &sp);
    run_until(e, all_done, &(outs_ref_t){&alone[i], 1});
    CHECK_INT_EQ(alone[i].finish, SCHED_FINISH_LENGTH);
    CHECK_INT_EQ(alone[i].n, 24);
    CHECK_INT_EQ(alone[i].prompt_tokens, n_ids[i]);
    check_idle(e);
  }
  sched_stats_t st;
  sched_engine_stats(e, &st);
  const uint64_t steps_alone = st.steps;
  out_t together[N_PROMPTS];
  for (int i = 0; i < N_PROMPTS; i++) {
    spec_t sp = spec_of(i);
    submit(e, (uint64_t)(100 + i), &together[i], &sp);
  }
  run_until(e, all_done, &(outs_ref_t){together, N_PROMPTS});
  for (int i = 0; i < N_PROMPTS; i++) check_same(&together[i], &alone[i]);
  check_idle(e);
  sched_engine_stats(e, &st);
  CHECK_INT_EQ(st.requests_finished, 2 * N_PROMPTS);
  CHECK_INT_EQ(st.generation_tokens, 2 * N_PROMPTS * 24);
  CHECK_INT_EQ(st.preemptions, 0);
  fprintf(stderr, "   %d requests: %llu steps one at a time, %llu batched\n", N_PROMPTS,
          (unsigned long long)steps_alone, (unsigned long long)(st.steps - steps_alone));
  sched_engine_free(e);
}

/* The same prompts at once on a backend without the sample op: every row
 * sampled on the host from its downloaded logits. The same tokens as the
 * backend's draws (greedy, and temperature alone: prompt 5) and as the
 * host rows mixed among them (logprobs, top-p). */
static void test_sampled_on_host(void) {
  static k_ops_t ops;
  const k_ops_t *real = be->ops;
  ops = *be->ops;
  ops.sample = NULL;
  be->ops = &ops;
  sched_engine_config_t c = config();
  sched_engine_t *e = engine(&c, true);
  out_t o[N_PROMPTS];
  for (int i = 0; i < N_PROMPTS; i++) {
    spec_t sp = spec_of(i);
    submit(e, (uint64_t)(200 + i), &o[i], &sp);
  }
  run_until(e, all_done, &(outs_ref_t){o, N_PROMPTS});
  for (int i = 0; i < N_PROMPTS; i++) check_same(&o[i], &alone[i]);
  /* the penalties change the greedy prompt's text: they were applied */
  out_t plain;
  spec_t sp = spec_of(6);
  sp.penalties = false;
  submit(e, 300, &plain, &sp);
  run_until(e, all_done, &(outs_ref_t){&plain, 1});
  CHECK(strcmp(plain.text, alone[6].text) != 0);
  check_idle(e);
  sched_engine_free(e);
  be->ops = real;
}

/* (b) a pool for ~1.5 sequences of max_model_len: preemption, same output. */
static void test_preemption(void) {
  sched_engine_config_t c = config();
  c.max_model_len = 64;
  const int32_t heads = w.cfg.n_layers * w.cfg.n_kv_heads;
  const int32_t per_seq = heads * (64 / 16);
  c.kv_cache_memory = (int64_t)(per_seq * 3 / 2) * (int64_t)kv_block_bytes(K_F32, 16, w.cfg.head_dim);
  sched_engine_t *e = engine(&c, true);
  sched_capacity_t cap;
  sched_engine_capacity(e, &cap);
  CHECK_INT_EQ(cap.kv_blocks, per_seq * 3 / 2);
  CHECK_NEAR(cap.max_concurrency, 1.5, 1e-9);
  CHECK_INT_EQ(cap.kv_tokens, (per_seq * 3 / 2) / heads * 16);
  out_t o[N_PROMPTS];
  int idx[N_PROMPTS], n = 0;
  for (int i = 0; i < N_PROMPTS; i++) {
    if (n_ids[i] + 24 > 64) continue;
    spec_t sp = spec_of(i);
    idx[n] = i;
    submit(e, (uint64_t)i, &o[n++], &sp);
  }
  CHECK(n >= 4);
  run_until(e, all_done, &(outs_ref_t){o, n});
  for (int j = 0; j < n; j++) check_same(&o[j], &alone[idx[j]]);
  check_idle(e);
  sched_stats_t st;
  sched_engine_stats(e, &st);
  CHECK(st.preemptions > 0);
  fprintf(stderr, "   %d requests, %llu preemptions, %llu steps\n", n,
          (unsigned long long)st.preemptions, (unsigned long long)st.steps);
  sched_engine_free(e);
}

/* (c) stop strings: the text ends right before the first occurrence. For
 * each greedy prompt, all at once: a 5-byte stop from the middle of its
 * reference text (beside one that never occurs), only one that never
 * occurs, and the first 2 bytes. */
static void test_stop_strings(void) {
  sched_engine_config_t c = config();
  c.max_num_seqs = 32;
  sched_engine_t *e = engine(&c, true);
  static out_t o[N_PROMPTS][3];
  static char stop_mid[N_PROMPTS][6], stop_start[N_PROMPTS][3];
  int n = 0;
  for (int i = 0; i < N_PROMPTS; i++) {
    if (i == 7) continue; /* sampled */
    const out_t *ref = &alone[i];
    CHECK(ref->n_text > 12);
    memcpy(stop_mid[i], ref->text + ref->n_text / 2, 5);
    memcpy(stop_start[i], ref->text, 2);
    const char *stops[3][2] = {
        {"\x01never", stop_mid[i]}, {"\x01never", NULL}, {stop_start[i], NULL}};
    for (int k = 0; k < 3; k++) {
      spec_t sp = spec_of(i);
      sp.logprobs = -1;
      sp.stop[0] = stops[k][0];
      sp.stop[1] = stops[k][1];
      submit(e, (uint64_t)(10 * i + k), &o[i][k], &sp);
      n++;
    }
  }
  for (int i = 0; i < N_PROMPTS; i++) {
    if (i == 7) continue;
    run_until(e, all_done, &(outs_ref_t){o[i], 3});
    const out_t *ref = &alone[i];
    check_same(&o[i][1], ref);
    for (int k = 0; k < 3; k += 2) {
      const out_t *x = &o[i][k];
      const char *stop = k == 0 ? stop_mid[i] : stop_start[i];
      const char *at = strstr(ref->text, stop);
      CHECK(at != NULL);
      CHECK_INT_EQ(x->finish, SCHED_FINISH_STOP);
      CHECK(strstr(x->text, stop) == NULL);
      CHECK_INT_EQ(x->n_text, at - ref->text);
      CHECK(memcmp(x->text, ref->text, x->n_text) == 0);
      CHECK(x->n <= ref->n && memcmp(x->tokens, ref->tokens, (size_t)x->n * sizeof(int32_t)) == 0);
    }
  }
  /* EOS: a chat turn that ends; the EOS token is counted but not shown. */
  int32_t chat[128], n_chat;
  const char *turn = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                     "by Hugging Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                     "<|im_start|>assistant\n";
  size_t got;
  CHECK_INT_EQ(model_tok_encode(tok, turn, strlen(turn), true, chat, 128, &got), 0);
  n_chat = (int32_t)got;
  spec_t sp = {.ids = chat, .n = n_chat, .max_tokens = 48, .logprobs = -1};
  out_t oc;
  submit(e, 2000, &oc, &sp);
  run_until(e, all_done, &(outs_ref_t){&oc, 1});
  fprintf(stderr, "   chat: finish %d after %d tokens: \"%s\"\n", oc.finish, oc.n, oc.text);
  CHECK_INT_EQ(oc.finish, SCHED_FINISH_STOP);
  CHECK(model_tok_is_eog(tok, oc.tokens[oc.n - 1]));
  for (int32_t i = 0; i + 1 < oc.n; i++) CHECK(!model_tok_is_eog(tok, oc.tokens[i]));
  CHECK(strstr(oc.text, "<|im_end|>") == NULL);
  check_idle(e);
  sched_engine_free(e);
}

/* (d) aborts: mid-decode, while waiting, unknown ids; shutdown mid-run. */
static void test_abort(void) {
  sched_engine_config_t c = config();
  sched_engine_t *e = engine(&c, true);
  spec_t sp = spec_of(2);
  sp.max_tokens = 200;
  out_t o;
  submit(e, 7, &o, &sp);
  run_until(e, has_events, &o);
  sched_stats_t st;
  sched_engine_stats(e, &st);
  CHECK(st.kv_blocks_used > 0);
  sched_engine_abort(e, 12345); /* unknown: ignored */
  sched_engine_abort(e, 7);
  run_until(e, all_done, &(outs_ref_t){&o, 1});
  CHECK_INT_EQ(o.finish, SCHED_FINISH_ABORT);
  CHECK(o.n >= 3 && o.n < 200);
  check_idle(e);
  sched_engine_free(e);

  /* aborted before the engine ever ran it */
  e = engine(&c, false);
  submit(e, 8, &o, &sp);
  sched_engine_abort(e, 8);
  CHECK_INT_EQ(sched_engine_start(e), 0);
  run_until(e, all_done, &(outs_ref_t){&o, 1});
  CHECK_INT_EQ(o.finish, SCHED_FINISH_ABORT);
  CHECK_INT_EQ(o.n, 0);
  check_idle(e);

  /* shutdown with a request running and one waiting: nothing leaks */
  out_t o2, o3;
  submit(e, 9, &o2, &sp);
  submit(e, 10, &o3, &sp);
  run_until(e, has_events, &o2);
  sched_engine_free(e);
}

/* (d') the alive callback: from the engine thread, idle or busy, at about
 * alive_ms; a stopped thread stops calling. */
static int g_alive;
static void on_alive(void *ctx) { __atomic_add_fetch((int *)ctx, 1, __ATOMIC_RELAXED); }

static void test_alive(void) {
  sched_engine_config_t c = config();
  c.alive = on_alive;
  c.alive_ctx = &g_alive;
  c.alive_ms = 20;
  sched_engine_t *e = engine(&c, true);
  nanosleep(&(struct timespec){.tv_nsec = 300000000}, NULL); /* idle 0.3 s */
  int idle = __atomic_load_n(&g_alive, __ATOMIC_RELAXED);
  CHECK(idle >= 5 && idle <= 20);
  spec_t sp = spec_of(2);
  sp.max_tokens = 40;
  out_t o;
  submit(e, 1, &o, &sp);
  run_until(e, all_done, &(outs_ref_t){&o, 1});
  CHECK(__atomic_load_n(&g_alive, __ATOMIC_RELAXED) > idle);
  sched_engine_free(e);
  int after = __atomic_load_n(&g_alive, __ATOMIC_RELAXED);
  nanosleep(&(struct timespec){.tv_nsec = 100000000}, NULL);
  CHECK_INT_EQ(__atomic_load_n(&g_alive, __ATOMIC_RELAXED), after);
  c.alive_ms = 0;
  CHECK_INT_EQ(sched_engine_new(&e, &c, &w, be, tok, err, sizeof err), -EINVAL);
}

/* (d'') a backend error (as a device error would be): the requests of the
 * failed step end with SCHED_FINISH_ERROR and their blocks return; the
 * engine goes on serving. */
static const k_ops_t *g_real_ops;
static int g_fail_in = -1; /* attention calls until one fails; -1 never */

static int failing_attention(k_backend_t *b, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  if (__atomic_load_n(&g_fail_in, __ATOMIC_RELAXED) >= 0 &&
      __atomic_sub_fetch(&g_fail_in, 1, __ATOMIC_RELAXED) == -1)
    return -EIO;
  return g_real_ops->attention(b, kv, a);
}

/* The test backend with failing_attention (and health, where given) in
 * place of its own; unwrap_backend puts the real ops back. */
static void wrap_backend(int (*health)(k_backend_t *)) {
  static k_ops_t ops;
  g_real_ops = be->ops;
  ops = *be->ops;
  ops.attention = failing_attention;
  if (health) ops.health = health;
  be->ops = &ops;
}

static void unwrap_backend(void) { be->ops = g_real_ops; }

static void test_backend_error(void) {
  wrap_backend(NULL);
  sched_engine_config_t c = config();
  sched_engine_t *e = engine(&c, true);
  spec_t sp = spec_of(2);
  sp.max_tokens = 60;
  sp.ignore_eos = true;
  out_t o[2];
  submit(e, 1, &o[0], &sp);
  submit(e, 2, &o[1], &sp);
  run_until(e, has_events, &o[0]);
  __atomic_store_n(&g_fail_in, 5, __ATOMIC_RELAXED); /* a few layers into a later step */
  run_until(e, all_done, &(outs_ref_t){o, 2});
  CHECK_INT_EQ(o[0].finish, SCHED_FINISH_ERROR);
  CHECK_INT_EQ(o[1].finish, SCHED_FINISH_ERROR);
  CHECK(o[0].n < 60 && o[1].n < 60);
  check_idle(e); /* their blocks are back */
  out_t d;
  sp.max_tokens = 10;
  submit(e, 3, &d, &sp);
  run_until(e, all_done, &(outs_ref_t){&d, 1});
  CHECK_INT_EQ(d.finish, SCHED_FINISH_LENGTH);
  CHECK_INT_EQ(d.n, 10);
  check_idle(e);
  sched_engine_free(e);
  unwrap_backend();
}

/* A failure the backend cannot recover from (its health op says so): every
 * request, running or waiting, ends with an error; the fatal callback runs
 * once and the engine thread stops. */
static int g_sick; /* the health the wrapped backend reports */
static int g_fatal_calls;
static int sick_health(k_backend_t *b) { return __atomic_load_n(&g_sick, __ATOMIC_RELAXED); }
static void on_fatal(void *ctx) { __atomic_add_fetch((int *)ctx, 1, __ATOMIC_RELAXED); }

static void test_backend_fatal(void) {
  wrap_backend(sick_health);
  sched_engine_config_t c = config();
  c.max_num_seqs = 1; /* the second request waits */
  c.fatal = on_fatal;
  c.fatal_ctx = &g_fatal_calls;
  sched_engine_t *e = engine(&c, true);
  spec_t sp = spec_of(2);
  sp.max_tokens = 60;
  sp.ignore_eos = true;
  out_t o[2];
  submit(e, 1, &o[0], &sp);
  submit(e, 2, &o[1], &sp);
  run_until(e, has_events, &o[0]);
  __atomic_store_n(&g_sick, -EIO, __ATOMIC_RELAXED);
  __atomic_store_n(&g_fail_in, 3, __ATOMIC_RELAXED);
  run_until(e, all_done, &(outs_ref_t){o, 2});
  CHECK_INT_EQ(o[0].finish, SCHED_FINISH_ERROR);
  CHECK_INT_EQ(o[1].finish, SCHED_FINISH_ERROR); /* it never ran */
  CHECK_INT_EQ(o[1].n, 0);
  sched_stats_t st;
  for (int i = 0; i < 500; i++) {
    sched_engine_stats(e, &st);
    if (st.stopped) break;
    usleep(10000);
  }
  CHECK(st.stopped);
  CHECK_INT_EQ(__atomic_load_n(&g_fatal_calls, __ATOMIC_RELAXED), 1);
  sched_engine_free(e);
  unwrap_backend();
  __atomic_store_n(&g_sick, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&g_fail_in, -1, __ATOMIC_RELAXED);
}

/* (e) refused requests. */
static void test_refused(void) {
  sched_engine_config_t c = config();
  c.max_waiting = 2;
  sched_engine_t *e = engine(&c, false);
  int32_t big[256] = {0};
  out_t o;
  spec_t sp = {.ids = big, .n = 256, .max_tokens = 1, .logprobs = -1};
  sched_request_t *r = request(1, &o, &sp);
  CHECK_INT_EQ(sched_engine_submit(e, r), -EINVAL); /* == max_model_len: no room */
  r->n_prompt = 300;
  CHECK_INT_EQ(sched_engine_submit(e, r), -EINVAL);
  r->n_prompt = 10;
  r->max_tokens = 0;
  CHECK_INT_EQ(sched_engine_submit(e, r), -EINVAL);
  r->max_tokens = 4;
  r->prompt[3] = w.cfg.n_vocab;
  CHECK_INT_EQ(sched_engine_submit(e, r), -EINVAL);
  r->prompt[3] = 0;
  r->logprobs = 21;
  CHECK_INT_EQ(sched_engine_submit(e, r), -EINVAL);
  r->logprobs = -1;
  r->sample.top_p = 0.0f;
  CHECK_INT_EQ(sched_engine_submit(e, r), -EINVAL);
  r->sample.top_p = 1.0f;
  CHECK_INT_EQ(sched_engine_submit(e, r), 0);
  sp.n = 10;
  CHECK_INT_EQ(sched_engine_submit(e, request(2, &o, &sp)), 0);
  r = request(3, &o, &sp);
  CHECK_INT_EQ(sched_engine_submit(e, r), -EAGAIN);
  sched_stats_t st;
  sched_engine_stats(e, &st);
  CHECK_INT_EQ(st.waiting, 2);
  sched_request_free(r);
  sched_engine_free(e); /* never started: frees the queued requests */

  c.kv_cache_memory = 1 << 20; /* less than one max_model_len sequence */
  CHECK_INT_EQ(sched_engine_new(&e, &c, &w, be, tok, err, sizeof err), -EINVAL);
  CHECK(e == NULL && strstr(err, "kv_cache_memory") != NULL);
  c = config();
  c.max_num_batched_tokens = 8;
  CHECK_INT_EQ(sched_engine_new(&e, &c, &w, be, tok, err, sizeof err), -EINVAL);
}

/* (f) chunked prefill: a 32-token budget gives what a 512-token one does,
 * with a short request decoding beside the long prompt. */
static void test_chunked_prefill(void) {
  out_t ref[2], o[2];
  uint64_t steps[2];
  for (int k = 0; k < 2; k++) {
    sched_engine_config_t c = config();
    c.max_num_seqs = 8;
    c.max_num_batched_tokens = k == 0 ? 512 : 32;
    sched_engine_t *e = engine(&c, true);
    out_t *x = k == 0 ? ref : o;
    spec_t a = spec_of(1), b = {.ids = long_ids, .n = n_long, .max_tokens = 24,
                                .ignore_eos = true, .logprobs = -1};
    submit(e, 1, &x[0], &a);
    submit(e, 2, &x[1], &b);
    run_until(e, all_done, &(outs_ref_t){x, 2});
    check_idle(e);
    sched_stats_t st;
    sched_engine_stats(e, &st);
    steps[k] = st.steps;
    sched_engine_free(e);
  }
  check_same(&ref[0], &alone[1]);
  check_same(&o[0], &alone[1]);
  check_same(&o[1], &ref[1]);
  CHECK(steps[1] > steps[0]);
  fprintf(stderr, "   long prompt of %d tokens: %llu steps at 512, %llu at 32\n", n_long,
          (unsigned long long)steps[0], (unsigned long long)steps[1]);
}

/* (g) A pool that holds fewer tokens than the prompt (kv_below_max_len): the
 * prompt runs compressed between prefill chunks, and gives the tokens that
 * eval-kv's chunked prefill of it gives; uncompressed it is refused, and an
 * uncompressed request that fits ends ("length") when the pool is full. */
static void test_compress_between_chunks(void) {
  static int32_t big[2048];
  int32_t n_big = 0;
  char *buf = calloc(1, 16384);
  for (int i = 0; strlen(buf) < 6000; i++) {
    strcat(buf, texts[(i * 3) % N_PROMPTS]);
    strcat(buf, " ");
  }
  encode(buf, big, 2048, &n_big);
  free(buf);
  sched_engine_config_t c = config();
  c.max_model_len = 2048;
  c.kv_cache_memory = 48ll << 20;
  sched_engine_t *e;
  CHECK_INT_EQ(sched_engine_new(&e, &c, &w, be, tok, err, sizeof err), -EINVAL);
  c.kv_below_max_len = true;
  e = engine(&c, true);
  sched_capacity_t cap;
  sched_engine_capacity(e, &cap);
  if (n_big <= cap.kv_tokens || n_big >= 2000)
    FAIL_AT("a prompt of %d tokens for a pool of %lld", n_big, (long long)cap.kv_tokens);

  out_t o[2];
  spec_t sp = {.ids = big, .n = n_big, .max_tokens = 8, .ignore_eos = true, .logprobs = -1};
  sched_request_t *r = request(1, &o[0], &sp);
  CHECK_INT_EQ(sched_engine_submit(e, r), -ENOSPC); /* uncompressed: does not fit */
  r->kvc.plan.policy = KV_POLICY_KVCOMPRESS;
  r->kvc.plan.ratio = 4;
  r->kvc.prefill_chunk = 256;
  sched_kv_compression_t kvc = r->kvc;
  CHECK_INT_EQ(sched_engine_submit(e, r), 0);
  run_until(e, all_done, &(outs_ref_t){o, 1});
  CHECK_INT_EQ(o[0].n, 8);
  CHECK(o[0].kv_evicted > 0);
  CHECK(o[0].kv_kept <= n_big / 4 + 16 && o[0].kv_kept + o[0].kv_evicted == n_big + 7);
  check_idle(e);

  sp = (spec_t){.ids = big, .n = 1000, .max_tokens = 200, .ignore_eos = true, .logprobs = -1};
  submit(e, 2, &o[1], &sp);
  run_until(e, all_done, &(outs_ref_t){&o[1], 1});
  CHECK_INT_EQ(o[1].finish, SCHED_FINISH_LENGTH);
  CHECK_INT_EQ(o[1].n, cap.kv_tokens - 1000);
  check_idle(e);
  sched_engine_free(e);

  /* the same compression through eval-kv's chunked prefill */
  sched_kveval_t *ev;
  if (sched_kveval_new(&ev, &w, be, n_big + 16, c.max_num_batched_tokens, err, sizeof err))
    FAIL_AT("%s", err);
  int32_t got[8];
  CHECK_INT_EQ(sched_kveval_prefill_chunked(ev, big, n_big, &kvc), 0);
  CHECK_INT_EQ(sched_kveval_compress(ev, &kvc, NULL, NULL), 0);
  CHECK_INT_EQ(sched_kveval_greedy(ev, &kvc, 8, NULL, got), 0);
  for (int i = 0; i < 8; i++) CHECK_INT_EQ(got[i], o[0].tokens[i]);
  sched_kveval_free(ev);
  fprintf(stderr, "   %d-token prompt in a %lld-token pool: kept %d, evicted %d\n", n_big,
          (long long)cap.kv_tokens, o[0].kv_kept, o[0].kv_evicted);
}

/* A device backend's compression path, run on the CPU (kv_via_backend):
 * scores, positions and the prefill's observations read back through
 * read_rows and download into a host mirror. Every policy plans exactly as
 * from the arena in place: the same tokens, the same KVs kept and evicted.
 * Compression between prefill chunks is off on that path. */
static void test_compress_via_backend(void) {
  static int32_t big[1024];
  int32_t n_big = 0;
  char *buf = calloc(1, 8192);
  for (int i = 0; strlen(buf) < 1400; i++) {
    strcat(buf, texts[(i * 5 + 1) % N_PROMPTS]);
    strcat(buf, " ");
  }
  encode(buf, big, 1024, &n_big);
  free(buf);
  enum { N_POL = 5 };
  static const kv_policy_t pol[N_POL] = {KV_POLICY_KVCOMPRESS, KV_POLICY_KVCOMPRESS,
                                         KV_POLICY_DBUDGET, KV_POLICY_STREAMING,
                                         KV_POLICY_KVCOMPRESS};
  out_t o[2][N_POL + 1];
  for (int via = 0; via < 2; via++) {
    sched_engine_config_t c = config();
    c.max_model_len = 1024;
    c.kv_via_backend = via;
    /* all submitted before the first step: the same batches both ways (the
     * dynamic stop's threshold is sensitive to the last bit of a score) */
    sched_engine_t *e = engine(&c, false);
    for (int i = 0; i <= N_POL; i++) {
      spec_t sp = {.ids = big, .n = i < N_POL ? n_big - 7 * i : n_big, .max_tokens = 24,
                   .ignore_eos = true, .logprobs = -1};
      sched_request_t *r = request((uint64_t)i, &o[via][i], &sp);
      const int p = i < N_POL ? i : 0;
      r->kvc.plan.policy = pol[p];
      if (pol[p] != KV_POLICY_DBUDGET) r->kvc.plan.ratio = 4;
      if (p == 1) r->kvc.plan.layer_budget = KV_LAYER_ZIGZAG;
      if (p == 4) r->kvc.plan.layer_budget = KV_LAYER_UNIFORM;
      r->kvc.interval = 8; /* decode scores, compressed again every 8 steps */
      if (i == N_POL) r->kvc.prefill_chunk = 128;
      CHECK_INT_EQ(sched_engine_submit(e, r), 0);
    }
    CHECK_INT_EQ(sched_engine_start(e), 0);
    run_until(e, all_done, &(outs_ref_t){o[via], N_POL + 1});
    sched_stats_t st;
    sched_engine_stats(e, &st);
    CHECK(st.kv_compressions >= 2 * (N_POL + 1));
    check_idle(e);
    sched_engine_free(e);
  }
  for (int i = 0; i < N_POL; i++) {
    check_same(&o[1][i], &o[0][i]);
    CHECK_INT_EQ(o[1][i].kv_kept, o[0][i].kv_kept);
    CHECK_INT_EQ(o[1][i].kv_evicted, o[0][i].kv_evicted);
    if (o[0][i].kv_evicted <= 0) FAIL_AT("request %d evicted nothing", i);
    fprintf(stderr, "   policy %d, %d tokens: kept %d, evicted %d, either way\n", (int)pol[i],
            n_big - 7 * i, o[0][i].kv_kept, o[0][i].kv_evicted);
  }
  /* through the backend a prefill_chunk is not used: request 0's run */
  check_same(&o[1][N_POL], &o[1][0]);
  CHECK_INT_EQ(o[1][N_POL].kv_kept, o[1][0].kv_kept);
  CHECK_INT_EQ(o[1][N_POL].kv_evicted, o[1][0].kv_evicted);
}

/* Steps as graphs, with graph-check.h's replay op standing in for CUDA
 * graphs: every segment keeps replay's promise (the same ops on the same
 * buffers under a key, nothing a capture cannot hold), steps run padded to
 * their bucket, and the tokens are those of eager steps. Steps of 64
 * tokens at most: the prompts go in chunks beside the first decodes, then
 * the requests end one by one and the decode batches shrink from 8
 * sequences to 1 through the buckets 8, 4, 2 and 1. */
static void test_graphs(void) {
  out_t o[2][N_PROMPTS];
  uint64_t graph_steps = 0, steps = 0;
  for (int graphs = 0; graphs < 2; graphs++) {
    if (graphs) graph_check_wrap(be);
    sched_engine_config_t c = config();
    c.graphs = graphs;
    c.max_num_batched_tokens = 64;
    sched_engine_t *e = engine(&c, false);
    for (int i = 0; i < N_PROMPTS; i++) {
      spec_t sp = spec_of(i);
      sp.max_tokens = 6 + 3 * i;
      submit(e, (uint64_t)i, &o[graphs][i], &sp);
    }
    CHECK_INT_EQ(sched_engine_start(e), 0);
    run_until(e, all_done, &(outs_ref_t){o[graphs], N_PROMPTS});
    sched_stats_t st;
    sched_engine_stats(e, &st);
    if (graphs) {
      graph_steps = st.graph_steps;
      steps = st.steps;
    } else {
      CHECK_INT_EQ(st.graph_steps, 0);
    }
    check_idle(e);
    sched_engine_free(e);
    if (graphs) graph_check_unwrap(be);
  }
  for (int i = 0; i < N_PROMPTS; i++) check_same(&o[1][i], &o[0][i]);
  if (gc_state.violations)
    FAIL_AT("%llu breaches of replay's promise; the first: %s",
            (unsigned long long)gc_state.violations, gc_state.first_violation);
  /* every step (none has over 64 tokens), the keys all made at start-up */
  CHECK_INT_EQ(graph_steps, steps);
  CHECK(steps > 27);
  CHECK(gc_state.repeats > gc_state.calls / 2);
  fprintf(stderr, "   %llu of %llu steps as graphs: %llu segments, %llu under a key seen before\n",
          (unsigned long long)graph_steps, (unsigned long long)steps,
          (unsigned long long)gc_state.calls, (unsigned long long)gc_state.repeats);
}

/* ---- the picker alone (no model) ------------------------------------------- */

typedef struct sim {
  int32_t order[64], n_order; /* first admissions, in order */
} sim_t;

static int sim_prepare(void *ctx, sched__seq_t *s) {
  sim_t *x = ctx;
  x->order[x->n_order++] = (int32_t)(intptr_t)s->req;
  return 0;
}

static kv_pool_t *sim_pool;
static void sim_done(void *ctx, sched__seq_t *s) {
  (void)ctx;
  kv_seq_reset(&s->kv, sim_pool);
}

/* 40 sequences through a pool for 1.5 of them, a 16-token budget and 4
 * sequences at most: the plan respects every limit, each head's length is
 * what was computed plus the chunk, admissions are FCFS, preemption happens,
 * everything completes and every block comes back. */
static void test_picker(void) {
  enum { N = 40, L = 2, H = 2, B = 4, MAX_LEN = 40 };
  kv_pool_t pool;
  const int32_t per_seq = L * H * (MAX_LEN / B);
  CHECK_INT_EQ(kv_pool_init(&pool, per_seq * 3 / 2), 0);
  sim_pool = &pool;
  sched__sched_t sc;
  CHECK_INT_EQ(sched__sched_init(&sc, &pool, 4, 16, L, H, B), 0);
  sim_t sim = {.n_order = 0};
  sc.prepare = sim_prepare;
  sc.prepare_ctx = &sim;
  static sched__seq_t seqs[N];
  int32_t target[N];
  uint32_t x = 12345;
  for (int32_t i = 0; i < N; i++) {
    sched__seq_t *q = &seqs[i];
    memset(q, 0, sizeof *q);
    x = x * 1103515245u + 12345u;
    q->n_prompt = q->n_tokens = 1 + (int32_t)((x >> 16) % 24);
    target[i] = 1 + (int32_t)((x >> 8) % (uint32_t)(MAX_LEN - q->n_tokens));
    q->cap = q->n_tokens + target[i];
    q->req = (sched_request_t *)(intptr_t)i; /* an index, never dereferenced here */
    q->run_idx = -1;
    CHECK_INT_EQ(kv_seq_init(&q->kv, L, H, B, q->cap), 0);
    sched__queue_push_back(&sc.waiting, q);
  }
  int32_t done = 0, steps = 0;
  while (done < N) {
    CHECK(++steps < 10000);
    int32_t n = sched__pick(&sc);
    CHECK(sc.failed == NULL);
    CHECK(n > 0);
    CHECK(sc.n_running <= 4 && n <= sc.n_running);
    int32_t tokens = 0;
    for (int32_t j = 0; j < n; j++) {
      sched__seq_t *q = sc.batch[j];
      CHECK(q->run_idx >= 0 && sc.running[q->run_idx] == q);
      CHECK(q->chunk >= 1 && q->n_computed + q->chunk <= q->n_tokens);
      for (int32_t h = 0; h < L * H; h++) CHECK_INT_EQ(q->kv.ctx[h], q->n_computed + q->chunk);
      tokens += q->chunk;
    }
    CHECK_INT_EQ(tokens, sc.n_batch_tokens);
    CHECK(tokens <= 16);
    for (int32_t j = 0; j < n; j++) {
      sched__seq_t *q = sc.batch[j];
      q->n_computed += q->chunk;
      if (q->n_computed < q->n_tokens) continue;
      q->n_gen++;
      if (q->n_gen == target[(intptr_t)q->req]) {
        q->finished = true;
        done++;
      } else {
        q->n_tokens++;
      }
    }
    sched__running_compact(&sc, sim_done, NULL);
    for (sched__seq_t *q = sc.waiting.head; q; q = q->next) CHECK(q->kv.ctx[0] == 0);
  }
  CHECK_INT_EQ(sim.n_order, N);
  for (int32_t i = 0; i < N; i++) CHECK_INT_EQ(sim.order[i], i);
  CHECK(sc.preemptions > 0);
  CHECK_INT_EQ(kv_pool_used_count(&pool), 0);
  CHECK_INT_EQ(kv_pool_check(&pool), 0);
  fprintf(stderr, "   %d sequences in %d steps, %llu preemptions\n", N, steps,
          (unsigned long long)sc.preemptions);
  for (int32_t i = 0; i < N; i++) kv_seq_destroy(&seqs[i].kv, &pool);
  sched__sched_destroy(&sc);
  kv_pool_destroy(&pool);
}

/* ---- the picker benchmark (no model) --------------------------------------- */

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* n running sequences decoding (SmolLM2 shape: 30 layers x 3 KV heads),
 * contexts from 128 to 1000 tokens, staggered so that ~1/16 of them take a
 * new block each step. Per step: the pick (block appends and preemption
 * checks included) and the bookkeeping after a forward; then, separately,
 * the batch's KV views the kernels read (kv_seq_view per sequence, as the
 * engine builds them: no table is copied). Median and p90
 * over 300 steps (the machine is shared: the mean is noisy). */
static void bench_pick(int32_t n) {
  const int32_t L = 30, H = 3, B = 16, cap = 1024, steps = 300;
  kv_pool_t pool;
  CHECK_INT_EQ(kv_pool_init(&pool, n * L * H * (cap / B)), 0);
  sched__sched_t sc;
  CHECK_INT_EQ(sched__sched_init(&sc, &pool, n, n < 256 ? 256 : n, L, H, B), 0);
  sched__seq_t *seqs = calloc((size_t)n, sizeof *seqs);
  k_seq_kv_t *views = malloc((size_t)n * sizeof *views);
  int32_t *q_start = malloc(((size_t)n + 1) * sizeof *q_start);
  double *tp = malloc((size_t)steps * sizeof *tp), *tb = malloc((size_t)steps * sizeof *tb);
  for (int32_t i = 0; i < n; i++) {
    sched__seq_t *s = &seqs[i];
    s->cap = cap;
    s->tokens = calloc((size_t)cap, sizeof *s->tokens);
    CHECK_INT_EQ(kv_seq_init(&s->kv, L, H, B, cap), 0);
    int32_t ctx = 128 + (i * 37) % 512;
    CHECK_INT_EQ(kv_seq_append(&s->kv, &pool, ctx), 0);
    s->n_computed = ctx;
    s->n_tokens = ctx + 1;
    s->started = true;
    s->run_idx = i;
    sc.running[sc.n_running++] = s;
  }
  for (int32_t st = 0; st < steps; st++) {
    double t0 = now_us();
    int32_t m = sched__pick(&sc);
    for (int32_t j = 0; j < m; j++) { /* after the forward: one token each */
      sched__seq_t *s = sc.batch[j];
      s->n_computed += s->chunk;
      s->tokens[s->n_tokens++] = 0;
    }
    double t1 = now_us();
    int32_t t = 0;
    for (int32_t j = 0; j < m; j++) {
      views[j] = kv_seq_view(&sc.batch[j]->kv);
      q_start[j] = t;
      t += sc.batch[j]->chunk;
    }
    q_start[m] = t;
    double t2 = now_us();
    CHECK_INT_EQ(k_seq_ctx(&views[m - 1], L - 1, H, H - 1), sc.batch[m - 1]->n_computed);
    CHECK_INT_EQ(m, n);
    tp[st] = t1 - t0;
    tb[st] = t2 - t1;
  }
  qsort(tp, (size_t)steps, sizeof *tp, cmp_double);
  qsort(tb, (size_t)steps, sizeof *tb, cmp_double);
  printf("running %5d: pick median %8.2f us, p90 %8.2f | KV views median %7.2f us, "
         "p90 %7.2f\n",
         n, tp[steps / 2], tp[steps * 9 / 10], tb[steps / 2], tb[steps * 9 / 10]);
  for (int32_t i = 0; i < n; i++) {
    kv_seq_destroy(&seqs[i].kv, &pool);
    free(seqs[i].tokens);
  }
  CHECK_INT_EQ(kv_pool_used_count(&pool), 0);
  free(seqs);
  free(views);
  free(q_start);
  free(tp);
  free(tb);
  sched__sched_destroy(&sc);
  kv_pool_destroy(&pool);
}

/* Tensor parallelism over the model's 3 KV heads, the ranks sharing one KV
 * arena or each keeping its heads' blocks in an arena of its own (as on
 * GPUs: the pool in three parts, scores read back and moves made per rank).
 * The arithmetic is the same, so the tokens are, whatever the layout:
 * (a) under memory pressure, uncompressed (preemptions, the parts' free
 * counts); (b) compressed, by KV-Compress global, uniform and ZigZagKV, by
 * DBudgetKV and StreamingLLM (one request not), again every 8 decode
 * steps, with the same KVs kept: the observations the prefill leaves for
 * ZigZagKV and DBudgetKV are each rank's own, summed on the host. Every
 * step's accounting is checked (debug_checks). */
static void test_tp_arenas(void) {
  enum { N = 3, N_C = 6 };
  k_backend_t *bes[N];
  model_weights_t shards[N];
  k_comm_t *comm;
  CHECK_INT_EQ(k_comm_cpu_new(&comm, N), 0);
  for (int32_t r = 0; r < N; r++) {
    CHECK_INT_EQ(k_cpu_backend_new(&bes[r], 1), 0);
    bes[r]->numerics = be->numerics;
    if (model_weights_shard(&shards[r], &w, r, N, bes[r], err, sizeof err)) FAIL_AT("%s", err);
  }
  const int32_t heads = w.cfg.n_layers * w.cfg.n_kv_heads, per_seq = heads * (64 / 16);
  out_t o[2][2][N_PROMPTS];
  int n_of[2] = {0, 0};
  for (int apart = 0; apart < 2; apart++)
    for (int comp = 0; comp < 2; comp++) {
      sched_engine_config_t c = config();
      c.tp_size = N;
      c.tp_weights = shards;
      c.tp_backends = bes;
      c.tp_comm = comm;
      c.kv_per_rank = apart;
      c.max_model_len = comp ? 256 : 64;
      if (!comp) /* 1.5 sequences: preemption */
        c.kv_cache_memory = (int64_t)(per_seq * 3 / 2) * (int64_t)kv_block_bytes(K_F32, 16,
                                                                                 w.cfg.head_dim);
      sched_engine_t *e = engine(&c, false);
      int n = 0;
      for (int i = 0; i < (comp ? N_C : N_PROMPTS); i++) {
        if (!comp && n_ids[i] + 16 > 64) continue;
        /* compressed: the long prompt, cut shorter by 9 tokens a request */
        spec_t sp = {.ids = comp ? long_ids : ids[i], .n = comp ? n_long - 9 * i : n_ids[i],
                     .max_tokens = 16, .ignore_eos = true, .logprobs = -1};
        sched_request_t *r = request((uint64_t)i, &o[apart][comp][n], &sp);
        if (comp) {
          static const kv_policy_t pol[N_C] = {KV_POLICY_KVCOMPRESS, KV_POLICY_KVCOMPRESS,
                                               KV_POLICY_STREAMING, KV_POLICY_NONE,
                                               KV_POLICY_KVCOMPRESS, KV_POLICY_DBUDGET};
          r->kvc.plan.policy = pol[n % N_C];
          if (pol[n % N_C] != KV_POLICY_DBUDGET) r->kvc.plan.ratio = 2;
          if (n % N_C == 4) r->kvc.plan.layer_budget = KV_LAYER_ZIGZAG;
          r->kvc.plan.min_tokens = 8;
          r->kvc.plan.protected_window = 4;
          r->kvc.plan.sinks = 1;
          if (n % N_C == 1) r->kvc.plan.layer_budget = KV_LAYER_UNIFORM;
          r->kvc.interval = 8;
        }
        CHECK_INT_EQ(sched_engine_submit(e, r), 0);
        n++;
      }
      CHECK(n >= 4);
      n_of[comp] = n;
      CHECK_INT_EQ(sched_engine_start(e), 0);
      run_until(e, all_done, &(outs_ref_t){o[apart][comp], n});
      sched_stats_t st;
      sched_engine_stats(e, &st);
      if (!comp) CHECK(st.preemptions > 0);
      if (comp) CHECK(st.kv_compressions > 0);
      check_idle(e);
      fprintf(stderr, "   %s, %s: %llu preemptions, %llu compressions\n",
              apart ? "an arena per rank" : "one arena", comp ? "compressed" : "uncompressed",
              (unsigned long long)st.preemptions, (unsigned long long)st.kv_compressions);
      sched_engine_free(e);
    }
  for (int comp = 0; comp < 2; comp++)
    for (int j = 0; j < n_of[comp]; j++) {
      check_same(&o[1][comp][j], &o[0][comp][j]);
      CHECK_INT_EQ(o[1][comp][j].kv_kept, o[0][comp][j].kv_kept);
      CHECK_INT_EQ(o[1][comp][j].kv_evicted, o[0][comp][j].kv_evicted);
      if (comp && j % N_C != 3 && o[1][comp][j].kv_evicted <= 0)
        FAIL_AT("request %d evicted nothing", j);
    }
  for (int32_t r = 0; r < N; r++) {
    model_weights_destroy(&shards[r]);
    k_backend_free(bes[r]);
  }
  k_comm_free(comm);
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
    const int32_t ns[] = {1, 64, 256, 1024};
    for (size_t i = 0; i < sizeof ns / sizeof *ns; i++) bench_pick(ns[i]);
    return 0;
  }
  RUN(test_picker);
  const char *path = test_model_path();
  if (!path) {
    fprintf(stderr, "skip: no model (PRESSD_MODEL)\n");
    return TEST_SKIP;
  }
  if (model_gguf_open(&g, path, err, sizeof err)) FAIL_AT("%s", err);
  CHECK_INT_EQ(k_cpu_backend_new(&be, 2), 0);
  if (model_weights_from_gguf(&w, &g, be, err, sizeof err)) FAIL_AT("%s", err);
  if (model_tok_from_gguf(&tok, &g, err, sizeof err)) FAIL_AT("%s", err);
  make_prompts();

  RUN(test_refused);
  RUN(test_batched_equals_alone);
  RUN(test_sampled_on_host);
  RUN(test_preemption);
  RUN(test_stop_strings);
  RUN(test_abort);
  RUN(test_alive);
  RUN(test_backend_error);
  RUN(test_backend_fatal);
  RUN(test_chunked_prefill);
  RUN(test_compress_between_chunks);
  RUN(test_compress_via_backend);
  RUN(test_graphs);
  RUN(test_tp_arenas);

  model_tok_free(tok);
  model_weights_destroy(&w);
  k_backend_free(be);
  model_gguf_close(&g);
  fprintf(stderr, "engine: all passed\n");
  return 0;
}
