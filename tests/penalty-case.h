/* Test data shared by the kernel tests of the CPU and CUDA backends. */
#ifndef PRESSD_TESTS_PENALTY_CASE_H
#define PRESSD_TESTS_PENALTY_CASE_H

#include "kernels/draw.h"
#include "tests/test.h"

/* A random penalize case: m rows of n logits; row r lists up to 300
 * distinct ids (none for every fourth row) with random histories. */
static inline void penalty_case(uint64_t *rng, int64_t m, int64_t n, k_penalty_t *rows,
                                int32_t *ids, int32_t *seen) {
  int64_t used = 0;
  for (int64_t r = 0; r < m; r++) {
    int32_t k = r % 4 == 3 ? 0 : 1 + rng_int(rng, 300);
    rows[r] = (k_penalty_t){.first = used, .n = k,
                            .rep = r % 3 ? 1.0f + 0.1f * (float)(r % 5) : 1.0f,
                            .pres = r % 2 ? 0.4f : 0.0f, .freq = (float)(r % 7) * 0.15f - 0.3f};
    for (int32_t j = 0; j < k; j++) {
      int32_t id;
      bool dup;
      do { /* distinct within the row */
        id = rng_int(rng, (int32_t)n);
        dup = false;
        for (int32_t q = 0; q < j && !dup; q++) dup = ids[used + q] == id;
      } while (dup);
      ids[used + j] = id;
      seen[used + j] = 2 * rng_int(rng, 5) + rng_int(rng, 2);
    }
    used += k;
  }
}

#endif
