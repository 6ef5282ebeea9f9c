"""Rank correlation: Spearman's ρ, the one definition (Spearman, 1904).

    spearman([1, 2, 3], [10, 30, 20])                                  # -> 0.5
    spearman([1, 1, 1], [1, 2, 3])                                     # -> nan: a constant side has no ranking
    spearman([1, 1, 1], [1, 2, 3], both_constant=1.0, one_constant=0.0)   # -> 0.0, as map similarity reads it

ρ is the Pearson correlation of the two sides' average ranks (ties share the mean of their ranks):
ρ = Σ r_x r_y / sqrt(Σ r_x² · Σ r_y²) with the ranks centred on their mean (n + 1) / 2.
Kendall's τ_b lives with the faithfulness metric that uses it (`attnaudit.analyses.faithfulness`).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata


def spearman(x, y, *, both_constant: float = math.nan, one_constant: float = math.nan) -> float:
    """Spearman's ρ of two equally long 1-D sequences -> float in [-1, 1] (NaN with fewer than 2 values).

    Args:
        x, y: values (array, tensor on the CPU, Series or list); a NaN in either makes ρ NaN.
        both_constant: ρ when both sides are constant (no spread in either's ranks). NaN by default, which is
            scipy.stats.spearmanr's answer (the counterfactual tests use it); map similarity passes 1.0
            (two constant maps are indistinguishable).
        one_constant: ρ when exactly one side is constant. NaN by default; map similarity passes 0.0 (no
            association).
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) < 2:
        return math.nan
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2   # centred average ranks
    sx, sy = (rx**2).sum(), (ry**2).sum()
    if sx == 0 or sy == 0:
        return both_constant if sx == sy else one_constant
    return float(np.clip((rx * ry).sum() / np.sqrt(sx * sy), -1.0, 1.0))       # identical ranks: exactly 1


__all__ = ["spearman"]
