/* Response bodies in the OpenAI schema: text_completion, chat.completion,
 * their stream chunks, the include_usage chunk, logprobs, the model list. */
#include <string.h>

#include "server/internal.h"

void srv__logprobs_init(srv_logprobs_t *l) { memset(l, 0, sizeof *l); }

void srv__logprobs_destroy(srv_logprobs_t *l) {
  if (!l) return;
  srv__buf_free(&l->tokens);
  srv__buf_free(&l->token_logprobs);
  srv__buf_free(&l->top);
  srv__buf_free(&l->offsets);
  srv__buf_free(&l->content);
  l->n = 0;
}

void srv__logprobs_reset(srv_logprobs_t *l) {
  l->tokens.len = l->token_logprobs.len = l->top.len = l->offsets.len = l->content.len = 0;
  l->n = 0;
}

static const char *piece(const model_tok_t *tok, int32_t id, size_t *len) {
  const char *p = model_tok_piece(tok, id, true, len);
  if (!p) {
    *len = 0;
    return "";
  }
  return p;
}

/* Chat: {"token":..,"logprob":..,"bytes":[..]} (without the closing brace). */
static void chat_entry(srv_buf_t *b, const model_tok_t *tok, int32_t id, float logprob) {
  size_t n;
  const char *p = piece(tok, id, &n);
  srv__buf_adds(b, "{\"token\":");
  srv__json_str(b, p, n);
  srv__buf_adds(b, ",\"logprob\":");
  srv__json_float(b, logprob);
  srv__buf_adds(b, ",\"bytes\":[");
  for (size_t i = 0; i < n; i++) srv__buf_printf(b, i ? ",%u" : "%u", (unsigned char)p[i]);
  srv__buf_adds(b, "]");
}

void srv__logprobs_add(srv_logprobs_t *l, srv_api_t api, const model_tok_t *tok,
                       const sched_event_t *ev, size_t text_offset) {
  if (ev->n_tokens != 1) return;
  size_t n;
  const char *p;
  int n_top = ev->n_top < 0                        ? 0
              : ev->n_top > SCHED_MAX_TOP_LOGPROBS ? SCHED_MAX_TOP_LOGPROBS
                                                   : ev->n_top;
  if (api == SRV_API_CHAT) {
    srv_buf_t *b = &l->content;
    if (l->n) srv__buf_add(b, ",", 1);
    chat_entry(b, tok, ev->token, ev->logprob);
    srv__buf_adds(b, ",\"top_logprobs\":[");
    for (int i = 0; i < n_top; i++) {
      if (i) srv__buf_add(b, ",", 1);
      chat_entry(b, tok, ev->top[i].token, ev->top[i].logprob);
      srv__buf_add(b, "}", 1);
    }
    srv__buf_adds(b, "]}");
  } else {
    const char *sep = l->n ? "," : "";
    p = piece(tok, ev->token, &n);
    srv__buf_adds(&l->tokens, sep);
    srv__json_str(&l->tokens, p, n);
    srv__buf_adds(&l->token_logprobs, sep);
    srv__json_float(&l->token_logprobs, ev->logprob);
    srv__buf_printf(&l->offsets, "%s%zu", sep, text_offset);
    /* the sampled token first, then the alternatives not equal to it */
    srv__buf_adds(&l->top, sep);
    srv__buf_adds(&l->top, "{");
    srv__json_str(&l->top, p, n);
    srv__buf_add(&l->top, ":", 1);
    srv__json_float(&l->top, ev->logprob);
    for (int i = 0; i < n_top; i++) {
      if (ev->top[i].token == ev->token) continue;
      size_t tn;
      const char *tp = piece(tok, ev->top[i].token, &tn);
      if (tn == n && memcmp(tp, p, n) == 0) continue; /* same text: one key */
      srv__buf_add(&l->top, ",", 1);
      srv__json_str(&l->top, tp, tn);
      srv__buf_add(&l->top, ":", 1);
      srv__json_float(&l->top, ev->top[i].logprob);
    }
    srv__buf_add(&l->top, "}", 1);
  }
  l->n++;
}

static void add_buf(srv_buf_t *b, const srv_buf_t *src) {
  if (src->len) srv__buf_add(b, src->p, src->len);
}

static void logprobs_json(srv_buf_t *b, srv_api_t api, const srv_logprobs_t *lp) {
  srv__buf_adds(b, ",\"logprobs\":");
  if (!lp) {
    srv__buf_adds(b, "null");
    return;
  }
  if (api == SRV_API_CHAT) {
    srv__buf_adds(b, "{\"content\":[");
    add_buf(b, &lp->content);
    srv__buf_adds(b, "]}");
    return;
  }
  srv__buf_adds(b, "{\"text_offset\":[");
  add_buf(b, &lp->offsets);
  srv__buf_adds(b, "],\"token_logprobs\":[");
  add_buf(b, &lp->token_logprobs);
  srv__buf_adds(b, "],\"tokens\":[");
  add_buf(b, &lp->tokens);
  srv__buf_adds(b, "],\"top_logprobs\":[");
  add_buf(b, &lp->top);
  srv__buf_adds(b, "]}");
}

const char *srv__finish_name(sched_finish_t f) {
  switch (f) {
  case SCHED_FINISH_STOP: return "stop";
  case SCHED_FINISH_LENGTH: return "length";
  default: return NULL;
  }
}

static void head(srv_buf_t *b, const srv_resp_info_t *ri, const char *object) {
  srv__buf_adds(b, "{\"id\":");
  srv__json_cstr(b, ri->id);
  srv__buf_adds(b, ",\"object\":\"");
  srv__buf_adds(b, object);
  srv__buf_printf(b, "\",\"created\":%lld,\"model\":", (long long)ri->created);
  srv__json_cstr(b, ri->model);
}

static void usage(srv_buf_t *b, const srv_usage_t *u) {
  srv__buf_printf(b, "\"usage\":{\"prompt_tokens\":%d,\"total_tokens\":%lld,\"completion_tokens\":%d",
                  u->prompt_tokens, (long long)u->prompt_tokens + u->completion_tokens,
                  u->completion_tokens);
  if (u->kv_tokens_kept || u->kv_tokens_evicted)
    srv__buf_printf(b, ",\"kv_tokens_kept\":%d,\"kv_tokens_evicted\":%d", u->kv_tokens_kept,
                    u->kv_tokens_evicted);
  srv__buf_adds(b, "}");
}

void srv__fmt_response(srv_buf_t *b, const srv_resp_info_t *ri, const char *text, size_t len,
                       const char *finish, const srv_logprobs_t *lp, const srv_usage_t *u) {
  bool chat = ri->api == SRV_API_CHAT;
  head(b, ri, chat ? "chat.completion" : "text_completion");
  srv__buf_adds(b, ",\"choices\":[{\"index\":0,");
  if (chat) {
    srv__buf_adds(b, "\"message\":{\"role\":\"assistant\",\"content\":");
    srv__json_str(b, text ? text : "", text ? len : 0);
    srv__buf_adds(b, "}");
  } else {
    srv__buf_adds(b, "\"text\":");
    srv__json_str(b, text ? text : "", text ? len : 0);
  }
  logprobs_json(b, ri->api, lp);
  srv__buf_adds(b, ",\"finish_reason\":");
  srv__json_cstr(b, finish);
  srv__buf_adds(b, "}],");
  usage(b, u);
  srv__buf_adds(b, "}");
}

void srv__fmt_chunk(srv_buf_t *b, const srv_resp_info_t *ri, const char *role, const char *text,
                    size_t len, const char *finish, const srv_logprobs_t *lp) {
  bool chat = ri->api == SRV_API_CHAT;
  if (!text) text = "", len = 0;
  head(b, ri, chat ? "chat.completion.chunk" : "text_completion");
  srv__buf_adds(b, ",\"choices\":[{\"index\":0,");
  if (chat) {
    srv__buf_adds(b, "\"delta\":{");
    if (role) {
      srv__buf_adds(b, "\"role\":");
      srv__json_cstr(b, role);
      srv__buf_adds(b, ",\"content\":");
      srv__json_str(b, text, len);
    } else if (len || !finish) {
      srv__buf_adds(b, "\"content\":");
      srv__json_str(b, text, len);
    }
    srv__buf_adds(b, "}");
  } else {
    srv__buf_adds(b, "\"text\":");
    srv__json_str(b, text, len);
  }
  logprobs_json(b, ri->api, lp);
  srv__buf_adds(b, ",\"finish_reason\":");
  srv__json_cstr(b, finish);
  srv__buf_adds(b, "}]");
  if (ri->include_usage) srv__buf_adds(b, ",\"usage\":null");
  srv__buf_adds(b, "}");
}

void srv__fmt_usage_chunk(srv_buf_t *b, const srv_resp_info_t *ri, const srv_usage_t *u) {
  head(b, ri, ri->api == SRV_API_CHAT ? "chat.completion.chunk" : "text_completion");
  srv__buf_adds(b, ",\"choices\":[],");
  usage(b, u);
  srv__buf_adds(b, "}");
}

void srv__fmt_models(srv_buf_t *b, const char *model, int64_t created, int32_t max_model_len) {
  srv__buf_adds(b, "{\"object\":\"list\",\"data\":[{\"id\":");
  srv__json_cstr(b, model);
  srv__buf_printf(b, ",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"pressd\",\"root\":",
                  (long long)created);
  srv__json_cstr(b, model);
  srv__buf_printf(b, ",\"parent\":null,\"max_model_len\":%d,\"permission\":[]}]}", max_model_len);
}
