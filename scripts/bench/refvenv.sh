# Sourced by scripts/make-reference and scripts/bench-*: provides
# ensure_ref_venv, which makes sure a Python virtual environment with the
# llama.cpp reference (the llama-cpp-python package, compiled from source by
# pip) exists, and sets REF_PY to its interpreter.
#
#   REF_VENV   the venv to use or create (default: .venv-ref in the repo root)
#
# Building llama-cpp-python compiles llama.cpp: it needs cmake and a C++
# compiler and takes a while (20+ minutes on 2 cores). It is built with
# llama.cpp's defaults (CPU backend, -march=native).

LLAMA_CPP_PYTHON_VERSION=0.3.36

ensure_ref_venv() {
  local root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  REF_VENV=${REF_VENV:-$root/.venv-ref}
  REF_PY=$REF_VENV/bin/python
  if [ -x "$REF_PY" ] && "$REF_PY" - "$LLAMA_CPP_PYTHON_VERSION" <<'PY' 2>/dev/null
import sys, llama_cpp, numpy, jinja2, gguf
sys.exit(0 if llama_cpp.__version__ == sys.argv[1] else 1)
PY
  then
    ref_smoke "$root" && return 0
  fi
  echo "refvenv: installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION into $REF_VENV (compiles llama.cpp; slow)" >&2
  [ -x "$REF_PY" ] || python3 -m venv "$REF_VENV"
  "$REF_PY" -m pip install --quiet --upgrade pip
  "$REF_PY" -m pip install "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" jinja2 numpy gguf
  if ! ref_smoke "$root"; then
    # A virtual machine may list AMX among the CPU's flags without enabling
    # its tile registers: -march=native then builds AMX kernels that die on
    # an illegal instruction. Rebuild without them.
    echo "refvenv: llama.cpp fails on this CPU as built; rebuilding without AMX" >&2
    CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
      -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \
      "$REF_PY" -m pip install --force-reinstall --no-deps --no-cache-dir \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    ref_smoke "$root" || { echo "refvenv: llama.cpp still fails" >&2; return 1; }
  fi
  "$REF_PY" -c 'import llama_cpp; print("refvenv: llama-cpp-python", llama_cpp.__version__)' >&2
}

# Whether the built llama.cpp evaluates a few tokens of the default model
# (in a child process: an illegal instruction kills only it). No model: yes.
ref_smoke() {
  local model=$1/models/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$model" ] || return 0
  "$REF_PY" - "$model" <<'PY' >/dev/null 2>&1
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"The quick brown fox"))
PY
}

# ensure_ref_server_extras (opt-in, after ensure_ref_venv): the dependencies of
# llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`),
# i.e. its [server] extra, installed on their own so that the compiled
# llama-cpp-python wheel is neither rebuilt nor replaced; plus matplotlib for
# the benchmarks' PNG plots (optional: a failed install only costs the plot).
ensure_ref_server_extras() {
  if ! "$REF_PY" -c 'import llama_cpp.server.app, uvicorn, fastapi, sse_starlette, starlette_context, pydantic_settings, yaml' 2>/dev/null; then
    echo "refvenv: installing llama-cpp-python's server dependencies into $REF_VENV" >&2
    "$REF_PY" -m pip install --quiet "uvicorn>=0.22.0" "fastapi>=0.100.0" \
      "pydantic-settings>=2.0.1" "sse-starlette>=1.6.1" "starlette-context>=0.3.6,<0.4" \
      "PyYAML>=5.1"
    "$REF_PY" -c 'import llama_cpp.server.app' || return 1
  fi
  if ! "$REF_PY" -c 'import matplotlib' 2>/dev/null; then
    "$REF_PY" -m pip install --quiet matplotlib ||
      echo "refvenv: matplotlib not installed: no PNG plots" >&2
  fi
  return 0
}
