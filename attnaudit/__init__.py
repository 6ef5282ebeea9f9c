"""attnaudit: can a Transformer's attention explain its outputs?

    >>> import attnaudit
    >>> model = attnaudit.load_model("runs/keywords")
    >>> model.predict_proba(["the plot was not good"])          # numpy [n, n_classes]
    >>> attnaudit.get_explainer("rollout").explain(model, ["the plot was not good"])   # heatmap in Jupyter
"""
__version__ = "0.1.0"

from attnaudit.explain import Attribution, get_explainer, list_explainers
from attnaudit.model import load_model
from attnaudit.model.hooks import hooks, record

__all__ = ["__version__", "load_model", "get_explainer", "list_explainers", "Attribution", "record", "hooks"]
