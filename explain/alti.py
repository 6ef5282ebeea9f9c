"""ALTI (Ferrando, Gállego & Costa-jussà 2022, "Measuring the Mixing of Contextual Information in the Transformer",
EMNLP; reference code github.com/mt-upc/transformer-contributions, src/contributions.py and
src/utils_contributions.py).

Each layer's attention block (multi-head attention, residual and, post-LN, the LayerNorm after it) is written as a
sum over source tokens. For query i of layer l, with x the layer's input, α^h the attention of head h, W^O_h head
h's slice of W^O and v^h_j = W^V_h x_j + b^V_h (pre-LN: W^V_h LN(x_j) + b^V_h, the values the model used):

    T_i(x_j) = Σ_h α^h_ij W^O_h v^h_j + δ_ij x_i                      (attention + residual, one vector per source)

Post-LN the LayerNorm is linear given token i's statistics, LN(s) = γ ⊙ (s − mean(s)) / σ_i + β with
σ_i = sqrt(Var(s_i) + ε) of its whole input s_i = Σ_j T_i(x_j) + b^O, so

    T̃_i(x_j) = γ ⊙ (T_i(x_j) − mean(T_i(x_j))) / σ_i,    bias_i = γ ⊙ (b^O − mean(b^O)) / σ_i + β,
    y_i = Σ_j T̃_i(x_j) + bias_i  (= the LayerNorm's output; the bias is attributed to no token).

Pre-LN (the reference's `pre_layer_norm` branch) T̃ = T, bias = b^O and y_i is the block's output x_i + Attn_i.
The contribution of j to i is the Manhattan proximity, clipped and normalised per row:

    d_ij = ‖y_i − T̃_i(x_j)‖₁,   c_ij = max(0, ‖y_i‖₁ − d_ij),   C_ij = c_ij / Σ_k c_ik,

and ALTI multiplies the layer matrices (the residual is inside C already, so no identity is added):
R_1 = C_1, R_l = C_l · R_{l-1}. The scores are the row of R_L (or of C_L, aggregation="last") the prediction is
read from (`read_out`: [CLS], or a decoder's last real token).

Against the reference code: the same steps (its `l_transform`, `normalize_contributions(..., 'min_sum',
resultant_norm=‖y‖₁)` and `compute_joint_attention`), except that σ_i includes the LayerNorm's ε inside the square
root as LayerNorm does (the reference divides by std(s_i + ε), which is std(s_i): ε is lost), so that y_i is the
layer's actual output. Padding takes no part: padded keys get α = 0 and padded rows and columns of C are 0.

Cost: one forward (no backward); per layer ≈ (heads + 3)·batch·seq²·d_model multiply-adds. The [query, key,
d_model] tensor of T̃ is built CHUNK_ELEMENTS at a time (query rows in chunks), so the extra memory stays near
CHUNK_ELEMENTS floats whatever the length.
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
from attnaudit.model.hooks import observing
from attnaudit.model.interface import Batch, ExplainableModel
from attnaudit.model.steps import readout_rows

AGGREGATIONS = ("rollout", "last")
CHUNK_ELEMENTS = 1 << 24          # floats in one chunk of T̃ [batch, query chunk, key, d_model]
HF_BERT_LIKE = ("bert", "roberta", "electra")
HF_SUPPORTED = (*HF_BERT_LIKE, "distilbert")


@dataclass(frozen=True)
class Block:
    """Where one layer's attention block lives in the net.

    entry: the module whose first input is the layer's residual stream x [batch, seq, d_model];
    norm: post-LN, the LayerNorm after the residual (its input s, its output y); None when pre-LN;
    out: the module whose output is the block's output y (post-LN: `norm`);
    dense: the attention output projection W^O (its bias b^O).
    """

    entry: nn.Module
    norm: nn.LayerNorm | None
    out: nn.Module
    dense: nn.Linear


def blocks(model: ExplainableModel) -> list[Block]:
    """The attention blocks of `model`, in layer order; ValueError for a model ALTI does not know."""
    from attnaudit.model.transformer import TransformerClassifier, TransformerDecoderLM

    net = getattr(model, "net", None)
    if isinstance(net, (TransformerClassifier, TransformerDecoderLM)):          # the built-in nets
        pre = net.cfg.norm == "pre"
        layers: Any = net.encoder.layers if isinstance(net, TransformerClassifier) else net.decoder.layers
        out = []
        for layer in layers:
            block = layer.attn_block if isinstance(net, TransformerClassifier) else layer.self_block
            out.append(Block(block, None if pre else block.norm, block, layer.self_attn.w_o))
        return out
    hf = getattr(model, "hf_config", None)
    if hf is not None and isinstance(net, nn.Module):
        kind = getattr(hf, "model_type", None)
        if kind not in HF_SUPPORTED or getattr(model, "SITES", "encoder") != "encoder":
            raise ValueError(f"alti supports the HuggingFace model types {', '.join(map(repr, HF_SUPPORTED))} (post-LN "
                             f"encoders with one LayerNorm after the attention residual, as the reference code); got "
                             f"{kind!r}{' (a decoder)' if getattr(model, 'SITES', 'encoder') != 'encoder' else ''}.")
        base: Any = net.base_model                  # a transformers model: typed Any, as in model/hf.py
        if kind == "distilbert":
            return [Block(layer, layer.sa_layer_norm, layer.sa_layer_norm, layer.attention.out_lin)
                    for layer in base.transformer.layer]
        return [Block(layer.attention, layer.attention.output.LayerNorm, layer.attention.output.LayerNorm,
                      layer.attention.output.dense) for layer in base.encoder.layer]
    raise ValueError(f"alti supports the built-in Transformer classifiers and HuggingFace "
                     f"{', '.join(HF_SUPPORTED)} classifiers; got a {type(model).__name__} whose net "
                     f"({type(net).__name__}) has no known attention block layout.")


@dataclass
class LayerRecord:
    """What one layer's forward showed: x [batch, seq, d_model], values [batch, head, key, d_head], pattern
    [batch, head, query, key], and post-LN the LayerNorm's input s; y its output (pre-LN the block's output)."""

    x: Tensor | None = None
    values: Tensor | None = None
    pattern: Tensor | None = None
    s: Tensor | None = None
    y: Tensor | None = None


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for name in ("hidden_states", "x"):
        if isinstance(kwargs.get(name), Tensor):
            return kwargs[name]
    raise RuntimeError("alti: the layer was called without its hidden states as the first input or a "
                       "`hidden_states` keyword; this layout is not supported.")


@contextmanager
def recording_layers(model: ExplainableModel, parts: list[Block]) -> Iterator[list[LayerRecord]]:
    """Inside the block, every forward fills one `LayerRecord` per layer (the last call wins); hooks removed on exit."""
    records = [LayerRecord() for _ in parts]
    handles: list[Any] = []

    def on_entry(r: LayerRecord):
        def hook(module, args, kwargs):
            r.x = _first_input(args, kwargs).detach()
        return hook

    def on_norm(r: LayerRecord):
        def hook(module, args, output):
            r.s = args[0].detach()
        return hook

    def on_out(r: LayerRecord):
        def hook(module, args, output):
            r.y = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    def on_site(r: LayerRecord, what: str):
        def watch(t: Tensor) -> None:
            setattr(r, what, t.detach())
        return watch

    sites = list(model.attention_sites)
    watchers = {}
    for r, site in zip(records, sites):
        watchers[site] = on_site(r, "pattern")
        watchers[values_site(site)] = on_site(r, "values")
    try:
        for r, part in zip(records, parts):
            handles.append(part.entry.register_forward_pre_hook(on_entry(r), with_kwargs=True))
            if part.norm is not None:
                handles.append(part.norm.register_forward_hook(on_norm(r)))
            handles.append(part.out.register_forward_hook(on_out(r)))
        with observing(model, watchers):
            yield records
    finally:
        for h in handles:
            h.remove()


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)          # half precision is computed in float32


@torch.no_grad()
def decompose(x: Tensor, pattern: Tensor, values: Tensor, w_o: Tensor, b_o: Tensor | None,
              norm: nn.LayerNorm | None, s: Tensor | None,
              queries: slice = slice(None)) -> tuple[Tensor, Tensor]:
    """T̃_i(x_j) and bias_i for the query rows `queries` of one layer (see the module docstring).

    Args:
        x: [batch, seq, d_model] the layer input; pattern [batch, head, query, key]; values [batch, head, key,
            d_head]; w_o [d_model, head, d_head]; b_o [d_model] or None.
        norm: post-LN the LayerNorm (γ, β, ε) with s [batch, seq, d_model] its input; None when pre-LN.
    Returns:
        (T̃ [batch, q, key, d_model], bias [batch, q, d_model]), with y_i = T̃.sum(key) + bias.
    """
    dt = _work_dtype(x.dtype)
    x, pattern, values, w_o = x.to(dt), pattern.to(dt), values.to(dt), w_o.to(dt)
    b, n, d = x.shape
    rows = torch.arange(n, device=x.device)[queries]                                 # [q]
    f = torch.einsum("mhd,bhkd->bhkm", w_o, values)                                  # [batch, head, key, d_model]
    t = torch.einsum("bhqk,bhkm->bqkm", pattern[:, :, rows], f)                      # [batch, q, key, d_model]
    t[:, torch.arange(len(rows), device=x.device), rows] += x[:, rows]               # residual: δ_ij x_i
    bias = torch.zeros(d, dtype=dt, device=x.device) if b_o is None else b_o.to(dt)
    bias = bias.expand(b, len(rows), d)                                              # [batch, q, d_model]
    if norm is None:
        return t, bias
    assert s is not None
    s = s.to(dt)[:, rows]                                                            # [batch, q, d_model]
    sigma = (s.var(-1, unbiased=False) + norm.eps).sqrt()[..., None]                 # [batch, q, 1]
    gamma = torch.ones(d, dtype=dt, device=x.device) if norm.weight is None else norm.weight.to(dt)
    beta = torch.zeros(d, dtype=dt, device=x.device) if norm.bias is None else norm.bias.to(dt)
    t = (t - t.mean(-1, keepdim=True)) * gamma / sigma[:, :, None]                   # centred, γ, / σ_i
    bias = (bias - bias.mean(-1, keepdim=True)) * gamma / sigma + beta               # [batch, q, d_model]
    return t, bias


def contribution_matrix(x: Tensor, pattern: Tensor, values: Tensor, w_o: Tensor, b_o: Tensor | None,
                        norm: nn.LayerNorm | None, s: Tensor | None, mask: Tensor, *,
                        chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """One layer's ALTI matrix C [batch, query, key]: real rows sum to 1, entries >= 0, padding 0."""
    b, n, d = x.shape
    step = max(1, chunk_elements // max(1, b * n * d))                               # query rows per chunk
    parts = []
    for start in range(0, n, step):
        t, bias = decompose(x, pattern, values, w_o, b_o, norm, s, slice(start, start + step))
        y = t.sum(2) + bias                                                          # [batch, q, d_model]
        dist = (y[:, :, None] - t).abs().sum(-1)                                     # [batch, q, key] ‖y_i − T̃_ij‖₁
        parts.append((y.abs().sum(-1)[..., None] - dist).clamp_min(0.0))             # max(0, ‖y_i‖₁ − d_ij)
        del t
    c = torch.cat(parts, 1)                                                          # [batch, query, key]
    mask = mask.to(c.device)
    c = c * (mask[:, :, None] & mask[:, None, :])
    total = c.sum(-1, keepdim=True)
    return torch.where(total > 0, c / total.clamp_min(torch.finfo(c.dtype).tiny), c)


@torch.no_grad()
def alti_matrices(model: ExplainableModel, batch: Batch) -> Tensor:
    """The layers' ALTI matrices from one forward -> [layer, batch, query, key] (in float32, or the model's wider dtype)."""
    parts = blocks(model)
    mask = batch.attention_mask
    with recording_layers(model, parts) as records:
        model.logits(batch.input_ids, mask)
    out = []
    for i, (r, part) in enumerate(zip(records, parts)):
        if r.x is None or r.values is None or r.pattern is None or (part.norm is not None and r.s is None):
            raise RuntimeError(f"alti: layer {i} did not show its input, values, pattern and LayerNorm in the forward.")
        w_o = model.output_weight(i).detach()                                        # [d_model, head, d_head]
        b_o = part.dense.bias.detach() if part.dense.bias is not None else None
        out.append(contribution_matrix(r.x, r.pattern, r.values, w_o, b_o, part.norm, r.s, mask.to(r.x.device)))
    return torch.stack(out)


class ALTI(Explainer):
    """ALTI (Ferrando et al. 2022): per-layer token-to-token contributions of the attention block, rolled out.

    Args:
        aggregation: "rollout" (default: the paper's ALTI, the layers' matrices multiplied) or "last" (the last
            layer's matrix alone).
        readout: which row explains the prediction: "cls" (default: the prediction's row, [CLS] or a decoder's last
            real token), "mean" or "max" over the real query rows.
    """

    name = "alti"
    family = "attention"

    def __init__(self, *, aggregation: str = "rollout", readout: str = "cls"):
        self.aggregation = aggregation
        self.readout = readout

    def validate(self, model: ExplainableModel) -> None:
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("readout", self.readout, READOUTS)
        blocks(model)
        require_value_sites(model, self.name)

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> Tensor:
        matrices = alti_matrices(model, batch)                                       # [layer, batch, query, key]
        joint = joint_product(matrices) if self.aggregation == "rollout" else matrices[-1]
        mask = batch.attention_mask.to(joint.device)
        return read_out(joint, mask, self.readout, readout_rows(model, mask))        # [batch, key]
