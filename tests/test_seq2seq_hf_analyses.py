"""The encoder–decoder audit (analyses/seq2seq.py) on tiny random HuggingFace BART, T5 and Marian folders: sub-word
units, word-level AER, Sure vs Possible gold, and occlusion / saliency against explicit forwards. Nothing is
downloaded; the folders are built with the helpers of tests/test_hf_seq2seq.py."""
from __future__ import annotations

import copy
import math
import os
from dataclasses import replace

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the HuggingFace adapter needs the optional extra: pip install 'attnaudit[hf]'")

from test_hf_seq2seq import ARCHS, WORDPIECE, write_folder  # noqa: E402  (the tiny-folder builder)

from attnaudit.analyses.seq2seq import (  # noqa: E402
    ALIGNMENT_METRICS,
    CORPUS_ID,
    EXPLAINERS,
    audit_translator,
    prepare,
    translator_metrics,
    translator_scores,
)
from attnaudit.data.parallel import GoldAlignment, read_alignments, read_parallel  # noqa: E402
from attnaudit.model.hf_seq2seq import load_hf_seq2seq  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

# `src ||| tgt` pairs over the test vocabulary; "unlikely" is three pieces: un ##like ##ly
PAIRS = ["the cat sat ||| die katze sass", "unlikely dog ||| der hund unlikely", "a cat ran on the mat ||| die katze lief"]
# 1-based `i-j` Sure and `ipj` Possible links, one line per pair
GOLD = ["1-1 2-2 3-3", "1-3 2-2 1p1", "2-2 3-3 1p1 6p1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {a: load_hf_seq2seq(write_folder(tmp_path_factory.mktemp(a), a)) for a in ARCHS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(examples, gold) read as a user would: read_parallel with the gold file, then read_alignments."""
    d = tmp_path_factory.mktemp("parallel")
    (d / "pairs.txt").write_text("\n".join(PAIRS) + "\n")
    (d / "pairs.gold").write_text("\n".join(GOLD) + "\n")
    examples = read_parallel(d / "pairs.txt", alignments=d / "pairs.gold")
    return examples, read_alignments(d / "pairs.gold", examples)


def test_gold_is_read_with_sure_and_possible_distinct(corpus):
    examples, gold = corpus
    assert examples[1].alignment == ((0, 2), (1, 1)) and examples[1].possible_alignment == ((0, 0),)
    assert gold[1].sure == {(0, 2), (1, 1)} and gold[1].possible == {(0, 2), (1, 1), (0, 0)}


def test_units_are_target_tokens_and_gold_covers_every_piece(models, corpus):
    """BART's labels are [CLS] der hund un ##like ##ly [SEP]: the five word pieces are units, each with the tokens of
    its word's Sure-linked source words; [CLS] and [SEP] are none."""
    m, (examples, gold) = models["bart"], corpus
    pairs, units = prepare(m, examples, gold)
    rows = units.src == 1
    assert units.tgt[rows].tolist() == [1, 2, 3, 4, 5]
    assert units.tgt_words[1][:7] == [None, 0, 1, 2, 2, 2, None]
    assert pairs.src.tokens[1][:6] == ["[CLS]", "un", "##like", "##ly", "dog", "[SEP]"]
    assert units.src_words[1][:6] == [None, 0, 0, 0, 1, None]
    g = units.gold[rows].int()                                                   # [5 units, src]
    assert g[0].sum() == 0                                                       # der: no Sure link (1p1 is Possible)
    assert g[1].nonzero().flatten().tolist() == [4]                              # hund <- dog
    assert all(row.nonzero().flatten().tolist() == [1, 2, 3] for row in g[2:])  # un ##like ##ly <- un ##like ##ly


def _check_audit(model, examples, gold):
    out = audit_translator(model, examples, gold=gold, n_permutations=2)
    m = out["metrics"]
    undefined = m["value"].isna()
    assert (m.loc[undefined, "note"] != "").all()                                # NaN only where undefined, said why
    assert m.loc[~undefined, "value"].map(math.isfinite).all()
    heads = {f"cross_attention_L{layer}_H{head}" for layer in range(model.n_decoder_layers)
             for head in range(model.n_decoder_heads)}
    assert set(m["explainer"]) == set(EXPLAINERS) | heads | {"model"}      # "model": its greedy translations
    assert set(m.loc[m.explainer == "model", "metric"]) == {"exact_match", "bleu"}
    aer = m[m.metric.isin(ALIGNMENT_METRICS)]
    for name in set(EXPLAINERS) | heads:                                         # per example + corpus, each metric
        rows = aer[aer.explainer == name]
        assert len(rows) == 3 * (len(examples) + 1) and set(rows["example_id"]) == {e.id for e in examples} | {CORPUS_ID}
        assert not rows.loc[rows.example_id == CORPUS_ID, "value"].isna().any()
    assert set(m.loc[m.explainer.isin(heads), "metric"]) == set(ALIGNMENT_METRICS)
    assert m.attrs["unit"] == "target token, averaged per example"
    s = out["counterfactual"]["summary"]
    assert set(s["layer"]) == {"0", "1", "all"} and not s["value"].drop(
        s.index[s.statistic == "max_attention_tvd_spearman"]).isna().any()
    assert len(out["attributions"]) == len(examples) * len(EXPLAINERS)
    assert [x["label"] for x in out["examples"]] == ["die", "der", "die"]        # the first unit: after BOS, if any
    assert all(x["prediction"] in WORDPIECE for x in out["examples"])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_audit_runs_on_each_architecture(models, corpus, arch):
    _check_audit(models[arch], *corpus)


def test_audit_runs_on_marian_with_gold_from_the_examples(models, corpus):
    """The fast one of the three (about 1 s): gold=None takes Example.alignment (Sure) and possible_alignment."""
    examples, gold = corpus
    out = _check_audit(models["marian"], examples, None)
    given, _ = translator_metrics(models["marian"], examples, gold=gold, explainers=("attention",), heads=False)
    mine = out["metrics"]
    mine = mine[(mine.explainer == "attention") & (mine.metric != "randomization_spearman")].reset_index(drop=True)
    given = given.reset_index(drop=True)
    # same gold, same rows; the values to float rounding only: the audit's engine batches the perturbed inputs of
    # all seven explainers together, and a different batch composition moves a CPU kernel's sums in the last bits
    assert mine.drop(columns="value").equals(given.drop(columns="value"))
    assert np.allclose(mine["value"], given["value"], rtol=1e-6, atol=1e-6, equal_nan=True)


def _oracle(model, pairs, units, picks: dict[tuple[int, int], dict[int, float]]) -> torch.Tensor:
    """Scores [batch, tgt, src]: for (example, target word) the given {source token: score} on each of its tokens."""
    sc = torch.zeros(*pairs.tgt_out.shape, pairs.src.input_ids.shape[1])
    for (i, word), row in picks.items():
        for j, w in enumerate(units.tgt_words[i]):
            if w == word:
                for s, v in row.items():
                    sc[i, j, s] = v
    return sc


def test_word_level_aer_merges_pieces_and_possible_links_count(models, corpus):
    """Known links from oracle scores on the BART encoding of example 1 ("unlikely dog ||| der hund unlikely").

    Source tokens [CLS] un ##like ##ly dog [SEP]. der -> dog (1.0); hund -> dog (1.0); each piece of "unlikely" scores
    un 0.4, ##like 0.3, dog 0.5: per token dog wins, per word unlikely (0.4 + 0.3 = 0.7 > 0.5), so after
    merge_subwords A = {(1, 0), (1, 1), (0, 2)}. Gold S = {(0, 2), (1, 1)}:
      P = S:                 |A∩S| = 2, |A∩P| = 2: AER = 1 − 4/5 = 0.2, precision 2/3, recall 1;
      P = S ∪ {(1, 0)}:      |A∩P| = 3:           AER = 1 − 5/5 = 0,   precision 1,   recall 1;
      (1, 1) Possible only:  S = {(0, 2)}, |A∩S| = 1, |A∩P| = 3: AER = 1 − 4/4 = 0.
    """
    m, (examples, _) = models["bart"], corpus
    ex = [examples[1]]
    pairs, units = prepare(m, ex)
    oracle = _oracle(m, pairs, units, {(0, 0): {4: 1.0}, (0, 1): {4: 1.0}, (0, 2): {1: 0.4, 2: 0.3, 4: 0.5}})

    def corpus_row(gold):
        t, _ = translator_metrics(m, ex, explainers=(), scores={"oracle": oracle}, gold=[gold], heads=False)
        return t[t.example_id == CORPUS_ID].set_index("metric")["value"]

    sure = {(0, 2), (1, 1)}
    only_sure = corpus_row(GoldAlignment(sure, set()))
    assert only_sure["alignment_error_rate"] == pytest.approx(0.2)
    assert only_sure["alignment_precision"] == pytest.approx(2 / 3) and only_sure["alignment_recall"] == 1.0
    with_p = corpus_row(GoldAlignment(sure, {(1, 0)}))
    assert with_p["alignment_error_rate"] == 0.0 and with_p["alignment_precision"] == 1.0   # Possible lowers AER
    demoted = corpus_row(GoldAlignment({(0, 2)}, {(1, 0), (1, 1)}))
    assert demoted["alignment_error_rate"] == 0.0 and demoted["alignment_recall"] == 1.0
    # the token-level argmax would have linked "unlikely" to dog: a recall of 1/2, so the merge is what gives 1
    assert oracle[0, 3:6].argmax(-1).tolist() == [4, 4, 4]


@pytest.mark.parametrize("arch", ARCHS)
def test_occlusion_saliency_and_attention_equal_explicit_forwards(models, corpus, arch):
    """Unit (example 1, first piece of "unlikely"), source token 2 (##like), each from plain forwards of one example."""
    m, (examples, _) = models[arch], corpus
    pairs, units = prepare(m, examples)
    got = translator_scores(m, pairs, ("occlusion", "saliency", "input_x_gradient", "attention"))
    i, t, s = 1, 3, 2
    one, _ = prepare(m, examples[i : i + 1])
    y = int(one.tgt_out[0, t])
    with torch.no_grad():
        p_full = m(one).softmax(-1)[0, t, y]
        ids = one.src.input_ids.clone()
        ids[0, s] = m.mask_id
        p_masked = m(replace(one, src=replace(one.src, input_ids=ids))).softmax(-1)[0, t, y]
    torch.testing.assert_close(got["occlusion"][i, t, s], p_full - p_masked, atol=1e-6, rtol=0)
    assert float((p_full - p_masked).abs()) > 1e-6                               # the masked token matters
    emb = m.encoder_embeds(one.src.input_ids).detach().requires_grad_(True)      # [1, src, d_model]
    m.logits_from_src_embeds(emb, one).log_softmax(-1)[0, t, y].backward()
    torch.testing.assert_close(got["saliency"][i, t, s], emb.grad[0, s].norm(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got["input_x_gradient"][i, t, s], (emb.grad[0, s] * emb[0, s]).sum().detach(),
                               atol=1e-6, rtol=1e-4)
    from attnaudit.model.hooks import record
    _, cache = record(m, one, names=m.cross_attention_sites[-1])
    torch.testing.assert_close(got["attention"][i, t, s], cache[m.cross_attention_sites[-1]][0, :, t, s].mean())
    n = int(pairs.src.attention_mask[i].sum())
    assert bool((got["occlusion"][i, :, [0, n - 1]] == 0).all())                  # specials are never occluded


def test_a_slow_tokenizer_maps_words_by_pieces(models, corpus, tmp_path):
    """Without offsets (a slow tokenizer, as Marian's sentencepiece one), words are tokenized one by one: the same
    maps as the fast tokenizer's offsets, on both sides, and the same audit units."""
    transformers = pytest.importorskip("transformers")
    from attnaudit.model.hf_seq2seq import HFTranslator
    fast, (examples, gold) = models["marian"], corpus
    (tmp_path / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
    python_tok = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)(str(tmp_path / "vocab.txt"))
    if python_tok.is_fast:
        pytest.skip("this transformers has no Python (slow) WordPiece tokenizer")
    slow = HFTranslator(copy.deepcopy(fast.net), python_tok)
    assert fast.tokenizer.is_fast
    p_fast, u_fast = prepare(fast, examples, gold)
    p_slow, u_slow = prepare(slow, examples, gold)
    assert torch.equal(p_fast.tgt_out, p_slow.tgt_out) and torch.equal(p_fast.src.input_ids, p_slow.src.input_ids)
    assert u_slow.src_words == u_fast.src_words and u_slow.tgt_words == u_fast.tgt_words
    assert torch.equal(u_slow.gold, u_fast.gold) and torch.equal(u_slow.tgt, u_fast.tgt)
