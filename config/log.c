#include "config/log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Longest line written; longer messages are cut and end in "...". */
#define LOG_LINE_MAX 4096

static int g_level = LOG_INFO;
static int g_fd = STDERR_FILENO; /* a file's own descriptor once log_open ran */
static char g_path[4096];        /* "" while logging to stderr */
static int g_journal = -1;       /* stderr is the journal: -1 not checked yet */

static const char *const names[] = {"error", "warn", "info", "debug"};
static const char prio[] = {'3', '4', '6', '7'}; /* syslog: err, warning, info, debug */

int log_level_parse(const char *s, log_level_t *out) {
  for (int i = 0; s && i < 4; i++)
    if (!strcmp(s, names[i])) {
      *out = (log_level_t)i;
      return 0;
    }
  return -1;
}

void log_set_level(log_level_t level) { __atomic_store_n(&g_level, (int)level, __ATOMIC_RELAXED); }

bool log_enabled(log_level_t level) {
  return (int)level <= __atomic_load_n(&g_level, __ATOMIC_RELAXED);
}

/* $JOURNAL_STREAM ("device:inode") names the journal socket systemd
 * connected to stderr; a redirected stderr no longer matches it. */
static bool stderr_is_journal(void) {
  int j = __atomic_load_n(&g_journal, __ATOMIC_RELAXED);
  if (j >= 0) return j;
  const char *e = getenv("JOURNAL_STREAM");
  unsigned long long dev, ino;
  struct stat st;
  j = e && sscanf(e, "%llu:%llu", &dev, &ino) == 2 && fstat(STDERR_FILENO, &st) == 0 &&
      (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
  __atomic_store_n(&g_journal, j, __ATOMIC_RELAXED);
  return j;
}

static int open_path(const char *path) {
  return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
}

int log_open(const char *path) {
  if (!path) return 0;
  if (strlen(path) >= sizeof g_path) return -ENAMETOOLONG;
  int fd = open_path(path);
  if (fd < 0) return -errno;
  memcpy(g_path, path, strlen(path) + 1);
  g_fd = fd;
  return 0;
}

void log_reopen(void) {
  if (!g_path[0]) return;
  int saved = errno, fd = open_path(g_path);
  if (fd >= 0) {
    dup2(fd, g_fd); /* atomic: a concurrent write goes to the old file or the new */
    close(fd);
  }
  errno = saved;
}

static void write_all(const char *p, size_t n) {
  while (n) {
    ssize_t k = write(g_fd, p, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return;
    p += k;
    n -= (size_t)k;
  }
}

void log_msg(log_level_t level, const char *fmt, ...) {
  if (!log_enabled(level)) return;
  int saved = errno;
  char msg[LOG_LINE_MAX], line[LOG_LINE_MAX + 64];
  va_list ap;
  va_start(ap, fmt);
  int m = vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  size_t n = 0;
  if (!g_path[0] && stderr_is_journal()) {
    n = (size_t)snprintf(line, sizeof line, "<%c>", prio[level]);
  } else {
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = strftime(line, sizeof line, "%Y-%m-%dT%H:%M:%S", &tm);
    n += (size_t)snprintf(line + n, sizeof line - n, ".%03ldZ %s: ", ts.tv_nsec / 1000000,
                          names[level]);
  }
  /* the message, one line: control characters escaped */
  const size_t room = sizeof line - 5; /* "...\n" and the NUL */
  bool cut = m < 0 || (size_t)m >= sizeof msg;
  for (const unsigned char *p = (const unsigned char *)msg; *p; p++) {
    if (n + 4 > room) {
      cut = true;
      break;
    }
    if (*p == '\n') n += (size_t)snprintf(line + n, 3, "\\n");
    else if (*p < 0x20 && *p != '\t') n += (size_t)snprintf(line + n, 5, "\\x%02x", *p);
    else line[n++] = (char)*p;
  }
  if (cut) {
    memcpy(line + n, "...", 3);
    n += 3;
  }
  line[n++] = '\n';
  write_all(line, n);
  errno = saved;
}
