/* Options of every pressd command: one table drives parsing, validation,
 * defaults, --help, --config files and --print-config. Read-only after
 * start-up. */
#ifndef PRESSD_CONFIG_OPTIONS_H
#define PRESSD_CONFIG_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct cfg_options {
  /* model */
  char *model;          /* path: GGUF file or safetensors directory */
  char *load_format;    /* auto | gguf | safetensors | dummy */
  char *dummy_config;   /* JSON shape config for --load-format dummy */
  uint64_t dummy_seed;
  char *chat_template;  /* override: chatml | llama3 | llama2 | mistral */
  int64_t max_model_len;
  /* compute */
  char *device;         /* auto | cpu | cuda */
  int64_t threads;
  int64_t tensor_parallel_size;
  bool kv_arena_per_rank; /* tensor parallelism: a KV arena per rank on the CPU too */
  bool enforce_eager;   /* no CUDA graphs */
  double gpu_memory_utilization;
  char *cpu_numerics; /* int8 | exact | llama */
  int64_t max_num_batched_tokens;
  int64_t kv_cache_memory; /* bytes; 0 = size for one max_model_len sequence */
  const char *kv_cache_dtype;
  /* logging */
  char *log_level;      /* error | warn | info | debug */
  char *log_file;       /* NULL: stderr */
  /* serve */
  char *host;
  int64_t port;
  char *api_key;
  char *api_key_file;   /* one key per line; accepted besides api_key */
  bool metrics_require_key; /* /metrics and /health behind the key too */
  char *served_model_name;
  int64_t max_num_seqs;
  int64_t max_waiting;
  int64_t max_request_bytes;
  int64_t max_tokens_limit; /* ceiling on a request's max_tokens; 0 = max_model_len */
  int64_t max_connections;
  double request_timeout;  /* s for a request body after its headers; 0 = none */
  double idle_timeout;     /* s a keep-alive connection may idle; 0 = forever */
  double shutdown_timeout; /* s running requests get after SIGTERM */
  bool debug_checks;       /* check the KV accounting every step */
  /* KV compression (serve: the default of every request) */
  char *kv_compression;       /* none | kvcompress | dbudget | streaming | random */
  double kv_compression_ratio; /* 0: none given */
  int64_t kv_max_cache_tokens; /* 0: none given */
  char *kv_layer_budget;      /* global | uniform | zigzag */
  int64_t protected_window;
  int64_t observation_window;
  int64_t kv_compression_interval;
  int64_t kv_prefill_chunk;
  int64_t kv_sinks;
  double kv_dbudget_threshold;
  char *kv_score;             /* sum | mean */
  char *kv_dbudget_criterion; /* norm | mass */
  /* generate */
  char *prompt;
  char *prompt_file;
  bool chat;
  int64_t max_tokens;
  double temperature;
  int64_t top_k;
  double top_p;
  double min_p;
  double repetition_penalty;
  double presence_penalty;
  double frequency_penalty;
  int64_t seed; /* -1 = random */
  bool ignore_eos;
  bool stats;
  /* where the options came from */
  char *config;      /* the last --config file read; NULL when none */
  bool print_config; /* print the options as a config file and exit */
} cfg_options_t;

/* cfg_parse_args's results besides 0 and -errno. */
enum { CFG_HELP = 1, CFG_VERSION = 2 };

void cfg_defaults(cfg_options_t *o);
/* Parse argv (after the subcommand). The --config files are applied first,
 * in their order, then the rest of argv, so the command line overrides the
 * files wherever --config stands. Returns 0, CFG_HELP when --help or -h was
 * given, CFG_VERSION for --version (neither reads a file), or -errno with a
 * message naming the option (or the file and its key) in err. */
int cfg_parse_args(cfg_options_t *o, int argc, char **argv, char *err, size_t errlen);
/* Apply a JSON config file to o: an object whose keys are option names
 * without the dashes ('_' may stand for '-'), values strings, numbers or
 * booleans (null leaves the option as it is); keys beginning with '#' are
 * comments. Returns 0 or -errno with "config PATH: ..." in err; o may then
 * hold some of the file's options. */
int cfg_load_file(cfg_options_t *o, const char *path, char *err, size_t errlen);
/* o as a JSON config file, every option preceded by a "# name" comment key
 * with its help and default; cfg_load_file reads it back unchanged.
 * Returns 0 or -EIO when f failed. */
int cfg_print_config(FILE *f, const cfg_options_t *o);
void cfg_print_help(FILE *f, const char *command);
void cfg_destroy(cfg_options_t *o); /* frees the strings */

#endif
