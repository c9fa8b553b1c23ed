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
