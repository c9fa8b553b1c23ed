/* Options of every pressd command: one table drives parsing, validation,
 * defaults and --help. Read-only after start-up. */
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
  char *cpu_numerics; /* int8 | exact | llama */
  int64_t max_num_batched_tokens;
  int64_t kv_cache_memory; /* bytes; 0 = size for one max_model_len sequence */
  /* serve */
  char *host;
  int64_t port;
  char *api_key;
  char *served_model_name;
  int64_t max_num_seqs;
  int64_t max_waiting;
  int64_t max_request_bytes;
  int64_t max_connections;
  /* KV compression (serve: the default of every request) */
  char *kv_compression;       /* none | kvcompress | dbudget | streaming | random */
  double kv_compression_ratio; /* 0: none given */
  int64_t kv_max_cache_tokens; /* 0: none given */
  char *kv_layer_budget;      /* global | uniform | zigzag */
  int64_t protected_window;
  int64_t observation_window;
  int64_t kv_compression_interval;
  int64_t kv_sinks;
  double kv_dbudget_threshold;
  char *kv_score;             /* sum | mean */
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
} cfg_options_t;

void cfg_defaults(cfg_options_t *o);
/* Parse argv (after the subcommand). Returns 0, 1 when --help was printed,
 * or -EINVAL with a message naming the option in err. */
int cfg_parse_args(cfg_options_t *o, int argc, char **argv, char *err, size_t errlen);
void cfg_print_help(FILE *f, const char *command);
void cfg_destroy(cfg_options_t *o); /* frees the strings */

#endif
