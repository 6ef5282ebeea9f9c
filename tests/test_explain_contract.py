"""Every registered explainer honours the contract: shape, padding 0, batch-independence, determinism."""
from __future__ import annotations

import json

import pytest
import torch

from attnaudit.explain import Attribution, UnknownExplainerError, get_explainer, list_explainers

# Cheap settings so the whole registry runs in seconds; the defaults are exercised elsewhere.
FAST = {"integrated_gradients": {"n_steps": 16}, "gradient_shap": {"n_samples": 8},
        "lime": {"n_samples": 64}, "kernel_shap": {"n_samples": 64}}


def make(name):
    return get_explainer(name, **FAST.get(name, {}))


@pytest.mark.parametrize("name", list_explainers())
def test_contract(name, tiny_model, tiny_batch):
    attr = make(name).explain(tiny_model, tiny_batch)
    assert isinstance(attr, Attribution)
    assert attr.scores.shape == tiny_batch.input_ids.shape
    assert (attr.scores[~tiny_batch.attention_mask] == 0).all()
    assert torch.isfinite(attr.scores).all()
    assert torch.equal(attr.special_mask, tiny_batch.special_mask)
    assert attr.special_mask[:, 0].all()                      # [CLS] flagged
    assert attr.method == name
    assert attr.target.shape == (len(tiny_batch),) and ((attr.target_prob > 0) & (attr.target_prob <= 1)).all()
    json.dumps(attr.to_records())                             # provenance is JSON-serialisable


@pytest.mark.parametrize("name", list_explainers())
def test_batch_equals_one_at_a_time(name, tiny_model, tiny_batch):
    whole = make(name).explain(tiny_model, tiny_batch)
    for i in range(len(tiny_batch)):
        one = make(name).explain(tiny_model, tiny_batch.select([i]))
        n = int(tiny_batch.attention_mask[i].sum())
        torch.testing.assert_close(one.scores[0, :n], whole.scores[i, :n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list_explainers())
def test_deterministic(name, tiny_model, tiny_batch):
    a = make(name).explain(tiny_model, tiny_batch)
    b = make(name).explain(tiny_model, tiny_batch)
    assert torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("name", list_explainers())
def test_training_mode_restored_and_ignored(name, tiny_model, tiny_batch):
    ref = make(name).explain(tiny_model, tiny_batch)
    tiny_model.net.train()
    got = make(name).explain(tiny_model, tiny_batch)
    assert tiny_model.net.training                            # mode restored
    assert torch.equal(ref.scores, got.scores)                # dropout off while explaining


def test_explicit_target_and_errors(tiny_model, tiny_batch):
    attr = make("saliency").explain(tiny_model, tiny_batch, target=1)
    assert (attr.target == 1).all()
    by_name = make("saliency").explain(tiny_model, tiny_batch, target="c1")
    assert torch.equal(attr.scores, by_name.scores)
    for bad in (2, -1, "nope", [0, 1]):
        with pytest.raises(ValueError, match="target must be"):
            make("saliency").explain(tiny_model, tiny_batch, target=bad)


def test_unknown_explainer_lists_valid_names():
    with pytest.raises(UnknownExplainerError, match="Available: alti, attention, attention_norm"):
        get_explainer("rolout")


def test_texts_are_accepted(tiny_model):
    attr = make("attention").explain(tiny_model, ["the film was good", "bad"])
    assert attr.scores.shape[0] == 2 and attr.tokens[1][:3] == ["[CLS]", "bad", "[SEP]"]
