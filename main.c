/* pressd: command-line entry. `pressd serve` runs the OpenAI-compatible
 * daemon; `pressd generate` runs one prompt and prints the completion. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#include "config/options.h"
#include "model/chat.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "scheduler/engine.h"
#include "scheduler/sample.h"
#include "server/server.h"
#include "scheduler/single.h"

#include "cli.h"
#include "model/llama.h"
#include "config/log.h"
#include "config/notify.h"

double cli_now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int cli_die(const char *msg) {
  fprintf(stderr, "pressd: %s\n", msg);
  return 1;
}

static char *read_file(const char *path, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errlen, "cannot read '%s': %s", path, strerror(errno));
    return NULL;
  }
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  for (size_t r; buf && (r = fread(buf + n, 1, cap - n - 1, f)) > 0;) {
    n += r;
    if (cap - n < 2) {
      char *nb = realloc(buf, cap *= 2);
      if (!nb) {
        free(buf);
        buf = NULL;
      }
      buf = nb;
    }
  }
  fclose(f);
  if (!buf) snprintf(err, errlen, "out of memory reading '%s'", path);
  else buf[n] = 0;
  return buf;
}


void cli_loaded_destroy(loaded_t *m) {
  for (int32_t r = 0; r < m->tp; r++) {
    if (m->tp_w) model_weights_destroy(&m->tp_w[r]);
    if (m->tp_be) k_backend_free(m->tp_be[r]);
  }
  free(m->tp_w);
  free(m->tp_be);
  k_comm_free(m->tp_comm);
  model_weights_destroy(&m->w);
  k_backend_free(m->be);
  model_tok_free(m->tok);
  model_gguf_close(&m->gguf);
  free(m->chat_template);
}

static char *path_in(const char *dir, const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *p = malloc(n);
  if (p) snprintf(p, n, "%s/%s", dir, name);
  return p;
}

/* The chat template of a Hugging Face model directory: "chat_template" of
 * tokenizer_config.json (a string, or the entry named "default" of a list),
 * else the file chat_template.jinja. NULL when there is none. */
static char *dir_chat_template(const char *dir) {
  char e[256], *out = NULL;
  char *path = path_in(dir, "tokenizer_config.json");
  char *txt = path ? read_file(path, e, sizeof e) : NULL;
  free(path);
  cJSON *j = txt ? cJSON_Parse(txt) : NULL;
  free(txt);
  const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "chat_template"), *it;
  const cJSON *list = cJSON_IsArray(t) ? t : NULL;
  const char *tmpl = cJSON_GetStringValue(t);
  cJSON_ArrayForEach(it, list) {
    const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(it, "name"));
    if (name && !strcmp(name, "default"))
      tmpl = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(it, "template"));
  }
  if (tmpl) out = strdup(tmpl);
  cJSON_Delete(j);
  if (!out && (path = path_in(dir, "chat_template.jinja"))) {
    out = read_file(path, e, sizeof e);
    free(path);
  }
  return out;
}

/* Weights of --load-format dummy: the shape from --dummy-config, values
 * from --dummy-seed. */
static int load_dummy(loaded_t *m, const cfg_options_t *o, char *err, size_t errlen) {
  char e[384];
  char *txt = read_file(o->dummy_config, e, sizeof e);
  if (!txt) {
    snprintf(err, errlen, "--dummy-config: %s", e);
    return -EINVAL;
  }
  model_config_t c;
  int rc = model_config_from_json(&c, txt, e, sizeof e);
  free(txt);
  if (!rc) rc = model_weights_dummy(&m->w, &c, o->dummy_seed, m->be, e, sizeof e);
  if (rc) snprintf(err, errlen, "--dummy-config %s: %s", o->dummy_config, e);
  return rc;
}

/* --tensor-parallel-size N: N backends, each rank's shard of the loaded
 * weights, and a communicator. On the CPU the ranks split --threads and
 * talk through threads; on GPUs (on_gpus: the weights were loaded on the
 * host) rank r drives device r and NCCL sums. */
static int load_shards(loaded_t *m, const cfg_options_t *o, bool on_gpus, char *err,
                       size_t errlen) {
  const int32_t n = (int32_t)o->tensor_parallel_size;
  m->tp_be = calloc((size_t)n, sizeof *m->tp_be);
  m->tp_w = calloc((size_t)n, sizeof *m->tp_w);
  if (!m->tp_be || !m->tp_w) {
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  int32_t threads = m->be->threads / n > 0 ? m->be->threads / n : 1;
  int rc = on_gpus ? 0 : k_comm_cpu_new(&m->tp_comm, n);
  for (int32_t r = 0; r < n && !rc; r++) {
    char e[256];
    if ((rc = on_gpus ? k_backend_new_cuda(&m->tp_be[r], r, e, sizeof e)
                      : k_cpu_backend_new(&m->tp_be[r], threads))) {
      snprintf(err, errlen, "cannot start the backend of rank %d: %s", r,
               on_gpus ? e : "out of memory");
      break;
    }
    m->tp++;
    m->tp_be[r]->numerics = m->be->numerics;
    rc = model_weights_shard(&m->tp_w[r], &m->w, r, n, m->tp_be[r], err, errlen);
  }
  if (!rc && on_gpus) rc = k_comm_nccl_new(&m->tp_comm, n, m->tp_be, err, errlen);
  if (rc == -ENOMEM && !err[0]) snprintf(err, errlen, "out of memory");
  return rc;
}

/* --kv-cache-dtype's names of the types a KV arena can hold. */
static const char *const kv_type_names[] = {[K_F32] = "f32", [K_BF16] = "bf16", [K_F16] = "f16"};
#define N_KV_TYPE_NAMES ((int)(sizeof kv_type_names / sizeof *kv_type_names))

/* --kv-cache-dtype on every backend that holds KV arenas (the ranks' under
 * tensor parallelism). auto keeps a GPU's bf16, and on the CPU is f16 (as
 * llama.cpp's cache; half the memory and bandwidth of f32), or f32 with
 * --cpu-numerics exact, which computes the model in fp32 throughout. */
static int set_kv_type(loaded_t *m, const cfg_options_t *o, char *err, size_t errlen) {
  const char *name = o->kv_cache_dtype;
  k_backend_t *run = cli_run_be(m);
  k_dtype_t t = K_F32;
  if (!strcmp(name, "auto")) {
    if (!run->host_memory) return 0;
    t = run->numerics == K_NUMERICS_EXACT ? K_F32 : K_F16;
  } else {
    for (int i = 0; i < N_KV_TYPE_NAMES; i++)
      if (kv_type_names[i] && !strcmp(name, kv_type_names[i])) t = (k_dtype_t)i;
  }
  for (int32_t r = 0; r < (m->tp > 1 ? m->tp : 1); r++) {
    k_backend_t *be = m->tp > 1 ? m->tp_be[r] : m->be;
    if (!k_backend_set_kv_type(be, t)) continue;
    int n = snprintf(err, errlen, "--kv-cache-dtype %s: the %s backend holds K and V as", name,
                     be->ops->name);
    const char *sep = " ";
    for (int i = 0; i < N_KV_TYPE_NAMES; i++) {
      if (!kv_type_names[i] || !(be->kv_types >> i & 1u)) continue;
      if (n >= 0 && (size_t)n < errlen)
        n += snprintf(err + n, errlen - (size_t)n, "%s%s", sep, kv_type_names[i]);
      sep = " or ";
    }
    return -EINVAL;
  }
  return 0;
}

/* --model is a GGUF file or a Hugging Face directory (config.json,
 * *.safetensors, tokenizer.json, tokenizer_config.json). With --load-format
 * dummy the weights come from load_dummy and --model supplies only the
 * tokenizer and chat template. */
int cli_load_model(loaded_t *m, const cfg_options_t *o, char *err, size_t errlen) {
  memset(m, 0, sizeof *m);
  const char *fmt = o->load_format;
  bool dummy = !strcmp(fmt, "dummy");
  if (!o->model) {
    snprintf(err, errlen, dummy ? "--load-format dummy needs --model for the tokenizer"
                                : "--model is required");
    return -EINVAL;
  }
  if (dummy && !o->dummy_config) {
    snprintf(err, errlen, "--load-format dummy needs --dummy-config FILE (a config.json giving "
                          "the model's shape)");
    return -EINVAL;
  }
  struct stat st;
  bool is_dir = stat(o->model, &st) == 0 && S_ISDIR(st.st_mode);
  if (!strcmp(fmt, "gguf") && is_dir) {
    snprintf(err, errlen, "'%s' is a directory, not a GGUF file", o->model);
    return -EINVAL;
  }
  if (!strcmp(fmt, "safetensors") && !is_dir) {
    snprintf(err, errlen, "'%s' is not a directory: --load-format safetensors needs one with "
                          "config.json, *.safetensors and tokenizer.json", o->model);
    return -EINVAL;
  }
  k_device_t dev = !strcmp(o->device, "cuda") ? K_DEVICE_CUDA
                   : !strcmp(o->device, "cpu") ? K_DEVICE_CPU
                                               : K_DEVICE_AUTO;
  int rc = k_backend_new(&m->be, dev, (int32_t)o->threads, err, errlen);
  if (rc) return rc;
  /* Ranks on GPUs: the whole model is read on the host, and each rank
   * copies its shard to its device (no device holds the whole model). */
  const bool tp_gpus = o->tensor_parallel_size > 1 && !m->be->host_memory;
  if (tp_gpus) {
    k_backend_free(m->be);
    m->be = NULL;
    if ((rc = k_cpu_backend_new(&m->be, (int32_t)o->threads))) {
      snprintf(err, errlen, "cannot start the host backend that reads the model");
      return rc;
    }
  }
  m->be->numerics = !strcmp(o->cpu_numerics, "exact")   ? K_NUMERICS_EXACT
                    : !strcmp(o->cpu_numerics, "llama") ? K_NUMERICS_LLAMA
                                                        : K_NUMERICS_INT8;
  if (is_dir) {
    if (!dummy && (rc = model_weights_from_safetensors(&m->w, o->model, m->be, err, errlen)))
      return rc;
    char *tj = path_in(o->model, "tokenizer.json");
    if (!tj) {
      snprintf(err, errlen, "out of memory");
      return -ENOMEM;
    }
    rc = model_tok_from_json(&m->tok, tj, err, errlen);
    free(tj);
    if (rc) return rc;
    m->chat_template = dir_chat_template(o->model);
  } else {
    if ((rc = model_gguf_open(&m->gguf, o->model, err, errlen))) return rc;
    if ((rc = model_tok_from_gguf(&m->tok, &m->gguf, err, errlen))) return rc;
    if (!dummy && (rc = model_weights_from_gguf(&m->w, &m->gguf, m->be, err, errlen))) return rc;
    model_gguf_str_t t;
    if (!model_gguf_get_str(&m->gguf, "tokenizer.chat_template", &t) &&
        !(m->chat_template = strndup(t.ptr, t.len))) {
      snprintf(err, errlen, "out of memory");
      return -ENOMEM;
    }
  }
  if (dummy && (rc = load_dummy(m, o, err, errlen))) return rc;
  if (o->tensor_parallel_size > 1 && (rc = load_shards(m, o, tp_gpus, err, errlen))) return rc;
  if ((rc = set_kv_type(m, o, err, errlen))) return rc;
  /* every id the tokenizer can produce must have an embedding row */
  if (model_tok_n_vocab(m->tok) > m->w.cfg.n_vocab) {
    snprintf(err, errlen, "the tokenizer has %d tokens but the model's vocabulary only %d%s",
             model_tok_n_vocab(m->tok), m->w.cfg.n_vocab,
             dummy ? " (vocab_size of --dummy-config)" : "");
    return -EINVAL;
  }
  return 0;
}

/* The chat template: --chat-template NAME, else the model's own. -ENOENT
 * when the model has none and no name was given. */
int cli_load_chat(const loaded_t *m, const cfg_options_t *o, model_chat_t *chat, char *err,
                     size_t errlen) {
  int32_t bos = model_tok_bos(m->tok), eos = model_tok_eos(m->tok);
  size_t n;
  const char *bos_s = bos >= 0 ? model_tok_piece(m->tok, bos, true, &n) : NULL;
  const char *eos_s = eos >= 0 ? model_tok_piece(m->tok, eos, true, &n) : NULL;
  if (o->chat_template)
    return model_chat_init_named(chat, o->chat_template, bos_s, eos_s, err, errlen);
  if (!m->chat_template) {
    snprintf(err, errlen, "the model has no chat template; pass --chat-template NAME");
    return -ENOENT;
  }
  return model_chat_init_detect(chat, m->chat_template, bos_s, eos_s, err, errlen);
}

static int chat_prompt(const loaded_t *m, const cfg_options_t *o, const char *user, char **out,
                       char *err, size_t errlen) {
  model_chat_t chat;
  int rc = cli_load_chat(m, o, &chat, err, errlen);
  if (rc) return rc;
  model_chat_msg_t msg = {"user", user};
  rc = model_chat_render(&chat, &msg, 1, true, out, err, errlen);
  model_chat_destroy(&chat);
  return rc;
}

/* ---- pressd serve ---------------------------------------------------------- */

static srv_server_t *volatile g_srv;
static volatile sig_atomic_t g_signals;
static int64_t g_shutdown_ms = 30000;

/* SIGTERM, SIGINT: drain (new requests 503, running ones get
 * --shutdown-timeout), a second one stops now. SIGHUP: reopen the log. */
static void on_signal(int sig) {
  if (sig == SIGHUP) {
    log_reopen();
    return;
  }
  srv_server_t *s = g_srv;
  if (!s) return;
  if (g_signals++ == 0) {
    notify_send("STOPPING=1\nSTATUS=draining: finishing the running requests");
    srv_server_shutdown(s, g_shutdown_ms);
  } else {
    srv_server_stop(s);
  }
}

/* The engine stopped because the device cannot recover: exit non-zero, so
 * that systemd (Restart=on-failure) starts a fresh process. Engine thread;
 * ctx: the address of the server pointer. */
static volatile sig_atomic_t g_engine_fatal;
static void on_engine_fatal(void *ctx) {
  g_engine_fatal = 1;
  log_error("the compute device failed and cannot recover: stopping, so that the service "
            "manager restarts pressd");
  notify_send("STOPPING=1\nSTATUS=the compute device failed; restarting");
  srv_server_t *s = *(srv_server_t *const *)ctx;
  if (s) srv_server_stop(s);
}

/* The engine thread's sign of life for systemd's watchdog, given only while
 * the HTTP loop turns too: a hung engine or a hung loop goes silent, and
 * systemd restarts the service. ctx: the address of the server pointer. */
static double loop_age_limit_s = 60;
static void on_engine_alive(void *ctx) {
  const srv_server_t *s = *(srv_server_t *const *)ctx;
  if (s && srv_server_loop_age(s) > loop_age_limit_s) return;
  notify_send("WATCHDOG=1");
}

int32_t cli_step_tokens(const loaded_t *m, const cfg_options_t *o) {
  if (o->max_num_batched_tokens > 0) return (int32_t)o->max_num_batched_tokens;
  int64_t t = cli_run_be(m)->host_memory ? 512 : 2048;
  return (int32_t)(t > o->max_num_seqs ? t : o->max_num_seqs);
}

/* --gpu-memory-utilization: on a device backend with --kv-cache-memory 0,
 * the KV cache gets what the fraction of the device's memory leaves after
 * the weights (already loaded), the activations and a margin for the
 * libraries' workspaces; under tensor parallelism what rank 0's device
 * leaves, on every rank. 0 in *bytes on host-memory backends. */
static int kv_bytes_for_device(const loaded_t *m, const cfg_options_t *o, int32_t max_len,
                               int64_t *bytes, char *err, size_t errlen) {
  *bytes = 0;
  size_t free_b, total_b;
  k_backend_t *be = cli_run_be(m);
  if (!be->ops->mem_info || be->ops->mem_info(be, &free_b, &total_b)) return 0;
  const int64_t margin = 512ll << 20;
  int64_t act = (int64_t)model_activation_bytes(&m->w.cfg, cli_step_tokens(m, o),
                                                (int32_t)o->max_num_seqs);
  int64_t budget = (int64_t)(o->gpu_memory_utilization * (double)total_b);
  int64_t used = (int64_t)(total_b - free_b); /* the weights and whatever else holds memory */
  *bytes = budget - used - act - margin;
  if (*bytes <= 0) {
    snprintf(err, errlen, "--gpu-memory-utilization %.2f leaves no room for the KV cache: %.2f GiB "
             "of %.2f GiB in use, %.2f GiB of activations for --max-num-batched-tokens %lld and "
             "--max-num-seqs %lld", o->gpu_memory_utilization, (double)used / (1 << 30),
             (double)total_b / (1 << 30), (double)act / (1 << 30),
             (long long)cli_step_tokens(m, o), (long long)o->max_num_seqs);
    return -ENOMEM;
  }
  log_info("KV cache: %.2f GiB for --gpu-memory-utilization %.2f of %.2f GiB (weights and others "
           "%.2f GiB, activations %.2f GiB; max-model-len %d)", (double)*bytes / (1 << 30),
           o->gpu_memory_utilization, (double)total_b / (1 << 30), (double)used / (1 << 30),
           (double)act / (1 << 30), max_len);
  if (m->tp > 1) *bytes *= m->tp; /* each rank's part on its own device */
  return 0;
}

/* One token through the engine before READY=1: the first step pays for
 * page faults, thread start-up and buffers sized lazily, and a backend that
 * cannot run fails here instead of on the first request. */
static int warm_up(sched_engine_t *eng, const model_tok_t *tok, char *err, size_t errlen) {
  sched_request_t *r = sched_request_new();
  int32_t *ids = malloc(sizeof *ids);
  if (!r || !ids) {
    sched_request_free(r);
    free(ids);
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  int32_t bos = model_tok_bos(tok);
  ids[0] = bos >= 0 ? bos : 0;
  r->id = UINT64_MAX;
  r->prompt = ids;
  r->n_prompt = 1;
  r->max_tokens = 1;
  r->ignore_eos = true;
  int rc = sched_engine_submit(eng, r);
  if (rc) {
    sched_request_free(r);
    snprintf(err, errlen, "warm-up: the engine refused a request: %s", strerror(-rc));
    return rc;
  }
  double t0 = cli_now_s();
  for (;;) {
    sched_event_t ev;
    if (sched_engine_poll(eng, &ev, 1) == 1) {
      sched_finish_t f = ev.finish;
      if (f == SCHED_FINISH_ERROR)
        snprintf(err, errlen, "warm-up: the engine failed: %s", ev.message);
      sched_event_clear(&ev);
      if (f == SCHED_FINISH_NONE) continue;
      return f == SCHED_FINISH_ERROR ? -EIO : 0;
    }
    if (cli_now_s() - t0 > 600) {
      snprintf(err, errlen, "warm-up: no result from the engine in 600 s");
      return -ETIMEDOUT;
    }
    nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
  }
}

/* --api-key-file: one key per line; blank lines and '#' comments skipped,
 * spaces around a key trimmed. */
static int read_keys(const char *path, char ***keys, int *n, char *err, size_t errlen) {
  FILE *f = fopen(path, "r");
  if (!f) {
    snprintf(err, errlen, "--api-key-file %s: %s", path, strerror(errno));
    return -errno;
  }
  char *line = NULL;
  size_t cap = 0;
  ssize_t len;
  int rc = 0;
  while (!rc && (len = getline(&line, &cap, f)) >= 0) {
    char *p = line, *e = line + len;
    while (p < e && (*p == ' ' || *p == '\t')) p++;
    while (e > p && (e[-1] == '\n' || e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t')) e--;
    if (p == e || *p == '#') continue;
    char **k = realloc(*keys, (size_t)(*n + 1) * sizeof *k);
    if (!k || !(k[*n] = strndup(p, (size_t)(e - p)))) {
      if (k) *keys = k;
      rc = -ENOMEM;
      snprintf(err, errlen, "out of memory");
      break;
    }
    *keys = k;
    (*n)++;
  }
  if (!rc && ferror(f)) {
    rc = -EIO;
    snprintf(err, errlen, "--api-key-file %s: read error", path);
  }
  if (!rc && *n == 0) {
    rc = -EINVAL;
    snprintf(err, errlen, "--api-key-file %s: no key in it", path);
  }
  free(line);
  fclose(f);
  return rc;
}

/* The name /v1/models reports: --served-model-name, else the file name
 * without directories and extension. */
static char *model_name_of(const cfg_options_t *o) {
  if (o->served_model_name) return strdup(o->served_model_name);
  const char *p = o->model ? o->model : "model";
  size_t len = strlen(p);
  while (len > 1 && p[len - 1] == '/') len--;
  const char *base = p;
  for (size_t i = 0; i < len; i++)
    if (p[i] == '/') base = p + i + 1;
  size_t n = (size_t)(p + len - base);
  if (n > 5 && !strncmp(base + n - 5, ".gguf", 5)) n -= 5;
  return strndup(base, n);
}

/* The server's KV compression from the options. -EINVAL with a message. */
/* Steps replay CUDA graphs where the backend can and --enforce-eager is off
 * (one rank: a sharded rank's all-reduces stay eager). */
static bool use_graphs(const cfg_options_t *o, const loaded_t *m) {
  return !o->enforce_eager && cli_run_be(m)->ops->replay && m->tp <= 1;
}

static int kv_compression_of(const cfg_options_t *o, sched_kv_compression_t *k, char *err,
                             size_t errlen) {
  static const char *const methods[] = {"none", "kvcompress", "dbudget", "streaming", "random"};
  static const char *const layers[] = {"global", "uniform", "zigzag"};
  sched_kv_compression_default(k);
  for (int i = 0; i < 5; i++)
    if (!strcmp(o->kv_compression, methods[i])) k->plan.policy = (kv_policy_t)i;
  for (int i = 0; i < 3; i++)
    if (!strcmp(o->kv_layer_budget, layers[i])) k->plan.layer_budget = (kv_layer_budget_t)i;
  if (o->kv_compression_ratio != 0 && o->kv_compression_ratio < 1) {
    snprintf(err, errlen, "--kv-compression-ratio: must be at least 1 (or 0 for none), got %g",
             o->kv_compression_ratio);
    return -EINVAL;
  }
  k->plan.ratio = o->kv_compression_ratio;
  k->plan.max_cache_tokens = (int32_t)o->kv_max_cache_tokens;
  k->plan.protected_window = (int32_t)o->protected_window;
  k->plan.sinks = (int32_t)o->kv_sinks;
  k->plan.dbudget_threshold = (float)o->kv_dbudget_threshold;
  k->observation_window = (int32_t)o->observation_window;
  k->interval = (int32_t)o->kv_compression_interval;
  k->prefill_chunk = (int32_t)o->kv_prefill_chunk;
  k->plan.per_query = !strcmp(o->kv_score, "mean");
  k->plan.dbudget_mass = !strcmp(o->kv_dbudget_criterion, "mass");
  kv_policy_t p = k->plan.policy;
  if ((p == KV_POLICY_KVCOMPRESS || p == KV_POLICY_STREAMING || p == KV_POLICY_RANDOM) &&
      k->plan.ratio == 0 && k->plan.max_cache_tokens == 0) {
    snprintf(err, errlen,
             "--kv-compression %s needs --kv-compression-ratio or --kv-max-cache-tokens",
             o->kv_compression);
    return -EINVAL;
  }
  if (k->prefill_chunk > 0 && k->prefill_chunk < 64) {
    snprintf(err, errlen, "--kv-prefill-chunk: must be 0 or at least 64, got %d", k->prefill_chunk);
    return -EINVAL;
  }
  return 0;
}

/* Whether every request compresses with a bounded budget by default, so
 * that the KV cache may hold less than one max_model_len sequence. */
static bool kv_compression_bounded(const sched_kv_compression_t *k) {
  return k->plan.policy != KV_POLICY_NONE && (k->plan.ratio > 1 || k->plan.max_cache_tokens > 0);
}

static int cmd_serve(cfg_options_t *o) {
  char err[512];
  double t0 = cli_now_s();
  signal(SIGPIPE, SIG_IGN);
  int rc;
  log_level_t level = LOG_INFO;
  log_level_parse(o->log_level, &level); /* validated with the options */
  log_set_level(level);
  if (o->log_file && (rc = log_open(o->log_file))) {
    fprintf(stderr, "pressd: --log-file %s: %s\n", o->log_file, strerror(-rc));
    return 1;
  }
  char **keys = NULL;
  int n_keys = 0;
  if (o->api_key_file && (rc = read_keys(o->api_key_file, &keys, &n_keys, err, sizeof err))) {
    for (int i = 0; i < n_keys; i++) free(keys[i]);
    free(keys);
    return cli_die(err);
  }
  notify_status("loading %s", o->model ? o->model : "the model");
  loaded_t m;
  rc = cli_load_model(&m, o, err, sizeof err);
  if (rc) {
    cli_loaded_destroy(&m);
    goto fail_keys;
  }
  const model_config_t *c = &m.w.cfg;
  int32_t max_len = o->max_model_len > 0 ? (int32_t)o->max_model_len : c->n_ctx_train;
  model_chat_t chat = {0};
  bool have_chat = false;
  rc = cli_load_chat(&m, o, &chat, err, sizeof err);
  if (rc == 0) have_chat = true;
  else if (rc != -ENOENT) goto fail_model;
  else log_warn("%s; /v1/chat/completions will answer 400", err);

  k_backend_t *run_be = cli_run_be(&m);
  int64_t kv_bytes = o->kv_cache_memory;
  if (kv_bytes <= 0 && (rc = kv_bytes_for_device(&m, o, max_len, &kv_bytes, err, sizeof err)))
    goto fail_chat;
  if (kv_bytes <= 0) /* host memory: room for four sequences of max_model_len */
    kv_bytes = 4 * (int64_t)max_len * c->n_layers * c->n_kv_heads *
               (int64_t)(2 * (size_t)c->head_dim * k_dtype_bytes(run_be->kv_type) + sizeof(float) +
                         sizeof(int32_t));
  srv_server_t *srv = NULL;
  sched_engine_t *eng = NULL;
  sched_kv_compression_t kvc;
  if ((rc = kv_compression_of(o, &kvc, err, sizeof err))) goto fail_chat;
  uint64_t wd_us = notify_watchdog_usec();
  loop_age_limit_s = (double)wd_us / 2e6 > 2 ? (double)wd_us / 2e6 : 2;
  sched_engine_config_t ec = {
      .max_num_seqs = (int32_t)o->max_num_seqs,
      .max_num_batched_tokens = cli_step_tokens(&m, o),
      .max_model_len = max_len,
      .max_waiting = (int32_t)o->max_waiting,
      .kv_cache_memory = kv_bytes,
      .notify = srv_server_notify,
      .notify_ctx = &srv,
      .debug_checks = o->debug_checks,
      .alive = wd_us ? on_engine_alive : NULL,
      .alive_ctx = &srv,
      .fatal = on_engine_fatal,
      .fatal_ctx = &srv,
      .alive_ms = wd_us / 2000 > 0 ? (int32_t)(wd_us / 2000 < 60000 ? wd_us / 2000 : 60000) : 1,
      .tp_size = m.tp,
      .tp_weights = m.tp_w,
      .tp_backends = m.tp_be,
      .tp_comm = m.tp_comm,
      .kv_below_max_len = kv_compression_bounded(&kvc) && run_be->host_memory,
      .kv_per_rank = o->kv_arena_per_rank,
      .graphs = use_graphs(o, &m),
  };
  notify_status(ec.graphs ? "allocating the KV cache, capturing CUDA graphs"
                          : "allocating the KV cache");
  if ((rc = sched_engine_new(&eng, &ec, &m.w, run_be, m.tok, err, sizeof err))) goto fail_chat;
  sched_capacity_t cap;
  sched_engine_capacity(eng, &cap);
  log_info("model %s: %d layers, %d KV heads of dim %d, vocab %d; loaded in %.2f s",
           o->model ? o->model : "(dummy)", c->n_layers, c->n_kv_heads, c->head_dim, c->n_vocab,
           cli_now_s() - t0);
  log_info("KV cache: %d blocks of %d slots = %lld tokens per head, K and V in %s; max "
           "concurrency at max-model-len %d: %.2f; steps of up to %d tokens and %d sequences",
           cap.kv_blocks, cap.block_size, (long long)cap.kv_tokens,
           kv_type_names[run_be->kv_type], cap.max_model_len,
           cap.max_concurrency, ec.max_num_batched_tokens, ec.max_num_seqs);
  if (ec.graphs)
    log_info("steps of up to 512 tokens replay CUDA graphs, captured at start-up for 1, 2, 4 "
             "and multiples of 8 tokens (--enforce-eager: op by op)");
  if (cap.kv_tokens < max_len)
    log_info("the KV cache holds fewer tokens than max-model-len %d: longer requests are served "
             "compressed between prefill chunks; uncompressed ones up to %lld tokens",
             max_len, (long long)cap.kv_tokens);
  if (m.tp > 1)
    log_info("tensor parallel: %d ranks (%s communicator), %d KV heads and %d MLP columns each",
             m.tp, m.tp_comm->ops->name, m.tp_w[0].cfg.n_kv_heads, m.tp_w[0].cfg.n_ff);
  if ((rc = sched_engine_start(eng))) {
    snprintf(err, sizeof err, "cannot start the engine thread: %s", strerror(-rc));
    sched_engine_free(eng);
    goto fail_chat;
  }
  notify_status("warming up");
  double tw = cli_now_s();
  if ((rc = warm_up(eng, m.tok, err, sizeof err))) {
    sched_engine_free(eng);
    goto fail_chat;
  }
  log_debug("warm-up step: %.3f s", cli_now_s() - tw);

  srv_config_t sc;
  srv_config_default(&sc);
  sc.host = o->host;
  sc.port = (int)o->port;
  sc.api_key = o->api_key;
  sc.api_keys = (const char *const *)keys;
  sc.n_api_keys = n_keys;
  sc.metrics_require_key = o->metrics_require_key;
  sc.max_tokens_limit = (int32_t)o->max_tokens_limit;
  sc.max_request_bytes = (size_t)o->max_request_bytes;
  sc.max_connections = (int)o->max_connections;
  sc.idle_timeout_ms = (int64_t)(o->idle_timeout * 1000);
  sc.body_timeout_ms = (int64_t)(o->request_timeout * 1000);
  sc.max_model_len = max_len;
  sc.kv_compression = kvc;
  sc.kv_tokens = cap.kv_tokens;
  char *name = model_name_of(o);
  rc = name ? srv_server_new(&srv, &sc, eng, m.tok, have_chat ? &chat : NULL, name, err, sizeof err)
            : -ENOMEM;
  if (rc) {
    if (rc == -ENOMEM && !name) snprintf(err, sizeof err, "out of memory");
    sched_engine_free(eng);
    free(name);
    goto fail_chat;
  }
  if (strcmp(o->host, "127.0.0.1") && strcmp(o->host, "::1") && strcmp(o->host, "localhost") &&
      !o->api_key && !n_keys)
    log_warn("listening on %s without an API key (--api-key, --api-key-file): anyone who can "
             "reach it can use it",
             o->host);
  log_info("serving '%s' on http://%s%s%s:%d", name, strchr(o->host, ':') ? "[" : "", o->host,
           strchr(o->host, ':') ? "]" : "", srv_server_port(srv));
  g_shutdown_ms = (int64_t)(o->shutdown_timeout * 1000);
  g_srv = srv;
  struct sigaction sa = {0};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGHUP, &sa, NULL);
  notify_send("READY=1\nSTATUS=serving");
  srv_server_run(srv);
  g_srv = NULL;
  sched_engine_free(eng); /* engine first: it may still notify the server */
  srv_server_free(srv);
  free(name);
  if (g_engine_fatal) {
    snprintf(err, sizeof err, "stopped after an unrecoverable device error");
    rc = -EIO;
  } else {
    log_info("stopped");
    rc = 0;
  }
fail_chat:
  if (have_chat) model_chat_destroy(&chat);
fail_model:
  cli_loaded_destroy(&m);
fail_keys:
  for (int i = 0; i < n_keys; i++) free(keys[i]);
  free(keys);
  if (rc) {
    notify_status("failed: %s", err);
    log_error("%s", err);
    return 1;
  }
  return 0;
}

int cli_tokenize(const loaded_t *m, const char *text, int32_t **out, size_t *n, char *err,
                 size_t errlen) {
  size_t n_ids = 0, len = strlen(text), cap = len + 2, off = 0;
  int32_t *ids = malloc(cap * sizeof *ids);
  if (ids && model_tok_add_bos(m->tok) && model_tok_bos(m->tok) >= 0) ids[off++] = model_tok_bos(m->tok);
  int rc = ids ? model_tok_encode(m->tok, text, len, true, ids + off, cap - off, &n_ids) : -ENOMEM;
  if (rc == -ENOSPC) { /* more ids than bytes: grow to the count the tokenizer asked for */
    int32_t *more = realloc(ids, (n_ids + off) * sizeof *ids);
    if (more) {
      ids = more;
      rc = model_tok_encode(m->tok, text, len, true, ids + off, n_ids, &n_ids);
    } else {
      rc = -ENOMEM;
    }
  }
  if (rc && rc != -EINVAL) { /* -EINVAL: ill-formed UTF-8, tokenized as U+FFFD */
    snprintf(err, errlen, "cannot tokenize the prompt: %s", strerror(-rc));
    free(ids);
    return rc;
  }
  *out = ids;
  *n = n_ids + off;
  return 0;
}

static int cmd_generate(cfg_options_t *o) {
  char err[512];
  double t0 = cli_now_s();
  if (!o->prompt && !o->prompt_file) return cli_die("--prompt or --prompt-file is required");
  char *text = o->prompt_file ? read_file(o->prompt_file, err, sizeof err) : strdup(o->prompt);
  if (!text) return cli_die(err);

  loaded_t m;
  int rc = cli_load_model(&m, o, err, sizeof err);
  if (rc) {
    cli_loaded_destroy(&m);
    free(text);
    return cli_die(err);
  }
  if (o->chat) {
    char *wrapped = NULL;
    if ((rc = chat_prompt(&m, o, text, &wrapped, err, sizeof err))) goto fail;
    free(text);
    text = wrapped;
  }
  const model_config_t *c = &m.w.cfg;
  int32_t max_len = o->max_model_len > 0 ? (int32_t)o->max_model_len : c->n_ctx_train;

  size_t n_prompt = 0;
  int32_t *ids = NULL;
  if ((rc = cli_tokenize(&m, text, &ids, &n_prompt, err, sizeof err))) goto fail;
  if (n_prompt == 0) {
    rc = -EINVAL;
    snprintf(err, sizeof err, "the prompt is empty");
    free(ids);
    goto fail;
  }
  if ((int64_t)n_prompt >= max_len) {
    rc = -E2BIG;
    snprintf(err, sizeof err, "the prompt is %zu tokens, longer than the context (max-model-len %d)",
             n_prompt, max_len);
    free(ids);
    goto fail;
  }
  int32_t seq_len = (int32_t)n_prompt + (int32_t)o->max_tokens;
  if (seq_len > max_len) seq_len = max_len;

  sched_sample_params_t sp;
  sched_sample_params_default(&sp);
  sp.temperature = (float)o->temperature;
  sp.top_k = (int32_t)o->top_k;
  sp.top_p = (float)o->top_p;
  sp.min_p = (float)o->min_p;
  sp.repetition_penalty = (float)o->repetition_penalty;
  sp.presence_penalty = (float)o->presence_penalty;
  sp.frequency_penalty = (float)o->frequency_penalty;
  sp.has_seed = o->seed >= 0;
  sp.seed = (uint64_t)(o->seed >= 0 ? o->seed : 0);
  if ((rc = sched_sample_params_check(&sp, err, sizeof err))) {
    free(ids);
    goto fail;
  }

  sched_single_t run;
  sched_sampler_t smp;
  int32_t chunk = cli_step_tokens(&m, o);
  float *logits = malloc((size_t)c->n_vocab * sizeof(float));
  rc = logits ? sched_single_init_tp(&run, &m.w, m.be, m.tp > 1 ? m.tp : 1, m.tp_w, m.tp_be,
                                     m.tp_comm, seq_len, chunk, 0, err, sizeof err)
             : -ENOMEM;
  if (!rc && (rc = sched_sampler_init(&smp, &sp, c->n_vocab)))
    snprintf(err, sizeof err, "cannot start the sampler: %s", strerror(-rc));
  if (rc) {
    free(logits);
    free(ids);
    goto fail;
  }
  sched_sampler_prompt(&smp, ids, n_prompt);
  /* decode steps replay CUDA graphs as the server's do (captured the
   * second time a step's size comes, here at the second token) */
  model_group_set_graphs(&run.model, use_graphs(o, &m));
  double t_load = cli_now_s() - t0;

  double t1 = cli_now_s();
  rc = sched_single_feed(&run, ids, (int32_t)n_prompt, false, logits);
  double t_prefill = cli_now_s() - t1;
  int32_t gen = 0;
  double t2 = cli_now_s();
  model_detok_t dt;
  model_detok_init(&dt);
  char piece[256];
  while (!rc && gen < o->max_tokens && run.n_past < seq_len) {
    int32_t id = sched_sample(&smp, logits, NULL);
    gen++;
    sched_sampler_accept(&smp, id);
    if (model_tok_is_eog(m.tok, id) && !o->ignore_eos) break;
    size_t k = model_detok_push(&dt, m.tok, id, piece, sizeof piece);
    fwrite(piece, 1, k, stdout);
    fflush(stdout);
    if (gen >= o->max_tokens || run.n_past >= seq_len) break;
    rc = sched_single_feed(&run, &id, 1, false, logits);
  }
  size_t k = model_detok_flush(&dt, piece, sizeof piece);
  fwrite(piece, 1, k, stdout);
  fputc('\n', stdout);
  double t_decode = cli_now_s() - t2;
  if (rc) snprintf(err, sizeof err, "generation failed: %s", strerror(-rc));

  if (o->stats && !rc) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    /* decode rate counts the steps that ran a forward: gen - 1 */
    int32_t steps = gen > 1 ? gen - 1 : 0;
    fprintf(stderr,
            "{\"prompt_tokens\":%zu,\"prefill_s\":%.6f,\"prefill_tok_s\":%.3f,\"gen_tokens\":%d,"
            "\"decode_s\":%.6f,\"decode_tok_s\":%.3f,\"peak_rss_mb\":%.1f,\"load_s\":%.3f}\n",
            n_prompt, t_prefill, (double)n_prompt / t_prefill, gen, t_decode,
            steps && t_decode > 0 ? (double)steps / t_decode : 0.0, (double)ru.ru_maxrss / 1024.0,
            t_load);
  }
  sched_sampler_destroy(&smp);
  sched_single_destroy(&run);
  free(logits);
  free(ids);
fail:
  free(text);
  cli_loaded_destroy(&m);
  if (rc) return cli_die(err);
  return 0;
}

/* The version, and the build's optional parts (tests look for them). */
static void print_version(void) {
  printf("pressd %s\n", PRESSD_VERSION);
  printf("built with:%s%s\n",
#ifdef PRESSD_CUDA
         " cuda",
#else
         " cpu-only",
#endif
#ifdef PRESSD_FAULT_INJECTION
         " fault-injection"
#else
         ""
#endif
  );
}

static void usage(FILE *f) {
  fprintf(f,
          "pressd %s — OpenAI-compatible LLM serving with KV-cache compression\n\n"
          "usage:\n"
          "  pressd serve --model PATH [options]                    OpenAI-compatible HTTP server\n"
          "  pressd generate --model PATH --prompt TEXT [options]   run one prompt\n"
          "  pressd eval-kv --model PATH < jobs.jsonl              KV compression quality (JSON lines)\n"
          "  pressd COMMAND --help                                  options of a command\n"
          "  pressd COMMAND --config FILE [options]                 options from a JSON file\n"
          "  pressd COMMAND --print-config [options]                the options as such a file\n"
          "  pressd --version\n",
          PRESSD_VERSION);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
    print_version();
    return 0;
  }
  if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
    usage(stdout);
    return 0;
  }
  if (strcmp(argv[1], "generate") && strcmp(argv[1], "serve") && strcmp(argv[1], "eval-kv")) {
    fprintf(stderr, "pressd: unknown command '%s' (see pressd --help)\n", argv[1]);
    return 2;
  }
  cfg_options_t o;
  cfg_defaults(&o);
  char err[512]; /* room for a config file's path and key */
  int rc = cfg_parse_args(&o, argc - 2, argv + 2, err, sizeof err);
  if (rc == CFG_HELP || rc == CFG_VERSION) {
    if (rc == CFG_HELP) cfg_print_help(stdout, argv[1]);
    else print_version();
    cfg_destroy(&o);
    return 0;
  }
  if (rc) {
    fprintf(stderr, "pressd: %s\n", err);
    cfg_destroy(&o);
    return 2;
  }
  if (o.print_config) {
    rc = cfg_print_config(stdout, &o);
    cfg_destroy(&o);
    if (rc) fprintf(stderr, "pressd: --print-config: cannot write the output\n");
    return rc ? 1 : 0;
  }
  rc = !strcmp(argv[1], "serve")     ? cmd_serve(&o)
       : !strcmp(argv[1], "eval-kv") ? cli_eval_kv(&o)
                                     : cmd_generate(&o);
  cfg_destroy(&o);
  return rc;
}
