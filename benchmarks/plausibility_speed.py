"""Vectorised average precision and AUPRC (analyses.plausibility.pr_scores) vs ERASER's sklearn calls per example.

    python benchmarks/plausibility_speed.py [--examples 64] [--explainers 15] [--seq 32] [--rounds 7]

The workload of one audit chunk: `examples` rows of `seq` tokens, one score row per explainer. The reference
side is what ERASER's metrics.py runs per document: `average_precision_score`, and `precision_recall_curve`
then `auc(recall, precision)`. Both sides run interleaved in each round; the script prints the medians and
ranges of the two times, their ratio, and the largest difference between the two results (both measures; they
must agree to 1e-12).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from sklearn.metrics import auc, average_precision_score, precision_recall_curve

from attnaudit.analyses.plausibility import pr_scores


def sklearn_loop(scores, gold, keep):
    out = np.full((2, len(scores)), np.nan)
    for i in range(len(scores)):
        g, s = gold[i, keep[i]], scores[i, keep[i]]
        if g.any():
            precision, recall, _ = precision_recall_curve(g, s)
            out[:, i] = average_precision_score(g, s), auc(recall, precision)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--explainers", type=int, default=15)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    work = []
    for _ in range(args.explainers):
        lengths = rng.integers(args.seq // 4, args.seq + 1, size=args.examples)
        keep = np.arange(args.seq)[None, :] < lengths[:, None]
        work.append((rng.normal(size=(args.examples, args.seq)), rng.random((args.examples, args.seq)) < 0.2, keep))
    times = {"sklearn": [], "vectorised": []}
    diff = 0.0
    for _ in range(args.rounds):
        t = time.perf_counter()
        ref = [sklearn_loop(*w) for w in work]
        times["sklearn"].append(time.perf_counter() - t)
        t = time.perf_counter()
        got = [np.stack(pr_scores(*w)) for w in work]
        times["vectorised"].append(time.perf_counter() - t)
        diff = max(diff, max(float(np.nanmax(np.abs(a - b))) for a, b in zip(ref, got)))
    for side, ts in times.items():
        print(f"{side:>10}: median {statistics.median(ts) * 1e3:8.2f} ms  (range {min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f} ms)")
    ratios = [a / b for a, b in zip(times["sklearn"], times["vectorised"])]
    print(f"speed-up: median {statistics.median(ratios):.0f}x (range {min(ratios):.0f}-{max(ratios):.0f}x) on "
          f"{args.examples} examples x {args.explainers} explainers x {args.seq} tokens; largest difference {diff:.1e}")


if __name__ == "__main__":
    main()
