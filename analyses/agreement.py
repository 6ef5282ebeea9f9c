"""Agreement between explainers: rank correlations of their token scores per example, with bootstrap intervals.

    per_example = pairwise_agreement(records)        # task, example_id, explainer, other, measure, value
    table = agreement_table(records)                 # task, explainer, other, measure, n, mean, ci_low, ci_high
    table[table.measure == "spearman"]               # Abnar & Zuidema's comparison, with intervals

Abnar & Zuidema (2020, "Quantifying Attention Flow in Transformers") read their explainers by how well they
correlate, example by example, with input gradients and with blank-out (occlusion) importance; this is that
analysis for every pair of explainers the audit ran. Per example, over the scored (non-special) tokens:

    kendall_tau  τ_b = Σ s_a·s_b / √(Σ s_a² · Σ s_b²) over token pairs, s = sign(x_i − x_j) (ties give 0)
    spearman     ρ = the Pearson correlation of the average ranks (`attnaudit.core.ranking.spearman`)

An example counts for a pair only where both explainers scored the same tokens and neither is constant on
them (NaN otherwise; n says how many counted). mean is the mean over examples, ci_low / ci_high its 95%
percentile bootstrap interval (`stats.bootstrap_ci`, 2000 resamples, seed 0). The table is symmetric and
holds the diagonal (1 where an explainer is not constant).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from attnaudit.analyses.stats import bootstrap_ci

MEASURES = ("kendall_tau", "spearman")
COLUMNS = ["task", "explainer", "other", "measure", "n", "mean", "ci_low", "ci_high"]
# Abnar & Zuidema's references: input gradients and blank-out importance (and their relatives the audit runs)
REFERENCES = ("saliency", "input_x_gradient", "integrated_gradients", "occlusion")


def kendall_matrix(x: np.ndarray) -> np.ndarray:
    """τ_b between every two rows of x [explainer, token] -> [explainer, explainer] (NaN: a constant row)."""
    i, j = np.triu_indices(x.shape[1], k=1)
    s = np.sign(x[:, i] - x[:, j])                                                  # [explainer, token pair]
    norm = np.sqrt((s ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (s @ s.T) / np.outer(norm, norm)


def spearman_matrix(x: np.ndarray) -> np.ndarray:
    """Spearman's ρ between every two rows of x [explainer, token] -> [explainer, explainer] (NaN: constant)."""
    r = rankdata(x, axis=1)
    r = r - r.mean(1, keepdims=True)                                                # centred average ranks
    norm = np.sqrt((r ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip((r @ r.T) / np.outer(norm, norm), -1.0, 1.0)


def pairwise_agreement(records: Sequence[dict]) -> pd.DataFrame:
    """Both measures for every ordered pair of explainers on every example -> long DataFrame (task, example_id,
    explainer, other, measure, value). records: attribution records (task, id, explainer, scores, special)."""
    by_example: dict = {}
    for r in records:
        by_example.setdefault((r.get("task"), str(r["id"])), {})[r["explainer"]] = r
    rows = []
    for (task, ex_id), recs in by_example.items():
        if len(recs) < 2 or len({len(r["scores"]) for r in recs.values()}) != 1:
            continue
        first = next(iter(recs.values()))
        keep = ~np.asarray(first.get("special") or [False] * len(first["scores"]), dtype=bool)
        if keep.sum() < 2:
            continue
        names = list(recs)
        x = np.array([np.asarray(recs[n]["scores"], dtype=float)[keep] for n in names])   # [explainer, token]
        for measure, values in (("kendall_tau", kendall_matrix(x)), ("spearman", spearman_matrix(x))):
            rows += [(task, ex_id, a, b, measure, float(values[i, j]))
                     for i, a in enumerate(names) for j, b in enumerate(names)]
    return pd.DataFrame(rows, columns=["task", "example_id", "explainer", "other", "measure", "value"])


def agreement_table(records: Sequence[dict], *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean and bootstrap interval of each measure per task and pair of explainers -> DataFrame of COLUMNS."""
    per = pairwise_agreement(records)
    rows, done = [], {}
    for (task, a, b, measure), g in per.groupby(["task", "explainer", "other", "measure"], sort=False, dropna=False):
        key = (task, *sorted((a, b)), measure)                                      # symmetric: one bootstrap
        if key not in done:
            v = g["value"].to_numpy()
            v = v[~np.isnan(v)]
            done[key] = (len(v), float(v.mean()) if len(v) else np.nan, *bootstrap_ci(v, n_boot=n_boot, seed=seed))
        rows.append((task, a, b, measure, *done[key]))
    return pd.DataFrame(rows, columns=COLUMNS)


def reference_table(table: pd.DataFrame, *, measure: str = "spearman") -> list[tuple[str, list[dict | None]]]:
    """Abnar & Zuidema's view of one task's `agreement_table`: each attention-family explainer (rows) against the
    REFERENCES it ran with -> [(explainer, [{mean, ci_low, ci_high, n} or None per reference])]; the references are
    `reference_columns(table)`. Empty when the task has no attention explainer or no reference."""
    from attnaudit.explain.registry import ATTENTION_FAMILY

    refs = reference_columns(table)
    t = table[table["measure"] == measure].set_index(["explainer", "other"])
    names = [n for n in ATTENTION_FAMILY if n in set(table["explainer"])]
    if not refs or not names:
        return []
    cell = lambda a, b: t.loc[(a, b), ["mean", "ci_low", "ci_high", "n"]].to_dict() if (a, b) in t.index else None  # noqa: E731
    return [(a, [cell(a, b) for b in refs]) for a in names]


def reference_columns(table: pd.DataFrame) -> list[str]:
    """The REFERENCES present in an agreement table, in REFERENCES' order."""
    return [r for r in REFERENCES if r in set(table["other"])]


def from_mean_tau(frame: pd.DataFrame) -> pd.DataFrame:
    """An agreement.csv of format_version ≤ 2 (task, explainer, other, tau: mean Kendall τ, no interval) -> COLUMNS
    with measure kendall_tau and n, ci_low, ci_high missing."""
    out = frame.rename(columns={"tau": "mean"}).assign(measure="kendall_tau", n=np.nan, ci_low=np.nan, ci_high=np.nan)
    return out[COLUMNS]


__all__ = ["MEASURES", "COLUMNS", "REFERENCES", "kendall_matrix", "spearman_matrix", "pairwise_agreement",
           "agreement_table", "reference_table", "reference_columns", "from_mean_tau"]
