#!/usr/bin/env bash
# Run the multi-host job on this one machine: NUM_PROCESSES processes of
# `python -m ppow_jax.main`, each owning DEVICES_PER_PROCESS CPU devices, joined through a
# coordinator on 127.0.0.1 -- the command every pod worker runs (launch/tpu_pod.sh), with the
# process count and id a pod's runtime would provide given as PPOW_NUM_PROCESSES and
# PPOW_PROCESS_ID (read by sharding.maybe_initialize_distributed).
#
#   launch/local_multiprocess.sh 2 --config=configs/tiny.py:smoke,sharded --workdir=/tmp/run
#
# Settings (environment): DEVICES_PER_PROCESS (default 4); PORT of the coordinator (default:
# a free one); LOGDIR (default: a new directory under TMPDIR) receives process_<i>.log;
# PYTHON (default: the repository's .venv, else python3); GRACE seconds between SIGTERM and
# SIGKILL when stopping (default 10). When any process fails, the others are stopped and its
# exit status is returned; Ctrl-C or SIGTERM stops all of them. DRY_RUN=1 prints the commands.
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

usage="usage: $0 NUM_PROCESSES [ppow_jax.main flags]"
[[ "${1:-}" =~ ^[1-9][0-9]*$ ]] || { echo "$usage (NUM_PROCESSES: a positive integer)" >&2; exit 2; }
num_processes="$1"
shift
devices="${DEVICES_PER_PROCESS:-4}"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || { echo "DEVICES_PER_PROCESS must be a positive integer, got $devices" >&2; exit 2; }
grace="${GRACE:-10}"
[[ "$grace" =~ ^[0-9]+$ ]] || { echo "GRACE must be a number of seconds, got $grace" >&2; exit 2; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$repo/.venv/bin/python"
  [[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
fi
if [[ -z "${PORT:-}" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || { echo "PORT must be a port number, got $PORT" >&2; exit 2; }

# Each process: its own fake CPU devices (any device count already in XLA_FLAGS is replaced).
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")"
xla_flags="${xla_flags# } --xla_force_host_platform_device_count=$devices"
process_env() {  # sets `envs`, the environment of process $1
  envs=(PPOW_DISTRIBUTED=1 "JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT"
        "PPOW_NUM_PROCESSES=$num_processes" "PPOW_PROCESS_ID=$1"
        "JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}" "XLA_FLAGS=${xla_flags# }")
}

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    process_env "$i"
    run env "${envs[@]}" "$PYTHON" -m ppow_jax.main "$@"
  done
  exit 0
fi

LOGDIR="${LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/ppow_local.XXXXXX")}"
mkdir -p "$LOGDIR"
pids=()

stop() {  # SIGTERM every process still running, SIGKILL what is left after GRACE seconds
  local pid waited=0
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((waited < grace * 10)); do
      sleep 0.1
      waited=$((waited + 1))
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}
trap 'echo "interrupted: stopping ${#pids[@]} processes" >&2; stop; exit 130' INT
trap 'echo "terminated: stopping ${#pids[@]} processes" >&2; stop; exit 143' TERM
trap stop EXIT

cd "$repo"
echo "[local] $num_processes processes x $devices devices, coordinator 127.0.0.1:$PORT, logs in $LOGDIR"
for ((i = 0; i < num_processes; i++)); do
  process_env "$i"
  env "${envs[@]}" "$PYTHON" -m ppow_jax.main "$@" >"$LOGDIR/process_$i.log" 2>&1 &
  pids+=("$!")
done

# Wait for all; the first failure stops the rest (they would wait for it forever).
declare -A live
for i in "${!pids[@]}"; do live[$i]=1; done
while ((${#live[@]})); do
  for i in "${!live[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    unset "live[$i]"
    if ((rc != 0)); then
      echo "[local] process $i failed (exit status $rc); its log, $LOGDIR/process_$i.log, ends:" >&2
      tail -n 20 "$LOGDIR/process_$i.log" >&2
      stop
      exit "$rc"
    fi
  done
  sleep 0.2
done
pids=()
tail -n 3 "$LOGDIR/process_0.log"
echo "[local] all $num_processes processes finished; logs in $LOGDIR"
