"""Plausibility metrics on hand-made maps whose answers are worked out in the comments."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnaudit.analyses.plausibility import (
    auprc,
    average_precision,
    gold_table,
    iou_f1,
    precision_at_k,
    predicted_rationale,
    rationale_table,
    spans,
    token_f1,
)
from attnaudit.explain.attribution import Attribution
from attnaudit.model.interface import Batch


def make(rows_scores, rows_gold, method="hand"):
    """Attributions and a Batch for [CLS] w1 … wn [SEP] [PAD]…; scores and gold are given per word."""
    seq = max(len(s) for s in rows_scores) + 2
    b = len(rows_scores)
    scores, gold = torch.zeros(b, seq), torch.zeros(b, seq)
    mask, special = torch.zeros(b, seq, dtype=torch.bool), torch.zeros(b, seq, dtype=torch.bool)
    for i, (s, g) in enumerate(zip(rows_scores, rows_gold)):
        n = len(s)
        scores[i, 0], scores[i, n + 1] = 9.0, 9.0           # specials score high: they must be ignored
        scores[i, 1 : n + 1] = torch.tensor(s)
        gold[i, 1 : n + 1] = torch.tensor(g, dtype=torch.float)
        mask[i, : n + 2] = True
        special[i, 0] = special[i, n + 1] = True
    tokens = [["t"] * seq for _ in range(b)]
    ids = [f"e{i}" for i in range(b)]
    attr = Attribution(scores=scores, input_ids=torch.zeros(b, seq, dtype=torch.long), attention_mask=mask,
                       special_mask=special, tokens=tokens, target=torch.zeros(b, dtype=torch.long),
                       target_prob=torch.ones(b), method=method, params={}, ids=ids)
    batch = Batch(torch.zeros(b, seq, dtype=torch.long), mask, special, tokens, rationale=gold, ids=ids)
    return attr, gold, batch


# Case A: word scores [.9, .1, .8, .3, .2], gold [1, 0, 0, 1, 0].
#   Ranking: .9(gold) .8 .3(gold) .2 .1 -> AP = 0.5·1 + 0.5·(2/3) = 5/6.
#   PR points (recall, precision) from (0, 1): (1/2, 1) (1/2, 1/2) (1, 2/3) (1, 1/2) (1, 2/5); trapezoids
#   (1/2)(1 + 1)/2 + 0 + (1/2)(1/2 + 2/3)/2 = 1/2 + 7/24 -> AUPRC = 19/24 (ERASER's auc(recall, precision)).
#   k = 2 gold words: top-2 = words 0 and 2 -> precision@k = 1/2; token P = R = 1/2 -> F1 = 1/2.
#   Spans: predicted {w0}, {w2}; gold {w0}, {w3}. IOU: {w0} matches (1.0), {w2} none -> P = R = 1/2, F1 = 1/2.
A = ([0.9, 0.1, 0.8, 0.3, 0.2], [1, 0, 0, 1, 0])
# Case B: word scores [.9, .8, .7, .1, .6], gold [0, 1, 1, 1, 0] (one gold span w1..w3).
#   Ranking: .9 .8(g) .7(g) .6 .1(g) -> AP = (1/3)(1/2) + (1/3)(2/3) + (1/3)(3/5) = 53/90.
#   PR points from (0, 1): (0, 0) (1/3, 1/2) (2/3, 2/3) (2/3, 1/2) (1, 3/5) -> AUPRC =
#   0 + (1/3)(1/2 + 2/3)/2 + 0 + (1/3)(1/2 + 3/5)/2 = 7/36 + 11/60 = 83/180.
#   k = 3: top-3 = w0, w1, w2 -> precision@k = 2/3, token F1 = 2/3 (P = R).
#     IOU: one predicted span w0..w2 vs w1..w3: 2 / 4 = 0.5 >= 0.5 -> TP; P = R = 1 -> IOU F1 = 1.
#   threshold 0.5: predicted w0, w1, w2, w4 -> token P = 2/4, R = 2/3 -> F1 = 2·(1/2)(2/3)/(7/6) = 4/7.
#     Spans w0..w2 (IOU 0.5, TP) and w4 (IOU 0) -> P = 1/2, R = 1 -> IOU F1 = 2/3.
B = ([0.9, 0.8, 0.7, 0.1, 0.6], [0, 1, 1, 1, 0])


def test_average_precision_auprc_and_precision_at_k_by_hand():
    attr, gold, _ = make([A[0], B[0]], [A[1], B[1]])
    torch.testing.assert_close(average_precision(attr, gold), torch.tensor([5 / 6, 53 / 90], dtype=torch.float64))
    torch.testing.assert_close(auprc(attr, gold), torch.tensor([19 / 24, 83 / 180], dtype=torch.float64))
    torch.testing.assert_close(precision_at_k(attr, gold), torch.tensor([1 / 2, 2 / 3], dtype=torch.float64))


def test_token_and_iou_f1_top_k_by_hand():
    attr, gold, _ = make([A[0], B[0]], [A[1], B[1]])
    torch.testing.assert_close(token_f1(attr, gold), torch.tensor([1 / 2, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(iou_f1(attr, gold), torch.tensor([1 / 2, 1.0], dtype=torch.float64))
    # With theta 0.6 case B's only span (IOU exactly 0.5) no longer matches: F1 = 0.
    assert float(iou_f1(attr, gold, theta=0.6)[1]) == 0.0


def test_threshold_rule_by_hand():
    attr, gold, _ = make([B[0]], [B[1]])
    assert predicted_rationale(attr, threshold=0.5)[0].tolist() == [False, True, True, True, False, True, False]
    assert math.isclose(float(token_f1(attr, gold, threshold=0.5)), 4 / 7)
    assert math.isclose(float(iou_f1(attr, gold, threshold=0.5)), 2 / 3)


def test_padding_specials_ties_and_empty_gold():
    # Row 0 is shorter (padded). Ties: equal scores break by position, so top-1 = w0 (not gold) -> 0.
    # Row 1 has no gold word: every metric is undefined (NaN).
    attr, gold, _ = make([[0.5, 0.5], [0.3, 0.2, 0.1]], [[0, 1], [0, 0, 0]])
    assert float(precision_at_k(attr, gold)[0]) == 0.0
    assert math.isclose(float(average_precision(attr, gold)[0]), 0.5)   # constant scores: AP = share of positives
    assert math.isclose(float(auprc(attr, gold)[0]), 0.75)      # points (0, 1) (1, 1/2): one trapezoid, 3/4
    for metric in (average_precision, auprc, precision_at_k, token_f1, iou_f1):
        assert math.isnan(float(metric(attr, gold)[1]))


def test_single_class_documents():
    """Every scored token gold: ERASER skips the document for average precision; its AUPRC is 1."""
    attr, gold, _ = make([[0.3, 0.1, 0.2], A[0]], [[1, 1, 1], A[1]])
    ap, area = average_precision(attr, gold), auprc(attr, gold)
    assert math.isnan(float(ap[0])) and float(area[0]) == 1.0
    assert math.isclose(float(ap[1]), 5 / 6) and math.isclose(float(area[1]), 19 / 24)


def test_spans():
    assert spans(torch.tensor([True, True, False, True, False, False, True])) == [(0, 2), (3, 4), (6, 7)]
    assert spans(torch.zeros(3, dtype=torch.bool)) == []


def test_tables_are_tidy():
    attr, _, batch = make([A[0], B[0]], [A[1], B[1]])
    g = gold_table([attr], batch)
    assert list(g.columns) == ["example_id", "explainer", "metric", "setting", "value"]
    assert set(g.metric) == {"gold_average_precision", "gold_auprc", "gold_precision_at_k"} and len(g) == 6
    r = rationale_table(attr, batch)
    assert set(r.metric) == {"rationale_token_f1", "rationale_iou_f1", "rationale_average_precision",
                             "rationale_auprc"}
    got = r.set_index(["example_id", "metric"])["value"]
    assert math.isclose(got["e1", "rationale_iou_f1"], 1.0)
    assert math.isclose(got["e0", "rationale_average_precision"], 5 / 6)
    assert math.isclose(got["e0", "rationale_auprc"], 19 / 24)


def test_errors_name_the_problem():
    attr, gold, batch = make([A[0]], [A[1]])
    with pytest.raises(ValueError, match="gold must have the attribution's shape"):
        auprc(attr, gold[:, :-1])
    with pytest.raises(ValueError, match="give k or threshold"):
        predicted_rationale(attr, gold, k=2, threshold=0.1)
    with pytest.raises(ValueError, match="batch.rationale is None"):
        gold_table(attr, Batch(batch.input_ids, batch.attention_mask, batch.special_mask, batch.tokens))
    with pytest.raises(ValueError, match="theta must be"):
        iou_f1(attr, gold, theta=0.0)


def test_vectorised_scores_equal_erasers_sklearn_calls_with_ties_and_padding():
    """pr_scores against what ERASER's metrics.py computes per document: average_precision_score, and
    auc(recall, precision) of precision_recall_curve."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve

    from attnaudit.analyses.plausibility import pr_scores

    rng = np.random.default_rng(0)
    for trial in range(300):
        b, s = int(rng.integers(1, 6)), int(rng.integers(1, 30))
        scores = rng.integers(0, 4 if trial % 2 else 1000, size=(b, s)).astype(float)   # many ties half the time
        gold = rng.random((b, s)) < rng.random()
        keep = rng.random((b, s)) < 0.9
        ap, area = pr_scores(scores, gold, keep)
        for i in range(b):
            g, k = gold[i] & keep[i], keep[i]
            if not g.any():
                assert np.isnan(ap[i]) and np.isnan(area[i])
            else:
                precision, recall, _ = precision_recall_curve(g[k], scores[i, k])
                assert abs(ap[i] - average_precision_score(g[k], scores[i, k])) <= 1e-12, (trial, i)
                assert abs(area[i] - auc(recall, precision)) <= 1e-12, (trial, i)
