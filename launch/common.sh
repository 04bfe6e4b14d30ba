# shellcheck shell=bash
# Sourced by the launch scripts: strict mode, and `run`, which prints each command instead of
# running it when DRY_RUN=1 (one shell-quoted command per line on stdout).
set -euo pipefail

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local quoted
    printf -v quoted '%q ' "$@"
    echo "${quoted% }"
  else
    "$@"
  fi
}
