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
    RATIONALE_METRICS,
    SUMMARY_FIGURE,
    _flatten,
    _num,
    _rationale_rows,
    rank_grid,
    run_table,
)
from attnaudit.analyses.verdict import RULE, Verdict

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


def _rank_rows(v: Verdict, summary) -> list[str]:
    cols, rows = rank_grid(v, summary)
    if not rows:
        return []
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
    return [_md_table(["explainer"] + [f"{m} ({st})" if st else m for m, st in cols], table), ""]


def render_markdown(res: dict, data: dict, figures: dict[str, tuple[str, bytes]]) -> str:
    tasks = res["tasks"]
    out = [f"# {md(res['title'])}", "",
           f"attnaudit {md(res['versions'].get('attnaudit', '?'))} · created {md(res['created'])} · device {md(res['device'])}",
           "", "## Verdict", ""]
    for task in tasks:
        v = Verdict.from_dict(res["verdicts"][task])
        out += [f"### Task {md(task)}: **{md(v.answer.upper())}**", "", md(v.paragraph), ""]
    if SUMMARY_FIGURE in figures:
        out += [f"![{md(figures[SUMMARY_FIGURE][0])}](figures/{SUMMARY_FIGURE})", ""]
    out += [f"Rule: {md(RULE)}", "", "## Evidence", ""]
    for i, task in enumerate(tasks):
        v = Verdict.from_dict(res["verdicts"][task])
        out += [f"### Task {md(task)}", ""] + _rank_rows(v, res["summary"][task])
        out += ["Facts:", ""] + [f"- {md(f)}" for f in v.facts] + ["", "Caveats:", ""] + [f"- {md(c)}" for c in v.caveats] + [""]
        prefix = f"task{i:02d}-"
        out += [x for name, (caption, _) in figures.items() if name.startswith(prefix) and "-attention-" not in name
                for x in (f"![{md(caption)}](figures/{name})", "")]
    plaus = [t for t in tasks if _rationale_rows(res["summary"][t])]
    if plaus:
        out += ["## Plausibility: agreement with human rationales", "",
                "Mean over examples with a rationale [95% bootstrap interval]; higher is better.", ""]
        for task in plaus:
            rows = [[name] + [("–" if not cells.get(m) else f"{_num(cells[m].get('mean'))} [{_num(cells[m].get('ci_low'))}, "
                               f"{_num(cells[m].get('ci_high'))}]") for m, _ in RATIONALE_METRICS]
                    for name, cells in _rationale_rows(res["summary"][task])]
            out += [f"### Task {md(task)}", "", _md_table(["explainer"] + [label for _, label in RATIONALE_METRICS], rows), ""]
    out += ["## Examples", ""]
    for i, task in enumerate(tasks):
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
        out += [x for name, (caption, _) in figures.items() if name.startswith(f"task{i:02d}-") and "-attention-" in name
                for x in (f"![{md(caption)}](figures/{name})", "")]
    out += ["## Model and settings", ""]
    for task in tasks:
        card = res["model_cards"].get(task)
        out += [f"### Model card: task {md(task)}", "", _md_table(["field", "value"], list(_flatten(card).items())) if card
                else "No model card given.", ""]
    out += ["### Run", "", _md_table(["field", "value"], list(run_table(res).items())), ""]
    out += ["## Files", "", " · ".join(md(f) for f in res["files"]), ""]
    out += [f"- {md(k)}: {md(v)}" for k, v in res.get("tables", {}).items()]
    return "\n".join(out) + "\n"


__all__ = ["render_markdown", "md"]
