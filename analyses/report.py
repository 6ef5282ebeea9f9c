"""The report writer: tidy tables in, one folder out (index.html, report.md, results.json, CSV/JSONL, figures).

    out = write_report("reports/keywords", metrics=table, counterfactual=cf, attributions=records,
                       examples=examples, model_cards={"keywords": card}, attention_examples=[att])
    render_report(out)            # re-render index.html, report.md and figures/ from the saved files

`write_report` derives the verdicts (`attnaudit.analyses.verdict`), saves every input it needs as data
files, then calls `render_report`, which reads only those files: the page you get first and the page a
later `attnaudit report OUT` gives are made by the same code from the same bytes.

index.html is one self-contained page: figures are base64 data: URIs, CSS is inline, there is no script,
and a Content-Security-Policy meta tag forbids every fetch but data: images. Every string that came from
a user (tokens, labels, ids, task and explainer names, settings) is HTML-escaped, in text and attributes;
Markdown table cells are escaped; CSV cells that start with = + - @ (formula triggers) get a leading '.
Every file is written atomically (temporary file beside it, fsync, os.replace).
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import platform
import re
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from attnaudit.analyses import figures as F
from attnaudit.analyses.tables import summarize
from attnaudit.analyses.verdict import RULE, Verdict, _jsonable, derive_verdict, headline_settings
from attnaudit.explain.registry import ATTENTION_FAMILY
from attnaudit.model.checkpoint import atomic_write_bytes, atomic_write_text

FORMAT, FORMAT_VERSION = "attnaudit-report", 1
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "'")   # "'" too, so that guarding can be undone exactly
N_EXAMPLES = 3     # correctly and incorrectly classified examples shown per task
FILES = ("index.html", "report.md", "results.json", "metrics.csv", "counterfactual.csv", "counterfactual_permutation.csv",
         "curves.csv", "comparisons.csv", "attributions.jsonl", "examples.jsonl", "attention.json")


# -- writing -------------------------------------------------------------------------------------
def write_report(out_dir, *, metrics: pd.DataFrame, counterfactual=None, comparisons: pd.DataFrame | None = None,
                 attributions: Sequence | None = None, examples: Sequence[Mapping] | None = None,
                 model_cards: Mapping | None = None, attention_examples=None, curves: pd.DataFrame | None = None,
                 settings: Mapping | None = None, timings: Mapping | None = None,
                 title: str = "Can attention explain this model's outputs?") -> Path:
    """Derive the verdicts and write the report folder -> out_dir.

    Args:
        metrics: tidy example_id, explainer, metric, setting, value (+ optional `task` for several tasks).
        counterfactual: its summary (test, layer, head, statistic, value) or `counterfactual_table`'s dict
            (its "summary" and "permutation" frames are used).
        comparisons: explainer, metric, setting, vs/reference, p_holm ...; None -> computed (Wilcoxon + Holm).
        attributions: `Attribution.to_records()` dicts (or Attributions); examples: dicts with id, gold
            (0/1 per token), label, prediction. attention_examples: {"tokens", "attention" [layer, head, q, k],
            "id"} or a list of them. model_cards: {task: card} (or one card). curves: example_id, explainer,
            curve, fraction, prob. Each may carry a `task` column/key; without one it belongs to the only task.
    """
    out = Path(out_dir)
    _check_metrics(metrics)
    default = str((settings or {}).get("task", "default")) if "task" not in metrics.columns else None
    metrics = _with_task(metrics, "metrics", default)
    metrics = metrics.assign(setting=metrics["setting"].fillna("").astype(str))
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

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, frame in (("metrics.csv", metrics), ("counterfactual.csv", cf_summary),
                        ("counterfactual_permutation.csv", permutation), ("curves.csv", curves),
                        ("comparisons.csv", comparisons)):
        if frame is not None:
            atomic_write_text(out / name, guarded_csv(frame))
            files.append(name)
    for name, rows in (("attributions.jsonl", records), ("examples.jsonl", example_rows)):
        if rows:
            atomic_write_text(out / name, "".join(_dumps(r) + "\n" for r in rows))
            files.append(name)
    if attention:
        atomic_write_text(out / "attention.json", _dumps([{**a, "attention": np.round(np.asarray(a["attention"], dtype=float), 5)
                                                           .tolist()} for a in attention]))
        files.append("attention.json")
    results = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "title": str(title),
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tasks": tasks, "verdicts": {t: v.to_dict() for t, v in verdicts.items()},
        "summary": {t: s.to_dict("records") for t, s in summaries.items()},
        "model_cards": cards, "settings": dict(settings or {}), "versions": versions(),
        "device": _device(settings, cards), "timings": dict(timings or {}),
        "files": files + ["results.json", "index.html", "report.md"],
    }
    atomic_write_text(out / "results.json", json.dumps(_jsonable(results), indent=2, ensure_ascii=False, allow_nan=False))
    render_report(out)
    return out


def _check_metrics(metrics) -> None:
    if not isinstance(metrics, pd.DataFrame):
        raise ValueError(f"metrics must be a pandas DataFrame of tidy rows; got {type(metrics).__name__}.")
    missing = [c for c in ("example_id", "explainer", "metric", "setting", "value") if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics must have columns example_id, explainer, metric, setting, value; missing {missing}.")
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
        return {tasks[0]: _jsonable(dict(model_cards))}
    unknown = [t for t in model_cards if str(t) not in tasks]
    if unknown:
        raise ValueError(f"model_cards names tasks {unknown} that metrics does not have; tasks: {tasks}.")
    return {str(t): _jsonable(dict(c)) for t, c in model_cards.items()}


def _attention_list(att) -> list[dict]:
    if att is None:
        return []
    items = [att] if isinstance(att, Mapping) else list(att)
    out = []
    for i, a in enumerate(items):
        if not isinstance(a, Mapping) or "attention" not in a or "tokens" not in a:
            raise ValueError(f"attention_examples[{i}] must be a dict with 'tokens' and 'attention' "
                             f"[layer, head, query, key]; got {type(a).__name__}.")
        F._check_attention(a["attention"], a["tokens"])
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
        out.append(_jsonable({**r, "task": str(task)}))
    return out


def versions() -> dict:
    import attnaudit

    out = {"attnaudit": attnaudit.__version__, "python": platform.python_version()}
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


def _dumps(x) -> str:
    return json.dumps(_jsonable(x), ensure_ascii=False, allow_nan=False)


# -- CSV with formula guards ---------------------------------------------------------------------
def guard_cell(value):
    """A text cell that a spreadsheet would run as a formula gets a leading ' (OWASP CSV injection)."""
    return "'" + value if isinstance(value, str) and value.startswith(CSV_TRIGGERS) else value


def unguard_cell(value):
    return value[1:] if isinstance(value, str) and len(value) > 1 and value[0] == "'" and value[1:].startswith(CSV_TRIGGERS) else value


def guarded_csv(frame: pd.DataFrame) -> str:
    """CSV text with every text cell guarded (numbers are left as numbers, to 6 significant digits)."""
    f = frame.copy()
    for c in f.columns:
        if f[c].dtype == object or pd.api.types.is_string_dtype(f[c]):
            f[c] = f[c].map(guard_cell)
    f.columns = [guard_cell(str(c)) for c in f.columns]
    return f.to_csv(index=False, lineterminator="\n", float_format="%.6g")   # 6 significant digits: plenty, and small


def read_guarded_csv(path: Path, text_columns: Sequence[str]) -> pd.DataFrame:
    cols = pd.read_csv(path, nrows=0).columns
    frame = pd.read_csv(path, dtype={c: str for c in cols if c in text_columns}, keep_default_na=False,
                        na_values=[""])
    for c in frame.columns:
        if frame[c].dtype == object or pd.api.types.is_string_dtype(frame[c]):
            frame[c] = frame[c].map(unguard_cell)
    return frame


# -- loading and rendering -----------------------------------------------------------------------
TEXT_COLUMNS = ("task", "example_id", "explainer", "metric", "setting", "note", "test", "layer", "head", "statistic",
                "curve", "vs", "reference", "reference_explainer", "verdict")


def load_results(out_dir) -> dict:
    """The saved report data -> {"results": dict, "metrics", "counterfactual", "permutation", "curves",
    "comparisons": DataFrame or None, "attributions", "examples", "attention": lists of dicts}."""
    out = Path(out_dir)
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"out_dir must be a folder written by write_report (with results.json); "
                                f"{str(path)!r} does not exist.")
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("format") != FORMAT:
        raise ValueError(f"results.json must have format {FORMAT!r}; got {results.get('format')!r}.")
    loaded = {"results": results}
    for key, name in (("metrics", "metrics.csv"), ("counterfactual", "counterfactual.csv"),
                      ("permutation", "counterfactual_permutation.csv"), ("curves", "curves.csv"),
                      ("comparisons", "comparisons.csv")):
        p = out / name
        frame = read_guarded_csv(p, TEXT_COLUMNS) if p.is_file() else None
        if frame is not None and "setting" in frame.columns:
            frame["setting"] = frame["setting"].fillna("")
        loaded[key] = frame
    for key, name in (("attributions", "attributions.jsonl"), ("examples", "examples.jsonl")):
        p = out / name
        loaded[key] = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line] if p.is_file() else []
    p = out / "attention.json"
    loaded["attention"] = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else []
    return loaded


def _verdicts(metrics, cf_summary, comparisons, cards, tasks) -> tuple[dict, dict]:
    """Per task: the summary table and the verdict, from the tidy tables (all with a task column)."""
    summaries, verdicts = {}, {}
    for task in tasks:
        m = metrics[metrics["task"] == task].drop(columns="task")
        summaries[task] = summarize(m)
        pick = lambda df: None if df is None else df[df["task"] == task].drop(columns="task")  # noqa: E731
        verdicts[task] = derive_verdict(m, task=task, counterfactual=pick(cf_summary), comparisons=pick(comparisons),
                                        model_card=cards.get(task), summary=summaries[task])
    return summaries, verdicts


def render_report(out_dir, *, reverdict: bool = False) -> Path:
    """Re-render index.html, report.md and figures/*.png from the saved files (nothing is recomputed) -> out_dir.

    reverdict: first derive the summaries and verdicts again from the saved tables, with this version's rule
    (results.json is rewritten; its timings and settings are kept). The models are not run again.
    """
    out = Path(out_dir)
    data = load_results(out)
    res = data["results"]
    if reverdict:
        summaries, verdicts = _verdicts(data["metrics"], data["counterfactual"], data["comparisons"],
                                        res["model_cards"], res["tasks"])
        res["verdicts"] = {t: v.to_dict() for t, v in verdicts.items()}
        res["summary"] = {t: sm.to_dict("records") for t, sm in summaries.items()}
        atomic_write_text(out / "results.json", json.dumps(_jsonable(res), indent=2, ensure_ascii=False, allow_nan=False))
    figures = _render_figures(data)
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    for name, (_, png) in figures.items():
        atomic_write_bytes(fig_dir / name, png)
    for stale in fig_dir.glob("*.png"):
        if stale.name not in figures:
            stale.unlink()
    atomic_write_text(out / "index.html", render_html(res, data, figures))
    atomic_write_text(out / "report.md", render_markdown(res, data, figures))
    return out


def _frame(data, key, task):
    f = data.get(key)
    return None if f is None else f[f["task"] == task].drop(columns="task")


def _slug(i: int, task: str) -> str:
    return f"task{i:02d}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", task)[:40]


def _render_figures(data) -> dict[str, tuple[str, bytes]]:
    """file name -> (caption, PNG bytes); the attention views are named with "-attention-"."""
    res, out = data["results"], {}
    for i, task in enumerate(res["tasks"]):
        slug = _slug(i, task)
        summary = pd.DataFrame(res["summary"][task]).astype({"mean": float, "ci_low": float, "ci_high": float})
        summary["setting"] = summary["setting"].fillna("").astype(str)
        cf, perm, curves = _frame(data, "counterfactual", task), _frame(data, "permutation", task), _frame(data, "curves", task)
        records = [r for r in data["attributions"] if r["task"] == task]
        todo = [("summary", "Faithfulness metrics per explainer (mean, 95% bootstrap interval).",
                 lambda: F.metric_summary_figure(summary), True)]
        if curves is not None and len(curves):
            todo.append(("curves", "Deletion and insertion curves (mean, 95% band).", lambda: F.curves_figure(curves), True))
        if summary["metric"].str.startswith(("gold_", "rationale_")).any():
            todo.append(("gold", "Ground-truth recovery per explainer.", lambda: F.gold_figure(summary), True))
        if records:
            todo.append(("agreement", "Agreement between explainers: Kendall τ per example, averaged.",
                         lambda: F.agreement_figure(F.agreement_matrix(records)), True))
        if (summary["metric"] == "randomization_spearman").any():
            todo.append(("sanity", "Sanity check: similarity to the original map as layers are randomised.",
                         lambda: F.sanity_figure(summary), True))
        if perm is not None and len(perm):
            todo.append(("permutation", "Output change under permuted attention vs maximum attention weight.",
                         lambda: F.permutation_figure(perm), True))
        if cf is not None and (cf["test"] == "uniform").any():
            todo.append(("uniform", "Uniform attention, per layer.", lambda: F.uniform_figure(cf), True))
        att = next((a for a in data["attention"] if a["task"] == task), None)
        if att is not None:
            a = np.asarray(att["attention"], dtype=float)
            todo.append(("attention-lines", f"Attention of example {att['id']}: queries (top) to keys (bottom), one "
                         f"colour per head, width and opacity = weight.",
                         lambda a=a, t=att["tokens"]: F.attention_lines_figure(a, t), False))
            todo.append(("attention-grid", f"Attention of example {att['id']}: layer × head grid.",
                         lambda a=a, t=att["tokens"]: F.attention_grid_figure(a, t), False))
        for key, caption, make, _ in todo:
            out[f"{slug}-{key}.png"] = (caption, F.figure_png(make()))
    return out


# -- HTML ----------------------------------------------------------------------------------------
def e(value) -> str:
    """HTML-escape anything for text or a quoted attribute value."""
    return html.escape(str(value), quote=True)


def _num(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#fafafa;color:#222;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:1.6em;margin:.4em 0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.8em}
h3{margin:1.2em 0 .4em}.meta{color:#666;font-size:.85em}
.answer{display:inline-block;padding:2px 12px;border-radius:12px;color:#fff;font-weight:700;text-transform:uppercase}
.answer.yes{background:#2e7d32}.answer.partly{background:#ef6c00}.answer.no{background:#c62828}.answer.undetermined{background:#616161}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top}
th{background:#f3f3f3;text-align:left}.ci{color:#666;font-size:.9em}.badge{font-size:.8em;padding:0 4px;border-radius:3px}
.good{background:#c8e6c9}.bad{background:#ffcdd2}.fam{font-weight:700}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.tok{padding:1px 2px;margin:0 1px;border-radius:3px;white-space:pre}.special{color:#999}
.gold{text-decoration:underline;text-decoration-thickness:2px;text-underline-offset:3px;text-decoration-color:#111}
.sent td{white-space:nowrap}.example{overflow-x:auto;margin-bottom:1.2em}.scroll{overflow-x:auto}
.ranks{font-size:.78em}.ranks th{white-space:nowrap}.ranks tr:first-child th{white-space:normal;overflow-wrap:anywhere}
details{margin:.4em 0}summary{cursor:pointer;color:#333}
"""


def render_html(res: dict, data: dict, figures: dict[str, tuple[str, bytes]]) -> str:
    """The self-contained page, from results.json's dict, the loaded tables and the rendered figures."""
    tasks = res["tasks"]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{e(CSP)}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(res['title'])}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{e(res['title'])}</h1>",
             f'<p class="meta">attnaudit {e(res["versions"].get("attnaudit", "?"))} · created {e(res["created"])} · '
             f'device {e(res["device"])} · tasks: {e(", ".join(tasks))}</p>',
             '<nav><a href="#verdict">1. Verdict</a> · <a href="#model">2. Model card</a> · '
             '<a href="#figures">3. Figures</a> · <a href="#examples">4. Examples</a></nav>',
             '<section id="verdict"><h2>1. Verdict</h2>']
    for task in tasks:
        parts.append(_html_verdict(Verdict.from_dict(res["verdicts"][task]), res["summary"][task]))
    parts.append(f"<details><summary>How the answer is derived</summary><p>{e(RULE)}</p></details></section>")
    parts.append('<section id="model"><h2>2. Model card</h2>')
    for task in tasks:
        card = res["model_cards"].get(task)
        parts.append(f"<h3>Task {e(task)}</h3>" + (_html_kv(_flatten(card)) if card else "<p>No model card given.</p>"))
    parts.append("<h3>Run</h3>" + _html_kv({**{f"version.{k}": v for k, v in res["versions"].items()},
                                           "device": res["device"], **_flatten(res["settings"], "setting"),
                                           **{f"time.{k} (s)": v for k, v in _flatten(res["timings"]).items()}}))
    parts.append('</section><section id="figures"><h2>3. Figures</h2>')
    for i, task in enumerate(tasks):
        parts.append(f"<h3>Task {e(task)}</h3>")
        parts += [_html_figure(name, *figures[name]) for name in figures
                  if name.startswith(_slug(i, task) + "-") and "-attention-" not in name]
    parts.append('</section><section id="examples"><h2>4. Examples</h2>')
    for i, task in enumerate(tasks):
        parts.append(f"<h3>Task {e(task)}</h3>")
        parts.append(_html_examples(task, data, res["model_cards"].get(task) or {}))
        parts += [_html_figure(name, *figures[name]) for name in figures
                  if name.startswith(_slug(i, task) + "-attention-")]
    parts.append("</section><footer><h2>Files</h2><p>" + " · ".join(e(f) for f in res["files"]) + "</p></footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _html_verdict(v: Verdict, summary: list[dict]) -> str:
    s = [f'<article><h3>Task {e(v.task)}: <span class="answer {e(v.answer)}">{e(v.answer)}</span></h3>',
         f"<p>{e(v.paragraph)}</p>", _html_ranks(v, summary)]
    s.append("<details open><summary>Facts</summary><ul>" + "".join(f"<li>{e(f)}</li>" for f in v.facts) + "</ul></details>")
    s.append("<details><summary>Caveats</summary><ul>" + "".join(f"<li>{e(c)}</li>" for c in v.caveats) + "</ul></details>")
    return "".join(s) + "</article>"


def _rank_grid(v: Verdict, summary: list[dict]):
    """(metric columns [(metric, setting)], rows [(explainer, {metric: cell dict})]) for the rank tables."""
    sm = pd.DataFrame(summary)
    if sm.empty:
        return [], []
    sm["setting"] = sm["setting"].fillna("").astype(str)
    cols = list(headline_settings(sm).items())
    ranks = {(r["explainer"], r["metric"]): r for r in v.ranks}
    rows = []
    for name in [m for m in ATTENTION_FAMILY if any(k[0] == m for k in ranks)]:
        rows.append((name, {m: ranks.get((name, m)) for m, _ in cols}))
    best = {m: next((r for r in v.ranks if r["metric"] == m), {}).get("best") for m, _ in cols}
    for label, pick in (("best", lambda m: best[m]), ("random", lambda m: "random")):
        cells = {}
        for m, st in cols:
            hit = sm[(sm["metric"] == m) & (sm["setting"] == st) & (sm["explainer"] == pick(m))]
            cells[m] = None if hit.empty else {**hit.iloc[0].to_dict(), "explainer": pick(m)}
        rows.append((label, cells))
    return cols, rows


def _html_ranks(v: Verdict, summary: list[dict]) -> str:
    cols, rows = _rank_grid(v, summary)
    if not rows:
        return "<p>No headline metric was measured.</p>"
    head = "".join(f"<th>{e(m)}{(' (' + e(st) + ')') if st else ''}</th>" for m, st in cols)
    body = []
    for name, cells in rows:
        tds = []
        for m, _ in cols:
            c = cells[m]
            if not c:
                tds.append("<td>–</td>")
                continue
            ci = f'<span class="ci">[{e(_num(c.get("ci_low")))}, {e(_num(c.get("ci_high")))}]</span>'
            if "rank" in c:
                marks = (f'<span class="badge {"good" if c["near_best"] else "bad"}">{"≈ best" if c["near_best"] else "&lt; best"}</span> '
                         f'<span class="badge {"good" if c["beats_random"] else "bad"}">{"&gt; random" if c["beats_random"] else "not &gt; random"}</span>')
                tds.append(f"<td>rank {e(c['rank'])}/{e(c['n_explainers'])}<br>{e(_num(c['mean']))} {ci}<br>{marks}</td>")
            else:
                tds.append(f"<td>{e(c['explainer'])}<br>{e(_num(c['mean']))} {ci}</td>")
        cls = ' class="fam"' if name in ATTENTION_FAMILY else ""
        body.append(f"<tr><th{cls}>{e(name)}</th>{''.join(tds)}</tr>")
    return (f'<div class="scroll"><table class="ranks"><tr><th>explainer</th>{head}</tr>{"".join(body)}</table></div>'
            '<p class="meta">rank among all explainers (1 = best); mean [95% bootstrap interval]; '
            "≈ best: first or not significantly different from the best (&lt; best: significantly worse); &gt; random: significantly better than random.</p>")


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            out[key] = text if len(text) <= 160 else text[:157] + "…"
    return out


def _html_kv(d: Mapping) -> str:
    return "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in d.items()) + "</table>"


def _html_figure(name: str, caption: str, png: bytes) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<figure><img src="{e(uri)}" alt="{e(caption)}"><figcaption>{e(caption)} ({e(name)})</figcaption></figure>'


def select_examples(task: str, data: dict, card: Mapping) -> list[dict]:
    """Up to N_EXAMPLES correctly and N_EXAMPLES incorrectly classified examples with their records.

    Each item: id, status ("correct"/"incorrect"/"label unknown"), label, prediction, gold (or None), records.
    """
    records = [r for r in data["attributions"] if r["task"] == task]
    by_id: dict = {}
    for r in records:
        by_id.setdefault(str(r["id"]), []).append(r)
    info = {str(x["id"]): x for x in data["examples"] if x["task"] == task and "id" in x}
    names = card.get("label_names") if isinstance(card.get("label_names"), list) else None
    def label(x):
        return f"{x} ({names[x]})" if names and isinstance(x, int) and 0 <= x < len(names) else x
    picked = {"correct": [], "incorrect": [], "label unknown": []}
    for ex_id, recs in by_id.items():
        x = info.get(ex_id, {})
        pred = x.get("prediction", recs[0].get("target"))
        gold_label = x.get("label")
        status = "label unknown" if gold_label is None or pred is None else \
            "correct" if str(gold_label) == str(pred) else "incorrect"
        if len(picked[status]) < N_EXAMPLES:
            gold = x.get("gold", x.get("rationale"))
            if all("words" in r for r in recs):          # sub-word models: show whitespace words
                gold = x.get("word_gold")
                recs = [{**r, "tokens": r["words"], "scores": r["word_scores"], "special": [False] * len(r["words"])}
                        for r in recs]
            picked[status].append(dict(id=ex_id, status=status, label=label(gold_label), prediction=label(pred),
                                       prob=recs[0].get("prob"), gold=gold, records=recs))
    return picked["correct"] + picked["incorrect"] + picked["label unknown"]


def _gold_mask(gold, tokens, special) -> list[bool]:
    """Gold per token: given per token, or per non-special token (mapped onto those positions)."""
    if not gold:
        return [False] * len(tokens)
    gold = [bool(g) for g in gold]
    if len(gold) == len(tokens):
        return gold
    real = [i for i, s in enumerate(special) if not s]
    if len(gold) == len(real):
        mask = [False] * len(tokens)
        for i, g in zip(real, gold):
            mask[i] = g
        return mask
    return [False] * len(tokens)


def _token_spans(rec: dict, gold: list[bool]) -> str:
    scores = np.asarray([np.nan if s is None else s for s in rec["scores"]], dtype=float)
    special = rec.get("special") or [False] * len(scores)
    real = np.array([not s for s in special]) & np.isfinite(scores)
    top = float(np.abs(scores[real]).max()) if real.any() else 0.0
    spans = []
    for tok, s, sp, g in zip(rec["tokens"], scores, special, gold):
        cls = "tok" + (" special" if sp else "") + (" gold" if g else "")
        style = ""
        if not sp and top > 0 and np.isfinite(s):
            a = 0.85 * abs(s) / top
            rgb = "214,39,40" if s >= 0 else "31,119,180"
            style = f' style="background-color:rgba({rgb},{a:.3f})"'
        spans.append(f'<span class="{cls}"{style} title="{e(_num(float(s), 4))}">{e(tok)}</span>')
    return "".join(spans)


def _html_examples(task: str, data: dict, card: Mapping) -> str:
    chosen = select_examples(task, data, card)
    if not chosen:
        return "<p>No attributions were given.</p>"
    pooled = {r.get("word_pooling") for ex in chosen for r in ex["records"]} - {None}
    unit = (f"the words by one explainer (sub-word scores pooled by {', '.join(sorted(pooled))})" if pooled
            else "the tokens by one explainer")
    s = [f'<p class="meta">Each row colours {e(unit)} (red: supports the explained class, blue: '
         "against; opacity = |score| / max); the gold rationale is underlined; special tokens are grey.</p>"]
    for ex in chosen:
        recs = sorted(ex["records"], key=lambda r: F.explainer_order([x["explainer"] for x in ex["records"]]).index(r["explainer"]))
        first = recs[0]
        gold = _gold_mask(ex["gold"], first["tokens"], first.get("special") or [False] * len(first["tokens"]))
        prob = f" · p = {_num(ex['prob'])}" if ex.get("prob") is not None else ""
        s.append(f'<div class="example"><p><b>{e(ex["id"])}</b> · {e(ex["status"])} · label {e(ex["label"])} · '
                 f"prediction {e(ex['prediction'])}{e(prob)}</p><table class=\"sent\">")
        for r in recs:
            cls = ' class="fam"' if r["explainer"] in ATTENTION_FAMILY else ""
            s.append(f"<tr><th{cls}>{e(r['explainer'])}</th><td>{_token_spans(r, gold if len(r['tokens']) == len(gold) else [False] * len(r['tokens']))}</td></tr>")
        s.append("</table></div>")
    return "".join(s)


# -- Markdown ------------------------------------------------------------------------------------
_MD_ESCAPE = {"\\": "\\\\", "`": "\\`", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]", "|": "\\|", "#": "\\#",
              "~": "\\~", "<": "&lt;", ">": "&gt;", "&": "&amp;", "\n": " ", "\r": " "}


def md(value) -> str:
    """Escape text for Markdown (table cells included): no markup, HTML or cell break can come through."""
    return "".join(_MD_ESCAPE.get(ch, ch) for ch in str(value))


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(md(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(res: dict, data: dict, figures: dict[str, tuple[str, bytes]]) -> str:
    tasks = res["tasks"]
    out = [f"# {md(res['title'])}", "",
           f"attnaudit {md(res['versions'].get('attnaudit', '?'))} · created {md(res['created'])} · device {md(res['device'])}",
           "", "## 1. Verdict", ""]
    for task in tasks:
        v = Verdict.from_dict(res["verdicts"][task])
        out += [f"### Task {md(task)}: **{md(v.answer.upper())}**", "", md(v.paragraph), ""]
        cols, rows = _rank_grid(v, res["summary"][task])
        if rows:
            table = []
            for name, cells in rows:
                row = [name]
                for m, _ in cols:
                    c = cells[m]
                    if not c:
                        row.append("–")
                    elif "rank" in c:
                        row.append(f"rank {c['rank']}/{c['n_explainers']}: {_num(c['mean'])} [{_num(c['ci_low'])}, "
                                   f"{_num(c['ci_high'])}]" + (" ≈best" if c["near_best"] else "")
                                   + (" >random" if c["beats_random"] else ""))
                    else:
                        row.append(f"{c['explainer']}: {_num(c['mean'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}]")
                table.append(row)
            out += [_md_table(["explainer"] + [f"{m} ({st})" if st else m for m, st in cols], table), ""]
        out += ["Facts:", ""] + [f"- {md(f)}" for f in v.facts] + ["", "Caveats:", ""] + [f"- {md(c)}" for c in v.caveats] + [""]
    out += [f"Rule: {md(RULE)}", "", "## 2. Model card", ""]
    for task in tasks:
        card = res["model_cards"].get(task)
        out += [f"### Task {md(task)}", "", _md_table(["field", "value"], list(_flatten(card).items())) if card
                else "No model card given.", ""]
    run = {**{f"version.{k}": v for k, v in res["versions"].items()}, "device": res["device"],
           **_flatten(res["settings"], "setting"), **{f"time.{k} (s)": v for k, v in _flatten(res["timings"]).items()}}
    out += ["### Run", "", _md_table(["field", "value"], list(run.items())), "", "## 3. Figures", ""]
    for name, (caption, _) in figures.items():
        out += [f"![{md(caption)}](figures/{name})", ""]
    out += ["## 4. Examples", ""]
    for task in tasks:
        out += [f"### Task {md(task)}", ""]
        for ex in select_examples(task, data, res["model_cards"].get(task) or {}):
            out += [f"**{md(ex['id'])}** ({md(ex['status'])}; label {md(ex['label'])}, prediction {md(ex['prediction'])})", ""]
            rows = []
            for r in ex["records"]:
                scores = [(-math.inf if s is None or sp else s) for s, sp in
                          zip(r["scores"], r.get("special") or [False] * len(r["scores"]))]
                top = sorted(range(len(scores)), key=lambda i: -scores[i])[:3]
                rows.append([r["explainer"], " ".join(r["tokens"]), ", ".join(r["tokens"][i] for i in top)])
            out += [_md_table(["explainer", "tokens", "top 3 tokens"], rows), ""]
    return "\n".join(out) + "\n"


__all__ = ["write_report", "render_report", "load_results", "render_html", "render_markdown", "select_examples",
           "guarded_csv", "read_guarded_csv", "guard_cell", "unguard_cell", "md", "e", "versions", "FILES", "CSP"]
