// The CUDA backend: device, stream, memory, GEMMs and element-wise ops.
//
// Every op is queued on the backend's one non-blocking stream; download and
// sync wait for it. Device errors go through kc_check: the first one sticks
// in c->error and every later op returns -EIO. cuBLASLt is opened with
// dlopen (pressd starts where no CUDA library is installed); only the static
// CUDA runtime is linked in.
//
// Numerics: activations are fp32 in memory. A matmul on 16-bit weights
// rounds its input rows to the weight's type (round to nearest even) and
// accumulates the exact products in fp32; fp32 weights run in plain fp32
// (no TF32). RMSNorm sums squares in double as the CPU reference does; RoPE,
// SiLU and the conversions follow kernels/cpu/cpu.c operation by operation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublasLt.h> /* types only: the functions are resolved with dlsym */

#include "kernels/cuda/cuda-internal.h"

extern "C" {
#include "kernels/cuda/cuda.h"
}

#define KC_WORKSPACE (32u << 20) /* cuBLASLt workspace per backend */
#define KC_THREADS 256           /* element-wise kernels */
#define KC_PLANS 64              /* cached cuBLASLt matmul plans */
#define KC_GEMV_WARPS 4          /* warps (weight rows) per matrix-vector block */
#define KC_GEMV_MAX_M 4          /* the matrix-vector kernel's largest batch */
#define KC_STAGE (1u << 20)      /* pinned staging for small uploads */
#define KC_STAGE_MAX (256u << 10) /* larger uploads copy synchronously */

/* ---- cuBLASLt, opened at run time ------------------------------------------ */

typedef struct lt_api {
  decltype(&cublasLtCreate) create;
  decltype(&cublasLtDestroy) destroy;
  decltype(&cublasLtMatmulDescCreate) desc_create;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set;
  decltype(&cublasLtMatrixLayoutCreate) layout_create;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy;
  decltype(&cublasLtMatmul) matmul;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic;
} lt_api_t;

static pthread_mutex_t lt_mu = PTHREAD_MUTEX_INITIALIZER;
static lt_api_t lt;         /* resolved once per process, never closed */
static bool lt_ready;

#define LT_ENV "PRESSD_CUDA_LIB_DIR"

/* Open cuBLASLt: $PRESSD_CUDA_LIB_DIR first, then the loader's search path;
 * CUDA 13's library, then CUDA 12's (same entry points), then the
 * unversioned name. */
static int lt_load(char *err, size_t errlen) {
  pthread_mutex_lock(&lt_mu);
  if (lt_ready) {
    pthread_mutex_unlock(&lt_mu);
    return 0;
  }
  static const char *const names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
  const size_t n_names = sizeof names / sizeof *names;
  const char *dir = getenv(LT_ENV);
  void *h = NULL;
  char path[4096];
  for (size_t i = 0; !h && dir && *dir && i < n_names; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  }
  for (size_t i = 0; !h && i < n_names; i++) h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    pthread_mutex_unlock(&lt_mu);
    snprintf(err, errlen,
             "CUDA: cannot load the cuBLASLt library (libcublasLt.so.13 or .so.12): set " LT_ENV
             " to the directory that holds it, or add that directory to LD_LIBRARY_PATH");
    return -ENODEV;
  }
  lt_api_t a;
  const char *missing = NULL;
#define LT_SYM(field, name)                                                        \
  if (!missing && !(a.field = reinterpret_cast<decltype(a.field)>(dlsym(h, #name))))  \
    missing = #name;
  LT_SYM(create, cublasLtCreate)
  LT_SYM(destroy, cublasLtDestroy)
  LT_SYM(desc_create, cublasLtMatmulDescCreate)
  LT_SYM(desc_destroy, cublasLtMatmulDescDestroy)
  LT_SYM(desc_set, cublasLtMatmulDescSetAttribute)
  LT_SYM(layout_create, cublasLtMatrixLayoutCreate)
  LT_SYM(layout_destroy, cublasLtMatrixLayoutDestroy)
  LT_SYM(matmul, cublasLtMatmul)
  LT_SYM(pref_create, cublasLtMatmulPreferenceCreate)
  LT_SYM(pref_set, cublasLtMatmulPreferenceSetAttribute)
  LT_SYM(pref_destroy, cublasLtMatmulPreferenceDestroy)
  LT_SYM(heuristic, cublasLtMatmulAlgoGetHeuristic)
#undef LT_SYM
  if (missing) {
    dlclose(h);
    pthread_mutex_unlock(&lt_mu);
    snprintf(err, errlen, "CUDA: the cuBLASLt library found lacks %s (set " LT_ENV
             " to a CUDA 12 or 13 library directory)", missing);
    return -ENODEV;
  }
  lt = a;
  lt_ready = true;
  pthread_mutex_unlock(&lt_mu);
  return 0;
}

/* ---- backend state --------------------------------------------------------- */

/* One cached cuBLASLt matmul: descriptors and the heuristic's algorithm for
 * a shape, a weight type and the alignments of the three pointers. */
typedef struct mm_plan {
  bool used;
  int64_t m, rows, cols;
  k_dtype_t type;
  uint32_t align_w, align_x, align_y;
  cublasLtMatmulDesc_t desc;    /* owns */
  cublasLtMatrixLayout_t lw, lx, ly; /* owns */
  cublasLtMatmulAlgo_t algo;
} mm_plan_t;

/* A key of replay: seen once (its work ran eagerly), or captured. */
typedef struct kc_graph {
  uint64_t key;
  cudaGraphExec_t exec; /* owns, once captured */
  int state;            /* 0: free slot, 1: seen, 2: captured */
} kc_graph_t;
#define KC_GRAPHS 8192

/* cuda.cu's part of kc_t (c->blas). */
typedef struct kc_core {
  cublasLtHandle_t lt;  /* owns */
  void *ws;             /* owns: cuBLASLt workspace, KC_WORKSPACE bytes */
  void *x16;            /* owns: matmul inputs converted to 16 bits */
  size_t x16_cap;
  int32_t *idx;         /* owns: kv_move's slot lists */
  size_t idx_cap;
  int32_t *ridx;        /* owns: read_rows' row list */
  size_t ridx_cap;
  void *rbuf;           /* owns: read_rows' gathered rows */
  size_t rbuf_cap;
  k_draw_t *draws;      /* owns: sample's per-row draws */
  size_t draws_cap;
  char *pen;            /* owns: penalize's rows, then their ids and seen */
  size_t pen_cap;
  char *lp;             /* owns: logprobs' row list and wants, then its results */
  size_t lp_cap;
  char *stage;          /* owns: pinned host memory, KC_STAGE bytes (NULL: none) */
  size_t stage_off;     /* next free byte of stage */
  cudaEvent_t stage_ev; /* owns: after the last copy out of stage */
  bool stage_used;
  mm_plan_t plans[KC_PLANS];
  int32_t next_plan;    /* round-robin victim when the cache is full */
  int32_t sms;          /* multiprocessors */
  int32_t gemv_max_m;
  kc_graph_t *graphs;   /* owns: [KC_GRAPHS] replay's keys, open addressing (NULL: none yet) */
  bool graphs_off;      /* a capture failed: replay runs its work eagerly from then on */
  cudaEvent_t t0, t1;   /* owns (created on first use): the benchmark timer */
  char msg[192];        /* a cuBLASLt failure, for k_cuda_error_string */
} kc_core_t;

static kc_core_t *core_of(kc_t *c) { return (kc_core_t *)c->blas; }

int kc_check(kc_t *c, cudaError_t rc) {
  if (rc == cudaSuccess) return 0;
  if (c && c->capturing) {
    if (c->capture_error == cudaSuccess) c->capture_error = rc;
  } else if (c && c->error == cudaSuccess) {
    c->error = rc;
  }
  return -EIO;
}

int kc_enter(kc_t *c) {
  if (c->error != cudaSuccess) return -EIO;
  return kc_check(c, cudaSetDevice(c->device));
}

/* A cuBLASLt failure: sticks like a device error, with its message kept. */
static int blas_fail(kc_t *c, const char *what, cublasStatus_t st, int64_t m, int64_t rows,
                     int64_t cols) {
  kc_core_t *k = core_of(c);
  if (c->error == cudaSuccess)
    snprintf(k->msg, sizeof k->msg, "cuBLASLt: %s failed with status %d (m %lld, %lld x %lld)",
             what, (int)st, (long long)m, (long long)rows, (long long)cols);
  return kc_check(c, cudaErrorUnknown);
}

/* Kernel launch errors (bad configuration, a fault already seen). */
static int launched(kc_t *c) { return kc_check(c, cudaGetLastError()); }

/* Blocks for a grid-stride loop over n items. */
static unsigned grid_for(kc_t *c, int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads, cap = (int64_t)core_of(c)->sms * 32;
  if (b > cap) b = cap;
  return (unsigned)(b > 0 ? b : 1);
}

static bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Bytes of one element of an unquantised type; 0 for the others. */
static size_t el_bytes(k_dtype_t t) {
  return t == K_F32 ? 4 : t == K_BF16 || t == K_F16 ? 2 : 0;
}

/* Grow a device scratch buffer to at least `bytes`. Queued work may still
 * read the old buffer: the stream is drained before it is freed. */
static void graphs_forget(kc_core_t *k);

static int scratch_reserve(kc_t *c, void **p, size_t *cap, size_t bytes) {
  if (bytes <= *cap) return 0;
  if (*p) {
    if (kc_check(c, cudaStreamSynchronize(c->stream))) return -EIO;
    graphs_forget(core_of(c)); /* captures may hold the old buffer */
    cudaFree(*p);
    *p = NULL;
    *cap = 0;
  }
  size_t want = bytes < (1u << 20) ? (1u << 20) : bytes + bytes / 4;
  if (cudaMalloc(p, want) != cudaSuccess) {
    cudaGetLastError(); /* out of memory is not a device fault */
    *p = NULL;
    return -ENOMEM;
  }
  *cap = want;
  return 0;
}

/* ---- memory ---------------------------------------------------------------- */

static void *kc_alloc(k_backend_t *be, size_t bytes) {
  kc_t *c = kc_of(be);
  if (kc_enter(c)) return NULL;
  void *p = NULL;
  cudaError_t rc = cudaMalloc(&p, bytes ? bytes : 256);
  if (rc == cudaSuccess) return p;
  cudaGetLastError();
  if (rc != cudaErrorMemoryAllocation) kc_check(c, rc);
  return NULL;
}

static void kc_free(k_backend_t *be, void *p) {
  kc_t *c = kc_of(be);
  if (!p) return;
  cudaSetDevice(c->device);
  cudaStreamSynchronize(c->stream); /* queued work may still use p */
  cudaFree(p);
  cudaGetLastError();
}

/* Host to device. A small copy goes through the pinned staging buffer and
 * stays asynchronous: the caller may reuse src at once, and the buffer is
 * reused from its start only once the stream has passed the last copy out
 * of it. A large one (weights) is waited for. */
static int copy_in(kc_t *c, void *dst, const void *src, size_t bytes) {
  kc_core_t *k = core_of(c);
  int rc;
  if (!bytes) return 0;
  if (bytes > KC_STAGE_MAX || !k->stage) {
    if ((rc = kc_check(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream))))
      return rc;
    return kc_check(c, cudaStreamSynchronize(c->stream));
  }
  const size_t need = (bytes + 255) & ~(size_t)255;
  if (k->stage_off + need > KC_STAGE) {
    if (k->stage_used && kc_check(c, cudaEventSynchronize(k->stage_ev))) return -EIO;
    k->stage_off = 0;
  }
  char *p = k->stage + k->stage_off;
  memcpy(p, src, bytes);
  k->stage_off += need;
  k->stage_used = true;
  if ((rc = kc_check(c, cudaMemcpyAsync(dst, p, bytes, cudaMemcpyHostToDevice, c->stream))))
    return rc;
  return kc_check(c, cudaEventRecord(k->stage_ev, c->stream));
}

static int kc_upload(k_backend_t *be, void *dst, const void *src, size_t bytes) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  return rc ? rc : copy_in(c, dst, src, bytes);
}

static int kc_download(k_backend_t *be, void *dst, const void *src, size_t bytes) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (bytes && (rc = kc_check(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost,
                                                 c->stream))))
    return rc;
  return kc_check(c, cudaStreamSynchronize(c->stream));
}

static int kc_sync(k_backend_t *be) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc) return rc;
  return kc_check(c, cudaStreamSynchronize(c->stream));
}

/* ---- 16-bit conversions ------------------------------------------------------ */

/* f rounded to T (nearest even), as a float. */
template <typename T> __device__ __forceinline__ float round_to(float f);
template <> __device__ __forceinline__ float round_to<__nv_bfloat16>(float f) {
  return __bfloat162float(__float2bfloat16_rn(f));
}
template <> __device__ __forceinline__ float round_to<__half>(float f) {
  return __half2float(__float2half_rn(f));
}

/* The two 16-bit elements of a 32-bit word (the lower address first). */
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t u);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
  __half2 h;
  memcpy(&h, &u, sizeof h);
  return __half22float2(h);
}

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float f) {
  return __float2bfloat16_rn(f);
}
template <> __device__ __forceinline__ __half from_float<__half>(float f) {
  return __float2half_rn(f);
}

/* model/quant.c's model_f32_to_bf16 and model_f32_to_f16, bit for bit
 * (NaNs included), for the dummy weights. */
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) {
  uint32_t x = __float_as_uint(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  int32_t exp = (int32_t)((x >> 23) & 0xffu) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (((x >> 23) & 0xffu) == 0xffu) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u));
  if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return (uint16_t)sign;
    mant |= 0x800000u;
    uint32_t shift = (uint32_t)(14 - exp);
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t mid = 1u << (shift - 1u);
    if (rem > mid || (rem == mid && (half & 1u))) half++;
    return (uint16_t)(sign | half);
  }
  uint32_t half = sign | ((uint32_t)exp << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++;
  return (uint16_t)half;
}

/* ---- matmul ------------------------------------------------------------------ */

/* y[m][rows] = x[m][cols] · wᵀ for m <= KC_GEMV_MAX_M on 16-bit weights: one
 * warp per weight row, 16-byte loads of the row (streamed: each weight is
 * read once per call), the activations read as fp32 (cached: every warp
 * reads them) and rounded to T as the cuBLASLt path rounds them. The
 * products of two 16-bit values are exact in fp32; each lane sums its
 * columns in order, then the warp adds the 32 lanes up by a butterfly.
 * Requires cols % 8 == 0 and 16-byte aligned x and w (nv = cols / 8). */
template <typename T>
__device__ __forceinline__ float dot8(uint4 w, const float4 *x, float acc) {
  float4 p = __ldg(x), q = __ldg(x + 1);
  float2 w01 = unpack2<T>(w.x), w23 = unpack2<T>(w.y), w45 = unpack2<T>(w.z),
         w67 = unpack2<T>(w.w);
  acc = fmaf(w01.x, round_to<T>(p.x), acc);
  acc = fmaf(w01.y, round_to<T>(p.y), acc);
  acc = fmaf(w23.x, round_to<T>(p.z), acc);
  acc = fmaf(w23.y, round_to<T>(p.w), acc);
  acc = fmaf(w45.x, round_to<T>(q.x), acc);
  acc = fmaf(w45.y, round_to<T>(q.y), acc);
  acc = fmaf(w67.x, round_to<T>(q.z), acc);
  acc = fmaf(w67.y, round_to<T>(q.w), acc);
  return acc;
}

template <typename T, int M>
__global__ void __launch_bounds__(KC_GEMV_WARPS * 32)
    gemv_kernel(float *y, const float *x, const uint4 *w, int64_t rows, int64_t nv) {
  const int lane = threadIdx.x & 31;
  const int64_t r = (int64_t)blockIdx.x * KC_GEMV_WARPS + (threadIdx.x >> 5);
  if (r >= rows) return; /* a whole warp leaves together */
  const uint4 *wr = w + r * nv;
  const float4 *xv = reinterpret_cast<const float4 *>(x); /* row i, vector v: xv + 2 (i nv + v) */
  float acc[M];
#pragma unroll
  for (int i = 0; i < M; i++) acc[i] = 0.0f;
  int64_t v = lane;
  for (; v + 96 < nv; v += 128) { /* four loads in flight per lane */
    uint4 wv[4];
#pragma unroll
    for (int s = 0; s < 4; s++) wv[s] = __ldcs(wr + v + 32 * s);
#pragma unroll
    for (int s = 0; s < 4; s++)
#pragma unroll
      for (int i = 0; i < M; i++) acc[i] = dot8<T>(wv[s], xv + 2 * (i * nv + v + 32 * s), acc[i]);
  }
  for (; v < nv; v += 32) {
    uint4 wv = __ldcs(wr + v);
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = dot8<T>(wv, xv + 2 * (i * nv + v), acc[i]);
  }
#pragma unroll
  for (int i = 0; i < M; i++)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < M; i++) y[i * rows + r] = acc[i];
}

template <typename T>
static void gemv_launch(kc_t *c, float *y, const float *x, const k_weight_t *w, int64_t m) {
  const int64_t nv = w->cols / 8;
  const unsigned blocks = (unsigned)((w->rows + KC_GEMV_WARPS - 1) / KC_GEMV_WARPS);
  const uint4 *wd = (const uint4 *)w->data;
  switch (m) {
  case 1: gemv_kernel<T, 1><<<blocks, KC_GEMV_WARPS * 32, 0, c->stream>>>(y, x, wd, w->rows, nv); break;
  case 2: gemv_kernel<T, 2><<<blocks, KC_GEMV_WARPS * 32, 0, c->stream>>>(y, x, wd, w->rows, nv); break;
  case 3: gemv_kernel<T, 3><<<blocks, KC_GEMV_WARPS * 32, 0, c->stream>>>(y, x, wd, w->rows, nv); break;
  default: gemv_kernel<T, 4><<<blocks, KC_GEMV_WARPS * 32, 0, c->stream>>>(y, x, wd, w->rows, nv); break;
  }
}

/* x (fp32) to T, element by element. */
template <typename T> __global__ void to16_kernel(T *y, const float *x, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    y[i] = from_float<T>(x[i]);
}

/* The largest power of two (at most 256) dividing the address and the row
 * stride: what the heuristic may assume of a matrix. */
static uint32_t align_of(const void *p, size_t row_bytes) {
  uintptr_t a = (uintptr_t)p | (uintptr_t)row_bytes | 256u;
  return (uint32_t)(a & (~a + 1u));
}

static void plan_release(mm_plan_t *p) {
  if (p->desc) lt.desc_destroy(p->desc);
  if (p->lw) lt.layout_destroy(p->lw);
  if (p->lx) lt.layout_destroy(p->lx);
  if (p->ly) lt.layout_destroy(p->ly);
  memset(p, 0, sizeof *p);
}

/* Layout. cuBLASLt's matrices are column-major. A row-major [r][c] array is
 * the column-major c x r matrix with leading dimension c, i.e. its
 * transpose. So, with W row-major [rows][cols], x [m][cols], y [m][rows]:
 *   A = W  stored as the column-major cols x rows matrix (ld cols), = Wᵀ;
 *   B = x  stored as the column-major cols x m matrix (ld cols), = xᵀ;
 *   D = y  stored as the column-major rows x m matrix (ld rows), = yᵀ.
 * y = x · Wᵀ  <=>  yᵀ = W · xᵀ  =  op(A) · B with op(A) = Aᵀ (TRANSA = T,
 * TRANSB = N): D(r, i) = Σ_c A(c, r) B(c, i) = Σ_c W[r][c] x[i][c]. */
static mm_plan_t *plan_get(kc_t *c, int64_t m, const k_weight_t *w, const void *xb, float *y,
                           int *rc) {
  kc_core_t *k = core_of(c);
  const size_t el = el_bytes(w->type);
  const uint32_t aw = align_of(w->data, (size_t)w->cols * el);
  const uint32_t ax = align_of(xb, (size_t)w->cols * el);
  const uint32_t ay = align_of(y, (size_t)w->rows * sizeof(float));
  for (int32_t i = 0; i < KC_PLANS; i++) {
    mm_plan_t *p = &k->plans[i];
    if (p->used && p->m == m && p->rows == w->rows && p->cols == w->cols && p->type == w->type &&
        p->align_w == aw && p->align_x == ax && p->align_y == ay)
      return p;
  }
  mm_plan_t *p = &k->plans[k->next_plan];
  k->next_plan = (k->next_plan + 1) % KC_PLANS;
  plan_release(p);
  const cudaDataType_t ab =
      w->type == K_BF16 ? CUDA_R_16BF : w->type == K_F16 ? CUDA_R_16F : CUDA_R_32F;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  const uint64_t ws = KC_WORKSPACE;
  cublasLtMatmulPreference_t pref = NULL;
  cublasLtMatmulHeuristicResult_t res;
  int found = 0;
  const char *what = "cublasLtMatmulDescCreate";
  cublasStatus_t st = lt.desc_create(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  if (st == CUBLAS_STATUS_SUCCESS) {
    what = "cublasLtMatmulDescSetAttribute";
    st = lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
  }
  if (st == CUBLAS_STATUS_SUCCESS)
    st = lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
  if (st == CUBLAS_STATUS_SUCCESS) {
    what = "cublasLtMatrixLayoutCreate";
    st = lt.layout_create(&p->lw, ab, (uint64_t)w->cols, (uint64_t)w->rows, w->cols);
  }
  if (st == CUBLAS_STATUS_SUCCESS)
    st = lt.layout_create(&p->lx, ab, (uint64_t)w->cols, (uint64_t)m, w->cols);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = lt.layout_create(&p->ly, CUDA_R_32F, (uint64_t)w->rows, (uint64_t)m, w->rows);
  if (st == CUBLAS_STATUS_SUCCESS) {
    what = "cublasLtMatmulPreference";
    st = lt.pref_create(&pref);
  }
  if (st == CUBLAS_STATUS_SUCCESS)
    st = lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aw, sizeof aw);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ax, sizeof ax);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ay, sizeof ay);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ay, sizeof ay);
  if (st == CUBLAS_STATUS_SUCCESS) {
    what = "cublasLtMatmulAlgoGetHeuristic";
    st = lt.heuristic(k->lt, p->desc, p->lw, p->lx, p->ly, p->ly, pref, 1, &res, &found);
  }
  if (pref) lt.pref_destroy(pref);
  if (st == CUBLAS_STATUS_SUCCESS && found < 1) st = CUBLAS_STATUS_NOT_SUPPORTED;
  if (st != CUBLAS_STATUS_SUCCESS) {
    plan_release(p);
    *rc = blas_fail(c, what, st, m, w->rows, w->cols);
    return NULL;
  }
  p->used = true;
  p->m = m;
  p->rows = w->rows;
  p->cols = w->cols;
  p->type = w->type;
  p->align_w = aw;
  p->align_x = ax;
  p->align_y = ay;
  p->algo = res.algo;
  return p;
}

static int kc_matmul(k_backend_t *be, float *y, const float *x, const k_weight_t *w, int64_t m) {
  kc_t *c = kc_of(be);
  kc_core_t *k = core_of(c);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (w->type != K_F32 && w->type != K_BF16 && w->type != K_F16) return -EINVAL;
  if (m < 0 || w->rows < 0 || w->cols < 0) return -EINVAL;
  if (m == 0 || w->rows == 0) return 0;
  if (w->cols == 0) return kc_check(c, cudaMemsetAsync(y, 0, (size_t)(m * w->rows) * sizeof(float),
                                                       c->stream));
  const bool half = w->type != K_F32;
  if (half && m <= k->gemv_max_m && w->cols % 8 == 0 && aligned16(x) && aligned16(w->data)) {
    if (w->type == K_BF16) gemv_launch<__nv_bfloat16>(c, y, x, w, m);
    else gemv_launch<__half>(c, y, x, w, m);
    return launched(c);
  }
  const void *xb = x;
  if (half) { /* the activations in the weight's type */
    const int64_t n = m * w->cols;
    if ((rc = scratch_reserve(c, &k->x16, &k->x16_cap, (size_t)n * 2))) return rc;
    if (w->type == K_BF16)
      to16_kernel<<<grid_for(c, n, KC_THREADS), KC_THREADS, 0, c->stream>>>(
          (__nv_bfloat16 *)k->x16, x, n);
    else
      to16_kernel<<<grid_for(c, n, KC_THREADS), KC_THREADS, 0, c->stream>>>((__half *)k->x16, x,
                                                                             n);
    if ((rc = launched(c))) return rc;
    xb = k->x16;
  }
  mm_plan_t *p = plan_get(c, m, w, xb, y, &rc);
  if (!p) return rc;
  const float alpha = 1.0f, beta = 0.0f;
  cublasStatus_t st = lt.matmul(k->lt, p->desc, &alpha, w->data, p->lw, xb, p->lx, &beta, y,
                                p->ly, y, p->ly, &p->algo, k->ws, KC_WORKSPACE, c->stream);
  if (st != CUBLAS_STATUS_SUCCESS) return blas_fail(c, "cublasLtMatmul", st, m, w->rows, w->cols);
  return launched(c);
}

/* ---- element-wise ops ---------------------------------------------------------- */

/* Sum over the block (blockDim.x a multiple of 32); every thread gets it. */
__device__ double block_sum(double v) {
  __shared__ double part[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < nw ? part[lane] : 0.0;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* One row per block. As cpu.c: squares summed in double, scale =
 * (float)(1 / sqrt(mean + eps)), y = x * scale * g in float. Each element is
 * read and then written by the same thread, so y may be x. */
__global__ void rmsnorm_kernel(float *y, const float *x, const float *g, int64_t n, float eps) {
  const float *xr = x + (int64_t)blockIdx.x * n;
  float *yr = y + (int64_t)blockIdx.x * n;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += (double)xr[i] * (double)xr[i];
  ss = block_sum(ss);
  const float scale = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * scale * g[i];
}

static int kc_rmsnorm(k_backend_t *be, float *y, const float *x, const float *g, int64_t m,
                      int64_t n, float eps) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (m < 0 || n < 0 || m > INT32_MAX) return -EINVAL;
  if (m == 0 || n == 0) return 0;
  rmsnorm_kernel<<<(unsigned)m, KC_THREADS, 0, c->stream>>>(y, x, g, n, eps);
  return launched(c);
}

/* One thread per pair (row, head, i): theta = (float)pos[row] * inv_freq[i]
 * in float as cpu.c computes it (not GGML's recurrence). */
__global__ void rope_kernel(float *x, const int32_t *pos, int64_t pairs, int32_t n_heads,
                            int32_t half, const float *inv_freq) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs;
       p += (int64_t)gridDim.x * blockDim.x) {
    const int32_t i = (int32_t)(p % half);
    const int64_t rh = p / half; /* row * n_heads + head */
    const float theta = (float)pos[rh / n_heads] * inv_freq[i];
    float sn, cs;
    sincosf(theta, &sn, &cs);
    float *v = x + rh * 2 * half + 2 * i;
    const float x0 = v[0], x1 = v[1];
    v[0] = x0 * cs - x1 * sn;
    v[1] = x0 * sn + x1 * cs;
  }
}

static int kc_rope(k_backend_t *be, float *x, const int32_t *pos, int64_t m, int32_t n_heads,
                   int32_t head_dim, const float *inv_freq) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (head_dim <= 0 || head_dim % 2 || n_heads < 0 || m < 0) return -EINVAL;
  const int64_t pairs = m * n_heads * (head_dim / 2);
  if (pairs == 0) return 0;
  rope_kernel<<<grid_for(c, pairs, KC_THREADS), KC_THREADS, 0, c->stream>>>(
      x, pos, pairs, n_heads, head_dim / 2, inv_freq);
  return launched(c);
}

/* Element-wise kernels: float4 over the first n4 groups when every pointer
 * is 16-byte aligned (n4 = 0 otherwise), then single floats. */
__device__ __forceinline__ float silu_mul1(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__global__ void silu_mul_kernel(float *y, const float *g, const float *u, int64_t n, int64_t n4) {
  const int64_t start = blockIdx.x * (int64_t)blockDim.x + threadIdx.x,
                step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = start; i < n4; i += step) {
    float4 a = reinterpret_cast<const float4 *>(g)[i], b = reinterpret_cast<const float4 *>(u)[i];
    reinterpret_cast<float4 *>(y)[i] =
        make_float4(silu_mul1(a.x, b.x), silu_mul1(a.y, b.y), silu_mul1(a.z, b.z),
                    silu_mul1(a.w, b.w));
  }
  for (int64_t i = 4 * n4 + start; i < n; i += step) y[i] = silu_mul1(g[i], u[i]);
}

__global__ void add_kernel(float *y, const float *x, int64_t n, int64_t n4) {
  const int64_t start = blockIdx.x * (int64_t)blockDim.x + threadIdx.x,
                step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = start; i < n4; i += step) {
    float4 a = reinterpret_cast<const float4 *>(y)[i], b = reinterpret_cast<const float4 *>(x)[i];
    reinterpret_cast<float4 *>(y)[i] = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
  }
  for (int64_t i = 4 * n4 + start; i < n; i += step) y[i] += x[i];
}

static int kc_silu_mul(k_backend_t *be, float *y, const float *gate, const float *up, int64_t n) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (n < 0) return -EINVAL;
  if (n == 0) return 0;
  const int64_t n4 = aligned16(y) && aligned16(gate) && aligned16(up) ? n / 4 : 0;
  silu_mul_kernel<<<grid_for(c, n4 ? n4 : n, KC_THREADS), KC_THREADS, 0, c->stream>>>(y, gate, up,
                                                                                      n, n4);
  return launched(c);
}

static int kc_add(k_backend_t *be, float *y, const float *x, int64_t n) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (n < 0) return -EINVAL;
  if (n == 0) return 0;
  const int64_t n4 = aligned16(y) && aligned16(x) ? n / 4 : 0;
  add_kernel<<<grid_for(c, n4 ? n4 : n, KC_THREADS), KC_THREADS, 0, c->stream>>>(y, x, n, n4);
  return launched(c);
}

/* The draw of kernels/draw.h, one block per row: first the row's argmax
 * (each thread's first maximum of a strided part, then the block's: larger
 * value, then lower column; NaN never wins; nothing above -inf keeps the
 * sentinel n, reported as 0), then, for a row with a temperature and a
 * finite maximum, the same reduction over the Gumbel-max scores of the
 * kept columns: with top-k or top-p those ranked at or above a cut key
 * found by radix select (radix_cut). */
#define KC_SAMPLE_THREADS 1024
template <typename V>
__device__ __forceinline__ void best_pick(V &v, int64_t &i, V ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

/* The block's best (value, column); every thread gets it. */
template <typename V>
__device__ void block_best(V &v, int64_t &i, V *sv, int64_t *si, int64_t none) {
  for (int o = 16; o > 0; o >>= 1)
    best_pick(v, i, __shfl_down_sync(0xffffffffu, v, o), __shfl_down_sync(0xffffffffu, i, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < nw ? sv[lane] : (V)-INFINITY;
    i = lane < nw ? si[lane] : none;
    for (int o = 16; o > 0; o >>= 1)
      best_pick(v, i, __shfl_down_sync(0xffffffffu, v, o), __shfl_down_sync(0xffffffffu, i, o));
    if (lane == 0) {
      sv[0] = v;
      si[0] = i;
    }
  }
  __syncthreads();
  v = sv[0];
  i = si[0];
  __syncthreads(); /* sv, si free again */
}

/* Column i's rank as one number, larger first: the logit (-0 as +0), then
 * the lower column (kernels/draw.h's order). For l above -inf. */
__device__ __forceinline__ uint64_t rank_key(float l, int64_t i) {
  uint32_t u = __float_as_uint(l + 0.0f);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ((uint64_t)u << 32) | (uint32_t)(0xffffffffu - (uint32_t)i);
}

typedef struct kc_radix {
  unsigned cnt[256];
  double mass[256];
  uint64_t prefix;
  int done;
} kc_radix_t;

/* Of the columns with rank key >= lo, in rank order, the shortest prefix
 * reaching `target` — target columns (by_mass false) or target weight —
 * as a key t: the prefix is the columns with key >= max(lo, t). All of them
 * where the target is out of reach. A radix select, 8 bits a pass from the
 * top, that stops once the cut's bucket is taken whole. */
__device__ uint64_t radix_cut(const float *row, int64_t n, uint64_t lo, double target,
                              bool by_mass, float top, float T, kc_radix_t *r) {
  uint64_t prefix = 0;
  double above = 0.0; /* columns or weight ranked above the prefix's bucket */
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int t = threadIdx.x; t < 256; t += blockDim.x) {
      r->cnt[t] = 0;
      r->mass[t] = 0.0;
    }
    __syncthreads();
    const uint64_t hi = shift == 56 ? 0 : ~0ull << (shift + 8);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float l = row[i];
      if (!(l > -INFINITY)) continue;
      const uint64_t key = rank_key(l, i);
      if (key < lo || (key & hi) != prefix) continue;
      const int d = (int)((key >> shift) & 255u);
      atomicAdd(&r->cnt[d], 1u);
      if (by_mass) atomicAdd(&r->mass[d], (double)k_draw_weight(l, top, T));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int chosen = -1, lowest = -1;
      double lowest_here = 0.0;
      for (int d = 255; d >= 0; d--) {
        if (!r->cnt[d]) continue;
        const double here = by_mass ? r->mass[d] : (double)r->cnt[d];
        if (above + here >= target) {
          chosen = d;
          break;
        }
        above += here;
        lowest = d;
        lowest_here = here;
      }
      if (chosen < 0 && lowest >= 0) { /* out of reach: down to the last column */
        chosen = lowest;
        above -= lowest_here;
      }
      int done = chosen < 0;
      if (chosen >= 0) {
        prefix |= (uint64_t)chosen << shift;
        /* the bucket taken whole: a lone column, or exactly the count */
        done = r->cnt[chosen] == 1 || (!by_mass && above + (double)r->cnt[chosen] == target);
      }
      r->prefix = prefix;
      r->done = done;
    }
    __syncthreads();
    prefix = r->prefix;
    const int done = r->done;
    __syncthreads(); /* r free again */
    if (done) break;
  }
  return prefix;
}

__global__ void sample_kernel(int32_t *ids, const float *x, int64_t m, int64_t n,
                              const k_draw_t *draws) {
  __shared__ double sd[KC_SAMPLE_THREADS / 32];
  __shared__ float sf[KC_SAMPLE_THREADS / 32];
  __shared__ int64_t si[KC_SAMPLE_THREADS / 32];
  __shared__ kc_radix_t radix;
  for (int64_t r = blockIdx.x; r < m; r += gridDim.x) {
    const float *row = x + r * n;
    float top = -INFINITY;
    int64_t best = n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (row[i] > top) {
        top = row[i];
        best = i;
      }
    block_best(top, best, sf, si, n);
    const k_draw_t d = draws ? draws[r] : k_draw_t{};
    if (d.temperature > 0.0f && isfinite(top)) {
      /* top-k, then top-p among the k: the kept columns are those whose
       * rank key is at least cut */
      uint64_t cut = 0;
      if (k_draw_top_k_on(&d, n))
        cut = radix_cut(row, n, 0, (double)d.top_k, false, top, d.temperature, &radix);
      if (k_draw_top_p_on(&d)) {
        double w = 0.0;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
          if (row[i] > -INFINITY && rank_key(row[i], i) >= cut)
            w += (double)k_draw_weight(row[i], top, d.temperature);
        w = block_sum(w); /* its part[] is next written after many syncs */
        const uint64_t p = radix_cut(row, n, cut, (double)d.top_p * w, true, top, d.temperature,
                                     &radix);
        cut = p > cut ? p : cut;
      }
      double bs = -INFINITY;
      int64_t bi = n;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        if (!(row[i] > -INFINITY) || (cut && rank_key(row[i], i) < cut)) continue;
        const double sc = k_draw_score(row[i], top, &d, i);
        if (sc > bs) {
          bs = sc;
          bi = i;
        }
      }
      block_best(bs, bi, sd, si, n);
      if (bi < n) best = bi;
    }
    if (threadIdx.x == 0) ids[r] = best < n ? (int32_t)best : 0;
  }
}

static int kc_sample(k_backend_t *be, int32_t *ids, const float *x, int64_t m, int64_t n,
                     const k_draw_t *draws) {
  kc_t *c = kc_of(be);
  kc_core_t *k = core_of(c);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (m < 0 || n <= 0 || n > INT32_MAX) return -EINVAL;
  if (m == 0) return 0;
  k_draw_t *dd = NULL;
  if (draws) {
    if ((rc = scratch_reserve(c, (void **)&k->draws, &k->draws_cap, (size_t)m * sizeof *draws)) ||
        (rc = copy_in(c, k->draws, draws, (size_t)m * sizeof *draws)))
      return rc;
    dd = k->draws;
  }
  const unsigned grid = (unsigned)(m < 65535 ? m : 65535);
  sample_kernel<<<grid, KC_SAMPLE_THREADS, 0, c->stream>>>(ids, x, m, n, dd);
  return launched(c);
}

/* Penalties (kernels/draw.h) of row r's listed ids, one block per row;
 * each id once in a row, so no two threads write one logit. */
__global__ void penalize_kernel(float *x, int64_t m, int64_t n, const k_penalty_t *rows,
                                const int32_t *ids, const int32_t *seen) {
  for (int64_t r = blockIdx.x; r < m; r += gridDim.x) {
    const k_penalty_t p = rows[r];
    for (int32_t j = threadIdx.x; j < p.n; j += blockDim.x) {
      const int32_t s = seen[p.first + j];
      float *l = &x[r * n + ids[p.first + j]];
      *l = k_draw_penalise(*l, s >> 1, (s & 1) != 0, p.rep, p.pres, p.freq);
    }
  }
}

static int kc_penalize(k_backend_t *be, float *x, int64_t m, int64_t n, const k_penalty_t *rows,
                       const int32_t *ids, const int32_t *seen) {
  kc_t *c = kc_of(be);
  kc_core_t *k = core_of(c);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (m < 0 || n <= 0) return -EINVAL;
  int64_t used = 0; /* entries the rows span */
  for (int64_t r = 0; r < m; r++) {
    if (rows[r].n < 0 || rows[r].first < 0) return -EINVAL;
    for (int32_t j = 0; j < rows[r].n; j++)
      if (ids[rows[r].first + j] < 0 || ids[rows[r].first + j] >= n) return -EINVAL;
    if (rows[r].n > 0 && rows[r].first + rows[r].n > used) used = rows[r].first + rows[r].n;
  }
  if (m == 0 || used == 0) return 0;
  const size_t rb = ((size_t)m * sizeof *rows + 255) & ~(size_t)255;
  const size_t eb = ((size_t)used * sizeof(int32_t) + 255) & ~(size_t)255;
  if ((rc = scratch_reserve(c, (void **)&k->pen, &k->pen_cap, rb + 2 * eb)) ||
      (rc = copy_in(c, k->pen, rows, (size_t)m * sizeof *rows)) ||
      (rc = copy_in(c, k->pen + rb, ids, (size_t)used * sizeof(int32_t))) ||
      (rc = copy_in(c, k->pen + rb + eb, seen, (size_t)used * sizeof(int32_t))))
    return rc;
  const unsigned grid = (unsigned)(m < 65535 ? m : 65535);
  penalize_kernel<<<grid, 256, 0, c->stream>>>(x, m, n, (const k_penalty_t *)k->pen,
                                               (const int32_t *)(k->pen + rb),
                                               (const int32_t *)(k->pen + rb + eb));
  return launched(c);
}

/* The block's largest 64-bit key; every thread gets it. */
__device__ uint64_t block_max_u64(uint64_t v) {
  __shared__ uint64_t part[32];
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < nw ? part[lane] : 0;
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  __syncthreads(); /* part free again */
  return v;
}

/* kernels/draw.h's log-probabilities, one block per asked row: the
 * maximum, the sum of exponentials in double, then the top ids one at a
 * time, each the largest rank key below the one before. */
__global__ void logprobs_kernel(k_logprobs_t *out, const float *x, int64_t n,
                                const int32_t *rows, const int32_t *want, const int32_t *ids) {
  __shared__ float sf[KC_SAMPLE_THREADS / 32];
  __shared__ int64_t si[KC_SAMPLE_THREADS / 32];
  const int32_t r = rows[blockIdx.x];
  const float *row = x + (int64_t)r * n;
  float mx = -INFINITY;
  int64_t at = n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    if (row[i] > mx) { /* NaN and -inf never */
      mx = row[i];
      at = i;
    }
  block_best(mx, at, sf, si, n);
  const bool finite = isfinite(mx);
  double lse = 0.0;
  if (finite) {
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (row[i] > -INFINITY) sum += exp((double)row[i] - (double)mx);
    sum = block_sum(sum);
    __syncthreads(); /* block_sum's part free again */
    lse = (double)mx + log(sum);
  }
  k_logprobs_t *o = &out[blockIdx.x];
  const int32_t k = want[blockIdx.x] < K_DRAW_MAX_TOP ? want[blockIdx.x] : K_DRAW_MAX_TOP;
  uint64_t prev = ~0ull;
  int32_t got = 0;
  for (; got < k; got++) {
    uint64_t best = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      if (!(row[i] > -INFINITY)) continue;
      const uint64_t key = rank_key(row[i], i);
      if (key < prev && key > best) best = key;
    }
    best = block_max_u64(best);
    if (best == 0) break; /* no id left */
    prev = best;
    if (threadIdx.x == 0) {
      const int32_t id = (int32_t)(0xffffffffu - (uint32_t)best);
      const float v = row[id];
      o->top[got] = id;
      o->top_lp[got] = finite ? (float)((double)v - lse) : v == mx ? 0.0f : -INFINITY;
    }
  }
  if (threadIdx.x == 0) {
    const float l = row[ids[r]];
    o->n_top = got;
    o->chosen = !finite ? (l == mx ? 0.0f : -INFINITY)
                        : l > -INFINITY ? (float)((double)l - lse) : -INFINITY;
  }
}

static int kc_logprobs(k_backend_t *be, k_logprobs_t *out, const float *x, int64_t m, int64_t n,
                       const int32_t *ids, const int32_t *want) {
  kc_t *c = kc_of(be);
  kc_core_t *k = core_of(c);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (m < 0 || n <= 0 || n > INT32_MAX) return -EINVAL;
  int32_t *list = (int32_t *)malloc((size_t)(m > 0 ? m : 1) * 2 * sizeof(int32_t));
  if (!list) return -ENOMEM;
  int32_t nr = 0;
  for (int64_t r = 0; r < m; r++)
    if (want[r] >= 0) list[nr++] = (int32_t)r;
  for (int32_t j = 0; j < nr; j++) list[nr + j] = want[list[j]];
  k_logprobs_t *res = NULL;
  const size_t lb = ((size_t)nr * 2 * sizeof(int32_t) + 255) & ~(size_t)255;
  const size_t ob = (size_t)nr * sizeof(k_logprobs_t);
  if (nr > 0 && !(rc = scratch_reserve(c, (void **)&k->lp, &k->lp_cap, lb + ob)) &&
      !(rc = copy_in(c, k->lp, list, (size_t)nr * 2 * sizeof(int32_t)))) {
    logprobs_kernel<<<(unsigned)nr, KC_SAMPLE_THREADS, 0, c->stream>>>(
        (k_logprobs_t *)(k->lp + lb), x, n, (const int32_t *)k->lp,
        (const int32_t *)k->lp + nr, ids);
    if (!(rc = launched(c)) && !(res = (k_logprobs_t *)malloc(ob))) rc = -ENOMEM;
    if (!rc && !(rc = kc_check(c, cudaMemcpyAsync(res, k->lp + lb, ob, cudaMemcpyDeviceToHost,
                                                   c->stream))))
      rc = kc_check(c, cudaStreamSynchronize(c->stream));
    for (int32_t j = 0; !rc && j < nr; j++) out[list[j]] = res[j];
  }
  free(res);
  free(list);
  return rc;
}

/* Rows of a table, one block per row (grid-stride over rows). An id outside
 * the table (which the CPU backend refuses with -EINVAL; here the ids are in
 * device memory) gives a row of NaNs rather than a read out of bounds. */
template <typename T> __device__ __forceinline__ float elem_f32(const T *p, int64_t i);
template <> __device__ __forceinline__ float elem_f32<float>(const float *p, int64_t i) {
  return p[i];
}
template <> __device__ __forceinline__ float elem_f32<uint16_t>(const uint16_t *p, int64_t i) {
  return __uint_as_float((uint32_t)p[i] << 16); /* bf16 */
}
template <> __device__ __forceinline__ float elem_f32<__half>(const __half *p, int64_t i) {
  return __half2float(p[i]);
}

template <typename T>
__global__ void embed_kernel(float *y, const T *table, const int32_t *ids, int64_t m,
                             int64_t rows, int64_t cols) {
  for (int64_t t = blockIdx.x; t < m; t += gridDim.x) {
    const int64_t id = ids[t];
    float *out = y + t * cols;
    if (id < 0 || id >= rows) {
      for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) out[j] = __int_as_float(0x7fc00000);
      continue;
    }
    const T *row = table + id * cols;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) out[j] = elem_f32<T>(row, j);
  }
}

static int kc_embed(k_backend_t *be, float *y, const k_weight_t *table, const int32_t *ids,
                    int64_t m) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (m < 0 || table->cols < 0) return -EINVAL;
  if (m == 0 || table->cols == 0) return 0;
  const unsigned blocks = grid_for(c, m, 1);
  switch (table->type) {
  case K_F32:
    embed_kernel<<<blocks, KC_THREADS, 0, c->stream>>>(y, (const float *)table->data, ids, m,
                                                       table->rows, table->cols);
    break;
  case K_BF16:
    embed_kernel<<<blocks, KC_THREADS, 0, c->stream>>>(y, (const uint16_t *)table->data, ids, m,
                                                       table->rows, table->cols);
    break;
  case K_F16:
    embed_kernel<<<blocks, KC_THREADS, 0, c->stream>>>(y, (const __half *)table->data, ids, m,
                                                       table->rows, table->cols);
    break;
  default:
    return -EINVAL;
  }
  return launched(c);
}

/* ---- dummy weights ------------------------------------------------------------- */

__device__ __forceinline__ uint64_t splitmix64_dev(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

static uint64_t splitmix64_host(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/* dst[j] = offset + model_dummy_value(seed, tensor, first + j, scale), with
 * base = splitmix64(seed ^ tensor << 40). Every float operation is written
 * with its rounding (no fused multiply-add) so that the value is the host's
 * bit for bit: ((u * 2^-24 * 2 - 1) * scale) + offset with u = h >> 40. */
template <int TYPE>
__global__ void fill_dummy_kernel(void *dst, int64_t first, int64_t n, uint64_t base, float scale,
                                  float offset) {
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n;
       j += (int64_t)gridDim.x * blockDim.x) {
    const uint64_t h = splitmix64_dev(base + (uint64_t)(first + j));
    const float u = (float)(uint32_t)(h >> 40); /* 24 bits: exact */
    const float v =
        __fmul_rn(__fsub_rn(__fmul_rn(__fmul_rn(u, 1.0f / 16777216.0f), 2.0f), 1.0f), scale);
    const float f = __fadd_rn(offset, v);
    if (TYPE == K_F32) ((float *)dst)[j] = f;
    else if (TYPE == K_BF16) ((uint16_t *)dst)[j] = f32_to_bf16_bits(f);
    else ((uint16_t *)dst)[j] = f32_to_f16_bits(f);
  }
}

static int kc_fill_dummy(k_backend_t *be, void *dst, k_dtype_t t, int64_t first, int64_t n,
                         uint64_t seed, uint32_t tensor, float scale, float offset) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (n < 0 || first < 0) return -EINVAL;
  if (n == 0) return 0;
  const uint64_t base = splitmix64_host(seed ^ ((uint64_t)tensor << 40));
  const unsigned blocks = grid_for(c, n, KC_THREADS);
  switch (t) {
  case K_F32:
    fill_dummy_kernel<K_F32><<<blocks, KC_THREADS, 0, c->stream>>>(dst, first, n, base, scale,
                                                                    offset);
    break;
  case K_BF16:
    fill_dummy_kernel<K_BF16><<<blocks, KC_THREADS, 0, c->stream>>>(dst, first, n, base, scale,
                                                                     offset);
    break;
  case K_F16:
    fill_dummy_kernel<K_F16><<<blocks, KC_THREADS, 0, c->stream>>>(dst, first, n, base, scale,
                                                                    offset);
    break;
  default:
    return -EINVAL;
  }
  return launched(c);
}

/* ---- KV compaction ------------------------------------------------------------- */

/* Move i (one block each, grid-stride): slot idx[n + i] gets K, V (`units`
 * elements of U per slot), score and position of slot idx[i]. No slot is
 * both a source and a destination, so the moves are independent. */
template <typename U>
__global__ void kv_move_kernel(U *k, U *v, float *score, int32_t *pos, const int32_t *idx,
                               int64_t n, int64_t units) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t f = idx[i], t = idx[n + i];
    for (int64_t e = threadIdx.x; e < units; e += blockDim.x) {
      k[t * units + e] = k[f * units + e];
      v[t * units + e] = v[f * units + e];
    }
    if (threadIdx.x == 0) {
      score[t] = score[f];
      pos[t] = pos[f];
    }
  }
}

/* Row i of dst = row rows[i] of src, `words` 4-byte words a row (one block
 * per row, grid-stride). */
__global__ void gather_rows_kernel(uint32_t *dst, const uint32_t *src, const int32_t *rows,
                                   int64_t n, int64_t words) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t f = rows[i];
    for (int64_t e = threadIdx.x; e < words; e += blockDim.x)
      dst[i * words + e] = src[f * words + e];
  }
}

/* rows is a host array; dst host memory: gathered on the device, then one
 * copy back. */
static int kc_read_rows(k_backend_t *be, void *dst, const void *src, const int32_t *rows,
                        int64_t n, size_t row_bytes) {
  kc_t *c = kc_of(be);
  kc_core_t *k = core_of(c);
  int rc = kc_enter(c);
  if (rc) return rc;
  if (n < 0 || row_bytes == 0 || row_bytes % 4) return -EINVAL;
  if (n == 0) return 0;
  for (int64_t i = 0; i < n; i++)
    if (rows[i] < 0) return -EINVAL;
  if ((rc = scratch_reserve(c, (void **)&k->ridx, &k->ridx_cap, (size_t)n * sizeof(int32_t))) ||
      (rc = scratch_reserve(c, &k->rbuf, &k->rbuf_cap, (size_t)n * row_bytes)) ||
      (rc = copy_in(c, k->ridx, rows, (size_t)n * sizeof(int32_t))))
    return rc;
  gather_rows_kernel<<<grid_for(c, n, 1), 64, 0, c->stream>>>(
      (uint32_t *)k->rbuf, (const uint32_t *)src, k->ridx, n, (int64_t)(row_bytes / 4));
  if ((rc = launched(c))) return rc;
  if ((rc = kc_check(c, cudaMemcpyAsync(dst, k->rbuf, (size_t)n * row_bytes,
                                        cudaMemcpyDeviceToHost, c->stream))))
    return rc;
  return kc_check(c, cudaStreamSynchronize(c->stream));
}

/* src and dst are host arrays (the compaction planner's). */
static int kc_kv_move(k_backend_t *be, const k_kv_arena_t *kv, const int32_t *src,
                      const int32_t *dst, int64_t n) {
  kc_t *c = kc_of(be);
  kc_core_t *k = core_of(c);
  int rc = kc_enter(c);
  if (rc) return rc;
  const int64_t n_slots = (int64_t)kv->n_blocks * kv->block_size;
  const size_t el = el_bytes(kv->type);
  if (n < 0 || !el) return -EINVAL;
  for (int64_t i = 0; i < n; i++)
    if (src[i] < 0 || src[i] >= n_slots || dst[i] < 0 || dst[i] >= n_slots) return -EINVAL;
  if (n == 0) return 0;
  if ((rc = scratch_reserve(c, (void **)&k->idx, &k->idx_cap, 2 * (size_t)n * sizeof(int32_t))))
    return rc;
  if ((rc = copy_in(c, k->idx, src, (size_t)n * sizeof(int32_t))) ||
      (rc = copy_in(c, k->idx + n, dst, (size_t)n * sizeof(int32_t))))
    return rc;
  const size_t row = (size_t)kv->head_dim * el; /* bytes of one slot's K (or V) */
  const unsigned blocks = grid_for(c, n, 1);
  if (row % 16 == 0 && aligned16(kv->k) && aligned16(kv->v))
    kv_move_kernel<<<blocks, 64, 0, c->stream>>>((uint4 *)kv->k, (uint4 *)kv->v, kv->score,
                                                 kv->pos, k->idx, n, (int64_t)(row / 16));
  else if (row % 4 == 0)
    kv_move_kernel<<<blocks, 64, 0, c->stream>>>((uint32_t *)kv->k, (uint32_t *)kv->v, kv->score,
                                                 kv->pos, k->idx, n, (int64_t)(row / 4));
  else
    kv_move_kernel<<<blocks, 64, 0, c->stream>>>((uint16_t *)kv->k, (uint16_t *)kv->v, kv->score,
                                                 kv->pos, k->idx, n, (int64_t)(row / 2));
  return launched(c);
}

/* ---- the backend ---------------------------------------------------------------- */

static void kc_destroy(k_backend_t *be) {
  kc_t *c = kc_of(be);
  if (!c) return;
  cudaSetDevice(c->device);
  if (c->stream) cudaStreamSynchronize(c->stream);
  kc_attn_destroy(c);
  kc_core_t *k = core_of(c);
  if (k) {
    graphs_forget(k);
    free(k->graphs);
    for (int32_t i = 0; i < KC_PLANS; i++) plan_release(&k->plans[i]);
    if (k->lt) lt.destroy(k->lt);
    cudaFree(k->ws);
    cudaFree(k->x16);
    cudaFree(k->idx);
    cudaFree(k->ridx);
    cudaFree(k->rbuf);
    cudaFree(k->draws);
    cudaFree(k->pen);
    cudaFree(k->lp);
    if (k->stage) cudaFreeHost(k->stage);
    if (k->stage_ev) cudaEventDestroy(k->stage_ev);
    if (k->t0) cudaEventDestroy(k->t0);
    if (k->t1) cudaEventDestroy(k->t1);
    free(k);
  }
  if (c->stream) cudaStreamDestroy(c->stream);
  cudaGetLastError();
  free(c);
  be->impl = NULL;
}

/* ---- graphs ------------------------------------------------------------------- */

/* Every key forgotten, its capture destroyed (the stream idle). */
static void graphs_forget(kc_core_t *k) {
  if (!k || !k->graphs) return;
  for (int i = 0; i < KC_GRAPHS; i++)
    if (k->graphs[i].state == 2) cudaGraphExecDestroy(k->graphs[i].exec);
  memset(k->graphs, 0, KC_GRAPHS * sizeof *k->graphs);
}

extern "C" int k_cuda_graphs_captured(k_backend_t *be) {
  kc_core_t *k = core_of(kc_of(be));
  if (k->graphs_off) return -1;
  int n = 0;
  for (int i = 0; k->graphs && i < KC_GRAPHS; i++) n += k->graphs[i].state == 2;
  return n;
}

static void kc_replay_drop(k_backend_t *be) {
  kc_t *c = kc_of(be);
  cudaSetDevice(c->device);
  cudaStreamSynchronize(c->stream);
  graphs_forget(core_of(c));
}

/* The slot of key (a free one where it is new), NULL when the table is
 * full. */
static kc_graph_t *graph_slot(kc_core_t *k, uint64_t key) {
  if (!k->graphs && !(k->graphs = (kc_graph_t *)calloc(KC_GRAPHS, sizeof *k->graphs)))
    return NULL;
  size_t i = (size_t)(k_draw_mix(key) & (KC_GRAPHS - 1));
  for (int probe = 0; probe < KC_GRAPHS; probe++, i = (i + 1) & (KC_GRAPHS - 1))
    if (!k->graphs[i].state || k->graphs[i].key == key) return &k->graphs[i];
  return NULL;
}

/* The first call under a key runs fn (which also grows whatever scratch
 * its ops need, so that none is reallocated while capturing); the second
 * captures the stream while fn queues, instantiates and launches the
 * graph; later calls launch it. A capture that fails (fn called something
 * a capture cannot hold) turns graphs off for the backend, with a line on
 * stderr, and fn runs eagerly: the work is done either way. */
static int kc_replay(k_backend_t *be, uint64_t key, int (*fn)(void *ctx), void *ctx) {
  kc_t *c = kc_of(be);
  kc_core_t *k = core_of(c);
  int rc = kc_enter(c);
  if (rc) return rc;
  kc_graph_t *g = k->graphs_off ? NULL : graph_slot(k, key);
  if (!g) return fn(ctx);
  if (g->state == 2) return kc_check(c, cudaGraphLaunch(g->exec, c->stream));
  if (g->state == 0) {
    g->key = key;
    g->state = 1;
    return fn(ctx);
  }
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  c->capturing = true;
  c->capture_error = cudaSuccess;
  cudaError_t e = cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal);
  if (e == cudaSuccess) {
    rc = fn(ctx);
    e = cudaStreamEndCapture(c->stream, &graph);
    if (e == cudaSuccess && (rc || c->capture_error != cudaSuccess))
      e = cudaErrorStreamCaptureInvalidated;
    if (e == cudaSuccess) e = cudaGraphInstantiate(&exec, graph, 0);
  }
  c->capturing = false;
  if (graph) cudaGraphDestroy(graph);
  if (e != cudaSuccess || rc) {
    cudaGetLastError(); /* the capture's error is not the device's */
    k->graphs_off = true;
    fprintf(stderr, "pressd: CUDA graphs off: a capture failed (%s, op result %d); steps run "
            "eagerly\n", cudaGetErrorString(c->capture_error != cudaSuccess ? c->capture_error : e),
            rc);
    return fn(ctx);
  }
  g->exec = exec;
  g->state = 2;
  return kc_check(c, cudaGraphLaunch(exec, c->stream));
}

/* Once a device error is recorded every op returns -EIO (kc_enter): only a
 * new process recovers, so the engine stops and the daemon exits. */
static int kc_health(k_backend_t *be) {
  kc_t *c = kc_of(be);
  return c->error == cudaSuccess ? 0 : -EIO;
}

static k_ops_t kc_make_ops(void) {
  k_ops_t o;
  memset(&o, 0, sizeof o);
  o.name = "cuda";
  o.destroy = kc_destroy;
  o.alloc = kc_alloc;
  o.free = kc_free;
  o.upload = kc_upload;
  o.download = kc_download;
  o.sync = kc_sync;
  o.matmul = kc_matmul;
  o.rmsnorm = kc_rmsnorm;
  o.rope = kc_rope;
  o.silu_mul = kc_silu_mul;
  o.add = kc_add;
  o.embed = kc_embed;
  o.kv_write = kc_kv_write;
  o.attention = kc_attention;
  o.attn_prepare = kc_attn_prepare;
  o.fill_dummy = kc_fill_dummy;
  o.mem_info = k_cuda_mem_info;
  o.health = kc_health;
  o.kv_move = kc_kv_move;
  o.sample = kc_sample;
  o.penalize = kc_penalize;
  o.logprobs = kc_logprobs;
  o.read_rows = kc_read_rows;
  o.replay = kc_replay;
  o.replay_drop = kc_replay_drop;
  return o;
}

static const k_ops_t kc_ops = kc_make_ops();

extern "C" int k_cuda_device_count(char *err, size_t errlen) {
  int n = 0;
  cudaError_t rc = cudaGetDeviceCount(&n);
  if (rc != cudaSuccess) {
    cudaGetLastError();
    snprintf(err, errlen, "CUDA: %s", cudaGetErrorString(rc));
    return -ENODEV;
  }
  return n;
}

extern "C" int k_cuda_backend_new_opts(k_backend_t **out, int32_t device, k_dtype_t kv_type,
                                       char *err, size_t errlen) {
  *out = NULL;
  if (kv_type != K_BF16 && kv_type != K_F16) {
    snprintf(err, errlen, "CUDA: the KV cache holds bf16 or fp16");
    return -EINVAL;
  }
  int n = k_cuda_device_count(err, errlen);
  if (n < 0) return n;
  if (n == 0) {
    snprintf(err, errlen, "CUDA: no device is visible");
    return -ENODEV;
  }
  if (device < 0 || device >= n) {
    snprintf(err, errlen, "CUDA: no device %d (%d visible)", device, n);
    return -ENODEV;
  }
  int rc = lt_load(err, errlen);
  if (rc) return rc;
  k_backend_t *be = (k_backend_t *)calloc(1, sizeof *be);
  kc_t *c = (kc_t *)calloc(1, sizeof *c);
  kc_core_t *k = (kc_core_t *)calloc(1, sizeof *k);
  if (!be || !c || !k) {
    free(be);
    free(c);
    free(k);
    snprintf(err, errlen, "CUDA: out of host memory");
    return -ENOMEM;
  }
  c->device = device;
  c->error = cudaSuccess;
  c->blas = k;
  k->gemv_max_m = KC_GEMV_MAX_M;
  be->ops = &kc_ops;
  be->impl = c;
  cudaError_t cr;
  cublasStatus_t st;
  if ((cr = cudaSetDevice(device)) != cudaSuccess ||
      (cr = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess ||
      (cr = cudaDeviceGetAttribute(&k->sms, cudaDevAttrMultiProcessorCount, device)) !=
          cudaSuccess) {
    snprintf(err, errlen, "CUDA: cannot use device %d: %s", device, cudaGetErrorString(cr));
    rc = cr == cudaErrorMemoryAllocation ? -ENOMEM : -ENODEV;
    goto fail;
  }
  if ((cr = cudaMalloc(&k->ws, KC_WORKSPACE)) != cudaSuccess) {
    size_t free_b = 0, total_b = 0;
    cudaGetLastError();
    cudaMemGetInfo(&free_b, &total_b);
    snprintf(err, errlen, "CUDA: out of memory on device %d (%zu MiB free of %zu MiB)", device,
             free_b >> 20, total_b >> 20);
    rc = -ENOMEM;
    goto fail;
  }
  /* the staging buffer is an optimisation: without it uploads wait */
  if (cudaHostAlloc((void **)&k->stage, KC_STAGE, cudaHostAllocDefault) != cudaSuccess ||
      cudaEventCreateWithFlags(&k->stage_ev, cudaEventDisableTiming) != cudaSuccess) {
    cudaGetLastError();
    if (k->stage) cudaFreeHost(k->stage);
    k->stage = NULL;
  }
  if ((st = lt.create(&k->lt)) != CUBLAS_STATUS_SUCCESS) {
    k->lt = NULL;
    snprintf(err, errlen, "CUDA: cuBLASLt cannot start on device %d (status %d)", device, (int)st);
    rc = st == CUBLAS_STATUS_ALLOC_FAILED ? -ENOMEM : -ENODEV;
    goto fail;
  }
  be->weight_types = 1u << K_F32 | 1u << K_BF16 | 1u << K_F16;
  be->numerics = K_NUMERICS_EXACT;
  be->kv_type = kv_type;
  be->kv_types = 1u << K_BF16 | 1u << K_F16;
  be->dense_type = K_BF16;
  be->host_memory = false;
  be->threads = 1;
  *out = be;
  return 0;
fail:
  kc_destroy(be);
  free(be);
  return rc;
}

extern "C" int k_backend_new_cuda(k_backend_t **out, int32_t device, char *err, size_t errlen) {
  return k_cuda_backend_new_opts(out, device, K_BF16, err, errlen);
}

/* ---- diagnostics and benchmarks ----------------------------------------------------- */

extern "C" int k_cuda_error_string(k_backend_t *be, char *buf, size_t len) {
  kc_t *c = kc_of(be);
  if (len) buf[0] = '\0';
  if (c->error == cudaSuccess) return 0;
  kc_core_t *k = core_of(c);
  if (k && k->msg[0]) snprintf(buf, len, "%s", k->msg);
  else snprintf(buf, len, "CUDA: %s (%s)", cudaGetErrorString(c->error), cudaGetErrorName(c->error));
  return -EIO;
}

extern "C" int k_cuda_device_name(k_backend_t *be, char *buf, size_t len) {
  kc_t *c = kc_of(be);
  cudaDeviceProp prop;
  int rc = kc_check(c, cudaGetDeviceProperties(&prop, c->device));
  if (rc) return rc;
  snprintf(buf, len, "%s", prop.name);
  return 0;
}

extern "C" int k_cuda_mem_info(k_backend_t *be, size_t *free_bytes, size_t *total_bytes) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc) return rc;
  return kc_check(c, cudaMemGetInfo(free_bytes, total_bytes));
}

extern "C" void k_cuda_set_gemv_max_m(k_backend_t *be, int32_t max_m) {
  kc_t *c = kc_of(be);
  cudaStreamSynchronize(c->stream);
  graphs_forget(core_of(c)); /* captured matmuls chose by the old bound */
  core_of(c)->gemv_max_m = max_m < 0 ? 0 : max_m > KC_GEMV_MAX_M ? KC_GEMV_MAX_M : max_m;
}

static int timer_events(kc_t *c) {
  kc_core_t *k = core_of(c);
  if (!k->t0 && kc_check(c, cudaEventCreate(&k->t0))) return -EIO;
  if (!k->t1 && kc_check(c, cudaEventCreate(&k->t1))) return -EIO;
  return 0;
}

extern "C" int k_cuda_timer_start(k_backend_t *be) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc || (rc = timer_events(c))) return rc;
  return kc_check(c, cudaEventRecord(core_of(c)->t0, c->stream));
}

extern "C" int k_cuda_timer_stop(k_backend_t *be, double *ms) {
  kc_t *c = kc_of(be);
  kc_core_t *k = core_of(c);
  float f = 0.0f;
  int rc = kc_enter(c);
  if (rc || (rc = timer_events(c)) || (rc = kc_check(c, cudaEventRecord(k->t1, c->stream))) ||
      (rc = kc_check(c, cudaEventSynchronize(k->t1))) ||
      (rc = kc_check(c, cudaEventElapsedTime(&f, k->t0, k->t1))))
    return rc;
  *ms = f;
  return 0;
}

extern "C" int k_cuda_copy_bandwidth(k_backend_t *be, size_t bytes, int32_t reps,
                                     double *bytes_per_s) {
  kc_t *c = kc_of(be);
  int rc = kc_enter(c);
  if (rc || (rc = timer_events(c))) return rc;
  kc_core_t *k = core_of(c);
  void *a = NULL, *b = NULL;
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) {
    cudaGetLastError();
    cudaFree(a);
    return -ENOMEM;
  }
  double best = 0.0;
  rc = kc_check(c, cudaMemsetAsync(a, 1, bytes, c->stream));
  for (int32_t r = -1; !rc && r < reps; r++) { /* r = -1: warm-up */
    float ms = 0.0f;
    if ((rc = kc_check(c, cudaEventRecord(k->t0, c->stream))) ||
        (rc = kc_check(c, cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, c->stream))) ||
        (rc = kc_check(c, cudaEventRecord(k->t1, c->stream))) ||
        (rc = kc_check(c, cudaEventSynchronize(k->t1))) ||
        (rc = kc_check(c, cudaEventElapsedTime(&ms, k->t0, k->t1))))
      break;
    double bw = 2.0 * (double)bytes / ((double)ms * 1e-3);
    if (r >= 0 && ms > 0.0f && bw > best) best = bw;
  }
  cudaStreamSynchronize(c->stream);
  cudaFree(a);
  cudaFree(b);
  *bytes_per_s = best;
  return rc;
}
