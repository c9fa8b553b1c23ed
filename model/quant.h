/* ggml tensor types: sizes and dequantisation to fp32. */
#ifndef PRESSD_MODEL_QUANT_H
#define PRESSD_MODEL_QUANT_H

#include <stddef.h>
#include <stdint.h>

enum model_ggml_type {
  MODEL_GGML_F32 = 0, MODEL_GGML_F16 = 1, MODEL_GGML_Q4_0 = 2, MODEL_GGML_Q4_1 = 3,
  MODEL_GGML_Q5_0 = 6, MODEL_GGML_Q5_1 = 7, MODEL_GGML_Q8_0 = 8, MODEL_GGML_Q8_1 = 9,
  MODEL_GGML_Q2_K = 10, MODEL_GGML_Q3_K = 11, MODEL_GGML_Q4_K = 12, MODEL_GGML_Q5_K = 13,
  MODEL_GGML_Q6_K = 14, MODEL_GGML_Q8_K = 15, MODEL_GGML_BF16 = 30,
};

/* Name of a ggml type id ("Q4_1", ...) or "type#N" for unknown ids
 * (buf is used for the latter and must hold 16 bytes). */
const char *model_ggml_type_name(uint32_t type, char buf[16]);
/* Elements per block and bytes per block; 0 when the type is not one pressd
 * can dequantise. */
size_t model_ggml_block_elems(uint32_t type);
size_t model_ggml_block_bytes(uint32_t type);
/* Bytes for n elements of type (n must be a multiple of the block size):
 * 0 when unsupported or not a multiple, SIZE_MAX on overflow. */
size_t model_ggml_nbytes(uint32_t type, uint64_t n);
/* Dequantise n elements (a multiple of the block size). -EINVAL if the type
 * is unsupported. */
int model_dequant(uint32_t type, const void *src, float *dst, size_t n);

/* IEEE half / bfloat16 conversions. */
float model_f16_to_f32(uint16_t h);
uint16_t model_f32_to_f16(float f);
float model_bf16_to_f32(uint16_t h);
uint16_t model_f32_to_bf16(float f);

#endif
