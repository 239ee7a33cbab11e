#!/usr/bin/env python3
"""Compares two mep_bench --json files run by run, timings aside.

    python3 scripts/bench_diff.py BEFORE.json AFTER.json

Prints, per optimizer and seed, the options added, removed or changed, and every epoch
field (losses, accuracies, settling statistics) that differs; exits 1 if any result
differs, 0 if only recorded options do (or nothing)."""
import json
import sys

TIMINGS = {"epoch_s", "step_ms"}


def runs(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return data["protocol"], {(r["optimizer"], r["seed"]): r for r in data["results"]}
    except OSError as e:
        sys.exit(f"bench_diff.py: {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        sys.exit(f"bench_diff.py: {path}: not JSON ({e.msg}, line {e.lineno})")
    except (KeyError, TypeError) as e:
        sys.exit(f"bench_diff.py: {path}: not a mep_bench --json file (no {e})")


def results(run):
    """Everything a run measured but its timings and options."""
    kept = {k: v for k, v in run.items() if k not in TIMINGS and k != "options" and k != "epochs"}
    kept["epochs"] = [{k: v for k, v in e.items() if k not in TIMINGS} for e in run["epochs"]]
    return kept


def main(before_path, after_path):
    p_before, before = runs(before_path)
    p_after, after = runs(after_path)
    differ = False
    if p_before != p_after:
        print(f"protocols differ: {p_before} != {p_after}")
        differ = True
    for key in sorted(set(before) | set(after)):
        name = f"{key[0]} seed {key[1]}"
        if key not in before or key not in after:
            print(f"{name}: only in {'after' if key in after else 'before'}")
            differ = True
            continue
        ob, oa = before[key]["options"], after[key]["options"]
        for option in sorted(set(ob) | set(oa)):
            if ob.get(option) != oa.get(option):
                print(f"{name}: option {option}: {ob.get(option, '(absent)')} -> {oa.get(option, '(absent)')}")
        rb, ra = results(before[key]), results(after[key])
        if rb == ra:
            print(f"{name}: results identical ({len(ra['epochs'])} epochs)")
            continue
        differ = True
        for field in sorted(set(rb) - {"epochs"}):
            if rb.get(field) != ra.get(field):
                print(f"{name}: {field}: {rb.get(field)} -> {ra.get(field)}")
        for eb, ea in zip(rb["epochs"], ra["epochs"]):
            for field in sorted(set(eb) | set(ea)):
                if eb.get(field) != ea.get(field):
                    print(f"{name}: epoch {eb.get('epoch')} {field}: {eb.get(field)} -> {ea.get(field)}")
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
