/* fuzz-http: raw bytes from a client into the real server (srv_server_t with
 * its llhttp callbacks, pipelining queue, routing, auth, handlers, request
 * validation and response writing) in front of a fake engine.
 *
 * The server is built once with srv__server_new_ops. Its TCP listener stays
 * idle: a Unix socket listener (abstract address) added to the server's loop
 * hands connections to the same accept callback, srv__on_connection, so the
 * bytes go through the production read path with no socket of the network.
 * The harness runs the loop itself (UV_RUN_NOWAIT) between its own
 * non-blocking socket calls, so one thread plays client, server and engine.
 *
 * Every input is sent twice, each time on a new connection, in two writes
 * split in the middle (fields cut across reads):
 *  - "wait": the client reads every response until the server is idle (no
 *    request in the engine, nothing more to read), then closes;
 *  - "gone": the client closes right after its last byte, while generations
 *    may still run (they are aborted and orphaned, then freed).
 * Either way the server must end with no connection, no request in the
 * engine or orphaned, and no libuv handle beyond its own; everything an
 * input allocated is freed, so LeakSanitizer reports what is not.
 *
 * The fake engine answers each generation with up to MAX_GEN tokens (the
 * pieces of its prompt ids), one event per loop iteration. A request's
 * "seed" picks the engine's behaviour, so inputs reach every outcome: the
 * waiting queue full (429), an engine refusal (400, 503), a failure or an
 * abort after the first token. */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "config/log.h"
#include "server/internal.h"
#include "tests/fuzz/common.h"

#define MAX_JOBS 6 /* requests the fake engine holds; more get -EAGAIN (429) */
#define MAX_GEN 4  /* tokens per generation at most */
#define MAX_ROUNDS 20000

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static fuzz_model_t g_model;
static srv_server_t *g_srv;
static uv_pipe_t g_listener;
static struct sockaddr_un g_addr;
static socklen_t g_addr_len;
static int g_base_handles;
static bool g_echo; /* $FUZZ_HTTP_ECHO: copy the responses to stderr (to look at a seed) */
static srv_buf_t g_resp; /* what the client of a "wait" exchange received */

/* ---- the fake engine ---------------------------------------------------------- */

typedef enum {
  B_NORMAL, B_BUSY, B_REFUSE, B_BROKEN, B_FAIL, B_ABORT, B_COUNT
} behaviour_t;

typedef struct job {
  sched_request_t *r;
  int32_t emitted;
  bool aborted;
  struct job *next;
} job_t;

static job_t *g_jobs;
static int g_n_jobs;

static behaviour_t behaviour(const sched_request_t *r) {
  return r->sample.has_seed ? (behaviour_t)(r->sample.seed % B_COUNT) : B_NORMAL;
}

static int fake_submit(void *eng, sched_request_t *r) {
  switch (behaviour(r)) {
  case B_BUSY: return -EAGAIN;
  case B_REFUSE: return -EINVAL;
  case B_BROKEN: return -EIO;
  default: break;
  }
  if (g_n_jobs >= MAX_JOBS) return -EAGAIN;
  job_t *j = calloc(1, sizeof *j);
  if (!j) return -ENOMEM;
  j->r = r;
  job_t **pp = &g_jobs;
  while (*pp) pp = &(*pp)->next;
  *pp = j; /* in submission order */
  g_n_jobs++;
  uv_async_send(&g_srv->wake);
  return 0;
}

static void fake_abort(void *eng, uint64_t id) {
  for (job_t *j = g_jobs; j; j = j->next)
    if (j->r->id == id) j->aborted = true;
  uv_async_send(&g_srv->wake);
}

/* The next event of a job: a token (a piece of its prompt, any bytes), the
 * last one with its finish reason; or the end of an aborted job. */
static void emit(job_t *j, sched_event_t *ev) {
  const sched_request_t *r = j->r;
  memset(ev, 0, sizeof *ev);
  ev->id = r->id;
  ev->user = r->user;
  ev->prompt_tokens = r->n_prompt;
  if (j->aborted) {
    ev->text = strdup("");
    ev->finish = SCHED_FINISH_ABORT;
    ev->completion_tokens = j->emitted;
    return;
  }
  int32_t id = r->prompt[j->emitted % r->n_prompt];
  size_t len = 0;
  const char *piece = model_tok_piece(g_model.tok, id, false, &len);
  ev->text = malloc(len + 1);
  if (ev->text) {
    memcpy(ev->text, piece, len);
    ev->text[len] = '\0';
    ev->text_len = len;
  }
  ev->n_tokens = 1;
  ev->token = id;
  ev->logprob = -0.25f * (float)j->emitted;
  ev->n_top = r->logprobs > 0 ? r->logprobs : 0;
  for (int32_t i = 0; i < ev->n_top; i++) {
    ev->top[i].token = r->prompt[(j->emitted + i) % r->n_prompt];
    ev->top[i].logprob = -0.5f * (float)(i + 1);
  }
  ev->queue_seconds = j->emitted ? 0 : 0.001;
  j->emitted++;
  ev->completion_tokens = j->emitted;
  int32_t last = r->max_tokens < MAX_GEN ? r->max_tokens : MAX_GEN;
  behaviour_t b = behaviour(r);
  if (b == B_FAIL) {
    ev->finish = SCHED_FINISH_ERROR;
    snprintf(ev->message, sizeof ev->message, "the fake engine failed");
  } else if (b == B_ABORT) {
    ev->finish = SCHED_FINISH_ABORT;
  } else if (j->emitted >= last) {
    ev->finish = j->emitted >= r->max_tokens ? SCHED_FINISH_LENGTH : SCHED_FINISH_STOP;
    ev->kv_tokens_kept = r->kvc.plan.policy != KV_POLICY_NONE ? r->n_prompt / 2 : 0;
    ev->kv_tokens_evicted = ev->kv_tokens_kept ? r->n_prompt - ev->kv_tokens_kept : 0;
  }
}

/* One event per job per wake-up; the rest on the next loop iteration. */
static size_t fake_poll(void *eng, sched_event_t *evs, size_t max) {
  size_t n = 0;
  for (job_t **pp = &g_jobs; *pp && n < max;) {
    job_t *j = *pp;
    sched_event_t *ev = &evs[n++];
    emit(j, ev);
    if (ev->finish == SCHED_FINISH_NONE) {
      pp = &j->next;
      continue;
    }
    *pp = j->next;
    sched_request_free(j->r);
    free(j);
    g_n_jobs--;
  }
  if (g_jobs) uv_async_send(&g_srv->wake);
  return n;
}

static void fake_stats(void *eng, sched_stats_t *out) {
  memset(out, 0, sizeof *out);
  out->running = g_n_jobs;
  out->kv_blocks_total = 64;
  out->kv_blocks_used = g_n_jobs;
}

static const srv_engine_ops_t fake_ops = {fake_submit, fake_abort, fake_poll, fake_stats};

/* ---- set-up ------------------------------------------------------------------------ */

static void count_handle(uv_handle_t *h, void *arg) { ++*(int *)arg; }

static int loop_handles(void) {
  int n = 0;
  uv_walk(&g_srv->loop, count_handle, &n);
  return n;
}

static void fail(const char *what, int rc) {
  fprintf(stderr, "fuzz-http: %s: %s\n", what, rc < 0 ? uv_strerror(rc) : strerror(errno));
  exit(2);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  signal(SIGPIPE, SIG_IGN); /* as pressd serve does */
  g_echo = getenv("FUZZ_HTTP_ECHO") != NULL;
  /* every log line is formatted (URLs in it), none is kept */
  if (log_open("/dev/null")) fail("log_open /dev/null", -1);
  log_set_level(LOG_DEBUG);
  fuzz_load_model(&g_model, "fuzz-http");

  srv_config_t cfg;
  srv_config_default(&cfg);
  cfg.port = 0;
  cfg.api_key = "fuzz-key";
  cfg.max_request_bytes = 4096;
  cfg.max_header_bytes = 1024;
  cfg.max_model_len = 512;
  cfg.max_tokens_limit = 300;
  /* no deadlines: what an input does must not depend on time */
  cfg.idle_timeout_ms = cfg.header_timeout_ms = cfg.body_timeout_ms = 0;
  char err[256];
  if (srv__server_new_ops(&g_srv, &cfg, &fake_ops, NULL, g_model.tok, &g_model.chat, "fuzz-model",
                          err, sizeof err)) {
    fprintf(stderr, "fuzz-http: %s\n", err);
    exit(2);
  }

  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) fail("socket", -1);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  /* the address length of the family alone: the kernel picks a free abstract name */
  if (bind(fd, (struct sockaddr *)&a, sizeof a.sun_family)) fail("bind", -1);
  g_addr_len = sizeof g_addr;
  if (getsockname(fd, (struct sockaddr *)&g_addr, &g_addr_len)) fail("getsockname", -1);
  int rc;
  if ((rc = uv_pipe_init(&g_srv->loop, &g_listener, 0))) fail("uv_pipe_init", rc);
  if ((rc = uv_pipe_open(&g_listener, fd))) fail("uv_pipe_open", rc);
  g_listener.data = g_srv;
  if ((rc = uv_listen((uv_stream_t *)&g_listener, 64, srv__on_connection))) fail("uv_listen", rc);
  g_base_handles = loop_handles();
  return 0;
}

/* ---- one exchange ------------------------------------------------------------------ */

static void run_loop(void) { uv_run(&g_srv->loop, UV_RUN_NOWAIT); }

/* Reads what the server sent; true when anything (or the end) came. */
static bool client_read(int fd, bool *eof) {
  char buf[16384];
  bool progress = false;
  while (!*eof) {
    ssize_t k = recv(fd, buf, sizeof buf, 0);
    if (k > 0) {
      if (g_echo) fwrite(buf, 1, (size_t)k, stderr);
      srv__buf_add(&g_resp, buf, (size_t)k);
      progress = true;
      continue;
    }
    if (k == 0 || (errno != EAGAIN && errno != EINTR)) {
      *eof = true;
      progress = true;
    }
    if (k < 0 && errno == EINTR) continue;
    break;
  }
  return progress;
}

/* The bytes a client read must be whole HTTP/1.1 responses, one after the
 * other, the last one ended (by its length, its last chunk, or the close of
 * a response without a length). Skipped when a request may have been HEAD:
 * its response announces a length it does not send, and the response
 * parser cannot know. */
static void check_responses(const uint8_t *in, size_t in_len) {
  if (g_resp.oom || memmem(in, in_len, "HEAD", 4)) return;
  static llhttp_settings_t st;
  llhttp_settings_init(&st);
  llhttp_t p;
  llhttp_init(&p, HTTP_RESPONSE, &st);
  llhttp_errno_t e = llhttp_execute(&p, g_resp.p ? g_resp.p : "", g_resp.len);
  if (e == HPE_OK) e = llhttp_finish(&p);
  if (e != HPE_OK) {
    const char *at = llhttp_get_error_pos(&p);
    fprintf(stderr, "fuzz-http: the responses are not valid HTTP (%s) at byte %zd of %zu\n",
            llhttp_get_error_reason(&p), at && g_resp.p ? at - g_resp.p : (ssize_t)-1,
            g_resp.len);
    abort();
  }
}

static bool server_idle(void) { return g_srv->n_active == 0 && g_n_jobs == 0; }

static void exchange(const uint8_t *data, size_t size, bool wait) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  FUZZ_CHECK(fd >= 0);
  FUZZ_CHECK(connect(fd, (struct sockaddr *)&g_addr, g_addr_len) == 0);
  int rounds = 0;
  while (g_srv->n_conns == 0) { /* accepted before anything happens on it */
    run_loop();
    FUZZ_CHECK(++rounds < MAX_ROUNDS);
  }
  size_t off = 0, half = size / 2;
  bool eof = false;
  while (off < size && !eof) {
    size_t end = off < half ? half : size;
    ssize_t k = send(fd, data + off, end - off, MSG_NOSIGNAL);
    if (k > 0) off += (size_t)k;
    else if (errno != EAGAIN && errno != EINTR) break; /* the server closed: the rest is moot */
    run_loop();
    if (wait) client_read(fd, &eof);
    FUZZ_CHECK(++rounds < MAX_ROUNDS); /* the server stopped reading for good */
  }
  if (wait) { /* until the engine is done and two rounds bring nothing */
    for (int quiet = 0; quiet < 2;) {
      run_loop();
      bool progress = client_read(fd, &eof);
      quiet = progress || !server_idle() ? 0 : quiet + 1;
      FUZZ_CHECK(++rounds < MAX_ROUNDS); /* a response that never ends */
    }
  }
  close(fd);
  while (g_srv->n_conns || g_srv->live || !server_idle()) {
    run_loop();
    FUZZ_CHECK(++rounds < MAX_ROUNDS); /* a connection that never closes */
  }
  run_loop(); /* close callbacks */
  FUZZ_CHECK(!g_srv->conns && g_srv->n_active == 0);
  FUZZ_CHECK(loop_handles() == g_base_handles);
  if (wait) check_responses(data, size);
  srv__buf_free(&g_resp);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  exchange(data, size, true);
  exchange(data, size, false);
  return 0;
}
