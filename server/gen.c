/* Generation requests: validate and submit to the engine, then turn the
 * engine's events into one JSON response or an SSE stream.
 *
 * A request is "in the engine" from a successful submit until its last
 * event (finish != NONE). If its client goes away before that, it is
 * aborted and orphaned (kept in srv->live, no connection) until that last
 * event frees it: the engine may still post events carrying its pointer. */
#include <errno.h>
#include <string.h>
#include <time.h>

#include "server/internal.h"

static void buf_clear(srv_buf_t *b) {
  b->len = 0;
  b->oom = false;
}

static srv_resp_info_t info_of(const srv_req_t *req) {
  srv_resp_info_t ri = {
      .api = req->gp.api,
      .id = req->rid,
      .model = req->srv->model_name,
      .created = req->created,
      .include_usage = req->gp.include_usage,
  };
  return ri;
}

/* One SSE event with the JSON in s->scratch. */
static void write_event(srv_req_t *req) {
  srv_server_t *s = req->srv;
  buf_clear(&s->frame);
  srv__sse_data(&s->frame, s->scratch.p, s->scratch.len, req->chunked);
  srv__req_write(req, s->frame.p, s->frame.len);
}

static void write_chunk(srv_req_t *req, const char *role, const char *text, size_t len,
                        const char *finish, const srv_logprobs_t *lp) {
  srv_resp_info_t ri = info_of(req);
  buf_clear(&req->srv->scratch);
  srv__fmt_chunk(&req->srv->scratch, &ri, role, text, len, finish, lp);
  write_event(req);
}

static void end_stream(srv_req_t *req) {
  srv_server_t *s = req->srv;
  buf_clear(&s->frame);
  srv__sse_done(&s->frame, req->chunked);
  srv__req_write(req, s->frame.p, s->frame.len);
  srv__req_end(req);
}

static void live_link(srv_server_t *s, srv_req_t *req) {
  req->live_prev = NULL;
  req->live_next = s->live;
  if (s->live) s->live->live_prev = req;
  s->live = req;
}

static void live_unlink(srv_server_t *s, srv_req_t *req) {
  if (req->live_prev) req->live_prev->live_next = req->live_next;
  else if (s->live == req) s->live = req->live_next;
  if (req->live_next) req->live_next->live_prev = req->live_prev;
  req->live_prev = req->live_next = NULL;
}

void srv__handle_generate(srv_req_t *req, srv_api_t api) {
  srv_server_t *s = req->srv;
  srv_error_t e;
  if (s->draining || s->stopping) {
    srv__error(&e, 503, NULL, "the server is shutting down");
    srv__respond_error(req, &e);
    return;
  }
  sched_request_t *r;
  if (srv__parse_generate(&s->api, api, req->body.p, req->body.len, &r, &req->gp, &e)) {
    srv__respond_error(req, &e);
    return;
  }
  req->id = ++s->next_id;
  r->id = req->id;
  r->user = req;
  req->n_prompt = r->n_prompt;
  srv__new_rid(s, api == SRV_API_CHAT ? "chatcmpl-" : "cmpl-", req->rid, sizeof req->rid);
  req->created = (int64_t)time(NULL);
  req->t_submit = srv__now_ns();
  int rc = s->ops->submit(s->eng, r);
  if (rc) {
    sched_request_free(r);
    if (rc == -EAGAIN) {
      s->metrics.rejected++;
      srv__error(&e, 429, NULL, "the server is busy (the waiting queue is full); retry later");
    } else if (rc == -EINVAL) {
      srv__error(&e, 400, api == SRV_API_CHAT ? "messages" : "prompt",
                 "the prompt does not fit the model's context (max_model_len %d)",
                 s->cfg.max_model_len);
    } else if (rc == -ENOSPC) {
      srv__error(&e, 400, api == SRV_API_CHAT ? "messages" : "prompt",
                 "the prompt's %d tokens do not fit in the KV cache, which holds %lld tokens per "
                 "sequence: ask for kv_compression with a 'ratio' or 'max_cache_tokens' (the "
                 "prompt is then compressed between prefill chunks) or shorten the prompt",
                 req->n_prompt, (long long)s->cfg.kv_tokens);
      e.code = "context_length_exceeded";
    } else {
      srv__error(&e, 503, NULL, "the engine cannot take requests now (%s)", strerror(-rc));
    }
    srv__respond_error(req, &e);
    return;
  }
  req->in_engine = true;
  s->n_active++;
  if (req->gp.echo) req->text_total = req->gp.echo_len; /* text offsets count the echo */
  if (!req->gp.stream) {
    if (req->gp.echo) srv__buf_add(&req->text, req->gp.echo_text, req->gp.echo_len);
    return;
  }
  srv__respond_stream_head(req);
  if (api == SRV_API_CHAT) write_chunk(req, "assistant", "", 0, NULL, NULL);
  else if (req->gp.echo && req->gp.echo_len)
    write_chunk(req, NULL, req->gp.echo_text, req->gp.echo_len, NULL, NULL);
}

void srv__gen_orphan(srv_req_t *req) {
  srv_server_t *s = req->srv;
  req->conn = NULL;
  live_link(s, req);
  s->ops->abort(s->eng, req->id);
}

static double secs(uint64_t ns) { return (double)ns * 1e-9; }

static void observe_finish(srv_server_t *s, srv_req_t *req, sched_finish_t f, uint64_t now) {
  srv_metrics_t *m = &s->metrics;
  int k = f == SCHED_FINISH_STOP     ? SRV_FIN_STOP
          : f == SCHED_FINISH_LENGTH ? SRV_FIN_LENGTH
          : f == SCHED_FINISH_ABORT  ? SRV_FIN_ABORT
                                     : SRV_FIN_ERROR;
  m->finished[k]++;
  if (k == SRV_FIN_STOP || k == SRV_FIN_LENGTH) {
    srv__hist_observe(&m->e2e, secs(now - req->t_arrival));
    if (req->n_gen > 1 && req->t_last > req->t_first)
      srv__hist_observe(&m->tpot, secs(req->t_last - req->t_first) / (req->n_gen - 1));
  }
}

static void finish(srv_req_t *req, const sched_event_t *ev, uint64_t now) {
  srv_server_t *s = req->srv;
  req->in_engine = false;
  s->n_active--;
  observe_finish(s, req, ev->finish, now);
  srv_usage_t u = {
      .prompt_tokens = ev->prompt_tokens > 0 ? ev->prompt_tokens : req->n_prompt,
      .completion_tokens = ev->completion_tokens > 0 ? ev->completion_tokens : req->n_gen,
      .kv_tokens_kept = ev->kv_tokens_kept,
      .kv_tokens_evicted = ev->kv_tokens_evicted,
  };
  const char *reason = srv__finish_name(ev->finish);
  req->finish = reason ? reason : ev->finish == SCHED_FINISH_ERROR ? "error" : "abort";
  srv_resp_info_t ri = info_of(req);
  if (!reason) { /* aborted (engine stopping) or failed */
    srv_error_t e;
    if (ev->finish == SCHED_FINISH_ERROR)
      srv__error(&e, 500, NULL, "%s", ev->message[0] ? ev->message : "the engine failed");
    else srv__error(&e, 503, NULL, "the request was aborted: the server is shutting down");
    if (req->headers_sent) {
      buf_clear(&s->scratch);
      srv__error_json(&s->scratch, &e);
      write_event(req);
      end_stream(req);
    } else {
      srv__respond_error(req, &e);
    }
    return;
  }
  if (req->gp.stream) {
    write_chunk(req, NULL, "", 0, reason, NULL);
    if (req->gp.include_usage) {
      buf_clear(&s->scratch);
      srv__fmt_usage_chunk(&s->scratch, &ri, &u);
      write_event(req);
    }
    end_stream(req);
    return;
  }
  srv_buf_t *b = &s->scratch;
  buf_clear(b);
  srv__fmt_response(b, &ri, req->text.p, req->text.len, reason, req->gp.logprobs ? &req->lp : NULL,
                    &u);
  if (b->oom || req->text.oom || req->lp.content.oom || req->lp.top.oom) {
    srv_error_t e;
    srv__error(&e, 500, NULL, "out of memory while building the response");
    srv__respond_error(req, &e);
    return;
  }
  srv__respond(req, 200, "application/json", b->p, b->len, NULL);
}

void srv__on_event(srv_server_t *s, sched_event_t *ev) {
  srv_req_t *req = ev->user;
  if (!req) return;
  if (!req->conn) { /* orphan: wait for its last event */
    if (ev->finish != SCHED_FINISH_NONE) {
      s->metrics.finished[SRV_FIN_ABORT]++;
      live_unlink(s, req);
      s->n_active--;
      srv__req_free(req);
      srv__drain_check(s);
    }
    return;
  }
  uint64_t now = srv__now_ns();
  if (!req->t_first && (ev->n_tokens > 0 || ev->finish != SCHED_FINISH_NONE)) {
    req->t_first = now;
    srv__hist_observe(&s->metrics.queue, ev->queue_seconds);
    if (ev->n_tokens > 0) srv__hist_observe(&s->metrics.ttft, secs(now - req->t_arrival));
  }
  if (ev->n_tokens > 0) {
    req->n_gen += ev->n_tokens;
    req->t_last = now;
  }
  const char *text = ev->text ? ev->text : "";
  size_t len = ev->text ? ev->text_len : 0;
  bool lp = req->gp.logprobs && ev->n_tokens == 1;
  if (req->gp.stream) {
    if (len || lp) {
      if (lp) {
        srv__logprobs_reset(&req->lp);
        srv__logprobs_add(&req->lp, req->gp.api, s->api.tok, ev, req->text_total);
      }
      write_chunk(req, NULL, text, len, NULL, lp ? &req->lp : NULL);
    }
  } else {
    if (lp) srv__logprobs_add(&req->lp, req->gp.api, s->api.tok, ev, req->text_total);
    srv__buf_add(&req->text, text, len);
  }
  req->text_total += len;
  if (ev->finish == SCHED_FINISH_NONE) return;
  finish(req, ev, now); /* req may be gone after this */
  srv__drain_check(s);
}
