"""Sanity checks for saliency maps: cascading model-parameter randomisation (Adebayo et al. 2018).

Re-initialise the model from the output down (step 1 = classification head, step 2 = + top encoder
layer, …, last = + embeddings), re-explain at every step and compare each map with the original one by
Spearman rank correlation over the scored tokens (real, not special). An explanation that still looks
the same when the weights that produced the prediction are destroyed does not explain the model: it fails.

    table = randomization_table(model, batch, ["saliency", "attention"])
    randomization_verdict(table)       # explainer, final_similarity, passed, final_step

The user's model is never touched: everything runs on a deep copy.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from attnaudit.analyses.schema import tidy_frame, tidy_rows
from attnaudit.core.ranking import spearman
from attnaudit.explain.attribution import Attribution
from attnaudit.explain.base import Explainer
from attnaudit.explain.registry import get_explainer
from attnaudit.explain.run import explain_all
from attnaudit.model.interface import Batch
from attnaudit.model.transformer import TransformerClassifier

if TYPE_CHECKING:
    from attnaudit.model.interface import ExplainableModel

METRIC = "randomization_spearman"
DEFAULT_THRESHOLD = 0.5   # mean similarity at the last step above this -> the explainer fails


def cascading_layers(model: ExplainableModel) -> list[tuple[str, list[nn.Module]]]:
    """The randomisation order, output first: [(step name, modules re-initialised at that step)].

    For the built-in TextClassifier: "head" (the linear head, and the final LayerNorm of a pre-LN model),
    then "encoder.layers.{L-1}" … "encoder.layers.0", then "embeddings" (the token embedding table; the
    sinusoidal positions have no weights).
    """
    if hasattr(model, "cascading_layers"):           # adapters (HuggingFace) know their own order
        return model.cascading_layers()
    net = getattr(model, "net", None)
    if not isinstance(net, TransformerClassifier):
        raise TypeError(f"cascading_layers knows the built-in TextClassifier (a model with `.net`, a "
                        f"TransformerClassifier); got {type(model).__name__}. Adapters must provide their own order.")
    head = [net.head] + ([net.encoder.final_norm] if any(True for _ in net.encoder.final_norm.parameters()) else [])
    layers = [(f"encoder.layers.{i}", [net.encoder.layers[i]]) for i in reversed(range(len(net.encoder.layers)))]
    return [("head", head), *layers, ("embeddings", [net.encoder.embed])]


def reinitialize(modules: list[nn.Module], *, seed: int) -> None:
    """Re-initialise in place, deterministically: each submodule's `reset_parameters()` under `seed`;
    parameters no such method covers get N(0, 0.02²)."""
    params = [p for m in modules for p in m.parameters()]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        covered = set()
        for module in modules:
            for m in module.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
                    covered.update(id(p) for p in m.parameters(recurse=False))
        for p in params:
            if id(p) not in covered:
                nn.init.normal_(p, 0.0, 0.02)


def cascading_randomization(model: ExplainableModel, *, seed: int = 0) -> Iterator[tuple[str, object]]:
    """Yield (step name, model) from "step=0:original" to the fully randomised model, cumulatively.

    The yielded model is one deep copy, randomised further at every step: use it before advancing.
    """
    steps = cascading_layers(model)
    clone = copy.deepcopy(model)
    modules = dict(cascading_layers(clone))
    yield "step=0:original", clone
    for k, (name, _) in enumerate(steps, start=1):
        reinitialize(modules[name], seed=seed + k)
        yield f"step={k}:{name}", clone


def rank_similarity(a: Attribution, b: Attribution, *, absolute: bool = False) -> Tensor:
    """Spearman correlation of two maps over each example's scored tokens -> [batch] (float64).

    Ties get average ranks. If both maps are constant over the scored tokens they are
    indistinguishable: 1.0; if exactly one is constant there is no association: 0.0; with fewer than
    2 scored tokens there is nothing to rank: NaN. `absolute` compares |scores| (Adebayo et al. report both).
    """
    if a.scores.shape != b.scores.shape or not torch.equal(a.scored_mask, b.scored_mask):
        raise ValueError(f"the two attributions must cover the same tokens; got shapes {tuple(a.scores.shape)} "
                         f"and {tuple(b.scores.shape)} or different masks.")
    out = torch.full((len(a),), float("nan"), dtype=torch.float64)
    for i in range(len(a)):
        keep = a.scored_mask[i]
        x, y = a.scores[i, keep].double().numpy(), b.scores[i, keep].double().numpy()
        if absolute:
            x, y = np.abs(x), np.abs(y)
        out[i] = spearman(x, y, both_constant=1.0, one_constant=0.0)
    return out


def randomization_table(model: ExplainableModel, batch: Batch, explainers: Sequence[str | Explainer], *, seed: int = 0,
                        absolute: bool = False) -> pd.DataFrame:
    """Similarity of each explainer's map to its original at every randomisation step -> tidy DataFrame.

    Columns example_id, explainer, metric ("randomization_spearman"), setting (the step name), value.
    The reference map is the original model's, for its predicted class; every step explains that same
    class. Step 0 re-explains the untouched copy, so it measures the explainer's own repeatability.
    Each step explains with `explain_all`: the attention family shares one capture per step (the same numbers
    as each explainer alone, tests/test_attention_explainers.py).
    """
    chosen = [get_explainer(e) if isinstance(e, str) else e for e in explainers]
    bad = [e for e in chosen if not isinstance(e, Explainer)]
    if bad or not chosen:
        raise TypeError(f"explainers must be a non-empty list of registry names or Explainer instances; got {explainers!r}.")
    names = [e.name for e in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"explainers must have distinct names (rows are keyed by name); got {names}.")
    ids = list(batch.ids) if batch.ids else [str(i) for i in range(len(batch))]
    rows: list = []
    reference: dict[str, Attribution] = {}
    for step, randomized in cascading_randomization(model, seed=seed):
        if not reference:
            reference = _explain_step(randomized, batch, chosen, None, step)
        attrs = _explain_step(randomized, batch, chosen, reference, step)
        for e in chosen:
            sim = rank_similarity(reference[e.name], attrs[e.name], absolute=absolute)
            rows += tidy_rows(ids, e.name, METRIC, step, sim, note=None)
    return tidy_frame(rows, note=False)


def _explain_step(model: ExplainableModel, batch: Batch, chosen: list[Explainer], reference: dict[str, Attribution] | None,
                  step: str) -> dict[str, Attribution]:
    """Every explainer at one step -> {name: Attribution}: for each one's reference class (None: the predicted
    class), the explainers that share a class in one `explain_all` call."""
    groups: dict[tuple, list[Explainer]] = {}
    for e in chosen:
        key = () if reference is None else tuple(reference[e.name].target.tolist())
        groups.setdefault(key, []).append(e)
    out: dict[str, Attribution] = {}
    for group in groups.values():
        target = None if reference is None else reference[group[0].name].target
        try:
            out.update(explain_all(model, batch, group, target=target))
        except Exception as err:
            raise type(err)(f"while explaining at {step} with {', '.join(repr(e.name) for e in group)}: {err}") from err
    return out


def step_index(setting: str) -> int:
    """"step=3:encoder.layers.0" -> 3."""
    hit = re.match(r"step=(\d+):", setting)
    if not hit:
        raise ValueError(f"setting must look like 'step=K:name'; got {setting!r}.")
    return int(hit.group(1))


def randomization_verdict(table: pd.DataFrame, *, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Pass/fail per explainer: it FAILS when its mean similarity at the last step exceeds `threshold`.

    final_similarity is the mean over examples (NaNs skipped) at the fully randomised model; an explainer
    with no finite value there fails (nothing shows that its maps depend on the weights).
    Returns columns explainer, final_similarity, passed, final_step.
    """
    missing = {"explainer", "metric", "setting", "value"} - set(table.columns)
    if missing:
        raise ValueError(f"table must have the tidy columns explainer, metric, setting, value; missing {sorted(missing)}.")
    rows = table[table["metric"] == METRIC]
    if rows.empty:
        raise ValueError(f"table has no {METRIC!r} rows; build it with randomization_table().")
    out = []
    for name, group in rows.groupby("explainer", sort=False):
        steps = group["setting"].map(step_index)
        last = group[steps == steps.max()]
        final = float(last["value"].mean()) if last["value"].notna().any() else float("nan")
        out.append((name, final, bool(final <= threshold), last["setting"].iloc[0]))
    return pd.DataFrame(out, columns=["explainer", "final_similarity", "passed", "final_step"])
