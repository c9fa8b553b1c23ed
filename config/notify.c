#include "config/notify.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* $NOTIFY_SOCKET's address, read on the first call so that later calls
 * (a signal handler's STOPPING=1) make only async-signal-safe calls. */
static struct sockaddr_un g_sa;
static socklen_t g_salen;
static int g_state; /* 0 not read yet, 1 no socket, 2 g_sa is set */

static bool target(void) {
  if (g_state == 0) {
    const char *path = getenv("NOTIFY_SOCKET");
    size_t len = path ? strlen(path) : 0;
    g_state = 1;
    if (len && (path[0] == '/' || path[0] == '@') && len < sizeof g_sa.sun_path) {
      g_sa.sun_family = AF_UNIX;
      memcpy(g_sa.sun_path, path, len);
      if (path[0] == '@') g_sa.sun_path[0] = '\0'; /* abstract namespace */
      g_salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
      g_state = 2;
    }
  }
  return g_state == 2;
}

int notify_send(const char *state) {
  if (!target()) return 1;
  int saved = errno;
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  ssize_t k = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&g_sa, g_salen);
  int rc = k < 0 ? -errno : 0;
  close(fd);
  errno = saved;
  return rc;
}

int notify_status(const char *fmt, ...) {
  char buf[512] = "STATUS=";
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf + 7, sizeof buf - 7, fmt, ap);
  va_end(ap);
  return notify_send(buf);
}

uint64_t notify_watchdog_usec(void) {
  const char *us = getenv("WATCHDOG_USEC"), *pid = getenv("WATCHDOG_PID");
  if (!us) return 0;
  if (pid && strtoll(pid, NULL, 10) != (long long)getpid()) return 0;
  char *end;
  unsigned long long v = strtoull(us, &end, 10);
  return end != us && !*end ? (uint64_t)v : 0;
}
