"""Explainers behind one verb: `get_explainer(name, **params).explain(model, batch_or_texts, target=None)`.

Names are imported on first use (module `__getattr__`): `import attnaudit.explain` loads no explainer, and
captum only comes in with the first captum-based one (saliency, integrated_gradients, occlusion, lime, ...).
"""
import importlib

_NAMES = {
    "Attribution": "attribution", "Explainer": "base", "ATTENTION_FAMILY": "registry",
    "UnknownExplainerError": "registry", "get_explainer": "registry", "list_explainers": "registry",
    "CaptumExplainer": "gradients", "explain_all": "run", "WordAttribution": "words", "aggregate_words": "words",
}

__all__ = ["Attribution", "Explainer", "get_explainer", "list_explainers", "explain_all", "CaptumExplainer", "ATTENTION_FAMILY",
           "UnknownExplainerError", "aggregate_words", "WordAttribution"]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value                  # later look-ups skip this function
        return value
    try:                                         # attnaudit.explain.rollout after a bare `import attnaudit.explain`
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(__all__))
