/* systemd's service notification protocol (sd_notify(3)) without
 * libsystemd: one datagram of "KEY=VALUE" lines to the AF_UNIX socket named
 * by $NOTIFY_SOCKET ("/path" or "@abstract"). Without $NOTIFY_SOCKET (not
 * started by systemd with Type=notify) every call is a no-op. Any thread;
 * after a first call from a normal context, notify_send is also
 * async-signal-safe (the address is read once). */
#ifndef PRESSD_CONFIG_NOTIFY_H
#define PRESSD_CONFIG_NOTIFY_H

#include <stdint.h>

/* Sends state, e.g. "READY=1\nSTATUS=serving". 0 sent, 1 no socket to send
 * to, -errno on failure. */
int notify_send(const char *state);
/* "STATUS=" followed by the formatted text. */
int notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The watchdog period systemd expects WATCHDOG=1 within, in microseconds
 * ($WATCHDOG_USEC, when $WATCHDOG_PID is unset or this process): 0 none. */
uint64_t notify_watchdog_usec(void);

#endif
