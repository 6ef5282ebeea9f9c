"""A language model's audit: a continuation's steps are one example for the statistics, not several."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from attnaudit.analyses.audit import audit
from attnaudit.analyses.schema import step_means
from attnaudit.data.examples import Example
from tests.test_lm import make_lm


def test_step_means_averages_each_examples_steps_and_keeps_the_note_of_an_all_nan_group():
    table = pd.DataFrame([("x@0", "e", "m", "", 1.0, ""), ("x@1", "e", "m", "", 3.0, ""),
                          ("x@2", "e", "m", "", math.nan, "no token"), ("y@0", "e", "m", "", math.nan, "no token"),
                          ("x@0", "e", "m", "k=0.1", 0.5, ""), ("y@0", "e", "m", "", math.nan, "no token")],
                         columns=["example_id", "explainer", "metric", "setting", "value", "note"])
    out = step_means(table, {"x@0": "x", "x@1": "x", "x@2": "x", "y@0": "y"})
    assert out.columns.tolist() == table.columns.tolist()
    assert out[["example_id", "setting"]].values.tolist() == [["x", ""], ["y", ""], ["x", "k=0.1"]]
    assert out["value"].iloc[0] == 2.0 and math.isnan(out["value"].iloc[1]) and out["value"].iloc[2] == 0.5
    assert out["note"].tolist() == ["", "no token", ""]


def test_an_lm_audit_has_one_metric_row_per_example_and_max_examples_counts_examples():
    model = make_lm()
    examples = [Example(f"ex{i}", "a 1 b 2 ? b", target="2 c a") for i in range(3)]
    common = dict(explainers=["attention", "occlusion"], analyses=("faithfulness",), progress=False)
    full = audit(model, examples, max_examples=2, **common)
    assert full.settings["n_examples"] == 2 and full.settings["n_steps"] == 6      # 2 examples x 3 steps, not 2 rows
    assert sorted(full.metrics["example_id"].unique()) == ["ex0", "ex1"]
    assert not full.metrics.duplicated(["example_id", "explainer", "metric", "setting"]).any()
    # each example's value is the mean of its steps' values: audit the steps one by one as examples of their own
    rows = model.encode(examples[:1])
    per_step = [audit(model, rows.select([s]), **common).metrics for s in range(3)]
    key = ["explainer", "metric", "setting"]
    want = pd.concat(per_step).groupby(key)["value"].mean()
    got = full.metrics[full.metrics["example_id"] == "ex0"].set_index(key)["value"]
    assert got.sort_index().values == pytest.approx(want.sort_index().values, rel=1e-6, abs=1e-7)
