/* The small routes: models, health, ready, version, metrics, tokenize,
 * detokenize; the two generation routes hand over to gen.c. */
#include "server/handlers.h"

#ifndef PRESSD_VERSION
#define PRESSD_VERSION "unknown"
#endif

static void respond_json(srv_req_t *req, int status, srv_buf_t *b) {
  if (b->oom) {
    srv_error_t e;
    srv__error(&e, 500, NULL, "out of memory");
    srv__respond_error(req, &e);
    return;
  }
  srv__respond(req, status, "application/json", b->p, b->len, NULL);
}

static void respond_unavailable(srv_req_t *req, const char *why) {
  srv_error_t e;
  srv__error(&e, 503, NULL, "%s", why);
  srv__respond_error(req, &e);
}

void srv__h_completions(srv_req_t *req) { srv__handle_generate(req, SRV_API_COMPLETIONS); }

void srv__h_chat(srv_req_t *req) { srv__handle_generate(req, SRV_API_CHAT); }

void srv__h_models(srv_req_t *req) {
  srv_server_t *s = req->srv;
  srv_buf_t b;
  srv__buf_init(&b);
  srv__fmt_models(&b, s->model_name, s->started, s->cfg.max_model_len);
  respond_json(req, 200, &b);
  srv__buf_free(&b);
}

/* A step that runs this long means the engine is stuck (the slowest
 * legitimate CPU step, a full token budget of prefill, takes seconds). */
#define ENGINE_STALL_SECONDS 120.0

/* Why the server cannot serve now, or NULL. */
static const char *unavailable_reason(srv_server_t *s) {
  if (s->draining) return "the server is shutting down";
  sched_stats_t st;
  s->ops->stats(s->eng, &st);
  if (st.stopped) return "the engine has stopped";
  if (st.step_seconds > ENGINE_STALL_SECONDS)
    return "the engine has not finished a step for over 120 seconds";
  return NULL;
}

void srv__h_health(srv_req_t *req) {
  const char *why = unavailable_reason(req->srv);
  if (why) respond_unavailable(req, why);
  else srv__respond(req, 200, "application/json", "{}", 2, NULL);
}

void srv__h_ready(srv_req_t *req) {
  static const char body[] = "{\"status\":\"ready\"}";
  const char *why = unavailable_reason(req->srv);
  if (why) respond_unavailable(req, why);
  else srv__respond(req, 200, "application/json", body, sizeof body - 1, NULL);
}

void srv__h_version(srv_req_t *req) {
  static const char body[] = "{\"version\":\"" PRESSD_VERSION "\"}";
  srv__respond(req, 200, "application/json", body, sizeof body - 1, NULL);
}

void srv__h_metrics(srv_req_t *req) {
  srv_server_t *s = req->srv;
  sched_stats_t st = {0};
  s->ops->stats(s->eng, &st);
  srv_buf_t b;
  srv__buf_init(&b);
  srv__metrics_format(&b, &s->metrics, &st, s->model_name);
  if (b.oom) respond_json(req, 500, &b);
  else srv__respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, b.len, NULL);
  srv__buf_free(&b);
}

static void tokenizer_route(srv_req_t *req, bool encode) {
  srv_server_t *s = req->srv;
  srv_buf_t b;
  srv_error_t e;
  srv__buf_init(&b);
  int rc = encode ? srv__tokenize(&s->api, req->body.p, req->body.len, &b, &e)
                  : srv__detokenize(&s->api, req->body.p, req->body.len, &b, &e);
  if (rc) srv__respond_error(req, &e);
  else respond_json(req, 200, &b);
  srv__buf_free(&b);
}

void srv__h_tokenize(srv_req_t *req) { tokenizer_route(req, true); }

void srv__h_detokenize(srv_req_t *req) { tokenizer_route(req, false); }
