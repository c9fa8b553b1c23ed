/* The server object: its loop, listener, the engine wake-up (uv_async_t the
 * engine's notify sends), stop/shutdown requests from other threads. */
#include <errno.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

#include "config/log.h"
#include "server/internal.h"

/* ---- the real engine behind the ops --------------------------------------- */

static int eng_submit(void *e, sched_request_t *r) { return sched_engine_submit(e, r); }
static void eng_abort(void *e, uint64_t id) { sched_engine_abort(e, id); }
static size_t eng_poll(void *e, sched_event_t *evs, size_t max) {
  return sched_engine_poll(e, evs, max);
}
static void eng_stats(void *e, sched_stats_t *out) { sched_engine_stats(e, out); }

static const srv_engine_ops_t engine_ops = {eng_submit, eng_abort, eng_poll, eng_stats};

/* ---- small helpers -------------------------------------------------------------- */

void srv_config_default(srv_config_t *c) {
  memset(c, 0, sizeof *c);
  c->host = "127.0.0.1";
  c->port = 8000;
  c->max_request_bytes = 4u << 20;
  c->max_header_bytes = 16u << 10;
  c->max_connections = 1024;
  c->idle_timeout_ms = 60000;
  c->header_timeout_ms = 10000;
  c->body_timeout_ms = 60000;
  c->max_model_len = 2048;
  sched_kv_compression_default(&c->kv_compression);
}

uint64_t srv__now_ns(void) { return uv_hrtime(); }

static uint64_t rng_next(uint64_t s[2]) { /* xorshift128+ */
  uint64_t x = s[0], y = s[1];
  s[0] = y;
  x ^= x << 23;
  s[1] = x ^ y ^ (x >> 17) ^ (y >> 26);
  return s[1] + y;
}

void srv__new_rid(srv_server_t *s, const char *prefix, char *out, size_t cap) {
  uint64_t a = rng_next(s->rng), b = rng_next(s->rng) ^ s->next_id;
  snprintf(out, cap, "%s%016llx%016llx", prefix, (unsigned long long)a, (unsigned long long)b);
}

static int set_err(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int set_err(char *err, size_t errlen, int rc, const char *fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return rc;
}

/* ---- engine events --------------------------------------------------------------- */

static void drain_events(srv_server_t *s) {
  for (;;) {
    size_t n = s->ops->poll(s->eng, s->evs, SRV_POLL_BATCH);
    for (size_t i = 0; i < n; i++) {
      srv__on_event(s, &s->evs[i]);
      sched_event_clear(&s->evs[i]);
    }
    if (n < SRV_POLL_BATCH) break;
  }
}

static void on_wake(uv_async_t *a) { drain_events(a->data); }

#define SRV_BEAT_MS 1000

static void on_beat(uv_timer_t *t) {
  srv_server_t *s = t->data;
  atomic_store(&s->beat_ns, (long long)srv__now_ns());
}

double srv_server_loop_age(const srv_server_t *s) {
  long long beat = s ? atomic_load(&s->beat_ns) : 0;
  return beat > 0 ? (double)((long long)srv__now_ns() - beat) * 1e-9 : 0.0; /* 0: not running yet */
}

void srv_server_notify(void *ctx) {
  srv_server_t *s = ctx ? *(srv_server_t *const *)ctx : NULL;
  if (s) uv_async_send(&s->wake);
}

/* ---- stopping ------------------------------------------------------------------- */

static void close_handle(uv_handle_t *h, bool *open) {
  if (*open) uv_close(h, NULL);
  *open = false;
}

static void stop_now(srv_server_t *s) {
  if (s->stopping) return;
  s->stopping = true;
  s->draining = true;
  close_handle((uv_handle_t *)&s->listener, &s->listener_open);
  close_handle((uv_handle_t *)&s->drain_timer, &s->drain_timer_open);
  close_handle((uv_handle_t *)&s->beat_timer, &s->beat_timer_open);
  srv__close_all(s, !atomic_load(&s->stop_requested)); /* aborts what the engine still has */
  /* wake and ctl are unreferenced: uv_run returns once the rest closed */
}

void srv__drain_check(srv_server_t *s) {
  if (s->draining && !s->stopping && s->n_active == 0) stop_now(s);
}

/* Seconds the engine gets to end the requests aborted at the drain timeout. */
#define ABORT_GRACE_MS 5000

static void on_drain_timeout(uv_timer_t *t) {
  srv_server_t *s = t->data;
  if (s->drain_aborting || s->n_active == 0) {
    stop_now(s);
    return;
  }
  s->drain_aborting = true;
  log_warn("shutdown timeout: aborting %d running request%s", s->n_active,
           s->n_active == 1 ? "" : "s");
  srv__abort_running(s); /* each ends with an error as its last event arrives */
  uv_timer_start(&s->drain_timer, on_drain_timeout, ABORT_GRACE_MS, 0);
}

static void on_ctl(uv_async_t *a) {
  srv_server_t *s = a->data;
  if (atomic_load(&s->stop_requested)) {
    stop_now(s);
    return;
  }
  if (atomic_load(&s->drain_requested) && !s->draining) {
    s->draining = true; /* new requests answer 503; the listener stays for that */
    log_info("shutting down: %d request%s running, %lld s for them to finish", s->n_active,
             s->n_active == 1 ? "" : "s", (long long)atomic_load(&s->drain_timeout_ms) / 1000);
    srv__close_idle(s);
    int64_t ms = (int64_t)atomic_load(&s->drain_timeout_ms);
    if (s->drain_timer_open)
      uv_timer_start(&s->drain_timer, on_drain_timeout, ms > 0 ? (uint64_t)ms : 0, 0);
    srv__drain_check(s);
  }
}

void srv_server_stop(srv_server_t *s) {
  if (!s) return;
  atomic_store(&s->stop_requested, 1);
  uv_async_send(&s->ctl);
}

void srv_server_shutdown(srv_server_t *s, int64_t timeout_ms) {
  if (!s) return;
  atomic_store(&s->drain_timeout_ms, (long long)timeout_ms);
  atomic_store(&s->drain_requested, 1);
  uv_async_send(&s->ctl);
}

/* ---- life cycle ----------------------------------------------------------------- */

static int listen_on(srv_server_t *s, char *err, size_t errlen) {
  char port[16];
  snprintf(port, sizeof port, "%d", s->cfg.port);
  struct addrinfo hints = {
      .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
  struct addrinfo *ai = NULL;
  int g = getaddrinfo(s->host, port, &hints, &ai);
  if (g)
    return set_err(err, errlen, -EINVAL, "cannot resolve --host %s: %s", s->host, gai_strerror(g));
  int rc = uv_tcp_init(&s->loop, &s->listener);
  if (rc) {
    freeaddrinfo(ai);
    return set_err(err, errlen, rc, "cannot create a socket: %s", uv_strerror(rc));
  }
  s->listener_open = true;
  s->listener.data = s;
  rc = uv_tcp_bind(&s->listener, ai->ai_addr, 0);
  freeaddrinfo(ai);
  if (!rc) rc = uv_listen((uv_stream_t *)&s->listener, 1024, srv__on_connection);
  if (rc)
    return set_err(err, errlen, rc, "cannot listen on %s:%d: %s", s->host, s->cfg.port,
                   uv_strerror(rc));
  struct sockaddr_storage ss;
  int len = sizeof ss;
  if (uv_tcp_getsockname(&s->listener, (struct sockaddr *)&ss, &len) == 0) {
    if (ss.ss_family == AF_INET) s->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    else if (ss.ss_family == AF_INET6) s->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
  }
  return 0;
}

int srv__server_new_ops(srv_server_t **out, const srv_config_t *cfg, const srv_engine_ops_t *ops,
                        void *eng, const model_tok_t *tok, const model_chat_t *chat,
                        const char *model_name, char *err, size_t errlen) {
  *out = NULL;
  if (!cfg || !ops || !tok)
    return set_err(err, errlen, -EINVAL,
                   "the server needs a configuration, an engine and a tokenizer");
  if (cfg->max_model_len <= 0 || cfg->max_connections <= 0 || cfg->max_request_bytes == 0 ||
      cfg->max_header_bytes < 256 || cfg->port < 0 || cfg->port > 65535)
    return set_err(err, errlen, -EINVAL,
                   "invalid server configuration (port, max-model-len, limits)");
  const char *name =
      cfg->served_model_name && *cfg->served_model_name ? cfg->served_model_name : model_name;
  if (!name || !*name) return set_err(err, errlen, -EINVAL, "no model name to serve");
  srv_server_t *s = calloc(1, sizeof *s);
  if (!s) return set_err(err, errlen, -ENOMEM, "out of memory");
  int rc;
  s->cfg = *cfg;
  s->host = strdup(cfg->host && *cfg->host ? cfg->host : "127.0.0.1");
  s->model_name = strdup(name);
  int nk = (cfg->api_key && *cfg->api_key) + (cfg->n_api_keys > 0 ? cfg->n_api_keys : 0);
  s->keys = nk ? calloc((size_t)nk, sizeof *s->keys) : NULL;
  bool oom = !s->host || !s->model_name || (nk && !s->keys);
  if (!oom && cfg->api_key && *cfg->api_key) oom = !(s->keys[s->n_keys++] = strdup(cfg->api_key));
  for (int i = 0; !oom && i < cfg->n_api_keys; i++)
    if (cfg->api_keys[i] && *cfg->api_keys[i])
      oom = !(s->keys[s->n_keys++] = strdup(cfg->api_keys[i]));
  if (oom) {
    rc = set_err(err, errlen, -ENOMEM, "out of memory");
    goto fail;
  }
  s->cfg.host = s->host;
  s->cfg.api_key = s->n_keys ? s->keys[0] : NULL;
  s->cfg.api_keys = NULL; /* the caller's: s->keys has them */
  s->cfg.n_api_keys = 0;
  s->cfg.served_model_name = s->model_name;
  s->port = cfg->port;
  s->ops = ops;
  s->eng = eng;
  s->api = (srv_api_ctx_t){tok, chat, s->model_name, cfg->max_model_len, cfg->kv_compression,
                           cfg->max_tokens_limit};
  s->started = (int64_t)time(NULL);
  if (getrandom(s->rng, sizeof s->rng, 0) != (ssize_t)sizeof s->rng) {
    s->rng[0] = uv_hrtime() | 1;
    s->rng[1] = (uint64_t)(uintptr_t)s ^ 0x9e3779b97f4a7c15ull;
  }
  srv__metrics_init(&s->metrics);
  srv__http_settings(&s->settings);

  if ((rc = uv_loop_init(&s->loop))) {
    set_err(err, errlen, rc, "cannot create the event loop: %s", uv_strerror(rc));
    goto fail;
  }
  s->loop_open = true;
  s->loop.data = s;
  if ((rc = uv_async_init(&s->loop, &s->wake, on_wake))) goto fail_uv;
  s->wake_open = true;
  s->wake.data = s;
  uv_unref((uv_handle_t *)&s->wake);
  if ((rc = uv_async_init(&s->loop, &s->ctl, on_ctl))) goto fail_uv;
  s->ctl_open = true;
  s->ctl.data = s;
  uv_unref((uv_handle_t *)&s->ctl);
  if ((rc = uv_timer_init(&s->loop, &s->drain_timer))) goto fail_uv;
  s->drain_timer_open = true;
  s->drain_timer.data = s;
  uv_unref((uv_handle_t *)&s->drain_timer);
  if ((rc = uv_timer_init(&s->loop, &s->beat_timer))) goto fail_uv;
  s->beat_timer_open = true;
  s->beat_timer.data = s;
  uv_timer_start(&s->beat_timer, on_beat, SRV_BEAT_MS, SRV_BEAT_MS);
  uv_unref((uv_handle_t *)&s->beat_timer);
  if ((rc = listen_on(s, err, errlen))) goto fail;
  *out = s;
  return 0;
fail_uv:
  set_err(err, errlen, rc, "libuv: %s", uv_strerror(rc));
fail:
  srv_server_free(s);
  return rc < 0 ? rc : -EIO;
}

int srv_server_new(srv_server_t **out, const srv_config_t *cfg, sched_engine_t *engine,
                   const model_tok_t *tok, const model_chat_t *chat, const char *model_name,
                   char *err, size_t errlen) {
  if (!engine) {
    *out = NULL;
    return set_err(err, errlen, -EINVAL, "the server needs an engine");
  }
  return srv__server_new_ops(out, cfg, &engine_ops, engine, tok, chat, model_name, err, errlen);
}

int srv_server_port(const srv_server_t *s) { return s ? s->port : -1; }

int srv_server_run(srv_server_t *s) {
  if (!s->stopping) {
    atomic_store(&s->beat_ns, (long long)srv__now_ns());
    drain_events(s); /* events posted before the loop ran */
    on_ctl(&s->ctl); /* a stop requested before the loop ran */
    uv_run(&s->loop, UV_RUN_DEFAULT);
  }
  return 0;
}

void srv_server_free(srv_server_t *s) {
  if (!s) return;
  if (s->loop_open) {
    stop_now(s);
    close_handle((uv_handle_t *)&s->wake, &s->wake_open);
    close_handle((uv_handle_t *)&s->ctl, &s->ctl_open);
    uv_run(&s->loop, UV_RUN_DEFAULT); /* close callbacks */
    if (uv_loop_close(&s->loop) == UV_EBUSY) {
      uv_run(&s->loop, UV_RUN_NOWAIT);
      uv_loop_close(&s->loop);
    }
  }
  while (s->live) { /* orphans the engine never finished (it is gone now) */
    srv_req_t *r = s->live;
    s->live = r->live_next;
    srv__req_free(r);
  }
  srv__buf_free(&s->scratch);
  srv__buf_free(&s->frame);
  free(s->host);
  for (int i = 0; i < s->n_keys; i++) free(s->keys[i]);
  free(s->keys);
  free(s->model_name);
  free(s);
}
