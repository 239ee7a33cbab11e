#!/usr/bin/env bash
# Quick start, tests: installs the dependencies, makes the datasets, builds everything
# (library tests, mep_bench, examples) into build/ and runs the test suite.
#
#   scripts/test.sh [ctest arguments...]      e.g. scripts/test.sh -R gradient
#
# Environment: MEP_CMAKE_ARGS  extra CMake configure arguments (e.g. -DMEP_BUILD_BENCH=OFF)
#              MEP_BUILD_DIR   build directory (default: build)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
trap 'echo "test.sh: FAILED (exit $?)" >&2' ERR

prepare
step "build: all targets, $jobs jobs"
cmake --build "$build_dir" -j "$jobs"
step "test: ctest $*"
ctest --test-dir "$build_dir" --output-on-failure -j2 "$@"
step "done"
