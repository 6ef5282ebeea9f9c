"""Serrano & Smith (2019, "Is Attention Interpretable?", ACL): how much attention must be zeroed to flip the decision?

At one attention layer (an int), per example, rank the keys the prediction row attends and zero them in that order
(renormalising the remaining weights) until the predicted class changes; report the fraction of the attended keys
that had to be zeroed. Rankings (all largest first, ties broken by position):

- ``attention``: the prediction row's attention weight, averaged over heads;
- ``gradient``: d(logit of the predicted class)/d(attention weight) of that row, averaged over heads (signed), at
  the unedited attention;
- ``attention_x_gradient``: attention × that gradient per head, averaged over heads (signed);
- ``random``: a seeded random order of the attended keys.

The prediction row is query 0 ([CLS]) for encoders and the last real token for decoders
(`attnaudit.model.steps.readout_index`). Zeroing k keys sets those keys to 0 in every head of the prediction row
only (other query rows are untouched) and renormalises that row per head over the keys it still attends. The keys
are the ones the row may attend (padding excluded; special tokens such as [CLS]/[SEP] count as keys, as attention
sees them). k runs over 1 … n_keys − 1 (one key always stays); the smallest k whose argmax differs from the
unedited prediction gives ``fraction = k / n_keys``; an example that never flips has fraction and n_zeroed NaN and
``flipped`` False.

    frame = attention_zeroing(model, batch, layer=1)      # example_id, layer, ranking, fraction, n_zeroed, n_keys, flipped
    rows = attention_zeroing_summary(frame)                # (test, layer, head, statistic, value)

Cost: one forward (plus one backward when a gradient ranking is asked) over the batch, then every (ranking,
example, k) as one edited row: Σ_rankings Σ_examples (n_keys − 1) rows, in ⌈rows / max_batch⌉ forwards.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from attnaudit.analyses.counterfactual import example_ids, layer_sites
from attnaudit.model.hooks import Edit, hooks
from attnaudit.model.interface import Batch
from attnaudit.model.interventions import _renormalise
from attnaudit.model.steps import readout_index

if TYPE_CHECKING:
    from attnaudit.model.interface import ExplainableModel

TEST = "attention_zeroing"
RANKINGS = ("attention", "gradient", "attention_x_gradient", "random")
COLUMNS = ["example_id", "layer", "ranking", "fraction", "n_zeroed", "n_keys", "flipped"]


# -- plumbing ------------------------------------------------------------------------------------
def zero_row_keys(rows: Tensor, zeroed: Tensor) -> Edit:
    """Zero keys `zeroed` [batch, key] (bool) in every head of query row `rows` [batch], renormalised per head.

    Only that query row changes (exactly: the others are returned as they came); a row left with no mass stays 0.
    """

    def edit(pattern: Tensor, allowed: Tensor) -> Tensor:
        b, _, n_query, n_keys = pattern.shape
        if zeroed.shape != (b, n_keys) or rows.shape != (b,):
            raise ValueError(f"zeroed must be [batch, key] = ({b}, {n_keys}) and rows [batch] = ({b},); "
                             f"got {tuple(zeroed.shape)} and {tuple(rows.shape)}.")
        dev = pattern.device
        selected = torch.zeros(b, 1, n_query, 1, dtype=torch.bool, device=dev)
        selected[torch.arange(b, device=dev), 0, rows.to(dev), 0] = True                    # [batch, 1, query, 1]
        drop = selected & zeroed.to(dev)[:, None, None, :]                                  # [batch, 1, query, key]
        edited = _renormalise(pattern.masked_fill(drop, 0.0))
        return torch.where(selected, edited, pattern)

    return edit


def _check(model: ExplainableModel, batch: Batch, layer, rankings, seed, max_batch) -> list[str]:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an int in [0, {model.n_layers - 1}] (one layer; 'all' is not supported "
                         f"here); got {layer!r}.")
    sites = layer_sites(model, layer)
    if isinstance(rankings, str) or not isinstance(rankings, (tuple, list)) or not rankings:
        raise ValueError(f"rankings must be a non-empty tuple drawn from {RANKINGS}; got {rankings!r}.")
    unknown = [r for r in rankings if r not in RANKINGS]
    if unknown:
        raise ValueError(f"rankings must be drawn from {RANKINGS}; got unknown {unknown!r}.")
    if len(set(rankings)) != len(rankings):
        raise ValueError(f"rankings must not repeat a ranking; got {rankings!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}.")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1 (edited rows per forward); got {max_batch!r}.")
    if len(batch) == 0:
        raise ValueError("batch must hold at least one example; got an empty batch.")
    return sites


# -- the scores ----------------------------------------------------------------------------------
def readout_attention(model: ExplainableModel, batch: Batch, *, layer: int, gradient: bool = False
                      ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """The prediction row of `layer`'s attention, unedited.

    Returns (attention [batch, head, key], d(logit of predicted class)/d(attention) [batch, head, key] or None,
    allowed keys of that row [batch, key] bool, the row index [batch], the predicted class [batch]); all on the CPU.
    """
    site = layer_sites(model, layer)[0]
    rows = readout_index(model, batch.attention_mask).cpu()                                 # [batch]
    seen: dict[str, Tensor] = {}

    def keep(pattern: Tensor, allowed: Tensor) -> Tensor:
        leaf = pattern.detach().requires_grad_(gradient)
        seen["pattern"], seen["allowed"] = leaf, allowed
        return leaf

    with model.evaluating(), torch.set_grad_enabled(gradient), hooks(model, {site: keep}):
        logits = model(batch)                                                               # [batch, n_classes]
        pred = logits.detach().argmax(-1)
        grad = None
        if gradient:
            decision = logits.gather(1, pred[:, None]).sum()                                # examples are independent
            grad, = torch.autograd.grad(decision, seen["pattern"])                          # never the weights
    b = torch.arange(len(batch))
    dev = seen["pattern"].device
    pick = (b.to(dev), slice(None), rows.to(dev))
    attention = seen["pattern"].detach()[pick].float().cpu()                                # [batch, head, key]
    allowed = seen["allowed"].expand_as(seen["pattern"])[pick][:, 0].cpu()                  # [batch, key]
    grad_row = None if grad is None else grad[pick].float().cpu()
    return attention, grad_row, allowed, rows, pred.cpu()


def ranking_scores(ranking: str, attention: Tensor, grad: Tensor | None, allowed: Tensor, seed: int) -> Tensor:
    """Scores [batch, key] (higher = zeroed earlier); keys the row does not attend are -inf."""
    if ranking == "attention":
        score = attention.mean(1)
    elif ranking == "gradient":
        assert grad is not None
        score = grad.mean(1)
    elif ranking == "attention_x_gradient":
        assert grad is not None
        score = (attention * grad).mean(1)
    else:
        score = torch.rand(allowed.shape, generator=torch.Generator().manual_seed(seed))
    return score.masked_fill(~allowed, float("-inf"))


def ranked_keys(score: Tensor) -> Tensor:
    """Key positions by descending score, ties by position -> [batch, key] (the attended keys come first)."""
    return torch.sort(score, dim=1, descending=True, stable=True).indices


# -- the test ------------------------------------------------------------------------------------
def attention_zeroing(model: ExplainableModel, batch: Batch, *, layer: int,
                      rankings: tuple[str, ...] = RANKINGS, seed: int = 0, max_batch: int = 256) -> pd.DataFrame:
    """Per example and ranking, the fraction of attended keys zeroed (in ranked order) before the decision flips.

    Returns one row per (example, ranking): example_id, layer (str), ranking, fraction (k / n_keys, NaN when no
    k ≤ n_keys − 1 flips), n_zeroed (k as a float, NaN when never), n_keys (keys the prediction row attends,
    special tokens included, padding not) and flipped (bool). See the module docstring for the procedure.
    """
    sites = _check(model, batch, layer, rankings, seed, max_batch)
    need_grad = any(r in ("gradient", "attention_x_gradient") for r in rankings)
    attention, grad, allowed, rows, pred = readout_attention(model, batch, layer=layer, gradient=need_grad)
    n_keys = allowed.sum(1)                                                                 # [batch]
    empty = (n_keys == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"every example's prediction row must attend at least one key; examples {empty} attend none.")
    seq = allowed.shape[1]
    orders = {r: ranked_keys(ranking_scores(r, attention, grad, allowed, seed)) for r in rankings}
    # one edited row per (ranking, example, k), k = 1 … n_keys − 1
    jobs = [(ri, e, k) for ri, r in enumerate(rankings) for e in range(len(batch)) for k in range(1, int(n_keys[e]))]
    flips = torch.zeros(len(jobs), dtype=torch.bool)
    with model.evaluating(), torch.no_grad():
        for start in range(0, len(jobs), max_batch):
            chunk = jobs[start:start + max_batch]
            ex = torch.tensor([e for _, e, _ in chunk])
            zeroed = torch.zeros(len(chunk), seq, dtype=torch.bool)
            for i, (ri, e, k) in enumerate(chunk):
                zeroed[i, orders[rankings[ri]][e, :k]] = True
            with hooks(model, {s: zero_row_keys(rows[ex], zeroed) for s in sites}):
                out = model(batch.select(ex.tolist(), trim=False)).argmax(-1).cpu()
            flips[start:start + len(chunk)] = out != pred[ex]
    first: dict[tuple[int, int], int] = {}
    for (ri, e, k), flip in zip(jobs, flips.tolist()):
        if flip and (ri, e) not in first:                                                   # jobs run k upwards
            first[ri, e] = k
    ids = example_ids(batch)
    records = []
    for ri, r in enumerate(rankings):
        for e in range(len(batch)):
            k = first.get((ri, e))
            n = int(n_keys[e])
            records.append((ids[e], str(layer), r, math.nan if k is None else k / n,
                            math.nan if k is None else float(k), n, k is not None))
    return pd.DataFrame(records, columns=COLUMNS)


def attention_zeroing_summary(frame: pd.DataFrame) -> list[tuple]:
    """(test, layer, head, statistic, value) rows per layer and ranking: median_fraction_<ranking> over the examples
    that flip (NaN when none does) and flip_rate_<ranking> (the share of examples that flip at all)."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"frame must have the columns of attention_zeroing {COLUMNS}; missing {missing}.")
    out: list[tuple] = []
    for (layer, ranking), group in frame.groupby(["layer", "ranking"], sort=False):
        flipped = group.flipped.astype(bool)
        median = float(np.median(group.fraction[flipped])) if flipped.any() else math.nan
        out.append((TEST, str(layer), "all", f"median_fraction_{ranking}", median))
        out.append((TEST, str(layer), "all", f"flip_rate_{ranking}", float(flipped.mean())))
    return out
