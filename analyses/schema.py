"""The tidy metric table: one row per (example, explainer, metric, setting), the one schema every table uses.

    rows = tidy_rows(attribution.ids, "rollout", "comprehensiveness", "k=0.2", values)   # values: [batch]
    table = tidy_frame(rows)                   # columns COLUMNS: example_id, explainer, metric, setting, value, note
    check_tidy(table, name="metrics")          # raises, naming the missing columns
    table = normalize_setting(table)           # a missing setting (NaN after a CSV round trip) -> ""

Columns: `TIDY_COLUMNS` (example_id, explainer, metric, setting, value) and, in the faithfulness and
translation tables, `note` (why a value is NaN, else ""). `setting` is always a string: "k=0.05" for a
bin, "aopc", "step=3:encoder.layers.0", ..., "" when the metric has none.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

TIDY_COLUMNS = ("example_id", "explainer", "metric", "setting", "value")
COLUMNS = [*TIDY_COLUMNS, "note"]
CURVE_COLUMNS = ("example_id", "explainer", "curve", "fraction", "prob")   # deletion/insertion curves, one row per step


def tidy_rows(ids: Sequence[str] | None, explainer: str, metric: str, setting: str, values: Iterable, *,
              note: str | None = "") -> list[tuple]:
    """One row per example of `values` ([batch] tensor, array or list) -> (example_id, explainer, metric,
    setting, value, note) tuples; note=None leaves the note out (tables with `TIDY_COLUMNS` only).

    ids: the examples' ids; None or empty: "0", "1", ... (as `Attribution.example_id`).
    """
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    ids = ids or [str(i) for i in range(len(values))]
    if note is None:
        return [(ids[i], explainer, metric, setting, float(v)) for i, v in enumerate(values)]
    return [(ids[i], explainer, metric, setting, float(v), note) for i, v in enumerate(values)]


def tidy_frame(rows: Sequence[tuple], *, note: bool = True) -> pd.DataFrame:
    """Rows from `tidy_rows` -> DataFrame with columns `COLUMNS` (note=False: `TIDY_COLUMNS`)."""
    return pd.DataFrame(rows, columns=COLUMNS if note else list(TIDY_COLUMNS))


def check_tidy(table: pd.DataFrame, *, name: str = "table") -> None:
    """Raise unless `table` has the tidy columns (example_id, explainer, metric, setting, value).

    name: what the message calls the table (e.g. "metrics").
    """
    missing = [c for c in TIDY_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{name} must have the tidy columns {', '.join(TIDY_COLUMNS)}; missing {missing}.")


def normalize_setting(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` whose `setting` column is str, a missing setting being "" (a CSV reads "" back as NaN)."""
    return frame.assign(setting=frame["setting"].fillna("").astype(str))


def step_means(table: pd.DataFrame, example_of: dict[str, str]) -> pd.DataFrame:
    """Generation rows -> one row per example: each (example, explainer, metric, setting)'s mean over its steps.

    A continuation's steps are rows of one example, not independent examples: bootstrap intervals and paired
    tests assume independent units, so a language model's per-step metrics are averaged per example (as the
    encoder–decoder's per-token metrics are). example_of: row id ("id@s", `model.steps.step_batch`) -> example
    id; ids not in it stay as they are. NaN steps are skipped; a mean of no finite step is NaN with the first
    step's note. Row order: first appearance.
    """
    if table.empty:
        return table
    t = table.assign(example_id=table["example_id"].map(lambda i: example_of.get(i, i)))
    keys = [c for c in TIDY_COLUMNS if c != "value"]
    grouped = t.groupby(keys, sort=False, dropna=False)
    out = grouped["value"].mean().reset_index()                        # NaN skipped; all NaN -> NaN
    if "note" in t.columns:
        notes = grouped["note"].agg(lambda n: next((x for x in n if isinstance(x, str) and x), "")).reset_index()
        out = out.merge(notes, on=keys, how="left", sort=False)
        out.loc[out["value"].notna(), "note"] = ""
    return out[list(table.columns)].reset_index(drop=True)


__all__ = ["TIDY_COLUMNS", "COLUMNS", "CURVE_COLUMNS", "tidy_rows", "tidy_frame", "check_tidy", "normalize_setting",
           "step_means"]
