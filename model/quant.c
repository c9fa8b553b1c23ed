/* ggml block formats and their dequantisation to fp32. Layouts follow the
 * GGUF specification: each block is a little-endian struct of scales
 * followed by packed quants. */
#include "model/quant.h"

#include "kernels/backend.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#define QK 32 /* elements per block of the Q4/Q5/Q8 legacy formats */

float model_f16_to_f32(uint16_t h) { return k_f16_to_f32(h); }

uint16_t model_f32_to_f16(float f) { return k_f32_to_f16(f); }

float model_bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

uint16_t model_f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40); /* quiet nan */
  x += 0x7fff + ((x >> 16) & 1); /* round to nearest even */
  return (uint16_t)(x >> 16);
}

const char *model_ggml_type_name(uint32_t type, char buf[16]) {
  switch (type) {
  case MODEL_GGML_F32: return "F32";
  case MODEL_GGML_F16: return "F16";
  case MODEL_GGML_BF16: return "BF16";
  case MODEL_GGML_Q4_0: return "Q4_0";
  case MODEL_GGML_Q4_1: return "Q4_1";
  case MODEL_GGML_Q5_0: return "Q5_0";
  case MODEL_GGML_Q5_1: return "Q5_1";
  case MODEL_GGML_Q8_0: return "Q8_0";
  case MODEL_GGML_Q8_1: return "Q8_1";
  case MODEL_GGML_Q2_K: return "Q2_K";
  case MODEL_GGML_Q3_K: return "Q3_K";
  case MODEL_GGML_Q4_K: return "Q4_K";
  case MODEL_GGML_Q5_K: return "Q5_K";
  case MODEL_GGML_Q6_K: return "Q6_K";
  case MODEL_GGML_Q8_K: return "Q8_K";
  default: snprintf(buf, 16, "type#%u", type); return buf;
  }
}

size_t model_ggml_block_elems(uint32_t type) {
  switch (type) {
  case MODEL_GGML_F32: case MODEL_GGML_F16: case MODEL_GGML_BF16: return 1;
  case MODEL_GGML_Q4_0: case MODEL_GGML_Q4_1: case MODEL_GGML_Q8_0: return QK;
  default: return 0;
  }
}

size_t model_ggml_block_bytes(uint32_t type) {
  switch (type) {
  case MODEL_GGML_F32: return 4;
  case MODEL_GGML_F16: case MODEL_GGML_BF16: return 2;
  case MODEL_GGML_Q4_0: return 2 + QK / 2;
  case MODEL_GGML_Q4_1: return 4 + QK / 2;
  case MODEL_GGML_Q8_0: return 2 + QK;
  default: return 0;
  }
}

size_t model_ggml_nbytes(uint32_t type, uint64_t n) {
  size_t be = model_ggml_block_elems(type), bb = model_ggml_block_bytes(type);
  if (!be || n % be) return 0;
  uint64_t blocks = n / be;
  if (blocks > SIZE_MAX / bb) return SIZE_MAX;
  return (size_t)(blocks * bb);
}

static uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

int model_dequant(uint32_t type, const void *src, float *dst, size_t n) {
  const uint8_t *p = src;
  size_t be = model_ggml_block_elems(type);
  if (!be || n % be) return -EINVAL;
  switch (type) {
  case MODEL_GGML_F32:
    memcpy(dst, src, n * sizeof(float));
    return 0;
  case MODEL_GGML_F16:
    for (size_t i = 0; i < n; i++) dst[i] = model_f16_to_f32(ld16(p + 2 * i));
    return 0;
  case MODEL_GGML_BF16:
    for (size_t i = 0; i < n; i++) dst[i] = model_bf16_to_f32(ld16(p + 2 * i));
    return 0;
  case MODEL_GGML_Q4_0:
    for (size_t b = 0; b < n / QK; b++, p += 2 + QK / 2, dst += QK) {
      float d = model_f16_to_f32(ld16(p));
      const uint8_t *qs = p + 2;
      for (int j = 0; j < QK / 2; j++) {
        dst[j] = (float)((qs[j] & 0x0f) - 8) * d;
        dst[j + QK / 2] = (float)((qs[j] >> 4) - 8) * d;
      }
    }
    return 0;
  case MODEL_GGML_Q4_1:
    for (size_t b = 0; b < n / QK; b++, p += 4 + QK / 2, dst += QK) {
      float d = model_f16_to_f32(ld16(p)), m = model_f16_to_f32(ld16(p + 2));
      const uint8_t *qs = p + 4;
      for (int j = 0; j < QK / 2; j++) {
        dst[j] = (float)(qs[j] & 0x0f) * d + m;
        dst[j + QK / 2] = (float)(qs[j] >> 4) * d + m;
      }
    }
    return 0;
  case MODEL_GGML_Q8_0:
    for (size_t b = 0; b < n / QK; b++, p += 2 + QK, dst += QK) {
      float d = model_f16_to_f32(ld16(p));
      const int8_t *qs = (const int8_t *)(p + 2);
      for (int j = 0; j < QK; j++) dst[j] = (float)qs[j] * d;
    }
    return 0;
  default:
    return -EINVAL;
  }
}
