/* The daemon's log: one line per message on stderr (or --log-file), with a
 * level. Under systemd (stderr is the journal stream named by
 * $JOURNAL_STREAM) each line starts with the syslog priority "<N>", which
 * journald turns into the entry's level, and carries no timestamp (journald
 * adds its own); elsewhere a line reads
 *   2026-11-27T18:04:05.123Z info: message
 * Messages are one line: newlines and control characters are escaped. Any
 * thread; each line is one write(2), so lines from threads do not mix. */
#ifndef PRESSD_CONFIG_LOG_H
#define PRESSD_CONFIG_LOG_H

#include <stdbool.h>

typedef enum log_level { LOG_ERROR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG } log_level_t;

/* "error" | "warn" | "info" | "debug": 0, or -1 for anything else. */
int log_level_parse(const char *s, log_level_t *out);
void log_set_level(log_level_t level);
bool log_enabled(log_level_t level);

/* Log to path (appended, created 0640) instead of stderr; NULL: stderr.
 * 0, or -errno with nothing changed. */
int log_open(const char *path);
/* Reopen the log file (after logrotate moved it); a no-op on stderr.
 * Async-signal-safe: a SIGHUP handler may call it. */
void log_reopen(void);

void log_msg(log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)

#endif
