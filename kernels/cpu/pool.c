/* Workers spin briefly on a generation counter before sleeping on a
 * condition variable: a decode step dispatches hundreds of short jobs, and a
 * futex wake-up per job would cost more than the job. */
#include "kernels/cpu/pool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_ROUNDS 2000 /* some tens of µs of pause instructions before sleeping */

typedef struct worker_arg {
  k_pool_t *p;
  int32_t thread;
} worker_arg_t;

struct k_pool {
  int32_t n_threads;  /* including the caller */
  pthread_t *workers; /* owns: n_threads - 1 */
  worker_arg_t *args; /* owns: n_threads - 1 */
  int32_t n_started;
  pthread_mutex_t mu;
  pthread_cond_t wake;
  int32_t sleepers; /* under mu */
  atomic_uint_fast64_t generation; /* bumped for every job */
  atomic_bool quit;
  /* the current job */
  k_pool_fn fn;
  void *arg;
  int64_t n;
  atomic_int_fast64_t next;
  atomic_int busy; /* workers still inside the job */
};

static void drain(k_pool_t *p, int32_t thread) {
  for (;;) {
    int64_t i = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
    if (i >= p->n) return;
    p->fn(p->arg, i, thread);
  }
}



static void *worker(void *arg) {
  k_pool_t *p = ((worker_arg_t *)arg)->p;
  int32_t thread = ((worker_arg_t *)arg)->thread;
  uint64_t seen = 0;
  for (;;) {
    int spins = 0;
    while (atomic_load_explicit(&p->generation, memory_order_acquire) == seen &&
           !atomic_load_explicit(&p->quit, memory_order_relaxed)) {
      if (++spins < SPIN_ROUNDS) {
        cpu_relax();
        continue;
      }
      pthread_mutex_lock(&p->mu);
      p->sleepers++;
      while (atomic_load(&p->generation) == seen && !atomic_load(&p->quit))
        pthread_cond_wait(&p->wake, &p->mu);
      p->sleepers--;
      pthread_mutex_unlock(&p->mu);
    }
    if (atomic_load(&p->quit)) return NULL;
    seen = atomic_load_explicit(&p->generation, memory_order_acquire);
    drain(p, thread);
    atomic_fetch_sub_explicit(&p->busy, 1, memory_order_release);
  }
}

int k_pool_new(k_pool_t **out, int32_t n_threads) {
  if (n_threads < 1) n_threads = 1;
  k_pool_t *p = calloc(1, sizeof *p);
  if (!p) return -ENOMEM;
  p->n_threads = n_threads;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->wake, NULL);
  p->workers = calloc((size_t)n_threads, sizeof *p->workers);
  p->args = calloc((size_t)n_threads, sizeof *p->args);
  if (!p->workers || !p->args) {
    k_pool_free(p);
    return -ENOMEM;
  }
  for (int32_t i = 0; i + 1 < n_threads; i++) {
    p->args[i] = (worker_arg_t){p, i + 1};
    if (pthread_create(&p->workers[i], NULL, worker, &p->args[i])) {
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
  atomic_store(&p->quit, true);
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  for (int32_t i = 0; i < p->n_started; i++) pthread_join(p->workers[i], NULL);
  free(p->workers);
  free(p->args);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->wake);
  free(p);
}

int32_t k_pool_threads(const k_pool_t *p) { return p->n_threads; }

void k_pool_run(k_pool_t *p, int64_t n, k_pool_fn fn, void *arg) {
  if (n <= 0) return;
  if (p->n_started == 0 || n == 1) {
    for (int64_t i = 0; i < n; i++) fn(arg, i, 0);
    return;
  }
  p->fn = fn;
  p->arg = arg;
  p->n = n;
  atomic_store_explicit(&p->next, 0, memory_order_relaxed);
  atomic_store_explicit(&p->busy, p->n_started, memory_order_relaxed);
  atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
  pthread_mutex_lock(&p->mu);
  if (p->sleepers) pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  drain(p, 0);
  /* Wait for the workers to check out; yield rather than spin for long, so
   * a worker waiting for this core (an oversubscribed machine) gets it. */
  for (int spins = 0; atomic_load_explicit(&p->busy, memory_order_acquire) > 0; spins++) {
    if (spins < SPIN_ROUNDS) cpu_relax();
    else sched_yield();
  }
}
