"""Known answers for the gradient, perturbation and control explainers on tiny models."""
from __future__ import annotations

import importlib.util

import captum.attr
import pytest
import torch
from conftest import make_tiny_model

from attnaudit.explain import get_explainer
from attnaudit.explain.gradients import CaptumExplainer, baseline_embeds
from attnaudit.explain.perturbation import target_probs


def logit_grad(model, batch, target: int):
    """embeds [batch, seq, d_model] and ∂(target logit)/∂embeds, by plain autograd."""
    embeds = model.embed(batch.input_ids).detach().requires_grad_()
    logits = model.logits_from_embeds(embeds, batch.attention_mask)                # [batch, n_classes]
    (grad,) = torch.autograd.grad(logits[:, target].sum(), embeds)                 # examples are independent
    return embeds.detach(), grad


def test_saliency_is_l2_norm_of_the_logit_gradient(tiny_model, tiny_batch):
    attr = get_explainer("saliency").explain(tiny_model, tiny_batch, target=1)
    _, grad = logit_grad(tiny_model, tiny_batch, 1)
    expected = grad.norm(dim=-1) * tiny_batch.attention_mask                       # [batch, seq]
    torch.testing.assert_close(attr.scores, expected)
    assert attr.params == {"reduction": "l2"}


def test_input_x_gradient_is_sum_of_embeds_times_grad(tiny_model, tiny_batch):
    attr = get_explainer("input_x_gradient").explain(tiny_model, tiny_batch, target=0)
    embeds, grad = logit_grad(tiny_model, tiny_batch, 0)
    torch.testing.assert_close(attr.scores, (embeds * grad).sum(-1) * tiny_batch.attention_mask)


def test_captum_explainer_wraps_any_class(tiny_model, tiny_batch):
    generic = CaptumExplainer(captum.attr.InputXGradient)
    got = generic.explain(tiny_model, tiny_batch)
    ref = get_explainer("input_x_gradient").explain(tiny_model, tiny_batch)
    torch.testing.assert_close(got.scores, ref.scores)
    assert got.method == "captum_input_x_gradient" and got.params["reduction"] == "sum"
    named = CaptumExplainer(captum.attr.IntegratedGradients, name="ig8", baseline="mask", n_steps=8)
    attr = named.explain(tiny_model, tiny_batch)
    assert attr.method == "ig8" and set(attr.extras) == {"completeness_gap", "completeness_gap_relative"}


def check_completeness(model, batch, *, baseline: str = "pad"):
    attr = get_explainer("integrated_gradients", baseline=baseline).explain(model, batch)
    with torch.no_grad():
        embeds = model.embed(batch.input_ids)
        f_x = model.logits_from_embeds(embeds, batch.attention_mask).gather(1, attr.target[:, None])[:, 0]
        ref = baseline_embeds(model, batch, embeds, baseline)
        f_ref = model.logits_from_embeds(ref, batch.attention_mask).gather(1, attr.target[:, None])[:, 0]
    gap = (attr.scores.sum(1) - (f_x - f_ref)).abs()                               # Σ scores: reduction "sum"
    torch.testing.assert_close(attr.extras["completeness_gap"], gap, atol=1e-4, rtol=1e-3)
    assert (gap < 0.01 * (f_x - f_ref).abs()).all(), (gap / (f_x - f_ref).abs()).tolist()


@pytest.mark.parametrize("baseline", ["pad", "mask"])  # "zero" is "pad" here: see the next test
def test_integrated_gradients_completeness_on_tiny_model(tiny_model, tiny_batch, baseline):
    check_completeness(tiny_model, tiny_batch, baseline=baseline)


def test_baselines_replace_words_only(tiny_model, tiny_batch):
    embeds = tiny_model.embed(tiny_batch.input_ids).detach()
    words = tiny_batch.attention_mask & ~tiny_batch.special_mask
    pad, zero = (baseline_embeds(tiny_model, tiny_batch, embeds, k) for k in ("pad", "zero"))
    mask = baseline_embeds(tiny_model, tiny_batch, embeds, "mask")
    assert torch.equal(pad, zero)                                                  # the [PAD] row is zero
    assert torch.equal(mask[~words], embeds[~words])                               # [CLS]/[SEP]/padding kept
    mask_row = tiny_model.embed(torch.tensor([[tiny_model.mask_id]]))[0, 0]
    assert torch.equal(mask[words], mask_row.expand(int(words.sum()), -1))


@pytest.fixture(scope="module")
def needle_model():
    if importlib.util.find_spec("attnaudit.model.train") is None:
        pytest.skip("attnaudit.model.train is not there yet")
    from attnaudit.model.train import defaults_for, train_task

    settings = defaults_for("needle").replace(n_train=1000, n_valid=200, n_test=200, epochs=3, d_model=32,
                                              n_heads=2, d_ff=64, warmup=100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more; on a shared CPU they only spin
    try:
        model, _ = train_task("needle", settings, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return model


@pytest.mark.slow
def test_integrated_gradients_completeness_on_trained_needle_model(needle_model):
    from attnaudit.data.tasks import make_examples

    check_completeness(needle_model, needle_model.encode(make_examples("needle", "test", n=8, seed=5)))


def test_integrated_gradients_chunking_changes_nothing(tiny_model, tiny_batch):
    whole = get_explainer("integrated_gradients", n_steps=16, max_batch=None).explain(tiny_model, tiny_batch)
    chunked = get_explainer("integrated_gradients", n_steps=16, max_batch=8).explain(tiny_model, tiny_batch)
    torch.testing.assert_close(whole.scores, chunked.scores, atol=1e-5, rtol=1e-4)


def test_deeplift_is_finite_and_reports_its_gap(tiny_model, tiny_batch):
    attr = get_explainer("deeplift", baseline="mask").explain(tiny_model, tiny_batch)
    assert torch.isfinite(attr.scores).all() and torch.isfinite(attr.extras["completeness_gap"]).all()
    assert (attr.scores[:, 0] == 0).all()                                          # [CLS] equals its baseline


def test_occlusion_mask_equals_a_loop_of_single_forwards(tiny_model, tiny_batch):
    attr = get_explainer("occlusion", max_batch=3).explain(tiny_model, tiny_batch)
    for i in range(len(tiny_batch)):
        one = tiny_batch.select([i])
        t = attr.target[i : i + 1]
        full = target_probs(tiny_model, one.input_ids, one.attention_mask, t, max_batch=1)
        for j in range(one.input_ids.shape[1]):
            if one.special_mask[0, j]:
                assert attr.scores[i, j] == 0
                continue
            ids = one.input_ids.clone()
            ids[0, j] = tiny_model.mask_id
            without = target_probs(tiny_model, ids, one.attention_mask, t, max_batch=1)
            torch.testing.assert_close(attr.scores[i, j], (full - without)[0], atol=1e-6, rtol=1e-5)


def test_occlusion_delete_equals_the_text_without_the_word(tiny_model):
    text = "the story was not bad"
    attr = get_explainer("occlusion", policy="delete").explain(tiny_model, text, target=1)
    words = text.split()
    p = lambda t: float(tiny_model.predict_proba(t)[0, 1])                          # noqa: E731
    for j, _ in enumerate(words):
        shorter = " ".join(words[:j] + words[j + 1 :])
        assert attr.scores[0, j + 1].item() == pytest.approx(p(text) - p(shorter), abs=1e-5)


def spy_on_engines(monkeypatch) -> list:
    """Every PerturbationEngine built while the test runs, in order."""
    from attnaudit.explain.perturb import PerturbationEngine

    built, original = [], PerturbationEngine.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(PerturbationEngine, "__init__", init)
    return built


@pytest.mark.parametrize("policy", ["mask", "delete"])
def test_occlusion_is_leave_one_out_on_the_one_engine(policy, tiny_model, tiny_batch, monkeypatch):
    from attnaudit.analyses.faithfulness import leave_one_out

    engines = spy_on_engines(monkeypatch)
    attr = get_explainer("occlusion", policy=policy).explain(tiny_model, tiny_batch)
    assert len(engines) == 1 and engines[0].policy == policy
    n_words = int((tiny_batch.attention_mask & ~tiny_batch.special_mask).sum())
    assert engines[0].stats.requested == n_words + len(tiny_batch)          # one per removed word + each full input
    torch.testing.assert_close(attr.scores, leave_one_out(tiny_model, tiny_batch, target=attr.target, policy=policy))


@pytest.mark.parametrize("name", ["lime", "kernel_shap"])
def test_sampled_explainers_run_their_samples_through_the_engine(name, tiny_model, tiny_batch, monkeypatch):
    engines = spy_on_engines(monkeypatch)
    get_explainer(name, n_samples=48).explain(tiny_model, tiny_batch)
    (engine,) = engines
    assert engine.policy == "mask" and engine.stats.requested >= 48 * 3     # 3 examples have several words
    # "a boring plot" has 2³ coalitions and "good" one word: repeated samples run once
    assert engine.stats.forwards < engine.stats.requested


def test_random_is_reproducible_and_redrawn_for_other_weights(tiny_model, tiny_batch):
    a = get_explainer("random", seed=7).explain(tiny_model, tiny_batch)
    again = get_explainer("random", seed=7).explain(make_tiny_model(seed=0), tiny_batch)   # same weights
    other = get_explainer("random", seed=7).explain(make_tiny_model(seed=3), tiny_batch)   # other weights
    c = get_explainer("random", seed=8).explain(tiny_model, tiny_batch)
    assert torch.equal(a.scores, again.scores)
    assert not torch.equal(a.scores, other.scores) and not torch.equal(a.scores, c.scores)
    scored = tiny_batch.attention_mask & ~tiny_batch.special_mask
    assert ((a.scores >= 0) & (a.scores < 1)).all() and (a.scores[~scored] == 0).all()
    assert (a.scores[scored] > 0).all()


@pytest.mark.parametrize("name", ["lime", "kernel_shap", "gradient_shap"])
def test_sampled_explainers_are_seeded_and_leave_global_rng_alone(name, tiny_model, tiny_batch):
    settings = {"n_samples": 8} if name == "gradient_shap" else {"n_samples": 48}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = get_explainer(name, seed=1, **settings).explain(tiny_model, tiny_batch)
    assert torch.equal(torch.get_rng_state(), state)                               # restored after
    b = get_explainer(name, seed=1, **settings).explain(tiny_model, tiny_batch)
    c = get_explainer(name, seed=2, **settings).explain(tiny_model, tiny_batch)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)


@pytest.mark.parametrize("name", ["occlusion", "lime", "kernel_shap"])
def test_special_tokens_score_zero(name, tiny_model, tiny_batch):
    attr = get_explainer(name, **({} if name == "occlusion" else {"n_samples": 48})).explain(tiny_model, tiny_batch)
    assert (attr.scores[tiny_batch.special_mask] == 0).all()
    assert (attr.scores[tiny_batch.attention_mask & ~tiny_batch.special_mask] != 0).any()


def test_kernel_shap_one_word_is_exact(tiny_model):
    attr = get_explainer("kernel_shap").explain(tiny_model, "good", target=0)
    occ = get_explainer("occlusion").explain(tiny_model, "good", target=0)
    torch.testing.assert_close(attr.scores, occ.scores)


@pytest.mark.parametrize("name, params, words", [
    ("integrated_gradients", {"n_steps": 0}, ["n_steps", "int >= 1", "0"]),
    ("integrated_gradients", {"baseline": "unk"}, ["baseline", "'pad', 'mask', 'zero'", "'unk'"]),
    ("saliency", {"reduction": "max"}, ["reduction", "'sum', 'l2'", "'max'"]),
    ("deeplift", {"reduction": "mean"}, ["reduction", "'mean'"]),
    ("occlusion", {"policy": "drop"}, ["policy", "'mask', 'delete'", "'drop'"]),
    ("gradient_shap", {"baselines": "pad"}, ["baselines", "tuple"]),
    ("gradient_shap", {"stdevs": -1.0}, ["stdevs", ">= 0"]),
    ("lime", {"n_samples": 0}, ["n_samples", "0"]),
    ("kernel_shap", {"seed": 1.5}, ["seed", "1.5"]),
    ("random", {"seed": "x"}, ["seed", "'x'"]),
])
def test_bad_params_raise_naming_them(name, params, words, tiny_model, tiny_batch):
    explainer = get_explainer(name, **params)                                      # constructors only store
    with pytest.raises(ValueError) as err:
        explainer.explain(tiny_model, tiny_batch)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_integrated_gradients_max_batch_below_batch_size(tiny_model, tiny_batch):
    whole = get_explainer("integrated_gradients", n_steps=16).explain(tiny_model, tiny_batch)
    split = get_explainer("integrated_gradients", n_steps=16, max_batch=3).explain(tiny_model, tiny_batch)
    torch.testing.assert_close(whole.scores, split.scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(whole.extras["completeness_gap"], split.extras["completeness_gap"], atol=1e-5, rtol=1e-3)


def test_gradient_explainers_work_under_no_grad(tiny_model, tiny_batch):
    ref = get_explainer("saliency").explain(tiny_model, tiny_batch)
    with torch.no_grad():
        got = get_explainer("saliency").explain(tiny_model, tiny_batch)
    assert torch.equal(ref.scores, got.scores)
