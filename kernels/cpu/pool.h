/* A fixed thread pool for data-parallel loops: k_pool_run() calls
 * fn(arg, i, thread) for i in [0, n) across the workers and the calling
 * thread, and returns when all are done. thread is the index (0 = the
 * caller, 1.. the workers) of the thread running the call, for per-thread
 * scratch. One job at a time (the engine thread is the
 * only caller). */
#ifndef PRESSD_KERNELS_CPU_POOL_H
#define PRESSD_KERNELS_CPU_POOL_H

#include <stdint.h>

typedef struct k_pool k_pool_t;
typedef void (*k_pool_fn)(void *arg, int64_t i, int32_t thread);

int k_pool_new(k_pool_t **out, int32_t n_threads);
void k_pool_free(k_pool_t *p); /* NULL-safe */
void k_pool_run(k_pool_t *p, int64_t n, k_pool_fn fn, void *arg);
int32_t k_pool_threads(const k_pool_t *p);

#endif
