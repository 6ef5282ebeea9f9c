"""Statistics (bootstrap, Holm, Wilcoxon direction) and tables (faithfulness_table, summaries, files)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_perturb import random_attribution

from attnaudit.analyses.stats import (
    HIGHER_IS_BETTER,
    bootstrap_ci,
    direction,
    holm,
    paired_comparisons,
    wilcoxon_paired,
)
from attnaudit.analyses.tables import (
    METRICS,
    faithfulness_table,
    load_tables,
    save_tables,
    summarize,
)
from attnaudit.explain.perturb import PerturbationEngine


# -- statistics ---------------------------------------------------------------------------------
def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    x = np.random.default_rng(0).normal(2.0, 1.0, size=200)
    lo, hi = bootstrap_ci(x, n_boot=500, seed=1)
    assert lo < x.mean() < hi
    assert hi - lo < 0.5                                              # about 4 standard errors of 0.07
    assert (lo, hi) == bootstrap_ci(x, n_boot=500, seed=1)
    assert bootstrap_ci(np.append(x, np.nan), n_boot=500, seed=1) == (lo, hi)     # NaN dropped
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan], n_boot=10))
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_ci(x, level=95)


def test_holm_on_constructed_p_values():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> running max 0.06
    got = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(got, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.3, 0.5, 0.9]), [0.9, 1.0, 1.0])             # capped at 1
    got = holm([0.02, np.nan, 0.01])                                               # NaN: not in the family
    np.testing.assert_allclose(got, [0.02, np.nan, 0.02])
    with pytest.raises(ValueError, match=r"p-values must lie in \[0, 1\]"):
        holm([1.5])


def test_wilcoxon_pairs_and_degenerate_cases():
    a = np.arange(20, dtype=float)
    stat, p = wilcoxon_paired(a + 1.0 + 0.01 * a, a)
    assert p < 0.001
    assert wilcoxon_paired(a, a) == (0.0, 1.0)
    assert all(math.isnan(v) for v in wilcoxon_paired([np.nan], [1.0]))


def tidy(values: dict[str, list[float]], metric: str, setting: str = "") -> pd.DataFrame:
    rows = [(f"e{i}", name, metric, setting, v) for name, vs in values.items() for i, v in enumerate(vs)]
    return pd.DataFrame(rows, columns=["example_id", "explainer", "metric", "setting", "value"])


def test_paired_comparisons_respect_the_direction():
    rng = np.random.default_rng(0)
    base = rng.normal(0.3, 0.1, size=30)
    values = {"good": list(base + 0.2), "random": list(base + rng.normal(0, 0.01, 30)), "bad": list(base - 0.2)}
    high = paired_comparisons(tidy(values, "comprehensiveness"))                  # higher is better
    row = high[(high.reference == "random") & (high.explainer == "good")].iloc[0]
    assert row.verdict == "better" and row.mean_diff > 0 and row.p_holm < 0.001
    assert high[(high.reference == "random") & (high.explainer == "bad")].iloc[0].verdict == "worse"
    assert set(high[high.reference == "best"].reference_explainer) == {"good"}
    low = paired_comparisons(tidy(values, "sufficiency"))                         # lower is better
    assert low[(low.reference == "random") & (low.explainer == "good")].iloc[0].verdict == "worse"
    assert set(low[low.reference == "best"].reference_explainer) == {"bad"}
    fam = high[high.reference == "random"]
    np.testing.assert_allclose(fam.p_holm, holm(fam.p_value))                     # Holm within each family


def test_every_metric_has_a_direction():
    assert all(m in HIGHER_IS_BETTER for m in METRICS)
    assert direction("comprehensiveness") and not direction("sufficiency")
    with pytest.raises(ValueError, match="No direction known for metric 'speed'"):
        direction("speed")
    assert direction("speed", {"speed": True})


# -- tables -------------------------------------------------------------------------------------
def test_faithfulness_table_shares_forwards_between_explainers(tiny_model, tiny_batch):
    a = random_attribution(tiny_model, tiny_batch, seed=0, method="random")
    same = random_attribution(tiny_model, tiny_batch, seed=0, method="copy")      # identical scores, another name
    engine = PerturbationEngine(tiny_model, tiny_batch)
    faithfulness_table(tiny_model, tiny_batch, [a], engine=engine, metrics=METRICS[:6])
    first = engine.stats.forwards
    table = faithfulness_table(tiny_model, tiny_batch, {"random": a, "copy": same}, engine=engine, metrics=METRICS[:6])
    assert engine.stats.forwards == first                                          # nothing new to run
    assert set(table.columns) >= {"example_id", "explainer", "metric", "setting", "value", "note"}
    one = table[table.explainer == "random"].set_index(["example_id", "metric", "setting"]).value
    two = table[table.explainer == "copy"].set_index(["example_id", "metric", "setting"]).value
    pd.testing.assert_series_equal(one, two, check_names=False)
    settings = set(table[table.metric == "comprehensiveness"].setting)
    assert settings == {"k=0.01", "k=0.05", "k=0.1", "k=0.2", "k=0.5", "aopc"}
    assert table.attrs["policy"] == "mask" and table.attrs["engine"]["saved"] > 0


def test_faithfulness_table_records_why_a_metric_does_not_apply(tiny_model, tiny_batch):
    a = random_attribution(tiny_model, tiny_batch, method="random")
    table = faithfulness_table(tiny_model, tiny_batch, [a], metrics=("sensitivity_max", "infidelity"), ferret=True)
    sens = table[table.metric == "sensitivity_max"]
    assert sens.value.isna().all() and (sens.note != "").all()
    assert table[table.metric == "infidelity"].value.notna().all()
    with pytest.raises(ValueError, match="Unknown metric 'speed'. Available: comprehensiveness"):
        faithfulness_table(tiny_model, tiny_batch, [a], metrics=("speed",))


def test_summary_and_files_round_trip(tmp_path):
    table = tidy({"a": [0.1, 0.2, 0.3, np.nan], "b": [0.0, 0.1, 0.1, 0.2]}, "comprehensiveness", "k=0.1")
    table["note"] = ""
    table.attrs["policy"] = "delete"
    summary = summarize(table, n_boot=200)
    row = summary[summary.explainer == "a"].iloc[0]
    assert row.n == 3 and row.n_nan == 1 and math.isclose(row["mean"], 0.2)
    assert row.ci_low <= row["mean"] <= row.ci_high
    for fmt in ("parquet", "csv"):
        folder = tmp_path / fmt
        save_tables({"faithfulness": table, "summary": summary}, folder, format=fmt)
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]        # no temp file left behind
        back = load_tables(folder)
        assert set(back) == {"faithfulness", "summary"}
        pd.testing.assert_frame_equal(back["faithfulness"].reset_index(drop=True), table, check_dtype=False)
        assert back["faithfulness"].attrs["policy"] == "delete"
        assert back["summary"].note.tolist() == [""] * 2
    with pytest.raises(ValueError, match="table names must be file-name safe"):
        save_tables({"../x": table}, tmp_path)
