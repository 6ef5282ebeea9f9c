"""Gradient-weighted attention (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for
Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV) and plain attention × gradient.

grad_attention, the paper's self-attention rule (eqs. 5-6): per layer Ā = mean_h((∇A ⊙ A)⁺) with
∇A = d(logit of target)/dA, accumulated from R = I as R ← R + Ā·R over the layers; the score of token k is
R[cls, k], with the [CLS] self entry R[cls, cls] set to 0 (it is 1 + ... by construction, not evidence).
attention_x_grad: A ⊙ ∇A of one layer (or the layer mean), heads averaged, the [CLS] row (signed).

    >>> relevance = grad_attention_relevance(patterns, grads, mask)   # -> [batch, query, key]
"""
from __future__ import annotations

import torch
from torch import Tensor

from attnaudit.explain.attention import check_layer, pick_layer, read_layers, read_out
from attnaudit.explain.capture import AttentionExplainer, Capture, Fold, Reads
from attnaudit.model.interface import Batch, ExplainableModel


def grad_attention_relevance(patterns: Tensor, grads: Tensor, attention_mask: Tensor) -> Tensor:
    """Chefer et al.'s relevance map R after the last layer.

    Args:
        patterns, grads: [layer, batch, head, query, key]: A and d(logit of target)/dA.
        attention_mask: [batch, seq] bool.
    Returns:
        [batch, query, key]; padded rows and columns 0.
    """
    mask = attention_mask.to(patterns.device)
    relevance = torch.diag_embed(mask.to(patterns.dtype))                        # [batch, query, key], I on real
    for layer in range(patterns.shape[0]):
        a_bar = (grads[layer] * patterns[layer]).clamp_min(0).mean(1)             # [batch, query, key], eq. 5
        relevance = relevance + a_bar @ relevance                                 # R ← R + Ā·R, eq. 6
    return relevance


def accumulate(a_bars: list[Tensor], attention_mask: Tensor) -> Tensor:
    """R ← R + Ā·R over the layers' Ā [batch, query, key] from R = I (eq. 6) -> [batch, query, key]."""
    mask = attention_mask.to(a_bars[0].device)
    relevance = torch.diag_embed(mask.to(a_bars[0].dtype))                       # [batch, query, key], I on real
    for a_bar in a_bars:
        relevance = relevance + a_bar @ relevance                                 # R ← R + Ā·R, eq. 6
    return relevance


def cls_row(relevance: Tensor, attention_mask: Tensor, rows: Tensor | None = None) -> Tensor:
    """The prediction's row of the relevance map without its self entry -> [batch, key].

    The row is [CLS] (query 0), or `rows` [batch] (a decoder's last real token, `Capture.readout_rows`).
    """
    index = torch.zeros(relevance.shape[0], dtype=torch.long) if rows is None else rows.long().cpu()
    batch = torch.arange(relevance.shape[0])
    row = relevance[batch, index.to(relevance.device)].clone()                    # [batch, key]
    row[batch, index.to(relevance.device)] = 0.0                                  # R[cls, cls] := 0
    return row.masked_fill(~attention_mask.to(row.device), 0.0)


def grad_attention_scores(patterns: Tensor, grads: Tensor, attention_mask: Tensor,
                          rows: Tensor | None = None) -> Tensor:
    """The prediction's row of the relevance map without its self entry -> [batch, key] (see `cls_row`)."""
    return cls_row(grad_attention_relevance(patterns, grads, attention_mask), attention_mask, rows)


def captured_grads(capture: Capture, name: str) -> Tensor:
    """capture.grads [layer, batch, head, query, key]; a capture made without them is refused."""
    if capture.grads is None:
        raise ValueError(f"{name} needs a capture with the attention gradients: capture(..., grads=True).")
    return capture.grads


class GradFold(Fold):
    """A per-layer product of dA and A, reduced in the backward as each layer's gradient arrives, so that neither
    the L gradients nor their stack are kept -> [layer, batch, query, key] in layer order.

    kind "chefer": Ā = mean_h((∇A ⊙ A)⁺) (eq. 5, as `grad_attention_relevance`); "product": mean_h(A ⊙ ∇A) (as
    `AttentionXGrad`).
    """

    grads = True

    def __init__(self, kind: str, layers: tuple[int, ...]):
        self.kind = kind
        super().__init__(layers)

    def reset(self) -> None:
        self.per_layer: dict[int, Tensor] = {}

    @property
    def key(self):
        return ("grad_fold", self.kind, self.layers)

    def backward(self, layer: int, pattern: Tensor, grad: Tensor, mask: Tensor) -> None:
        if self.kind == "chefer":
            self.per_layer[layer] = (grad * pattern).clamp_min(0).mean(1)         # [batch, query, key], eq. 5
        else:
            self.per_layer[layer] = (pattern[None] * grad[None]).mean(2)[0]       # [batch, query, key]

    def result(self) -> list[Tensor]:
        return [self.per_layer[i] for i in self.layers]


class GradAttention(AttentionExplainer):
    """Chefer et al. 2021: positive gradient-weighted attention, accumulated across layers."""

    name = "grad_attention"
    needs_grads = True

    def __init__(self):
        pass

    def reads(self, model: ExplainableModel) -> Reads:
        return Reads(folds=(GradFold("chefer", tuple(range(len(model.attention_sites)))),))

    def from_capture(self, capture: Capture, batch: Batch, target: Tensor) -> Tensor:
        a_bars = capture.folds.get(GradFold("chefer", tuple(range(capture.n_layers))).key)
        if a_bars is not None:
            return cls_row(accumulate(a_bars, capture.attention_mask), capture.attention_mask, capture.readout_rows)
        return grad_attention_scores(capture.patterns, captured_grads(capture, self.name), capture.attention_mask,
                                     capture.readout_rows)


class AttentionXGrad(AttentionExplainer):
    """A ⊙ dlogit/dA of one layer (index, "last" or "mean"), heads averaged, the [CLS] row."""

    name = "attention_x_grad"
    needs_grads = True

    def __init__(self, *, layer: int | str = "last"):
        self.layer = layer

    def validate(self, model: ExplainableModel) -> None:
        check_layer(self.layer, model)

    def reads(self, model: ExplainableModel) -> Reads:
        return Reads(folds=(GradFold("product", read_layers(self.layer, len(model.attention_sites))),))

    def from_capture(self, capture: Capture, batch: Batch, target: Tensor) -> Tensor:
        folded = capture.folds.get(GradFold("product", read_layers(self.layer, capture.n_layers)).key)
        if folded is not None:                     # the layers pick_layer reads, each as in the stacked product
            picked = folded[0] if self.layer != "mean" else torch.stack(folded).mean(0)  # [batch, query, key]
            return read_out(picked, capture.attention_mask, "cls", capture.readout_rows)
        per_layer = (capture.patterns * captured_grads(capture, self.name)).mean(2)  # [layer, batch, query, key]
        return read_out(pick_layer(per_layer, self.layer), capture.attention_mask, "cls", capture.readout_rows)   # [batch, key]
