/* Where a backend's time goes, op by op: a wrapper around a backend's ops
 * that times every call and sums the times per kind of call (the op, and
 * for matmul the weight's shape and type and a bucket of rows, for
 * attention and kv_write whether the step only decodes).
 *
 * Each op is timed from an idle device (the backend's sync before it) to
 * its completion (sync after it), so the host and the device no longer
 * overlap: a profiled run is slower in all, but each op's time is its own.
 * The time between ops (the engine's scheduling, sampling, the HTTP loop's
 * share of the machine) is reported beside them.
 *
 * `PRESSD_PROFILE_OPS=FILE`: k_backend_new wraps the backend it makes, and
 * k_backend_free appends the table to FILE. */
#ifndef PRESSD_KERNELS_PROFILE_H
#define PRESSD_KERNELS_PROFILE_H

#include <stdio.h>

#include "kernels/backend.h"

/* Wrap be's ops. -EBUSY when be is already wrapped; -ENOMEM. When be is
 * freed (k_backend_free) the table goes to the file named by
 * PRESSD_PROFILE_OPS, if any, and the wrapper is dropped. */
int k_profile_wrap(k_backend_t *be);
/* Write be's table so far to f, the most expensive kind first. -ENOENT
 * when be is not wrapped. */
int k_profile_report(k_backend_t *be, FILE *f);

#endif
