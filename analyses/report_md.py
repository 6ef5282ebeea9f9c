"""report.md: the page's content in Markdown, in the same order (verdicts, summary figure, evidence,
plausibility, examples, model cards and settings).

    text = render_markdown(results, data, figures)

Every user string passes through `md`: Markdown markup, HTML and table-cell breaks are escaped, and
every character a reader could take for a line end (U+2028, U+2029, U+0085, \\x0b, \\x0c, \\x1c-\\x1e,
\\r, \\n) becomes a space, so no cell breaks its row.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from attnaudit.analyses.report_files import select_examples
from attnaudit.analyses.report_html import (
    AGREEMENT_NOTE,
    ALIGNMENT_COLUMNS,
    SUMMARY_FIGURE,
    alignment_table,
    count,
    flatten,
    num,
    rank_grid,
    rationale_columns,
    rationale_rows,
    run_table,
    slug,
    task_agreement,
    translation_line,
)
from attnaudit.analyses.verdict import DEFINITIONS, RULE, Verdict

_MD_ESCAPE = {"\\": "\\\\", "`": "\\`", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]", "|": "\\|", "#": "\\#",
              "~": "\\~", "<": "&lt;", ">": "&gt;", "&": "&amp;", **{ch: " " for ch in
              "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}}


def md(value) -> str:
    """Escape text for Markdown (table cells included): no markup, HTML or cell break can come through."""
    return "".join(_MD_ESCAPE.get(ch, ch) for ch in str(value))


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(md(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _rank_cell(c: dict) -> str:
    if not c:
        return "–"
    if "rank" in c:
        return (f"rank {c['rank']}/{c['n_explainers']}: {num(c['mean'])} [{num(c['ci_low'])}, {num(c['ci_high'])}]"
                + (" ≈best" if c["near_best"] else "") + (" >random" if c["beats_random"] else ""))
    return f"{c['explainer']}: {num(c['mean'])} [{num(c['ci_low'])}, {num(c['ci_high'])}]"


def _rank_rows(v: Verdict, summary) -> list[str]:
    cols, rows = rank_grid(v, summary)
    if not rows:
        return []
    table = [[name] + [_rank_cell(cells[m]) for m, _ in cols] for name, cells in rows]
    return [_md_table(["explainer"] + [f"{m} ({st})" if st else m for m, st in cols], table), ""]


def _figure_lines(figures: dict[str, tuple[str, bytes]], i: int, *, attention: bool) -> list[str]:
    """Task i's figures (its attention views, or the others) as Markdown images, each followed by a blank line."""
    return [x for name, (caption, _) in figures.items()
            if name.startswith(f"task{i:02d}-") and ("-attention-" in name) == attention
            for x in (f"![{md(caption)}](figures/{name})", "")]


def _verdict_section(res: dict, figures: dict[str, tuple[str, bytes]]) -> list[str]:
    out = ["## Verdict", ""]
    for task in res["tasks"]:
        v = Verdict.from_dict(res["verdicts"][task])
        out += [f"### Task {md(task)}: **{md(v.answer.upper())}**", "", md(v.paragraph), ""]
    if SUMMARY_FIGURE in figures:
        out += [f"![{md(figures[SUMMARY_FIGURE][0])}](figures/{SUMMARY_FIGURE})", ""]
    return out + [f"Rule: {md(RULE)}", "", "What the measures mean:", ""] + [f"- {md(k)}: {md(v)}" for k, v in DEFINITIONS] + [""]


def _evidence_section(res: dict, figures: dict[str, tuple[str, bytes]]) -> list[str]:
    out = ["## Evidence", ""]
    for i, task in enumerate(res["tasks"]):
        v = Verdict.from_dict(res["verdicts"][task])
        out += [f"### Task {md(task)}", ""] + _rank_rows(v, res["summary"][task])
        out += ["Facts:", ""] + [f"- {md(f)}" for f in v.facts] + ["", "Caveats:", ""] + [f"- {md(c)}" for c in v.caveats] + [""]
        out += _figure_lines(figures, i, attention=False)
    return out


def _interval(cell: dict | None) -> str:
    if not cell:
        return "–"
    return f"{num(cell.get('mean'))} [{num(cell.get('ci_low'))}, {num(cell.get('ci_high'))}]"


def _plausibility_section(res: dict) -> list[str]:
    plaus = [t for t in res["tasks"] if rationale_rows(res["summary"][t])]
    if not plaus:
        return []
    out = ["## Plausibility: agreement with human rationales", "",
           "Mean over examples with a rationale [95% bootstrap interval]; higher is better.", ""]
    for task in plaus:
        named = rationale_rows(res["summary"][task])
        columns = rationale_columns(named)
        header = ["explainer"] + [label for _, label in columns]
        rows = [[name] + [_interval(cells.get(m)) for m, _ in columns] for name, cells in named]
        out += [f"### Task {md(task)}", "", _md_table(header, rows), ""]
    return out


def _agreement_section(res: dict, data: dict) -> list[str]:
    found = {t: a for t in res["tasks"] if (a := task_agreement(data, t))}
    if not found:
        return []
    out = ["## Agreement with gradients and occlusion", "", AGREEMENT_NOTE, ""]
    for task, (refs, rows) in found.items():
        table = [[name] + [_interval(c) + (f" n={count(c['n'])}" if c else "") for c in cells] for name, cells in rows]
        out += [f"### Task {md(task)}", "", _md_table(["explainer", *refs], table), ""]
    return out


def _alignment_section(res: dict) -> list[str]:
    aligned = [t for t in res["tasks"] if alignment_table(res["summary"][t])]
    if not aligned:
        return []
    out = ["## Alignment with gold word links", "",
           "AER = 1 − (|A∩S| + |A∩P|) / (|A| + |S|) (Och & Ney 2003; Sure S, Possible P ⊇ S), precision |A∩P|/|A|, "
           "recall |A∩S|/|S|, counts summed over the corpus; A = the argmax source word per target word. "
           "Lower AER is better.", ""]
    header = ["explainer"] + [f"{label} (corpus)" for _, label in ALIGNMENT_COLUMNS] + ["AER, sentence mean"]
    for task in aligned:
        rows = [[name] + [num(cells[m]["mean"]) if m in cells else "–" for m, _ in ALIGNMENT_COLUMNS]
                + [_interval(cells.get("alignment_error_rate:mean"))]
                for name, cells in alignment_table(res["summary"][task])]
        line = translation_line(res["summary"][task])
        out += [f"### Task {md(task)}", ""] + ([md(line), ""] if line else []) + [_md_table(header, rows), ""]
    return out


def _top_tokens_row(r: dict) -> list:
    """One explainer's record -> [explainer, tokens, its 3 highest-scored tokens] (special tokens never count)."""
    scores = [(-math.inf if s is None or sp else s) for s, sp in
              zip(r["scores"], r.get("special") or [False] * len(r["scores"]))]
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[:3]
    return [r["explainer"], " ".join(r["tokens"]), ", ".join(r["tokens"][i] for i in top)]


def _examples_section(res: dict, data: dict, figures: dict[str, tuple[str, bytes]]) -> list[str]:
    out = ["## Examples", ""]
    for i, task in enumerate(res["tasks"]):
        out += [f"### Task {md(task)}", ""]
        for ex in select_examples(task, data, res["model_cards"].get(task) or {}):
            out += [f"**{md(ex['id'])}** ({md(ex['status'])}; label {md(ex['label'])}, prediction {md(ex['prediction'])})", ""]
            out += [_md_table(["explainer", "tokens", "top 3 tokens"], [_top_tokens_row(r) for r in ex["records"]]), ""]
        saved = [str(a.get("id")) for a in data.get("attention") or [] if a.get("task") == task]
        if saved:
            out += [f"The attention of {'these examples' if len(saved) > 1 else 'example ' + md(saved[0])}, every layer and "
                    f"head: the interactive head and model views in [index.html](index.html#attention-{slug(i, task)}) "
                    f"(open it in a browser; examples {md(', '.join(saved))}); the figures below draw the first.", ""]
        out += _figure_lines(figures, i, attention=True)
    return out


def _settings_section(res: dict) -> list[str]:
    out = ["## Model and settings", ""]
    for task in res["tasks"]:
        card = res["model_cards"].get(task)
        out += [f"### Model card: task {md(task)}", "", _md_table(["field", "value"], list(flatten(card).items())) if card
                else "No model card given.", ""]
    return out + ["### Run", "", _md_table(["field", "value"], list(run_table(res).items())), ""]


def _files_section(res: dict) -> list[str]:
    return (["## Files", "", " · ".join(md(f) for f in res["files"]), ""]
            + [f"- {md(k)}: {md(v)}" for k, v in res.get("tables", {}).items()])


def render_markdown(res: dict, data: dict, figures: dict[str, tuple[str, bytes]]) -> str:
    """results.json's content (`res`), the examples shown (`data`) and the figures -> report.md's text."""
    out = [f"# {md(res['title'])}", "",
           f"attnaudit {md(res['versions'].get('attnaudit', '?'))} · created {md(res['created'])} · device {md(res['device'])}",
           ""]
    out += _verdict_section(res, figures)
    out += _evidence_section(res, figures)
    out += _plausibility_section(res)
    out += _agreement_section(res, data)
    out += _alignment_section(res)
    out += _examples_section(res, data, figures)
    out += _settings_section(res)
    out += _files_section(res)
    return "\n".join(out) + "\n"


__all__ = ["render_markdown", "md"]
