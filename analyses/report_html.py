"""index.html: one self-contained page that answers in its first screen, then shows the evidence.

    page = render_html(results, data, figures)     # results.json's dict, `load_files`'s tables, {name: (caption, png)}

Order: the title; per task the verdict (badge and paragraph, id="verdict-<task>"); one summary figure of
every explainer's rank per measure (id="summary-figure"); the evidence (rank tables, facts, caveats,
figures); plausibility against human rationales where the metrics hold rationale_*; examples; model
cards and settings folded in <details>, each setting once; the files. After the verdict, where a task has
attention examples (those of its shown examples), its interactive head and model views, one Example choice
per shown example, with the audit's evidence beside them (`attnaudit.analyses.attention_view.report_section`).

Figures are base64 data: URIs, CSS is inline, and a Content-Security-Policy meta tag forbids every fetch
but data: images and every script but the attention view's one inline script, allowed by its sha256. Every string that came from a user (tokens, labels, ids, task and
explainer names, settings) goes through `e`, in text and attributes.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd

from attnaudit.analyses import figures as F
from attnaudit.analyses.agreement import reference_columns, reference_table
from attnaudit.analyses.attention_view import report_section, script_csp_source
from attnaudit.analyses.report_files import select_examples
from attnaudit.analyses.schema import normalize_setting
from attnaudit.analyses.verdict import DEFINITIONS, RULE, Verdict, headline_settings
from attnaudit.explain.registry import ATTENTION_FAMILY

CSP = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {script_csp_source()}"
RATIONALE_METRICS = (("rationale_token_f1", "token F1"), ("rationale_iou_f1", "IOU F1"),
                     ("rationale_average_precision", "average precision"), ("rationale_auprc", "AUPRC"))
SUMMARY_FIGURE = "summary-ranks.png"


def e(value) -> str:
    """HTML-escape anything for text or a quoted attribute value."""
    return html.escape(str(value), quote=True)


def num(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def count(x) -> str:
    return "–" if x is None or not math.isfinite(float(x)) else str(int(x))


def slug(i: int, task: str) -> str:
    return f"task{i:02d}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", task)[:40]


def verdict_id(i: int, task: str, tasks) -> str:
    """id="verdict-<task>" (letters, digits, _ and - only); the index is added when two tasks would clash."""
    clean = lambda t: re.sub(r"[^A-Za-z0-9_-]", "_", t)[:40]  # noqa: E731
    name = clean(task)
    return f"verdict-{name}" if [clean(t) for t in tasks].count(name) == 1 else f"verdict-{i}-{name}"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#fafafa;color:#222;line-height:1.45}
main{max-width:1280px;margin:0 auto;padding:12px 24px 48px;background:#fff}
h1{font-size:1.5em;margin:.3em 0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.6em}
h3{margin:1em 0 .4em}.meta{color:#666;font-size:.85em;margin:.2em 0}
.top{display:grid;grid-template-columns:minmax(280px,2fr) 3fr;gap:0 24px;align-items:start}
.top.alone{grid-template-columns:1fr}@media (max-width:900px){.top{grid-template-columns:1fr}}
.verdict h3{margin:.4em 0 .1em}.verdict p{margin:.1em 0 .2em}.verdict details{margin:0 0 .3em;font-size:.9em}
.answer{display:inline-block;padding:2px 12px;border-radius:12px;color:#fff;font-weight:700;text-transform:uppercase}
.answer.yes{background:#2e7d32}.answer.partly{background:#ef6c00}.answer.no{background:#c62828}.answer.undetermined{background:#616161}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top}
td,th{overflow-wrap:break-word}th{background:#f3f3f3;text-align:left}.ci{color:#666;font-size:.9em}
.badge{font-size:.8em;padding:0 4px;border-radius:3px}.good{background:#c8e6c9}.bad{background:#ffcdd2}.fam{font-weight:700}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
#summary-figure{margin:.6em 0}#summary-figure img{max-width:100%;max-height:72vh;width:auto;height:auto}
.sent td span{padding:1px 2px;border-radius:3px;white-space:pre-wrap;overflow-wrap:anywhere}.sent .s{color:#999}
.sent .g{text-decoration:underline;text-decoration-thickness:2px;text-underline-offset:3px;text-decoration-color:#111}
.p1{background:rgba(214,39,40,0.085)}.n1{background:rgba(31,119,180,0.085)}.p2{background:rgba(214,39,40,0.170)}.n2{background:rgba(31,119,180,0.170)}.p3{background:rgba(214,39,40,0.255)}.n3{background:rgba(31,119,180,0.255)}.p4{background:rgba(214,39,40,0.340)}.n4{background:rgba(31,119,180,0.340)}.p5{background:rgba(214,39,40,0.425)}.n5{background:rgba(31,119,180,0.425)}.p6{background:rgba(214,39,40,0.510)}.n6{background:rgba(31,119,180,0.510)}.p7{background:rgba(214,39,40,0.595)}.n7{background:rgba(31,119,180,0.595)}.p8{background:rgba(214,39,40,0.680)}.n8{background:rgba(31,119,180,0.680)}.p9{background:rgba(214,39,40,0.765)}.n9{background:rgba(31,119,180,0.765)}.p10{background:rgba(214,39,40,0.850)}.n10{background:rgba(31,119,180,0.850)}
.sent{table-layout:fixed;width:100%}.sent th{width:11em}.sent td{white-space:normal;overflow-wrap:anywhere;line-height:1.8}
.example{margin-bottom:1.2em}.example p{overflow-wrap:anywhere}.scroll{overflow-x:auto}
.ranks{font-size:.78em}.ranks th{white-space:nowrap}.ranks tr:first-child th{white-space:normal;overflow-wrap:break-word}
details{margin:.4em 0}summary{cursor:pointer;color:#333}
"""


def verdict_lines(v: Verdict) -> tuple[str, str]:
    """The verdict paragraph as (headline, why): its first sentence after "Task T: answer." (what the answer
    means), and the rest up to the caveats, which the page lists separately."""
    lines = v.paragraph.partition(" Caveats: ")[0]
    prefix = f"Task {v.task}: {v.answer}."
    lines = lines[len(prefix):].strip() if lines.startswith(prefix) else lines
    head, dot, rest = lines.partition(". ")
    return (head + dot).strip() if rest else lines, rest.strip()


def render_html(res: dict, data: dict, figures: dict[str, tuple[str, bytes]]) -> str:
    """The self-contained page, from results.json's dict, the loaded tables and the rendered figures."""
    tasks = res["tasks"]
    plaus = [t for t in tasks if rationale_rows(res["summary"][t])]
    aligned = [t for t in tasks if alignment_table(res["summary"][t])]
    agreeing = {t: a for t in tasks if (a := task_agreement(data, t))}
    attention = report_section(res, data, ids={t: f"attention-{slug(i, t)}" for i, t in enumerate(tasks)})
    nav = [("verdict", "Verdict")] + ([("attention", "Attention")] if attention else []) + [("evidence", "Evidence")] \
        + ([("plausibility", "Plausibility")] if plaus else []) \
        + ([("agreement", "Agreement")] if agreeing else []) \
        + ([("alignment", "Alignment")] if aligned else []) \
        + [("examples", "Examples"), ("model", "Model and settings")]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{e(CSP)}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(res['title'])}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{e(res['title'])}</h1>",
             f'<p class="meta">attnaudit {e(res["versions"].get("attnaudit", "?"))} · created {e(res["created"])} · '
             f'device {e(res["device"])} · tasks: {e(", ".join(tasks))} · '
             + " · ".join(f'<a href="#{k}">{v}</a>' for k, v in nav) + "</p>",
             f'<section id="verdict"><div class="top{"" if SUMMARY_FIGURE in figures else " alone"}"><div class="verdicts">']
    for i, task in enumerate(tasks):
        v = Verdict.from_dict(res["verdicts"][task])
        headline, why = verdict_lines(v)
        parts.append(f'<article class="verdict" id="{e(verdict_id(i, task, tasks))}"><h3>Task {e(task)}: '
                     f'<span class="answer {e(v.answer)}">{e(v.answer)}</span></h3><p>{e(headline)}</p>'
                     + (f"<details{' open' if len(tasks) == 1 else ''}><summary>Why</summary><p>{e(why)}</p></details>"
                        if why else "")
                     + (f"<details><summary>Caveats ({len(v.caveats)})</summary><ul>"
                        + "".join(f"<li>{e(c)}</li>" for c in v.caveats) + "</ul></details>" if v.caveats else "")
                     + "</article>")
    parts.append("</div>")
    if SUMMARY_FIGURE in figures:
        caption, png = figures[SUMMARY_FIGURE]
        parts.append(_html_figure(SUMMARY_FIGURE, caption, png, fid="summary-figure"))
    parts.append("</div>")
    parts.append(f"<details><summary>How the answer is derived</summary><p>{e(RULE)}</p></details>"
                 "<details><summary>What the measures mean</summary><dl>"
                 + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in DEFINITIONS) + "</dl></details></section>")
    if attention:
        parts.append(attention)
    parts.append('<section id="evidence"><h2>Evidence</h2>')
    for i, task in enumerate(tasks):
        v = Verdict.from_dict(res["verdicts"][task])
        parts.append(f"<h3>Task {e(task)}</h3>" + _html_ranks(v, res["summary"][task]))
        parts.append("<details open><summary>Facts</summary><ul>" + "".join(f"<li>{e(f)}</li>" for f in v.facts)
                     + "</ul></details><details><summary>Caveats</summary><ul>"
                     + "".join(f"<li>{e(c)}</li>" for c in v.caveats) + "</ul></details>")
        parts += [_html_figure(name, *figures[name]) for name in figures
                  if name.startswith(slug(i, task) + "-") and "-attention-" not in name]
    parts.append("</section>")
    if plaus:
        parts.append('<section id="plausibility"><h2>Plausibility: agreement with human rationales</h2>'
                     '<p class="meta">Per explainer: mean over examples with a rationale [95% bootstrap interval]; '
                     "higher is better. Token F1 and IOU F1 compare the top tokens with the marked ones (ERASER, "
                     "DeYoung et al. 2020); average precision (sklearn's step sum) and AUPRC (the trapezoid area under "
                     "the precision-recall curve) rank all tokens against them, under ERASER's names and "
                     "definitions.</p>")
        for task in plaus:
            parts.append(f"<h3>Task {e(task)}</h3>" + _html_rationale(res["summary"][task]))
        parts.append("</section>")
    if agreeing:
        parts.append('<section id="agreement"><h2>Agreement with gradients and occlusion</h2>'
                     f'<p class="meta">{e(AGREEMENT_NOTE)}</p>')
        for task, (refs, rows) in agreeing.items():
            parts.append(f"<h3>Task {e(task)}</h3>" + _html_agreement(refs, rows))
        parts.append("</section>")
    if aligned:
        parts.append('<section id="alignment"><h2>Alignment with gold word links</h2>'
                     '<p class="meta">Alignment error rate (Och &amp; Ney 2003): AER = 1 − (|A∩S| + |A∩P|) / (|A| + |S|) '
                     "with Sure links S and Possible links P ⊇ S; precision |A∩P| / |A|, recall |A∩S| / |S|. A: per "
                     "target word its highest-scoring source word (argmax), sub-words summed into words. Corpus: "
                     "counts summed over sentences; sentence mean with its 95% bootstrap interval. Lower AER is "
                     "better; one row per explainer, then per cross-attention layer and head.</p>")
        for task in aligned:
            line = translation_line(res["summary"][task])
            parts.append(f"<h3>Task {e(task)}</h3>" + (f"<p>{e(line)}</p>" if line else "")
                         + _html_alignment(res["summary"][task]))
        parts.append("</section>")
    parts.append('<section id="examples"><h2>Examples</h2>')
    for i, task in enumerate(tasks):
        parts.append(f"<h3>Task {e(task)}</h3>")
        parts.append(_html_examples(task, data, res["model_cards"].get(task) or {}))
        if f'id="attention-{slug(i, task)}"' not in attention:    # the interactive view shows the same, and more
            parts += [_html_figure(name, *figures[name]) for name in figures
                      if name.startswith(slug(i, task) + "-attention-")]
        else:
            parts.append(f'<p class="meta">The attention of these examples, every layer and head: '
                         f'<a href="#attention-{e(slug(i, task))}">the attention view of task {e(task)}</a> '
                         "(choose the example there).</p>")
    parts.append('</section><section id="model"><h2>Model and settings</h2>')
    for task in tasks:
        card = res["model_cards"].get(task)
        parts.append(f"<details><summary>Model card: task {e(task)}</summary>"
                     + (_html_kv(flatten(card)) if card else "<p>No model card given.</p>") + "</details>")
    parts.append("<details><summary>Run: settings, versions, timings, forwards</summary>" + _html_kv(run_table(res)) + "</details>")
    parts.append("</section><footer><h2>Files</h2><p>" + " · ".join(e(f) for f in res["files"]) + "</p>"
                 + "".join(f'<p class="meta">{e(k)}: {e(v)}</p>' for k, v in res.get("tables", {}).items())
                 + "</footer></main></body></html>")
    return "\n".join(parts) + "\n"


def run_table(res: dict) -> dict:
    """Versions, device, settings, timings and the engine's forwards, flattened; a setting repeated under settings.identity is listed once."""
    settings = flatten(res["settings"], "setting")
    seconds = dict(res["timings"])
    forward_times = seconds.pop("forwards", {})   # ms per forward and ratios (`analyses.forwards.TIMED`), not seconds
    shown = dict(settings)
    for key, value in settings.items():
        if key.startswith("setting.identity."):
            rest = key[len("setting.identity."):]
            twin = next((k for k in (f"setting.{rest}", f"setting.{rest.split('.', 1)[-1]}") if k in settings), None)
            if twin is not None and settings[twin] == value:
                del shown[key]
    return {**{f"version.{k}": v for k, v in res["versions"].items()}, "device": res["device"], **shown,
            **{f"time.{k} (s)": v for k, v in flatten(seconds).items()},
            **{f"forwards.{k}": v for k, v in flatten(res.get("forwards", {})).items()},
            **{f"time.forwards.{k}": v for k, v in flatten(forward_times).items()}}


def rank_grid(v: Verdict, summary: list[dict]):
    """(metric columns [(metric, setting)], rows [(explainer, {metric: cell dict})]) for the rank tables."""
    sm = pd.DataFrame(summary)
    if sm.empty:
        return [], []
    sm = normalize_setting(sm)
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
    cols, rows = rank_grid(v, summary)
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
            ci = f'<span class="ci">[{e(num(c.get("ci_low")))}, {e(num(c.get("ci_high")))}]</span>'
            if "rank" in c:
                marks = (f'<span class="badge {"good" if c["near_best"] else "bad"}">{"≈ best" if c["near_best"] else "&lt; best"}</span> '
                         f'<span class="badge {"good" if c["beats_random"] else "bad"}">{"&gt; random" if c["beats_random"] else "not &gt; random"}</span>')
                tds.append(f"<td>rank {e(c['rank'])}/{e(c['n_explainers'])}<br>{e(num(c['mean']))} {ci}<br>{marks}</td>")
            else:
                tds.append(f"<td>{e(c['explainer'])}<br>{e(num(c['mean']))} {ci}</td>")
        cls = ' class="fam"' if name in ATTENTION_FAMILY else ""
        body.append(f"<tr><th{cls}>{e(name)}</th>{''.join(tds)}</tr>")
    return (f'<div class="scroll"><table class="ranks"><tr><th>explainer</th>{head}</tr>{"".join(body)}</table></div>'
            '<p class="meta">rank among all explainers (1 = best); mean [95% bootstrap interval]; '
            "≈ best: first or not significantly different from the best (&lt; best: significantly worse); &gt; random: significantly better than random.</p>")


def rationale_rows(summary: list[dict]) -> list[tuple[str, dict]]:
    """[(explainer, {metric: summary row})] for the rationale_* metrics, attention family first."""
    rows = [r for r in summary if str(r.get("metric", "")).startswith("rationale_")]
    if not rows:
        return []
    by: dict = {}
    for r in rows:
        by.setdefault(r["explainer"], {}).setdefault(r["metric"], r)
    return [(n, by[n]) for n in F.explainer_order(list(by))]


ALIGNMENT_COLUMNS = (("alignment_error_rate", "AER ↓"), ("alignment_precision", "precision"),
                     ("alignment_recall", "recall"))


def alignment_table(summary: list[dict]) -> list[tuple[str, dict]]:
    """[(explainer, {metric: corpus value, metric + ":mean": per-sentence summary row})] where AER was measured.

    Explainers first (attention family first), then the cross-attention heads (`cross_attention_L{l}_H{h}`).
    """
    rows = [r for r in summary if r.get("metric") in dict(ALIGNMENT_COLUMNS)]
    if not rows:
        return []
    by: dict = {}
    for r in rows:
        corpus = str(r.get("setting", "")).endswith(":corpus")
        by.setdefault(r["explainer"], {})[r["metric"] if corpus else r["metric"] + ":mean"] = r
    heads = sorted((n for n in by if n.startswith("cross_attention_L")),
                   key=lambda n: tuple(int(x) for x in n[len("cross_attention_L"):].split("_H")))
    return [(n, by[n]) for n in F.explainer_order([n for n in by if n not in heads])] + [(n, by[n]) for n in heads]


def translation_line(summary: list[dict]) -> str | None:
    """"Greedy translations of these examples: exact match …, BLEU …" from the "model" rows, or None."""
    got = {r["metric"]: r["mean"] for r in summary
           if r.get("explainer") == "model" and str(r.get("setting", "")).endswith(":corpus")}
    if not got:
        return None
    return (f"The model's greedy translations of these examples: exact match {num(got.get('exact_match'))}, "
            f"corpus BLEU {num(got.get('bleu'), 1)} (sacrebleu).")


def _html_alignment(summary: list[dict]) -> str:
    head = "".join(f"<th>{e(label)} (corpus)</th>" for _, label in ALIGNMENT_COLUMNS) + "<th>AER, sentence mean</th>"
    body = []
    for name, cells in alignment_table(summary):
        tds = [f"<td>{e(num(cells[m]['mean']) if m in cells else '–')}</td>" for m, _ in ALIGNMENT_COLUMNS]
        c = cells.get("alignment_error_rate:mean")
        tds.append("<td>–</td>" if not c else f"<td>{e(num(c.get('mean')))} <span class=\"ci\">"
                   f"[{e(num(c.get('ci_low')))}, {e(num(c.get('ci_high')))}]</span></td>")
        cls = ' class="fam"' if name in ATTENTION_FAMILY or name.startswith("cross_attention_L") else ""
        body.append(f"<tr><th{cls}>{e(name)}</th>{''.join(tds)}</tr>")
    return f'<div class="scroll"><table class="ranks"><tr><th>explainer</th>{head}</tr>{"".join(body)}</table></div>'


AGREEMENT_NOTE = ("Spearman ρ between each attention-family explainer's token scores and input gradients "
                  "(saliency, input × gradient, integrated gradients) or blank-out importance (occlusion), per "
                  "example: mean over examples [95% bootstrap interval], n examples. Abnar & Zuidema (2020) read "
                  "rollout and flow this way. Agreement is not faithfulness by itself; the evidence above ranks "
                  "each explainer against the model. Every pair, with Kendall τ_b too, is in agreement.csv and the "
                  "agreement figure.")


def task_agreement(data: dict, task: str):
    """(reference names, `agreement.reference_table` rows) for one task, or None."""
    frame = data.get("agreement")
    if frame is None or "measure" not in frame.columns:
        return None
    t = frame[frame["task"] == task]
    rows = reference_table(t)
    return (reference_columns(t), rows) if rows else None


def _html_agreement(refs: list[str], rows) -> str:
    head = "".join(f"<th>{e(r)}</th>" for r in refs)
    body = []
    for name, cells in rows:
        tds = ["<td>–</td>" if not c else f"<td>{e(num(c['mean']))} <span class=\"ci\">[{e(num(c['ci_low']))}, "
               f"{e(num(c['ci_high']))}] n={e(count(c['n']))}</span></td>" for c in cells]
        body.append(f'<tr><th class="fam">{e(name)}</th>{"".join(tds)}</tr>')
    return f'<div class="scroll"><table class="ranks"><tr><th>explainer</th>{head}</tr>{"".join(body)}</table></div>'


def rationale_columns(rows: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    """The RATIONALE_METRICS that `rationale_rows` has (a report written before a measure existed lacks it)."""
    present = {m for _, cells in rows for m in cells}
    return [(m, label) for m, label in RATIONALE_METRICS if m in present]


def _html_rationale(summary: list[dict]) -> str:
    rows = rationale_rows(summary)
    columns = rationale_columns(rows)
    head = "".join(f"<th>{e(label)}</th>" for _, label in columns)
    body = []
    for name, cells in rows:
        tds = []
        for m, _ in columns:
            c = cells.get(m)
            tds.append("<td>–</td>" if not c else f"<td>{e(num(c.get('mean')))} <span class=\"ci\">"
                       f"[{e(num(c.get('ci_low')))}, {e(num(c.get('ci_high')))}]</span></td>")
        cls = ' class="fam"' if name in ATTENTION_FAMILY else ""
        body.append(f"<tr><th{cls}>{e(name)}</th>{''.join(tds)}</tr>")
    return f'<div class="scroll"><table class="ranks"><tr><th>explainer</th>{head}</tr>{"".join(body)}</table></div>'


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            out[key] = text if len(text) <= 160 else text[:157] + "…"
    return out


def _html_kv(d: Mapping) -> str:
    return "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in d.items()) + "</table>"


def _html_figure(name: str, caption: str, png: bytes, *, fid: str | None = None) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    ident = f' id="{e(fid)}"' if fid else ""
    return f'<figure{ident}><img src="{e(uri)}" alt="{e(caption)}"><figcaption>{e(caption)} ({e(name)})</figcaption></figure>'


def gold_mask(gold, tokens, special) -> list[bool]:
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
    """One <span> per token; its class holds the colour step (p1-p10 for, n1-n10 against; CSS), gold (g), special (s)."""
    scores = np.asarray([np.nan if s is None else s for s in rec["scores"]], dtype=float)
    special = rec.get("special") or [False] * len(scores)
    real = np.array([not s for s in special]) & np.isfinite(scores)
    top = float(np.abs(scores[real]).max()) if real.any() else 0.0
    spans = []
    for tok, s, sp, g in zip(rec["tokens"], scores, special, gold):
        step = int(round(10 * abs(s) / top)) if not sp and top > 0 and np.isfinite(s) else 0
        cls = " ".join(c for c in ((("p" if s >= 0 else "n") + str(step)) if step else "", "s" if sp else "",
                                   "g" if g else "") if c)
        spans.append(f'<span class="{cls}">{e(tok)}</span>' if cls else f"<span>{e(tok)}</span>")
    return " ".join(spans)          # the spaces let a long text wrap between tokens


def _html_examples(task: str, data: dict, card: Mapping) -> str:
    chosen = select_examples(task, data, card)
    if not chosen:
        return "<p>No attributions were given.</p>"
    pooled = {r.get("word_pooling") for ex in chosen for r in ex["records"]} - {None}
    unit = (f"the words by one explainer (sub-word scores pooled by {', '.join(sorted(pooled))})" if pooled
            else "the tokens by one explainer")
    s = [f'<p class="meta">Each row colours {e(unit)} (red: supports the explained class, blue: '
         "against; opacity ∝ |score| / max, in 10 steps); the gold rationale is underlined; special tokens are grey. "
         "The exact scores are in attributions.jsonl.gz.</p>"]
    for ex in chosen:
        order = F.explainer_order([x["explainer"] for x in ex["records"]])
        recs = sorted(ex["records"], key=lambda r: order.index(r["explainer"]))
        first = recs[0]
        gold = gold_mask(ex["gold"], first["tokens"], first.get("special") or [False] * len(first["tokens"]))
        prob = f" · p = {num(ex['prob'])}" if ex.get("prob") is not None else ""
        s.append(f'<div class="example"><p><b>{e(ex["id"])}</b> · {e(ex["status"])} · label {e(ex["label"])} · '
                 f"prediction {e(ex['prediction'])}{e(prob)}</p><table class=\"sent\">")
        for r in recs:
            cls = ' class="fam"' if r["explainer"] in ATTENTION_FAMILY else ""
            mask = gold if len(r["tokens"]) == len(gold) else [False] * len(r["tokens"])
            s.append(f"<tr><th{cls}>{e(r['explainer'])}</th><td>{_token_spans(r, mask)}</td></tr>")
        s.append("</table></div>")
    return "".join(s)


__all__ = ["render_html", "rationale_columns", "AGREEMENT_NOTE", "task_agreement", "count", "e", "CSP", "CSS", "run_table", "rank_grid", "gold_mask", "slug", "verdict_id", "SUMMARY_FIGURE",
           "flatten", "num", "rationale_rows", "alignment_table", "ALIGNMENT_COLUMNS", "translation_line"]
