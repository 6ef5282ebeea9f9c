"""Naming a model's classes after the fact: `--label-names negative,positive`.

    model = name_classes(load_model("my-bert"), parse_label_names("negative,positive"))
    model.label_names                                   # ("negative", "positive") instead of LABEL_0, LABEL_1

A HuggingFace folder saved without `id2label` calls its classes LABEL_0, LABEL_1, ...; a data file's
integer labels are class indices either way (see `attnaudit.data.examples.label_index`).
"""
from __future__ import annotations

from collections.abc import Sequence


def parse_label_names(text: str | Sequence[str] | None, *, option: str = "--label-names") -> tuple[str, ...] | None:
    """"a, b,c" (or a list) -> ("a", "b", "c"); None stays None. Names must be distinct and non-empty."""
    if text is None:
        return None
    names = tuple(n.strip() for n in (text.split(",") if isinstance(text, str) else map(str, text)))
    if len(names) < 2 or any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{option} must be two or more distinct, non-empty class names separated by commas, "
                         f"in class-index order; got {text!r}.")
    return names


def name_classes(model, label_names: Sequence[str] | None, *, option: str = "--label-names"):
    """Give `model` these class names (one per class, in index order) -> the same model; None changes nothing."""
    if label_names is None:
        return model
    names = tuple(label_names)
    if getattr(model, "kind", None) != "classifier":
        raise ValueError(f"{option} names a classifier's classes; this model is a {type(model).__name__}.")
    if len(names) != model.n_classes:
        raise ValueError(f"{option} must name each of the model's {model.n_classes} classes in index order; got "
                         f"{len(names)} ({', '.join(names)}); the model calls them {', '.join(model.label_names)}.")
    model.label_names = names
    if isinstance(getattr(model, "config", None), dict) and "label_names" in model.config:
        model.config["label_names"] = list(names)
    return model
