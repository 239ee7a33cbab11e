#!/usr/bin/env bash
# Data-parallel mep_bench on one machine: starts N ranks of build/bench/mep_bench that meet
# at 127.0.0.1 (Gloo; NCCL with --device cuda). Each rank trains on its shard of every
# batch; rank 0 prints the table and writes the files. If a rank fails, the others are
# stopped and the script exits with its status.
#
#   scripts/distributed.sh N [mep_bench arguments...]
#   e.g. scripts/distributed.sh 2 --model mlp --optimizers sgd,smep --threads 1
#
# Environment: MASTER_PORT (default 29500); MEP_BENCH, the mep_bench to run (default:
# $MEP_BUILD_DIR/bench/mep_bench, MEP_BUILD_DIR defaulting to build; it must be built).
# Several machines: run build/bench/mep_bench on each with --world-size, --rank,
# --master-addr and --master-port (or torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/distributed.sh N [mep_bench arguments...]  (N: number of processes, >= 1)" >&2
  exit 2
fi
n=$1
shift
bench="${MEP_BENCH:-${MEP_BUILD_DIR:-build}/bench/mep_bench}"
[[ -x $bench ]] || { echo "distributed.sh: $bench not found: build it first (scripts/bench.sh, or cmake --build build --target mep_bench)" >&2; exit 2; }

export WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29500}"
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'stop; exit 130' INT TERM
for ((r = 0; r < n; r++)); do
  RANK=$r "$bench" "$@" &
  pids+=($!)
done
status=0
# The first rank to fail stops the others (they would otherwise wait for it until the
# process group's timeout).
for ((left = n; left > 0; left--)); do
  wait -n && continue
  status=$?
  stop
  break
done
wait || true
exit "$status"
