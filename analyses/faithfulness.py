"""Faithfulness metrics: does removing what an explanation ranks first change the model's output?

Every function scores one explainer on one batch and returns one value per example [batch]. The first
argument is a `PerturbationEngine` (share it between metrics and explainers: forwards are cached) or a
model (a fresh engine is built). Removal-based metrics, all through the engine:

- comprehensiveness / sufficiency at k (ERASER, DeYoung et al. 2020): rationale = top-⌈k·n⌉ tokens by
  score (n = scored, non-special tokens); comprehensiveness = p(x) − p(x without rationale),
  sufficiency = p(x) − p(rationale only); AOPC = mean over the bins (ERASER's paper also averages a k=0
  term: pass 0.0 among the bins to reproduce it).
- ferret's AOPC (Attanasio et al. 2022; g8a9/ferret `faithfulness_measures.py`): ⌊k·n⌋ tokens for k in
  0.1…1.0, positive scores only, a threshold skipped when its rationale is empty or equal to the last
  one used; by default tokens are deleted (ferret's `remove_tokens=True`); no rationale at all gives 0 / 1.
- deletion / insertion AUC (RISE, Petsiuk et al. 2018): p(target) against the fraction of tokens removed
  (inserted, starting from the special tokens alone), trapezoid rule on [0, 1].
- decision-flip fraction (Serrano & Smith 2019): tokens removed in ranked order until the argmax changes.
- τ-LOO (ferret): Kendall τ_b between the scores and leave-one-out importance p(x) − p(x without token i).

Gradient-style metrics through captum (no token removal, so not through the engine):
- infidelity (Yeh et al. 2019): a multiplicative Gaussian gate g_j = 1 − ε_j on each scored token's
  embedding; E[(Σ_j ε_j·s_j − (f(x) − f(x_ε)))²], captum's `normalize=True` (optimal rescaling of s).
- sensitivity-max (Yeh et al. 2019): the largest relative change of the explanation under uniform noise
  on the embeddings; only for gradient explainers (it re-runs the explainer), otherwise not applicable.
Metrics that do not apply raise `MetricNotApplicable(reason)`; `faithfulness_table` records NaN and the reason.
"""
from __future__ import annotations

import numbers
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from attnaudit.explain.attribution import Attribution
from attnaudit.explain.perturb import (
    as_engine,
    check_attribution,
    deletion_path,
    insertion_path,
    keep_top_k,
    leave_one_out,
    path_counts,
    remove_top_k,
    top_k_mask,
)
from attnaudit.model.interface import Batch

if TYPE_CHECKING:
    from attnaudit.explain.perturb import PerturbationEngine
    from attnaudit.model.interface import ExplainableModel

    EngineOrModel = PerturbationEngine | ExplainableModel     # a built engine (shared forwards) or a model

ERASER_BINS = (0.01, 0.05, 0.10, 0.20, 0.50)
FERRET_BINS = tuple(float(t) for t in np.arange(0.1, 1.1, 0.1))   # ferret's thresholds, float error included


def _setup(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, policy, max_batch):
    engine = as_engine(engine_or_model, batch, policy=policy, max_batch=max_batch)
    check_attribution(batch, attribution)
    return engine, engine.full_probs(attribution.target, policy=policy)            # [batch]


def check_bins(bins) -> tuple[float, ...]:
    """Bins as a tuple of floats in [0, 1], or a ValueError naming what was given."""
    bins = tuple(bins)
    if not bins or any(isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 <= k <= 1 for k in bins):
        raise ValueError(f"bins must be a non-empty sequence of fractions in [0, 1]; got {bins!r}.")
    return tuple(float(k) for k in bins)


# -- ERASER comprehensiveness and sufficiency -----------------------------------------------------
def comprehensiveness_curve(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, bins=ERASER_BINS,
                            only_pos: bool = False, policy: str | None = None, max_batch: int | None = None) -> Tensor:
    """p(x) − p(x without the top-⌈k·n⌉ tokens), for each k in `bins` -> [batch, n_bins]."""
    engine, full = _setup(engine_or_model, batch, attribution, policy, max_batch)
    keep = torch.stack([remove_top_k(attribution, k, only_pos=only_pos) for k in check_bins(bins)], 1)  # [batch, bin, seq]
    return full[:, None] - engine.probs(keep, attribution.target, policy=policy)  # [batch, bin]


def sufficiency_curve(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, bins=ERASER_BINS,
                      only_pos: bool = False, policy: str | None = None, max_batch: int | None = None) -> Tensor:
    """p(x) − p(special tokens and the top-⌈k·n⌉ tokens only), for each k in `bins` -> [batch, n_bins]."""
    engine, full = _setup(engine_or_model, batch, attribution, policy, max_batch)
    keep = torch.stack([keep_top_k(attribution, k, only_pos=only_pos) for k in check_bins(bins)], 1)  # [batch, bin, seq]
    return full[:, None] - engine.probs(keep, attribution.target, policy=policy)  # [batch, bin]


def comprehensiveness(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, k: float = 0.2, **options) -> Tensor:
    """Drop in the explained class's probability after removing the top-⌈k·n⌉ tokens -> [batch] (higher is better)."""
    return comprehensiveness_curve(engine_or_model, batch, attribution, bins=(k,), **options)[:, 0]


def sufficiency(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, k: float = 0.2, **options) -> Tensor:
    """Drop in the explained class's probability when only the top-⌈k·n⌉ tokens remain -> [batch] (lower is better)."""
    return sufficiency_curve(engine_or_model, batch, attribution, bins=(k,), **options)[:, 0]


def aopc_comprehensiveness(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, bins=ERASER_BINS,
                           **options) -> Tensor:
    """Comprehensiveness averaged over `bins` (area over the perturbation curve) -> [batch]."""
    return comprehensiveness_curve(engine_or_model, batch, attribution, bins=bins, **options).mean(1)


def aopc_sufficiency(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, bins=ERASER_BINS, **options) -> Tensor:
    """Sufficiency averaged over `bins` -> [batch]."""
    return sufficiency_curve(engine_or_model, batch, attribution, bins=bins, **options).mean(1)


# -- ferret's AOPC, reproduced --------------------------------------------------------------------
def ferret_rationales(attribution: Attribution, *, bins=FERRET_BINS, only_pos: bool = True) -> tuple[Tensor, Tensor]:
    """ferret's rationales: top-⌊k·n⌋ tokens (positive scores only; by |score| when not only_pos), deduplicated.

    Returns:
        rationale [batch, bin, seq] bool; used [batch, bin] bool: False where ferret skips the threshold
        (⌊k·n⌋ = 0, no positive token among the top, or the same rationale as the last one used).
    """
    if not only_pos:                                                                # ferret then ranks by |score|
        attribution = replace(attribution, scores=attribution.scores.abs())
    masks, used = [], []
    last = torch.zeros_like(attribution.scored_mask)                                # [batch, seq]
    have_last = torch.zeros(len(attribution), dtype=torch.bool)                     # [batch]
    for k in check_bins(bins):
        top = top_k_mask(attribution, k, only_pos=only_pos, rounding="floor")        # [batch, seq]
        ok = top.any(1) & ~(have_last & (top == last).all(1))                       # [batch]
        last = torch.where(ok[:, None], top, last)
        have_last |= ok
        masks.append(top)
        used.append(ok)
    return torch.stack(masks, 1), torch.stack(used, 1)


def ferret_aopc(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, kind: str = "comprehensiveness",
                bins=FERRET_BINS, only_pos: bool = True, policy: str | None = "delete",
                max_batch: int | None = None) -> Tensor:
    """ferret's `aopc_compr` / `aopc_suff` -> [batch]: mean of p(x) − p(perturbed) over the thresholds it uses.

    Differences from ferret, by design: tokens are removed at the id level (ferret decodes to text and
    re-tokenises), and score ties break by position (ferret's `argsort` order is unspecified).
    """
    if kind not in ("comprehensiveness", "sufficiency"):
        raise ValueError(f"kind must be 'comprehensiveness' or 'sufficiency'; got {kind!r}.")
    engine, full = _setup(engine_or_model, batch, attribution, policy, max_batch)
    rationale, used = ferret_rationales(attribution, bins=bins, only_pos=only_pos)  # [batch, bin, seq], [batch, bin]
    if kind == "comprehensiveness":
        keep = attribution.attention_mask[:, None, :] & ~rationale                 # [batch, bin, seq]
    else:
        keep = (attribution.special_mask & attribution.attention_mask)[:, None, :] | rationale
    drop = full[:, None] - engine.probs(keep, attribution.target, valid=used, policy=policy)  # [batch, bin], NaN unused
    empty = torch.tensor(0.0 if kind == "comprehensiveness" else 1.0)              # ferret's value with no rationale
    return torch.where(used.any(1), drop.nanmean(1), empty)


# -- RISE deletion and insertion ------------------------------------------------------------------
def deletion_curve(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, policy: str | None = None,
                   max_batch: int | None = None, max_steps: int | None = None) -> Tensor:
    """p(target) after removing the top-s tokens, s = 0..n -> [batch, step] (NaN past each example's n).

    max_steps: examples longer than this take max_steps + 1 evenly spaced steps instead of n + 1 (`path_counts`).
    """
    engine = as_engine(engine_or_model, batch, policy=policy, max_batch=max_batch)
    check_attribution(batch, attribution)
    keep, valid = deletion_path(attribution, max_steps=max_steps)                   # [batch, step, seq], [batch, step]
    return engine.probs(keep, attribution.target, valid=valid, policy=policy)


def insertion_curve(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, policy: str | None = None,
                    max_batch: int | None = None, max_steps: int | None = None) -> Tensor:
    """p(target) with the special tokens and the top-s tokens only, s = 0..n -> [batch, step] (NaN past n)."""
    engine = as_engine(engine_or_model, batch, policy=policy, max_batch=max_batch)
    check_attribution(batch, attribution)
    keep, valid = insertion_path(attribution, max_steps=max_steps)
    return engine.probs(keep, attribution.target, valid=valid, policy=policy)


def curve_auc(curve: Tensor) -> Tensor:
    """Trapezoid area under a curve sampled at s/n, s = 0..n (NaN-padded on the right) -> [batch].

    Args:
        curve: [batch, step]; example i has n_i + 1 finite points followed by NaN. One point (n = 0) -> NaN.
    """
    finite = ~torch.isnan(curve)                                                    # [batch, step]
    n = (finite.sum(1) - 1).double()                                                # [batch] intervals
    y = torch.nan_to_num(curve.double())
    pair = finite[:, 1:] & finite[:, :-1]                                           # [batch, step - 1]
    area = ((y[:, 1:] + y[:, :-1]) / 2 * pair).sum(1) / n.clamp_min(1)              # width 1/n per interval
    return torch.where(n > 0, area, torch.nan).float()


def deletion_auc(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, **options) -> Tensor:
    """Area under the deletion curve on [0, 1] -> [batch] (lower is better: the probability falls fast)."""
    return curve_auc(deletion_curve(engine_or_model, batch, attribution, **options))


def insertion_auc(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, **options) -> Tensor:
    """Area under the insertion curve on [0, 1] -> [batch] (higher is better: the probability rises fast)."""
    return curve_auc(insertion_curve(engine_or_model, batch, attribution, **options))


# -- decision flip --------------------------------------------------------------------------------
def decision_flip_fraction(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, never: float = 1.0,
                           policy: str | None = None, max_batch: int | None = None,
                           max_steps: int | None = None) -> Tensor:
    """Fraction of the n scored tokens removed, in ranked order, when the predicted class first changes -> [batch].

    The prediction compared against is the argmax on the unperturbed input (not the explained target).
    An example that never flips, even with every scored token removed, gets `never` (1.0 by default:
    "all of them and more"; pass float('nan') to drop such examples instead). Lower is better.
    """
    engine = as_engine(engine_or_model, batch, policy=policy, max_batch=max_batch)
    check_attribution(batch, attribution)
    keep, valid = deletion_path(attribution, max_steps=max_steps)                  # [batch, step, seq]
    counts, _ = path_counts(attribution.lengths(), max_steps)                       # [batch, step] tokens removed
    pred = engine.class_probs(keep, valid=valid, policy=policy).argmax(-1)         # [batch, step]
    flipped = (pred != pred[:, :1]) & valid                                         # [batch, step]
    first = torch.where(flipped.any(1), flipped.float().argmax(1), -1)              # [batch] first flipping step
    removed = counts.gather(1, first.clamp_min(0)[:, None])[:, 0].float()           # [batch]
    n = attribution.lengths().float()
    return torch.where(first >= 0, removed / n.clamp_min(1), torch.tensor(float(never)))


# -- τ_b and τ-LOO (leave_one_out lives with the engine) ------------------------------------------------------------------------
def kendall_tau_b(x: Tensor, y: Tensor, mask: Tensor, *, rows_per_step: int = 64) -> Tensor:
    """Kendall's τ_b between x and y over the positions in mask, per row -> [batch] (NaN if undefined).

    τ_b = (concordant − discordant) / sqrt((n0 − ties_x)·(n0 − ties_y)), n0 = number of pairs (scipy's
    default variant). Rows are processed `rows_per_step` at a time to bound the [rows, seq, seq] memory.
    """
    out = []
    for lo in range(0, x.shape[0], rows_per_step):
        xs, ys, m = x[lo: lo + rows_per_step].double(), y[lo: lo + rows_per_step].double(), mask[lo: lo + rows_per_step]
        pair = m[:, :, None] & m[:, None, :]                                        # [rows, seq, seq]
        pair = pair & torch.ones_like(pair[0]).triu(1)                              # each unordered pair once
        sx = torch.sign(xs[:, :, None] - xs[:, None, :]) * pair                     # [rows, seq, seq]
        sy = torch.sign(ys[:, :, None] - ys[:, None, :]) * pair
        untied_x = (sx != 0).sum((1, 2)).double()                                   # n0 − ties in x
        untied_y = (sy != 0).sum((1, 2)).double()
        denom = torch.sqrt(untied_x * untied_y)
        tau = (sx * sy).sum((1, 2)) / denom.clamp_min(1e-300)
        out.append(torch.where(denom > 0, tau, torch.nan).float())
    return torch.cat(out) if out else torch.zeros(0)


def tau_loo(engine_or_model: EngineOrModel, batch: Batch, attribution: Attribution, *, policy: str | None = None,
            max_batch: int | None = None) -> Tensor:
    """Kendall τ_b between the scores and leave-one-out importance over scored tokens -> [batch] (higher is better).

    Leave-one-out importance of token j: p(target | x) − p(target | x with j replaced by the policy): "delete"
    removes it (the τ-LOO of ferret, `taucorr_loo`, and of the literature), "mask" puts [MASK] in its place (the
    audit's default), "attention" hides it from attention. The values differ by policy (by up to about 1 on a
    model that reads position), so tables name it in the setting (`tables.tau_loo_setting`: "policy=mask").
    """
    engine = as_engine(engine_or_model, batch, policy=policy, max_batch=max_batch)
    check_attribution(batch, attribution)
    loo = leave_one_out(engine, batch, target=attribution.target, policy=policy)    # [batch, seq]
    return kendall_tau_b(attribution.scores, loo, attribution.scored_mask)


# -- captum: infidelity and sensitivity-max -------------------------------------------------------
class MetricNotApplicable(ValueError):
    """The metric does not apply to this model or explainer; the message says why."""


def _needs_embeddings(model: ExplainableModel, metric: str) -> None:
    missing = [m for m in ("embed", "logits_from_embeds", "evaluating") if not hasattr(model, m)]
    if missing:
        raise MetricNotApplicable(f"{metric} perturbs embeddings, but the model has no {', '.join(missing)}.")


def infidelity(model: ExplainableModel, batch: Batch, attribution: Attribution, *, n_perturb_samples: int = 20,
               noise_std: float = 0.1, normalize: bool = True, seed: int = 0,
               max_examples_per_batch: int | None = None) -> Tensor:
    """captum's infidelity with token gates on the embeddings -> [batch] (lower is better).

    Each scored token's embedding is scaled by 1 − ε_j, ε_j ~ N(0, noise_std²) (specials and padding are
    untouched), and f is the explained class's probability; the first-order ideal is then s_j = ∂f/∂g_j
    (input × gradient summed over d_model). `normalize=True` rescales the scores optimally first, so
    explainers on different scales compare.
    """
    from captum.metrics import infidelity as captum_infidelity

    _needs_embeddings(model, "infidelity")
    check_attribution(batch, attribution)
    if n_perturb_samples < 1 or noise_std <= 0:
        raise ValueError(f"n_perturb_samples must be >= 1 and noise_std > 0; got {n_perturb_samples}, {noise_std}.")
    b = len(batch)
    gen = torch.Generator().manual_seed(seed)
    with model.evaluating(), torch.no_grad():
        embeds = model.embed(batch.input_ids)                                       # [batch, seq, d_model]
        dev = embeds.device
        mask = batch.attention_mask.to(dev)                                         # [batch, seq]
        scored = attribution.scored_mask.to(dev).float()                            # [batch, seq]

        def forward(gates, embeds, mask):                                           # gates [m, seq]
            return model.logits_from_embeds(embeds * gates[..., None], mask).float().softmax(-1)

        def perturb(gates):
            reps = gates.shape[0] // b                                              # captum repeats each example
            eps = torch.randn(gates.shape, generator=gen).to(dev) * noise_std * scored.repeat_interleave(reps, 0)
            return eps, gates - eps

        gates = torch.ones(b, embeds.shape[1], device=dev)                         # [batch, seq]
        out = captum_infidelity(forward, perturb, gates, (attribution.scores.to(dev) * scored),
                                additional_forward_args=(embeds, mask), target=attribution.target.to(dev),
                                n_perturb_samples=n_perturb_samples, normalize=normalize,
                                max_examples_per_batch=max_examples_per_batch)
    return out.detach().float().cpu()


class _ShiftedEmbeddings:
    """The model with `delta` added to the token embeddings of `input_ids` (any other ids: untouched)."""

    def __init__(self, model: ExplainableModel, input_ids: Tensor, delta: Tensor):
        self._model, self._ids, self._delta = model, input_ids, delta

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, batch: Batch) -> Tensor:
        return self.logits(batch.input_ids, batch.attention_mask)

    def embed(self, input_ids: Tensor) -> Tensor:
        e = self._model.embed(input_ids)                                            # [batch, seq, d_model]
        same = input_ids.shape == self._ids.shape and torch.equal(input_ids.cpu(), self._ids.cpu())
        return e + self._delta.to(e.dtype) if same else e

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._model.logits_from_embeds(self.embed(input_ids), attention_mask)


def _rows(batch: Batch, idx: Tensor) -> Batch:
    """Examples idx of batch, keeping the full width (Batch.select trims)."""
    i = idx.tolist()
    pick = lambda v: None if v is None else v[idx.cpu()]                            # noqa: E731
    return Batch(batch.input_ids[idx.cpu()], batch.attention_mask[idx.cpu()], batch.special_mask[idx.cpu()],
                 [batch.tokens[j] for j in i], texts=[batch.texts[j] for j in i] if batch.texts else None,
                 labels=pick(batch.labels), rationale=pick(batch.rationale),
                 ids=[batch.ids[j] for j in i] if batch.ids else None)


def rebuild_explainer(attribution: Attribution):
    """The explainer that produced `attribution`, from the registry and its recorded params (or MetricNotApplicable)."""
    from attnaudit.explain.registry import UnknownExplainerError, explainer_class

    try:
        cls = explainer_class(attribution.method)
    except UnknownExplainerError as e:
        raise MetricNotApplicable(f"explainer {attribution.method!r} is not in the registry; pass explainer=. ({e})") from e
    except (ImportError, AttributeError) as e:
        raise MetricNotApplicable(f"explainer {attribution.method!r} could not be imported: {e}") from e
    try:
        return cls(**attribution.params)
    except TypeError as e:
        raise MetricNotApplicable(f"explainer {attribution.method!r} could not be rebuilt from its params: {e}") from e


def sensitivity_max(model: ExplainableModel, batch: Batch, attribution: Attribution, *, explainer=None, perturb_radius: float = 0.02,
                    n_perturb_samples: int = 10, seed: int = 0, max_examples_per_batch: int | None = None) -> Tensor:
    """captum's sensitivity-max: max over noisy embeddings of ‖φ(x+δ) − φ(x)‖ / ‖φ(x)‖ -> [batch] (lower is better).

    δ is uniform in [−radius, radius] on each scored token's embedding. Only gradient explainers apply
    (family "gradient"): the explainer is re-run on the noisy embeddings through the model interface
    (`embed`, `logits_from_embeds`). `explainer` defaults to the one rebuilt from the attribution.
    """
    from captum.metrics import sensitivity_max as captum_sensitivity_max

    _needs_embeddings(model, "sensitivity_max")
    check_attribution(batch, attribution)
    explainer = explainer if explainer is not None else rebuild_explainer(attribution)
    family = getattr(explainer, "family", "")
    if family != "gradient":
        raise MetricNotApplicable(f"sensitivity_max re-runs gradient explainers only; "
                                  f"{attribution.method!r} is in the {family or 'unknown'!r} family.")
    b = len(batch)
    gen = torch.Generator().manual_seed(seed)
    with model.evaluating():
        with torch.no_grad():
            clean = model.embed(batch.input_ids)                                    # [batch, seq, d_model]
        dev = clean.device
        scored = attribution.scored_mask.to(dev)                                    # [batch, seq]

        def perturb(embeds, radius):
            reps = embeds.shape[0] // b
            noise = (torch.rand(embeds.shape, generator=gen) * 2 - 1).to(dev) * radius
            return embeds + noise * scored.repeat_interleave(reps, 0)[..., None]

        def explain_at(embeds, additional_forward_args):
            embeds = embeds[0] if isinstance(embeds, tuple) else embeds             # captum passes a 1-tuple
            rows = additional_forward_args[0] if isinstance(additional_forward_args, tuple) else additional_forward_args
            sub = _rows(batch, rows)
            delta = embeds.detach() - clean[rows]                                   # [m, seq, d_model]
            proxy = _ShiftedEmbeddings(model, sub.input_ids.to(dev), delta)
            with torch.enable_grad():
                attr = explainer.explain(proxy, sub, target=attribution.target[rows.cpu()])
            return (attr.scores.to(dev) * scored[rows],)                            # ([m, seq],): captum wants a tuple

        out = captum_sensitivity_max(explain_at, clean, perturb_func=perturb, perturb_radius=perturb_radius,
                                     n_perturb_samples=n_perturb_samples,
                                     max_examples_per_batch=max_examples_per_batch,
                                     additional_forward_args=(torch.arange(b, device=dev),))
    return out.detach().float().cpu()
