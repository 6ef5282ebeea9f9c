"""Counterfactual attention tests on tiny models built so the answers are known."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model

from attnaudit.analyses.counterfactual import (
    adversarial_attention,
    cls_attention,
    counterfactual_table,
    erasure,
    head_ablation,
    jsd,
    output_probs,
    permutation_tvd,
    tvd,
)
from attnaudit.model.hooks import active_hook_count
from attnaudit.model.interventions import zero_key


def attention_layers(model):
    return [layer.self_attn for layer in model.net.encoder.layers]


def uniform_attention_model():
    """Queries and keys are 0, so every score is 0 and softmax is uniform over allowed keys."""
    model = make_tiny_model()
    with torch.no_grad():
        for attn in attention_layers(model):
            for lin in (attn.w_q, attn.w_k):
                lin.weight.zero_()
                lin.bias.zero_()
    return model


def constant_value_model(model=None):
    """W_V = 0: every position's value vector is the bias, so any convex mix of values is the same."""
    model = model or make_tiny_model()
    with torch.no_grad():
        for attn in attention_layers(model):
            attn.w_v.weight.zero_()
    return model


def test_distances_by_hand():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert float(tvd(p, q)) == 1.0
    assert math.isclose(float(jsd(p, q)), math.log(2), rel_tol=1e-6)     # disjoint supports: ln 2
    assert float(jsd(p, p)) == 0.0 and float(tvd(p, p)) == 0.0


def test_uniform_on_already_uniform_attention_changes_nothing(tiny_batch):
    model = uniform_attention_model()
    out = counterfactual_table(model, tiny_batch, tests=("uniform",))
    s = out["summary"]
    tvds = s[s.statistic == "mean_tvd"]
    assert set(tvds.layer) == {"0", "1", "all"}
    assert (tvds.value.abs() < 1e-6).all()
    acc = s[s.statistic.isin(["accuracy", "accuracy_original"])].pivot(index="layer", columns="statistic", values="value")
    assert (acc["accuracy"] == acc["accuracy_original"]).all()           # labels known: both reported, equal here


def test_permutation_is_harmless_with_identical_values_and_not_otherwise(tiny_batch):
    flat = permutation_tvd(constant_value_model(), tiny_batch, layer="all", n_permutations=8)
    assert flat.shape == (len(tiny_batch), 8) and float(flat.max()) < 1e-5
    normal = permutation_tvd(make_tiny_model(), tiny_batch, layer="all", n_permutations=8)
    assert float(normal.mean()) > 1e-3
    again = permutation_tvd(make_tiny_model(), tiny_batch, layer="all", n_permutations=8)
    assert torch.equal(normal, again)                                    # seeded
    chunked = permutation_tvd(make_tiny_model(), tiny_batch, layer=0, n_permutations=5, max_rows=8)
    assert chunked.shape == (len(tiny_batch), 5)                        # 2 copies per forward, 3 forwards


def test_long_inputs_permute_in_fewer_rows(tiny_batch, monkeypatch):
    import attnaudit.analyses.counterfactual as cf

    model = make_tiny_model()
    seq = tiny_batch.input_ids.shape[1]
    sizes = []
    real = cf.tile
    monkeypatch.setattr(cf, "tile", lambda batch, n: sizes.append(n) or real(batch, n))
    monkeypatch.setattr(cf, "PERMUTE_CELLS", model.n_heads * seq * seq * len(tiny_batch) * 2)   # 2 copies fit
    capped = permutation_tvd(model, tiny_batch, layer="all", n_permutations=5)
    assert sizes == [2, 2, 1] and capped.shape == (len(tiny_batch), 5) and torch.isfinite(capped).all()


def test_erasure_on_uniform_attention(tiny_batch):
    # Uniform [CLS] rows tie everywhere, so the most-attended scored key is the first word (position 1).
    model = uniform_attention_model()
    er = erasure(model, tiny_batch, layer=1, seed=0)
    assert er.key_max.tolist() == [1] * len(tiny_batch)
    scored = tiny_batch.attention_mask & ~tiny_batch.special_mask
    assert scored[torch.arange(len(tiny_batch)), er.key_random].all()
    base = output_probs(model, tiny_batch)
    manual = output_probs(model, tiny_batch, {model.attention_sites[1]: zero_key(1)})
    torch.testing.assert_close(er.jsd_max, jsd(manual, base))
    # With identical value vectors, erasing any key leaves the output as it was.
    flat = erasure(constant_value_model(model), tiny_batch, layer="all")
    assert float(flat.jsd_max.max()) < 1e-10 and float(flat.jsd_random.max()) < 1e-10
    assert not flat.flip_max.any() and not flat.flip_random.any()


def test_erasure_picks_the_most_attended_word(tiny_model, tiny_batch):
    er = erasure(tiny_model, tiny_batch, layer=0)
    att = cls_attention(tiny_model, tiny_batch)[0].mean(1)              # [batch, key]
    scored = tiny_batch.attention_mask & ~tiny_batch.special_mask
    for i, k in enumerate(er.key_max.tolist()):
        assert scored[i, k] and att[i, k] == att[i][scored[i]].max()


def test_head_with_zero_output_projection_has_no_importance(tiny_batch):
    model = make_tiny_model()
    attn = attention_layers(model)[0]
    with torch.no_grad():
        attn.w_o.weight[:, attn.d_head : 2 * attn.d_head] = 0.0          # head 1 of layer 0 writes nothing
    heads = head_ablation(model, tiny_batch).set_index(["layer", "head"])
    assert abs(heads.loc[(0, 1), "importance_tvd"]) < 1e-7 and abs(heads.loc[(0, 1), "importance_prob_drop"]) < 1e-7
    assert heads.loc[(0, 0), "importance_tvd"] > 1e-4
    # decisive mass: [CLS]-row attention summed over rationale words, in [0, 1]
    assert ((heads.decisive_mass >= 0) & (heads.decisive_mass <= 1)).all()


def test_adversarial_search_respects_epsilon_and_moves_attention(tiny_model, tiny_batch):
    before = {k: v.clone() for k, v in tiny_model.net.state_dict().items()}
    adv = adversarial_attention(tiny_model, tiny_batch, layer="all", epsilon=0.01, n_steps=15)
    assert adv.satisfied.any()
    assert (adv.tvd[adv.satisfied] <= 0.01).all()
    assert float(adv.jsd[adv.satisfied].min()) > 0.0
    assert all(p.grad is None for p in tiny_model.net.parameters())     # only the free attention logits get gradients
    assert all(torch.equal(before[k], v) for k, v in tiny_model.net.state_dict().items())


def test_table_layout_mode_and_hooks(tiny_model, tiny_batch):
    tiny_model.net.train()
    out = counterfactual_table(tiny_model, tiny_batch, n_permutations=4, adversarial_steps=3)
    assert tiny_model.net.training and active_hook_count(tiny_model.net) == 0
    s = out["summary"]
    assert list(s.columns) == ["test", "layer", "head", "statistic", "value"]
    assert set(s.test) == {"permutation", "adversarial", "uniform", "erasure", "head_ablation"}
    assert {"median_tvd", "max_attention_tvd_spearman", "constraint_satisfied_fraction", "flip_rate_max",
            "jsd_random", "importance_tvd", "decisive_mass", "importance_tvd_mass_spearman"} <= set(s.statistic)
    assert set(s.loc[s.test == "head_ablation", "head"]) == {"0", "1", "all"}
    perm = out["permutation"]
    assert list(perm.columns) == ["example_id", "layer", "max_attention", "median_tvd"]
    assert len(perm) == 3 * len(tiny_batch) and perm.example_id.iloc[0] == "ex0"
    # dropout is off inside: the same numbers as in eval mode
    tiny_model.net.eval()
    again = counterfactual_table(tiny_model, tiny_batch, tests=("permutation",), n_permutations=4)
    assert out["permutation"].median_tvd.tolist() == again["permutation"].median_tvd.tolist()


def test_errors_name_parameter_and_value(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 1\] or 'all'; got 5"):
        counterfactual_table(tiny_model, tiny_batch, layers=[5])
    with pytest.raises(ValueError, match="tests must be a tuple drawn from"):
        counterfactual_table(tiny_model, tiny_batch, tests=("permutations",))
    with pytest.raises(ValueError, match="n_permutations must be an int >= 1"):
        permutation_tvd(tiny_model, tiny_batch, layer=0, n_permutations=0)
