"""The attention view's data and page (analyses/attention_view.py): known answers on tiny arrays, no browser."""
from __future__ import annotations

import base64
import hashlib
import html
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_model

from attnaudit.analyses.attention_view import (
    AttentionView,
    attention_panel,
    evidence_from_tables,
    json_for_script,
    model_panels,
    render_fragment,
    render_page,
    script_csp_source,
    script_text,
    show_attention,
)

HOSTILE = '</script><img src=x onerror="alert(1)">&amp;'


def decode(panel) -> tuple[np.ndarray, ...]:
    raw = {k: base64.b64decode(v) for k, v in panel["edges"].items()}
    return (np.frombuffer(raw["q"], "<u2"), np.frombuffer(raw["k"], "<u2"), np.frombuffer(raw["w"], "u1"),
            np.frombuffer(raw["start"], "<u4"))


def peaky(n_layers=2, n_heads=3, n=6, seed=0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(n_layers, n_heads, n, n)) * 3
    a = np.exp(logits - logits.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)                                         # [layer, head, query, key]


def test_one_head_by_hand():
    att = np.array([[[[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]]]])                      # [layer=1, head=1, query=2, key=3]
    p = attention_panel(att, ["a", "b"], ["x", "y", "z"], kind="cross", top_k=2, threshold=0.15)
    q, k, w, start = decode(p)
    # query 0 keeps 0.7 (x) and 0.2 (y); query 1 keeps its two 0.5s; heaviest first within the cell
    assert sorted(zip(q.tolist(), k.tolist(), w.tolist()), key=lambda t: (t[0], t[1])) == [
        (0, 0, 178), (0, 1, 51), (1, 1, 128), (1, 2, 128)]                      # round(255·w)
    assert w[0] == 178 and start.tolist() == [0, 4]
    assert p["omitted"]["beyond_top_k"] == 2 and p["omitted"]["total"] == 2 and p["omitted"]["below_threshold"] == 0
    assert p["key_tokens"] == ["x", "y", "z"] and p["kind"] == "cross"


def test_threshold_window_and_cap_are_counted():
    att = peaky(n=10)
    p = attention_panel(att, [f"t{i}" for i in range(10)], top_k=3, threshold=0.05, window=(2, 8), max_edges=20)
    q, k, w, start = decode(p)
    om = p["omitted"]
    assert p["query_tokens"] == [f"t{i}" for i in range(2, 8)] and p["query_offset"] == 2
    assert om["outside_window"] == att.size - 2 * 3 * 6 * 6
    assert len(w) == 20 and om["beyond_cap"] > 0
    assert om["total"] == om["outside_window"] + om["beyond_top_k"] + om["below_threshold"] + om["beyond_cap"]
    assert att.size - om["total"] == len(w)
    assert q.max() < 6 and k.max() < 6 and (w >= round(0.05 * 255)).all()
    assert start[-1] == 20 and (np.diff(start.astype(int)) >= 0).all()
    # the cap keeps the heaviest weights of the window overall
    win = att[:, :, 2:8, 2:8]
    top3 = np.sort(win, -1)[..., -3:]
    assert w.min() / 255 >= np.sort(top3[top3 >= 0.05])[-20] - 1 / 255


def test_grid_pools_long_inputs():
    att = peaky(n_layers=1, n_heads=1, n=70)
    p = attention_panel(att, [str(i) for i in range(70)], grid_size=32)
    g = p["grid"]
    assert (g["rows"], g["cols"], g["block"]) == (24, 24, 3)
    pix = np.frombuffer(base64.b64decode(g["data"]), "u1")
    assert pix.size == 24 * 24 and pix.max() == 255


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k must be an int >= 1"), (dict(threshold=2.0), "threshold must be a weight in"),
    (dict(kind="decoder"), "kind must be one of self, causal, cross"), (dict(window=(5, 2)), "window must satisfy"),
])
def test_bad_arguments_name_the_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attention_panel(peaky(), list("abcdef"), **kwargs)


def test_shape_must_match_tokens():
    with pytest.raises(ValueError, match=r"query and key sizes must match the tokens; got shape \(2, 3, 6, 6\) for 5"):
        attention_panel(peaky(), list("abcde"))


def test_json_block_cannot_be_broken_out_of():
    text = json_for_script({"t": HOSTILE + "\u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"t": HOSTILE + "\u2028"}


def test_page_is_self_contained_and_its_csp_allows_exactly_its_script():
    page = render_page([attention_panel(peaky(), ["[CLS]", HOSTILE, "b", "c", "d", "[SEP]"])], title=HOSTILE)
    scripts = re.findall(r"<script(?P<attrs>[^>]*)>(?P<body>.*?)</script>", page, re.S)
    executable = [body for attrs, body in scripts if "application/json" not in attrs]
    assert len(executable) == 1 and len(scripts) == 2 and all("src=" not in a for a, _ in scripts)
    digest = base64.b64encode(hashlib.sha256(executable[0].encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    csp = html.unescape(csp)
    assert csp == f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'"
    assert script_csp_source() == f"'sha256-{digest}'"
    assert not re.search(r"\.innerHTML|\.outerHTML|insertAdjacentHTML|document\.write|eval\(", script_text())
    assert "http://" not in page and "https://" not in page
    assert HOSTILE not in page and "<img" not in page


def test_fragments_get_unique_ids_and_render_given_evidence():
    p = attention_panel(peaky(), list("abcdef"))
    a, b = render_fragment([p]), render_fragment([p])
    ids = [re.search(r'<div class="aav" id="([^"]+)"', x).group(1) for x in (a, b)]
    assert ids[0] != ids[1]
    view = AttentionView([p], evidence={"global": [{"label": "rank", "value": "2 of 5"}]}, layer=1, head=2)
    shown = view._repr_html_()
    data = json.loads(re.search(r'<script type="application/json" class="aav-data">(.*?)</script>', shown, re.S).group(1))
    assert data["layer"] == 1 and data["head"] == 2 and data["evidence"]["global"][0]["value"] == "2 of 5"
    with pytest.raises(ValueError, match="evidence has unknown keys"):
        render_fragment([p], {"ranks": []})


@pytest.mark.slow
def test_512_tokens_12_layers_12_heads_stay_small():
    att = peaky(n_layers=12, n_heads=12, n=512).astype(np.float32)
    p = attention_panel(att, [f"w{i}" for i in range(512)])
    page = render_page([p])
    assert len(page) < 2_500_000                             # vs 12·12·512² floats ≈ 150 MB as float32
    assert p["omitted"]["total"] + len(decode(p)[2]) == att.size


def test_show_attention_on_a_model_and_on_a_saved_example():
    model = make_tiny_model()
    with torch.no_grad():
        view = show_attention(model, "the film was not good", layer=1, head=0)
    p = view.panels[0]
    assert (p["n_layers"], p["n_heads"]) == (2, 2) and p["query_tokens"][0] == "[CLS]"
    assert 'class="aav"' in view._repr_html_()
    saved = {"id": "ex0", "tokens": p["query_tokens"], "attention": peaky(2, 2, len(p["query_tokens"])).tolist()}
    again = show_attention(saved, head=1)
    assert again.panels[0]["query_tokens"] == p["query_tokens"] and "ex0" in again.title
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 1\]; got 5 \(this model has 2 layers\)"):
        show_attention(model, "good", layer=5)
    with pytest.raises(ValueError, match="text is required"):
        show_attention(model)


def test_show_attention_reads_a_saved_attention_json(tmp_path):
    path = tmp_path / "attention.json"
    path.write_text(json.dumps([{"id": "e1", "task": "t", "tokens": ["a", "b", "c"], "attention": peaky(1, 2, 3).tolist()}]))
    view = show_attention(path, layer=0, head=1)
    assert view.panels[0]["query_tokens"] == ["a", "b", "c"] and view.head == 1
    assert view.save(tmp_path / "v.html").read_text().startswith("<!DOCTYPE html>")


def test_an_encoder_decoder_gives_self_causal_and_cross_panels():
    from attnaudit.model.seq2seq import Translator
    from attnaudit.model.transformer import TransformerConfig, TransformerSeq2Seq
    from attnaudit.model.vocab import Vocab

    torch.manual_seed(0)
    src, tgt = Vocab.build(["a b c d"]), Vocab.build(["d c b a"])
    cfg = TransformerConfig(vocab_size=len(src), tgt_vocab_size=len(tgt), d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16)
    model = Translator(TransformerSeq2Seq(cfg).eval(), src, tgt)
    from attnaudit.data.examples import Example

    panels = model_panels(model, Example(id="x", text="a b c", label=0, target="c b a"))
    assert [p["kind"] for p in panels] == ["self", "causal", "cross"]
    enc, dec, cross = panels
    assert enc["query_tokens"] == ["[CLS]", "a", "b", "c", "[SEP]"] and dec["query_tokens"] == ["[CLS]", "c", "b", "a", "[SEP]"][:4]
    assert cross["query_tokens"] == dec["query_tokens"] and cross["key_tokens"] == enc["query_tokens"]
    q, k, _, _ = decode(dec)
    assert (k <= q).all()                                      # causal: no query attends to a later key
    view = show_attention(model, "a b c", layer=1)             # no target: teacher-forced on its own translation
    assert [p["kind"] for p in view.panels] == ["self", "causal", "cross"] and view.panels[2]["n_keys"] == 5


def test_evidence_from_the_audit_tables():
    cf = pd.DataFrame([("head_ablation", "1", "0", "importance_tvd", 0.25), ("head_ablation", "all", "all", "importance_tvd_mass_spearman", 0.1),
                       ("uniform", "1", "all", "mean_tvd", float("nan"))], columns=["test", "layer", "head", "statistic", "value"])
    ranks = pd.DataFrame([dict(metric="comprehensiveness", setting="k=0.2", explainer="attention", rank=4, n_explainers=6, best="ig")])
    recs = [{"id": "ex3", "explainer": "rollout", "tokens": ["a", "b"], "scores": [0.5, 0.1]},
            {"id": "ex9", "explainer": "flow", "tokens": ["a"], "scores": [1.0]}]
    ev = evidence_from_tables(counterfactual=cf, ranks=ranks, attributions=recs, example_id="ex3")
    assert ev["per_head"][0] == {"layer": 1, "head": 0, "label": "head ablation: output change (TVD)", "value": 0.25}
    assert ev["per_head"][1]["value"] is None                   # NaN -> "not available" in the view
    assert ev["global"][0]["value"] == "4 of 6" and ev["token_scores"] == {"tokens": ["a", "b"], "scores": {"rollout": [0.5, 0.1]}}
    none = evidence_from_tables()
    assert none["per_head"] == [] and len(none["missing"]) == 1 and "token_scores" not in none


@pytest.mark.slow
def test_the_report_embeds_one_view_per_task_allowed_by_its_csp(tmp_path):
    from test_report import synthetic_report_inputs

    from attnaudit.analyses.report import write_report

    page = (write_report(tmp_path / "r", **synthetic_report_inputs(n=6)) / "index.html").read_text(encoding="utf-8")
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1))
    assert csp == f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {script_csp_source()}"
    scripts = re.findall(r"<script(?P<attrs>[^>]*)>(?P<body>.*?)</script>", page, re.S)
    assert [b for a, b in scripts if "application/json" not in a] == [script_text()]
    assert page.index('id="verdict"') < page.index('<section id="attention">') < page.index('id="evidence"')
    assert 'id="attention-task00-keywords"' in page and "http://" not in page and "https://" not in page
    data = json.loads(re.search(r'class="aav-data">(.*?)</script>', page, re.S).group(1))
    labels = [r["label"] for r in data["evidence"]["per_head"]]
    assert "uniform attention: median output change (TVD)" in labels          # from the counterfactual summary
    assert any("raw attention's rank" in r["label"] for r in data["evidence"]["global"])
