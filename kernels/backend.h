/* The compute backend interface. A backend owns device memory (weights,
 * activations, the KV arena) and runs the ops the Llama forward needs. The
 * CPU backend is the fp32 reference; the CUDA backend implements the same
 * ops. kernels/ knows nothing of models or requests: only the arrays it is
 * handed.
 *
 * Conventions: matrices are row-major; a weight W of shape [rows][cols] maps
 * an input of cols features to rows outputs (y = x · Wᵀ). All ops return 0
 * or a negative errno (-EIO: device error). */
#ifndef PRESSD_KERNELS_BACKEND_H
#define PRESSD_KERNELS_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/draw.h"

/* Weight element types. The Q types are GGML's block layouts, kept as they
 * are in the file (32 elements per block): Q8_0 = fp16 scale + 32 int8;
 * Q4_0 = fp16 scale + 16 bytes of nibbles (q - 8); Q4_1 = fp16 scale,
 * fp16 min + 16 bytes of nibbles. */
typedef enum k_dtype {
  K_F32 = 0,
  K_BF16 = 1,
  K_F16 = 2,
  K_Q8_0 = 3,
  K_Q4_0 = 4,
  K_Q4_1 = 5,
} k_dtype_t;

#define K_QBLOCK 32

/* Bytes of one row of cols elements of type t (cols a multiple of K_QBLOCK
 * for the Q types). */
size_t k_row_bytes(k_dtype_t t, int64_t cols);
/* Bytes of one element of an unquantised type (F32, BF16, F16); 0 for the Q types. */
size_t k_dtype_bytes(k_dtype_t t);

typedef struct k_weight {
  k_dtype_t type;
  int64_t rows, cols;
  void *data;    /* backend memory, owned by whoever allocated it */
  bool borrowed; /* data is a view of memory the backend does not own (a mapped file) */
  void *packed;  /* NULL, or the backend's copy in its own faster layout (weight_pack),
                    owned with the weight and freed with the backend's free */
} k_weight_t;

/* The paged KV arena: block b, slot s of the pool holds
 *   k[(b * block_size + s) * head_dim ...], v[...] likewise,
 *   score[b * block_size + s], pos[b * block_size + s].
 * One block is block_size slots of ONE KV head of ONE layer. K and V hold
 * elements of `type` (the backend's kv_type: fp32 or fp16 on the CPU, bf16
 * or fp16 on CUDA; the float pointers are reinterpreted for 16-bit types);
 * scores are fp32.
 *
 * A tensor-parallel rank's arena holds only its own KV heads' blocks: the
 * pool's ids [first_block, first_block + n_blocks), block b at index
 * b - first_block of the arrays below (first_block 0: the whole pool). The
 * sequences' block tables keep the pool's ids; kv_write and attention map
 * them. kv_move and read_rows take indices into the arrays. */
typedef struct k_kv_arena {
  int32_t n_blocks;
  int32_t block_size;
  int32_t head_dim;
  k_dtype_t type;
  float *k;       /* backend memory [n_blocks][block_size][head_dim] of type */
  float *v;       /* backend memory [n_blocks][block_size][head_dim] of type */
  float *score;   /* backend memory [n_blocks][block_size] */
  int32_t *pos;   /* backend memory [n_blocks][block_size] */
  int32_t first_block;
} k_kv_arena_t;

/* One sequence's KV in a forward step, read in place from the scheduler's
 * per-sequence bookkeeping (nothing is copied per step).
 *
 * Compression scores (ALGORITHMS.md §1) come out of the same attention
 * pass, chosen per sequence by n_obs:
 *   0   none;
 *   -1  decode: every query row of the call adds Σ_g p_g[k]² over its GQA
 *       group into score[] of every cached KV k;
 *   > 0 prefill observation window: the call's last n_obs query rows of the
 *       sequence. Per query head g, s_g[k] = Σ_q p[q][k]² is max-pooled
 *       along the head's slot order (width obs_pool, stride 1, same
 *       padding) and Σ_g s_g[k] is added into score[]. Where obs_mass is
 *       given, Σ_g maxpool(Σ_q p[q][k]) (attention mass, for per-layer
 *       budgets) is added into it per KV head; where obs_last is given it
 *       receives, per query head, p[last row][k]² (for the dynamic-budget
 *       stop). Both are indexed by the head's logical slot (the table
 *       order). A window longer than one call's rows is observed call by
 *       call: causal attention gives each query the same probabilities
 *       whatever the chunking, so only the pooling is per call. */
typedef struct k_seq_kv {
  const int32_t *blocks; /* [n_layers][n_kv_heads][stride] block tables */
  const int32_t *ctx;    /* [n_layers][n_kv_heads] slots in use, this step's new ones included */
  int32_t stride;        /* blocks per head row of blocks[] */
  int32_t n_obs;
  float *obs_mass;       /* NULL or backend memory [n_layers][n_kv_heads][stride * block_size] */
  float *obs_last;       /* NULL or backend memory [n_layers][n_q_heads][stride * block_size] */
  int32_t obs_pool;      /* max-pool width of prefill scores (odd; <= 1: none) */
} k_seq_kv_t;

/* One attention call covers one layer of a batch of sequences. Sequence s
 * owns query rows [q_start[s], q_start[s+1]); its new K/V are the last
 * q_start[s+1] - q_start[s] slots of each of its heads. Each query row
 * attends to the slots of its KV head (through the block table) whose
 * position is <= the row's position (causal; slot order need not be
 * position order).
 *
 * Under tensor parallelism a rank computes the KV heads
 * [kv_head0, kv_head0 + n_kv_heads) of kv_heads_all (0: n_kv_heads, no
 * sharding) and their query heads; q, out and the new K/V hold that rank's
 * heads only, while the sequences' tables, lengths, obs_mass and obs_last
 * keep the layout of all heads (k_attn_row gives a head's row). */
typedef struct k_attn_args {
  int32_t n_seqs;
  int32_t layer;
  int32_t n_q_heads, n_kv_heads, head_dim;
  int32_t kv_head0, kv_heads_all;
  float scale;             /* 1/sqrt(head_dim) usually */
  const float *q;          /* [n_tokens][n_q_heads][head_dim] */
  float *out;              /* [n_tokens][n_q_heads][head_dim] */
  const int32_t *q_start;  /* [n_seqs + 1] */
  const int32_t *q_pos;    /* [n_tokens] */
  const k_seq_kv_t *seqs;  /* [n_seqs] */
} k_attn_args_t;

/* Head (layer, h) of a sequence: its block table and length. */
static inline const int32_t *k_seq_table(const k_seq_kv_t *s, int32_t layer, int32_t n_kv_heads,
                                         int32_t h) {
  return s->blocks + ((int64_t)layer * n_kv_heads + h) * s->stride;
}
static inline int32_t k_seq_ctx(const k_seq_kv_t *s, int32_t layer, int32_t n_kv_heads,
                                int32_t h) {
  return s->ctx[(int64_t)layer * n_kv_heads + h];
}
/* Row (layer * kv_heads_all + kv_head0 + h) of this call's local KV head h
 * in the sequences' [n_layers][kv_heads_all] tables, lengths and obs_mass;
 * obs_last's row of local query head h * G + g is k_attn_row(a, h) * G + g. */
static inline int64_t k_attn_row(const k_attn_args_t *a, int32_t h) {
  int32_t all = a->kv_heads_all > 0 ? a->kv_heads_all : a->n_kv_heads;
  return (int64_t)a->layer * all + a->kv_head0 + h;
}
static inline const int32_t *k_attn_table(const k_attn_args_t *a, const k_seq_kv_t *s, int32_t h) {
  return s->blocks + k_attn_row(a, h) * s->stride;
}
static inline int32_t k_attn_ctx(const k_attn_args_t *a, const k_seq_kv_t *s, int32_t h) {
  return s->ctx[k_attn_row(a, h)];
}

typedef struct k_backend k_backend_t;

typedef enum k_numerics {
  K_NUMERICS_INT8 = 0,
  K_NUMERICS_EXACT = 1,
  K_NUMERICS_LLAMA = 2,
} k_numerics_t;

typedef struct k_ops {
  const char *name;
  void (*destroy)(k_backend_t *be);
  void *(*alloc)(k_backend_t *be, size_t bytes);
  void (*free)(k_backend_t *be, void *p);
  int (*upload)(k_backend_t *be, void *dst, const void *src, size_t bytes);
  int (*download)(k_backend_t *be, void *dst, const void *src, size_t bytes);
  int (*sync)(k_backend_t *be);

  /* y[m][w.rows] = x[m][w.cols] · wᵀ */
  int (*matmul)(k_backend_t *be, float *y, const float *x, const k_weight_t *w, int64_t m);
  /* Optional (NULL: n matmul calls): y[i][m][w[i].rows] = x · w[i]ᵀ for n
   * weights of the same cols, bit for bit what n matmul calls give; a
   * backend may share the work on x (the CPU quantises it once). */
  int (*matmul_n)(k_backend_t *be, float *const *y, const float *x, const k_weight_t *const *w,
                  int n, int64_t m);
  /* y[m][n] = x / rms(x) * g, per row */
  int (*rmsnorm)(k_backend_t *be, float *y, const float *x, const float *g, int64_t m,
                 int64_t n, float eps);
  /* Rotate pairs (x[2i], x[2i+1]) of every head of every row by
   * pos[row] * inv_freq[i]  (GGML "normal" RoPE, as Llama GGUFs use).
   * inv_freq has head_dim/2 + 1 entries: the last is the ratio r when the
   * frequencies are the geometric progression r^i (0 when they are not), for
   * backends that compute the angles by GGML's recurrence. */
  int (*rope)(k_backend_t *be, float *x, const int32_t *pos, int64_t m, int32_t n_heads,
              int32_t head_dim, const float *inv_freq);
  /* y[i] = silu(gate[i]) * up[i] for a [m][n] pair laid out as two arrays */
  int (*silu_mul)(k_backend_t *be, float *y, const float *gate, const float *up, int64_t n);
  /* y[i] += x[i] */
  int (*add)(k_backend_t *be, float *y, const float *x, int64_t n);
  /* y[m][table.cols] = table[ids[m]] */
  int (*embed)(k_backend_t *be, float *y, const k_weight_t *table, const int32_t *ids, int64_t m);
  /* Write the new K and V ([n_tokens][n_kv_heads][head_dim], rows as in
   * a) into the last slots of each sequence's heads at layer a->layer,
   * recording each row's position and a zero score. */
  int (*kv_write)(k_backend_t *be, const k_kv_arena_t *kv, const float *k, const float *v,
                  const k_attn_args_t *a);
  int (*attention)(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a);
  /* Optional (NULL: not needed): called once per forward step before the
   * first layer's kv_write with the step's arguments (a->layer 0), so that a
   * device backend can copy the block tables, lengths and row offsets to the
   * device once per step instead of once per layer. The tables do not
   * change until the step's last attention call returns. */
  int (*attn_prepare)(k_backend_t *be, const k_attn_args_t *a);
  /* Optional (NULL: nothing to do): give a loaded matrix w->packed, a copy
   * in a layout the backend's matmul is faster on, where it has one for w's
   * type and shape and its arithmetic (0 and no copy otherwise). A borrowed
   * w->data stays valid; unless data_read (other ops still read it, as
   * embed reads a tied embedding table), the backend may drop its pages
   * from memory. */
  int (*weight_pack)(k_backend_t *be, k_weight_t *w, bool data_read);
  /* Optional (NULL: the caller generates on the host): fill n elements of
   * type t (F32, BF16 or F16) at dst with offset + model_dummy_value(seed,
   * tensor, i, scale) for i in [first, first + n), computed on the device. */
  int (*fill_dummy)(k_backend_t *be, void *dst, k_dtype_t t, int64_t first, int64_t n,
                    uint64_t seed, uint32_t tensor, float scale, float offset);
  /* Optional (NULL: always healthy): 0 while the backend can go on after
   * an op failed; -EIO once it cannot (a sticky device error: only a new
   * process recovers). */
  int (*health)(k_backend_t *be);
  /* Optional (NULL: host memory, not sized by the backend): the device's
   * free and total memory in bytes. */
  int (*mem_info)(k_backend_t *be, size_t *free_bytes, size_t *total_bytes);
  /* Compaction: slot dst[i] receives the K, V, score and position of slot
   * src[i]. No slot is both a source and a destination. */
  int (*kv_move)(k_backend_t *be, const k_kv_arena_t *kv, const int32_t *src,
                 const int32_t *dst, int64_t n);
  /* Optional (NULL: the caller reads the rows back): ids[i] = the token
   * drawn from row i of x[m][n] as draws[i] says (kernels/draw.h: the
   * argmax, or a Gumbel-max draw with temperature, top-k, top-p and
   * min-p); draws is a
   * host array, NULL for the argmax of every row. ids is backend memory.
   * Decoding without copying the logits off the device. */
  int (*sample)(k_backend_t *be, int32_t *ids, const float *x, int64_t m, int64_t n,
                const k_draw_t *draws);
  /* Optional (NULL: penalised rows are drawn on the host): row i of
   * x[m][n] (backend memory) has the logits of the ids rows[i] lists
   * rewritten by k_draw_penalise (kernels/draw.h); rows, ids and seen are
   * host arrays. Before sample, so that penalised requests draw on the
   * device too. */
  int (*penalize)(k_backend_t *be, float *x, int64_t m, int64_t n, const k_penalty_t *rows,
                  const int32_t *ids, const int32_t *seen);
  /* Optional (NULL: rows that ask for log-probabilities come back to the
   * host): out[i] = the log-probabilities (kernels/draw.h) of row i of
   * x[m][n] (backend memory) for the id ids[i] (backend memory: as sample
   * drew it) and the top want[i], for every row with want[i] >= 0; want
   * and out are host arrays, other rows' out untouched. Returns once out
   * holds them. */
  int (*logprobs)(k_backend_t *be, k_logprobs_t *out, const float *x, int64_t m, int64_t n,
                  const int32_t *ids, const int32_t *want);
  /* Optional (NULL: host memory only; see host_memory): row i of dst (host
   * memory, n * row_bytes) = row rows[i] of src (backend memory), for
   * n rows of row_bytes (a multiple of 4); rows is a host array, each
   * within src. Returns once dst holds them. The compression planner reads
   * a sequence's scores and positions through it. */
  int (*read_rows)(k_backend_t *be, void *dst, const void *src, const int32_t *rows, int64_t n,
                   size_t row_bytes);
  /* Optional (NULL: the caller runs fn(ctx) itself): fn(ctx) as a graph
   * of the work it queues (CUDA graphs). The first call under a key runs
   * fn; the second captures what it queues and launches the capture; later
   * calls launch it again, without calling fn. So fn may only queue ops of
   * this backend that read and write backend memory (matmul, rmsnorm,
   * rope, silu_mul, add, embed): no allocation, copy, sync, sampling or
   * attention; and every call under one key must queue the same ops on
   * the same buffers with the same sizes (what the buffers hold may
   * change). */
  int (*replay)(k_backend_t *be, uint64_t key, int (*fn)(void *ctx), void *ctx);
  /* Optional (with replay): forget every key (buffers are to be freed). */
  void (*replay_drop)(k_backend_t *be);
} k_ops_t;

struct k_backend {
  const k_ops_t *ops;
  uint32_t weight_types; /* bit (1 << k_dtype_t) for every type matmul/embed accept */
  /* CPU arithmetic (other backends ignore it):
   *  K_NUMERICS_INT8  quantised weights (Q8_0/Q4_0/Q4_1) run on activations
   *                   quantised to int8 per 32-block with integer dot
   *                   products, as llama.cpp's matmuls do; batch-invariant.
   *  K_NUMERICS_EXACT fp32 activations everywhere: the model computed
   *                   exactly up to float rounding; batch-invariant.
   *  K_NUMERICS_LLAMA llama.cpp's CPU arithmetic bit for bit (AVX-512 builds):
   *                   int8 matmuls plus fp16 K/V, its expf, RMSNorm, RoPE
   *                   recurrence and attention kernels. Like llama.cpp it is
   *                   NOT batch-invariant (one-token and multi-token batches
   *                   use different attention reductions): for reference
   *                   comparisons, not for serving. */
  k_numerics_t numerics;
  /* Element type of the KV arena's K and V (K_F32 on the CPU, K_BF16 on
   * CUDA, as created), and the types it may be set to before an arena is
   * made (k_backend_set_kv_type): a bit 1u << type each. */
  k_dtype_t kv_type;
  uint32_t kv_types;
  /* Type the loaders store unquantised and dequantised matrices in when the
   * backend does not compute on the file's type (K_F32 on the CPU, K_BF16
   * on CUDA); norms and RoPE tables stay fp32. */
  k_dtype_t dense_type;
  /* Backend memory is ordinary host memory: weights can be used straight
   * from a memory-mapped model file instead of being copied. */
  bool host_memory;
  void *impl;      /* owns: backend-private state */
  int32_t threads;
};

typedef enum k_device { K_DEVICE_AUTO = 0, K_DEVICE_CPU, K_DEVICE_CUDA } k_device_t;

/* Create a backend. threads <= 0 means the number of online CPUs. -ENODEV
 * when CUDA is asked for and unavailable. err gets a one-line message. */
int k_backend_new(k_backend_t **out, k_device_t dev, int32_t threads, char *err, size_t errlen);
void k_backend_free(k_backend_t *be); /* NULL-safe */
/* IEEE half to float and back (rounded to nearest even; overflow gives inf,
 * NaN stays NaN). */
float k_f16_to_f32(uint16_t h);
uint16_t k_f32_to_f16(float f);
/* The type later KV arenas hold K and V in: -ENOTSUP where be cannot hold
 * them in t (its kv_types lack it). Arenas made before keep theirs. */
int k_backend_set_kv_type(k_backend_t *be, k_dtype_t t);

int k_cpu_backend_new(k_backend_t **out, int32_t threads);

/* Which device a CUDA backend drives (k_backend_new picks device 0). */
int k_backend_new_cuda(k_backend_t **out, int32_t device, char *err, size_t errlen);

#endif
