"""How much JSD the adversarial-attention search finds as it gets more steps and more adversaries (issue 16, item 5).

    python3 benchmarks/adversary_strength.py --tasks keywords,needle --examples 32
    python3 benchmarks/adversary_strength.py --tasks keywords --steps 10,40,200 --adversaries 1,3 --layers all,0

Each built-in task's model is trained (or reused from --runs) exactly as `attnaudit run` does (its default
TrainSettings, seed --seed); the batch is the first --examples of its test split, encoded as the audit does.
For every layer and number of adversaries K, one search of max(--steps) steps is read at every step count
(`adversarial_curve`: Adam has no schedule, so its first s steps are the s-step search), with Jain & Wallace's
diversity weight (K − 1)/K² for K > 1 and the default search's lr, penalty and init_noise (--lr to change lr).
Columns: mean and median JSD reached, the fraction of examples with a feasible adversary (TVD ≤ ε), the
forward + backward passes per example (steps × K) and seconds, estimated as the search's measured time ×
(steps + 1)/(max steps + 1) (every step costs the same). --preset adds one row per task and layer for the
"jain_wallace" preset itself. At the end, per task and layer: the cheapest (steps, K) whose mean JSD is within
--within (relative) of the largest grid point's, which is how the defaults were chosen.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from attnaudit.analyses.counterfactual import (
    ADVERSARY_PRESETS,
    adversarial_curve,
    jain_wallace_diversity,
)
from attnaudit.jobs.models import model_folder, trained_model
from attnaudit.model.train import defaults_for, task_examples


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def task_batch(task: str, *, runs: Path, seed: int, n_examples: int):
    """The model `attnaudit run` trains for `task` (reused when already in runs/) and its first test examples."""
    settings = defaults_for(task).replace(seed=seed)
    model, _, _ = trained_model(task, settings, model_folder(runs, task, settings), device="cpu", progress=False,
                                echo=lambda line: print(f"# {line}", flush=True))
    examples = task_examples(task, settings)["test"][:n_examples]
    return model, model.encode(examples, truncate=True)


def measure(model, batch, *, layer, steps: list[int], k: int, diversity: float, epsilon: float, seed: int,
            **search) -> list[dict]:
    """One search read at every step count -> a row per step count."""
    start = time.perf_counter()
    curve = adversarial_curve(model, batch, layer=layer, steps=steps, epsilon=epsilon, seed=seed,
                              n_adversaries=k, diversity=diversity, **search)     # a row per (steps, example)
    seconds = time.perf_counter() - start
    rows = []
    for s in steps:
        r = curve[curve.steps == s]
        rows.append(dict(layer=str(layer), steps=s, k=k, diversity=diversity, mean_jsd=float(r.jsd.mean()),
                         median_jsd=float(r.jsd.median()), feasible=float(r.satisfied.mean()),
                         passes=s * k, seconds=seconds * (s + 1) / (max(steps) + 1)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="keywords,needle", help="comma-separated built-in classification tasks")
    ap.add_argument("--examples", type=int, default=32, help="the first N test examples of each task")
    ap.add_argument("--steps", default="10,20,40,100,200,500", help="step counts to read the searches at")
    ap.add_argument("--adversaries", default="1,3,10", help="adversaries per example (K)")
    ap.add_argument("--layers", default="all", help="'all' and/or layer indices, comma-separated")
    ap.add_argument("--lr", type=float, default=ADVERSARY_PRESETS["default"]["lr"], help="Adam's step size")
    ap.add_argument("--no-diversity", action="store_true", help="diversity weight 0 for every K")
    ap.add_argument("--preset", action="store_true", help="add a row for the jain_wallace preset itself")
    ap.add_argument("--epsilon", type=float, default=0.01, help="the output TVD bound")
    ap.add_argument("--within", type=float, default=0.02, help="relative gap to the largest grid point")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="model folders (as `attnaudit run --runs`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, ks = sorted(_ints(args.steps)), sorted(_ints(args.adversaries))
    layers = [x if x == "all" else int(x) for x in args.layers.split(",") if x]
    search = {k: v for k, v in ADVERSARY_PRESETS["default"].items() if k in ("penalty", "init_noise", "amsgrad")}
    search["lr"] = args.lr
    print(f"# epsilon={args.epsilon} lr={args.lr} penalty={search['penalty']} init_noise={search['init_noise']} "
          f"diversity={'0' if args.no_diversity else '(K-1)/K^2'} examples={args.examples} seed={args.seed} "
          f"threads={args.threads}", flush=True)
    header = f"{'task':<9} {'layer':>5} {'K':>3} {'div':>5} {'steps':>5} {'passes':>6} {'mean_jsd':>9} " \
             f"{'median_jsd':>10} {'feasible':>8} {'seconds':>8}"
    print(header, flush=True)
    best: list[str] = []
    for task in args.tasks.split(","):
        model, batch = task_batch(task, runs=args.runs, seed=args.seed, n_examples=args.examples)
        for layer in layers:
            rows = []
            for k in ks:
                div = 0.0 if args.no_diversity else jain_wallace_diversity(k)
                new = measure(model, batch, layer=layer, steps=steps, k=k, diversity=div, epsilon=args.epsilon,
                              seed=args.seed, **search)
                rows += new
                for r in new:
                    print(_line(task, r), flush=True)
            if args.preset:
                jw = dict(ADVERSARY_PRESETS["jain_wallace"])
                n, k, div = jw.pop("n_steps"), jw.pop("n_adversaries"), jw.pop("diversity")
                r = measure(model, batch, layer=layer, steps=[n], k=k, diversity=div, epsilon=args.epsilon,
                            seed=args.seed, **jw)[0]
                print(_line(task, r, tag=" jain_wallace preset"), flush=True)
            top = next(r for r in rows if r["steps"] == steps[-1] and r["k"] == ks[-1])
            ok = [r for r in rows if r["mean_jsd"] >= (1 - args.within) * top["mean_jsd"]]
            pick = min(ok, key=lambda r: (r["passes"], r["steps"]))
            best.append(f"{task} layer {layer}: steps={pick['steps']} K={pick['k']} ({pick['passes']} passes) reaches "
                        f"mean JSD {pick['mean_jsd']:.4f}, within {args.within:.0%} of steps={top['steps']} "
                        f"K={top['k']}'s {top['mean_jsd']:.4f} ({top['passes']} passes); feasible {pick['feasible']:.3f}")
    print("\n# cheapest grid point within the gap of the largest, per task and layer")
    for line in best:
        print(line)


def _line(task: str, r: dict, tag: str = "") -> str:
    return (f"{task:<9} {r['layer']:>5} {r['k']:>3} {r['diversity']:>5.3f} {r['steps']:>5} {r['passes']:>6} "
            f"{r['mean_jsd']:>9.4f} {r['median_jsd']:>10.4f} {r['feasible']:>8.3f} {r['seconds']:>8.1f}{tag}")


if __name__ == "__main__":
    main()
