"""attnaudit: can a Transformer's attention explain its outputs?

    >>> import attnaudit
    >>> model = attnaudit.load_model("runs/keywords")
    >>> model.predict_proba(["the plot was not good"])          # numpy [n, n_classes]
    >>> attnaudit.get_explainer("rollout").explain(model, ["the plot was not good"])   # heatmap in Jupyter
    >>> result = attnaudit.audit(model, examples)                 # every explainer and analysis -> tables
    >>> result.summary()                                          # pandas: mean and 95% CI per explainer × metric
"""
__version__ = "0.1.0"

from attnaudit.explain import Attribution, get_explainer, list_explainers
from attnaudit.model import load_model
from attnaudit.model.hooks import hooks, record

__all__ = ["__version__", "load_model", "get_explainer", "list_explainers", "Attribution", "record", "hooks", "audit"]


def __getattr__(name: str):
    if name == "audit":                      # imported on first use: the analyses pull in matplotlib and seaborn
        from attnaudit.analyses.audit import audit
        return audit
    raise AttributeError(f"module 'attnaudit' has no attribute {name!r}")
