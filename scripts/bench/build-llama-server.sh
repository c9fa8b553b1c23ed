#!/usr/bin/env bash
# Builds llama.cpp's llama-server (the peer of the serving benchmarks) from
# the llama.cpp sources that the llama-cpp-python source package on PyPI
# vendors, so the peer is the same llama.cpp version as the reference
# fixtures. Prints the binary's path.
#
#   scripts/bench/build-llama-server.sh [DEST_DIR]    (default: .llama-server)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/refvenv.sh
dest=${1:-.llama-server}
bin=$dest/build/bin/llama-server
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
command -v cmake >/dev/null || { echo "build-llama-server: cmake is required (apt-get install cmake)" >&2; exit 1; }
mkdir -p "$dest"
if [ ! -d "$dest/src" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$dest/src"
  rm -rf "$tmp"
fi
cmake -S "$dest/src" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  >&2
cmake --build "$dest/build" --target llama-server -j "$(nproc)" >&2
echo "$bin"
