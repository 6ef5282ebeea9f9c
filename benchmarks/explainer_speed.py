"""Explanations per second for every registered explainer, on the default classifier size (CPU).

    python benchmarks/explainer_speed.py                 # batch 64, length 32, default parameters
    python benchmarks/explainer_speed.py --batch 16 --only saliency occlusion

The model is the built-in architecture at its default size (d_model 64, 4 heads, 2 layers, d_ff 128)
with random weights: speed does not depend on what the weights learned. Every input has exactly
`--length` tokens ([CLS], length−2 words, [SEP]). Each explainer runs once on a one-example warm-up
(imports, first-call allocation), then is timed on the batch: the best of up to `--repeats` runs (the
CPU may be shared; the best run is the least disturbed one). Integrated Gradients (512 steps), LIME
and KernelSHAP (one surrogate per example) are timed on 16, 8 and 8 examples unless `--full` (the
table says so); their cost grows linearly with the examples, so explanations per second carry over.
An explainer whose module another engineer is still writing is skipped with a note. One CPU thread by
default: on a shared 2-core machine two threads made the figures swing tenfold from run to run.
"""
from __future__ import annotations

import argparse
import random
import time
import warnings

import torch

from attnaudit.explain import get_explainer, list_explainers
from attnaudit.explain.registry import explainer_class
from attnaudit.model.interface import TextClassifier
from attnaudit.model.transformer import TransformerClassifier, TransformerConfig
from attnaudit.model.vocab import Vocab

# The costly ones are timed on fewer examples (their cost is linear in the examples: expl/s carries over).
FEWER = {"integrated_gradients": (16, "512 interpolation steps each"),
         "lime": (8, "one surrogate fit per example"), "kernel_shap": (8, "one surrogate fit per example")}


def build_model(seed: int = 0) -> TextClassifier:
    """The default classifier size with random weights, and a 200-word vocabulary."""
    torch.manual_seed(seed)
    vocab = Vocab.build([" ".join(f"w{i}" for i in range(200))])
    cfg = TransformerConfig(vocab_size=len(vocab), n_classes=2)  # defaults: d_model 64, 4 heads, 2 layers
    model = TextClassifier(TransformerClassifier(cfg), vocab, label_names=["neg", "pos"])
    model.net.eval()
    return model


def make_texts(n: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(200)}" for _ in range(length - 2)) for _ in range(n)]


def time_best(name: str, model, batch, *, repeats: int, budget_s: float) -> float:
    """Best wall time of up to `repeats` explain() calls (fewer once `budget_s` is spent); after a warm-up."""
    explainer = get_explainer(name)
    explainer.explain(model, batch.select([0]))                                  # warm-up: imports, first calls
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        explainer.explain(model, batch)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="examples per explain() call")
    parser.add_argument("--length", type=int, default=32, help="tokens per example, [CLS] and [SEP] included")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 = torch's own choice")
    parser.add_argument("--full", action="store_true", help="time IG, LIME and KernelSHAP on the whole batch too")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per explainer; the best is shown")
    parser.add_argument("--budget", type=float, default=10.0, help="stop repeating after this many seconds")
    parser.add_argument("--only", nargs="*", default=None, help="explainer names (default: all registered)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model()
    batch = model.encode(make_texts(args.batch, args.length))                   # encoding is not timed
    names = args.only or list_explainers()
    print(f"model: {model!r}; CPU threads: {torch.get_num_threads()}; batch {args.batch}, length {args.length}; "
          f"best of up to {args.repeats} runs")
    print(f"{'explainer':<22}{'examples':>9}{'seconds':>10}{'expl/s':>10}  note")
    for name in names:
        few = name in FEWER and not args.full
        n = min(FEWER[name][0], args.batch) if few else args.batch
        try:
            explainer_class(name)
        except (ImportError, AttributeError) as e:                               # module or class not written yet
            print(f"{name:<22}{'-':>9}{'-':>10}{'-':>10}  skipped: {type(e).__name__}: {e}")
            continue
        try:
            seconds = time_best(name, model, batch.select(range(n)), repeats=args.repeats, budget_s=args.budget)
        except Exception as e:                                                   # report, keep measuring the rest
            print(f"{name:<22}{'-':>9}{'-':>10}{'-':>10}  failed: {type(e).__name__}: {e}")
            continue
        note = f"timed on {n} examples only ({FEWER[name][1]})" if few else ""
        print(f"{name:<22}{n:>9}{seconds:>10.3f}{n / seconds:>10.1f}  {note}", flush=True)


if __name__ == "__main__":
    main()
