"""attnaudit: can a Transformer's attention explain its outputs?

    >>> import attnaudit
    >>> model = attnaudit.load_model("runs/keywords")
    >>> model.predict_proba(["the plot was not good"])          # numpy [n, n_classes]
    >>> attnaudit.get_explainer("rollout").explain(model, ["the plot was not good"])   # heatmap in Jupyter
    >>> result = attnaudit.audit(model, examples)                 # every explainer and analysis -> tables
    >>> result.summary()                                          # pandas: mean and 95% CI per explainer × metric
    >>> with attnaudit.precision("bfloat16"):                     # opt-in bf16 forwards; float32 by default
    ...     result = attnaudit.audit(model, examples)

Every name is imported on first use, so `import attnaudit` (and the CLI's `--help`) costs almost nothing;
torch comes with the model, captum with a gradient or perturbation explainer, pandas and matplotlib with
the audit and the report.
"""
import importlib

from attnaudit.core.version import __version__

_NAMES = {
    "load_model": "attnaudit.model.checkpoint", "get_explainer": "attnaudit.explain.registry",
    "list_explainers": "attnaudit.explain.registry", "Attribution": "attnaudit.explain.attribution",
    "record": "attnaudit.model.hooks", "hooks": "attnaudit.model.hooks", "audit": "attnaudit.analyses.audit",
    "show_attention": "attnaudit.analyses.attention_view", "precision": "attnaudit.model.precision",
}

__all__ = ["__version__", "load_model", "get_explainer", "list_explainers", "Attribution", "record", "hooks", "audit",
           "show_attention", "precision"]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value                  # later look-ups skip this function
        return value
    if name in ("model", "explain", "analyses", "cli", "jobs"):  # attnaudit.model... after a bare `import attnaudit`
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'attnaudit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
