"""Interactive head and model views of one example's attention, in the report and in Jupyter (issue 17).

    panel = attention_panel(att, tokens)                 # att [layer, head, query, key] -> compact, quantised dict
    view = AttentionView([panel], evidence=evidence)     # evidence: plain data, rendered as given
    view                                                 # in Jupyter: the view inline (`_repr_html_`)
    view.save("att.html")                                # a standalone page
    attnaudit.show_attention(model, "the plot was not good", layer=1, head=0)

The head view draws lines from each query token to the keys it attends to, one colour per head (after
bertviz, Vig 2019); the model view is a layer × head grid of small maps; beside them the audit's evidence
for the chosen layer and heads (head ablation, the rank of raw attention, token attributions), so the
picture never claims more than the audit measured. Cross-attention is the same panel with other key tokens.

What the page gets is what can be drawn: per query the top_k keys above `threshold`, at most `max_edges` in
all, weights quantised to uint8 and positions to uint16, base64-encoded; plus each map pooled to at most
grid_size² uint8 pixels. The script (attention_view.js, one text for every view, so one sha256 in the
Content-Security-Policy allows it) reads the data from a <script type="application/json"> block in which
<, > and & are \\u-escaped, and builds every token with textContent. In the report, `report_section(res,
data)` gives each task's view, one Example choice per shown example (`attention_examples`), with the evidence read
from its tables (`report_evidence`).

A panel: name, kind, n_layers, n_heads, query_tokens / key_tokens (the window's), query_offset / key_offset,
n_queries / n_keys, omitted (counts and the rule), edges {q, k: uint16, w: uint8 (weight·255), start:
uint32 [layer·head + 1] offsets; sorted by cell, heaviest first}, grid {rows, cols, block, data: uint8
[layer, head, row, col]}; optional: example (an id; panels of several ids get an Example choice), example_label,
token_scores (as the evidence's, for this panel's example). Evidence: {"per_head": [{layer, head (int or "all"),
label, value, note, panel (a kind: shown beside that kind only)}], "global": [{label, value, note}],
"token_scores": {"tokens", "scores": {method: [per token]}}, "missing": [what the audit did not measure],
"caveat": str}; every key optional.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from attnaudit.core.io import atomic_write_text

if TYPE_CHECKING:
    from attnaudit.model.interface import ExplainableModel
    from attnaudit.model.seq2seq import Translator

KINDS = ("self", "causal", "cross")
TOP_K, THRESHOLD, MAX_EDGES, GRID_SIZE = 8, 0.01, 200_000, 32
ROWS, MAX_LINES = 48, 2000                      # token rows shown at once; lines drawn at once

CSS = """
.aav{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;font-size:13px;color:#222;margin:.6em 0}
.aav .aav-controls{display:flex;flex-wrap:wrap;gap:4px 10px;align-items:center}
.aav .aav-controls input[type=number]{width:5em}
.aav .aav-hbtn{border:2px solid #999;border-radius:3px;margin:0 1px;padding:0 5px;cursor:pointer;font-size:12px}
.aav .aav-body{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.aav .aav-head{overflow:auto;max-height:820px;border:1px solid #eee}
.aav .aav-side{flex:1;min-width:300px}
.aav .aav-status,.aav .aav-note{color:#555;font-size:12px;margin:.3em 0}
.aav .aav-na{color:#8a5a00;font-size:12px;margin:.3em 0}
.aav .aav-tok{font-size:12px;cursor:default;white-space:pre}.aav .aav-tokhi{font-weight:700}
.aav .aav-hdr{font-size:11px;fill:#666}.aav line.aav-dim{stroke-opacity:.04}.aav line.aav-hi{stroke-opacity:1}
.aav table.aav-ev td{border:1px solid #ddd;padding:2px 5px}.aav table.aav-gridt{border-collapse:collapse}
.aav table.aav-gridt td,.aav table.aav-gridt th{padding:1px;border:0;font-size:10px;font-weight:400}
.aav canvas.aav-cell{width:40px;height:40px;image-rendering:pixelated;border:2px solid #eee;cursor:pointer;display:block}
.aav canvas.aav-sel{border-color:#d62728}.aav h4{margin:.4em 0 .2em}
"""


@lru_cache(maxsize=1)
def script_text() -> str:
    """The view's script, one text for every view (its hash goes into the Content-Security-Policy)."""
    return resources.files("attnaudit.analyses").joinpath("attention_view.js").read_text(encoding="utf-8")


def script_csp_source() -> str:
    """The CSP source that allows exactly the view's inline script -> "'sha256-…'"."""
    digest = hashlib.sha256(script_text().encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def page_csp() -> str:
    """A standalone view page's whole policy: its own script by hash, inline styles, nothing fetched."""
    return f"default-src 'none'; script-src {script_csp_source()}; style-src 'unsafe-inline'"


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).decode("ascii")


def _window(window, n: int, name: str) -> tuple[int, int]:
    if window is None:
        return 0, n
    try:
        start, stop = (int(x) for x in window)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (start, stop) positions or None; got {window!r}.") from None
    if not 0 <= start < stop:
        raise ValueError(f"{name} must satisfy 0 <= start < stop; got {window!r} (the example has {n} positions).")
    return start, min(stop, n)


def attention_panel(attention, query_tokens: Sequence[str], key_tokens: Sequence[str] | None = None, *,
                    name: str = "self-attention", kind: str = "self", top_k: int = TOP_K, threshold: float = THRESHOLD,
                    window: tuple[int, int] | None = None, key_window: tuple[int, int] | None = None,
                    max_edges: int = MAX_EDGES, grid_size: int = GRID_SIZE) -> dict:
    """One attention array -> the compact panel a view draws (what is drawn, quantised; never the full array).

    Args:
        attention: [layer, head, query, key] weights (numpy, torch or nested lists), rows summing to 1.
        query_tokens / key_tokens: one string per query / key position; key_tokens None -> the query tokens
            (self-attention). Cross-attention: target tokens as queries, source tokens as keys, kind="cross".
        kind: "self", "causal" (decoder self-attention) or "cross"; it names the sides and the controls.
        top_k, threshold: per query keep its top_k heaviest keys whose weight is at least threshold.
        window, key_window: (start, stop) positions kept for queries / keys (key_window None: same as
            window unless kind="cross"); max_edges: cap on kept weights in all (the heaviest stay).
        grid_size: each layer × head map is mean-pooled to at most grid_size × grid_size pixels.
    Returns:
        a JSON-ready dict; `omitted` counts the weights left out and says by which rule.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}.")
    att = attention.detach().cpu().float().numpy() if hasattr(attention, "detach") else np.asarray(attention, dtype=np.float32)
    if att.ndim != 4:
        raise ValueError(f"attention must be [layer, head, query, key] (4 dimensions); got shape {att.shape}.")
    q_tokens = [str(t) for t in query_tokens]
    k_tokens = q_tokens if key_tokens is None else [str(t) for t in key_tokens]
    if att.shape[2:] != (len(q_tokens), len(k_tokens)):
        raise ValueError(f"attention's query and key sizes must match the tokens; got shape {att.shape} for "
                         f"{len(q_tokens)} query and {len(k_tokens)} key tokens.")
    for pname, v, lo in (("top_k", top_k, 1), ("max_edges", max_edges, 1), ("grid_size", grid_size, 1)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{pname} must be an int >= {lo}; got {v!r}.")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a weight in [0, 1]; got {threshold!r}.")
    if max(len(q_tokens), len(k_tokens)) > 65535:
        raise ValueError(f"the view indexes positions with uint16; got {max(len(q_tokens), len(k_tokens))} positions "
                         "(pass a window).")
    n_layers, n_heads = att.shape[:2]
    q0, q1 = _window(window, len(q_tokens), "window")
    k0, k1 = _window(key_window if key_window is not None or kind == "cross" else window, len(k_tokens), "key_window")
    a = att[:, :, q0:q1, k0:k1]                                                   # [layer, head, query, key] in the window
    if not np.isfinite(a).all():
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    nq, nk = a.shape[2], a.shape[3]
    k = min(top_k, nk)
    idx = np.argpartition(a, nk - k, axis=-1)[..., nk - k:] if k < nk else np.broadcast_to(np.arange(nk), a.shape[:3] + (nk,))
    w = np.take_along_axis(a, idx, axis=-1)                                        # [layer, head, query, k]
    keep = w >= max(float(threshold), 0.5 / 255)                                  # a weight that quantises to 0 is not drawn
    n_window, n_topk = a.size, int(np.prod(w.shape))
    n_threshold = int(keep.sum())
    cell = np.broadcast_to(np.arange(n_layers * n_heads).reshape(n_layers, n_heads, 1, 1), w.shape)[keep]
    qq = np.broadcast_to(np.arange(nq).reshape(1, 1, nq, 1), w.shape)[keep]
    kk, ww = idx[keep], w[keep]
    capped = 0
    if len(ww) > max_edges:
        top = np.argpartition(-ww, max_edges - 1)[:max_edges]
        capped = len(ww) - max_edges
        cell, qq, kk, ww = cell[top], qq[top], kk[top], ww[top]
    order = np.lexsort((-ww, cell))                                                # by cell, heaviest first in each
    cell, qq, kk, ww = cell[order], qq[order], kk[order], ww[order]
    start = np.searchsorted(cell, np.arange(n_layers * n_heads + 1)).astype(np.uint32)
    n_all = att.shape[0] * att.shape[1] * att.shape[2] * att.shape[3]
    rule = f"top {top_k} keys per query at weight >= {float(threshold):g}"
    if (q0, q1, k0, k1) != (0, len(q_tokens), 0, len(k_tokens)):
        rule += f", positions {q0}–{q1 - 1} (queries) and {k0}–{k1 - 1} (keys)"
    if capped:
        rule += f", the heaviest {max_edges}"
    omitted = {"total": int(n_all - len(ww)), "outside_window": int(n_all - n_window), "beyond_top_k": int(n_window - n_topk),
               "below_threshold": int(n_topk - n_threshold), "beyond_cap": int(capped), "rule": rule}
    query_label, key_label = {"self": ("queries", "keys"), "causal": ("target queries", "target keys"),
                              "cross": ("target (queries)", "source (keys)")}[kind]
    return {"name": str(name), "kind": kind, "n_layers": int(n_layers), "n_heads": int(n_heads),
            "query_tokens": q_tokens[q0:q1], "key_tokens": k_tokens[k0:k1], "query_offset": q0, "key_offset": k0,
            "n_queries": len(q_tokens), "n_keys": len(k_tokens), "query_label": query_label, "key_label": key_label,
            "top_k": int(top_k), "threshold": float(threshold), "omitted": omitted,
            "edges": {"q": _b64(qq.astype(np.uint16)), "k": _b64(kk.astype(np.uint16)),
                      "w": _b64(np.clip(np.rint(ww * 255), 1, 255).astype(np.uint8)), "start": _b64(start)},
            "grid": _grid(a, grid_size)}


def _grid(a: np.ndarray, size: int) -> dict:
    """Every map mean-pooled to at most size × size, scaled to its own maximum -> uint8 pixels, base64."""
    n_layers, n_heads, nq, nk = a.shape
    block = max(1, -(-max(nq, nk) // size))
    rows, cols = -(-nq // block), -(-nk // block)
    padded = np.zeros((n_layers, n_heads, rows * block, cols * block), dtype=np.float32)
    padded[:, :, :nq, :nk] = a
    pooled = padded.reshape(n_layers, n_heads, rows, block, cols, block).mean(axis=(3, 5))   # [layer, head, row, col]
    top = pooled.max(axis=(2, 3), keepdims=True)
    pix = np.rint(255 * pooled / np.where(top > 0, top, 1)).astype(np.uint8)
    return {"rows": int(rows), "cols": int(cols), "block": int(block), "data": _b64(pix)}


def json_for_script(obj) -> str:
    """JSON safe inside <script type="application/json">: no <, > or & (so no </script>), no U+2028/9."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _evidence(evidence) -> dict:
    if evidence is None:
        return {}
    if not isinstance(evidence, Mapping):
        raise ValueError(f"evidence must be a dict (keys per_head, global, token_scores, missing, caveat); "
                         f"got {type(evidence).__name__}.")
    unknown = sorted(set(evidence) - {"per_head", "global", "token_scores", "missing", "caveat"})
    if unknown:
        raise ValueError(f"evidence has unknown keys {unknown}; allowed: caveat, global, missing, per_head, token_scores.")
    return _finite(dict(evidence))


def _finite(x):
    """NaN and infinities -> None (JSON has neither; the view says "not available")."""
    if isinstance(x, Mapping):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def render_fragment(panels: Sequence[Mapping], evidence: Mapping | None = None, *, uid: str | None = None,
                    layer: int = 0, head: int | None = None, rows: int = ROWS, max_lines: int = MAX_LINES,
                    title: str | None = None) -> str:
    """The view's HTML without its script: a <div class="aav"> holding the style and the JSON data block.

    Pair it with `script_tag()` (once per page) and `script_csp_source()` in the page's policy. head None:
    every head on; uid: the container's id (unique per page; default a random one).
    """
    if not panels:
        raise ValueError("panels must hold at least one attention_panel(...) dict; got none.")
    if not isinstance(rows, int) or rows < 1 or not isinstance(max_lines, int) or max_lines < 1:
        raise ValueError(f"rows and max_lines must be ints >= 1; got rows={rows!r}, max_lines={max_lines!r}.")
    uid = uid or "aav-" + secrets.token_hex(6)
    data = {"panels": list(panels), "evidence": _evidence(evidence), "layer": int(layer),
            "head": None if head is None else int(head), "rows": rows, "max_lines": max_lines}
    caption = f'<p class="aav-title">{html.escape(title)}</p>' if title else ""
    return (f'<div class="aav" id="{html.escape(uid, quote=True)}"><style>{CSS}</style>{caption}'
            f'<script type="application/json" class="aav-data">{json_for_script(data)}</script></div>')


def script_tag() -> str:
    return f"<script>{script_text()}</script>"


def render_page(panels: Sequence[Mapping], evidence: Mapping | None = None, *, title: str = "Attention", **options) -> str:
    """A standalone, offline page: the view, its script and a policy that allows only that script."""
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{html.escape(page_csp(), quote=True)}">'
            f"<title>{html.escape(title)}</title></head><body>"
            + render_fragment(panels, evidence, title=title, **options) + script_tag() + "</body></html>\n")


class AttentionView:
    """Panels + evidence, shown inline in Jupyter (`_repr_html_`, each with its own id) or saved as a page."""

    def __init__(self, panels: Sequence[Mapping], *, evidence: Mapping | None = None, layer: int = 0,
                 head: int | None = None, rows: int = ROWS, max_lines: int = MAX_LINES, title: str | None = None):
        self.panels = list(panels)
        self.evidence = evidence
        self.layer, self.head, self.rows, self.max_lines, self.title = layer, head, rows, max_lines, title

    def _options(self) -> dict:
        return dict(layer=self.layer, head=self.head, rows=self.rows, max_lines=self.max_lines)

    def _repr_html_(self) -> str:
        return render_fragment(self.panels, self.evidence, title=self.title, **self._options()) + script_tag()

    def to_html(self) -> str:
        return render_page(self.panels, self.evidence, title=self.title or "Attention", **self._options())

    def save(self, path) -> Path:
        path = Path(path)
        return atomic_write_text(path, self.to_html())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{p['name']} [{p['n_layers']}×{p['n_heads']}×{len(p['query_tokens'])}×{len(p['key_tokens'])}]"
                           for p in self.panels)
        return f"AttentionView({shapes}; layer={self.layer}, head={self.head})"


def model_panels(model: ExplainableModel | Translator, text, **options) -> list[dict]:
    """Record one text's attention -> panels: encoder self-attention; for an encoder–decoder also its decoder
    self-attention (causal) and cross-attention, teacher-forced on the example's target, else on the model's own
    greedy translation (`attention_examples.translator_attention_example`)."""
    import torch

    from attnaudit.analyses.attention_examples import saved_panels, translator_attention_example
    from attnaudit.model.hooks import record

    if getattr(model, "kind", None) == "seq2seq":
        return saved_panels(translator_attention_example(model, text), **options)
    batch = model.encode([text])
    with torch.no_grad():
        _, cache = record(model, batch)
    tokens = list(batch.tokens[0])
    att = cache.stack("*self_attn.pattern")[:, 0]                                  # [layer, head, query, key]
    n = int(batch.attention_mask[0].sum()) if getattr(batch, "attention_mask", None) is not None else len(tokens)
    return [attention_panel(att[:, :, :n, :n], tokens[:n], name="self-attention", **options)]


def show_attention(model: ExplainableModel | Translator | Mapping | Sequence | str | Path, text=None, *,
                   example=None, task: str | None = None, layer: int = 0, head: int | None = None,
                   evidence: Mapping | None = None, rows: int = ROWS, max_lines: int = MAX_LINES, **options) -> AttentionView:
    """The head and model views of one example, inline in Jupyter.

        attnaudit.show_attention(model, "the plot was not good", layer=1, head=0)
        attnaudit.show_attention(result.attention_examples[1])        # a saved example: no model needed
        attnaudit.show_attention("reports/default/attention.json", example="reorder-test-000004")

    Args:
        model: a loaded model (then `text` is required), or saved attention: one example (a dict with "tokens"
            and "attention" [layer, head, query, key]; an encoder–decoder's with "target_tokens" and
            "cross_attention", see `attention_examples`), a list of them, or the path of a JSON file holding
            either (a report folder: its attention.json).
        example, task: which saved example of a list: its id (and task, where ids repeat); None: the first.
        layer, head: what the head view opens on (head None: every head).
        evidence: plain data shown beside the view (see `render_fragment`); options: `attention_panel`'s.
    """
    from attnaudit.analyses.attention_examples import pick_example, saved_panels

    if isinstance(model, (str, Path)) and text is None:
        path = Path(model) / "attention.json" if Path(model).is_dir() else Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model must be a saved attention file (a report folder's attention.json); "
                                    f"{str(path)!r} does not exist.")
        model = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(model, Sequence) and not isinstance(model, (str, bytes)) or isinstance(model, Mapping):
        saved = pick_example(model, example=example, task=task)
        panels = saved_panels(saved, **options)
        title = f"Attention of example {saved.get('id', '?')}"
    else:
        if text is None:
            raise ValueError("text is required with a model: show_attention(model, 'a sentence', layer=0).")
        if example is not None or task is not None:
            raise ValueError("example and task choose among saved examples; with a model pass the text itself: "
                             "show_attention(model, 'a sentence').")
        panels = model_panels(model, text, **options)
        title = "Attention of: " + (text.text if hasattr(text, "text") else str(text))
    n_layers, n_heads = panels[0]["n_layers"], panels[0]["n_heads"]
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be an int in [0, {n_layers - 1}]; got {layer!r} (this model has {n_layers} layers).")
    if head is not None and (not isinstance(head, int) or not 0 <= head < n_heads):
        raise ValueError(f"head must be an int in [0, {n_heads - 1}] or None; got {head!r} (this model has {n_heads} heads).")
    return AttentionView(panels, evidence=evidence, layer=layer, head=head, rows=rows, max_lines=max_lines, title=title)


# -- the evidence a report has ---------------------------------------------------------------------
TOKEN_METHODS = ("attention", "rollout", "flow", "grad_attention")
HEAD_STATS = {"importance_tvd": "head ablation: output change (TVD)",
              "importance_prob_drop": "head ablation: drop in predicted probability",
              "decisive_mass": "head ablation: attention mass on decisive tokens"}

LAYER_STATS = {("permutation", "median_tvd"): "permuted attention: median output change (TVD)",
               ("uniform", "mean_tvd"): "uniform attention: mean output change (TVD)",
               ("uniform", "median_tvd"): "uniform attention: median output change (TVD)",
               ("uniform", "flip_rate"): "uniform attention: fraction of predictions flipped",
               ("adversarial", "jsd_reached"): "adversarial attention: JSD reached at equal output",
               ("erasure", "flip_rate_max"): "erasing the top-attended token: flip rate",
               ("erasure", "flip_rate_random"): "erasing a random token: flip rate"}


def evidence_from_tables(*, counterfactual=None, ranks=None, attributions: Sequence[Mapping] = (),
                         example_id=None, panel: str | None = None) -> dict:
    """The audit's figures for the view, from its tables -> the `evidence` dict.

    Args:
        counterfactual: the summary frame (test, layer, head, statistic, value), one task's; head-ablation
            rows become per-head rows, per-layer uniform/erasure rows per-layer rows.
        ranks: `verdict.rank_table(summary)`, one task's; the raw attention's rank on each headline metric.
        attributions: `Attribution.to_records()` dicts; those of `example_id` from rollout, flow and
            grad_attention become the token score rows (`token_scores`).
        panel: the kind of panel the counterfactual tests changed ("cross" for an encoder–decoder: its per-head
            rows are shown beside the cross-attention only); None: every panel.
    """
    per_head, glob, missing = [], [], []
    cf = counterfactual
    where = {} if panel is None else {"panel": panel}
    if cf is not None and len(cf):
        for r in cf.itertuples(index=False):
            if r.test == "head_ablation" and r.statistic in HEAD_STATS and str(r.layer) != "all":
                per_head.append({"layer": int(r.layer), "head": int(r.head), "label": HEAD_STATS[r.statistic],
                                 "value": float(r.value), **where})
            elif (r.test, r.statistic) in LAYER_STATS and str(r.layer) != "all":
                per_head.append({"layer": int(r.layer), "head": "all", "label": LAYER_STATS[r.test, r.statistic],
                                 "value": float(r.value), "note": "whole layer", **where})
        if not any(r["head"] != "all" for r in per_head):
            missing.append("Head ablation (run the audit with the head_ablation test)")
    else:
        missing.append("Counterfactual tests (head ablation, uniform attention)")
    if ranks is not None and len(ranks):
        for r in ranks[ranks["explainer"] == "attention"].itertuples(index=False):
            glob.append({"label": f"raw attention's rank on {r.metric}" + (f" ({r.setting})" if r.setting else ""),
                         "value": f"{int(r.rank)} of {int(r.n_explainers)}", "note": f"best: {r.best}"})
        if not glob:
            missing.append("Raw attention's rank (attention was not among the explainers)")
    out = {"per_head": per_head, "global": glob, "missing": missing}
    scores = token_scores(attributions, example_id)
    if scores:
        out["token_scores"] = scores
    return _finite(out)


def token_scores(attributions: Sequence[Mapping], example_id, *, digits: int | None = None) -> dict:
    """The rollout, flow and grad_attention scores of one example's records -> {"tokens", "scores": {method: [per
    token]}}, or {} when it has none; digits: significant digits kept (None: all; the report's views keep 3)."""
    out: dict = {}
    for rec in attributions:
        if str(rec.get("id")) == str(example_id) and rec.get("explainer") in TOKEN_METHODS[1:]:
            out.setdefault("tokens", list(rec["tokens"]))
            if list(rec["tokens"]) == out["tokens"]:
                out.setdefault("scores", {})[rec["explainer"]] = [
                    None if s is None else float(s) if digits is None else float(f"{s:.{digits}g}") for s in rec["scores"]]
    return _finite(out) if out.get("scores") else {}


def report_evidence(res: Mapping, data: Mapping, task: str, example_id, *, panel: str | None = None) -> dict:
    """`evidence_from_tables` for one task of a loaded report (results.json's dict, `load_files`' tables)."""
    import pandas as pd

    from attnaudit.analyses.schema import normalize_setting
    from attnaudit.analyses.verdict import rank_table

    cf = data.get("counterfactual")
    cf = None if cf is None else cf[cf["task"] == task].drop(columns="task")
    summary = pd.DataFrame(res.get("summary", {}).get(task) or [])
    ranks = None
    if not summary.empty:
        summary = summary.astype({"mean": float, "ci_low": float, "ci_high": float})
        summary = normalize_setting(summary)
        ranks = rank_table(summary)
    records = [r for r in data.get("attributions") or [] if r.get("task") == task]
    return evidence_from_tables(counterfactual=cf, ranks=ranks, attributions=records, example_id=example_id, panel=panel)


REPORT_HEADING = "Attention, as the lecture draws it — and how far to trust it"


def report_section(res: Mapping, data: Mapping, *, ids: Mapping[str, str] | None = None) -> str:
    """The report's attention section: per task with saved attention examples (the shown ones, attention.json),
    one head and model view with an Example choice, the audit's evidence beside it, then the script once -> HTML
    ('' when no task has an example).

    Each example's panels carry "example" (its id), "example_label" and their own "token_scores"; the evidence
    from the task's tables is shared. An encoder–decoder's view opens on the cross-attention, which its
    counterfactual tests change. ids: {task: element id} for each view (unique on the page); default "attention-<n>".
    """
    from attnaudit.analyses.attention_examples import saved_panels
    from attnaudit.analyses.report_files import select_examples

    tasks = list(res["tasks"])
    by_task: dict = {}
    for a in data.get("attention") or []:
        by_task.setdefault(a.get("task", tasks[0] if len(tasks) == 1 else None), []).append(a)
    parts = []
    for i, task in enumerate(tasks):
        saved = by_task.get(task)
        if not saved:
            continue
        status = {ex["id"]: ex["status"] for ex in select_examples(task, data, (res.get("model_cards") or {}).get(task) or {})}
        records = [r for r in data.get("attributions") or [] if r.get("task") == task]
        panels, cut = [], []
        for a in saved:
            ex_id = str(a.get("id", "?"))
            scores = {} if "cross_attention" in a else token_scores(records, ex_id, digits=3)
            own = sorted(saved_panels(a), key=lambda p: p["kind"] != "cross")      # stable: the cross panel first
            for p in own:
                p.update(example=ex_id, example_label=ex_id + (f" ({status[ex_id]})" if ex_id in status else ""))
                if scores:
                    p["token_scores"] = scores
            panels += own
            n_all = int(a.get("n_positions", len(a["tokens"])))
            if n_all > len(a["tokens"]):
                cut.append(f"{ex_id}: the first {len(a['tokens'])} of {n_all} positions")
        seq2seq = any("cross_attention" in a for a in saved)
        counts = ", ".join(f"{n} {s}" for s in ("correct", "incorrect", "label unknown")
                           if (n := sum(status.get(str(a.get("id"))) == s for a in saved)))
        uid = (ids or {}).get(task) or f"attention-{i}"
        parts.append(f"<h3>Task {html.escape(str(task))}</h3><p class=\"meta\">{len(saved)} example"
                     f"{'s' if len(saved) != 1 else ''}{' (' + html.escape(counts) + ')' if counts else ''}: "
                     "the ones shown under Examples; choose one under Example. "
                     + ("The view opens on the cross-attention (queries: the decoder's inputs, [CLS] first, "
                        "teacher-forced on the reference; keys: the source), which the audit's counterfactual tests "
                        "change; the encoder's and the decoder's self-attention are under Attention. " if seq2seq else "")
                     + "Pick a layer and heads, hover a token to follow its row, click a map in the model view to open "
                     "it. The figures beside the picture are what the audit measured; where it measured nothing, "
                     "the view says so."
                     + (f" Cut to the positions drawn: {html.escape('; '.join(cut))}." if cut else "") + "</p>")
        evidence = report_evidence(res, data, task, None, panel="cross" if seq2seq else None)
        parts.append(render_fragment(panels, evidence, uid=uid))
    if not parts:
        return ""
    return f'<section id="attention"><h2>{html.escape(REPORT_HEADING)}</h2>' + "".join(parts) + script_tag() + "</section>"


__all__ = ["attention_panel", "render_fragment", "render_page", "script_text", "script_tag", "script_csp_source",
           "page_csp", "json_for_script", "AttentionView", "show_attention", "model_panels", "evidence_from_tables",
           "token_scores", "report_evidence", "report_section"]
