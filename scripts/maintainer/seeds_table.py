#!/usr/bin/env python3
"""Gathers mep_bench JSON runs of one protocol (every field two files both record is equal,
the seeds aside), one file per seed or files written with --seeds, into the README's table:
best test accuracy per seed, mean ± standard deviation, final train accuracy (mean), the
median of the seeds' ms/step, and the EP family's mean settling steps and residual per step.

    python3 scripts/maintainer/seeds_table.py results/mlp_seed0.json results/mlp_seed1.json results/mlp_seed2.json
    python3 scripts/maintainer/seeds_table.py results/mlp_seeds.json      (mep_bench --seeds 0,1,2 --json ...)
    python3 scripts/maintainer/seeds_table.py --short results/mlp_seeds.json   the README's short table

--short prints three columns only: the optimizer, its best test accuracy as mean ± sd over
the seeds, and the median ms/step, in the same order as the full table.

Runs of one optimizer with different options are separate rows, labelled by the options
that differ. A row that lacks a seed shows — for it, and its mean is over the seeds it has.
`mep_bench --from-json` gathers the same files into its own table, a picture and one JSON.
"""
import json
import statistics as st
import sys


def main(argv):
    short = "--short" in argv
    paths = [a for a in argv if a != "--short"]
    if not paths or any(p.startswith("-") for p in paths):
        sys.exit("usage: seeds_table.py [--short] RESULTS.json...")
    # Runs of one optimizer with different options (or learning-rate schedules) are separate
    # rows, labelled by what differs; an option a file does not record shows as "default".
    configs = {}  # optimizer -> {config key: config}
    loaded = []
    protocol, first = {}, None  # as mep_bench --from-json: one protocol, the seeds aside
    for path in paths:
        data = json.load(open(path))
        for key, value in data["protocol"].items():
            if key not in ("seed", "seeds") and key in protocol and protocol[key] != value:
                sys.exit(f"seeds_table.py: {path} is of another protocol than {first}: {key} "
                         f"{json.dumps(value)} here, {json.dumps(protocol[key])} there")
            protocol.setdefault(key, value)
        first = first or path
        for run in data["results"]:
            seed = run.get("seed", data["protocol"]["seed"])
            config = dict(run.get("options", {}), lr_schedule=data["protocol"].get("lr_schedule", "constant"))
            key = json.dumps(config, sort_keys=True)
            configs.setdefault(run["optimizer"], {})[key] = config
            loaded.append((run["optimizer"], key, seed, run))
    def shown(config, option):  # as mep_bench's flags spell it: true/false, names, numbers
        value = config.get(option, "default")
        return value if isinstance(value, str) else json.dumps(value)

    labels = {}
    for name, by_key in configs.items():
        options = sorted(set().union(*by_key.values()))
        differ = [n for n in options if len({shown(c, n) for c in by_key.values()}) > 1]
        for key, config in by_key.items():
            label = ", ".join(f"{n} {shown(config, n)}" for n in differ)
            labels[(name, key)] = f"{name} ({label})" if label else name
    by_optimizer = {}  # label -> [(seed, run)], in the order of first appearance
    for name, key, seed, run in loaded:
        by_optimizer.setdefault(labels[(name, key)], []).append((seed, run))
    seeds = []  # every seed, in order of first appearance; a row that lacks one shows —
    for runs in by_optimizer.values():
        for seed, _ in runs:
            if seed not in seeds:
                seeds.append(seed)
    rows = []
    for name, runs in by_optimizer.items():
        if len({seed for seed, _ in runs}) != len(runs):
            sys.exit(f"seeds_table.py: {name} has two runs of one seed")
        by_seed = dict(runs)
        res = [by_seed[seed] for seed in seeds if seed in by_seed]
        cells = [f"{100 * by_seed[seed]['best_val_acc']:.1f}" if seed in by_seed else "—" for seed in seeds]
        acc = [100 * x["best_val_acc"] for x in res]
        epochs = [x["epochs"] for x in res]
        steps = [st.mean(e.get("settle_steps", 0) for e in ep) for ep in epochs]
        resid = [st.mean(e.get("settle_residual", 0) for e in ep) for ep in epochs]
        rows.append((st.mean(acc), name, cells, acc, [100 * x["final_train_acc"] for x in res],
                     [x["step_ms"] for x in res], steps, resid, res[0]["lr"]))
    rows.sort(key=lambda r: -r[0])
    if short:
        print(f"| Optimizer | Best test acc (mean ± sd, seeds {', '.join(map(str, seeds))}) | ms/step (median) |")
        print("|---|---|---|")
        for mean, name, cells, acc, train, ms, steps, resid, lr in rows:
            spread = f"{mean:.2f} ± {st.stdev(acc):.2f} %" if len(acc) > 1 else f"{mean:.2f} %"
            print(f"| {name} | {spread} | {st.median(ms):.2f} |")
        return
    print(f"| Optimizer | Best test acc (seeds {', '.join(map(str, seeds))}) | mean ± sd | Final train acc (mean) "
          "| ms/step (median) | settling: steps, residual | lr |")
    print("|---|---|---|---|---|---|---|")
    for mean, name, cells, acc, train, ms, steps, resid, lr in rows:
        spread = f"{mean:.2f} ± {st.stdev(acc):.2f} %" if len(acc) > 1 else f"{mean:.2f} %"
        settle = f"{st.mean(steps):.0f}, {st.mean(resid):.1e}" if st.mean(steps) > 0 else "—"
        print(f"| {name} | {' / '.join(cells)} | {spread} | {st.mean(train):.2f} % "
              f"| {st.median(ms):.2f} | {settle} | {lr:g} |")


if __name__ == "__main__":
    main(sys.argv[1:])
