#!/usr/bin/env bash
# Builds llama.cpp's command-line tools, the serving engine that ppow_jax.bench.peers and
# ppow_jax.bench.serve_check compare against, from the llama.cpp sources vendored in the
# llama-cpp-python source distribution (fetched with pip from PyPI, or given as a file).
#
#   bash launch/build_llamacpp.sh [DIR]      # prints DIR once the tools are built
#   export PPOW_LLAMACPP_DIR=$(bash launch/build_llamacpp.sh ~/opt/llamacpp)
#
# DIR (argument, else $PPOW_LLAMACPP_DIR, else ~/.cache/ppow_jax/llamacpp) must lie outside
# this repository. It receives the llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/) and
# DIR/build/bin/{llama-speculative-simple,llama-bench,llama-quantize,llama-simple,...}.
# Running it again after a finished build does nothing. Only DIR is printed on stdout; cmake's
# output goes to stderr. About 8-20 minutes on 2 CPU cores.
#
# Environment: LLAMACPP_PY_VERSION (default 0.3.36), LLAMACPP_SDIST (a local
# llama_cpp_python-VERSION.tar.gz: no download at all), PYTHON (the interpreter whose pip
# downloads; default python3), JOBS (parallel compile jobs; default: all cores).
set -euo pipefail

VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
DIR="${1:-${PPOW_LLAMACPP_DIR:-${HOME}/.cache/ppow_jax/llamacpp}}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
REQUIRED=(llama-speculative-simple llama-bench llama-quantize)
OPTIONAL=(llama-simple llama-cli)
STAMP_NAME=".ppow_built_llama_cpp_python_${VERSION}"

log() { echo "build_llamacpp: $*" >&2; }
die() { log "error: $*"; exit 1; }

built() {
  [[ -f "$DIR/$STAMP_NAME" ]] || return 1
  local t
  for t in "${REQUIRED[@]}"; do
    [[ -x "$DIR/build/bin/$t" ]] || return 1
  done
}

DIR="$(realpath -m "$DIR")"
REPO="$(realpath -m "$(dirname "${BASH_SOURCE[0]}")/..")"
case "$DIR/" in
  "$REPO"/*) die "DIR=$DIR is inside the repository $REPO; choose a folder outside it" ;;
esac
mkdir -p "$DIR"

if built; then
  log "already built in $DIR"
  echo "$DIR"
  exit 0
fi

if [[ ! -f "$DIR/CMakeLists.txt" ]]; then
  [[ -z "$(ls -A "$DIR")" ]] || die "$DIR is neither empty nor a llama.cpp tree from this script"
  TMP="$(mktemp -d "${DIR}.partial.XXXXXX")"
  trap 'rm -rf "$TMP"' EXIT
  SDIST="${LLAMACPP_SDIST:-}"
  if [[ -z "$SDIST" ]]; then
    log "downloading llama-cpp-python==$VERSION (source distribution) from PyPI"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$VERSION" --dest "$TMP" >&2
    SDIST="$TMP/llama_cpp_python-$VERSION.tar.gz"
  fi
  [[ -f "$SDIST" ]] || die "no source distribution at $SDIST"
  log "unpacking llama.cpp from $SDIST"
  mkdir -p "$TMP/src"
  tar -xzf "$SDIST" -C "$TMP/src" --strip-components=3 \
    "llama_cpp_python-$VERSION/vendor/llama.cpp"
  [[ -f "$TMP/src/CMakeLists.txt" ]] || die "$SDIST holds no vendor/llama.cpp"
  # Move the tree in only once it is complete, so an interrupted unpack leaves DIR empty.
  find "$TMP/src" -mindepth 1 -maxdepth 1 -exec mv -t "$DIR" {} +
fi

log "configuring in $DIR/build"
cmake -S "$DIR" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DGGML_NATIVE=ON >&2

targets=("${REQUIRED[@]}")
known="$(cmake --build "$DIR/build" --target help 2>/dev/null || true)"
for t in "${OPTIONAL[@]}"; do
  if grep -qE -- "(^|[[:space:]])$t([[:space:]]|\$)" <<<"$known"; then
    targets+=("$t")
  fi
done
log "building ${targets[*]} with $JOBS jobs"
cmake --build "$DIR/build" --target "${targets[@]}" -j"$JOBS" >&2

for t in "${REQUIRED[@]}"; do
  [[ -x "$DIR/build/bin/$t" ]] || die "the build finished without $DIR/build/bin/$t"
done
echo "$VERSION" >"$DIR/$STAMP_NAME"
log "built in $DIR"
echo "$DIR"
