"""Plausibility: do explanations point at the evidence a person (or the task's construction) marks?

Two settings, one score per example, always over the scored tokens (real, not special):

- ground truth on the built-in tasks (the planted words, `batch.rationale`): average precision, AUPRC and
  precision@k with k = the number of gold tokens;
- human rationales, ERASER-style (DeYoung et al. 2020): token F1, IOU F1 (span matching at IOU ≥ θ),
  average precision and AUPRC.

    gold_table([attr_a, attr_b], batch)        # gold_average_precision, gold_auprc, gold_precision_at_k
    rationale_table([attr_a, attr_b], batch)   # rationale_token_f1, rationale_iou_f1,
                                               # rationale_average_precision, rationale_auprc

The two soft-score measures carry ERASER's names and definitions (`eraserbenchmark/rationale_benchmark/
metrics.py`): `average_precision` is sklearn's `average_precision_score` (a step sum, skipping documents whose
tokens are all of one class), `auprc` the trapezoid `auc(recall, precision)` of `precision_recall_curve`; they
differ by up to about 0.3 on one example. Where an example has no gold token, every metric is NaN (undefined;
ERASER's macro average would count such an instance as 0). ERASER's macro IOU F1 is the F1 of the averaged precision and recall;
here each example gets its own F1, so the table's mean is the mean of per-example F1s (as for token F1).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from attnaudit.analyses.schema import tidy_frame, tidy_rows
from attnaudit.explain.attribution import Attribution
from attnaudit.model.interface import Batch


def _gold(attribution: Attribution, gold: Tensor) -> Tensor:
    """gold [batch, seq] as bool, restricted to scored tokens; shape checked."""
    if tuple(gold.shape) != tuple(attribution.scores.shape):
        raise ValueError(f"gold must have the attribution's shape {tuple(attribution.scores.shape)} [batch, seq]; "
                         f"got {tuple(gold.shape)}. Explain the same batch the rationale comes from.")
    return (gold.cpu() > 0) & attribution.scored_mask


def average_precision(attribution: Attribution, gold: Tensor) -> Tensor:
    """ERASER's `average_precision` per example -> [batch]: sklearn's `average_precision_score` of the scores
    against the gold tokens (Σ over distinct thresholds of ΔTP / n_gold × precision), NaN where an example's
    scored tokens are all gold or none (ERASER skips such single-class documents)."""
    return pr_metrics(attribution, gold)[0]


def auprc(attribution: Attribution, gold: Tensor) -> Tensor:
    """ERASER's `auprc` per example -> [batch]: the trapezoid area under sklearn's precision-recall curve
    (`auc(recall, precision)` of `precision_recall_curve`, from (recall 0, precision 1)), NaN where no token is
    gold. Not average precision: the trapezoid interpolates precision linearly between thresholds."""
    return pr_metrics(attribution, gold)[1]


def pr_metrics(attribution: Attribution, gold: Tensor) -> tuple[Tensor, Tensor]:
    """(average_precision, auprc) per example, both from one sort -> two float64 [batch]."""
    g = _gold(attribution, gold).numpy()                                            # [batch, seq] bool
    keep = attribution.scored_mask.numpy()                                          # [batch, seq] bool
    ap, area = pr_scores(attribution.scores.double().numpy(), g, keep)
    single_class = g.sum(1) == keep.sum(1)                                          # every scored token gold
    return torch.from_numpy(np.where(single_class, np.nan, ap)), torch.from_numpy(area)


def pr_scores(scores: np.ndarray, gold: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's average precision and the trapezoid AUPRC per row over the kept positions, all rows at once
    -> two float64 [batch] (NaN: no gold kept); equal to the sklearn calls to ~1e-15.

    Tied scores form one threshold, as in sklearn. Args: scores [batch, seq] float; gold, keep [batch, seq] bool.
    """
    gold = gold & keep
    key = np.where(keep, scores, -np.inf)                                           # dropped positions sort last
    order = np.argsort(-key, axis=1, kind="stable")                                 # [batch, seq] descending
    s = np.take_along_axis(key, order, 1)
    g = np.take_along_axis(gold, order, 1)
    k = np.take_along_axis(keep, order, 1)
    tp = np.cumsum(g, axis=1)                                                       # true positives down to j
    rank = np.arange(1, s.shape[1] + 1)                                             # tokens down to j
    nxt_same = np.zeros_like(k)
    nxt_same[:, :-1] = (s[:, 1:] == s[:, :-1]) & k[:, 1:]
    boundary = k & ~nxt_same                                                        # last token of a tie group
    n_gold = g.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tp / rank, tp / n_gold                                  # [batch, seq], at each j
    # the boundary before j (-1: the curve's start, recall 0 and precision 1)
    last = np.maximum.accumulate(np.where(boundary, rank - 1, -1), axis=1)
    before = np.concatenate([np.full((len(s), 1), -1), last[:, :-1]], axis=1)
    prev_p = np.where(before >= 0, np.take_along_axis(precision, before.clip(0), 1), 1.0)
    prev_r = np.where(before >= 0, np.take_along_axis(recall, before.clip(0), 1), 0.0)
    step = np.where(boundary, recall - prev_r, 0.0)                                 # Δrecall at each threshold
    with np.errstate(invalid="ignore"):
        ap = (step * precision).sum(1)
        area = (step * (precision + prev_p) / 2).sum(1)
    missing = n_gold[:, 0] == 0
    return np.where(missing, np.nan, ap), np.where(missing, np.nan, area)


def precision_at_k(attribution: Attribution, gold: Tensor) -> Tensor:
    """Fraction of the top-k tokens that are gold, k = number of gold tokens per example -> [batch].

    Ties break by position, as in `Attribution.ranking`.
    """
    g = _gold(attribution, gold)
    n_gold = g.sum(1)                                                              # [batch]
    hits = (predicted_rationale(attribution, gold) & g).sum(1)                     # [batch]
    return torch.where(n_gold > 0, hits / n_gold.clamp_min(1), torch.nan).double()


def predicted_rationale(attribution: Attribution, gold: Tensor | None = None, *, k: int | float | None = None,
                        threshold: float | None = None) -> Tensor:
    """The tokens an explanation marks as rationale -> bool [batch, seq].

    Exactly one rule: `threshold` (scores ≥ threshold, as stored; normalise first if you need to),
    `k` (top-k tokens: an int count or a fraction, see `Attribution.top_k`), or, by default, the top-k
    with k = each example's number of gold tokens (needs `gold`).
    """
    if k is not None and threshold is not None:
        raise ValueError(f"give k or threshold, not both; got k={k!r}, threshold={threshold!r}.")
    if threshold is not None:
        return (attribution.scores >= threshold) & attribution.scored_mask
    if k is not None:
        return attribution.top_k(k)
    if gold is None:
        raise ValueError("k=None means k = the number of gold tokens per example, so gold is required; "
                         "pass gold, an explicit k, or a threshold.")
    n_gold = _gold(attribution, gold).sum(1)                                       # [batch]
    ranking = attribution.ranking()                                                # [batch, seq]
    rank_of = torch.empty_like(ranking).scatter_(1, ranking, torch.arange(ranking.shape[1]).expand_as(ranking).contiguous())
    return (rank_of < n_gold[:, None]) & attribution.scored_mask


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision == 0 or recall == 0 else 2 * precision * recall / (precision + recall)


def token_f1(attribution: Attribution, gold: Tensor, *, k: int | float | None = None,
             threshold: float | None = None) -> Tensor:
    """ERASER token-level F1 per example: precision and recall of predicted vs gold tokens -> [batch]."""
    g = _gold(attribution, gold)
    pred = predicted_rationale(attribution, gold, k=k, threshold=threshold)
    n_gold, n_pred, hits = g.sum(1).double(), pred.sum(1).double(), (g & pred).sum(1).double()   # [batch] each
    precision = torch.where(n_pred > 0, hits / n_pred.clamp_min(1), 0.0)
    recall = hits / n_gold.clamp_min(1)
    f1 = torch.where((precision > 0) & (recall > 0), 2 * precision * recall / (precision + recall), 0.0)
    return torch.where(n_gold > 0, f1, torch.nan)


def spans(row: Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True in a bool [seq] row -> [(start, end)], end exclusive."""
    x = np.concatenate([[False], row.cpu().numpy().astype(bool), [False]])
    edges = np.flatnonzero(x[1:] != x[:-1])
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]


def iou_f1(attribution: Attribution, gold: Tensor, *, theta: float = 0.5, k: int | float | None = None,
           threshold: float | None = None) -> Tensor:
    """ERASER IOU F1 per example -> [batch].

    Predicted spans are maximal runs of predicted tokens, gold spans maximal runs of gold tokens. A
    predicted span is a true positive if its best IOU with a gold span is ≥ `theta`; precision =
    TP / #predicted spans, recall = TP / #gold spans (ERASER's `partial_match_score`).
    """
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"theta must be in (0, 1]; got {theta!r}.")
    g = _gold(attribution, gold)
    pred = predicted_rationale(attribution, gold, k=k, threshold=threshold)
    out = torch.full((len(attribution),), float("nan"), dtype=torch.float64)
    for i in range(len(attribution)):
        gold_spans, pred_spans = spans(g[i]), spans(pred[i])
        if not gold_spans:
            continue
        tp = sum(max(_iou(p, t) for t in gold_spans) >= theta for p in pred_spans)
        out[i] = _f1(tp / len(pred_spans) if pred_spans else 0.0, tp / len(gold_spans))
    return out


def _iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    """Intersection over union of two non-empty [start, end) spans."""
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / ((a[1] - a[0]) + (b[1] - b[0]) - inter)


# -- tables ---------------------------------------------------------------------------------------
def _attributions(attributions: Attribution | Sequence[Attribution], batch: Batch) -> tuple[list[Attribution], Tensor]:
    attrs = [attributions] if isinstance(attributions, Attribution) else list(attributions)
    if not attrs or not all(isinstance(a, Attribution) for a in attrs):
        raise TypeError(f"attributions must be an Attribution or a non-empty list of them; got {type(attributions).__name__}.")
    if batch.rationale is None:
        raise ValueError("batch.rationale is None: these metrics need gold rationales; encode Examples that carry one.")
    for a in attrs:
        if a.ids and batch.ids and list(a.ids) != list(batch.ids):
            raise ValueError(f"attribution {a.method!r} covers examples {a.ids[:3]}… but the batch has {batch.ids[:3]}…; "
                             "explain the same batch.")
    return attrs, batch.rationale


def _rows(attr: Attribution, metric: str, setting: str, values: Tensor) -> list[tuple]:
    return tidy_rows(attr.ids, attr.method, metric, setting, values, note=None)


def gold_table(attributions: Attribution | Sequence[Attribution], batch: Batch) -> pd.DataFrame:
    """gold_average_precision, gold_auprc and gold_precision_at_k per example and explainer -> tidy DataFrame."""
    attrs, gold = _attributions(attributions, batch)
    rows = []
    for a in attrs:
        ap, area = pr_metrics(a, gold)
        rows += _rows(a, "gold_average_precision", "", ap)
        rows += _rows(a, "gold_auprc", "", area)
        rows += _rows(a, "gold_precision_at_k", "k=n_gold", precision_at_k(a, gold))
    return tidy_frame(rows, note=False)


def rationale_table(attributions: Attribution | Sequence[Attribution], batch: Batch, *, theta: float = 0.5,
                    k: int | float | None = None, threshold: float | None = None) -> pd.DataFrame:
    """rationale_token_f1, rationale_iou_f1, rationale_average_precision and rationale_auprc per example and
    explainer -> tidy DataFrame.

    The setting records the rule that picked the predicted tokens ("k=n_gold" by default).
    """
    attrs, gold = _attributions(attributions, batch)
    rule = f"threshold={threshold}" if threshold is not None else f"k={k}" if k is not None else "k=n_gold"
    rows = []
    for a in attrs:
        rows += _rows(a, "rationale_token_f1", rule, token_f1(a, gold, k=k, threshold=threshold))
        rows += _rows(a, "rationale_iou_f1", f"{rule},theta={theta}", iou_f1(a, gold, theta=theta, k=k, threshold=threshold))
        ap, area = pr_metrics(a, gold)
        rows += _rows(a, "rationale_average_precision", "", ap)
        rows += _rows(a, "rationale_auprc", "", area)
    return tidy_frame(rows, note=False)
