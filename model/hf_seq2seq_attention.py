"""The attention function HuggingFace encoder–decoders (BART, T5, Marian) run under attnaudit, through our sites.

Registered in transformers' `AttentionInterface` under the name "attnaudit_seq2seq" (`register_seq2seq_attention`),
beside the classifiers' "attnaudit" (`attnaudit.model.hf_attention`), whose one-site-per-layer bookkeeping does not
fit three attention kinds. Every encoder self-, decoder self- and cross-attention module of an `HFTranslator` calls
it: softmax(Q·Kᵀ·scale + position bias + mask) written out (Vaswani et al. 2017, eq. 1; T5 passes scale 1 and its
relative position bias, Raffel et al. 2020, section 2.1), the probabilities routed through the HookPoint of the
module's site (``encoder.layers.{i}.self_attn.pattern``, ``decoder.layers.{i}.self_attn.pattern``,
``decoder.layers.{i}.cross_attn.pattern``; values through ``...values``), so `record` and `hooks` see and edit them
and the output uses the edited ones. As in `model/transformer.py`: padded keys get exactly 0, padded query rows
(source or target padding) are all 0, and the decoder's self-attention is causal.

    run = Seq2SeqRun(sites, src_mask, tgt_mask)          # what the HFTranslator does around each forward
    with running(run):
        logits = net(input_ids=..., decoder_input_ids=..., use_cache=False).logits
"""
from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnaudit.model.hf_attention import register_under
from attnaudit.model.hooks import HookPoint

SEQ2SEQ_ATTENTION = "attnaudit_seq2seq"        # our name in transformers' AttentionInterface
ROLES = ("encoder", "decoder", "cross")        # encoder self-, decoder self- (causal), cross-attention


@dataclass(frozen=True)
class Site:
    """One attention module's hook sites: its role, layer, and the (pattern, values) HookPoints."""

    role: str
    layer: int
    pattern: HookPoint
    values: HookPoint


@dataclass
class Seq2SeqRun:
    """One forward through an `HFTranslator`: its sites by module, the masks of each role, the sites that ran.

    sites: attention module -> Site (by identity); src_mask [batch, src] bool; tgt_mask [batch, tgt] bool or None
    (an encoder-only call).
    """

    sites: dict[nn.Module, Site]
    src_mask: Tensor
    tgt_mask: Tensor | None = None
    ran: list[Site] = field(default_factory=list)
    _allowed: dict[str, Tensor] = field(default_factory=dict)

    def allowed(self, role: str) -> Tensor:
        """The pairs our model allows for `role` -> [batch, 1, query, key] bool (as model/transformer.py builds them)."""
        if role not in self._allowed:
            src = self.src_mask
            if role == "encoder":
                self._allowed[role] = src[:, None, :, None] & src[:, None, None, :]         # [batch, 1, src, src]
            else:
                if self.tgt_mask is None:
                    raise RuntimeError("a decoder attention ran in a forward that was given no target mask.")
                tgt = self.tgt_mask
                if role == "cross":
                    self._allowed[role] = tgt[:, None, :, None] & src[:, None, None, :]     # [batch, 1, tgt, src]
                else:
                    n = tgt.shape[1]
                    future = torch.ones(n, n, dtype=torch.bool, device=tgt.device).tril()  # key <= query
                    self._allowed[role] = tgt[:, None, :, None] & tgt[:, None, None, :] & future
        return self._allowed[role]

    def counts(self) -> dict[str, int]:
        """How many attention calls of each role ran."""
        return {r: sum(s.role == r for s in self.ran) for r in ROLES}


_ACTIVE: contextvars.ContextVar[Seq2SeqRun | None] = contextvars.ContextVar("attnaudit_hf_seq2seq", default=None)


@contextmanager
def running(run: Seq2SeqRun) -> Iterator[Seq2SeqRun]:
    """Route the attention of `run.sites`' modules through their sites inside the block."""
    token = _ACTIVE.set(run)
    try:
        yield run
    finally:
        _ACTIVE.reset(token)


def mask_allowed(mask: Tensor | None, batch: int, n_query: int, n_key: int, device) -> Tensor:
    """transformers' 4-D mask (bool, additive float or None) -> the (query, key) pairs it allows [batch, 1, query, key]."""
    if mask is None:
        return torch.ones(batch, 1, n_query, n_key, dtype=torch.bool, device=device)
    keys = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2   # additive: dtype-min masked
    return keys[:, :1].expand(batch, 1, n_query, n_key)                                 # [batch, 1, query, key]


def seq2seq_probs_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            position_bias: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' attention signature: query/key/value [batch, head, seq, d_head] -> (output, probabilities).

    The output is [batch, query, head, d_head], the probabilities [batch, head, query, key]. `position_bias`
    (T5) [1 or batch, head, query, key] is added to the scores before the mask. Outside an `HFTranslator`
    forward, or for a module that is not one of its sites, it computes the same softmax with no hook sites.
    """
    run = _ACTIVE.get()
    site = run.sites.get(module) if run is not None else None
    b, n_heads, n_q, _ = query.shape
    n_k = key.shape[2]
    if key.shape[1] != n_heads:
        raise ValueError(f"grouped key/value heads are not supported: {n_heads} query heads, {key.shape[1]} key heads.")
    allowed = mask_allowed(attention_mask, b, n_q, n_k, query.device)                  # [batch, 1, query, key]
    if site is not None:
        assert run is not None                                                       # site came from run
        own = run.allowed(site.role)
        if own.shape[-2:] != (n_q, n_k):
            raise RuntimeError(f"{site.role} attention of layer {site.layer} got {n_q} queries and {n_k} keys but the "
                               f"batch has {tuple(own.shape[-2:])}; attnaudit's forwards run without a cache "
                               "(use_cache=False).")
        allowed = allowed & own
        run.ran.append(site)
        value = site.values(value, allowed)                                          # [batch, head, key, d_head]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale                      # [batch, head, query, key]
    if position_bias is not None:
        scores = scores + position_bias                                            # T5's relative position bias
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        scores = scores + attention_mask.masked_fill(~allowed, 0.0)                # an additive mask as given
    rows = allowed.any(-1, keepdim=True)                                           # [batch, 1, query, 1]
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~rows, 0.0)   # masked keys: exp(-inf) = 0
    pattern = scores.softmax(dim=-1) * allowed                                     # padded query rows exactly 0
    if site is not None:
        pattern = site.pattern(pattern, allowed)                                   # [batch, head, query, key]
    probs = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(probs, value)                                               # [batch, head, query, d_head]
    return out.transpose(1, 2).contiguous(), pattern                               # [batch, query, head, d_head]


def register_seq2seq_attention() -> None:
    """Register `seq2seq_probs_attention` and a boolean mask under "attnaudit_seq2seq" (idempotent)."""
    register_under(SEQ2SEQ_ATTENTION, seq2seq_probs_attention)
