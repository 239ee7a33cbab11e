#!/usr/bin/env bash
# ctest: an interrupted mep_bench (SIGINT) stops with one line on stderr, exit status 130,
# and no --json file, not even a partial one.
#   expect_interrupt.sh MEP_BENCH DATA_DIR WORK_DIR
set -u
bench=$1 data=$2 work=$3
mkdir -p "$work"
json="$work/interrupted.json"
rm -f "$json" "$json.tmp"
"$bench" --model mlp_small --epochs 50 --optimizers sgd,smep --data "$data" --threads 1 --json "$json" \
  >"$work/stdout.txt" 2>"$work/stderr.txt" &
pid=$!
for _ in $(seq 1 100); do  # wait until training runs
  grep -q "epoch" "$work/stdout.txt" 2>/dev/null && break
  sleep 0.1
done
kill -INT "$pid"
wait "$pid"
status=$?
lines=$(wc -l <"$work/stderr.txt")
if [[ $status -ne 130 ]]; then echo "expected exit status 130, got $status"; exit 1; fi
if [[ $lines -ne 1 ]] || ! grep -q "^mep_bench: interrupted" "$work/stderr.txt"; then
  echo "expected one line 'mep_bench: interrupted...' on stderr, got:"; cat "$work/stderr.txt"; exit 1
fi
if [[ -e "$json" || -e "$json.tmp" ]]; then echo "an output file was left behind"; exit 1; fi
echo "ok: $(cat "$work/stderr.txt")"
