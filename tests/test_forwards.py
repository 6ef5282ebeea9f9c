"""One engine per audit chunk: the perturbation explainers evaluate through it, each distinct input runs once,
and the audit reports its forwards per example and stage against counts derived by hand."""
from __future__ import annotations

import math

import pytest
import torch

from attnaudit.analyses.audit import AuditSettings, audit
from attnaudit.analyses.faithfulness import tau_loo
from attnaudit.analyses.forwards import add_forwards, chunk_forwards, forward_figures, plain_seconds
from attnaudit.data.examples import Example
from attnaudit.explain import get_explainer
from attnaudit.explain.perturb import PerturbationEngine, engine_for, sharing
from attnaudit.explain.run import explain_all

TEXTS = ["the film was good", "a boring plot", "the story was not bad and the actor was great", "good film"]


@pytest.fixture
def batch(tiny_model):
    return tiny_model.encode([Example(id=f"ex{i}", text=t, label=i % 2) for i, t in enumerate(TEXTS)])


def words(batch) -> list[int]:
    return (batch.attention_mask & ~batch.special_mask).sum(1).tolist()


def test_the_perturbation_explainers_give_the_same_scores_through_a_shared_engine(tiny_model, batch):
    names = ["occlusion", "lime", "kernel_shap"]
    alone = explain_all(tiny_model, batch, [get_explainer(n) for n in names])
    engine = PerturbationEngine(tiny_model, batch, max_batch=7, autocast=False)
    with sharing(engine):
        shared = explain_all(tiny_model, batch, [get_explainer(n) for n in names])
    for n in names:
        torch.testing.assert_close(shared[n].scores, alone[n].scores, atol=1e-6, rtol=0)
    assert engine.stats.forwards > 0                      # they ran here, not in engines of their own
    before = engine.stats.forwards
    with sharing(engine):
        again = get_explainer("occlusion").explain(tiny_model, batch)
    assert engine.stats.forwards == before                # the second occlusion was all cache hits
    torch.testing.assert_close(again.scores, alone["occlusion"].scores, atol=1e-6, rtol=0)


def test_occlusion_names_its_policy_on_an_engine_shared_with_another_default(tiny_model, batch):
    alone = get_explainer("occlusion", policy="delete").explain(tiny_model, batch)
    engine = PerturbationEngine(tiny_model, batch, policy="mask", autocast=False)
    with sharing(engine):
        shared = get_explainer("occlusion", policy="delete").explain(tiny_model, batch)
    torch.testing.assert_close(shared.scores, alone.scores, atol=1e-6, rtol=0)
    assert engine.stats.forwards == sum(n + 1 for n in words(batch))     # n deletions + the full input


def test_tau_loo_after_occlusion_on_the_shared_engine_runs_nothing_new(tiny_model, batch):
    engine = PerturbationEngine(tiny_model, batch, autocast=False)
    with sharing(engine):
        attr = get_explainer("occlusion").explain(tiny_model, batch)
    ran = engine.stats.forwards
    assert ran == sum(n + 1 for n in words(batch))
    tau_loo(engine, batch, attr)
    assert engine.stats.forwards == ran and engine.stats.requested > ran


def test_engine_for_shares_only_its_own_model_and_batch(tiny_model, batch):
    from tests.conftest import make_tiny_model
    engine = PerturbationEngine(tiny_model, batch, autocast=False)
    other = tiny_model.encode(["a boring film"])
    with sharing(engine):
        assert engine_for(tiny_model, batch, policy="mask", max_batch=8) is engine
        assert engine_for(tiny_model, tiny_model.encode(TEXTS), policy="mask", max_batch=8) is engine  # equal ids
        assert engine_for(tiny_model, other, policy="mask", max_batch=8) is not engine
        assert engine_for(make_tiny_model(1), batch, policy="mask", max_batch=8) is not engine
    assert engine_for(tiny_model, batch, policy="mask", max_batch=8) is not engine   # outside the block
    with pytest.raises(TypeError, match="PerturbationEngine"):
        with sharing(tiny_model):
            pass


def test_the_audit_counts_each_distinct_input_once(tiny_model, batch):
    """Occlusion + τ-LOO + the deletion/insertion curves of one explainer over n words: the full input, deletion
    steps 1..n, insertion steps 1..n-1, and the n leave-one-out inputs of which two are curve steps (the top token's
    removal is deletion step 1, the bottom one's insertion step n-1): 3n - 2 distinct inputs; occlusion ran n + 1."""
    settings = AuditSettings(explainers=["occlusion"], analyses=["faithfulness"], metrics=["tau_loo"], ferret=False,
                             chunk_size=3)
    result = audit(tiny_model, batch, settings, progress=False)
    n = words(batch)
    assert min(n) >= 2
    f = result.forwards
    assert f["examples"] == len(n)
    assert f["distinct_inputs"] == sum(3 * k - 2 for k in n)
    assert f["forwards_per_example"] == pytest.approx(sum(3 * k - 2 for k in n) / len(n), rel=1e-3)
    assert f["explain_forwards_per_example"] == pytest.approx(sum(k + 1 for k in n) / len(n), rel=1e-3)
    assert f["explain_requested_per_example"] == f["explain_forwards_per_example"]
    assert f["requested_per_example"] > f["forwards_per_example"] and 0 < f["saved_fraction"] < 1
    assert f["ms_per_forward"] > 0 and f["plain_ms_per_forward"] > 0 and math.isfinite(f["ratio_to_plain"])


def test_chunk_records_add_up(tiny_model, batch):
    engine = PerturbationEngine(tiny_model, batch, autocast=False)
    engine.probs(batch.attention_mask, torch.zeros(len(batch), dtype=torch.long))
    explained = engine.stats.as_dict()
    engine.probs(batch.attention_mask & ~(batch.special_mask.logical_not() & batch.attention_mask),
                 torch.zeros(len(batch), dtype=torch.long))
    one = chunk_forwards(engine, explained, plain_seconds(engine))
    assert one["stages"]["explain"]["forwards"] == len(batch) == one["stages"]["faithfulness"]["forwards"]
    two = add_forwards([one, one, {}])
    assert two["examples"] == 2 * len(batch) and two["stages"]["faithfulness"]["requested"] == 2 * len(batch)
    assert forward_figures(two)["forwards_per_example"] == 2.0 and forward_figures({}) == {}
    assert add_forwards([]) == {}


def test_the_report_shows_the_forwards(tiny_model, batch, tmp_path):
    import json
    settings = AuditSettings(explainers=["occlusion", "random"], analyses=["faithfulness"], ferret=False)
    result = audit(tiny_model, batch, settings, progress=False)
    out = result.write_report(tmp_path / "r")
    res = json.loads((out / "results.json").read_text())
    assert res["forwards"]["default"]["distinct_inputs"] == result.forwards["distinct_inputs"]
    # the wall-clock figures go with the timings (they differ from run to run), the counts do not
    assert res["timings"]["forwards"]["default"]["ratio_to_plain"] == result.forwards["ratio_to_plain"]
    assert not set(res["forwards"]["default"]) & {"ms_per_forward", "plain_ms_per_forward", "ratio_to_plain"}
    html = (out / "index.html").read_text()
    assert "forwards.default.forwards_per_example" in html and "time.forwards.default.ratio_to_plain" in html


def test_the_engine_gives_back_the_inputs_it_ran(tiny_model, batch):
    """engine.inputs() re-built from the cache keys: a plain forward of them gives the cached probabilities."""
    from attnaudit.explain.perturbation import target_probs
    engine = PerturbationEngine(tiny_model, batch, autocast=False)
    attr = get_explainer("random").explain(tiny_model, batch)
    for policy in ("mask", "delete", "attention"):
        tau_loo(engine, batch, attr, policy=policy)
    ids, mask = engine.inputs()
    assert len(ids) == engine.stats.forwards == len(engine._table)
    cls = torch.zeros(len(ids), dtype=torch.long)
    torch.testing.assert_close(target_probs(tiny_model, ids, mask, cls, max_batch=16), engine._table[:, 0],
                               atol=1e-6, rtol=0)
    assert plain_seconds(engine) > 0 and plain_seconds(PerturbationEngine(tiny_model, batch)) == 0.0
