/* ggml types: half and bfloat16 conversions against independent references
 * (exhaustive over the 16-bit values, rounding checked at every midpoint),
 * dequantisation of hand-built Q4_0 / Q4_1 / Q8_0 blocks against the GGUF
 * block layout, byte sizes, and the names and errors of unsupported types. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#include "model/quant.h"
#include "tests/test.h"

static uint32_t f32_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  return x;
}
static float bits_f32(uint32_t x) {
  float f;
  memcpy(&f, &x, 4);
  return f;
}


/* ---- half ---------------------------------------------------------------- */

static bool half_is_nan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff); }

/* The value of a half from the definition (exact in double). */
static double half_ref(uint16_t h) {
  int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double s = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 0) return s * ldexp(m, -24);
  if (e == 31) return m ? NAN : s * INFINITY;
  return s * ldexp(1024 + m, e - 25);
}

/* Nearest half to f, ties to even, from the definition: binary search of the
 * (monotonic) positive halves, then compare the two neighbours. */
static uint16_t f32_to_f16_ref(float f) {
  uint16_t sign = signbit(f) ? 0x8000 : 0;
  double a = fabs((double)f);
  if (isnan(f)) return 0x7e00;
  if (a >= 65520.0) return sign | 0x7c00; /* max half + half an ulp rounds to inf */
  uint16_t lo = 0, hi = 0x7bff;             /* largest half <= a */
  while (lo < hi) {
    uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
    if (half_ref(mid) <= a) lo = mid;
    else hi = (uint16_t)(mid - 1);
  }
  if (half_ref(lo) == a) return sign | lo;
  double dl = a - half_ref(lo), du = half_ref((uint16_t)(lo + 1)) - a;
  if (dl < du) return sign | lo;
  if (du < dl) return (uint16_t)(sign | (lo + 1));
  return (uint16_t)(sign | ((lo & 1) ? lo + 1 : lo));
}

static void test_f16_exhaustive(void) {
  int n_nan = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    float f = model_f16_to_f32((uint16_t)h);
    if (half_is_nan((uint16_t)h)) {
      n_nan++;
      if (!isnan(f)) FAIL_AT("half %#06x: %g is not NaN", h, (double)f);
      CHECK_INT_EQ(!!signbit(f), !!(h & 0x8000));
      uint16_t back = model_f32_to_f16(f);
      if (!half_is_nan(back)) FAIL_AT("NaN half %#06x came back as %#06x", h, back);
      CHECK_INT_EQ(back & 0x8000, h & 0x8000);
      continue;
    }
    double want = half_ref((uint16_t)h);
    if ((double)f != want) FAIL_AT("half %#06x: %.10g != %.10g", h, (double)f, want);
    CHECK_INT_EQ(!!signbit(f), !!(h & 0x8000)); /* -0 stays -0 */
    uint16_t back = model_f32_to_f16(f);
    if (back != h) FAIL_AT("half %#06x -> %.10g -> %#06x", h, (double)f, back);
  }
  CHECK_INT_EQ(n_nan, 2 * 1023);
  /* a few by hand */
  CHECK_INT_EQ(f32_bits(model_f16_to_f32(0x3c00)), f32_bits(1.0f));
  CHECK_INT_EQ(f32_bits(model_f16_to_f32(0xc000)), f32_bits(-2.0f));
  CHECK_INT_EQ(f32_bits(model_f16_to_f32(0x7bff)), f32_bits(65504.0f));
  CHECK_INT_EQ(f32_bits(model_f16_to_f32(0x0400)), f32_bits(ldexpf(1.0f, -14)));
  CHECK_INT_EQ(f32_bits(model_f16_to_f32(0x0001)), f32_bits(ldexpf(1.0f, -24)));
  CHECK_INT_EQ(f32_bits(model_f16_to_f32(0x03ff)), f32_bits(ldexpf(1023.0f, -24)));
  CHECK_INT_EQ(f32_bits(model_f16_to_f32(0x8000)), 0x80000000u);
  CHECK_INT_EQ(f32_bits(model_f16_to_f32(0x7c00)), 0x7f800000u);
  CHECK_INT_EQ(f32_bits(model_f16_to_f32(0xfc00)), 0xff800000u);
  CHECK_INT_EQ(f32_bits(model_f16_to_f32(0x3555)), f32_bits(0.333251953125f));
}

static void test_f16_rounding(void) {
  /* every midpoint between neighbouring finite halves (subnormals included):
   * exactly on it -> even, one float ulp either side -> the nearer one */
  for (uint16_t h = 0; h < 0x7bff; h++) {
    for (int s = 0; s < 2; s++) {
      uint16_t sign = s ? 0x8000 : 0;
      double a = half_ref(h), b = half_ref((uint16_t)(h + 1));
      float mid = (float)((a + b) / 2); /* exact: 12 significant bits */
      CHECK((double)mid == (a + b) / 2);
      if (s) mid = -mid;
      uint16_t even = (h & 1) ? (uint16_t)(h + 1) : h;
      uint16_t got = model_f32_to_f16(mid);
      if (got != (sign | even))
        FAIL_AT("midpoint %.10g of %#06x/%#06x -> %#06x, want %#06x", (double)mid, h, h + 1,
                got, sign | even);
      float above = nextafterf(mid, s ? -INFINITY : INFINITY);
      float below = nextafterf(mid, 0.0f);
      CHECK_INT_EQ(model_f32_to_f16(above), sign | (h + 1));
      CHECK_INT_EQ(model_f32_to_f16(below), sign | h);
    }
  }
  /* overflow to infinity and the largest finite half */
  CHECK_INT_EQ(model_f32_to_f16(65504.0f), 0x7bff);
  CHECK_INT_EQ(model_f32_to_f16(65519.996f), 0x7bff);
  CHECK_INT_EQ(model_f32_to_f16(65520.0f), 0x7c00); /* tie, 0x7bff is odd -> up to inf */
  CHECK_INT_EQ(model_f32_to_f16(1e10f), 0x7c00);
  CHECK_INT_EQ(model_f32_to_f16(-1e10f), 0xfc00);
  CHECK_INT_EQ(model_f32_to_f16(3.4e38f), 0x7c00);
  CHECK_INT_EQ(model_f32_to_f16(INFINITY), 0x7c00);
  CHECK_INT_EQ(model_f32_to_f16(-INFINITY), 0xfc00);
  uint16_t n = model_f32_to_f16(NAN);
  CHECK(half_is_nan(n));
  n = model_f32_to_f16(bits_f32(0x7f800001u)); /* signalling NaN, low payload */
  CHECK(half_is_nan(n));
  n = model_f32_to_f16(bits_f32(0xff800001u));
  CHECK(half_is_nan(n));
  CHECK_INT_EQ(n & 0x8000, 0x8000);
  /* underflow: below half the smallest subnormal -> signed zero */
  CHECK_INT_EQ(model_f32_to_f16(ldexpf(1.0f, -25)), 0x0000); /* tie -> even (0) */
  CHECK_INT_EQ(model_f32_to_f16(nextafterf(ldexpf(1.0f, -25), 1.0f)), 0x0001);
  CHECK_INT_EQ(model_f32_to_f16(ldexpf(1.0f, -26)), 0x0000);
  CHECK_INT_EQ(model_f32_to_f16(ldexpf(3.0f, -26)), 0x0001); /* 0.75 ulp -> 1 */
  CHECK_INT_EQ(model_f32_to_f16(ldexpf(3.0f, -25)), 0x0002); /* 1.5 ulp tie -> even 2 */
  CHECK_INT_EQ(model_f32_to_f16(1e-30f), 0x0000);
  CHECK_INT_EQ(model_f32_to_f16(-1e-30f), 0x8000);
  CHECK_INT_EQ(model_f32_to_f16(bits_f32(0x00000001u)), 0x0000); /* float subnormal */
  CHECK_INT_EQ(model_f32_to_f16(bits_f32(0x80400000u)), 0x8000);
  CHECK_INT_EQ(model_f32_to_f16(-0.0f), 0x8000);
  CHECK_INT_EQ(model_f32_to_f16(0.0f), 0x0000);
  /* subnormal rounding up into the smallest normal */
  CHECK_INT_EQ(model_f32_to_f16(ldexpf(1023.5f, -24)), 0x0400);
  CHECK_INT_EQ(model_f32_to_f16(ldexpf(1022.5f, -24)), 0x03fe);
  /* mantissa carry into the exponent */
  CHECK_INT_EQ(model_f32_to_f16(2047.5f), 0x6800); /* 2047.5 -> 2048 (even) */
  CHECK_INT_EQ(model_f32_to_f16(1.9990234375f), 0x3fff);   /* 2 - 2^-10, exact */
  CHECK_INT_EQ(model_f32_to_f16(1.99951171875f), 0x4000);  /* tie, 0x3fff odd -> 2 */
  CHECK_INT_EQ(model_f32_to_f16(1.999755859375f), 0x4000);
  CHECK_INT_EQ(model_f32_to_f16(1.00048828125f), 0x3c00);  /* tie, 0x3c00 even */
  CHECK_INT_EQ(model_f32_to_f16(1.00146484375f), 0x3c02);  /* tie, 0x3c01 odd */
  CHECK_INT_EQ(model_f32_to_f16(0.1f), 0x2e66);
  CHECK_INT_EQ(model_f32_to_f16(-0.333333343f), 0xb555);
}

static void test_f16_random(void) {
  uint64_t rng = 7;
  for (int i = 0; i < 2000000; i++) {
    uint32_t x = (uint32_t)rng_next(&rng);
    /* half the samples within the half range, where rounding matters */
    if (i & 1) x = (x & 0x80000000u) | (0x33000000u + (x & 0x7fffffffu) % 0x14800000u);
    float f = bits_f32(x);
    if (isnan(f)) continue;
    uint16_t got = model_f32_to_f16(f), want = f32_to_f16_ref(f);
    if (got != want) FAIL_AT("f32 %#010x (%.10g) -> %#06x, want %#06x", x, (double)f, got, want);
  }
}

/* ---- bfloat16 -------------------------------------------------------------- */

/* Nearest bfloat16 by comparing the two neighbours' values in double. */
static uint16_t f32_to_bf16_ref(float f) {
  uint32_t x = f32_bits(f);
  uint16_t lo = (uint16_t)(x >> 16); /* truncation: toward zero */
  if ((x & 0xffff) == 0) return lo;
  uint16_t hi = (uint16_t)(lo + 1); /* away from zero (may become inf) */
  double a = fabs((double)f);
  double vl = fabs((double)bits_f32((uint32_t)lo << 16));
  int e = (hi >> 7) & 0xff, m = hi & 0x7f;
  double vh = ldexp(128 + m, e - 134); /* hi's value, read as a normal even at e = 255 */
  if (e == 0) vh = ldexp(m, -133);
  double dl = a - vl, du = vh - a;
  if (dl < du) return lo;
  if (du < dl) return hi;
  return (lo & 1) ? hi : lo;
}

static void test_bf16(void) {
  for (uint32_t h = 0; h < 65536; h++) {
    float f = model_bf16_to_f32((uint16_t)h);
    CHECK_INT_EQ(f32_bits(f), h << 16);
    bool nan = ((h >> 7) & 0xff) == 0xff && (h & 0x7f);
    uint16_t back = model_f32_to_bf16(f);
    if (nan) {
      if (!(((back >> 7) & 0xff) == 0xff && (back & 0x7f)))
        FAIL_AT("NaN bf16 %#06x came back as %#06x", h, back);
      CHECK_INT_EQ(back & 0x8000, h & 0x8000);
    } else if (back != h) {
      FAIL_AT("bf16 %#06x -> %g -> %#06x", h, (double)f, back);
    }
  }
  /* ties at every pattern of the low half: on, just above, just below */
  uint64_t rng = 11;
  for (int i = 0; i < 200000; i++) {
    uint32_t top = (uint32_t)rng_next(&rng) & 0xffff0000u;
    if (((top >> 23) & 0xff) == 0xff) continue;
    uint32_t lows[] = {0x8000, 0x8001, 0x7fff, 0x0001, 0xffff, 0x0000};
    for (int k = 0; k < 6; k++) {
      float f = bits_f32(top | lows[k]);
      uint16_t got = model_f32_to_bf16(f), want = f32_to_bf16_ref(f);
      if (got != want) FAIL_AT("f32 %#010x -> bf16 %#06x, want %#06x", top | lows[k], got, want);
    }
  }
  for (int i = 0; i < 2000000; i++) {
    uint32_t x = (uint32_t)rng_next(&rng);
    float f = bits_f32(x);
    if (isnan(f)) continue;
    uint16_t got = model_f32_to_bf16(f), want = f32_to_bf16_ref(f);
    if (got != want) FAIL_AT("f32 %#010x -> bf16 %#06x, want %#06x", x, got, want);
  }
  CHECK_INT_EQ(model_f32_to_bf16(1.0f), 0x3f80);
  CHECK_INT_EQ(model_f32_to_bf16(-2.0f), 0xc000);
  CHECK_INT_EQ(model_f32_to_bf16(bits_f32(0x3f808000u)), 0x3f80); /* tie -> even */
  CHECK_INT_EQ(model_f32_to_bf16(bits_f32(0x3f818000u)), 0x3f82); /* tie -> even */
  CHECK_INT_EQ(model_f32_to_bf16(bits_f32(0x3f808001u)), 0x3f81);
  CHECK_INT_EQ(model_f32_to_bf16(bits_f32(0x7f7fffffu)), 0x7f80); /* FLT_MAX -> inf */
  CHECK_INT_EQ(model_f32_to_bf16(INFINITY), 0x7f80);
  CHECK_INT_EQ(model_f32_to_bf16(-INFINITY), 0xff80);
  CHECK_INT_EQ(model_f32_to_bf16(-0.0f), 0x8000);
  CHECK_INT_EQ(model_f32_to_bf16(bits_f32(0x00000001u)), 0x0000); /* subnormal -> 0 */
  CHECK_INT_EQ(model_f32_to_bf16(bits_f32(0x00008000u)), 0x0000); /* tie -> even 0 */
  CHECK_INT_EQ(model_f32_to_bf16(bits_f32(0x00018000u)), 0x0002);
  /* NaNs stay NaN, never round to infinity */
  static const uint32_t nans[] = {0x7f800001u, 0x7f80ffffu, 0xff800001u, 0x7fc00000u,
                                  0x7fffffffu};
  for (int k = 0; k < 5; k++) {
    uint16_t b = model_f32_to_bf16(bits_f32(nans[k]));
    if (!(((b >> 7) & 0xff) == 0xff && (b & 0x7f)))
      FAIL_AT("NaN %#010x -> bf16 %#06x is not NaN", nans[k], b);
    CHECK_INT_EQ(b & 0x8000, (nans[k] >> 16) & 0x8000);
  }
}

/* ---- blocks ------------------------------------------------------------- */

static void put16(uint8_t *p, uint16_t x) {
  p[0] = (uint8_t)x;
  p[1] = (uint8_t)(x >> 8);
}

static void test_q4_0(void) {
  /* 3 blocks of 18 bytes: fp16 d, then 16 bytes of two 4-bit quants each */
  enum { NB = 3, BB = 18 };
  uint8_t blk[NB * BB];
  static const uint16_t ds[NB] = {0x3800 /* 0.5 */, 0xc400 /* -4 */, 0x0001 /* 2^-24 */};
  for (int b = 0; b < NB; b++) {
    put16(blk + b * BB, ds[b]);
    for (int j = 0; j < 16; j++)
      blk[b * BB + 2 + j] = (uint8_t)(((j + b) & 15) | ((15 - j) << 4));
  }
  float out[NB * 32 + 1];
  out[NB * 32] = 12345.0f; /* sentinel: nothing written past n */
  CHECK_INT_EQ(model_dequant(MODEL_GGML_Q4_0, blk, out, NB * 32), 0);
  CHECK_INT_EQ(out[NB * 32], 12345.0f);
  for (int b = 0; b < NB; b++) {
    double d = half_ref(ds[b]);
    for (int j = 0; j < 16; j++) {
      int lo = (j + b) & 15, hi = 15 - j; /* the nibbles as written */
      CHECK_NEAR(out[b * 32 + j], (lo - 8) * d, 0);
      CHECK_NEAR(out[b * 32 + j + 16], (hi - 8) * d, 0);
    }
  }
  /* by hand, block 0 (d = 0.5): byte 0 = 0xf0 -> x0 = (0-8)/2, x16 = (15-8)/2 */
  CHECK_NEAR(out[0], -4.0, 0);
  CHECK_NEAR(out[16], 3.5, 0);
  CHECK_NEAR(out[8], 0.0, 0);    /* byte 8 = 0x78: lo 8 */
  CHECK_NEAR(out[24], -0.5, 0);  /* hi 7 */
  CHECK_NEAR(out[15], 3.5, 0);   /* byte 15 = 0x0f: lo 15 */
  CHECK_NEAR(out[31], -4.0, 0);  /* hi 0 */
  /* block 1 (d = -4): byte 0 = 0xf1 */
  CHECK_NEAR(out[32], 28.0, 0);  /* (1-8)*-4 */
  CHECK_NEAR(out[48], -28.0, 0); /* (15-8)*-4 */
  /* block 2 (d = 2^-24) */
  CHECK_NEAR(out[64], ldexp(-6, -24), 0);
}

static void test_q4_1(void) {
  enum { NB = 2, BB = 20 };
  uint8_t blk[NB * BB];
  static const uint16_t ds[NB] = {0x3400 /* 0.25 */, 0x4200 /* 3 */};
  static const uint16_t ms[NB] = {0xbc00 /* -1 */, 0x5640 /* 100 */};
  for (int b = 0; b < NB; b++) {
    put16(blk + b * BB, ds[b]);
    put16(blk + b * BB + 2, ms[b]);
    for (int j = 0; j < 16; j++) blk[b * BB + 4 + j] = (uint8_t)((j ^ (5 * b)) | ((j * 7 % 16) << 4));
  }
  CHECK_NEAR(half_ref(0x5640), 100.0, 0);
  float out[NB * 32];
  CHECK_INT_EQ(model_dequant(MODEL_GGML_Q4_1, blk, out, NB * 32), 0);
  for (int b = 0; b < NB; b++) {
    double d = half_ref(ds[b]), m = half_ref(ms[b]);
    for (int j = 0; j < 16; j++) {
      int lo = (j ^ (5 * b)) & 15, hi = j * 7 % 16;
      CHECK_NEAR(out[b * 32 + j], lo * d + m, 1e-6);
      CHECK_NEAR(out[b * 32 + j + 16], hi * d + m, 1e-6);
    }
  }
  /* by hand: block 0 byte 0 = 0x00 -> 0*0.25 - 1; byte 3 = 0x53 -> 3*0.25-1, 5*0.25-1 */
  CHECK_NEAR(out[0], -1.0, 0);
  CHECK_NEAR(out[3], -0.25, 0);
  CHECK_NEAR(out[19], 0.25, 0);
  /* block 1 byte 0 = 0x05 -> 5*3+100 = 115; its high nibble 0 -> 100 */
  CHECK_NEAR(out[32], 115.0, 0);
  CHECK_NEAR(out[48], 100.0, 0);
  /* all quants 15 with d = 1, m = -7.5 */
  uint8_t one[BB];
  put16(one, 0x3c00);
  put16(one + 2, 0xc780);
  memset(one + 4, 0xff, 16);
  CHECK_INT_EQ(model_dequant(MODEL_GGML_Q4_1, one, out, 32), 0);
  for (int j = 0; j < 32; j++) CHECK_NEAR(out[j], 7.5, 0);
}

static void test_q8_0(void) {
  enum { NB = 3, BB = 34 };
  uint8_t blk[NB * BB];
  static const uint16_t ds[NB] = {0x2e66 /* ~0.1 */, 0x3c00 /* 1 */, 0xb800 /* -0.5 */};
  for (int b = 0; b < NB; b++) {
    put16(blk + b * BB, ds[b]);
    for (int j = 0; j < 32; j++) blk[b * BB + 2 + j] = (uint8_t)(j * 9 - 128 + b);
  }
  blk[1 * BB + 2 + 5] = (uint8_t)(int8_t)-128;
  blk[1 * BB + 2 + 6] = 127;
  float out[NB * 32];
  CHECK_INT_EQ(model_dequant(MODEL_GGML_Q8_0, blk, out, NB * 32), 0);
  for (int b = 0; b < NB; b++) {
    double d = half_ref(ds[b]);
    for (int j = 0; j < 32; j++) {
      int8_t q = (int8_t)blk[b * BB + 2 + j];
      CHECK_NEAR(out[b * 32 + j], (float)q * (float)d, 0);
    }
  }
  CHECK_NEAR(out[32 + 5], -128.0, 0);
  CHECK_NEAR(out[32 + 6], 127.0, 0);
  CHECK_NEAR(out[32 + 0], -127.0, 0); /* j=0, b=1: -128 + 1 */
  CHECK_NEAR(out[64 + 0], 63.0, 0);   /* -126 * -0.5 */
  CHECK_NEAR(out[0], -128 * half_ref(0x2e66), 1e-6);
}

static void test_plain_types(void) {
  float src[5] = {1.5f, -0.0f, 3e38f, -7.25f, 1e-40f}, out[5];
  CHECK_INT_EQ(model_dequant(MODEL_GGML_F32, src, out, 5), 0);
  CHECK(memcmp(src, out, sizeof src) == 0);
  uint8_t h[8];
  put16(h, 0x3c00);
  put16(h + 2, 0xc000);
  put16(h + 4, 0x0001);
  put16(h + 6, 0x7bff);
  CHECK_INT_EQ(model_dequant(MODEL_GGML_F16, h, out, 4), 0);
  CHECK_NEAR(out[0], 1.0, 0);
  CHECK_NEAR(out[1], -2.0, 0);
  CHECK_NEAR(out[2], ldexp(1, -24), 0);
  CHECK_NEAR(out[3], 65504.0, 0);
  put16(h, 0x3f80);
  put16(h + 2, 0xc0a0);
  put16(h + 4, 0x0000);
  put16(h + 6, 0x4049);
  CHECK_INT_EQ(model_dequant(MODEL_GGML_BF16, h, out, 4), 0);
  CHECK_NEAR(out[0], 1.0, 0);
  CHECK_NEAR(out[1], -5.0, 0);
  CHECK_NEAR(out[2], 0.0, 0);
  CHECK_NEAR(out[3], 3.140625, 0);
  /* an odd byte address (GGUF data need not be 2-aligned for a view) */
  uint8_t odd[5] = {0xee, 0x00, 0x3c, 0x00, 0xbc};
  CHECK_INT_EQ(model_dequant(MODEL_GGML_F16, odd + 1, out, 2), 0);
  CHECK_NEAR(out[0], 1.0, 0);
  CHECK_NEAR(out[1], -1.0, 0);
  /* n = 0 is nothing to do */
  CHECK_INT_EQ(model_dequant(MODEL_GGML_Q8_0, h, out, 0), 0);
}

static void test_sizes(void) {
  static const struct {
    uint32_t type;
    size_t elems, bytes;
  } k[] = {
      {MODEL_GGML_F32, 1, 4},   {MODEL_GGML_F16, 1, 2},   {MODEL_GGML_BF16, 1, 2},
      {MODEL_GGML_Q4_0, 32, 18}, {MODEL_GGML_Q4_1, 32, 20}, {MODEL_GGML_Q8_0, 32, 34},
  };
  for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
    CHECK_INT_EQ(model_ggml_block_elems(k[i].type), k[i].elems);
    CHECK_INT_EQ(model_ggml_block_bytes(k[i].type), k[i].bytes);
    CHECK_INT_EQ(model_ggml_nbytes(k[i].type, 0), 0);
    CHECK_INT_EQ(model_ggml_nbytes(k[i].type, k[i].elems), k[i].bytes);
    CHECK_INT_EQ(model_ggml_nbytes(k[i].type, 576 * 49152), 576 * 49152 / k[i].elems * k[i].bytes);
  }
  CHECK_INT_EQ(model_ggml_nbytes(MODEL_GGML_F32, 10), 40);
  CHECK_INT_EQ(model_ggml_nbytes(MODEL_GGML_Q8_0, 64), 68);
  /* not a whole number of blocks */
  CHECK_INT_EQ(model_ggml_nbytes(MODEL_GGML_Q8_0, 33), 0);
  CHECK_INT_EQ(model_ggml_nbytes(MODEL_GGML_Q4_0, 31), 0);
  CHECK_INT_EQ(model_ggml_nbytes(MODEL_GGML_Q4_1, 1), 0);
  CHECK_INT_EQ(model_ggml_nbytes(MODEL_GGML_Q4_1, 48), 0);
  /* overflow */
  CHECK(model_ggml_nbytes(MODEL_GGML_F32, 1ull << 62) == SIZE_MAX);
  CHECK(model_ggml_nbytes(MODEL_GGML_F32, UINT64_MAX) == SIZE_MAX);
  CHECK(model_ggml_nbytes(MODEL_GGML_F16, UINT64_MAX) == SIZE_MAX);
  CHECK(model_ggml_nbytes(MODEL_GGML_Q8_0, UINT64_MAX - 31) == SIZE_MAX);
  CHECK(model_ggml_nbytes(MODEL_GGML_F32, SIZE_MAX / 4) == SIZE_MAX / 4 * 4);
  CHECK(model_ggml_nbytes(MODEL_GGML_F32, SIZE_MAX / 4 + 1) == SIZE_MAX);
  CHECK(model_ggml_nbytes(MODEL_GGML_Q8_0, (uint64_t)(SIZE_MAX / 34) * 32) ==
        SIZE_MAX / 34 * 34);
  CHECK(model_ggml_nbytes(MODEL_GGML_Q8_0, (uint64_t)(SIZE_MAX / 34 + 1) * 32) == SIZE_MAX);
  /* unsupported */
  static const uint32_t unsup[] = {MODEL_GGML_Q5_0, MODEL_GGML_Q5_1, MODEL_GGML_Q8_1,
                                   MODEL_GGML_Q2_K, MODEL_GGML_Q6_K, MODEL_GGML_Q8_K,
                                   4, 5, 16, 29, 31, 99, UINT32_MAX};
  for (size_t i = 0; i < sizeof unsup / sizeof unsup[0]; i++) {
    CHECK_INT_EQ(model_ggml_block_elems(unsup[i]), 0);
    CHECK_INT_EQ(model_ggml_block_bytes(unsup[i]), 0);
    CHECK_INT_EQ(model_ggml_nbytes(unsup[i], 256), 0);
    CHECK_INT_EQ(model_ggml_nbytes(unsup[i], 0), 0);
  }
}

static void test_unsupported(void) {
  uint8_t src[256] = {0};
  float out[256];
  for (int i = 0; i < 256; i++) out[i] = -1.0f;
  static const uint32_t unsup[] = {MODEL_GGML_Q5_0, MODEL_GGML_Q5_1, MODEL_GGML_Q8_1,
                                   MODEL_GGML_Q4_K, MODEL_GGML_Q6_K, 99, UINT32_MAX};
  for (size_t i = 0; i < sizeof unsup / sizeof unsup[0]; i++)
    CHECK_INT_EQ(model_dequant(unsup[i], src, out, 256), -EINVAL);
  /* a count that is not a whole number of blocks */
  CHECK_INT_EQ(model_dequant(MODEL_GGML_Q4_0, src, out, 31), -EINVAL);
  CHECK_INT_EQ(model_dequant(MODEL_GGML_Q4_1, src, out, 33), -EINVAL);
  CHECK_INT_EQ(model_dequant(MODEL_GGML_Q8_0, src, out, 48), -EINVAL);
  for (int i = 0; i < 256; i++) CHECK_NEAR(out[i], -1.0, 0); /* untouched */

  char buf[16];
  static const struct {
    uint32_t type;
    const char *name;
  } names[] = {
      {MODEL_GGML_F32, "F32"},   {MODEL_GGML_F16, "F16"},   {MODEL_GGML_BF16, "BF16"},
      {MODEL_GGML_Q4_0, "Q4_0"}, {MODEL_GGML_Q4_1, "Q4_1"}, {MODEL_GGML_Q5_0, "Q5_0"},
      {MODEL_GGML_Q5_1, "Q5_1"}, {MODEL_GGML_Q8_0, "Q8_0"}, {MODEL_GGML_Q8_1, "Q8_1"},
      {MODEL_GGML_Q2_K, "Q2_K"}, {MODEL_GGML_Q3_K, "Q3_K"}, {MODEL_GGML_Q4_K, "Q4_K"},
      {MODEL_GGML_Q5_K, "Q5_K"}, {MODEL_GGML_Q6_K, "Q6_K"}, {MODEL_GGML_Q8_K, "Q8_K"},
  };
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    CHECK_STR_EQ(model_ggml_type_name(names[i].type, buf), names[i].name);
  CHECK_STR_EQ(model_ggml_type_name(14, buf), "Q6_K");
  CHECK_STR_EQ(model_ggml_type_name(99, buf), "type#99");
  CHECK_STR_EQ(model_ggml_type_name(4, buf), "type#4");
  CHECK_STR_EQ(model_ggml_type_name(UINT32_MAX, buf), "type#4294967295");
}

int main(void) {
  RUN(test_f16_exhaustive);
  RUN(test_f16_rounding);
  RUN(test_f16_random);
  RUN(test_bf16);
  RUN(test_q4_0);
  RUN(test_q4_1);
  RUN(test_q8_0);
  RUN(test_plain_types);
  RUN(test_sizes);
  RUN(test_unsupported);
  return 0;
}
