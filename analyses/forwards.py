"""What the audit's perturbation engine ran: forwards per stage, distinct inputs, time per forward.

Each chunk of the audit has one `PerturbationEngine` (`analyses.audit._chunk`). Its counters are read twice: after
the explainers (occlusion, LIME and KernelSHAP evaluate through it: stage "explain") and after the faithfulness
metrics (curves, ERASER bins, ferret's preset, τ-LOO, decision flips: stage "faithfulness"). Every count is
additive, so chunks (and the halves of a chunk retried after running out of memory) sum:

    record = chunk_forwards(engine, explained, plain_seconds(engine))
    figures = forward_figures(add_forwards([record, ...]))
    figures["forwards_per_example"], figures["ratio_to_plain"]

"forwards" counts the sequences the model actually ran, which are the distinct (example, policy, keep-mask)
inputs: the engine never runs one twice. "requested" counts what the metrics and explainers asked for. The time
per forward (the engine's whole time, materialising and caching included, over its forwards) is set against a
plain batched forward of the same distinct inputs (`model.logits`, sorted by length, `max_batch` rows per call; a
sample of those calls timed, the median of three passes each, and scaled to all of them), in the same run on the
same machine.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from attnaudit.explain.perturb import PerturbationEngine

STAGES = ("explain", "faithfulness")
# the figures of `forward_figures` that are wall-clock measurements: a report keeps them with its timings (they
# differ from run to run), the counts beside its settings
TIMED = ("ms_per_forward", "plain_ms_per_forward", "ratio_to_plain")
COUNTS = ("requested", "forwards", "batches", "seconds", "forward_seconds")
PLAIN_ROUNDS = 3
PLAIN_REFERENCE = "model.logits over the engine's distinct inputs, sorted by length, max_batch rows a call (sampled calls)"
PLAIN_SAMPLE = 3          # calls of the plain forward timed per chunk, spread over the inputs sorted by length


def chunk_forwards(engine: PerturbationEngine, explained: Mapping, plain: float) -> dict:
    """The engine's counters after the whole chunk, split at `explained` (its `stats.as_dict()` after the
    explainers), and `plain` (`plain_seconds(engine)`) -> an additive record
    {examples, plain_seconds, stages: {stage: {requested, forwards, ...}}}."""
    total = engine.stats.as_dict()
    explain = {k: explained[k] for k in COUNTS}
    rest = {k: total[k] - explained[k] for k in COUNTS}
    n = len(engine.batch)
    return {"examples": n, "plain_seconds": plain, "stages": {"explain": explain, "faithfulness": rest}}


def add_forwards(records: Sequence[Mapping]) -> dict:
    """The sum of chunk records (the same shape); an empty list gives an empty dict."""
    records = [r for r in records if r]
    if not records:
        return {}
    return {"examples": sum(r["examples"] for r in records),
            "plain_seconds": sum(r["plain_seconds"] for r in records),
            "stages": {s: {k: sum(r["stages"][s][k] for r in records) for k in COUNTS} for s in STAGES}}


def forward_figures(record: Mapping) -> dict:
    """An additive record -> the report's figures: per example and per stage, time per forward, ratio to plain."""
    if not record:
        return {}
    n = record["examples"]
    stages = record["stages"]
    requested = sum(stages[s]["requested"] for s in STAGES)
    ran = sum(stages[s]["forwards"] for s in STAGES)
    seconds = sum(stages[s]["seconds"] for s in STAGES)
    per_forward = seconds / ran if ran else float("nan")
    plain = record["plain_seconds"] / ran if ran else float("nan")
    return {
        "examples": n,
        "forwards_per_example": _round(ran / n),
        "requested_per_example": _round(requested / n),
        "distinct_inputs": ran,
        "saved_fraction": _round(1.0 - ran / requested) if requested else 0.0,
        "ms_per_forward": _round(1e3 * per_forward),
        "plain_ms_per_forward": _round(1e3 * plain),
        "ratio_to_plain": _round(per_forward / plain) if ran and plain > 0 else float("nan"),
        "plain_reference": PLAIN_REFERENCE,
        **{f"{s}_forwards_per_example": _round(stages[s]["forwards"] / n) for s in STAGES},
        **{f"{s}_requested_per_example": _round(stages[s]["requested"] / n) for s in STAGES},
    }


def split_timed(forwards: Mapping[str, Mapping]) -> tuple[dict, dict]:
    """{task: forward_figures} -> ({task: the counts}, {task: the TIMED figures})."""
    counts = {str(t): {k: v for k, v in f.items() if k not in TIMED} for t, f in forwards.items()}
    timed = {str(t): {k: f[k] for k in TIMED if k in f} for t, f in forwards.items()}
    return counts, timed


def plain_seconds(engine: PerturbationEngine, *, sample: int = PLAIN_SAMPLE, rounds: int = PLAIN_ROUNDS) -> float:
    """Seconds a plain batched forward would take over every distinct input `engine` ran: the inputs re-built from
    its cache keys, sorted by length, in the engine's own chunks (`engine.chunks`; cut to each call's longest row, softmax and
    copy to the CPU as the engine does); `sample` calls evenly spread over the sorted order are timed (the median
    of `rounds` passes each) and scaled by rows to all of them."""
    ids, mask = engine.inputs()                                                 # [n, seq] each
    if not len(ids):
        return 0.0
    seq = ids.shape[1]
    positions = torch.arange(1, seq + 1)
    width = (mask * positions).amax(1)                                          # [n] last attended position
    order = torch.argsort(width, stable=True)
    calls = engine.chunks(width[order])
    picked = [calls[j] for j in sorted({round(j * (len(calls) - 1) / max(sample - 1, 1))
                                        for j in range(min(sample, len(calls)))})]
    model = engine.model
    device = torch.device(getattr(model, "device", None) or "cpu")
    timed, timed_rows = 0.0, 0
    with model.evaluating(), torch.inference_mode():
        for part in picked:
            idx = order[part]
            w = max(int(width[idx].max()), 1)
            part_ids, part_mask = ids[idx, :w].to(device), mask[idx, :w].to(device)
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                model.logits(part_ids, part_mask).float().softmax(-1).cpu()     # [chunk, n_classes]
                times.append(time.perf_counter() - start)
            timed += statistics.median(times)
            timed_rows += len(idx)
    return timed * len(order) / timed_rows   # (rows, not tokens: the sampled calls span the lengths)


def _round(x: float) -> float:
    return float(f"{x:.4g}")
