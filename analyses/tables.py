"""Tidy metric tables: one row per (example, explainer, metric, setting), summaries, and files.

    table = faithfulness_table(model, batch, {"attention": a1, "ig": a2, "random": a0})
    summary = summarize(table)                      # mean and 95% bootstrap interval per explainer/metric/setting
    tests = paired_comparisons(table)               # attnaudit.analyses.stats: vs the best and vs random
    save_tables({"faithfulness": table, "summary": summary}, "runs/x/tables")
    tables = load_tables("runs/x/tables")

Columns: example_id, explainer, metric, setting, value, and `note` (why a value is NaN, else "").
Settings: "k=0.05" for a bin, "aopc" for the mean over bins, "ferret_aopc" for ferret's preset, "" otherwise.
All removal-based metrics of one call share one `PerturbationEngine`, so forwards are shared between
metrics and explainers; its policy and counters are in `table.attrs`.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from torch import Tensor

from attnaudit.analyses import faithfulness as F
from attnaudit.analyses.schema import COLUMNS, check_tidy, tidy_frame, tidy_rows  # noqa: F401  (COLUMNS: imported from here too)
from attnaudit.analyses.stats import bootstrap_ci
from attnaudit.core.io import atomic_write, atomic_write_text
from attnaudit.explain.attribution import Attribution
from attnaudit.explain.perturb import DEFAULT_MAX_BATCH, PerturbationEngine, as_engine, check_policy
from attnaudit.model.interface import Batch

if TYPE_CHECKING:
    from attnaudit.model.interface import ExplainableModel

METRICS = ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc", "decision_flip_fraction",
           "tau_loo", "infidelity", "sensitivity_max")
ENGINE_METRICS = METRICS[:6]      # through the perturbation engine; the last two run captum


def bin_setting(k: float) -> str:
    """The setting label of a bin: 0.05 -> "k=0.05"."""
    return f"k={float(k):g}"


def tau_loo_setting(policy: str) -> str:
    """The setting of a tau_loo row: the replacement policy its leave-one-out inputs used ("policy=mask").
    τ-LOO depends on it: only "policy=delete" is the τ-LOO of ferret and the literature."""
    return f"policy={policy}"


def _named(attributions) -> dict[str, Attribution]:
    if isinstance(attributions, Attribution):
        attributions = [attributions]
    if isinstance(attributions, Mapping):
        named = dict(attributions)
    else:
        attributions = list(attributions)
        names = [a.method for a in attributions if isinstance(a, Attribution)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two attributions share the method name {dup[0]!r}; pass a dict name -> Attribution.")
        named = dict(zip(names, attributions))
    bad = [k for k, v in named.items() if not isinstance(v, Attribution)]
    if not named or bad:
        raise TypeError("attributions must be a non-empty dict[str, Attribution] or list of Attribution; "
                        f"got {type(attributions).__name__}{' with non-Attribution ' + repr(bad[:3]) if bad else ''}.")
    return named


def faithfulness_table(model: ExplainableModel, batch: Batch, attributions: Mapping[str, Attribution] | Sequence[Attribution], *,
                       bins: Sequence[float] = F.ERASER_BINS, policy: str | None = None,
                       max_batch: int = DEFAULT_MAX_BATCH, metrics: Sequence[str] = METRICS,
                       ferret: bool = False, engine: PerturbationEngine | None = None, seed: int = 0,
                       explainers: Mapping | None = None, curve_steps: int | None = None) -> pd.DataFrame:
    """Every faithfulness metric for several explainers on one batch, sharing one engine -> tidy DataFrame.

    Args:
        attributions: name -> Attribution (or a list, named by `method`), all explaining `batch`.
        bins: fractions for comprehensiveness/sufficiency; each gets a "k=…" row and their mean an "aopc" row.
        policy: replacement policy ("mask", "attention" or "delete"); None: the engine's, or "mask".
            ferret's preset always deletes tokens, as ferret does.
        metrics: a subset of METRICS. ferret: add ferret's AOPC preset (setting "ferret_aopc").
        engine: an engine on this batch to share (e.g. with an occlusion run); None builds one.
        explainers: name -> Explainer for sensitivity_max (default: rebuilt from the registry).
        curve_steps: deletion/insertion curves (their AUCs and the decision flip) of examples longer than this
            take curve_steps + 1 evenly spaced steps instead of one per token; None: one per token.
    Returns:
        Rows (example_id, explainer, metric, setting, value, note); attrs hold the policy and engine counters.
    """
    policy = check_policy(policy or (engine.policy if engine is not None else "mask"))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric {unknown[0]!r}. Available: {', '.join(METRICS)}.")
    named = _named(attributions)
    if batch.ids:                                         # an attribution without ids takes the batch's
        named = {k: a if a.ids else replace(a, ids=list(batch.ids)) for k, a in named.items()}
    engine = as_engine(engine if engine is not None else model, batch, policy=policy, max_batch=max_batch)
    bins = F.check_bins(bins)
    opts = dict(policy=policy)
    steps = dict(max_steps=curve_steps)
    rows: list[tuple] = []
    for name, attr in named.items():
        # curves first: comprehensiveness/sufficiency bins and LOO's first step are then cache hits
        if "deletion_auc" in metrics:
            rows += tidy_rows(attr.ids, name, "deletion_auc", "", F.deletion_auc(engine, batch, attr, **opts, **steps))
        if "insertion_auc" in metrics:
            rows += tidy_rows(attr.ids, name, "insertion_auc", "", F.insertion_auc(engine, batch, attr, **opts, **steps))
        if "decision_flip_fraction" in metrics:
            rows += tidy_rows(attr.ids, name, "decision_flip_fraction", "",
                              F.decision_flip_fraction(engine, batch, attr, **opts, **steps))
        for metric, curve in (("comprehensiveness", F.comprehensiveness_curve), ("sufficiency", F.sufficiency_curve)):
            if metric in metrics:
                values = curve(engine, batch, attr, bins=bins, **opts)              # [batch, bin]
                for j, k in enumerate(bins):
                    rows += tidy_rows(attr.ids, name, metric, bin_setting(k), values[:, j])
                rows += tidy_rows(attr.ids, name, metric, "aopc", values.mean(1))
                if ferret:
                    rows += tidy_rows(attr.ids, name, metric, "ferret_aopc", F.ferret_aopc(engine, batch, attr, kind=metric))
        if "tau_loo" in metrics:
            rows += tidy_rows(attr.ids, name, "tau_loo", tau_loo_setting(policy), F.tau_loo(engine, batch, attr, **opts))
        if "infidelity" in metrics:
            rows += _captum_rows(attr, name, "infidelity", lambda: F.infidelity(model, batch, attr, seed=seed))  # noqa: B023
        if "sensitivity_max" in metrics:
            explainer = (explainers or {}).get(name)
            rows += _captum_rows(attr, name, "sensitivity_max",
                                 lambda: F.sensitivity_max(model, batch, attr, explainer=explainer, seed=seed))  # noqa: B023
    table = tidy_frame(rows)
    table.attrs.update(policy=policy, max_batch=engine.max_batch, bins=list(bins), engine=engine.stats.as_dict())
    return table


def _captum_rows(attr: Attribution, name: str, metric: str, compute) -> list[tuple]:
    try:
        return tidy_rows(attr.ids, name, metric, "", compute())
    except F.MetricNotApplicable as e:
        return tidy_rows(attr.ids, name, metric, "", Tensor([float("nan")] * len(attr)), note=str(e))
    except Exception as e:
        raise RuntimeError(f"while computing {metric} for explainer {name!r}: {e}") from e


def summarize(table: pd.DataFrame, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Mean and percentile-bootstrap interval per (explainer, metric, setting) -> DataFrame.

    Columns: explainer, metric, setting, n (non-NaN values), n_nan, mean, ci_low, ci_high, note (the first
    non-empty note, e.g. why a metric was not applicable).
    """
    check_tidy(table)
    out = []
    for (explainer, metric, setting), g in table.groupby(["explainer", "metric", "setting"], sort=False, dropna=False):
        v = pd.to_numeric(g["value"], errors="coerce").to_numpy(dtype=float)
        lo, hi = bootstrap_ci(v, n_boot=n_boot, level=level, seed=seed)
        n = int((~pd.isna(v)).sum())
        notes = [s for s in g["note"].fillna("").astype(str) if s] if "note" in g else []
        out.append(dict(explainer=explainer, metric=metric, setting=setting, n=n, n_nan=len(v) - n,
                        mean=float(pd.Series(v).mean()) if n else float("nan"), ci_low=lo, ci_high=hi,
                        note=notes[0] if notes else ""))
    return pd.DataFrame(out, columns=["explainer", "metric", "setting", "n", "n_nan", "mean", "ci_low", "ci_high", "note"])


# -- files --------------------------------------------------------------------------------------
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_STRING_COLUMNS = ("example_id", "explainer", "metric", "setting", "note", "reference", "reference_explainer", "verdict")
META = "tables.json"


def _parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def save_tables(tables: Mapping[str, pd.DataFrame], folder: str | os.PathLike, *, format: str | None = None) -> dict[str, Path]:
    """Write each table as <name>.parquet (pyarrow importable) or <name>.csv, atomically -> name: path.

    `tables.json` beside them records each table's file and `attrs` (policy, engine counters, ...).
    format: None (parquet if possible), "parquet" or "csv".
    """
    if format not in (None, "parquet", "csv"):
        raise ValueError(f"format must be None, 'parquet' or 'csv'; got {format!r}.")
    if format == "parquet" and not _parquet_available():
        raise ValueError("format='parquet' needs pyarrow; install it (pip install pyarrow) or pass format='csv'.")
    fmt = format or ("parquet" if _parquet_available() else "csv")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / META
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    out = {}
    for name, df in tables.items():
        if not isinstance(name, str) or not _NAME.match(name) or name == Path(META).stem:
            raise ValueError(f"table names must be file-name safe (letters, digits, _ . -) and not 'tables'; got {name!r}.")
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"tables[{name!r}] must be a pandas DataFrame; got {type(df).__name__}.")
        path = folder / f"{name}.{fmt}"
        plain = df.copy()
        plain.attrs = {}
        if fmt == "parquet":
            atomic_write(path, lambda tmp: plain.to_parquet(tmp, index=False))  # noqa: B023
        else:
            atomic_write(path, lambda tmp: plain.to_csv(tmp, index=False, na_rep="NaN"))  # noqa: B023
        for other in ("parquet", "csv"):                   # a stale copy in the other format would shadow it
            stale = folder / f"{name}.{other}"
            if other != fmt and stale.exists():
                stale.unlink()
        meta[name] = {"file": path.name, "attrs": json.loads(json.dumps(df.attrs, default=str))}
        out[name] = path
    atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True))
    return out


def load_tables(folder: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Every <name>.parquet / <name>.csv in `folder` -> {name: DataFrame} (attrs restored from tables.json)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist; write it with save_tables first.")
    meta_path = folder / META
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    out = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix not in (".parquet", ".csv"):
            continue
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            head = pd.read_csv(path, nrows=0).columns
            dtypes = {c: str for c in _STRING_COLUMNS if c in head}
            df = pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=["NaN"])
            for c in dtypes:
                df[c] = df[c].fillna("")
        df.attrs = dict(meta.get(path.stem, {}).get("attrs", {}))
        out[path.stem] = df
    return out
