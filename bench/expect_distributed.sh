#!/usr/bin/env bash
# ctest: mep_bench across 2 processes on 127.0.0.1 (scripts/distributed.sh).
#  1. the 2-rank run trains, only rank 0 writes the JSON, which records world_size 2 and
#     every optimizer's bytes per step, and reaches the 1-process run's accuracy within noise;
#  2. a rank that never arrives: the other fails with one line after --dist-timeout;
#  3. a rank that leaves early: the other fails with one line naming the collective.
#   expect_distributed.sh MEP_BENCH DATA_DIR WORK_DIR SOURCE_DIR PYTHON
set -u
bench=$1 data=$2 work=$3 source=$4 python=$5
mkdir -p "$work"
rm -f "$work"/*.json
port=$((20000 + RANDOM % 20000))
common=(--model mlp_small --epochs 2 --train 1024 --test 256 --data "$data" --threads 1)
fail() { echo "FAILED: $*"; exit 1; }

"$bench" "${common[@]}" --optimizers sgd,sdmep --json "$work/one.json" >"$work/one.txt" 2>&1 || fail "1-process run: $(tail -1 "$work/one.txt")"
MEP_BENCH="$bench" MASTER_PORT=$port bash "$source/scripts/distributed.sh" 2 "${common[@]}" --optimizers sgd,sdmep --json "$work/two.json" \
  >"$work/two.txt" 2>&1 || fail "2-process run: $(tail -3 "$work/two.txt")"
grep -q "ranks 2 (gloo)" "$work/two.txt" || fail "no 'ranks 2 (gloo)' in the header"
[[ $(grep -c "^| Rank |" "$work/two.txt") -eq 1 ]] || fail "expected one table (rank 0's)"
"$python" - "$work/one.json" "$work/two.json" <<'PY' || exit 1
import json, sys
one, two = (json.load(open(p)) for p in sys.argv[1:])
assert one["protocol"]["world_size"] == 1 and two["protocol"]["world_size"] == 2, "world_size not recorded"
for a, b in zip(one["results"], two["results"]):
    assert a["optimizer"] == b["optimizer"]
    gap = abs(a["best_val_acc"] - b["best_val_acc"])
    assert gap <= 0.03, f"{a['optimizer']}: 1 process {a['best_val_acc']}, 2 processes {b['best_val_acc']}"
    assert "bytes_per_step" not in a and b["bytes_per_step"] > 0, "bytes_per_step"
sgd, sdmep = two["results"]
assert sdmep["bytes_per_step"] < sgd["bytes_per_step"], "Dion's factors are not smaller than the gradients"
print("ok: accuracies", [(r["optimizer"], r["best_val_acc"]) for r in two["results"]],
      "bytes/step", [r["bytes_per_step"] for r in two["results"]])
PY

# 2. rank 1 fails before meeting: rank 0 gives up after --dist-timeout with one line.
port=$((port + 1))
WORLD_SIZE=2 RANK=1 MASTER_PORT=$port "$bench" "${common[@]}" --optimizers nope >/dev/null 2>&1
WORLD_SIZE=2 RANK=0 MASTER_PORT=$port "$bench" "${common[@]}" --optimizers sgd --dist-timeout 3 >/dev/null 2>"$work/alone.txt" &&
  fail "rank 0 alone succeeded"
[[ $(wc -l <"$work/alone.txt") -eq 1 ]] || fail "expected one line, got: $(cat "$work/alone.txt")"
grep -q "^mep_bench (rank 0): mep: rank 0 of 2: cannot meet the other ranks at 127.0.0.1:$port" "$work/alone.txt" ||
  fail "unexpected error: $(cat "$work/alone.txt")"

# 3. rank 1 runs SGD only and exits; rank 0 goes on to SDMEP, whose first collective fails.
port=$((port + 1))
WORLD_SIZE=2 RANK=1 MASTER_PORT=$port "$bench" "${common[@]}" --optimizers sgd >/dev/null 2>&1 &
WORLD_SIZE=2 RANK=0 MASTER_PORT=$port "$bench" "${common[@]}" --optimizers sgd,sdmep --dist-timeout 20 >/dev/null 2>"$work/left.txt" &&
  fail "rank 0 succeeded without rank 1"
wait
[[ $(wc -l <"$work/left.txt") -eq 1 ]] || fail "expected one line, got: $(cat "$work/left.txt")"
grep -q "^mep_bench (rank 0): .*rank 0 of 2: the broadcast of the parameters from rank 0 failed" "$work/left.txt" ||
  fail "unexpected error: $(cat "$work/left.txt")"
echo "ok: $(cat "$work/alone.txt")"
echo "ok: $(cat "$work/left.txt")"
