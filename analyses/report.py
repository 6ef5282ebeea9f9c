"""The report writer: tidy tables in, one folder out (index.html, report.md, results.json, tables, figures).

    out = write_report("reports/keywords", metrics=table, counterfactual=cf, attributions=records,
                       examples=examples, model_cards={"keywords": card}, attention_examples=[att])
    render_report(out)            # re-render the pages and figures/ from the saved files

`write_report` derives the verdicts (`attnaudit.analyses.verdict`), encodes every input it needs as data
files (`attnaudit.analyses.report_files`: compressed per-example tables, the shown examples' attributions
unless full_tables), reads those bytes back and renders the pages from them (`report_html`, `report_md`,
`figures`): the page you get first and the page a later `attnaudit report OUT` gives are made by the same
code from the same bytes. `render_report` reads a folder of either layout and writes the current one.

The folder is replaced as a whole (`report_files.commit_folder`): a reader sees the previous complete
report or the new complete one, never a mix, and OUT/.attnaudit/ (resume data) is carried over. A full
disk leaves the previous report as it was and raises ReportWriteError naming the space needed.
index.html is self-contained; its Content-Security-Policy allows no fetch and only the attention view's inline
script (by sha256); every user string is HTML-escaped, Markdown cells are escaped, CSV cells that start with
= + - @ get a leading '.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from attnaudit.analyses import figures as F
from attnaudit.analyses.attention_examples import check_saved
from attnaudit.analyses.forwards import split_timed
from attnaudit.analyses.report_files import (
    FORMAT,
    FORMAT_VERSION,
    N_EXAMPLES,
    TEXT_COLUMNS,
    ReportWriteError,
    commit_folder,
    compact,
    compact_attention,
    dumps,
    guard_cell,
    guarded_csv,
    json_lines_text,
    load_files,
    load_results,
    parse_json_lines,
    read_folder,
    read_guarded_csv,
    read_json_lines,
    select_examples,
    unguard_cell,
    upgrade,
)
from attnaudit.analyses.report_html import CSP, SUMMARY_FIGURE, e, render_html, slug
from attnaudit.analyses.report_md import md, render_markdown
from attnaudit.analyses.schema import check_tidy, normalize_setting
from attnaudit.analyses.tables import summarize
from attnaudit.analyses.verdict import derive_verdict, rank_table
from attnaudit.core.io import jsonable
from attnaudit.core.version import __version__

FILES = ("index.html", "report.md", "results.json", "metrics.csv.gz", "counterfactual.csv",
         "counterfactual_permutation.csv", "curves_mean.csv", "curves.csv.gz", "comparisons.csv", "agreement.csv",
         "attributions.jsonl.gz", "examples.jsonl.gz", "attention.json")


# -- writing -------------------------------------------------------------------------------------
def write_report(out_dir, *, metrics: pd.DataFrame, counterfactual=None, comparisons: pd.DataFrame | None = None,
                 attributions: Sequence | None = None, examples: Sequence[Mapping] | None = None,
                 model_cards: Mapping | None = None, attention_examples=None, curves: pd.DataFrame | None = None,
                 settings: Mapping | None = None, timings: Mapping | None = None, forwards: Mapping | None = None,
                 title: str = "Can attention explain this model's outputs?", full_tables: bool = False) -> Path:
    """Derive the verdicts and write the report folder -> out_dir.

    Args:
        metrics: tidy example_id, explainer, metric, setting, value (+ optional `task` for several tasks).
        counterfactual: its summary (test, layer, head, statistic, value) or `counterfactual_table`'s dict
            (its "summary" and "permutation" frames are used).
        comparisons: explainer, metric, setting, vs/reference, p_holm ...; None -> computed (Wilcoxon + Holm).
        attributions: `Attribution.to_records()` dicts (or Attributions); examples: dicts with id, gold
            (0/1 per token), label, prediction. attention_examples: {"tokens", "attention" [layer, head, q, k],
            "id"} or a list of them (the shown examples'; an encoder–decoder's with its cross-attention, see
            `attnaudit.analyses.attention_examples`). model_cards: {task: card} (or one card). curves: example_id, explainer,
            curve, fraction, prob. Each may carry a `task` column/key; without one it belongs to the only task.
        forwards: {task: `analyses.forwards.forward_figures`} (the perturbation engine's forwards per example and
            time per forward): results.json keeps the counts under "forwards" and the times under
            timings["forwards"]; the report shows both with the run's settings and timings.
        full_tables: also keep every attribution record and every per-example curve (default: the shown
            examples' attributions and the mean curves; metrics are always kept in full).
    """
    out = Path(out_dir)
    _check_metrics(metrics)
    default = str((settings or {}).get("task", "default")) if "task" not in metrics.columns else None
    metrics = _with_task(metrics, "metrics", default)
    metrics = normalize_setting(metrics)
    tasks = list(dict.fromkeys(metrics["task"]))
    cf_summary, permutation = _split_counterfactual(counterfactual)
    cf_summary = _with_task(cf_summary, "counterfactual", default, tasks)
    permutation = _with_task(permutation, "counterfactual permutation", default, tasks)
    curves = _with_task(curves, "curves", default, tasks)
    comparisons = _with_task(comparisons, "comparisons", default, tasks)
    cards = _cards(model_cards, tasks)
    records = _task_records([r for a in (attributions or []) for r in (a.to_records() if hasattr(a, "to_records") else [a])],
                            "attributions", tasks)
    example_rows = _task_records(list(examples or []), "examples", tasks)
    attention = _task_records(_attention_list(attention_examples), "attention_examples", tasks)

    summaries, verdicts = _verdicts(metrics, cf_summary, comparisons, cards, tasks)

    files: dict[str, bytes] = {}     # version-1 names, full; `compact` turns them into the folder's files
    for name, frame in (("metrics.csv", metrics), ("counterfactual.csv", cf_summary),
                        ("counterfactual_permutation.csv", permutation), ("curves.csv", curves),
                        ("comparisons.csv", comparisons)):
        if frame is not None:
            files[name] = guarded_csv(frame).encode("utf-8")
    for name, rows in (("attributions.jsonl", records), ("examples.jsonl", example_rows)):
        if rows:
            files[name] = json_lines_text(rows).encode("utf-8")
    if attention:
        files["attention.json"] = dumps(compact_attention(attention)).encode("utf-8")
    results = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "title": str(title),
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tasks": tasks, "verdicts": {t: v.to_dict() for t, v in verdicts.items()},
        "summary": {t: s.to_dict("records") for t, s in summaries.items()},
        "model_cards": cards, "settings": dict(settings or {}), "versions": versions(),
        "device": _device(settings, cards), "timings": dict(timings or {}),
    }
    if forwards:                                  # the counts are the run's; the times go with its timings
        results["forwards"], results["timings"]["forwards"] = split_timed(forwards)
    files["results.json"] = json.dumps(jsonable(results), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return _write_folder(out, compact(files, full_tables=full_tables))


def _check_metrics(metrics) -> None:
    if not isinstance(metrics, pd.DataFrame):
        raise ValueError(f"metrics must be a pandas DataFrame of tidy rows; got {type(metrics).__name__}.")
    check_tidy(metrics, name="metrics")
    if metrics.empty:
        raise ValueError("metrics must hold at least one row; got an empty table.")


def _with_task(frame, name: str, default: str | None, tasks: Sequence[str] | None = None):
    """Add the `task` column (the only task) where it is missing; refuse when the task is ambiguous."""
    if frame is None:
        return None
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame; got {type(frame).__name__}.")
    frame = frame.copy()
    if "task" in frame.columns:
        frame["task"] = frame["task"].astype(str)
        return frame
    if default is None and (tasks is None or len(tasks) != 1):
        raise ValueError(f"{name} must have a 'task' column when metrics holds several tasks ({list(tasks or [])}).")
    frame.insert(0, "task", default if default is not None else tasks[0])
    return frame


def _split_counterfactual(cf):
    if cf is None:
        return None, None
    if isinstance(cf, pd.DataFrame):
        return cf, None
    if isinstance(cf, Mapping) and "summary" in cf:
        return cf["summary"], cf.get("permutation")
    raise ValueError(f"counterfactual must be a summary DataFrame or counterfactual_table()'s dict with a "
                     f"'summary' key; got {type(cf).__name__}.")


def _cards(model_cards, tasks) -> dict:
    if not model_cards:
        return {}
    if not isinstance(model_cards, Mapping):
        raise ValueError(f"model_cards must be a dict {{task: card}} (or one card); got {type(model_cards).__name__}.")
    if "architecture" in model_cards:
        if len(tasks) != 1:
            raise ValueError(f"model_cards must be {{task: card}} when there are several tasks ({tasks}); got one card.")
        return {tasks[0]: jsonable(dict(model_cards))}
    unknown = [t for t in model_cards if str(t) not in tasks]
    if unknown:
        raise ValueError(f"model_cards names tasks {unknown} that metrics does not have; tasks: {tasks}.")
    return {str(t): jsonable(dict(c)) for t, c in model_cards.items()}


def _attention_list(att) -> list[dict]:
    if att is None:
        return []
    items = [att] if isinstance(att, Mapping) else list(att)
    out = []
    for i, a in enumerate(items):
        if not isinstance(a, Mapping) or "attention" not in a or "tokens" not in a:
            raise ValueError(f"attention_examples[{i}] must be a dict with 'tokens' and 'attention' "
                             f"[layer, head, query, key]; got {type(a).__name__}.")
        check_saved(a, f"attention_examples[{i}]")
        out.append({"id": str(a.get("id", i)), **{k: v for k, v in a.items() if k != "id"}})
    return out


def _task_records(rows: list, name: str, tasks: Sequence[str]) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"{name}[{i}] must be a dict; got {type(r).__name__}.")
        task = r.get("task")
        if task is None:
            if len(tasks) != 1:
                raise ValueError(f"{name}[{i}] must have a 'task' key when metrics holds several tasks ({tasks}).")
            task = tasks[0]
        out.append(jsonable({**r, "task": str(task)}))
    return out


def versions() -> dict:
    out = {"attnaudit": __version__, "python": platform.python_version()}
    for pkg in ("torch", "captum", "pandas", "numpy", "scipy", "matplotlib", "seaborn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _device(settings, cards) -> str:
    if settings and settings.get("device"):
        return str(settings["device"])
    for card in cards.values():
        if card.get("device"):
            return str(card["device"])
    return "unknown"


def _verdicts(metrics, cf_summary, comparisons, cards, tasks) -> tuple[dict, dict]:
    """Per task: the summary table and the verdict, from the tidy tables (all with a task column)."""
    summaries, verdicts = {}, {}
    for task in tasks:
        m = metrics[metrics["task"] == task].drop(columns="task")
        summaries[task] = summarize(m)
        pick = lambda df: None if df is None else df[df["task"] == task].drop(columns="task")  # noqa: B023, E731
        verdicts[task] = derive_verdict(m, task=task, counterfactual=pick(cf_summary), comparisons=pick(comparisons),
                                        model_card=cards.get(task), summary=summaries[task])
    return summaries, verdicts


def render_report(out_dir, *, reverdict: bool = False, full_tables: bool | None = None,
                  attention: Sequence[Mapping] | None = None) -> Path:
    """Re-render index.html, report.md and figures/*.png from the saved files (nothing is recomputed) -> out_dir.

    A folder of the older layout (plain metrics.csv, curves.csv, attributions.jsonl ...) is rewritten in this
    one and the superseded files are removed. reverdict: first derive the summaries and verdicts again from
    the saved tables with this version's rule (results.json keeps its timings and settings; no model runs);
    always done for a folder of format_version 1-2, whose measures `upgrade` renames first.
    full_tables: keep every attribution and per-example curve; None: as the folder has them when it is of
    this layout, else (an older folder) only what the report shows.
    attention: saved attention examples (with "task") that replace attention.json's, e.g.
    `attention_examples.shown_attention_from_model` for a report made before every shown example was saved.
    """
    out = Path(out_dir)
    original = read_folder(out)
    files, upgraded = upgrade(original)
    reverdict = reverdict or upgraded               # the old summaries and verdicts name the old measures
    if attention is not None:
        files = {**files, "attention.json": json.dumps(jsonable(list(attention)), ensure_ascii=False,
                                                       allow_nan=False).encode("utf-8")}
    data = load_files(files)
    res = data["results"]
    if full_tables is None:
        layout = json.loads(original["results.json"].decode("utf-8")).get("format_version")
        full_tables = int(layout or 1) >= 2 and res.get("tables", {}).get(
            "attributions.jsonl.gz", "full") == "full" and ("curves.csv.gz" in files or "curves_mean.csv" not in files)
    if reverdict:
        summaries, verdicts = _verdicts(data["metrics"], data["counterfactual"], data["comparisons"],
                                        res["model_cards"], res["tasks"])
        res["verdicts"] = {t: v.to_dict() for t, v in verdicts.items()}
        res["summary"] = {t: sm.to_dict("records") for t, sm in summaries.items()}
        files = {**files, "results.json": json.dumps(jsonable(res), ensure_ascii=False, allow_nan=False).encode("utf-8")}
    return _write_folder(out, compact(files, full_tables=full_tables))


def _write_folder(out: Path, files: dict[str, bytes]) -> Path:
    """The data files -> the pages and figures drawn from exactly those bytes -> the whole folder, at once."""
    data = load_files(files)
    res = data["results"]
    figures = _render_figures(data)
    pages = {f"figures/{name}": png for name, (_, png) in figures.items()}
    pages["index.html"] = render_html(res, data, figures).encode("utf-8")
    pages["report.md"] = render_markdown(res, data, figures).encode("utf-8")
    return commit_folder(out, {**files, **pages})


def _frame(data, key, task):
    f = data.get(key)
    return None if f is None else f[f["task"] == task].drop(columns="task")


def _summary_frame(res, task) -> pd.DataFrame:
    summary = pd.DataFrame(res["summary"][task])
    if summary.empty:
        return pd.DataFrame(columns=["explainer", "metric", "setting", "n", "mean", "ci_low", "ci_high"])
    summary = summary.astype({"mean": float, "ci_low": float, "ci_high": float})
    return normalize_setting(summary)


def _render_figures(data) -> dict[str, tuple[str, bytes]]:
    """file name -> (caption, PNG bytes); the summary figure first; the attention views named with "-attention-"."""
    res, out = data["results"], {}
    ranks = {t: rank_table(_summary_frame(res, t)) for t in res["tasks"] if not _summary_frame(res, t).empty}
    out[SUMMARY_FIGURE] = ("Each explainer's rank on each headline measure (1 = best; attention family boxed). "
                           "The verdict's numbers are in the evidence tables below.",
                           F.figure_png(F.rank_summary_figure(ranks)))
    for i, task in enumerate(res["tasks"]):
        name = slug(i, task)
        summary = _summary_frame(res, task)
        cf, perm = _frame(data, "counterfactual", task), _frame(data, "permutation", task)
        curves = _frame(data, "curves_mean", task)
        if curves is None:
            curves = _frame(data, "curves", task)
        agreement = _frame(data, "agreement", task)
        todo = [("summary", "Faithfulness metrics per explainer (mean, 95% bootstrap interval).",
                 lambda: F.metric_summary_figure(summary))]  # noqa: B023
        if curves is not None and len(curves):
            todo.append(("curves", "Deletion and insertion curves (mean, 95% band).", lambda: F.curves_figure(curves)))  # noqa: B023
        if summary["metric"].str.startswith(("gold_", "rationale_")).any():
            todo.append(("gold", "Ground-truth recovery per explainer.", lambda: F.gold_figure(summary)))  # noqa: B023
        if agreement is not None and len(agreement):
            todo.append(("agreement", "Agreement between explainers: rank correlation of their token scores per "
                         "example, mean over all examples ± half its 95% bootstrap interval.",
                         lambda: F.agreement_figure(agreement)))  # noqa: B023
        if (summary["metric"] == "randomization_spearman").any():
            todo.append(("sanity", "Sanity check: similarity to the original map as layers are randomised.",
                         lambda: F.sanity_figure(summary)))  # noqa: B023
        if perm is not None and len(perm):
            todo.append(("permutation", "Output change under permuted attention vs maximum attention weight.",
                         lambda: F.permutation_figure(perm)))  # noqa: B023
        if cf is not None and (cf["test"] == "uniform").any():
            todo.append(("uniform", "Uniform attention, per layer.", lambda: F.uniform_figure(cf)))  # noqa: B023
        generation = F.generation_records([r for r in data["attributions"] if r.get("task") == task])
        if generation is not None:
            gen_id, by_method = generation
            names = (res.get("model_cards") or {}).get(task, {}).get("label_names") or []
            steps = by_method[next(iter(by_method))]
            said = [str(names[r["target"]]) if isinstance(r.get("target"), int) and 0 <= r["target"] < len(names)
                    else None for r in steps]
            tokens = said if all(t is not None for t in said) else None
            side = "source" if "target_token" in steps[0] else "prompt"
            todo.append(("generation", f"Example {gen_id}: each target token (rows) attributed to the {side}'s tokens "
                         "(columns), one panel per explainer; each row scaled by its largest |score|.",
                         lambda by_method=by_method, tokens=tokens: F.generation_figure(by_method, tokens)))
        att = next((a for a in data["attention"] if a["task"] == task), None)       # the first shown example's
        if att is not None and len(att["tokens"]) == len(att.get("key_tokens") or att["tokens"]):
            a = np.asarray(att["attention"], dtype=float)
            n_all = int(att.get("n_positions", a.shape[2]))
            part = f" (its first {a.shape[2]} of {n_all} positions)" if n_all > a.shape[2] else ""
            todo.append(("attention-lines", f"Attention of example {att['id']}{part}: queries (top) to keys (bottom), "
                         "one colour per head, width and opacity = weight.",
                         lambda a=a, t=att["tokens"]: F.attention_lines_figure(a, t)))
            todo.append(("attention-grid", f"Attention of example {att['id']}{part}: layer × head grid.",
                         lambda a=a, t=att["tokens"]: F.attention_grid_figure(a, t)))
        for key, caption, make in todo:
            out[f"{name}-{key}.png"] = (caption, F.figure_png(make()))
    return out


__all__ = ["write_report", "render_report", "load_results", "render_html", "render_markdown", "select_examples",
           "guarded_csv", "read_guarded_csv", "guard_cell", "unguard_cell", "md", "e", "versions", "FILES", "CSP",
           "read_json_lines", "parse_json_lines", "ReportWriteError", "N_EXAMPLES", "TEXT_COLUMNS", "FORMAT_VERSION"]
