"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", ACL).

Each layer's heads are fused (mean, max or min), the residual connection is modelled by adding the identity,
Â_l = norm_rows(0.5·A_l + 0.5·I), and the layers are multiplied bottom-up from a start layer:
R_l = Â_l · R_{l-1}, with R_{start-1} = I. Row q of R_l says how much of token q's representation after layer
l comes from each input token; rows of real tokens sum to 1. Padding carries no mass: the identity is added
on real positions only, so padded rows and columns stay 0.

    >>> r = rollout(patterns)            # [layer, batch, head, query, key] -> [layer, batch, query, key]
    >>> scores = r[-1, :, 0]             # the [CLS] row after the last layer -> [batch, key]
"""
from __future__ import annotations

import torch
from torch import Tensor

from attnaudit.explain.attention import READOUTS, read_out
from attnaudit.explain.base import check_choice
from attnaudit.explain.capture import AttentionExplainer, Capture, Fold, Reads
from attnaudit.model.interface import Batch, ExplainableModel

HEAD_FUSIONS = ("mean", "max", "min")


def real_positions(patterns: Tensor) -> Tensor:
    """[batch, seq] bool inferred from patterns [layer, batch, head, query, key]: rows holding any mass."""
    return patterns.sum(-1).amax(dim=(0, 2)) > 0


def check_discard_ratio(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"discard_ratio must be a number in [0, 1) (the fraction of each layer's smallest fused "
                         f"weights set to 0, as vit-explain); got {value!r}.")


def discard_lowest(fused: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """vit-explain's discard (Gildenblat's `rollout`, `discard_ratio`): per layer and example, the int(ratio · n²)
    smallest fused weights among its n × n real entries set to 0, never the first query's first key (vit-explain
    keeps flat index 0, the [CLS]→[CLS] weight). fused [layer, batch, query, key] -> the same, padding still 0."""
    out = fused.clone()
    for b, n in enumerate(mask.sum(-1).tolist()):
        block = out[:, b, :n, :n].reshape(out.shape[0], n * n)                     # [layer, n²] real entries
        k = int(n * n * ratio)
        if k == 0:
            continue
        drop = torch.zeros_like(block, dtype=torch.bool)
        drop.scatter_(-1, block.topk(k, -1, largest=False).indices, True)          # the k smallest per layer
        drop[:, 0] = False
        out[:, b, :n, :n] = block.masked_fill(drop, 0.0).view(out.shape[0], n, n)
    return out


def residual_attention(patterns: Tensor, attention_mask: Tensor | None = None, *, head_fusion: str = "mean",
                       add_residual: bool = True, discard_ratio: float = 0.0) -> Tensor:
    """Fuse heads and add the residual: norm_rows(0.5·A + 0.5·I) on real positions.

    Args:
        patterns: [layer, batch, head, query, key], real rows summing to 1.
        attention_mask: [batch, seq] bool; None infers it (rows with any mass are real).
        head_fusion: "mean", "max" or "min" over heads.
        add_residual: add the identity before renormalising (False: only renormalise the fused rows).
        discard_ratio: before the residual, zero this fraction of each layer's smallest fused weights
            (`discard_lowest`, vit-explain's option; 0 = none, Abnar & Zuidema).
    Returns:
        [layer, batch, query, key]: real rows sum to 1; padded rows and columns are 0.
    """
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    mask = real_positions(patterns) if attention_mask is None else attention_mask.to(patterns.device)
    if head_fusion == "mean":
        fused = patterns.mean(2)                                                   # [layer, batch, query, key]
    else:
        fused = patterns.amax(2) if head_fusion == "max" else patterns.amin(2)     # [layer, batch, query, key]
    real = mask[:, :, None] & mask[:, None, :]                                    # [batch, query, key]
    fused = fused * real                                                          # nothing to or from padding
    if discard_ratio:
        fused = discard_lowest(fused, mask, discard_ratio)
    if add_residual:
        eye = torch.diag_embed(mask.to(fused.dtype))                              # [batch, query, key], I on real
        fused = 0.5 * fused + 0.5 * eye                                           # 0.5·A + 0.5·I
    total = fused.sum(-1, keepdim=True)                                           # [layer, batch, query, 1]
    return torch.where(total > 0, fused / total.clamp_min(1e-30), fused)          # padded rows stay 0


def rollout(patterns: Tensor, *, add_residual: bool = True, head_fusion: str = "mean", start_layer: int = 0,
            attention_mask: Tensor | None = None, discard_ratio: float = 0.0) -> Tensor:
    """Accumulate attention across layers: R_l = Â_l · R_{l-1} from `start_layer`.

    Args:
        patterns: [layer, batch, head, query, key], real rows summing to 1.
        add_residual: model the residual connection (the paper's 0.5·(A + I)).
        head_fusion: "mean", "max" or "min" over heads.
        start_layer: first layer multiplied in; earlier entries of the result are the identity.
        attention_mask: [batch, seq] bool; None infers it from the patterns.
        discard_ratio: vit-explain's discard of each layer's smallest fused weights (`residual_attention`).
    Returns:
        [layer, batch, query, key]: the rollout up to and including each layer (real rows sum to 1).
    """
    n_layers = patterns.shape[0]
    if not (isinstance(start_layer, int) and not isinstance(start_layer, bool) and 0 <= start_layer < n_layers):
        raise ValueError(f"start_layer must be an int in [0, {n_layers - 1}]; got {start_layer!r} "
                         f"(the patterns have {n_layers} layers).")
    mask = real_positions(patterns) if attention_mask is None else attention_mask.to(patterns.device)
    a_hat = residual_attention(patterns, mask, head_fusion=head_fusion, add_residual=add_residual,
                               discard_ratio=discard_ratio)
    joint = torch.diag_embed(mask.to(a_hat.dtype))                                # [batch, query, key] = I on real
    out = []
    for layer in range(n_layers):
        if layer >= start_layer:
            joint = a_hat[layer] @ joint                                          # R_l = Â_l · R_{l-1}
        out.append(joint)
    return torch.stack(out)                                                       # [layer, batch, query, key]


class ResidualFold(Fold):
    """`residual_attention` of each layer as the forward reaches it (in float64 when `double`, as flow reads it)
    -> [layer, batch, query, key]: heads fused as each layer passes, so the patterns are never all kept."""

    batch_dim = 1

    def __init__(self, layers: tuple[int, ...], *, head_fusion: str = "mean", add_residual: bool = True,
                 double: bool = False):
        self.head_fusion, self.add_residual, self.double = head_fusion, add_residual, double
        super().__init__(layers)

    def reset(self) -> None:
        self.per_layer: list[Tensor] = []

    @property
    def key(self):
        return ("residual_attention", self.layers, self.head_fusion, self.add_residual, self.double)

    def forward(self, layer: int, pattern: Tensor, mask: Tensor, values: Tensor | None, w_o: Tensor | None) -> None:
        pattern = pattern.double() if self.double else pattern                   # [batch, head, query, key]
        a_hat = residual_attention(pattern[None], mask, head_fusion=self.head_fusion, add_residual=self.add_residual)
        self.per_layer.append(a_hat[0])                                           # [batch, query, key]

    def result(self) -> Tensor:
        return torch.stack(self.per_layer)                                        # [layer, batch, query, key]


class RolloutFold(Fold):
    """Rollout folded into the forward: R_l = Â_l · R_{l-1} as layer l is reached -> R_{L-1} [batch, query, key].

    One [batch, seq, seq] product is kept instead of the L patterns; the operations are `rollout`'s, layer by layer.
    """

    def __init__(self, n_layers: int, *, head_fusion: str, add_residual: bool, start_layer: int,
                 discard_ratio: float = 0.0):
        self.head_fusion, self.add_residual, self.start_layer = head_fusion, add_residual, start_layer
        self.discard_ratio = discard_ratio
        super().__init__(tuple(range(n_layers)))

    def reset(self) -> None:
        self.joint: Tensor | None = None

    @property
    def key(self):
        return ("rollout", self.layers, self.head_fusion, self.add_residual, self.start_layer, self.discard_ratio)

    def forward(self, layer: int, pattern: Tensor, mask: Tensor, values: Tensor | None, w_o: Tensor | None) -> None:
        a_hat = residual_attention(pattern[None], mask, head_fusion=self.head_fusion, add_residual=self.add_residual,
                                   discard_ratio=self.discard_ratio)[0]           # [batch, query, key]
        if self.joint is None:
            self.joint = torch.diag_embed(mask.to(a_hat.dtype))                   # R_{start-1} = I on real
        if layer >= self.start_layer:
            self.joint = a_hat @ self.joint                                       # R_l = Â_l · R_{l-1}

    def result(self) -> Tensor | None:
        return self.joint


class Rollout(AttentionExplainer):
    """Attention rollout (Abnar & Zuidema 2020): multiply residual-augmented patterns across layers.

    Args:
        add_residual, head_fusion, start_layer: as `rollout`.
        readout: which row of the rollout explains the prediction: "cls" (default: the prediction's row, [CLS]
            or a decoder's last real token), "mean" over the real query rows, or "max" over them (the readout of
            Abnar & Zuidema's correlation script, which takes the max over query rows).
        discard_ratio: vit-explain's (Gildenblat 2020) option: each layer's smallest fused weights, this
            fraction of them, set to 0 before the residual (`discard_lowest`); 0 (default) = the paper's rollout.
    """

    name = "rollout"

    def __init__(self, *, add_residual: bool = True, head_fusion: str = "mean", start_layer: int = 0,
                 readout: str = "cls", discard_ratio: float = 0.0):
        self.add_residual = add_residual
        self.head_fusion = head_fusion
        self.start_layer = start_layer
        self.readout = readout
        self.discard_ratio = discard_ratio

    def validate(self, model: ExplainableModel) -> None:
        if not isinstance(self.add_residual, bool):
            raise ValueError(f"add_residual must be True or False; got {self.add_residual!r}.")
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)
        if not (isinstance(self.start_layer, int) and not isinstance(self.start_layer, bool)
                and 0 <= self.start_layer < model.n_layers):
            raise ValueError(f"start_layer must be an int in [0, {model.n_layers - 1}]; got {self.start_layer!r} "
                             f"(this model has {model.n_layers} layers).")
        check_choice("readout", self.readout, READOUTS)
        check_discard_ratio(self.discard_ratio)

    def fold(self, n_layers: int) -> RolloutFold:
        return RolloutFold(n_layers, head_fusion=self.head_fusion, add_residual=self.add_residual,
                           start_layer=self.start_layer, discard_ratio=self.discard_ratio)

    def reads(self, model: ExplainableModel) -> Reads:
        return Reads(folds=(self.fold(len(model.attention_sites)),))

    def from_capture(self, capture: Capture, batch: Batch, target: Tensor) -> Tensor:
        folded = capture.folds.get(self.fold(capture.n_layers).key)
        if folded is not None:                                                    # R_{L-1} [batch, query, key]
            return read_out(folded, capture.attention_mask, self.readout, capture.readout_rows)
        joint = rollout(capture.patterns, add_residual=self.add_residual, head_fusion=self.head_fusion,
                        start_layer=self.start_layer, attention_mask=capture.attention_mask,
                        discard_ratio=self.discard_ratio)
        return read_out(joint[-1], capture.attention_mask, self.readout, capture.readout_rows)          # [batch, key]
