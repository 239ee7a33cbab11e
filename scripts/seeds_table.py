#!/usr/bin/env python3
"""Gathers mep_bench JSON files of the same protocol (one per seed) into the README's table:
best test accuracy per seed, mean ± standard deviation, final train accuracy (mean), the median
of the seeds' ms/step, and the EP family's mean settling steps and residual per step.

    python3 scripts/seeds_table.py results/mlp_seed0.json results/mlp_seed1.json results/mlp_seed2.json
"""
import json
import statistics as st
import sys


def main(paths):
    if not paths:
        sys.exit("usage: seeds_table.py RESULTS.json...")
    runs = [json.load(open(p)) for p in paths]
    seeds = [str(r["protocol"]["seed"]) for r in runs]
    rows = []
    for i, first in enumerate(runs[0]["results"]):
        res = [r["results"][i] for r in runs]
        if any(x["optimizer"] != first["optimizer"] for x in res):
            sys.exit("seeds_table.py: the files list different optimizers")
        acc = [100 * x["best_val_acc"] for x in res]
        epochs = [x["epochs"] for x in res]
        steps = [st.mean(e.get("settle_steps", 0) for e in ep) for ep in epochs]
        resid = [st.mean(e.get("settle_residual", 0) for e in ep) for ep in epochs]
        rows.append((st.mean(acc), first["optimizer"], acc, [100 * x["final_train_acc"] for x in res],
                     [x["step_ms"] for x in res], steps, resid, first["lr"]))
    rows.sort(key=lambda r: -r[0])
    print(f"| Optimizer | Best test acc (seeds {', '.join(seeds)}) | mean ± sd | Final train acc (mean) "
          "| ms/step (median) | settling: steps, residual | lr |")
    print("|---|---|---|---|---|---|---|")
    for mean, name, acc, train, ms, steps, resid, lr in rows:
        sd = st.stdev(acc) if len(acc) > 1 else 0.0
        settle = f"{st.mean(steps):.0f}, {st.mean(resid):.1e}" if st.mean(steps) > 0 else "—"
        print(f"| {name} | {' / '.join(f'{a:.1f}' for a in acc)} | {mean:.2f} ± {sd:.2f} % | {st.mean(train):.2f} % "
              f"| {st.median(ms):.2f} | {settle} | {lr:g} |")


if __name__ == "__main__":
    main(sys.argv[1:])
