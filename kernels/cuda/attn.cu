// Paged attention on CUDA: the block tables of a step, the KV scatter-write
// and the attention kernels (decode and prefill) with compression scores.
//
// The layer pack. kv_write and attention work from one device buffer built
// on the host per layer: every sequence's rows and score mode, every local
// KV head's length and the block ids it uses (only those), and the work
// lists of the kernels below. It is written into a pinned staging buffer
// (a ring of KC_RING, each reused only after its copy has completed) and
// sent with one cudaMemcpyAsync on the backend's stream. The pack of the
// layer's kv_write is reused by the layer's attention: its key (sequences,
// shapes, arena, step) and a fingerprint of the host data it came from
// (row offsets, every sequence's fields, the layer's lengths) must match.
// attn_prepare starts a step (any pack of an earlier step is dropped); a
// caller that never calls it gets a fresh pack whenever the sequences, the
// step or the fingerprint change. (The tables of all layers cannot be sent
// at once: the arguments do not say how many layers the tables hold.)
//
// Kernels, all fp32 arithmetic on K/V stored as bf16 or fp16:
//  - kc_decode<DT, NQ>: sequences whose rows * G query vectors fit NQ (4, 8
//    or 16): one CTA of 4 warps per (sequence, KV head, split of the keys)
//    serves every query vector of the group, so each K/V row is read once.
//    Each warp streams chunks of 2048 / DT keys through its own double
//    buffer (cp.async), holds the queries in registers (64 floats a lane),
//    reduces the dot products across the lanes of a key with a
//    reduce-scatter, keeps an online softmax per query vector and
//    accumulates P·V with the output dims spread over the lanes. The 4
//    warps merge in shared memory; a split writes (max, sum, unnormalised
//    output) and kc_merge combines the splits (flash-decoding).
//  - kc_prefill<DT>: tiles of 64 query vectors (32 for DT 256) of one
//    sequence and KV head against 32-key tiles of its paged K/V
//    (cp.async double buffer), register-blocked fp32 FMA for Q·Kᵀ and P·V,
//    online softmax, tiles with no visible key skipped. Short batches split
//    the keys too (kc_merge).
//  - kc_score, kc_pool: compression scores from the final (max, sum) of
//    every scored row (written by the kernels above into a scratch [row]
//    [query head][2]): decode-path sequences stored their logits during the
//    pass; prefill windows recompute q·k. Per (sequence, head, 64 keys):
//    Σ_rows p² and Σ_rows p per query head, obs_last, then either the sums
//    over the group go into score (and obs_mass), or, for a pooled window,
//    into scratch for kc_pool (max over the window, then the sums).
// Shape limits (else -EINVAL): head_dim a multiple of 8 and <= 256, G <=
// 16, block_size a power of two, kv type bf16 or fp16, q/out/new K/V 16-byte
// aligned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda-internal.h"

#define KC_TAB 256       // block ids a CTA keeps in shared memory: bounds a split's keys
#define KC_RING 4        // pinned staging buffers in flight
#define KC_MIN_SPLIT 256 // fewest keys in a decode split
#define KC_SK 64         // keys per score CTA
#define KC_PK 256        // keys per pooling CTA
#define KC_MAX_G 16
#define KC_MAX_D 256

// ---- the layer pack, as the kernels read it ------------------------------------

struct kc_seq {
  float *obs_mass;   // window scores only, else NULL
  float *obs_last;   // window scores only, else NULL
  int64_t row_slots; // stride * block_size: a row of obs_mass / obs_last
  int32_t q0, q1;    // query rows
  int32_t obs0;      // first scored row (q1: none)
  int32_t mode;      // 0 no scores, 1 decode sums (n_obs < 0), 2 window (n_obs > 0)
  int32_t pool;      // max-pool half width of a window (0: none)
  int32_t stored;    // the attention pass stores the scored rows' logits
};

struct kc_head {
  int64_t lg_off; // stored logits in scratch, [scored vectors][ctx]; -1 none
  int64_t ps_off; // window sums for pooling in scratch, [2][G][ctx]; -1 none
  int32_t ctx;    // slots in use
  int32_t tab;    // first of its block ids in blocks[]
};

// One CTA of decode or prefill: rows [row0, row0 + nrows) of a sequence,
// against keys [kb, ke) of one KV head. part >= 0: the offset in scratch of
// its partial record (acc [nq][D], max [nq], sum [nq]); < 0: it writes the
// output. A merge item has the same fields with kb = the number of parts
// (consecutive records from part).
struct kc_item {
  int64_t part;
  int32_t seq, head, row0, nrows, kb, ke;
};

struct kc_chunk {
  int32_t seq, head, k0, pad;
};

struct kc_args {
  const kc_seq *seqs;
  const kc_head *heads; // [n_seqs][H]
  const int32_t *blocks;
  const int32_t *q_start;
  const float *q;
  float *out;
  const int32_t *q_pos;
  const uint16_t *k, *v; // arena K/V elements
  float *score;
  int32_t *pos;
  float *scr; // scratch
  float *ml;  // scratch: [n_tokens][QH][2] final (max, sum) of every row
  int64_t row0_all; // layer * kv_heads_all + kv_head0
  int32_t n_seqs, H, G, QH, D, B, lb;
  float scale;
};

// ---- element types -------------------------------------------------------------

struct kc_bf16 {
  static __device__ __forceinline__ float lo(uint32_t w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(a)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(b)) << 16);
  }
};

struct kc_f16 {
  static __device__ __forceinline__ float lo(uint32_t w) {
    return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
  }
  static __device__ __forceinline__ float hi(uint32_t w) {
    return __half2float(__ushort_as_half((unsigned short)(w >> 16)));
  }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    return (uint32_t)__half_as_ushort(__float2half_rn(a)) |
           ((uint32_t)__half_as_ushort(__float2half_rn(b)) << 16);
  }
};

// ---- cp.async --------------------------------------------------------------------

__device__ __forceinline__ void kc_cp16(void *dst, const void *src) {
  unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void kc_cp4(void *dst, const void *src) {
  unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void kc_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void kc_cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Arena slot of logical slot k of a head whose block ids for blocks
// [b0, ...) are in tab.
__device__ __forceinline__ int64_t kc_slot(const kc_args &p, const int32_t *tab, int b0, int k) {
  return (int64_t)tab[(k >> p.lb) - b0] * p.B + (k & (p.B - 1));
}

// The CTA's block ids for keys [kb, ke) into shared memory (at most KC_TAB:
// the host bounds every item's keys).
__device__ __forceinline__ int kc_load_tab(const kc_args &p, const kc_head &hd, int kb, int ke,
                                           int32_t *stab, int nthreads) {
  const int b0 = kb >> p.lb;
  const int nb = ke > kb ? ((ke - 1) >> p.lb) - b0 + 1 : 0;
  for (int i = threadIdx.x; i < nb; i += nthreads) stab[i] = p.blocks[hd.tab + b0 + i];
  return b0;
}

// Output element (n, d) of an item (query vector n = row * G + g), or its
// partial record; with d == 0 also the (max, sum).
__device__ __forceinline__ void kc_emit(const kc_args &p, const kc_item &it, int nq, int n, int d,
                                        float M, float L, float A) {
  if (it.part < 0) {
    const int64_t o = (int64_t)(it.row0 + n / p.G) * p.QH + (int64_t)it.head * p.G + n % p.G;
    p.out[o * p.D + d] = L > 0.f ? A * (1.0f / L) : 0.f;
    if (d == 0) {
      p.ml[2 * o] = M;
      p.ml[2 * o + 1] = L;
    }
  } else {
    float *rec = p.scr + it.part;
    rec[(int64_t)n * p.D + d] = A;
    if (d == 0) {
      rec[(int64_t)nq * p.D + n] = M;
      rec[(int64_t)nq * p.D + nq + n] = L;
    }
  }
}

// ---- decode ----------------------------------------------------------------------

template <int DT, int NQ> struct kc_dec {
  static constexpr int C = 2048 / DT;         // keys per warp chunk
  static constexpr int LPK = NQ * DT / 64;    // lanes per key in Q·K
  static constexpr int KPS = 32 / LPK;        // keys per Q·K step
  static constexpr int QD = 16 / NQ;          // 4-dim quads per lane in Q·K (64 / NQ dims)
  static constexpr int RED = LPK / NQ;        // lanes holding each reduced dot product
  static constexpr int DV = DT / 32;          // output dims per lane in P·V
  static constexpr int KG = LPK >= 16 ? 1 : 16 / LPK; // keys per half-warp (bank swizzle)
  static constexpr int CH = DT / 8;           // 16-byte chunks per K/V row
  static constexpr int VALS = C * NQ / 32;    // softmax values per lane per chunk
  static constexpr int STAGE = 2 * C * DT * 2 + C * 4;        // K, V, positions
  static constexpr int WARP = 2 * STAGE + C * NQ * 4 + NQ * 4; // two stages, P [C][NQ], corr [NQ]
  static constexpr int SMEM = 4 * WARP + KC_TAB * 4 + NQ * 4;
  static_assert(LPK >= 4 && LPK <= 32 && C % KPS == 0 && VALS >= 1, "decode shape");
  static_assert(STAGE % 16 == 0 && WARP % 16 == 0, "alignment");
  static_assert((8 * NQ + 4 * NQ * DT) * 4 <= 4 * WARP, "merge buffers");
};

// Sum of v[] over the LPK lanes of a key, each lane ending with the sum of
// query j / (LPK / NQ): a reduce-scatter that halves the values each step,
// then a butterfly over the lanes left.
template <int N, int O> struct kc_rs {
  static __device__ __forceinline__ void run(float *v, int j) {
    const bool up = (j & O) != 0;
#pragma unroll
    for (int i = 0; i < N / 2; i++) {
      const float send = up ? v[i] : v[i + N / 2];
      const float keep = up ? v[i + N / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    kc_rs<N / 2, O / 2>::run(v, j);
  }
};
template <int O> struct kc_rs<1, O> {
  static __device__ __forceinline__ void run(float *, int) {}
};

template <int NQ, int LPK> __device__ __forceinline__ float kc_reduce(float *v, int j) {
  kc_rs<NQ, LPK / 2>::run(v, j);
  float s = v[0];
#pragma unroll
  for (int o = LPK / NQ / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// One warp's chunk of keys [k0, min(k0 + C, ke)) into a stage: K with its
// 16-byte chunks swizzled so that the Q·K reads of a half-warp hit distinct
// banks, V as it is, positions. Dims past D are zeros.
template <int DT, int NQ>
__device__ __forceinline__ void kc_dec_issue(const kc_args &p, unsigned char *stg,
                                             const int32_t *stab, int b0, int k0, int ke,
                                             int lane) {
  typedef kc_dec<DT, NQ> P;
  uint16_t *Ks = (uint16_t *)stg, *Vs = Ks + P::C * DT;
  int32_t *Ps = (int32_t *)(Vs + P::C * DT);
#pragma unroll
  for (int i = 0; i < P::C * P::CH / 32; i++) {
    const int x = lane + 32 * i, key = x / P::CH, part = x % P::CH, k = k0 + key;
    if (k < ke) {
      uint4 *dk = (uint4 *)(Ks + key * DT) + (part ^ ((key % P::KG) * (P::LPK / 2)));
      uint4 *dv = (uint4 *)(Vs + key * DT) + part;
      if (part * 8 < p.D) {
        const int64_t off = kc_slot(p, stab, b0, k) * p.D + part * 8;
        kc_cp16(dk, p.k + off);
        kc_cp16(dv, p.v + off);
      } else {
        *dk = make_uint4(0, 0, 0, 0);
        *dv = make_uint4(0, 0, 0, 0);
      }
    }
  }
  for (int key = lane; key < P::C; key += 32)
    if (k0 + key < ke) kc_cp4(Ps + key, p.pos + kc_slot(p, stab, b0, k0 + key));
}

template <class KT, int N>
__device__ __forceinline__ void kc_load_row(const uint16_t *src, float *f) {
  if (N == 2) {
    const uint32_t w = *(const uint32_t *)src;
    f[0] = KT::lo(w);
    f[1] = KT::hi(w);
  } else if (N == 4) {
    const uint2 w = *(const uint2 *)src;
    f[0] = KT::lo(w.x);
    f[1] = KT::hi(w.x);
    f[2] = KT::lo(w.y);
    f[3] = KT::hi(w.y);
  } else {
    const uint4 w = *(const uint4 *)src;
    f[0] = KT::lo(w.x);
    f[1] = KT::hi(w.x);
    f[2] = KT::lo(w.y);
    f[3] = KT::hi(w.y);
    f[4] = KT::lo(w.z);
    f[5] = KT::hi(w.z);
    f[6] = KT::lo(w.w);
    f[7] = KT::hi(w.w);
  }
}

template <class KT, int DT, int NQ>
__global__ void __launch_bounds__(128) kc_decode(kc_args p, const kc_item *__restrict__ items) {
  typedef kc_dec<DT, NQ> P;
  extern __shared__ __align__(16) unsigned char smem[];
  const kc_item it = items[blockIdx.x];
  const kc_head hd = p.heads[(int64_t)it.seq * p.H + it.head];
  const kc_seq sq = p.seqs[it.seq];
  const int G = p.G, D = p.D, nq = it.nrows * G, kb = it.kb, ke = it.ke;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int32_t *stab = (int32_t *)(smem + 4 * P::WARP);
  int32_t *sqpos = stab + KC_TAB;
  const int b0 = kc_load_tab(p, hd, kb, ke, stab, 128);
  if (threadIdx.x < NQ)
    sqpos[threadIdx.x] = (int)threadIdx.x < nq ? p.q_pos[it.row0 + threadIdx.x / G] : INT_MIN;

  // this lane's dims of every query vector, scaled
  const int kk = lane / P::LPK, j = lane % P::LPK;
  float qr[NQ][P::QD][4];
#pragma unroll
  for (int n = 0; n < NQ; n++) {
    const bool live = n < nq;
    const float *qv =
        p.q + ((int64_t)(it.row0 + (live ? n / G : 0)) * p.QH + (int64_t)it.head * G +
               (live ? n % G : 0)) * D;
#pragma unroll
    for (int i = 0; i < P::QD; i++) {
      const int d = 4 * (j + P::LPK * i);
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (live && d < D) x = *(const float4 *)(qv + d);
      qr[n][i][0] = x.x * p.scale;
      qr[n][i][1] = x.y * p.scale;
      qr[n][i][2] = x.z * p.scale;
      qr[n][i][3] = x.w * p.scale;
    }
  }
  __syncthreads();

  const int myq = j / P::RED; // the query vector of this lane's reduced dot products
  const int myqpos = sqpos[myq];
  const bool rep0 = j % P::RED == 0;
  float *lg = NULL; // where this lane stores its query's logits
  if (sq.stored && hd.lg_off >= 0 && myq < nq) {
    const int row = it.row0 + myq / G;
    if (row >= sq.obs0)
      lg = p.scr + hd.lg_off + (int64_t)((row - sq.obs0) * G + myq % G) * hd.ctx;
  }

  unsigned char *wb = smem + warp * P::WARP;
  float *sS = (float *)(wb + 2 * P::STAGE); // [C][NQ] logits, then probabilities
  float *sC = sS + P::C * NQ;               // [NQ] rescale of the chunk
  const int nch = (ke - kb + P::C - 1) / P::C;
  float m_run = -INFINITY, l_run = 0.f; // of query lane % NQ
  float acc[NQ][P::DV];
#pragma unroll
  for (int n = 0; n < NQ; n++)
#pragma unroll
    for (int e = 0; e < P::DV; e++) acc[n][e] = 0.f;

  if (warp < nch) kc_dec_issue<DT, NQ>(p, wb, stab, b0, kb + warp * P::C, ke, lane);
  kc_cp_commit();
  for (int ci = warp, t = 0; ci < nch; ci += 4, t++) {
    if (ci + 4 < nch)
      kc_dec_issue<DT, NQ>(p, wb + ((t + 1) & 1) * P::STAGE, stab, b0, kb + (ci + 4) * P::C, ke,
                           lane);
    kc_cp_commit();
    kc_cp_wait<1>();
    __syncwarp();
    const uint16_t *Ks = (const uint16_t *)(wb + (t & 1) * P::STAGE);
    const uint16_t *Vs = Ks + P::C * DT;
    const int32_t *Ps = (const int32_t *)(Vs + P::C * DT);
    const int k0 = kb + ci * P::C;
    const int nvalid = min(P::C, ke - k0);

    // logits: KPS keys a step, LPK lanes a key
#pragma unroll
    for (int step = 0; step < P::C / P::KPS; step++) {
      const int key = step * P::KPS + kk;
      const uint16_t *kr = Ks + key * DT;
      const int sw = (key % P::KG) * P::LPK;
      float v[NQ];
#pragma unroll
      for (int n = 0; n < NQ; n++) v[n] = 0.f;
#pragma unroll
      for (int i = 0; i < P::QD; i++) {
        const uint2 w = *(const uint2 *)(kr + 4 * ((j + P::LPK * i) ^ sw));
        const float f0 = KT::lo(w.x), f1 = KT::hi(w.x), f2 = KT::lo(w.y), f3 = KT::hi(w.y);
#pragma unroll
        for (int n = 0; n < NQ; n++) {
          v[n] = fmaf(qr[n][i][0], f0, v[n]);
          v[n] = fmaf(qr[n][i][1], f1, v[n]);
          v[n] = fmaf(qr[n][i][2], f2, v[n]);
          v[n] = fmaf(qr[n][i][3], f3, v[n]);
        }
      }
      const float s = kc_reduce<NQ, P::LPK>(v, j);
      if (rep0) {
        const bool ok = key < nvalid && Ps[key] <= myqpos;
        sS[key * NQ + myq] = ok ? s : -INFINITY;
        if (lg && key < nvalid) lg[k0 + key] = s;
      }
    }
    __syncwarp();

    // online softmax of query lane % NQ over the chunk
    {
      float sv[P::VALS], cmax = -INFINITY;
#pragma unroll
      for (int i = 0; i < P::VALS; i++) {
        sv[i] = sS[lane + 32 * i];
        cmax = fmaxf(cmax, sv[i]);
      }
#pragma unroll
      for (int o = NQ; o < 32; o <<= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, o));
      const float m_new = fmaxf(m_run, cmax);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      float csum = 0.f;
#pragma unroll
      for (int i = 0; i < P::VALS; i++) {
        const float e = expf(sv[i] - m_use);
        sS[lane + 32 * i] = e;
        csum += e;
      }
#pragma unroll
      for (int o = NQ; o < 32; o <<= 1) csum += __shfl_xor_sync(0xffffffffu, csum, o);
      const float corr = expf(m_run - m_use);
      l_run = l_run * corr + csum;
      m_run = m_new;
      if (lane < NQ) sC[lane] = corr;
    }
    __syncwarp();

    // P·V: this lane's DV dims of every query vector
    {
#pragma unroll
      for (int n = 0; n < NQ; n++) {
        const float cr = sC[n];
#pragma unroll
        for (int e = 0; e < P::DV; e++) acc[n][e] *= cr;
      }
#pragma unroll
      for (int key = 0; key < P::C; key++) {
        if (key < nvalid) {
          float vf[P::DV];
          kc_load_row<KT, P::DV>(Vs + key * DT + lane * P::DV, vf);
#pragma unroll
          for (int n4 = 0; n4 < NQ / 4; n4++) {
            const float4 pr = *(const float4 *)(sS + key * NQ + 4 * n4);
#pragma unroll
            for (int e = 0; e < P::DV; e++) {
              acc[4 * n4 + 0][e] = fmaf(pr.x, vf[e], acc[4 * n4 + 0][e]);
              acc[4 * n4 + 1][e] = fmaf(pr.y, vf[e], acc[4 * n4 + 1][e]);
              acc[4 * n4 + 2][e] = fmaf(pr.z, vf[e], acc[4 * n4 + 2][e]);
              acc[4 * n4 + 3][e] = fmaf(pr.w, vf[e], acc[4 * n4 + 3][e]);
            }
          }
        }
      }
    }
    __syncwarp();
  }
  kc_cp_wait<0>();
  __syncthreads();

  // merge the 4 warps (the stages are free now)
  float *wm = (float *)smem, *wl = wm + 4 * NQ, *wacc = wl + 4 * NQ; // [4][NQ], [4][NQ], [4][NQ][DT]
  if (lane < NQ) {
    wm[warp * NQ + lane] = m_run;
    wl[warp * NQ + lane] = l_run;
  }
#pragma unroll
  for (int n = 0; n < NQ; n++)
#pragma unroll
    for (int e = 0; e < P::DV; e++) wacc[(warp * NQ + n) * DT + lane * P::DV + e] = acc[n][e];
  __syncthreads();
  for (int x = threadIdx.x; x < nq * D; x += 128) {
    const int n = x / D, d = x % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < 4; w++) M = fmaxf(M, wm[w * NQ + n]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < 4; w++) {
      const float mw = wm[w * NQ + n];
      const float e = mw == -INFINITY ? 0.f : expf(mw - M);
      L += e * wl[w * NQ + n];
      A += e * wacc[(w * NQ + n) * DT + d];
    }
    kc_emit(p, it, nq, n, d, M, L, A);
  }
}

// ---- prefill ---------------------------------------------------------------------

template <int DT> struct kc_pre {
  static constexpr int NQ = DT == 256 ? 32 : 64; // query vectors per CTA
  static constexpr int TT = 32;                  // keys per tile
  static constexpr int TK = 8, TQ = 16;          // Q·K thread grid: keys x queries
  static constexpr int KT = TT / TK, QT = NQ / TQ;
  static constexpr int TV = DT / 4 < 32 ? DT / 4 : 32; // P·V thread grid: dim quads x queries
  static constexpr int TQ2 = 128 / TV, QV = NQ / TQ2, DVC = DT / 4 / TV;
  static constexpr int CH = DT / 8;
  static constexpr int QS = DT + 4; // Q row stride (floats)
  static constexpr int PS = TT + 4; // P row stride (floats)
  static constexpr int OFF_K = NQ * QS * 4;
  static constexpr int OFF_V = OFF_K + 2 * TT * DT * 2;
  static constexpr int OFF_POS = OFF_V + 2 * TT * DT * 2;
  static constexpr int OFF_P = OFF_POS + 2 * TT * 4;
  static constexpr int OFF_SMALL = OFF_P + NQ * PS * 4; // corr, max, sum (float), qpos (int) [NQ]
  static constexpr int OFF_TAB = OFF_SMALL + 4 * NQ * 4;
  static constexpr int SMEM = OFF_TAB + KC_TAB * 4;
  static_assert(TQ2 * TV == 128 && QV * TQ2 == NQ && DVC * TV * 4 == DT, "prefill shape");
  static_assert(OFF_K % 16 == 0 && OFF_P % 16 == 0 && OFF_SMALL % 16 == 0, "alignment");
};

// Tile [k0, min(k0 + TT, ke)): K with chunk c of key t at c ^ (t & 7) (the
// Q·K reads of 8 keys hit distinct banks), V as it is or (SWZ_V, for
// ldmatrix's 8 rows of one chunk column) swizzled the same way, positions.
// Keys past ke and dims past D are zeros.
template <int DT, bool SWZ_V = false>
__device__ __forceinline__ void kc_pre_issue(const kc_args &p, uint16_t *Ks, uint16_t *Vs,
                                             int32_t *Ps, const int32_t *stab, int b0, int k0,
                                             int ke) {
  typedef kc_pre<DT> P;
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < P::TT * P::CH / 128; i++) {
    const int x = tid + 128 * i, key = x / P::CH, part = x % P::CH, k = k0 + key;
    uint4 *dk = (uint4 *)(Ks + key * DT) + (part ^ (key & 7));
    uint4 *dv = (uint4 *)(Vs + key * DT) + (SWZ_V ? part ^ (key & 7) : part);
    if (k < ke && part * 8 < p.D) {
      const int64_t off = kc_slot(p, stab, b0, k) * p.D + part * 8;
      kc_cp16(dk, p.k + off);
      kc_cp16(dv, p.v + off);
    } else {
      *dk = make_uint4(0, 0, 0, 0);
      *dv = make_uint4(0, 0, 0, 0);
    }
  }
  if (tid < P::TT && k0 + tid < ke) kc_cp4(Ps + tid, p.pos + kc_slot(p, stab, b0, k0 + tid));
}

// A prefill CTA's start: its block ids, its query vectors' positions
// (INT_MIN past nq) and Q (scaled; zeros past nq and D) into shared memory;
// *qmax the largest position. Returns the first block's index (b0).
template <int DT>
__device__ __forceinline__ int kc_pre_start(const kc_args &p, const kc_item &it, float *Qs,
                                            int32_t *sqp, int32_t *stab, int *qmax) {
  typedef kc_pre<DT> P;
  const int tid = threadIdx.x, G = p.G, D = p.D, nq = it.nrows * G;
  const kc_head hd = p.heads[(int64_t)it.seq * p.H + it.head];
  const int b0 = kc_load_tab(p, hd, it.kb, it.ke, stab, 128);
  for (int x = tid; x < P::NQ; x += 128) sqp[x] = x < nq ? p.q_pos[it.row0 + x / G] : INT_MIN;
  for (int x = tid; x < P::NQ * (DT / 4); x += 128) {
    const int n = x / (DT / 4), c = x % (DT / 4);
    float4 v4 = make_float4(0.f, 0.f, 0.f, 0.f);
    if (n < nq && 4 * c < D) {
      v4 = *(const float4 *)(p.q + ((int64_t)(it.row0 + n / G) * p.QH + (int64_t)it.head * G +
                                    n % G) * D + 4 * c);
      v4.x *= p.scale;
      v4.y *= p.scale;
      v4.z *= p.scale;
      v4.w *= p.scale;
    }
    *(float4 *)(Qs + n * P::QS + 4 * c) = v4;
  }
  __syncthreads();
  int m = INT_MIN;
  for (int n = 0; n < nq; n++) m = max(m, sqp[n]);
  *qmax = m;
  return b0;
}

template <class KT, int DT>
__global__ void __launch_bounds__(128) kc_prefill(kc_args p, const kc_item *__restrict__ items) {
  typedef kc_pre<DT> P;
  extern __shared__ __align__(16) unsigned char smem[];
  float *Qs = (float *)smem;                           // [NQ][QS]
  uint16_t *Kst = (uint16_t *)(smem + P::OFF_K);       // [2][TT][DT]
  uint16_t *Vst = (uint16_t *)(smem + P::OFF_V);       // [2][TT][DT]
  int32_t *Pst = (int32_t *)(smem + P::OFF_POS);       // [2][TT]
  float *sP = (float *)(smem + P::OFF_P);              // [NQ][PS]
  float *sC = (float *)(smem + P::OFF_SMALL), *sM = sC + P::NQ, *sL = sM + P::NQ;
  int32_t *sqp = (int32_t *)(sL + P::NQ);
  int32_t *stab = (int32_t *)(smem + P::OFF_TAB);
  const int tid = threadIdx.x;
  const kc_item it = items[blockIdx.x];
  const int G = p.G, D = p.D, nq = it.nrows * G, kb = it.kb, ke = it.ke;
  int qmax;
  const int b0 = kc_pre_start<DT>(p, it, Qs, sqp, stab, &qmax);

  const int tq = tid / P::TK, tk = tid % P::TK;   // Q·K role
  const int tq2 = tid / P::TV, tv = tid % P::TV;  // P·V role
  float m_run[P::QT], l_run[P::QT];               // of queries tq + TQ * a
  float acc[P::QV][P::DVC][4];                    // queries tq2 + TQ2 * a, dims 4 (tv + TV c) ..
#pragma unroll
  for (int a = 0; a < P::QT; a++) {
    m_run[a] = -INFINITY;
    l_run[a] = 0.f;
  }
#pragma unroll
  for (int a = 0; a < P::QV; a++)
#pragma unroll
    for (int c = 0; c < P::DVC; c++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[a][c][e] = 0.f;

  const int nt = (ke - kb + P::TT - 1) / P::TT;
  if (nt > 0) kc_pre_issue<DT>(p, Kst, Vst, Pst, stab, b0, kb, ke);
  kc_cp_commit();
  for (int t = 0; t < nt; t++) {
    const int st = t & 1;
    if (t + 1 < nt)
      kc_pre_issue<DT>(p, Kst + (st ^ 1) * P::TT * DT, Vst + (st ^ 1) * P::TT * DT,
                       Pst + (st ^ 1) * P::TT, stab, b0, kb + (t + 1) * P::TT, ke);
    kc_cp_commit();
    kc_cp_wait<1>();
    const int k0 = kb + t * P::TT, nvalid = min(P::TT, ke - k0);
    const uint16_t *Ks = Kst + st * P::TT * DT, *Vs = Vst + st * P::TT * DT;
    const int32_t *Ps = Pst + st * P::TT;
    // thread tid < TT copied position tid itself: skip tiles no query sees
    if (!__syncthreads_or(tid < nvalid && Ps[tid] <= qmax)) continue;

    float s[P::QT][P::KT];
#pragma unroll
    for (int a = 0; a < P::QT; a++)
#pragma unroll
      for (int b = 0; b < P::KT; b++) s[a][b] = 0.f;
#pragma unroll 4
    for (int qd = 0; qd < DT / 4; qd++) {
      float4 qv[P::QT];
#pragma unroll
      for (int a = 0; a < P::QT; a++)
        qv[a] = *(const float4 *)(Qs + (tq + P::TQ * a) * P::QS + 4 * qd);
#pragma unroll
      for (int b = 0; b < P::KT; b++) {
        const int key = tk + P::TK * b;
        const uint2 w =
            *(const uint2 *)(Ks + key * DT + 8 * ((qd >> 1) ^ (key & 7)) + 4 * (qd & 1));
        const float f0 = KT::lo(w.x), f1 = KT::hi(w.x), f2 = KT::lo(w.y), f3 = KT::hi(w.y);
#pragma unroll
        for (int a = 0; a < P::QT; a++) {
          s[a][b] = fmaf(qv[a].x, f0, s[a][b]);
          s[a][b] = fmaf(qv[a].y, f1, s[a][b]);
          s[a][b] = fmaf(qv[a].z, f2, s[a][b]);
          s[a][b] = fmaf(qv[a].w, f3, s[a][b]);
        }
      }
    }
    // online softmax; the TK lanes of a query are adjacent
#pragma unroll
    for (int a = 0; a < P::QT; a++) {
      const int qi = tq + P::TQ * a, qp = sqp[qi];
      float tmax = -INFINITY;
#pragma unroll
      for (int b = 0; b < P::KT; b++) {
        const int key = tk + P::TK * b;
        if (!(key < nvalid && Ps[key] <= qp)) s[a][b] = -INFINITY;
        tmax = fmaxf(tmax, s[a][b]);
      }
#pragma unroll
      for (int o = 1; o < P::TK; o <<= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
      const float m_new = fmaxf(m_run[a], tmax);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      float rs = 0.f;
#pragma unroll
      for (int b = 0; b < P::KT; b++) {
        const float e = expf(s[a][b] - m_use);
        sP[qi * P::PS + tk + P::TK * b] = e;
        rs += e;
      }
#pragma unroll
      for (int o = 1; o < P::TK; o <<= 1) rs += __shfl_xor_sync(0xffffffffu, rs, o);
      const float corr = expf(m_run[a] - m_use);
      l_run[a] = l_run[a] * corr + rs;
      m_run[a] = m_new;
      if (tk == 0) sC[qi] = corr;
    }
    __syncthreads();
    // P·V
#pragma unroll
    for (int a = 0; a < P::QV; a++) {
      const float cr = sC[tq2 + P::TQ2 * a];
#pragma unroll
      for (int c = 0; c < P::DVC; c++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[a][c][e] *= cr;
    }
#pragma unroll 2
    for (int key = 0; key < P::TT; key += 4) {
      float vf[4][P::DVC][4];
#pragma unroll
      for (int u = 0; u < 4; u++)
#pragma unroll
        for (int c = 0; c < P::DVC; c++)
          kc_load_row<KT, 4>(Vs + (key + u) * DT + 4 * (tv + P::TV * c), vf[u][c]);
#pragma unroll
      for (int a = 0; a < P::QV; a++) {
        const float4 pr = *(const float4 *)(sP + (tq2 + P::TQ2 * a) * P::PS + key);
#pragma unroll
        for (int c = 0; c < P::DVC; c++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            float x = acc[a][c][e];
            x = fmaf(pr.x, vf[0][c][e], x);
            x = fmaf(pr.y, vf[1][c][e], x);
            x = fmaf(pr.z, vf[2][c][e], x);
            x = fmaf(pr.w, vf[3][c][e], x);
            acc[a][c][e] = x;
          }
      }
    }
    __syncthreads();
  }
  kc_cp_wait<0>();
  if (tk == 0)
#pragma unroll
    for (int a = 0; a < P::QT; a++) {
      sM[tq + P::TQ * a] = m_run[a];
      sL[tq + P::TQ * a] = l_run[a];
    }
  __syncthreads();
#pragma unroll
  for (int a = 0; a < P::QV; a++) {
    const int qi = tq2 + P::TQ2 * a;
    if (qi >= nq) continue;
    const float M = sM[qi], L = sL[qi];
#pragma unroll
    for (int c = 0; c < P::DVC; c++) {
      const int d0 = 4 * (tv + P::TV * c);
      if (d0 >= D) continue;
      if (it.part < 0) {
        const int64_t o = (int64_t)(it.row0 + qi / G) * p.QH + (int64_t)it.head * G + qi % G;
        const float inv = L > 0.f ? 1.0f / L : 0.f;
        *(float4 *)(p.out + o * D + d0) =
            make_float4(acc[a][c][0] * inv, acc[a][c][1] * inv, acc[a][c][2] * inv,
                        acc[a][c][3] * inv);
        if (d0 == 0) {
          p.ml[2 * o] = M;
          p.ml[2 * o + 1] = L;
        }
      } else {
#pragma unroll
        for (int e = 0; e < 4; e++) kc_emit(p, it, nq, qi, d0 + e, M, L, acc[a][c][e]);
      }
    }
  }
}

// ---- prefill on tensor cores ----------------------------------------------------------
// kc_prefill_mma<KT, DT> (DT 64 or 128; PRESSD_CUDA_PREFILL=mma): the work
// items, tiles and cp.async double buffer of kc_prefill, with Q·Kᵀ and P·V
// on mma.sync m16n8k16 (inputs of the KV cache's type, fp32 accumulation).
// Each of the 4 warps owns 16 of the 64 query vectors: their Q (scaled, then
// rounded to the KV type) stays in registers as A fragments; the Q·Kᵀ
// accumulators become P·V's A fragments in registers (FlashAttention-2); K
// is read from its swizzled tile as B fragments, V (swizzled the same way,
// kc_pre_issue's SWZ_V) through ldmatrix.trans. Lane (g = lane / 4, t = lane % 4) holds rows
// g and g + 8 of its warp's 16, keys or dims 2t and 2t + 1 of every 8.

template <class KT> struct kc_mma;
#define KC_MMA(KT, T)                                                                       \
  template <> struct kc_mma<KT> {                                                           \
    static __device__ __forceinline__ void run(float *c, const uint32_t *a, uint32_t b0,    \
                                               uint32_t b1) {                               \
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." T "." T ".f32 {%0,%1,%2,%3}, " \
                   "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                              \
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                         \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));         \
    }                                                                                       \
  };
KC_MMA(kc_bf16, "bf16")
KC_MMA(kc_f16, "f16")
#undef KC_MMA

__device__ __forceinline__ void kc_ldsm_x2_trans(uint32_t &b0, uint32_t &b1, const void *row) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(b0), "=r"(b1)
               : "r"(a));
}

template <class KT, int DT>
__global__ void __launch_bounds__(128) kc_prefill_mma(kc_args p, const kc_item *__restrict__ items) {
  typedef kc_pre<DT> P;
  static_assert((DT == 64 || DT == 128) && P::NQ == 64 && P::TT == 32, "mma prefill shape");
  constexpr int KS = DT / 16, NT = DT / 8; // k-steps of Q·Kᵀ, dim tiles of P·V
  extern __shared__ __align__(16) unsigned char smem[];
  float *Qs = (float *)smem;                     // [NQ][QS]
  uint16_t *Kst = (uint16_t *)(smem + P::OFF_K); // [2][TT][DT]
  uint16_t *Vst = (uint16_t *)(smem + P::OFF_V); // [2][TT][DT]
  int32_t *Pst = (int32_t *)(smem + P::OFF_POS); // [2][TT]
  int32_t *sqp = (int32_t *)((float *)(smem + P::OFF_SMALL) + 3 * P::NQ);
  int32_t *stab = (int32_t *)(smem + P::OFF_TAB);
  const int tid = threadIdx.x;
  const kc_item it = items[blockIdx.x];
  const int G = p.G, D = p.D, nq = it.nrows * G, kb = it.kb, ke = it.ke;
  int qmax;
  const int b0 = kc_pre_start<DT>(p, it, Qs, sqp, stab, &qmax);

  const int lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int r0 = (tid >> 5) * 16 + g, r1 = r0 + 8; // this lane's query vectors
  const int qp0 = sqp[r0], qp1 = sqp[r1];
  uint32_t qf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ks++) {
    const float *q0 = Qs + r0 * P::QS + 16 * ks + 2 * t4, *q1 = Qs + r1 * P::QS + 16 * ks + 2 * t4;
    qf[ks][0] = KT::pack(q0[0], q0[1]);
    qf[ks][1] = KT::pack(q1[0], q1[1]);
    qf[ks][2] = KT::pack(q0[8], q0[9]);
    qf[ks][3] = KT::pack(q1[8], q1[9]);
  }
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  const int nt = (ke - kb + P::TT - 1) / P::TT;
  if (nt > 0) kc_pre_issue<DT, true>(p, Kst, Vst, Pst, stab, b0, kb, ke);
  kc_cp_commit();
  for (int t = 0; t < nt; t++) {
    const int st = t & 1;
    if (t + 1 < nt)
      kc_pre_issue<DT, true>(p, Kst + (st ^ 1) * P::TT * DT, Vst + (st ^ 1) * P::TT * DT,
                             Pst + (st ^ 1) * P::TT, stab, b0, kb + (t + 1) * P::TT, ke);
    kc_cp_commit();
    kc_cp_wait<1>();
    const int k0 = kb + t * P::TT, nvalid = min(P::TT, ke - k0);
    const uint16_t *Ks = Kst + st * P::TT * DT, *Vs = Vst + st * P::TT * DT;
    const int32_t *Ps = Pst + st * P::TT;
    if (!__syncthreads_or(tid < nvalid && Ps[tid] <= qmax)) continue;

    // S = Q·Kᵀ: 4 tiles of 8 keys
    float s[4][4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      const int key = 8 * j + g;
      const uint16_t *kr = Ks + key * DT + 2 * t4;
#pragma unroll
      for (int ks = 0; ks < KS; ks++) {
        const uint32_t b0k = *(const uint32_t *)(kr + 8 * ((2 * ks) ^ (key & 7)));
        const uint32_t b1k = *(const uint32_t *)(kr + 8 * ((2 * ks + 1) ^ (key & 7)));
        kc_mma<KT>::run(s[j], qf[ks], b0k, b1k);
      }
    }
    // mask by position, online softmax of rows r0 (s[.][0..1]) and r1 (s[.][2..3])
    float tmax0 = -INFINITY, tmax1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int key = 8 * j + 2 * t4 + e;
        const int kp = key < nvalid ? Ps[key] : INT_MAX;
        if (!(kp <= qp0)) s[j][e] = -INFINITY;
        if (!(kp <= qp1)) s[j][2 + e] = -INFINITY;
        tmax0 = fmaxf(tmax0, s[j][e]);
        tmax1 = fmaxf(tmax1, s[j][2 + e]);
      }
#pragma unroll
    for (int o2 = 1; o2 < 4; o2 <<= 1) {
      tmax0 = fmaxf(tmax0, __shfl_xor_sync(0xffffffffu, tmax0, o2));
      tmax1 = fmaxf(tmax1, __shfl_xor_sync(0xffffffffu, tmax1, o2));
    }
    const float mn0 = fmaxf(m_run[0], tmax0), mn1 = fmaxf(m_run[1], tmax1);
    const float mu0 = mn0 == -INFINITY ? 0.f : mn0, mu1 = mn1 == -INFINITY ? 0.f : mn1;
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        s[j][e] = expf(s[j][e] - mu0);
        s[j][2 + e] = expf(s[j][2 + e] - mu1);
        rs0 += s[j][e];
        rs1 += s[j][2 + e];
      }
#pragma unroll
    for (int o2 = 1; o2 < 4; o2 <<= 1) {
      rs0 += __shfl_xor_sync(0xffffffffu, rs0, o2);
      rs1 += __shfl_xor_sync(0xffffffffu, rs1, o2);
    }
    const float c0 = expf(m_run[0] - mu0), c1 = expf(m_run[1] - mu1);
    l_run[0] = l_run[0] * c0 + rs0;
    l_run[1] = l_run[1] * c1 + rs1;
    m_run[0] = mn0;
    m_run[1] = mn1;
#pragma unroll
    for (int j = 0; j < NT; j++) {
      o[j][0] *= c0;
      o[j][1] *= c0;
      o[j][2] *= c1;
      o[j][3] *= c1;
    }
    // O += P·V: 2 steps of 16 keys
#pragma unroll
    for (int kk = 0; kk < 2; kk++) {
      uint32_t a[4];
      a[0] = KT::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = KT::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = KT::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = KT::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const int key = 16 * kk + (lane & 15); // lanes 0-15 address the 16 rows
#pragma unroll
      for (int j = 0; j < NT; j++) {
        uint32_t b0v, b1v;
        kc_ldsm_x2_trans(b0v, b1v, Vs + key * DT + 8 * (j ^ (key & 7)));
        kc_mma<KT>::run(o[j], a, b0v, b1v);
      }
    }
    __syncthreads();
  }
  kc_cp_wait<0>();
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int n = h ? r1 : r0;
    if (n >= nq) continue;
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int d = 8 * j + 2 * t4 + e;
        if (d < D) kc_emit(p, it, nq, n, d, m_run[h], l_run[h], o[j][2 * h + e]);
      }
  }
}

// ---- splits, scores, kv_write ------------------------------------------------------

__global__ void __launch_bounds__(128) kc_merge(kc_args p, const kc_item *__restrict__ items) {
  const kc_item it = items[blockIdx.x];
  const int nq = it.nrows * p.G, D = p.D, np = it.kb;
  const int64_t rec = (int64_t)nq * (D + 2);
  const float *base = p.scr + it.part;
  kc_item out = it;
  out.part = -1;
  for (int x = threadIdx.x; x < nq * D; x += blockDim.x) {
    const int n = x / D, d = x % D;
    float M = -INFINITY;
    for (int j = 0; j < np; j++) M = fmaxf(M, base[j * rec + (int64_t)nq * D + n]);
    float L = 0.f, A = 0.f;
    for (int j = 0; j < np; j++) {
      const float mj = base[j * rec + (int64_t)nq * D + n];
      const float e = mj == -INFINITY ? 0.f : expf(mj - M);
      L += e * base[j * rec + (int64_t)nq * D + nq + n];
      A += e * base[j * rec + (int64_t)n * D + d];
    }
    kc_emit(p, out, nq, n, d, M, L, A);
  }
}

// Scores of 64 keys of one (sequence, head): see the top of the file.
template <class KT>
__global__ void __launch_bounds__(256) kc_score(kc_args p, const kc_chunk *__restrict__ chunks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const kc_chunk ck = chunks[blockIdx.x];
  const kc_seq sq = p.seqs[ck.seq];
  const kc_head hd = p.heads[(int64_t)ck.seq * p.H + ck.head];
  const int G = p.G, D = p.D, ctx = hd.ctx, k0 = ck.k0, nk = min(KC_SK, ctx - k0);
  const int tid = threadIdx.x;
  int32_t *spos = (int32_t *)smem;                              // [SK]
  int64_t *sslot = (int64_t *)(smem + KC_SK * 4);               // [SK]
  uint16_t *sK = (uint16_t *)(smem + KC_SK * 12);               // [SK][D + 2]
  float *sQ = (float *)(smem + KC_SK * 12 + KC_SK * (D + 2) * 2); // [G][D]
  float *ssq = sQ + G * D, *sms = ssq + G * KC_SK;              // [G][SK] each
  if (tid < nk) {
    const int k = k0 + tid;
    const int64_t slot = (int64_t)p.blocks[hd.tab + (k >> p.lb)] * p.B + (k & (p.B - 1));
    sslot[tid] = slot;
    spos[tid] = p.pos[slot];
  }
  __syncthreads();
  if (!sq.stored) {
    const int W = D / 2;
    for (int x = tid; x < nk * W; x += 256) {
      const int key = x / W, w = x % W;
      *(uint32_t *)(sK + key * (D + 2) + 2 * w) = *(const uint32_t *)(p.k + sslot[key] * D + 2 * w);
    }
  }
  const int qh0 = ck.head * G;
  float *olast = NULL;
  if (sq.mode == 2 && sq.obs_last) olast = sq.obs_last + (p.row0_all + ck.head) * G * sq.row_slots;
  float a_sq[4] = {0.f, 0.f, 0.f, 0.f}, a_ms[4] = {0.f, 0.f, 0.f, 0.f};
  for (int r = sq.obs0; r < sq.q1; r++) {
    if (!sq.stored) {
      __syncthreads();
      for (int x = tid; x < G * D; x += 256)
        sQ[x] = p.q[((int64_t)r * p.QH + qh0 + x / D) * D + x % D] * p.scale;
      __syncthreads();
    }
    const int qp = p.q_pos[r];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int x = tid + 256 * i, g = x / KC_SK, key = x % KC_SK;
      if (g >= G || key >= nk) continue;
      const float *mlp = p.ml + ((int64_t)r * p.QH + qh0 + g) * 2;
      const float M = mlp[0], L = mlp[1];
      float s = 0.f;
      if (sq.stored) {
        s = p.scr[hd.lg_off + (int64_t)((r - sq.obs0) * G + g) * ctx + k0 + key];
      } else {
        const float *qv = sQ + g * D;
        const uint16_t *kr = sK + key * (D + 2);
        for (int d = 0; d < D; d += 2) {
          const uint32_t w = *(const uint32_t *)(kr + d);
          s = fmaf(qv[d], KT::lo(w), s);
          s = fmaf(qv[d + 1], KT::hi(w), s);
        }
      }
      const float pr = spos[key] <= qp && L > 0.f ? expf(s - M) * (1.0f / L) : 0.f;
      a_sq[i] += pr * pr;
      a_ms[i] += pr;
      if (olast && r == sq.q1 - 1) olast[(int64_t)g * sq.row_slots + k0 + key] = pr * pr;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int x = tid + 256 * i, g = x / KC_SK, key = x % KC_SK;
    if (g < G && key < nk) {
      ssq[g * KC_SK + key] = a_sq[i];
      sms[g * KC_SK + key] = a_ms[i];
    }
  }
  __syncthreads();
  if (tid >= nk) return;
  const int k = k0 + tid;
  if (sq.mode == 2 && sq.pool > 0) {
    float *ps = p.scr + hd.ps_off;
    for (int g = 0; g < G; g++) {
      ps[(int64_t)g * ctx + k] = ssq[g * KC_SK + tid];
      ps[(int64_t)(G + g) * ctx + k] = sms[g * KC_SK + tid];
    }
    return;
  }
  float add = 0.f;
  for (int g = 0; g < G; g++) add += ssq[g * KC_SK + tid];
  atomicAdd(p.score + sslot[tid], add);
  if (sq.mode == 2 && sq.obs_mass) {
    float ms = 0.f;
    for (int g = 0; g < G; g++) ms += sms[g * KC_SK + tid];
    atomicAdd(sq.obs_mass + (p.row0_all + ck.head) * sq.row_slots + k, ms);
  }
}

// A pooled window: the per-query-head sums max-pooled along the slot order
// (width 2 pool + 1, clipped at the ends), summed over the group.
__global__ void __launch_bounds__(256) kc_pool(kc_args p, const kc_chunk *__restrict__ chunks) {
  const kc_chunk ck = chunks[blockIdx.x];
  const kc_seq sq = p.seqs[ck.seq];
  const kc_head hd = p.heads[(int64_t)ck.seq * p.H + ck.head];
  const int ctx = hd.ctx, k = ck.k0 + threadIdx.x, G = p.G;
  if (k >= ctx) return;
  const float *ps = p.scr + hd.ps_off;
  const int lo = max(0, k - sq.pool), hi = min(ctx - 1, k + sq.pool);
  float add = 0.f, ms = 0.f;
  for (int g = 0; g < G; g++) {
    const float *x = ps + (int64_t)g * ctx;
    float a = x[lo];
    for (int u = lo + 1; u <= hi; u++) a = fmaxf(a, x[u]);
    add += a;
  }
  const int64_t slot = (int64_t)p.blocks[hd.tab + (k >> p.lb)] * p.B + (k & (p.B - 1));
  atomicAdd(p.score + slot, add);
  if (sq.obs_mass) {
    for (int g = 0; g < G; g++) {
      const float *x = ps + (int64_t)(G + g) * ctx;
      float a = x[lo];
      for (int u = lo + 1; u <= hi; u++) a = fmaxf(a, x[u]);
      ms += a;
    }
    atomicAdd(sq.obs_mass + (p.row0_all + ck.head) * sq.row_slots + k, ms);
  }
}

// Row r's K and V of local head h (8 elements a thread) into the last
// slots of its sequence's head, with its position and a zero score.
template <class KT>
__global__ void __launch_bounds__(256) kc_kv_write_kernel(kc_args p, const float *__restrict__ kn,
                                                          const float *__restrict__ vn,
                                                          uint16_t *kd, uint16_t *vd,
                                                          int32_t n_tokens) {
  const int W = p.D / 8;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (int64_t)n_tokens * p.H * W) return;
  const int c = (int)(i % W);
  const int64_t rh = i / W;
  const int h = (int)(rh % p.H), r = (int)(rh / p.H);
  int lo = 0, hi = p.n_seqs; // the last sequence whose first row is <= r
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (p.q_start[mid] <= r) lo = mid;
    else hi = mid;
  }
  const int q0 = p.q_start[lo], q1 = p.q_start[lo + 1];
  if (r < q0 || r >= q1) return;
  const kc_head hd = p.heads[(int64_t)lo * p.H + h];
  const int idx = hd.ctx - (q1 - q0) + (r - q0);
  const int64_t slot = (int64_t)p.blocks[hd.tab + (idx >> p.lb)] * p.B + (idx & (p.B - 1));
  const int64_t src = ((int64_t)r * p.H + h) * p.D + 8 * c, dst = slot * p.D + 8 * c;
  const float4 k0 = *(const float4 *)(kn + src), k1 = *(const float4 *)(kn + src + 4);
  const float4 v0 = *(const float4 *)(vn + src), v1 = *(const float4 *)(vn + src + 4);
  *(uint4 *)(kd + dst) = make_uint4(KT::pack(k0.x, k0.y), KT::pack(k0.z, k0.w),
                                    KT::pack(k1.x, k1.y), KT::pack(k1.z, k1.w));
  *(uint4 *)(vd + dst) = make_uint4(KT::pack(v0.x, v0.y), KT::pack(v0.z, v0.w),
                                    KT::pack(v1.x, v1.y), KT::pack(v1.z, v1.w));
  if (c == 0) {
    p.pos[slot] = p.q_pos[r];
    p.score[slot] = 0.f;
  }
}

// ---- kernel instances --------------------------------------------------------------

typedef void (*kc_item_fn)(kc_args, const kc_item *);
typedef void (*kc_chunk_fn)(kc_args, const kc_chunk *);

// head_dim rounded up to the kernels' capacity: 64, 128 or 256 (index 0..2)
static int kc_dti(int32_t d) { return d <= 64 ? 0 : d <= 128 ? 1 : 2; }

template <class KT> static kc_item_fn kc_dec_fn_t(int dti, int nqi) {
  switch (dti * 3 + nqi) {
  case 0: return kc_decode<KT, 64, 4>;
  case 1: return kc_decode<KT, 64, 8>;
  case 2: return kc_decode<KT, 64, 16>;
  case 3: return kc_decode<KT, 128, 4>;
  case 4: return kc_decode<KT, 128, 8>;
  case 5: return kc_decode<KT, 128, 16>;
  case 6: return kc_decode<KT, 256, 4>;
  case 7: return kc_decode<KT, 256, 8>;
  default: return NULL;
  }
}
static kc_item_fn kc_dec_fn(int f16, int dti, int nqi) {
  return f16 ? kc_dec_fn_t<kc_f16>(dti, nqi) : kc_dec_fn_t<kc_bf16>(dti, nqi);
}
static int kc_dec_smem(int dti, int nqi) {
  switch (dti * 3 + nqi) {
  case 0: return kc_dec<64, 4>::SMEM;
  case 1: return kc_dec<64, 8>::SMEM;
  case 2: return kc_dec<64, 16>::SMEM;
  case 3: return kc_dec<128, 4>::SMEM;
  case 4: return kc_dec<128, 8>::SMEM;
  case 5: return kc_dec<128, 16>::SMEM;
  case 6: return kc_dec<256, 4>::SMEM;
  case 7: return kc_dec<256, 8>::SMEM;
  default: return 0;
  }
}
// query vectors of a decode CTA: class nqi holds 4 << nqi
static int kc_dec_cap(int dti) { return dti == 2 ? 8 : 16; }

// mma: the tensor-core kernel where it has a variant (head_dim up to 128)
static kc_item_fn kc_pre_fn(int f16, int dti, bool mma) {
  if (mma && dti < 2) {
    if (f16) return dti == 0 ? kc_prefill_mma<kc_f16, 64> : kc_prefill_mma<kc_f16, 128>;
    return dti == 0 ? kc_prefill_mma<kc_bf16, 64> : kc_prefill_mma<kc_bf16, 128>;
  }
  if (f16) return dti == 0 ? kc_prefill<kc_f16, 64> : dti == 1 ? kc_prefill<kc_f16, 128> : kc_prefill<kc_f16, 256>;
  return dti == 0 ? kc_prefill<kc_bf16, 64> : dti == 1 ? kc_prefill<kc_bf16, 128> : kc_prefill<kc_bf16, 256>;
}
static int kc_pre_smem(int dti) {
  return dti == 0 ? kc_pre<64>::SMEM : dti == 1 ? kc_pre<128>::SMEM : kc_pre<256>::SMEM;
}
static int kc_pre_nq(int dti) { return dti == 2 ? kc_pre<256>::NQ : kc_pre<64>::NQ; }

static kc_chunk_fn kc_score_fn(int f16) { return f16 ? kc_score<kc_f16> : kc_score<kc_bf16>; }
static size_t kc_score_smem(int32_t D, int32_t G) {
  return (size_t)KC_SK * 12 + (size_t)KC_SK * (D + 2) * 2 + (size_t)G * D * 4 +
         (size_t)2 * G * KC_SK * 4;
}

// ---- host state ----------------------------------------------------------------------

enum {
  KC_S_SEQ,
  KC_S_HEAD,
  KC_S_DEC, // three lists: 4, 8, 16 query vectors
  KC_S_PRE = KC_S_DEC + 3,
  KC_S_MERGE,
  KC_S_SCORE,
  KC_S_POOL,
  KC_S_QSTART,
  KC_S_BLOCKS,
  KC_NSEC
};

typedef struct kc_vec {
  unsigned char *p; // owns
  size_t n, cap;    // bytes
} kc_vec_t;

typedef struct kc_plan {
  // what it was built from
  uint64_t gen;
  const k_seq_kv_t *seqs;
  const int32_t *q_start;
  int32_t n_seqs, layer, QH, H, Dq, head0, all, B, n_blocks, first_block, Dk;
  k_dtype_t type;
  // what it holds
  bool attn_ok;  // the shape suits attention
  bool read_ok;  // every block id in use is in the arena
  bool write_ok; // every new slot is in the arena
  int32_t n_tokens;
  size_t off[KC_NSEC], cnt[KC_NSEC], bytes;
  size_t scr_floats; // scratch in use; [0, n_tokens * QH * 2) holds the rows' (max, sum)
} kc_plan_t;

struct kc_attn {
  void *stage[KC_RING]; // owns: pinned staging buffers
  size_t stage_cap[KC_RING];
  cudaEvent_t ev[KC_RING]; // owns: the copy out of stage[i] has completed
  bool ev_live[KC_RING];
  int ring;
  unsigned char *dev; // owns: the current pack on the device
  size_t dev_cap;
  float *scr; // owns: device scratch
  size_t scr_cap; // floats
  uint64_t gen;   // step counter: attn_prepare, or other sequences
  const k_seq_kv_t *step_seqs;
  int32_t step_n;
  bool plan_ok;
  kc_plan_t pl;
  kc_vec_t fp, fp2;         // fingerprints: of the current pack, of a call
  kc_vec_t sec[KC_NSEC];    // the pack's sections while it is built
  kc_vec_t ctxs;            // [n_seqs][H] lengths while a pack is built
  int n_sm;
  int occ[2][3]; // decode CTAs per multiprocessor, by kv type and head_dim class
  bool mma;      // prefill on tensor cores (PRESSD_CUDA_PREFILL=mma)
};

static int kc_vec_reserve(kc_vec_t *v, size_t bytes) {
  if (bytes <= v->cap) return 0;
  size_t cap = v->cap ? v->cap : 256;
  while (cap < bytes) cap *= 2;
  unsigned char *p = (unsigned char *)realloc(v->p, cap);
  if (!p) return -ENOMEM;
  v->p = p;
  v->cap = cap;
  return 0;
}

static void *kc_vec_push(kc_vec_t *v, const void *x, size_t bytes) {
  if (kc_vec_reserve(v, v->n + bytes)) return NULL;
  void *at = v->p + v->n;
  memcpy(at, x, bytes);
  v->n += bytes;
  return at;
}

void kc_attn_destroy(kc_t *c) {
  if (!c || !c->attn) return;
  kc_attn_t *st = c->attn;
  cudaSetDevice(c->device);
  cudaStreamSynchronize(c->stream); // copies may still read the staging buffers
  for (int i = 0; i < KC_RING; i++) {
    if (st->ev[i]) cudaEventDestroy(st->ev[i]);
    if (st->stage[i]) cudaFreeHost(st->stage[i]);
  }
  cudaFree(st->dev);
  cudaFree(st->scr);
  cudaGetLastError();
  free(st->fp.p);
  free(st->fp2.p);
  free(st->ctxs.p);
  for (int i = 0; i < KC_NSEC; i++) free(st->sec[i].p);
  free(st);
  c->attn = NULL;
}

template <class F> static int kc_smem_attr(kc_t *c, F fn, size_t bytes) {
  return kc_check(c, cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          (int)bytes));
}

static int kc_attn_get(kc_t *c, kc_attn_t **out) {
  if (c->attn) {
    *out = c->attn;
    return 0;
  }
  kc_attn_t *st = (kc_attn_t *)calloc(1, sizeof *st);
  if (!st) return -ENOMEM;
  c->attn = st;
  int rc = 0;
  for (int i = 0; i < KC_RING && !rc; i++)
    rc = kc_check(c, cudaEventCreateWithFlags(&st->ev[i], cudaEventDisableTiming));
  if (!rc) rc = kc_check(c, cudaDeviceGetAttribute(&st->n_sm, cudaDevAttrMultiProcessorCount, c->device));
  const char *pre = getenv("PRESSD_CUDA_PREFILL");
  st->mma = pre && !strcmp(pre, "mma");
  for (int f16 = 0; f16 < 2 && !rc; f16++) {
    for (int dti = 0; dti < 3 && !rc; dti++) {
      for (int nqi = 0; nqi < 3 && !rc; nqi++) {
        kc_item_fn fn = kc_dec_fn(f16, dti, nqi);
        if (!fn) continue;
        rc = kc_smem_attr(c, fn, kc_dec_smem(dti, nqi));
        if (!rc && nqi == 0)
          rc = kc_check(c, cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                               &st->occ[f16][dti], fn, 128, kc_dec_smem(dti, nqi)));
      }
      if (!rc) rc = kc_smem_attr(c, kc_pre_fn(f16, dti, false), kc_pre_smem(dti));
      if (!rc) rc = kc_smem_attr(c, kc_pre_fn(f16, dti, true), kc_pre_smem(dti));
    }
    if (!rc) rc = kc_smem_attr(c, kc_score_fn(f16), kc_score_smem(KC_MAX_D, KC_MAX_G));
  }
  if (rc) {
    kc_attn_destroy(c);
    return rc;
  }
  *out = st;
  return 0;
}

// A new step when the sequences differ from the prepared ones.
static void kc_step(kc_attn_t *st, const k_attn_args_t *a) {
  if (a->seqs == st->step_seqs && a->n_seqs == st->step_n) return;
  st->gen++;
  st->step_seqs = a->seqs;
  st->step_n = a->n_seqs;
  st->plan_ok = false;
}

int kc_attn_prepare(k_backend_t *be, const k_attn_args_t *a) {
  kc_t *c = kc_of(be);
  kc_attn_t *st = NULL;
  int rc = kc_enter(c);
  if (rc || (rc = kc_attn_get(c, &st))) return rc;
  st->gen++;
  st->step_seqs = a->seqs;
  st->step_n = a->n_seqs;
  st->plan_ok = false;
  return 0;
}

static bool kc_attn_shape_ok(const k_kv_arena_t *kv, const k_attn_args_t *a) {
  const int32_t H = a->n_kv_heads, QH = a->n_q_heads, D = a->head_dim, B = kv->block_size;
  return H > 0 && QH > 0 && QH % H == 0 && QH / H <= KC_MAX_G && D == kv->head_dim && D > 0 &&
         D % 8 == 0 && D <= KC_MAX_D && B > 0 && (B & (B - 1)) == 0 &&
         (kv->type == K_BF16 || kv->type == K_F16);
}

// The host data a pack depends on, besides what its key names.
static int kc_fingerprint(kc_vec_t *v, const k_attn_args_t *a, int32_t H) {
  const int32_t S = a->n_seqs;
  const size_t n = 2 + (size_t)S + 11 * (size_t)S + (size_t)S * H;
  if (kc_vec_reserve(v, n * sizeof(int32_t))) return -ENOMEM;
  int32_t *f = (int32_t *)v->p;
  size_t i = 0;
  f[i++] = S;
  for (int32_t s = 0; s <= S; s++) f[i++] = a->q_start[s];
  for (int32_t s = 0; s < S; s++) {
    const k_seq_kv_t *q = &a->seqs[s];
    const uint64_t ptr[4] = {(uint64_t)(uintptr_t)q->blocks, (uint64_t)(uintptr_t)q->ctx,
                             (uint64_t)(uintptr_t)q->obs_mass, (uint64_t)(uintptr_t)q->obs_last};
    f[i++] = q->n_obs;
    f[i++] = q->obs_pool;
    f[i++] = q->stride;
    for (int k = 0; k < 4; k++) {
      f[i++] = (int32_t)(uint32_t)ptr[k];
      f[i++] = (int32_t)(uint32_t)(ptr[k] >> 32);
    }
  }
  for (int32_t s = 0; s < S; s++)
    for (int32_t h = 0; h < H; h++) f[i++] = k_attn_ctx(a, &a->seqs[s], h);
  v->n = i * sizeof(int32_t);
  return 0;
}

static int kc_log2(int32_t b) {
  int l = 0;
  while ((1 << l) < b) l++;
  return l;
}

// Reserve `floats` of scratch for the partial record, logits or sums of
// an item: returns the offset.
static int64_t kc_take(size_t *scr, int64_t floats) {
  int64_t at = (int64_t)*scr;
  *scr += (size_t)floats;
  return at;
}

static int kc_push_item(kc_vec_t *v, int64_t part, int32_t s, int32_t h, int32_t row0,
                        int32_t nrows, int32_t kb, int32_t ke) {
  kc_item it;
  it.part = part;
  it.seq = s;
  it.head = h;
  it.row0 = row0;
  it.nrows = nrows;
  it.kb = kb;
  it.ke = ke;
  return kc_vec_push(v, &it, sizeof it) ? 0 : -ENOMEM;
}

// The items of `rows` rows from row0 against keys [0, ctx) split into
// parts of at most len keys; a merge item when there are several.
static int kc_push_split(kc_attn_t *st, int list, size_t *scr, int32_t D, int32_t G, int32_t s,
                         int32_t h, int32_t row0, int32_t rows, int32_t ctx, int64_t len) {
  const int64_t np = ctx > len ? (ctx + len - 1) / len : 1;
  const int64_t rec = (int64_t)rows * G * (D + 2);
  const int64_t part0 = np > 1 ? kc_take(scr, np * rec) : -1;
  for (int64_t j = 0; j < np; j++) {
    const int32_t kb = (int32_t)(j * len), ke = (int32_t)(j + 1 < np ? (j + 1) * len : ctx);
    if (kc_push_item(&st->sec[list], np > 1 ? part0 + j * rec : -1, s, h, row0, rows, kb, ke))
      return -ENOMEM;
  }
  if (np > 1 && kc_push_item(&st->sec[KC_S_MERGE], part0, s, h, row0, rows, (int32_t)np, 0))
    return -ENOMEM;
  return 0;
}

static int kc_push_chunks(kc_vec_t *v, int32_t s, int32_t h, int32_t ctx, int32_t step) {
  for (int32_t k0 = 0; k0 < ctx; k0 += step) {
    kc_chunk ck = {s, h, k0, 0};
    if (!kc_vec_push(v, &ck, sizeof ck)) return -ENOMEM;
  }
  return 0;
}

static int kc_dev_reserve(kc_t *c, void **p, size_t *cap, size_t bytes) {
  if (bytes <= *cap) return 0;
  if (*p) {
    if (kc_check(c, cudaStreamSynchronize(c->stream))) return -EIO; // queued work reads it
    cudaFree(*p);
    *p = NULL;
    *cap = 0;
  }
  size_t want = bytes < ((size_t)1 << 20) ? ((size_t)1 << 20) : bytes + bytes / 4;
  if (cudaMalloc(p, want) != cudaSuccess) {
    cudaGetLastError(); // out of memory is not a device fault
    *p = NULL;
    return -ENOMEM;
  }
  *cap = want;
  return 0;
}

// Build the layer pack for (kv, a) and send it.
static int kc_pack(kc_t *c, kc_attn_t *st, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  kc_plan_t *pl = &st->pl;
  const int32_t S = a->n_seqs, H = a->n_kv_heads, B = kv->block_size, Dk = kv->head_dim;
  memset(pl->off, 0, sizeof pl->off);
  memset(pl->cnt, 0, sizeof pl->cnt);
  pl->attn_ok = kc_attn_shape_ok(kv, a);
  pl->read_ok = pl->write_ok = true;
  const int32_t G = pl->attn_ok ? a->n_q_heads / H : 1, QH = pl->attn_ok ? a->n_q_heads : 0;
  const int dti = kc_dti(Dk);
  const int64_t dec_cap = kc_dec_cap(dti), rpt = kc_pre_nq(dti) / G;
  for (int i = 0; i < KC_NSEC; i++) st->sec[i].n = 0;

  // lengths, and the work of each path to size the splits
  if (kc_vec_reserve(&st->ctxs, (size_t)S * H * sizeof(int32_t))) return -ENOMEM;
  int32_t *ctxs = (int32_t *)st->ctxs.p;
  int64_t w_dec = 0, n_pre = 0;
  for (int32_t s = 0; s < S; s++) {
    const k_seq_kv_t *q = &a->seqs[s];
    const int64_t rows = a->q_start[s + 1] - a->q_start[s];
    for (int32_t h = 0; h < H; h++) {
      const int32_t ctx = k_attn_ctx(a, q, h);
      ctxs[s * H + h] = ctx;
      if (rows == 0) continue;
      if (ctx < 0 || (int64_t)ctx > (int64_t)q->stride * B) return -EINVAL;
      if (!pl->attn_ok) continue;
      if (rows * G <= dec_cap) w_dec += ctx > 0 ? ctx : 1;
      else n_pre += (rows + rpt - 1) / rpt;
    }
  }
  // keys per split: at most what KC_TAB block ids cover; decode splits make
  // about 4 waves of CTAs, prefill splits only when the tiles are few
  const int64_t cap = (int64_t)(KC_TAB - 2) * B / 64 * 64 < (int64_t)1 << 30
                          ? (int64_t)(KC_TAB - 2) * B / 64 * 64
                          : (int64_t)1 << 30;
  const int f16 = kv->type == K_F16;
  int64_t kps = KC_MIN_SPLIT;
  if (w_dec > 0) {
    const int64_t slots = (int64_t)st->n_sm * (st->occ[f16][dti] > 0 ? st->occ[f16][dti] : 1);
    int64_t want = (w_dec + 4 * slots - 1) / (4 * slots);
    want = (want + 63) / 64 * 64;
    if (want > kps) kps = want;
  }
  if (kps > cap) kps = cap;
  const int64_t pre_slots = (int64_t)st->n_sm * 2;
  const int64_t pre_f = n_pre > 0 && n_pre < 2 * pre_slots ? (2 * pre_slots + n_pre - 1) / n_pre : 1;

  size_t scr = (size_t)pl->n_tokens * (size_t)QH * 2; // the rows' (max, sum)
  for (int32_t s = 0; s < S; s++) {
    const k_seq_kv_t *q = &a->seqs[s];
    const int32_t q0 = a->q_start[s], q1 = a->q_start[s + 1], rows = q1 - q0;
    const int32_t obs = rows == 0 ? 0 : q->n_obs < 0 || q->n_obs > rows ? rows : q->n_obs;
    kc_seq e;
    memset(&e, 0, sizeof e);
    e.q0 = q0;
    e.q1 = q1;
    e.obs0 = q1 - obs;
    e.mode = !pl->attn_ok || obs == 0 ? 0 : q->n_obs < 0 ? 1 : 2;
    e.pool = e.mode == 2 && q->obs_pool > 1 ? q->obs_pool / 2 : 0;
    const bool dec = rows > 0 && (int64_t)rows * G <= dec_cap;
    e.stored = e.mode != 0 && dec;
    e.row_slots = (int64_t)q->stride * B;
    if (e.mode == 2) {
      e.obs_mass = q->obs_mass;
      e.obs_last = q->obs_last;
    }
    if (!kc_vec_push(&st->sec[KC_S_SEQ], &e, sizeof e)) return -ENOMEM;
    for (int32_t h = 0; h < H; h++) {
      const int32_t ctx = ctxs[s * H + h];
      kc_head hd;
      hd.lg_off = hd.ps_off = -1;
      hd.ctx = rows > 0 ? ctx : 0;
      hd.tab = (int32_t)(st->sec[KC_S_BLOCKS].n / sizeof(int32_t));
      if (rows > 0) {
        // block ids in use, checked against the arena
        const int32_t *table = k_attn_table(a, q, h);
        const int32_t nblk = (int32_t)(((int64_t)ctx + B - 1) / B);
        const int32_t first_new = ctx - rows; // logical slot of the first new row
        if (first_new < 0) pl->write_ok = false;
        if (kc_vec_reserve(&st->sec[KC_S_BLOCKS], st->sec[KC_S_BLOCKS].n + (size_t)nblk * 4))
          return -ENOMEM;
        int32_t *dst = (int32_t *)(st->sec[KC_S_BLOCKS].p + st->sec[KC_S_BLOCKS].n);
        for (int32_t b = 0; b < nblk; b++) {
          const int32_t id = table[b] - kv->first_block; // the pool's id, in this arena
          if (id < 0 || id >= kv->n_blocks) {
            pl->read_ok = false;
            if (first_new >= 0 && ((int64_t)b + 1) * B > first_new) pl->write_ok = false;
          }
          dst[b] = id;
        }
        st->sec[KC_S_BLOCKS].n += (size_t)nblk * 4;
      }
      if (rows > 0 && pl->attn_ok) {
        int rc;
        if (e.mode != 0 && ctx > 0) {
          if (e.stored) hd.lg_off = kc_take(&scr, (int64_t)obs * G * ctx);
          if (e.pool > 0) {
            hd.ps_off = kc_take(&scr, (int64_t)2 * G * ctx);
            if ((rc = kc_push_chunks(&st->sec[KC_S_POOL], s, h, ctx, KC_PK))) return rc;
          }
          if ((rc = kc_push_chunks(&st->sec[KC_S_SCORE], s, h, ctx, KC_SK))) return rc;
        }
        if (dec) {
          const int64_t nq = (int64_t)rows * G;
          const int nqi = nq <= 4 ? 0 : nq <= 8 ? 1 : 2;
          rc = kc_push_split(st, KC_S_DEC + nqi, &scr, Dk, G, s, h, q0, rows, ctx, kps);
          if (rc) return rc;
        } else {
          int64_t np = (ctx + cap - 1) / cap, by_len = (ctx + 511) / 512;
          int64_t want = pre_f < by_len ? pre_f : by_len;
          if (want > np) np = want;
          if (np < 1) np = 1;
          int64_t len = (ctx + np - 1) / np;
          len = len < 1 ? 1 : (len + 31) / 32 * 32;
          for (int32_t r0 = q0; r0 < q1; r0 += (int32_t)rpt) {
            const int32_t nr = q1 - r0 < rpt ? q1 - r0 : (int32_t)rpt;
            rc = kc_push_split(st, KC_S_PRE, &scr, Dk, G, s, h, r0, nr, ctx, len);
            if (rc) return rc;
          }
        }
      }
      if (!kc_vec_push(&st->sec[KC_S_HEAD], &hd, sizeof hd)) return -ENOMEM;
    }
  }
  if (!kc_vec_push(&st->sec[KC_S_QSTART], a->q_start, (size_t)(S + 1) * sizeof(int32_t)))
    return -ENOMEM;

  // sections into a staging buffer, then to the device
  static const size_t unit[KC_NSEC] = {sizeof(kc_seq), sizeof(kc_head), sizeof(kc_item),
                                       sizeof(kc_item), sizeof(kc_item), sizeof(kc_item),
                                       sizeof(kc_item), sizeof(kc_chunk), sizeof(kc_chunk),
                                       sizeof(int32_t), sizeof(int32_t)};
  size_t bytes = 0;
  for (int i = 0; i < KC_NSEC; i++) {
    pl->off[i] = bytes;
    pl->cnt[i] = st->sec[i].n / unit[i];
    bytes += (st->sec[i].n + 15) & ~(size_t)15;
  }
  pl->bytes = bytes;
  pl->scr_floats = scr;
  const int r = st->ring;
  st->ring = (r + 1) % KC_RING;
  if (st->ev_live[r]) {
    st->ev_live[r] = false;
    if (kc_check(c, cudaEventSynchronize(st->ev[r]))) return -EIO;
  }
  if (bytes > st->stage_cap[r]) {
    if (st->stage[r]) cudaFreeHost(st->stage[r]);
    st->stage[r] = NULL;
    st->stage_cap[r] = 0;
    size_t want = bytes < ((size_t)1 << 16) ? ((size_t)1 << 16) : bytes + bytes / 4;
    if (cudaMallocHost(&st->stage[r], want) != cudaSuccess) {
      cudaGetLastError();
      st->stage[r] = NULL;
      return -ENOMEM;
    }
    st->stage_cap[r] = want;
  }
  for (int i = 0; i < KC_NSEC; i++)
    if (st->sec[i].n) memcpy((unsigned char *)st->stage[r] + pl->off[i], st->sec[i].p, st->sec[i].n);
  int rc = kc_dev_reserve(c, (void **)&st->dev, &st->dev_cap, bytes);
  if (!rc) rc = kc_dev_reserve(c, (void **)&st->scr, &st->scr_cap, (scr ? scr : 1) * sizeof(float));
  if (rc) return rc;
  if (bytes) {
    if ((rc = kc_check(c, cudaMemcpyAsync(st->dev, st->stage[r], bytes, cudaMemcpyHostToDevice,
                                          c->stream))))
      return rc;
    if ((rc = kc_check(c, cudaEventRecord(st->ev[r], c->stream)))) return rc;
    st->ev_live[r] = true;
  }
  return 0;
}

// The pack for (kv, a): the current one when it was built from the same
// data, else a new one.
static int kc_plan_get(kc_t *c, kc_attn_t *st, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  const int32_t S = a->n_seqs, H = a->n_kv_heads, B = kv->block_size, Dk = kv->head_dim;
  if (S < 0 || H <= 0 || B <= 0 || (B & (B - 1)) || Dk <= 0 || Dk % 8 || kv->n_blocks < 0 ||
      a->layer < 0 || a->kv_head0 < 0 || (kv->type != K_BF16 && kv->type != K_F16))
    return -EINVAL;
  const int32_t all = a->kv_heads_all > 0 ? a->kv_heads_all : H;
  if ((int64_t)a->kv_head0 + H > all) return -EINVAL;
  if (a->q_start[0] < 0) return -EINVAL;
  for (int32_t s = 0; s < S; s++)
    if (a->q_start[s + 1] < a->q_start[s]) return -EINVAL;
  kc_step(st, a);
  int rc = kc_fingerprint(&st->fp2, a, H);
  if (rc) return rc;
  kc_plan_t *pl = &st->pl;
  if (st->plan_ok && pl->gen == st->gen && pl->seqs == a->seqs && pl->q_start == a->q_start &&
      pl->n_seqs == S && pl->layer == a->layer &&
      pl->QH == a->n_q_heads && pl->H == H && pl->Dq == a->head_dim && pl->head0 == a->kv_head0 &&
      pl->all == all && pl->B == B && pl->n_blocks == kv->n_blocks &&
      pl->first_block == kv->first_block && pl->Dk == Dk &&
      pl->type == kv->type && st->fp.n == st->fp2.n && !memcmp(st->fp.p, st->fp2.p, st->fp.n))
    return 0;
  kc_vec_t t = st->fp;
  st->fp = st->fp2;
  st->fp2 = t;
  st->plan_ok = false;
  pl->gen = st->gen;
  pl->seqs = a->seqs;
  pl->q_start = a->q_start;
  pl->n_seqs = S;
  pl->layer = a->layer;
  pl->QH = a->n_q_heads;
  pl->H = H;
  pl->Dq = a->head_dim;
  pl->head0 = a->kv_head0;
  pl->all = all;
  pl->B = B;
  pl->n_blocks = kv->n_blocks;
  pl->first_block = kv->first_block;
  pl->Dk = Dk;
  pl->type = kv->type;
  pl->n_tokens = a->q_start[S];
  rc = kc_pack(c, st, kv, a);
  if (rc) {
    st->fp.n = 0;
    return rc;
  }
  st->plan_ok = true;
  return 0;
}

static kc_args kc_args_of(const kc_attn_t *st, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  const kc_plan_t *pl = &st->pl;
  const unsigned char *d = st->dev;
  kc_args p;
  memset(&p, 0, sizeof p);
  p.seqs = (const kc_seq *)(d + pl->off[KC_S_SEQ]);
  p.heads = (const kc_head *)(d + pl->off[KC_S_HEAD]);
  p.blocks = (const int32_t *)(d + pl->off[KC_S_BLOCKS]);
  p.q_start = (const int32_t *)(d + pl->off[KC_S_QSTART]);
  p.q = a->q;
  p.out = a->out;
  p.q_pos = a->q_pos;
  p.k = (const uint16_t *)kv->k;
  p.v = (const uint16_t *)kv->v;
  p.score = kv->score;
  p.pos = kv->pos;
  p.scr = st->scr;
  p.ml = st->scr;
  p.row0_all = (int64_t)a->layer * pl->all + a->kv_head0;
  p.n_seqs = a->n_seqs;
  p.H = a->n_kv_heads;
  p.G = pl->attn_ok ? a->n_q_heads / a->n_kv_heads : 1;
  p.QH = pl->attn_ok ? a->n_q_heads : 0;
  p.D = kv->head_dim;
  p.B = kv->block_size;
  p.lb = kc_log2(kv->block_size);
  p.scale = a->scale;
  return p;
}

static bool kc_aligned(const void *p) { return ((uintptr_t)p & 15u) == 0; }

int kc_kv_write(k_backend_t *be, const k_kv_arena_t *kv, const float *k, const float *v,
                const k_attn_args_t *a) {
  kc_t *c = kc_of(be);
  kc_attn_t *st = NULL;
  int rc = kc_enter(c);
  if (rc) return rc;
  if (a->n_seqs <= 0) return 0;
  if ((rc = kc_attn_get(c, &st)) || (rc = kc_plan_get(c, st, kv, a))) return rc;
  const kc_plan_t *pl = &st->pl;
  if (!pl->write_ok) return -EINVAL;
  const int64_t n = (int64_t)pl->n_tokens * a->n_kv_heads * (kv->head_dim / 8);
  if (n == 0) return 0;
  if (!kc_aligned(k) || !kc_aligned(v)) return -EINVAL;
  const kc_args p = kc_args_of(st, kv, a);
  const unsigned grid = (unsigned)((n + 255) / 256);
  if (kv->type == K_F16)
    kc_kv_write_kernel<kc_f16><<<grid, 256, 0, c->stream>>>(p, k, v, (uint16_t *)kv->k,
                                                           (uint16_t *)kv->v, pl->n_tokens);
  else
    kc_kv_write_kernel<kc_bf16><<<grid, 256, 0, c->stream>>>(p, k, v, (uint16_t *)kv->k,
                                                            (uint16_t *)kv->v, pl->n_tokens);
  return kc_check(c, cudaGetLastError());
}

int kc_attention(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  kc_t *c = kc_of(be);
  kc_attn_t *st = NULL;
  int rc = kc_enter(c);
  if (rc) return rc;
  if (!kc_attn_shape_ok(kv, a)) return -EINVAL;
  if (a->n_seqs <= 0) return 0;
  if ((rc = kc_attn_get(c, &st)) || (rc = kc_plan_get(c, st, kv, a))) return rc;
  const kc_plan_t *pl = &st->pl;
  if (!pl->attn_ok || !pl->read_ok) return -EINVAL;
  if (pl->n_tokens == 0) return 0;
  if (!kc_aligned(a->q) || !kc_aligned(a->out)) return -EINVAL;
  const kc_args p = kc_args_of(st, kv, a);
  const int f16 = kv->type == K_F16, dti = kc_dti(kv->head_dim);
  const unsigned char *d = st->dev;
  for (int nqi = 0; nqi < 3; nqi++) {
    const size_t n = pl->cnt[KC_S_DEC + nqi];
    if (!n) continue;
    kc_item_fn fn = kc_dec_fn(f16, dti, nqi);
    if (!fn) return -EINVAL;
    fn<<<(unsigned)n, 128, kc_dec_smem(dti, nqi), c->stream>>>(
        p, (const kc_item *)(d + pl->off[KC_S_DEC + nqi]));
    if ((rc = kc_check(c, cudaGetLastError()))) return rc;
  }
  if (pl->cnt[KC_S_PRE]) {
    kc_pre_fn(f16, dti, st->mma)<<<(unsigned)pl->cnt[KC_S_PRE], 128, kc_pre_smem(dti), c->stream>>>(
        p, (const kc_item *)(d + pl->off[KC_S_PRE]));
    if ((rc = kc_check(c, cudaGetLastError()))) return rc;
  }
  if (pl->cnt[KC_S_MERGE]) {
    kc_merge<<<(unsigned)pl->cnt[KC_S_MERGE], 128, 0, c->stream>>>(
        p, (const kc_item *)(d + pl->off[KC_S_MERGE]));
    if ((rc = kc_check(c, cudaGetLastError()))) return rc;
  }
  if (pl->cnt[KC_S_SCORE]) {
    kc_score_fn(f16)<<<(unsigned)pl->cnt[KC_S_SCORE], 256, kc_score_smem(p.D, p.G), c->stream>>>(
        p, (const kc_chunk *)(d + pl->off[KC_S_SCORE]));
    if ((rc = kc_check(c, cudaGetLastError()))) return rc;
  }
  if (pl->cnt[KC_S_POOL]) {
    kc_pool<<<(unsigned)pl->cnt[KC_S_POOL], KC_PK, 0, c->stream>>>(
        p, (const kc_chunk *)(d + pl->off[KC_S_POOL]));
    if ((rc = kc_check(c, cudaGetLastError()))) return rc;
  }
  return 0;
}
