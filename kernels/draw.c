/* The host's draw of one row (kernels/draw.h): the argmax, or the
 * Gumbel-max draw over the kept set. Without top-k and top-p the kept set
 * is decided id by id; with them it is a rank-ordered prefix, found by
 * partial quickselect: only the part of the prefix that top-p needs is
 * sorted, grown geometrically, and over the whole vocabulary the ids are
 * first bucketed by weight so that only the bucket holding the cut is
 * ranked. */
#include "kernels/draw.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

/* First prefix top-p sorts; it grows 4x while the mass is not reached. */
#define TOPP_FIRST_CHUNK 64

/* "a ranks before b": larger logit, then lower id. A strict total order, so
 * quickselect never meets equal keys. */
static inline bool before(const float *l, int32_t a, int32_t b) {
  return l[a] > l[b] || (l[a] == l[b] && a < b);
}

static inline void swap_i32(int32_t *a, int32_t *b) {
  int32_t t = *a;
  *a = *b;
  *b = t;
}

/* Pivot choice for select/sort: a fixed xorshift, so results never depend on
 * the draw's key and worst cases need adversarial input. */
static inline size_t pick(uint32_t *st, size_t n) {
  uint32_t x = *st;
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  *st = x;
  return (size_t)x % n;
}

/* Partition a[0..n) around a random pivot: returns its final position p,
 * with a[0..p) before the pivot and a(p..n) after it. */
static size_t partition(int32_t *a, size_t n, const float *l, uint32_t *st) {
  swap_i32(&a[pick(st, n)], &a[n - 1]);
  const int32_t pv = a[n - 1];
  size_t store = 0;
  for (size_t i = 0; i + 1 < n; i++)
    if (before(l, a[i], pv)) swap_i32(&a[i], &a[store++]);
  swap_i32(&a[store], &a[n - 1]);
  return store;
}

/* Rearrange a[0..n) so that a[0..k) are its k first ids in rank order (in
 * no particular order among themselves). */
static void select_top(int32_t *a, size_t n, size_t k, const float *l, uint32_t *st) {
  while (k > 0 && k < n) {
    size_t p = partition(a, n, l, st);
    if (p == k || p + 1 == k) return;
    if (p > k) {
      n = p;
    } else {
      a += p + 1;
      n -= p + 1;
      k -= p + 1;
    }
  }
}

static void sort_rank(int32_t *a, size_t n, const float *l, uint32_t *st) {
  while (n > 16) {
    size_t p = partition(a, n, l, st);
    if (p < n - p - 1) { /* recurse on the smaller side */
      sort_rank(a, p, l, st);
      a += p + 1;
      n -= p + 1;
    } else {
      sort_rank(a + p + 1, n - p - 1, l, st);
      n = p;
    }
  }
  for (size_t i = 1; i < n; i++) /* insertion sort */
    for (size_t j = i; j > 0 && before(l, a[j], a[j - 1]); j--) swap_i32(&a[j], &a[j - 1]);
}

/* Over the candidate ids a[0..n), with weights w by id: the length of the
 * shortest rank-ordered prefix whose weight reaches `need` (at least 1; n if
 * rounding keeps it short). With w_max the largest weight, the first
 * ceil(need / w_max) - 1 ids cannot reach `need`, so they are selected
 * unsorted; past them, a chunk is quickselected and sorted, growing 4x until
 * the mass is there. a[0..result) holds the prefix. */
static size_t mass_prefix(int32_t *a, size_t n, double need, const float *w, const float *l,
                          uint32_t *st) {
  if (n == 0) return 0;
  float w_max = 0.0f;
  for (size_t j = 0; j < n; j++) w_max = w[a[j]] > w_max ? w[a[j]] : w_max;
  double cum = 0.0;
  size_t sorted = 0;
  if (w_max > 0.0f) {
    const double sure = ceil(need / (double)w_max) - 1.0; /* these stay below need */
    sorted = sure <= 0.0 ? 0 : sure >= (double)(n - 1) ? n - 1 : (size_t)sure;
    if (sorted) {
      select_top(a, n, sorted, l, st);
      for (size_t j = 0; j < sorted; j++) cum += w[a[j]];
    }
  }
  size_t m = n - sorted > TOPP_FIRST_CHUNK ? sorted + TOPP_FIRST_CHUNK : n;
  while (sorted < n) {
    select_top(a + sorted, n - sorted, m - sorted, l, st);
    sort_rank(a + sorted, m - sorted, l, st);
    for (size_t j = sorted; j < m; j++) {
      cum += w[a[j]];
      if (cum >= need) return j + 1;
    }
    const size_t chunk = 4 * (m - sorted);
    sorted = m;
    m = n - m > chunk ? m + chunk : n;
  }
  return n;
}

/* Top-p over the whole vocabulary buckets x = (l - lmax) / T into bins of
 * 1/TOPP_BINS_PER_UNIT (x <= -TOPP_BINS / TOPP_BINS_PER_UNIT share the last
 * one). Bins are monotonic in the logit, so the cut lies in one bin, found
 * from the bin masses; only that bin's ids are ranked. */
#define TOPP_BINS 1024
#define TOPP_BINS_PER_UNIT 16.0f

static inline int topp_bin(float l, float lmax, float T) {
  const float y = (lmax - l) / T * TOPP_BINS_PER_UNIT; /* >= 0, or +inf */
  return y < (float)(TOPP_BINS - 1) ? (int)y : TOPP_BINS - 1;
}

/* exp((l - lmax) / T), 0 for -inf and NaN */
static inline float weight(float l, float lmax, float T) {
  return l > -INFINITY ? k_draw_weight(l, lmax, T) : 0.0f;
}

/* The kept prefix's ids into idx[0..result): top-k, then top-p among the
 * k. w receives the weights exp((l - lmax) / T) of the ids it looks at. */
static size_t kept_prefix(const float *l, int32_t n, float lmax, const k_draw_t *d, float *w,
                          int32_t *idx) {
  const float T = d->temperature;
  const bool top_p = k_draw_top_p_on(d);
  const size_t K = k_draw_top_k_on(d, n) ? (size_t)d->top_k : (size_t)n;
  uint32_t st = 0x9e3779b9u;
  if (K < (size_t)n) { /* top-k, then top-p among the k */
    for (int32_t i = 0; i < n; i++) idx[i] = i;
    select_top(idx, (size_t)n, K, l, &st);
    double sum = 0.0;
    for (size_t j = 0; j < K; j++) sum += w[idx[j]] = weight(l[idx[j]], lmax, T);
    return top_p ? mass_prefix(idx, K, (double)d->top_p * sum, w, l, &st) : K;
  }
  double bin_mass[TOPP_BINS] = {0};
  double sum = 0.0;
  for (int32_t i = 0; i < n; i++) {
    w[i] = weight(l[i], lmax, T);
    bin_mass[topp_bin(l[i], lmax, T)] += w[i];
    sum += w[i];
  }
  const double need = (double)d->top_p * sum;
  double above = 0.0; /* mass of the bins before the cut bin */
  int cut_bin = 0;
  while (cut_bin < TOPP_BINS - 1 && above + bin_mass[cut_bin] < need) above += bin_mass[cut_bin++];
  if (cut_bin == TOPP_BINS - 1) { /* only by rounding: keep everything */
    for (int32_t i = 0; i < n; i++) idx[i] = i;
    return (size_t)n;
  }
  /* Candidates: the bins before the cut bin whole, then the cut bin ranked.
   * One pass: the first from the front of idx, the second from its back. */
  size_t n_before = 0, n_cut = 0;
  for (int32_t i = 0; i < n; i++) {
    const int b = topp_bin(l[i], lmax, T);
    if (b < cut_bin) idx[n_before++] = i;
    else if (b == cut_bin) idx[(size_t)n - 1 - n_cut++] = i;
  }
  memmove(idx + n_before, idx + (size_t)n - n_cut, n_cut * sizeof *idx);
  return n_before + mass_prefix(idx + n_before, n_cut, need - above, w, l, &st);
}

int32_t k_draw_row(const float *l, int64_t n, const k_draw_t *d, float *w, int32_t *idx) {
  int64_t best = 0;
  float top = -INFINITY;
  for (int64_t i = 0; i < n; i++)
    if (l[i] > top) { /* NaN > top is false */
      top = l[i];
      best = i;
    }
  if (!d || d->temperature <= 0.0f || !isfinite(top)) return (int32_t)best;
  double bs = -INFINITY;
  if (!k_draw_needs_rank(d, n)) {
    for (int64_t i = 0; i < n; i++) {
      if (!(l[i] > -INFINITY)) continue;
      const double s = k_draw_score(l[i], top, d, i);
      if (s > bs) {
        bs = s;
        best = i;
      }
    }
    return (int32_t)best; /* the maximum itself is always kept */
  }
  const size_t kept = kept_prefix(l, (int32_t)n, top, d, w, idx);
  for (size_t j = 0; j < kept; j++) { /* in no particular order */
    const int32_t i = idx[j];
    if (!(l[i] > -INFINITY)) continue;
    const double s = k_draw_score(l[i], top, d, i);
    if (s == -INFINITY) continue; /* min-p */
    if (s > bs || (s == bs && i < best)) {
      bs = s;
      best = i;
    }
  }
  return (int32_t)best;
}

void k_draw_logprobs(const float *l, int64_t n, int32_t id, int32_t k, k_logprobs_t *out) {
  if (k > K_DRAW_MAX_TOP) k = K_DRAW_MAX_TOP;
  if (k < 0) k = 0;
  int32_t *top = out->top;
  float *tv = out->top_lp;
  int32_t got = 0;
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; i++) {
    const float x = l[i];
    if (!(x > -INFINITY)) continue; /* NaN, -inf */
    if (x > mx) mx = x;
    if (k == 0 || (got == k && !(x > tv[k - 1]))) continue;
    int32_t j = got < k ? got++ : k - 1; /* insert; ties keep the lower id first */
    while (j > 0 && x > tv[j - 1]) {
      top[j] = top[j - 1];
      tv[j] = tv[j - 1];
      j--;
    }
    top[j] = (int32_t)i;
    tv[j] = x;
  }
  out->n_top = got;
  if (!isfinite(mx)) { /* degenerate row */
    out->chosen = l[id] == mx ? 0.0f : -INFINITY;
    for (int32_t j = 0; j < got; j++) tv[j] = tv[j] == mx ? 0.0f : -INFINITY;
    return;
  }
  double sum = 0.0;
  for (int64_t i = 0; i < n; i++)
    if (l[i] > -INFINITY) sum += exp((double)l[i] - (double)mx);
  const double lse = (double)mx + log(sum);
  out->chosen = l[id] > -INFINITY ? (float)((double)l[id] - lse) : -INFINITY;
  for (int32_t j = 0; j < got; j++) tv[j] = (float)((double)tv[j] - lse);
}
