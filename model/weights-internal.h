/* Cross-file internals of the weight loaders. */
#ifndef PRESSD_MODEL_WEIGHTS_INTERNAL_H
#define PRESSD_MODEL_WEIGHTS_INTERNAL_H

#include <stdbool.h>

#include "model/weights.h"

/* A source of tensors in GGUF naming ("blk.3.attn_q", "token_embd",
 * "output_norm", "output"): fill writes rows*cols fp32 values in row-major
 * [rows][cols] order, -ENOENT when the tensor is absent. */
typedef struct model__wsrc {
  void *ctx;
  int (*fill)(void *ctx, const char *name, int64_t rows, int64_t cols, float *dst, char *err,
              size_t errlen);
  /* Optional: the tensor as stored (shape checked), for backends that
   * compute on that type; -ENOTSUP when it has no backend type. */
  int (*view)(void *ctx, const char *name, int64_t rows, int64_t cols, k_dtype_t *type,
              const void **data, char *err, size_t errlen);
  /* The views stay valid as long as the weights (the GGUF mapping): a
   * host-memory backend then uses them in place. */
  bool view_persists;
  /* Optional: fill a tensor of type t (F32, BF16 or F16) straight in
   * backend memory (the dummy source on a backend with fill_dummy);
   * -ENOTSUP to fall back on fill. */
  int (*fill_device)(void *ctx, const char *name, int64_t rows, int64_t cols, k_backend_t *be,
                     void *dst, k_dtype_t t);
  /* Optional: divide inv_freq[i] by per-frequency factors the source carries. */
  int (*rope_factors)(void *ctx, float *inv_freq, int32_t n, char *err, size_t errlen);
} model__wsrc_t;

/* Host fp32 values to t (F32, BF16 or F16) in place: t's elements are no
 * wider, so element i lands at byte i * sizeof(t). */
void model__narrow(float *host, size_t n, k_dtype_t t);

int model__weights_load(model_weights_t *w, const model_config_t *c, const model__wsrc_t *src,
                        k_backend_t *be, char *err, size_t errlen);

#endif
