# Shared by scripts/bench.sh and scripts/test.sh (sourced, not run): installs the system
# packages, makes the datasets and configures one build directory with the same options,
# so that the two scripts share it without reconfiguring each other.
#
# Environment: MEP_CMAKE_ARGS  extra CMake configure arguments
#              MEP_BUILD_DIR   build directory (default: build)

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build_dir="${MEP_BUILD_DIR:-build}"
read -r -a cmake_args <<<"${MEP_CMAKE_ARGS:-}"
jobs="$(nproc)"

step() { echo "==> [$(date +%T)] $*"; }

prepare() {
  step "setup: system packages"
  bash scripts/setup.sh
  step "data: MNIST and Fashion-MNIST"
  bash data/make_datasets.sh
  step "configure: $build_dir (Release)"
  cmake -S . -B "$build_dir" --log-level=WARNING -DCMAKE_BUILD_TYPE=Release \
    -DMEP_BUILD_TESTS=ON -DMEP_BUILD_BENCH=ON -DMEP_BUILD_EXAMPLES=ON "${cmake_args[@]+"${cmake_args[@]}"}"
}
