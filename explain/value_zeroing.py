"""Value zeroing (Mohebbi, Zuidema, Chrupała & Alishahi 2023, "Quantifying Context Mixing in Transformers", EACL).

Per layer l and token j, j's value vectors are zeroed in layer l's self-attention (every head), and for every
token i the cosine distance between layer l's output representation of i with and without the edit is the
mixing score C^l_ij. Layer l gets its ORIGINAL input (earlier layers run unedited), as in the reference code
(github.com/hmohebbi/ValueZeroing, `scoring/value_zeroing.py`: ``layer_module(org_hidden_states[l],
zero_value_index=t)`` against ``org_hidden_states[l + 1]``):

    C^l_ij = 1 - cos(h̃^l_i(¬j), h^l_i)            h^l_i: layer l's output at i; ¬j: j's values zeroed in layer l
    C^l_ij <- C^l_ij / Σ_k C^l_ik                  rows sum to 1; the diagonal C^l_ii is kept, as the reference does

A pair no head of layer l attends (α^h_ij = 0 for every h: a causal decoder's future, padding) has C^l_ij = 0
exactly, since j's values cannot reach i there; the forwards' rounding (the edited and the original outputs come
from batches of different sizes, ~1e-8) is not left in those entries.

The value vector zeroed is x_j W^V + b^V (bias included, all heads), as the reference's
``value_layer[:, :, t] = 0``. The layers are aggregated by rollout WITHOUT an added identity (the reference's
``compute_joint_attention(score_matrix, res=False)``: the residual is already inside C): R_0 = C^0,
R_l = C^l · R_{l-1}; the scores are R_{L-1}'s row of the prediction (`aggregation="rollout"`), or C^{L-1}'s row
(`aggregation="last"`).

Degenerate rows: a row whose distances are all 0 (no token's zeroing moves i's representation; e.g. a layer
whose values are all zero) would be 0/0 (NaN in the reference); here it gets all its mass on the diagonal (the
identity row: i keeps itself). A one-token input has the 1 × 1 matrix [[1]] in every layer (its single
distance, whatever it is, normalised; or the identity row if it is 0), so its only token scores 1.

Cost: one forward of the batch (the original outputs), then, per layer l, one forward of a tiled batch with
one copy of each example per real token j (copy j with j's values zeroed), in chunks of `max_batch` rows; each
tiled forward stops after layer l. In forwards per example: 1 + n_layers · n (n = the longest example's real
tokens), refused above `max_cost` (default `MAX_FORWARDS`).

    >>> ValueZeroing().explain(model, ["a fine film"])                       # value zeroing rollout
    >>> ValueZeroing(aggregation="last").explain(model, batch)               # the last layer's matrix only
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from attnaudit.explain.attention import READOUTS, read_out
from attnaudit.explain.base import MAX_FORWARDS, MAX_ROWS, Cost, Explainer, check_choice, check_max_cost, short_repr
from attnaudit.explain.capture import values_site
from attnaudit.explain.mixing import joint_product, require_value_sites
from attnaudit.model.hooks import hooks, observing
from attnaudit.model.interface import Batch, ExplainableModel
from attnaudit.model.steps import readout_rows
from attnaudit.model.transformer import TransformerClassifier, TransformerDecoderLM

AGGREGATIONS = ("rollout", "last")
HF_ENCODERS = ("bert", "roberta", "electra", "distilbert", "albert")     # the HuggingFace layouts read here
SUPPORTED_TEXT = ("the built-in models (TextClassifier and the decoders of attnaudit.model.lm, post-LN or pre-LN) "
                  "and HuggingFace encoder classifiers (" + ", ".join(HF_ENCODERS) + ")")


# -- the model's layer modules -------------------------------------------------------------------------
def hf_model_type(model: ExplainableModel) -> str | None:
    """The HuggingFace `model_type` of an `HFClassifier` (None for a built-in model)."""
    config = getattr(model, "hf_config", None)
    return None if config is None else str(getattr(config, "model_type", ""))


def check_supported(name: str, model: ExplainableModel) -> None:
    """Refuse (ValueError, naming what is supported) a model whose layers `name` cannot read."""
    kind = hf_model_type(model)
    if kind is None and isinstance(getattr(model, "net", None), (TransformerClassifier, TransformerDecoderLM)):
        return
    if kind in HF_ENCODERS:
        return
    what = f"a HuggingFace {kind!r} model" if kind is not None else f"a {type(model).__name__}"
    raise ValueError(f"{name} supports {SUPPORTED_TEXT}; got {what}.")


def layer_modules(model: ExplainableModel) -> list[nn.Module]:
    """The encoder layer modules in call order, one per layer (ALBERT's shared layer repeats) -> n_layers modules.

    Each one maps the layer's input hidden states (its first argument) to its output (a tensor, or a tuple
    whose first item is the tensor): built-in `EncoderLayer` / `CausalLayer`, BERT/RoBERTa/ELECTRA `...Layer`, DistilBERT
    `TransformerBlock`, ALBERT `AlbertLayer`.
    """
    check_supported("this explainer", model)
    net: Any = model.net
    kind = hf_model_type(model)
    if kind is None:                                   # built-in: EncoderLayer, or a decoder's CausalLayer
        return list(net.decoder.layers if isinstance(net, TransformerDecoderLM) else net.encoder.layers)
    base = net.base_model
    if kind == "distilbert":
        return list(base.transformer.layer)
    if kind == "albert":
        cfg = net.config
        n, groups = int(cfg.num_hidden_layers), int(cfg.num_hidden_groups)
        out: list[nn.Module] = []
        for i in range(n):                            # AlbertTransformer.forward: group int(i / (n / groups))
            out.extend(base.encoder.albert_layer_groups[int(i / (n / groups))].albert_layers)
        return out
    return list(base.encoder.layer)


def first_tensor(output: Any) -> Tensor:
    """A layer's output: the tensor itself, or the first item of a tuple / ModelOutput."""
    if isinstance(output, Tensor):
        return output
    return output[0]


class _Stop(Exception):
    """Raised by a layer hook to end a forward once the layer it reads has run."""


@contextmanager
def reading_layers(modules: list[nn.Module], keep: Callable[[int, Tensor], bool]) -> Iterator[None]:
    """Forward hooks on `modules` (the layers in call order): `keep(layer, output)` at each layer's output; when it
    returns True the forward is stopped (`_Stop`, swallowed on leaving the block). Hooks exist only inside."""
    calls: dict[int, int] = {}
    order: dict[int, list[int]] = {}
    for layer, module in enumerate(modules):
        order.setdefault(id(module), []).append(layer)
    handles = []

    def hook(module, args, output):
        k = calls.get(id(module), 0)
        calls[id(module)] = k + 1
        layers = order[id(module)]
        if k < len(layers) and keep(layers[k], first_tensor(output)):
            raise _Stop

    try:
        for module in {id(m): m for m in modules}.values():
            handles.append(module.register_forward_hook(hook))
        try:
            yield
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()


def layer_outputs(model: ExplainableModel, input_ids: Tensor, attention_mask: Tensor, modules: list[nn.Module],
                  *, upto: int | None = None) -> list[Tensor]:
    """Every layer's output [rows, seq, d_model] of one forward (only layers 0..upto when given: it stops there)."""
    outs: dict[int, Tensor] = {}

    def keep(layer: int, output: Tensor) -> bool:
        outs[layer] = output.detach()
        return upto is not None and layer >= upto

    with reading_layers(modules, keep):
        model.logits(input_ids, attention_mask)
    last = len(modules) - 1 if upto is None else upto
    return [outs[i] for i in range(last + 1)]


# -- the matrices ----------------------------------------------------------------------------------------
def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cos(a, b) over the last dimension, clipped at 0 (as sklearn's `cosine_distances`) -> [...]."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return (1.0 - cos).clamp_min(0.0)


def normalize_rows(matrix: Tensor, attention_mask: Tensor) -> Tensor:
    """[..., batch, query, key] -> rows divided by their sums; an all-zero real row -> the identity row; padding 0."""
    mask = attention_mask.to(matrix.device)                                       # [batch, seq]
    pair = mask[:, :, None] & mask[:, None, :]                                    # [batch, query, key]
    matrix = matrix.masked_fill(~pair, 0.0)
    sums = matrix.sum(-1, keepdim=True)                                           # [..., batch, query, 1]
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device) * mask[:, :, None]
    return torch.where(sums > 0, matrix / sums.clamp_min(torch.finfo(matrix.dtype).tiny), eye.expand_as(matrix))


def zero_values_of(tokens: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The edit of a ``values`` site [rows, head, key, d_head]: row r's values at key tokens[r] set to 0."""
    def edit(values: Tensor, allowed: Tensor) -> Tensor:
        hit = torch.zeros(values.shape[0], values.shape[2], dtype=torch.bool, device=values.device)
        hit[torch.arange(values.shape[0], device=values.device), tokens.to(values.device)] = True
        return values.masked_fill(hit[:, None, :, None], 0.0)
    return edit


@torch.no_grad()
def value_zeroing_matrices(model: ExplainableModel, batch: Batch, *, max_batch: int = 256) -> Tensor:
    """C^l [layer, batch, query, key]: row i, column j = the cosine distance of i's layer-l output when j's values
    are zeroed in layer l, rows normalised to sum to 1 (see the module docstring); padded rows and columns 0."""
    modules = layer_modules(model)
    dev = model.device
    ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
    b, seq = ids.shape
    reach: dict[int, Tensor] = {}                     # layer -> [batch, query, key]: some head attends key from query

    def watch(layer: int) -> Callable[[Tensor], None]:
        def seen(pattern: Tensor) -> None:
            reach[layer] = (pattern.detach() > 0).any(1)
        return seen

    with observing(model, {site: watch(i) for i, site in enumerate(model.attention_sites)}):
        original = layer_outputs(model, ids, mask, modules)                       # L × [batch, seq, d_model]
    example, token = mask.nonzero(as_tuple=True)                                  # one tiled row per real token
    sites = [values_site(s) for s in model.attention_sites]
    out = torch.zeros(len(modules), b, seq, seq, device=dev)
    for layer in range(len(modules)):
        for start in range(0, len(example), max_batch):
            rows, cols = example[start:start + max_batch], token[start:start + max_batch]
            with hooks(model, {sites[layer]: zero_values_of(cols)}):
                edited = layer_outputs(model, ids[rows], mask[rows], modules, upto=layer)[layer]
            out[layer][rows, :, cols] = cosine_distance(edited, original[layer][rows])   # [rows, query]
        out[layer] = out[layer].masked_fill(~reach[layer], 0.0)  # not attended by any head: exactly no effect
    return normalize_rows(out, mask)


# -- the explainer -------------------------------------------------------------------------------------
class ValueZeroing(Explainer):
    """Value zeroing (Mohebbi et al. 2023): cosine distance of each layer's outputs when one token's values are
    zeroed, rows normalised, rolled out over layers (`aggregation="rollout"`) or the last layer's (`"last"`).

    Args:
        aggregation: "rollout" (their value zeroing rollout, no identity added) or "last" (the last layer's matrix).
        readout: "cls" (the prediction's row: [CLS]), "mean" or "max" over real rows (`attention.read_out`).
        max_batch: tiled rows (example copies) per forward pass.
        max_cost: forward passes per example allowed (1 + n_layers · tokens); None = MAX_FORWARDS.
    """

    name = "value_zeroing"
    family = "attention"

    def __init__(self, *, aggregation: str = "rollout", readout: str = "cls", max_batch: int = 256,
                 max_cost: int | None = None):
        self.aggregation = aggregation
        self.readout = readout
        self.max_batch = max_batch
        self.max_cost = max_cost

    def validate(self, model: ExplainableModel) -> None:
        check_choice("aggregation", self.aggregation, AGGREGATIONS,
                     " 'rollout' multiplies the layers' matrices (Mohebbi et al.'s value zeroing rollout); "
                     "'last' reads the last layer's.")
        check_choice("readout", self.readout, READOUTS)
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= MAX_ROWS:
            raise ValueError(f"max_batch must be an int in [1, {MAX_ROWS:,}] (tiled rows per forward pass); "
                             f"got {short_repr(self.max_batch)}.")
        check_max_cost(self.max_cost)
        check_supported(self.name, model)
        require_value_sites(model, self.name)

    def costs(self, model: ExplainableModel, batch: Batch) -> list[Cost]:
        n = int(batch.attention_mask.sum(1).max()) if len(batch) else 0
        amount = 1 + model.n_layers * n
        limit = MAX_FORWARDS if self.max_cost is None else self.max_cost
        return [Cost("tokens", n, amount, limit,
                     f"{amount:.1e} forward passes per example (1 + {model.n_layers} layers × {n} tokens)")]

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> Tensor:
        mask = batch.attention_mask
        matrices = value_zeroing_matrices(model, batch, max_batch=self.max_batch)   # [layer, batch, q, k]
        joint = matrices[-1] if self.aggregation == "last" else joint_product(matrices)
        return read_out(joint, mask, self.readout, readout_rows(model, mask))    # [batch, key]
