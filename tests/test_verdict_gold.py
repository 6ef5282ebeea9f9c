"""Plausibility is not faithfulness: gold_average_precision counts in the verdict only where the gold tokens cause the label."""
from __future__ import annotations

import pytest
from test_report import synthetic_counterfactual, synthetic_metrics

from attnaudit.analyses.verdict import RULE, derive_verdict, is_synthetic


def test_human_rationales_are_kept_out_of_the_verdict_and_said_so():
    m = synthetic_metrics(0.98)
    causal = derive_verdict(m, task="keywords", counterfactual=synthetic_counterfactual(0.3))
    human = derive_verdict(m, task="reviews", counterfactual=synthetic_counterfactual(0.3))
    assert "gold_average_precision" in {r["metric"] for r in causal.ranks}          # built-in task: the gold causes the label
    assert "gold_average_precision" not in {r["metric"] for r in human.ranks}       # a data file's rationales: plausibility
    assert any("plausibility" in c and "not counted in the verdict" in c for c in human.caveats)
    assert not any("plausibility" in c for c in causal.caveats)
    n_causal = {r["metric"] for r in causal.ranks}
    assert len(n_causal) - 1 == len({r["metric"] for r in human.ranks})
    # the paragraph counts the measures it used: 7 for the built-in task, 6 for human rationales
    assert "of 7 measures" in causal.paragraph and "of 6 measures" in human.paragraph
    forced = derive_verdict(m, task="reviews", counterfactual=synthetic_counterfactual(0.3), gold="causal")
    assert [r["metric"] for r in forced.ranks] == [r["metric"] for r in causal.ranks]
    assert "plausibility, not faithfulness" in RULE


def test_the_gold_kind_is_inferred_from_the_task_and_checked():
    assert is_synthetic("needle", None) and is_synthetic("x", {"task": "keywords"})
    assert is_synthetic("x", {"synthetic": True}) and not is_synthetic("movies-test", {"task": "train.jsonl"})
    with pytest.raises(ValueError, match="gold must be one of causal, human or None"):
        derive_verdict(synthetic_metrics(0.5), task="t", gold="annotators")
