/* One token drawn from a row of logits, the same way wherever it is drawn:
 * by the host sampler (scheduler/sample.c), the CPU backend's sample op or
 * the CUDA kernel. So a request's tokens do not depend on whether its step
 * sampled on the device or on the host.
 *
 * Temperature 0: the argmax, lowest column on ties, NaN never wins, 0 when
 * nothing is above -inf. Otherwise the Gumbel-max draw, exact sampling from
 * softmax(l / T) restricted to the kept ids:
 *
 *   id = argmax over kept i of  x_i + g_i,   x_i = (l_i - l_max) / T,
 *   g_i = -log(-log(u_i)),  u_i in (0, 1) from 53 bits of a hash of
 *         (key, i),
 *
 * with the same argmax rule, l_max the row's largest logit and w_i =
 * exp(x_i). Kept, in vLLM's order:
 *   top-k  the first top_k ids in rank order (larger logit first, then the
 *          lower id), all where top_k <= 0 or >= n;
 *   top-p  of those, the shortest rank-ordered prefix whose weight reaches
 *          top_p times theirs (at least one id), all where top_p <= 0 or
 *          >= 1;
 *   min-p  of those, w_i > 0 and w_i >= min_p.
 * A row whose maximum is not finite (all -inf, or +inf present) gives its
 * argmax; NaN logits weigh nothing. key is one draw of the request's seeded
 * generator per token. Penalties rewrite the row first, from the request's
 * history (k_draw_penalise: the host sampler's and the backends' penalize
 * op, the same floats). Host and device agree up to the
 * rounding of exp and log (1 ulp apart on CUDA) and of the sums top-p
 * compares, which decide only near-exact ties. */
#ifndef PRESSD_KERNELS_DRAW_H
#define PRESSD_KERNELS_DRAW_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>

#ifdef __CUDACC__
#define K_DRAW_FN static __host__ __device__ __forceinline__
#else
#define K_DRAW_FN static inline
#endif

/* One row's draw: temperature 0 for the argmax (the rest unused). */
typedef struct k_draw {
  float temperature;
  float min_p;
  float top_p;   /* <= 0 or >= 1: off */
  int32_t top_k; /* <= 0: off */
  uint64_t key;
} k_draw_t;

K_DRAW_FN bool k_draw_top_p_on(const k_draw_t *d) { return d->top_p > 0.0f && d->top_p < 1.0f; }
K_DRAW_FN bool k_draw_top_k_on(const k_draw_t *d, int64_t n) {
  return d->top_k > 0 && d->top_k < n;
}
/* Whether the kept set is a rank-ordered prefix (top-k or top-p), not
 * decided id by id. */
K_DRAW_FN bool k_draw_needs_rank(const k_draw_t *d, int64_t n) {
  return d->temperature > 0.0f && (k_draw_top_p_on(d) || k_draw_top_k_on(d, n));
}

/* The splitmix64 finaliser. */
K_DRAW_FN uint64_t k_draw_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* g_i: a standard Gumbel variate from (key, i). */
K_DRAW_FN double k_draw_gumbel(uint64_t key, int64_t i) {
  const uint64_t h = k_draw_mix(key ^ k_draw_mix((uint64_t)i + 0x9e3779b97f4a7c15ull));
  const double u = ((double)(h >> 11) + 0.5) * 0x1.0p-53; /* (0, 1) */
  return -log(-log(u));
}

/* w_i = exp((l - lmax) / T), the weight top-p sums and min-p compares. */
K_DRAW_FN float k_draw_weight(float l, float lmax, float T) { return expf((l - lmax) / T); }

/* The candidate's score x_i + g_i, or -inf when min-p (or underflow) drops
 * it. l must be above -inf (not NaN). */
K_DRAW_FN double k_draw_score(float l, float lmax, const k_draw_t *d, int64_t i) {
  const float x = (l - lmax) / d->temperature;
  const float w = k_draw_weight(l, lmax, d->temperature);
  if (!(w > 0.0f && w >= d->min_p)) return -INFINITY;
  return (double)x + k_draw_gumbel(d->key, i);
}

/* Penalties (vLLM's and llama.cpp's) of the logit l of an id the request
 * has seen, gen times among its generated tokens, in its prompt or not:
 * repetition (HF: a positive logit divided by rep, a negative one
 * multiplied), then for generated ids presence and frequency (OpenAI:
 * minus freq * gen + pres). */
K_DRAW_FN float k_draw_penalise(float l, int32_t gen, bool in_prompt, float rep, float pres,
                                float freq) {
  if (rep != 1.0f && (gen > 0 || in_prompt)) l = l > 0.0f ? l / rep : l * rep;
  if (gen > 0) l -= fmaf(freq, (float)gen, pres);
  return l;
}

/* The penalties of one row of logits for a backend's penalize op: entries
 * [first, first + n) of the packed ids[] and seen[] arrays, seen[j] =
 * 2 * (times ids[j] was generated) + (ids[j] is in the prompt), each id
 * once. */
typedef struct k_penalty {
  int64_t first;
  int32_t n;
  float rep, pres, freq;
} k_penalty_t;

/* Log-probabilities of one row for the OpenAI API: under log-softmax of the
 * raw logits (NaN and -inf weigh nothing), the drawn id's and the n_top
 * (at most K_DRAW_MAX_TOP) most likely ids', larger first, the lower id
 * first on ties. A row whose maximum is not finite gives 0 to the ids at
 * it and -inf to the rest. */
#define K_DRAW_MAX_TOP 20
typedef struct k_logprobs {
  float chosen;
  int32_t n_top;
  int32_t top[K_DRAW_MAX_TOP];
  float top_lp[K_DRAW_MAX_TOP];
} k_logprobs_t;

#ifndef __CUDACC__
/* The log-probabilities of id and the top k of row l[n] on the host
 * (kernels/draw.c; lse in double). */
void k_draw_logprobs(const float *l, int64_t n, int32_t id, int32_t k, k_logprobs_t *out);

/* The draw of one row of n logits on the host (kernels/draw.c). w and idx
 * are scratch of n each, needed only where k_draw_needs_rank(d, n). */
int32_t k_draw_row(const float *l, int64_t n, const k_draw_t *d, float *w, int32_t *idx);
#endif

#endif
