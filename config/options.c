#include "config/options.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef enum { OPT_STR, OPT_INT, OPT_U64, OPT_FLOAT, OPT_BOOL, OPT_SIZE } opt_type_t;

typedef struct opt {
  const char *name;
  opt_type_t type;
  size_t off;
  const char *dflt; /* text form of the default, parsed like a command line value */
  double lo, hi;    /* numeric bounds (inclusive) */
  const char *choices; /* strings: '|'-separated allowed values, or NULL */
  const char *help;
} opt_t;

#define O(f) offsetof(cfg_options_t, f)
static const opt_t opts[] = {
    {"model", OPT_STR, O(model), NULL, 0, 0, NULL, "model: GGUF file or safetensors directory"},
    {"load-format", OPT_STR, O(load_format), "auto", 0, 0, "auto|gguf|safetensors|dummy",
     "how to read --model"},
    {"dummy-config", OPT_STR, O(dummy_config), NULL, 0, 0, NULL,
     "config.json giving the shape for --load-format dummy (required with it; --model then "
     "only supplies the tokenizer and chat template: a GGUF file or a directory with "
     "tokenizer.json)"},
    {"dummy-seed", OPT_U64, O(dummy_seed), "1", 0, 0, NULL,
     "seed of the dummy weights (the same seed gives the same weights on every backend)"},
    {"chat-template", OPT_STR, O(chat_template), NULL, 0, 0, "chatml|llama3|llama2|mistral",
     "chat template to use instead of the model's"},
    {"max-model-len", OPT_INT, O(max_model_len), "0", 0, 1 << 24, NULL,
     "context length limit (0 = the model's)"},
    {"device", OPT_STR, O(device), "auto", 0, 0, "auto|cpu|cuda", "compute backend"},
    {"threads", OPT_INT, O(threads), "0", 0, 1024, NULL, "CPU threads (0 = all cores)"},
    {"cpu-numerics", OPT_STR, O(cpu_numerics), "int8", 0, 0, "int8|exact|llama",
     "CPU arithmetic: int8 activations for quantised weights (fast, batch-invariant), exact "
     "(fp32 activations), or llama (llama.cpp's CPU results bit for bit; not batch-invariant, "
     "for comparisons)"},
    {"max-num-batched-tokens", OPT_INT, O(max_num_batched_tokens), "2048", 1, 1 << 20, NULL,
     "tokens per forward step (prefill chunk size)"},
    {"kv-cache-memory", OPT_SIZE, O(kv_cache_memory), "0", 0, 1e15, NULL,
     "bytes of KV cache, K/M/G suffixes (0: generate sizes it for its one sequence, serve for four of max-model-len)"},
    {"kv-compression", OPT_STR, O(kv_compression), "none", 0, 0,
     "none|kvcompress|dbudget|streaming|random",
     "KV cache compression of every request (a request's kv_compression object overrides "
     "it): KV-Compress block eviction, DBudgetKV's dynamic budget, or the StreamingLLM and "
     "random-eviction baselines"},
    {"kv-compression-ratio", OPT_FLOAT, O(kv_compression_ratio), "0", 0, 1e6, NULL,
     "keep about 1/ratio of each sequence's KV (>= 1; 0: no fixed ratio, dbudget decides)"},
    {"kv-max-cache-tokens", OPT_INT, O(kv_max_cache_tokens), "0", 0, 1 << 24, NULL,
     "budget in KV tokens per head on average, instead of a ratio (0: none)"},
    {"kv-layer-budget", OPT_STR, O(kv_layer_budget), "global", 0, 0, "global|uniform|zigzag",
     "how the budget is split over layers: KV-Compress's global greedy, equal, or ZigZagKV"},
    {"protected-window", OPT_INT, O(protected_window), "32", 0, 1 << 24, NULL,
     "newest tokens never evicted"},
    {"observation-window", OPT_INT, O(observation_window), "0", 0, 1 << 24, NULL,
     "last prompt tokens whose attention scores the prompt's KV (0: the whole prompt)"},
    {"kv-compression-interval", OPT_INT, O(kv_compression_interval), "32", 0, 1 << 24, NULL,
     "decode steps between compressions of a sequence (0: after the prefill and under "
     "memory pressure only)"},
    {"kv-sinks", OPT_INT, O(kv_sinks), "4", 0, 1 << 24, NULL,
     "first tokens never evicted (attention sinks)"},
    {"kv-score", OPT_STR, O(kv_score), "sum", 0, 0, "sum|mean",
     "kvcompress ranking: each KV's squared attention summed over the queries that saw it "
     "(KV-Compress), or averaged over them (old KVs not favoured for being seen more: better "
     "perplexity on running text, worse long-range retrieval)"},
    {"kv-dbudget-threshold", OPT_FLOAT, O(kv_dbudget_threshold), "0.01", 1e-6, 0.999999, NULL,
     "dbudget: largest relative change of the last prompt token's attention allowed"},
    {"host", OPT_STR, O(host), "127.0.0.1", 0, 0, NULL, "serve: address to listen on (IPv4 or IPv6)"},
    {"port", OPT_INT, O(port), "8000", 0, 65535, NULL, "serve: TCP port"},
    {"api-key", OPT_STR, O(api_key), NULL, 0, 0, NULL,
     "serve: require 'Authorization: Bearer KEY' on /v1/*"},
    {"served-model-name", OPT_STR, O(served_model_name), NULL, 0, 0, NULL,
     "serve: model name in the API (default: the model file's name)"},
    {"max-num-seqs", OPT_INT, O(max_num_seqs), "256", 1, 65536, NULL,
     "serve: running sequences at most"},
    {"max-waiting", OPT_INT, O(max_waiting), "1024", 1, 1 << 20, NULL,
     "serve: waiting requests at most (429 past it)"},
    {"max-request-bytes", OPT_SIZE, O(max_request_bytes), "4M", 1024, 1e10, NULL,
     "serve: request body limit (413 past it)"},
    {"max-connections", OPT_INT, O(max_connections), "1024", 1, 1 << 20, NULL,
     "serve: open connections at most"},
    {"prompt", OPT_STR, O(prompt), NULL, 0, 0, NULL, "prompt text"},
    {"prompt-file", OPT_STR, O(prompt_file), NULL, 0, 0, NULL, "read the prompt from a file"},
    {"chat", OPT_BOOL, O(chat), "false", 0, 0, NULL, "wrap the prompt in the chat template"},
    {"max-tokens", OPT_INT, O(max_tokens), "128", 0, 1 << 24, NULL, "tokens to generate"},
    {"temperature", OPT_FLOAT, O(temperature), "0", 0, 100, NULL, "0 = greedy"},
    {"top-k", OPT_INT, O(top_k), "0", 0, 1 << 24, NULL, "0 = off"},
    {"top-p", OPT_FLOAT, O(top_p), "1", 1e-9, 1, NULL, "nucleus sampling (1 = off)"},
    {"min-p", OPT_FLOAT, O(min_p), "0", 0, 1, NULL, "0 = off"},
    {"repetition-penalty", OPT_FLOAT, O(repetition_penalty), "1", 1e-6, 100, NULL, "1 = off"},
    {"presence-penalty", OPT_FLOAT, O(presence_penalty), "0", -2, 2, NULL, "0 = off"},
    {"frequency-penalty", OPT_FLOAT, O(frequency_penalty), "0", -2, 2, NULL, "0 = off"},
    {"seed", OPT_INT, O(seed), "-1", -1, (double)INT64_MAX, NULL, "sampling seed (-1 = random)"},
    {"ignore-eos", OPT_BOOL, O(ignore_eos), "false", 0, 0, NULL, "do not stop at end of text"},
    {"stats", OPT_BOOL, O(stats), "false", 0, 0, NULL,
     "print timings as one JSON line on stderr"},
};
#define N_OPTS (sizeof opts / sizeof *opts)

static bool in_choices(const char *choices, const char *v) {
  size_t n = strlen(v);
  for (const char *p = choices; p && *p;) {
    const char *bar = strchr(p, '|');
    size_t len = bar ? (size_t)(bar - p) : strlen(p);
    if (len == n && !strncmp(p, v, n)) return true;
    p = bar ? bar + 1 : NULL;
  }
  return false;
}

static int set_value(cfg_options_t *o, const opt_t *d, const char *v, char *err, size_t errlen) {
  char *p = (char *)o + d->off, *end = NULL;
  errno = 0;
  switch (d->type) {
  case OPT_STR: {
    if (d->choices && !in_choices(d->choices, v)) {
      snprintf(err, errlen, "--%s: '%s' is not one of %s", d->name, v, d->choices);
      return -EINVAL;
    }
    char *s = strdup(v);
    if (!s) return -ENOMEM;
    free(*(char **)p);
    *(char **)p = s;
    return 0;
  }
  case OPT_BOOL:
    if (!strcmp(v, "true") || !strcmp(v, "1")) *(bool *)p = true;
    else if (!strcmp(v, "false") || !strcmp(v, "0")) *(bool *)p = false;
    else {
      snprintf(err, errlen, "--%s: '%s' is not true or false", d->name, v);
      return -EINVAL;
    }
    return 0;
  case OPT_U64: {
    unsigned long long x = strtoull(v, &end, 10);
    if (errno || end == v || *end || v[0] == '-') break;
    *(uint64_t *)p = x;
    return 0;
  }
  case OPT_INT: {
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end || x < d->lo || x > d->hi) break;
    *(int64_t *)p = x;
    return 0;
  }
  case OPT_SIZE: {
    double x = strtod(v, &end);
    if (end == v || !isfinite(x) || x < 0) break;
    double mul = 1;
    if (*end == 'K' || *end == 'k') mul = 1024, end++;
    else if (*end == 'M' || *end == 'm') mul = 1024.0 * 1024, end++;
    else if (*end == 'G' || *end == 'g') mul = 1024.0 * 1024 * 1024, end++;
    if (*end == 'i') end++;
    if (*end == 'B') end++;
    if (*end || x * mul > d->hi) break;
    *(int64_t *)p = (int64_t)(x * mul);
    return 0;
  }
  case OPT_FLOAT: {
    double x = strtod(v, &end);
    if (errno || end == v || *end || !isfinite(x) || x < d->lo || x > d->hi) break;
    *(double *)p = x;
    return 0;
  }
  }
  if (d->type == OPT_INT || d->type == OPT_FLOAT)
    snprintf(err, errlen, "--%s: '%s' is not a number in [%g, %g]", d->name, v, d->lo, d->hi);
  else
    snprintf(err, errlen, "--%s: '%s' is not a valid value", d->name, v);
  return -EINVAL;
}

void cfg_defaults(cfg_options_t *o) {
  memset(o, 0, sizeof *o);
  char err[128];
  for (size_t i = 0; i < N_OPTS; i++)
    if (opts[i].dflt) set_value(o, &opts[i], opts[i].dflt, err, sizeof err);
}

void cfg_destroy(cfg_options_t *o) {
  if (!o) return;
  for (size_t i = 0; i < N_OPTS; i++)
    if (opts[i].type == OPT_STR) {
      char **p = (char **)((char *)o + opts[i].off);
      free(*p);
      *p = NULL;
    }
}

int cfg_parse_args(cfg_options_t *o, int argc, char **argv, char *err, size_t errlen) {
  for (int i = 0; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) return 1;
    if (strncmp(a, "--", 2)) {
      snprintf(err, errlen, "unexpected argument '%s'", a);
      return -EINVAL;
    }
    const char *name = a + 2, *eq = strchr(name, '=');
    size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
    const opt_t *d = NULL;
    for (size_t k = 0; k < N_OPTS; k++)
      if (strlen(opts[k].name) == nlen && !strncmp(opts[k].name, name, nlen)) d = &opts[k];
    if (!d) {
      snprintf(err, errlen, "unknown option '--%.*s' (see --help)", (int)nlen, name);
      return -EINVAL;
    }
    const char *v;
    if (eq) v = eq + 1;
    else if (d->type == OPT_BOOL) v = "true";
    else if (i + 1 < argc) v = argv[++i];
    else {
      snprintf(err, errlen, "option '--%s' needs a value", d->name);
      return -EINVAL;
    }
    int rc = set_value(o, d, v, err, errlen);
    if (rc) return rc;
  }
  return 0;
}

void cfg_print_help(FILE *f, const char *command) {
  fprintf(f, "usage: pressd %s [options]\n\noptions (default in brackets):\n", command);
  for (size_t i = 0; i < N_OPTS; i++) {
    const opt_t *d = &opts[i];
    char left[64];
    snprintf(left, sizeof left, "--%s%s", d->name, d->type == OPT_BOOL ? "" : " V");
    fprintf(f, "  %-28s %s", left, d->help);
    if (d->choices) fprintf(f, " (%s)", d->choices);
    fprintf(f, " [%s]\n", d->dflt ? d->dflt : "none");
  }
}
