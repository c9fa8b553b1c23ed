/* config/log.c and config/notify.c: the log line format, levels, escaping,
 * truncation, reopening after rotation; systemd notifications read from a
 * socket bound here, the watchdog period from the environment. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "config/log.h"
#include "config/notify.h"
#include "test.h"

static char g_dir[] = "/tmp/pressd-test-log-XXXXXX";

static char *path_in(const char *name) {
  static char p[256];
  snprintf(p, sizeof p, "%s/%s", g_dir, name);
  return p;
}

static char *slurp(const char *name) {
  char *s = test_read_file(path_in(name), NULL);
  CHECK(s != NULL);
  return s;
}

static void test_levels(void) {
  log_level_t l;
  CHECK_INT_EQ(log_level_parse("error", &l), 0);
  CHECK_INT_EQ(l, LOG_ERROR);
  CHECK_INT_EQ(log_level_parse("debug", &l), 0);
  CHECK_INT_EQ(l, LOG_DEBUG);
  CHECK_INT_EQ(log_level_parse("verbose", &l), -1);
  CHECK_INT_EQ(log_level_parse(NULL, &l), -1);
  log_set_level(LOG_WARN);
  CHECK(log_enabled(LOG_ERROR) && log_enabled(LOG_WARN));
  CHECK(!log_enabled(LOG_INFO) && !log_enabled(LOG_DEBUG));
}

static void test_file_lines(void) {
  CHECK_INT_EQ(log_open(path_in("a.log")), 0);
  log_set_level(LOG_INFO);
  log_info("hello %d", 42);
  log_debug("not written");
  log_warn("two\nlines\x01 and\ta tab");
  char big[8000];
  memset(big, 'x', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  log_error("%s", big);
  char *s = slurp("a.log");
  char *l1 = s, *l2 = strchr(l1, '\n') + 1, *l3 = strchr(l2, '\n') + 1;
  /* 2026-11-27T18:04:05.123Z info: hello 42 */
  CHECK(strlen(l1) > 25 && l1[4] == '-' && l1[10] == 'T' && l1[19] == '.' && l1[23] == 'Z');
  CHECK(!strncmp(l1 + 24, " info: hello 42\n", 16));
  CHECK(strstr(s, "not written") == NULL);
  CHECK(!strncmp(l2 + 24, " warn: two\\nlines\\x01 and\ta tab\n", 32));
  CHECK(!strncmp(l3 + 24, " error: xxx", 11));
  char *end = strchr(l3, '\n');
  CHECK(end && end[1] == '\0');                 /* one line, the last */
  CHECK(end - l3 <= 4096 + 64 && !strncmp(end - 3, "...", 3)); /* cut, and says so */
  free(s);
}

static void test_reopen(void) {
  log_info("before");
  char from[256];
  snprintf(from, sizeof from, "%s", path_in("a.log"));
  CHECK_INT_EQ(rename(from, path_in("a.log.1")), 0);
  log_info("still the old file");
  log_reopen();
  log_info("after");
  char *old = slurp("a.log.1"), *cur = slurp("a.log");
  CHECK(strstr(old, "before") && strstr(old, "still the old file") && !strstr(old, "after"));
  CHECK(strstr(cur, "after") && !strstr(cur, "before"));
  free(old);
  free(cur);
  CHECK_INT_EQ(log_open("/nonexistent-dir/x.log"), -ENOENT);
  log_info("the old file still");
  cur = slurp("a.log");
  CHECK(strstr(cur, "the old file still"));
  free(cur);
}

static void test_notify(void) {
  CHECK_INT_EQ(unsetenv("NOTIFY_SOCKET"), 0);
  int fd = socket(AF_UNIX, SOCK_DGRAM, 0);
  CHECK(fd >= 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  const char *np = path_in("notify");
  CHECK(strlen(np) < sizeof sa.sun_path);
  memcpy(sa.sun_path, np, strlen(np) + 1);
  CHECK_INT_EQ(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
  CHECK_INT_EQ(setenv("NOTIFY_SOCKET", sa.sun_path, 1), 0);
  CHECK_INT_EQ(notify_send("READY=1\nSTATUS=serving"), 0);
  CHECK_INT_EQ(notify_status("loading %s", "m.gguf"), 0);
  char buf[256];
  ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
  CHECK(n > 0);
  buf[n] = '\0';
  CHECK_STR_EQ(buf, "READY=1\nSTATUS=serving");
  n = recv(fd, buf, sizeof buf - 1, 0);
  CHECK(n > 0);
  buf[n] = '\0';
  CHECK_STR_EQ(buf, "STATUS=loading m.gguf");
  close(fd);
  unlink(sa.sun_path);
  /* the socket is gone: an error, not a crash */
  CHECK(notify_send("WATCHDOG=1") < 0);

  CHECK_INT_EQ(unsetenv("WATCHDOG_USEC"), 0);
  CHECK_INT_EQ((long long)notify_watchdog_usec(), 0);
  setenv("WATCHDOG_USEC", "30000000", 1);
  unsetenv("WATCHDOG_PID");
  CHECK_INT_EQ((long long)notify_watchdog_usec(), 30000000);
  char pid[32];
  snprintf(pid, sizeof pid, "%d", (int)getpid());
  setenv("WATCHDOG_PID", pid, 1);
  CHECK_INT_EQ((long long)notify_watchdog_usec(), 30000000);
  setenv("WATCHDOG_PID", "1", 1); /* meant for another process */
  CHECK_INT_EQ((long long)notify_watchdog_usec(), 0);
  unsetenv("WATCHDOG_PID");
  setenv("WATCHDOG_USEC", "12x", 1);
  CHECK_INT_EQ((long long)notify_watchdog_usec(), 0);
}

int main(void) {
  CHECK(mkdtemp(g_dir) != NULL);
  RUN(test_levels);
  RUN(test_file_lines);
  RUN(test_reopen);
  RUN(test_notify);
  unlink(path_in("a.log"));
  unlink(path_in("a.log.1"));
  rmdir(g_dir);
  fprintf(stderr, "log: all passed\n");
  return 0;
}
