/* The CPU communicator: ranks are threads of this process sharing host
 * memory. An all-reduce is two barriers: every rank publishes its buffer;
 * rank r sums slice r of all buffers in rank order and writes the sum into
 * every buffer's slice r; after the second barrier every buffer holds the
 * same sums. The barrier can be aborted so that a failed rank does not
 * leave the others waiting. */
#include "kernels/comm.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct cpu_comm {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int32_t arrived;
  uint64_t generation;
  bool aborted;
  float **bufs;   /* owns the array: [n_ranks] published buffers */
  int64_t *lens;  /* owns: [n_ranks] their lengths (must agree) */
} cpu_comm_t;

/* -ECANCELED once aborted, else 0 when every rank has arrived. */
static int barrier(cpu_comm_t *c, int32_t n) {
  pthread_mutex_lock(&c->mu);
  if (c->aborted) {
    pthread_mutex_unlock(&c->mu);
    return -ECANCELED;
  }
  uint64_t gen = c->generation;
  if (++c->arrived == n) {
    c->arrived = 0;
    c->generation++;
    pthread_cond_broadcast(&c->cv);
  } else {
    while (gen == c->generation && !c->aborted) pthread_cond_wait(&c->cv, &c->mu);
  }
  int rc = gen == c->generation ? -ECANCELED : 0;
  pthread_mutex_unlock(&c->mu);
  return rc;
}

static int cpu_all_reduce(k_comm_t *comm, int32_t rank, float *buf, int64_t n) {
  cpu_comm_t *c = comm->impl;
  const int32_t N = comm->n_ranks;
  if (rank < 0 || rank >= N || n < 0) return -EINVAL;
  if (N == 1) return 0;
  c->bufs[rank] = buf;
  c->lens[rank] = n;
  int rc = barrier(c, N);
  if (rc) return rc;
  for (int32_t r = 0; r < N; r++)
    if (c->lens[r] != n) rc = -EINVAL; /* every rank sees the mismatch */
  if (!rc) {
    int64_t lo = n * rank / N, hi = n * (rank + 1) / N;
    for (int64_t i = lo; i < hi; i++) {
      float s = 0.0f;
      for (int32_t r = 0; r < N; r++) s += c->bufs[r][i];
      for (int32_t r = 0; r < N; r++) c->bufs[r][i] = s;
    }
  }
  int rc2 = barrier(c, N); /* nobody reuses a buffer before all sums are in */
  return rc ? rc : rc2;
}

static void cpu_abort(k_comm_t *comm) {
  cpu_comm_t *c = comm->impl;
  pthread_mutex_lock(&c->mu);
  c->aborted = true;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
}

static void cpu_reset(k_comm_t *comm) {
  cpu_comm_t *c = comm->impl;
  pthread_mutex_lock(&c->mu);
  c->aborted = false;
  c->arrived = 0;
  c->generation++;
  pthread_mutex_unlock(&c->mu);
}

static void cpu_destroy(k_comm_t *comm) {
  cpu_comm_t *c = comm->impl;
  if (!c) return;
  pthread_mutex_destroy(&c->mu);
  pthread_cond_destroy(&c->cv);
  free(c->bufs);
  free(c->lens);
  free(c);
}

static const k_comm_ops_t cpu_comm_ops = {
    .name = "cpu",
    .all_reduce_sum = cpu_all_reduce,
    .abort = cpu_abort,
    .reset = cpu_reset,
    .destroy = cpu_destroy,
};

int k_comm_cpu_new(k_comm_t **out, int32_t n_ranks) {
  *out = NULL;
  if (n_ranks < 1) return -EINVAL;
  k_comm_t *comm = calloc(1, sizeof *comm);
  cpu_comm_t *c = calloc(1, sizeof *c);
  if (c) {
    c->bufs = calloc((size_t)n_ranks, sizeof *c->bufs);
    c->lens = calloc((size_t)n_ranks, sizeof *c->lens);
  }
  if (!comm || !c || !c->bufs || !c->lens) {
    if (c) {
      free(c->bufs);
      free(c->lens);
    }
    free(c);
    free(comm);
    return -ENOMEM;
  }
  pthread_mutex_init(&c->mu, NULL);
  pthread_cond_init(&c->cv, NULL);
  *comm = (k_comm_t){&cpu_comm_ops, n_ranks, c};
  *out = comm;
  return 0;
}

void k_comm_free(k_comm_t *c) {
  if (!c) return;
  if (c->ops && c->ops->destroy) c->ops->destroy(c);
  free(c);
}

#ifndef PRESSD_CUDA
int k_comm_nccl_new(k_comm_t **out, int32_t n_ranks, k_backend_t *const *bes, char *err,
                    size_t errlen) {
  (void)n_ranks, (void)bes;
  *out = NULL;
  snprintf(err, errlen, "this build has no CUDA backend, so no NCCL communicator");
  return -ENODEV;
}
#endif
