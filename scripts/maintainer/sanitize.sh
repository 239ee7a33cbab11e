#!/usr/bin/env bash
# The test suite under AddressSanitizer (with LeakSanitizer) and UndefinedBehaviorSanitizer:
# builds into build-asan/ with -DMEP_SANITIZE=ON and runs ctest there (the install consumer,
# which builds an outside project without the sanitizers, is left out). Needs what
# scripts/test.sh installs; arguments go to ctest.
#
#   scripts/maintainer/sanitize.sh [ctest arguments...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
trap 'echo "sanitize.sh: FAILED (exit $?)" >&2' ERR

build_dir="${MEP_ASAN_BUILD_DIR:-build-asan}"
bash scripts/setup.sh
bash data/make_datasets.sh
step "configure: $build_dir (ASan + UBSan)"
cmake -S . -B "$build_dir" --log-level=WARNING -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMEP_SANITIZE=ON \
  -DMEP_BUILD_TESTS=ON -DMEP_BUILD_BENCH=ON -DMEP_BUILD_EXAMPLES=OFF
step "build: tests, mep_bench, mep_ops and mep_options, $jobs jobs"
cmake --build "$build_dir" -j "$jobs" --target mep_tests mep_gradient_tests mep_idx_replay mep_bench mep_ops mep_options
step "test: ctest under the sanitizers"
# Not here: the install consumer (scripts/test.sh builds it) and results.quick, which times the
# benchmark binaries (mep_speed, mep_micro) this build does not make; mep_bench's own code runs
# under the sanitizers in the bench.* tests.
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  ctest --test-dir "$build_dir" --output-on-failure -j2 -E 'install\.consumer|results\.quick' "$@"
step "done"
