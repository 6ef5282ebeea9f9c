"""The audit entry point: tidy tables from explainers + analyses, chunking that changes nothing, saved items."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from attnaudit.analyses.audit import CURVE_GRID, AuditSettings, audit
from attnaudit.analyses.tables import COLUMNS
from attnaudit.data.examples import Example

FAST = dict(explainers=("attention", "rollout", "saliency", "occlusion", "random"), n_permutations=4,
            adversarial_steps=3, sanity_examples=3, counterfactual_examples=6)
WORDS = "the a film plot was not good bad great boring and with story actor".split()


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


@pytest.fixture
def examples() -> list[Example]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(10):
        words = list(rng.choice(WORDS, size=3 + i % 6))
        out.append(Example(id=f"ex{i}", text=" ".join(words), label=i % 2,
                           rationale=tuple(int(w in ("good", "bad", "great", "boring")) for w in words)))
    return out


def test_audit_returns_tidy_tables_for_every_explainer_and_analysis(tiny_model, examples):
    result = audit(tiny_model, examples, **FAST)
    m = result.metrics
    assert list(m.columns) == COLUMNS
    assert set(m["explainer"]) == set(FAST["explainers"])
    assert {"comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc", "decision_flip_fraction", "tau_loo",
            "gold_average_precision", "gold_auprc", "gold_precision_at_k", "rationale_token_f1",
            "randomization_spearman"} <= set(m["metric"])
    per = m[m["metric"] == "deletion_auc"].groupby("explainer")["example_id"].nunique()
    assert (per == len(examples)).all()
    assert set(result.counterfactual) >= {"summary", "permutation"}
    assert sorted(result.curves["fraction"].unique()) == pytest.approx(list(CURVE_GRID))
    assert len(result.attributions) == len(examples) * len(FAST["explainers"])
    assert [x["id"] for x in result.examples] == [x.id for x in examples]
    att = np.asarray(result.attention_example["attention"])                     # [layer, head, query, key]
    assert att.shape[:2] == (tiny_model.n_layers, tiny_model.n_heads)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-4)
    assert set(result.timings) == {"explain_and_faithfulness", "counterfactual", "sanity"}


def test_deletion_curve_starts_at_the_explained_probability(tiny_model, examples):
    result = audit(tiny_model, examples, analyses=("faithfulness",), **{**FAST, "explainers": ("random",)})
    start = result.curves[(result.curves["curve"] == "deletion") & (result.curves["fraction"] == 0.0)]
    probs = {r["id"]: r["prob"] for r in result.attributions}
    for row in start.itertuples():
        assert row.prob == pytest.approx(probs[row.example_id], abs=1e-5)


def test_chunk_size_changes_no_number(tiny_model, examples):
    """Chunks are independent units of work: 3 at a time or all at once give the same tables."""
    a = audit(tiny_model, examples, analyses=("faithfulness", "plausibility"), chunk_size=3, **FAST)
    b = audit(tiny_model, examples, analyses=("faithfulness", "plausibility"), chunk_size=64, **FAST)
    key = ["example_id", "explainer", "metric", "setting"]
    ma, mb = a.metrics.sort_values(key).reset_index(drop=True), b.metrics.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(ma[key], mb[key])
    np.testing.assert_allclose(ma["value"], mb["value"], atol=1e-5, equal_nan=True)


def test_runner_sees_every_item_and_a_failed_item_is_listed(tiny_model, examples):
    seen = []

    def runner(item, compute):
        seen.append(item)
        return None if item.startswith("chunk-0001") else compute()

    result = audit(tiny_model, examples, chunk_size=4, runner=runner, **FAST)
    # the counterfactual tests are one item per test and layer (2 layers and "all"); the sanity check is one item for
    # the attention family (attention, rollout: one capture per step) and one per other explainer
    per_layer = [f"counterfactual-{t}-layer-{layer}" for t in ("permutation", "adversarial", "uniform", "erasure")
                 for layer in ("0", "1", "all")]
    assert seen == ["chunk-0000-of-0003", "chunk-0001-of-0003", "chunk-0002-of-0003", *per_layer,
                    "counterfactual-head_ablation", "sanity-attention-family",
                    *(f"sanity-{e}" for e in ("saliency", "occlusion", "random"))]
    assert list(result.failures) == ["chunk-0001-of-0003"]
    faith = result.metrics[result.metrics["metric"] == "deletion_auc"]
    assert sorted(faith["example_id"].unique()) == sorted(x.id for x in examples[:4] + examples[8:])


def test_texts_without_labels_or_rationales_are_audited(tiny_model):
    result = audit(tiny_model, ["the film was good", "a boring plot"], **FAST)
    assert "gold_auprc" not in set(result.metrics["metric"])
    assert all(x["label"] is None and x["gold"] is None for x in result.examples)


@pytest.mark.parametrize("changes, fragment", [
    ({"explainers": ("attention", "nope")}, "explainers must be drawn from"),
    ({"explainers": "attention"}, "explainers must be a list"),
    ({"analyses": ("faithfulness", "vibes")}, "analyses must be drawn from"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer"),
    ({"max_examples": -1}, "max_examples must be a positive integer or None"),
    ({"policy": "blur"}, "policy"),
    ({"explainer_params": {"lime": {"n_samples": 5}}, "explainers": ("attention",)}, "explainer_params has options for"),
    ({"colour": "red"}, "unknown audit setting 'colour'"),
    ({"n_adversaries": 0}, r"n_adversaries must be a positive integer; got 0"),
    ({"n_adversaries": 101}, r"n_adversaries=101 is above its limit of 100"),
    ({"adversarial_lr": 0}, r"adversarial_lr must be a finite number > 0 .*got 0"),
    ({"adversarial_lr": float("inf")}, r"adversarial_lr must be a finite number > 0 .*got inf"),
    ({"adversarial_lr": "1"}, r"adversarial_lr must be a finite number > 0 .*got '1'"),
    ({"adversarial_steps": 400, "n_adversaries": 30}, r"adversarial_steps × n_adversaries = 400 × 30 .*MAX_STEPS=10,000"),
])
def test_bad_settings_name_the_setting(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        AuditSettings().with_(**changes)


def test_duplicate_ids_are_refused(tiny_model):
    xs = [Example(id="same", text="good film"), Example(id="same", text="bad plot")]
    with pytest.raises(ValueError, match="example ids must be unique"):
        audit(tiny_model, xs, **FAST)


def test_settings_round_trip_to_plain_data():
    d = AuditSettings(explainers=("attention", "lime"), explainer_params={"lime": {"n_samples": 10}}).to_dict()
    assert d["explainers"] == ["attention", "lime"] and d["explainer_params"] == {"lime": {"n_samples": 10}}
    assert AuditSettings().with_(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}).to_dict() == d


@pytest.mark.slow
def test_write_report_from_an_audit(tiny_model, examples, tmp_path):
    result = audit(tiny_model, examples, **FAST)
    out = result.write_report(tmp_path / "rep", model_card={"architecture": {"n_layers": 2, "n_heads": 2}}, task="tiny")
    assert (out / "index.html").is_file() and (out / "metrics.csv.gz").is_file()
    back = pd.read_csv(out / "metrics.csv.gz", keep_default_na=False, na_values=[""])
    assert set(back["task"]) == {"tiny"} and len(back) == len(result.metrics)
    assert torch.get_num_threads() == 1


def test_a_context_mixing_explainer_the_model_does_not_take_is_left_out(tiny_model, examples):
    """AttnLRP is defined for encoders: an encoder's audit runs it; a decoder classifier's leaves it out and says
    why, while an explainer that fails for another reason still stops the audit."""
    from test_attention_zeroing import tiny_decoder_classifier

    settings = dict(FAST, explainers=("attention", "attnlrp", "alti", "random"), analyses=("faithfulness",))
    encoder = audit(tiny_model, examples, **settings)
    assert {"attnlrp", "alti"} <= set(encoder.metrics["explainer"]) and "left_out" not in encoder.settings
    decoder = audit(tiny_decoder_classifier(), [Example(id=x.id, text=x.text, label=x.label % 3) for x in examples],
                    **settings)
    assert "attnlrp" not in set(decoder.metrics["explainer"]) and "alti" in set(decoder.metrics["explainer"])
    assert list(decoder.settings["left_out"]) == ["attnlrp"] and "attnlrp supports" in decoder.settings["left_out"]["attnlrp"]
    assert AuditSettings().explainers[-4:] == ("alti", "globenc", "value_zeroing", "attnlrp")   # in the default


def test_the_audits_adversarial_search_is_the_audit_preset_and_reaches_the_table(tiny_model, monkeypatch):
    import importlib

    from attnaudit.analyses.counterfactual import ADVERSARY_PRESETS
    audit_module = importlib.import_module("attnaudit.analyses.audit")
    d = AuditSettings()
    preset = ADVERSARY_PRESETS["audit"]
    assert (d.n_adversaries, d.adversarial_steps, d.adversarial_lr) == (preset["n_adversaries"], preset["n_steps"],
                                                                          preset["lr"])
    seen = []
    real = audit_module.counterfactual_table

    def spy(model, batch, **options):
        seen.append(options)
        return real(model, batch, **options)

    monkeypatch.setattr(audit_module, "counterfactual_table", spy)
    result = audit(tiny_model, ["the film was good", "a boring plot"], explainers=("attention",),
                   analyses=("counterfactual",), counterfactual_tests=("adversarial",), adversarial_steps=4,
                   n_adversaries=2, adversarial_lr=0.5)
    assert seen and all(o["adversary"]["n_adversaries"] == 2 and o["adversarial_lr"] == 0.5
                        and o["adversarial_steps"] == 4 for o in seen)
    frame = result.counterfactual["adversarial"]
    assert frame.adversary.between(0, 1).all() and frame.n_feasible.between(0, 2).all()
