"""The perturbation engine: what each policy builds, de-duplication, caching, batch-size independence."""
from __future__ import annotations

import math

import pytest
import torch

from attnaudit.analyses import faithfulness as F
from attnaudit.explain.attribution import Attribution
from attnaudit.explain.perturb import (
    PerturbationEngine,
    deletion_path,
    insertion_path,
    keep_top_k,
    leave_one_out_path,
    materialize,
    path_counts,
    rank_positions,
    remove_top_k,
    top_k_mask,
)

CLS, SEP, PAD, MASK = 1, 2, 0, 4


def make_attribution(model, batch, scores, *, method="test", target=None):
    """An Attribution over `batch` with the given scores (zeroed on padding); target = predicted class."""
    with torch.no_grad(), model.evaluating():
        probs = model.logits(batch.input_ids, batch.attention_mask).float().softmax(-1)  # [batch, n_classes]
    target = probs.argmax(-1) if target is None else target
    scores = torch.as_tensor(scores, dtype=torch.float) * batch.attention_mask
    return Attribution(scores=scores, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       special_mask=batch.special_mask, tokens=batch.tokens, target=target,
                       target_prob=probs.gather(1, target[:, None])[:, 0], method=method, params={}, ids=batch.ids)


def random_attribution(model, batch, seed=0, method="random"):
    g = torch.Generator().manual_seed(seed)
    return make_attribution(model, batch, torch.rand(batch.input_ids.shape, generator=g), method=method)


# -- materialising ------------------------------------------------------------------------------
def test_each_policy_materialises_what_it_says():
    ids = torch.tensor([[CLS, 10, 11, 12, SEP, PAD]])                # [1, seq]
    mask = torch.tensor([[True, True, True, True, True, False]])
    keep = torch.tensor([[True, True, False, False, True, False]])   # remove tokens 11 and 12
    got_ids, got_mask = materialize(ids, mask, keep, policy="mask", pad_id=PAD, mask_id=MASK)
    assert got_ids.tolist() == [[CLS, 10, MASK, MASK, SEP, PAD]]
    assert got_mask.tolist() == mask.tolist()
    got_ids, got_mask = materialize(ids, mask, keep, policy="attention", pad_id=PAD, mask_id=MASK)
    assert got_ids.tolist() == ids.tolist()
    assert got_mask.tolist() == [[True, True, False, False, True, False]]
    got_ids, got_mask = materialize(ids, mask, keep, policy="delete", pad_id=PAD, mask_id=MASK)
    assert got_ids.tolist() == [[CLS, 10, SEP, PAD, PAD, PAD]]
    assert got_mask.tolist() == [[True, True, True, False, False, False]]


def test_special_tokens_are_never_removed(tiny_model, tiny_batch):
    engine = PerturbationEngine(tiny_model, tiny_batch)
    b, seq = tiny_batch.input_ids.shape
    nothing = torch.zeros(b, seq, dtype=torch.bool)                  # ask to remove every token
    for policy in ("mask", "attention", "delete"):
        ids, mask = engine.materialize(torch.arange(b), nothing, policy=policy)
        for i in range(b):
            kept = ids[i][mask[i]].tolist()
            if policy == "mask":
                n = int(tiny_batch.attention_mask[i].sum())
                assert kept == [tiny_model.cls_id] + [tiny_model.mask_id] * (n - 2) + [tiny_model.sep_id]
            else:
                assert kept == [tiny_model.cls_id, tiny_model.sep_id], policy


def test_plans_by_hand(tiny_model, tiny_batch):
    scores = torch.zeros(tiny_batch.input_ids.shape)
    scores[0, 1:5] = torch.tensor([0.1, 0.4, 0.3, 0.2])              # "the film was good": rank film, was, good, the
    attr = make_attribution(tiny_model, tiny_batch, scores)
    assert rank_positions(attr)[0, 1:5].tolist() == [3, 0, 1, 2]
    assert top_k_mask(attr, 0.5)[0].tolist()[:6] == [False, False, True, True, False, False]   # ⌈0.5·4⌉ = 2
    assert top_k_mask(attr, 0.26)[0, 1:5].sum() == 2                                           # ⌈1.04⌉ = 2
    assert top_k_mask(attr, 0.26, rounding="floor")[0, 1:5].sum() == 1
    assert remove_top_k(attr, 0.0).tolist() == tiny_batch.attention_mask.tolist()             # removing 0% changes nothing
    assert keep_top_k(attr, 0.5)[0].tolist()[:6] == [True, False, True, True, False, True]     # [CLS] film was [SEP]
    keep, valid = deletion_path(attr)                                # [batch, step, seq]
    n = int(attr.lengths().max())
    assert keep.shape == (4, n + 1, tiny_batch.input_ids.shape[1])
    assert valid[0].sum() == 5 and valid[3].sum() == 2               # n + 1 steps per example
    assert keep[0, 1].tolist()[:6] == [True, True, False, True, True, True]    # film removed first
    ins, _ = insertion_path(attr)
    assert ins[0, 0].tolist()[:6] == [True, False, False, False, False, True]  # specials only
    loo, scored = leave_one_out_path(tiny_batch.attention_mask, tiny_batch.special_mask)
    assert scored.tolist() == (tiny_batch.attention_mask & ~tiny_batch.special_mask).tolist()
    assert loo[0, 2].tolist()[:6] == [True, True, False, True, True, True]


def test_path_counts_by_hand():
    counts, valid = path_counts(torch.tensor([3, 10, 4]), 4)          # 10 tokens in 4 steps: 2.5 -> 3, 7.5 -> 8
    assert counts.tolist() == [[0, 1, 2, 3, 4], [0, 3, 5, 8, 10], [0, 1, 2, 3, 4]]
    assert valid.tolist() == [[True] * 4 + [False], [True] * 5, [True] * 5]
    counts, valid = path_counts(torch.tensor([3, 4]), None)           # one token per step
    assert counts.tolist() == [[0, 1, 2, 3, 4]] * 2 and valid[0].tolist() == [True] * 4 + [False]
    with pytest.raises(ValueError, match="max_steps must be None .* got 0"):
        path_counts(torch.tensor([3]), 0)


def test_coarse_curves_sample_the_exact_curve(tiny_model, tiny_batch):
    attr = random_attribution(tiny_model, tiny_batch)
    n = attr.lengths()                                                # [batch]
    exact = F.deletion_curve(tiny_model, tiny_batch, attr)            # [batch, n_max + 1]
    assert torch.equal(F.deletion_curve(tiny_model, tiny_batch, attr, max_steps=int(n.max())).isnan(), exact.isnan())
    coarse = F.deletion_curve(tiny_model, tiny_batch, attr, max_steps=2)
    counts, valid = path_counts(n, 2)
    for i in range(len(n)):                                           # each coarse point is the exact curve's point
        picked = exact[i, counts[i][valid[i]]]
        torch.testing.assert_close(coarse[i][valid[i]], picked)
    flip = F.decision_flip_fraction(tiny_model, tiny_batch, attr, max_steps=2)
    assert ((flip * n) % 1 == 0).all() and (flip <= 1).all()          # a whole number of tokens removed


def test_zero_removal_equals_the_plain_forward(tiny_model, tiny_batch):
    attr = random_attribution(tiny_model, tiny_batch)
    for policy in ("mask", "attention", "delete"):
        engine = PerturbationEngine(tiny_model, tiny_batch, policy=policy)
        got = engine.probs(remove_top_k(attr, 0.0), attr.target)
        torch.testing.assert_close(got, attr.target_prob, atol=1e-6, rtol=0)


# -- de-duplication, caching, batch size ---------------------------------------------------------
def test_duplicates_are_evaluated_once_and_cached(tiny_model, tiny_batch):
    engine = PerturbationEngine(tiny_model, tiny_batch)
    attr = random_attribution(tiny_model, tiny_batch)
    keep, valid = deletion_path(attr)
    first = engine.probs(keep, attr.target, valid=valid)
    n_valid = int(valid.sum())
    assert engine.stats.forwards == n_valid and engine.stats.requested == n_valid
    again = engine.probs(keep, attr.target, valid=valid)             # all cached
    assert engine.stats.forwards == n_valid and engine.stats.requested == 2 * n_valid
    torch.testing.assert_close(first, again, equal_nan=True)
    # the same perturbation asked twice in one call runs once; another policy is a different input
    twice = torch.stack([tiny_batch.attention_mask, tiny_batch.attention_mask], 1)   # [batch, 2, seq]
    engine.probs(twice, attr.target, policy="delete")
    assert engine.stats.forwards == n_valid + 4
    # specials and padding in the request do not matter: the mask is normalised before the key
    noisy = keep.clone()
    noisy[..., 0] = False
    noisy[~tiny_batch.attention_mask[:, None, :].expand_as(noisy)] = True
    engine.probs(noisy, attr.target, valid=valid)
    assert engine.stats.forwards == n_valid + 4


@pytest.mark.parametrize("policy", ["mask", "attention", "delete"])
def test_answers_do_not_depend_on_max_batch(tiny_model, tiny_batch, policy):
    attr = random_attribution(tiny_model, tiny_batch)
    keep, valid = deletion_path(attr)
    results = [PerturbationEngine(tiny_model, tiny_batch, policy=policy, max_batch=m).probs(keep, attr.target, valid=valid)
               for m in (1, 7, 1000)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-6, rtol=0, equal_nan=True)


def test_engine_matches_one_forward_per_input_built_by_hand(tiny_model, tiny_batch):
    attr = random_attribution(tiny_model, tiny_batch, seed=3)
    keep = remove_top_k(attr, 0.5)                                   # [batch, seq]
    for policy in ("mask", "attention", "delete"):
        got = PerturbationEngine(tiny_model, tiny_batch, policy=policy, max_batch=3).probs(keep, attr.target)
        for i in range(len(tiny_batch)):
            n = int(tiny_batch.attention_mask[i].sum())
            ids = tiny_batch.input_ids[i, :n].tolist()
            drop = [j for j in range(n) if not keep[i, j]]
            if policy == "mask":
                x, m = [tiny_model.mask_id if j in drop else t for j, t in enumerate(ids)], [True] * n
            elif policy == "attention":
                x, m = ids, [j not in drop for j in range(n)]
            else:
                x = [t for j, t in enumerate(ids) if j not in drop]
                m = [True] * len(x)
            with torch.no_grad():
                p = tiny_model.logits(torch.tensor([x]), torch.tensor([m])).softmax(-1)[0, attr.target[i]]
            assert math.isclose(float(got[i]), float(p), abs_tol=1e-5), (policy, i)


# -- errors -------------------------------------------------------------------------------------
def test_errors_name_the_parameter(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match="policy must be one of"):
        PerturbationEngine(tiny_model, tiny_batch, policy="zero")
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        PerturbationEngine(tiny_model, tiny_batch, max_batch=0)
    engine = PerturbationEngine(tiny_model, tiny_batch)
    with pytest.raises(ValueError, match="keep must have shape"):
        engine.probs(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be a fraction"):
        top_k_mask(random_attribution(tiny_model, tiny_batch), 1.5)


@pytest.mark.cuda
def test_cuda_bf16_autocast_is_close_to_float32(tiny_model, tiny_batch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    attr = random_attribution(tiny_model, tiny_batch)
    keep, valid = deletion_path(attr)
    cpu = PerturbationEngine(tiny_model, tiny_batch).probs(keep, attr.target, valid=valid)
    tiny_model.to("cuda")
    try:
        engine = PerturbationEngine(tiny_model, tiny_batch)
        gpu = engine.probs(keep, attr.target, valid=valid)
    finally:
        tiny_model.to("cpu")
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, atol=3e-2, rtol=0, equal_nan=True)


# -- chunks by a token budget ----------------------------------------------------------------------
def test_length_chunks_by_hand():
    from attnaudit.explain.perturb import length_chunks

    width = torch.tensor([2, 3, 3, 5, 8, 8, 20])                # sorted
    # rows <= 3 and rows × the chunk's widest <= 10: [2, 3, 3] (9), [5] (10 would need 2×8), [8], [8], [20] alone
    assert length_chunks(width, 3, 10) == [slice(0, 3), slice(3, 4), slice(4, 5), slice(5, 6), slice(6, 7)]
    assert length_chunks(width, 3, None) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    # budget 16: [2, 3, 3] (4×5 = 20 would not fit), [5, 8] (2×8 = 16), [8] (2×20 > 16), [20]
    assert length_chunks(width, 100, 16) == [slice(0, 3), slice(3, 5), slice(5, 6), slice(6, 7)]
    assert length_chunks(torch.tensor([], dtype=torch.long), 4, 8) == []


def test_the_token_budget_changes_the_forwards_not_the_probabilities(tiny_model, tiny_batch):
    keep = torch.rand((len(tiny_batch), 6, tiny_batch.input_ids.shape[1]), generator=torch.Generator().manual_seed(0)) < 0.6
    target = torch.zeros(len(tiny_batch), dtype=torch.long)
    budget = PerturbationEngine(tiny_model, tiny_batch, max_tokens=24)
    rows = PerturbationEngine(tiny_model, tiny_batch, max_tokens=None)
    a, b = budget.probs(keep, target), rows.probs(keep, target)
    assert torch.allclose(a, b, atol=1e-6) and budget.stats.forwards == rows.stats.forwards
    assert budget.stats.batches > rows.stats.batches == 1
    assert PerturbationEngine(tiny_model, tiny_batch).tokens_per_forward() == 768       # "auto" on the CPU
    with pytest.raises(ValueError, match="max_tokens must be 'auto', an int >= 1"):
        PerturbationEngine(tiny_model, tiny_batch, max_tokens=0)
