#include "model/group.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct rank_arg {
  model_group_t *g;
  int32_t r;
} rank_arg_t;

static int run_rank(model_group_t *g, int32_t r, const model_batch_t *b, float *logits) {
  model_batch_t own;
  if (b->rank_seqs) { /* this rank's views */
    own = *b;
    own.seqs = b->rank_seqs[r];
    b = &own;
  }
  int rc = model_forward(&g->ranks[r], b, logits);
  if (rc && g->comm) g->comm->ops->abort(g->comm); /* nobody waits for this rank */
  return rc;
}

static void *rank_main(void *p) {
  rank_arg_t *a = p;
  model_group_t *g = a->g;
  const int32_t r = a->r;
  free(a);
  uint64_t seen = 0;
  pthread_mutex_lock(&g->mu);
  for (;;) {
    while (!g->quit && g->step == seen) pthread_cond_wait(&g->cv, &g->mu);
    if (g->quit) break;
    seen = g->step;
    const model_batch_t *b = g->job;
    float *logits = g->job_logits;
    pthread_mutex_unlock(&g->mu);
    int rc = run_rank(g, r, b, logits);
    pthread_mutex_lock(&g->mu);
    g->rcs[r] = rc;
    if (--g->pending == 0) pthread_cond_broadcast(&g->cv);
  }
  pthread_mutex_unlock(&g->mu);
  return NULL;
}

int model_group_init(model_group_t *g, int32_t n, const model_weights_t *weights,
                     k_backend_t *const *bes, const k_kv_arena_t *const *kvs, k_comm_t *comm,
                     int32_t cap_tokens, int32_t cap_logits, char *err, size_t errlen) {
  memset(g, 0, sizeof *g);
  if (n < 1 || (n > 1 && (!comm || comm->n_ranks != n))) {
    snprintf(err, errlen, "model group: %d ranks need a communicator of %d", n, n);
    return -EINVAL;
  }
  g->n = n;
  g->comm = n > 1 ? comm : NULL;
  g->ranks = calloc((size_t)n, sizeof *g->ranks);
  g->rcs = calloc((size_t)n, sizeof *g->rcs);
  g->threads = n > 1 ? calloc((size_t)(n - 1), sizeof *g->threads) : NULL;
  if (!g->ranks || !g->rcs || (n > 1 && !g->threads)) {
    model_group_destroy(g);
    snprintf(err, errlen, "model group: out of memory");
    return -ENOMEM;
  }
  if (pthread_mutex_init(&g->mu, NULL) || pthread_cond_init(&g->cv, NULL)) {
    model_group_destroy(g);
    snprintf(err, errlen, "model group: cannot create a mutex");
    return -ENOMEM;
  }
  g->sync_ok = true;
  int rc;
  for (int32_t r = 0; r < n; r++)
    if ((rc = model_init_rank(&g->ranks[r], &weights[r], bes[r], kvs[r], g->comm, cap_tokens,
                              cap_logits, err, errlen))) {
      model_group_destroy(g);
      return rc;
    }
  for (int32_t r = 1; r < n; r++) {
    rank_arg_t *a = malloc(sizeof *a);
    if (a) *a = (rank_arg_t){g, r};
    if (!a || pthread_create(&g->threads[r - 1], NULL, rank_main, a)) {
      free(a);
      model_group_destroy(g);
      snprintf(err, errlen, "model group: cannot start the thread of rank %d", r);
      return -EAGAIN;
    }
    g->n_threads++;
  }
  return 0;
}

void model_group_destroy(model_group_t *g) {
  if (!g) return;
  if (g->sync_ok) {
    pthread_mutex_lock(&g->mu);
    g->quit = true;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
    for (int32_t i = 0; i < g->n_threads; i++) pthread_join(g->threads[i], NULL);
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
  }
  if (g->ranks)
    for (int32_t r = 0; r < g->n; r++) model_destroy(&g->ranks[r]);
  free(g->ranks);
  free(g->rcs);
  free(g->threads);
  memset(g, 0, sizeof *g);
}

bool model_group_can_sample(const model_group_t *g) {
  return g->n == 1 && model_can_sample(&g->ranks[0]);
}

bool model_group_can_penalize(const model_group_t *g) {
  return g->n == 1 && model_can_penalize(&g->ranks[0]);
}

bool model_group_can_logprobs(const model_group_t *g) {
  return g->n == 1 && model_can_logprobs(&g->ranks[0]);
}

int model_group_forward(model_group_t *g, const model_batch_t *b, float *logits) {
  if (g->n == 1) return model_forward(&g->ranks[0], b, logits);
  pthread_mutex_lock(&g->mu);
  g->job = b;
  g->job_logits = logits;
  g->pending = g->n - 1;
  g->step++;
  pthread_cond_broadcast(&g->cv);
  pthread_mutex_unlock(&g->mu);
  g->rcs[0] = run_rank(g, 0, b, logits);
  pthread_mutex_lock(&g->mu);
  while (g->pending > 0) pthread_cond_wait(&g->cv, &g->mu);
  pthread_mutex_unlock(&g->mu);
  int rc = 0;
  for (int32_t r = 0; r < g->n; r++) /* the cause, not the cancelled collectives */
    if (g->rcs[r] && (!rc || rc == -ECANCELED)) rc = g->rcs[r];
  if (rc) g->comm->ops->reset(g->comm);
  return rc;
}

void model_group_set_graphs(model_group_t *g, bool on) {
  if (g->n == 1) model_set_graphs(&g->ranks[0], on);
}

int32_t model_group_graph_rows(const model_group_t *g, const model_batch_t *b) {
  return g->n == 1 ? model_graph_rows(&g->ranks[0], b) : 0;
}

int model_group_capture_graphs(model_group_t *g, int32_t max_rows) {
  return g->n == 1 ? model_capture_graphs(&g->ranks[0], max_rows) : 0;
}
