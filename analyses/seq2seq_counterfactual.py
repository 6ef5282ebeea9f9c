"""Adversarial cross-attention (Jain & Wallace 2019) and cross-attention head ablation for encoder–decoders.

The encoder–decoder counterparts of `analyses.counterfactual.adversarial_attention` and `head_ablation`, on the
cross-attention sites ``decoder.layers.{i}.cross_attn.pattern`` of a `Translator` or `HFTranslator`, with the
units of `analyses.seq2seq` (`prepare` -> PairBatch, Units: unit u is reference target position tgt[u] of
example src[u], teacher forced) and its summary format:

    pairs, units = prepare(model, examples)
    rows = cross_adversarial(model, pairs, units, layer=0) + cross_adversarial(model, pairs, units, layer="all")
    rows += cross_head_ablation(model, pairs, units)
    summary = pd.DataFrame(rows, columns=["test", "layer", "head", "statistic", "value"])

Adversarial (test "adversarial"): per unit (example i, target position t), free logits for query row t of the
cross-attention at the edited layer(s) [edited layer, head, src] are moved by Adam to make that row as different
(mean JSD over heads and edited layers) from the original row as possible while p(· | y_<t, x) at t moves by at
most ε in TVD. Only row t is replaced; every other row of every layer is the model's own (a single-layer edit
leaves them exactly as they were; with "all" the rows after t of the layers above see the changed state of
position t, but the output at t cannot read them: the decoder is causal). The output at t reads row t directly
at every layer, and row t is the attention offered as the explanation of y_t (`explain.seq2seq`'s "attention");
positions before t are untouched (causal), so their outputs stay exactly the original. Each unit gets its own
copy of its example in the batch, so the units of one example do not interact; the objective is a sum over
units and Adam acts elementwise, so the optimisation over `max_batch` units at a time is the optimisation over
all units at once (the start noise is drawn once for all units from `seed`).
Statistics (the classifier's names): jsd_reached (mean over examples of each example's mean JSD over its units),
median_jsd_reached (median over examples, torch's: the lower middle value, as the classifier's), constraint_satisfied_fraction (mean over examples of the fraction of
its units whose search met TVD ≤ ε). Per unit, as in the classifier: the best JSD over the steps where TVD ≤ ε
held; where none did, the last step's, not satisfied.

Head ablation (test "head_ablation"): each decoder layer's cross-attention head in turn is zeroed
(`interventions.zero_head`: every query row of every example, as the classifier does), one teacher-forced
forward per (layer, head) over the examples. Per (layer, head): importance_tvd (the TVD of p(· | y_<t, x) at
each unit), importance_prob_drop (the drop of the originally predicted token's probability at each unit) and
decisive_mass (the head's original cross-attention of row t summed over the unit's gold source tokens
`units.gold`, the tokens of the source words Sure-aligned to its target word; units without gold left out),
each averaged over the example's units, then over the examples; NaN where no unit has gold. Across heads (layer
"all", head "all"): importance_tvd_mass_spearman and prob_drop_mass_spearman.

Distances: TVD(p, q) = ½·Σ|p − q| ∈ [0, 1]; JSD with the natural log (∈ [0, ln 2]), as in
`analyses.counterfactual`. Every function runs the model in eval mode and restores its mode after.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from attnaudit.analyses.counterfactual import MAX_STEPS, _check_adversaries, _softmax_allowed, jsd, tvd
from attnaudit.core.ranking import spearman
from attnaudit.explain.gradients import check_positive_int
from attnaudit.model.hooks import Edit, hooks
from attnaudit.model.interventions import zero_head

Layer = int | str                                  # a decoder layer index, or "all"
SUMMARY_COLUMNS = ["test", "layer", "head", "statistic", "value"]
HEAD_STATISTICS = ("importance_tvd", "importance_prob_drop", "decisive_mass")


# -- plumbing ------------------------------------------------------------------------------------
def cross_sites(model: Any, layer: Layer) -> list[str]:
    """The cross-attention sites a setting edits: one decoder layer's, or every one for ``"all"``."""
    sites = list(model.cross_attention_sites)
    if layer == "all":
        return sites
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(sites):
        raise ValueError(f"layer must be an int in [0, {len(sites) - 1}] or 'all'; got {layer!r} (this model has "
                         f"{len(sites)} decoder layers).")
    return [sites[layer]]


def _check_units(pairs: Any, units: Any) -> None:
    n, n_tgt = pairs.tgt_out.shape
    if len(units.src) == 0:
        raise ValueError("units is empty: there is no target token to test (see analyses.seq2seq.prepare).")
    if len(units.src) != len(units.tgt) or int(units.src.min()) < 0 or int(units.src.max()) >= n \
            or int(units.tgt.min()) < 0 or int(units.tgt.max()) >= n_tgt:
        raise ValueError(f"units do not belong to these pairs ({n} examples, {n_tgt} target positions); build both "
                         "with analyses.seq2seq.prepare.")


def example_means(src: Tensor, values: Tensor, n: int) -> Tensor:
    """[unit] values, src [unit] each unit's example -> [example] float64: the mean over each example's units, NaN
    ignored (NaN where none). Examples, not the correlated tokens of one sentence, are the statistical units."""
    v = values.double().cpu()
    ok = ~torch.isnan(v)
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, src, torch.where(ok, v, 0.0))
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, src, ok.double())
    return torch.where(count > 0, total / count.clamp_min(1), torch.nan)


def _nanmean(v: Tensor) -> float:
    v = v[~torch.isnan(v)]
    return float(v.mean()) if len(v) else math.nan


def _nanmedian(v: Tensor) -> float:
    v = v[~torch.isnan(v)]
    return float(v.median()) if len(v) else math.nan


def row_edit(new_rows: Tensor, positions: Tensor) -> Edit:
    """Replace query row positions[b] of batch row b by new_rows[b] [batch, head, key]; every other row is the
    pattern the model computed (differentiable in new_rows)."""

    def edit(pattern: Tensor, allowed: Tensor) -> Tensor:
        b, h, q, k = pattern.shape
        if tuple(new_rows.shape) != (b, h, k) or tuple(positions.shape) != (b,):
            raise ValueError(f"row_edit needs new_rows [batch, head, key] = {(b, h, k)} and positions [batch] = "
                             f"({b},); got {tuple(new_rows.shape)} and {tuple(positions.shape)}.")
        at = torch.arange(q, device=pattern.device)[None, :] == positions.to(pattern.device)[:, None]   # [batch, q]
        return torch.where(at[:, None, :, None], new_rows.to(pattern)[:, :, None, :], pattern)

    return edit


def _chunks(units: Any, max_batch: int, *, per_unit: bool) -> list[tuple[Tensor, Tensor]]:
    """(unit indices, batch rows) per forward. per_unit: one batch row per unit (its example's copy), max_batch
    units a forward; else one row per example, max_batch examples a forward, and the units of those examples."""
    idx = torch.arange(len(units.src))
    if per_unit:
        return [(idx[lo:lo + max_batch], units.src[lo:lo + max_batch]) for lo in range(0, len(idx), max_batch)]
    examples = torch.unique(units.src)                                                # sorted
    out = []
    for lo in range(0, len(examples), max_batch):
        rows = examples[lo:lo + max_batch]
        pick = idx[torch.isin(units.src, rows)]
        out.append((pick, rows))
    return out


def _unit_forward(model: Any, pairs: Any, units: Any, *, sites: Sequence[str] = (), edits: dict | None = None,
                  max_batch: int = 256) -> tuple[Tensor, Tensor | None, Tensor]:
    """One teacher-forced forward per max_batch examples (no grad) -> probs [unit, vocab] (float32, CPU) at each
    unit's position, the recorded rows [site, unit, head, src] of `sites` at each unit's position (None without
    sites; after `edits`), and the allowed source keys [unit, src] (bool, CPU)."""
    probs = rows = allowed = None
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def keep(site: str) -> Edit:
        def edit(pattern: Tensor, allowed: Tensor) -> Tensor:
            seen[site] = (pattern.detach(), allowed)
            return pattern
        return edit

    with model.evaluating(), torch.inference_mode():
        for pick, ex in _chunks(units, max_batch, per_unit=False):
            dev = model.device
            local = torch.searchsorted(ex, units.src[pick]).to(dev)                   # unit -> row of this chunk
            at = units.tgt[pick].to(dev)
            with hooks(model, dict(edits or {})), hooks(model, {s: keep(s) for s in sites}):
                logits = model(pairs.rows(ex))                                  # [chunk, tgt, vocab]
            p = logits[local.to(logits.device), at.to(logits.device)].float().softmax(-1).cpu()   # [c, vocab]
            if probs is None:
                probs = torch.zeros(len(units.src), p.shape[-1])
            probs[pick] = p
            if sites:
                got = torch.stack([seen[s][0][local, :, at].float().cpu() for s in sites])   # [site, c, head, src]
                if rows is None:
                    rows = torch.zeros(len(sites), len(units.src), *got.shape[2:])
                    allowed = torch.zeros(len(units.src), got.shape[-1], dtype=torch.bool)
                rows[:, pick] = got
                allowed[pick] = seen[sites[0]][1][local, 0, at].bool().cpu()
    if allowed is None:
        allowed = (pairs.src.attention_mask.bool()[units.src]).cpu()
    return probs, rows, allowed


# -- adversarial cross-attention (Jain & Wallace 2019) -----------------------------------------------
@dataclass(frozen=True)
class CrossAdversarialResult:
    """Per unit: the JSD reached, the output TVD there, whether TVD ≤ ε held, and the attention rows themselves."""

    layer: str            # "0", "1", …, "all"
    sites: list[str]      # the edited cross-attention sites, in order
    src: Tensor           # [unit] long: the unit's example (units.src)
    tgt: Tensor           # [unit] long: the unit's target position (units.tgt)
    jsd: Tensor           # [unit] mean over heads and edited layers of JSD(new row t, original row t)
    tvd: Tensor           # [unit] TVD of p(· | y_<t, x) at t with the reported rows, against the original
    satisfied: Tensor     # [unit] bool: some step met TVD ≤ ε (then jsd is the best such step's)
    attention: Tensor     # [site, unit, head, src] the reported rows t (float32, CPU)
    original: Tensor      # [site, unit, head, src] the model's own rows t

    def rows(self, n_examples: int | None = None) -> list[tuple]:
        """Summary rows ("adversarial", layer, "all", statistic, value) with the classifier's statistic names."""
        n = int(self.src.max()) + 1 if n_examples is None else n_examples
        per = example_means(self.src, self.jsd, n)
        sat = example_means(self.src, self.satisfied.double(), n)
        return [("adversarial", self.layer, "all", "jsd_reached", _nanmean(per)),
                ("adversarial", self.layer, "all", "median_jsd_reached", _nanmedian(per)),
                ("adversarial", self.layer, "all", "constraint_satisfied_fraction", _nanmean(sat))]

    def frame(self, ids: Sequence[str]) -> pd.DataFrame:
        """Per example (the classifier's adversarial frame): example_id, layer, jsd and tvd (means over its units),
        satisfied (the fraction of its units that met TVD ≤ ε), n_units."""
        n = len(ids)
        count = torch.zeros(n).index_add_(0, self.src, torch.ones(len(self.src)))
        return pd.DataFrame({"example_id": list(ids), "layer": self.layer,
                             "jsd": example_means(self.src, self.jsd, n).numpy(),
                             "tvd": example_means(self.src, self.tvd, n).numpy(),
                             "satisfied": example_means(self.src, self.satisfied.double(), n).numpy(),
                             "n_units": count.long().numpy()})


def _check_adversarial(epsilon, n_steps, lr, penalty, init_noise, seed) -> None:
    def real(x) -> bool:
        return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)

    if not real(epsilon) or not 0 < epsilon <= 1:
        raise ValueError(f"epsilon must be a float in (0, 1] (a TVD bound on the next-token distribution); "
                         f"got {epsilon!r}.")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0 (0: only the noisy start is evaluated); got {n_steps!r}.")
    if n_steps > MAX_STEPS:
        raise ValueError(f"n_steps={n_steps:,} would need {n_steps:.1e} forward + backward passes per unit and layer; "
                         f"the limit is MAX_STEPS={MAX_STEPS:,}: lower n_steps.")
    if not real(lr) or lr <= 0:
        raise ValueError(f"lr must be a float > 0 (Adam's step size); got {lr!r}.")
    if not real(penalty) or penalty < 0:
        raise ValueError(f"penalty must be a float >= 0; got {penalty!r}.")
    if not real(init_noise) or init_noise < 0:
        raise ValueError(f"init_noise must be a float >= 0; got {init_noise!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}.")


def adversarial_search(model: Any, pairs: Any, units: Any, *, layer: Layer, epsilon: float = 0.01, n_steps: int = 40,
                       lr: float = 0.1, penalty: float = 10.0, init_noise: float = 1.0, seed: int = 0,
                       max_batch: int = 256, n_adversaries: int = 1) -> CrossAdversarialResult:
    """Search, per unit, cross-attention rows t maximally different from the original with almost the same p(· | t).

    As `analyses.counterfactual.adversarial_attention` (same defaults, objective and optimiser), on query row t of
    the cross-attention at `layer` (one decoder layer, or every one for "all") of the unit's own copy of its
    example (see the module doc): new row = softmax over the allowed source keys of free logits [edited layer,
    head, src], started at log(original) + init_noise·N(0, 1) (drawn once for all units from `seed`) and moved by
    Adam (lr, n_steps) to maximise JSD − penalty·relu(TVD − ε). n_steps=0 only evaluates the start.
    n_adversaries: K independent searches per unit (adversary 0 draws its start first, exactly as one search
    does; adversaries 1 … K − 1 draw theirs next from the same generator); per unit the best feasible one is
    reported, else the one closest to feasible. `max_batch` units (copies) a forward + backward.
    """
    sites = cross_sites(model, layer)
    _check_adversarial(epsilon, n_steps, lr, penalty, init_noise, seed)
    check_positive_int("max_batch", max_batch)
    _check_adversaries(n_adversaries)
    if n_steps * n_adversaries > MAX_STEPS:
        raise ValueError(f"n_steps × n_adversaries = {n_steps:,} × {n_adversaries:,} forward + backward passes per "
                         f"unit and layer is above MAX_STEPS={MAX_STEPS:,}: lower n_steps or n_adversaries.")
    _check_units(pairs, units)
    base, original, allowed = _unit_forward(model, pairs, units, sites=sites, max_batch=max_batch)
    assert original is not None
    gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn(original.shape, generator=gen) for _ in range(n_adversaries)]   # each [site, unit, head, src]
    u = len(units.src)
    jsd_out, tvd_out = torch.zeros(u), torch.zeros(u)
    sat_out = torch.zeros(u, dtype=torch.bool)
    att_out = torch.zeros_like(original)
    dev = model.device
    with model.evaluating(), torch.enable_grad():
        for pick, rows in _chunks(units, max_batch, per_unit=True):
            chunk, at = pairs.rows(rows), units.tgt[pick].to(dev)
            orig = original[:, pick].to(dev)                                          # [site, c, head, src]
            ok = allowed[pick].to(dev)[:, None, :]                                    # [c, 1, src]
            ref = base[pick].to(dev)                                                  # [c, vocab]
            found = [_search_rows(model, sites, chunk, at, orig, ok, ref, noise[:, pick].to(dev), epsilon=epsilon,
                                  n_steps=n_steps, lr=lr, penalty=penalty, init_noise=init_noise) for noise in noises]
            jsd_k, tvd_k, sat_k = (torch.stack([f[i] for f in found]) for i in range(3))   # [K, c]
            att_k = torch.stack([f[3] for f in found])                                # [K, site, c, head, src]
            satisfied = sat_k.any(0)                                                  # [c]
            score = torch.where(sat_k, jsd_k, torch.full_like(jsd_k, -math.inf))
            k = torch.where(satisfied, score.argmax(0), tvd_k.argmin(0))              # [c]; ties: the lowest index
            c = torch.arange(len(pick), device=k.device)
            jsd_out[pick] = jsd_k[k, c].float().cpu()
            tvd_out[pick] = tvd_k[k, c].float().cpu()
            sat_out[pick] = satisfied.cpu()
            att_out[:, pick] = att_k.permute(0, 2, 1, 3, 4)[k, c].transpose(0, 1).float().cpu()
    return CrossAdversarialResult(layer=str(layer), sites=sites, src=units.src.clone(), tgt=units.tgt.clone(),
                                  jsd=jsd_out, tvd=tvd_out, satisfied=sat_out, attention=att_out, original=original)


def _search_rows(model: Any, sites: list[str], chunk: Any, at: Tensor, orig: Tensor, ok: Tensor, ref: Tensor,
                 noise: Tensor, *, epsilon: float, n_steps: int, lr: float, penalty: float,
                 init_noise: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One adversary's search on one chunk of c units -> jsd, tvd, satisfied [c] and its rows [site, c, head, src]:
    the best feasible step's, else the last step's."""
    theta = (orig.clamp_min(1e-6).log() + init_noise * noise).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    c, dev = len(at), orig.device
    best_jsd = torch.full((c,), -1.0, device=dev)
    best_tvd = torch.full((c,), math.nan, device=dev)
    best_att = torch.zeros_like(orig)
    for step in range(n_steps + 1):                                                   # the last pass only evaluates
        new = _softmax_allowed(theta, ok)                                             # [site, c, head, src]
        with hooks(model, {s: row_edit(new[j], at) for j, s in enumerate(sites)}):
            logits = model(chunk)                                                     # [c, tgt, vocab]
        probs = logits[torch.arange(c, device=logits.device), at.to(logits.device)].float().softmax(-1)
        out_tvd = tvd(probs, ref)                                                     # [c]
        att_jsd = jsd(new, orig).mean(-1).mean(0)                                     # [site, c, head] -> [c]
        last_jsd, last_tvd = att_jsd.detach(), out_tvd.detach()
        better = (last_tvd <= epsilon) & (last_jsd > best_jsd)
        best_jsd = torch.where(better, last_jsd, best_jsd)
        best_tvd = torch.where(better, last_tvd, best_tvd)
        best_att = torch.where(better[None, :, None, None], new.detach(), best_att)
        if step == n_steps:
            break
        objective = att_jsd - penalty * torch.relu(out_tvd - epsilon)                 # [c]
        (grad,) = torch.autograd.grad(-objective.sum(), [theta])                      # the free logits only
        theta.grad = grad
        opt.step()
    satisfied = best_jsd >= 0
    return (torch.where(satisfied, best_jsd, last_jsd), torch.where(satisfied, best_tvd, last_tvd), satisfied,
            torch.where(satisfied[None, :, None, None], best_att, new.detach()))


def cross_adversarial(model: Any, pairs: Any, units: Any, *, layer: Layer, epsilon: float = 0.01, n_steps: int = 40,
                      lr: float = 0.1, penalty: float = 10.0, init_noise: float = 1.0, seed: int = 0,
                      max_batch: int = 256, n_adversaries: int = 1) -> list[tuple]:
    """`adversarial_search` -> summary rows ("adversarial", layer, "all", statistic, value): jsd_reached,
    median_jsd_reached, constraint_satisfied_fraction (per example, then over examples; see the module doc)."""
    res = adversarial_search(model, pairs, units, layer=layer, epsilon=epsilon, n_steps=n_steps, lr=lr, penalty=penalty,
                             init_noise=init_noise, seed=seed, max_batch=max_batch, n_adversaries=n_adversaries)
    return res.rows(len(pairs.tgt_out))


# -- head ablation --------------------------------------------------------------------------------
def ablated_probs(model: Any, pairs: Any, units: Any, *, layer: int, heads: int | Sequence[int],
                  max_batch: int = 256) -> Tensor:
    """p(· | y_<t, x) at each unit [unit, vocab] with the given cross-attention head(s) of decoder `layer` zeroed
    (`interventions.zero_head`, every query row), one teacher-forced forward per max_batch examples."""
    if layer == "all":
        raise ValueError(f"layer must be an int (one decoder layer) for head ablation; got {layer!r}.")
    site = cross_sites(model, layer)[0]
    check_positive_int("max_batch", max_batch)
    _check_units(pairs, units)
    heads = [heads] if isinstance(heads, int) else list(heads)
    return _unit_forward(model, pairs, units, edits={site: zero_head(heads)}, max_batch=max_batch)[0]


def cross_head_table(model: Any, pairs: Any, units: Any, *, max_batch: int = 256) -> pd.DataFrame:
    """One row per (decoder layer, cross-attention head): layer, head, importance_tvd, importance_prob_drop,
    decisive_mass (the classifier's `head_ablation` frame; per unit, then per example, then over examples)."""
    check_positive_int("max_batch", max_batch)
    _check_units(pairs, units)
    sites = cross_sites(model, "all")
    base, att, _ = _unit_forward(model, pairs, units, sites=sites, max_batch=max_batch)   # att [layer, unit, head, src]
    assert att is not None
    n = len(pairs.tgt_out)
    pred = base.argmax(-1)                                                            # [unit] originally predicted
    gold = units.gold.cpu().float()                                                   # [unit, src]
    has_gold = gold.sum(-1) > 0                                                       # [unit]
    out = []
    for layer in range(len(sites)):
        for head in range(att.shape[2]):
            probs = ablated_probs(model, pairs, units, layer=layer, heads=head, max_batch=max_batch)
            drop = base.gather(1, pred[:, None])[:, 0] - probs.gather(1, pred[:, None])[:, 0]
            mass = torch.where(has_gold, (att[layer, :, head] * gold).sum(-1), torch.nan)
            out.append((layer, head, *(_nanmean(example_means(units.src, v, n)) for v in (tvd(probs, base), drop, mass))))
    return pd.DataFrame(out, columns=["layer", "head", *HEAD_STATISTICS])


def head_rows(table: pd.DataFrame) -> list[tuple]:
    """`cross_head_table` -> summary rows: per (layer, head) its three statistics, then the two Spearman ρ across
    heads (layer "all", head "all"), as `counterfactual_table` writes them."""
    rows = [("head_ablation", str(r.layer), str(r.head), stat, float(getattr(r, stat)))
            for r in table.itertuples(index=False) for stat in HEAD_STATISTICS]
    rows.append(("head_ablation", "all", "all", "importance_tvd_mass_spearman",
                 spearman(table.importance_tvd, table.decisive_mass)))
    rows.append(("head_ablation", "all", "all", "prob_drop_mass_spearman",
                 spearman(table.importance_prob_drop, table.decisive_mass)))
    return rows


def cross_head_ablation(model: Any, pairs: Any, units: Any, *, max_batch: int = 256) -> list[tuple]:
    """Zero each decoder layer's cross-attention heads one at a time -> summary rows (see `head_rows`)."""
    return head_rows(cross_head_table(model, pairs, units, max_batch=max_batch))
