#!/usr/bin/env python3
"""Self time per LibTorch operator in a Chrome trace written by build/bench/mep_profile (or
any torch::autograd::profiler::RecordProfile): each event's duration minus that of the
events nested in it on the same thread, summed by operator name, per profiled step.

    python3 scripts/maintainer/profile_table.py TRACE.json [--steps N] [--top K]
"""
import argparse
import collections
import json


def self_times(events):
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            by_thread[e.get("tid")].append((float(e["ts"]), float(e["dur"]), e["name"]))
    totals = collections.Counter()
    wall = 0.0
    for evs in by_thread.values():
        evs.sort(key=lambda t: (t[0], -t[1]))
        stack = []  # [end, name, self]
        def pop():
            end, name, own = stack.pop()
            totals[name] += own
        for ts, dur, name in evs:
            while stack and ts >= stack[-1][0]:
                pop()
            if stack:
                stack[-1][2] -= dur
            else:
                wall += dur
            stack.append([ts + dur, name, dur])
        while stack:
            pop()
    return totals, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=10, help="profiled steps (mep_profile --steps)")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    totals, wall = self_times(json.load(open(a.trace)))
    total = sum(totals.values())
    print(f"operators: {total / 1e3 / a.steps:.2f} ms/step of self time ({wall / 1e3 / a.steps:.2f} ms/step inside top-level operators)")
    print("| operator | ms/step | share |")
    print("|---|---|---|")
    for name, t in totals.most_common(a.top):
        print(f"| {name} | {t / 1e3 / a.steps:.3f} | {100 * t / total:.1f} % |")


if __name__ == "__main__":
    main()
