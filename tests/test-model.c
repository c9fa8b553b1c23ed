/* The Llama forward on the default model: against llama.cpp's outputs
 * (committed fixtures from scripts/make-reference), and the same logits
 * whether the KV sits in contiguous or scattered blocks, and whether the
 * prompt is prefilled at once or in chunks. */
#include <cjson/cJSON.h>
#include <errno.h>

#include "model/gguf.h"
#include "model/weights.h"
#include "scheduler/single.h"
#include "tests/test.h"

static model_gguf_t g;
static model_weights_t w;
static k_backend_t *be;
static char err[256];

static int32_t argmax(const float *x, int32_t n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; i++)
    if (x[i] > x[best]) best = i;
  return best;
}

static cJSON *load_fixture(const char *name) {
  const char *dir = getenv("PRESSD_FIXTURES");
  CHECK(dir != NULL);
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "rb");
  if (!f) FAIL_AT("cannot open fixture %s", path);
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n + 1);
  CHECK(buf && fread(buf, 1, (size_t)n, f) == (size_t)n);
  buf[n] = 0;
  fclose(f);
  cJSON *j = cJSON_Parse(buf);
  free(buf);
  if (!j) FAIL_AT("fixture %s is not JSON", path);
  return j;
}

static int32_t *ids_of(const cJSON *arr, int32_t *n) {
  *n = cJSON_GetArraySize(arr);
  int32_t *ids = malloc(((size_t)*n + 1) * sizeof *ids);
  int32_t i = 0;
  const cJSON *it;
  cJSON_ArrayForEach(it, arr) ids[i++] = (int32_t)it->valuedouble;
  return ids;
}

/* Teacher forcing: top-1 at the last 64 positions of each fixture sequence
 * equals llama.cpp's at >= 98% of positions; greedy continuations are
 * identical for the first 16 tokens of every prompt. */
static void test_against_llama_cpp(void) {
  cJSON *fx = load_fixture("model-smollm2.json");
  const cJSON *prompts = cJSON_GetObjectItem(fx, "cases");
  CHECK(cJSON_GetArraySize(prompts) >= 20);
  int32_t V = w.cfg.n_vocab;
  int64_t tf_total = 0, tf_same = 0, tf_same_clear = 0, tf_clear = 0;
  int greedy_bad = 0;
  sched_single_t s;
  CHECK_INT_EQ(sched_single_init(&s, &w, be, 2048, 512, 0, err, sizeof err), 0);
  float *logits = malloc((size_t)2048 * V * sizeof(float));
  const cJSON *p;
  int pi = 0;
  cJSON_ArrayForEach(p, prompts) {
    int32_t n_tf, n_top, n_margin;
    int32_t *tf = ids_of(cJSON_GetObjectItem(p, "tf_tokens"), &n_tf);
    int32_t *top = ids_of(cJSON_GetObjectItem(p, "tf_top1"), &n_top);
    const cJSON *margins = cJSON_GetObjectItem(p, "tf_margin");
    n_margin = cJSON_GetArraySize(margins);
    CHECK(n_top >= 64 && n_top < n_tf && n_margin == n_top);
    sched_single_reset(&s);
    CHECK_INT_EQ(sched_single_feed(&s, tf, n_tf, true, logits), 0);
    for (int32_t i = 0; i < n_top; i++) {
      int32_t row = n_tf - n_top + i; /* predicts tf[row + 1] */
      int32_t mine = argmax(logits + (int64_t)row * V, V);
      double margin = cJSON_GetArrayItem(margins, i)->valuedouble;
      tf_total++;
      tf_same += mine == top[i];
      if (margin > 0.5) {
        tf_clear++;
        tf_same_clear += mine == top[i];
      }
    }
    free(tf);
    free(top);

    /* greedy: 16 tokens after the prompt */
    int32_t n_prompt, n_greedy;
    int32_t *prompt = ids_of(cJSON_GetObjectItem(p, "tokens"), &n_prompt);
    int32_t *greedy = ids_of(cJSON_GetObjectItem(p, "greedy"), &n_greedy);
    CHECK(n_greedy >= 16);
    sched_single_reset(&s);
    CHECK_INT_EQ(sched_single_feed(&s, prompt, n_prompt, false, logits), 0);
    for (int32_t i = 0; i < 16; i++) {
      int32_t id = argmax(logits, V);
      if (id != greedy[i]) {
        fprintf(stderr, "prompt %d: greedy token %d is %d, llama.cpp %d (llama.cpp margin %.3f)\n",
                pi, i, id, greedy[i],
                cJSON_GetArrayItem(cJSON_GetObjectItem(p, "greedy_margin"), i)->valuedouble);
        greedy_bad++;
        break;
      }
      CHECK_INT_EQ(sched_single_feed(&s, &id, 1, false, logits), 0);
    }
    free(prompt);
    free(greedy);
    pi++;
  }
  fprintf(stderr, "teacher forcing: %lld/%lld top-1 equal (%.2f%%); with margin > 0.5: %lld/%lld\n",
          (long long)tf_same, (long long)tf_total, 100.0 * (double)tf_same / (double)tf_total,
          (long long)tf_same_clear, (long long)tf_clear);
  fprintf(stderr, "greedy: %d of %d prompts differ within 16 tokens\n", greedy_bad, pi);
  CHECK(tf_same * 100 >= tf_total * 98);
  CHECK_INT_EQ(greedy_bad, 0);
  free(logits);
  sched_single_destroy(&s);
  cJSON_Delete(fx);
}

/* One prompt, five ways: whole in fresh contiguous blocks; whole in blocks
 * scattered over a shuffled pool; chunks of 1, 7 and 64 tokens. All logits
 * within 1e-4 of the first. */
static void test_paged_and_chunked(void) {
  enum { N = 150 };
  int32_t toks[N];
  for (int32_t i = 0; i < N; i++) toks[i] = (int32_t)((i * 7919 + 13) % 49000) + 100;
  int32_t V = w.cfg.n_vocab;
  float *ref = malloc((size_t)N * V * sizeof(float));
  float *got = malloc((size_t)N * V * sizeof(float));
  /* pool with room for three sequences, so scattering has somewhere to go */
  int32_t per_seq = ((N + 15) / 16) * w.cfg.n_layers * w.cfg.n_kv_heads;
  struct {
    int32_t chunk;
    bool scatter;
  } ways[] = {{N, false}, {N, true}, {1, true}, {7, false}, {64, true}};
  for (size_t k = 0; k < sizeof ways / sizeof *ways; k++) {
    sched_single_t s;
    CHECK_INT_EQ(sched_single_init(&s, &w, be, N, ways[k].chunk, 3 * per_seq, err, sizeof err), 0);
    if (ways[k].scatter) kv_pool_shuffle(&s.pool, 1234 + k);
    float *out = k == 0 ? ref : got;
    CHECK_INT_EQ(sched_single_feed(&s, toks, N, true, out), 0);
    if (ways[k].scatter) {
      /* the head's blocks really are not consecutive */
      const int32_t *t = kv_seq_table(&s.seq, 5, 1);
      int jumps = 0;
      for (int i = 1; i < (N + 15) / 16; i++) jumps += t[i] != t[i - 1] + 1;
      CHECK(jumps > 0);
    }
    if (k > 0) {
      double maxd = 0;
      for (size_t i = 0; i < (size_t)N * V; i++) {
        double d = fabs((double)got[i] - ref[i]);
        if (d > maxd) maxd = d;
      }
      fprintf(stderr, "chunk %d scatter %d: max |dlogit| = %.3g\n", ways[k].chunk,
              ways[k].scatter, maxd);
      CHECK(maxd <= 1e-4);
    }
    CHECK_INT_EQ(kv_pool_used_count(&s.pool), kv_seq_blocks_held(&s.seq));
    sched_single_destroy(&s);
  }
  free(ref);
  free(got);
}

/* Prompt longer than the sequence's room: -E2BIG, and an exhausted pool:
 * -ENOSPC, both without corrupting the pool. */
static void test_limits(void) {
  int32_t toks[40] = {0};
  for (int i = 0; i < 40; i++) toks[i] = 100 + i;
  float *logits = malloc((size_t)w.cfg.n_vocab * sizeof(float));
  sched_single_t s;
  CHECK_INT_EQ(sched_single_init(&s, &w, be, 32, 16, 0, err, sizeof err), 0);
  CHECK_INT_EQ(sched_single_feed(&s, toks, 40, false, logits), -E2BIG);
  CHECK_INT_EQ(sched_single_feed(&s, toks, 32, false, logits), 0);
  CHECK_INT_EQ(sched_single_feed(&s, toks, 1, false, logits), -E2BIG);
  sched_single_destroy(&s);
  /* a pool of one block per head: 16 tokens fit, 17 do not */
  CHECK_INT_EQ(sched_single_init(&s, &w, be, 64, 64, w.cfg.n_layers * w.cfg.n_kv_heads, err,
                                 sizeof err),
               0);
  CHECK_INT_EQ(sched_single_feed(&s, toks, 17, false, logits), -ENOSPC);
  CHECK_INT_EQ(kv_pool_check(&s.pool), 0);
  CHECK_INT_EQ(sched_single_feed(&s, toks, 16, false, logits), 0);
  CHECK_INT_EQ(kv_pool_free_count(&s.pool), 0);
  sched_single_destroy(&s);
  free(logits);
}

int main(void) {
  const char *path = test_model_path();
  if (!path) return TEST_SKIP;
  if (model_gguf_open(&g, path, err, sizeof err)) FAIL_AT("%s", err);
  CHECK_INT_EQ(k_cpu_backend_new(&be, 2), 0);
  if (model_weights_from_gguf(&w, &g, be, err, sizeof err)) FAIL_AT("%s", err);
  RUN(test_paged_and_chunked);
  RUN(test_limits);
  RUN(test_against_llama_cpp);
  model_weights_destroy(&w);
  k_backend_free(be);
  model_gguf_close(&g);
  return 0;
}
