#!/usr/bin/env python3
"""The CUDA page's table: the same mep_bench run on the GPU and on the CPU of one machine, side
by side (best test accuracy · ms/step per optimizer, in the order of the GPU's accuracy).

    build/bench/mep_bench --model mlp_small --epochs 2 --train 8000 --test 2000 --device cuda --json cuda.json
    build/bench/mep_bench --model mlp_small --epochs 2 --train 8000 --test 2000 --device cpu \\
        --threads "$(nproc)" --json cpu.json
    python3 scripts/maintainer/cuda_table.py cuda.json cpu.json
"""
import json
import sys

NAMES = {"sgd": "SGD", "adam": "Adam", "muon": "Muon", "eqprop": "EqProp", "smep": "SMEP", "sdmep": "SDMEP",
         "local_ep": "LocalEP", "natural_ep": "NaturalEP"}


def main(argv):
    if len(argv) != 2:
        sys.exit("usage: cuda_table.py CUDA.json CPU.json")
    gpu, cpu = (json.load(open(p)) for p in argv)
    on_cpu = {r["optimizer"]: r for r in cpu["results"]}
    threads = cpu["protocol"].get("threads", "?")
    print(f"| optimizer | CUDA: best test · ms/step | CPU ({threads} threads): best test · ms/step |")
    print("|---|---|---|")
    for r in sorted(gpu["results"], key=lambda r: -r["best_val_acc"]):
        c = on_cpu.get(r["optimizer"])
        cell = f"{100 * c['best_val_acc']:.2f} % · {c['step_ms']:.2f}" if c else "—"
        print(f"| {NAMES.get(r['optimizer'], r['optimizer'])} | {100 * r['best_val_acc']:.2f} % · {r['step_ms']:.2f} "
              f"| {cell} |")


if __name__ == "__main__":
    main(sys.argv[1:])
