#!/usr/bin/env bash
# Build native llama.cpp, the CPU peer of bench/e2e.py, and print the folder of its binaries.
#
# The source is the llama.cpp vendored inside the llama-cpp-python sdist on PyPI (a pinned
# version, fetched with pip: PyPI is the one source of code this project's machines reach).
# Only the tools the benchmark runs are built: llama-completion (plain decoding), llama-lookup
# (prompt-lookup speculative decoding) and llama-tokenize, Release, -DGGML_NATIVE=ON (tuned
# for this CPU, as a user building it here would), static, no server, no tests, no HTTPS.
# The result is cached in $PIPESPEC_CACHE/llama.cpp/<version>/ (default
# ~/.cache/pipespec-fast) and reused while its stamp (version, flags, this CPU's ISA flags)
# matches. Idempotent; ~10 minutes on 2 cores the first time.
#
# Usage: ./scripts/build_llamacpp.sh [--cache DIR]          build if needed, print the folder
#        ./scripts/build_llamacpp.sh [--cache DIR] --where  print it if built, else exit 1
# (--cache DIR replaces $PIPESPEC_CACHE: bench/llamacpp.py passes its configuration's folder)
set -euo pipefail
VERSION=0.3.36
TOOLS=(llama-completion llama-lookup llama-tokenize)
FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_OPENSSL=OFF)

WHERE=0
CACHE=${PIPESPEC_CACHE:-$HOME/.cache/pipespec-fast}
while [ $# -gt 0 ]; do
  case "$1" in
    --where) WHERE=1 ;;
    --cache) CACHE=${2:?--cache needs a folder}; shift ;;
    *) echo "build_llamacpp.sh: unknown argument $1 (usage: [--cache DIR] [--where])" >&2
       exit 2 ;;
  esac
  shift
done
case "$CACHE" in /*) ;; *) CACHE="$PWD/$CACHE" ;; esac
cd "$(dirname "$0")/.."
DEST="$CACHE/llama.cpp/$VERSION"
# GGML_NATIVE compiles for the CPU it runs on: a cache carried to another CPU must not be used
ISA=$( (grep -m1 '^flags' /proc/cpuinfo || true) | sha1sum | cut -c1-12)
STAMP="llama-cpp-python $VERSION; ${FLAGS[*]}; tools ${TOOLS[*]}; cpu $ISA"

built() {
  [ -f "$DEST/stamp" ] && [ "$(cat "$DEST/stamp")" = "$STAMP" ] || return 1
  for t in "${TOOLS[@]}"; do [ -x "$DEST/bin/$t" ] || return 1; done
}

if [ "$WHERE" = 1 ]; then
  built && echo "$DEST/bin" && exit 0
  exit 1
fi
if built; then
  echo "$DEST/bin"
  exit 0
fi

fail() { echo "build_llamacpp.sh: $*" >&2; exit 1; }
command -v cmake >/dev/null || fail "cmake not found (apt-get install -y cmake, or pip install cmake)"
CXX_BIN=${CXX:-$(command -v c++ || command -v g++ || true)}
CC_BIN=${CC:-$(command -v cc || command -v gcc || true)}
[ -n "$CXX_BIN" ] && [ -n "$CC_BIN" ] \
  || fail "no C/C++ compiler found (apt-get install -y build-essential)"
PY=.venv/bin/python
[ -x "$PY" ] || PY=$(command -v python3 || true)
[ -n "$PY" ] || fail "no python to run pip with (run ./scripts/setup.sh first)"

mkdir -p "$CACHE/llama.cpp"
WORK=$(mktemp -d "$CACHE/llama.cpp/.work-$VERSION-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "build_llamacpp.sh: fetching llama-cpp-python $VERSION (sdist) from PyPI" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" \
  2>&1 | { grep -vE "^WARNING: Location|is ignored: it is neither" || true; } >&2
SDIST=$(ls "$WORK"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null) \
  || fail "pip did not fetch llama_cpp_python-$VERSION.tar.gz"
tar -xzf "$SDIST" -C "$WORK" "llama_cpp_python-$VERSION/vendor/llama.cpp"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

JOBS=$(nproc 2>/dev/null || echo 2)
echo "build_llamacpp.sh: building ${TOOLS[*]} ($JOBS jobs, several minutes)" >&2
LOG="$WORK/build.log"
if ! { cmake -S "$SRC" -B "$WORK/build" -DCMAKE_C_COMPILER="$CC_BIN" \
         -DCMAKE_CXX_COMPILER="$CXX_BIN" "${FLAGS[@]}" \
       && cmake --build "$WORK/build" -j "$JOBS" --target "${TOOLS[@]}"; } >"$LOG" 2>&1; then
  tail -n 30 "$LOG" >&2
  fail "the build failed (last lines above)"
fi

# publish atomically: a half-copied folder is never taken for a build
NEW="$CACHE/llama.cpp/.new-$VERSION-$$"
rm -rf "$NEW"
mkdir -p "$NEW/bin"
for t in "${TOOLS[@]}"; do cp "$WORK/build/bin/$t" "$NEW/bin/"; done
echo "$STAMP" >"$NEW/stamp"
rm -rf "$DEST"
mv "$NEW" "$DEST"
echo "$DEST/bin"
