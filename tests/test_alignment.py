"""Alignment error rate and link extraction (analyses/alignment.py): known answers worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnaudit.analyses.alignment import (
    AlignmentCounts,
    aer,
    alignment_counts,
    alignment_precision,
    alignment_recall,
    corpus_aer,
    corpus_alignment_precision,
    corpus_alignment_recall,
    extract_links,
    links,
    merge_subwords,
)
from attnaudit.data.parallel import GoldAlignment

# The hand-made case. S (Sure) = {(0,0), (1,1)}; Possible-only = {(1,2), (2,2)}, so P = S ∪ those = 4 links.
# Predicted A = {(0,0), (1,2), (2,1)}.
#   |A| = 3, |S| = 2, |A∩S| = 1 (0,0), |A∩P| = 2 (0,0) and (1,2)
#   AER = 1 − (|A∩S| + |A∩P|) / (|A| + |S|) = 1 − (1 + 2) / (3 + 2) = 2/5 = 0.4
#   precision = |A∩P| / |A| = 2/3, recall = |A∩S| / |S| = 1/2
# Treating Sure and Possible as one gold set G = P (|G| = 4, |A∩G| = 2): 1 − 2·2 / (3 + 4) = 3/7 ≈ 0.429;
# treating only the Sure links as gold (P = S): 1 − 2·1 / (3 + 2) = 0.6. Neither is 0.4.
SURE = {(0, 0), (1, 1)}
POSSIBLE_ONLY = {(1, 2), (2, 2)}
PREDICTED = {(0, 0), (1, 2), (2, 1)}


def test_aer_precision_recall_by_hand_keep_sure_and_possible_apart():
    assert aer(PREDICTED, SURE, POSSIBLE_ONLY) == pytest.approx(0.4)
    assert alignment_precision(PREDICTED, SURE, POSSIBLE_ONLY) == pytest.approx(2 / 3)
    assert alignment_recall(PREDICTED, SURE, POSSIBLE_ONLY) == pytest.approx(1 / 2)
    # P := P ∪ S: listing the Sure links among the Possible ones too changes nothing
    assert aer(PREDICTED, SURE, POSSIBLE_ONLY | SURE) == pytest.approx(0.4)
    # the one-set readings give other numbers, so the test would catch a merged S and P
    assert aer(PREDICTED, SURE | POSSIBLE_ONLY) == pytest.approx(3 / 7)
    assert aer(PREDICTED, SURE) == pytest.approx(0.6)
    assert alignment_counts(PREDICTED, SURE, POSSIBLE_ONLY) == AlignmentCounts(3, 2, 1, 2)


def test_edge_cases_perfect_empty_and_nan():
    assert aer(SURE, SURE, POSSIBLE_ONLY) == 0.0                           # A = S: perfect, Possible not required
    assert aer(SURE | POSSIBLE_ONLY, SURE, POSSIBLE_ONLY) == 0.0            # A = P: also perfect (Och & Ney)
    assert alignment_recall(set(), SURE) == 0.0 and math.isnan(alignment_precision(set(), SURE))
    assert aer(set(), SURE) == 1.0                                          # 1 − 0 / (0 + 2)
    assert math.isnan(aer(set(), set())) and math.isnan(alignment_recall({(0, 0)}, set()))
    assert aer({(0, 0)}, set(), {(0, 0)}) == 0.0                            # only Possible gold, hit: 1 − 1/1


def test_gold_alignment_adds_sure_to_possible():
    g = GoldAlignment(sure={(0, 0)}, possible={(1, 1)})
    assert g.sure == {(0, 0)} and g.possible == {(0, 0), (1, 1)}


def test_corpus_sums_counts_and_sentence_averages_values():
    # sentence 1: A = {(0,0)}, S = {(0,0)}: AER 0, precision 1, recall 1
    # sentence 2: A = {(0,1), (1,1)}, S = P = {(0,0), (1,1), (2,2)}: |A∩S| = 1, AER 1 − 2/5 = 0.6, P 1/2, R 1/3
    # corpus: |A| = 3, |S| = 4, |A∩S| = |A∩P| = 2: AER 1 − 4/7 = 3/7, precision 2/3, recall 2/4
    # sentence mean: AER (0 + 0.6)/2 = 0.3, precision (1 + 1/2)/2 = 0.75, recall (1 + 1/3)/2 = 2/3
    pred, sure = [{(0, 0)}, {(0, 1), (1, 1)}], [{(0, 0)}, {(0, 0), (1, 1), (2, 2)}]
    assert corpus_aer(pred, sure) == pytest.approx(3 / 7)
    assert corpus_alignment_precision(pred, sure) == pytest.approx(2 / 3)
    assert corpus_alignment_recall(pred, sure) == pytest.approx(1 / 2)
    assert corpus_aer(pred, sure, average="sentence") == pytest.approx(0.3)
    assert corpus_alignment_precision(pred, sure, average="sentence") == pytest.approx(0.75)
    assert corpus_alignment_recall(pred, sure, average="sentence") == pytest.approx(2 / 3)
    # a sentence with nothing predicted and no Sure link: no count (corpus), skipped NaN (sentence)
    assert corpus_aer([*pred, set()], [*sure, set()]) == pytest.approx(3 / 7)
    assert corpus_aer([*pred, set()], [*sure, set()], average="sentence") == pytest.approx(0.3)
    # with Possible links per sentence: the hand-made case plus a perfect sentence
    assert corpus_aer([PREDICTED, {(0, 0)}], [SURE, {(0, 0)}], [POSSIBLE_ONLY, set()]) == pytest.approx(1 - 5 / 7)


# [target word, source word]; worked by hand:
#   argmax (per target row):    t0 -> s0, t1 -> s1, t2 -> s1           = {(0,0), (1,1), (1,2)}
#   argmax_src (per source col): s0 -> t0, s1 -> t2 (0.7), s2 -> t1 (0.3) = {(0,0), (1,2), (2,1)}
#   intersect = {(0,0), (1,2)}; union = {(0,0), (1,1), (1,2), (2,1)}
#   threshold 0.4: scores > 0.4 are 0.6 (t0,s0), 0.5 (t1,s1), 0.7 (t2,s1); threshold 0.5: 0.6 and 0.7 only
M = [[0.6, 0.3, 0.1],
     [0.2, 0.5, 0.3],
     [0.1, 0.7, 0.2]]


@pytest.mark.parametrize("rule, kwargs, expected", [
    ("argmax", {}, {(0, 0), (1, 1), (1, 2)}),
    ("argmax_src", {}, {(0, 0), (1, 2), (2, 1)}),
    ("intersect", {}, {(0, 0), (1, 2)}),
    ("union", {}, {(0, 0), (1, 1), (1, 2), (2, 1)}),
    ("threshold", {"threshold": 0.4}, {(0, 0), (1, 1), (1, 2)}),
    ("threshold", {"threshold": 0.5}, {(0, 0), (1, 2)}),
])
def test_extraction_rules_by_hand(rule, kwargs, expected):
    assert extract_links(M, rule, **kwargs) == expected
    assert extract_links(torch.tensor(M), rule, **kwargs) == expected      # a Tensor reads the same
    assert extract_links(np.array(M), rule, **kwargs) == expected


def test_default_rule_is_argmax_ties_take_the_lower_index_and_nan_is_never_linked():
    assert extract_links(M) == extract_links(M, "argmax")
    assert extract_links([[0.5, 0.5]]) == {(0, 0)}
    nan, inf = float("nan"), float("inf")
    got = extract_links([[nan, -inf], [nan, 0.1]])                         # row 0 has no score: no link
    assert got == {(1, 1)}
    assert extract_links([[nan, -inf], [nan, 0.1]], "argmax_src") == {(1, 1)}   # column 0 has none either
    assert extract_links([[nan, 0.9]], "threshold", threshold=0.5) == {(1, 0)}


# Sub-words: source [CLS] new york is [SEP] -> words "new york" (0), "is" (1); target new -york est [SEP] ->
# "new-york" (0), "est" (1). Blocks (target word × source word), by hand:
#   (0,0) = t0,t1 × s1,s2 = 0.4 + 0.3 + 0.2 + 0.6 = 1.5   mean 1.5/4 = 0.375   max 0.6
#   (0,1) = t0,t1 × s3    = 0.1 + 0.1             = 0.2   mean 0.1            max 0.1
#   (1,0) = t2 × s1,s2    = 0.1 + 0.1             = 0.2   mean 0.1            max 0.1
#   (1,1) = t2 × s3                               = 0.6   mean 0.6            max 0.6
# [CLS], [SEP] (source) and [SEP] (target) are None: dropped, whatever they score.
SUB = [[0.1, 0.4, 0.3, 0.1, 0.1],
       [0.0, 0.2, 0.6, 0.1, 0.1],
       [0.1, 0.1, 0.1, 0.6, 0.1],
       [9.0, 9.0, 9.0, 9.0, 9.0]]
SRC_WORD, TGT_WORD = [None, 0, 0, 1, None], [0, 0, 1, None]


@pytest.mark.parametrize("how, expected", [
    ("sum", [[1.5, 0.2], [0.2, 0.6]]),
    ("mean", [[0.375, 0.1], [0.1, 0.6]]),
    ("max", [[0.6, 0.1], [0.1, 0.6]]),
])
def test_merge_subwords_by_hand(how, expected):
    np.testing.assert_allclose(merge_subwords(SUB, SRC_WORD, TGT_WORD, how), expected)
    np.testing.assert_allclose(merge_subwords(torch.tensor(SUB), SRC_WORD, TGT_WORD, how), expected)


def test_merge_default_is_sum_words_without_tokens_are_nan_and_never_linked():
    np.testing.assert_allclose(merge_subwords(SUB, SRC_WORD, TGT_WORD), [[1.5, 0.2], [0.2, 0.6]])
    got = merge_subwords(SUB, SRC_WORD, TGT_WORD, n_src_words=3)          # gold word 2 has no token
    assert got.shape == (2, 3) and np.isnan(got[:, 2]).all()
    assert extract_links(got, "argmax_src") == {(0, 0), (1, 1)}            # column 2: no link
    nan_special = [row[:] for row in SUB]
    nan_special[0][0] = float("nan")                                       # a NaN on a dropped token stays out
    np.testing.assert_allclose(merge_subwords(nan_special, SRC_WORD, TGT_WORD), [[1.5, 0.2], [0.2, 0.6]])


def test_errors_name_parameter_rule_and_value():
    with pytest.raises(ValueError, match=r"rule must be one of argmax, argmax_src, intersect, union, threshold; got 'argmin'"):
        extract_links(M, "argmin")
    with pytest.raises(ValueError, match="threshold is required by rule='threshold'.*got threshold=None"):
        extract_links(M, "threshold")
    with pytest.raises(ValueError, match="used by no other rule; got threshold=0.5 with rule='argmax'"):
        extract_links(M, threshold=0.5)
    with pytest.raises(ValueError, match=r"scores must be 2-D \[target, source\]; got shape \(3,\)"):
        extract_links([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"sure must hold \(source word, target word\) pairs of ints >= 0.*got \(1, -2\)"):
        aer({(0, 0)}, {(1, -2)})
    with pytest.raises(ValueError, match="predicted must be an iterable.*got the string '0-0'"):
        aer("0-0", SURE)
    with pytest.raises(ValueError, match=r"possible must have one link set per sentence of predicted \(2\); got 1"):
        corpus_aer([set(), set()], [set(), set()], [set()])
    with pytest.raises(ValueError, match="average must be one of corpus, sentence; got 'micro'"):
        corpus_aer([set()], [set()], average="micro")
    with pytest.raises(ValueError, match="how must be one of sum, mean, max; got 'median'"):
        merge_subwords(SUB, SRC_WORD, TGT_WORD, "median")
    with pytest.raises(ValueError, match=r"src_word_of_token must have one entry per token \(5.*got 4"):
        merge_subwords(SUB, SRC_WORD[:4], TGT_WORD)
    with pytest.raises(ValueError, match="tgt_word_of_token must hold word indices.*got -1 at token 2"):
        merge_subwords(SUB, SRC_WORD, [0, 0, -1, None])
    with pytest.raises(ValueError, match="src_word_of_token names word 1 but n_words is 1"):
        merge_subwords(SUB, SRC_WORD, TGT_WORD, n_src_words=1)
    assert links([[0, 1]]) == {(0, 1)}


def test_alignment_rows_of_the_audit_by_hand():
    from attnaudit.analyses.seq2seq import CORPUS_ID, alignment_rows
    # one example, source [CLS] a b [SEP], target x y [SEP]: scores [batch=1, tgt=3, src=4]
    scores = torch.tensor([[[0.9, 0.05, 0.05, 0.0],        # x: [CLS] is highest but dropped -> a (word 0)
                            [0.1, 0.2, 0.7, 0.0],          # y -> b (word 1)
                            [0.0, 0.0, 0.0, 1.0]]])        # [SEP] target position: no unit
    maps = [([None, 0, 1, None], [0, 1, None])]
    # A = {(0,0), (1,1)}; S = {(0,0)}, P = S ∪ {(1,1)}: AER 1 − (1 + 2)/(2 + 1) = 0, precision 1, recall 1;
    # with (1,1) Sure-less and not Possible either (S = {(0,0)} only): AER 1 − 2/3, precision 1/2
    rows = alignment_rows(["e0"], "oracle", scores, maps, [GoldAlignment({(0, 0)}, {(1, 1)})])
    got = {(r[0], r[2], r[3]): r[4] for r in rows}
    assert got["e0", "alignment_error_rate", "argmax"] == 0.0 and got["e0", "alignment_recall", "argmax"] == 1.0
    assert got[CORPUS_ID, "alignment_precision", "argmax:corpus"] == 1.0
    rows = alignment_rows(["e0"], "oracle", scores, maps, [GoldAlignment({(0, 0)}, set())], rules=("argmax", "union"))
    got = {(r[0], r[2], r[3]): r[4] for r in rows}
    assert got["e0", "alignment_error_rate", "argmax"] == pytest.approx(1 / 3)
    assert got["e0", "alignment_precision", "argmax"] == 0.5 and got["e0", "alignment_recall", "argmax"] == 1.0
    assert {r[3] for r in rows} == {"argmax", "argmax:corpus", "union", "union:corpus"} and len(rows) == 3 * 2 * 2


@pytest.fixture(scope="module")
def tiny_translator():
    from attnaudit.model.train import TrainSettings, train_task
    tiny = TrainSettings(d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16, epochs=1, batch_size=32, warmup=10,
                         lr_factor=0.5, dropout=0.0, n_train=64, n_valid=8, n_test=8)
    model, _ = train_task("reorder", tiny, device="cpu", progress=False)       # a barely trained fit, in ~1 s
    model.net.eval()
    return model


def test_audit_corpus_aer_equals_the_former_attrs_value_and_possible_links_count(tiny_translator):
    from attnaudit.analyses.seq2seq import ALIGNMENT_METRICS, CORPUS_ID, prepare, translator_metrics
    from attnaudit.data.tasks import make_examples
    examples = make_examples("reorder", "test", n=12, seed=0)
    table, attrs = translator_metrics(tiny_translator, examples, explainers=("attention", "random"))
    corpus = table[table.example_id == CORPUS_ID].set_index(["explainer", "metric"])["value"]
    _, units = prepare(tiny_translator, examples)
    for name, a in attrs.items():
        # what metrics.attrs["alignment_error_rate"] held before: AER with S = P = gold of argmax links
        hard, has = a.top_k(1), units.gold.any(1)
        hits = int((hard & units.gold)[has].sum())
        former = 1 - 2 * hits / max(int(hard[has].sum()) + int(units.gold[has].sum()), 1)
        assert corpus[name, "alignment_error_rate"] == pytest.approx(former)
    assert {f"cross_attention_L{i}_H{j}" for i in range(2) for j in range(2)} <= set(corpus.index.get_level_values(0))
    assert "alignment_error_rate" not in table.attrs
    # Every other pair Possible: A (one link per target word) and S (one-to-one) both have N links, so
    # precision = |A∩P|/|A| = 1, recall is unchanged and AER = 1 − (hits + N)/(2N) = (N − hits)/(2N): half the former.
    gold = [GoldAlignment(sure=set(e.alignment), possible={(s, t) for s in range(len(e.text.split()))
                                                          for t in range(len(e.target.split()))}) for e in examples]
    with_p, _ = translator_metrics(tiny_translator, examples, explainers=("attention", "random"), gold=gold, heads=False)
    c2 = with_p[with_p.example_id == CORPUS_ID].set_index(["explainer", "metric"])["value"]
    for name in attrs:
        assert c2[name, "alignment_precision"] == 1.0
        assert c2[name, "alignment_recall"] == pytest.approx(corpus[name, "alignment_recall"])
        assert c2[name, "alignment_error_rate"] == pytest.approx(corpus[name, "alignment_error_rate"] / 2)
    assert not with_p["explainer"].str.startswith("cross_attention_L").any()
    others = ~table.metric.isin(ALIGNMENT_METRICS)                             # the other metrics: untouched by gold
    assert table[others].reset_index(drop=True).equals(with_p[~with_p.metric.isin(ALIGNMENT_METRICS)].reset_index(drop=True))


def test_audit_alignment_arguments_are_checked(tiny_translator):
    from attnaudit.analyses.seq2seq import translator_metrics
    from attnaudit.data.tasks import make_examples
    examples = make_examples("reorder", "test", n=2, seed=0)
    with pytest.raises(ValueError, match=r"gold must be one GoldAlignment per example \(2\); got 1 items"):
        translator_metrics(tiny_translator, examples, explainers=("random",), gold=[GoldAlignment(set(), set())])
    far = [GoldAlignment({(0, 0)}, {(99, 0)}), GoldAlignment(set(), set())]
    with pytest.raises(ValueError, match=r"gold for example '.*' has link \(99, 0\) outside its \d+ source"):
        translator_metrics(tiny_translator, examples, explainers=("random",), gold=far)
    with pytest.raises(ValueError, match="alignment_rules must be a list of rules from argmax, argmax_src, intersect, "
                                         "union; got 'argmax'"):
        translator_metrics(tiny_translator, examples, explainers=("random",), alignment_rules="argmax")
