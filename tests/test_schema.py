"""attnaudit.analyses.schema: the tidy metric table's columns, rows, check and setting repair."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from attnaudit.analyses.schema import COLUMNS, TIDY_COLUMNS, check_tidy, normalize_setting, tidy_frame, tidy_rows


def test_rows_and_frame():
    rows = tidy_rows(["a", "b"], "rollout", "comprehensiveness", "k=0.2", torch.tensor([0.5, float("nan")]))
    assert rows[0] == ("a", "rollout", "comprehensiveness", "k=0.2", 0.5, "") and math.isnan(rows[1][4])
    assert tidy_rows(None, "x", "m", "", [1, 2], note=None) == [("0", "x", "m", "", 1.0), ("1", "x", "m", "", 2.0)]
    assert list(tidy_frame(rows).columns) == COLUMNS == [*TIDY_COLUMNS, "note"]
    assert list(tidy_frame([], note=False).columns) == list(TIDY_COLUMNS)


def test_check_and_normalize():
    with pytest.raises(ValueError, match=r"metrics must have the tidy columns .*; missing \['setting'\]"):
        check_tidy(pd.DataFrame(columns=["example_id", "explainer", "metric", "value"]), name="metrics")
    frame = pd.DataFrame({"setting": ["k=0.2", float("nan"), None]})
    fixed = normalize_setting(frame)
    assert fixed["setting"].tolist() == ["k=0.2", "", ""] and frame["setting"].isna().sum() == 2   # a copy
