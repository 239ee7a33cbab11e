#!/usr/bin/env bash
# CUDA check: builds mep against a CUDA LibTorch on a Linux machine with an NVIDIA GPU, runs
# the test suite and a few mep_bench runs on the GPU, and collects everything needed to
# diagnose the result in one go. A failing step is logged and the script goes on, so that one
# call gathers all the information.
#
#   bash scripts/maintainer/cuda_check.sh           the check (steps below); outputs into $OUT,
#                                                   by default build-cuda/report/
#   bash scripts/maintainer/cuda_check.sh --help    this text
#   bash scripts/maintainer/cuda_check.sh --stage   (on a Debian 12 machine with mep's packages,
#                                                   see scripts/setup.sh) fills .device/ from the
#                                                   system, for a GPU machine without network
#
# What the machine needs:
#   - an NVIDIA GPU and driver (nvidia-smi), the CUDA toolkit (nvcc: PATH, CUDACXX, CUDA_HOME or
#     /usr/local/cuda*), CMake, a C++17 compiler, preferably Ninja, and python3;
#   - a CUDA LibTorch: by default that of the installed PyTorch (python3 -c 'import torch;
#     print(torch.utils.cmake_prefix_path)'), else Torch_DIR (the directory of TorchConfig.cmake)
#     or CMAKE_PREFIX_PATH (e.g. an unpacked libtorch/ from pytorch.org) in the environment;
#   - GoogleTest, Google Benchmark, fmt, CLI11, nlohmann-json and zlib where CMake finds them
#     (system packages: scripts/setup.sh names Debian's; or prefixes in CMAKE_PREFIX_PATH);
#   - the MNIST subset in data/mnist (data/make_datasets.sh).
#
# Without network (the form the maintainers' GPU runs use): when .device/ (MEP_DEVICE_DIR)
# exists, the dependencies come from it instead, made by --stage on a machine that has them:
#   .device/googletest/         GoogleTest sources (Debian's /usr/src/googletest, 1.12), built into /tmp
#   .device/benchmark/          Google Benchmark sources (v1.7.1: CMakeLists.txt cmake include src),
#                               built into /tmp (BENCHMARK_SRC=<checkout> when staging)
#   .device/benchmark-debian/   Debian's prebuilt libbenchmark (shared), fallback prefix
#   .device/prefix/             CLI11 and nlohmann_json headers + CMake configs (relocatable)
#   .device/fmt/                Debian's libfmt (headers, CMake config; used header-only)
#   .device/zlib/               zlib.h, zconf.h and a static libz.a
# and the check keeps within a budget of 510 s (MEP_CHECK_BUDGET).
#
# Steps, each time-boxed (`timeout`) so that one hang cannot eat the budget: info (GPU,
# compilers, CMake, PyTorch), deps (only with .device/: GoogleTest and Google Benchmark from its
# sources), configure (build-cuda/, Ninja, Release, against the CUDA LibTorch; retried once
# with fallback CUDA flags; CMake then finds a CUDA LibTorch and builds the MEP_WITH_CUDA parts:
# tests/test_cuda_graph.cpp and mep_bench --cuda-graph), build (all targets, -k 0: every
# compile error in one log; if mep_bench fails to compile with MEP_WITH_CUDA, it is built again
# without, -DMEP_CUDA=OFF, in build-cuda-nograph/, so that the eager timings still come), ctest
# (first the CUDA graph tests, `ctest -R '^cuda\.'`, then the rest of the suite,
# -j$MEP_CTEST_JOBS), bench (mep_bench --device cuda, ms/step: mlp_small and mlp at batch 128,
# the EP family eager next to SGD, then each EP optimizer with --cuda-graph; if time remains,
# mlp_small at batch 1024 and cnn at batch 128, eager and graphed; last the CPU for comparison),
# summary (the step times side by side, the graphs' speed-ups). Exit status: that of the build
# (of the configure when the build step is not run).
#
# Outputs in $OUT (at most 6 files): check.log (everything printed), configure.log
# (dependency builds and the CMake configure runs), build.log, ctest.log, bench.log,
# bench.json (all mep_bench JSON results, keyed by run).
#
# Environment:
#   OUT                 output directory (default: $MEP_BUILD_DIR/report)
#   MEP_BUILD_DIR       build directory (default: build-cuda)
#   MEP_DEVICE_DIR      staged dependencies (default: .device; used only when it exists)
#   MEP_CUDA_ARCH       CUDA architecture, e.g. 90 (default: the GPU's compute capability,
#                       from nvidia-smi; 90 if it cannot tell)
#   MEP_CHECK_JOBS      parallel jobs (default: the online cores; not nproc, which obeys OMP_NUM_THREADS)
#   MEP_CTEST_JOBS      parallel tests of ctest (default: the cores, at most 12; one intra-op thread each)
#   MEP_CHECK_BUDGET    wall-clock budget in seconds; later steps shrink or are skipped to
#                       stay within it (default: 510 with .device/, else 3600)
#   MEP_CHECK_STEPS     steps to run (default: "info deps configure build ctest bench")
#   MEP_CHECK_NO_GPU=1  dry run on a machine without GPU: no nvidia-smi, no torch query,
#                       no CUDA flags (CMake finds whatever LibTorch it finds), CPU bench only
#   MEP_BENCH_TRAIN / MEP_BENCH_TEST   samples of the mlp_small runs (default: 8000 / 2000)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
ROOT="$(pwd)"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -uo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 0
elif [[ -n "${1:-}" && "$1" != "--stage" ]]; then
  echo "cuda_check.sh: unknown argument '$1' (see --help)" >&2
  exit 2
fi

# ---------------------------------------------------------------------------- --stage
if [[ "${1:-}" == "--stage" ]]; then
  set -e
  dev="${MEP_DEVICE_DIR:-$ROOT/.device}"
  arch="$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)"
  lib="/usr/lib/$arch"
  echo "stage: $dev (from the system packages; multiarch $arch)"
  rm -rf "$dev"
  mkdir -p "$dev/prefix/include" "$dev/prefix/share/cmake" "$dev/zlib/include" "$dev/zlib/lib" \
    "$dev/benchmark-debian/include" "$dev/benchmark-debian/lib/$arch/cmake"
  cp -a /usr/src/googletest "$dev/googletest"
  cp -a /usr/include/CLI /usr/include/nlohmann "$dev/prefix/include/"
  cp -a /usr/share/cmake/CLI11 /usr/share/cmake/nlohmann_json "$dev/prefix/share/cmake/"
  cp /usr/include/zlib.h /usr/include/zconf.h "$dev/zlib/include/"
  # fmt (the bench and tools link fmt::fmt-header-only): headers and its CMake package, which
  # finds them relative to itself and checks that the shared library it also declares exists,
  # so that is copied too, under its real name and soname.
  mkdir -p "$dev/fmt/include" "$dev/fmt/lib/$arch/cmake"
  cp -a /usr/include/fmt "$dev/fmt/include/"
  cp -a "$lib/cmake/fmt" "$dev/fmt/lib/$arch/cmake/"
  real="$(readlink -f "$lib/libfmt.so")"
  soname="$(objdump -p "$real" | awk '/SONAME/ {print $2}')"
  cp "$real" "$dev/fmt/lib/$arch/"
  cp "$real" "$dev/fmt/lib/$arch/$soname"
  cp "$real" "$dev/fmt/lib/$arch/libfmt.so"
  cp "$lib/libz.a" "$dev/zlib/lib/"
  # Debian's benchmark is a shared library: copy it under its real name and its soname.
  cp -a /usr/include/benchmark "$dev/benchmark-debian/include/"
  cp -a "$lib/cmake/benchmark" "$dev/benchmark-debian/lib/$arch/cmake/"
  cp "$lib/libbenchmark_main.a" "$dev/benchmark-debian/lib/$arch/"
  real="$(readlink -f "$lib/libbenchmark.so")"
  soname="$(objdump -p "$real" | awk '/SONAME/ {print $2}')"
  cp "$real" "$dev/benchmark-debian/lib/$arch/"
  cp "$real" "$dev/benchmark-debian/lib/$arch/$soname"
  # Google Benchmark sources: BENCHMARK_SRC (a checkout of google/benchmark, v1.7.1 = Debian's).
  if [[ -n "${BENCHMARK_SRC:-}" ]]; then
    mkdir -p "$dev/benchmark"
    (cd "$BENCHMARK_SRC" && cp -a CMakeLists.txt cmake include src LICENSE "$dev/benchmark/")
  else
    echo "stage: BENCHMARK_SRC not set: no .device/benchmark (the check uses benchmark-debian)"
  fi
  # The CMake package files must find their files relative to themselves, not under /usr.
  if grep -rlE '"/usr/(include|lib)' "$dev/prefix/share/cmake" "$dev/benchmark-debian/lib" "$dev/fmt/lib" \
      | xargs -r grep -LE '_IMPORT_PREFIX|PACKAGE_PREFIX_DIR' | grep .; then
    echo "stage: WARNING: the files above hard-code /usr"
  fi
  find "$dev" -type l -print -delete
  du -sh "$dev"
  exit 0
fi

# ---------------------------------------------------------------------------- setup
DEV="${MEP_DEVICE_DIR:-$ROOT/.device}"
BUILD="${MEP_BUILD_DIR:-build-cuda}"
OUT="${OUT:-$BUILD/report}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
STAGED=0  # the offline form: dependencies from .device/
[[ -d "$DEV" ]] && STAGED=1
JOBS="${MEP_CHECK_JOBS:-$(getconf _NPROCESSORS_ONLN)}"
if ((STAGED)); then BUDGET="${MEP_CHECK_BUDGET:-510}"; else BUDGET="${MEP_CHECK_BUDGET:-3600}"; fi
STEPS=" ${MEP_CHECK_STEPS:-info deps configure build ctest bench} "
NO_GPU="${MEP_CHECK_NO_GPU:-0}"
WORK="/tmp/mep-cuda-check"
GTEST_PREFIX=/tmp/gtest-prefix
BENCH_PREFIX=/tmp/benchmark-prefix
T0=$(date +%s)

rm -rf "$WORK" && mkdir -p "$WORK/json"
rm -f "$OUT"/{check.log,configure.log,build.log,ctest.log,bench.log,bench.json}
exec > >(tee -a "$OUT/check.log") 2>&1
TEE_PID=$!
finish() {
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null
}
trap finish EXIT

elapsed() { echo $(($(date +%s) - T0)); }
remaining() { echo $((BUDGET - $(elapsed))); }
log() { printf '[%s +%4ds] %s\n' "$(date +%T)" "$(elapsed)" "$*"; }
want() { [[ "$STEPS" == *" $1 "* ]]; }
min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }

declare -a SUMMARY=()
STEP_NAME="" STEP_T0=0
begin() { STEP_NAME="$1"; STEP_T0=$(date +%s); log "==== $1: $2"; }
end() {  # end <status text>
  local secs=$(($(date +%s) - STEP_T0))
  log "==== $STEP_NAME: $1 (${secs}s)"
  SUMMARY+=("$(printf '%-10s %-48s %5ss' "$STEP_NAME" "$1" "$secs")")
}

# ---------------------------------------------------------------------------- info
TORCH_PREFIX="" TORCH_ABI="" NVCC="" CUDA_ROOT="" NVTX_DIR="" ARCH=90
GEN="Ninja"
command -v ninja >/dev/null || GEN="Unix Makefiles"

if want info; then
  begin info "machine, compilers, CMake, PyTorch, CUDA"
  echo "repo: $ROOT ($(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))  out: $OUT  jobs: $JOBS  budget: ${BUDGET}s"
  uname -srm
  grep -h PRETTY_NAME /etc/os-release 2>/dev/null
  ldd --version 2>/dev/null | head -1
  echo "cores: $(nproc)  memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')  /tmp free: $(df -h /tmp | awk 'NR==2 {print $4}')"
  if [[ "$NO_GPU" != 1 ]]; then
    nvidia-smi -L || echo "nvidia-smi -L failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>/dev/null
  fi
  for c in c++ g++ gcc clang++; do
    command -v "$c" >/dev/null && echo "$c: $(command -v "$c") -> $("$c" --version | head -1)"
  done
  echo "cmake: $(command -v cmake) $(cmake --version | head -1)"
  echo "ctest: $(ctest --version | head -1)"
  echo "generator: $GEN $(command -v ninja >/dev/null && ninja --version)"
  echo "python3: $(command -v python3) $(python3 --version 2>&1)"
  ((STAGED)) && echo "staged dependencies: $(du -sh "$DEV" 2>/dev/null | cut -f1) in $DEV ($(ls "$DEV" 2>/dev/null | tr '\n' ' '))"
  echo "data/mnist: $(ls data/mnist 2>/dev/null | tr '\n' ' ')"
  [[ -d data/mnist ]] || log "WARNING: no data/mnist (data/make_datasets.sh): the data tests and mep_bench runs will fail"
  ((STAGED)) || echo "no $DEV: dependencies from the system (and CMAKE_PREFIX_PATH), budget ${BUDGET}s"
  end "done"
fi

if [[ "$NO_GPU" != 1 ]]; then
  begin torch "PyTorch (python3) and the CUDA toolkit (nvcc)"
  # PyTorch: version, CUDA, C++ ABI and the CMake prefix of its LibTorch.
  python3 - >"$WORK/torch.txt" 2>&1 <<'EOF'
import torch
print("torch_version=" + torch.__version__)
print("torch_cuda=" + str(torch.version.cuda))
print("torch_cudnn=" + str(torch.backends.cudnn.version()))
print("torch_cxx11_abi=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
print("torch_cuda_available=" + str(torch.cuda.is_available()))
if torch.cuda.is_available():
    print("torch_device=" + torch.cuda.get_device_name(0) + " sm_%d%d" % torch.cuda.get_device_capability(0))
print("torch_prefix=" + torch.utils.cmake_prefix_path)
EOF
  cat "$WORK/torch.txt"
  TORCH_PREFIX="$(sed -n 's/^torch_prefix=//p' "$WORK/torch.txt")"
  TORCH_ABI="$(sed -n 's/^torch_cxx11_abi=//p' "$WORK/torch.txt")"
  if [[ -n "${Torch_DIR:-}" ]]; then
    echo "Torch_DIR (environment): $Torch_DIR"
    [[ -f "$Torch_DIR/TorchConfig.cmake" ]] || log "WARNING: no TorchConfig.cmake in Torch_DIR=$Torch_DIR"
  elif [[ -z "$TORCH_PREFIX" || ! -d "$TORCH_PREFIX/Torch" ]]; then
    if [[ -n "${CMAKE_PREFIX_PATH:-}" ]]; then
      echo "no PyTorch LibTorch; CMake looks in CMAKE_PREFIX_PATH=$CMAKE_PREFIX_PATH"
    else
      log "WARNING: no LibTorch: no Torch CMake package under '$TORCH_PREFIX' (python3 torch), and neither Torch_DIR nor CMAKE_PREFIX_PATH is set"
    fi
  fi

  # The GPU's architecture (compute capability 9.0 -> 90), for nvcc and LibTorch's CMake.
  ARCH="${MEP_CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')}"
  [[ "$ARCH" =~ ^[0-9]+$ ]] || { log "WARNING: compute capability unknown: architecture 90"; ARCH=90; }
  ARCH_DOT="${ARCH%?}.${ARCH: -1}"  # 90 -> 9.0, TORCH_CUDA_ARCH_LIST's spelling
  echo "CUDA architecture: $ARCH ($ARCH_DOT)"
  # nvcc and the toolkit around it.
  for c in "${CUDACXX:-}" "$(command -v nvcc 2>/dev/null)" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" \
           /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc /opt/cuda/bin/nvcc; do
    if [[ -n "$c" && -x "$c" ]]; then NVCC="$c"; break; fi
  done
  if [[ -n "$NVCC" ]]; then
    CUDA_ROOT="$(dirname "$(dirname "$NVCC")")"
    for d in "$CUDA_ROOT/include" "$CUDA_ROOT/targets/x86_64-linux/include"; do
      [[ -d "$d/nvtx3" ]] && { NVTX_DIR="$d"; break; }
    done
    echo "nvcc: $NVCC -> $(readlink -f "$NVCC")"
    "$NVCC" --version | tail -2
    echo "CUDA root: $CUDA_ROOT  nvtx3 headers: ${NVTX_DIR:-not found}"
    # The CUDA settings CMake reads from the environment: also seen by the nested configure
    # of the install.consumer test, which gets no -D flags for them.
    export CUDACXX="$NVCC" CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT" CUDAToolkit_ROOT="$CUDA_ROOT" \
      CUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT"
    export CUDAARCHS="$ARCH" TORCH_CUDA_ARCH_LIST="$ARCH_DOT" PATH="$CUDA_ROOT/bin:$PATH"
  else
    log "WARNING: no nvcc found (PATH, CUDACXX, CUDA_HOME, /usr/local/cuda*)"
  fi
  end "LibTorch: $([[ -d "$TORCH_PREFIX/Torch" || -n "${Torch_DIR:-}" ]] && echo found || echo "from CMAKE_PREFIX_PATH?"), nvcc: $([[ -n "$NVCC" ]] && echo found || echo MISSING)"
fi
ARCH_DOT="${ARCH%?}.${ARCH: -1}"  # 90 -> 9.0, TORCH_CUDA_ARCH_LIST's spelling
((STAGED)) && export ZLIB_ROOT="$DEV/zlib"  # find_package(ZLIB) of install.consumer
export CMAKE_POLICY_VERSION_MINIMUM=3.5    # CMake 4 and old cmake_minimum_required()s
ABI_FLAG=""
[[ -n "$TORCH_ABI" ]] && ABI_FLAG="-D_GLIBCXX_USE_CXX11_ABI=$TORCH_ABI"

# ---------------------------------------------------------------------------- deps
if want deps && ((!STAGED)); then
  SUMMARY+=("deps       no $DEV: the system's packages (CMAKE_PREFIX_PATH)")
elif want deps; then
  begin deps "GoogleTest -> $GTEST_PREFIX, Google Benchmark -> $BENCH_PREFIX (Release, -j$JOBS)"
  build_dep() {  # build_dep <name> <source> <prefix> <cmake args...>
    local name="$1" src="$2" prefix="$3"; shift 3
    rm -rf "$WORK/$name-build" "$prefix"
    {
      cmake -S "$src" -B "$WORK/$name-build" -G "$GEN" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_INSTALL_PREFIX="$prefix" -DCMAKE_INSTALL_LIBDIR=lib -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
        ${ABI_FLAG:+"-DCMAKE_CXX_FLAGS=$ABI_FLAG"} "$@" &&
        cmake --build "$WORK/$name-build" -j "$JOBS" &&
        cmake --install "$WORK/$name-build"
    } >"$WORK/$name.log" 2>&1
  }
  gtest_rc=1 bench_rc=1
  if [[ -f "$DEV/googletest/CMakeLists.txt" ]]; then
    build_dep gtest "$DEV/googletest" "$GTEST_PREFIX" -DBUILD_GMOCK=OFF &
    gtest_pid=$!
  else
    echo "no $DEV/googletest" >"$WORK/gtest.log"; gtest_pid=""
  fi
  if [[ -f "$DEV/benchmark/CMakeLists.txt" ]]; then
    build_dep benchmark "$DEV/benchmark" "$BENCH_PREFIX" -DBENCHMARK_ENABLE_TESTING=OFF \
      -DBENCHMARK_ENABLE_GTEST_TESTS=OFF -DBENCHMARK_ENABLE_WERROR=OFF -DBENCHMARK_INSTALL_DOCS=OFF \
      -DBENCHMARK_ENABLE_LIBPFM=OFF -DBENCHMARK_ENABLE_LTO=OFF -DBUILD_SHARED_LIBS=OFF &
    bench_pid=$!
  else
    echo "no $DEV/benchmark" >"$WORK/benchmark.log"; bench_pid=""
  fi
  [[ -n "$gtest_pid" ]] && { wait "$gtest_pid"; gtest_rc=$?; }
  [[ -n "$bench_pid" ]] && { wait "$bench_pid"; bench_rc=$?; }
  for name in gtest benchmark; do
    { echo "######## $name build ($WORK/$name.log)"; cat "$WORK/$name.log"; } >>"$OUT/configure.log"
  done
  ((gtest_rc == 0)) || { log "GoogleTest build FAILED:"; tail -25 "$WORK/gtest.log"; }
  if ((bench_rc != 0)); then
    log "Google Benchmark build FAILED (falling back to $DEV/benchmark-debian):"
    tail -25 "$WORK/benchmark.log"
    BENCH_PREFIX="$DEV/benchmark-debian"
  fi
  end "gtest rc=$gtest_rc benchmark rc=$bench_rc"
fi
((STAGED)) && { [[ -d "$BENCH_PREFIX" ]] || BENCH_PREFIX="$DEV/benchmark-debian"; }

# ---------------------------------------------------------------------------- configure
configured=0
CONF_ARGS=()  # the configure that succeeded (for the build without MEP_WITH_CUDA, if needed)
if want configure; then
  begin configure "$BUILD ($GEN, Release)"
  # LibTorch (PyTorch's, or Torch_DIR), then the staged dependencies (offline form) or the
  # caller's CMAKE_PREFIX_PATH; CMake searches the system's prefixes after these.
  prefix_path=""
  [[ -n "$TORCH_PREFIX" && -d "$TORCH_PREFIX/Torch" ]] && prefix_path="$TORCH_PREFIX"
  ((STAGED)) && prefix_path="${prefix_path:+$prefix_path;}$GTEST_PREFIX;$BENCH_PREFIX;$DEV/prefix;$DEV/fmt"
  [[ -n "${CMAKE_PREFIX_PATH:-}" ]] && prefix_path="${prefix_path:+$prefix_path;}${CMAKE_PREFIX_PATH//:/;}"
  common=(-S . -B "$BUILD" -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DMEP_BUILD_TESTS=ON -DMEP_BUILD_BENCH=ON
    -DMEP_BUILD_EXAMPLES=ON)
  [[ -n "$prefix_path" ]] && common+=("-DCMAKE_PREFIX_PATH=$prefix_path")
  [[ -n "${Torch_DIR:-}" ]] && common+=("-DTorch_DIR=$Torch_DIR")
  ((STAGED)) && common+=("-DZLIB_INCLUDE_DIR=$DEV/zlib/include" "-DZLIB_LIBRARY=$DEV/zlib/lib/libz.a")
  cuda1=() cuda2=()
  if [[ -n "$NVCC" ]]; then
    cuda1=("-DCMAKE_CUDA_COMPILER=$NVCC" "-DCUDAToolkit_ROOT=$CUDA_ROOT" "-DCUDA_TOOLKIT_ROOT_DIR=$CUDA_ROOT"
      "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" "-DTORCH_CUDA_ARCH_LIST=$ARCH_DOT")
    [[ -n "$NVTX_DIR" ]] && cuda1+=("-Dnvtx3_dir=$NVTX_DIR")
    # Fallback: the toolkit behind any symlink, nvcc told to accept the host compiler, an
    # explicit host compiler, NVTX3 from the toolkit.
    nvcc_real="$(readlink -f "$NVCC")"
    root_real="$(dirname "$(dirname "$nvcc_real")")"
    cuda2=("-DCMAKE_CUDA_COMPILER=$nvcc_real" "-DCUDA_NVCC_EXECUTABLE=$nvcc_real" "-DCUDAToolkit_ROOT=$root_real"
      "-DCUDA_TOOLKIT_ROOT_DIR=$root_real" "-DCMAKE_CUDA_HOST_COMPILER=$(command -v g++ || command -v c++)"
      -DCMAKE_CUDA_FLAGS=-allow-unsupported-compiler "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" "-DTORCH_CUDA_ARCH_LIST=$ARCH_DOT"
      -DUSE_SYSTEM_NVTX=ON)
    [[ -n "$NVTX_DIR" ]] && cuda2+=("-Dnvtx3_dir=$NVTX_DIR")
  fi
  for attempt in 1 2; do
    if ((attempt == 1)); then flags=("${cuda1[@]+"${cuda1[@]}"}"); else flags=("${cuda2[@]+"${cuda2[@]}"}"); fi
    rm -rf "$BUILD/CMakeCache.txt" "$BUILD/CMakeFiles"
    {
      echo "######## mep configure, attempt $attempt"
      echo "cmake ${common[*]} ${flags[*]}"
    } >>"$OUT/configure.log"
    log "configure attempt $attempt: cmake ${common[*]} ${flags[*]}"
    cmake "${common[@]}" "${flags[@]+"${flags[@]}"}" >"$WORK/configure$attempt.log" 2>&1
    rc=$?
    cat "$WORK/configure$attempt.log" >>"$OUT/configure.log"
    grep -E 'Caffe2|PyTorch:|CUDA|Torch' "$WORK/configure$attempt.log" | grep -v '^--.*Looking for' | head -20
    if ((rc == 0)); then configured=$attempt; CONF_ARGS=("${common[@]}" "${flags[@]+"${flags[@]}"}"); break; fi
    log "configure attempt $attempt FAILED (rc=$rc); errors:"
    grep -n -A12 -E 'CMake Error' "$WORK/configure$attempt.log" | head -60
    [[ -n "$NVCC" ]] || break
  done
  if ((configured)); then
    echo "-- what was found (CMakeCache.txt):"
    grep -E '^(Torch_DIR|Caffe2_DIR|CMAKE_CUDA_COMPILER|CUDAToolkit_ROOT|CUDA_TOOLKIT_ROOT_DIR|GTest_DIR|benchmark_DIR|CLI11_DIR|nlohmann_json_DIR|ZLIB_INCLUDE_DIR|ZLIB_LIBRARY[A-Z_]*|CMAKE_CXX_COMPILER|CMAKE_GENERATOR|nvtx3_dir):' \
      "$BUILD/CMakeCache.txt"
    grep -E '^-- mep: CUDA LibTorch' "$WORK/configure$configured.log"
    echo "-- CMake warnings in the configure: $(grep -c 'CMake Warning' "$WORK/configure$configured.log")"
    grep -A4 'CMake Warning' "$WORK/configure$configured.log" | head -30
    end "OK (attempt $configured)"
  else
    end "FAILED"
  fi
fi

# ---------------------------------------------------------------------------- build
build_rc=1
root_re="$(printf '%s' "$ROOT" | sed 's/[][\.*^$|+?(){}]/\\&/g')"
if want build && { ((configured)) || { ! want configure && [[ -f "$BUILD/CMakeCache.txt" ]]; }; }; then
  limit=$(($(remaining) - 120))
  ((limit < 60)) && limit=60
  begin build "cmake --build $BUILD -j $JOBS (keep going; limit ${limit}s)"
  keep=(-k 0)
  [[ "$GEN" == Ninja ]] || keep=(-k)
  timeout -k 10 "$limit" cmake --build "$BUILD" -j "$JOBS" -- "${keep[@]}" >"$OUT/build.log" 2>&1
  build_rc=$?
  ((build_rc == 124)) && log "build TIMED OUT after ${limit}s"
  n_err=$(grep -cE ': (fatal )?error[: ]|undefined reference' "$OUT/build.log")
  n_failed=$(grep -c '^FAILED: ' "$OUT/build.log")
  ours="^(${root_re}/|(\.\./)+)?(include/mep|bench|tests|examples)/[^ :]+:[0-9]+(:[0-9]+)?: warning:"
  n_warn=$(grep -cE "$ours" "$OUT/build.log")
  n_warn_unique=$(grep -E "$ours" "$OUT/build.log" | sort -u | wc -l)
  n_warn_all=$(grep -cE ': warning:' "$OUT/build.log")
  echo "build rc=$build_rc  error lines: $n_err  failed edges: $n_failed  warnings: $n_warn_all in all, $n_warn in mep's files ($n_warn_unique distinct)"
  if ((n_err + n_failed > 0)); then
    echo "-- first 60 error lines:"
    grep -E ': (fatal )?error[: ]|undefined reference|^FAILED: |collect2: error|ninja: build stopped' "$OUT/build.log" |
      sed "s|$ROOT/||g" | cut -c1-400 | head -60
  fi
  if ((n_warn > 0)); then
    echo "-- mep's warnings (distinct, first 20):"
    grep -E "$ours" "$OUT/build.log" | sed "s|$ROOT/||g" | sort | uniq -c | sort -rn | cut -c1-300 | head -20
  fi
  tail -3 "$OUT/build.log" | cut -c1-300
  if [[ -x "$BUILD/bench/mep_bench" ]]; then
    echo "-- mep_bench links (LibTorch, CUDA runtime, anything not found):"
    ldd "$BUILD/bench/mep_bench" | grep -E 'not found|libtorch|libc10|cudart|libz|benchmark' | sed 's/ (0x.*//'
  fi
  end "rc=$build_rc errors=$n_err failed=$n_failed ours_warn=$n_warn"
fi

# mep_bench with MEP_WITH_CUDA (mep/cuda_graph.hpp, never compiled before this machine) did not
# build: build it without (-DMEP_CUDA=OFF) in a directory of its own, so that the eager CUDA
# timings still come.
BENCH_BIN="$BUILD/bench/mep_bench"
HAS_GRAPH=0
# (CMake defines MEP_WITH_CUDA for mep_bench when it found a CUDA LibTorch.)
if grep -qs 'MEP_WITH_CUDA' "$BUILD/build.ninja" "$BUILD/bench/CMakeFiles/mep_bench.dir/flags.make"; then HAS_GRAPH=1; fi
if want build && ((${#CONF_ARGS[@]})) && [[ ! -x "$BENCH_BIN" ]]; then
  limit=$(min 240 $(($(remaining) - 200)))
  if ((limit >= 60)); then
    begin nograph "mep_bench without MEP_WITH_CUDA in $BUILD-nograph (limit ${limit}s)"
    args=() prev=""
    for a in "${CONF_ARGS[@]}"; do
      if [[ "$prev" == "-B" ]]; then args+=("$BUILD-nograph"); else args+=("$a"); fi
      prev="$a"
    done
    { cmake "${args[@]}" -DMEP_CUDA=OFF -DMEP_BUILD_TESTS=OFF -DMEP_BUILD_EXAMPLES=OFF &&
        timeout -k 10 "$limit" cmake --build "$BUILD-nograph" -j "$JOBS" --target mep_bench; } \
      >"$WORK/nograph.log" 2>&1
    rc=$?
    { echo "######## mep_bench without MEP_WITH_CUDA (rc=$rc)"; cat "$WORK/nograph.log"; } >>"$OUT/build.log"
    tail -3 "$WORK/nograph.log" | cut -c1-300
    if [[ -x "$BUILD-nograph/bench/mep_bench" ]]; then BENCH_BIN="$BUILD-nograph/bench/mep_bench"; HAS_GRAPH=0; fi
    end "rc=$rc (bench: $BENCH_BIN, --cuda-graph runs: $HAS_GRAPH)"
  else
    SUMMARY+=("nograph    skipped: out of time budget")
  fi
fi

# ---------------------------------------------------------------------------- ctest
built_any() {  # any of the main executables built?
  local f
  for f in tests/mep_tests tests/mep_gradient_tests bench/mep_bench examples/quickstart; do
    [[ -f "$BUILD/$f" && -x "$BUILD/$f" ]] && return 0
  done
  return 1
}
CTEST_JOBS="${MEP_CTEST_JOBS:-$(min "$JOBS" 12)}"
run_ctest() {  # run_ctest <name> <limit s> <ctest args...>: into $OUT/ctest.log, summarised here
  local name="$1" limit="$2"; shift 2
  begin "$name" "ctest -j$CTEST_JOBS $* (1 thread per test, limit ${limit}s)"
  (cd "$BUILD" && MEP_SOURCE_DIR="$ROOT" OMP_NUM_THREADS=1 timeout -k 10 "$limit" \
    ctest -j"$CTEST_JOBS" --output-on-failure --timeout 200 "$@") >"$WORK/$name.log" 2>&1
  local rc=$?
  { echo "######## $name (rc=$rc): ctest $*"; cat "$WORK/$name.log"; } >>"$OUT/ctest.log"
  ((rc == 124)) && log "$name TIMED OUT after ${limit}s"
  grep -E 'tests passed|tests failed|Total Test time|No tests were found' "$WORK/$name.log"
  local failed
  failed="$(sed -n '/The following tests FAILED:/,/^$/p' "$WORK/$name.log" | grep -vE 'FAILED:|^$' | sed 's/^[[:space:]]*//')"
  [[ -n "$failed" ]] && { echo "-- failing tests:"; echo "$failed"; }
  grep -E 'Skipped|SKIPPED' "$WORK/$name.log" | head -10
  ((rc == 124)) && tail -15 "$WORK/$name.log"
  end "rc=$rc $(grep -oE '[0-9]+% tests passed, [0-9]+ tests failed out of [0-9]+' "$WORK/$name.log")"
}
if want ctest && [[ -f "$BUILD/CTestTestfile.cmake" ]] && built_any; then
  rm -f "$OUT/ctest.log"
  if ((HAS_GRAPH)); then
    limit=$(min 90 $(($(remaining) - 200)))
    if ((limit >= 20)); then
      run_ctest ctest_graph "$limit" -R '^cuda\.'
      # The graph tests' own output (captures, differences, the first failure), for the summary.
      grep -E '^\[ *(RUN|OK|FAILED|SKIPPED) *\]|Failure|Expected|Which is|mep: ' "$WORK/ctest_graph.log" | head -60
    else
      SUMMARY+=("ctest      cuda graph tests skipped: out of time budget")
    fi
  else
    SUMMARY+=("ctest      no cuda graph tests (MEP_WITH_CUDA parts not configured)")
  fi
  limit=$(min 200 $(($(remaining) - 150)))
  if ((limit < 30)); then
    SUMMARY+=("ctest      skipped: out of time budget")
  else
    run_ctest ctest "$limit" -E '^cuda\.'
  fi
elif want ctest; then
  SUMMARY+=("ctest      skipped: no test binaries in $BUILD")
fi

# ---------------------------------------------------------------------------- bench
merge_json() {
  python3 - "$WORK/json" "$OUT/bench.json" <<'EOF' || cp "$WORK"/json/*.json "$OUT/" 2>/dev/null
import glob, json, os, sys
runs = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    try:
        runs[os.path.basename(f)[:-5]] = json.load(open(f))
    except Exception as e:
        runs[os.path.basename(f)[:-5]] = {"error": str(e)}
json.dump(runs, open(sys.argv[2], "w"), indent=1)
EOF
}
run_bench() {  # run_bench <name> <limit s> <mep_bench args...>
  local name="$1" limit="$2"; shift 2
  local left=$(($(remaining) - 15))
  if ((left < 30)); then
    log "bench $name: skipped (out of time budget)"; SUMMARY+=("bench      $name skipped: out of time"); return
  fi
  limit=$(min "$limit" "$left")
  begin "bench" "$name: mep_bench $* (limit ${limit}s)"
  timeout -k 5 "$limit" "$BENCH_BIN" --data data/mnist --json "$WORK/json/$name.json" "$@" >"$WORK/$name.txt" 2>&1
  local rc=$?
  { echo "######## $name (rc=$rc): mep_bench $*"; cat "$WORK/$name.txt"; } >>"$OUT/bench.log"
  grep -E '^\|' "$WORK/$name.txt" || tail -8 "$WORK/$name.txt"
  merge_json
  end "$name rc=$rc"
}
# bench_pair <model> <batch> <train> <optimizers, eager> <optimizers, graphed> [epochs]: the eager run
# (with SGD, the plain baseline) and one --cuda-graph run per EP optimizer, so that one that
# fails to capture does not hide the others. Run names: <model>_b<batch>_eager and
# <model>_b<batch>_graph_<optimizer>, which the summary pairs.
bench_pair() {
  local model="$1" batch="$2" train="$3" eager="$4" graphed="$5" epochs="${6:-1}" o
  local args=(--model "$model" --batch "$batch" --epochs "$epochs" --train "$train" --test 2000 --device cuda)
  run_bench "${model}_b${batch}_eager" 60 "${args[@]}" --optimizers "$eager"
  if ((HAS_GRAPH)); then
    for o in ${graphed//,/ }; do
      run_bench "${model}_b${batch}_graph_$o" 30 "${args[@]}" --optimizers "$o" --cuda-graph
    done
  fi
}
if want bench && [[ -x "$BENCH_BIN" ]]; then
  "$BENCH_BIN" --help | grep -E -- '^ *--(optimizers|device|cuda-graph) ' | sed 's/^ *//'
  if [[ "$NO_GPU" != 1 ]]; then
    # Batch 128 on 7680 samples: 60 full batches (no smaller last batch to capture again for);
    # with --cuda-graph, 3 eager warm-up steps, 1 capture and 56 replays, all timed.
    ep=eqprop,smep,sdmep,local_ep,natural_ep
    bench_pair mlp_small 128 7680 "sgd,$ep" "$ep"
    bench_pair mlp 128 7680 "sgd,$ep" eqprop,smep
    # If time remains: a larger batch, and the cnn.
    bench_pair mlp_small 1024 7168 sgd,eqprop,smep eqprop,smep 2  # 14 steps: 10 replays
    bench_pair cnn 128 3840 sgd,eqprop,smep eqprop,smep
  fi
  # The CPU, for comparison (what the check ran before the graphs), last.
  run_bench mlp_small_cpu 60 --model mlp_small --epochs 1 --train "${MEP_BENCH_TRAIN:-7680}" \
    --test "${MEP_BENCH_TEST:-2000}" --device cpu --threads "$JOBS"
elif want bench; then
  SUMMARY+=("bench      skipped: no $BENCH_BIN")
fi

# ---------------------------------------------------------------------------- summary
log "==== summary"
printf '%s\n' "${SUMMARY[@]+"${SUMMARY[@]}"}"
[[ -f "$WORK/torch.txt" ]] && grep -E '^torch_(version|cuda|device|cuda_available)=' "$WORK/torch.txt" | tr '\n' ' ' && echo
if [[ -f "$OUT/bench.json" ]]; then
  python3 - "$OUT/bench.json" <<'EOF'
import json, re, sys
runs = json.load(open(sys.argv[1]))
rows = {}  # (run, optimizer) -> {"eager": result, "graph": result}
for name, run in runs.items():
    m = re.match(r"(.+_b\d+)_(eager|graph)(?:_.+)?$", name)
    for r in run.get("results", []):
        key = (m.group(1) if m else name, r["optimizer"])
        rows.setdefault(key, {})["graph" if m and m.group(2) == "graph" else "eager"] = r
def cell(r):
    return "-" if r is None else "%.2f (%.3f)" % (r.get("step_ms", float("nan")), r.get("best_val_acc", float("nan")))
if rows:
    print("mep_bench: ms/step (best test accuracy); graph = --cuda-graph, its warm-up steps and capture included")
    print("%-16s %-11s %16s %16s %8s" % ("run", "optimizer", "eager", "graph", "speed-up"))
    for (run, opt), v in rows.items():
        e, g = v.get("eager"), v.get("graph")
        up = "%.2fx" % (e["step_ms"] / g["step_ms"]) if e and g and g.get("step_ms") else "-"
        print("%-16s %-11s %16s %16s %8s" % (run, opt, cell(e), cell(g), up))
failed = [n for n, run in runs.items() if "results" not in run]
if failed:
    print("runs without results: " + " ".join(failed))
EOF
fi
# Graphed runs that failed (mep_bench writes no JSON then): their one-line error.
for f in "$WORK"/*_graph_*.txt; do
  [[ -f "$f" ]] || continue
  [[ -f "$WORK/json/$(basename "$f" .txt).json" ]] && continue
  echo "$(basename "$f" .txt): $(grep -h '^mep_bench' "$f" | tail -1 | cut -c1-400)"
done
echo "outputs in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
log "total $(elapsed)s"
if want build; then
  exit "$build_rc"
elif want configure; then
  ((configured)) && exit 0 || exit 1
fi
exit 0
