/* CUDA backend entry points (built when nvcc is found). */
#ifndef PRESSD_KERNELS_CUDA_H
#define PRESSD_KERNELS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"

/* Number of visible CUDA devices, or -ENODEV with a message. */
int k_cuda_device_count(char *err, size_t errlen);

/* A CUDA backend on `device` whose KV arena holds K and V as kv_type (K_BF16
 * or K_F16; k_backend_new_cuda takes K_BF16). cuBLASLt is opened at run time
 * from $PRESSD_CUDA_LIB_DIR, then the loader's search path. -ENODEV (no
 * device, no cuBLASLt), -ENOMEM, -EINVAL (kv_type); err gets one line. */
int k_cuda_backend_new_opts(k_backend_t **out, int32_t device, k_dtype_t kv_type, char *err,
                            size_t errlen);

/* The backend's first device error (sticky) as one line; "" and 0 when none,
 * else -EIO. */
int k_cuda_error_string(k_backend_t *be, char *buf, size_t len);

/* The device's name ("NVIDIA H100 80GB HBM3"). */
int k_cuda_device_name(k_backend_t *be, char *buf, size_t len);

/* Device memory free and in all, in bytes. */
int k_cuda_mem_info(k_backend_t *be, size_t *free_bytes, size_t *total_bytes);

/* Matmuls of up to max_m activation rows on 16-bit weights run the
 * backend's own matrix-vector kernel, larger ones cuBLASLt (default 4; 0:
 * cuBLASLt always). For tests and benchmarks: both paths compute the same
 * products (activations rounded to the weight type, fp32 sums). */
void k_cuda_set_gemv_max_m(k_backend_t *be, int32_t max_m);

/* Graphs the replay op holds captured; -1 once a failed capture has
 * turned them off. For tests. */
int k_cuda_graphs_captured(k_backend_t *be);

/* Stream time between a start and a stop mark, in milliseconds (the stop
 * waits for the stream to reach it). For benchmarks. */
int k_cuda_timer_start(k_backend_t *be);
int k_cuda_timer_stop(k_backend_t *be, double *ms);

/* Device-to-device copy bandwidth: best of reps copies of `bytes`, counting
 * the bytes read plus the bytes written, in bytes per second. */
int k_cuda_copy_bandwidth(k_backend_t *be, size_t bytes, int32_t reps, double *bytes_per_s);

#endif
