"""Edits of attention probabilities, for use with `hooks(model, {site: edit})`.

Each factory returns ``edit(pattern, allowed) -> pattern`` on [batch, head, query, key] tensors, where
`allowed` [batch, 1, query, key] marks the keys each query may attend (padding and causal masks).
Rows of non-padded queries keep summing to 1 unless the edit says otherwise (zeroing a head).
The counterfactual tests of Jain & Wallace (2019), Wiegreffe & Pinter (2019) and Serrano & Smith (2019)
are built from these.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attnaudit.model.hooks import Edit


def _renormalise(pattern: Tensor) -> Tensor:
    total = pattern.sum(-1, keepdim=True)                                      # [batch, head, query, 1]
    return torch.where(total > 0, pattern / total.clamp_min(1e-30), pattern)  # all-zero rows stay zero


def uniform() -> Edit:
    """Uniform attention over each query's allowed keys (Wiegreffe & Pinter's uniform baseline)."""

    def edit(pattern: Tensor, allowed: Tensor) -> Tensor:
        allowed = allowed.expand_as(pattern).to(pattern.dtype)
        return _renormalise(allowed)

    return edit


def permute(generator: torch.Generator | None = None, *, seed: int | None = None) -> Edit:
    """Randomly permute each row's probabilities among its allowed keys (Jain & Wallace 2019).

    Masked keys stay exactly 0; every row keeps its multiset of values. Pass a `generator` or `seed`
    for reproducibility (a new permutation is drawn at every forward).
    """
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)

    def edit(pattern: Tensor, allowed: Tensor) -> Tensor:
        allowed = allowed.expand_as(pattern)
        rand = torch.rand(pattern.shape, generator=generator).to(pattern.device)
        # Allowed keys first: in position order (source) and in random order (destination).
        src = torch.argsort((~allowed).to(torch.int8), dim=-1, stable=True)        # [batch, head, query, key]
        dst = torch.argsort(rand + (~allowed).to(rand.dtype) * 2.0, dim=-1)         # allowed keys have rand < 1
        # Tails of src and dst both index masked keys, whose value is 0, so scattering them is harmless.
        return torch.zeros_like(pattern).scatter(-1, dst, pattern.gather(-1, src))

    return edit


def zero_head(head: int | list[int]) -> Edit:
    """Set the chosen heads' probabilities to 0, so those heads contribute nothing (head ablation)."""
    heads = [head] if isinstance(head, int) else list(head)

    def edit(pattern: Tensor, allowed: Tensor) -> Tensor:
        n_heads = pattern.shape[1]
        bad = [h for h in heads if not (isinstance(h, int) and -n_heads <= h < n_heads)]
        if bad:
            raise ValueError(f"head must be an int in [0, {n_heads - 1}]; got {bad[0]!r} (this site has {n_heads} heads).")
        out = pattern.clone()
        out[:, heads] = 0.0
        return out

    return edit


def zero_key(key: int | Tensor) -> Edit:
    """Zero attention to one key and renormalise each row (Serrano & Smith's erasure).

    `key` is one position for the whole batch, or a LongTensor [batch] with one position per example.
    """

    def edit(pattern: Tensor, allowed: Tensor) -> Tensor:
        b, _, _, n_keys = pattern.shape
        idx = torch.as_tensor(key, device=pattern.device).long().expand(b) if not isinstance(key, Tensor) or key.dim() == 0 \
            else key.to(pattern.device).long()
        if idx.shape != (b,) or (idx < 0).any() or (idx >= n_keys).any():
            raise ValueError(f"key must be a position in [0, {n_keys - 1}] or a LongTensor of shape ({b},); got {key!r}.")
        keep = torch.ones_like(pattern).scatter(-1, idx[:, None, None, None].expand(b, pattern.shape[1], pattern.shape[2], 1), 0.0)
        return _renormalise(pattern * keep)

    return edit


def replace(new_pattern: Tensor) -> Edit:
    """Use the given probabilities [batch, head, query, key] (broadcastable) instead of the model's."""

    def edit(pattern: Tensor, allowed: Tensor) -> Tensor:
        try:
            return new_pattern.to(pattern.device, pattern.dtype).expand_as(pattern)
        except RuntimeError as e:
            raise ValueError(
                f"replacement pattern of shape {tuple(new_pattern.shape)} does not broadcast to the site's "
                f"{tuple(pattern.shape)} [batch, head, query, key]."
            ) from e

    return edit
