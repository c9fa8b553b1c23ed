/* CUDA backend entry points (built when nvcc is found). */
#ifndef PRESSD_KERNELS_CUDA_H
#define PRESSD_KERNELS_CUDA_H

#include <stddef.h>

/* Number of visible CUDA devices, or -ENODEV with a message. */
int k_cuda_device_count(char *err, size_t errlen);

#endif
