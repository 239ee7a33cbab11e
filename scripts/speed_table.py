#!/usr/bin/env python3
"""The speed tables, as medians of build/bench/mep_speed's repetitions: one training step of
every optimizer on each benchmark model (batch 128), with ratios (mep's SGD and Adam against
torch::optim's, every other optimizer against mep's SGD on the same model); each step against
its floor, the bare matrix products it must perform on the model (floor/MODEL/OPTIMIZER, where
torch::optim's steps share mep's floors); and the Muon
family's directions at every weight shape (Newton–Schulz's three schedules, Dion) against the
bare matrix products each performs, and the spectral constraint's two rules at those shapes.

    python3 scripts/speed_table.py                       runs build/bench/mep_speed (3 repetitions)
    python3 scripts/speed_table.py --benchmark_filter=mlp   the same, arguments passed on
    python3 scripts/speed_table.py speed.json            a saved --benchmark_format=json output

MEP_THREADS sets mep_speed's intra-op thread count (default 2).
"""
import json
import subprocess
import sys

MODELS = ["mlp_small", "mlp", "cnn"]
ORDER = ["torch_sgd", "sgd", "torch_adam", "adam", "muon", "eqprop", "smep", "sdmep", "local_ep", "natural_ep"]
BASE = {"sgd": "torch_sgd", "adam": "torch_adam", "torch_sgd": None, "torch_adam": None}


def load(argv):
    if argv and argv[0].endswith(".json"):
        return json.load(open(argv[0]))
    cmd = ["build/bench/mep_speed", "--benchmark_format=json", "--benchmark_repetitions=3",
           "--benchmark_report_aggregates_only=true"] + argv
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def main(argv):
    data = load(argv)
    ms = {}
    medians = [b for b in data["benchmarks"] if b.get("aggregate_name") == "median"]
    for b in medians or [b for b in data["benchmarks"] if b.get("run_type", "iteration") == "iteration"]:
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
        ms[tuple(b.get("run_name", b["name"]).split("/"))] = b["real_time"] * scale
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
                    cells.append(f"{steps[(m, name)]:.2f} · {steps[(m, name)] / steps[(m, base)]:.2f}× {label}")
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
                    cells.append(f"{steps[(m, name)]:.2f} · {floor:.2f} ms · {steps[(m, name)] / floor:.2f}×")
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
