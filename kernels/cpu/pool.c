#include "kernels/cpu/pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

struct k_pool {
  int32_t n_threads; /* including the caller */
  pthread_t *workers; /* owns: n_threads - 1 */
  int32_t n_started;
  pthread_mutex_t mu;
  pthread_cond_t wake, done;
  uint64_t generation; /* bumped for every job */
  bool quit;
  /* the current job */
  k_pool_fn fn;
  void *arg;
  int64_t n;
  atomic_int_fast64_t next;
  int32_t busy; /* workers still inside the job */
};

static void drain(k_pool_t *p) {
  for (;;) {
    int64_t i = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
    if (i >= p->n) return;
    p->fn(p->arg, i);
  }
}

static void *worker(void *arg) {
  k_pool_t *p = arg;
  uint64_t seen = 0;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (!p->quit && p->generation == seen) pthread_cond_wait(&p->wake, &p->mu);
    if (p->quit) break;
    seen = p->generation;
    pthread_mutex_unlock(&p->mu);
    drain(p);
    pthread_mutex_lock(&p->mu);
    if (--p->busy == 0) pthread_cond_signal(&p->done);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

int k_pool_new(k_pool_t **out, int32_t n_threads) {
  if (n_threads < 1) n_threads = 1;
  k_pool_t *p = calloc(1, sizeof *p);
  if (!p) return -ENOMEM;
  p->n_threads = n_threads;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->wake, NULL);
  pthread_cond_init(&p->done, NULL);
  p->workers = calloc((size_t)n_threads, sizeof *p->workers);
  if (!p->workers) {
    k_pool_free(p);
    return -ENOMEM;
  }
  for (int32_t i = 0; i + 1 < n_threads; i++) {
    if (pthread_create(&p->workers[i], NULL, worker, p)) {
      k_pool_free(p);
      return -EAGAIN;
    }
    p->n_started++;
  }
  *out = p;
  return 0;
}

void k_pool_free(k_pool_t *p) {
  if (!p) return;
  pthread_mutex_lock(&p->mu);
  p->quit = true;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  for (int32_t i = 0; i < p->n_started; i++) pthread_join(p->workers[i], NULL);
  free(p->workers);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->wake);
  pthread_cond_destroy(&p->done);
  free(p);
}

int32_t k_pool_threads(const k_pool_t *p) { return p->n_threads; }

void k_pool_run(k_pool_t *p, int64_t n, k_pool_fn fn, void *arg) {
  if (n <= 0) return;
  if (p->n_started == 0 || n == 1) {
    for (int64_t i = 0; i < n; i++) fn(arg, i);
    return;
  }
  pthread_mutex_lock(&p->mu);
  p->fn = fn;
  p->arg = arg;
  p->n = n;
  atomic_store(&p->next, 0);
  p->busy = p->n_started;
  p->generation++;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  drain(p);
  pthread_mutex_lock(&p->mu);
  while (p->busy) pthread_cond_wait(&p->done, &p->mu);
  pthread_mutex_unlock(&p->mu);
}
