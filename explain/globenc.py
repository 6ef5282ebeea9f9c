"""GlobEnc (Modarressi, Fayyaz, Yaghoobzadeh & Pilehvar 2022, "GlobEnc: Quantifying Global Token Attribution by
Incorporating the Whole Encoder Layer in Transformers", NAACL): norm-based token attribution of each encoder
layer, residuals and LayerNorms included, rolled out across layers.

Per layer (post-LN, BERT's layout), with x the layer input, α^h the attention of head h, f_h(x_j) = W^O_h (x_j
W^V_h + b^V_h) (Kobayashi et al.'s transformed value, W^O's bias excluded) and y_i = x_i + attention_i the input
of the first LayerNorm (LN1, after the attention block):

    z_ij  = Σ_h α^h_ij f_h(x_j) + δ_ij x_i                       attention + residual; Σ_j z_ij = y_i - b^O
    z̃_ij  = γ1 ⊙ (z_ij - m(z_ij)) / s(y_i)                       LN1 decomposed linearly: each vector's own mean
                                                                  m(·) removed, divided by the std of the WHOLE
                                                                  sum s(y_i) = sqrt(Var(y_i) + ε1)
    Σ_j z̃_ij + γ1 ⊙ (b^O - m(b^O)) / s(y_i) + β1 = LN1(y_i)      (the biases go to no token)

`block="attention"` stops there (their N_ResLN, Kobayashi et al. 2021's "attention block"). `block="encoder"`
(the default: GlobEnc itself, the reference's ``output_globenc`` / the demo's N-Enc, ``norms[i][4]``) also
passes z̃ through the second residual and LayerNorm (LN2, after the FFN), the FFN itself LEFT OUT (its output,
like the biases, goes to no token; DecompX, Modarressi et al. 2023, decomposes it too):

    z̃²_ij = γ2 ⊙ (z̃_ij - m(z̃_ij)) / s(y2_i)                     y2_i = FFN(a_i) + a_i, a_i = LN1(y_i)

The layer's matrix is N_ij = ‖z̃_ij‖ (or ‖z̃²_ij‖), padded rows and columns 0; `normalize=True` (default) divides
each row by its sum, so that each layer's rows are a distribution, as rollout's; the reference code rolls out
the raw norms (its row normalisation is commented out): `normalize=False` reproduces that. The layers are
rolled out with no identity added (the residual is inside N): R_0 = N_0, R_l = N_l · R_{l-1}; the scores are
the prediction's row of R_{L-1} (`aggregation="rollout"`) or of N_{L-1} (`"last"`).

Checked against github.com/mohsenfayyaz/GlobEnc, src/modeling/modeling_bert.py (`BertNormOutput.forward`: the
transformed layer from ``dense.weight`` only, the residual ``torch.eye ⊗ hidden_states``, ``each_mean``, the
variance of ``pre_ln_states``, the product with ``LayerNorm.weight``; `BertLayer.forward`: the same with
``pre_ln2_states`` and ``self.output.LayerNorm``; `BertEncoder.forward`: the rollout
``einsum("ijk,ikm->ijm", norms, globenc_attributions)``, padded query rows masked).

Pre-LN (the built-in ``norm="pre"``: x + Attention(LN(x)), no LayerNorm on the residual stream inside the
layer): GlobEnc is defined for post-LN BERT. The adaptation here (DecompX's ``pre_layer_norm`` branch, which
skips the LayerNorm transform) is z_ij = Σ_h α^h_ij f_h(LN1(x)_j) + δ_ij x_i with no LayerNorm step: an exact
decomposition of the block's output (less b^O); both blocks give the same matrix, the FFN left out.

Models: the built-in TextClassifier and the built-in decoders (attnaudit.model.lm: the same blocks, causal, read at
the last real token), HuggingFace BERT, RoBERTa, ELECTRA (``attention.output.LayerNorm``, ``output.LayerNorm``),
DistilBERT (``sa_layer_norm``, ``output_layer_norm``) and ALBERT (``attention.LayerNorm``,
``full_layer_layer_norm``, the shared layer read once per call); `validate` refuses the rest (HF decoders: pre-LN
with RMSNorm or a final norm, not this layout).

Cost: one forward of the batch (patterns, values, layer inputs and LayerNorm inputs recorded); memory per example
n² · d_model floats for one layer at a time (n its real tokens).

    >>> GlobEnc().explain(model, ["a fine film"])
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnaudit.explain.attention import READOUTS, read_out
from attnaudit.explain.base import Explainer, check_choice
from attnaudit.explain.capture import values_site
from attnaudit.explain.mixing import joint_product, require_value_sites
from attnaudit.explain.value_zeroing import (
    AGGREGATIONS,
    check_supported,
    hf_model_type,
    layer_modules,
    normalize_rows,
)
from attnaudit.model.hooks import recording
from attnaudit.model.interface import Batch, ExplainableModel
from attnaudit.model.steps import readout_rows

BLOCKS = ("encoder", "attention")


@dataclass(frozen=True)
class LayerParts:
    """One encoder layer's modules: the layer (its first argument is the input x), LN1 and LN2 (None when pre-LN)."""

    layer: nn.Module
    ln1: nn.LayerNorm | None
    ln2: nn.LayerNorm | None


def layer_parts(model: ExplainableModel) -> list[LayerParts]:
    """Per layer, in call order: the layer module and its two post-LN LayerNorms (`LayerParts`)."""
    layers = layer_modules(model)
    kind = hf_model_type(model)
    out = []
    for layer in layers:
        m: Any = layer
        if kind is None:                                        # built-in EncoderLayer, or a decoder's CausalLayer
            attn_block = m.attn_block if hasattr(m, "attn_block") else m.self_block
            post = not attn_block.pre
            out.append(LayerParts(layer, attn_block.norm if post else None, m.ff_block.norm if post else None))
        elif kind == "distilbert":
            out.append(LayerParts(layer, m.sa_layer_norm, m.output_layer_norm))
        elif kind == "albert":
            out.append(LayerParts(layer, m.attention.LayerNorm, m.full_layer_layer_norm))
        else:                                                                  # bert, roberta, electra
            out.append(LayerParts(layer, m.attention.output.LayerNorm, m.output.LayerNorm))
    return out


@dataclass
class LayerCapture:
    """What one forward recorded for one layer (detached, the batch's padding kept).

    x: the layer input [batch, seq, d_model]; pattern [batch, head, query, key]; values [batch, head, key, d_head];
    w_o [d_model, head, d_head]; y1, y2: the inputs of LN1 and LN2 [batch, seq, d_model] (None when pre-LN);
    ln1, ln2: the LayerNorm modules (None when pre-LN).
    """

    x: Tensor
    pattern: Tensor
    values: Tensor
    w_o: Tensor
    y1: Tensor | None
    y2: Tensor | None
    ln1: nn.LayerNorm | None
    ln2: nn.LayerNorm | None


class _CallOrder:
    """Tensors seen by hooks on (possibly shared) modules, kept in call order per module."""

    def __init__(self) -> None:
        self.seen: dict[int, list[Tensor]] = {}

    def add(self, module: nn.Module, t: Tensor) -> None:
        self.seen.setdefault(id(module), []).append(t.detach())

    def nth(self, module: nn.Module, k: int) -> Tensor:
        return self.seen[id(module)][k]


@contextmanager
def _watching(parts: list[LayerParts], calls: _CallOrder) -> Iterator[None]:
    """Pre-hooks on the layers (their input x) and on the LayerNorms (their input y), inside the block only."""
    handles = []

    def on_input(module, args, kwargs):
        calls.add(module, args[0] if args else next(iter(kwargs.values())))

    modules: dict[int, nn.Module] = {}
    for p in parts:
        for m in (p.layer, p.ln1, p.ln2):
            if m is not None:
                modules[id(m)] = m
    try:
        for m in modules.values():
            handles.append(m.register_forward_pre_hook(on_input, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_layers(model: ExplainableModel, batch: Batch) -> list[LayerCapture]:
    """One forward -> a `LayerCapture` per layer."""
    parts = layer_parts(model)
    sites = list(model.attention_sites)
    names = sites + [values_site(s) for s in sites]
    calls = _CallOrder()
    dev = model.device
    with recording(model, names) as cache, _watching(parts, calls):
        model.logits(batch.input_ids.to(dev), batch.attention_mask.to(dev))
    used: dict[int, int] = {}
    out = []
    for layer, p in enumerate(parts):
        index = {}
        for m in (p.layer, p.ln1, p.ln2):
            if m is not None:
                index[id(m)] = used.get(id(m), 0)
                used[id(m)] = index[id(m)] + 1
        out.append(LayerCapture(
            x=calls.nth(p.layer, index[id(p.layer)]), pattern=cache[sites[layer]], values=cache[values_site(sites[layer])],
            w_o=model.output_weight(layer).detach(),
            y1=None if p.ln1 is None else calls.nth(p.ln1, index[id(p.ln1)]),
            y2=None if p.ln2 is None else calls.nth(p.ln2, index[id(p.ln2)]),
            ln1=p.ln1, ln2=p.ln2))
    return out


def layernorm_share(z: Tensor, y: Tensor, ln: nn.LayerNorm) -> Tensor:
    """GlobEnc's linear LayerNorm: γ ⊙ (z - m(z)) / sqrt(Var(y) + ε) for the parts z [q, k, d] of y [q, d]."""
    var = y.var(-1, unbiased=False)                                              # [q]
    scale = (var + ln.eps).rsqrt()[:, None, None]                                # [q, 1, 1]
    shifted = z - z.mean(-1, keepdim=True)
    return shifted * scale * ln.weight.detach() if ln.weight is not None else shifted * scale


def decompose(cap: LayerCapture, example: int, n: int, *, block: str = "encoder") -> Tensor:
    """The vectors z̃_ij (block "attention") or z̃²_ij ("encoder") of one example's first n (real) tokens -> [n, n, d]."""
    pattern = cap.pattern[example, :, :n, :n].float()                            # [head, q, k]
    values = cap.values[example, :, :n].float()                                  # [head, k, d_head]
    f = torch.einsum("mhd,hkd->hkm", cap.w_o.float(), values)                    # [head, k, d_model]
    z = torch.einsum("hqk,hkm->qkm", pattern, f)                                 # [q, k, d_model]
    eye = torch.arange(n, device=z.device)
    z[eye, eye] += cap.x[example, :n].float()                                    # + δ_ij x_i
    if cap.ln1 is None or cap.y1 is None:                                        # pre-LN: no LayerNorm to decompose
        return z
    z = layernorm_share(z, cap.y1[example, :n].float(), cap.ln1)
    if block == "encoder" and cap.ln2 is not None and cap.y2 is not None:
        z = layernorm_share(z, cap.y2[example, :n].float(), cap.ln2)
    return z


@torch.no_grad()
def globenc_matrices(model: ExplainableModel, batch: Batch, *, block: str = "encoder",
                     normalize: bool = True) -> Tensor:
    """N^l [layer, batch, query, key]: ‖z̃_ij‖ per layer (rows normalised with `normalize`); padding 0."""
    caps = capture_layers(model, batch)
    mask = batch.attention_mask
    b, seq = mask.shape
    lengths = mask.sum(1).tolist()
    out = torch.zeros(len(caps), b, seq, seq, device=caps[0].x.device)
    for layer, cap in enumerate(caps):
        for e, n in enumerate(lengths):
            out[layer, e, :n, :n] = decompose(cap, e, n, block=block).norm(dim=-1)
    return normalize_rows(out, mask) if normalize else out


class GlobEnc(Explainer):
    """GlobEnc (Modarressi et al. 2022): norms of each layer's token-wise decomposition with residuals and
    LayerNorms (the FFN left out), rolled out across layers.

    Args:
        block: "encoder" (GlobEnc's N_Enc: attention, residual, LN1, the second residual and LN2) or "attention"
            (N_ResLN: attention, residual, LN1).
        normalize: divide each layer's rows by their sums before the rollout (False: the raw norms, as the
            reference code's ``output_globenc``).
        aggregation: "rollout" (GlobEnc) or "last" (the last layer's matrix only).
        readout: "cls" (the prediction's row: [CLS]), "mean" or "max" over real rows.
    """

    name = "globenc"
    family = "attention"

    def __init__(self, *, block: str = "encoder", normalize: bool = True, aggregation: str = "rollout",
                 readout: str = "cls"):
        self.block = block
        self.normalize = normalize
        self.aggregation = aggregation
        self.readout = readout

    def validate(self, model: ExplainableModel) -> None:
        check_choice("block", self.block, BLOCKS,
                     " 'encoder' is GlobEnc (both residuals and LayerNorms, the FFN left out); 'attention' stops "
                     "after the first LayerNorm (N_ResLN).")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False (divide each layer's rows by their sums); "
                             f"got {self.normalize!r}.")
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("readout", self.readout, READOUTS)
        check_supported(self.name, model)
        require_value_sites(model, self.name)

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> Tensor:
        mask = batch.attention_mask
        matrices = globenc_matrices(model, batch, block=self.block, normalize=self.normalize)
        joint = matrices[-1] if self.aggregation == "last" else joint_product(matrices)
        return read_out(joint, mask, self.readout, readout_rows(model, mask))    # [batch, key]
