/* /metrics in the Prometheus text format (0.0.4), with vLLM's metric names
 * and histogram buckets: engine gauges and counters from sched_stats_t,
 * latencies the server measures itself. */
#include <stdio.h>
#include <string.h>

#include "server/internal.h"

static const double ttft_bounds[] = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                     0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                     20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
static const double tpot_bounds[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                     0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
static const double e2e_bounds[] = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                                    5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

static void hist_init(srv_hist_t *h, const double *bounds, int n) {
  memset(h, 0, sizeof *h);
  h->bounds = bounds;
  h->n_bounds = n < SRV_HIST_MAX_BUCKETS ? n : SRV_HIST_MAX_BUCKETS;
}

void srv__metrics_init(srv_metrics_t *m) {
  memset(m, 0, sizeof *m);
  hist_init(&m->ttft, ttft_bounds, N_OF(ttft_bounds));
  hist_init(&m->tpot, tpot_bounds, N_OF(tpot_bounds));
  hist_init(&m->e2e, e2e_bounds, N_OF(e2e_bounds));
  hist_init(&m->queue, e2e_bounds, N_OF(e2e_bounds));
}

void srv__hist_observe(srv_hist_t *h, double v) {
  if (!(v >= 0)) v = 0; /* NaN and clock hiccups */
  int i = 0;
  while (i < h->n_bounds && v > h->bounds[i]) i++;
  h->counts[i]++;
  h->count++;
  h->sum += v;
}

/* model_name="..." with the label value escaped. */
static void label(srv_buf_t *b, const char *model) {
  srv__buf_adds(b, "{model_name=\"");
  for (const char *p = model; *p; p++) {
    if (*p == '\\') srv__buf_adds(b, "\\\\");
    else if (*p == '"') srv__buf_adds(b, "\\\"");
    else if (*p == '\n') srv__buf_adds(b, "\\n");
    else srv__buf_add(b, p, 1);
  }
  srv__buf_adds(b, "\"}");
}

static void meta(srv_buf_t *b, const char *name, const char *type, const char *help) {
  srv__buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void sample_u(srv_buf_t *b, const char *name, const char *model, const char *extra,
                     unsigned long long v) {
  srv__buf_adds(b, name);
  label(b, model);
  if (extra) {
    b->len--; /* reopen the label set */
    srv__buf_printf(b, ",%s}", extra);
  }
  srv__buf_printf(b, " %llu\n", v);
}

static void gauge_f(srv_buf_t *b, const char *name, const char *help, const char *model, double v) {
  meta(b, name, "gauge", help);
  srv__buf_adds(b, name);
  label(b, model);
  srv__buf_printf(b, " %.9g\n", v);
}

static void gauge_u(srv_buf_t *b, const char *name, const char *help, const char *model,
                    unsigned long long v) {
  meta(b, name, "gauge", help);
  sample_u(b, name, model, NULL, v);
}

static void counter(srv_buf_t *b, const char *name, const char *help, const char *model,
                    unsigned long long v) {
  meta(b, name, "counter", help);
  sample_u(b, name, model, NULL, v);
}

static void histogram(srv_buf_t *b, const char *name, const char *help, const char *model,
                      const srv_hist_t *h) {
  meta(b, name, "histogram", help);
  unsigned long long cum = 0;
  for (int i = 0; i <= h->n_bounds; i++) {
    cum += h->counts[i];
    srv__buf_printf(b, "%s_bucket", name);
    label(b, model);
    b->len--;
    if (i < h->n_bounds) srv__buf_printf(b, ",le=\"%g\"} %llu\n", h->bounds[i], cum);
    else srv__buf_printf(b, ",le=\"+Inf\"} %llu\n", cum);
  }
  srv__buf_printf(b, "%s_sum", name);
  label(b, model);
  srv__buf_printf(b, " %.9g\n", h->sum);
  srv__buf_printf(b, "%s_count", name);
  label(b, model);
  srv__buf_printf(b, " %llu\n", (unsigned long long)h->count);
}

void srv__metrics_format(srv_buf_t *b, const srv_metrics_t *m, const sched_stats_t *st,
                         const char *model) {
  double usage = st->kv_blocks_total > 0 ? (double)st->kv_blocks_used / st->kv_blocks_total : 0.0;
  gauge_u(b, "vllm:num_requests_running", "Number of requests in model execution batches.", model,
          (unsigned long long)(st->running > 0 ? st->running : 0));
  gauge_u(b, "vllm:num_requests_waiting", "Number of requests waiting to be processed.", model,
          (unsigned long long)(st->waiting > 0 ? st->waiting : 0));
  gauge_f(b, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", model,
          usage);
  gauge_f(b, "vllm:gpu_cache_usage_perc", "KV-cache usage (older name). 1 means 100 percent.",
          model, usage);
  counter(b, "vllm:num_preemptions_total", "Cumulative number of preemptions.", model,
          (unsigned long long)st->preemptions);
  counter(b, "vllm:prompt_tokens_total", "Number of prefill tokens processed.", model,
          (unsigned long long)st->prompt_tokens);
  counter(b, "vllm:generation_tokens_total", "Number of generation tokens processed.", model,
          (unsigned long long)st->generation_tokens);

  static const char *const reasons[SRV_FIN_COUNT] = {"stop", "length", "abort", "error"};
  meta(b, "vllm:request_success_total", "counter", "Count of finished requests by reason.");
  for (int i = 0; i < SRV_FIN_COUNT; i++) {
    char extra[48];
    snprintf(extra, sizeof extra, "finished_reason=\"%s\"", reasons[i]);
    sample_u(b, "vllm:request_success_total", model, extra, (unsigned long long)m->finished[i]);
  }

  histogram(b, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            model, &m->ttft);
  histogram(b, "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.", model, &m->tpot);
  histogram(b, "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.", model, &m->e2e);
  histogram(b, "vllm:request_queue_time_seconds",
            "Histogram of time spent waiting before the first engine output, in seconds.", model,
            &m->queue);

  gauge_u(b, "pressd:kv_blocks_total", "KV blocks in the pool.", model,
          (unsigned long long)(st->kv_blocks_total > 0 ? st->kv_blocks_total : 0));
  gauge_u(b, "pressd:kv_blocks_used", "KV blocks in use.", model,
          (unsigned long long)(st->kv_blocks_used > 0 ? st->kv_blocks_used : 0));
  gauge_u(b, "pressd:kv_blocks_stranded",
          "Free KV blocks no sequence can use now: with a KV arena per tensor-parallel rank, "
          "those free in one rank's part beyond what the fullest rank's part has free.",
          model, (unsigned long long)(st->kv_blocks_stranded > 0 ? st->kv_blocks_stranded : 0));
  counter(b, "pressd:engine_steps_total", "Engine steps run.", model,
          (unsigned long long)st->steps);
  counter(b, "pressd:engine_graph_steps_total",
          "Engine steps whose layers ran as graphs (CUDA graphs).", model,
          (unsigned long long)st->graph_steps);
  meta(b, "pressd:engine_busy_seconds_total", "counter", "Time the engine spent in steps.");
  srv__buf_adds(b, "pressd:engine_busy_seconds_total");
  label(b, model);
  srv__buf_printf(b, " %.6f\n", st->busy_seconds);
  meta(b, "pressd:engine_forward_seconds_total", "counter",
       "Of the engine's step time, the time in the model's forward passes.");
  srv__buf_adds(b, "pressd:engine_forward_seconds_total");
  label(b, model);
  srv__buf_printf(b, " %.6f\n", st->forward_seconds);

  /* KV compression */
  counter(b, "pressd:kv_blocks_freed_total", "KV blocks freed by compression.", model,
          (unsigned long long)st->kv_blocks_freed);
  srv_hist_t kh = {.bounds = sched_kvc_bounds, .n_bounds = SCHED_KVC_N_BOUNDS,
                   .count = st->kv_compressions, .sum = st->kv_compress_seconds};
  _Static_assert(SCHED_KVC_N_BOUNDS <= SRV_HIST_MAX_BUCKETS, "histogram too wide");
  for (int i = 0; i <= SCHED_KVC_N_BOUNDS; i++) kh.counts[i] = st->kv_compress_hist[i];
  histogram(b, "pressd:kv_compression_seconds",
            "Histogram of the time one sequence's KV compression took (plan, moves, release).",
            model, &kh);
  counter(b, "pressd:kv_forced_compressions_total",
          "Compressions run at once because decodes would otherwise preempt.", model,
          (unsigned long long)st->kv_forced_compressions);
  counter(b, "pressd:kv_budget_overrides_total",
          "Compressions that pruned past the dynamic budget under memory pressure.", model,
          (unsigned long long)st->kv_budget_overrides);
  counter(b, "pressd:kv_compressed_requests_total", "Finished requests whose KV was compressed.",
          model, (unsigned long long)st->kv_compressed_requests);
  gauge_f(b, "pressd:kv_kept_fraction",
          "Mean fraction of their KV entries that finished compressed requests kept.", model,
          st->kv_compressed_requests ? st->kv_kept_fraction_sum / (double)st->kv_compressed_requests
                                     : 1.0);
  counter(b, "pressd:http_requests_total", "HTTP requests received.", model,
          (unsigned long long)m->http_requests);
  counter(b, "pressd:requests_rejected_total", "Requests refused because the queue was full.",
          model, (unsigned long long)m->rejected);
}
