"""The capture keeps only what an explainer reads, and its scores are the full capture's, bit for bit.

The full capture (`capture(..., reads=None)`) keeps every layer's pattern, gradient and value vectors, and each
explainer's `from_capture` then runs the code it always ran on those stacks; `explain` captures only what
`reads` names (raw patterns of the layers read, folds reduced as the forward or backward passes). Both must
give the same bits (`torch.equal`) on a padded batch, for every attention explainer and a few settings of
each; `capture_precision` keeps what is captured in float16 / bfloat16 within a stated error.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from attnaudit.explain import get_explainer
from attnaudit.explain.capture import capture, capture_precision, shared_reads
from attnaudit.model.hooks import hooks
from attnaudit.model.interventions import replace

SETTINGS = [
    ("attention", {}), ("attention", {"layer": 0, "head": 1, "readout": "mean"}),
    ("attention", {"layer": "mean", "head": "max", "readout": "max"}),
    ("rollout", {}), ("rollout", {"head_fusion": "max", "start_layer": 1, "readout": "mean"}),
    ("rollout", {"head_fusion": "min", "add_residual": False}),
    ("flow", {}), ("flow", {"readout": "mean", "add_residual": False}),
    ("grad_attention", {}),
    ("attention_x_grad", {}), ("attention_x_grad", {"layer": 0}), ("attention_x_grad", {"layer": "mean"}),
    ("attention_norm", {}), ("attention_norm", {"layer": "mean", "head": "mean"}),
    ("attention_norm", {"layer": 1, "head": 2, "readout": "max"}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'defaults'}" for name, params in SETTINGS]
TEXTS = ["the film was good", "a boring plot", "the story was not bad and the actor was great with a plot", "good"]
TARGET = torch.tensor([0, 1, 1, 0])


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(3, n_layers=3, n_heads=4, d_model=32)        # 3 layers, 4 heads


@pytest.fixture(scope="module")
def batch(model):
    return model.encode(TEXTS)                                            # rows 0, 1 and 3 padded


def scores_of(out):
    return out[0] if isinstance(out, tuple) else out


def both(explainer, model, batch):
    """(scores from the full capture, scores from the capture `reads` names, that capture)."""
    explainer.validate(model)
    with model.evaluating():
        full = capture(model, batch, TARGET, grads=explainer.needs_grads)
        cap = capture(model, batch, TARGET, reads=explainer.reads(model))
        return scores_of(explainer.from_capture(full, batch, TARGET)), scores_of(explainer.from_capture(cap, batch, TARGET)), cap


@pytest.mark.parametrize("name,params", SETTINGS, ids=IDS)
def test_reads_give_the_full_captures_bits(model, batch, name, params):
    full, narrow, _ = both(get_explainer(name, **params), model, batch)
    assert torch.equal(full, narrow)
    assert torch.equal(scores_of(get_explainer(name, **params).scores(model, batch, TARGET)), full)


def test_one_shared_capture_of_every_reads_gives_each_explainers_bits(model, batch):
    explainers = [get_explainer(name, **params) for name, params in SETTINGS]
    with model.evaluating():
        shared = capture(model, batch, TARGET, reads=shared_reads(model, explainers))
        for e in explainers:
            full = capture(model, batch, TARGET, grads=e.needs_grads)
            assert torch.equal(scores_of(e.from_capture(shared, batch, TARGET)), scores_of(e.from_capture(full, batch, TARGET)))
    assert len(shared.folds) == len({f.key for e in explainers for f in e.reads(model).folds})   # one fold per key


def test_a_reads_serves_two_captures(model, batch):
    e = get_explainer("rollout", head_fusion="max")
    reads = shared_reads(model, [e, get_explainer("flow"), get_explainer("grad_attention")])
    with model.evaluating():
        first = e.from_capture(capture(model, batch, TARGET, reads=reads), batch, TARGET)
        again = e.from_capture(capture(model, batch, TARGET, reads=reads), batch, TARGET)   # folds start afresh
    assert torch.equal(first, again)


@pytest.mark.parametrize("name", ["grad_attention", "attention_x_grad", "rollout"])
def test_reads_give_the_same_bits_when_an_edit_made_a_site_constant(model, batch, name):
    n = batch.input_ids.shape[1]
    known = torch.rand(1, model.n_heads, n, n, generator=torch.Generator().manual_seed(0)).softmax(-1)
    with hooks(model, {model.attention_sites[1]: replace(known)}):      # layer 1 becomes a leaf of the graph
        full, narrow, _ = both(get_explainer(name, **({"layer": "mean"} if name == "attention_x_grad" else {})),
                               model, batch)
    assert torch.equal(full, narrow)


def tensor_bytes(cap) -> int:
    kept = [*cap.layer_patterns.values(), *cap.layer_grads.values(), *cap.layer_values.values()]
    for result in cap.folds.values():
        kept += result if isinstance(result, list) else [result]
    return sum(t.numel() * t.element_size() for t in kept)


def test_the_capture_keeps_only_what_the_explainer_reads(model, batch):
    b, seq = batch.input_ids.shape
    n_layers, n_heads = 3, 4
    one = b * n_heads * seq * seq * 4                                     # one layer's float32 pattern, bytes
    with model.evaluating():
        full = capture(model, batch, TARGET, grads=True)
    d_head = full.layer_values[0].shape[-1]
    assert tensor_bytes(full) == n_layers * (2 * one + b * n_heads * seq * d_head * 4)   # patterns, grads, values
    kept = {}
    for name in ["attention", "rollout", "flow", "grad_attention", "attention_x_grad", "attention_norm"]:
        _, _, cap = both(get_explainer(name), model, batch)
        kept[name] = (sorted(cap.layer_patterns), sorted(cap.layer_grads), sorted(cap.layer_values), tensor_bytes(cap))
    square = b * seq * seq * 4                                            # one [batch, query, key] float32
    assert kept == {
        "attention": ([2], [], [], one),                                  # the last layer only
        "rollout": ([], [], [], square),                                  # the product R, folded as layers pass
        "flow": ([], [], [], n_layers * 2 * square),                      # Â per layer, float64
        "grad_attention": ([], [], [], n_layers * square),                # Ā per layer, reduced in the backward
        "attention_x_grad": ([], [], [], square),                         # A ⊙ ∇A of the last layer, heads averaged
        "attention_norm": ([], [], [], square),                           # ‖α f(x)‖ of the last layer
    }


@pytest.mark.parametrize("capture_dtype,bound", [("float16", 1e-3), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("name,params", [s for s in SETTINGS if s[0] != "flow"] + [("flow", {})],
                         ids=[i for s, i in zip(SETTINGS, IDS) if s[0] != "flow"] + ["flow-defaults"])
def test_half_precision_capture_stays_within_its_bound(model, batch, name, params, capture_dtype, bound):
    exact = get_explainer(name, **params).explain(model, batch, target=TARGET).scores
    with capture_precision(capture_dtype):
        e = get_explainer(name, **params)
        low = e.explain(model, batch, target=TARGET).scores
        full, narrow, cap = both(e, model, batch)
    assert cap.capture_dtype == capture_dtype
    assert torch.equal(full, narrow)                                      # the same rounding on both paths
    assert (low - exact).abs().max() <= bound


def test_half_precision_capture_holds_half_the_bytes(model, batch):
    with model.evaluating(), capture_precision("float16"):
        half = capture(model, batch, TARGET, grads=True)
    with model.evaluating():
        full = capture(model, batch, TARGET, grads=True)
    assert half.layer_patterns[0].dtype == half.layer_grads[0].dtype == torch.float16
    assert half.patterns.dtype == torch.float32                          # read back in the model's dtype
    assert 2 * sum(t.numel() * t.element_size() for t in half.layer_patterns.values()) == \
        sum(t.numel() * t.element_size() for t in full.layer_patterns.values())


@pytest.mark.parametrize("bad", ["half", "float64", 16, torch.float16])
def test_capture_dtype_names_the_parameter_the_rule_and_the_value(model, batch, bad):
    with pytest.raises(ValueError, match=r"capture_dtype must be one of None, 'float32', 'float16', 'bfloat16'; got "):
        with capture_precision(bad):
            pass
    with pytest.raises(ValueError, match="capture_dtype must be one of"):
        capture(model, batch, TARGET, capture_dtype=bad)
