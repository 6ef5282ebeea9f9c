"""Explaining an encoder–decoder's teacher-forced target: scores [batch, tgt, src] per explainer.

    pairs = model.encode(examples)                                  # a PairBatch: source Batch + teacher forcing
    scores = translator_scores(model, pairs, ["rollout", "integrated_gradients"])   # {name: [batch, tgt, src]}

For every target position t the explained quantity is the reference token's p(y_t | y_<t, x) (perturbations) or
log p(y_t | y_<t, x) (gradients), over the SOURCE tokens; one teacher-forced forward gives it at every t, so
every target position shares each forward (and each perturbation's forward: `TeacherForcedEngine`).
Models: the built-in `Translator` and `attnaudit.model.hf_seq2seq.HFTranslator` (BART, T5, Marian), through the
members both have (`attnaudit.model.interface`, "an encoder–decoder"). `attnaudit.analyses.seq2seq` scores
these explanations (faithfulness, alignment, counterfactual tests).

Explainers (`EXPLAINERS`; "attention" and "rollout" keep the classifier's names, so the verdict counts them, and
every name of `ATTENTION_FAMILY`, as the attention family):
    attention         last decoder layer's cross-attention, mean over heads (alias "cross_attention")
    attention_layers  cross-attention, mean over layers and heads
    rollout           Chefer et al. (2021)'s encoder–decoder rules on head-averaged attention (alias "cross_rollout")
    grad_attention    Chefer et al. (2021)'s rules on E_h[(∇A ⊙ A)⁺], ∇A per target position (`seq2seq_attention`)
    attention_x_grad  E_h[A ⊙ ∇A] of the last decoder layer's cross-attention, row t
    attention_norm    Kobayashi et al. (2020): ‖Σ_h α^h_ts f_h(x_s)‖ of the last decoder layer's cross-attention
    saliency          ‖∂ log p(y_t | y_<t, x) / ∂ e_s‖₂ per source embedding e_s (Simonyan et al. 2014)
    input_x_gradient  Σ_d e_s · ∂ log p(y_t | y_<t, x) / ∂ e_s (Shrikumar et al. 2016)
    integrated_gradients, deeplift, gradient_shap   captum's, on log p(y_t | y_<t, x) (`seq2seq_gradients`;
                      IG: 50 Gauss–Legendre steps, one forward per interpolated batch serves every t)
    occlusion         p(y_t | x) − p(y_t | x with token s → [MASK]), every s in one batched forward
    lime, kernel_shap captum's, on p(y_t) over source-token presence; one set of coalitions per example serves
                      every target position (`seq2seq_sampled`)
    random            seeded U(0, 1)
Not defined here: attention flow (no encoder–decoder graph in Abnar & Zuidema 2020); the target prefix is never
attributed (the scores are over the source).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from attnaudit.explain.perturb import leave_one_out_path, materialize
from attnaudit.model.hooks import hooks, record
from attnaudit.model.seq2seq import PairBatch, Translator

EXPLAINERS = ("attention", "attention_layers", "rollout", "grad_attention", "attention_x_grad", "attention_norm",
              "saliency", "input_x_gradient", "integrated_gradients", "deeplift", "gradient_shap", "occlusion", "lime",
              "kernel_shap", "random")
ALIASES = {"cross_attention": "attention", "cross_rollout": "rollout"}

Seq2SeqModel = Translator | Any   # the built-in `Translator` or `attnaudit.model.hf_seq2seq.HFTranslator`


# -- what every encoder–decoder explainer shares ----------------------------------------------------
def check_pairs(pairs: PairBatch) -> None:
    """Refuse anything but a PairBatch with targets (ValueError): every explainer here explains a teacher-forced target."""
    if not isinstance(pairs, PairBatch):
        raise ValueError(f"pairs must be a PairBatch (model.encode(examples) with targets); got {type(pairs).__name__}.")
    pairs.targets()                                                                  # raises without targets


def reference_log_probs(logits: Tensor, tgt_out: Tensor) -> Tensor:
    """logits [n, tgt, vocab], reference ids [n, tgt] -> log p(y_t | y_<t, x) [n, tgt] (float32)."""
    return logits.float().log_softmax(-1).gather(-1, tgt_out[..., None].to(logits.device))[..., 0]


def on_cells(scores: Tensor, pairs: PairBatch) -> Tensor:
    """[batch, tgt, src] -> float32 CPU, 0 on source padding and on each example's target padding."""
    _, _, tgt_mask = pairs.targets()
    keep = tgt_mask.cpu()[:, :, None] & pairs.src.attention_mask.cpu().bool()[:, None, :]   # [batch, tgt, src]
    return torch.where(keep, scores.detach().float().cpu(), 0.0)


def _bar(r: Tensor) -> Tensor:
    """R̄ = I + rownorm(R − I) (Chefer et al.'s eqs. 8–9); a row with nothing beyond I stays I."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    rest = r - eye                                                               # [n, k, k]
    return eye + rest / rest.sum(-1, keepdim=True).clamp_min(1e-12)


def relevance_rules(enc: Tensor, dec_self: Tensor, cross: Tensor) -> Tensor:
    """Chefer et al. (2021) rules 6–10 for an encoder–decoder, rows = queries (the rules of `cross_rollout`).

    Args:
        enc [layer, n, src, src], dec_self [layer, n, tgt, tgt], cross [layer, n, tgt, src]: one map per layer and
        item (head-averaged attention for rollout, Ē for grad_attention).
    Returns:
        [n, tgt, src]: R_ts after the last decoder layer. R_ss ← R_ss + A·R_ss per encoder layer from I; per decoder
        layer R_tt ← R_tt + A·R_tt, R_ts ← R_ts + A·R_ts (self-attention, rules 6–7), then
        R_ts ← R_ts + R̄_tt·A_cross·R̄_ss (rule 10), R̄ = I + rownorm(R − I); R_tt from I, R_ts from 0.
        Chefer's reference code (Transformer-MM-Explainability, DETR/modules/ExplanationGenerator.py,
        `apply_mm_attention_rules`) multiplies by R̄_tt transposed; with rows = queries and a causal decoder the
        untransposed R̄_tt is the one that composes (target t reads only t' <= t), as `cross_rollout` does.
    """
    n, s, t = enc.shape[1], enc.shape[-1], dec_self.shape[-1]
    dt, dev = enc.dtype, enc.device
    r_ss = torch.eye(s, dtype=dt, device=dev).expand(n, s, s)                    # [n, src, src]
    for a in enc:
        r_ss = r_ss + a @ r_ss
    r_tt = torch.eye(t, dtype=dt, device=dev).expand(n, t, t)                    # [n, tgt, tgt]
    r_ts = torch.zeros(n, t, s, dtype=dt, device=dev)                            # [n, tgt, src]
    for a_self, a_cross in zip(dec_self, cross):
        r_tt, r_ts = r_tt + a_self @ r_tt, r_ts + a_self @ r_ts
        r_ts = r_ts + _bar(r_tt) @ a_cross @ _bar(r_ss)
    return r_ts


class UnitIndex(Protocol):
    """Explained target tokens, flattened (`analyses.seq2seq.Units`): unit u is position tgt[u] of example src[u]."""

    src: Tensor      # [unit] long
    tgt: Tensor      # [unit] long


def teacher_forced(model: Seq2SeqModel, pairs: PairBatch, rows: Tensor, *, src_ids: Tensor | None = None,
             edits: Mapping | Callable[[slice], Mapping] | None = None, max_batch: int = 256,
             reduce: Callable[[Tensor, slice], Tensor] | None = None) -> Tensor:
    """Teacher-forced next-token probabilities of examples `rows` [n] -> [n, tgt, vocab], `max_batch` rows a forward.
    src_ids [n, src] replaces their source ids; edits (or edits(slice of rows)) go to `hooks`; reduce(probs, slice)
    shrinks each chunk before it is kept."""
    out = []
    with model.evaluating(), torch.inference_mode():
        for lo in range(0, len(rows), max_batch):
            sl = slice(lo, lo + max_batch)
            chunk = pairs.rows(rows[sl], None if src_ids is None else src_ids[sl])
            with hooks(model, dict((edits(sl) if callable(edits) else edits) or {})):
                logits = model(chunk)                                                       # [chunk, tgt, vocab]
            probs = logits.float().softmax(-1).cpu()
            out.append(reduce(probs, sl) if reduce else probs)
    return torch.cat(out)


class TeacherForcedEngine:
    """De-duplicated, cached forwards of [MASK]-perturbed sources -> p(reference y_t) at every target position."""

    def __init__(self, model: Seq2SeqModel, pairs: PairBatch, *, max_batch: int = 256):
        self.model, self.pairs, self.max_batch = model, pairs, max_batch
        self.mask = pairs.src.attention_mask.cpu()                                  # [batch, src]
        self.special = pairs.src.special_mask.cpu() & self.mask                     # [batch, src]
        self.slot: dict[tuple[int, bytes], int] = {}
        self.table = torch.zeros(0, pairs.targets()[1].shape[1])                       # [n_cached, tgt]
        self.forwards = 0

    def probs(self, rows: Tensor, keep: Tensor) -> Tensor:
        """Example indices [n] and keep-masks [n, src] (specials always kept) -> p(y_t) [n, tgt]."""
        keep = (keep.cpu().bool() | self.special[rows]) & self.mask[rows]           # [n, src]
        keys = list(zip(rows.tolist(), (b.tobytes() for b in np.packbits(keep.numpy(), axis=1))))
        new: dict[tuple[int, bytes], int] = {}       # key -> where it first appears
        for i, k in enumerate(keys):
            if k not in self.slot:
                new.setdefault(k, i)
        if new:
            pick = torch.tensor(list(new.values()))                                 # [n_new]
            r = rows[pick]
            ids, _ = materialize(self.pairs.src.input_ids[r], self.mask[r], keep[pick], policy="mask",
                                 pad_id=self.model.pad_id, mask_id=self.model.mask_id)
            ref = self.pairs.targets()[1][r]                                           # [n_new, tgt]
            p = teacher_forced(self.model, self.pairs, r, src_ids=ids, max_batch=self.max_batch,
                         reduce=lambda probs, sl: probs.gather(-1, ref[sl, :, None])[..., 0])  # [n_new, tgt]
            self.slot.update((k, len(self.table) + j) for j, k in enumerate(new))
            self.table = torch.cat([self.table, p])
            self.forwards += len(new)
        return self.table[torch.tensor([self.slot[k] for k in keys], dtype=torch.long)]

    def unit_probs(self, units: UnitIndex, keep: Tensor, valid: Tensor | None = None) -> Tensor:
        """keep-masks [unit, ..., src] -> p(y_t) of each unit [unit, ...], NaN where not valid."""
        middle = keep.shape[1:-1]
        rows = units.src.view(-1, *[1] * len(middle)).expand(-1, *middle).reshape(-1)   # [n]
        at = units.tgt.view(-1, *[1] * len(middle)).expand(-1, *middle).reshape(-1)     # [n]
        ok = torch.ones(len(rows), dtype=torch.bool) if valid is None else valid.reshape(-1)
        out = torch.full((len(rows),), float("nan"))
        if ok.any():
            out[ok] = self.probs(rows[ok], keep.reshape(len(rows), -1)[ok]).gather(1, at[ok, None])[:, 0]
        return out.view(keep.shape[:-1])


# -- explainers: [batch, tgt, src] ----------------------------------------------------------------
def cross_rollout(enc: Tensor, dec_self: Tensor, cross: Tensor) -> Tensor:
    """Chefer et al. (2021) rules 6–10 on head-averaged attention (`relevance_rules`), rows = queries.

    Args:
        enc [layer, batch, src, src], dec_self [layer, batch, tgt, tgt], cross [layer, batch, tgt, src].
    Returns:
        [batch, tgt, src]: R_ts after the last decoder layer (R_ss ← R_ss + A·R_ss per encoder layer; per decoder
        layer R_tt ← R_tt + A·R_tt, R_ts ← R_ts + A·R_ts, then R_ts ← R_ts + R̄_tt·A_cross·R̄_ss, R̄ = I + rownorm(R − I)).
    """
    return relevance_rules(enc, dec_self, cross)


def _gradients(model: Seq2SeqModel, pairs: PairBatch, max_batch: int) -> tuple[Tensor, Tensor]:
    """Saliency and input×gradient of log p(y_t | y_<t, x) w.r.t. the source embeddings -> each [batch, tgt, src]."""
    s = pairs.src
    sal, ixg = [], []
    with model.evaluating(), torch.enable_grad():
        for lo in range(0, len(s), max_batch):
            sl = slice(lo, lo + max_batch)
            chunk = pairs.rows(torch.arange(len(s))[sl])
            emb = model.encoder_embeds(chunk.src.input_ids).detach().requires_grad_(True)  # [batch, src, d_model]
            logits = model.logits_from_src_embeds(emb, chunk)                        # [batch, tgt, vocab]
            logp = reference_log_probs(logits, pairs.targets()[1][sl])               # [batch, tgt]
            # one backward per target position; examples are independent, so the batch sum separates them
            g = torch.stack([torch.autograd.grad(logp[:, t].sum(), emb, retain_graph=True)[0]
                             for t in range(logp.shape[1])], 1)                     # [batch, tgt, src, d_model]
            sal.append(g.norm(dim=-1).cpu())
            ixg.append((g * emb[:, None]).sum(-1).detach().cpu())
    return torch.cat(sal), torch.cat(ixg)


def translator_scores(model: Seq2SeqModel, pairs: PairBatch, explainers: Sequence[str] = EXPLAINERS, *,
                      engine: TeacherForcedEngine | None = None, seed: int = 0, max_batch: int = 256,
                      params: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Tensor]:
    """Each explainer's scores -> {name: [batch, tgt, src]} (names after resolving ALIASES).

    params: explainer name -> keyword options of its function (e.g. {"integrated_gradients": {"n_steps": 100}};
    see `seq2seq_attention`, `seq2seq_gradients` and `seq2seq_sampled`). The perturbation explainers (occlusion,
    LIME, KernelSHAP) share `engine`'s forwards, and each of them one forward per perturbed source for every
    target position.
    """
    names = [ALIASES.get(n, n) for n in explainers]
    unknown = [n for n in names if n not in EXPLAINERS]
    if unknown or not names or isinstance(explainers, str):
        raise ValueError(f"Unknown explainer {(unknown or [''])[0]!r}. Available: {', '.join(EXPLAINERS + tuple(ALIASES))}.")
    options = {ALIASES.get(k, k): dict(v) for k, v in (params or {}).items()}
    stray = [k for k in options if k not in names]
    if stray:
        raise ValueError(f"params names explainer {stray[0]!r}, which is not among the chosen ones ({', '.join(names)}).")
    # imported here: the family modules import this module's shared helpers
    from attnaudit.explain import seq2seq_attention as A
    from attnaudit.explain import seq2seq_gradients as G
    from attnaudit.explain import seq2seq_sampled as S
    engine = engine or TeacherForcedEngine(model, pairs, max_batch=max_batch)
    b, t = pairs.targets()[1].shape
    out: dict[str, Tensor] = {}
    functions: dict[str, Callable[..., Tensor]] = {
        "grad_attention": lambda **o: A.grad_attention(model, pairs, max_batch=max_batch, **o),
        "attention_x_grad": lambda **o: A.attention_x_grad(model, pairs, max_batch=max_batch, **o),
        "attention_norm": lambda **o: A.attention_norm(model, pairs, max_batch=max_batch, **o),
        "integrated_gradients": lambda **o: G.integrated_gradients(model, pairs, max_batch=max_batch, **o),
        "deeplift": lambda **o: G.deeplift(model, pairs, **o),
        "gradient_shap": lambda **o: G.gradient_shap(model, pairs, **{"seed": seed, **o}),
        "lime": lambda **o: S.lime(engine.probs, engine.mask, engine.special, tgt_mask=pairs.targets()[2],
                                   input_ids=pairs.src.input_ids, embeds=S.lime_embeds(model, pairs),
                                   max_batch=max_batch, **{"seed": seed, **o}),
        "kernel_shap": lambda **o: S.kernel_shap(engine.probs, engine.mask, engine.special, tgt_mask=pairs.targets()[2],
                                                 input_ids=pairs.src.input_ids, max_batch=max_batch,
                                                 **{"seed": seed, **o}),
    }
    for name in names:
        if name in functions:
            out[name] = functions[name](**options.get(name, {})).float().cpu()
        elif name in options:
            raise ValueError(f"explainer {name!r} takes no params; got {sorted(options[name])}.")
    if {"attention", "attention_layers", "rollout"} & set(names):
        enc, dec, crs = model.attention_sites, model.decoder_self_attention_sites, model.cross_attention_sites
        with model.evaluating():
            _, cache = record(model, pairs, names=[*enc, *dec, *crs])
        avg = lambda names: torch.stack([cache[n] for n in names]).float().cpu().mean(2)  # noqa: E731 [layer, batch, q, k]
        cross = avg(crs)                                                             # [layer, batch, tgt, src]
        out.update(attention=cross[-1], attention_layers=cross.mean(0),
                   rollout=cross_rollout(avg(enc), avg(dec), cross))
    if {"saliency", "input_x_gradient"} & set(names):
        out["saliency"], out["input_x_gradient"] = _gradients(model, pairs, max_batch)
    if "occlusion" in names:
        keep, valid = leave_one_out_path(engine.mask, engine.special)                # [batch, pos, src], [batch, pos]
        rows = torch.arange(b)[:, None].expand_as(valid)                             # [batch, pos]
        p = torch.zeros(*valid.shape, t)                                             # [batch, pos, tgt]
        p[valid] = engine.probs(rows[valid], keep[valid])
        full = engine.probs(torch.arange(b), engine.mask)                            # [batch, tgt]
        out["occlusion"] = (full[:, :, None] - p.transpose(1, 2)) * valid[:, None, :]  # [batch, tgt, src]
    if "random" in names:
        out["random"] = torch.rand(b, t, engine.mask.shape[1], generator=torch.Generator().manual_seed(seed))
    return {n: out[n] for n in names}


