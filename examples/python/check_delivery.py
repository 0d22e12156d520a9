"""Checks what two consumer runs (the first killed) printed against what was produced.

    python check_delivery.py INPUT RUN1.jsonl RUN2.jsonl COMMITTED.json MAX_RECORDS

INPUT holds the produced lines, `key:value`; RUN1 and RUN2 the consumer's --output json;
COMMITTED the group's committed offset per partition between the runs (`{"0": 120, ...}`);
MAX_RECORDS the consumer's --max-records. It checks, and says which check failed and why:

- each run read each partition in offset order, without gaps or repeats;
- the second run started exactly at the committed offsets (it resumed, not restarted);
- every record the second run repeated lay in the first run's uncommitted window, which is
  at most one fetch (MAX_RECORDS) per partition;
- together the runs delivered every produced line, with its key and header, and nothing else;
- per key, the values arrived in the order they were produced (the first run's order, then
  the second run's new records).

Used by test_examples.sh; exit status 0 when every check holds, 1 otherwise.
"""

import json
import sys
from collections import defaultdict
from typing import Dict, List


def load_run(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check(input_path: str, run1_path: str, run2_path: str, committed_path: str, window: int):
    problems: List[str] = []
    with open(input_path, encoding="utf-8") as f:
        produced = [line.rstrip("\n").split(":", 1) for line in f if line.strip()]
    runs = [load_run(run1_path), load_run(run2_path)]
    with open(committed_path, encoding="utf-8") as f:
        committed = {int(p): o for p, o in json.load(f).items()}

    # Per run, per partition: contiguous offsets in order.
    first_offset: List[Dict[int, int]] = [{}, {}]
    next_offset: List[Dict[int, int]] = [{}, {}]
    for i, run in enumerate(runs):
        for r in run:
            p = r["partition"]
            expected = next_offset[i].get(p, r["offset"])
            if r["offset"] != expected:
                problems.append(
                    f"run {i + 1}, partition {p}: offset {r['offset']} after {expected - 1}"
                )
            first_offset[i].setdefault(p, r["offset"])
            next_offset[i][p] = r["offset"] + 1

    # Run 1 started at 0 (no committed offset, --reset earliest); run 2 at the commits.
    for p, start in first_offset[0].items():
        if start != 0:
            problems.append(f"run 1, partition {p}: started at {start}, not 0")
    duplicates = 0
    for p, start in first_offset[1].items():
        if start != committed.get(p, 0):
            problems.append(
                f"run 2, partition {p}: started at {start}, committed {committed.get(p)}"
            )
    for p, end in next_offset[0].items():
        repeated = end - committed.get(p, 0)
        if repeated < 0:
            problems.append(f"partition {p}: committed {committed[p]} beyond handled {end}")
        if repeated > window:
            problems.append(
                f"partition {p}: {repeated} uncommitted records, more than one fetch ({window})"
            )
        duplicates += max(repeated, 0)

    # Every line exactly once after removing the repeated window, with key and header.
    delivered: Dict[tuple, dict] = {}
    order: Dict[str, List[str]] = defaultdict(list)
    for run in runs:
        for r in run:
            at = (r["partition"], r["offset"])
            if at in delivered:
                if delivered[at] != r:
                    problems.append(f"partition {at[0]} offset {at[1]}: differs when repeated")
                continue
            delivered[at] = r
            order[r["key"]].append(r["value"])
            if r["headers"] != [["source", "test"]]:
                problems.append(f"partition {at[0]} offset {at[1]}: headers {r['headers']}")
    repeated_seen = sum(len(run) for run in runs) - len(delivered)
    if repeated_seen != duplicates:
        problems.append(
            f"{repeated_seen} records repeated, the uncommitted window held {duplicates}"
        )
    expected_order: Dict[str, List[str]] = defaultdict(list)
    for key, value in produced:
        expected_order[key].append(value)
    if sorted(order) != sorted(expected_order):
        problems.append(f"keys {sorted(order)} delivered, {sorted(expected_order)} produced")
    for key, values in expected_order.items():
        got = order.get(key, [])
        if got != values:
            missing = len(set(values) - set(got))
            at = next((i for i, (a, b) in enumerate(zip(got, values)) if a != b), len(got))
            problems.append(
                f"key {key}: {len(got)} values delivered, {len(values)} produced,"
                f" {missing} missing; first difference at #{at}"
            )
    summary = (
        f"{len(produced)} produced; run 1 handled {len(runs[0])}, run 2 {len(runs[1])};"
        f" {len(delivered)} distinct, {repeated_seen} repeated (uncommitted window {duplicates})"
    )
    return problems, summary


def main() -> int:
    if len(sys.argv) != 6:
        print(__doc__, file=sys.stderr)
        return 2
    problems, summary = check(*sys.argv[1:5], int(sys.argv[5]))
    print(summary)
    for problem in problems[:20]:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
