/* Token sampling over one row of logits: greedy, temperature, top-k, top-p,
 * min-p, seeded RNG, repetition / presence / frequency penalties. Per-request
 * state; scratch sized once at init (no allocation per token). */
#ifndef PRESSD_SCHED_SAMPLE_H
#define PRESSD_SCHED_SAMPLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/draw.h"

typedef struct sched_sample_params {
  float temperature;        /* 0 = greedy */
  int32_t top_k;            /* <= 0: off */
  float top_p;              /* 1 = off */
  float min_p;              /* 0 = off */
  float repetition_penalty; /* 1 = off (llama.cpp / HF semantics: divide positive logits) */
  float presence_penalty;   /* 0 = off (OpenAI semantics) */
  float frequency_penalty;  /* 0 = off (OpenAI semantics) */
  uint64_t seed;
  bool has_seed; /* false: seeded from a random source */
} sched_sample_params_t;

void sched_sample_params_default(sched_sample_params_t *p);
/* -EINVAL with a message naming the parameter when out of range
 * (temperature < 0, top_p not in (0,1], min_p not in [0,1], NaN, ...). */
int sched_sample_params_check(const sched_sample_params_t *p, char *err, size_t errlen);

typedef struct sched_sampler {
  sched_sample_params_t p;
  int32_t n_vocab;
  uint64_t rng[4];     /* xoshiro256** state */
  int32_t *counts;     /* owns: [n_vocab] occurrences of each id in the penalised history */
  uint8_t *in_prompt;  /* owns: [n_vocab] id seen in prompt (repetition penalty covers prompt) */
  int32_t *seen;       /* owns, with penalties: [n_vocab] the ids counted or in the prompt */
  int32_t n_seen;
  float *probs;        /* owns: [n_vocab] scratch */
  int32_t *idx;        /* owns: [n_vocab] scratch */
} sched_sampler_t;

int sched_sampler_init(sched_sampler_t *s, const sched_sample_params_t *p, int32_t n_vocab);
void sched_sampler_destroy(sched_sampler_t *s); /* NULL-safe, half-init safe */
/* Tell the sampler about prompt tokens (repetition penalty) — once. */
void sched_sampler_prompt(sched_sampler_t *s, const int32_t *ids, size_t n);
/* Record a generated token (penalties). */
void sched_sampler_accept(sched_sampler_t *s, int32_t id);
/* Pick a token from logits[n_vocab] (modified in place by penalties).
 * If logprob is non-NULL, stores log-softmax of the chosen token under the
 * raw (penalised, unscaled) distribution. */
int32_t sched_sample(sched_sampler_t *s, float *logits, float *logprob);

/* Whether sched_sample's token is kernels/draw.h's draw of the raw logits,
 * or (penalize: a backend with the penalize op) of the logits penalised as
 * sched_sampler_penalty says, which a device can then make without the row. */
bool sched_sampler_on_device(const sched_sampler_t *s, bool penalize);
/* The penalties of the next token for a backend's penalize op: *row, and
 * its entries written at ids[0..n), seen[0..n) (room for n_seen each; the
 * row's entries start at first of the caller's packed arrays). Returns n
 * (0 without penalties). */
int32_t sched_sampler_penalty(const sched_sampler_t *s, k_penalty_t *row, int64_t first,
                              int32_t *ids, int32_t *seen);
/* The draw of the next token for a device (where sched_sampler_on_device),
 * consuming what sched_sample would have. */
void sched_sampler_next_draw(sched_sampler_t *s, k_draw_t *d);

/* Greedy argmax (lowest id wins ties). */
int32_t sched_argmax(const float *logits, int32_t n);

#endif
