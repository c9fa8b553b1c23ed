#!/usr/bin/env python3
"""Golden chat-template renderings for tests/test-chat.c.

Renders a set of conversations through the real Jinja chat templates with
jinja2, configured the way transformers' apply_chat_template configures it
(sandboxed environment, trim_blocks, lstrip_blocks, raise_exception), and
writes tests/fixtures/chat-templates.json.

Templates:
  smollm2  read from the default model's GGUF (tokenizer.chat_template), with
           its BOS/EOS token text, by the small GGUF reader below;
  chatml   teknium/OpenHermes-2.5-Mistral-7B (plain ChatML, no default system);
  qwen2.5  Qwen/Qwen2.5-7B-Instruct (ChatML with a default system prompt);
  llama3   meta-llama/Meta-Llama-3-8B-Instruct;
  llama2   meta-llama/Llama-2-7b-chat-hf;
  mistral  mistralai Mistral-7B-Instruct-v0.2, the "v1" template with a
           system prompt.
Templates of other families, which pressd must refuse, are listed under
"unsupported".

Usage: scripts/reference/chat_fixtures.py [MODEL.gguf] [OUT.json]
Needs only python3 and jinja2.
"""

import json
import os
import struct
import sys

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "chat-templates.json")

# ---------------------------------------------------------------------------
# Minimal GGUF metadata reader (only what this script needs).

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
            7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read_value(f, vtype):
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if vtype == 8:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n).decode("utf-8")
    if vtype == 9:
        (etype,) = struct.unpack("<I", f.read(4))
        (n,) = struct.unpack("<Q", f.read(8))
        return [_read_value(f, etype) for _ in range(n)]
    raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_metadata(path):
    kv = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        (version,) = struct.unpack("<I", f.read(4))
        if version < 2:
            raise ValueError(f"{path}: GGUF v{version} not supported")
        _n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
        for _ in range(n_kv):
            (klen,) = struct.unpack("<Q", f.read(8))
            key = f.read(klen).decode("utf-8")
            (vtype,) = struct.unpack("<I", f.read(4))
            kv[key] = _read_value(f, vtype)
    return kv


# ---------------------------------------------------------------------------
# Templates, verbatim from the models' tokenizer_config.json.

CHATML_OPENHERMES = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

MISTRAL_V1 = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# Other families that share some markers with the built-in ones; pressd must
# answer -ENOTSUP for these rather than render them as something else.
UNSUPPORTED = {
    # microsoft/phi-4: <|im_start|> but with <|im_sep|>, not ChatML.
    "phi-4": (
        "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' "
        "+ message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' "
        "+ message['content'] + '<|im_end|><|im_start|>assistant<|im_sep|>'}}{% elif (message['role'] == "
        "'assistant') %}{{message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    ),
    # mistralai/Mistral-Large-Instruct-2411 ('v7'): [SYSTEM_PROMPT] blocks.
    "mistral-v7": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
        "message['content'] + '[/INST]' }}{% elif message['role'] == 'system' %}{{ '[SYSTEM_PROMPT] ' + "
        "message['content'] + '[/SYSTEM_PROMPT]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + "
        "message['content'] + eos_token }}{% else %}{{ raise_exception('Only user, system and assistant roles "
        "are supported!') }}{% endif %}{% endfor %}"
    ),
    # google/gemma-7b-it.
    "gemma": (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
        "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
        "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    # eachadea/vicuna-13b-1.1.
    "vicuna": (
        "{%- for message in messages %}{%- if message['role'] == 'system' -%}{{- '' + message['content'] + "
        "'\n\n' -}}{%- else -%}{%- if message['role'] == 'user' -%}{{-'USER: ' + message['content'] + '\n'-}}"
        "{%- else -%}{{-'ASSISTANT: ' + message['content'] + '</s>\n' -}}{%- endif -%}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{-'ASSISTANT:'-}}{%- endif -%}"
    ),
    "empty": "",
    "plain-text": "Hello, this is not a chat template.",
}

# ---------------------------------------------------------------------------
# Conversations. "skip" names the templates whose Jinja output pressd does
# not reproduce on purpose: there the template drops a message silently
# (a system message Llama-2/Mistral cannot place), and pressd answers
# -EINVAL instead; tests/test-chat.c checks those separately.

S, U, A = "system", "user", "assistant"
CONVERSATIONS = [
    ("single-user", [(U, "Hello")]),
    ("system-user", [(S, "You are a helpful assistant"), (U, "Hello")]),
    ("multi-turn", [(U, "Hi"), (A, "Hello! How can I help?"), (U, "Tell me a joke.")]),
    ("system-multi-turn", [(S, "You are a helpful assistant"), (U, "Hello"), (A, "Hi there"),
                           (U, "Who are you"), (A, "   I am an assistant   "), (U, "Another question")]),
    ("ends-with-assistant", [(U, "Say hi"), (A, "hi")]),
    ("system-ends-with-assistant", [(S, "Be brief."), (U, "Say hi"), (A, "hi")]),
    ("empty-user", [(U, "")]),
    ("empty-system", [(S, ""), (U, "Hello")]),
    ("empty-assistant", [(U, "a"), (A, ""), (U, "b")]),
    ("unicode", [(S, "Réponds en français, s'il te plaît. 🙂"), (U, "日本語で答えて: café, naïve, Ω≈ç√"),
                 (A, "はい、わかりました 👍"), (U, "Привет! 𝔘𝔫𝔦𝔠𝔬𝔡𝔢")]),
    ("whitespace", [(S, "  \tsystem with spaces \n"), (U, "\n\n  padded question  \n"),
                    (A, "\u3000wide space answer\u00a0"), (U, " \u2003trailing em space\u2003")]),
    ("whitespace-only", [(U, " \n\t ")]),
    ("multiline", [(U, "Line one\nLine two\n\n\tIndented line\r\nCRLF line"), (A, "Ok.\n\nDone."),
                   (U, "```c\nint main(void) { return 0; }\n```")]),
    ("markup-in-content", [(U, "{{ not a template }} {% if x %} <|im_end|> [INST] <<SYS>> </s> \\n 'quote' \"dq\"")]),
    ("long", [(S, "You count."), (U, "1"), (A, "2"), (U, "3"), (A, "4"), (U, "5"), (A, "6"), (U, "7"),
              (A, "8"), (U, "9")]),
    ("assistant-first", [(A, "I speak first."), (U, "Fine.")]),
    ("two-users", [(U, "First"), (U, "Second")]),
    ("system-only", [(S, "Only a system prompt.")], ["llama2", "mistral"]),
    ("system-in-middle", [(U, "Hi"), (S, "Now be terse."), (U, "Go")], ["llama2", "mistral"]),
    ("system-after-assistant", [(U, "Hi"), (A, "Hello"), (S, "Late system")], ["llama2", "mistral"]),
]


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def make_env():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env


def render(env, tmpl, messages, agp, bos, eos):
    t = env.from_string(tmpl)
    return t.render(messages=messages, add_generation_prompt=agp, bos_token=bos, eos_token=eos)


def default_system(env, name, kind, tmpl, bos, eos):
    """The system prompt the template adds when messages[0] is not a system
    message, found by rendering a one-message conversation."""
    out = render(env, tmpl, [{"role": "user", "content": "x"}], False, bos, eos)
    heads = {"chatml": ("<|im_start|>system\n", "<|im_end|>"),
             "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")}
    if kind not in heads:
        return None
    head, tail = heads[kind]
    pos = out.find(head)
    if pos < 0:
        return None
    start = pos + len(head)
    return out[start:out.index(tail, start)]


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PRESSD_MODEL", DEFAULT_MODEL)
    out_path = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT

    kv = gguf_metadata(model)
    tokens = kv["tokenizer.ggml.tokens"]
    smol_bos = tokens[kv["tokenizer.ggml.bos_token_id"]]
    smol_eos = tokens[kv["tokenizer.ggml.eos_token_id"]]

    templates = [
        # name, kind, template, bos, eos
        ("smollm2", "chatml", kv["tokenizer.chat_template"], smol_bos, smol_eos),
        ("chatml", "chatml", CHATML_OPENHERMES, "<s>", "<|im_end|>"),
        ("qwen2.5", "chatml", QWEN25, "<|endoftext|>", "<|im_end|>"),
        ("llama3", "llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
        ("llama2", "llama2", LLAMA2, "<s>", "</s>"),
        ("mistral", "mistral", MISTRAL_V1, "<s>", "</s>"),
    ]

    env = make_env()
    doc = {
        "generator": "scripts/reference/chat_fixtures.py (jinja2 %s)" % jinja2.__version__,
        "templates": [],
        "unsupported": [{"name": n, "template": t} for n, t in UNSUPPORTED.items()],
        "cases": [],
    }
    for name, kind, tmpl, bos, eos in templates:
        doc["templates"].append({
            "name": name, "kind": kind, "template": tmpl, "bos": bos, "eos": eos,
            "default_system": default_system(env, name, kind, tmpl, bos, eos),
        })

    n_ok = n_err = 0
    for name, kind, tmpl, bos, eos in templates:
        for conv in CONVERSATIONS:
            cname, msgs = conv[0], conv[1]
            skip = conv[2] if len(conv) > 2 else []
            if name in skip:
                continue
            messages = [{"role": r, "content": c} for r, c in msgs]
            for agp in (True, False):
                case = {"template": name, "conversation": cname, "messages": messages,
                        "add_generation_prompt": agp}
                try:
                    case["expected"] = render(env, tmpl, messages, agp, bos, eos)
                    n_ok += 1
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                    n_err += 1
                doc["cases"].append(case)

    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"chat_fixtures: {len(templates)} templates, {len(CONVERSATIONS)} conversations, "
          f"{n_ok} renderings, {n_err} template errors -> {os.path.relpath(out_path)}")


if __name__ == "__main__":
    main()
