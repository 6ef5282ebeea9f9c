"""What every data reader returns: one split's Examples, the label names their `label` indexes, and `info`, what
the reader did (files read, truncation, examples dropped, characters removed), so a report can state it verbatim.

    loaded = read_sst2("../shared/data/sst2", "dev")      # a LoadedSplit
    split_stats(loaded.examples)                          # n_examples, tokens, rationale density
"""
from __future__ import annotations

from typing import Any, NamedTuple

from attnaudit.data.examples import Example


class LoadedSplit(NamedTuple):
    """One split: its Examples, the label names their `label` indexes, and what the loader did."""

    examples: list[Example]
    label_names: tuple[str, ...]
    info: dict[str, Any]


def split_stats(examples: list[Example]) -> dict[str, float]:
    """n_examples, mean/max tokens and rationale density of a split, for a report's data table.

    `rationale_fraction` is the mean over examples (that carry a rationale) of the fraction of their
    tokens marked 1, as ERASER reports it; `rationale_fraction_pooled` divides all marked tokens by all tokens.
    """
    n_tokens = [len(e.text.split()) for e in examples]
    rationales = [e.rationale for e in examples if e.rationale is not None]
    per_example = [sum(r) / len(r) for r in rationales]
    marked = sum(sum(r) for r in rationales)
    total = sum(len(r) for r in rationales)
    return {
        "n_examples": len(examples),
        "mean_tokens": sum(n_tokens) / len(examples) if examples else float("nan"),
        "max_tokens": max(n_tokens, default=0),
        "n_with_rationale": len(rationales),
        "rationale_fraction": sum(per_example) / len(per_example) if per_example else float("nan"),
        "rationale_fraction_pooled": marked / total if total else float("nan"),
    }


def cleaned_summary(cleaned: dict) -> dict:
    """What `read_source` removed, for a split's info: {"bom": bool, "nul": count, "nul_lines": [first lines]}."""
    lines = sorted(cleaned.get("nul_lines", {}))
    return {"bom": bool(cleaned.get("bom")), "nul": cleaned.get("nul", 0), "nul_lines": lines[:20]}
