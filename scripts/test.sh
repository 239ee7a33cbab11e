#!/usr/bin/env bash
# Quick start, tests: installs the dependencies, makes the datasets, builds everything
# (library tests, mep_bench, examples) into build/ and runs the test suite.
#
#   scripts/test.sh [ctest arguments...]      e.g. scripts/test.sh -R gradient
#
# Environment: MEP_CMAKE_ARGS  extra CMake configure arguments (e.g. -DMEP_BUILD_BENCH=OFF)
#              MEP_BUILD_DIR   build directory (default: build)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build_dir="${MEP_BUILD_DIR:-build}"
read -r -a cmake_args <<<"${MEP_CMAKE_ARGS:-}"
jobs="$(nproc)"
trap 'echo "test.sh: FAILED (exit $?)" >&2' ERR

step() { echo "==> [$(date +%T)] $*"; }

step "setup: system packages"
bash scripts/setup.sh
step "data: MNIST and Fashion-MNIST"
bash data/make_datasets.sh
step "configure: $build_dir (Release)"
cmake -S . -B "$build_dir" --log-level=WARNING -DCMAKE_BUILD_TYPE=Release \
  -DMEP_BUILD_TESTS=ON -DMEP_BUILD_BENCH=ON -DMEP_BUILD_EXAMPLES=ON "${cmake_args[@]+"${cmake_args[@]}"}"
step "build: all targets, $jobs jobs"
cmake --build "$build_dir" -j "$jobs"
step "test: ctest $*"
ctest --test-dir "$build_dir" --output-on-failure -j2 "$@"
step "done"
