#!/usr/bin/env python3
"""Turns mep_micro's aggregate output into the README's settling table: for each settling
variant and model, the cosine to the converged EP gradient, the steps taken, the median time of
one EP gradient and its ratio to the median backprop forward + backward of the same run.

    build/bench/mep_micro --benchmark_repetitions=5 --benchmark_report_aggregates_only=true > micro.txt
    python3 scripts/maintainer/micro_table.py micro.txt
"""
import re
import sys

MODELS = ["mlp_small", "mlp", "cnn"]


def main(path):
    rows, backprop, order = {}, {}, []
    for line in open(path):
        m = re.match(r"(BM_\S+?)_median\s+([\d.]+) us\s+[\d.]+ us\s+\d+\s*(.*)$", line.strip())
        if not m:
            continue
        name, real, rest = m.group(1), float(m.group(2)), m.group(3)
        if not (name.startswith("BM_EP_") or name.startswith("BM_Backprop")):
            continue  # the update-only benchmarks are not part of this table
        counters = dict(re.findall(r"(\w+)=([\d.]+[munp]?)", rest))
        label = re.sub(r"^(cos|residual|steps)=\S+\s*", "", rest)
        label = re.sub(r"(cos|residual|steps)=\S+\s*", "", label).strip()
        model, variant = label.split(" ", 1)
        if name.startswith("BM_Backprop"):
            backprop[model] = real
            continue
        if variant not in rows:
            rows[variant] = {}
            order.append(variant)
        rows[variant][model] = (float(counters.get("cos", "nan")), counters.get("steps", "?"), real)
    # The models the output has (a filtered run may hold one or two of them).
    models = [m for m in MODELS if m in backprop or any(m in r for r in rows.values())]
    if not models:
        sys.exit(f"micro_table.py: no EP or backprop medians in {path} (run mep_micro with "
                 "--benchmark_repetitions=N --benchmark_report_aggregates_only=true)")
    print("| settling | " + " | ".join(f"{m}: cos · time · ×BP" for m in models) + " |")
    print("|---|" + "---|" * len(models))
    for v in order:
        cells = []
        for m in models:
            if m not in rows[v]:
                cells.append("")
                continue
            cos, steps, real = rows[v][m]
            ratio = real / backprop[m] if m in backprop else float("nan")
            cells.append(f"{cos:.4f} · {real / 1000:.2f} ms · {ratio:.2f}×")
        print(f"| {v} | " + " | ".join(cells) + " |")
    print("| backprop forward + backward | "
          + " | ".join(f"{backprop[m] / 1000:.2f} ms" if m in backprop else "" for m in models) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/dev/stdin")
