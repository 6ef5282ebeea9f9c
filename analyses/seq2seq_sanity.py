"""The randomisation sanity check (Adebayo et al. 2018) for an encoder–decoder's explanations.

As `analyses.sanity` for a classifier: re-initialise the model from the output down (`model.cascading_layers()`:
head, decoder layers top-down, encoder layers top-down, embeddings), re-explain the same reference target at
every step, and compare each unit's map (one target token, [src]) with the original one by Spearman rank
correlation over the scored source tokens (real, not special). Per example the units' correlations are averaged,
so a row is an example, as in every other encoder–decoder table.

    rows = translator_randomization(model, pairs, units, ["attention", "saliency"], ids=[e.id for e in examples])

The user's model is never touched: everything runs on one deep copy (`analyses.sanity.cascading_randomization`).
Rows: example_id, explainer, metric "randomization_spearman", setting "step=K:name", value, note "".
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnaudit.analyses.sanity import METRIC, cascading_randomization
from attnaudit.analyses.seq2seq_counterfactual import example_means
from attnaudit.core.ranking import spearman
from attnaudit.explain.seq2seq import translator_scores
from attnaudit.model.seq2seq import PairBatch


def unit_similarity(reference: Tensor, other: Tensor, src: Tensor, tgt: Tensor, scored: Tensor) -> Tensor:
    """Spearman correlation of two [batch, tgt, src] maps per unit over its example's scored tokens -> [unit].

    src, tgt [unit]: each unit's example and target position; scored [batch, src] bool. Ties get average ranks;
    two constant maps are indistinguishable (1.0), one constant map shows no association (0.0), fewer than two
    scored tokens give NaN (as `analyses.sanity.rank_similarity`).
    """
    a = reference[src, tgt].double().numpy()                                     # [unit, src]
    b = other[src, tgt].double().numpy()                                         # [unit, src]
    keep = scored[src].numpy()                                                   # [unit, src]
    return torch.tensor([spearman(x[k], y[k], both_constant=1.0, one_constant=0.0) for x, y, k in zip(a, b, keep)],
                        dtype=torch.float64)


def translator_randomization(model: Any, pairs: PairBatch, units: Any, explainers: Sequence[str], *,
                             ids: Sequence[str], seed: int = 0, max_batch: int = 256) -> list[tuple]:
    """Each explainer's similarity to its step-0 map at every cascading randomisation step -> tidy rows.

    units: `analyses.seq2seq.Units` (src, tgt: the explained target tokens). Step 0 re-explains the untouched
    copy (the explainer's own repeatability); every later step explains the same reference tokens.
    """
    if not hasattr(model, "cascading_layers"):
        raise TypeError(f"the randomisation check needs the model's cascading_layers(); {type(model).__name__} "
                        "has none.")
    scored = (pairs.src.attention_mask & ~pairs.src.special_mask).cpu()          # [batch, src]
    n = len(ids)
    rows: list[tuple] = []
    reference: dict[str, Tensor] = {}
    for step, randomized in cascading_randomization(model, seed=seed):
        scores = translator_scores(randomized, pairs, list(explainers), seed=seed, max_batch=max_batch)
        for name, sc in scores.items():
            reference.setdefault(name, sc)
            sim = unit_similarity(reference[name], sc, units.src, units.tgt, scored)      # [unit]
            per_example = example_means(units.src, sim, n)                                # [example]
            rows += [(i, name, METRIC, step, float(v), "" if np.isfinite(v) else "fewer than 2 scored source tokens")
                     for i, v in zip(ids, per_example.tolist())]
    return rows
