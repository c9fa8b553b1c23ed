/* Options: --config files (keys, precedence over the command line, errors
 * that name the file and the key) and --print-config, whose output must
 * read back as the same options. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <unistd.h>

#include "config/options.h"
#include "test.h"

#define MODEL_PATH "/var/lib/pressd/models/SmolLM2-135M-Instruct.Q4_1.gguf"

/* A temporary file holding text; the caller unlinks and frees the path. */
static char *write_tmp(const char *text) {
  const char *dir = getenv("TMPDIR");
  char *path = NULL;
  CHECK(asprintf(&path, "%s/pressd-test-options-XXXXXX", dir && *dir ? dir : "/tmp") > 0);
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  size_t n = strlen(text);
  CHECK(write(fd, text, n) == (ssize_t)n);
  close(fd);
  return path;
}

static void drop_tmp(char *path) {
  unlink(path);
  free(path);
}

/* cfg_parse_args over a NULL-terminated list. */
static int parse(cfg_options_t *o, char *err, size_t errlen, const char **args) {
  int argc = 0;
  while (args[argc]) argc++;
  return cfg_parse_args(o, argc, (char **)args, err, errlen);
}

/* Loads text as a config file into fresh defaults: the result, and the
 * message in err. */
static int load_text(cfg_options_t *o, const char *text, char *err, size_t errlen) {
  char *path = write_tmp(text);
  cfg_defaults(o);
  err[0] = '\0';
  int rc = cfg_load_file(o, path, err, errlen);
  drop_tmp(path);
  return rc;
}

/* err must contain every one of the NULL-terminated words. */
static void check_mentions(const char *err, const char *const *words) {
  for (; *words; words++)
    if (!strstr(err, *words)) FAIL_AT("message \"%s\" does not mention '%s'", err, *words);
}

/* The file's text must fail to load with a message naming the file and
 * the given words. */
static void check_load_error(const char *text, const char *const *words) {
  char *path = write_tmp(text);
  cfg_options_t o;
  cfg_defaults(&o);
  char err[512] = "";
  CHECK_INT_EQ(cfg_load_file(&o, path, err, sizeof err), -EINVAL);
  const char *prefix[] = {"config ", path, NULL};
  check_mentions(err, prefix);
  check_mentions(err, words);
  cfg_destroy(&o);
  drop_tmp(path);
}

static char *print_config(const cfg_options_t *o) {
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  CHECK(f);
  CHECK_INT_EQ(cfg_print_config(f, o), 0);
  fclose(f);
  return text;
}

static void test_new_option_defaults(void) {
  cfg_options_t o;
  cfg_defaults(&o);
  CHECK(o.api_key_file == NULL);
  CHECK(!o.metrics_require_key);
  CHECK_NEAR(o.shutdown_timeout, 30, 0);
  CHECK_STR_EQ(o.log_level, "info");
  CHECK_INT_EQ(o.max_tokens_limit, 0);
  CHECK_NEAR(o.request_timeout, 60, 0);
  CHECK_NEAR(o.idle_timeout, 60, 0);
  CHECK(o.log_file == NULL);
  CHECK(o.config == NULL);
  CHECK(!o.print_config);
  char err[256];
  const char *bad_level[] = {"--log-level", "loud", NULL};
  CHECK_INT_EQ(parse(&o, err, sizeof err, bad_level), -EINVAL);
  const char *level_words[] = {"--log-level", "loud", NULL};
  check_mentions(err, level_words);
  const char *bad_timeout[] = {"--shutdown-timeout", "86401", NULL};
  CHECK_INT_EQ(parse(&o, err, sizeof err, bad_timeout), -EINVAL);
  const char *bad_limit[] = {"--max-tokens-limit", "-1", NULL};
  CHECK_INT_EQ(parse(&o, err, sizeof err, bad_limit), -EINVAL);
  const char *good[] = {"--api-key-file", "/etc/pressd/keys", "--metrics-require-key",
                        "--shutdown-timeout", "2.5", "--log-level", "debug",
                        "--max-tokens-limit", "4096", "--request-timeout", "0",
                        "--idle-timeout", "7", NULL};
  CHECK_INT_EQ(parse(&o, err, sizeof err, good), 0);
  CHECK_STR_EQ(o.api_key_file, "/etc/pressd/keys");
  CHECK(o.metrics_require_key);
  CHECK_NEAR(o.shutdown_timeout, 2.5, 0);
  CHECK_STR_EQ(o.log_level, "debug");
  CHECK_INT_EQ(o.max_tokens_limit, 4096);
  CHECK_NEAR(o.request_timeout, 0, 0);
  CHECK_NEAR(o.idle_timeout, 7, 0);
  cfg_destroy(&o);
}

static void test_load_file(void) {
  cfg_options_t o;
  char err[512];
  CHECK_INT_EQ(load_text(&o,
                         "{\"model\": \"/m.gguf\", \"port\": 8080, \"chat\": true,\n"
                         " \"temperature\": 0.7, \"kv-compression\": \"dbudget\",\n"
                         " \"max-tokens\": \"64\", \"seed\": 42, \"dummy-seed\": 7,\n"
                         " \"ignore-eos\": false, \"stats\": \"true\"}\n",
                         err, sizeof err),
               0);
  CHECK_STR_EQ(o.model, "/m.gguf");
  CHECK_INT_EQ(o.port, 8080);
  CHECK(o.chat);
  CHECK_NEAR(o.temperature, 0.7, 0);
  CHECK_STR_EQ(o.kv_compression, "dbudget");
  CHECK_INT_EQ(o.max_tokens, 64);
  CHECK_INT_EQ(o.seed, 42);
  CHECK_INT_EQ(o.dummy_seed, 7);
  CHECK(!o.ignore_eos);
  CHECK(o.stats);
  CHECK_INT_EQ(o.max_num_seqs, 256); /* untouched: the default */
  cfg_destroy(&o);

  /* An empty object changes nothing. */
  CHECK_INT_EQ(load_text(&o, "{}", err, sizeof err), 0);
  CHECK_INT_EQ(o.port, 8000);
  cfg_destroy(&o);
}

static void test_underscore_keys(void) {
  cfg_options_t o;
  char err[512];
  CHECK_INT_EQ(load_text(&o,
                         "{\"max_num_seqs\": 7, \"kv_compression_ratio\": 4,\n"
                         " \"served_model_name\": \"m\", \"max-num-batched-tokens\": 512}",
                         err, sizeof err),
               0);
  CHECK_INT_EQ(o.max_num_seqs, 7);
  CHECK_NEAR(o.kv_compression_ratio, 4, 0);
  CHECK_STR_EQ(o.served_model_name, "m");
  CHECK_INT_EQ(o.max_num_batched_tokens, 512);
  cfg_destroy(&o);
}

static void test_comments_and_null(void) {
  cfg_options_t o;
  char err[512];
  /* Comment keys may hold anything, even what a value may not. */
  CHECK_INT_EQ(load_text(&o,
                         "{\"#\": \"a file\", \"# port\": [1, 2], \"#x\": {\"a\": null},\n"
                         " \"#unknown-key\": 1, \"port\": 9000}",
                         err, sizeof err),
               0);
  CHECK_INT_EQ(o.port, 9000);
  cfg_destroy(&o);

  /* null keeps the default (and does not clear a string's default). */
  CHECK_INT_EQ(load_text(&o, "{\"host\": null, \"port\": null, \"model\": null, \"chat\": null}",
                         err, sizeof err),
               0);
  CHECK_STR_EQ(o.host, "127.0.0.1");
  CHECK_INT_EQ(o.port, 8000);
  CHECK(o.model == NULL);
  CHECK(!o.chat);
  cfg_destroy(&o);
}

static void test_size_values(void) {
  cfg_options_t o;
  char err[512];
  CHECK_INT_EQ(load_text(&o, "{\"kv-cache-memory\": \"8G\", \"max-request-bytes\": 1048576}", err,
                         sizeof err),
               0);
  CHECK_INT_EQ(o.kv_cache_memory, 8ll << 30);
  CHECK_INT_EQ(o.max_request_bytes, 1 << 20);
  cfg_destroy(&o);
  CHECK_INT_EQ(load_text(&o, "{\"kv_cache_memory\": \"512MiB\", \"max_request_bytes\": \"64K\"}",
                         err, sizeof err),
               0);
  CHECK_INT_EQ(o.kv_cache_memory, 512ll << 20);
  CHECK_INT_EQ(o.max_request_bytes, 64 << 10);
  cfg_destroy(&o);
  const char *words[] = {"'max-request-bytes'", "12", NULL};
  check_load_error("{\"max-request-bytes\": 12}", words); /* below its 1024 minimum */
}

static void test_numbers(void) {
  cfg_options_t o;
  char err[512];
  /* Whole numbers reach integer options however they are spelt; floats keep
   * every bit. */
  CHECK_INT_EQ(load_text(&o,
                         "{\"max-tokens\": 1e3, \"seed\": 4611686018427387904,\n"
                         " \"top-p\": 0.1, \"min-p\": 1e-7, \"temperature\": 0.30000000000000004}",
                         err, sizeof err),
               0);
  CHECK_INT_EQ(o.max_tokens, 1000);
  CHECK_INT_EQ(o.seed, 4611686018427387904ll); /* 2^62: exact in a double */
  CHECK(o.top_p == 0.1);
  CHECK(o.min_p == 1e-7);
  CHECK(o.temperature == 0.1 + 0.2);
  cfg_destroy(&o);
  /* Integers past a double's precision are given as strings. */
  CHECK_INT_EQ(load_text(&o,
                         "{\"dummy-seed\": \"18446744073709551615\",\n"
                         " \"seed\": \"9007199254740993\"}",
                         err, sizeof err),
               0);
  CHECK(o.dummy_seed == UINT64_MAX);
  CHECK_INT_EQ(o.seed, 9007199254740993ll);
  cfg_destroy(&o);
  const char *frac[] = {"'max-tokens'", "2.5", NULL};
  check_load_error("{\"max-tokens\": 2.5}", frac);
}

static void test_precedence(void) {
  char *path = write_tmp("{\"max-tokens\": 5, \"port\": 9001, \"temperature\": 0.5}");
  char err[512];
  cfg_options_t o;
  /* The command line wins wherever --config stands. */
  const char *before[] = {"--config", path, "--max-tokens", "9", NULL};
  const char *after[] = {"--max-tokens", "9", "--config", path, NULL};
  char *eq = NULL;
  CHECK(asprintf(&eq, "--config=%s", path) > 0);
  const char *joined[] = {"--max-tokens=9", eq, NULL};
  const char **orders[] = {before, after, joined};
  for (int k = 0; k < 3; k++) {
    cfg_defaults(&o);
    CHECK_INT_EQ(parse(&o, err, sizeof err, orders[k]), 0);
    CHECK_INT_EQ(o.max_tokens, 9);
    CHECK_INT_EQ(o.port, 9001);
    CHECK_NEAR(o.temperature, 0.5, 0);
    CHECK_STR_EQ(o.config, path);
    cfg_destroy(&o);
  }
  free(eq);

  /* Several files: each in turn, so later ones override earlier ones; the
   * command line still wins over both. */
  char *second = write_tmp("{\"port\": 9002, \"top-k\": 3}");
  const char *two[] = {"--top-k", "4", "--config", path, "--config", second, NULL};
  cfg_defaults(&o);
  CHECK_INT_EQ(parse(&o, err, sizeof err, two), 0);
  CHECK_INT_EQ(o.port, 9002);
  CHECK_INT_EQ(o.max_tokens, 5);
  CHECK_INT_EQ(o.top_k, 4);
  cfg_destroy(&o);

  /* --help and --version read no file and win over a bad one. */
  const char *help[] = {"--config", "/nonexistent/pressd.json", "--help", NULL};
  const char *version[] = {"--config", "/nonexistent/pressd.json", "--version", NULL};
  cfg_defaults(&o);
  CHECK_INT_EQ(parse(&o, err, sizeof err, help), CFG_HELP);
  CHECK_INT_EQ(parse(&o, err, sizeof err, version), CFG_VERSION);
  cfg_destroy(&o);
  drop_tmp(second);
  drop_tmp(path);
}

static void test_errors(void) {
  const char *unknown[] = {"unknown key", "'max-num-seq'", NULL};
  check_load_error("{\"max-num-seq\": 3}", unknown);
  const char *port[] = {"'port'", "'70000'", "[0, 65535]", NULL};
  check_load_error("{\"port\": 70000}", port);
  const char *choice[] = {"'kv_compression'", "'zip'", NULL};
  check_load_error("{\"kv_compression\": \"zip\"}", choice);
  const char *boolean[] = {"'chat'", "'yes'", NULL};
  check_load_error("{\"chat\": \"yes\"}", boolean);
  const char *array[] = {"'port'", "array", NULL};
  check_load_error("{\"port\": [8000]}", array);
  const char *object[] = {"'model'", "object", NULL};
  check_load_error("{\"model\": {\"path\": \"x\"}}", object);
  const char *syntax[] = {"invalid JSON", "line 3", NULL};
  check_load_error("{\n  \"port\": 1,\n  \"host\" \"x\"\n}\n", syntax);
  const char *trailing[] = {"invalid JSON", NULL};
  check_load_error("{\"port\": 1} {", trailing);
  const char *unterminated[] = {"invalid JSON", "line 2", NULL};
  check_load_error("{\"port\": 1,\n\"host\": \"a", unterminated);
  const char *empty[] = {"empty", NULL};
  check_load_error("  \n", empty);
  const char *not_object[] = {"not a JSON object", NULL};
  check_load_error("[{\"port\": 1}]", not_object);
  check_load_error("\"port\"", not_object);
  const char *config[] = {"'config'", "command line only", NULL};
  check_load_error("{\"config\": \"/etc/pressd/other.json\"}", config);
  const char *print[] = {"'print-config'", "command line only", NULL};
  check_load_error("{\"print-config\": true}", print);

  /* A file that cannot be read: -errno, named in the message. */
  cfg_options_t o;
  cfg_defaults(&o);
  char err[512];
  CHECK_INT_EQ(cfg_load_file(&o, "/nonexistent/pressd.json", err, sizeof err), -ENOENT);
  const char *missing[] = {"config /nonexistent/pressd.json", "No such file", NULL};
  check_mentions(err, missing);
  /* Through the command line, and a missing value of --config. */
  const char *args[] = {"--max-tokens", "3", "--config", "/nonexistent/pressd.json", NULL};
  CHECK_INT_EQ(parse(&o, err, sizeof err, args), -ENOENT);
  check_mentions(err, missing);
  const char *no_value[] = {"--config", NULL};
  CHECK_INT_EQ(parse(&o, err, sizeof err, no_value), -EINVAL);
  const char *needs[] = {"--config", "needs a value", NULL};
  check_mentions(err, needs);
  cfg_destroy(&o);
}

/* Every field of a and b is the same. */
static void check_same_options(const cfg_options_t *a, const cfg_options_t *b) {
#define SAME_STR(f)                                                            \
  do {                                                                         \
    if (!a->f || !b->f) CHECK(a->f == b->f);                                   \
    else CHECK_STR_EQ(a->f, b->f);                                             \
  } while (0)
#define SAME(f) CHECK(a->f == b->f)
  SAME_STR(model); SAME_STR(load_format); SAME_STR(dummy_config); SAME(dummy_seed);
  SAME_STR(chat_template); SAME(max_model_len); SAME_STR(device); SAME(threads);
  SAME(enforce_eager); SAME(kv_arena_per_rank);
  SAME_STR(cpu_numerics); SAME(max_num_batched_tokens); SAME(kv_cache_memory);
  SAME_STR(kv_cache_dtype);
  SAME_STR(log_level); SAME_STR(host); SAME(port); SAME_STR(api_key); SAME_STR(api_key_file);
  SAME(metrics_require_key); SAME_STR(served_model_name); SAME(max_num_seqs); SAME(max_waiting);
  SAME(max_request_bytes); SAME(max_tokens_limit); SAME(max_connections); SAME(request_timeout);
  SAME(idle_timeout); SAME(shutdown_timeout); SAME_STR(kv_compression);
  SAME(kv_compression_ratio); SAME(kv_max_cache_tokens); SAME_STR(kv_layer_budget);
  SAME(protected_window); SAME(observation_window); SAME(kv_compression_interval);
  SAME(kv_prefill_chunk);
  SAME(kv_sinks); SAME(kv_dbudget_threshold); SAME_STR(kv_score);
  SAME_STR(kv_dbudget_criterion); SAME_STR(prompt);
  SAME_STR(prompt_file); SAME(chat); SAME(max_tokens); SAME(temperature); SAME(top_k);
  SAME(top_p); SAME(min_p); SAME(repetition_penalty); SAME(presence_penalty);
  SAME(frequency_penalty); SAME(seed); SAME(ignore_eos); SAME(stats);
#undef SAME
#undef SAME_STR
}

/* Every printable option set away from its default, with values that are
 * hard to write back: escapes, UTF-8, floats without a short decimal form,
 * integers past a double's precision. */
static const char *const all_options[] = {
    "--model", "/m/\"quoted\" \\ dir/\xc3\xa9t\xc3\xa9\n.gguf",
    "--load-format", "gguf",
    "--dummy-config", "/tmp/shape.json",
    "--dummy-seed", "18446744073709551615",
    "--chat-template", "llama3",
    "--max-model-len", "4096",
    "--device", "cpu",
    "--threads", "3",
    "--tensor-parallel-size", "3",
    "--kv-arena-per-rank",
    "--enforce-eager",
    "--gpu-memory-utilization", "0.75",
    "--cpu-numerics", "exact",
    "--max-num-batched-tokens", "1000",
    "--kv-cache-memory", "1.5G",
    "--kv-cache-dtype", "f16",
    "--log-level", "warn",
    "--log-file", "/var/log/pressd/pressd.log",
    "--debug-checks",
    "--kv-compression", "kvcompress",
    "--kv-compression-ratio", "3.3333333333333335",
    "--kv-max-cache-tokens", "77",
    "--kv-layer-budget", "zigzag",
    "--protected-window", "16",
    "--observation-window", "8",
    "--kv-compression-interval", "0",
    "--kv-prefill-chunk", "256",
    "--kv-sinks", "2",
    "--kv-score", "mean",
    "--kv-dbudget-threshold", "1e-6",
    "--kv-dbudget-criterion", "norm",
    "--host", "::1",
    "--port", "0",
    "--api-key", "k\tey",
    "--api-key-file", "/etc/keys",
    "--served-model-name", "name",
    "--max-num-seqs", "65536",
    "--max-waiting", "1",
    "--max-request-bytes", "10000000000",
    "--max-tokens-limit", "16777216",
    "--max-connections", "2",
    "--request-timeout", "0.1",
    "--idle-timeout", "1e6",
    "--shutdown-timeout", "86400",
    "--metrics-require-key",
    "--prompt", "a \"prompt\"\r\nwith\x01 control",
    "--prompt-file", "/p.txt",
    "--chat",
    "--max-tokens", "0",
    "--temperature", "0.7",
    "--top-k", "40",
    "--top-p", "0.95",
    "--min-p", "0.05",
    "--repetition-penalty", "1.1",
    "--presence-penalty", "-2",
    "--frequency-penalty", "0.3",
    "--seed", "9223372036854775807",
    "--ignore-eos",
    "--stats",
    NULL};

static void test_print_config_round_trip(void) {
  cfg_options_t a, b;
  char err[512];
  cfg_defaults(&a);
  CHECK_INT_EQ(parse(&a, err, sizeof err, (const char **)all_options), 0);
  char *text = print_config(&a);

  /* Valid JSON; for every option a "# name" comment then its value, and
   * all_options names every one of them. */
  cJSON *root = cJSON_Parse(text);
  CHECK(root);
  CHECK(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(root, "#")));
  CHECK(!cJSON_GetObjectItemCaseSensitive(root, "config"));
  CHECK(!cJSON_GetObjectItemCaseSensitive(root, "print-config"));
  int n_values = 0;
  for (const cJSON *it = root->child; it; it = it->next) {
    if (it->string[0] == '#') continue;
    n_values++;
    char comment[128];
    snprintf(comment, sizeof comment, "# %s", it->string);
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(root, comment);
    if (!c || !cJSON_IsString(c) || !strstr(c->valuestring, " Default: "))
      FAIL_AT("no comment key with a default for '%s'", it->string);
    char flag[128];
    snprintf(flag, sizeof flag, "--%s", it->string);
    bool named = false;
    for (const char *const *p = all_options; *p && !named; p++) named = !strcmp(*p, flag);
    if (!named) FAIL_AT("the round trip does not set '%s' (add it to all_options)", flag);
  }
  CHECK(n_values >= 50);
  const cJSON *dflt = cJSON_GetObjectItemCaseSensitive(root, "# max-request-bytes");
  CHECK_STR_EQ(dflt->valuestring, "serve: request body limit (413 past it). Default: 4M.");
  const cJSON *choices = cJSON_GetObjectItemCaseSensitive(root, "# log-level");
  CHECK(strstr(choices->valuestring, "(error|warn|info|debug). Default: info."));
  CHECK_INT_EQ(cJSON_GetObjectItemCaseSensitive(root, "kv-cache-memory")->valuedouble,
               3ll << 29);
  CHECK(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(root, "seed")));
  cJSON_Delete(root);

  /* Loaded back into defaults: the same options, and the same text. */
  char *path = write_tmp(text);
  cfg_defaults(&b);
  CHECK_INT_EQ(cfg_load_file(&b, path, err, sizeof err), 0);
  check_same_options(&a, &b);
  char *again = print_config(&b);
  CHECK_STR_EQ(again, text);
  free(again);
  cfg_destroy(&b);

  /* Defaults round-trip too (nulls among them). */
  cfg_options_t d, e;
  cfg_defaults(&d);
  char *dtext = print_config(&d);
  char *dpath = write_tmp(dtext);
  cfg_defaults(&e);
  CHECK_INT_EQ(cfg_load_file(&e, dpath, err, sizeof err), 0);
  check_same_options(&d, &e);
  /* ... and load over non-defaults, where null keeps what is there. */
  CHECK_INT_EQ(cfg_load_file(&a, dpath, err, sizeof err), 0);
  CHECK_STR_EQ(a.load_format, "auto");
  CHECK(a.model != NULL && a.api_key != NULL); /* null in the file */
  cfg_destroy(&d);
  cfg_destroy(&e);
  drop_tmp(dpath);
  free(dtext);

  drop_tmp(path);
  free(text);
  cfg_destroy(&a);
}

/* config/pressd.example.json is --print-config's output for the defaults
 * and one model path, byte for byte (it says how to regenerate it). */
static void test_example_file(void) {
  const char *dir = getenv("PRESSD_FIXTURES");
  if (!dir) {
    fprintf(stderr, "PRESSD_FIXTURES unset; skipping the example file\n");
    return;
  }
  char path[4096];
  snprintf(path, sizeof path, "%s/../../config/pressd.example.json", dir);
  char *file = test_read_file(path, NULL);
  if (!file) FAIL_AT("cannot read %s", path);
  cfg_options_t o;
  cfg_defaults(&o);
  char err[512];
  CHECK_INT_EQ(cfg_load_file(&o, path, err, sizeof err), 0);
  CHECK_STR_EQ(o.model, MODEL_PATH);
  cfg_options_t want;
  cfg_defaults(&want);
  const char *model[] = {"--model", MODEL_PATH, NULL};
  CHECK_INT_EQ(parse(&want, err, sizeof err, model), 0);
  check_same_options(&o, &want);
  char *text = print_config(&want);
  if (strcmp(text, file))
    FAIL_AT("%s is stale: regenerate it with pressd serve --print-config --model " MODEL_PATH,
            path);
  free(text);
  free(file);
  cfg_destroy(&want);
  cfg_destroy(&o);
}

int main(void) {
  RUN(test_new_option_defaults);
  RUN(test_load_file);
  RUN(test_underscore_keys);
  RUN(test_comments_and_null);
  RUN(test_size_values);
  RUN(test_numbers);
  RUN(test_precedence);
  RUN(test_errors);
  RUN(test_print_config_round_trip);
  RUN(test_example_file);
  return 0;
}
