/* Request bodies of the OpenAI-compatible API, validated as vLLM does:
 * every field has its type and range checked, the offending one is named in
 * the error's "param"; unknown fields are ignored. A valid body becomes a
 * sched_request_t (prompt tokens after chat templating and tokenisation,
 * sampling parameters, stop strings). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/internal.h"

#define MAX_LOGPROBS SCHED_MAX_TOP_LOGPROBS

static const cJSON *get(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  return cJSON_IsNull(v) ? NULL : v; /* null means "not given" */
}

/* A NUL byte, raw or as the escape \u0000: cJSON's strings end at the first
 * one, which would cut a model name or a prompt short without a word. */
static bool has_nul(const char *s, size_t n) {
  if (memchr(s, '\0', n)) return true;
  for (size_t i = 0; i + 1 < n; i++) {
    if (s[i] != '\\') continue;
    if (s[i + 1] == 'u' && i + 5 < n && memcmp(s + i + 2, "0000", 4) == 0) return true;
    i++; /* the escaped character: "\\u0000" is a backslash and text */
  }
  return false;
}

static cJSON *parse_body(const char *body, size_t len, srv_error_t *e) {
  if (!body || len == 0) {
    srv__error(e, 400, NULL, "the request body is empty; a JSON object is expected");
    return NULL;
  }
  if (has_nul(body, len)) {
    srv__error(e, 400, NULL, "the request body contains a NUL character (\\u0000), which is "
                             "not supported");
    return NULL;
  }
  const char *end = NULL;
  /* body[len] is the NUL srv_buf_t keeps: require it right after the JSON. */
  cJSON *doc = cJSON_ParseWithLengthOpts(body, len + 1, &end, true);
  if (!doc) {
    size_t at = end && end >= body ? (size_t)(end - body) : 0;
    srv__error(e, 400, NULL, "invalid JSON in the request body at byte %zu", at);
    return NULL;
  }
  if (!cJSON_IsObject(doc)) {
    cJSON_Delete(doc);
    srv__error(e, 400, NULL, "the request body must be a JSON object");
    return NULL;
  }
  return doc;
}

/* ---- typed optional fields ---------------------------------------------- */

static int opt_number(const cJSON *o, const char *key, double *out, srv_error_t *e) {
  const cJSON *v = get(o, key);
  if (!v) return 0;
  if (!cJSON_IsNumber(v)) return srv__error(e, 400, key, "'%s' must be a number", key);
  if (!isfinite(v->valuedouble))
    return srv__error(e, 400, key, "'%s' must be a finite number", key);
  *out = v->valuedouble;
  return 1;
}

static int opt_int(const cJSON *o, const char *key, int64_t lo, int64_t hi, int64_t *out,
                   srv_error_t *e) {
  const cJSON *v = get(o, key);
  if (!v) return 0;
  double d = v->valuedouble;
  if (!cJSON_IsNumber(v) || !isfinite(d) || d != floor(d))
    return srv__error(e, 400, key, "'%s' must be an integer", key);
  /* 2^63 itself passes "d > (double)INT64_MAX" but does not fit */
  if (d < (double)lo || d > (double)hi || d >= 9223372036854775808.0)
    return srv__error(e, 400, key, "'%s' must be between %lld and %lld, got %.17g", key,
                      (long long)lo, (long long)hi, d);
  *out = (int64_t)d;
  return 1;
}

static int opt_bool(const cJSON *o, const char *key, bool *out, srv_error_t *e) {
  const cJSON *v = get(o, key);
  if (!v) return 0;
  if (!cJSON_IsBool(v)) return srv__error(e, 400, key, "'%s' must be a boolean", key);
  *out = cJSON_IsTrue(v);
  return 1;
}

/* A number field of the sampling parameters, range-checked. */
static int sample_float(const cJSON *o, const char *key, float *out, double lo, bool lo_open,
                        double hi, const char *range, srv_error_t *e) {
  double d = 0;
  int rc = opt_number(o, key, &d, e);
  if (rc <= 0) return rc;
  if (d < lo || (lo_open && d == lo) || d > hi)
    return srv__error(e, 400, key, "'%s' must be %s, got %.9g", key, range, d);
  *out = (float)d;
  return 1;
}

static int check_model(const srv_api_ctx_t *ctx, const cJSON *doc, srv_error_t *e) {
  const cJSON *m = get(doc, "model");
  if (!m) return 0;
  if (!cJSON_IsString(m)) return srv__error(e, 400, "model", "'model' must be a string");
  if (strcmp(m->valuestring, ctx->model_name) != 0) {
    srv_buf_t b;
    srv__buf_init(&b);
    srv__json_str(&b, m->valuestring, strnlen(m->valuestring, 200));
    srv__error(e, 404, "model", "The model %s does not exist.", b.p ? b.p : "");
    e->code = "model_not_found";
    srv__buf_free(&b);
    return -1;
  }
  return 0;
}

/* ---- stop --------------------------------------------------------------- */

static void free_strv(char **v, int32_t n) {
  if (!v) return;
  for (int32_t i = 0; i < n; i++) free(v[i]);
  free(v);
}

static int add_stop(char **v, int32_t *n, const cJSON *s, srv_error_t *e) {
  if (!cJSON_IsString(s))
    return srv__error(e, 400, "stop", "'stop' must be a string or an array of strings");
  size_t len = strlen(s->valuestring);
  if (len == 0) return 0; /* an empty stop string matches nothing useful: skipped */
  if (len > SRV_MAX_STOP_LEN)
    return srv__error(e, 400, "stop", "stop strings must be at most %d bytes", SRV_MAX_STOP_LEN);
  if (*n >= SRV_MAX_STOP)
    return srv__error(e, 400, "stop", "at most %d stop strings are allowed", SRV_MAX_STOP);
  for (int32_t i = 0; i < *n; i++)
    if (strcmp(v[i], s->valuestring) == 0) return 0; /* duplicate */
  if (!(v[*n] = strdup(s->valuestring))) return srv__error(e, 500, NULL, "out of memory");
  (*n)++;
  return 0;
}

int srv__parse_stop(const cJSON *v, char ***stop, int32_t *n_stop, srv_error_t *e) {
  *stop = NULL;
  *n_stop = 0;
  if (!v || cJSON_IsNull(v)) return 0;
  int count = cJSON_IsArray(v) ? cJSON_GetArraySize(v) : 1;
  if (count > SRV_MAX_STOP)
    return srv__error(e, 400, "stop", "at most %d stop strings are allowed", SRV_MAX_STOP);
  char **out = calloc((size_t)count + 1, sizeof *out);
  int32_t n = 0;
  if (!out) return srv__error(e, 500, NULL, "out of memory");
  if (cJSON_IsArray(v)) {
    const cJSON *s;
    cJSON_ArrayForEach(s, v) {
      if (add_stop(out, &n, s, e)) goto fail;
    }
  } else if (add_stop(out, &n, v, e)) {
    goto fail;
  }
  if (n == 0) {
    free(out);
    return 0;
  }
  *stop = out;
  *n_stop = n;
  return 0;
fail:
  free_strv(out, n);
  return -1;
}

/* ---- tokens ----------------------------------------------------------------- */

/* Tokenises text (special tokens parsed), BOS first when add_bos. */
static int tokenize(const srv_api_ctx_t *ctx, const char *text, size_t len, bool add_bos,
                    int32_t **ids, size_t *n, srv_error_t *e) {
  int32_t bos = model_tok_bos(ctx->tok);
  size_t off = add_bos && bos >= 0 ? 1 : 0;
  size_t cap = len + 2, n_out = 0;
  int32_t *buf = malloc(cap * sizeof *buf);
  if (!buf) return srv__error(e, 500, NULL, "out of memory");
  for (;;) {
    int rc = model_tok_encode(ctx->tok, text, len, true, buf + off, cap - off, &n_out);
    if (rc != -ENOSPC) break; /* -EINVAL (bad UTF-8) still wrote U+FFFD ids */
    cap = n_out + off;
    int32_t *nb = realloc(buf, cap * sizeof *buf);
    if (!nb) {
      free(buf);
      return srv__error(e, 500, NULL, "out of memory");
    }
    buf = nb;
  }
  if (off) buf[0] = bos;
  *ids = buf;
  *n = n_out + off;
  return 0;
}

/* An array of token ids (integers in [0, n_vocab)). */
static int token_array(const srv_api_ctx_t *ctx, const cJSON *arr, const char *param, int32_t **ids,
                       size_t *n, srv_error_t *e) {
  int count = cJSON_GetArraySize(arr);
  int32_t n_vocab = model_tok_n_vocab(ctx->tok);
  int32_t *buf = malloc(((size_t)count + 1) * sizeof *buf);
  if (!buf) return srv__error(e, 500, NULL, "out of memory");
  size_t i = 0;
  const cJSON *t;
  cJSON_ArrayForEach(t, arr) {
    double d = t->valuedouble;
    if (!cJSON_IsNumber(t) || d != floor(d) || !(d >= 0) || d >= (double)n_vocab) {
      free(buf);
      return srv__error(e, 400, param, "'%s' token ids must be integers in [0, %d)", param,
                        n_vocab);
    }
    buf[i++] = (int32_t)d;
  }
  *ids = buf;
  *n = i;
  return 0;
}

static bool all_numbers(const cJSON *arr) {
  const cJSON *t;
  cJSON_ArrayForEach(t, arr) {
    if (!cJSON_IsNumber(t)) return false;
  }
  return true;
}

/* "prompt": a string, token ids, or a one-element array of either. */
static int completion_prompt(const srv_api_ctx_t *ctx, const cJSON *doc, bool want_text,
                             int32_t **ids, size_t *n, char **text, srv_error_t *e) {
  const cJSON *p = get(doc, "prompt");
  if (!p) return srv__error(e, 400, "prompt", "'prompt' is required");
  if (cJSON_IsArray(p)) {
    int count = cJSON_GetArraySize(p);
    if (count == 0) return srv__error(e, 400, "prompt", "'prompt' must not be empty");
    if (all_numbers(p)) return token_array(ctx, p, "prompt", ids, n, e);
    if (count > 1)
      return srv__error(e, 400, "prompt", "batched prompts (more than one) are not supported");
    p = cJSON_GetArrayItem(p, 0);
    if (cJSON_IsArray(p)) {
      if (cJSON_GetArraySize(p) == 0 || !all_numbers(p))
        return srv__error(e, 400, "prompt", "'prompt' must be a string or an array of token ids");
      return token_array(ctx, p, "prompt", ids, n, e);
    }
  }
  if (!cJSON_IsString(p))
    return srv__error(e, 400, "prompt", "'prompt' must be a string or an array of token ids");
  size_t len = strlen(p->valuestring);
  if (tokenize(ctx, p->valuestring, len, model_tok_add_bos(ctx->tok), ids, n, e)) return -1;
  if (want_text && !(*text = strdup(p->valuestring))) {
    free(*ids);
    *ids = NULL;
    return srv__error(e, 500, NULL, "out of memory");
  }
  return 0;
}

/* Text of a message's content: a string, null, or text parts joined by "\n". */
static int message_content(const cJSON *c, srv_buf_t *b, srv_error_t *e) {
  if (!c) return 0;
  if (cJSON_IsString(c)) {
    srv__buf_adds(b, c->valuestring);
    return 0;
  }
  if (!cJSON_IsArray(c))
    return srv__error(e, 400, "messages",
                      "message 'content' must be a string or an array of text parts");
  int i = 0;
  const cJSON *part;
  cJSON_ArrayForEach(part, c) {
    const cJSON *type = get(part, "type"), *text = get(part, "text");
    if (!cJSON_IsObject(part) || !cJSON_IsString(type))
      return srv__error(e, 400, "messages", "content parts must be objects with a 'type'");
    if (strcmp(type->valuestring, "text") != 0)
      return srv__error(e, 400, "messages", "content parts of type '%.40s' are not supported",
                        type->valuestring);
    if (!cJSON_IsString(text))
      return srv__error(e, 400, "messages", "a text content part needs a string 'text'");
    if (i++) srv__buf_add(b, "\n", 1);
    srv__buf_adds(b, text->valuestring);
  }
  return 0;
}

/* "messages" rendered with the chat template into a prompt string. */
static int chat_prompt(const srv_api_ctx_t *ctx, const cJSON *doc, bool add_generation_prompt,
                       char **out, srv_error_t *e) {
  const cJSON *msgs = get(doc, "messages");
  if (!msgs) return srv__error(e, 400, "messages", "'messages' is required");
  if (!cJSON_IsArray(msgs))
    return srv__error(e, 400, "messages", "'messages' must be an array of messages");
  int count = cJSON_GetArraySize(msgs);
  if (count == 0) return srv__error(e, 400, "messages", "'messages' must not be empty");
  if (count > SRV_MAX_MESSAGES)
    return srv__error(e, 400, "messages", "at most %d messages are allowed", SRV_MAX_MESSAGES);
  if (!ctx->chat)
    return srv__error(e, 400, "messages", "this model has no chat template; use /v1/completions");
  model_chat_msg_t *m = calloc((size_t)count, sizeof *m);
  srv_buf_t *texts = calloc((size_t)count, sizeof *texts);
  int rc = -1, i = 0;
  if (!m || !texts) {
    srv__error(e, 500, NULL, "out of memory");
    goto done;
  }
  const cJSON *msg;
  cJSON_ArrayForEach(msg, msgs) {
    if (!cJSON_IsObject(msg)) {
      srv__error(e, 400, "messages", "messages[%d] must be an object", i);
      goto done;
    }
    const cJSON *role = get(msg, "role");
    if (!cJSON_IsString(role)) {
      srv__error(e, 400, "messages", "messages[%d].role must be a string", i);
      goto done;
    }
    const char *r = role->valuestring;
    if (strcmp(r, "developer") == 0) r = "system";
    if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant")) {
      srv__error(e, 400, "messages",
                 "messages[%d].role '%.40s' is not supported (system, user, assistant)", i, r);
      goto done;
    }
    if (message_content(get(msg, "content"), &texts[i], e)) goto done;
    if (texts[i].oom) {
      srv__error(e, 500, NULL, "out of memory");
      goto done;
    }
    m[i].role = r;
    m[i].content = texts[i].p ? texts[i].p : "";
    i++;
  }
  char err[256] = "";
  int r =
      model_chat_render(ctx->chat, m, (size_t)count, add_generation_prompt, out, err, sizeof err);
  if (r == -ENOMEM) srv__error(e, 500, NULL, "out of memory");
  else if (r) srv__error(e, 400, "messages", "%s", err[0] ? err : "cannot render the messages");
  else rc = 0;
done:
  for (int k = 0; texts && k < count; k++) srv__buf_free(&texts[k]);
  free(texts);
  free(m);
  return rc;
}

/* ---- generation requests ------------------------------------------------------- */

static int sampling(const cJSON *doc, sched_sample_params_t *sp, srv_error_t *e) {
  int64_t k;
  if (sample_float(doc, "temperature", &sp->temperature, 0, false, 1e6, "a number >= 0", e) < 0 ||
      sample_float(doc, "top_p", &sp->top_p, 0, true, 1, "in (0, 1]", e) < 0 ||
      sample_float(doc, "min_p", &sp->min_p, 0, false, 1, "in [0, 1]", e) < 0 ||
      sample_float(doc, "presence_penalty", &sp->presence_penalty, -2, false, 2, "in [-2, 2]", e) <
          0 ||
      sample_float(doc, "frequency_penalty", &sp->frequency_penalty, -2, false, 2, "in [-2, 2]",
                   e) < 0 ||
      sample_float(doc, "repetition_penalty", &sp->repetition_penalty, 0, true, 1e6, "> 0", e) < 0)
    return -1;
  int rc = opt_int(doc, "top_k", -1, INT32_MAX, &k, e);
  if (rc < 0) return -1;
  if (rc) sp->top_k = k <= 0 ? 0 : (int32_t)k;
  int64_t seed;
  rc = opt_int(doc, "seed", INT64_MIN, INT64_MAX, &seed, e);
  if (rc < 0) return -1;
  if (rc) {
    sp->seed = (uint64_t)seed;
    sp->has_seed = true;
  }
  char msg[200];
  if (sched_sample_params_check(sp, msg, sizeof msg)) return srv__error(e, 400, NULL, "%s", msg);
  return 0;
}

static int logprob_fields(const cJSON *doc, srv_api_t api, srv_gen_params_t *gp, srv_error_t *e) {
  int64_t v;
  int rc;
  if (api == SRV_API_COMPLETIONS) {
    if ((rc = opt_int(doc, "logprobs", 0, MAX_LOGPROBS, &v, e)) < 0) return -1;
    gp->logprobs = rc > 0;
    gp->top_logprobs = rc > 0 ? (int32_t)v : 0;
    return 0;
  }
  bool want = false;
  if (opt_bool(doc, "logprobs", &want, e) < 0) return -1;
  if ((rc = opt_int(doc, "top_logprobs", 0, MAX_LOGPROBS, &v, e)) < 0) return -1;
  if (rc && v > 0 && !want)
    return srv__error(e, 400, "top_logprobs", "'top_logprobs' needs 'logprobs' set to true");
  gp->logprobs = want;
  gp->top_logprobs = rc && want ? (int32_t)v : 0;
  return 0;
}

static int stream_fields(const cJSON *doc, srv_gen_params_t *gp, srv_error_t *e) {
  if (opt_bool(doc, "stream", &gp->stream, e) < 0) return -1;
  const cJSON *so = get(doc, "stream_options");
  if (!so) return 0;
  if (!cJSON_IsObject(so))
    return srv__error(e, 400, "stream_options", "'stream_options' must be an object");
  if (!gp->stream)
    return srv__error(e, 400, "stream_options",
                      "'stream_options' can only be given when 'stream' is true");
  bool iu = false;
  const cJSON *v = get(so, "include_usage");
  if (v && !cJSON_IsBool(v))
    return srv__error(e, 400, "stream_options", "'stream_options.include_usage' must be a boolean");
  iu = cJSON_IsTrue(v);
  gp->include_usage = iu;
  return 0;
}

static int unsupported(const cJSON *doc, srv_api_t api, srv_error_t *e) {
  int64_t v;
  int rc = opt_int(doc, "n", 1, INT32_MAX, &v, e);
  if (rc < 0) return -1;
  if (rc && v != 1)
    return srv__error(e, 400, "n", "'n' > 1 is not supported; send %lld requests instead",
                      (long long)v);
  if (api == SRV_API_COMPLETIONS) {
    if ((rc = opt_int(doc, "best_of", 1, INT32_MAX, &v, e)) < 0) return -1;
    if (rc && v != 1) return srv__error(e, 400, "best_of", "'best_of' > 1 is not supported");
    if (get(doc, "suffix")) return srv__error(e, 400, "suffix", "'suffix' is not supported");
  }
  const cJSON *u = get(doc, "user");
  if (u && !cJSON_IsString(u)) return srv__error(e, 400, "user", "'user' must be a string");
  return 0;
}

/* ---- kv_compression ------------------------------------------------------ */

/* On error inside the object, name the nested parameter. */
static int kvc_fail(srv_error_t *e) {
  char inner[32];
  snprintf(inner, sizeof inner, "%.31s", e->param);
  snprintf(e->param, sizeof e->param, "kv_compression.%.31s", inner);
  return -1;
}

static int kvc_enum(const cJSON *o, const char *key, const char *const *names, int n, int *out,
                    srv_error_t *e) {
  const cJSON *v = get(o, key);
  if (!v) return 0;
  for (int i = 0; cJSON_IsString(v) && i < n; i++)
    if (strcmp(v->valuestring, names[i]) == 0) {
      *out = i;
      return 1;
    }
  char list[128] = "";
  for (int i = 0; i < n; i++)
    snprintf(list + strlen(list), sizeof list - strlen(list), "%s'%s'", i ? ", " : "", names[i]);
  return srv__error(e, 400, key, "'%s' must be one of %s", key, list);
}

/* The request's "kv_compression" object over the server's defaults:
 * {"method", "ratio", "max_cache_tokens", "layer_budget", "protected_window",
 *  "observation_window", "interval", "sinks", "threshold", "criterion", "score",
 *  "prefill_chunk"}. */
static int kvc_parse(const cJSON *o, const sched_kv_compression_t *def, int64_t ctx_len,
                     sched_kv_compression_t *k, srv_error_t *e) {
  *k = *def;
  if (!o) return 0;
  if (!cJSON_IsObject(o))
    return srv__error(e, 400, "kv_compression", "'kv_compression' must be an object");
  static const char *const known[] = {"method", "ratio", "max_cache_tokens", "layer_budget",
                                      "protected_window", "observation_window", "interval",
                                      "sinks", "threshold", "criterion", "score",
                                      "prefill_chunk"};
  for (const cJSON *f = o->child; f; f = f->next) {
    size_t i = 0;
    while (i < sizeof known / sizeof *known && strcmp(f->string, known[i])) i++;
    if (i == sizeof known / sizeof *known)
      return srv__error(e, 400, "kv_compression", "unknown field 'kv_compression.%.40s'",
                        f->string);
  }
  static const char *const methods[] = {"none", "kvcompress", "dbudget", "streaming", "random"};
  static const char *const layers[] = {"global", "uniform", "zigzag"};
  static const char *const scores[] = {"sum", "mean"};
  static const char *const criteria[] = {"norm", "mass"};
  int m = -1, lb = -1, sc = -1, cr = -1, rc;
  int64_t v = 0;
  double d = 0;
  if (kvc_enum(o, "method", methods, 5, &m, e) < 0) return kvc_fail(e);
  if (m >= 0) k->plan.policy = (kv_policy_t)m; /* the enum follows the list */
  if (kvc_enum(o, "layer_budget", layers, 3, &lb, e) < 0) return kvc_fail(e);
  if (lb >= 0) k->plan.layer_budget = (kv_layer_budget_t)lb;
  if (kvc_enum(o, "score", scores, 2, &sc, e) < 0) return kvc_fail(e);
  if (sc >= 0) k->plan.per_query = sc == 1;
  if (kvc_enum(o, "criterion", criteria, 2, &cr, e) < 0) return kvc_fail(e);
  if (cr >= 0) k->plan.dbudget_mass = cr == 1;
  if ((rc = opt_number(o, "ratio", &d, e)) < 0) return kvc_fail(e);
  if (rc) {
    if (!(d >= 1.0 && d <= 1e6))
      return srv__error(e, 400, "kv_compression.ratio",
                        "'ratio' must be at least 1 (1 keeps everything), got %g", d);
    k->plan.ratio = d;
    k->plan.max_cache_tokens = 0;
  }
  if ((rc = opt_int(o, "max_cache_tokens", 1, ctx_len, &v, e)) < 0) return kvc_fail(e);
  if (rc) k->plan.max_cache_tokens = (int32_t)v;
  if ((rc = opt_int(o, "protected_window", 0, ctx_len, &v, e)) < 0) return kvc_fail(e);
  if (rc) k->plan.protected_window = (int32_t)v;
  if ((rc = opt_int(o, "observation_window", 0, ctx_len, &v, e)) < 0) return kvc_fail(e);
  if (rc) k->observation_window = (int32_t)v;
  if ((rc = opt_int(o, "interval", 0, INT32_MAX, &v, e)) < 0) return kvc_fail(e);
  if (rc) k->interval = (int32_t)v;
  if ((rc = opt_int(o, "sinks", 0, ctx_len, &v, e)) < 0) return kvc_fail(e);
  if (rc) k->plan.sinks = (int32_t)v;
  if ((rc = opt_int(o, "prefill_chunk", 0, ctx_len, &v, e)) < 0) return kvc_fail(e);
  if (rc) {
    if (v > 0 && v < 64)
      return srv__error(e, 400, "kv_compression.prefill_chunk",
                        "'prefill_chunk' must be 0 or at least 64, got %lld", (long long)v);
    k->prefill_chunk = (int32_t)v;
  }
  if ((rc = opt_number(o, "threshold", &d, e)) < 0) return kvc_fail(e);
  if (rc) {
    if (!(d > 0.0 && d < 1.0))
      return srv__error(e, 400, "kv_compression.threshold",
                        "'threshold' must be between 0 and 1 (exclusive), got %g", d);
    k->plan.dbudget_threshold = (float)d;
  }
  /* a budget alone asks for the default method */
  if (m < 0 && k->plan.policy == KV_POLICY_NONE && (get(o, "ratio") || get(o, "max_cache_tokens")))
    k->plan.policy = KV_POLICY_KVCOMPRESS;
  if (m >= 0 && m != KV_POLICY_DBUDGET && m != KV_POLICY_NONE && !k->plan.ratio &&
      !k->plan.max_cache_tokens)
    return srv__error(e, 400, "kv_compression.ratio",
                      "'%s' needs 'ratio' or 'max_cache_tokens'", methods[m]);
  if (get(o, "prefill_chunk") && k->prefill_chunk > 0 && k->plan.policy != KV_POLICY_NONE &&
      !(k->plan.ratio > 1) && !k->plan.max_cache_tokens)
    return srv__error(e, 400, "kv_compression.prefill_chunk",
                      "'prefill_chunk' needs a budget: 'ratio' above 1 or 'max_cache_tokens'");
  return 0;
}

static int kv_compression(const srv_api_ctx_t *ctx, const cJSON *doc, sched_kv_compression_t *k,
                          srv_error_t *e) {
  return kvc_parse(get(doc, "kv_compression"), &ctx->kvc, ctx->max_model_len, k, e);
}

int srv_parse_kv_compression(const cJSON *o, const sched_kv_compression_t *def,
                             int32_t max_model_len, sched_kv_compression_t *out, char *err,
                             size_t errlen) {
  srv_error_t e;
  if (!kvc_parse(cJSON_IsNull(o) ? NULL : o, def, max_model_len, out, &e)) return 0;
  snprintf(err, errlen, "%s: %s", e.param, e.message);
  return -EINVAL;
}

void srv__gen_params_destroy(srv_gen_params_t *gp) {
  if (!gp) return;
  free(gp->echo_text);
  gp->echo_text = NULL;
  gp->echo_len = 0;
}

int srv__parse_generate(const srv_api_ctx_t *ctx, srv_api_t api, const char *body, size_t len,
                        sched_request_t **out, srv_gen_params_t *gp, srv_error_t *e) {
  *out = NULL;
  memset(gp, 0, sizeof *gp);
  gp->api = api;
  cJSON *doc = parse_body(body, len, e);
  if (!doc) return -1;
  sched_request_t *r = sched_request_new();
  int32_t *ids = NULL;
  size_t n_ids = 0;
  char *text = NULL;
  const char *pparam = api == SRV_API_CHAT ? "messages" : "prompt";
  if (!r) {
    srv__error(e, 500, NULL, "out of memory");
    goto fail;
  }
  if (check_model(ctx, doc, e) || unsupported(doc, api, e) || stream_fields(doc, gp, e) ||
      logprob_fields(doc, api, gp, e) || sampling(doc, &r->sample, e) ||
      opt_bool(doc, "ignore_eos", &r->ignore_eos, e) < 0 || kv_compression(ctx, doc, &r->kvc, e))
    goto fail;
  if (srv__parse_stop(get(doc, "stop"), &r->stop, &r->n_stop, e)) goto fail;

  /* max_tokens: max_completion_tokens (chat) wins over max_tokens */
  int64_t max_tokens = -1;
  const char *mparam = "max_tokens";
  int rc = 0;
  if (api == SRV_API_CHAT) {
    rc = opt_int(doc, "max_completion_tokens", 1, INT32_MAX, &max_tokens, e);
    if (rc > 0) mparam = "max_completion_tokens";
  }
  if (rc == 0) rc = opt_int(doc, "max_tokens", 1, INT32_MAX, &max_tokens, e);
  if (rc < 0) goto fail;
  if (ctx->max_tokens_limit > 0 && max_tokens > ctx->max_tokens_limit) {
    srv__error(e, 400, mparam, "'%s' is too large: %lld. This server allows at most %d.", mparam,
               (long long)max_tokens, ctx->max_tokens_limit);
    goto fail;
  }

  /* the prompt */
  if (api == SRV_API_COMPLETIONS) {
    if (opt_bool(doc, "echo", &gp->echo, e) < 0) goto fail;
    if (gp->echo && gp->logprobs) {
      srv__error(e, 400, "echo", "'echo' together with 'logprobs' is not supported");
      goto fail;
    }
    if (completion_prompt(ctx, doc, gp->echo, &ids, &n_ids, &text, e)) goto fail;
    if (gp->echo && !text) { /* token ids: echo their text */
      size_t need = model_tok_decode(ctx->tok, ids, n_ids, true, NULL, 0);
      if (!(text = malloc(need + 1))) {
        srv__error(e, 500, NULL, "out of memory");
        goto fail;
      }
      model_tok_decode(ctx->tok, ids, n_ids, true, text, need + 1);
    }
  } else {
    bool agp = true;
    if (opt_bool(doc, "add_generation_prompt", &agp, e) < 0) goto fail;
    if (chat_prompt(ctx, doc, agp, &text, e)) goto fail;
    bool add_bos = model_tok_add_bos(ctx->tok) && !ctx->chat->bos;
    if (tokenize(ctx, text, strlen(text), add_bos, &ids, &n_ids, e)) goto fail;
    free(text);
    text = NULL;
  }
  if (n_ids == 0) {
    srv__error(e, 400, pparam, "the prompt is empty after tokenisation");
    goto fail;
  }
  int64_t limit = ctx->max_model_len;
  if ((int64_t)n_ids >= limit) {
    srv__error(e, 400, pparam,
               "This model's maximum context length is %d tokens. However, your request has "
               "%zu input tokens. Please reduce the length of the input.",
               ctx->max_model_len, n_ids);
    e->code = "context_length_exceeded";
    goto fail;
  }
  if (max_tokens < 0) { /* vLLM's defaults: 16 for completions, the rest of the context for chat */
    max_tokens = api == SRV_API_COMPLETIONS ? 16 : limit - (int64_t)n_ids;
    if (max_tokens > limit - (int64_t)n_ids) max_tokens = limit - (int64_t)n_ids;
    if (ctx->max_tokens_limit > 0 && max_tokens > ctx->max_tokens_limit)
      max_tokens = ctx->max_tokens_limit;
  } else if ((int64_t)n_ids + max_tokens > limit) {
    srv__error(e, 400, mparam,
               "'%s' is too large: %lld. This model's maximum context length is %d tokens and "
               "your request has %zu input tokens (%lld > %d - %zu).",
               mparam, (long long)max_tokens, ctx->max_model_len, n_ids, (long long)max_tokens,
               ctx->max_model_len, n_ids);
    goto fail;
  }

  r->prompt = ids;
  r->n_prompt = (int32_t)n_ids;
  r->max_tokens = (int32_t)max_tokens;
  r->logprobs = gp->logprobs ? gp->top_logprobs : -1;
  if (gp->echo) {
    gp->echo_text = text;
    gp->echo_len = strlen(text);
  } else {
    free(text);
  }
  cJSON_Delete(doc);
  *out = r;
  return 0;
fail:
  free(ids);
  free(text);
  sched_request_free(r);
  cJSON_Delete(doc);
  srv__gen_params_destroy(gp);
  return -1;
}

/* ---- /tokenize and /detokenize -------------------------------------------------- */

int srv__tokenize(const srv_api_ctx_t *ctx, const char *body, size_t len, srv_buf_t *out,
                  srv_error_t *e) {
  cJSON *doc = parse_body(body, len, e);
  if (!doc) return -1;
  int32_t *ids = NULL;
  size_t n = 0;
  char *text = NULL;
  int rc = -1;
  if (check_model(ctx, doc, e)) goto done;
  if (get(doc, "messages")) {
    bool agp = true, special = false;
    if (opt_bool(doc, "add_generation_prompt", &agp, e) < 0 ||
        opt_bool(doc, "add_special_tokens", &special, e) < 0)
      goto done;
    if (chat_prompt(ctx, doc, agp, &text, e)) goto done;
    bool add_bos = special && model_tok_add_bos(ctx->tok) && !ctx->chat->bos;
    if (tokenize(ctx, text, strlen(text), add_bos, &ids, &n, e)) goto done;
  } else {
    const cJSON *p = get(doc, "prompt");
    bool special = true;
    if (opt_bool(doc, "add_special_tokens", &special, e) < 0) goto done;
    if (!p) {
      srv__error(e, 400, "prompt", "'prompt' or 'messages' is required");
      goto done;
    }
    if (!cJSON_IsString(p)) {
      srv__error(e, 400, "prompt", "'prompt' must be a string");
      goto done;
    }
    bool add_bos = special && model_tok_add_bos(ctx->tok);
    if (tokenize(ctx, p->valuestring, strlen(p->valuestring), add_bos, &ids, &n, e)) goto done;
  }
  srv__buf_adds(out, "{\"tokens\":[");
  for (size_t i = 0; i < n; i++) srv__buf_printf(out, i ? ",%d" : "%d", ids[i]);
  srv__buf_printf(out, "],\"count\":%zu,\"max_model_len\":%d,\"token_strs\":null}", n,
                  ctx->max_model_len);
  rc = 0;
done:
  free(ids);
  free(text);
  cJSON_Delete(doc);
  return rc;
}

int srv__detokenize(const srv_api_ctx_t *ctx, const char *body, size_t len, srv_buf_t *out,
                    srv_error_t *e) {
  cJSON *doc = parse_body(body, len, e);
  if (!doc) return -1;
  int32_t *ids = NULL;
  size_t n = 0;
  int rc = -1;
  if (check_model(ctx, doc, e)) goto done;
  const cJSON *t = get(doc, "tokens");
  if (!t) {
    srv__error(e, 400, "tokens", "'tokens' is required");
    goto done;
  }
  if (!cJSON_IsArray(t)) {
    srv__error(e, 400, "tokens", "'tokens' must be an array of token ids");
    goto done;
  }
  if (token_array(ctx, t, "tokens", &ids, &n, e)) goto done;
  size_t need = model_tok_decode(ctx->tok, ids, n, true, NULL, 0);
  char *text = malloc(need + 1);
  if (!text) {
    srv__error(e, 500, NULL, "out of memory");
    goto done;
  }
  model_tok_decode(ctx->tok, ids, n, true, text, need + 1);
  srv__buf_adds(out, "{\"prompt\":");
  srv__json_str(out, text, need);
  srv__buf_adds(out, "}");
  free(text);
  rc = 0;
done:
  free(ids);
  cJSON_Delete(doc);
  return rc;
}
