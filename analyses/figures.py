"""Figures for the report: each function takes tidy tables and returns a matplotlib Figure.

    fig = curves_figure(curves)                  # deletion / insertion curves with 95% bands
    png = figure_png(fig)                        # palette PNG bytes at DPI; the report embeds and saves them
    fig = rank_summary_figure({"task": ranks})   # the report's first figure: every explainer's rank per measure

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so nothing is
shown, no global state changes and nothing needs closing. Every user string drawn (tokens, explainer
names, layer labels) passes through `_text`, which escapes matplotlib's mathtext `$` and shortens it.
The attention-line view follows the lecture's picture (and Vig 2019's head view): queries on one row,
lines to the keys below, width and opacity proportional to the weight, one colour per head.
"""
from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from attnaudit.analyses.sanity import DEFAULT_THRESHOLD as RANDOMIZATION_THRESHOLD
from attnaudit.analyses.sanity import METRIC as RANDOMIZATION_METRIC
from attnaudit.analyses.sanity import step_index
from attnaudit.analyses.stats import HIGHER_IS_BETTER
from attnaudit.analyses.verdict import TVD_LARGE, TVD_SMALL, headline_settings
from attnaudit.explain.registry import ATTENTION_FAMILY, REGISTRY

DPI = 90
Z95 = 1.959964    # normal quantile for the 95% bands of mean curves


# -- shared pieces -------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, *, dpi: int = DPI) -> bytes:
    """The figure as a 256-colour palette PNG (a third of the RGBA size; no metadata: same data, same bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT,
                                                                           dither=Image.Dither.NONE)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _text(s, n: int = 22) -> str:
    """A user string made safe for matplotlib: `$` escaped (no mathtext), one line, cut to n characters."""
    s = _LINE_BREAKS.sub(" ", str(s))
    s = s if len(s) <= n else s[: n - 1] + "…"
    return s.replace("\\", "\\\\").replace("$", r"\$")


def explainer_order(names: Sequence[str]) -> list[str]:
    """Attention family first, then the registry's order, then unknown names sorted."""
    known = [n for n in REGISTRY if n in set(names)]
    return known + sorted(set(names) - set(known))


def explainer_colors(names: Sequence[str]) -> dict[str, tuple]:
    """Warm colours for the attention family, cool ones for the others, black for random."""
    fam = [n for n in explainer_order(names) if n in ATTENTION_FAMILY]
    rest = [n for n in explainer_order(names) if n not in ATTENTION_FAMILY and n != "random"]
    warm = sns.color_palette("YlOrRd", len(fam) + 2)[2:] if fam else []
    cool = sns.color_palette("viridis", max(len(rest), 1))
    colors = {n: tuple(c) for n, c in zip(fam, warm[::-1])}
    colors.update({n: tuple(c) for n, c in zip(rest, cool)})
    colors["random"] = (0.0, 0.0, 0.0)
    return colors


def _empty(message: str) -> Figure:
    fig = _figure(5, 1.2)
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, _text(message, 80), ha="center", va="center")
    return fig


# -- faithfulness --------------------------------------------------------------------------------
def curve_means(curves: pd.DataFrame) -> pd.DataFrame:
    """Per-example curves -> task (if present), explainer, curve, fraction, n, mean, sem (what `curves_figure` draws)."""
    keys = [c for c in ("task", "explainer", "curve", "fraction") if c in curves.columns]
    g = curves.groupby(keys, sort=True)["prob"]
    out = pd.DataFrame({"n": g.count(), "mean": g.mean(), "sem": g.sem().fillna(0.0)}).reset_index()
    return out


def curves_figure(curves: pd.DataFrame) -> Figure:
    """Mean deletion and insertion curves per explainer with 95% bands (mean ± 1.96·SE over examples).

    Args:
        curves: per example (example_id, explainer, curve ("deletion"/"insertion"), fraction, prob) or
            already averaged by `curve_means` (explainer, curve, fraction, n, mean, sem).
    """
    if curves is None or curves.empty:
        return _empty("no deletion/insertion curves")
    means = curves if "mean" in curves.columns else curve_means(curves)
    names = explainer_order(means["explainer"].unique())
    colors = explainer_colors(names)
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, curve in zip(axes, ("deletion", "insertion")):
        part = means[means["curve"] == curve]
        for name in names:
            g = part[part["explainer"] == name].sort_values("fraction")
            if not len(g):
                continue
            x, mean, sem = g["fraction"].to_numpy(float), g["mean"].to_numpy(float), g["sem"].to_numpy(float)
            style = "-" if name in ATTENTION_FAMILY else ":" if name == "random" else "--"
            ax.plot(x, mean, style, color=colors[name], label=_text(name), lw=1.6)
            ax.fill_between(x, mean - Z95 * sem, mean + Z95 * sem, color=colors[name], alpha=0.15, lw=0)
        better = "lower" if curve == "deletion" else "higher"
        ax.set(title=f"{curve} curve ({better} area is better)", xlabel="fraction of tokens "
               + ("removed" if curve == "deletion" else "restored"), ylabel="probability of the predicted class")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def _interval_panels(summary: pd.DataFrame, metrics: Sequence[str], title: str) -> Figure:
    """One panel per metric: mean and CI per explainer (horizontal), the attention family highlighted."""
    chosen = {m: s for m, s in headline_settings(summary).items()}
    rows = []
    for m in metrics:
        g = summary[summary["metric"] == m]
        if g.empty:
            continue
        setting = chosen.get(m) or ("aopc" if "aopc" in set(g["setting"]) else sorted(g["setting"].astype(str))[0])
        rows.append((m, setting, g[g["setting"].astype(str) == setting]))
    if not rows:
        return _empty(f"no {title} metrics")
    names = explainer_order(pd.concat([g for _, _, g in rows])["explainer"].unique())   # those with a value here
    colors = explainer_colors(names)
    ncols = min(4, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig = _figure(max(7.0, 3.2 * ncols + 1.2), 0.22 * len(names) * nrows + 1.0 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    y = {n: i for i, n in enumerate(names)}
    for ax, (m, setting, g) in zip(axes, rows):
        for r in g.itertuples():
            lo, hi = r.ci_low - r.mean, r.ci_high - r.mean
            err = [[-lo], [hi]] if np.isfinite([lo, hi]).all() else None
            ax.errorbar(r.mean, y[r.explainer], xerr=err, fmt="o", color=colors[r.explainer], ms=4, capsize=2)
        arrow = "↑" if HIGHER_IS_BETTER.get(m, True) else "↓"
        ax.set_title(_text(f"{m} {arrow}" + (f" ({setting})" if setting else ""), 40), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(rows):]:
        ax.axis("off")
    axes[0].set_yticks(range(len(names)), [_text(n) for n in names])
    axes[0].invert_yaxis()
    for label in axes[0].get_yticklabels():
        if label.get_text() in ATTENTION_FAMILY:
            label.set_fontweight("bold")
    fig.suptitle(f"{title}: mean with 95% bootstrap interval (attention family in bold)", fontsize=10)
    return fig


def metric_summary_figure(summary: pd.DataFrame) -> Figure:
    """Metric × explainer: mean and 95% interval, one panel per faithfulness metric."""
    order = ["comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc", "tau_loo",
             "decision_flip_fraction", "infidelity", "sensitivity_max"]
    return _interval_panels(summary, [m for m in order if m in set(summary["metric"])], "faithfulness")


def gold_figure(summary: pd.DataFrame) -> Figure:
    """Ground-truth recovery per explainer: gold_* and rationale_* metrics with intervals."""
    metrics = [m for m in HIGHER_IS_BETTER if m.startswith(("gold_", "rationale_")) and m in set(summary["metric"])]
    return _interval_panels(summary, metrics, "ground-truth recovery")


def agreement_figure(table: pd.DataFrame) -> Figure:
    """Heatmap of the agreement between explainers (`analyses.agreement.agreement_table` rows of one task):
    Spearman ρ (Abnar & Zuidema's measure; Kendall τ_b where only that is known), each cell the mean over
    examples and, where known, ± half the 95% interval's width. Both measures are in agreement.csv."""
    if table is None or table.empty:
        return _empty("no attributions to compare")
    measure = "spearman" if "spearman" in set(table["measure"]) else "kendall_tau"
    t = table[table["measure"] == measure]
    order = explainer_order(t["explainer"].unique())
    n = len(order)
    grid = lambda col: t.pivot(index="explainer", columns="other", values=col).reindex(index=order, columns=order)  # noqa: E731
    mean, half = grid("mean").to_numpy(float), ((grid("ci_high") - grid("ci_low")) / 2).to_numpy(float)
    annot = np.array([[("" if np.isnan(m) else f"{m:.2f}" + ("" if np.isnan(h) else f"\n±{h:.2f}"))
                       for m, h in zip(rm, rh)] for rm, rh in zip(mean, half)]) if n <= 20 else False
    name = {"kendall_tau": "Kendall τ_b", "spearman": "Spearman ρ"}[measure]
    fig = _figure(0.44 * n + 2.6, 0.38 * n + 1.6)
    ax = fig.subplots()
    labels = [_text(s) for s in order]
    sns.heatmap(mean, ax=ax, vmin=-1, vmax=1, cmap="RdBu_r", annot=annot, fmt="", annot_kws={"fontsize": 5},
                xticklabels=labels, yticklabels=labels, square=True, cbar_kws={"label": f"mean {name}"})
    ax.tick_params(labelsize=7)
    ax.set_title(f"agreement between explainers ({name} per example, mean ± 95% half-width)", fontsize=9)
    return fig


def rank_summary_figure(ranks: dict[str, pd.DataFrame]) -> Figure:
    """The report's first figure: each explainer's rank (1 = best) on each headline measure, one panel per task.

    Colour is the rank scaled to [best, worst] within its task (tasks may rank different numbers of
    explainers); the number in a cell is the rank itself. Up to two panels per row.
    Args:
        ranks: {task: `verdict.rank_table(summary)`} (columns metric, setting, explainer, rank, n_explainers).
    """
    ranks = {t: r for t, r in ranks.items() if r is not None and not r.empty}
    if not ranks:
        return _empty("no headline measure was ranked")
    names = explainer_order(sorted({n for r in ranks.values() for n in r["explainer"]}))
    ncols = len(ranks) if len(ranks) <= 2 else 2
    nrows = math.ceil(len(ranks) / ncols)
    width = max(r["metric"].nunique() for r in ranks.values())
    fig = _figure(max(6.0, ncols * (0.62 * width + 2.0) + 0.8), nrows * (0.22 * len(names) + 1.45) + 0.2)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, sharey=True)).ravel()
    for ax, (task, r) in zip(axes, ranks.items()):
        metrics = list(dict.fromkeys(r["metric"]))
        r = r.assign(frac=(r["rank"] - 1) / (r["n_explainers"] - 1).clip(lower=1))
        grid = r.pivot_table(index="explainer", columns="metric", values="rank", aggfunc="min").reindex(index=names, columns=metrics)
        frac = r.pivot_table(index="explainer", columns="metric", values="frac", aggfunc="min").reindex(index=names, columns=metrics)
        im = ax.imshow(frac.to_numpy(float), cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for (i, j), v in np.ndenumerate(grid.to_numpy(float)):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(metrics)), [_text(m.replace("_", " "), 24) for m in metrics], rotation=35,
                      ha="right", fontsize=8)
        ax.set_title(_text(f"task {task} ({int(r['n_explainers'].max())} explainers)", 48), fontsize=9)
        for i, n in enumerate(names):
            if n in ATTENTION_FAMILY:
                ax.add_patch(Rectangle((-0.5, i - 0.5), len(metrics), 1, fill=False, ec="black", lw=1.2))
        ax.set_yticks(range(len(names)), [_text(n) for n in names], fontsize=8)
        for label in ax.get_yticklabels():
            if label.get_text() in ATTENTION_FAMILY:
                label.set_fontweight("bold")
    for ax in axes[len(ranks):]:
        ax.axis("off")
    bar = fig.colorbar(im, ax=list(axes), shrink=0.6, pad=0.01, ticks=[0, 1])
    bar.ax.set_yticklabels(["best", "worst"], fontsize=8)
    fig.suptitle("Rank of each explainer on each measure (1 = best; attention family boxed, in bold)", fontsize=10)
    return fig


# -- sanity and counterfactual tests -------------------------------------------------------------
def sanity_figure(summary: pd.DataFrame) -> Figure:
    """Cascading randomisation: mean Spearman similarity to the original map vs layers randomised."""
    g = summary[summary["metric"] == RANDOMIZATION_METRIC].copy()
    if g.empty:
        return _empty("randomisation check not run")
    g["step"] = g["setting"].map(step_index)
    names = explainer_order(g["explainer"].unique())
    colors = explainer_colors(names)
    fig = _figure(8, 4)
    ax = fig.subplots()
    for name in names:
        h = g[g["explainer"] == name].sort_values("step")
        style = "-" if name in ATTENTION_FAMILY else ":" if name == "random" else "--"
        ax.plot(h["step"], h["mean"], style, marker="o", ms=3, color=colors[name], label=_text(name))
        ax.fill_between(h["step"], h["ci_low"], h["ci_high"], color=colors[name], alpha=0.12, lw=0)
    steps = g.drop_duplicates("step").sort_values("step")
    ax.set_xticks(steps["step"], [_text(s.split(":", 1)[-1], 22) for s in steps["setting"]], rotation=30,
                  ha="right", fontsize=7)
    ax.axhline(RANDOMIZATION_THRESHOLD, color="grey", lw=1, ls="--")
    ax.text(steps["step"].iloc[0], RANDOMIZATION_THRESHOLD, f" fail above {RANDOMIZATION_THRESHOLD}", fontsize=7,
            va="bottom", color="grey")
    ax.set(ylabel="Spearman ρ to the original map", xlabel="randomised (cumulative, from the output down)",
           title="sanity check: cascading parameter randomisation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def permutation_figure(permutation: pd.DataFrame) -> Figure:
    """Per example: median output TVD under permuted attention vs the example's maximum attention weight."""
    if permutation is None or permutation.empty:
        return _empty("no per-example permutation results")
    fig = _figure(6.5, 4)
    ax = fig.subplots()
    layers = sorted(permutation["layer"].astype(str).unique(), key=lambda s: (s == "all", s))
    palette = sns.color_palette("colorblind", len(layers))
    for layer, color in zip(layers, palette):
        g = permutation[permutation["layer"].astype(str) == layer]
        ax.scatter(g["max_attention"], g["median_tvd"], s=10, alpha=0.6, color=color, label=f"layer {_text(layer)}")
    for v in (TVD_SMALL, TVD_LARGE):
        ax.axhline(v, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="maximum attention weight", ylabel="median output TVD over permutations",
           title=f"permuting attention (dashed: small < {TVD_SMALL}, large ≥ {TVD_LARGE})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def uniform_figure(counterfactual: pd.DataFrame) -> Figure:
    """Accuracy with uniform attention at each layer (bars) against the original accuracy (line)."""
    cf = counterfactual if counterfactual is not None else pd.DataFrame(columns=["test", "statistic"])
    g = cf[(cf["test"] == "uniform") & (cf["head"].astype(str) == "all")]
    stat = "accuracy" if (g["statistic"] == "accuracy").any() else "median_tvd"
    g = g[g["statistic"] == stat]
    if g.empty:
        return _empty("uniform-attention test not run")
    g = g.assign(layer=g["layer"].astype(str))
    layers = sorted(g["layer"].unique(), key=lambda s: (s == "all", s))
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    values = g.set_index("layer")["value"].reindex(layers)
    ax.bar(range(len(layers)), values.to_numpy(), color=sns.color_palette("colorblind")[0])
    ax.set_xticks(range(len(layers)), [f"layer {_text(s)}" for s in layers])
    orig = cf[(cf["test"] == "uniform") & (cf["statistic"] == "accuracy_original")]["value"]
    if stat == "accuracy" and len(orig):
        ax.axhline(float(orig.iloc[0]), color="black", ls="--", lw=1, label="original accuracy")
        ax.legend(fontsize=7)
        ax.set_ylim(0, 1.05)
    ax.set(ylabel=stat.replace("_", " "), title=f"uniform attention: {stat.replace('_', ' ')} per layer")
    ax.grid(axis="y", alpha=0.3)
    return fig


# -- attention pictures --------------------------------------------------------------------------
def check_attention(attention, tokens) -> np.ndarray:
    """[layer, head, query, key] attention (nested lists or array) with one token per position -> float array."""
    a = np.asarray(attention, dtype=float)
    if a.ndim != 4 or a.shape[2] != a.shape[3]:
        raise ValueError(f"attention must be [layer, head, query, key] with query == key; got shape {a.shape}.")
    if len(tokens) != a.shape[2]:
        raise ValueError(f"tokens must have one entry per query position ({a.shape[2]}); got {len(tokens)}.")
    return a


def attention_lines_figure(attention, tokens: Sequence[str], *, min_weight: float = 0.02) -> Figure:
    """The lecture's view: per layer, queries on the top row, lines to the keys below, one colour per head.

    Args:
        attention: [layer, head, query, key], rows summing to 1.
        tokens: one string per position. Weights below `min_weight` are not drawn.
    """
    a = check_attention(attention, tokens)
    n_layer, n_head, n = a.shape[:3]
    colors = sns.color_palette("tab10", n_head)
    fig = _figure(max(6.0, 0.42 * n + 1.5), 2.3 * n_layer + 0.4)
    axes = np.atleast_1d(fig.subplots(n_layer, 1, squeeze=False)).ravel()
    x = np.arange(n)
    for layer, ax in enumerate(axes):
        segs, rgba, widths = [], [], []
        for h in range(n_head):
            q, k = np.nonzero(a[layer, h] >= min_weight)
            w = a[layer, h, q, k]
            segs += [((x[i], 1.0), (x[j], 0.0)) for i, j in zip(q, k)]
            rgba += [to_rgba(colors[h], alpha=float(min(1.0, 0.15 + 0.85 * v))) for v in w]
            widths += list(0.3 + 3.0 * w)
        ax.add_collection(LineCollection(segs, colors=rgba, linewidths=widths))
        for i, t in enumerate(tokens):
            ax.text(i, 1.04, _text(t, 12), ha="center", va="bottom", rotation=60, fontsize=7)
            ax.text(i, -0.04, _text(t, 12), ha="center", va="top", rotation=60, fontsize=7)
        ax.set_xlim(-0.7, n - 0.3)
        ax.set_ylim(-0.5, 1.5)
        ax.axis("off")
        ax.set_title(f"layer {layer}: queries (top) attend to keys (bottom)", fontsize=8)
    handles = [axes[0].plot([], [], color=c, lw=2)[0] for c in colors]
    axes[0].legend(handles, [f"head {h}" for h in range(n_head)], fontsize=7, ncols=min(n_head, 8),
                   loc="upper right", bbox_to_anchor=(1.0, 1.35), frameon=False)
    return fig


def attention_grid_figure(attention, tokens: Sequence[str]) -> Figure:
    """Layer × head grid of attention heatmaps (rows: queries, columns: keys)."""
    a = check_attention(attention, tokens)
    n_layer, n_head, n = a.shape[:3]
    side = min(2.6, max(1.6, 0.12 * n))
    fig = _figure(side * n_head + 1.2, side * n_layer + 0.8)
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    labels = [_text(t, 10) for t in tokens]
    show = n <= 40
    for layer in range(n_layer):
        for h in range(n_head):
            ax = axes[layer, h]
            im = ax.imshow(a[layer, h], vmin=0, vmax=1, cmap="Blues", aspect="equal", interpolation="nearest")
            ax.set_xticks(range(n) if show and layer == n_layer - 1 else [],
                          labels if show and layer == n_layer - 1 else [], rotation=90, fontsize=5)
            ax.set_yticks(range(n) if show and h == 0 else [], labels if show and h == 0 else [], fontsize=5)
            if layer == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if layer == n_layer - 1:
                ax.set_xlabel("key", fontsize=7)
            if h == 0:
                ax.set_ylabel(f"layer {layer}: query", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight")
    return fig


# -- generation ----------------------------------------------------------------------------------
def generation_records(records: Sequence[dict]) -> tuple[str, dict[str, list[dict]]] | None:
    """The first generation example among attribution records -> (its id, explainer -> its step records by step).

    Step records carry "step" (`Attribution.to_records` of step rows); their ids are "<example id>@<step>".
    None when no record is a step record.
    """
    steps = [r for r in records if "step" in r]
    if not steps:
        return matrix_records(records)
    first = str(steps[0]["id"]).rsplit("@", 1)[0]
    by_method: dict[str, list[dict]] = {}
    for r in steps:
        if str(r["id"]).rsplit("@", 1)[0] == first:
            by_method.setdefault(r["explainer"], []).append(r)
    return first, {m: sorted(rs, key=lambda r: int(r["step"])) for m, rs in by_method.items()}


def matrix_records(records: Sequence[dict]) -> tuple[str, dict[str, list[dict]]] | None:
    """The first encoder–decoder example among attribution records (`analyses.seq2seq.audit_translator`: a
    "matrix" [target unit, source token] and its "target_tokens") -> (its id, explainer -> one record per target
    unit, with "tokens" the source tokens, "scores" that unit's row and "target_token"). None when there is none."""
    rows = [r for r in records if "matrix" in r]
    if not rows:
        return None
    first = str(rows[0]["id"])
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if str(r["id"]) == first:
            n = len(r["matrix"][0]) if r["matrix"] else 0
            by_method[r["explainer"]] = [{"tokens": r["tokens"][:n], "scores": row, "step": k,
                                          "target_token": t} for k, (row, t) in enumerate(zip(r["matrix"],
                                                                                         r["target_tokens"]))]
    return first, by_method


def generation_figure(by_method: dict[str, list[dict]], target_tokens: Sequence[str] | None = None) -> Figure:
    """Target step × input token heatmaps, one per explainer: row s = what step s's token is attributed to.

    by_method: explainer -> that example's step records in step order (`generation_records`). Columns are the
    prompt's tokens (step 0's tokens); each row is scaled by its largest |score|, so rows compare by shape.
    """
    names = explainer_order(list(by_method))
    first = by_method[names[0]]
    n_prompt = len(first[0]["tokens"])
    prompt = [_text(t, 10) for t in first[0]["tokens"]]
    last = first[-1]["tokens"]
    targets = list(target_tokens) if target_tokens is not None else \
        [str(r["target_token"]) if "target_token" in r else last[n_prompt + s] if n_prompt + s < len(last)
         else f"step {s}" for s, r in enumerate(first)]
    n_steps = len(first)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(cols * max(2.4, 0.28 * n_prompt + 1.2), rows * max(1.4, 0.3 * n_steps + 1.0))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        recs = by_method[names[k]]
        m = np.zeros((len(recs), n_prompt))
        for s, r in enumerate(recs):
            row = np.asarray(r["scores"][:n_prompt], dtype=float)
            scale = np.abs(row).max() or 1.0
            m[s, : len(row)] = row / scale
        ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto", interpolation="nearest")
        ax.set_title(_text(names[k], 24), fontsize=8)
        ax.set_xticks(range(n_prompt), prompt if n_prompt <= 40 else [""] * n_prompt, rotation=90, fontsize=6)
        ax.set_yticks(range(n_steps), [_text(t, 10) for t in targets[:n_steps]], fontsize=6)
    return fig


__all__ = ["generation_records", "matrix_records", "generation_figure", "figure_png", "curve_means", "rank_summary_figure", "curves_figure", "metric_summary_figure", "gold_figure",
           "agreement_figure", "sanity_figure", "permutation_figure", "uniform_figure", "attention_lines_figure",
           "attention_grid_figure", "explainer_order", "explainer_colors", "check_attention"]
