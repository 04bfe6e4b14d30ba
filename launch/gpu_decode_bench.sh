#!/usr/bin/env bash
# The decode-engine benchmark on one GPU: the scaled-up synthetic pair (a 16-layer target of
# hidden size 2048, ~0.9 B parameters, and a one-layer drafter) in float32 and bfloat16, at
# batch 1 and 8 with K = 4: AR and speculative tokens/s, τ, the cost-curve ideal, and an AR
# step against the time its weights take at the device's bandwidth. A few minutes on an H200
# once JAX is installed (PYTHON: an interpreter with this package and "jax[cuda12]").
#
#   OUT=/tmp/bench PEAK_GBS=4800 launch/gpu_decode_bench.sh [extra ppow_jax.bench.decode flags]
#
# Writes OUT/decode_VARIANT.json for each of VARIANTS (tables on stdout), by default
# "float32 bfloat16 bfloat16_graphs": a variant is a dtype, optionally with "_graphs": XLA's
# command buffers (CUDA graphs) also taking while loops and conditionals, so that a whole decode
# loop can be one graph instead of a launch per operation and a host round trip per step (XLA's
# default leaves them out). Fewer variants fit a shorter device slot.
# PEAK_GBS: the device's memory bandwidth in GB/s (H200: 4800; 0 or unset: not reported).

REPO="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

: "${OUT:?set OUT, the directory for the JSON results}"
PYTHON="${PYTHON:-python3}"

cd "$REPO"
VARIANTS="${VARIANTS:-float32 bfloat16 bfloat16_graphs}"
for variant in $VARIANTS; do  # checked before anything runs
  case "$variant" in
    float32 | bfloat16 | float32_graphs | bfloat16_graphs) ;;
    *) echo "VARIANTS: unknown variant '$variant' (want DTYPE or DTYPE_graphs, DTYPE float32" \
         "or bfloat16)" >&2; exit 2 ;;
  esac
done
run mkdir -p "$OUT"
for variant in $VARIANTS; do
  env_vars=()
  if [[ "$variant" == *_graphs ]]; then
    env_vars=(XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL")
  fi
  run env "${env_vars[@]}" "$PYTHON" -m ppow_jax.bench.decode --pair=synthetic \
    --synthetic_layers=16 --synthetic_hidden=2048 --synthetic_intermediate=5632 \
    --synthetic_vocab=32000 --batch_sizes=1,8 --window=4 --max_new_tokens=128 --repeats=3 \
    --dtype="${variant%_graphs}" --peak_gbs="${PEAK_GBS:-0}" \
    --output_json="$OUT/decode_$variant.json" "$@"
done
