#include "kernels/backend.h"

#include "kernels/profile.h"

#ifdef PRESSD_CUDA
#include "kernels/cuda/cuda.h"
#endif

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef PRESSD_FAULT_INJECTION
/* Test builds: PRESSD_INJECT_DEVICE_ERROR=FILE makes every attention call
 * return -EIO, as a device error would, while FILE exists, so that tests
 * can make a running daemon's steps fail and recover. A FILE that starts
 * with "sticky" makes the error permanent, as a sticky CUDA error is: the
 * backend's health turns -EIO for good. */
static const char *fault_file;
static k_ops_t fault_ops;
static int (*real_attention)(k_backend_t *, const k_kv_arena_t *, const k_attn_args_t *);
static int fault_stuck; /* 0, or -EIO once a sticky fault happened */

static int faulty_attention(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  if (fault_stuck) return fault_stuck;
  FILE *f = fopen(fault_file, "r");
  if (!f) return real_attention(be, kv, a);
  char head[8] = "";
  if (fread(head, 1, 6, f) == 6 && !memcmp(head, "sticky", 6)) fault_stuck = -EIO;
  fclose(f);
  return -EIO;
}

static int faulty_health(k_backend_t *be) { return fault_stuck; }

static void inject_faults(k_backend_t *be) {
  fault_file = getenv("PRESSD_INJECT_DEVICE_ERROR");
  if (!fault_file || !*fault_file || real_attention) return;
  fault_ops = *be->ops;
  real_attention = be->ops->attention;
  fault_ops.attention = faulty_attention;
  fault_ops.health = faulty_health; /* the real backend's health is ignored here */
  be->ops = &fault_ops;
}
#endif

#ifndef PRESSD_CUDA
int k_backend_new_cuda(k_backend_t **out, int32_t device, char *err, size_t errlen) {
  (void)device;
  *out = NULL;
  snprintf(err, errlen, "this build has no CUDA backend (rebuild with -Dcuda=enabled)");
  return -ENODEV;
}
#endif

int k_backend_new(k_backend_t **out, k_device_t dev, int32_t threads, char *err, size_t errlen) {
  int rc;
  if (dev == K_DEVICE_CUDA) {
    rc = k_backend_new_cuda(out, 0, err, errlen);
  } else if ((rc = k_cpu_backend_new(out, threads))) {
    snprintf(err, errlen, "cannot start the CPU backend: error %d", rc);
  }
#ifdef PRESSD_FAULT_INJECTION
  if (!rc) inject_faults(*out);
#endif
  const char *profile = getenv("PRESSD_PROFILE_OPS"); /* profile.h */
  if (!rc && profile && *profile && k_profile_wrap(*out))
    fprintf(stderr, "PRESSD_PROFILE_OPS: cannot profile the backend (out of memory)\n");
  return rc;
}

/* IEEE half to float and back, the latter rounded to nearest even. */
float k_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else { /* subnormal: normalise */
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) {
        mant <<= 1;
        exp--;
      }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

uint16_t k_f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffff;
  if (((x >> 23) & 0xff) == 0xff) /* inf / nan */
    return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
  if (exp >= 31) return (uint16_t)(sign | 0x7c00);
  if (exp <= 0) {
    if (exp < -10) return (uint16_t)sign;
    mant |= 0x800000;
    uint32_t shift = (uint32_t)(14 - exp);
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) half++;
    return (uint16_t)(sign | half);
  }
  uint32_t half = sign | ((uint32_t)exp << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++; /* may carry into exp: correct */
  return (uint16_t)half;
}

int k_backend_set_kv_type(k_backend_t *be, k_dtype_t t) {
  if ((unsigned)t >= 32 || !(be->kv_types >> t & 1u)) return -ENOTSUP;
  be->kv_type = t;
  return 0;
}

void k_backend_free(k_backend_t *be) {
  if (!be) return;
  if (be->ops && be->ops->destroy) be->ops->destroy(be);
  free(be);
}

size_t k_dtype_bytes(k_dtype_t t) {
  switch (t) {
  case K_F32: return 4;
  case K_BF16: case K_F16: return 2;
  default: return 0;
  }
}

size_t k_row_bytes(k_dtype_t t, int64_t cols) {
  switch (t) {
  case K_F32: return (size_t)cols * 4;
  case K_BF16: case K_F16: return (size_t)cols * 2;
  case K_Q8_0: return (size_t)(cols / K_QBLOCK) * 34;
  case K_Q4_0: return (size_t)(cols / K_QBLOCK) * 18;
  case K_Q4_1: return (size_t)(cols / K_QBLOCK) * 20;
  }
  return 0;
}
