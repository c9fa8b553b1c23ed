/* The HTTP front end: an OpenAI-compatible API (vLLM's routes and fields)
 * served from one libuv loop thread. The loop thread owns every connection
 * and parses, validates and tokenises requests; the engine thread owns
 * generation. They meet only in the engine's inbox (sched_engine_submit /
 * sched_engine_abort) and outbox (sched_engine_poll, drained on the loop
 * thread after the engine's notify callback woke it).
 *
 * Wiring (main.c, `pressd serve`):
 *
 *   signal(SIGPIPE, SIG_IGN);          // libuv writes to sockets peers may have closed
 *   srv_server_t *srv = NULL;
 *   sched_engine_config_t ec = {...,
 *       .notify = srv_server_notify,
 *       .notify_ctx = &srv};          // the variable srv_server_new() fills
 *   sched_engine_new(&eng, &ec, w, be, tok, err, sizeof err);
 *   srv_config_t sc;
 *   srv_config_default(&sc);
 *   sc.host = ...; sc.port = ...; sc.api_key = ...; sc.max_model_len = ...;
 *   srv_server_new(&srv, &sc, eng, tok, &chat, model_name, err, sizeof err);
 *   sched_engine_start(eng);
 *   // SIGINT: srv_server_stop(srv); SIGTERM: srv_server_shutdown(srv, ms)
 *   srv_server_run(srv);              // returns after stop / shutdown
 *   sched_engine_free(eng);           // engine first: it may still notify
 *   srv_server_free(srv);
 *
 * The engine must be freed before the server (its notify touches the
 * server's async handle); the tokenizer and chat template are borrowed and
 * must outlive the server (chat may be NULL: chat requests then get a 400).
 * sc.max_model_len must equal ec.max_model_len. Events the engine posts before the loop runs are
 * not lost: srv_server_run() polls once when it starts. */
#ifndef PRESSD_SERVER_SERVER_H
#define PRESSD_SERVER_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/chat.h"
#include "model/tokenizer.h"
#include "scheduler/engine.h"

typedef struct srv_server srv_server_t;

typedef struct srv_config {
  const char *host;              /* "127.0.0.1"; "0.0.0.0" or "::" for all (IPv4/IPv6) */
  int port;                      /* 8000; 0 picks a free port (srv_server_port) */
  const char *api_key;           /* NULL or "": no auth; else Bearer on /v1 and below */
  const char *const *api_keys;   /* more accepted keys ([n_api_keys]), e.g. from a file */
  int n_api_keys;
  bool metrics_require_key;      /* /metrics, /health, /ready behind the key too */
  int32_t max_tokens_limit;      /* ceiling on a request's max_tokens (400 past it); 0: none */
  const char *served_model_name; /* NULL: the model_name given to srv_server_new */
  size_t max_request_bytes;      /* request body bound (413 past it) */
  size_t max_header_bytes;       /* request line + headers bound (431 past it) */
  int max_connections;           /* open connections at most (503 past it) */
  int64_t idle_timeout_ms;       /* keep-alive idle (<= 0: none) */
  int64_t header_timeout_ms;     /* from a request's first byte to its last header (<= 0: none) */
  int64_t body_timeout_ms;       /* from the last header to the end of the body (<= 0: none) */
  int32_t max_model_len;         /* prompt + completion tokens at most (> 0) */
  sched_kv_compression_t kv_compression; /* default for requests (policy none: off) */
  int64_t kv_tokens;             /* tokens one sequence's KV may hold (0: max_model_len) */
} srv_config_t;

/* 127.0.0.1:8000, 4 MiB bodies, 16 KiB headers, 1024 connections,
 * 60 s idle, 10 s headers, 60 s body, max_model_len 2048. */
void srv_config_default(srv_config_t *c);

/* Binds and listens (errors such as EADDRINUSE come back here with a
 * message). Copies what it needs from cfg; borrows engine, tok and chat.
 * model_name is the name /v1/models reports unless cfg->served_model_name
 * is set. Returns 0 or a negative errno. */
int srv_server_new(srv_server_t **out, const srv_config_t *cfg, sched_engine_t *engine,
                   const model_tok_t *tok, const model_chat_t *chat, const char *model_name,
                   char *err, size_t errlen);
/* The port listened on (useful with port 0). */
int srv_server_port(const srv_server_t *s);
/* Runs the loop on the calling thread (which becomes the loop thread) until
 * srv_server_stop() or the end of srv_server_shutdown(). Returns 0. */
int srv_server_run(srv_server_t *s);
/* Thread-safe and async-signal-safe. Closes the listener and every
 * connection; requests still in the engine are aborted. */
void srv_server_stop(srv_server_t *s);
/* Thread-safe and async-signal-safe graceful stop: new requests answer 503
 * (/health too) and their connections close; requests in flight go on. When
 * none is left the server stops; after timeout_ms the rest are aborted, each
 * ending with an error (a 503 body, or a final error event on a stream),
 * and the server stops once the engine let them go (or 5 s later). */
void srv_server_shutdown(srv_server_t *s, int64_t timeout_ms);
/* Frees everything; call after srv_server_run() returned (or instead of it)
 * and after the engine was freed. NULL-safe. */
void srv_server_free(srv_server_t *s);

/* Seconds since the loop thread last showed it turns (it beats every
 * second while srv_server_run runs; 0 before it runs): a watchdog that
 * hears from the engine thread asks this too, so a hung loop is noticed.
 * Any thread. */
double srv_server_loop_age(const srv_server_t *s);

/* The engine's notify callback: ctx is the address of the srv_server_t *
 * that srv_server_new() fills (NULL until then: the call is then a no-op). */
void srv_server_notify(void *ctx);

/* A "kv_compression" object (as in a request body) over def. -EINVAL with
 * the offending field and why in err. */
struct cJSON;
int srv_parse_kv_compression(const struct cJSON *o, const sched_kv_compression_t *def,
                             int32_t max_model_len, sched_kv_compression_t *out, char *err,
                             size_t errlen);

#endif
