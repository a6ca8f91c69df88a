#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (llama-bench, llama-server, llama-cli,
# llama-quantize) and fetches its converter (convert_hf_to_gguf.py + gguf-py) from
# the llama-cpp-python source distribution on PyPI, the same llama.cpp the Python
# bindings vendor. Everything goes under DEST (default: ../llama.cpp next to this
# checkout), outside the repository.
#
#   tools/build_llama_cpp.sh [DEST]            # then DEST/build/bin/llama-bench ...
#
# NATIVE=0 builds without -march=native and without AMX (into DEST/build-noamx).
# On 2026-12-03, on an Intel Xeon guest whose /proc/cpuinfo lists AMX, the native
# build died on its first forward ("invalid opcode" / "general protection fault"
# in libggml-cpu) and the NATIVE=0 build ran.
#
# Needs: curl, python3 with pip (for cmake if it is missing), a C++ compiler.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/../llama.cpp}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

if [ ! -d "$DEST/src/ggml" ]; then
    tmp="$(mktemp -d)"
    # The sdist straight from PyPI's simple index (`pip download` would build its
    # metadata first, which compiles llama.cpp once more).
    url="$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ \
        | grep -o "https://[^\"#]*llama_cpp_python-$VERSION.tar.gz" | head -1)"
    [ -n "$url" ] || { echo "llama-cpp-python $VERSION not found on PyPI" >&2; exit 1; }
    curl -fsSL -o "$tmp/llama_cpp_python-$VERSION.tar.gz" "$url"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    rm -rf "$DEST/src"
    mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$DEST/src"
    rm -rf "$tmp"
fi

CMAKE=cmake
if ! command -v cmake >/dev/null 2>&1; then
    [ -x "$DEST/cmake-py/cmake/data/bin/cmake" ] ||
        python3 -m pip install --quiet --target "$DEST/cmake-py" cmake >&2
    # The wheel's bin/cmake is a Python entry point that needs the package on
    # sys.path; the real executable sits inside the package.
    CMAKE="$DEST/cmake-py/cmake/data/bin/cmake"
fi

BUILD="$DEST/build"
CPU_FLAGS=(-DGGML_NATIVE=ON)
if [ "${NATIVE:-1}" = 0 ]; then
    BUILD="$DEST/build-noamx"
    CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
        -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
        -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
$CMAKE -S "$DEST/src" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${CPU_FLAGS[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
$CMAKE --build "$BUILD" -j "${JOBS:-2}" \
    --target llama-bench llama-server llama-cli llama-quantize >&2
# The sdist carries no git metadata (`llama-bench --version` says "commit unknown");
# llama-cpp-python 0.3.36 vendors llama.cpp commit 0c1e570.
echo "$BUILD/bin"
