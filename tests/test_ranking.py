"""attnaudit.core.ranking.spearman: the one Spearman, with each caller's answer for constant input."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from attnaudit.core.ranking import spearman


def test_spearman_by_hand():
    assert spearman([1, 2, 3], [10, 30, 20]) == 0.5            # centred ranks [-1, 0, 1] · [-1, 1, 0] / 2
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == 1.0         # ties share ranks; identical ranks: exactly 1
    assert spearman([3, 2, 1], [1, 2, 3]) == -1.0


@pytest.mark.parametrize("seed", range(5))
def test_spearman_agrees_with_scipy(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=40), np.round(rng.normal(size=40), 1)   # ties in y
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_constant_and_short_input():
    assert math.isnan(spearman([1.0], [2.0])) and math.isnan(spearman([], []))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1, 1], [2, 2]))   # as scipy: undefined
    similarity = dict(both_constant=1.0, one_constant=0.0)                  # how map similarity reads it
    assert spearman([1, 1, 1], [1, 2, 3], **similarity) == 0.0
    assert spearman([1, 1, 1], [5, 5, 5], **similarity) == 1.0
    assert math.isnan(spearman([1.0, math.nan, 2.0], [1, 2, 3], **similarity))
