#!/usr/bin/env python3
"""The table of "EP gradients match backprop" from the equivalence suite's output: for each
network of `Gradient/Equivalence.*` (tests/test_ep.cpp), the relative error ‖g_EP − g_BP‖ /
‖g_BP‖ of the symmetric and one-sided estimates at β = 1e-2 and 1e-3, from the lines the suite
prints ("[ measured ] NAME (POLICY): symmetric A (β=1e-2) B (β=1e-3); one-sided C ... D ...").
Both settling policies (HeavyBall, LayerSweep) are measured; a cell shows one value where
they agree to the digits shown, else both (HeavyBall / LayerSweep).

    build/tests/mep_gradient_tests --gtest_filter='Gradient/Equivalence.*' > gradients.txt
    python3 scripts/maintainer/gradient_table.py gradients.txt
"""
import re
import sys

LINE = re.compile(r"\[ measured \] (\S+) \((\w+)\): symmetric (\S+) \(β=1e-2\) (\S+) \(β=1e-3\); "
                  r"one-sided (\S+) \(β=1e-2\) (\S+) \(β=1e-3\)")


def main(path):
    rows = {}  # network -> {policy: [4 values]}, in the order of the output
    for line in open(path, encoding="utf-8"):
        m = LINE.search(line)
        if m:
            rows.setdefault(m.group(1), {})[m.group(2)] = [float(v) for v in m.group(3, 4, 5, 6)]
    if not rows:
        sys.exit(f"gradient_table.py: no equivalence measurements in {path}")
    print("| network | symmetric β=1e-2 | symmetric β=1e-3 | one-sided β=1e-2 | one-sided β=1e-3 |")
    print("|---|---|---|---|---|")
    for name, by_policy in rows.items():
        cells = []
        for i in range(4):
            shown = [f"{v[i]:.1e}" for v in by_policy.values()]
            cells.append(shown[0] if len(set(shown)) == 1 else " / ".join(shown))
        print(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/dev/stdin")
