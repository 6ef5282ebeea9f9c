"""AttnLRP (Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin & Samek 2024, "AttnLRP: Attention-Aware
Layer-wise Relevance Propagation for Transformers", ICML): LRP through every layer of the model, attention
included, computed as gradient × input with the gradients of a few operations replaced, as the reference
package LXT does (github.com/rachtibat/LRP-eXplains-Transformers, `lxt/efficient/rules.py`,
`lxt/efficient/patches.py`, `lxt/efficient/models/bert.py`; Arras et al. 2025 for the gradient × input form).

With R = x ⊙ ∂f/∂x the relevance of a tensor x, the ordinary gradient already gives the ε-rule of a Linear
layer (R_x = x ⊙ Wᵀ(R_z / z), the bias absorbed), of an addition (the residuals) and AttnLRP's softmax rule
(Proposition 3.1, LXT's explicit `softmax_fn`): with s = softmax(x) and g the gradient at s,
x ⊙ s ⊙ (g − Σ s g) = x ⊙ (R_s − s Σ R_s). The operations changed, only inside `attnlrp_rules`:

    GELU, tanh, ReLU, ... (elementwise)  identity rule (eq. 9): backward g · f(x) / (x + 1e-10), so R_in = R_out
    LayerNorm                            y = γ ⊙ (x − mean(x)) / stop_grad(σ(x)) + β: σ constant, the centring kept
                                         (LXT's `layer_norm_forward`)
    Q·Kᵀ and A·V                         uniform rule (Proposition 3.3): half of a bilinear product's relevance to
                                         each factor; as LXT's attention wrapper, the gradient at the values is
                                         halved and at the pattern quartered (A·V halves it, Q·Kᵀ again)

`attention="cp"` is LXT's CP-LRP variant (Ali et al. 2022): the pattern is held constant (no relevance
through the softmax; the values get all of A·V's). AttnLRP does not conserve relevance at a softmax (the rule's
Taylor "bias" keeps R_s − Σ R_x); CP-LRP does, so a model without biases gives Σ R_input = the target logit.

Where relevance is read (`embedding`): "word" (default, LXT's usage: `inputs_embeds * inputs_embeds.grad`) at
the token embeddings `model.embed(ids)` before positions (and segments) are added, so the position table's
share is not scored; "sum" at the summed input vector (the built-in's e·√d + PE, a HuggingFace encoder's
word + position + token type before the embedding LayerNorm), whose relevance is everything that enters layer 0.
The score of token j is the sum of its vector's relevance over d_model; f is the target class's logit.

Models: the built-in encoder classifier (post-LN or pre-LN, [CLS] or mean pooling) and HuggingFace encoder
classifiers (BERT, RoBERTa, ELECTRA, DistilBERT, ALBERT); the rest is refused (ValueError). Activations applied as
functions rather than modules cannot be hooked: RoBERTa's head (`torch.tanh`) is handled by name; DistilBERT's
head builds `nn.ReLU()` in its forward, where the identity rule equals ReLU's gradient anyway.

Cost: one forward and one backward of the batch.

    >>> AttnLRP().explain(model, ["a fine film"])
    >>> AttnLRP(embedding="sum", attention="cp").explain(model, batch)     # conservative CP-LRP
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from attnaudit.explain.base import Explainer, check_choice
from attnaudit.explain.capture import values_site
from attnaudit.explain.mixing import require_value_sites
from attnaudit.explain.value_zeroing import hf_model_type
from attnaudit.model.hooks import hooks
from attnaudit.model.interface import Batch, ExplainableModel

EMBEDDINGS = ("word", "sum")
ATTENTIONS = ("attnlrp", "cp")
HF_ENCODERS = ("bert", "roberta", "electra", "distilbert", "albert")
SUPPORTED_TEXT = ("the built-in encoder classifier (TextClassifier) and HuggingFace encoder classifiers ("
                  + ", ".join(HF_ENCODERS) + ")")
IDENTITY_EPS = 1e-10                 # LXT's stabiliser of f(x) / x in the identity rule
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus)


# -- the rules, as autograd functions ----------------------------------------------------------------------
class _IdentityRule(torch.autograd.Function):
    """y = f(x) given (x, y); backward g · y / (x + ε): the identity rule in gradient × input (LXT eq. 9)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(y / (x + IDENTITY_EPS))
        return y.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class _DivideGradient(torch.autograd.Function):
    """Identity forward; backward g / factor (LXT's `divide_gradient`, the uniform rule)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad / ctx.factor, None


def identity_rule(x: Tensor, y: Tensor) -> Tensor:
    """y (= f(x), elementwise) whose gradient to x is g · y / x; y's own graph is dropped."""
    return _IdentityRule.apply(x, y.detach())


def divide_gradient(x: Tensor, factor: float) -> Tensor:
    return _DivideGradient.apply(x, factor)


def linear_layer_norm(module: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm with σ held constant (AttnLRP Prop. 3.4 via LXT's `layer_norm_forward`) -> x's shape."""
    if len(module.normalized_shape) != 1:
        raise ValueError(f"attnlrp: a LayerNorm over {tuple(module.normalized_shape)} is not supported; only the "
                         "last dimension.")
    centred = x - x.mean(-1, keepdim=True)                                        # [..., d_model]
    std = (centred.pow(2).mean(-1, keepdim=True) + module.eps).sqrt()            # [..., 1]
    y = centred / std.detach()
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return y


# -- where the rules go --------------------------------------------------------------------------------
def check_supported(model: ExplainableModel) -> None:
    """Refuse (ValueError, naming the model and what is supported) a model attnlrp does not know."""
    from attnaudit.model.transformer import TransformerClassifier

    kind = hf_model_type(model)
    net = getattr(model, "net", None)
    if kind is None and isinstance(net, TransformerClassifier):
        return
    sites = getattr(model, "SITES", "encoder")
    if kind in HF_ENCODERS and sites == "encoder":
        return
    if kind is not None:
        what = f"a HuggingFace {kind!r} model" + (" (a decoder)" if sites != "encoder" else "")
    else:
        what = f"a {type(model).__name__} (kind {getattr(model, 'kind', '?')!r}, net {type(net).__name__})"
    raise ValueError(f"attnlrp supports {SUPPORTED_TEXT}; got {what}.")


def _is_elementwise(module: nn.Module) -> bool:
    return isinstance(module, ELEMENTWISE) or type(module).__module__ == "transformers.activations"


def _functional_tanh(model: ExplainableModel) -> list[tuple[nn.Module, nn.Module]]:
    """(Linear before, Linear after) pairs around a `torch.tanh` call: RoBERTa's classification head."""
    if hf_model_type(model) != "roberta":
        return []
    head: Any = getattr(model.net, "classifier", None)
    if head is None or not hasattr(head, "dense") or not hasattr(head, "out_proj"):
        return []
    return [(head.dense, head.out_proj)]


def sum_site(model: ExplainableModel) -> tuple[nn.Module, str]:
    """The module whose output ("output") or first input ("input") is the summed input vector [batch, seq, d]."""
    net: Any = model.net
    if hf_model_type(model) is None:
        return net.encoder.pos, "output"                                          # e·√d + PE
    return net.base_model.embeddings.LayerNorm, "input"                           # word + position (+ type)


@contextmanager
def attnlrp_rules(model: ExplainableModel, *, attention: str = "attnlrp") -> Iterator[None]:
    """Inside the block, forwards of `model` carry AttnLRP's gradients (module docstring); all removed on exit."""
    handles: list[Any] = []

    def on_layer_norm(module, args, output):
        return linear_layer_norm(module, args[0])

    def on_activation(module, args, output):
        return identity_rule(args[0], output) if isinstance(output, Tensor) else output

    before: dict[int, Tensor] = {}

    def keep_pre_tanh(module, args, output):
        before[id(module)] = output

    def tanh_input(source: nn.Module):
        def hook(module, args):
            return (identity_rule(before.pop(id(source)), args[0]), *args[1:])
        return hook

    if attention == "cp":
        edits = {site: (lambda p, allowed: p.detach()) for site in model.attention_sites}
    else:
        edits = {site: (lambda p, allowed: divide_gradient(p, 4.0)) for site in model.attention_sites}
        edits.update({values_site(s): (lambda v, allowed: divide_gradient(v, 2.0)) for s in model.attention_sites})
    with ExitStack() as stack:
        try:
            for module in model.net.modules():
                if isinstance(module, nn.LayerNorm):
                    handles.append(module.register_forward_hook(on_layer_norm))
                elif _is_elementwise(module):
                    handles.append(module.register_forward_hook(on_activation))
            for dense, out_proj in _functional_tanh(model):
                handles.append(dense.register_forward_hook(keep_pre_tanh))
                handles.append(out_proj.register_forward_pre_hook(tanh_input(dense)))
            stack.enter_context(hooks(model, edits))
            yield
        finally:
            for h in handles:
                h.remove()


@contextmanager
def catching_sum(model: ExplainableModel) -> Iterator[list[Tensor]]:
    """Inside the block, each forward appends its summed input vector [batch, seq, d_model] (`sum_site`)."""
    module, where = sum_site(model)
    seen: list[Tensor] = []
    if where == "output":
        handle = module.register_forward_hook(lambda m, args, output: seen.append(output))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def attnlrp_relevance(model: ExplainableModel, batch: Batch, target: Tensor, *, embedding: str = "word",
                      attention: str = "attnlrp") -> Tensor:
    """Relevance of each input vector's coordinates for the target logits -> [batch, seq, d_model] (float32 or wider)."""
    dev = model.device
    ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
    with torch.enable_grad(), attnlrp_rules(model, attention=attention), catching_sum(model) as sums:
        embeds = model.embed(ids).detach().requires_grad_()                       # [batch, seq, d_model]
        logits = model.logits_from_embeds(embeds, mask)                           # [batch, n_classes]
        picked = logits.gather(1, target.to(dev)[:, None])[:, 0]                  # [batch]: R at the output
        x = embeds if embedding == "word" else sums[-1]
        (grad,) = torch.autograd.grad(picked.sum(), x)
    out = (x * grad).detach()                                                     # R = x ⊙ ∂f/∂x
    return out.to(torch.promote_types(out.dtype, torch.float32))


# -- the explainer -------------------------------------------------------------------------------------
class AttnLRP(Explainer):
    """AttnLRP (Achtibat et al. 2024): layer-wise relevance propagation through attention, LayerNorm and the
    FFN, as gradient × input with LXT's rules; the token score is its input vector's relevance summed.

    Args:
        embedding: where relevance is read: "word" (the token embeddings, LXT's usage) or "sum" (the summed input
            vector, positions and segments included: everything that enters the first layer).
        attention: "attnlrp" (the paper's softmax and uniform rules) or "cp" (CP-LRP: no relevance through the
            attention pattern; conservative).
    """

    name = "attnlrp"
    family = "attention"

    def __init__(self, *, embedding: str = "word", attention: str = "attnlrp"):
        self.embedding = embedding
        self.attention = attention

    def validate(self, model: ExplainableModel) -> None:
        check_choice("embedding", self.embedding, EMBEDDINGS,
                     " 'word' reads relevance at the token embeddings (LXT's usage); 'sum' at the summed input "
                     "vector, positions and segments included.")
        check_choice("attention", self.attention, ATTENTIONS,
                     " 'attnlrp' is the paper's rule set; 'cp' holds the attention pattern constant (CP-LRP).")
        check_supported(model)
        require_value_sites(model, self.name)

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> Tensor:
        relevance = attnlrp_relevance(model, batch, target, embedding=self.embedding, attention=self.attention)
        return relevance.sum(-1)                                                  # [batch, seq]
