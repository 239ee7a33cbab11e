#!/usr/bin/env bash
# Quick start, benchmark: installs the dependencies, makes the datasets, builds mep_bench
# into build/ and runs it with the default protocol. Arguments are passed to mep_bench;
# the results are written as JSON to results/mnist_<model>.json unless --json is given.
#
#   scripts/bench.sh [mep_bench arguments...]   e.g. scripts/bench.sh --model cnn --epochs 5
#
# Environment: MEP_CMAKE_ARGS  extra CMake configure arguments
#              MEP_BUILD_DIR   build directory (default: build)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
trap 'echo "bench.sh: FAILED (exit $?)" >&2' ERR

# The model (for the JSON name) and whether --json was given; both --opt v and --opt=v.
model="mlp"
have_model=0
have_json=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --model) have_model=1; model="${args[i + 1]:-$model}" ;;
    --model=*) have_model=1; model="${args[i]#--model=}" ;;
    --json | --json=*) have_json=1 ;;
  esac
done
extra=()
[[ $have_model -eq 1 ]] || extra+=(--model "$model")
[[ $have_json -eq 1 ]] || extra+=(--json "results/mnist_${model}.json")

prepare
step "build: mep_bench, $jobs jobs"
cmake --build "$build_dir" -j "$jobs" --target mep_bench
step "run: mep_bench ${extra[*]} $*"
"$build_dir/bench/mep_bench" "${extra[@]+"${extra[@]}"}" "$@"
step "done"
