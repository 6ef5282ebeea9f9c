"""Integrated gradients' passes: max_tokens=None is bit-identical to one captum call; the default (TOKENS_PER_PASS)
groups by length and agrees with it to float noise."""
from __future__ import annotations

import random

import captum.attr
import pytest
import torch
from conftest import WORDS, make_tiny_model

from attnaudit.explain import get_explainer
from attnaudit.explain.gradients import TOKENS_PER_PASS, EmbeddingForward, IntegratedGradients, baseline_embeds


def texts(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


def captum_reference(model, batch, *, n_steps: int, internal_batch_size: int) -> torch.Tensor:
    """What the default did before max_tokens existed: one captum call over the whole batch -> [batch, seq]."""
    with model.evaluating():
        with torch.no_grad():
            target = model(batch).float().softmax(-1).argmax(-1)
        embeds = model.embed(batch.input_ids).detach().requires_grad_()          # [batch, seq, d_model]
        ref = baseline_embeds(model, batch, embeds.detach(), "pad")
        ig = captum.attr.IntegratedGradients(EmbeddingForward(model))
        out = ig.attribute(embeds, baselines=ref, target=target, additional_forward_args=(batch.attention_mask,),
                           n_steps=n_steps, method="gausslegendre", internal_batch_size=internal_batch_size)
    return out.detach().sum(-1).masked_fill(~batch.attention_mask, 0.0)


@pytest.mark.parametrize(("n", "lo", "hi", "n_steps"), [
    (64, 3, 12, 512),     # the audit's chunk of 64 short examples with the default 512 steps: 8 steps per pass
    (64, 1, 5, 512),
    (4, 1, 12, 512),
    (20, 8, 30, 50),      # benchmarks/peer_ferret.py's shape: 25 steps per pass
    (1, 30, 30, 50),
])
def test_fixed_n_steps_is_bit_identical_to_one_captum_call(n, lo, hi, n_steps):
    model = make_tiny_model()
    batch = model.encode(texts(n, lo, hi))
    got = IntegratedGradients(n_steps=n_steps, max_tokens=None).explain(model, batch).scores
    expected = captum_reference(model, batch, n_steps=n_steps, internal_batch_size=512)
    assert torch.equal(got, expected)
    grouped = IntegratedGradients(n_steps=n_steps).explain(model, batch).scores          # the default: by length
    scale = expected.abs().amax(1, keepdim=True).clamp_min(1e-12)
    assert float(((grouped - expected).abs() / scale).max()) <= 1e-5


def test_max_tokens_groups_by_length_and_agrees_with_the_default():
    model = make_tiny_model()
    batch = model.encode(texts(13, 1, 20, seed=3))
    default = IntegratedGradients(n_steps=32, max_tokens=None).explain(model, batch)
    passes: list[tuple[int, int]] = []                                           # (rows, seq) of gradient passes
    forward = model.logits_from_embeds

    def counted(embeds, attention_mask):
        if embeds.requires_grad:
            passes.append(tuple(embeds.shape[:2]))
        return forward(embeds, attention_mask)

    model.logits_from_embeds = counted                                           # this model object only
    grouped = IntegratedGradients(n_steps=32, max_tokens=600).explain(model, batch)
    torch.testing.assert_close(grouped.scores, default.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped.extras["completeness_gap"], default.extras["completeness_gap"],
                               rtol=1e-3, atol=1e-5)
    lengths = batch.attention_mask.sum(1)
    assert passes and max(rows * seq for rows, seq in passes) <= 600
    assert min(seq for rows, seq in passes) < int(lengths.max())                # short groups are not padded to the longest
    assert (grouped.scores[~batch.attention_mask] == 0).all()


def test_max_tokens_smaller_than_one_example_splits_its_steps():
    model = make_tiny_model()
    batch = model.encode(texts(2, 10, 12, seed=1))
    default = IntegratedGradients(n_steps=16, max_tokens=None).explain(model, batch)
    tiny = IntegratedGradients(n_steps=16, max_tokens=20).explain(model, batch)   # about one row per pass
    torch.testing.assert_close(tiny.scores, default.scores, rtol=1e-4, atol=1e-5)


def test_max_tokens_is_checked_and_recorded():
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1 or None; got 0"):
        get_explainer("integrated_gradients", max_tokens=0).explain(make_tiny_model(), "the film was good")
    e = IntegratedGradients(max_tokens=4096)
    assert e.get_params()["max_tokens"] == 4096 and IntegratedGradients(**e.get_params()).max_tokens == 4096
    assert IntegratedGradients().max_tokens == "auto" and IntegratedGradients(n_steps=8).tokens_per_pass() == TOKENS_PER_PASS
    assert IntegratedGradients(n_steps=8, max_tokens=None).tokens_per_pass() is None
