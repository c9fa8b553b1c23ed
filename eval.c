/* pressd eval-kv: the quality of KV compression settings on one model.
 *
 * Reads jobs, one JSON object per line, on stdin:
 *   {"id": "...", "prompt": "text" | "messages": [{"role", "content"}] |
 *    "prompt_tokens": [ids], "mode": "ppl" | "generate",
 *    "eval_tokens": N (ppl: the prompt's last N tokens are scored),
 *    "max_tokens": N (generate: greedy tokens),
 *    "teacher_forced": true (generate: also the argmax at each position
 *      after the first config's tokens, "forced_tokens"),
 *    "reference_tokens": [max_tokens ids] (teacher_forced: after these
 *      instead, e.g. another run's, to compare numerics),
 *    "configs": [{kv_compression object as in a request}, ...]}
 * The context (the prompt, less the scored tokens) is prefilled once; each
 * config restores it, compresses it as the server would after a prefill,
 * and writes one JSON line on stdout. The prefill observes the whole prompt
 * with the server's default pooling, and the observation_window the job's
 * configs ask for (the server's default 32 where they name none; one value
 * per job, and 0, the whole prompt) apart, so both kinds of config are
 * evaluated from one prefill. A config with a prefill_chunk (and a
 * compression) is prefilled on its own, compressed between chunks as the
 * server does it; list such configs last, since the shared prefill is
 * redone for any config after them:
 *   {"id", "config", "n_context", "kv_tokens_kept", "kv_tokens_evicted",
 *    "kept_fraction", "nll_sum", "n_eval", "ppl" | "tokens", "text",
 *    ["forced_tokens"], "seconds"}
 * A bad job is reported on stderr and as {"id", "error"}; the others go on. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "scheduler/kveval.h"
#include "server/server.h"

typedef struct job {
  int32_t *ids; /* owns */
  size_t n;
  bool ppl, forced;
  int32_t eval_tokens, max_tokens;
} job_t;

static int job_error(const cJSON *id, const char *msg) {
  char *s = cJSON_PrintUnformatted(id);
  fprintf(stderr, "pressd: eval-kv: job %s: %s\n", s ? s : "?", msg);
  printf("{\"id\":%s,\"error\":", s ? s : "null");
  cJSON *m = cJSON_CreateString(msg);
  char *ms = m ? cJSON_PrintUnformatted(m) : NULL;
  printf("%s}\n", ms ? ms : "\"\"");
  fflush(stdout);
  free(ms);
  cJSON_Delete(m);
  free(s);
  return -EINVAL;
}

/* The job's token ids: prompt_tokens, or the prompt / messages tokenized. */
static int job_tokens(const loaded_t *m, const cfg_options_t *o, const cJSON *j, job_t *jb,
                      char *err, size_t errlen) {
  const cJSON *toks = cJSON_GetObjectItemCaseSensitive(j, "prompt_tokens");
  const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(j, "prompt");
  const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(j, "messages");
  if (cJSON_IsArray(toks)) {
    int n = cJSON_GetArraySize(toks);
    if (!(jb->ids = malloc((size_t)(n > 0 ? n : 1) * sizeof *jb->ids))) return -ENOMEM;
    const cJSON *t;
    cJSON_ArrayForEach(t, toks) {
      if (!cJSON_IsNumber(t) || t->valuedouble < 0 || t->valuedouble >= m->w.cfg.n_vocab) {
        snprintf(err, errlen, "prompt_tokens: not a token id of this model");
        return -EINVAL;
      }
      jb->ids[jb->n++] = (int32_t)t->valuedouble;
    }
    return 0;
  }
  if (cJSON_IsString(prompt)) return cli_tokenize(m, prompt->valuestring, &jb->ids, &jb->n, err, errlen);
  if (!cJSON_IsArray(msgs)) {
    snprintf(err, errlen, "one of prompt, messages or prompt_tokens is required");
    return -EINVAL;
  }
  int n = cJSON_GetArraySize(msgs);
  model_chat_msg_t *mv = calloc((size_t)(n > 0 ? n : 1), sizeof *mv);
  if (!mv) return -ENOMEM;
  int rc = 0;
  for (int i = 0; i < n && !rc; i++) {
    const cJSON *x = cJSON_GetArrayItem(msgs, i);
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(x, "role");
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(x, "content");
    if (!cJSON_IsString(role) || !cJSON_IsString(content)) {
      snprintf(err, errlen, "messages[%d]: role and content must be strings", i);
      rc = -EINVAL;
      break;
    }
    mv[i] = (model_chat_msg_t){role->valuestring, content->valuestring};
  }
  model_chat_t chat;
  char *text = NULL;
  if (!rc && !(rc = cli_load_chat(m, o, &chat, err, errlen))) {
    rc = model_chat_render(&chat, mv, (size_t)n, true, &text, err, errlen);
    model_chat_destroy(&chat);
  }
  free(mv);
  if (!rc) {
    /* the template writes its own BOS where it has one */
    rc = cli_tokenize(m, text, &jb->ids, &jb->n, err, errlen);
    if (!rc && jb->n > 1 && jb->ids[0] == jb->ids[1] && jb->ids[0] == model_tok_bos(m->tok))
      memmove(jb->ids, jb->ids + 1, --jb->n * sizeof *jb->ids);
  }
  free(text);
  return rc;
}

static void emit(const cJSON *id, const cJSON *config, size_t n_ctx, int64_t kept, int64_t evicted,
                 int32_t heads, cJSON *extra, double secs) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddItemToObject(r, "id", cJSON_Duplicate(id, 1));
  cJSON_AddItemToObject(r, "config", cJSON_Duplicate(config, 1));
  cJSON_AddNumberToObject(r, "n_context", (double)n_ctx);
  cJSON_AddNumberToObject(r, "kv_tokens_kept", round((double)kept / heads));
  cJSON_AddNumberToObject(r, "kv_tokens_evicted", round((double)evicted / heads));
  cJSON_AddNumberToObject(r, "kept_fraction", kept + evicted ? (double)kept / (double)(kept + evicted) : 1.0);
  for (cJSON *x = extra->child; x;) {
    cJSON *next = x->next;
    cJSON_AddItemToObject(r, x->string, cJSON_DetachItemViaPointer(extra, x));
    x = next;
  }
  cJSON_AddNumberToObject(r, "seconds", secs);
  char *s = cJSON_PrintUnformatted(r);
  if (s) printf("%s\n", s);
  fflush(stdout);
  free(s);
  cJSON_Delete(r);
}

static int run_job(const loaded_t *m, const cfg_options_t *o, sched_kveval_t **ev,
                   int32_t *ev_len, const cJSON *j) {
  const cJSON *id = cJSON_GetObjectItemCaseSensitive(j, "id");
  const cJSON *mode = cJSON_GetObjectItemCaseSensitive(j, "mode");
  const cJSON *configs = cJSON_GetObjectItemCaseSensitive(j, "configs");
  char err[512];
  job_t jb = {0};
  jb.ppl = cJSON_IsString(mode) && !strcmp(mode->valuestring, "ppl");
  if (!cJSON_IsString(mode) || (!jb.ppl && strcmp(mode->valuestring, "generate")))
    return job_error(id, "mode must be \"ppl\" or \"generate\"");
  if (!cJSON_IsArray(configs) || cJSON_GetArraySize(configs) == 0)
    return job_error(id, "configs must be a non-empty array");
  const cJSON *et = cJSON_GetObjectItemCaseSensitive(j, "eval_tokens");
  const cJSON *mt = cJSON_GetObjectItemCaseSensitive(j, "max_tokens");
  jb.eval_tokens = cJSON_IsNumber(et) ? (int32_t)et->valuedouble : 0;
  jb.max_tokens = cJSON_IsNumber(mt) ? (int32_t)mt->valuedouble : 0;
  jb.forced = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "teacher_forced"));
  if (jb.ppl ? jb.eval_tokens < 1 : jb.max_tokens < 1)
    return job_error(id, jb.ppl ? "eval_tokens must be at least 1" : "max_tokens must be at least 1");
  const cJSON *rt = cJSON_GetObjectItemCaseSensitive(j, "reference_tokens");
  if (rt && (!jb.forced || jb.ppl || !cJSON_IsArray(rt) ||
             cJSON_GetArraySize(rt) != jb.max_tokens))
    return job_error(id, "reference_tokens must be an array of max_tokens ids, with "
                         "teacher_forced");
  int rc = job_tokens(m, o, j, &jb, err, sizeof err);
  if (rc) {
    free(jb.ids);
    return job_error(id, rc == -ENOMEM ? "out of memory" : err);
  }
  size_t n_ctx = jb.ppl ? (jb.n > (size_t)jb.eval_tokens ? jb.n - (size_t)jb.eval_tokens : 0) : jb.n;
  size_t need = jb.ppl ? jb.n : jb.n + (size_t)jb.max_tokens;
  int32_t max_len = o->max_model_len > 0 ? (int32_t)o->max_model_len : m->w.cfg.n_ctx_train;
  if (n_ctx == 0 || need > (size_t)max_len) {
    snprintf(err, sizeof err, "%zu tokens do not fit: context %zu, max-model-len %d", need, n_ctx,
             max_len);
    free(jb.ids);
    return job_error(id, err);
  }
  if (!*ev || *ev_len < (int32_t)need) { /* grow the cache to the longest job so far */
    sched_kveval_free(*ev);
    *ev = NULL;
    int32_t len = (int32_t)need + 64 < max_len ? (int32_t)need + 64 : max_len;
    if ((rc = sched_kveval_new(ev, &m->w, m->be, len, cli_step_tokens(m, o), err,
                               sizeof err))) {
      free(jb.ids);
      return job_error(id, err);
    }
    *ev_len = len;
  }
  int32_t window = 0; /* the one observation_window (not 0) the configs ask for */
  const cJSON *cf;
  cJSON_ArrayForEach(cf, configs) {
    sched_kv_compression_t k, def;
    sched_kv_compression_default(&def);
    if (srv_parse_kv_compression(cf, &def, max_len, &k, err, sizeof err)) continue; /* reported below */
    bool scored = k.plan.policy == KV_POLICY_KVCOMPRESS || k.plan.policy == KV_POLICY_DBUDGET;
    if (k.prefill_chunk > 0 && k.plan.policy != KV_POLICY_NONE) continue; /* a prefill of its own */
    int32_t w = scored && sched_kv_window(&k) < (int32_t)n_ctx ? sched_kv_window(&k) : 0;
    if (w && window && w != window) {
      free(jb.ids);
      return job_error(id, "the configs of one job may ask for one observation_window (and 0)");
    }
    if (w) window = w;
  }
  double t0 = cli_now_s();
  if ((rc = sched_kveval_prefill(*ev, jb.ids, (int32_t)n_ctx, window))) {
    free(jb.ids);
    return job_error(id, "the prefill failed");
  }
  double t_prefill = cli_now_s() - t0;
  bool plain = true; /* the snapshot is the shared prefill's */
  int32_t heads = sched_kveval_heads(*ev);
  /* out, then the first config's tokens (teacher forcing) */
  int32_t *out = malloc((size_t)(jb.max_tokens > 0 ? jb.max_tokens : 1) * 2 * sizeof *out);
  int32_t *ref = out ? out + (jb.max_tokens > 0 ? jb.max_tokens : 1) : NULL;
  bool have_ref = false;
  if (rt && ref) {
    int32_t i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, rt) {
      if (!cJSON_IsNumber(t) || t->valuedouble < 0 || t->valuedouble >= m->w.cfg.n_vocab) break;
      ref[i++] = (int32_t)t->valuedouble;
    }
    if (i < jb.max_tokens) {
      free(out);
      free(jb.ids);
      return job_error(id, "reference_tokens holds an id outside the vocabulary");
    }
    have_ref = true;
  }
  const cJSON *cfg;
  cJSON_ArrayForEach(cfg, configs) {
    double t1 = cli_now_s();
    sched_kv_compression_t k, def;
    sched_kv_compression_default(&def);
    if (srv_parse_kv_compression(cfg, &def, max_len, &k, err, sizeof err)) {
      job_error(id, err);
      continue;
    }
    int64_t kept = 0, evicted = 0;
    cJSON *extra = cJSON_CreateObject();
    /* compressed between prefill chunks: a prefill of its own */
    bool chunked = k.prefill_chunk > 0 && k.plan.policy != KV_POLICY_NONE;
    if (chunked || !plain) {
      rc = chunked ? sched_kveval_prefill_chunked(*ev, jb.ids, (int32_t)n_ctx, &k)
                   : sched_kveval_prefill(*ev, jb.ids, (int32_t)n_ctx, window);
      plain = !chunked;
      if (rc) {
        job_error(id, rc == -EINVAL ? "prefill_chunk needs a ratio or max_cache_tokens"
                                    : "the prefill failed");
        cJSON_Delete(extra);
        continue;
      }
    }
    if ((rc = sched_kveval_compress(*ev, &k, &kept, &evicted))) {
      job_error(id, "the compression failed");
    } else if (jb.ppl) {
      double nll = 0;
      if ((rc = sched_kveval_nll(*ev, jb.ids + n_ctx, jb.eval_tokens, &nll))) {
        job_error(id, "the scoring failed");
      } else {
        cJSON_AddNumberToObject(extra, "nll_sum", nll);
        cJSON_AddNumberToObject(extra, "n_eval", jb.eval_tokens);
        cJSON_AddNumberToObject(extra, "ppl", exp(nll / jb.eval_tokens));
      }
    } else if (!out || (rc = sched_kveval_greedy(*ev, &k, jb.max_tokens, NULL, out))) {
      job_error(id, "the generation failed");
    } else {
      if (jb.forced && !have_ref) {
        memcpy(ref, out, (size_t)jb.max_tokens * sizeof *out);
        have_ref = true;
      }
      cJSON *arr = cJSON_CreateIntArray(out, jb.max_tokens);
      cJSON_AddItemToObject(extra, "tokens", arr);
      /* through the incremental detokeniser: valid UTF-8 (U+FFFD for stray bytes) */
      char *text = malloc((size_t)jb.max_tokens * 256 + 256);
      if (text) {
        model_detok_t dt;
        model_detok_init(&dt);
        size_t tl = 0;
        for (int32_t i = 0; i < jb.max_tokens; i++)
          tl += model_detok_push(&dt, m->tok, out[i], text + tl, 256);
        model_detok_flush(&dt, text + tl, 256);
        cJSON_AddStringToObject(extra, "text", text);
        free(text);
      }
      if (jb.forced) { /* again from the compressed cache, fed the reference */
        if ((rc = sched_kveval_compress(*ev, &k, NULL, NULL)) ||
            (rc = sched_kveval_greedy(*ev, &k, jb.max_tokens, ref, out)))
          job_error(id, "the teacher-forced generation failed");
        else
          cJSON_AddItemToObject(extra, "forced_tokens", cJSON_CreateIntArray(out, jb.max_tokens));
      }
    }
    if (!rc) emit(id, cfg, n_ctx, kept, evicted, heads, extra, cli_now_s() - t1);
    cJSON_Delete(extra);
  }
  fprintf(stderr, "pressd: eval-kv: job done: %zu context tokens prefilled in %.1f s, %d configs in %.1f s\n",
          n_ctx, t_prefill, cJSON_GetArraySize(configs), cli_now_s() - t0 - t_prefill);
  free(out);
  free(jb.ids);
  return 0;
}

int cli_eval_kv(cfg_options_t *o) {
  char err[512];
  loaded_t m;
  int rc = cli_load_model(&m, o, err, sizeof err);
  if (rc) {
    cli_loaded_destroy(&m);
    return cli_die(err);
  }
  sched_kveval_t *ev = NULL;
  int32_t ev_len = 0;
  size_t cap = 1 << 16;
  char *line = malloc(cap);
  int n_bad = 0;
  ssize_t len;
  while (line && (len = getline(&line, &cap, stdin)) > 0) {
    if (strspn(line, " \t\r\n") == (size_t)len) continue;
    cJSON *j = cJSON_ParseWithLength(line, (size_t)len);
    if (!cJSON_IsObject(j)) {
      n_bad += job_error(NULL, "not a JSON object") != 0;
    } else {
      n_bad += run_job(&m, o, &ev, &ev_len, j) != 0;
    }
    cJSON_Delete(j);
  }
  free(line);
  sched_kveval_free(ev);
  cli_loaded_destroy(&m);
  return n_bad ? 1 : 0;
}
