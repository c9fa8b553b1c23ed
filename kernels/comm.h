/* Communicators for tensor parallelism: the collective a sharded forward
 * needs (an in-place fp32 sum over ranks) behind one interface.
 *
 * Every rank calls each collective from its own thread, in the same order,
 * on its own backend's memory. Two implementations: an in-process CPU
 * communicator over threads (host-memory backends; it makes the sharding
 * testable without GPUs) and NCCL (one process, one CUDA device per rank,
 * ncclCommInitAll; kernels/cuda/nccl.cu). A rank that fails calls abort so
 * that the others return -ECANCELED from their collective instead of waiting
 * for it; reset makes the communicator usable again once every rank has
 * returned. */
#ifndef PRESSD_KERNELS_COMM_H
#define PRESSD_KERNELS_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"

typedef struct k_comm k_comm_t;

typedef struct k_comm_ops {
  const char *name;
  /* buf[0..n) of rank `rank` := Σ over ranks of their buf[0..n). Every rank
   * ends with bit-identical sums. */
  int (*all_reduce_sum)(k_comm_t *c, int32_t rank, float *buf, int64_t n);
  void (*abort)(k_comm_t *c);
  void (*reset)(k_comm_t *c);
  void (*destroy)(k_comm_t *c);
} k_comm_ops_t;

struct k_comm {
  const k_comm_ops_t *ops;
  int32_t n_ranks;
  void *impl; /* owns */
};

/* The CPU communicator over n_ranks threads of one process. Sums are taken
 * in rank order (deterministic), each element by one rank. */
int k_comm_cpu_new(k_comm_t **out, int32_t n_ranks);
/* NCCL over the CUDA backends bes[0..n_ranks) (one device each). -ENODEV
 * with a message where this build has no CUDA or NCCL cannot be opened. */
int k_comm_nccl_new(k_comm_t **out, int32_t n_ranks, k_backend_t *const *bes, char *err,
                    size_t errlen);
void k_comm_free(k_comm_t *c); /* NULL-safe */

#endif
