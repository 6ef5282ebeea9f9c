"""Serrano & Smith's attention zeroing, checked against brute-force loops written here with their own hook edits."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model

from attnaudit.analyses.attention_zeroing import (
    attention_zeroing,
    attention_zeroing_summary,
    ranked_keys,
    ranking_scores,
    readout_attention,
)
from attnaudit.model.hooks import active_hook_count, hooks
from attnaudit.model.lm import DecoderClassifier
from attnaudit.model.transformer import DecoderLMConfig, TransformerDecoderLM
from attnaudit.model.vocab import Vocab


def constant_value_model():
    """W_V = 0 in every layer: any convex mix of values is the same, so zeroing attention never flips."""
    model = make_tiny_model()
    with torch.no_grad():
        for layer in model.net.encoder.layers:
            layer.self_attn.w_v.weight.zero_()
    return model


def tiny_decoder_classifier(seed: int = 0) -> DecoderClassifier:
    torch.manual_seed(seed)
    vocab = Vocab.build(["a b c d e f 1 2 3 ? ="])
    cfg = DecoderLMConfig(vocab_size=len(vocab), head="classifier", n_classes=3, d_model=16, n_heads=2, n_layers=2,
                          d_ff=32, dropout=0.1, max_len=24, norm="post")
    model = DecoderClassifier(TransformerDecoderLM(cfg), vocab, label_names=["x", "y", "z"])
    model.net.eval()
    return model


# -- the test's own reference computations ---------------------------------------------------------------------------
def own_row(model, batch, layer, row):
    """The prediction row of `layer` (mean over heads), its d(logit of predicted class)/dA (mean over heads), per
    head attention and gradient, and the prediction: recorded through an edit returning `leaf * 1`."""
    site = model.attention_sites[layer]
    leaves = {}

    def edit(pattern, allowed):
        leaves["a"] = pattern.detach().clone().requires_grad_(True)
        return leaves["a"] * 1

    with model.evaluating(), torch.enable_grad(), hooks(model, {site: edit}):
        logits = model(batch)
        pred = logits.argmax(-1)
        grad, = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), leaves["a"])
    b = torch.arange(len(batch))
    a = leaves["a"].detach()[b, :, row]                  # [batch, head, key]
    g = grad[b, :, row]                                  # [batch, head, key]
    return a, g, pred


def own_order(score, n_keys):
    """Keys by descending score among the first n_keys positions (right padding), ties by position."""
    return sorted(range(n_keys), key=lambda k: (-float(score[k]), k))


def brute_force_k(model, batch, layer, e, order, row):
    """Smallest k zeroing order[:k] (all heads, row `row`, renormalised) that changes example e's argmax, or None."""
    one = batch.select([e])
    site = model.attention_sites[layer]
    with model.evaluating(), torch.no_grad():
        base = int(model(one).argmax(-1))
        for k in range(1, len(order)):
            def edit(pattern, allowed, keys=order[:k]):
                p = pattern.clone()
                p[:, :, row, keys] = 0.0
                p[:, :, row, :] = p[:, :, row, :] / p[:, :, row, :].sum(-1, keepdim=True)
                return p
            with hooks(model, {site: edit}):
                if int(model(one).argmax(-1)) != base:
                    return k
    return None


def check_against_brute_force(model, batch, layer, frame, scores, rows):
    n_keys = batch.attention_mask.sum(1)
    checked_flips = 0
    for ranking, score in scores.items():
        got = frame[frame.ranking == ranking].reset_index(drop=True)
        for e in range(len(batch)):
            order = own_order(score[e], int(n_keys[e]))
            k = brute_force_k(model, batch, layer, e, order, int(rows[e]))
            r = got.iloc[e]
            assert int(r.n_keys) == int(n_keys[e])
            if k is None:
                assert not r.flipped and math.isnan(r.fraction) and math.isnan(r.n_zeroed), (ranking, e)
            else:
                checked_flips += 1
                assert r.flipped and r.n_zeroed == k and r.fraction == pytest.approx(k / int(n_keys[e])), (ranking, e)
    return checked_flips


# -- known answers ---------------------------------------------------------------------------------------------------
def test_k_matches_a_brute_force_loop_for_attention_gradient_and_product(tiny_model, tiny_batch):
    layer = 0
    frame = attention_zeroing(tiny_model, tiny_batch, layer=layer, rankings=("attention", "gradient", "attention_x_gradient"))
    assert list(frame.columns) == ["example_id", "layer", "ranking", "fraction", "n_zeroed", "n_keys", "flipped"]
    assert len(frame) == 3 * len(tiny_batch) and set(frame.layer) == {"0"}
    assert list(frame.example_id[:4]) == ["ex0", "ex1", "ex2", "ex3"]
    a, g, _ = own_row(tiny_model, tiny_batch, layer, torch.zeros(len(tiny_batch), dtype=torch.long))
    scores = {"attention": a.mean(1), "gradient": g.mean(1), "attention_x_gradient": (a * g).mean(1)}
    flips = check_against_brute_force(tiny_model, tiny_batch, layer, frame, scores, torch.zeros(len(tiny_batch)))
    assert flips >= 5                                     # this seed flips ex0-ex2 under several rankings: not vacuous
    assert active_hook_count(tiny_model.net) == 0


def test_random_ranking_matches_brute_force_and_the_seed(tiny_model, tiny_batch):
    frame = attention_zeroing(tiny_model, tiny_batch, layer=0, rankings=("random",), seed=3)
    rand = torch.rand(tiny_batch.attention_mask.shape, generator=torch.Generator().manual_seed(3))
    check_against_brute_force(tiny_model, tiny_batch, 0, frame, {"random": rand}, torch.zeros(len(tiny_batch)))


def test_gradient_ranking_is_the_autograd_gradient_of_the_recorded_attention(tiny_model, tiny_batch):
    for layer in (0, 1):
        rows = torch.zeros(len(tiny_batch), dtype=torch.long)
        a, g, pred = own_row(tiny_model, tiny_batch, layer, rows)
        att, grad, allowed, got_rows, got_pred = readout_attention(tiny_model, tiny_batch, layer=layer, gradient=True)
        assert torch.equal(got_rows, rows) and torch.equal(got_pred, pred)
        assert torch.equal(allowed, tiny_batch.attention_mask)
        torch.testing.assert_close(att, a)
        torch.testing.assert_close(grad, g)
        n = tiny_batch.attention_mask.sum(1)
        for name, own in (("gradient", g.mean(1)), ("attention_x_gradient", (a * g).mean(1))):
            order = ranked_keys(ranking_scores(name, att, grad, allowed, 0))
            for e in range(len(tiny_batch)):
                assert order[e, : int(n[e])].tolist() == own_order(own[e], int(n[e]))
    assert all(p.grad is None for p in tiny_model.net.parameters())   # only the attention got a gradient


def test_random_is_deterministic_with_the_seed_and_differs_for_another(tiny_model, tiny_batch):
    one = attention_zeroing(tiny_model, tiny_batch, layer=0, rankings=("random",), seed=0)
    again = attention_zeroing(tiny_model, tiny_batch, layer=0, rankings=("random",), seed=0)
    assert one.equals(again)
    allowed = tiny_batch.attention_mask
    n = allowed.sum(1)
    o0 = ranked_keys(ranking_scores("random", None, None, allowed, 0))
    o1 = ranked_keys(ranking_scores("random", None, None, allowed, 1))
    assert any(o0[e, : int(n[e])].tolist() != o1[e, : int(n[e])].tolist() for e in range(len(n)))
    for e in range(len(n)):                                  # a permutation of exactly the attended keys
        assert sorted(o0[e, : int(n[e])].tolist()) == list(range(int(n[e])))


def test_attention_that_does_not_matter_never_flips(tiny_batch):
    frame = attention_zeroing(constant_value_model(), tiny_batch, layer=1)
    assert not frame.flipped.any() and frame.fraction.isna().all() and frame.n_zeroed.isna().all()
    n = tiny_batch.attention_mask.sum(1).tolist()
    for ranking in ("attention", "gradient", "attention_x_gradient", "random"):
        assert frame[frame.ranking == ranking].n_keys.tolist() == n          # real length, [CLS]/[SEP] included
    rows = attention_zeroing_summary(frame)
    stats = {s: v for _, _, _, s, v in rows}
    assert stats["flip_rate_attention"] == 0.0 and math.isnan(stats["median_fraction_attention"])


def test_max_batch_does_not_change_the_answer(tiny_model, tiny_batch):
    big = attention_zeroing(tiny_model, tiny_batch, layer=0, rankings=("attention", "random"))
    small = attention_zeroing(tiny_model, tiny_batch, layer=0, rankings=("attention", "random"), max_batch=3)
    assert big.equals(small)


def test_decoder_reads_the_last_real_token_row(one_thread_module):
    model = tiny_decoder_classifier()
    batch = model.encode(["a 1 b 2 ? a c", "c 3 ? c", "b b 2", "e f 1 2 3 ? a b"])
    rows = batch.attention_mask.sum(1) - 1
    for layer in (0, 1):
        frame = attention_zeroing(model, batch, layer=layer, rankings=("attention", "gradient", "attention_x_gradient"))
        assert frame.n_keys.tolist() == 3 * (rows + 1).tolist()           # causal: the last row sees the whole row
        a, g, _ = own_row(model, batch, layer, rows)
        scores = {"attention": a.mean(1), "gradient": g.mean(1), "attention_x_gradient": (a * g).mean(1)}
        assert check_against_brute_force(model, batch, layer, frame, scores, rows) >= 1


def test_summary_rows():
    import pandas as pd

    frame = pd.DataFrame({"example_id": ["a", "b", "c", "a", "b", "c"], "layer": "1",
                          "ranking": ["attention"] * 3 + ["random"] * 3,
                          "fraction": [0.25, 0.75, math.nan, math.nan, math.nan, math.nan],
                          "n_zeroed": [1.0, 3.0, math.nan, math.nan, math.nan, math.nan],
                          "n_keys": [4, 4, 5, 4, 4, 5], "flipped": [True, True, False, False, False, False]})
    rows = attention_zeroing_summary(frame)
    assert rows[:2] == [("attention_zeroing", "1", "all", "median_fraction_attention", 0.5),
                        ("attention_zeroing", "1", "all", "flip_rate_attention", pytest.approx(2 / 3))]
    assert rows[2][3] == "median_fraction_random" and math.isnan(rows[2][4]) and rows[3][4] == 0.0
    with pytest.raises(ValueError, match="missing"):
        attention_zeroing_summary(frame.drop(columns="flipped"))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"layer": "all"}, "layer must be an int"),
    ({"layer": True}, "layer must be an int"),
    ({"layer": 2}, "layer must be an int"),
    ({"layer": 0, "rankings": "attention"}, "rankings must be"),
    ({"layer": 0, "rankings": ()}, "rankings must be"),
    ({"layer": 0, "rankings": ("attention", "saliency")}, "unknown"),
    ({"layer": 0, "rankings": ("random", "random")}, "repeat"),
    ({"layer": 0, "seed": 1.5}, "seed must be an int"),
    ({"layer": 0, "max_batch": 0}, "max_batch must be an int >= 1"),
    ({"layer": 0, "max_batch": 2.0}, "max_batch must be an int >= 1"),
])
def test_bad_arguments(tiny_model, tiny_batch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_zeroing(tiny_model, tiny_batch, **kwargs)


def test_the_audit_runs_it_when_asked_and_merges_its_items(tiny_model, tiny_examples):
    from attnaudit.analyses.audit import audit
    from attnaudit.analyses.counterfactual import TESTS
    result = audit(tiny_model, tiny_examples, explainers=["attention", "random"], analyses=("counterfactual",),
                   counterfactual_tests=("uniform", "attention_zeroing"), progress=False)
    s = result.counterfactual["summary"]
    zeroing = s[s["test"] == "attention_zeroing"]
    assert set(zeroing["layer"]) == {"0", "1"}                           # int layers only, no "all"
    assert {"median_fraction_attention", "flip_rate_random"} <= set(zeroing["statistic"])
    frame = result.counterfactual["attention_zeroing"]
    assert len(frame) == 2 * len(tiny_examples) * 4                      # layers x examples x rankings
    direct = attention_zeroing(tiny_model, tiny_model.encode(tiny_examples), layer=1)
    assert frame[frame["layer"] == "1"].reset_index(drop=True)["fraction"].equals(direct["fraction"])
    assert "attention_zeroing" not in TESTS                              # opt-in: the default audit is unchanged
