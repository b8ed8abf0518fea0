"""Issue 6's targets, judged on a suite run: ``python -m benchmarks.targets benchmarks/results.json``.

Each target pairs two variants of one workload. A speed ratio is taken round by round (both were
timed in the same round, so the machine's drift between rounds cancels) and reported as the median
with the min-max over rounds; a memory ratio compares the two peak RSS values. ``python -m
benchmarks.suite`` prints this table after its own and stores it in its JSON under ``"targets"``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import NamedTuple

ALL = ("mnist_cnn", "transformer", "mlp")


class Target(NamedTuple):
    """``numerator / denominator`` on each of ``workloads``, against ``threshold`` (``None``: measured only).

    ``measure``: ``"speed"`` (steps/s; met when the ratio is at least the threshold, or above it with
    ``strict``) or ``"rss"`` (peak RSS; met when the ratio is at most the threshold). ``scale``
    multiplies the ratio (a derived row: what another target asks in this one's terms).
    """

    label: str
    workloads: tuple[str, ...]
    numerator: str
    denominator: str
    threshold: float | None
    strict: bool = False
    measure: str = "speed"
    scale: float = 1.0


TARGETS = (
    Target("default callbacks >= 0.97x the hand loop", ("mnist_cnn", "transformer"), "trainer_default", "hand", 0.97),
    Target("K=10 >= 2x K=1, default callbacks", ("mlp",), "trainer_k10", "trainer_default", 2.0),
    Target("K=10 >= 0.97x a hand-written scan of K=10", ("mlp",), "trainer_k10", "hand_scan10", 0.97),
    # measured only: what the 2x asks of K=10 against the hand-written scan, and the 2x without callbacks
    Target("K=10 / hand-written scan that 2x K=1 would need", ("mlp",), "trainer_default", "hand_scan10", None,
           scale=2.0),
    Target("K=10 without callbacks against K=1 with them", ("mlp",), "trainer_bare_k10", "trainer_default", None),
    Target("faster than Keras fit", ALL, "trainer_default", "keras", 1.0, strict=True),
    Target("K=10 against Keras steps_per_execution=10", ALL, "trainer_k10", "keras_k10", None),
    Target("default callbacks against Lightning", ALL, "trainer_default", "lightning", None),
    Target("K=10 against Lightning", ALL, "trainer_k10", "lightning", None),
    Target("peak RSS <= 1.2x the hand loop's", ALL, "trainer_default", "hand", 1.2, measure="rss"),
    Target("peak RSS at K=10 <= 1.2x the hand-written scan's", ALL, "trainer_k10", "hand_scan10", 1.2, measure="rss"),
)


def judge(rows: list[dict], targets: tuple[Target, ...] = TARGETS) -> list[dict]:
    """One result per target and workload whose two variants both ran (the others are left out)."""
    by_key = {(r["workload"], r["variant"]): r for r in rows}
    results = []
    for target in targets:
        for workload in target.workloads:
            num, den = by_key.get((workload, target.numerator)), by_key.get((workload, target.denominator))
            if num is None or den is None:
                continue
            if target.measure == "rss":
                ratio = num["peak_rss_mb"] / den["peak_rss_mb"]
                low = high = ratio
                met = None if target.threshold is None else ratio <= target.threshold
            else:
                per_round = [target.scale * a / b for a, b in zip(num["rates"], den["rates"])]
                ratio, low, high = statistics.median(per_round), min(per_round), max(per_round)
                met = None if target.threshold is None else (
                    ratio > target.threshold if target.strict else ratio >= target.threshold)
            scale = "" if target.scale == 1 else f"{target.scale:g} x "
            results.append({"target": target.label, "workload": workload,
                            "ratio": f"{scale}{target.numerator} / {target.denominator}",
                            "median": ratio, "min": low, "max": high, "threshold": target.threshold, "met": met})
    return results


def markdown(results: list[dict]) -> str:
    if not results:
        return ("(none of issue 6's targets can be judged: each needs both of its variants, e.g. trainer_default "
                "and trainer_k10 for the MLP's 2x; see TARGETS in benchmarks/targets.py)")
    lines = ["| target | workload | ratio | median (min-max of rounds) | met |", "|---|---|---|---|---|"]
    for r in results:
        spread = f"{r['median']:.3f}" if r["min"] == r["max"] else f"{r['median']:.3f} ({r['min']:.2f}-{r['max']:.2f})"
        met = "-" if r["met"] is None else "**yes**" if r["met"] else "**no**"
        lines.append(f"| {r['target']} | {r['workload']} | {r['ratio']} | {spread} | {met} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="the JSON written by python -m benchmarks.suite")
    args = parser.parse_args(argv)
    results = judge(json.loads(Path(args.results).read_text())["rows"])
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
