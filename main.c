/* pressd: command-line entry. `pressd generate` runs one prompt through the
 * model and prints the completion. */
#include <errno.h>
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
#include "scheduler/sample.h"
#include "scheduler/single.h"

#define PRESSD_VERSION "0.1.0"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int die(const char *msg) {
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

typedef struct loaded {
  model_gguf_t gguf;
  model_tok_t *tok;
  model_weights_t w;
  k_backend_t *be;
} loaded_t;

static void loaded_destroy(loaded_t *m) {
  model_weights_destroy(&m->w);
  k_backend_free(m->be);
  model_tok_free(m->tok);
  model_gguf_close(&m->gguf);
}

static int load_model(loaded_t *m, const cfg_options_t *o, char *err, size_t errlen) {
  memset(m, 0, sizeof *m);
  if (!o->model) {
    snprintf(err, errlen, "--model is required");
    return -EINVAL;
  }
  k_device_t dev = !strcmp(o->device, "cuda") ? K_DEVICE_CUDA
                   : !strcmp(o->device, "cpu") ? K_DEVICE_CPU
                                               : K_DEVICE_AUTO;
  int rc = k_backend_new(&m->be, dev, (int32_t)o->threads, err, errlen);
  if (rc) return rc;
  struct stat st;
  bool is_dir = stat(o->model, &st) == 0 && S_ISDIR(st.st_mode);
  const char *fmt = o->load_format;
  if (!strcmp(fmt, "safetensors") || (!strcmp(fmt, "auto") && is_dir)) {
    snprintf(err, errlen, "'%s': safetensors loading is not available yet", o->model);
    return -ENOTSUP;
  }
  if (!strcmp(fmt, "dummy")) {
    snprintf(err, errlen, "--load-format dummy needs the serve path; not available in generate");
    return -ENOTSUP;
  }
  if (is_dir) {
    snprintf(err, errlen, "'%s' is a directory, not a GGUF file", o->model);
    return -EINVAL;
  }
  if ((rc = model_gguf_open(&m->gguf, o->model, err, errlen))) return rc;
  if ((rc = model_tok_from_gguf(&m->tok, &m->gguf, err, errlen))) return rc;
  return model_weights_from_gguf(&m->w, &m->gguf, m->be, err, errlen);
}

static int chat_prompt(const loaded_t *m, const cfg_options_t *o, const char *user, char **out,
                       char *err, size_t errlen) {
  model_chat_t chat;
  int32_t bos = model_tok_bos(m->tok), eos = model_tok_eos(m->tok);
  size_t n;
  const char *bos_s = bos >= 0 ? model_tok_piece(m->tok, bos, true, &n) : NULL;
  const char *eos_s = eos >= 0 ? model_tok_piece(m->tok, eos, true, &n) : NULL;
  int rc;
  if (o->chat_template) {
    rc = model_chat_init_named(&chat, o->chat_template, bos_s, eos_s, err, errlen);
  } else {
    model_gguf_str_t t;
    if (model_gguf_get_str(&m->gguf, "tokenizer.chat_template", &t)) {
      snprintf(err, errlen, "the model has no chat template; pass --chat-template NAME");
      return -EINVAL;
    }
    char *tmpl = strndup(t.ptr, t.len);
    if (!tmpl) return -ENOMEM;
    rc = model_chat_init_detect(&chat, tmpl, bos_s, eos_s, err, errlen);
    free(tmpl);
  }
  if (rc) return rc;
  model_chat_msg_t msg = {"user", user};
  rc = model_chat_render(&chat, &msg, 1, true, out, err, errlen);
  model_chat_destroy(&chat);
  return rc;
}

static int cmd_generate(cfg_options_t *o) {
  char err[512];
  double t0 = now_s();
  if (!o->prompt && !o->prompt_file) return die("--prompt or --prompt-file is required");
  char *text = o->prompt_file ? read_file(o->prompt_file, err, sizeof err) : strdup(o->prompt);
  if (!text) return die(err);

  loaded_t m;
  int rc = load_model(&m, o, err, sizeof err);
  if (rc) {
    loaded_destroy(&m);
    free(text);
    return die(err);
  }
  if (o->chat) {
    char *wrapped = NULL;
    if ((rc = chat_prompt(&m, o, text, &wrapped, err, sizeof err))) goto fail;
    free(text);
    text = wrapped;
  }
  const model_config_t *c = &m.w.cfg;
  int32_t max_len = o->max_model_len > 0 ? (int32_t)o->max_model_len : c->n_ctx_train;

  /* tokens: [BOS] prompt */
  size_t n_prompt = 0, len = strlen(text);
  int32_t *ids = malloc((len + 2) * sizeof *ids);
  if (!ids) {
    rc = -ENOMEM;
    snprintf(err, sizeof err, "out of memory");
    goto fail;
  }
  size_t off = 0;
  if (model_tok_add_bos(m.tok) && model_tok_bos(m.tok) >= 0) ids[off++] = model_tok_bos(m.tok);
  rc = model_tok_encode(m.tok, text, len, true, ids + off, len + 1, &n_prompt);
  if (rc && rc != -EINVAL) {
    snprintf(err, sizeof err, "cannot tokenize the prompt: %s", strerror(-rc));
    free(ids);
    goto fail;
  }
  n_prompt += off;
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
  int32_t chunk = (int32_t)o->max_num_batched_tokens;
  float *logits = malloc((size_t)c->n_vocab * sizeof(float));
  rc = logits ? sched_single_init(&run, &m.w, m.be, seq_len, chunk, 0, err, sizeof err) : -ENOMEM;
  if (!rc && (rc = sched_sampler_init(&smp, &sp, c->n_vocab)))
    snprintf(err, sizeof err, "cannot start the sampler: %s", strerror(-rc));
  if (rc) {
    free(logits);
    free(ids);
    goto fail;
  }
  sched_sampler_prompt(&smp, ids, n_prompt);
  double t_load = now_s() - t0;

  double t1 = now_s();
  rc = sched_single_feed(&run, ids, (int32_t)n_prompt, false, logits);
  double t_prefill = now_s() - t1;
  int32_t gen = 0;
  double t2 = now_s();
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
  double t_decode = now_s() - t2;
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
  loaded_destroy(&m);
  if (rc) return die(err);
  return 0;
}

static void usage(FILE *f) {
  fprintf(f,
          "pressd %s — OpenAI-compatible LLM serving with KV-cache compression\n\n"
          "usage:\n"
          "  pressd generate --model PATH --prompt TEXT [options]   run one prompt\n"
          "  pressd COMMAND --help                                  options of a command\n"
          "  pressd --version\n",
          PRESSD_VERSION);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
    printf("pressd %s\n", PRESSD_VERSION);
    return 0;
  }
  if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
    usage(stdout);
    return 0;
  }
  if (strcmp(argv[1], "generate")) {
    fprintf(stderr, "pressd: unknown command '%s' (see pressd --help)\n", argv[1]);
    return 2;
  }
  cfg_options_t o;
  cfg_defaults(&o);
  char err[256];
  int rc = cfg_parse_args(&o, argc - 2, argv + 2, err, sizeof err);
  if (rc == 1) {
    cfg_print_help(stdout, argv[1]);
    cfg_destroy(&o);
    return 0;
  }
  if (rc) {
    fprintf(stderr, "pressd: %s\n", err);
    cfg_destroy(&o);
    return 2;
  }
  rc = cmd_generate(&o);
  cfg_destroy(&o);
  return rc;
}
