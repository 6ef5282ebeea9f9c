"""Agreement between explainers, against scipy's Kendall τ_b and Spearman ρ computed example by example."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, spearmanr

from attnaudit.analyses.agreement import (
    COLUMNS,
    agreement_table,
    from_mean_tau,
    pairwise_agreement,
    reference_table,
)
from attnaudit.analyses.stats import bootstrap_ci

NAMES = ("attention", "rollout", "saliency", "occlusion")


def records(n_examples=12, seed=0):
    """Attribution records of four explainers: rollout and occlusion follow saliency (plus noise), attention
    does not; integer scores half the time, so ties occur; [CLS] and [SEP] special."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_examples):
        n = int(rng.integers(4, 12))
        base = rng.normal(size=n)
        scores = {"attention": rng.normal(size=n), "rollout": base + 0.3 * rng.normal(size=n),
                  "saliency": base, "occlusion": base + 1.0 * rng.normal(size=n)}
        for name in NAMES:
            s = scores[name] if i % 2 else np.round(scores[name])
            out.append({"task": "t", "id": f"e{i}", "explainer": name, "scores": [9.0, *s.tolist(), 9.0],
                        "special": [True] + [False] * n + [True]})
    return out


def test_per_example_measures_equal_scipy():
    recs = records()
    per = pairwise_agreement(recs).set_index(["example_id", "explainer", "other", "measure"])["value"]
    by = {(r["id"], r["explainer"]): np.asarray(r["scores"][1:-1]) for r in recs}
    checked = 0
    for (ex, a, b, measure), got in per.items():
        x, y = by[ex, a], by[ex, b]
        ref = kendalltau(x, y).statistic if measure == "kendall_tau" else spearmanr(x, y).statistic  # τ_b; ρ
        if np.isnan(ref):
            assert np.isnan(got)
        else:
            assert abs(got - ref) < 1e-12, (ex, a, b, measure)
            checked += 1
    assert checked > 300


def test_table_means_and_intervals():
    recs = records(20)
    table = agreement_table(recs, n_boot=500)
    assert list(table.columns) == COLUMNS and len(table) == len(NAMES) ** 2 * 2
    per = pairwise_agreement(recs)
    for measure in ("kendall_tau", "spearman"):
        v = per[(per.explainer == "rollout") & (per.other == "saliency") & (per.measure == measure)]["value"]
        row = table[(table.explainer == "rollout") & (table.other == "saliency") & (table.measure == measure)].iloc[0]
        assert row["n"] == v.notna().sum() and math.isclose(row["mean"], v.mean())
        assert (row["ci_low"], row["ci_high"]) == bootstrap_ci(v.to_numpy(), n_boot=500, seed=0)
    pivot = table[table.measure == "spearman"].pivot(index="explainer", columns="other", values="mean")
    np.testing.assert_allclose(pivot.to_numpy(), pivot.to_numpy().T)             # symmetric
    assert (np.diag(pivot.to_numpy()) == 1).all()
    # the planted structure: rollout follows saliency closely, occlusion loosely, attention not at all
    assert pivot.loc["rollout", "saliency"] > pivot.loc["occlusion", "saliency"] > 0.3 > abs(pivot.loc["attention", "saliency"])


def test_reference_table_is_abnar_and_zuidemas_view():
    rows = reference_table(agreement_table(records(), n_boot=100))
    assert [name for name, _ in rows] == ["attention", "rollout"]                # attention family only
    assert all(len(cells) == 2 for _, cells in rows)                            # saliency, occlusion
    assert rows[1][1][0]["mean"] > rows[0][1][0]["mean"]


def test_an_example_without_two_scored_tokens_or_with_a_constant_map():
    recs = [{"task": "t", "id": "a", "explainer": n, "scores": [1.0, 2.0, 3.0], "special": [True, False, True]}
            for n in NAMES]
    assert pairwise_agreement(recs).empty
    recs = [{"task": "t", "id": "b", "explainer": n, "scores": [0.0, 1.0, 1.0] if n == "attention" else [0.0, 1.0, 2.0],
             "special": [False] * 3} for n in NAMES]
    per = pairwise_agreement(recs)
    assert per.query("explainer == 'attention' and other == 'saliency'")["value"].notna().all()
    recs[0]["scores"] = [1.0, 1.0, 1.0]                                           # constant: no ranking
    per = pairwise_agreement(recs)
    assert per.query("explainer == 'attention' and other != 'attention'")["value"].isna().all()


def test_old_mean_tau_tables_are_read():
    old = pd.DataFrame({"task": ["t"], "explainer": ["a"], "other": ["b"], "tau": [0.25]})
    new = from_mean_tau(old)
    assert list(new.columns) == COLUMNS and new.iloc[0]["measure"] == "kendall_tau"
    assert new.iloc[0]["mean"] == 0.25 and np.isnan(new.iloc[0]["ci_low"])


def test_the_figure_draws_spearman_with_half_widths_or_an_old_mean_tau():
    from attnaudit.analyses.figures import agreement_figure

    table = agreement_table(records(5), n_boot=50)
    ax = agreement_figure(table).axes[0]
    assert "Spearman" in ax.get_title() and any("±" in t.get_text() for t in ax.texts)
    old = from_mean_tau(table[table.measure == "kendall_tau"].drop(columns=["measure", "n", "ci_low", "ci_high"])
                        .rename(columns={"mean": "tau"}))
    ax = agreement_figure(old).axes[0]
    assert "Kendall" in ax.get_title() and not any("±" in t.get_text() for t in ax.texts)
