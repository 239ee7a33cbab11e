#!/usr/bin/env python3
"""The speed tables, as medians of build/bench/mep_speed's repetitions: one training step of
every optimizer on each benchmark model (batch 128), with ratios (mep's SGD and Adam against
torch::optim's, every other optimizer against mep's SGD on the same model); each step against
its floor, the bare matrix products it must perform on the model (floor/MODEL/OPTIMIZER, where
torch::optim's steps share mep's floors); and the Muon
family's directions at every weight shape (Newton–Schulz's three schedules, Dion) against the
bare matrix products each performs, and the spectral constraint's two rules at those shapes.

    python3 scripts/maintainer/speed_table.py                       runs build/bench/mep_speed
    python3 scripts/maintainer/speed_table.py --benchmark_filter=mlp   the same, arguments passed on
    python3 scripts/maintainer/speed_table.py --out speed.json      also saves the medians it measured
    python3 scripts/maintainer/speed_table.py speed.json            a saved JSON (its own, or mep_speed's
                                                          --benchmark_format=json output)

Each step and floor benchmark runs alone in its own process, 3 rounds in a shuffled order
(MEP_ROUNDS sets another count), one model's benchmarks after another, and the table shows
the median over the rounds (and, for a ratio, the median of the rounds' ratios): in one
process a step's time depended on the benchmarks run before it, and on this shared 2-core VM
the same process varies up to 2x from minute to minute, so the steps compared with each other
run close together. The directions run in one process, 3 repetitions. MEP_THREADS sets
mep_speed's intra-op thread count (default 2); MEP_SPEED the binary (default
$MEP_BUILD_DIR/bench/mep_speed, MEP_BUILD_DIR defaulting to build).
"""
import json
import os
import random
import re
import statistics
import subprocess
import sys

# MEP_SPEED names the binary; else MEP_BUILD_DIR (default build) as the other scripts.
BINARY = os.environ.get("MEP_SPEED") or os.path.join(os.environ.get("MEP_BUILD_DIR", "build"), "bench", "mep_speed")

MODELS = ["mlp_small", "mlp", "cnn"]
ORDER = ["torch_sgd", "sgd", "torch_adam", "adam", "muon", "eqprop", "smep", "sdmep", "local_ep", "natural_ep"]
BASE = {"sgd": "torch_sgd", "adam": "torch_adam", "torch_sgd": None, "torch_adam": None}


def run(args):
    out = subprocess.run([BINARY, "--benchmark_format=json"] + args, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"speed_table: {BINARY} {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)["benchmarks"]


def measure(argv):
    """Medians of mep_speed's benchmarks: steps and floors one per process over the rounds."""
    filters = [a for a in argv if a.startswith("--benchmark_filter=")]
    listed = subprocess.run([BINARY, "--benchmark_list_tests"] + filters, capture_output=True, text=True, check=True)
    names = listed.stdout.split()
    alone = [n for n in names if n.split("/")[0] in ("step", "floor")]
    together = [n for n in names if n not in alone]
    rounds = int(os.environ.get("MEP_ROUNDS", "3"))
    if rounds < 1:
        sys.exit("speed_table: MEP_ROUNDS must be at least 1")
    rest = [a for a in argv if a not in filters]
    times = {n: [] for n in alone}
    unit = {}
    order = random.Random(0)
    models = sorted({n.split("/")[1] for n in alone})
    for r in range(rounds):
        # One model's benchmarks after another (a shuffled order each round), so that a step,
        # its floor and the step it is compared with run minutes apart at most.
        order.shuffle(models)
        batch = []
        for m in models:
            mine = [n for n in alone if n.split("/")[1] == m]
            order.shuffle(mine)
            batch += mine
        for i, name in enumerate(batch):
            print(f"\rround {r + 1}/{rounds}: {i + 1}/{len(alone)} {name:40}", end="", file=sys.stderr, flush=True)
            b = run([f"--benchmark_filter=^{re.escape(name)}$"] + rest)[0]
            times[name].append(b["real_time"])
            unit[name] = b["time_unit"]
    print(file=sys.stderr)
    benchmarks = [{"name": n, "run_name": n, "aggregate_name": "median", "real_time": statistics.median(t),
                   "time_unit": unit[n], "rounds": t} for n, t in times.items()]
    if together:
        pattern = "^(" + "|".join(re.escape(n) for n in together) + ")$"
        benchmarks += run([f"--benchmark_filter={pattern}", "--benchmark_repetitions=3",
                           "--benchmark_report_aggregates_only=true"] + rest)
    return {"benchmarks": benchmarks, "rounds": rounds, "threads": os.environ.get("MEP_THREADS", "2")}


def load(argv):
    if argv and argv[0].endswith(".json"):
        return json.load(open(argv[0]))
    out = None
    if "--out" in argv:
        i = argv.index("--out")
        if i + 1 >= len(argv):
            sys.exit("speed_table: --out needs a file name")
        out = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    data = measure(argv)
    if out:
        with open(out + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(out + ".tmp", out)
    return data


def main(argv):
    data = load(argv)
    ms = {}
    per_round = {}
    medians = [b for b in data["benchmarks"] if b.get("aggregate_name") == "median"]
    for b in medians or [b for b in data["benchmarks"] if b.get("run_type", "iteration") == "iteration"]:
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
        ms[tuple(b.get("run_name", b["name"]).split("/"))] = b["real_time"] * scale
        if "rounds" in b:
            per_round[tuple(b["name"].split("/"))] = b["rounds"]

    def ratio(a, b):
        """a's time over b's: the median of the rounds' ratios where both ran in the same rounds."""
        ra, rb = per_round.get(a), per_round.get(b)
        if ra and rb and len(ra) == len(rb):
            return statistics.median(x / y for x, y in zip(ra, rb))
        return ms[a] / ms[b]
    steps = {k[1:]: v for k, v in ms.items() if k[0] == "step"}
    models = [m for m in MODELS if any(k[0] == m for k in steps)]
    if models:
        print("| optimizer | " + " | ".join(f"{m}: ms/step · ratio" for m in models) + " |")
        print("|---|" + "---|" * len(models))
        for name in ORDER:
            cells = []
            for m in models:
                if (m, name) not in steps:
                    cells.append("—")
                    continue
                base = BASE.get(name, "sgd")
                if base is None or (m, base) not in steps:
                    cells.append(f"{steps[(m, name)]:.2f}")
                else:
                    label = "torch" if base.startswith("torch") else "SGD"
                    cells.append(f"{steps[(m, name)]:.2f} · {ratio(('step', m, name), ('step', m, base)):.2f}× {label}")
            if any(c != "—" for c in cells):
                print(f"| {name} | " + " | ".join(cells) + " |")
    floors = {k[1:]: v for k, v in ms.items() if k[0] == "floor" and k[1] in MODELS}
    if floors:
        print()
        print("| optimizer | " + " | ".join(f"{m}: step · floor · ratio" for m in models) + " |")
        print("|---|" + "---|" * len(models))
        for name in ORDER:
            cells = []
            for m in models:
                floor = floors.get((m, name.removeprefix("torch_")))
                if (m, name) not in steps or floor is None:
                    cells.append("—")
                else:
                    r = ratio(("step", m, name), ("floor", m, name.removeprefix("torch_")))
                    cells.append(f"{steps[(m, name)]:.2f} · {floor:.2f} ms · {r:.2f}×")
            if any(c != "—" for c in cells):
                print(f"| {name} | " + " | ".join(cells) + " |")
    shapes = []
    for k in ms:
        if k[0] in ("ns", "dion", "spectral") and k[1] not in shapes:
            shapes.append(k[1])
    if shapes:
        if models:
            print()
        print("| weight | NS cubic | NS quintic | NS Polar Express | quintic floor | Dion (rank 0.3) | Dion floor "
              "| spectral scale | spectral clip |")
        print("|---|---|---|---|---|---|---|---|---|")
        for shape in shapes:
            ns_floor, dion_floor = ms.get(("floor", shape, "ns")), ms.get(("floor", shape, "dion"))
            def cell(key, floor):
                if key not in ms:
                    return "—"
                return f"{1e3 * ms[key]:.0f} µs" + (f" · {ms[key] / floor:.1f}×" if floor else "")
            def floor_cell(floor):
                return "—" if floor is None else f"{1e3 * floor:.0f} µs"
            print(f"| {shape} | {cell(('ns', shape, 'cubic'), ns_floor)} | {cell(('ns', shape, 'quintic'), ns_floor)} "
                  f"| {cell(('ns', shape, 'polar_express'), ns_floor)} | {floor_cell(ns_floor)} "
                  f"| {cell(('dion', shape), dion_floor)} | {floor_cell(dion_floor)} "
                  f"| {cell(('spectral', shape, 'scale'), None)} | {cell(('spectral', shape, 'clip'), None)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
