"""`precision("bfloat16")`: the engine's and the explainers' forwards under bf16 autocast, opt-in, float32 out.

Tolerances. bf16 keeps 8 significant bits, so each rounded operand is off by at most 2⁻⁹ ≈ 2e-3 of itself; the
tiny models below chain ~10 such products per logit, and the errors partly cancel. Probabilities (in [0, 1])
are compared with atol 2e-2, ten times 2⁻⁹ (measured on the tiny model: at most 3.2e-3). Token scores have no
fixed scale, so they are compared with 5 % of the largest |score| of the batch: occlusion's scores are
differences of two such probabilities, small beside their errors (measured: at most 2.0 %, gradient_shap and
occlusion; attention, rollout and flow at most 0.6 %).
"""
from __future__ import annotations

import pytest
import torch

from attnaudit.explain.perturb import PerturbationEngine, deletion_path
from attnaudit.explain.registry import get_explainer, list_explainers
from attnaudit.explain.run import explain_all
from attnaudit.model import precision as precision_module
from attnaudit.model.hooks import record
from attnaudit.model.precision import attention_softmax, current_precision, precision

pytestmark = [pytest.mark.usefixtures("one_thread_module"),
              pytest.mark.skipif(not precision_module.bf16_supported(torch.device("cpu")),
                                 reason="this CPU has no bf16 autocast support (oneDNN)")]

PROB_ATOL = 2e-2
SCORE_RTOL = 5e-2
FAST = {"integrated_gradients": {"n_steps": 8}, "gradient_shap": {"n_samples": 4},
        "lime": {"n_samples": 32}, "kernel_shap": {"n_samples": 32}}


def deletion_probs(model, batch, attribution):
    keep, valid = deletion_path(attribution)
    engine = PerturbationEngine(model, batch)
    return engine, engine.probs(keep, attribution.target, valid=valid)            # [batch, step]


def test_engine_probabilities_in_bf16_are_close_and_float32(tiny_model, tiny_batch):
    attr = get_explainer("saliency").explain(tiny_model, tiny_batch)
    _, want = deletion_probs(tiny_model, tiny_batch, attr)
    with precision("bfloat16"):
        engine, got = deletion_probs(tiny_model, tiny_batch, attr)
        distributions = engine.class_probs(tiny_batch.attention_mask)             # [batch, n_classes]
    assert got.dtype == distributions.dtype == torch.float32
    torch.testing.assert_close(distributions.sum(-1), torch.ones(len(tiny_batch)), atol=1e-6, rtol=0)
    assert not torch.equal(got.nan_to_num(), want.nan_to_num())                  # bf16 really ran
    torch.testing.assert_close(got, want, atol=PROB_ATOL, rtol=0, equal_nan=True)


@pytest.mark.parametrize("name", list_explainers())
def test_every_explainer_in_bf16_is_close_and_float32(name, tiny_model, tiny_batch):
    explainer = get_explainer(name, **FAST.get(name, {}))
    want = explainer.explain(tiny_model, tiny_batch)
    with precision("bfloat16"):
        got = explainer.explain(tiny_model, tiny_batch, target=want.target)       # the same class explained
    assert got.scores.dtype == got.target_prob.dtype == torch.float32
    assert (got.scores[~tiny_batch.attention_mask] == 0).all()
    scale = float(want.scores.abs().max())
    torch.testing.assert_close(got.scores, want.scores, atol=SCORE_RTOL * scale, rtol=0)
    torch.testing.assert_close(got.target_prob, want.target_prob, atol=PROB_ATOL, rtol=0)


def test_shared_capture_in_bf16_matches_each_explain(tiny_model, tiny_batch):
    names = ["attention", "rollout", "attention_norm", "grad_attention"]
    with precision("bfloat16"):
        shared = explain_all(tiny_model, tiny_batch, names)
        alone = {n: get_explainer(n).explain(tiny_model, tiny_batch) for n in names}
    for n in names:
        assert shared[n].scores.dtype == torch.float32
        torch.testing.assert_close(shared[n].scores, alone[n].scores, atol=1e-6, rtol=0)


def test_the_hook_sites_see_a_float32_softmax_under_bf16(tiny_model, tiny_batch):
    with precision("bfloat16"), precision_module.forward_autocast("cpu"):
        logits, cache = record(tiny_model, tiny_batch, names=["*pattern"])
    patterns = cache.stack("*pattern")                                            # [layer, batch, head, query, key]
    assert logits.dtype == torch.bfloat16 and patterns.dtype == torch.float32     # the matmuls ran in bf16
    rows = tiny_batch.attention_mask[None, :, None, :]                            # real query rows sum to 1
    torch.testing.assert_close(patterns.sum(-1)[rows.expand(patterns.shape[:-1])],
                               torch.ones(int(rows.expand(patterns.shape[:-1]).sum())), atol=1e-6, rtol=0)
    scores = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_softmax(scores).dtype == torch.float32
    x = torch.randn(2, 3, 5)
    assert torch.equal(attention_softmax(x), x.softmax(-1))                      # outside autocast: the same op


def test_float32_default_is_bit_identical(tiny_model, tiny_batch):
    names = ["attention", "rollout", "saliency", "integrated_gradients", "occlusion"]
    plain = {n: get_explainer(n, **FAST.get(n, {})).explain(tiny_model, tiny_batch) for n in names}
    with precision("float32"):
        blocked = {n: get_explainer(n, **FAST.get(n, {})).explain(tiny_model, tiny_batch) for n in names}
    for n in names:
        assert torch.equal(plain[n].scores, blocked[n].scores), n
    _, want = deletion_probs(tiny_model, tiny_batch, plain["saliency"])
    with precision("float32"):
        _, got = deletion_probs(tiny_model, tiny_batch, plain["saliency"])
    assert torch.equal(want.nan_to_num(-1.0), got.nan_to_num(-1.0))
    with torch.no_grad():                                                          # and the plain forward
        reference = tiny_model.net(tiny_batch.input_ids, tiny_batch.attention_mask).float().softmax(-1)
    full = PerturbationEngine(tiny_model, tiny_batch).class_probs(tiny_batch.attention_mask)
    assert torch.equal(full, reference)


def test_an_engine_never_mixes_its_float32_and_bf16_rows(tiny_model, tiny_batch):
    engine = PerturbationEngine(tiny_model, tiny_batch)
    fp32 = engine.class_probs(tiny_batch.attention_mask)
    with precision("bfloat16"):
        bf16 = engine.class_probs(tiny_batch.attention_mask)
    assert engine.stats.forwards == 2 * len(tiny_batch) and not torch.equal(fp32, bf16)
    assert torch.equal(engine.class_probs(tiny_batch.attention_mask), fp32)       # the float32 rows come back


def test_the_block_restores_the_setting_also_after_an_exception(tiny_model, tiny_batch):
    assert current_precision() is None
    with precision("bfloat16"):
        assert current_precision() == "bfloat16"
        with precision("float32"):
            assert current_precision() == "float32"
        assert current_precision() == "bfloat16"
    assert current_precision() is None
    with pytest.raises(ZeroDivisionError):
        with precision("bfloat16"):
            get_explainer("saliency").explain(tiny_model, tiny_batch)
            raise ZeroDivisionError("raised inside the block")
    assert current_precision() is None and not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="target must be"):                      # raised inside the autocast
        with precision("bfloat16"):
            get_explainer("saliency").explain(tiny_model, tiny_batch, target=9)
    assert current_precision() is None and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("bad", ["float16", "bf16", None, torch.bfloat16, 16])
def test_bad_precision_names_the_choices(bad):
    with pytest.raises(ValueError, match=r"precision must be one of 'float32', 'bfloat16'; got "):
        with precision(bad):
            pass
    assert current_precision() is None


def test_a_device_without_bf16_is_refused_at_the_first_forward(tiny_model, tiny_batch, monkeypatch):
    monkeypatch.setattr(precision_module, "bf16_supported", lambda device: False)
    with precision("bfloat16"):
        with pytest.raises(RuntimeError, match=r"precision\('bfloat16'\) needs a device .* on cpu and oneDNN"):
            get_explainer("attention").explain(tiny_model, tiny_batch)
        with pytest.raises(RuntimeError, match="leave the precision block out"):
            PerturbationEngine(tiny_model, tiny_batch).class_probs(tiny_batch.attention_mask)
    get_explainer("attention").explain(tiny_model, tiny_batch)                   # float32 needs nothing


def test_huggingface_adapter_in_bf16():
    transformers = pytest.importorskip("transformers", reason="the HF adapter needs 'attnaudit[hf]'")
    from attnaudit.model.hf import HFClassifier

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] the a film plot was not good great bad story".split()
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    cfg = transformers.BertConfig(vocab_size=len(words), num_labels=2, initializer_range=0.3, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    model = HFClassifier(transformers.AutoModelForSequenceClassification.from_config(cfg).eval(), tokenizer)
    batch = model.encode(["the film was good", "a bad plot", "the story was not great"])
    for name in ("attention", "rollout", "saliency"):
        want = get_explainer(name).explain(model, batch)
        with precision("bfloat16"):
            got = get_explainer(name).explain(model, batch, target=want.target)
        assert got.scores.dtype == torch.float32
        torch.testing.assert_close(got.scores, want.scores, atol=SCORE_RTOL * float(want.scores.abs().max()), rtol=0)
    attr = get_explainer("saliency").explain(model, batch)
    _, want = deletion_probs(model, batch, attr)
    with precision("bfloat16"):
        _, got = deletion_probs(model, batch, attr)
    torch.testing.assert_close(got, want, atol=PROB_ATOL, rtol=0, equal_nan=True)
    with precision("bfloat16"), precision_module.forward_autocast("cpu"):
        _, cache = record(model, batch, names=["*pattern"])
    assert cache.stack("*pattern").dtype == torch.float32


def test_an_audit_inside_the_block_runs_in_bf16(tiny_model, tiny_examples):
    from attnaudit.analyses.audit import audit

    settings = dict(explainers=("attention", "saliency", "random"), analyses=("faithfulness",), chunk_size=2,
                    max_examples=4, progress=False)
    want = audit(tiny_model, tiny_examples, **settings)
    with precision("bfloat16"):
        got = audit(tiny_model, tiny_examples, **settings)
    keys = ["example_id", "explainer", "metric", "setting"]
    probabilities = ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc")   # not τ or the flip
    w, g = (r.metrics[r.metrics.metric.isin(probabilities)].set_index(keys)["value"].astype(float).sort_index()
            for r in (want, got))
    assert g.index.equals(w.index) and len(g) > 0 and not g.equals(w)
    torch.testing.assert_close(torch.tensor(g.values), torch.tensor(w.values), atol=PROB_ATOL, rtol=0, equal_nan=True)
