"""LIME and KernelSHAP of a teacher-forced target (explain/seq2seq_sampled.py): every target position shares one
example's coalitions (counted), each position equals captum's own run with the example's seed, KernelSHAP is exact on
an additive toy, one-word examples get the exact Shapley value. A tiny built-in Translator and a tiny random BART."""
from __future__ import annotations

import captum.attr
import pytest
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr._core.lime import get_exp_kernel_similarity_function
from test_seq2seq_gradients import EXAMPLES, HF_EXAMPLES, tiny_hf, tiny_translator

from attnaudit.explain.control import example_seed, seeded
from attnaudit.explain.seq2seq import TeacherForcedEngine
from attnaudit.explain.seq2seq_sampled import kernel_shap, lime, lime_embeds

pytestmark = pytest.mark.usefixtures("one_thread_module")


class Counting:
    """A `probs` callable that counts the coalitions it is asked (rows over all calls)."""

    def __init__(self, probs):
        self.probs, self.rows, self.calls = probs, 0, 0

    def __call__(self, rows, keep):
        self.rows, self.calls = self.rows + len(rows), self.calls + 1
        return self.probs(rows, keep)


@pytest.fixture(scope="module")
def builtin():
    model = tiny_translator()
    return model, model.encode(EXAMPLES)


@pytest.fixture(scope="module")
def bart():
    model = tiny_hf("bart")
    return model, model.encode(HF_EXAMPLES)


def masks(pairs):
    return pairs.src.attention_mask, pairs.src.special_mask


def captum_one(method_of, probs, mask, special, i: int, t: int, *, n_samples: int, seed: int, input_ids) -> torch.Tensor:
    """captum's method on example i, target position t only (the forward returns that column) -> [n_features]."""
    pos = (mask[i] & ~special[i]).nonzero()[:, 0]

    def forward(present):
        keep = mask[i].repeat(len(present), 1)
        keep[:, pos] = present > 0.5
        return probs(torch.full((len(present),), i), keep)[:, t : t + 1]            # [rows, 1]

    ones = torch.ones(1, len(pos))
    with seeded(example_seed(seed, input_ids[i][mask[i]].tolist())), torch.no_grad():
        return method_of(forward, pos).attribute(ones, baselines=torch.zeros_like(ones), target=0,
                                                 feature_mask=torch.arange(len(pos))[None], n_samples=n_samples,
                                                 perturbations_per_eval=min(256, n_samples),
                                                 return_input_shape=False)[0]


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_positions_share_the_coalitions_of_one_position(builtin, method):
    model, pairs = builtin
    run = kernel_shap if method == "kernel_shap" else lime
    mask, special = masks(pairs)
    engine = TeacherForcedEngine(model, pairs)
    every = Counting(engine.probs)
    scores = run(every, mask, special, n_samples=40, input_ids=pairs.src.input_ids, tgt_mask=pairs.tgt_mask)
    assert scores.shape == (*pairs.tgt_out.shape, mask.shape[1])
    assert every.rows == engine.forwards                                              # each coalition asked once
    for t in range(pairs.tgt_out.shape[1]):                                           # = what one position needs
        one = Counting(lambda r, k, t=t: TeacherForcedEngine(model, pairs).probs(r, k)[:, t : t + 1])
        run(one, mask, special, n_samples=40, input_ids=pairs.src.input_ids)
        assert one.rows == every.rows
    words = mask & ~special
    assert (scores.transpose(1, 2)[~words] == 0).all()                                # specials, padding: 0
    assert (scores[~pairs.tgt_mask] == 0).all() and scores[pairs.tgt_mask].abs().sum() > 0


def test_each_position_equals_captum_with_the_example_seed(builtin):
    model, pairs = builtin
    mask, special = masks(pairs)
    engine = TeacherForcedEngine(model, pairs)
    ids = pairs.src.input_ids
    ks = kernel_shap(engine.probs, mask, special, n_samples=30, seed=2, input_ids=ids, tgt_mask=pairs.tgt_mask)
    lm = lime(engine.probs, mask, special, n_samples=30, alpha=0.5, seed=2, input_ids=ids, tgt_mask=pairs.tgt_mask)
    emb = lime_embeds(model, pairs)
    lk = lime(engine.probs, mask, special, n_samples=30, seed=2, input_ids=ids, tgt_mask=pairs.tgt_mask, embeds=emb)
    kernel = get_exp_kernel_similarity_function("cosine", kernel_width=1.0)

    def embedded_lime(forward, pos, i=1):                                             # the classifier's kernel
        n = int(mask[i].sum())
        x, masked = emb[0][i : i + 1, :n], emb[1][i : i + 1, :n]

        def as_embeds(present):
            on = torch.ones(n, dtype=torch.bool)
            on[pos] = present[0] > 0.5
            return torch.where(on[None, :, None], x, masked)
        return captum.attr.Lime(forward, interpretable_model=SkLearnRidge(alpha=1.0),
                                similarity_func=lambda o, p, z, **kw: kernel(as_embeds(o), as_embeds(p), z))

    i, pos = 1, (mask[1] & ~special[1]).nonzero()[:, 0]
    for t in range(int(pairs.tgt_mask[i].sum())):
        ref = captum_one(lambda f, pos: captum.attr.KernelShap(f), engine.probs, mask, special, i, t, n_samples=30, seed=2,
                         input_ids=ids)
        torch.testing.assert_close(ks[i, t, pos], ref.float(), atol=1e-6, rtol=1e-6)
        ref = captum_one(lambda f, pos: captum.attr.Lime(f, interpretable_model=SkLearnRidge(alpha=0.5)),
                         engine.probs, mask, special, i, t, n_samples=30, seed=2, input_ids=ids)
        torch.testing.assert_close(lm[i, t, pos], ref.float(), atol=1e-6, rtol=1e-6)
        ref = captum_one(embedded_lime, engine.probs, mask, special, i, t, n_samples=30, seed=2, input_ids=ids)
        torch.testing.assert_close(lk[i, t, pos], ref.float(), atol=1e-6, rtol=1e-6)


def test_kernel_shap_recovers_an_additive_model():
    """p_t = Σ_j w_tj · keep_j: the Shapley value of token j at position t is w_tj (specials: always kept, no score)."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    special = torch.tensor([[1, 0, 0, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    w = torch.rand(2, 3, 7, generator=gen)                                            # [batch, tgt, src]

    def probs(rows, keep):                                                            # -> [n, tgt]
        return torch.einsum("nts,ns->nt", w[rows], keep.float())

    got = kernel_shap(probs, mask, special, n_samples=64)
    words = mask & ~special
    torch.testing.assert_close(got, w * words[:, None, :], atol=1e-5, rtol=1e-5)     # measured error < 1e-6


def test_one_word_examples(builtin):
    model, pairs = builtin
    mask, special = masks(pairs)
    engine = TeacherForcedEngine(model, pairs)
    i = 2                                                                             # "b": one word
    assert int((mask[i] & ~special[i]).sum()) == 1
    ks = kernel_shap(engine.probs, mask, special, n_samples=30, input_ids=pairs.src.input_ids)
    full = engine.probs(torch.tensor([i]), mask[i : i + 1])[0]                        # [tgt]
    none = engine.probs(torch.tensor([i]), mask[i : i + 1] & special[i : i + 1])[0]   # [tgt]
    torch.testing.assert_close(ks[i, :, 1], full - none)                              # exact Shapley value
    assert (ks[i, :, [0, *range(2, mask.shape[1])]] == 0).all()
    lm = lime(engine.probs, mask, special, n_samples=30, input_ids=pairs.src.input_ids)   # captum, as the classifier
    ref = captum_one(lambda f, pos: captum.attr.Lime(f, interpretable_model=SkLearnRidge(alpha=1.0)), engine.probs,
                     mask, special, i, 0, n_samples=30, seed=0, input_ids=pairs.src.input_ids)
    torch.testing.assert_close(lm[i, 0, 1:2], ref.float(), atol=1e-6, rtol=1e-6)
    empty = kernel_shap(engine.probs, mask & special, special, n_samples=30)          # no word at all: 0, no forward
    assert (empty == 0).all()


def test_alone_equals_in_batch_with_input_ids(builtin):
    model, pairs = builtin
    mask, special = masks(pairs)
    engine = TeacherForcedEngine(model, pairs)
    ids = pairs.src.input_ids
    both = kernel_shap(engine.probs, mask, special, n_samples=20, input_ids=ids)
    for i in range(len(ids)):
        alone = kernel_shap(lambda r, k, i=i: engine.probs(torch.full_like(r, i), k), mask[i : i + 1],
                            special[i : i + 1], n_samples=20, input_ids=ids[i : i + 1])
        torch.testing.assert_close(alone[0], both[i])


def test_bart_shares_forwards_and_equals_captum(bart):
    model, pairs = bart
    mask, special = masks(pairs)
    engine = TeacherForcedEngine(model, pairs)
    every = Counting(engine.probs)
    ks = kernel_shap(every, mask, special, n_samples=24, input_ids=pairs.src.input_ids, tgt_mask=pairs.tgt_mask)
    one = Counting(lambda r, k: TeacherForcedEngine(model, pairs).probs(r, k)[:, :1])
    kernel_shap(one, mask, special, n_samples=24, input_ids=pairs.src.input_ids)
    assert every.rows == one.rows == engine.forwards
    i, t = 1, int(pairs.tgt_mask[1].sum()) - 1
    pos = (mask[i] & ~special[i]).nonzero()[:, 0]
    ref = captum_one(lambda f, pos: captum.attr.KernelShap(f), engine.probs, mask, special, i, t, n_samples=24, seed=0,
                     input_ids=pairs.src.input_ids)
    torch.testing.assert_close(ks[i, t, pos], ref.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_samples": 0}, "n_samples must be an int >= 1; got 0"),
    ({"seed": 1.0}, "seed must be an int"),
    ({"max_batch": 0}, "max_batch must be an int"),
    ({"alpha": -1}, "alpha must be a number >= 0"),
    ({"tgt_mask": torch.ones(5, 2, dtype=torch.bool)}, r"tgt_mask must be a \[batch, tgt\] bool Tensor with batch = 3"),
    ({"input_ids": torch.zeros(3, 2, dtype=torch.long)}, "input_ids must be a Tensor of mask's shape"),
    ({"embeds": torch.zeros(3, 7, 4)}, r"embeds must be a pair \(embeddings, \[MASK\] embeddings\)"),
])
def test_bad_parameters_are_named(builtin, kwargs, message):
    _, pairs = builtin
    mask, special = masks(pairs)
    with pytest.raises(ValueError, match=message):
        lime(lambda r, k: torch.zeros(len(r), 2), mask, special, **kwargs)
