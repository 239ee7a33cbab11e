#!/usr/bin/env bash
# Regenerates the results: reruns the benchmarks behind one table (or picture) at its protocol
# and rewrites the table between its markers, <!-- results:MARKER --> and <!-- /results:MARKER -->,
# in README.md and docs/*.md, and its picture, docs/NAME.svg.
#
#   scripts/results.sh --list            the tables, what each holds and how long it takes
#   scripts/results.sh TABLE [--reuse]   rerun TABLE's benchmarks and rewrite it (and its picture)
#   scripts/results.sh --quick [DIR]     every table's pipeline on a tiny protocol, into copies of
#                                        the marked pages in DIR (default $MEP_BUILD_DIR/results-quick)
#
# Options: --reuse      keep a run whose JSON is already in results/ (to finish an interrupted
#                       Fashion-MNIST table); without it every run is made again
#          --no-build   use the binaries as they are; by default the needed targets are built
#                       (cmake --build) first when the build directory is configured
#
# The runs' JSON, text output and logs go to results/ (not tracked); TABLE rewrites the tracked
# pages and pictures, --quick never writes outside DIR (and refuses a DIR that holds tracked
# files). The CUDA table needs a GPU: without one it is refused (TABLE) or skipped (--quick).
#
# Environment: MEP_BUILD_DIR       build directory (default: build), as scripts/bench.sh
#              MEP_RESULTS_JOBS    runs at a time for the Fashion-MNIST tables (default: 2)
#              MEP_RESULTS_PAGES   directory holding README.md and docs/ to copy for --quick
#                                  (default: the repository)
set -euo pipefail
CALLER="$(pwd)"  # --quick DIR is relative to where the script was called from
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
build_dir="${MEP_BUILD_DIR:-build}"
jobs="$(nproc)"
JOBS="${MEP_RESULTS_JOBS:-2}"

# ---------------------------------------------------------------------------- the tables
# The single source of truth: NAME | CMake targets it needs | PAGE:MARKER ... | picture (under
# docs/, or -) | time on the 2-core machine of the results | what it is. Each NAME has a
# pipeline function, table_NAME, below.
TABLES=(
  "mlp_small|mep_bench|docs/results.md:mlp_small README.md:mlp_small-short|mlp_small.svg|45 s (measured)|MNIST subset, mlp_small: 8 optimizers x seeds 0,1,2, 10 epochs"
  "mlp|mep_bench|docs/results.md:mlp README.md:mlp-short|mlp.svg|2.5 min (measured)|MNIST subset, mlp (dropout 0.2): 8 optimizers x seeds 0,1,2, 10 epochs"
  "cnn|mep_bench|docs/results.md:cnn README.md:cnn-short|cnn.svg|~30 min (estimated from the ms/step of its table, 1 thread)|MNIST subset, cnn: 8 optimizers x seeds 0,1,2, 10 epochs, 1 thread"
  "fashion_mlp|mep_bench|docs/results.md:fashion_mlp|fashion_mlp.svg|~1 h (about 25 min per seed for the 8 optimizers, 10 for the clip runs; 2 runs at a time)|full Fashion-MNIST, mlp: 8 optimizers x 3 seeds, and SMEP/SDMEP with the clip rule"
  "fashion_cnn|mep_bench|docs/results.md:fashion_cnn|fashion_cnn.svg|~7 h (33 runs: EP 20-40 min each, NaturalEP 50, Adam and SGD 12; 2 at a time)|full Fashion-MNIST, cnn: one optimizer and seed per run, clip and scale rules"
  "ce_nudging|mep_bench|docs/results.md:ce_nudging|-|20 s (measured; 4 min while two compilers shared the cores)|MNIST subset, mlp_small: the EP family with cross-entropy nudging, reference settling"
  "gradients|mep_gradient_tests|docs/results.md:gradients|-|6 s (measured)|EP gradients against backprop: relative errors of the equivalence suite"
  "speed|mep_speed|docs/speed.md:speed|-|9-10 min (measured)|one training step of every optimizer, its floor, the directions (Google Benchmark)"
  "ops|mep_ops|docs/speed.md:ops|-|10-20 s (measured)|ATen operators (launches) and host reads per step (mep_ops)"
  "settling|mep_micro|docs/settling.md:settling|-|~5 min (estimated: the fixtures settle to convergence, then 30 benchmarks x 3 repetitions)|settling variants: cosine to the converged EP gradient, time against backprop (mep_micro)"
  "cuda|mep_bench|docs/cuda.md:cuda|-|a few minutes; needs an NVIDIA GPU and a CUDA LibTorch build|mep_bench --device cuda against the CPU, mlp_small, 2 epochs of 8,000 digits"
)
# A marker may appear in README.md and any docs/*.md: every occurrence is rewritten.

field() {  # field NAME INDEX: one field of NAME's entry
  local t
  for t in "${TABLES[@]}"; do
    [[ "${t%%|*}" == "$1" ]] && { cut -d'|' -f"$2" <<<"$t"; return 0; }
  done
  return 1
}
names() { local t; for t in "${TABLES[@]}"; do echo "${t%%|*}"; done; }

die() { echo "results.sh: $*" >&2; exit 2; }
note() { echo "==> [$(date +%T)] $*"; }

# ---------------------------------------------------------------------------- helpers
# run LOG CMD...: one run, its output (progress, table) into LOG; on failure the log's tail.
run() {
  local log="$1"; shift
  mkdir -p "$(dirname "$log")"
  if ! "$@" >"$log" 2>&1; then
    echo "results.sh: FAILED: $* (log $log):" >&2
    tail -15 "$log" >&2
    return 1
  fi
}

# bench JSON ARGS...: one mep_bench run writing JSON (skipped with --reuse when JSON exists).
bench() {
  local json="$1"; shift
  if ((REUSE)) && [[ -s "$json" ]]; then echo "  reuse $json"; return 0; fi
  echo "  mep_bench $* --json $json"
  run "${json%.json}.log" "$BIN/bench/mep_bench" "$@" --json "$json"
}

# Runs "JSON ARGS..." lines of mep_bench, $JOBS at a time; fails if any run failed.
bench_parallel() {
  local line pids=() rc=0 p
  while IFS= read -r line; do
    [[ -n "$line" ]] || continue
    # shellcheck disable=SC2086
    bench $line &
    pids+=($!)
    while (($(jobs -rp | wc -l) >= JOBS)); do sleep 1; done
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return "$rc"
}

# Tables from mep_bench JSON: the long one, the README's short one, and the picture.
seeds_tables() {  # seeds_tables NAME JSON...
  local name="$1"; shift
  python3 scripts/maintainer/seeds_table.py "$@" >"$OUTT/$name.md"
  if [[ " $(field "$name" 3) " == *":$name-short "* ]]; then
    python3 scripts/maintainer/seeds_table.py --short "$@" >"$OUTT/$name-short.md"
  fi
  local files
  files="$(IFS=,; echo "$*")"
  run "$R/$name/from_json.log" "$BIN/bench/mep_bench" --from-json "$files" --svg "$PIC/$name.svg"
}

# ---------------------------------------------------------------------------- the pipelines
# Each writes its tables to $OUTT/MARKER.md and its picture to $PIC/NAME.svg; $Q is 1 for the
# tiny protocol of --quick, $R the results directory.
model_table() {  # model_table MODEL [mep_bench args...]
  local model="$1"; shift
  if ((Q)); then
    local tiny=(--train 256 --test 128)
    [[ $model == cnn ]] && tiny=(--optimizers sgd,smep --train 128 --test 64)
    bench "$R/$model/seeds.json" --model "$model" --seeds 0,1 "${tiny[@]}" --epochs 1 --threads 1
  else
    bench "$R/$model/seeds.json" --model "$model" --seeds 0,1,2 "$@"
  fi
  seeds_tables "$model" "$R/$model/seeds.json"
}
table_mlp_small() { model_table mlp_small; }
table_mlp() { model_table mlp; }
table_cnn() { model_table cnn --threads 1; }

FASHION=(--data data/fashion-mnist --normalize 0.2860,0.3530 --threads 1)
table_fashion_mlp() {
  local d="$R/fashion_mlp" proto=(--protocol full) seeds=(0 1 2) clip=(--optimizers smep,sdmep --spectral-mode clip --bound-input-layer false)
  if ((Q)); then proto=(--train 256 --test 128 --epochs 1); seeds=(0 1); fi
  local s lines=""
  for s in "${seeds[@]}"; do
    lines+="$d/all_s$s.json --model mlp ${FASHION[*]} ${proto[*]} --seeds $s"$'\n'
    lines+="$d/clip_s$s.json --model mlp ${FASHION[*]} ${proto[*]} ${clip[*]} --seeds $s"$'\n'
  done
  bench_parallel <<<"$lines"
  local files=()
  for s in "${seeds[@]}"; do files+=("$d/all_s$s.json" "$d/clip_s$s.json"); done
  seeds_tables fashion_mlp "${files[@]}"
}
table_fashion_cnn() {
  local d="$R/fashion_cnn" proto=(--protocol full) seeds=(0 1 2)
  # OPT:RULE: "" no constraint options, clip (free input layer) or scale (the reference's).
  local runs=(adam: sgd: eqprop: smep:clip sdmep:clip local_ep:clip natural_ep:clip muon:clip
              smep:scale sdmep:scale muon:scale)
  if ((Q)); then proto=(--train 128 --test 64 --epochs 1); seeds=(0 1); runs=(adam: smep:clip smep:scale); fi
  local s r opt rule extra lines="" files=()
  for s in "${seeds[@]}"; do
    for r in "${runs[@]}"; do
      opt="${r%%:*}" rule="${r#*:}" extra=""
      [[ $rule == clip ]] && extra="--spectral-mode clip --bound-input-layer false"
      [[ $rule == scale ]] && extra="--spectral-mode scale --bound-input-layer true"
      local json="$d/${opt}${rule:+_$rule}_s$s.json"
      lines+="$json --model cnn ${FASHION[*]} ${proto[*]} --optimizers $opt $extra --seeds $s"$'\n'
      files+=("$json")
    done
  done
  bench_parallel <<<"$lines"
  seeds_tables fashion_cnn "${files[@]}"
}
table_ce_nudging() {
  local q=()
  ((Q)) && q=(--train 256 --test 128 --epochs 1 --threads 1)
  bench "$R/ce_nudging.json" --model mlp_small --optimizers smep,local_ep,natural_ep,sdmep,eqprop --loss ce \
    --settling reference "${q[@]}"
  grep '^|' "$R/ce_nudging.log" >"$OUTT/ce_nudging.md"
}
table_gradients() {
  run "$R/gradients.txt" "$BIN/tests/mep_gradient_tests" --gtest_filter='Gradient/Equivalence.*'
  python3 scripts/maintainer/gradient_table.py "$R/gradients.txt" >"$OUTT/gradients.md"
}
table_speed() {
  local args=(--out "$R/speed.json")
  ((Q)) && args+=("--benchmark_filter=mlp_small/(torch_sgd|sgd|eqprop)$|ns/10x256/cubic|floor/10x256/ns"
                  --benchmark_min_time=0.01)
  if ((Q)); then export MEP_ROUNDS=1; fi
  MEP_BUILD_DIR="$BIN" python3 scripts/maintainer/speed_table.py "${args[@]}" >"$OUTT/speed.md" 2>"$R/speed.log" ||
    { tail -5 "$R/speed.log" >&2; return 1; }
}
table_ops() {
  local q=()
  ((Q)) && q=(--models mlp_small)
  run "$R/ops.txt" "$BIN/bench/mep_ops" "${q[@]}"
  grep '^|' "$R/ops.txt" >"$OUTT/ops.md"
}
table_settling() {
  local args=(--benchmark_filter='EP_|Backprop' --benchmark_repetitions=3)
  ((Q)) && args=(--benchmark_filter='BM_(EP_Default|Backprop)/0$' --benchmark_repetitions=2 --benchmark_min_time=0.01)
  run "$R/micro.txt" "$BIN/bench/mep_micro" "${args[@]}" --benchmark_report_aggregates_only=true
  python3 scripts/maintainer/micro_table.py "$R/micro.txt" >"$OUTT/settling.md"
}
table_cuda() {
  local p=(--model mlp_small --epochs 2 --train 8000 --test 2000)
  ((Q)) && p=(--model mlp_small --epochs 1 --train 512 --test 256 --optimizers sgd,smep)
  bench "$R/cuda/cuda.json" "${p[@]}" --device cuda
  bench "$R/cuda/cpu.json" "${p[@]}" --device cpu --threads "$(getconf _NPROCESSORS_ONLN)"
  python3 scripts/maintainer/cuda_table.py "$R/cuda/cuda.json" "$R/cuda/cpu.json" >"$OUTT/cuda.md"
}

# ---------------------------------------------------------------------------- rewriting
# rewrite DIR MARKER FILE: the lines between MARKER's markers, in every page under DIR that has
# them, become FILE (checked to be a non-empty Markdown table). Fails, naming it, when FILE is
# not a table, when no page has the marker, or when a page has it unpaired or twice.
rewrite() {
  python3 - "$@" <<'EOF'
import glob, os, sys
base, marker, table_file = sys.argv[1:]
table = open(table_file, encoding="utf-8").read().strip("\n").split("\n")
rows = [l for l in table if l.strip()]
def is_table(lines):
    return (len(lines) >= 3 and all(l.startswith("|") and l.rstrip().endswith("|") for l in lines)
            and lines[1].replace(" ", "").startswith("|---"))
if not is_table(rows):
    sys.exit(f"results.sh: {marker}: the pipeline's output is not a Markdown table with rows:\n" + "\n".join(table[:5]))
begin, end = f"<!-- results:{marker} -->", f"<!-- /results:{marker} -->"
done = []
for page in ["README.md"] + sorted(glob.glob("docs/*.md", root_dir=base)):
    path = os.path.join(base, page)
    if not os.path.exists(path):
        continue
    lines = open(path, encoding="utf-8").read().split("\n")
    at = [i for i, l in enumerate(lines) if l.strip() == begin]
    to = [i for i, l in enumerate(lines) if l.strip() == end]
    if not at and not to:
        continue
    if len(at) != 1 or len(to) != 1 or to[0] < at[0]:
        sys.exit(f"results.sh: {page}: the markers {begin} ... {end} are not one pair in order")
    lines[at[0] + 1:to[0]] = table
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    # Read back: the lines between the markers are the table.
    again = open(path, encoding="utf-8").read().split("\n")
    a = next(i for i, l in enumerate(again) if l.strip() == begin)
    b = next(i for i, l in enumerate(again) if l.strip() == end)
    if not is_table([l for l in again[a + 1:b] if l.strip()]):
        sys.exit(f"results.sh: {page}: {marker} is not a table after rewriting")
    done.append(page)
if not done:
    sys.exit(f"results.sh: no page has the marker {begin} (README.md, docs/*.md under {base})")
print(f"  {marker}: {len(rows) - 2} rows -> {', '.join(done)}")
EOF
}

# check_markers DIR NAME: every PAGE:MARKER of NAME is in its page under DIR (before any run).
check_markers() {
  local pm page marker bad=0
  for pm in $(field "$2" 3); do
    page="${pm%%:*}" marker="${pm#*:}"
    if [[ ! -f "$1/$page" ]]; then
      echo "results.sh: $2: $page not found (it holds the marker results:$marker)" >&2; bad=1
    elif ! grep -qxF "<!-- results:$marker -->" "$1/$page" || ! grep -qxF "<!-- /results:$marker -->" "$1/$page"; then
      echo "results.sh: $2: marker <!-- results:$marker --> ... <!-- /results:$marker --> missing in $page" >&2; bad=1
    fi
  done
  return "$bad"
}

check_picture() {  # check_picture FILE: an SVG with something drawn
  [[ -s "$1" ]] && head -c 400 "$1" | grep -q '<svg' ||
    { echo "results.sh: $1 is not an SVG" >&2; return 1; }
}

have_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }

# needs NAME: the binaries of NAME's targets exist (built first unless --no-build).
target_path() {
  case "$1" in
    mep_gradient_tests) echo "$BIN/tests/mep_gradient_tests" ;;
    *) echo "$BIN/bench/$1" ;;
  esac
}
needs() {
  local t targets missing=()
  read -r -a targets <<<"$(field "$1" 2)"
  if ((BUILD)) && [[ -f "$BIN/CMakeCache.txt" ]]; then
    note "build: ${targets[*]} in $build_dir"
    cmake --build "$BIN" -j "$jobs" --target "${targets[@]}" >/dev/null ||
      die "$1: building ${targets[*]} in $build_dir failed (cmake --build $build_dir --target ${targets[*]})"
  fi
  for t in "${targets[@]}"; do [[ -x "$(target_path "$t")" ]] || missing+=("$t"); done
  ((${#missing[@]} == 0)) ||
    die "$1: $(target_path "${missing[0]}") is not built: build target ${missing[*]} (scripts/bench.sh, or cmake --build $build_dir --target ${missing[*]})"
}

needs_data() {  # the datasets NAME reads
  case "$1" in
    fashion_*) [[ -f data/fashion-mnist/train-images-idx3-ubyte || -f data/fashion-mnist/train-images-idx3-ubyte.gz ]] ||
                 die "$1: no data/fashion-mnist: run data/make_datasets.sh" ;;
    gradients | speed | ops) ;;
    *) [[ -f data/mnist/train-images-idx3-ubyte || -f data/mnist/train-images-idx3-ubyte.gz ]] ||
         die "$1: no data/mnist: run data/make_datasets.sh" ;;
  esac
}

# produce NAME PAGES_DIR: runs NAME's pipeline and rewrites its tables under PAGES_DIR.
produce() {
  local name="$1" base="$2" pm pic
  mkdir -p "$R" "$OUTT" "$PIC"
  rm -f "$OUTT/$name".md "$OUTT/$name"-*.md
  "table_$name"
  for pm in $(field "$name" 3); do rewrite "$base" "${pm#*:}" "$OUTT/${pm#*:}.md"; done
  pic="$(field "$name" 4)"
  if [[ "$pic" != - ]]; then check_picture "$PIC/$pic" && echo "  picture: $PIC/$pic"; fi
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  echo "Tables: $(names | tr '\n' ' ')"
}

# ---------------------------------------------------------------------------- main
Q=0 REUSE=0 BUILD=1 LIST=0 table="" quick_dir=""
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --list) LIST=1 ;;
    --reuse) REUSE=1 ;;
    --no-build) BUILD=0 ;;
    --quick)
      Q=1
      if [[ $# -gt 1 && $2 != -* ]]; then
        quick_dir="$2"; [[ $quick_dir == /* ]] || quick_dir="$CALLER/$quick_dir"; shift
      fi ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$table" ]] || die "one TABLE at a time ($table, $1)"; table="$1" ;;
  esac
  shift
done

if ((LIST)); then
  echo "Tables (scripts/results.sh TABLE), with the time a run takes on the 2-core VM of the results:"
  for n in $(names); do
    printf '  %-12s %s\n               %s\n' "$n" "$(field "$n" 6)" "$(field "$n" 5)"
  done
  echo "Full Fashion-MNIST on cnn takes hours (--reuse resumes it from the runs already done);"
  echo "cuda needs an NVIDIA GPU. scripts/results.sh --quick runs every pipeline in about 3 minutes."
  exit 0
fi

if ((!Q)); then
  [[ -n "$table" ]] || { usage >&2; exit 2; }
  field "$table" 1 >/dev/null || die "unknown table '$table'; the tables: $(names | tr '\n' ' ')"
fi
[[ -d "$build_dir" ]] ||
  die "no build directory $build_dir: run scripts/bench.sh or scripts/test.sh first (or set MEP_BUILD_DIR)"
BIN="$(cd "$build_dir" && pwd)"
start=$SECONDS

if ((Q)); then
  [[ -z "$table" ]] || die "--quick runs every table; give it no TABLE"
  quick_dir="${quick_dir:-$build_dir/results-quick}"
  mkdir -p "$quick_dir"
  Qd="$(cd "$quick_dir" && pwd)"
  [[ "$Qd" != "$ROOT" && "$Qd" != "$ROOT/docs" ]] || die "--quick $quick_dir: that is the repository's own pages"
  if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 && [[ "$Qd" == "$ROOT"/* ]] &&
     [[ -n "$(git -C "$ROOT" ls-files -- "${Qd#"$ROOT"/}")" ]]; then
    die "--quick $quick_dir holds tracked files: give it a directory of its own"
  fi
  src="${MEP_RESULTS_PAGES:-$ROOT}"
  rm -rf "$Qd/docs" "$Qd/results" "$Qd/tables" "$Qd/README.md"
  mkdir -p "$Qd/docs"
  cp "$src/README.md" "$Qd/"
  cp "$src"/docs/*.md "$Qd/docs/" 2>/dev/null || true
  R="$Qd/results" OUTT="$Qd/tables" PIC="$Qd/docs"
  note "quick: every table on a tiny protocol, into $Qd (binaries: $build_dir)"
  failed=()
  for n in $(names); do
    if [[ $n == cuda ]] && ! have_gpu; then echo "--- cuda: skipped (no GPU)"; continue; fi
    t0=$SECONDS
    echo "--- $n"
    # In a subshell of its own, not tested by `if`, so that `set -e` stops it at the first failure.
    ok=1
    check_markers "$Qd" "$n" || ok=0
    if ((ok)); then
      (needs "$n"; needs_data "$n"; produce "$n" "$Qd") &
      wait $! || ok=0
    fi
    if ((!ok)); then
      failed+=("$n")
      echo "--- $n: FAILED"
      continue
    fi
    echo "--- $n: $((SECONDS - t0)) s"
  done
  if ((${#failed[@]})); then
    echo "results.sh --quick: FAILED: ${failed[*]} ($((SECONDS - start)) s; logs in $R)" >&2
    exit 1
  fi
  note "quick: every table rewritten in $Qd in $((SECONDS - start)) s"
  exit 0
fi

if [[ $table == cuda ]] && ! have_gpu; then
  die "cuda needs an NVIDIA GPU (nvidia-smi -L lists none) and a build against a CUDA LibTorch"
fi
check_markers "$ROOT" "$table" || exit 2
needs "$table"
needs_data "$table"
R="$ROOT/results" OUTT="$ROOT/results/tables" PIC="$ROOT/docs"
note "$table: $(field "$table" 6) ($(field "$table" 5)); runs in results/"
produce "$table" "$ROOT"
note "$table: done in $((SECONDS - start)) s"
