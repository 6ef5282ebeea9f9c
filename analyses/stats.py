"""Statistics for metric tables: bootstrap confidence intervals, paired Wilcoxon tests, Holm's correction.

    lo, hi = bootstrap_ci(values, n_boot=2000, seed=0)           # 95% percentile interval of the mean
    holm([0.01, 0.04, 0.03])                                      # -> [0.03, 0.06, 0.06]
    paired_comparisons(table)                                     # every explainer vs the best and vs random

Directions live in one dict, `HIGHER_IS_BETTER`; a metric missing from it must be given explicitly.
Percentile bootstrap: Efron & Tibshirani (1993); Wilcoxon signed-rank test: scipy.stats.wilcoxon;
Holm (1979) step-down correction of the family-wise error rate.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from attnaudit.analyses.schema import check_tidy

# metric -> True when a larger value means a more faithful (or more plausible) explanation
HIGHER_IS_BETTER: dict[str, bool] = {
    "alignment_error_rate": False,      # Och & Ney's AER against Sure/Possible gold links
    "alignment_precision": True,
    "alignment_recall": True,
    "bleu": True,                       # the model's greedy translations (explainer "model"), not an explanation
    "exact_match": True,
    "comprehensiveness": True,          # removing the rationale hurts the prediction a lot
    "sufficiency": False,               # the rationale alone keeps the prediction
    "deletion_auc": False,              # the probability falls fast as top tokens go
    "insertion_auc": True,              # the probability rises fast as top tokens come back
    "decision_flip_fraction": False,    # few top tokens suffice to flip the decision
    "tau_loo": True,                    # agrees with leave-one-out importance
    "infidelity": False,
    "sensitivity_max": False,
    "gold_average_precision": True,     # agreement with the gold tokens (analyses/plausibility.py, ERASER's names)
    "gold_auprc": True,
    "gold_precision_at_k": True,
    "rationale_token_f1": True,
    "rationale_iou_f1": True,
    "rationale_average_precision": True,
    "rationale_auprc": True,
    "randomization_spearman": False,    # explanations should change when the weights are randomised
}


def direction(metric: str, directions: Mapping[str, bool] | None = None) -> bool:
    """True if higher is better for `metric` (looked up in `directions`, then HIGHER_IS_BETTER)."""
    table = {**HIGHER_IS_BETTER, **(directions or {})}
    if metric not in table:
        raise ValueError(f"No direction known for metric {metric!r}; pass directions={{{metric!r}: True/False}}. "
                         f"Known: {', '.join(sorted(table))}.")
    return bool(table[metric])


def bootstrap_ci(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaNs dropped) -> (low, high); (nan, nan) if no values.

    Args:
        values: 1-D array-like of per-example scores.
        n_boot: resamples; level: coverage in (0, 1); seed: numpy Generator seed (same seed, same interval).
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1; got {n_boot!r}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}.")
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)               # [n_boot]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN and is not counted).

    Sorted ascending p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1, (m − j + 1)·p_(j)).
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1]; got {p[(p < 0) | (p > 1)][:3].tolist()}.")
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


def wilcoxon_paired(a, b) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of paired samples a, b -> (statistic, p-value).

    Pairs with a NaN are dropped. All differences zero -> (0.0, 1.0): no evidence of a difference.
    Fewer than one non-zero pair -> (nan, nan).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be paired (same shape); got {a.shape} and {b.shape}.")
    ok = ~(np.isnan(a) | np.isnan(b))
    d = a[ok] - b[ok]
    if d.size == 0:
        return math.nan, math.nan
    if np.all(d == 0):
        return 0.0, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # scipy warns about ties and small samples; the p-value stays valid
        res = wilcoxon(a[ok], b[ok], zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def paired_comparisons(table: pd.DataFrame, *, against: Sequence[str] = ("best", "random"), alpha: float = 0.05,
                       directions: Mapping[str, bool] | None = None) -> pd.DataFrame:
    """Every explainer against the best one and against `random`, per (metric, setting), paired by example_id.

    Args:
        table: tidy rows (example_id, explainer, metric, setting, value).
        against: "best" (the explainer with the best mean under the metric's direction) and/or explainer names.
        alpha: significance level for the `verdict` column, applied to Holm-adjusted p-values.
    Returns:
        One row per (metric, setting, reference, explainer): n_pairs, mean_explainer, mean_reference,
        mean_diff (explainer − reference), statistic, p_value, p_holm, verdict ("better", "worse" or
        "no difference"; direction-aware). Holm's family: all explainers against one reference on one
        (metric, setting).
    """
    check_tidy(table)
    rows = []
    for (metric, setting), g in table.groupby(["metric", "setting"], sort=True, dropna=False):
        higher = direction(metric, directions)
        wide = g.pivot_table(index="example_id", columns="explainer", values="value", aggfunc="mean", dropna=False)
        means = wide.mean()
        if means.isna().all():
            continue
        best = means.idxmax() if higher else means.idxmin()
        family_rows = []
        for ref_kind in against:
            ref = best if ref_kind == "best" else ref_kind
            if ref not in wide.columns:
                continue
            family = []
            for name in wide.columns:
                if name == ref:
                    continue
                pair = wide[[name, ref]].dropna()
                stat, p = wilcoxon_paired(pair[name].to_numpy(), pair[ref].to_numpy())
                diff = float((pair[name] - pair[ref]).mean()) if len(pair) else math.nan
                family.append(dict(metric=metric, setting=setting, reference=ref_kind,
                                   reference_explainer=ref, explainer=name, n_pairs=len(pair),
                                   mean_explainer=float(pair[name].mean()) if len(pair) else math.nan,
                                   mean_reference=float(pair[ref].mean()) if len(pair) else math.nan,
                                   mean_diff=diff, statistic=stat, p_value=p))
            adjusted = holm([f["p_value"] for f in family])
            for f, ph in zip(family, adjusted):
                good = f["mean_diff"] > 0 if higher else f["mean_diff"] < 0
                f["p_holm"] = ph
                f["verdict"] = ("no difference" if not (ph < alpha) or f["mean_diff"] == 0
                                else "better" if good else "worse")
            family_rows += family
        rows += family_rows
    cols = ["metric", "setting", "reference", "reference_explainer", "explainer", "n_pairs", "mean_explainer",
            "mean_reference", "mean_diff", "statistic", "p_value", "p_holm", "verdict"]
    return pd.DataFrame(rows, columns=cols)
