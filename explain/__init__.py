"""Explainers behind one verb: `get_explainer(name, **params).explain(model, batch_or_texts, target=None)`."""
from attnaudit.explain.attribution import Attribution
from attnaudit.explain.base import Explainer
from attnaudit.explain.registry import ATTENTION_FAMILY, UnknownExplainerError, get_explainer, list_explainers

__all__ = ["Attribution", "Explainer", "get_explainer", "list_explainers", "ATTENTION_FAMILY", "UnknownExplainerError"]
