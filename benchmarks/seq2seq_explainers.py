"""What each encoder–decoder explainer costs on the reorder task, and what one teacher-forced forward saves.

    python benchmarks/seq2seq_explainers.py [--rounds 3] [--examples 100]

An encoder–decoder's explanation is a [target position, source token] matrix (`attnaudit.explain.seq2seq`).
Teacher forcing gives p(y_t | y_<t, x) at every target position t from one forward, so:
- the attention family, saliency, input × gradient and integrated gradients run one forward per (interpolated)
  batch for all positions (the gradients then take one backward per position);
- occlusion, LIME and KernelSHAP evaluate each perturbed source once for every position (`TeacherForcedEngine`),
  and LIME / KernelSHAP draw one set of coalitions per example that every position reuses.
This script times each explainer on a Translator of the reorder task's default size (weights from one short
epoch; the cost does not depend on them), medians of interleaved rounds on one thread, and counts the forwards
of the perturbation explainers against what one engine per target position would run (the same coalitions,
cached per position instead of per example: Σ over examples of its distinct inputs × its positions).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from attnaudit.data.tasks import make_examples
from attnaudit.explain.seq2seq import EXPLAINERS, TeacherForcedEngine, translator_scores
from attnaudit.model.settings import defaults_for
from attnaudit.model.train import train_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--examples", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = dataclasses.replace(defaults_for("reorder"), epochs=1, n_train=256, n_valid=32, n_test=32)
    model, _ = train_task("reorder", settings, device="cpu", progress=False)
    model.net.eval()
    pairs = model.encode(make_examples("reorder", "test", n=args.examples, seed=0))
    positions = int(pairs.targets()[2].sum())
    cfg = model.net.cfg
    print(f"Translator d_model={cfg.d_model}, {cfg.n_layers}+{cfg.n_layers} layers, {cfg.n_heads} heads; "
          f"{args.examples} reorder test examples, {positions} target positions "
          f"({positions / args.examples:.1f} per example); one thread, medians of {args.rounds} rounds")
    times: dict[str, list[float]] = {n: [] for n in EXPLAINERS}
    forwards: dict[str, int] = {}
    unshared: dict[str, int] = {}
    for _ in range(args.rounds):
        for name in EXPLAINERS:                                 # interleaved: every explainer once per round
            engine = TeacherForcedEngine(model, pairs)
            start = time.perf_counter()
            translator_scores(model, pairs, [name], engine=engine)
            times[name].append(time.perf_counter() - start)
            forwards[name] = engine.forwards
            per_row = torch.bincount(torch.tensor([r for r, _ in engine.slot] or [0], dtype=torch.long),
                                     minlength=len(pairs.src))[: len(pairs.src)] * (1 if engine.slot else 0)
            unshared[name] = int((per_row * pairs.targets()[2].sum(1)).sum())   # Σ_i inputs_i × positions_i
    print(f"{'explainer':22s} {'seconds':>8s} {'forwards':>9s} {'per-position engines':>21s}")
    for name in EXPLAINERS:
        f = forwards[name]
        alone = f"{unshared[name]:>21d}" if f else f"{'':>21s}"
        print(f"{name:22s} {statistics.median(times[name]):8.2f} {f:9d} {alone}")


if __name__ == "__main__":
    main()
