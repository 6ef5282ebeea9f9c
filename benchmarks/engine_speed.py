"""How fast is the perturbation engine? Prints figures; it is not a test.

    python benchmarks/engine_speed.py                       # 200 examples of ~30 tokens, then a BERT-sized model
    python benchmarks/engine_speed.py --bert-examples 0     # the small model only
    python benchmarks/engine_speed.py --device cuda         # on a GPU (timings synchronise the device)

For one explainer (random scores) and the engine's metric set (comprehensiveness and sufficiency at
5 bins + AOPC, deletion and insertion AUC, decision flip, τ-LOO), measured side by side in one run:
(a) speed-up of the engine over a loop that runs one forward per perturbed input, each metric on its own;
(b) overhead: time inside the engine / time of plain batched forwards over the same de-duplicated
    sequences (pre-built, pre-sorted by length, at the best batch size);
(c) forwards saved by de-duplication and the cache;
(d) the audit's own engine (`attnaudit.analyses.forwards`): forwards per example in each stage, distinct inputs, and
    its time per forward against a plain batched forward of the same inputs, as the report shows them; beside it the
    same audit with each perturbation explainer on an engine of its own (before one engine served a chunk), and
    with ferret's opt-in preset. Sides interleaved, several rounds, medians.
infidelity and sensitivity-max run captum on embeddings, not through the engine: they are left out.
"""
from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch

import attnaudit.explain.perturb as perturb
from attnaudit.analyses import faithfulness as F
from attnaudit.analyses.audit import AuditSettings, audit
from attnaudit.analyses.tables import ENGINE_METRICS, faithfulness_table
from attnaudit.data.tasks import FILLERS, NEGATIVE, POSITIVE
from attnaudit.explain import get_explainer
from attnaudit.explain.perturb import (
    DEFAULT_MAX_BATCH,
    PerturbationEngine,
    deletion_path,
    insertion_path,
    keep_top_k,
    leave_one_out_path,
    materialize,
    remove_top_k,
)
from attnaudit.model.interface import TextClassifier
from attnaudit.model.transformer import TransformerClassifier, TransformerConfig
from attnaudit.model.vocab import Vocab

WORDS = list(FILLERS + POSITIVE + NEGATIVE)


def build(n: int, length: int, *, d_model=64, n_heads=4, n_layers=2, d_ff=128, seed=0, device="cpu"):
    """A random-weight classifier of the given size on `device` and n texts of length-4..length words (+[CLS], [SEP])."""
    torch.manual_seed(seed)
    vocab = Vocab.build([" ".join(WORDS)])
    cfg = TransformerConfig(vocab_size=len(vocab), n_classes=2, d_model=d_model, n_heads=n_heads,
                            n_layers=n_layers, d_ff=d_ff, dropout=0.1, max_len=length + 2)
    model = TextClassifier(TransformerClassifier(cfg), vocab, label_names=["neg", "pos"]).to(device)
    model.net.eval()
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(length - 4, length))) for _ in range(n)]
    return model, model.encode(texts)


# -- the reference: one forward per perturbed input, each metric on its own ------------------------
def loop_metrics(model, batch, attr) -> dict[str, np.ndarray]:
    """The same metrics, computed with one forward of a single [1, len] sequence per perturbed input."""
    b = len(batch)
    t = attr.target

    def p(i, keep_row):                                    # one perturbed input -> p(target)
        ids, mask = materialize(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1],
                                keep_row[None] | attr.special_mask[i:i + 1], policy="mask",
                                pad_id=model.pad_id, mask_id=model.mask_id)
        n = int(batch.attention_mask[i].sum())
        with torch.inference_mode():
            return model.logits(ids[:, :n], mask[:, :n]).float().softmax(-1)[0]   # [n_classes]

    full_mask = batch.attention_mask
    out = {k: np.zeros(b) for k in ("comp", "suff", "del", "ins", "flip", "tau")}
    n_forwards = 0
    with model.evaluating():
        # comprehensiveness and sufficiency: p(x) and one input per bin, for each metric
        for name, plan in (("comp", remove_top_k), ("suff", keep_top_k)):
            keeps = [plan(attr, k) for k in F.ERASER_BINS]
            for i in range(b):
                full = p(i, full_mask[i])[t[i]]
                out[name][i] = np.mean([float(full - p(i, keep[i])[t[i]]) for keep in keeps])
                n_forwards += 1 + len(keeps)
        # deletion / insertion curves
        for name, path in (("del", deletion_path), ("ins", insertion_path)):
            keep, valid = path(attr)
            for i in range(b):
                ys = [float(p(i, keep[i, s])[t[i]]) for s in range(int(valid[i].sum()))]
                n_forwards += len(ys)
                out[name][i] = np.trapezoid(ys, dx=1 / (len(ys) - 1)) if len(ys) > 1 else math.nan
        # decision flip: its own pass over the deletion path, stopping at the flip
        keep, valid = deletion_path(attr)
        for i in range(b):
            steps = int(valid[i].sum())
            pred0 = int(p(i, keep[i, 0]).argmax())
            n_forwards += 1
            out["flip"][i] = 1.0
            for s in range(1, steps):
                n_forwards += 1
                if int(p(i, keep[i, s]).argmax()) != pred0:
                    out["flip"][i] = s / (steps - 1)
                    break
        # τ-LOO: p(x), then each token left out
        loo_keep, scored = leave_one_out_path(batch.attention_mask, batch.special_mask)
        for i in range(b):
            full = p(i, full_mask[i])[t[i]]
            loo = torch.zeros(batch.input_ids.shape[1])
            for j in scored[i].nonzero()[:, 0].tolist():
                loo[j] = full - p(i, loo_keep[i, j])[t[i]]
                n_forwards += 1
            n_forwards += 1
            out["tau"][i] = float(F.kendall_tau_b(attr.scores[i:i + 1], loo[None], attr.scored_mask[i:i + 1])[0])
    out["n_forwards"] = n_forwards
    return out


def engine_metrics(table) -> dict[str, np.ndarray]:
    def col(metric, setting=""):
        return table[(table.metric == metric) & (table.setting == setting)].value.to_numpy()
    return {"comp": col("comprehensiveness", "aopc"), "suff": col("sufficiency", "aopc"), "del": col("deletion_auc"),
            "ins": col("insertion_auc"), "flip": col("decision_flip_fraction"), "tau": col("tau_loo", "policy=mask")}


# -- plain batched forwards over the engine's unique sequences ------------------------------------
def unique_inputs(engine: PerturbationEngine):
    """Every sequence the engine ran (`engine.inputs()`, re-built from its cache keys), sorted by length."""
    ids, mask = engine.inputs()
    seq = ids.shape[1]
    last = (mask * torch.arange(1, seq + 1)).amax(1)
    order = torch.argsort(last, stable=True)
    return ids[order], mask[order], last[order]


def sync(model) -> None:
    """Wait for the device (CUDA runs asynchronously: a timer read before this would time the launches only)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def plain_forwards(model, ids, mask, last, batch_size: int, repeats: int) -> float:
    """Best of `repeats` timings of chunked forwards (the machine is shared: the minimum is the least disturbed).
    Like the engine, each chunk goes to the model's device and its probabilities come back to the CPU."""
    best = math.inf
    dev = model.device
    for _ in range(repeats):
        sync(model)
        start = time.perf_counter()
        with model.evaluating(), torch.inference_mode():
            for lo in range(0, len(ids), batch_size):
                w = int(last[lo: lo + batch_size].max())
                model.logits(ids[lo: lo + batch_size, :w].to(dev),
                             mask[lo: lo + batch_size, :w].to(dev)).float().softmax(-1).cpu()
        sync(model)
        best = min(best, time.perf_counter() - start)
    return best


def measure(label: str, model, batch, *, sizes=(16, 32, 64, 128, 256, 512), max_batch: int = DEFAULT_MAX_BATCH,
            repeats: int = 3) -> None:
    attr = get_explainer("random", seed=0).explain(model, batch)
    n_tokens = attr.lengths().float()
    print(f"\n== {label}: {len(batch)} examples, {float(n_tokens.mean()):.1f} scored tokens on average "
          f"({int(batch.attention_mask.sum(1).max())} max with [CLS]/[SEP]), "
          f"{sum(p.numel() for p in model.net.parameters()) / 1e6:.2f} M parameters")
    # warm-up (allocator, kernels) on a few examples, outside every timing
    faithfulness_table(model, batch.select(range(min(4, len(batch)))), [attr.select(range(min(4, len(batch))))],
                       metrics=ENGINE_METRICS)

    # engine and plain forwards interleaved, best of `repeats` each: the machine may be shared, and the
    # minimum is the least disturbed run; the loop is long and runs once (its figure errs on the slow side)
    engine, t_engine, t_inside = None, math.inf, math.inf
    times: dict[int, float] = {}
    for r in range(repeats):
        run = PerturbationEngine(model, batch, max_batch=max_batch)               # fresh: nothing cached
        start = time.perf_counter()
        table = faithfulness_table(model, batch, [attr], engine=run, metrics=ENGINE_METRICS)
        took = time.perf_counter() - start
        if took < t_engine:
            engine, t_engine, t_inside = run, took, run.stats.seconds
        if r == 0:
            ids, mask, last = unique_inputs(run)
        for bs in sorted(set(sizes) | {max_batch}):
            times[bs] = min(times.get(bs, math.inf), plain_forwards(model, ids, mask, last, bs, 1))

    start = time.perf_counter()
    ref = loop_metrics(model, batch, attr)
    t_loop = time.perf_counter() - start

    got = engine_metrics(table)
    diff = max(float(np.nanmax(np.abs(got[k] - ref[k]))) for k in got)
    s = engine.stats
    print(f"(a) engine, full metric set:      {t_engine:8.2f} s  best of {repeats}  ({s.forwards} forwards in {s.batches} batches of <= {max_batch})")
    print(f"    loop, one forward per input:  {t_loop:8.2f} s  ({ref['n_forwards']} forwards, one run)")
    print(f"    speed-up:                     {t_loop / t_engine:8.1f} x   (max |engine - loop| over metrics: {diff:.1e})")

    assert len(ids) == s.forwards
    best = min(times, key=times.get)
    print(f"(b) plain batched forwards over the {len(ids)} unique sequences (pre-built, pre-sorted; best of {repeats}): "
          + ", ".join(f"bs {bs}: {t:.2f} s" for bs, t in times.items()))
    print(f"    time inside the engine {t_inside:.2f} s (of which forwards {s.forward_seconds:.2f} s); "
          f"best plain {times[best]:.2f} s at batch size {best}")
    print(f"    overhead: engine / plain at the best batch size = {t_inside / times[best]:.2f}; "
          f"at the engine's own max_batch {max_batch}: {t_inside / times[max_batch]:.2f}   "
          f"(whole faithfulness_table call / plain = {t_engine / times[best]:.2f})")
    print(f"(c) de-duplication: {s.requested} perturbed inputs requested, {s.forwards} run, "
          f"{s.saved} saved ({100 * s.saved / max(s.requested, 1):.0f}%)")
    second = get_explainer("random", seed=1).explain(model, batch)
    before, asked = s.forwards, s.requested
    faithfulness_table(model, batch, [second], engine=engine, metrics=ENGINE_METRICS)
    print(f"    a second explainer on the same engine: {s.requested - asked} requested, "
          f"{s.forwards - before} run (leave-one-out inputs, p(x) and the all-removed input are shared)")


# -- (d) the audit's engine ---------------------------------------------------------------------------------
AUDIT_EXPLAINERS = ["attention", "rollout", "saliency", "occlusion", "lime", "kernel_shap", "random"]


@contextmanager
def engines_counted(shared: bool):
    """Count the forwards of every PerturbationEngine built inside; shared=False gives each perturbation explainer
    an engine of its own (what the audit did before `perturb.sharing`)."""
    built: list = []
    original_init, original_for = perturb.PerturbationEngine.__init__, perturb.engine_for

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(self)

    def own(model, batch, *, policy, max_batch, autocast=False):
        return perturb.PerturbationEngine(model, batch, policy=policy, max_batch=max_batch, autocast=autocast)

    import attnaudit.explain.perturbation as explainers
    perturb.PerturbationEngine.__init__ = init
    if not shared:
        explainers.engine_for = own
    try:
        yield built
    finally:
        perturb.PerturbationEngine.__init__ = original_init
        explainers.engine_for = original_for


def audit_engine(model, batch, *, rounds: int) -> None:
    print(f"\n(d) the audit's engine: {len(batch)} examples, explainers {', '.join(AUDIT_EXPLAINERS)}, "
          f"the faithfulness analysis with its default metrics; {rounds} rounds, sides interleaved, medians")
    sides = {"one engine per chunk (today)": (True, False), "an engine per explainer (before)": (False, False),
             "one engine per chunk + ferret=True": (True, True)}
    runs: dict[str, list] = {k: [] for k in sides}
    for r in range(rounds):
        for label, (shared, ferret) in (sides.items() if r % 2 == 0 else reversed(list(sides.items()))):
            settings = AuditSettings(explainers=AUDIT_EXPLAINERS, analyses=["faithfulness"], ferret=ferret,
                                     chunk_size=64)
            with engines_counted(shared) as built:
                start = time.perf_counter()
                result = audit(model, batch, settings, progress=False)
                took = time.perf_counter() - start
            runs[label].append((took, sum(e.stats.forwards for e in built), result))
    base = statistics.median(t for t, _, _ in runs["one engine per chunk (today)"])
    for label, rows in runs.items():
        took = statistics.median(t for t, _, _ in rows)
        forwards = rows[0][1] / len(batch)
        print(f"    {label:36s} {took:7.2f} s (range {min(t for t, _, _ in rows):.2f}-{max(t for t, _, _ in rows):.2f}; "
              f"{took / base:.2f}x today's)  {forwards:7.1f} forwards per example")
    f = runs["one engine per chunk (today)"][0][2].forwards
    ratios = [r.forwards["ratio_to_plain"] for _, _, r in runs["one engine per chunk (today)"]]
    print(f"    today's audit, as its report shows it: {f['forwards_per_example']} forwards per example "
          f"(explain {f['explain_forwards_per_example']}, faithfulness {f['faithfulness_forwards_per_example']}; "
          f"{f['requested_per_example']} requested, {100 * f['saved_fraction']:.0f}% saved), {f['distinct_inputs']} "
          f"distinct inputs; {f['ms_per_forward']} ms per forward vs {f['plain_ms_per_forward']} ms plain: "
          f"ratio {statistics.median(ratios):.2f} (median of {rounds} rounds, range {min(ratios):.2f}-{max(ratios):.2f}; "
          "target <= 1.2)")
    same = all(r[2].metrics["value"].equals(runs["one engine per chunk (today)"][0][2].metrics["value"])
               for r in runs["an engine per explainer (before)"])
    old = runs["an engine per explainer (before)"][0][2].metrics
    new = runs["one engine per chunk (today)"][0][2].metrics
    diff = float((old["value"] - new["value"]).abs().max())
    print(f"    the two engine layouts give {'identical' if same else 'the same'} metrics (largest difference {diff:.1e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--length", type=int, default=30, help="words per example, at most (at least length-4)")
    ap.add_argument("--bert-examples", type=int, default=3, help="examples for the BERT-sized model (0 skips it)")
    ap.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="the engine's max_batch")
    ap.add_argument("--repeats", type=int, default=5, help="engine and plain timings: best of this many")
    ap.add_argument("--audit-examples", type=int, default=64, help="examples for (d), the audit's engine (0 skips it)")
    ap.add_argument("--audit-rounds", type=int, default=3, help="rounds of (d)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); pass 1 on a busy shared machine, where spinning "
                         "OpenMP threads make timings erratic")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, "
          + (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"))
    model, batch = build(args.examples, args.length, device=args.device)
    measure("built-in architecture (d_model 64, 4 heads, 2 layers)", model, batch, max_batch=args.max_batch,
            repeats=args.repeats)
    if args.audit_examples > 0:
        audit_engine(model, batch.select(range(min(args.audit_examples, len(batch)))), rounds=args.audit_rounds)
    if args.bert_examples > 0:
        model, batch = build(args.bert_examples, args.length, d_model=768, n_heads=12, n_layers=12, d_ff=3072,
                             device=args.device)
        measure(f"BERT-sized (d_model 768, 12 heads, 12 layers, d_ff 3072; only {args.bert_examples} examples)",
                model, batch, sizes=(16, 64, 128, 256), max_batch=args.max_batch, repeats=1)


if __name__ == "__main__":
    main()
