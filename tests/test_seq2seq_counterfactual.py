"""Adversarial cross-attention and cross-attention head ablation (analyses/seq2seq_counterfactual.py) on a barely
trained built-in reorder Translator (~1 s) and a tiny random HuggingFace BART folder (nothing downloaded): the
TVD constraint, determinism, which rows are edited, and head ablation against explicit forwards."""
from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pandas as pd
import pytest
import torch

from attnaudit.analyses.counterfactual import jsd, tvd
from attnaudit.analyses.seq2seq import prepare
from attnaudit.analyses.seq2seq_counterfactual import (
    SUMMARY_COLUMNS,
    ablated_probs,
    adversarial_search,
    cross_adversarial,
    cross_head_ablation,
    cross_head_table,
    row_edit,
)
from attnaudit.analyses.verdict import counterfactual_findings
from attnaudit.data.examples import Example
from attnaudit.data.tasks import make_examples
from attnaudit.model.hooks import hooks, record
from attnaudit.model.train import TrainSettings, train_task

pytestmark = pytest.mark.usefixtures("one_thread_module")

EPS, SLACK = 0.01, 1e-5


@pytest.fixture(scope="module")
def translator():
    tiny = TrainSettings(d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16, epochs=1, batch_size=32, warmup=10,
                         lr_factor=0.5, dropout=0.0, n_train=64, n_valid=8, n_test=8)
    model, _ = train_task("reorder", tiny, device="cpu", progress=False)       # a barely trained fit, in ~1 s
    model.net.eval()
    return model


@pytest.fixture(scope="module")
def prepared(translator):
    examples = make_examples("reorder", "test", n=6, seed=0)
    return (examples, *prepare(translator, examples))


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    pytest.importorskip("transformers", reason="the HuggingFace adapter needs the optional extra")
    from test_hf_seq2seq import write_folder

    from attnaudit.model.hf_seq2seq import load_hf_seq2seq

    model = load_hf_seq2seq(write_folder(tmp_path_factory.mktemp("bart"), "bart"))
    examples = [Example("b0", "the cat sat on the mat", target="die katze sass auf der matte",
                        alignment=((1, 1), (2, 2), (3, 3), (5, 5))),
                Example("b1", "unlikely dog", target="der hund unlikely", alignment=((1, 1), (0, 2))),
                Example("b2", "a dog ran", target="der hund lief", alignment=((1, 1), (2, 2)))]
    return model, examples, *prepare(model, examples)


# -- independent re-computations, written here --------------------------------------------------
def _unit_probs(model, pairs, units, edits=None):
    """p(· | y_<t, x) at every unit [unit, vocab]: one plain forward of the whole batch with `edits`."""
    with torch.no_grad(), hooks(model, edits or {}):
        return model(pairs).float().softmax(-1)[units.src, units.tgt]


def _copies(pairs, rows):
    return pairs.rows(rows)


def _with_rows(model, pairs, units, sites, rows):
    """p at each unit when query row t of its own example copy is replaced by rows [site, unit, head, src]."""
    t = units.tgt

    def put(new):
        def edit(pattern, allowed):
            out = pattern.clone()
            out[torch.arange(len(t)), :, t] = new.to(out.dtype)
            return out
        return edit

    with torch.no_grad(), hooks(model, {s: put(rows[j]) for j, s in enumerate(sites)}):
        probs = model(_copies(pairs, units.src)).float().softmax(-1)
    return probs[torch.arange(len(t)), t]


def _check_adversary(model, pairs, units, layer, n_steps=40):
    sites = model.cross_attention_sites if layer == "all" else [model.cross_attention_sites[layer]]
    res = adversarial_search(model, pairs, units, layer=layer, epsilon=EPS, n_steps=n_steps)
    base = _unit_probs(model, pairs, units)
    _, cache = record(model, pairs, names=sites)
    original = torch.stack([cache[s][units.src, :, units.tgt] for s in sites]).float()   # [site, unit, head, src]
    torch.testing.assert_close(res.original, original)
    # the reported attention, put back by an edit written here: the output TVD it reports and ≤ ε where satisfied
    again = tvd(_with_rows(model, pairs, units, sites, res.attention), base)
    torch.testing.assert_close(again, res.tvd, atol=1e-5, rtol=0)
    assert res.satisfied.any() and (again[res.satisfied] <= EPS + SLACK).all()
    assert (res.tvd[res.satisfied] <= EPS).all()
    # the JSD it reports is that of the reported rows; rows stay distributions over the real source tokens
    torch.testing.assert_close(jsd(res.attention, original).mean(-1).mean(0), res.jsd, atol=1e-6, rtol=1e-5)
    assert (res.jsd >= 0).all()
    torch.testing.assert_close(res.attention.sum(-1), torch.ones_like(res.attention.sum(-1)))
    assert (res.attention * ~pairs.src.attention_mask[units.src][None, :, None, :]).abs().sum() == 0
    zero = adversarial_search(model, pairs, units, layer=layer, epsilon=EPS, n_steps=0)
    both = zero.satisfied                             # satisfied at the (same) start: the search only improves on it
    assert (res.satisfied[both]).all() and (res.jsd[both] >= zero.jsd[both]).all()
    assert res.satisfied.float().mean() >= zero.satisfied.float().mean()
    if both.any():
        assert res.jsd[both].mean() > zero.jsd[both].mean() + 0.05
    if zero.satisfied.any():
        assert res.jsd[res.satisfied].mean() > zero.jsd[zero.satisfied].mean()
    return res


# -- (a) adversarial attention -------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1, "all"])
def test_adversary_holds_the_output_within_epsilon_and_moves_attention(translator, prepared, layer):
    _, pairs, units = prepared
    res = _check_adversary(translator, pairs, units, layer)
    assert res.satisfied.float().mean() >= 0.75 and res.jsd[res.satisfied].mean() > 0.15


def test_adversary_is_deterministic_with_the_seed_and_free_of_max_batch(translator, prepared):
    _, pairs, units = prepared
    translator.net.train()                                                   # eval inside, the mode restored after
    try:
        a = adversarial_search(translator, pairs, units, layer=0, n_steps=10)
        assert translator.net.training
    finally:
        translator.net.eval()
    b = adversarial_search(translator, pairs, units, layer=0, n_steps=10)
    for f in ("jsd", "tvd", "satisfied", "attention"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    chunked = adversarial_search(translator, pairs, units, layer=0, n_steps=10, max_batch=7)   # 25 units: 4 chunks
    torch.testing.assert_close(chunked.jsd, a.jsd, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked.attention, a.attention, atol=1e-5, rtol=1e-4)
    other = adversarial_search(translator, pairs, units, layer=0, n_steps=10, seed=1)
    assert not torch.equal(other.attention, a.attention)


@pytest.mark.parametrize("layer", [0, "all"])
def test_several_adversaries_report_the_best_feasible_one_per_unit(translator, prepared, layer):
    _, pairs, units = prepared
    sites = translator.cross_attention_sites if layer == "all" else [translator.cross_attention_sites[layer]]
    one = adversarial_search(translator, pairs, units, layer=layer, epsilon=EPS, n_steps=10, lr=1.0)
    three = adversarial_search(translator, pairs, units, layer=layer, epsilon=EPS, n_steps=10, lr=1.0, n_adversaries=3)
    # adversary 0 is the single search, so three adversaries find at least as much wherever that one was feasible
    assert (three.satisfied | ~one.satisfied).all()
    assert (three.jsd[one.satisfied] >= one.jsd[one.satisfied] - 1e-7).all()
    assert not torch.equal(three.attention, one.attention)       # the other adversaries won somewhere
    # the reported rows, put back by an edit written here, give the reported TVD, within ε where satisfied
    base = _unit_probs(translator, pairs, units)
    again = tvd(_with_rows(translator, pairs, units, sites, three.attention), base)
    torch.testing.assert_close(again, three.tvd, atol=1e-5, rtol=0)
    assert (again[three.satisfied] <= EPS + SLACK).all()
    torch.testing.assert_close(jsd(three.attention, three.original).mean(-1).mean(0), three.jsd, atol=1e-6, rtol=1e-5)
    single = adversarial_search(translator, pairs, units, layer=layer, epsilon=EPS, n_steps=10, lr=1.0, n_adversaries=1)
    assert torch.equal(single.jsd, one.jsd) and torch.equal(single.attention, one.attention)
    with pytest.raises(ValueError, match=r"n_adversaries must be an int in \[1, 100\].*got 0"):
        adversarial_search(translator, pairs, units, layer=layer, n_adversaries=0)


def test_adversary_rows_and_frame(translator, prepared):
    examples, pairs, units = prepared
    res = adversarial_search(translator, pairs, units, layer="all", n_steps=5)
    rows = res.rows(len(examples))
    assert [r[:4] for r in rows] == [("adversarial", "all", "all", s) for s in
                                     ("jsd_reached", "median_jsd_reached", "constraint_satisfied_fraction")]
    frame = res.frame([e.id for e in examples])
    assert list(frame.columns) == ["example_id", "layer", "jsd", "tvd", "satisfied", "n_units"]
    assert frame["n_units"].sum() == len(units.src)
    # per example, then over examples
    assert rows[0][4] == pytest.approx(frame["jsd"].mean()) and rows[1][4] == pytest.approx(float(torch.tensor(frame["jsd"].to_numpy()).median()))   # torch's: the lower middle
    assert rows[2][4] == pytest.approx(frame["satisfied"].mean())
    assert cross_adversarial(translator, pairs, units, layer="all", n_steps=5) == rows


# -- (c) only query row t is edited --------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, "all"])
def test_the_row_edit_leaves_other_rows_and_earlier_outputs_alone(translator, prepared, layer):
    _, pairs, units = prepared
    sites = translator.cross_attention_sites if layer == "all" else [translator.cross_attention_sites[layer]]
    copies = _copies(pairs, units.src)                                       # one copy of its example per unit
    n_src = pairs.src.input_ids.shape[1]
    with torch.no_grad():
        base_logits, base = record(translator, copies, names=translator.cross_attention_sites)
    new = torch.rand(len(sites), len(units.src), 2, n_src, generator=torch.Generator().manual_seed(0))
    new = new * pairs.src.attention_mask[units.src][None, :, None, :]
    new = new / new.sum(-1, keepdim=True)
    with torch.no_grad(), hooks(translator, {s: row_edit(new[j], units.tgt) for j, s in enumerate(sites)}):
        logits, edited = record(translator, copies, names=translator.cross_attention_sites)
    t = units.tgt
    q = torch.arange(pairs.tgt_out.shape[1])
    for j, s in enumerate(sites):
        assert torch.equal(edited[s][torch.arange(len(t)), :, t], new[j])            # row t: the given rows
    first = translator.cross_attention_sites[0]
    other = q[None, :] != t[:, None]                                             # [unit, tgt]: every row but t
    assert torch.equal(edited[first].transpose(1, 2)[other], base[first].transpose(1, 2)[other])
    if layer != "all":                                                           # one layer: its other rows unchanged
        s = sites[0]
        assert torch.equal(edited[s].transpose(1, 2)[other], base[s].transpose(1, 2)[other])
    before = q[None, :] < t[:, None]                                             # positions before t: the same outputs
    torch.testing.assert_close(logits[before], base_logits[before], atol=1e-6, rtol=0)
    after = q[None, :] >= t[:, None]
    assert not torch.allclose(logits[after], base_logits[after])


# -- (b) head ablation ---------------------------------------------------------------------------
def _zero(heads):
    def edit(pattern, allowed):
        keep = torch.ones(pattern.shape[1], dtype=pattern.dtype, device=pattern.device)
        keep[heads] = 0.0
        return pattern * keep[None, :, None, None]
    return edit


def _check_head_ablation(model, pairs, units):
    sites = model.cross_attention_sites
    base = _unit_probs(model, pairs, units)
    _, cache = record(model, pairs, names=sites)
    n_heads = cache[sites[0]].shape[1]
    table = cross_head_table(model, pairs, units, max_batch=2)
    assert list(table.columns) == ["layer", "head", "importance_tvd", "importance_prob_drop", "decisive_mass"]
    assert len(table) == len(sites) * n_heads
    pred = base.argmax(-1)
    gold = units.gold.float()
    n = len(pairs.tgt_out)

    def per_example_mean(v):
        keep = ~torch.isnan(v)
        means = [v[(units.src == i) & keep].double().mean() for i in range(n) if ((units.src == i) & keep).any()]
        return float(torch.stack(means).mean()) if means else math.nan

    for layer, site in enumerate(sites):
        for head in range(n_heads):
            mine = ablated_probs(model, pairs, units, layer=layer, heads=head, max_batch=2)
            explicit = _unit_probs(model, pairs, units, {site: _zero([head])})
            torch.testing.assert_close(mine, explicit, atol=1e-6, rtol=1e-5)
            row = table[(table["layer"] == layer) & (table["head"] == head)].iloc[0]
            assert row.importance_tvd == pytest.approx(per_example_mean(tvd(explicit, base)), abs=1e-6)
            drop = base[torch.arange(len(pred)), pred] - explicit[torch.arange(len(pred)), pred]
            assert row.importance_prob_drop == pytest.approx(per_example_mean(drop), abs=1e-6)
            att = cache[site][units.src, head, units.tgt].float()                # [unit, src]
            mass = torch.where(gold.sum(-1) > 0, (att * gold).sum(-1), torch.nan)
            expected = per_example_mean(mass)
            assert (math.isnan(row.decisive_mass) and math.isnan(expected)) or \
                row.decisive_mass == pytest.approx(expected, abs=1e-6)
        # every head of the layer = the layer's cross-attention zeroed (the output then reads no source at layer)
        every = ablated_probs(model, pairs, units, layer=layer, heads=list(range(n_heads)))
        zeroed = _unit_probs(model, pairs, units, {site: lambda p, a: torch.zeros_like(p)})
        torch.testing.assert_close(every, zeroed, atol=1e-6, rtol=1e-5)
    return table


def test_head_ablation_equals_explicit_forwards(translator, prepared):
    _, pairs, units = prepared
    table = _check_head_ablation(translator, pairs, units)
    assert (table.importance_tvd > 0).all() and table.decisive_mass.between(0, 1).all()


def test_head_ablation_rows_are_the_classifier_format_and_the_verdict_reads_them(translator, prepared):
    examples, pairs, units = prepared
    rows = cross_head_ablation(translator, pairs, units)
    rows += cross_adversarial(translator, pairs, units, layer=0, n_steps=5)
    cf = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    assert all(isinstance(v, str) for v in (*cf["layer"], *cf["head"])) and cf.value.map(type).eq(float).all()
    per_head = cf[(cf.test == "head_ablation") & (cf.layer != "all")]
    assert set(per_head.statistic) == {"importance_tvd", "importance_prob_drop", "decisive_mass"}
    assert set(zip(per_head["layer"], per_head["head"])) == {(str(layer), str(h)) for layer in range(2) for h in range(2)}
    assert set(cf[cf.layer == "all"].statistic) == {"importance_tvd_mass_spearman", "prob_drop_mass_spearman"}
    found, facts = counterfactual_findings(cf)
    assert found["adversarial_found"] is not None
    assert any("Adversarial attention" in f for f in facts) and any("Spearman" in f for f in facts)


# -- (d) bad arguments -----------------------------------------------------------------------------
def test_bad_arguments_name_the_parameter_and_the_value(translator, prepared):
    _, pairs, units = prepared
    for eps in (0, 0.0, -0.1, float("nan"), 1.5, True, "0.1"):
        with pytest.raises(ValueError, match=r"epsilon must be a float in \(0, 1\].*got " + repr(eps).replace(".", r"\.")):
            adversarial_search(translator, pairs, units, layer=0, epsilon=eps)
    for layer in (2, -1, "last", True, 1.0):
        with pytest.raises(ValueError, match=r"layer must be an int in \[0, 1\] or 'all'; got " + repr(layer)
                           + r" \(this model has 2 decoder layers\)"):
            cross_adversarial(translator, pairs, units, layer=layer)
    for layer in (2, -1):
        with pytest.raises(ValueError, match=f"layer must be an int in .*got {layer}"):
            ablated_probs(translator, pairs, units, layer=layer, heads=0)
    with pytest.raises(ValueError, match="one decoder layer"):
        ablated_probs(translator, pairs, units, layer="all", heads=0)
    with pytest.raises(ValueError, match=r"head must be an int in \[0, 1\]; got 2"):
        ablated_probs(translator, pairs, units, layer=0, heads=2)
    with pytest.raises(ValueError, match=r"n_steps must be an int >= 0 .*got -1"):
        adversarial_search(translator, pairs, units, layer=0, n_steps=-1)
    with pytest.raises(ValueError, match="lr must be a float > 0.*got 0"):
        adversarial_search(translator, pairs, units, layer=0, lr=0)
    with pytest.raises(ValueError, match="max_batch must be an int >= 1; got 0"):
        cross_head_ablation(translator, pairs, units, max_batch=0)


# -- a HuggingFace BART: sub-word units, 4 cross-attention heads ---------------------------------------
def test_bart_adversary_and_head_ablation(bart):
    model, examples, pairs, units = bart
    res = _check_adversary(model, pairs, units, 0, n_steps=20)
    assert res.jsd[res.satisfied].mean() > 0.05
    table = _check_head_ablation(model, pairs, units)
    assert len(table) == 2 * 4 and not table.decisive_mass.isna().any()
    rows = cross_head_ablation(model, pairs, units) + cross_adversarial(model, pairs, units, layer="all", n_steps=3)
    assert {r[0] for r in rows} == {"adversarial", "head_ablation"} and all(len(r) == 5 for r in rows)
