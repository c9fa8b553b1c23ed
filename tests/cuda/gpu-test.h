/* What the GPU tests and benchmarks share: opening a CUDA backend, or
 * saying why not in the way meson and scripts/gpu-check expect. */
#ifndef PRESSD_TESTS_GPU_TEST_H
#define PRESSD_TESTS_GPU_TEST_H

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda.h"
#include "kernels/profile.h"
#include "tests/test.h"

/* PRESSD_REQUIRE_GPU=1 (scripts/gpu-check): a machine without a usable GPU
 * is a failure there, not a skip. */
static inline bool gpu_test_required(void) {
  const char *req = getenv("PRESSD_REQUIRE_GPU");
  return req && !strcmp(req, "1");
}

/* The exit status for "no usable GPU": 77 (skip), or 1 when required. */
static inline int gpu_test_absent(const char *who, const char *why) {
  bool required = gpu_test_required();
  fprintf(stderr, "%s: %s: %s\n", who, required ? "FAIL (PRESSD_REQUIRE_GPU=1)" : "skip", why);
  return required ? 1 : TEST_SKIP;
}

/* A bf16-KV CUDA backend on device 0 into *be: 0, or the status main
 * returns (no device or no driver: gpu_test_absent; another error: 1). */
static inline int gpu_test_open(const char *who, k_backend_t **be) {
  char err[256];
  *be = NULL;
  int n = k_cuda_device_count(err, sizeof err);
  if (n <= 0) return gpu_test_absent(who, n < 0 ? err : "no CUDA device visible");
  int rc = k_backend_new_cuda(be, 0, err, sizeof err);
  if (rc == -ENODEV) return gpu_test_absent(who, err);
  if (rc) {
    fprintf(stderr, "%s: k_backend_new_cuda: %d: %s\n", who, rc, err);
    return 1;
  }
  /* an op-by-op table of the run, written when the backend is freed */
  const char *prof = getenv("PRESSD_PROFILE_OPS");
  if (prof && *prof && k_profile_wrap(*be)) return 1;
  return 0;
}

#endif
