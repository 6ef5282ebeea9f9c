"""Cascading randomisation (Adebayo et al. 2018) with explainers whose behaviour is known."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import WORDS, make_tiny_model

from attnaudit.analyses.sanity import (
    cascading_layers,
    cascading_randomization,
    randomization_table,
    randomization_verdict,
    rank_similarity,
)
from attnaudit.data.examples import Example
from attnaudit.explain.attribution import Attribution
from attnaudit.explain.base import Explainer


class FreshRandom(Explainer):
    """Seeded random scores, independent of the model, new ones at every call (drawn from one stream)."""

    name, family = "fresh_random", "control"

    def __init__(self, *, seed: int = 0):
        self.seed = seed

    def scores(self, model, batch, target):
        if not hasattr(self, "_gen"):
            self._gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(batch.input_ids.shape, generator=self._gen)


class Position(Explainer):
    """The token's position: no weight is ever read, so randomising them cannot change it."""

    name, family = "position", "control"

    def scores(self, model, batch, target):
        return torch.arange(batch.input_ids.shape[1], dtype=torch.float).expand(batch.input_ids.shape).clone()


class TinySaliency(Explainer):
    """|d logit_target / d embedding|, L2 over d_model."""

    name, family = "tiny_saliency", "gradient"

    def scores(self, model, batch, target):
        with torch.enable_grad():
            emb = model.embed(batch.input_ids).detach().requires_grad_(True)      # [batch, seq, d_model]
            logits = model.logits_from_embeds(emb, batch.attention_mask)          # [batch, n_classes]
            (grad,) = torch.autograd.grad(logits.gather(1, target[:, None].to(logits.device)).sum(), emb)
        return grad.norm(dim=-1)                                                  # [batch, seq]


@pytest.fixture
def long_batch(tiny_model):
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (10,), generator=g).tolist()) for _ in range(16)]
    return tiny_model.encode([Example(id=f"r{i}", text=t, label=0) for i, t in enumerate(texts)])


def by_step(table, explainer):
    rows = table[table.explainer == explainer]
    return rows.groupby("setting", sort=False)["value"].mean()


def test_steps_of_the_builtin_model(tiny_model):
    assert [name for name, _ in cascading_layers(tiny_model)] == ["head", "encoder.layers.1", "encoder.layers.0", "embeddings"]
    pre = make_tiny_model(norm="pre")
    assert pre.net.encoder.final_norm in cascading_layers(pre)[0][1]
    with pytest.raises(TypeError, match="built-in TextClassifier"):
        cascading_layers(object())


def test_randomisation_is_cumulative_deterministic_and_on_a_copy(tiny_model):
    original = {k: v.clone() for k, v in tiny_model.net.state_dict().items()}
    seen = {}
    for step, model in cascading_randomization(tiny_model, seed=3):
        seen[step] = {k: v.clone() for k, v in model.net.state_dict().items()}
    assert list(seen) == ["step=0:original", "step=1:head", "step=2:encoder.layers.1", "step=3:encoder.layers.0",
                          "step=4:embeddings"]
    changed = lambda s: {k.split(".")[0] + ("." + k.split(".")[2] if k.startswith("encoder.layers") else "")
                         for k in original if not torch.equal(seen[s][k], original[k])}
    assert changed("step=0:original") == set()
    assert changed("step=1:head") == {"head"}
    assert changed("step=2:encoder.layers.1") == {"head", "encoder.1"}
    assert changed("step=4:embeddings") == {"head", "encoder.1", "encoder.0", "encoder"}
    again = {step: {k: v.clone() for k, v in m.net.state_dict().items()} for step, m in cascading_randomization(tiny_model, seed=3)}
    assert all(torch.equal(again["step=4:embeddings"][k], v) for k, v in seen["step=4:embeddings"].items())
    assert all(torch.equal(original[k], v) for k, v in tiny_model.net.state_dict().items())


def test_known_explainers(tiny_model, long_batch):
    weights = {k: v.clone() for k, v in tiny_model.net.state_dict().items()}
    table = randomization_table(tiny_model, long_batch, [FreshRandom(), Position(), TinySaliency()])
    assert list(table.columns) == ["example_id", "explainer", "metric", "setting", "value"]
    assert set(table.metric) == {"randomization_spearman"} and len(table) == 3 * 5 * len(long_batch)
    assert all(torch.equal(weights[k], v) for k, v in tiny_model.net.state_dict().items())   # user's model untouched

    assert (by_step(table, "fresh_random").abs() < 0.3).all()              # near 0 at every step
    assert (by_step(table, "position") == 1.0).all()                       # never changes
    sal = by_step(table, "tiny_saliency")
    assert sal["step=0:original"] == 1.0 and sal.iloc[-1] < 0.5            # drops once the weights are gone

    verdict = randomization_verdict(table).set_index("explainer")
    assert list(verdict.columns) == ["final_similarity", "passed", "final_step"]
    assert not verdict.loc["position", "passed"] and verdict.loc["position", "final_similarity"] == 1.0
    assert verdict.loc["tiny_saliency", "passed"] and verdict.loc["fresh_random", "passed"]
    assert (verdict.final_step == "step=4:embeddings").all()


def test_registry_saliency_if_present(tiny_model, long_batch):
    from attnaudit.explain.registry import get_explainer

    saliency = get_explainer("saliency")
    sal = by_step(randomization_table(tiny_model, long_batch, [saliency]), "saliency")
    assert sal.iloc[-1] < 0.5


def attribution(rows):
    """[CLS] w… [SEP] padded; `rows` gives the word scores (specials get 5.0, ignored by the metric)."""
    seq = max(map(len, rows)) + 2
    scores, mask = torch.zeros(len(rows), seq), torch.zeros(len(rows), seq, dtype=torch.bool)
    special = torch.zeros_like(mask)
    for i, r in enumerate(rows):
        scores[i, 1 : len(r) + 1] = torch.tensor(r, dtype=torch.float)
        scores[i, 0] = scores[i, len(r) + 1] = 5.0
        mask[i, : len(r) + 2] = True
        special[i, 0] = special[i, len(r) + 1] = True
    b = len(rows)
    return Attribution(scores=scores, input_ids=torch.zeros(b, seq, dtype=torch.long), attention_mask=mask,
                       special_mask=special, tokens=[["t"] * seq] * b, target=torch.zeros(b, dtype=torch.long),
                       target_prob=torch.ones(b), method="hand", params={})


def test_rank_similarity_by_hand():
    a = attribution([[1, 2, 3], [1, 2, 3], [4, 4, 4], [4, 4, 4], [7]])
    b = attribution([[3, 2, 1], [1, 3, 2], [2, 2, 2], [1, 2, 3], [1]])
    # reversed: -1; ranks (1,2,3) vs (1,3,2): 1 - 6·(0+1+1)/(3·8) = 0.5; both constant: 1; one constant: 0;
    # a single scored word: nothing to rank, NaN.
    got = rank_similarity(a, b)
    torch.testing.assert_close(got[:4], torch.tensor([-1.0, 0.5, 1.0, 0.0], dtype=torch.float64))
    assert math.isnan(float(got[4]))
    # ties get average ranks: (1, 1, 3) -> ranks (1.5, 1.5, 3) vs (1, 2, 3): Pearson = 0.866…
    torch.testing.assert_close(rank_similarity(attribution([[1, 1, 3]]), attribution([[1, 2, 3]])),
                               torch.tensor([math.sqrt(3) / 2], dtype=torch.float64))
    assert float(rank_similarity(attribution([[-3, 1, 2]]), attribution([[3, 1, 2]]), absolute=True)) == 1.0


def test_verdict_threshold_and_nan():
    table = pd.DataFrame({
        "example_id": ["a", "b", "a", "b", "a", "a"],
        "explainer": ["x", "x", "x", "x", "y", "y"],
        "metric": ["randomization_spearman"] * 6,
        "setting": ["step=0:original", "step=0:original", "step=2:embeddings", "step=2:embeddings",
                    "step=0:original", "step=2:embeddings"],
        "value": [1.0, 1.0, 0.6, 0.3, 1.0, float("nan")],
    })
    v = randomization_verdict(table, threshold=0.5).set_index("explainer")
    assert math.isclose(v.loc["x", "final_similarity"], 0.45) and v.loc["x", "passed"]        # (0.6 + 0.3) / 2
    assert not randomization_verdict(table, threshold=0.4).set_index("explainer").loc["x", "passed"]
    assert math.isnan(v.loc["y", "final_similarity"]) and not v.loc["y", "passed"]
    with pytest.raises(ValueError, match="no 'randomization_spearman' rows"):
        randomization_verdict(table.assign(metric="other"))


def test_registry_random_is_near_zero_after_randomisation(tiny_model, long_batch):
    # RandomScores draws from the seed, the tokens and a fingerprint of the weights: identical on the
    # untouched copy (step 0), a fresh random map once any weight changes.
    from attnaudit.explain.registry import get_explainer

    table = randomization_table(tiny_model, long_batch, [get_explainer("random")])
    steps = by_step(table, "random")
    assert steps.iloc[0] == 1.0
    assert (steps.iloc[1:].abs() < 0.3).all()
    assert randomization_verdict(table).passed.all()


def test_the_attention_family_shares_one_capture_per_step_with_the_numbers_of_each_alone(tiny_model, long_batch):
    from attnaudit.analyses.audit import merge_sanity
    from attnaudit.explain.registry import get_explainer

    names = ["attention", "saliency", "rollout", "grad_attention"]
    original = randomization_table.__globals__["cascading_randomization"]

    def counted_table(explainers):
        """randomization_table, and how many encoder forwards its copy ran."""
        calls: list[int] = []
        handles: list = []

        def counted(model, *, seed):                  # hook the copy the steps randomise (once: it is one copy)
            for step, clone in original(model, seed=seed):
                if not handles:
                    handles.append(clone.net.encoder.register_forward_hook(lambda *args: calls.append(1)))
                yield step, clone

        randomization_table.__globals__["cascading_randomization"] = counted
        try:
            return randomization_table(tiny_model, long_batch, explainers, seed=3), len(calls)
        finally:
            randomization_table.__globals__["cascading_randomization"] = original
            for h in handles:
                h.remove()

    alone = [counted_table([get_explainer(n)]) for n in names]
    together, n_together = counted_table([get_explainer(n) for n in names])
    pd.testing.assert_frame_equal(together, merge_sanity([t for t, _ in alone], names), check_exact=True)
    assert list(dict.fromkeys(together["explainer"])) == names
    # each explain of an attention explainer alone runs 2 forwards (the prediction, the capture); together the three
    # share them; saliency runs its own either way. Steps 0..4 (head, 2 layers, embeddings), step 0 twice.
    calls = len(dict.fromkeys(together["setting"])) + 1
    per_alone = {n: c // calls for n, (_, c) in zip(names, alone)}
    assert {n: per_alone[n] for n in ("attention", "rollout", "grad_attention")} == dict.fromkeys(
        ("attention", "rollout", "grad_attention"), 2)
    assert n_together == calls * (2 + per_alone["saliency"]) < sum(c for _, c in alone)
