"""LIME and KernelSHAP of an encoder–decoder's teacher-forced target: scores [batch, tgt, src].

    engine = TeacherForcedEngine(model, pairs)               # explain.seq2seq: cached [MASK]-perturbed forwards
    mask, special = pairs.src.attention_mask, pairs.src.special_mask
    ks = kernel_shap(engine.probs, mask, special, tgt_mask=pairs.tgt_mask, input_ids=pairs.src.input_ids)
    lm = lime(engine.probs, mask, special, tgt_mask=pairs.tgt_mask, input_ids=pairs.src.input_ids,
              embeds=lime_embeds(model, pairs))

What is explained: for every target position t, f_t = p(y_t | y_<t, x) of the reference token (the probability, as
the classifier's LIME / KernelSHAP and `explain.seq2seq`'s occlusion), as a function of which SOURCE tokens are
present: one binary feature per real, non-special source token, an absent token replaced by [MASK] (whatever
`probs` does with a keep-mask; `TeacherForcedEngine.probs` writes [MASK]). Specials and padding are never
features and get 0; so do target positions not in `tgt_mask`.

`probs(rows [n] long, keep [n, src] bool) -> [n, tgt]` gives p(y_t) at EVERY target position from one
teacher-forced forward, so positions share coalitions: per example the coalitions are drawn once (captum, seeded
identically for every position, so its draws repeat), each distinct coalition is asked of `probs` once (a memo per
example), and captum fits one surrogate per target position on the same samples. `probs` thus sees exactly the
coalitions of ONE target position's captum run (tests/test_seq2seq_sampled.py counts them).

Defaults and semantics follow the classifier's `Lime` and `KernelShap` (explain/perturbation.py): n_samples 256,
LIME's ridge alpha 1.0 (`SkLearnRidge`) with captum's exponential cosine kernel of width 1, KernelSHAP's exact
Shapley value f(x) − f(x with the word masked) for a one-word example, draws seeded per example from `seed` and
its token ids (`example_seed`), so an example gets the same scores alone or in a batch (given `input_ids`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import captum.attr
import numpy as np
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr._core.lime import get_exp_kernel_similarity_function
from torch import Tensor

from attnaudit.explain.base import MAX_ROWS
from attnaudit.explain.control import check_seed, example_seed, seeded
from attnaudit.explain.gradients import check_positive_int
from attnaudit.explain.seq2seq_gradients import source_baseline
from attnaudit.model.seq2seq import PairBatch

__all__ = ["ProbsFn", "kernel_shap", "lime", "lime_embeds"]

ProbsFn = Callable[[Tensor, Tensor], Tensor]     # (rows [n] long, keep [n, src] bool) -> p(y_t) [n, tgt]
MethodFactory = Callable[[Callable[[Tensor], Tensor], int, Tensor], Any]   # (forward, example, features) -> captum


def lime_embeds(model: Any, pairs: PairBatch) -> tuple[Tensor, Tensor]:
    """LIME's similarity inputs: (source embeddings, the same with every real non-special token's as [MASK]),
    each [batch, src, d_model] (CPU), as the classifier's LIME measures a sample's distance."""
    with torch.no_grad():
        x = model.encoder_embeds(pairs.src.input_ids).float()                       # [batch, src, d_model]
        masked = source_baseline(model, pairs.src, x, "mask")                        # [batch, src, d_model]
    return x.cpu(), masked.cpu()


class _Memo:
    """One example's coalitions -> p(y_t) [tgt], each distinct coalition asked of `probs` once."""

    def __init__(self, probs: ProbsFn, i: int, mask: Tensor, pos: Tensor):
        self.probs, self.i, self.mask, self.pos = probs, i, mask, pos                # mask [src], pos [n_features]
        self.seen: dict[bytes, Tensor] = {}

    def __call__(self, present: Tensor) -> Tensor:
        """[rows, n_features] 0/1 -> [rows, tgt]."""
        on = present.detach().cpu() > 0.5                                           # [rows, n_features]
        keys = [b.tobytes() for b in np.packbits(on.numpy(), axis=1)]
        new: dict[bytes, int] = {}
        for j, k in enumerate(keys):
            if k not in self.seen:
                new.setdefault(k, j)
        if new:
            pick = torch.tensor(list(new.values()))                                  # [n_new]
            keep = self.mask.repeat(len(pick), 1)                                    # [n_new, src]
            keep[:, self.pos] = on[pick]
            p = self.probs(torch.full((len(pick),), self.i, dtype=torch.long), keep).detach().float().cpu()
            self.seen.update((k, p[j]) for j, k in enumerate(new))                   # p: [n_new, tgt]
        return torch.stack([self.seen[k] for k in keys])


def _check_masks(mask: Tensor, special: Tensor, tgt_mask: Tensor | None, input_ids: Tensor | None) -> None:
    if not (isinstance(mask, Tensor) and mask.dim() == 2):
        raise ValueError(f"mask must be a [batch, src] bool Tensor; got {getattr(mask, 'shape', type(mask).__name__)}.")
    for name, t in (("special", special), ("input_ids", input_ids)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != tuple(mask.shape)):
            raise ValueError(f"{name} must be a Tensor of mask's shape {tuple(mask.shape)}; "
                             f"got {getattr(t, 'shape', type(t).__name__)}.")
    if tgt_mask is not None and (not isinstance(tgt_mask, Tensor) or tgt_mask.dim() != 2
                                 or tgt_mask.shape[0] != mask.shape[0]):
        raise ValueError(f"tgt_mask must be a [batch, tgt] bool Tensor with batch = {mask.shape[0]}; "
                         f"got {getattr(tgt_mask, 'shape', type(tgt_mask).__name__)}.")


def _sampled(probs: ProbsFn, mask: Tensor, special: Tensor, make_method: MethodFactory, *, n_samples: int, seed: int,
             max_batch: int, tgt_mask: Tensor | None, input_ids: Tensor | None, exact_for_one_word: bool) -> Tensor:
    """Per example: captum's method, once per target position on the same seeded draws -> [batch, tgt, src]."""
    check_positive_int("n_samples", n_samples)
    check_positive_int("max_batch", max_batch, maximum=MAX_ROWS)
    check_seed(seed)
    _check_masks(mask, special, tgt_mask, input_ids)
    mask, special = mask.cpu().bool(), special.cpu().bool()
    words = mask & ~special                                                          # [batch, src]
    rows: list[dict[int, Tensor]] = []                                               # per example: {t: [src]}
    width = None if tgt_mask is None else tgt_mask.shape[1]
    for i in range(mask.shape[0]):
        pos = words[i].nonzero()[:, 0]                                               # [n_features]
        rows.append({})
        if len(pos) == 0:
            continue
        memo = _Memo(probs, i, mask[i], pos)
        everything = torch.ones(1, len(pos))                                         # [1, n_features]
        if len(pos) == 1 and exact_for_one_word:                                     # Shapley value of a lone player
            p = memo(torch.cat([everything, torch.zeros_like(everything)]))          # [2, tgt]
            for t in _positions(tgt_mask, i, p.shape[1]):
                rows[i][t] = torch.zeros(mask.shape[1]).index_fill_(0, pos, float(p[0, t] - p[1, t]))
            width = width or p.shape[1]
            continue
        method = make_method(memo, i, pos)
        s = example_seed(seed, (input_ids[i][mask[i]] if input_ids is not None else torch.tensor([i])).tolist())
        todo, k = _positions(tgt_mask, i, width), 0
        while k < len(todo):
            t = todo[k]
            with seeded(s), torch.no_grad():                                        # the same draws at every t
                coef = method.attribute(everything, baselines=torch.zeros_like(everything), target=t,
                                        feature_mask=torch.arange(len(pos))[None], n_samples=n_samples,
                                        perturbations_per_eval=min(max_batch, n_samples),
                                        return_input_shape=False)                   # [1, n_features]
            rows[i][t] = torch.zeros(mask.shape[1]).index_copy_(0, pos, coef[0].detach().float().cpu())
            k += 1
            if width is None:                                                        # tgt_mask None: now it is known
                width = next(iter(memo.seen.values())).shape[0]
                todo = _positions(None, i, width)
    if width is None:                                                                # no example had a feature
        width = int(probs(torch.zeros(1, dtype=torch.long), mask[:1]).shape[1])
    out = torch.zeros(mask.shape[0], width, mask.shape[1])                           # [batch, tgt, src]
    for i, per_t in enumerate(rows):
        for t, v in per_t.items():
            out[i, t] = v
    return out


def _positions(tgt_mask: Tensor | None, i: int, width: int | None) -> list[int]:
    """The target positions explained for example i: tgt_mask's True ones, else 0 .. width − 1 (only 0 when unknown)."""
    if tgt_mask is not None:
        return tgt_mask[i].cpu().nonzero()[:, 0].tolist()
    return list(range(width)) if width is not None else [0]


def lime(probs: ProbsFn, mask: Tensor, special: Tensor, *, n_samples: int = 256, alpha: float = 1.0, seed: int = 0,
         max_batch: int = 256, tgt_mask: Tensor | None = None, input_ids: Tensor | None = None,
         embeds: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """LIME (Ribeiro et al. 2016) of p(y_t | y_<t, x) on source-token presence -> [batch, tgt, src].

    A ridge regression (`SkLearnRidge(alpha)`, captum's `Lime`) per example and target position on the same
    `n_samples` coalitions (each token kept with probability 1/2), weighted by exp(−d²/2), d the cosine distance
    between the sample and the input: over their source embeddings when `embeds` = (embeddings, [MASK]-replaced
    embeddings) [batch, src, d_model] is given (`lime_embeds`, as the classifier's LIME), else over the presence
    vectors (captum's default kernel).

    Args:
        probs: (rows [n], keep [n, src] bool) -> p(y_t) [n, tgt], e.g. `TeacherForcedEngine.probs`.
        mask, special: [batch, src] bool: real tokens, and those never perturbed ([CLS]/[SEP]/EOS).
        n_samples, alpha, seed, max_batch: as the classifier's `Lime` (max_batch: coalitions per `probs` call).
        tgt_mask: [batch, tgt] bool, the positions explained (default: all of `probs`' columns).
        input_ids: [batch, src] token ids; with them an example's draws are seeded from `seed` and its real ids
            (the same scores alone or in a batch), without them from `seed` and its row index.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be a number >= 0 (the ridge penalty); got {alpha!r}.")
    if embeds is not None and (not isinstance(embeds, tuple) or len(embeds) != 2
                               or any(tuple(e.shape[:2]) != tuple(mask.shape) for e in embeds)):
        raise ValueError(f"embeds must be a pair (embeddings, [MASK] embeddings), each [batch, src, d_model] with "
                         f"[batch, src] = {tuple(mask.shape)} (see lime_embeds); got {type(embeds).__name__}.")
    kernel = get_exp_kernel_similarity_function("cosine", kernel_width=1.0)

    def make_method(forward: Callable[[Tensor], Tensor], i: int, pos: Tensor):
        if embeds is None:
            return captum.attr.Lime(forward, interpretable_model=SkLearnRidge(alpha=float(alpha)))
        n = int(mask[i].sum())
        x, masked = embeds[0][i : i + 1, :n].cpu(), embeds[1][i : i + 1, :n].cpu()    # [1, src_i, d_model]

        def as_embeds(present: Tensor) -> Tensor:                                   # [1, n_features] -> [1, src_i, d]
            on = torch.ones(n, dtype=torch.bool)
            on[pos] = present[0].cpu() > 0.5
            return torch.where(on[None, :, None], x, masked)

        def similarity(original: Tensor, perturbed: Tensor, interpretable: Tensor, **kwargs) -> float:
            return kernel(as_embeds(original), as_embeds(perturbed), interpretable)

        return captum.attr.Lime(forward, interpretable_model=SkLearnRidge(alpha=float(alpha)),
                                similarity_func=similarity)

    return _sampled(probs, mask, special, make_method, n_samples=n_samples, seed=seed, max_batch=max_batch,
                    tgt_mask=tgt_mask, input_ids=input_ids, exact_for_one_word=False)


def kernel_shap(probs: ProbsFn, mask: Tensor, special: Tensor, *, n_samples: int = 256, seed: int = 0,
                max_batch: int = 256, tgt_mask: Tensor | None = None, input_ids: Tensor | None = None) -> Tensor:
    """KernelSHAP (Lundberg & Lee 2017, captum's `KernelShap`) of p(y_t | y_<t, x) on source-token presence
    -> [batch, tgt, src]: Shapley values estimated by captum's weighted regression, one per example and target
    position on the same `n_samples` coalitions (the first two: all tokens and none). A one-word example gets its
    exact Shapley value f_t(x) − f_t(x with the word masked) (captum's coalition sizes are empty for one feature).
    Arguments as `lime`.
    """
    def make_method(forward: Callable[[Tensor], Tensor], i: int, pos: Tensor):
        return captum.attr.KernelShap(forward)

    return _sampled(probs, mask, special, make_method, n_samples=n_samples, seed=seed, max_batch=max_batch,
                    tgt_mask=tgt_mask, input_ids=input_ids, exact_for_one_word=True)
