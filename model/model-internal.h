/* Cross-file internals shared by the model/ sources. */
#ifndef PRESSD_MODEL_INTERNAL_H
#define PRESSD_MODEL_INTERNAL_H

#include <stddef.h>

/* Format a one-line message into err (when err and errlen are set) and
 * return rc: `return model__errf(err, errlen, -EINVAL, "...", ...);` */
int model__errf(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
