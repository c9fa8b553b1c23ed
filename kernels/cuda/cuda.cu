// The CUDA backend: device, stream, memory, GEMMs and element-wise ops.
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>

#include "kernels/cuda/cuda-internal.h"

extern "C" {
#include "kernels/cuda/cuda.h"
}

int kc_check(kc_t *c, cudaError_t rc) {
  if (rc == cudaSuccess) return 0;
  if (c && c->error == cudaSuccess) c->error = rc;
  return -EIO;
}

extern "C" int k_cuda_device_count(char *err, size_t errlen) {
  int n = 0;
  cudaError_t rc = cudaGetDeviceCount(&n);
  if (rc != cudaSuccess) {
    snprintf(err, errlen, "CUDA: %s", cudaGetErrorString(rc));
    return -ENODEV;
  }
  return n;
}

extern "C" int k_backend_new_cuda(k_backend_t **out, int32_t device, char *err, size_t errlen) {
  *out = NULL;
  int n = k_cuda_device_count(err, errlen);
  if (n >= 0) snprintf(err, errlen, "the CUDA backend's kernels are not implemented yet (%d devices visible)", n);
  return -ENODEV;
}
