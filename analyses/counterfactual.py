"""Counterfactual attention tests: does the output change when attention does?

Five tests, each through the edits of `attnaudit.model.interventions`, at one encoder layer (an int)
or at every layer at once (``"all"``):

- permutation (Jain & Wallace 2019): shuffle each row's attention among its allowed keys; per example,
  the median output total-variation distance (TVD) over N seeded permutations, against the example's
  maximum attention weight.
- adversarial (Jain & Wallace 2019): attention as far as possible (Jensen–Shannon divergence) from the
  original while the output moves by at most ε in TVD.
- uniform (Wiegreffe & Pinter 2019): uniform attention over each query's allowed keys.
- erasure (Serrano & Smith 2019): zero the most-attended key (renormalising) vs a random one.
- head ablation: the output change when one head's probabilities are zeroed, against the attention
  mass that head puts on the decisive tokens (`batch.rationale`).

    tables = counterfactual_table(model, batch, n_permutations=50)
    tables["summary"]        # test, layer, head, statistic, value
    tables["permutation"]    # example_id, layer, max_attention, median_tvd

Output distributions are the softmax of the logits; TVD(p, q) = ½·Σ|p − q| ∈ [0, 1] and JSD uses the
natural log (∈ [0, ln 2]). Every function runs the model in eval mode and restores its mode after.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from attnaudit.core.ranking import spearman
from attnaudit.model.hooks import Edit, hooks
from attnaudit.model.interface import Batch
from attnaudit.model.interventions import permute, uniform, zero_head, zero_key

if TYPE_CHECKING:
    from attnaudit.model.interface import ExplainableModel

TESTS = ("permutation", "adversarial", "uniform", "erasure", "head_ablation")
# Serrano & Smith (2019)'s own test (`analyses.attention_zeroing`): opt-in, not yet in the default audit
OPT_IN_TESTS = ("attention_zeroing",)
ALL_TESTS = TESTS + OPT_IN_TESTS
Layer = int | str  # a layer index, or "all"


# -- distances between output distributions ------------------------------------------------------
def tvd(p: Tensor, q: Tensor) -> Tensor:
    """Total-variation distance ½·Σ|p − q| over the last dim -> [...]."""
    return 0.5 * (p - q).abs().sum(-1)


def jsd(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence (natural log, in [0, ln 2]) over the last dim -> [...]; zeros are safe.

    Computed in float64 (returned in p's dtype): in float32 the log differences of two nearly equal
    distributions cancel badly (p, q one rounding step apart give 1e-7 instead of 1e-15).
    """
    dtype, p, q = p.dtype, p.double(), q.double()
    m = 0.5 * (p + q)
    kl_pm = (_p_log(p, p) - _p_log(p, m)).sum(-1)
    kl_qm = (_p_log(q, q) - _p_log(q, m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0).to(dtype)


def _p_log(p: Tensor, q: Tensor) -> Tensor:
    """p·log q with 0·log 0 = 0 and a zero (not NaN) gradient there; torch.xlogy's is 0/0 at q = 0."""
    return p * torch.where(q > 0, q, torch.ones_like(q)).log()


# -- plumbing ------------------------------------------------------------------------------------
def layer_sites(model: ExplainableModel, layer: Layer) -> list[str]:
    """The attention sites a setting edits: one layer's, or all of them for ``"all"``."""
    n = model.n_layers
    if layer == "all":
        return list(model.attention_sites)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer must be an int in [0, {n - 1}] or 'all'; got {layer!r} (this model has {n} layers).")
    return [model.attention_sites[layer]]


def output_probs(model: ExplainableModel, batch: Batch, edits: dict[str, Edit] | None = None) -> Tensor:
    """Class probabilities [batch, n_classes] (float32, CPU) with the given edits applied."""
    with model.evaluating(), torch.no_grad(), hooks(model, edits or {}):
        return model(batch).float().softmax(-1).cpu()


def cls_attention(model: ExplainableModel, batch: Batch) -> Tensor:
    """The [CLS] (query 0) row of every layer's attention -> [layer, batch, head, key] (CPU)."""
    rows: dict[str, Tensor] = {}

    def keep(site: str) -> Edit:
        def edit(pattern: Tensor, allowed: Tensor) -> Tensor:
            rows[site] = pattern[:, :, 0, :].detach().float().cpu()              # [batch, head, key]
            return pattern
        return edit

    with model.evaluating(), torch.no_grad(), hooks(model, {s: keep(s) for s in model.attention_sites}):
        model(batch)
    return torch.stack([rows[s] for s in model.attention_sites])                  # [layer, batch, head, key]


def tile(batch: Batch, n: int) -> Batch:
    """n copies of the batch stacked along the batch dim (copy c holds rows c·B … c·B + B − 1)."""
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, Tensor):
            out[f.name] = v.repeat(n, *[1] * (v.dim() - 1))
        elif isinstance(v, list):
            out[f.name] = v * n
    return replace(batch, **out)


def example_ids(batch: Batch) -> list[str]:
    return list(batch.ids) if batch.ids else [str(i) for i in range(len(batch))]


def _per_layer(cls_rows: Tensor, layer: Layer) -> Tensor:
    """[layer, batch, ...] -> [batch, ...]: one layer, or the mean over layers for "all"."""
    return cls_rows.mean(0) if layer == "all" else cls_rows[layer]


# -- permutation (Jain & Wallace 2019) ------------------------------------------------------------
def max_attention(model: ExplainableModel, batch: Batch, *, layer: Layer) -> Tensor:
    """Max over heads and keys of the [CLS]-row attention at `layer` -> [batch]; mean over layers for "all"."""
    layer_sites(model, layer)
    per_layer = cls_attention(model, batch).amax(dim=(2, 3))                      # [layer, batch]
    return _per_layer(per_layer, layer)


PERMUTE_CELLS = 2**28       # one layer's stacked attention [rows, head, query, key]: 1 GiB in float32
MAX_PERMUTATIONS = 10_000   # permutations per example and layer (each one forward pass); AuditSettings.LIMITS agrees
MAX_STEPS = 10_000          # adversarial steps × adversaries per example and layer (each one forward + backward pass)


def permutation_tvd(model: ExplainableModel, batch: Batch, *, layer: Layer, n_permutations: int = 100, seed: int = 0,
                    max_rows: int | None = None) -> Tensor:
    """Output TVD under N random permutations of attention among allowed keys -> [batch, n_permutations].

    Every query row of the edited layer(s) is permuted independently. Copies of the batch are stacked
    into one forward, at most `max_rows` rows at a time (None: 4096, fewer for long inputs so that one
    layer's attention stays under PERMUTE_CELLS probabilities); `seed` fixes the permutations.
    """
    if max_rows is None:
        seq = batch.input_ids.shape[1]
        max_rows = max(1, min(4096, PERMUTE_CELLS // (model.n_heads * seq * seq)))
    sites = layer_sites(model, layer)
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations must be an int >= 1; got {n_permutations!r}.")
    if n_permutations > MAX_PERMUTATIONS:
        raise ValueError(f"n_permutations={n_permutations:,} would need {n_permutations:.1e} forward passes per example "
                         f"and layer; the limit is MAX_PERMUTATIONS={MAX_PERMUTATIONS:,}: lower n_permutations.")
    b = len(batch)
    base = output_probs(model, batch)                                             # [batch, n_classes]
    gen = torch.Generator().manual_seed(seed)
    per_forward = max(1, min(n_permutations, max_rows // max(b, 1)))
    out, done = [], 0
    while done < n_permutations:
        n = min(per_forward, n_permutations - done)
        probs = output_probs(model, tile(batch, n), {s: permute(gen) for s in sites})   # [n·batch, n_classes]
        out.append(tvd(probs.view(n, b, -1), base[None]).T)                      # [batch, n]
        done += n
    return torch.cat(out, dim=1)                                                  # [batch, n_permutations]


# -- adversarial attention (Jain & Wallace 2019) --------------------------------------------------
MAX_ADVERSARIES = 100       # adversaries per example (each one more row in every forward and backward pass)

# The search's strength. "default" is the search the audit has always run; "jain_wallace" is AdversaryMulti of
# github.com/successar/AttentionExplanation, model/Binary_Classification.py at commit 425a89a49a8b (lines 23-61):
# K = 5 adversaries, 500 Adam steps (lr 0.01, amsgrad), loss Σ_k [−JSD_k + 500·relu(TVD_k − 0.01)] − mean over the
# K×K pairs of JSD(a_i, a_j). Divided by K that is our objective with penalty 500 and diversity (K − 1)/K²
# (`jain_wallace_diversity`). Their start is log(uniform) + 3·N(0, 1); ours is log(original) + init_noise·N(0, 1),
# so init_noise 3 there (at that scale the noise, not the start, decides where a search begins). "converged" is
# the cheapest grid point of `benchmarks/adversary_strength.py` (steps 10-500 × K 1, 3, 5, 10, layer "all", 32
# examples of keywords, needle, majority) within 2% of the largest mean JSD on all three tasks: 0.580 / 0.585 /
# 0.591 against 0.587 / 0.590 / 0.594 at 500 steps and K = 10, where "default" reaches 0.396 / 0.434 / 0.408 and
# "jain_wallace" 0.553 / 0.559 / 0.559; J&W's diversity term lowered the JSD found there, so it is off. 25× the
# default's passes. "audit" is what `AuditSettings` runs (n_adversaries, adversarial_steps, adversarial_lr): Adam's
# step size was the lever, not the budget. At lr 1.0 (`adversary_strength.py --lr 1.0 --no-diversity`, same grid,
# layers all/0/1), K = 3 and 40 steps reach 0.576 / 0.583 / 0.595 on layer "all", within 2% of the largest mean
# JSD of either lr (0.587 / 0.592 / 0.597), and 0.569-0.599 on single layers (within 4% of the largest found
# there), at 3× "default"'s passes; on the
# reorder Translator's cross-attention (`seq2seq_counterfactual.adversarial_search`) it reaches 0.450 on "all"
# against 0.284 for "default" and 0.515 for K = 10 × 200 steps.
ADVERSARY_PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(n_adversaries=1, n_steps=40, lr=0.1, penalty=10.0, init_noise=1.0, diversity=0.0, amsgrad=False),
    "jain_wallace": dict(n_adversaries=5, n_steps=500, lr=0.01, penalty=500.0, init_noise=3.0, diversity=0.16,
                         amsgrad=True),
    "converged": dict(n_adversaries=5, n_steps=200, lr=0.1, penalty=10.0, init_noise=1.0, diversity=0.0, amsgrad=False),
    "audit": dict(n_adversaries=3, n_steps=40, lr=1.0, penalty=10.0, init_noise=1.0, diversity=0.0, amsgrad=False),
}


def jain_wallace_diversity(k: int) -> float:
    """Jain & Wallace's diversity weight for K adversaries, (K − 1)/K², in this module's objective (see above).

    Their loss subtracts the mean over all K×K ordered pairs (the K zero diagonal ones included) of the
    adversaries' JSD, next to a sum over the K adversaries; per adversary that is (K − 1)/K² × the mean over the
    K(K − 1)/2 distinct pairs.

        >>> jain_wallace_diversity(5)
        0.16
    """
    _check_adversaries(k)
    return (k - 1) / k**2


def adversary_options(preset: str = "default", **overrides: Any) -> dict[str, Any]:
    """A preset's search settings with some replaced -> keyword arguments of `adversarial_attention`.

        adversary_options("jain_wallace", n_steps=200)   # K=5, lr 0.01, amsgrad, ... but 200 steps

    For "jain_wallace", overriding n_adversaries alone also sets diversity to `jain_wallace_diversity(K)`.
    """
    if preset not in ADVERSARY_PRESETS:
        raise ValueError(f"Unknown adversary preset {preset!r}. Available: {', '.join(ADVERSARY_PRESETS)}.")
    unknown = sorted(set(overrides) - set(ADVERSARY_PRESETS[preset]))
    if unknown:
        raise ValueError(f"Unknown adversary option(s) {', '.join(map(repr, unknown))}. "
                         f"Available: {', '.join(ADVERSARY_PRESETS[preset])}.")
    out = {**ADVERSARY_PRESETS[preset], **overrides}
    if preset == "jain_wallace" and "n_adversaries" in overrides and "diversity" not in overrides:
        out["diversity"] = jain_wallace_diversity(out["n_adversaries"])
    return out


@dataclass(frozen=True)
class AdversarialResult:
    """Per example: the attention JSD reached, the output TVD there, and whether TVD ≤ ε held there."""

    jsd: Tensor          # [batch] mean JSD(new, original) over heads, real query rows (and layers)
    tvd: Tensor          # [batch] output TVD at the reported attention
    satisfied: Tensor    # [batch] bool: some adversary at some step met TVD ≤ ε (then jsd is the best such one's)
    adversary: Tensor    # [batch] long: which adversary (0 … K − 1) the reported attention is
    n_feasible: Tensor   # [batch] long: how many adversaries met TVD ≤ ε at some step


def _softmax_allowed(theta: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over allowed keys; rows with no allowed key are exactly 0 (as in the model) -> [batch, head, query, key]."""
    allowed = allowed.expand_as(theta)
    z = theta.masked_fill(~allowed, float("-inf")).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return z.softmax(-1) * allowed


def _check_adversaries(n_adversaries: int) -> None:
    if isinstance(n_adversaries, bool) or not isinstance(n_adversaries, int) or not 1 <= n_adversaries <= MAX_ADVERSARIES:
        raise ValueError(f"n_adversaries must be an int in [1, {MAX_ADVERSARIES}] (MAX_ADVERSARIES; adversaries per "
                         f"example, searched together); got {n_adversaries!r}: use 1 for a single search.")


def _check_search(*, epsilon: float, steps: list[int], n_adversaries: int, diversity: float, amsgrad: bool) -> None:
    """Refuse bad settings before any forward; cost (forward + backward passes per example and layer) is steps × K."""
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be a float >= 0 (a TVD bound); got {epsilon!r}.")
    _check_adversaries(n_adversaries)
    if isinstance(diversity, bool) or not isinstance(diversity, (int, float)) or not 0 <= diversity < float("inf"):
        raise ValueError(f"diversity must be a finite float >= 0 (the weight of the adversaries' mean pairwise JSD); "
                         f"got {diversity!r}: use 0 for independent adversaries or jain_wallace_diversity(K).")
    if not isinstance(amsgrad, bool):
        raise ValueError(f"amsgrad must be a bool (Adam's AMSGrad variant); got {amsgrad!r}.")
    n_steps = max(steps)
    if n_steps * n_adversaries > MAX_STEPS:
        times = "" if n_adversaries == 1 else f" × n_adversaries={n_adversaries}"
        raise ValueError(f"n_steps={n_steps:,}{times} would need {n_steps * n_adversaries:.1e} forward + backward passes "
                         f"per example and layer; the limit is MAX_STEPS={MAX_STEPS:,}: lower n_steps "
                         f"(adversarial_steps){'' if n_adversaries == 1 else ' or n_adversaries'}.")


def _check_steps(name: str, steps: list[Any]) -> None:
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad or not steps:
        raise ValueError(f"{name} must be {'an int' if name == 'n_steps' else 'a non-empty sequence of ints'} >= 1; "
                         f"got {(steps[0] if name == 'n_steps' else steps)!r}.")


def adversarial_attention(model: ExplainableModel, batch: Batch, *, layer: Layer, epsilon: float = 0.01, n_steps: int = 40,
                          lr: float = 0.1, penalty: float = 10.0, init_noise: float = 1.0, seed: int = 0,
                          n_adversaries: int = 1, diversity: float = 0.0, amsgrad: bool = False) -> AdversarialResult:
    """Search attention maximally different from the original with almost the same output.

    New attention = softmax over allowed keys of free logits (one per adversary, layer, head, query, key), started
    at log(original) + `init_noise`·N(0, 1) (seeded; JSD has zero gradient at the original) and moved by
    Adam (`lr`, `n_steps`, `amsgrad`) to maximise, per example,

        mean over the K adversaries of [JSD(new_k, original) − penalty·relu(TVD_k(output) − ε)]
        + diversity · mean over adversary pairs of JSD(new_i, new_j)

    (Jain & Wallace's AdversaryMulti; K = `n_adversaries`, searched together in one batch K times as tall).
    Adversary 0 starts exactly where the single search does, so K = 1 is that search. Examples are independent
    (the objective is a sum over examples). The reported JSD is the best one over adversaries and steps where
    TVD ≤ ε held; where none did, the last step's of the adversary with the smallest TVD, with `satisfied` False.
    Cost: n_steps × K forward + backward passes per example (bounded by MAX_STEPS). `ADVERSARY_PRESETS` holds
    settings: `adversarial_attention(model, batch, layer="all", **adversary_options("jain_wallace"))`.
    """
    _check_steps("n_steps", [n_steps])
    return _search(model, batch, layer=layer, epsilon=epsilon, checkpoints=[n_steps], lr=lr, penalty=penalty,
                   init_noise=init_noise, seed=seed, n_adversaries=n_adversaries, diversity=diversity,
                   amsgrad=amsgrad)[n_steps]


def adversarial_curve(model: ExplainableModel, batch: Batch, *, layer: Layer, steps: Sequence[int], epsilon: float = 0.01,
                      lr: float = 0.1, penalty: float = 10.0, init_noise: float = 1.0, seed: int = 0,
                      n_adversaries: int = 1, diversity: float = 0.0, amsgrad: bool = False) -> pd.DataFrame:
    """`adversarial_attention` at several step counts from one search of max(steps) steps -> one row per (steps, example).

    Adam has no schedule, so the first s steps of a longer search are the s-step search: the row at s holds
    exactly `adversarial_attention(..., n_steps=s)`'s values. Columns: steps, example_id, jsd, tvd, satisfied,
    adversary, n_feasible.

        curve = adversarial_curve(model, batch, layer="all", steps=[10, 40, 200], n_adversaries=3)
        curve.groupby("steps").agg(mean_jsd=("jsd", "mean"), feasible=("satisfied", "mean"))
    """
    steps = list(steps)
    _check_steps("steps", steps)
    found = _search(model, batch, layer=layer, epsilon=epsilon, checkpoints=sorted(set(steps)), lr=lr, penalty=penalty,
                    init_noise=init_noise, seed=seed, n_adversaries=n_adversaries, diversity=diversity, amsgrad=amsgrad)
    ids = example_ids(batch)
    return pd.concat([pd.DataFrame({"steps": s, "example_id": ids, **{f.name: getattr(found[s], f.name).numpy()
                                                                      for f in fields(AdversarialResult)}})
                      for s in sorted(set(steps))], ignore_index=True)


def _search(model: ExplainableModel, batch: Batch, *, layer: Layer, epsilon: float, checkpoints: list[int], lr: float,
            penalty: float, init_noise: float, seed: int, n_adversaries: int, diversity: float,
            amsgrad: bool) -> dict[int, AdversarialResult]:
    """One search of max(checkpoints) steps -> {s: the s-step search's result} (see adversarial_attention)."""
    sites = layer_sites(model, layer)
    _check_search(epsilon=epsilon, steps=checkpoints, n_adversaries=n_adversaries, diversity=diversity, amsgrad=amsgrad)
    k, b, n_steps = n_adversaries, len(batch), max(checkpoints)
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def keep(site: str) -> Edit:
        def edit(pattern: Tensor, allowed: Tensor) -> Tensor:
            seen[site] = (pattern.detach().float(), allowed)
            return pattern
        return edit

    out: dict[int, AdversarialResult] = {}
    with model.evaluating():
        with torch.no_grad(), hooks(model, {s: keep(s) for s in sites}):
            base = model(batch).float().softmax(-1)                               # [batch, n_classes]
        gen = torch.Generator().manual_seed(seed)
        # adversary 0 draws first, site by site, exactly as a single search does; then adversaries 1 … K − 1
        noises = [[torch.randn(seen[s][0].shape, generator=gen) for s in sites] for _ in range(k)]
        thetas, originals, alloweds = [], [], []
        for i, s in enumerate(sites):
            orig, allowed = seen[s]                                               # [batch, head, query, key], [batch, 1, query, key]
            noise = torch.cat([n[i] for n in noises]).to(orig.device)            # [K·batch, head, query, key]
            thetas.append((orig.clamp_min(1e-6).log().repeat(k, 1, 1, 1) + init_noise * noise).requires_grad_(True))
            originals.append(orig.repeat(k, 1, 1, 1))                             # [K·batch, head, query, key]
            alloweds.append(allowed.repeat(k, 1, 1, 1))                           # [K·batch, 1, query, key]
        tiled, base_k = tile(batch, k), base.repeat(k, 1)                        # copy c = adversary c
        opt = torch.optim.Adam(thetas, lr=lr, amsgrad=amsgrad)
        best_jsd = torch.full((k, b), -1.0)                                       # [K, batch]; −1: not yet feasible
        best_tvd = torch.full((k, b), float("nan"))
        for step in range(n_steps + 1):                                           # the last pass only evaluates
            with torch.enable_grad():
                news = [_softmax_allowed(t, a) for t, a in zip(thetas, alloweds)]
                with hooks(model, {s: _fixed(p) for s, p in zip(sites, news)}):
                    probs = model(tiled).float().softmax(-1)                      # [K·batch, n_classes]
                out_tvd = tvd(probs, base_k)                                      # [K·batch]
                att_jsd = torch.stack([_row_mean(jsd(n, o), a) for n, o, a in zip(news, originals, alloweds)]).mean(0)
                objective = (att_jsd - penalty * torch.relu(out_tvd - epsilon)).view(k, b).mean(0)   # [batch]
                if diversity > 0 and k > 1:
                    objective = objective + diversity * _pairwise_jsd(news, alloweds, k)
            last_jsd, last_tvd = att_jsd.detach().cpu().view(k, b), out_tvd.detach().cpu().view(k, b)   # [K, batch]
            better = (last_tvd <= epsilon) & (last_jsd > best_jsd)
            best_jsd = torch.where(better, last_jsd, best_jsd)
            best_tvd = torch.where(better, last_tvd, best_tvd)
            if step in checkpoints:
                out[step] = _pick(best_jsd, best_tvd, last_jsd, last_tvd)
            if step == n_steps:
                break
            grads = torch.autograd.grad(-objective.sum(), thetas)                 # only the free logits, never the weights
            for t, g in zip(thetas, grads):
                t.grad = g
            opt.step()
    return out


def _pick(best_jsd: Tensor, best_tvd: Tensor, last_jsd: Tensor, last_tvd: Tensor) -> AdversarialResult:
    """[K, batch] per adversary -> per example: the best feasible adversary, else the one closest to feasible."""
    feasible = best_jsd >= 0                                                      # [K, batch]
    satisfied = feasible.any(0)                                                   # [batch]
    adversary = torch.where(satisfied, best_jsd.argmax(0), last_tvd.argmin(0))    # [batch]; ties: the lowest index
    at = adversary[None]                                                          # [1, batch]
    return AdversarialResult(jsd=torch.where(satisfied, best_jsd.gather(0, at)[0], last_jsd.gather(0, at)[0]),
                             tvd=torch.where(satisfied, best_tvd.gather(0, at)[0], last_tvd.gather(0, at)[0]),
                             satisfied=satisfied, adversary=adversary, n_feasible=feasible.sum(0))


def _pairwise_jsd(news: list[Tensor], alloweds: list[Tensor], k: int) -> Tensor:
    """Mean over adversary pairs i < j (and sites) of JSD(new_i, new_j), as `att_jsd` averages -> [batch].

    One adversary against all later ones at a time: at most K − 1 copies of a site's attention at once.
    """
    per_site = []
    for new, allowed in zip(news, alloweds):
        new = new.view(k, -1, *new.shape[1:])                                     # [K, batch, head, query, key]
        allowed = allowed.view(k, -1, *allowed.shape[1:])[0]                      # [batch, 1, query, key]
        pairs = [_row_mean(jsd(new[i][None], new[i + 1:]).flatten(0, 1), allowed.repeat(k - 1 - i, 1, 1, 1))
                 for i in range(k - 1)]                                           # each [(K − 1 − i)·batch]
        per_site.append(torch.cat([p.view(-1, new.shape[1]) for p in pairs]).mean(0))   # [batch]
    return torch.stack(per_site).mean(0)


def _fixed(new: Tensor) -> Edit:
    return lambda pattern, allowed: new


def _row_mean(per_row: Tensor, allowed: Tensor) -> Tensor:
    """[batch, head, query] -> [batch]: mean over heads and the query rows that attend something."""
    rows = allowed.any(-1).to(per_row.dtype)                                      # [batch, 1, query]
    return (per_row * rows).sum((1, 2)) / (rows.sum((1, 2)) * per_row.shape[1]).clamp_min(1.0)


# -- erasure (Serrano & Smith 2019) ---------------------------------------------------------------
@dataclass(frozen=True)
class ErasureResult:
    """Per example: the erased keys and the output change for each (all [batch])."""

    key_max: Tensor       # position with the highest [CLS]-row attention (mean over heads; and layers for "all")
    key_random: Tensor    # a seeded random scored position
    jsd_max: Tensor
    jsd_random: Tensor
    flip_max: Tensor      # bool: the predicted class changed
    flip_random: Tensor


def erasure(model: ExplainableModel, batch: Batch, *, layer: Layer, seed: int = 0, cls_rows: Tensor | None = None) -> ErasureResult:
    """Zero one key at `layer` (all its heads and query rows, renormalised): the most attended vs a random one.

    Both keys are drawn from the scored positions (real, not special). `cls_rows` [layer, batch, head, key]
    may be passed to reuse `cls_attention(model, batch)`.
    """
    sites = layer_sites(model, layer)
    scored = (batch.attention_mask & ~batch.special_mask).cpu()                   # [batch, seq]
    empty = (~scored.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"erasure needs at least one real non-special token per example; examples {empty} have none.")
    rows = cls_attention(model, batch) if cls_rows is None else cls_rows
    att = _per_layer(rows, layer).mean(1)                                         # [batch, key]
    key_max = att.masked_fill(~scored, float("-inf")).argmax(1)                   # [batch]
    rand = torch.rand(scored.shape, generator=torch.Generator().manual_seed(seed))
    key_random = rand.masked_fill(~scored, -1.0).argmax(1)                        # [batch]
    base = output_probs(model, batch)
    p_max = output_probs(model, batch, {s: zero_key(key_max) for s in sites})
    p_rand = output_probs(model, batch, {s: zero_key(key_random) for s in sites})
    pred = base.argmax(-1)
    return ErasureResult(key_max=key_max, key_random=key_random, jsd_max=jsd(p_max, base), jsd_random=jsd(p_rand, base),
                         flip_max=p_max.argmax(-1) != pred, flip_random=p_rand.argmax(-1) != pred)


# -- head ablation --------------------------------------------------------------------------------
def head_ablation(model: ExplainableModel, batch: Batch, *, cls_rows: Tensor | None = None) -> pd.DataFrame:
    """Each head's importance (output change when zeroed) and its attention mass on the decisive tokens.

    Returns one row per (layer, head): importance_tvd (mean output TVD), importance_prob_drop (mean drop
    in the originally predicted class's probability) and decisive_mass (the [CLS]-row attention summed
    over `batch.rationale` positions, averaged over examples; NaN when the batch has no rationale).
    """
    base = output_probs(model, batch)                                             # [batch, n_classes]
    pred = base.argmax(-1)
    rows = cls_attention(model, batch) if cls_rows is None else cls_rows          # [layer, batch, head, key]
    if batch.rationale is not None:
        mass = (rows * batch.rationale.cpu().float()[None, :, None, :]).sum(-1).mean(1)   # [layer, head]
    else:
        mass = torch.full((rows.shape[0], rows.shape[2]), float("nan"))              # [layer, head]
    out = []
    for layer, site in enumerate(model.attention_sites):
        for head in range(model.n_heads):
            probs = output_probs(model, batch, {site: zero_head(head)})
            drop = base.gather(1, pred[:, None]) - probs.gather(1, pred[:, None])
            out.append((layer, head, float(tvd(probs, base).mean()), float(drop.mean()), float(mass[layer, head])))
    return pd.DataFrame(out, columns=["layer", "head", "importance_tvd", "importance_prob_drop", "decisive_mass"])


# -- the table ------------------------------------------------------------------------------------
def counterfactual_table(model: ExplainableModel, batch: Batch, *, tests: tuple[str, ...] = TESTS, layers: list[Layer] | None = None,
                         n_permutations: int = 100, epsilon: float = 0.01, adversarial_steps: int | None = None,
                         adversarial_lr: float | None = None, penalty: float | None = None, seed: int = 0,
                         adversary: str | Mapping[str, Any] = "default") -> dict[str, pd.DataFrame]:
    """Run the chosen tests at each layer and at all layers at once -> {"summary": ..., test: per-example frame}.

    summary columns: test, layer, head, statistic, value (layer and head are strings: "0", "1", …, "all").
    Per-example frames: permutation (example_id, layer, max_attention, median_tvd), adversarial (example_id,
    layer, jsd, tvd, satisfied), uniform (example_id, layer, tvd, flipped), erasure (example_id, layer,
    key_max, key_random, jsd_max, jsd_random, flip_max, flip_random), head_ablation (one row per head) and,
    when asked for (opt-in, `OPT_IN_TESTS`), attention_zeroing (Serrano & Smith's weights zeroed in ranked order
    until the decision flips: example_id, layer, ranking, fraction, n_zeroed, n_keys, flipped; int layers only).
    `layers` defaults to every layer and "all".

    The adversarial search's settings: `adversary`, a preset name of ADVERSARY_PRESETS or an
    `adversary_options(...)` dict, with adversarial_steps, adversarial_lr and penalty (when given) replacing its
    n_steps, lr and penalty. With more than one adversary the adversarial frame also has adversary and
    n_feasible (adversaries that met TVD ≤ ε), and the summary feasible_adversaries_mean (their mean count).
    """
    unknown = [t for t in tests if t not in ALL_TESTS]
    if isinstance(tests, str) or unknown:
        raise ValueError(f"tests must be a tuple drawn from {ALL_TESTS}; got {tests!r}.")
    layers = [*range(model.n_layers), "all"] if layers is None else list(layers)
    for layer in layers:
        layer_sites(model, layer)
    search = _table_adversary(adversary, n_steps=adversarial_steps, lr=adversarial_lr, penalty=penalty)
    if "adversarial" in tests:
        _check_steps("n_steps", [search["n_steps"]])
        _check_search(epsilon=epsilon, steps=[search["n_steps"]], n_adversaries=search["n_adversaries"],
                      diversity=search["diversity"], amsgrad=search["amsgrad"])
    ids = example_ids(batch)
    rows = cls_attention(model, batch)                                            # [layer, batch, head, key]
    base = output_probs(model, batch)
    summary: list[tuple] = []
    frames: dict[str, list[pd.DataFrame]] = {t: [] for t in tests}

    def add(test, layer, statistic, value, head="all"):
        summary.append((test, str(layer), str(head), statistic, float(value)))

    for layer in layers:
        if "permutation" in tests:
            med = permutation_tvd(model, batch, layer=layer, n_permutations=n_permutations, seed=seed).median(1).values
            top = _per_layer(rows.amax(dim=(2, 3)), layer)                        # [batch]
            add("permutation", layer, "median_tvd", med.median())
            add("permutation", layer, "mean_tvd", med.mean())
            add("permutation", layer, "max_attention_tvd_spearman", spearman(top.numpy(), med.numpy()))
            frames["permutation"].append(pd.DataFrame({"example_id": ids, "layer": str(layer),
                                                       "max_attention": top.numpy(), "median_tvd": med.numpy()}))
        if "adversarial" in tests:
            n = search["n_steps"]
            found = _search(model, batch, layer=layer, epsilon=epsilon, checkpoints=sorted({max(1, n // 2), n}), seed=seed,
                            **{k: v for k, v in search.items() if k != "n_steps"})   # read at half its steps and at n
            adv = found[n]
            add("adversarial", layer, "jsd_reached", adv.jsd.mean())
            add("adversarial", layer, "median_jsd_reached", adv.jsd.median())
            add("adversarial", layer, "constraint_satisfied_fraction", adv.satisfied.float().mean())
            add("adversarial", layer, "jsd_reached_half_steps", found[max(1, n // 2)].jsd.mean())
            several = {} if search["n_adversaries"] == 1 else {"adversary": adv.adversary.numpy(),
                                                              "n_feasible": adv.n_feasible.numpy()}
            if several:                                          # the default table keeps its layout
                add("adversarial", layer, "feasible_adversaries_mean", adv.n_feasible.float().mean())
            frames["adversarial"].append(pd.DataFrame({"example_id": ids, "layer": str(layer), "jsd": adv.jsd.numpy(),
                                                       "tvd": adv.tvd.numpy(), "satisfied": adv.satisfied.numpy(),
                                                       **several}))
        if "uniform" in tests:
            probs = output_probs(model, batch, {s: uniform() for s in layer_sites(model, layer)})
            dist, flipped = tvd(probs, base), probs.argmax(-1) != base.argmax(-1)
            add("uniform", layer, "mean_tvd", dist.mean())
            add("uniform", layer, "median_tvd", dist.median())
            add("uniform", layer, "flip_rate", flipped.float().mean())
            if batch.labels is not None:
                labels = batch.labels.cpu()
                add("uniform", layer, "accuracy", (probs.argmax(-1) == labels).float().mean())
                add("uniform", layer, "accuracy_original", (base.argmax(-1) == labels).float().mean())
            frames["uniform"].append(pd.DataFrame({"example_id": ids, "layer": str(layer), "tvd": dist.numpy(),
                                                   "flipped": flipped.numpy()}))
        if "erasure" in tests:
            er = erasure(model, batch, layer=layer, seed=seed, cls_rows=rows)
            add("erasure", layer, "flip_rate_max", er.flip_max.float().mean())
            add("erasure", layer, "flip_rate_random", er.flip_random.float().mean())
            add("erasure", layer, "jsd_max", er.jsd_max.mean())
            add("erasure", layer, "jsd_random", er.jsd_random.mean())
            add("erasure", layer, "jsd_max_exceeds_random_fraction", (er.jsd_max > er.jsd_random).float().mean())
            frames["erasure"].append(pd.DataFrame({"example_id": ids, "layer": str(layer), **{
                f.name: getattr(er, f.name).numpy() for f in fields(er)}}))
        if "attention_zeroing" in tests and layer != "all":       # one layer's prediction row at a time
            from attnaudit.analyses.attention_zeroing import attention_zeroing, attention_zeroing_summary
            zeroed = attention_zeroing(model, batch, layer=int(layer), seed=seed)
            summary.extend(attention_zeroing_summary(zeroed))
            frames["attention_zeroing"].append(zeroed)
    if "head_ablation" in tests:
        heads = head_ablation(model, batch, cls_rows=rows)
        for r in heads.itertuples(index=False):
            for stat in ("importance_tvd", "importance_prob_drop", "decisive_mass"):
                add("head_ablation", r.layer, stat, getattr(r, stat), head=r.head)
        add("head_ablation", "all", "importance_tvd_mass_spearman", spearman(heads.importance_tvd, heads.decisive_mass))
        add("head_ablation", "all", "prob_drop_mass_spearman", spearman(heads.importance_prob_drop, heads.decisive_mass))
        frames["head_ablation"] = [heads]
    out = {"summary": pd.DataFrame(summary, columns=["test", "layer", "head", "statistic", "value"])}
    out.update({t: pd.concat(f, ignore_index=True) for t, f in frames.items() if f})
    return out


def _table_adversary(adversary: str | Mapping[str, Any], **given: Any) -> dict[str, Any]:
    """counterfactual_table's `adversary` (a preset name or an options dict) with the given (non-None) settings on top."""
    if isinstance(adversary, str):
        options = adversary_options(adversary)
    elif isinstance(adversary, Mapping):
        options = adversary_options("default", **adversary)
    else:
        raise ValueError(f"adversary must be a preset name ({', '.join(ADVERSARY_PRESETS)}) or an "
                         f"adversary_options(...) dict; got {adversary!r}.")
    return {**options, **{k: v for k, v in given.items() if v is not None}}
