"""Class names given on the command line: `--label-names negative,positive` (checked here; applied to a model
by `attnaudit.model.interface.name_classes`).

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
