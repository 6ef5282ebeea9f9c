"""The attention an audit saves for its report: exactly the shown examples', computed outside the saved items, an
encoder–decoder's with its cross-attention, and the report's one view per task with an Example choice (issue 17)."""
from __future__ import annotations

import base64
import html
import json
import re

import numpy as np
import pytest
import torch
from conftest import WORDS, make_tiny_model

from attnaudit.analyses.attention_examples import (
    check_saved,
    pick_example,
    saved_panels,
    shown_ids,
    translator_attention_example,
)
from attnaudit.analyses.attention_view import script_csp_source, script_text, show_attention
from attnaudit.analyses.audit import AuditSettings, attention_examples, audit
from attnaudit.analyses.report import render_report, write_report
from attnaudit.analyses.report_files import ATTENTION_POSITIONS, compact_attention, load_results, select_examples
from attnaudit.data.examples import Example
from attnaudit.model.hooks import record

FAST = dict(explainers=("attention", "rollout", "random"), analyses=("faithfulness",), chunk_size=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


def make_examples(n: int = 12, seed: int = 0, prefix: str = "ex") -> list[Example]:
    rng = np.random.default_rng(seed)
    return [Example(id=f"{prefix}{i}", text=" ".join(rng.choice(WORDS, size=3 + i % 6)), label=i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def classifier():
    model, examples = make_tiny_model(), make_examples()
    return model, examples, audit(model, examples, **FAST)


def tiny_translator(examples):
    from attnaudit.model.seq2seq import Translator
    from attnaudit.model.transformer import TransformerConfig, TransformerSeq2Seq
    from attnaudit.model.vocab import Vocab

    torch.manual_seed(0)
    src, tgt = Vocab.build([e.text for e in examples]), Vocab.build([e.target for e in examples])
    cfg = TransformerConfig(vocab_size=len(src), tgt_vocab_size=len(tgt), d_model=16, n_heads=2, n_layers=2, d_ff=32,
                            max_len=16)
    return Translator(TransformerSeq2Seq(cfg).eval(), src, tgt)


@pytest.fixture(scope="module")
def translator():
    """A seeded untrained Translator audited on 8 reorder pairs through the runner's path, its item given as saved
    (as a resumed run reads it): the attention is computed after the item, never inside it."""
    from attnaudit.analyses.seq2seq import audit_translator
    from attnaudit.data.tasks import make_examples as task_examples
    from attnaudit.jobs.runner import _audit_translator

    examples = task_examples("reorder", "test", n=8, seed=0)
    model = tiny_translator(examples)
    item = audit_translator(model, examples, explainers=("attention",), n_permutations=1, tests=("head_ablation",),
                            sanity_examples=0)
    items = []
    result = _audit_translator(model, examples, AuditSettings(), lambda name, compute: items.append(name) or item)
    assert items == ["seq2seq"]
    return model, examples, result


def decoded(panel) -> tuple[np.ndarray, ...]:
    """A panel's edges -> (layer·head cell, query, key, weight·255) per drawn line."""
    raw = {k: base64.b64decode(v) for k, v in panel["edges"].items()}
    start = np.frombuffer(raw["start"], "<u4")
    cell = np.repeat(np.arange(len(start) - 1), np.diff(start))
    return cell, np.frombuffer(raw["q"], "<u2"), np.frombuffer(raw["k"], "<u2"), np.frombuffer(raw["w"], "u1")


def views(page: str) -> list[dict]:
    return [json.loads(b) for b in re.findall(r'<script type="application/json" class="aav-data">(.*?)</script>', page, re.S)]


# -- the audit saves exactly the shown examples -------------------------------------------------------
def test_the_audit_saves_the_attention_of_exactly_the_shown_examples(classifier):
    model, examples, result = classifier
    data = {"attributions": [{**r, "task": "t"} for r in result.attributions],
            "examples": [{**x, "task": "t"} for x in result.examples]}
    chosen = select_examples("t", data, {})
    assert {ex["status"] for ex in chosen} == {"correct", "incorrect"} and len(chosen) == 6
    assert [a["id"] for a in result.attention_examples] == [ex["id"] for ex in chosen] == shown_ids(
        result.attributions, result.examples)
    assert result.attention_example == result.attention_examples[0]
    by_id = {e.id: e for e in examples}
    for a in result.attention_examples:                        # known answer: the example's own forward, alone
        one = model.encode([by_id[a["id"]]])
        with torch.no_grad():
            direct = record(model, one)[1].stack("*self_attn.pattern")[:, 0]            # [layer, head, query, key]
        assert a["tokens"] == list(one.tokens[0])
        np.testing.assert_allclose(np.asarray(a["attention"]), direct.numpy(), atol=1e-5)


def test_with_no_shown_example_the_first_examples_attention_is_kept(tiny_model, tiny_batch):
    got = attention_examples(tiny_model, tiny_batch, [], [])
    assert len(got) == 1 and got[0]["tokens"] == list(tiny_batch.select([0]).tokens[0])


def test_a_resumed_audit_reuses_every_item_and_runs_only_the_attention_forwards(tmp_path):
    """The attention is no saved item: a resumed audit computes nothing but one forward per shown example."""
    from attnaudit.jobs.runner import store_runner
    from attnaudit.jobs.store import ItemStore

    model, examples = make_tiny_model(), make_examples()
    with ItemStore(tmp_path, fingerprint={"t": 1}) as store:
        first = audit(model, examples, runner=store_runner(store, "t"), **FAST)
    payload = json.dumps([p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()])
    assert "attention_example" not in payload                 # no item holds attention
    calls = []
    handle = model.net.register_forward_hook(lambda *args: calls.append(1))
    try:
        with ItemStore(tmp_path, fingerprint={"t": 1}, resume=True) as store:
            again = audit(model, examples, runner=store_runner(store, "t"), **FAST)
    finally:
        handle.remove()
    assert len(calls) == len(again.attention_examples) == 6
    assert [a["id"] for a in again.attention_examples] == [a["id"] for a in first.attention_examples]
    assert [a["attention"] for a in again.attention_examples] == [a["attention"] for a in first.attention_examples]


# -- an encoder–decoder's saved examples --------------------------------------------------------------
def test_reorder_saves_the_cross_attention_of_its_shown_examples(translator):
    model, examples, result = translator
    ids = [a["id"] for a in result.attention_examples]
    assert ids == shown_ids(result.attributions, result.examples) and ids
    by_id = {e.id: e for e in examples}
    for a in result.attention_examples:
        ex = by_id[a["id"]]
        pairs = model.encode([ex])
        with torch.no_grad():
            cache = record(model, pairs)[1]
        cross = cache.stack("decoder.layers.*.cross_attn.pattern")[:, 0]              # [layer, head, tgt, src]
        dec = cache.stack("decoder.layers.*.self_attn.pattern")[:, 0]                 # [layer, head, tgt, tgt]
        assert a["tokens"] == ["[CLS]", *ex.text.lower().split(), "[SEP]"]
        assert a["target_tokens"] == ["[CLS]", *ex.target.lower().split()]            # the decoder's inputs
        np.testing.assert_allclose(np.asarray(a["cross_attention"]), cross.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(a["decoder_attention"]), dec.numpy(), atol=1e-5)
        assert np.triu(np.asarray(a["decoder_attention"]), 1).max() < 1e-6               # causal
    assert [p["kind"] for p in saved_panels(result.attention_examples[0])] == ["self", "causal", "cross"]
    text = examples[0].text                                    # no target: teacher-forced on its greedy translation
    assert translator_attention_example(model, text)["target_tokens"] == ["[CLS]", *model.translate([text])[0].split()]


@pytest.mark.slow  # writes a report (its figures)
def test_the_reorder_view_draws_the_models_cross_attention(translator, tmp_path):
    model, examples, result = translator
    page = (result.write_report(tmp_path / "r", task="reorder") / "index.html").read_text(encoding="utf-8")
    (view,) = views(page)
    by_id = {e.id: e for e in examples}
    assert view["panels"][0]["kind"] == "cross"                # it opens on what the audit's tests changed
    cross = [p for p in view["panels"] if p["kind"] == "cross"]
    assert [p["example"] for p in cross] == [a["id"] for a in result.attention_examples]
    for p in cross:
        pairs = model.encode([by_id[p["example"]]])
        with torch.no_grad():
            want = record(model, pairs)[1].stack("decoder.layers.*.cross_attn.pattern")[:, 0].numpy()
        assert p["key_tokens"] == list(pairs.src.tokens[0]) and p["query_tokens"][0] == "[CLS]"
        cell, q, k, w = decoded(p)
        layer, head = cell // p["n_heads"], cell % p["n_heads"]
        np.testing.assert_allclose(w / 255, want[layer, head, q, k], atol=0.5 / 255 + 5e-4 + 1e-6)
        drawn = set(zip(cell.tolist(), q.tolist(), k.tolist()))
        flat = want.reshape(-1, *want.shape[2:])                                          # [cell, tgt, src]
        assert {c for c in zip(*np.nonzero(flat >= 0.011))} <= drawn <= {c for c in zip(*np.nonzero(flat >= 0.009))}
    assert {r.get("panel") for r in view["evidence"]["per_head"]} == {"cross"}         # head ablation: cross heads
    assert "choose one under Example" in page and "opens on the cross-attention" in page


# -- attention.json ------------------------------------------------------------------------------------
def test_compact_attention_keeps_every_example_cut_and_rounded():
    rng = np.random.default_rng(0)
    att = lambda *shape: rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])          # noqa: E731
    long = {"task": "a", "id": "x", "tokens": [f"w{i}" for i in range(60)], "attention": att(1, 2, 60, 60)}
    pair = {"task": "b", "id": "s", "tokens": list("abc"), "attention": att(1, 2, 3, 3),
            "target_tokens": [f"t{i}" for i in range(50)], "decoder_attention": att(1, 2, 50, 50),
            "cross_attention": att(1, 2, 50, 3)}
    items = [long, {**long, "id": "y", "tokens": ["p", "q"], "attention": att(1, 2, 2, 2)}, {**long, "n_positions": 1},
             {**long, "task": "b"}, pair]
    out = compact_attention(items)
    assert [(a["task"], a["id"]) for a in out] == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "s")]   # a repeat: once
    n = ATTENTION_POSITIONS
    assert out[0]["tokens"] == long["tokens"][:n] and out[0]["n_positions"] == 60
    assert out[0]["attention"] == np.round(long["attention"][:, :, :n, :n], 3).tolist()
    s = out[3]
    assert len(s["target_tokens"]) == n and s["n_target_positions"] == 50 and s["n_positions"] == 3
    assert np.asarray(s["cross_attention"]).shape == (1, 2, n, 3) and np.asarray(s["decoder_attention"]).shape == (1, 2, n, n)
    assert s["cross_attention"] == np.round(pair["cross_attention"][:, :, :n], 3).tolist()
    check_saved(s)


def test_a_saved_example_is_checked_against_its_tokens(tmp_path):
    import pandas as pd

    good = {"tokens": ["a", "b"], "attention": np.full((1, 1, 2, 2), 0.5).tolist()}
    with pytest.raises(ValueError, match=r"'attention' must be \[layer, head, query, key\] with 3 queries"):
        check_saved({**good, "tokens": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"'cross_attention' must be \[layer, head, target, source\] = \[1, 1, 1, 2\]"):
        check_saved({**good, "target_tokens": ["[CLS]"], "cross_attention": np.ones((1, 1, 1, 3)).tolist()})
    with pytest.raises(ValueError, match="needs 'target_tokens' and 'cross_attention'"):
        check_saved({**good, "decoder_attention": []})
    metrics = pd.DataFrame([("e0", "attention", "comprehensiveness", "k=0.2", 0.1, "")],
                           columns=["example_id", "explainer", "metric", "setting", "value", "note"])
    with pytest.raises(ValueError, match=r"attention_examples\[0\]: 'attention' must be"):
        write_report(tmp_path / "r", metrics=metrics, attention_examples=[{**good, "tokens": ["a"]}])
    assert not (tmp_path / "r").exists()                       # refused before anything was written


# -- the report --------------------------------------------------------------------------------------
@pytest.mark.slow  # writes a report (its figures)
def test_the_report_has_one_view_per_task_with_every_shown_example(classifier, tmp_path):
    _, _, result = classifier
    out = result.write_report(tmp_path / "r", task="keywords")
    page = (out / "index.html").read_text(encoding="utf-8")
    data = load_results(out)
    shown = [ex["id"] for ex in select_examples("keywords", data, data["results"]["model_cards"]["keywords"])]
    assert [a["id"] for a in data["attention"]] == shown and len(shown) == 6
    (view,) = views(page)                                      # one view (one JSON block) for the task ...
    assert [p["example"] for p in view["panels"]] == shown     # ... with one panel per shown example
    assert [p["example_label"].split(" ")[1] for p in view["panels"]] == ["(correct)"] * 3 + ["(incorrect)"] * 3
    rollout = {r["id"]: r for r in data["attributions"] if r["explainer"] == "rollout"}
    for p in view["panels"]:                                   # each example's own token scores, 3 digits
        assert p["token_scores"]["tokens"] == rollout[p["example"]]["tokens"] == p["query_tokens"]
        np.testing.assert_allclose(p["token_scores"]["scores"]["rollout"], rollout[p["example"]]["scores"], rtol=1e-2)
    assert "token_scores" not in view["evidence"]              # the shared evidence holds only the task's figures
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1))
    assert csp.endswith(f"script-src {script_csp_source()}")
    scripts = re.findall(r"<script(?P<attrs>[^>]*)>(?P<body>.*?)</script>", page, re.S)
    assert [b for a, b in scripts if "application/json" not in a] == [script_text()]
    assert '<a href="#attention-task00-keywords">the attention view of task keywords</a>' in page
    md = (out / "report.md").read_text(encoding="utf-8")
    assert f"[index.html](index.html#attention-task00-keywords) (open it in a browser; examples {', '.join(shown)})" in md
    res = json.loads((out / "results.json").read_text())
    assert res["tables"]["attention.json"].startswith("sampled: the attention of the examples the report shows")


@pytest.mark.slow  # writes a report (its figures)
def test_an_older_folder_with_one_example_per_task_still_loads_and_renders(tmp_path):
    from test_report import synthetic_report_inputs

    out = write_report(tmp_path / "r", **synthetic_report_inputs(n=6))
    old = json.loads((out / "attention.json").read_text())
    assert len(old) == 1
    del old[0]["n_positions"]                                  # as the first layouts wrote it
    (out / "attention.json").write_text(json.dumps(old))
    render_report(out)
    (view,) = views((out / "index.html").read_text(encoding="utf-8"))
    assert [p["example"] for p in view["panels"]] == ["ex3"]
    assert show_attention(out, example="ex3").panels[0]["query_tokens"] == old[0]["tokens"]


# -- show_attention on saved examples -----------------------------------------------------------------
@pytest.mark.slow  # writes a report (its figures)
def test_show_attention_picks_a_saved_example_by_id(translator, tmp_path):
    _, _, result = translator
    out = result.write_report(tmp_path / "r", task="reorder")
    second = result.attention_examples[1]["id"] if len(result.attention_examples) > 1 else result.attention_examples[0]["id"]
    view = show_attention(out / "attention.json", example=second, layer=1)
    assert [p["kind"] for p in view.panels] == ["self", "causal", "cross"] and second in view.title
    assert show_attention(out).title == f"Attention of example {result.attention_examples[0]['id']}"   # a folder: the first
    saved = json.loads((out / "attention.json").read_text())
    assert show_attention(saved[0]).panels[2]["key_tokens"] == saved[0]["tokens"]
    with pytest.raises(ValueError, match=r"example 'nope' has no saved attention; available: 'reorder-test-0000\d\d' \(task reorder\)"):
        show_attention(out, example="nope")
    with pytest.raises(ValueError, match="task 'other' has no saved attention example; tasks with one: reorder"):
        pick_example(saved, task="other")
    with pytest.raises(ValueError, match="example and task choose among saved examples"):
        show_attention(make_tiny_model(), "good", example="x")
