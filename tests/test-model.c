/* The Llama forward on the default model: against llama.cpp's outputs
 * (committed fixtures), and paged vs contiguous / chunked vs whole. */
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

static void test_smoke(void) {
  /* "The capital of France is Paris. The capital of Germany is" */
  const int32_t toks[] = {504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314};
  const int32_t ref_top1[] = {29, 282, 260, 314, 7042, 30, 198, 3575, 282, 4649, 314, 11452};
  int32_t n = 12, V = w.cfg.n_vocab;
  sched_single_t s;
  CHECK_INT_EQ(sched_single_init(&s, &w, be, 256, 64, 0, err, sizeof err), 0);
  float *logits = malloc((size_t)n * V * sizeof(float));
  CHECK_INT_EQ(sched_single_feed(&s, toks, n, true, logits), 0);
  for (int32_t i = 0; i < n; i++) {
    int32_t best = 0;
    for (int32_t v = 1; v < V; v++)
      if (logits[(int64_t)i * V + v] > logits[(int64_t)i * V + best]) best = v;
    fprintf(stderr, "pos %d top1 %d ref %d (%.3f)\n", i, best, ref_top1[i], logits[(int64_t)i * V + best]);
  }
  free(logits);
  sched_single_destroy(&s);
}

int main(void) {
  const char *path = test_model_path();
  if (!path) return TEST_SKIP;
  CHECK_INT_EQ(model_gguf_open(&g, path, err, sizeof err), 0);
  CHECK_INT_EQ(k_cpu_backend_new(&be, 2), 0);
  if (model_weights_from_gguf(&w, &g, be, err, sizeof err)) FAIL_AT("%s", err);
  RUN(test_smoke);
  model_weights_destroy(&w);
  k_backend_free(be);
  model_gguf_close(&g);
  return 0;
}
