/* Chat templates: every template in tests/fixtures/chat-templates.json is
 * detected from its string and every conversation renders byte-identically
 * to jinja2 (scripts/reference/chat_fixtures.py); then named templates and
 * bad input. */
#include <cjson/cJSON.h>
#include <errno.h>

#include "model/chat.h"
#include "tests/test.h"

#define MAX_MSGS 32

static cJSON *g_doc;

static const char *jstr(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

static const cJSON *find_template(const char *name) {
  const cJSON *t;
  cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(g_doc, "templates")) {
    if (strcmp(jstr(t, "name"), name) == 0) return t;
  }
  FAIL_AT("no template %s in the fixture", name);
}

static size_t load_msgs(const cJSON *arr, model_chat_msg_t *msgs) {
  size_t n = 0;
  const cJSON *m;
  cJSON_ArrayForEach(m, arr) {
    CHECK(n < MAX_MSGS);
    msgs[n].role = jstr(m, "role");
    msgs[n].content = jstr(m, "content");
    n++;
  }
  return n;
}

/* Renders every fixture case of template `tname` with c; returns the count. */
static int check_cases(const model_chat_t *c, const char *tname) {
  int count = 0;
  const cJSON *cs;
  cJSON_ArrayForEach(cs, cJSON_GetObjectItemCaseSensitive(g_doc, "cases")) {
    if (strcmp(jstr(cs, "template"), tname) != 0) continue;
    model_chat_msg_t msgs[MAX_MSGS];
    size_t n = load_msgs(cJSON_GetObjectItemCaseSensitive(cs, "messages"), msgs);
    bool agp = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cs, "add_generation_prompt"));
    const char *expected = jstr(cs, "expected");
    char err[256] = "", *out = NULL;
    int rc = model_chat_render(c, msgs, n, agp, &out, err, sizeof err);
    if (expected) {
      if (rc != 0)
        FAIL_AT("%s/%s agp=%d: rc %d (%s)", tname, jstr(cs, "conversation"), agp, rc, err);
      if (strcmp(out, expected) != 0)
        FAIL_AT("%s/%s agp=%d:\n  got      \"%s\"\n  expected \"%s\"", tname,
                jstr(cs, "conversation"), agp, out, expected);
    } else {
      /* jinja2 raised (raise_exception): pressd refuses the same input. */
      if (rc != -EINVAL)
        FAIL_AT("%s/%s agp=%d: rc %d, expected -EINVAL like jinja's \"%s\"", tname,
                jstr(cs, "conversation"), agp, rc, jstr(cs, "error"));
      CHECK(out == NULL);
      CHECK(strlen(err) > 0 && !strchr(err, '\n'));
    }
    free(out);
    count++;
  }
  return count;
}

static void test_fixtures_detect_and_render(void) {
  int total = 0, n_templates = 0;
  const cJSON *t;
  cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(g_doc, "templates")) {
    const char *name = jstr(t, "name");
    model_chat_t c;
    char err[256] = "";
    int rc = model_chat_init_detect(&c, jstr(t, "template"), jstr(t, "bos"), jstr(t, "eos"), err,
                                    sizeof err);
    if (rc) FAIL_AT("%s: detect rc %d (%s)", name, rc, err);
    CHECK_STR_EQ(model_chat_kind_name(c.kind), jstr(t, "kind"));
    const char *ds = jstr(t, "default_system");
    if (ds)
      CHECK_STR_EQ(c.default_system, ds);
    else if (c.default_system)
      FAIL_AT("%s: unexpected default system \"%s\"", name, c.default_system);
    int n = check_cases(&c, name);
    CHECK(n >= 30);
    fprintf(stderr, "   %-8s %-8s %d cases\n", name, model_chat_kind_name(c.kind), n);
    total += n;
    n_templates++;
    model_chat_destroy(&c);
  }
  CHECK(n_templates >= 6);
  CHECK(total >= 200);
}

static void test_fixture_bos_eos_fields(void) {
  static const struct {
    const char *name, *bos, *eos;
  } want[] = {
      {"smollm2", NULL, NULL},          {"chatml", NULL, NULL}, {"qwen2.5", NULL, NULL},
      {"llama3", "<|begin_of_text|>", NULL}, {"llama2", "<s>", "</s>"}, {"mistral", "<s>", "</s>"},
  };
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
    const cJSON *t = find_template(want[i].name);
    model_chat_t c;
    CHECK_INT_EQ(model_chat_init_detect(&c, jstr(t, "template"), jstr(t, "bos"), jstr(t, "eos"),
                                        NULL, 0),
                 0);
    if (want[i].bos) CHECK_STR_EQ(c.bos, want[i].bos);
    else CHECK(c.bos == NULL);
    if (want[i].eos) CHECK_STR_EQ(c.eos, want[i].eos);
    else CHECK(c.eos == NULL);
    model_chat_destroy(&c);
  }
}

static void test_unsupported_templates(void) {
  int n = 0;
  const cJSON *t;
  cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(g_doc, "unsupported")) {
    model_chat_t c;
    char err[256] = "";
    int rc = model_chat_init_detect(&c, jstr(t, "template"), "<s>", "</s>", err, sizeof err);
    if (rc != -ENOTSUP) FAIL_AT("%s: rc %d, expected -ENOTSUP", jstr(t, "name"), rc);
    CHECK(strlen(err) > 10);
    CHECK(!strchr(err, '\n'));
    CHECK(strstr(err, "--chat-template"));
    CHECK_INT_EQ(c.kind, MODEL_CHAT_UNKNOWN);
    model_chat_destroy(&c); /* safe after a failed init */
    n++;
  }
  CHECK(n >= 5);
  model_chat_t c;
  char err[256] = "";
  CHECK_INT_EQ(model_chat_init_detect(&c, NULL, NULL, NULL, err, sizeof err), -ENOTSUP);
  CHECK(strstr(err, "no chat template"));
  model_chat_destroy(&c);
}

/* A named template renders what the reference template of its family
 * renders: the fixture's chatml, llama3, llama2 and mistral cases. */
static void test_named_templates(void) {
  static const char *names[] = {"chatml", "llama3", "llama2", "mistral"};
  for (size_t i = 0; i < 4; i++) {
    const cJSON *t = find_template(names[i]);
    model_chat_t c;
    char err[256] = "";
    CHECK_INT_EQ(model_chat_init_named(&c, names[i], jstr(t, "bos"), jstr(t, "eos"), err,
                                       sizeof err),
                 0);
    CHECK_STR_EQ(model_chat_kind_name(c.kind), names[i]);
    CHECK(c.default_system == NULL);
    CHECK(check_cases(&c, names[i]) >= 30);
    model_chat_destroy(&c);
  }
  model_chat_t c;
  char err[256] = "";
  CHECK_INT_EQ(model_chat_init_named(&c, "vicuna", "<s>", "</s>", err, sizeof err), -EINVAL);
  CHECK(strstr(err, "vicuna") && strstr(err, "chatml"));
  CHECK_INT_EQ(model_chat_init_named(&c, "ChatML", NULL, NULL, err, sizeof err), -EINVAL);
  CHECK_INT_EQ(model_chat_init_named(&c, NULL, NULL, NULL, err, sizeof err), -EINVAL);
  CHECK_INT_EQ(model_chat_init_named(&c, "", NULL, NULL, err, sizeof err), -EINVAL);
  model_chat_destroy(&c);
  model_chat_destroy(&c);
  model_chat_destroy(NULL);
  CHECK_STR_EQ(model_chat_kind_name(MODEL_CHAT_UNKNOWN), "unknown");
}

static void expect_render_error(const model_chat_t *c, const model_chat_msg_t *msgs, size_t n,
                                const char *needle) {
  char err[256] = "", *out = (char *)"sentinel";
  int rc = model_chat_render(c, msgs, n, true, &out, err, sizeof err);
  if (rc != -EINVAL) FAIL_AT("rc %d, expected -EINVAL (%s)", rc, needle);
  CHECK(out == NULL);
  if (!strstr(err, needle)) FAIL_AT("message \"%s\" lacks \"%s\"", err, needle);
  CHECK(!strchr(err, '\n'));
}

static void test_bad_input(void) {
  static const char *names[] = {"chatml", "llama3", "llama2", "mistral"};
  for (size_t i = 0; i < 4; i++) {
    model_chat_t c;
    CHECK_INT_EQ(model_chat_init_named(&c, names[i], "<s>", "</s>", NULL, 0), 0);
    model_chat_msg_t tool[] = {{"user", "hi"}, {"tool", "{}"}};
    expect_render_error(&c, tool, 2, "unknown role \"tool\"");
    model_chat_msg_t upper[] = {{"User", "hi"}};
    expect_render_error(&c, upper, 1, "unknown role \"User\"");
    model_chat_msg_t null_role[] = {{NULL, "hi"}};
    expect_render_error(&c, null_role, 1, "unknown role");
    expect_render_error(&c, upper, 0, "no messages");
    model_chat_destroy(&c);
  }
  /* Llama-2 and Mistral cannot place a system message that is not first, nor
   * a system message with no user turn: jinja drops the text silently, pressd
   * refuses. */
  for (size_t i = 2; i < 4; i++) {
    model_chat_t c;
    CHECK_INT_EQ(model_chat_init_named(&c, names[i], "<s>", "</s>", NULL, 0), 0);
    model_chat_msg_t only_sys[] = {{"system", "S"}};
    expect_render_error(&c, only_sys, 1, "needs a user message");
    model_chat_msg_t mid_sys[] = {{"user", "a"}, {"system", "S"}, {"user", "b"}};
    expect_render_error(&c, mid_sys, 3, "message 1 is \"system\"");
    model_chat_msg_t late_sys[] = {{"user", "a"}, {"assistant", "b"}, {"system", "S"}};
    expect_render_error(&c, late_sys, 3, "message 2 is \"system\"");
    model_chat_msg_t two_sys[] = {{"system", "S"}, {"system", "T"}, {"user", "u"}};
    expect_render_error(&c, two_sys, 3, "message 1 is \"system\"");
    model_chat_destroy(&c);
  }
}

static void render_ok(const model_chat_t *c, const model_chat_msg_t *msgs, size_t n, bool agp,
                      const char *want) {
  char err[256] = "", *out = NULL;
  int rc = model_chat_render(c, msgs, n, agp, &out, err, sizeof err);
  if (rc) FAIL_AT("render rc %d (%s)", rc, err);
  CHECK_STR_EQ(out, want);
  free(out);
}

/* Default system prompts written in other shapes than SmolLM2's. */
static void test_default_system_shapes(void) {
  static const struct {
    const char *tmpl, *want;
  } cases[] = {
      /* double quotes, escapes decoded as Jinja does */
      {"{% if messages[0]['role'] != 'system' %}{{ \"<|im_start|>system\\nCaf\\u00e9 \\\"bot\\\""
       "\\x21<|im_end|>\\n\" }}{% endif %}{% for m in messages %}{{'<|im_start|>' + m['role'] + "
       "'\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}",
       "Caf\xc3\xa9 \"bot\"!"},
      /* raw template text, not a literal */
      {"{% if messages[0]['role'] != 'system' %}<|im_start|>system\nPlain text default<|im_end|>\n"
       "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
       "<|im_end|>\n{% endfor %}",
       "Plain text default"},
      /* a comment holding the marker is not a default; the literal after it is */
      {"{# <|im_start|>system\nnot this<|im_end|> #}"
       "{{ '<|im_start|>system\\nthis one<|im_end|>' }}",
       "this one"},
      /* an empty system turn is no default */
      {"{{ '<|im_start|>system\\n<|im_end|>\\n' }}{{ '<|im_start|>' }}", NULL},
      /* the head and the text in separate literals: no fixed default */
      {"{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>' }}", NULL},
      /* unterminated literal: no default, no crash */
      {"{{ '<|im_start|>system\\nabc<|im_end|>", NULL},
      /* the template ends right after the literal */
      {"{{ '<|im_start|>system\\nabc<|im_end|>'", "abc"},
      {"{{ '<|im_start|>system\\nabc<|im_end|>'}", "abc"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    model_chat_t c;
    CHECK_INT_EQ(model_chat_init_detect(&c, cases[i].tmpl, NULL, NULL, NULL, 0), 0);
    CHECK_INT_EQ(c.kind, MODEL_CHAT_CHATML);
    if (cases[i].want) CHECK_STR_EQ(c.default_system, cases[i].want);
    else if (c.default_system) FAIL_AT("case %zu: unexpected default \"%s\"", i, c.default_system);
    model_chat_destroy(&c);
  }

  /* Llama-3 with a default system turn and a literal <|begin_of_text|>. */
  model_chat_t c;
  CHECK_INT_EQ(model_chat_init_detect(&c,
                                      "<|begin_of_text|>{% if messages[0]['role'] != 'system' %}"
                                      "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nBe "
                                      "kind.<|eot_id|>' }}{% endif %}<|start_header_id|>",
                                      NULL, NULL, NULL, 0),
               0);
  CHECK_INT_EQ(c.kind, MODEL_CHAT_LLAMA3);
  CHECK_STR_EQ(c.default_system, "Be kind.");
  CHECK_STR_EQ(c.bos, "<|begin_of_text|>");
  model_chat_msg_t m[] = {{"user", " hi "}};
  render_ok(&c, m, 1, true,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  model_chat_destroy(&c);
}

/* Every prefix of every fixture template: detection never reads past the
 * string (run under ASan) and answers 0 or -ENOTSUP. */
static void test_truncated_templates(void) {
  const cJSON *t;
  cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(g_doc, "templates")) {
    const char *full = jstr(t, "template");
    size_t n = strlen(full);
    for (size_t len = 0; len <= n; len++) {
      char *cut = malloc(len + 1);
      CHECK(cut);
      memcpy(cut, full, len);
      cut[len] = '\0';
      model_chat_t c;
      int rc = model_chat_init_detect(&c, cut, "<s>", "</s>", NULL, 0);
      CHECK(rc == 0 || rc == -ENOTSUP);
      model_chat_destroy(&c);
      free(cut);
    }
  }
}

static void test_misc_render(void) {
  model_chat_t c;
  /* NULL content renders as empty text. */
  CHECK_INT_EQ(model_chat_init_named(&c, "chatml", NULL, NULL, NULL, 0), 0);
  model_chat_msg_t m[] = {{"user", NULL}};
  render_ok(&c, m, 1, false, "<|im_start|>user\n<|im_end|>\n");
  model_chat_destroy(&c);

  /* No bos/eos text given: the template's bos_token/eos_token render empty. */
  CHECK_INT_EQ(model_chat_init_named(&c, "llama2", NULL, NULL, NULL, 0), 0);
  CHECK(c.bos == NULL && c.eos == NULL);
  model_chat_msg_t m2[] = {{"user", "a"}, {"assistant", "b"}, {"user", "c"}};
  render_ok(&c, m2, 3, true, "[INST] a [/INST] b [INST] c [/INST]");
  model_chat_destroy(&c);

  /* Llama-2 strip() covers the whole first turn, <<SYS>> block included. */
  CHECK_INT_EQ(model_chat_init_named(&c, "llama2", "<s>", "</s>", NULL, 0), 0);
  model_chat_msg_t m3[] = {{"system", "S"}, {"user", " \xe3\x80\x80"}};
  render_ok(&c, m3, 2, true, "<s>[INST] <<SYS>>\nS\n<</SYS>> [/INST]");
  model_chat_destroy(&c);

  /* ChatML with bos_token in the template writes it once, first. */
  CHECK_INT_EQ(model_chat_init_detect(&c,
                                      "{{bos_token}}{% for m in messages %}{{'<|im_start|>' + "
                                      "m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
                                      "{% endfor %}",
                                      "<|startoftext|>", "<|im_end|>", NULL, 0),
               0);
  CHECK_STR_EQ(c.bos, "<|startoftext|>");
  CHECK(c.eos == NULL);
  model_chat_msg_t m4[] = {{"user", "x"}, {"assistant", "y"}};
  render_ok(&c, m4, 2, false,
            "<|startoftext|><|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\ny<|im_end|>\n");
  model_chat_destroy(&c);

  /* A destroyed (zeroed) object refuses to render. */
  char err[128] = "", *out = NULL;
  CHECK_INT_EQ(model_chat_render(&c, m4, 2, true, &out, err, sizeof err), -EINVAL);
  CHECK(out == NULL);
}

int main(void) {
  const char *dir = getenv("PRESSD_FIXTURES");
  if (!dir) {
    fprintf(stderr, "PRESSD_FIXTURES unset; skipping\n");
    return TEST_SKIP;
  }
  char path[4096];
  snprintf(path, sizeof path, "%s/chat-templates.json", dir);
  char *text = test_read_file(path, NULL);
  if (!text) FAIL_AT("cannot read %s (run scripts/reference/chat_fixtures.py)", path);
  g_doc = cJSON_Parse(text);
  CHECK(g_doc);

  RUN(test_fixtures_detect_and_render);
  RUN(test_fixture_bos_eos_fields);
  RUN(test_unsupported_templates);
  RUN(test_named_templates);
  RUN(test_bad_input);
  RUN(test_default_system_shapes);
  RUN(test_truncated_templates);
  RUN(test_misc_render);

  cJSON_Delete(g_doc);
  free(text);
  return 0;
}
