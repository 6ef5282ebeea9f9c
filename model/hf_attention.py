"""The attention function HuggingFace models run under attnaudit: softmax written out, through our hook sites.

Registered in transformers' `AttentionInterface` under the name "attnaudit" (`register_attention`):
softmax(Q·Kᵀ/√d_head + mask) written out (Vaswani et al. 2017, eq. 1), the probabilities routed through the
HookPoint ``encoder.layers.{i}.self_attn.pattern`` (``decoder.layers.{i}.self_attn.pattern`` for decoder-only
models, causal; and the value vectors through ``...values``) of the `HFClassifier` whose forward is running (`_ACTIVE`), so `record`, `recording`, `hooks` and the edits of
`attnaudit.model.interventions` work as on the built-in model. Padded keys get exactly 0 and padded query rows
are all 0, as in `model/attention.py`.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnaudit.model.hf_load import transformers_module
from attnaudit.model.hooks import HookPoint
from attnaudit.model.precision import attention_softmax

ATTENTION = "attnaudit"                       # our name in transformers' AttentionInterface


@dataclass
class _Forward:
    """One forward through the adapter: the hook sites by layer, and the attention modules in call order."""

    sites: list[tuple[HookPoint, HookPoint]]
    modules: list[nn.Module] = field(default_factory=list)
    masks: tuple | None = None      # (transformers' mask, its AttentionMasks): every layer gets the same mask

    def next_site(self, module: nn.Module) -> tuple[HookPoint, HookPoint]:
        layer = len(self.modules)
        if layer >= len(self.sites):
            raise RuntimeError(f"the model ran more than {len(self.sites)} self-attention calls in one forward; "
                               "attnaudit supports encoder classifiers with one self-attention per layer.")
        self.modules.append(module)
        return self.sites[layer]


_ACTIVE: contextvars.ContextVar[_Forward | None] = contextvars.ContextVar("attnaudit_hf_forward", default=None)


def allowed_pairs(mask: Tensor | None, batch: int, n_query: int, n_key: int, device) -> Tensor:
    """transformers' 4-D mask (bool, additive float or None) -> allowed (query, key) pairs [batch, 1, query, key].

    transformers masks keys only; like `padding_allowed` in model/transformer.py, a padded query (one that may
    not attend its own position) is allowed nothing, so its row of probabilities is exactly 0.
    """
    if mask is None:
        keys = torch.ones(batch, 1, n_query, n_key, dtype=torch.bool, device=device)
    elif mask.dtype == torch.bool:
        keys = mask
    else:
        keys = mask > torch.finfo(mask.dtype).min / 2                             # additive: 0 kept, dtype-min masked
    keys = keys[:, :1].expand(batch, 1, n_query, n_key)                           # [batch, 1, query, key]
    if n_query != n_key:
        return keys
    real_query = keys.diagonal(dim1=-2, dim2=-1)                                  # [batch, 1, query]
    return keys & real_query[..., None]                                           # [batch, 1, query, key]


@dataclass(frozen=True)
class AttentionMasks:
    """What one forward's mask means to the softmax, built once and shared by its layers.

    allowed [batch, 1, query, key] bool (`allowed_pairs`); bias [batch, 1, query, key] float: the additive mask as
    given on allowed pairs (0 for a bool mask), -inf elsewhere, 0 across a row with nothing allowed (so its
    softmax has no NaN); rows [batch, 1, query, 1] float, 1 where a row allows something, or None if all do;
    empty: the (batch, query) indices of the rows that allow nothing (padded queries), None if there are none.
    """

    allowed: Tensor
    bias: Tensor
    rows: Tensor | None
    empty: tuple[Tensor, Tensor] | None


def attention_masks(mask: Tensor | None, batch: int, n_query: int, n_key: int, dtype: torch.dtype,
                    device) -> AttentionMasks:
    """`AttentionMasks` of transformers' 4-D mask (bool, additive float or None) for scores of `dtype`."""
    allowed = allowed_pairs(mask, batch, n_query, n_key, device)                 # [batch, 1, query, key]
    rows = allowed.any(-1, keepdim=True)                                         # [batch, 1, query, 1]
    given = mask.to(dtype) if mask is not None and mask.dtype != torch.bool else torch.zeros((), dtype=dtype,
                                                                                              device=device)
    bias = torch.where(allowed, given, float("-inf")).masked_fill(~rows, 0.0)    # [batch, 1, query, key]
    if bool(rows.all()):
        return AttentionMasks(allowed, bias, None, None)
    batch_index, query_index = (~rows[:, 0, :, 0]).nonzero(as_tuple=True)       # the rows that allow nothing
    return AttentionMasks(allowed, bias, rows.to(dtype), (batch_index, query_index))


def eager_probs_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' attention signature: query/key/value [batch, head, seq, d_head] -> (output, probabilities).

    The output is [batch, query, head, d_head], the probabilities [batch, head, query, key]. Grouped
    key/value heads (fewer than the query heads) are repeated first (`repeat_kv`), so the pattern and the values
    are per query head.

    Outside an `HFClassifier` forward it computes the same softmax with no hook sites.
    """
    run = _ACTIVE.get()
    site = run.next_site(module) if run is not None else None
    b, n_heads, n_q, d_head = query.shape
    key, value = repeat_kv(key, n_heads), repeat_kv(value, n_heads)               # [batch, head, key, d_head]
    if run is not None and run.masks is not None and run.masks[0] is attention_mask:
        masks = run.masks[1]                                                       # built by the first layer
    else:
        masks = attention_masks(attention_mask, b, n_q, key.shape[2], query.dtype, query.device)
        if run is not None:
            run.masks = (attention_mask, masks)
    allowed = masks.allowed                                                        # [batch, 1, query, key]
    if site is not None:
        value = site[1](value, allowed)                                            # [batch, head, key, d_head]
    scale = d_head ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale                      # [batch, head, query, key]
    pattern = attention_softmax(scores + masks.bias)                               # masked keys: exp(-inf) = 0
    if masks.rows is not None and pattern.requires_grad:
        pattern = pattern * masks.rows                                             # padded query rows exactly 0
    elif masks.rows is not None:
        pattern[masks.empty[0], :, masks.empty[1]] = 0.0                           # the same, on those rows only
    if site is not None:
        pattern = site[0](pattern, allowed)                                        # [batch, head, query, key]
    probs = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(probs, value)                                               # [batch, head, query, d_head]
    return out.transpose(1, 2).contiguous(), pattern                               # [batch, query, head, d_head]


def repeat_kv(states: Tensor, n_heads: int) -> Tensor:
    """Grouped-query attention: key/value heads [batch, kv_head, key, d_head] -> one per query head [batch, head, key, d_head].

    Query head h reads key/value head h // (n_heads // kv_head), as transformers' `repeat_kv`
    (Llama, Qwen2, Mistral with num_key_value_heads < num_attention_heads); unchanged when they are equal.
    """
    b, n_kv, n_key, d_head = states.shape
    if n_kv == n_heads:
        return states
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"grouped key/value heads must divide the query heads: {n_heads} query heads, "
                         f"{n_kv} key/value heads.")
    repeated = states[:, :, None].expand(b, n_kv, n_heads // n_kv, n_key, d_head)  # [batch, kv_head, group, key, d_head]
    return repeated.reshape(b, n_heads, n_key, d_head)                             # [batch, head, key, d_head]


def boolean_mask(*args, **kwargs):
    """transformers' mask factory for our attention: always a bool [batch, 1, query, key] (True = may attend).

    transformers passes the model's own mask function: bidirectional with padding for encoders, causal (and
    Mistral's sliding window) with padding for decoders; the skips that would return None are turned off.
    """
    from transformers.masking_utils import sdpa_mask

    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


def register_under(name: str, attention) -> None:
    """Register `attention` and `boolean_mask` in transformers' Attention(Mask)Interface under `name` (idempotent)."""
    tf = transformers_module()
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(f"transformers {tf.__version__} has no AttentionInterface / AttentionMaskInterface; "
                          "attnaudit needs transformers >= 5: pip install -U 'attnaudit[hf]'.") from e
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, boolean_mask)


def use_attention(net, name: str, config: dict) -> None:
    """Switch a transformers model to the attention registered under `name` (`register_under`), or raise.

    config: the adapter's provenance; its "architecture" and "transformers_version" word the errors.
    """
    if not hasattr(net, "set_attn_implementation"):
        raise ImportError(f"transformers {config['transformers_version']} cannot switch attention "
                          "implementations; attnaudit needs transformers >= 5: pip install -U 'attnaudit[hf]'.")
    net.set_attn_implementation(name)
    if net.config._attn_implementation != name:
        raise RuntimeError(f"{config['architecture']} refused the attention implementation {name!r} "
                           f"(it kept {net.config._attn_implementation!r}).")


def register_attention() -> None:
    """Register `eager_probs_attention` and its mask under "attnaudit" (idempotent)."""
    register_under(ATTENTION, eager_probs_attention)
