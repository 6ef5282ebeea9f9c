"""Integrated gradients' adaptive steps: each example's result is a fixed-count IG, its gap is measured, not assumed."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import WORDS, make_tiny_model

from attnaudit.explain import get_explainer
from attnaudit.explain.gradients import IntegratedGradients, baseline_embeds
from attnaudit.explain.quadrature import next_steps, step_schedule


def texts(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


def f_change(model, batch, target) -> torch.Tensor:
    """f(x) − f(x') of the target logit, by two plain forwards -> [batch]."""
    with torch.no_grad():
        embeds = model.embed(batch.input_ids)
        ref = baseline_embeds(model, batch, embeds, "pad")
        f = lambda e: model.logits_from_embeds(e, batch.attention_mask).gather(1, target[:, None])[:, 0]  # noqa: E731
        return f(embeds) - f(ref)


def test_schedule_doubles_and_ends_at_max_steps():
    assert step_schedule(16, 512) == [16, 32, 64, 128, 256, 512]
    assert step_schedule(16, 100) == [16, 32, 64, 100]
    assert step_schedule(8, 8) == [8]
    sched = step_schedule(16, 512)
    assert next_steps(sched, [(16, 5.0)]) == 32                                   # one point: double
    assert next_steps(sched, [(16, 40.0), (32, 20.0)]) == 512                      # 1/n decay, 20× over: 32·40 → cap
    assert next_steps(sched, [(16, 64.0), (32, 4.0)]) == 64                        # n⁻⁴: 32·8^(1/4) ≈ 54 -> 64
    assert next_steps(sched, [(16, 2.0), (32, 3.0)]) == 64                         # it grew: not asymptotic, double
    assert next_steps(sched, [(16, 4.0), (32, 3.0)]) == 256                        # slower than 1/n: 1/n, 32·2·3


@pytest.mark.parametrize("max_tokens", [95, "auto"])
def test_each_example_equals_a_fixed_call_at_its_reported_steps(max_tokens):
    model = make_tiny_model()
    batch = model.encode(texts(9, 2, 12, seed=4))
    got = IntegratedGradients(max_tokens=max_tokens, min_steps=4, tolerance=0.002).explain(model, batch)
    steps = got.extras["n_steps"].long()
    assert len(set(steps.tolist())) > 1                                             # the examples did differ
    budget = 95 if max_tokens == 95 else 4096
    for n in sorted(set(steps.tolist())):
        fixed = IntegratedGradients(n_steps=n, max_tokens=budget).explain(model, batch)
        rows = (steps == n).nonzero()[:, 0]
        for key in ("completeness_gap", "completeness_gap_relative"):
            torch.testing.assert_close(got.extras[key][rows], fixed.extras[key][rows], rtol=1e-4, atol=1e-6)
        if max_tokens == 95:
            # 95 < 2 · 4 steps · 12 tokens: every length group is one example, in both calls, so the same passes
            assert torch.equal(got.scores[rows], fixed.scores[rows])
        else:
            # groups differ in which examples share a pass: matmuls of another shape, float noise only
            torch.testing.assert_close(got.scores[rows], fixed.scores[rows], rtol=0, atol=1e-6)
        for i in rows.tolist():                                                     # alone, as its own batch
            one = IntegratedGradients(n_steps=n, max_tokens=budget).explain(model, batch.select([i]))
            torch.testing.assert_close(got.scores[i, : one.scores.shape[1]], one.scores[0], rtol=0, atol=1e-6)


def test_gaps_are_recomputed_from_the_scores_and_converged_ones_meet_the_tolerance(tiny_model, tiny_batch):
    got = IntegratedGradients().explain(tiny_model, tiny_batch)
    change = f_change(tiny_model, tiny_batch, got.target)
    gap = (got.scores.sum(1) - change).abs()                                        # Σ scores: reduction "sum"
    torch.testing.assert_close(got.extras["completeness_gap"], gap, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got.extras["completeness_gap_relative"], gap / change.abs(), rtol=1e-3, atol=1e-5)
    assert got.extras["converged"].eq(1).all()
    assert (got.extras["completeness_gap_relative"] <= 0.01).all()
    assert set(got.extras["n_steps"].tolist()) <= set(step_schedule(16, 512))
    assert set(got.extras) == {"completeness_gap", "completeness_gap_relative", "n_steps", "converged"}


def test_an_impossible_tolerance_stops_at_max_steps_and_is_flagged(tiny_model, tiny_batch):
    got = IntegratedGradients(tolerance=1e-12, atol=0.0, min_steps=4, max_steps=24).explain(tiny_model, tiny_batch)
    assert got.extras["n_steps"].eq(24).all() and got.extras["converged"].eq(0).all()
    fixed = IntegratedGradients(n_steps=24, max_tokens=4096).explain(tiny_model, tiny_batch)
    torch.testing.assert_close(got.scores, fixed.scores, rtol=0, atol=1e-6)        # the cap's result is kept


def test_atol_decides_where_f_x_equals_f_baseline():
    model = make_tiny_model()
    batch = model.encode(["the film"])
    got = IntegratedGradients(tolerance=1e-12, atol=1e3, min_steps=4).explain(model, batch)   # any gap passes
    assert got.extras["n_steps"].tolist() == [4.0] and got.extras["converged"].tolist() == [1.0]


def test_adaptive_on_a_trained_model_meets_the_tolerance():
    """The default on the tiny model trained a little (so that f(x) − f(x') is far from 0): every gap <= 1 %."""
    from attnaudit.data.tasks import make_examples
    from attnaudit.model.train import defaults_for, train_task

    settings = defaults_for("needle").replace(n_train=300, n_valid=50, n_test=50, epochs=1, d_model=16, n_heads=2,
                                              d_ff=32, n_layers=2, warmup=10)
    model, _ = train_task("needle", settings, device="cpu", progress=False)
    batch = model.encode(make_examples("needle", "test", n=6, seed=5))
    got = IntegratedGradients().explain(model, batch)
    converged = got.extras["converged"].bool()
    rel, gap = got.extras["completeness_gap_relative"], got.extras["completeness_gap"]
    assert ((rel <= 0.01) | (gap <= 1e-4))[converged].all()
    assert ((rel > 0.01) & (gap > 1e-4))[~converged].all() and got.extras["n_steps"][~converged].eq(512).all()


def test_fixed_n_steps_is_unchanged_and_records_no_steps(tiny_model, tiny_batch):
    got = IntegratedGradients(n_steps=16).explain(tiny_model, tiny_batch)
    assert set(got.extras) == {"completeness_gap", "completeness_gap_relative"}
    assert got.params["n_steps"] == 16 and got.params["max_tokens"] == "auto"
    e = IntegratedGradients()
    assert IntegratedGradients(**e.get_params()).get_params() == e.get_params()
    assert e.get_params()["n_steps"] == "adaptive"


def test_cost_is_the_whole_schedule(tiny_model):
    (cost,) = IntegratedGradients().costs(tiny_model, tiny_model.encode(["the film"]))
    assert (cost.parameter, cost.value, cost.amount) == ("max_steps", 512, 16 + 32 + 64 + 128 + 256 + 512)
    with pytest.raises(ValueError, match=r"integrated_gradients: max_steps=4096 would need .* 8\.2e\+03 forward "
                                         r"passes per example at worst \(adaptive: 16 \+ 32 .* \+ 4096\); the limit "
                                         r"is 4,096; pass max_cost="):
        IntegratedGradients(max_steps=4096).explain(tiny_model, "the film")
    IntegratedGradients(max_steps=4096, max_cost=8176, min_steps=2048).check_limits(tiny_model,
                                                                                    tiny_model.encode(["the film"]))


@pytest.mark.parametrize("params, message", [
    ({"n_steps": "adaptiv"}, "n_steps must be an int >= 1 or 'adaptive'; got 'adaptiv'."),
    ({"n_steps": 0}, "n_steps must be an int >= 1; got 0."),
    ({"n_steps": None}, "n_steps must be an int >= 1 or 'adaptive'; got None."),
    ({"tolerance": 0}, "tolerance must be a number in (0, 1) (the completeness gap over |f(x) − f(x')|; 0.01 = 1%); "
                       "got 0."),
    ({"tolerance": 1.5}, "tolerance must be a number in (0, 1)"),
    ({"atol": -1.0}, "atol must be a number >= 0 (an absolute completeness gap, in logits); got -1.0."),
    ({"min_steps": 0}, "min_steps must be an int >= 1; got 0."),
    ({"max_steps": 10**6}, "max_steps must be an int in [1, 65,536]; got 1,000,000. Lower it."),
    ({"min_steps": 64, "max_steps": 32}, "min_steps must be <= max_steps; got min_steps=64, max_steps=32. Lower "
                                         "min_steps or raise max_steps."),
    ({"max_tokens": "many"}, "max_tokens must be 'auto', an int >= 1 or None; got 'many'."),
    ({"baseline": None}, "n_steps='adaptive' measures the completeness gap against a baseline; got baseline=None."),
])
def test_bad_adaptive_parameters_are_one_line_errors(tiny_model, params, message):
    with pytest.raises(ValueError) as err:
        get_explainer("integrated_gradients", **params).explain(tiny_model, "the film")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_adaptive_on_a_tiny_huggingface_bert():
    pytest.importorskip("transformers", reason="the HuggingFace adapter needs the optional extra")
    from test_hf import TEXTS, tiny_classifier

    model = tiny_classifier("bert")                                                 # GELU, LayerNorm: a smooth path
    batch = model.encode(TEXTS)
    got = IntegratedGradients(min_steps=4).explain(model, batch)
    rel, gap = got.extras["completeness_gap_relative"], got.extras["completeness_gap"]
    assert got.extras["converged"].eq(1).all() and ((rel <= 0.01) | (gap <= 1e-4)).all()
    for n in sorted(set(got.extras["n_steps"].long().tolist())):
        rows = (got.extras["n_steps"] == n).nonzero()[:, 0]
        fixed = IntegratedGradients(n_steps=n, max_tokens=4096).explain(model, batch)
        torch.testing.assert_close(got.scores[rows], fixed.scores[rows], rtol=0, atol=1e-6)


def test_adaptive_on_a_language_model_explains_each_generation_step():
    from test_lm import make_lm

    from attnaudit.data.examples import Example

    model = make_lm()
    batch = model.encode([Example("x", "a 1 b 2 ? b", target="2 c a"), Example("y", "c 3 ?", target="c 3")])
    got = IntegratedGradients(min_steps=4).explain(model, batch, target=batch.labels)
    assert got.steps == batch.steps and got.extras["n_steps"].shape == (len(batch),)
    for n in sorted(set(got.extras["n_steps"].long().tolist())):
        rows = (got.extras["n_steps"] == n).nonzero()[:, 0]
        fixed = IntegratedGradients(n_steps=n, max_tokens=4096).explain(model, batch, target=batch.labels)
        torch.testing.assert_close(got.scores[rows], fixed.scores[rows], rtol=0, atol=1e-6)
    rel, gap = got.extras["completeness_gap_relative"], got.extras["completeness_gap"]
    assert ((rel <= 0.01) | (gap <= 1e-4))[got.extras["converged"].bool()].all()
