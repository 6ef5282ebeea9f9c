"""The adversarial search's strength settings: K adversaries, diversity, AMSGrad, presets and the step curve."""
from __future__ import annotations

import inspect

import pandas as pd
import pytest
import torch

from attnaudit.analyses import counterfactual as cf
from attnaudit.analyses.counterfactual import (
    ADVERSARY_PRESETS,
    MAX_ADVERSARIES,
    adversarial_attention,
    adversarial_curve,
    adversary_options,
    counterfactual_table,
    jain_wallace_diversity,
)
from attnaudit.model.hooks import hooks


def former_search(model, batch, *, layer, epsilon=0.01, n_steps=40, lr=0.1, penalty=10.0, init_noise=1.0, seed=0):
    """adversarial_attention as it was before n_adversaries existed (one adversary), kept to pin K=1 to it."""
    sites = cf.layer_sites(model, layer)
    seen = {}

    def keep(site):
        def edit(pattern, allowed):
            seen[site] = (pattern.detach().float(), allowed)
            return pattern
        return edit

    with model.evaluating():
        with torch.no_grad(), hooks(model, {s: keep(s) for s in sites}):
            base = model(batch).float().softmax(-1)
        gen = torch.Generator().manual_seed(seed)
        thetas, originals, alloweds = [], [], []
        for s in sites:
            orig, allowed = seen[s]
            noise = torch.randn(orig.shape, generator=gen).to(orig.device)
            thetas.append((orig.clamp_min(1e-6).log() + init_noise * noise).requires_grad_(True))
            originals.append(orig)
            alloweds.append(allowed)
        opt = torch.optim.Adam(thetas, lr=lr)
        best_jsd = torch.full((len(batch),), -1.0)
        best_tvd = torch.full((len(batch),), float("nan"))
        for step in range(n_steps + 1):
            with torch.enable_grad():
                news = [cf._softmax_allowed(t, a) for t, a in zip(thetas, alloweds)]
                with hooks(model, {s: cf._fixed(p) for s, p in zip(sites, news)}):
                    probs = model(batch).float().softmax(-1)
                out_tvd = cf.tvd(probs, base)
                att_jsd = torch.stack([cf._row_mean(cf.jsd(n, o), a) for n, o, a in zip(news, originals, alloweds)]).mean(0)
                objective = att_jsd - penalty * torch.relu(out_tvd - epsilon)
            last_jsd, last_tvd = att_jsd.detach().cpu(), out_tvd.detach().cpu()
            better = (last_tvd <= epsilon) & (last_jsd > best_jsd)
            best_jsd = torch.where(better, last_jsd, best_jsd)
            best_tvd = torch.where(better, last_tvd, best_tvd)
            if step == n_steps:
                break
            for t, g in zip(thetas, torch.autograd.grad(-objective.sum(), thetas)):
                t.grad = g
            opt.step()
    satisfied = best_jsd >= 0
    return torch.where(satisfied, best_jsd, last_jsd), torch.where(satisfied, best_tvd, last_tvd), satisfied


@pytest.mark.parametrize("layer, settings", [("all", {}), (0, dict(n_steps=9, lr=0.3, penalty=3.0, init_noise=0.5,
                                                                    seed=4, epsilon=0.05))])
def test_one_adversary_is_the_former_search_bit_for_bit(tiny_model, tiny_batch, layer, settings):
    settings = {"n_steps": 12, **settings}
    jsd, tvd, satisfied = former_search(tiny_model, tiny_batch, layer=layer, **settings)
    adv = adversarial_attention(tiny_model, tiny_batch, layer=layer, **settings)
    assert torch.equal(adv.jsd, jsd) and torch.equal(adv.tvd, tvd) and torch.equal(adv.satisfied, satisfied)
    assert (adv.adversary == 0).all() and torch.equal(adv.n_feasible, satisfied.long())


def test_the_default_table_keeps_its_numbers_and_layout(tiny_model, tiny_batch):
    plain = counterfactual_table(tiny_model, tiny_batch, tests=("adversarial",), adversarial_steps=4)
    for adversary in ("default", adversary_options(), adversary_options(n_steps=4)):
        again = counterfactual_table(tiny_model, tiny_batch, tests=("adversarial",), adversary=adversary,
                                     adversarial_steps=4)
        for name in plain:
            pd.testing.assert_frame_equal(plain[name], again[name], check_exact=True)
    assert list(plain["adversarial"].columns) == ["example_id", "layer", "jsd", "tvd", "satisfied"]
    assert "feasible_adversaries_mean" not in set(plain["summary"].statistic)
    # a preset with several adversaries, its steps replaced: which adversary, how many were feasible
    jw = counterfactual_table(tiny_model, tiny_batch, tests=("adversarial",), layers=[0], adversary="jain_wallace",
                              adversarial_steps=3)
    assert list(jw["adversarial"].columns) == ["example_id", "layer", "jsd", "tvd", "satisfied", "adversary", "n_feasible"]
    assert jw["adversarial"].adversary.between(0, 4).all() and jw["adversarial"].n_feasible.between(0, 5).all()
    assert "feasible_adversaries_mean" in set(jw["summary"].statistic)


def test_more_adversaries_with_diversity_reach_at_least_one_adversarys_jsd(tiny_model, tiny_batch):
    one = adversarial_attention(tiny_model, tiny_batch, layer="all", n_steps=20)
    five = adversarial_attention(tiny_model, tiny_batch, layer="all", n_steps=20, n_adversaries=5,
                                 diversity=jain_wallace_diversity(5))
    assert five.satisfied.all() and (five.tvd <= 0.01).all()
    assert float(five.jsd.mean()) >= float(one.jsd.mean())
    assert ((five.n_feasible >= 1) & (five.n_feasible <= 5)).all() and ((five.adversary >= 0) & (five.adversary < 5)).all()
    # diversity pushes the adversaries apart: the reported ones differ from one search to the other
    same = adversarial_attention(tiny_model, tiny_batch, layer="all", n_steps=20, n_adversaries=5)
    assert not torch.equal(same.jsd, five.jsd)


def test_the_curve_is_the_single_searches(tiny_model, tiny_batch):
    settings = dict(layer=0, n_adversaries=3, diversity=0.25, amsgrad=True, lr=0.2, seed=1)
    curve = adversarial_curve(tiny_model, tiny_batch, steps=[8, 3, 8], **settings)
    assert list(curve.columns) == ["steps", "example_id", "jsd", "tvd", "satisfied", "adversary", "n_feasible"]
    assert curve.steps.tolist() == [3] * 4 + [8] * 4 and curve.example_id.tolist()[:2] == ["ex0", "ex1"]
    for s in (3, 8):
        single = adversarial_attention(tiny_model, tiny_batch, n_steps=s, **settings)
        at = curve[curve.steps == s]
        for name in ("jsd", "tvd", "satisfied", "adversary", "n_feasible"):
            assert (at[name].to_numpy() == getattr(single, name).numpy()).all(), (s, name)


def test_presets_resolve_to_the_searchs_arguments():
    params = inspect.signature(adversarial_attention).parameters
    for name, preset in ADVERSARY_PRESETS.items():
        assert set(preset) <= set(params), name
    assert ADVERSARY_PRESETS["default"] == {k: params[k].default for k in ADVERSARY_PRESETS["default"]}
    assert adversary_options() == ADVERSARY_PRESETS["default"] and adversary_options() is not ADVERSARY_PRESETS["default"]
    jw = adversary_options("jain_wallace")
    assert jw == dict(n_adversaries=5, n_steps=500, lr=0.01, penalty=500.0, init_noise=3.0, diversity=0.16, amsgrad=True)
    assert jw["diversity"] == jain_wallace_diversity(5) and jain_wallace_diversity(1) == 0.0
    assert adversary_options("jain_wallace", n_steps=100)["n_steps"] == 100
    assert adversary_options("jain_wallace", n_adversaries=10)["diversity"] == 0.09       # follows K
    assert adversary_options("jain_wallace", n_adversaries=10, diversity=0.0)["diversity"] == 0.0
    assert adversary_options("default", n_adversaries=3)["diversity"] == 0.0
    with pytest.raises(ValueError, match=r"Unknown adversary preset 'jw'\. Available: default, jain_wallace, converged, audit\."):
        adversary_options("jw")
    with pytest.raises(ValueError, match=r"Unknown adversary option\(s\) 'steps'\. Available: n_adversaries, n_steps, "):
        adversary_options("default", steps=3)


@pytest.mark.parametrize("settings, message", [
    (dict(n_adversaries=0), rf"n_adversaries must be an int in \[1, {MAX_ADVERSARIES}\] \(MAX_ADVERSARIES; .*got 0: "
                            "use 1 for a single search"),
    (dict(n_adversaries=MAX_ADVERSARIES + 1), rf"n_adversaries must be an int in \[1, 100\].*got {MAX_ADVERSARIES + 1}"),
    (dict(n_adversaries=True), r"n_adversaries must be an int in .*got True"),
    (dict(n_adversaries=2.0), r"n_adversaries must be an int in .*got 2\.0"),
    (dict(diversity=-0.1), r"diversity must be a finite float >= 0 .*got -0\.1: use 0 for independent adversaries"),
    (dict(diversity=float("nan")), r"diversity must be a finite float >= 0 .*got nan"),
    (dict(diversity=float("inf")), r"diversity must be a finite float >= 0 .*got inf"),
    (dict(amsgrad=1), r"amsgrad must be a bool \(Adam's AMSGrad variant\); got 1\."),
    (dict(n_steps=5_000, n_adversaries=3), r"n_steps=5,000 × n_adversaries=3 would need 1\.5e\+04 forward \+ backward "
                                           r"passes per example and layer; the limit is MAX_STEPS=10,000: lower n_steps "
                                           r"\(adversarial_steps\) or n_adversaries\."),
    (dict(n_steps=0), r"n_steps must be an int >= 1; got 0\."),
])
def test_bad_settings_are_refused_before_any_forward(tiny_model, tiny_batch, monkeypatch, settings, message):
    monkeypatch.setattr(cf, "hooks", lambda *a, **k: pytest.fail("a forward ran although a check refuses it"))
    with pytest.raises(ValueError, match=message):
        adversarial_attention(tiny_model, tiny_batch, layer=0, **settings)


def test_curve_and_table_refuse_bad_settings(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match=r"steps must be a non-empty sequence of ints >= 1; got \[\]"):
        adversarial_curve(tiny_model, tiny_batch, layer=0, steps=[])
    with pytest.raises(ValueError, match=r"steps must be a non-empty sequence of ints >= 1; got \[10, 0\]"):
        adversarial_curve(tiny_model, tiny_batch, layer=0, steps=[10, 0])
    with pytest.raises(ValueError, match=r"n_steps=10,000 × n_adversaries=2 would need"):
        adversarial_curve(tiny_model, tiny_batch, layer=0, steps=[10, 10_000], n_adversaries=2)
    with pytest.raises(ValueError, match=r"Unknown adversary preset 'strong'\. Available: default, jain_wallace, converged, audit\."):
        counterfactual_table(tiny_model, tiny_batch, tests=("uniform",), adversary="strong")
    with pytest.raises(ValueError, match=r"adversary must be a preset name \(default, jain_wallace, converged, audit\) or an "
                                         r"adversary_options\(\.\.\.\) dict; got 5\."):
        counterfactual_table(tiny_model, tiny_batch, adversary=5)
    with pytest.raises(ValueError, match=r"n_adversaries must be an int in \[1, 100\]"):
        counterfactual_table(tiny_model, tiny_batch, adversary=adversary_options(n_adversaries=0))


def test_the_table_reads_its_search_at_half_the_steps_and_at_the_end(tiny_model, tiny_batch):
    search = dict(n_adversaries=3, lr=1.0)
    table = counterfactual_table(tiny_model, tiny_batch, tests=("adversarial",), layers=[0, "all"],
                                 adversary=adversary_options(**search), adversarial_steps=6)["summary"]
    for layer in (0, "all"):
        stats = table[table.layer == str(layer)].set_index("statistic").value
        full = adversarial_attention(tiny_model, tiny_batch, layer=layer, n_steps=6, **search)
        half = adversarial_attention(tiny_model, tiny_batch, layer=layer, n_steps=3, **search)
        assert stats["jsd_reached"] == pytest.approx(float(full.jsd.mean()), abs=1e-7)
        assert stats["jsd_reached_half_steps"] == pytest.approx(float(half.jsd.mean()), abs=1e-7)
        assert stats["jsd_reached_half_steps"] <= stats["jsd_reached"] + 1e-7    # the best so far only grows
