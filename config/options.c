#include "config/options.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
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
    {"gpu-memory-utilization", OPT_FLOAT, O(gpu_memory_utilization), "0.9", 0.01, 1, NULL,
     "on a GPU with --kv-cache-memory 0: the fraction of the device's memory pressd may use "
     "(weights, activations and the KV cache, which gets the rest)"},
    {"tensor-parallel-size", OPT_INT, O(tensor_parallel_size), "1", 1, 64, NULL,
     "ranks the model is split over (Megatron-style: heads, MLP columns, vocabulary); on "
     "the CPU each rank is a thread group sharing --threads"},
    {"kv-arena-per-rank", OPT_BOOL, O(kv_arena_per_rank), "false", 0, 0, NULL,
     "tensor parallelism: each rank keeps its KV heads' blocks in a KV arena of its own (the "
     "pool cut into one part per rank), as ranks on GPUs always do; on the CPU the ranks "
     "otherwise share one arena"},
    {"enforce-eager", OPT_BOOL, O(enforce_eager), "false", 0, 0, NULL,
     "on a GPU: run every step op by op, never replaying steps as CUDA graphs"},
    {"cpu-numerics", OPT_STR, O(cpu_numerics), "int8", 0, 0, "int8|exact|llama",
     "CPU arithmetic: int8 activations for quantised weights (fast, batch-invariant), exact "
     "(fp32 activations), or llama (llama.cpp's CPU results bit for bit; not batch-invariant, "
     "for comparisons)"},
    {"max-num-batched-tokens", OPT_INT, O(max_num_batched_tokens), "0", 0, 1 << 20, NULL,
     "tokens per forward step (prefill chunk size); 0: 512 on the CPU, 2048 on a GPU, and "
     "never fewer than --max-num-seqs"},
    {"kv-cache-memory", OPT_SIZE, O(kv_cache_memory), "0", 0, 1e15, NULL,
     "bytes of KV cache, K/M/G suffixes (0: generate sizes it for its one sequence, serve for four of max-model-len)"},
    {"kv-cache-dtype", OPT_STR, O(kv_cache_dtype), "auto", 0, 0, "auto|f32|f16|bf16",
     "element type of the cached K and V: f32 or f16 on the CPU, bf16 or f16 on a GPU; auto: "
     "bf16 on a GPU, f16 on the CPU (f32 with --cpu-numerics exact)"},
    {"log-level", OPT_STR, O(log_level), "info", 0, 0, "error|warn|info|debug",
     "log verbosity; info logs one line per request"},
    {"log-file", OPT_STR, O(log_file), NULL, 0, 0, NULL,
     "serve: append the log to this file instead of stderr (SIGHUP reopens it, for log "
     "rotation)"},
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
    {"observation-window", OPT_INT, O(observation_window), "-1", -1, 1 << 24, NULL,
     "last prompt tokens whose attention scores the prompt's KV (0: the whole prompt; -1: 32, "
     "or the whole prompt for dbudget's norm criterion)"},
    {"kv-compression-interval", OPT_INT, O(kv_compression_interval), "32", 0, 1 << 24, NULL,
     "decode steps between compressions of a sequence (0: after the prefill and under "
     "memory pressure only)"},
    {"kv-prefill-chunk", OPT_INT, O(kv_prefill_chunk), "0", 0, 1 << 24, NULL,
     "with a compression ratio or max cache tokens, prompts longer than this are compressed "
     "after every chunk of this many tokens during the prefill (0: only prompts whose whole KV "
     "would not fit in the KV cache)"},
    {"kv-sinks", OPT_INT, O(kv_sinks), "4", 0, 1 << 24, NULL,
     "first tokens never evicted (attention sinks)"},
    {"kv-score", OPT_STR, O(kv_score), "sum", 0, 0, "sum|mean",
     "kvcompress ranking: each KV's squared attention summed over the queries that saw it "
     "(KV-Compress), or averaged over them (old KVs not favoured for being seen more: better "
     "perplexity on running text, worse long-range retrieval)"},
    {"kv-dbudget-threshold", OPT_FLOAT, O(kv_dbudget_threshold), "0.01", 1e-6, 0.999999, NULL,
     "dbudget: largest relative change of the last prompt token's attention allowed"},
    {"kv-dbudget-criterion", OPT_STR, O(kv_dbudget_criterion), "mass", 0, 0, "norm|mass",
     "dbudget: what of the last prompt token's attention over the kept KVs may change by the "
     "threshold: its norm (sqrt of the summed squares, DBudgetKV's) or its mass (the sum, "
     "stricter where many small weights go)"},
    {"host", OPT_STR, O(host), "127.0.0.1", 0, 0, NULL, "serve: address to listen on (IPv4 or IPv6)"},
    {"port", OPT_INT, O(port), "8000", 0, 65535, NULL, "serve: TCP port"},
    {"api-key", OPT_STR, O(api_key), NULL, 0, 0, NULL,
     "serve: require 'Authorization: Bearer KEY' on /v1/*"},
    {"api-key-file", OPT_STR, O(api_key_file), NULL, 0, 0, NULL,
     "serve: file of API keys, one per line (blank lines and # comments ignored); with "
     "--api-key, both are accepted"},
    {"metrics-require-key", OPT_BOOL, O(metrics_require_key), "false", 0, 0, NULL,
     "serve: /metrics and /health need the API key too"},
    {"served-model-name", OPT_STR, O(served_model_name), NULL, 0, 0, NULL,
     "serve: model name in the API (default: the model file's name)"},
    {"max-num-seqs", OPT_INT, O(max_num_seqs), "256", 1, 65536, NULL,
     "serve: running sequences at most"},
    {"max-waiting", OPT_INT, O(max_waiting), "1024", 1, 1 << 20, NULL,
     "serve: waiting requests at most (429 past it)"},
    {"max-request-bytes", OPT_SIZE, O(max_request_bytes), "4M", 1024, 1e10, NULL,
     "serve: request body limit (413 past it)"},
    {"max-tokens-limit", OPT_INT, O(max_tokens_limit), "0", 0, 1 << 24, NULL,
     "serve: ceiling on a request's max_tokens (0: max-model-len); larger requests get 400"},
    {"max-connections", OPT_INT, O(max_connections), "1024", 1, 1 << 20, NULL,
     "serve: open connections at most"},
    {"request-timeout", OPT_FLOAT, O(request_timeout), "60", 0, 1e6, NULL,
     "serve: seconds a request body may take to arrive after its headers (which have 10 s); "
     "a slower one is answered 408 and closed (0: no limit)"},
    {"idle-timeout", OPT_FLOAT, O(idle_timeout), "60", 0, 1e6, NULL,
     "serve: keep-alive connections idle this long are closed (0: never)"},
    {"debug-checks", OPT_BOOL, O(debug_checks), "false", 0, 0, NULL,
     "serve: check the KV block accounting after every engine step and abort on a mismatch "
     "(slow; for tests and soak runs)"},
    {"shutdown-timeout", OPT_FLOAT, O(shutdown_timeout), "30", 0, 86400, NULL,
     "serve: on SIGTERM or SIGINT, seconds running requests may take to finish before they "
     "are aborted (a second signal stops at once)"},
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
    /* Command line only (see cli_only): a file names no other file, and
     * --print-config's output must not print itself again. */
    {"config", OPT_STR, O(config), NULL, 0, 0, NULL,
     "read options from a JSON file (keys: the option names without dashes; see "
     "--print-config); the command line overrides it"},
    {"print-config", OPT_BOOL, O(print_config), "false", 0, 0, NULL,
     "print the effective options (defaults, --config, command line) as a config file and exit"},
};
#define N_OPTS (sizeof opts / sizeof *opts)

/* The first key of every --print-config output, so that the example file
 * (config/pressd.example.json) is that output byte for byte. */
static const char file_comment[] =
    "pressd configuration, read with --config FILE. Keys are the command-line options without "
    "their dashes ('_' may stand for '-'); values are strings, numbers or booleans, checked as "
    "on the command line; null keeps the default; keys beginning with # are comments. The "
    "command line overrides the file. This file is the output of: pressd serve --print-config "
    "--model /var/lib/pressd/models/SmolLM2-135M-Instruct.Q4_1.gguf";

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

/* Options a config file may not set. */
static bool cli_only(const opt_t *d) {
  return d->off == O(config) || d->off == O(print_config);
}

/* The entry named by name[0..nlen); with loose, '_' also matches '-' (JSON
 * keys are often written in snake case). */
static const opt_t *find_opt(const char *name, size_t nlen, bool loose) {
  for (size_t k = 0; k < N_OPTS; k++) {
    const char *t = opts[k].name;
    if (strlen(t) != nlen) continue;
    size_t j = 0;
    while (j < nlen && (name[j] == t[j] || (loose && name[j] == '_' && t[j] == '-'))) j++;
    if (j == nlen) return &opts[k];
  }
  return NULL;
}

/* Parses v into d's field. On error, msg says what is wrong with v (the
 * caller adds where v came from). */
static int set_value(cfg_options_t *o, const opt_t *d, const char *v, char *msg, size_t msglen) {
  char *p = (char *)o + d->off, *end = NULL;
  errno = 0;
  switch (d->type) {
  case OPT_STR: {
    if (d->choices && !in_choices(d->choices, v)) {
      snprintf(msg, msglen, "'%s' is not one of %s", v, d->choices);
      return -EINVAL;
    }
    char *s = strdup(v);
    if (!s) {
      snprintf(msg, msglen, "out of memory");
      return -ENOMEM;
    }
    free(*(char **)p);
    *(char **)p = s;
    return 0;
  }
  case OPT_BOOL:
    if (!strcmp(v, "true") || !strcmp(v, "1")) *(bool *)p = true;
    else if (!strcmp(v, "false") || !strcmp(v, "0")) *(bool *)p = false;
    else {
      snprintf(msg, msglen, "'%s' is not true or false", v);
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
    if (*end || x * mul < d->lo || x * mul > d->hi) break;
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
    snprintf(msg, msglen, "'%s' is not a number in [%.15g, %.15g]", v, d->lo, d->hi);
  else if (d->type == OPT_SIZE)
    snprintf(msg, msglen, "'%s' is not a size in [%.15g, %.15g] bytes (K, M, G suffixes)", v,
             d->lo, d->hi);
  else
    snprintf(msg, msglen, "'%s' is not a valid value", v);
  return -EINVAL;
}

/* set_value with a command-line message: "--name: what is wrong". */
static int set_arg(cfg_options_t *o, const opt_t *d, const char *v, char *err, size_t errlen) {
  char msg[192];
  int rc = set_value(o, d, v, msg, sizeof msg);
  if (rc) snprintf(err, errlen, "--%s: %s", d->name, msg);
  return rc;
}

void cfg_defaults(cfg_options_t *o) {
  memset(o, 0, sizeof *o);
  char msg[192];
  for (size_t i = 0; i < N_OPTS; i++)
    if (opts[i].dflt) set_value(o, &opts[i], opts[i].dflt, msg, sizeof msg);
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

/* ---- JSON numbers as text ------------------------------------------------ */

/* The shortest %g form that reads back as x exactly. */
static void format_double(char *buf, size_t n, double x) {
  for (int prec = 15; prec <= 17; prec++) {
    snprintf(buf, n, "%.*g", prec, x);
    if (strtod(buf, NULL) == x) return;
  }
}

/* A JSON number as set_value reads it: whole numbers as integers (strtoll
 * and strtoull reject "1e+18"), others with full precision. */
static void format_number(char *buf, size_t n, double x) {
  if (x == trunc(x) && x >= -9223372036854775808.0 && x < 0)
    snprintf(buf, n, "%lld", (long long)x);
  else if (x == trunc(x) && x >= 0 && x < 18446744073709551616.0)
    snprintf(buf, n, "%llu", (unsigned long long)x);
  else
    format_double(buf, n, x);
}

/* ---- config files ---------------------------------------------------------- */

/* The whole file, NUL-terminated; NULL with errno set when it cannot be
 * read. Read in a loop so that pipes (--config /dev/stdin) work too. */
static char *read_text(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  size_t cap = 4096, n = 0;
  char *s = malloc(cap);
  while (s) {
    n += fread(s + n, 1, cap - 1 - n, f);
    if (ferror(f) || feof(f)) break;
    char *t = realloc(s, cap *= 2);
    if (!t) free(s);
    s = t;
  }
  int e = !s ? ENOMEM : ferror(f) ? (errno ? errno : EIO) : 0;
  fclose(f);
  if (e) {
    free(s);
    errno = e;
    return NULL;
  }
  s[n] = '\0';
  *len = n;
  return s;
}

static int line_of(const char *text, const char *at) {
  int line = 1;
  for (const char *c = text; at && c < at && *c; c++) line += *c == '\n';
  return line;
}

/* One key of the file's object. */
static int apply_item(cfg_options_t *o, const cJSON *it, const char *path, char *err,
                      size_t errlen) {
  const char *key = it->string;
  if (key[0] == '#') return 0;
  const opt_t *d = find_opt(key, strlen(key), true);
  if (!d) {
    snprintf(err, errlen, "config %s: unknown key '%s'", path, key);
    return -EINVAL;
  }
  if (cli_only(d)) {
    snprintf(err, errlen, "config %s: '%s' is allowed on the command line only", path, key);
    return -EINVAL;
  }
  char num[64];
  const char *v;
  if (cJSON_IsNull(it)) return 0;
  if (cJSON_IsString(it)) v = it->valuestring;
  else if (cJSON_IsBool(it)) v = cJSON_IsTrue(it) ? "true" : "false";
  else if (cJSON_IsNumber(it)) format_number(num, sizeof num, it->valuedouble), v = num;
  else {
    snprintf(err, errlen, "config %s: '%s': an %s, not a string, number, boolean or null", path,
             key, cJSON_IsArray(it) ? "array" : "object");
    return -EINVAL;
  }
  char msg[192];
  int rc = set_value(o, d, v, msg, sizeof msg);
  if (rc) snprintf(err, errlen, "config %s: '%s': %s", path, key, msg);
  return rc;
}

int cfg_load_file(cfg_options_t *o, const char *path, char *err, size_t errlen) {
  size_t len = 0;
  char *text = read_text(path, &len);
  if (!text) {
    int e = errno;
    snprintf(err, errlen, "config %s: %s", path, strerror(e));
    return -e;
  }
  /* A NUL inside would end cJSON's reading early and hide the rest. */
  const char *nul = memchr(text, '\0', len);
  const char *end = nul;
  /* len + 1: with require_null_terminated, cJSON looks for the NUL inside
   * the length it is given. */
  cJSON *root = nul ? NULL : cJSON_ParseWithLengthOpts(text, len + 1, &end, true);
  int rc = 0;
  if (!root) {
    if (strspn(text, " \t\r\n") == len)
      snprintf(err, errlen, "config %s: empty, not a JSON object", path);
    else
      snprintf(err, errlen, "config %s: invalid JSON near line %d", path, line_of(text, end));
    rc = -EINVAL;
  } else if (!cJSON_IsObject(root)) {
    snprintf(err, errlen, "config %s: not a JSON object", path);
    rc = -EINVAL;
  }
  for (const cJSON *it = root && !rc ? root->child : NULL; it && !rc; it = it->next)
    rc = apply_item(o, it, path, err, errlen);
  cJSON_Delete(root);
  free(text);
  return rc;
}

/* ---- the command line -------------------------------------------------------- */

/* The option at argv[*i] and its value, advancing *i past a separate value.
 * Returns 0, CFG_HELP, CFG_VERSION or -EINVAL. */
static int next_arg(int argc, char **argv, int *i, const opt_t **d, const char **v, char *err,
                    size_t errlen) {
  const char *a = argv[*i];
  if (!strcmp(a, "-h") || !strcmp(a, "--help")) return CFG_HELP;
  if (!strcmp(a, "--version")) return CFG_VERSION;
  if (strncmp(a, "--", 2)) {
    snprintf(err, errlen, "unexpected argument '%s'", a);
    return -EINVAL;
  }
  const char *name = a + 2, *eq = strchr(name, '=');
  size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
  *d = find_opt(name, nlen, false);
  if (!*d) {
    snprintf(err, errlen, "unknown option '--%.*s' (see --help)", (int)nlen, name);
    return -EINVAL;
  }
  if (eq) *v = eq + 1;
  else if ((*d)->type == OPT_BOOL) *v = "true";
  else if (*i + 1 < argc) *v = argv[++*i];
  else {
    snprintf(err, errlen, "option '--%s' needs a value", (*d)->name);
    return -EINVAL;
  }
  return 0;
}

int cfg_parse_args(cfg_options_t *o, int argc, char **argv, char *err, size_t errlen) {
  const opt_t *d;
  const char *v;
  int rc;
  /* --help, --version and misspelt options come before reading any file. */
  for (int i = 0; i < argc; i++)
    if ((rc = next_arg(argc, argv, &i, &d, &v, err, errlen))) return rc;
  /* The files, so that the command line overrides them wherever it stands. */
  for (int i = 0; i < argc; i++) {
    next_arg(argc, argv, &i, &d, &v, err, errlen);
    if (d->off != O(config)) continue;
    if ((rc = set_arg(o, d, v, err, errlen)) || (rc = cfg_load_file(o, v, err, errlen)))
      return rc;
  }
  for (int i = 0; i < argc; i++) {
    next_arg(argc, argv, &i, &d, &v, err, errlen);
    if (d->off != O(config) && (rc = set_arg(o, d, v, err, errlen))) return rc;
  }
  return 0;
}

/* ---- output ---------------------------------------------------------------- */

/* s as the inside of a JSON string. */
static void put_json_chars(FILE *f, const char *s) {
  for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
    if (*c == '"' || *c == '\\') fprintf(f, "\\%c", *c);
    else if (*c == '\n') fputs("\\n", f);
    else if (*c == '\t') fputs("\\t", f);
    else if (*c == '\r') fputs("\\r", f);
    else if (*c < 0x20) fprintf(f, "\\u%04x", *c);
    else fputc(*c, f);
  }
}

/* Integers past 2^53 are written as strings: a JSON number goes through a
 * double on the way back in and would lose their last digits. */
static void put_integer(FILE *f, const char *digits, double magnitude) {
  fprintf(f, magnitude > 9007199254740992.0 ? "\"%s\"" : "%s", digits);
}

static void put_value(FILE *f, const cfg_options_t *o, const opt_t *d) {
  const char *p = (const char *)o + d->off;
  char buf[64];
  switch (d->type) {
  case OPT_STR: {
    const char *s = *(char *const *)p;
    if (!s) {
      fputs("null", f);
      return;
    }
    fputc('"', f);
    put_json_chars(f, s);
    fputc('"', f);
    return;
  }
  case OPT_BOOL:
    fputs(*(const bool *)p ? "true" : "false", f);
    return;
  case OPT_INT:
  case OPT_SIZE: {
    int64_t x = *(const int64_t *)p;
    snprintf(buf, sizeof buf, "%" PRId64, x);
    put_integer(f, buf, fabs((double)x));
    return;
  }
  case OPT_U64: {
    uint64_t x = *(const uint64_t *)p;
    snprintf(buf, sizeof buf, "%" PRIu64, x);
    put_integer(f, buf, (double)x);
    return;
  }
  case OPT_FLOAT:
    format_double(buf, sizeof buf, *(const double *)p);
    fputs(buf, f);
    return;
  }
}

int cfg_print_config(FILE *f, const cfg_options_t *o) {
  fputs("{\n  \"#\": \"", f);
  put_json_chars(f, file_comment);
  fputc('"', f);
  for (size_t i = 0; i < N_OPTS; i++) {
    const opt_t *d = &opts[i];
    if (cli_only(d)) continue;
    fprintf(f, ",\n  \"# %s\": \"", d->name);
    put_json_chars(f, d->help);
    if (d->choices) fprintf(f, " (%s)", d->choices);
    fputs(". Default: ", f);
    put_json_chars(f, d->dflt ? d->dflt : "none");
    fprintf(f, ".\",\n  \"%s\": ", d->name);
    put_value(f, o, d);
  }
  fputs("\n}\n", f);
  return fflush(f) || ferror(f) ? -EIO : 0;
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
  fprintf(f, "  %-28s %s\n  %-28s %s\n", "-h, --help", "print this help and exit", "--version",
          "print the version and exit");
}
