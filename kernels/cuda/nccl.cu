// The NCCL communicator (opened at run time).
#include "kernels/cuda/cuda-internal.h"
