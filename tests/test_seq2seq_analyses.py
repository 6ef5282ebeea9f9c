"""Known answers for the encoder–decoder analyses (analyses/seq2seq.py) on a reorder model trained in ~2 s."""
from __future__ import annotations

import copy
import json
import math

import pytest
import sacrebleu
import torch

from attnaudit.analyses.report import write_report
from attnaudit.analyses.seq2seq import (
    ALIGNMENT_METRICS,
    CORPUS_ID,
    EXPLAINERS,
    TeacherForcedEngine,
    audit_translator,
    cross_rollout,
    prepare,
    translator_counterfactual,
    translator_metrics,
    translator_scores,
)
from attnaudit.analyses.tables import COLUMNS
from attnaudit.data.examples import Example
from attnaudit.data.tasks import make_examples
from attnaudit.model.train import TrainSettings, train_task

# 2 layers, d_model=32, 3000 examples, 3 epochs: test exact match 1.0 in about 2 s on one thread.
SMALL = TrainSettings(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=16, epochs=3, batch_size=32, warmup=100,
                      lr_factor=0.5, dropout=0.0, n_train=3000, n_valid=100, n_test=100)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


@pytest.fixture(scope="module")
def reorder_model():
    model, metrics = train_task("reorder", SMALL, device="cpu", progress=False)
    assert metrics["test_exact_match"] >= 0.9
    model.net.eval()
    return model


@pytest.fixture(scope="module")
def test_examples():
    return make_examples("reorder", "test", n=300, seed=0)


def _stochastic(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def test_cross_rollout_one_layer_by_hand():
    a_e, a_d, a_c = _stochastic(1, 2, 4, 4, seed=1), _stochastic(1, 2, 3, 3, seed=2), _stochastic(1, 2, 3, 4, seed=3)
    got = cross_rollout(a_e, a_d, a_c)                                   # [batch, tgt, src]
    # R_ss = I + A_e, R_tt = I + A_d (rows of A sum to 1, so R̄ = R), R_ts = 0 + R̄_tt · A_c · R̄_ss
    expected = (torch.eye(3) + a_d[0]) @ a_c[0] @ (torch.eye(4) + a_e[0])
    torch.testing.assert_close(got, expected)


@pytest.mark.slow
def test_units_and_gold_follow_the_alignment(reorder_model):
    ex = Example("x", "red cat sees dog", target="chat rouge voit chien", alignment=((0, 1), (1, 0), (2, 2), (3, 3)))
    pairs, units = prepare(reorder_model, [ex])
    assert units.tgt.tolist() == [0, 1, 2, 3]                            # four words; [SEP] is no unit
    # source tokens: [CLS] red cat sees dog [SEP]; "chat" copies "cat" (token 2), "rouge" copies "red" (token 1)
    assert units.gold.int().argmax(1).tolist() == [2, 1, 3, 4] and units.gold.sum(1).tolist() == [1, 1, 1, 1]


@pytest.mark.slow
@pytest.mark.slow
def test_audit_tables_are_tidy_and_render(reorder_model, test_examples, tmp_path):
    out = audit_translator(reorder_model, test_examples[:16], n_permutations=3,
                           explainers=("cross_attention", "cross_rollout", *EXPLAINERS[1:2], *EXPLAINERS[3:]))
    m = out["metrics"]
    assert list(m.columns) == COLUMNS and not m["value"].isna().any()
    heads = {f"cross_attention_L{layer}_H{head}" for layer in range(2) for head in range(2)}
    assert set(m["explainer"]) == set(EXPLAINERS) | {"model"} | heads              # every family applies
    assert set(m["example_id"]) == {e.id for e in test_examples[:16]} | {CORPUS_ID}
    # the model's own translations: exact match per example and over the corpus, corpus BLEU (sacrebleu)
    own = m[m.explainer == "model"].set_index(["example_id", "metric"])["value"]
    hyps = reorder_model.translate(test_examples[:16])
    same = [float(h == " ".join(e.target.split())) for h, e in zip(hyps, test_examples[:16])]
    assert [own[(e.id, "exact_match")] for e in test_examples[:16]] == same
    assert own[(CORPUS_ID, "exact_match")] == pytest.approx(sum(same) / 16)
    assert own[(CORPUS_ID, "bleu")] == pytest.approx(sacrebleu.corpus_bleu(hyps, [[" ".join(e.target.split())
                                                                                  for e in test_examples[:16]]]).score)
    m = m[m.explainer != "model"]
    per = m[m.example_id != CORPUS_ID].groupby(["explainer", "metric", "setting"]).size()
    assert (per == 16).all()                                             # one row per example, not per word
    corpus = m[m.example_id == CORPUS_ID]                                # alignment metrics: + one corpus row each
    assert set(corpus["metric"]) == set(ALIGNMENT_METRICS) and set(corpus["setting"]) == {"argmax:corpus"}
    assert (corpus.groupby(["explainer", "metric"]).size() == 1).all() and len(corpus) == (len(EXPLAINERS) + 4) * 3
    assert set(m.loc[m.explainer.isin(heads), "metric"]) == set(ALIGNMENT_METRICS)   # heads: alignment rows only
    assert set(m.loc[m.metric == "comprehensiveness", "setting"]) == {"k=0.1", "k=0.2", "k=0.5", "aopc"}
    assert m.loc[m.metric.isin(["gold_auprc", "deletion_auc", "insertion_auc"]), "value"].between(0, 1).all()
    cf = out["counterfactual"]
    assert list(cf["summary"].columns) == ["test", "layer", "head", "statistic", "value"]
    assert set(cf["summary"]["layer"]) == {"0", "1", "all"}
    assert {"median_tvd", "accuracy", "accuracy_original", "flip_rate_max", "flip_rate_random", "jsd_reached",
            "importance_tvd"} <= set(cf["summary"]["statistic"])
    assert set(cf["summary"]["test"]) == {"permutation", "adversarial", "uniform", "erasure", "head_ablation"}
    assert list(cf["permutation"].columns) == ["example_id", "layer", "max_attention", "median_tvd"]
    assert len(cf["permutation"]) == 16 * 3 and not cf["permutation"].isna().any().any()
    rec = out["attributions"][0]
    assert {"id", "text", "tokens", "scores", "special", "explainer", "params", "target", "prob"} <= set(rec)
    assert len(out["attributions"]) == 16 * len(EXPLAINERS) and len(rec["tokens"]) == len(rec["scores"]) == len(out["examples"][0]["gold"])
    folder = write_report(tmp_path / "r", metrics=m, counterfactual=cf, attributions=out["attributions"],
                          examples=out["examples"], settings={"task": "reorder"})
    assert json.loads((folder / "results.json").read_text())["verdicts"]["reorder"]["answer"] != "undetermined"


@pytest.mark.slow
def test_random_gold_scores_match_chance(reorder_model, test_examples):
    table, attrs = translator_metrics(reorder_model, test_examples, explainers=("random",))
    a = attrs["random"]
    n = a.lengths().double()                                             # one gold token among n per word
    chance_p = (1 / n).mean()                                            # precision@1 of a random ranking
    chance_ap = torch.tensor([sum(1 / r for r in range(1, int(k) + 1)) / k for k in n]).mean()  # E[AP] = H_n / n
    mean = table.groupby("metric")["value"].mean()
    assert abs(mean["gold_precision_at_k"] - float(chance_p)) < 0.04
    assert abs(mean["gold_average_precision"] - float(chance_ap)) < 0.04


@pytest.mark.slow
def test_oracle_beats_random_and_cross_attention_finds_the_gold(reorder_model, test_examples):
    examples = test_examples[:60]
    pairs, units = prepare(reorder_model, examples)
    oracle = torch.zeros(*pairs.tgt_out.shape, pairs.src.input_ids.shape[1])
    oracle[units.src, units.tgt] = units.gold.float()                   # the gold-aligned token first
    table, _ = translator_metrics(reorder_model, examples, explainers=("random", "attention"), scores={"oracle": oracle})
    mean = table.groupby(["explainer", "metric", "setting"])["value"].mean()
    assert mean["oracle", "gold_auprc", ""] == mean["oracle", "gold_average_precision", ""] == 1.0
    assert mean["oracle", "comprehensiveness", "aopc"] > mean["random", "comprehensiveness", "aopc"] + 0.2
    assert mean["oracle", "sufficiency", "aopc"] < mean["random", "sufficiency", "aopc"] - 0.2
    assert mean["attention", "gold_precision_at_k", "k=n_gold"] > 0.8  # a trained reorder model attends to the word it copies


@pytest.mark.slow
def test_batched_occlusion_equals_single_forwards(reorder_model, test_examples):
    examples = test_examples[:5]
    pairs, _ = prepare(reorder_model, examples)
    got = translator_scores(reorder_model, pairs, ("occlusion",), max_batch=7)["occlusion"]  # [batch, tgt, src]
    net, s = reorder_model.net, pairs.src
    expected = torch.zeros_like(got)
    with torch.no_grad():
        for i in range(len(examples)):
            def p_ref(ids):
                logits = net(ids[None], s.attention_mask[i : i + 1], pairs.tgt_in[i : i + 1], pairs.tgt_mask[i : i + 1])  # noqa: B023
                return logits.softmax(-1)[0].gather(-1, pairs.tgt_out[i, :, None])[:, 0]  # [tgt]  # noqa: B023
            full = p_ref(s.input_ids[i])
            for j in range(1, int(s.attention_mask[i].sum()) - 1):      # scored tokens, one at a time
                ids = s.input_ids[i].clone()
                ids[j] = reorder_model.src_vocab.mask_id
                expected[i, :, j] = full - p_ref(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_batched_gradients_equal_one_example_at_a_time(reorder_model, test_examples):
    pairs, _ = prepare(reorder_model, test_examples[:4])
    together = translator_scores(reorder_model, pairs, ("saliency", "input_x_gradient"))
    for i in range(4):
        alone_pairs, _ = prepare(reorder_model, test_examples[i : i + 1])
        alone = translator_scores(reorder_model, alone_pairs, ("saliency", "input_x_gradient"))
        for name, v in alone.items():
            t, s = v.shape[1:]
            torch.testing.assert_close(together[name][i, :t, :s], v[0], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_uniform_attention_with_identical_keys_changes_nothing(reorder_model, test_examples):
    model = copy.deepcopy(reorder_model)
    with torch.no_grad():
        for layer in model.net.decoder.layers:                           # equal keys: attention is already uniform
            layer.cross_attn.w_k.weight.zero_()
            layer.cross_attn.w_k.bias.zero_()
    s = translator_counterfactual(model, test_examples[:20], n_permutations=2)["summary"]
    u = s[s.test == "uniform"].set_index(["layer", "statistic"])["value"]
    for layer in ("0", "1", "all"):
        assert u[layer, "median_tvd"] < 1e-6 and u[layer, "flip_rate"] == 0.0
        assert u[layer, "accuracy"] == u[layer, "accuracy_original"]
        assert u[layer, "exact_match"] == u[layer, "exact_match_original"]


@pytest.mark.slow
def test_identical_values_make_permutation_and_erasure_inert(reorder_model, test_examples):
    model = copy.deepcopy(reorder_model)
    with torch.no_grad():
        for layer in model.net.decoder.layers:                           # every source key carries the same value
            layer.cross_attn.w_v.weight.zero_()
    cf = translator_counterfactual(model, test_examples[:20], n_permutations=4)
    s = cf["summary"].set_index(["test", "layer", "statistic"])["value"]
    for layer in ("0", "1", "all"):
        assert s["permutation", layer, "median_tvd"] < 1e-6
        assert s["erasure", layer, "flip_rate_max"] == 0.0 and s["erasure", layer, "flip_rate_random"] == 0.0
    assert (cf["permutation"]["median_tvd"] < 1e-6).all()


@pytest.mark.slow
def test_the_trained_model_depends_on_cross_attention(reorder_model, test_examples):
    s = translator_counterfactual(reorder_model, test_examples[:40], n_permutations=5)["summary"]
    s = s.set_index(["test", "layer", "statistic"])["value"]
    assert s["uniform", "all", "accuracy_original"] >= 0.95
    assert s["uniform", "all", "accuracy"] < s["uniform", "all", "accuracy_original"] - 0.2
    assert s["erasure", "all", "flip_rate_max"] > s["erasure", "all", "flip_rate_random"]
    assert not math.isnan(s["permutation", "all", "max_attention_tvd_spearman"])


@pytest.mark.slow
def test_engine_deduplicates_and_caches(reorder_model, test_examples):
    pairs, _ = prepare(reorder_model, test_examples[:3])
    engine = TeacherForcedEngine(reorder_model, pairs)
    keep = engine.mask.clone()
    first = engine.probs(torch.tensor([0, 0, 1]), keep[[0, 0, 1]])       # [3, tgt]
    again = engine.probs(torch.tensor([1, 0]), keep[[1, 0]])
    assert engine.forwards == 2
    torch.testing.assert_close(again, first[[2, 0]])


@pytest.mark.slow
def test_errors_name_the_rule(reorder_model, test_examples):
    pairs, _ = prepare(reorder_model, test_examples[:2])
    with pytest.raises(ValueError, match="Unknown explainer 'atention'. Available: attention, attention_layers"):
        translator_scores(reorder_model, pairs, ("atention",))
    with pytest.raises(ValueError, match="n_permutations must be an int >= 1; got 0"):
        translator_counterfactual(reorder_model, test_examples[:2], n_permutations=0)
    with pytest.raises(ValueError, match="Examples with a target"):
        prepare(reorder_model, [Example("x", "red cat sees dog")])
    with pytest.raises(ValueError, match=r"must have shape \[batch, tgt, src\]"):
        translator_metrics(reorder_model, test_examples[:2], explainers=(), scores={"bad": torch.zeros(2, 3)})


# -- the shared members (HFTranslator's interface) reproduce the built-in internals the analyses used --------------
@pytest.fixture(scope="module")
def tiny_translator():
    tiny = TrainSettings(d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16, epochs=1, batch_size=32, warmup=10,
                         lr_factor=0.5, dropout=0.0, n_train=64, n_valid=8, n_test=8)
    model, _ = train_task("reorder", tiny, device="cpu", progress=False)       # a barely trained fit, in ~1 s
    model.net.eval()
    return model


def test_shared_members_equal_the_former_builtin_path(tiny_translator):
    """Bit for bit: the members `analyses.seq2seq` now calls give what it computed from `model.net` before."""
    from attnaudit.analyses.seq2seq import teacher_forced as _forward
    from attnaudit.model.hooks import record
    m = tiny_translator
    examples = make_examples("reorder", "test", n=6, seed=0)
    pairs, units = prepare(m, examples)
    s, net = pairs.src, m.net
    assert (m.pad_id, m.mask_id, m.eos_id, m.decoder_start_id) == (
        m.src_vocab.pad_id, m.src_vocab.mask_id, m.tgt_vocab.sep_id, m.tgt_vocab.cls_id)
    assert m.decoder_self_attention_sites == [f"decoder.layers.{i}.self_attn.pattern" for i in range(2)]
    # units: every target word (not [SEP], not [PAD]); gold: word s is token s + 1
    real = (pairs.tgt_out != m.tgt_vocab.pad_id) & (pairs.tgt_out != m.tgt_vocab.sep_id)
    assert torch.equal(torch.stack(real.nonzero(as_tuple=True)), torch.stack([units.src, units.tgt]))
    gold = torch.zeros(*real.shape, s.input_ids.shape[1], dtype=torch.bool)
    for i, e in enumerate(examples):
        for a, b in e.alignment:
            gold[i, b, a + 1] = True
    assert torch.equal(units.gold, gold[units.src, units.tgt])
    n = [len(e.text.split()) for e in examples]
    assert m.word_ids(pairs) == [[None, *range(k), None] + [None] * (s.input_ids.shape[1] - k - 2) for k in n]
    assert m.word_ids([e.text for e in examples]) == m.word_ids(pairs)
    assert m.target_texts([e.target for e in examples]) == [" ".join(e.target.lower().split()) for e in examples]
    with torch.no_grad():
        before = net(s.input_ids, s.attention_mask, pairs.tgt_in, pairs.tgt_mask)            # [batch, tgt, vocab]
        assert torch.equal(m.logits_from_src_embeds(m.encoder_embeds(s.input_ids), pairs), before)
        assert torch.equal(_forward(m, pairs, torch.arange(6), max_batch=4), before.softmax(-1))
    # attention and rollout from the site lists = from the former globs
    got = translator_scores(m, pairs, ("attention", "attention_layers", "rollout", "saliency", "input_x_gradient"))
    _, cache = record(m, pairs)
    avg = lambda glob: cache.stack(glob).float().mean(2)                     # noqa: E731 [layer, batch, q, k]
    cross = avg("decoder.layers.*.cross_attn.pattern")
    assert torch.equal(got["attention"], cross[-1]) and torch.equal(got["attention_layers"], cross.mean(0))
    assert torch.equal(got["rollout"], cross_rollout(avg("encoder.*"), avg("decoder.layers.*.self_attn.pattern"), cross))
    # gradients: the former net.encoder.embed / net.decode(net.encoder(...)) by hand
    emb = net.encoder.embed(s.input_ids).detach().requires_grad_(True)
    logp = net.decode(net.encoder(emb, s.attention_mask), s.attention_mask, pairs.tgt_in, pairs.tgt_mask
                      ).log_softmax(-1).gather(-1, pairs.tgt_out[..., None])[..., 0]   # [batch, tgt]
    g = torch.stack([torch.autograd.grad(logp[:, t].sum(), emb, retain_graph=True)[0] for t in range(logp.shape[1])], 1)
    assert torch.equal(got["saliency"], g.norm(dim=-1)) and torch.equal(got["input_x_gradient"], (g * emb[:, None]).sum(-1))


def test_builtin_audit_keeps_its_word_units_and_labels(tiny_translator):
    """The first unit is target word 0; labels are vocabulary words; the unit name stays "target word"."""
    examples = make_examples("reorder", "test", n=4, seed=1)
    out = audit_translator(tiny_translator, examples, n_permutations=1, explainers=("attention",))
    assert out["metrics"].attrs["unit"] == "target word, averaged per example"
    assert [x["label"] for x in out["examples"]] == [e.target.split()[0] for e in examples]
    assert {r["params"]["unit"] for r in out["attributions"]} == {"target word"}
    assert [r["id"] for r in out["attributions"]] == [e.id for e in examples]
