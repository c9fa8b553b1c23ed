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
    return 0
  fi
  echo "refvenv: installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION into $REF_VENV (compiles llama.cpp; slow)" >&2
  [ -x "$REF_PY" ] || python3 -m venv "$REF_VENV"
  "$REF_PY" -m pip install --quiet --upgrade pip
  "$REF_PY" -m pip install "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" jinja2 numpy gguf
  "$REF_PY" -c 'import llama_cpp; print("refvenv: llama-cpp-python", llama_cpp.__version__)' >&2
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
