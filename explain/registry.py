"""The visible registry of explainers: name -> class, in one table.

    >>> from attnaudit.explain import get_explainer, list_explainers
    >>> get_explainer("rollout", head_fusion="max").explain(model, ["a fine film"])
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:                                # at run time only an explainer's own module imports base (torch)
    from attnaudit.explain.base import Explainer

# name -> "module:Class"; imported on first use so that `import attnaudit` stays light.
REGISTRY: dict[str, str] = {
    "attention": "attnaudit.explain.attention:RawAttention",
    "rollout": "attnaudit.explain.rollout:Rollout",
    "flow": "attnaudit.explain.flow:Flow",
    "grad_attention": "attnaudit.explain.grad_attention:GradAttention",
    "attention_x_grad": "attnaudit.explain.grad_attention:AttentionXGrad",
    "attention_norm": "attnaudit.explain.attention:AttentionNorm",
    "saliency": "attnaudit.explain.gradients:Saliency",
    "input_x_gradient": "attnaudit.explain.gradients:InputXGradient",
    "integrated_gradients": "attnaudit.explain.gradients:IntegratedGradients",
    "deeplift": "attnaudit.explain.gradients:DeepLift",
    "gradient_shap": "attnaudit.explain.gradients:GradientShap",
    "occlusion": "attnaudit.explain.perturbation:Occlusion",
    "lime": "attnaudit.explain.perturbation:Lime",
    "kernel_shap": "attnaudit.explain.perturbation:KernelShap",
    "random": "attnaudit.explain.control:RandomScores",
    # context mixing beyond attention weights (issue 16): each takes some architectures only (see its module)
    "alti": "attnaudit.explain.alti:ALTI",
    "globenc": "attnaudit.explain.globenc:GlobEnc",
    "value_zeroing": "attnaudit.explain.value_zeroing:ValueZeroing",
    "attnlrp": "attnaudit.explain.attnlrp:AttnLRP",
}

# Context mixing beyond attention weights: defined for some architectures only, so an audit leaves one out of a
# model it does not take (and says so) instead of refusing the audit.
CONTEXT_MIXING = ("alti", "globenc", "value_zeroing", "attnlrp")
# What an audit runs by default (`AuditSettings.explainers`): every registered explainer.
DEFAULT_EXPLAINERS = tuple(REGISTRY)
# The 15 explainers of the first wave, the default before the context-mixing ones joined it.
CLASSIC_EXPLAINERS = tuple(n for n in REGISTRY if n not in CONTEXT_MIXING)

# The attention family, by name: the registry's attention explainers, and "attention_layers", the encoder–decoder's
# cross-attention averaged over layers (`explain.seq2seq`, which reuses the other names for its own versions).
ATTENTION_FAMILY = ("attention", "rollout", "flow", "grad_attention", "attention_x_grad", "attention_norm",
                    "attention_layers", "alti", "globenc", "value_zeroing", "attnlrp")


class UnknownExplainerError(ValueError):
    pass


def list_explainers() -> list[str]:
    return list(REGISTRY)


def explainer_class(name: str) -> type[Explainer]:
    if name not in REGISTRY:
        raise UnknownExplainerError(f"Unknown explainer {name!r}. Available: {', '.join(sorted(REGISTRY))}.")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_explainer(name: str, **params) -> Explainer:
    """An explainer by registry name, with its keyword parameters (validated at first use)."""
    cls = explainer_class(name)
    try:
        return cls(**params)
    except TypeError as e:
        import inspect

        valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(f"explainer {name!r} got invalid parameters {sorted(params)}; valid: {valid}. ({e})") from e
