"""Explainers behind one verb: `get_explainer(name, **params).explain(model, batch_or_texts, target=None)`."""
from attnaudit.explain.attribution import Attribution
from attnaudit.explain.base import Explainer
from attnaudit.explain.registry import ATTENTION_FAMILY, UnknownExplainerError, get_explainer, list_explainers
from attnaudit.explain.gradients import CaptumExplainer
from attnaudit.explain.run import explain_all
from attnaudit.explain.words import WordAttribution, aggregate_words

__all__ = ["Attribution", "Explainer", "get_explainer", "list_explainers", "explain_all", "CaptumExplainer", "ATTENTION_FAMILY",
           "UnknownExplainerError", "aggregate_words", "WordAttribution"]
