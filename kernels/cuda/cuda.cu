// The CUDA backend. This file is the build's proof that nvcc, the CUDA
// runtime and the kernels/ interface fit together; the ops themselves
// (paged attention, GEMMs through cuBLASLt, ...) arrive with the CUDA work.
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>

extern "C" {
#include "kernels/cuda/cuda.h"
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
