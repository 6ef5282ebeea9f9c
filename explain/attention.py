"""Raw attention weights (Bahdanau et al. 2015; Jain & Wallace 2019) and attention norms (Kobayashi et al. 2020).

`attention` reads the probabilities A of one layer (or the layer mean), one head (or the head mean/max) and
one query row (the [CLS] row, or the mean/max over real rows). `attention_norm` follows Kobayashi et al.
2020, "Attention is Not Only a Weight: Analyzing Transformers with Vector Norms": the contribution of key k
to query q is the vector α_{h,q,k}·f_h(x_k), with f_h(x_k) = W^O_h (x_k W^V_h + b^V_h) the value mapped
through head h's slice of W^O, and the score is its norm; by default the heads are summed as vectors first,
‖Σ_h α_{h,q,k} f_h(x_k)‖, the paper's quantity.

    >>> attention_scores(patterns, mask, layer="last", head="mean", readout="cls")   # -> [batch, key]
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnaudit.explain.base import check_choice
from attnaudit.explain.capture import AttentionExplainer, Capture, Fold, Reads, values_site
from attnaudit.model.interface import Batch, ExplainableModel

READOUTS = ("cls", "mean", "max")


# -- checks shared by the attention explainers -----------------------------------------------------------
def check_index(name: str, value, count: int, words: Sequence[str], unit: str) -> None:
    """`value` must be an int in [0, count - 1] or one of `words` (e.g. layer, 'last' or 'mean')."""
    ok = (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count) or \
        (isinstance(value, str) and value in words)
    if not ok:
        options = " or ".join([", ".join([f"an int in [0, {count - 1}]", *map(repr, words[:-1])]), repr(words[-1])])
        raise ValueError(f"{name} must be {options}; got {value!r} (this model has {count} {unit}).")


def check_layer(layer, model: ExplainableModel, *, name: str = "layer") -> None:
    check_index(name, layer, model.n_layers, ("last", "mean"), "layers")


def read_layers(layer: int | str, n_layers: int) -> tuple[int, ...]:
    """The layers an explainer of `layer` (an index, "last" or "mean") reads: one, or all of them."""
    return tuple(range(n_layers)) if layer == "mean" else (layer_index(layer, n_layers),)


# -- reductions ----------------------------------------------------------------------------------------
def layer_index(layer: int | str, n_layers: int) -> int:
    """The index of `layer`, an int or "last" (of `n_layers`); "mean" and other words have none."""
    if layer == "last":
        return n_layers - 1
    if isinstance(layer, str):
        raise ValueError(f"layer must be an int or 'last' here; got {layer!r}.")
    return layer


def pick_layer(per_layer: Tensor, layer: int | str) -> Tensor:
    """[layer, ...] -> [...]: one layer by index, the last one, or the mean over layers."""
    if layer == "mean":
        return per_layer.mean(0)
    return per_layer[layer_index(layer, per_layer.shape[0])]


def pick_head(per_head: Tensor, head: int | str) -> Tensor:
    """[batch, head, query, key] -> [batch, query, key]: one head, or the mean/max over heads."""
    if head == "mean":
        return per_head.mean(1)
    if head == "max":
        return per_head.amax(1)
    if isinstance(head, str):
        raise ValueError(f"head must be an int, 'mean' or 'max'; got {head!r}.")
    return per_head[:, head]


def read_out(matrix: Tensor, attention_mask: Tensor, readout: str, rows: Tensor | None = None) -> Tensor:
    """[batch, query, key] -> [batch, key]: the prediction's row, or the mean/max over real query rows.

    "cls" reads the row the model's prediction comes from: query 0 ([CLS]) for encoders, or `rows` [batch]
    (`Capture.readout_rows`: the last real token of a decoder).
    """
    mask = attention_mask.to(matrix.device)                                       # [batch, seq]
    if readout == "cls":
        row = matrix[:, 0] if rows is None else \
            matrix[torch.arange(matrix.shape[0], device=matrix.device), rows.to(matrix.device)]   # [batch, key]
    elif readout == "mean":
        real = mask[:, :, None].to(matrix.dtype)                                  # [batch, query, 1]
        row = (matrix * real).sum(1) / real.sum(1).clamp_min(1.0)                 # [batch, key]
    else:
        row = matrix.masked_fill(~mask[:, :, None], float("-inf")).amax(1)        # [batch, key]
    return row.masked_fill(~mask, 0.0)                                            # padded keys score 0


def attention_scores(patterns: Tensor, attention_mask: Tensor, *, layer: int | str = "last",
                     head: int | str = "mean", readout: str = "cls", rows: Tensor | None = None) -> Tensor:
    """Raw attention per key: readout(head(layer(patterns))).

    Args:
        patterns: [layer, batch, head, query, key]; attention_mask: [batch, seq] bool.
        layer: an index, "last" or "mean"; head: an index, "mean" or "max"; readout: "cls", "mean" or "max".
    Returns:
        [batch, key], 0 on padding.
    """
    per_head = pick_layer(patterns, layer)                                        # [batch, head, query, key]
    return read_out(pick_head(per_head, head), attention_mask, readout, rows)     # [batch, key]


def norm_matrix(pattern: Tensor, values: Tensor, w_o: Tensor, head: int | str) -> Tensor:
    """Kobayashi et al.'s ‖α·f(x)‖ for every (query, key) of one layer -> [batch, query, key].

    Args:
        pattern: [batch, head, query, key]; values: [batch, head, key, d_head] (x W^V + b^V, by head);
        w_o: [d_model, head, d_head], W^O split by head.
        head: "sum" = ‖Σ_h α_h f_h(x_k)‖ (the paper), "mean" = mean_h ‖α_h f_h(x_k)‖, or one head's index.
    """
    f = torch.einsum("mhd,bhkd->bhkm", w_o, values)                               # [batch, head, key, d_model]
    if head == "sum":
        mixed = torch.einsum("bhqk,bhkm->bqkm", pattern, f)                       # [batch, query, key, d_model]
        return mixed.norm(dim=-1)                                                 # [batch, query, key]
    per_head = pattern * f.norm(dim=-1)[:, :, None, :]                            # α >= 0: ‖α f‖ = α‖f‖
    return per_head.mean(1) if head == "mean" else per_head[:, head]              # [batch, query, key]


def norm_scores(patterns: Tensor, values: Tensor, output_weights: Tensor, attention_mask: Tensor, *,
                layer: int | str = "last", head: int | str = "sum", readout: str = "cls",
                rows: Tensor | None = None) -> Tensor:
    """Attention norms per key -> [batch, key] (see `norm_matrix`; layer "mean" averages the layers' norms).

    Args:
        patterns: [layer, batch, head, query, key]; values: [layer, batch, head, key, d_head];
        output_weights: [layer, d_model, head, d_head]; attention_mask: [batch, seq] bool.
    """
    n_layers = patterns.shape[0]
    layers = range(n_layers) if layer == "mean" else [layer_index(layer, n_layers)]
    per_layer = torch.stack([norm_matrix(patterns[i], values[i], output_weights[i], head) for i in layers])
    return read_out(per_layer.mean(0), attention_mask, readout, rows)             # [batch, key]


class NormFold(Fold):
    """`norm_matrix` of each of `layers` as the forward reaches it -> [layer, batch, query, key] (as `norm_scores`)."""

    values = True
    batch_dim = 1

    def __init__(self, head: int | str, layers: tuple[int, ...]):
        self.head = head
        super().__init__(layers)

    def reset(self) -> None:
        self.per_layer: list[Tensor] = []

    @property
    def key(self):
        return ("attention_norm", self.head, self.layers)

    def forward(self, layer: int, pattern: Tensor, mask: Tensor, values: Tensor | None, w_o: Tensor | None) -> None:
        assert values is not None and w_o is not None                    # `values = True`: capture passes both
        self.per_layer.append(norm_matrix(pattern, values, w_o, self.head))   # [batch, query, key]

    def result(self) -> Tensor:
        return torch.stack(self.per_layer)


# -- explainers ----------------------------------------------------------------------------------------
class RawAttention(AttentionExplainer):
    """Raw attention: one layer (or the mean), one head (or mean/max), the [CLS] row or mean/max over rows."""

    name = "attention"

    def __init__(self, *, layer: int | str = "last", head: int | str = "mean", readout: str = "cls"):
        self.layer = layer
        self.head = head
        self.readout = readout

    def validate(self, model: ExplainableModel) -> None:
        check_layer(self.layer, model)
        check_index("head", self.head, model.n_heads, ("mean", "max"), "heads")
        check_choice("readout", self.readout, READOUTS)

    def reads(self, model: ExplainableModel) -> Reads:
        return Reads(patterns=frozenset(read_layers(self.layer, len(model.attention_sites))))

    def from_capture(self, capture: Capture, batch: Batch, target: Tensor) -> Tensor:
        if self.layer != "mean":                   # one layer: the same tensor pick_layer takes from the stack
            per_head = capture.pattern(layer_index(self.layer, capture.n_layers))   # [batch, head, query, key]
            return read_out(pick_head(per_head, self.head), capture.attention_mask, self.readout, capture.readout_rows)
        return attention_scores(capture.patterns, capture.attention_mask, layer=self.layer, head=self.head,
                                readout=self.readout, rows=capture.readout_rows)


class AttentionNorm(AttentionExplainer):
    """Norm of the attention-weighted, W^O-mapped value vectors (Kobayashi et al. 2020)."""

    name = "attention_norm"

    def __init__(self, *, layer: int | str = "last", head: int | str = "sum", readout: str = "cls"):
        self.layer = layer
        self.head = head
        self.readout = readout

    def validate(self, model: ExplainableModel) -> None:
        check_layer(self.layer, model)
        check_index("head", self.head, model.n_heads, ("sum", "mean"), "heads")
        check_choice("readout", self.readout, READOUTS)
        points = model.hook_points()
        missing = [values_site(s) for s in model.attention_sites if values_site(s) not in points]
        if missing:
            raise ValueError(f"attention_norm needs the value vectors at the hook site {missing[0]!r}, which this "
                             "model does not have; expose a `values` site beside each attention `pattern` site.")

    def reads(self, model: ExplainableModel) -> Reads:
        return Reads(folds=(NormFold(self.head, read_layers(self.layer, len(model.attention_sites))),))

    def from_capture(self, capture: Capture, batch: Batch, target: Tensor) -> Tensor:
        folded = capture.folds.get(NormFold(self.head, read_layers(self.layer, capture.n_layers)).key)
        if folded is not None:                                            # [layer, batch, query, key]
            return read_out(folded.mean(0), capture.attention_mask, self.readout, capture.readout_rows)
        if capture.values is None or capture.output_weights is None:       # both or neither (`capture`)
            raise ValueError("attention_norm needs a capture with value vectors; this model exposes none.")
        return norm_scores(capture.patterns, capture.values, capture.output_weights, capture.attention_mask,
                           layer=self.layer, head=self.head, readout=self.readout, rows=capture.readout_rows)
