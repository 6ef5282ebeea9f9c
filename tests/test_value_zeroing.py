"""Value zeroing (Mohebbi et al. 2023) against the reference code's steps, written out here in plain torch.

The reference (github.com/hmohebbi/ValueZeroing, scoring/value_zeroing.py): for each layer l and token t, run
layer l alone on the ORIGINAL hidden states of layer l - 1 with t's value vectors zeroed, score_matrix[l, :, t] =
cosine distances to the original layer-l outputs, rows divided by their sums (diagonal kept), rollout with
res=False; the [CLS] row of the last layer's rollout is the explanation.
"""
from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from attnaudit.explain import Explainer
from attnaudit.explain.value_zeroing import (
    ValueZeroing,
    layer_modules,
    layer_outputs,
    normalize_rows,
    value_zeroing_matrices,
    zero_values_of,
)
from attnaudit.model.hooks import active_hook_count, hooks
from attnaudit.model.lm import DecoderClassifier
from attnaudit.model.transformer import DecoderLMConfig, TransformerDecoderLM

TEXTS = ["the film was good", "a boring plot", "the story was not bad and the actor was great", "good"]


# -- a hand-written forward of the built-in layers, from their weights -------------------------------------
def builtin_layer(layer, x: torch.Tensor, zero: int | None = None) -> torch.Tensor:
    """One post-LN EncoderLayer on x [n, d] (one example, no padding); token `zero`'s values zeroed."""
    att = layer.self_attn
    n, d = x.shape
    h, dh = att.n_heads, att.d_head
    q = F.linear(x, att.w_q.weight, att.w_q.bias).view(n, h, dh).transpose(0, 1)     # [head, n, dh]
    k = F.linear(x, att.w_k.weight, att.w_k.bias).view(n, h, dh).transpose(0, 1)
    v = F.linear(x, att.w_v.weight, att.w_v.bias).view(n, h, dh).transpose(0, 1).clone()
    if zero is not None:
        v[:, zero] = 0.0
    a = (q @ k.transpose(1, 2) / math.sqrt(dh)).softmax(-1)
    ctx = (a @ v).transpose(0, 1).reshape(n, d)
    ln1, ln2 = layer.attn_block.norm, layer.ff_block.norm
    y = F.layer_norm(x + F.linear(ctx, att.w_o.weight, att.w_o.bias), (d,), ln1.weight, ln1.bias, ln1.eps)
    lin1, lin2 = layer.ff.net[0], layer.ff.net[3]
    ff = F.linear(F.relu(F.linear(y, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    return F.layer_norm(y + ff, (d,), ln2.weight, ln2.bias, ln2.eps)


def reference_value_zeroing(layers, hidden0: torch.Tensor, run_layer) -> torch.Tensor:
    """The reference's loops on one example: -> (score_matrix [layer, n, n] normalised, rollout [layer, n, n])."""
    hidden = [hidden0]
    for layer in layers:
        hidden.append(run_layer(layer, hidden[-1]))
    n = hidden0.shape[0]
    score = torch.zeros(len(layers), n, n, dtype=torch.float64)
    for l, layer in enumerate(layers):
        for t in range(n):
            edited = run_layer(layer, hidden[l], zero=t)
            x, y = edited.double(), hidden[l + 1].double()
            cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))            # sklearn cosine_distances' diagonal
            score[l, :, t] = 1 - cos
    score = score / score.sum(-1, keepdim=True)
    joint = torch.zeros_like(score)
    joint[0] = score[0]
    for i in range(1, len(layers)):
        joint[i] = score[i] @ joint[i - 1]
    return score, joint


def builtin_hidden0(model, ids: torch.Tensor) -> torch.Tensor:
    enc = model.net.encoder
    return enc.pos(enc.embed(ids[None]))[0]                                       # dropout is off in eval


@pytest.fixture
def model():
    return make_tiny_model()


# -- known answers ---------------------------------------------------------------------------------------
def test_matches_the_reference_computation(model):
    batch = model.encode(TEXTS)
    got_rollout = ValueZeroing().explain(model, batch).scores
    got_last = ValueZeroing(aggregation="last").explain(model, batch).scores
    matrices = value_zeroing_matrices(model, batch)
    layers = list(model.net.encoder.layers)
    for e, n in enumerate(batch.attention_mask.sum(1).tolist()):
        ids = batch.input_ids[e, :n]
        with torch.no_grad():
            score, joint = reference_value_zeroing(layers, builtin_hidden0(model, ids), builtin_layer)
        torch.testing.assert_close(matrices[:, e, :n, :n].double(), score, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got_rollout[e, :n].double(), joint[-1, 0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got_last[e, :n].double(), score[-1, 0], atol=2e-5, rtol=1e-4)
        assert (got_rollout[e, n:] == 0).all()


def test_the_edit_equals_a_hand_written_forward_with_the_values_zeroed(model):
    batch = model.encode(TEXTS[:1])
    n = int(batch.attention_mask.sum())
    ids, mask = batch.input_ids.repeat(n, 1), batch.attention_mask.repeat(n, 1)   # copy j: token j zeroed
    modules = layer_modules(model)
    with torch.no_grad():
        hidden = builtin_hidden0(model, batch.input_ids[0])
        for layer in range(model.n_layers):
            with hooks(model, {f"encoder.layers.{layer}.self_attn.values": zero_values_of(torch.arange(n))}):
                got = layer_outputs(model, ids, mask, modules, upto=layer)[layer]      # [n, seq, d]
            for j in range(n):
                want = builtin_layer(model.net.encoder.layers[layer], hidden, zero=j)
                torch.testing.assert_close(got[j], want, atol=1e-5, rtol=1e-5)
            hidden = builtin_layer(model.net.encoder.layers[layer], hidden)
    assert active_hook_count(model.net) == 0                                      # hooks only inside `with`


def test_rows_sum_to_one_and_padding_is_zero(model):
    batch = model.encode(TEXTS)
    m = value_zeroing_matrices(model, batch, max_batch=5)                         # chunks of 5 tiled rows
    mask = batch.attention_mask
    sums = m.sum(-1)                                                              # [layer, batch, query]
    torch.testing.assert_close(sums[:, mask], torch.ones_like(sums[:, mask]))
    assert (m[:, ~mask] == 0).all() and (m.transpose(-1, -2)[:, ~mask] == 0).all()
    assert (m >= 0).all()
    torch.testing.assert_close(m, value_zeroing_matrices(model, batch, max_batch=256))


def test_single_token_input_is_the_documented_degenerate_result(model):
    batch = model.encode(["good"])
    one = replace(batch, input_ids=batch.input_ids[:, :1], attention_mask=batch.attention_mask[:, :1],
                  special_mask=batch.special_mask[:, :1], tokens=[batch.tokens[0][:1]], rationale=None)
    m = value_zeroing_matrices(model, one)
    assert torch.equal(m, torch.ones(model.n_layers, 1, 1, 1))                    # [[1]] in every layer
    assert ValueZeroing().explain(model, one).scores.tolist() == [[1.0]]
    # an all-zero row (no zeroing moves the token: e.g. all-zero values) -> the identity row, not 0/0
    mask = torch.tensor([[True, True, False]])
    rows = normalize_rows(torch.tensor([[[0.0, 0.0, 0.0], [1.0, 3.0, 0.0], [5.0, 5.0, 5.0]]]), mask)
    torch.testing.assert_close(rows, torch.tensor([[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 0.0]]]))


# -- the explainer contract ------------------------------------------------------------------------------
def test_shapes_padding_and_params(model):
    batch = model.encode(TEXTS)
    explainer = ValueZeroing(max_batch=7)
    attr = explainer.explain(model, batch)
    assert attr.scores.shape == batch.input_ids.shape
    assert attr.method == "value_zeroing" and explainer.family == "attention"
    assert isinstance(explainer, Explainer)
    assert type(explainer)(**explainer.get_params()).get_params() == explainer.get_params()
    for i in range(len(TEXTS)):                                                   # alone == in the padded batch
        alone = ValueZeroing().explain(model, batch.select([i])).scores[0]
        n = alone.shape[0]
        torch.testing.assert_close(attr.scores[i, :n], alone, atol=1e-5, rtol=1e-4)
        assert (attr.scores[i, n:] == 0).all()
    torch.testing.assert_close(attr.scores.sum(1), torch.ones(len(TEXTS)))       # rollout rows stay distributions


def test_pre_ln_model_runs(model):
    pre = make_tiny_model(norm="pre")
    attr = ValueZeroing().explain(pre, TEXTS)
    torch.testing.assert_close(attr.scores.sum(1), torch.ones(len(TEXTS)))


@pytest.mark.parametrize("params, match", [
    ({"aggregation": "mean"}, "aggregation must be one of 'rollout', 'last'; got 'mean'"),
    ({"readout": "first"}, "readout must be one of"),
    ({"max_batch": 0}, "max_batch must be an int in"),
    ({"max_batch": True}, "max_batch must be an int in"),
    ({"max_cost": 0}, "max_cost must be an int >= 1"),
])
def test_validate_errors(model, params, match):
    with pytest.raises(ValueError, match=match):
        ValueZeroing(**params).explain(model, TEXTS[:1])


def test_cost_limit_and_unsupported_models(model):
    with pytest.raises(ValueError, match=r"value_zeroing: tokens=6 would need 1\.3e\+01 forward passes.*max_cost"):
        ValueZeroing(max_cost=12).explain(model, TEXTS[:1])                       # 1 + 2 layers × 6 tokens = 13
    assert ValueZeroing(max_cost=13).explain(model, TEXTS[:1]).scores.shape == (1, 6)
    gpt2 = SimpleNamespace(hf_config=SimpleNamespace(model_type="gpt2"), net=None)   # a layout not read here
    with pytest.raises(ValueError, match=r"value_zeroing supports the built-in models .*\(bert, roberta, electra, "
                                         r"distilbert, albert\); got a HuggingFace 'gpt2' model"):
        ValueZeroing().validate(gpt2)


def decoder_classifier(vocab):
    torch.manual_seed(0)
    cfg = DecoderLMConfig(vocab_size=len(vocab), head="classifier", n_classes=2, d_model=16, n_heads=2,
                          n_layers=2, d_ff=32, max_len=32)
    return DecoderClassifier(TransformerDecoderLM(cfg).eval(), vocab, label_names=["a", "b"])


def test_builtin_decoder_reads_the_last_real_token(model):
    decoder = decoder_classifier(model.vocab)
    batch = decoder.encode(TEXTS)
    attr = ValueZeroing().explain(decoder, batch)
    m = value_zeroing_matrices(decoder, batch)
    joint = m[1] @ m[0]
    last = batch.attention_mask.sum(1) - 1
    torch.testing.assert_close(attr.scores, joint[torch.arange(len(TEXTS)), last], atol=1e-6, rtol=1e-5)
    upper = torch.ones(m.shape[-1], m.shape[-1], dtype=torch.bool).triu(1)        # causal: no mixing from the future
    assert (m[:, :, upper] == 0).all()
    for i in range(len(TEXTS)):
        alone = ValueZeroing().explain(decoder, batch.select([i])).scores[0]
        torch.testing.assert_close(attr.scores[i, :alone.shape[0]], alone, atol=1e-5, rtol=1e-4)


# -- HuggingFace BERT --------------------------------------------------------------------------------------
def bert_layer(layer, x: torch.Tensor, zero: int | None = None) -> torch.Tensor:
    """One HF BertLayer on x [n, d] from its weights (the reference's customised BertSelfAttention)."""
    att, so, io, oo = layer.attention.self, layer.attention.output, layer.intermediate, layer.output
    n, d = x.shape
    h = att.num_attention_heads
    dh = d // h
    q = att.query(x).view(n, h, dh).transpose(0, 1)
    k = att.key(x).view(n, h, dh).transpose(0, 1)
    v = att.value(x).view(n, h, dh).transpose(0, 1).clone()
    if zero is not None:
        v[:, zero] = 0.0                                                          # value_layer[:, :, t] = 0
    ctx = ((q @ k.transpose(1, 2) / math.sqrt(dh)).softmax(-1) @ v).transpose(0, 1).reshape(n, d)
    a = so.LayerNorm(so.dense(ctx) + x)
    return oo.LayerNorm(oo.dense(F.gelu(io.dense(a))) + a)


@pytest.mark.slow
def test_hf_bert_matches_the_reference_computation():
    test_hf = pytest.importorskip("test_hf")
    from attnaudit.model.hf import HFClassifier

    tok = test_hf.wordpiece_tokenizer()
    hf = HFClassifier(test_hf.tiny_net("bert", len(tok)).eval(), tok)
    batch = hf.encode(TEXTS[:2])
    got = ValueZeroing().explain(hf, batch).scores
    layers = list(hf.net.bert.encoder.layer)
    for e, n in enumerate(batch.attention_mask.sum(1).tolist()):
        ids = batch.input_ids[e:e + 1, :n]
        with torch.no_grad():
            hidden0 = hf.net.bert.embeddings(input_ids=ids)[0]
            _, joint = reference_value_zeroing(layers, hidden0, bert_layer)
        torch.testing.assert_close(got[e, :n].double(), joint[-1, 0], atol=2e-5, rtol=1e-4)
        assert (got[e, n:] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["distilbert", "albert", "roberta", "electra"])
def test_other_hf_encoders_run_and_padding_is_independent(arch):
    test_hf = pytest.importorskip("test_hf")
    model = test_hf.tiny_classifier(arch)
    assert len(layer_modules(model)) == model.n_layers
    batch = model.encode(TEXTS[:2])
    m = value_zeroing_matrices(model, batch, max_batch=4)
    mask = batch.attention_mask
    torch.testing.assert_close(m.sum(-1)[:, mask], torch.ones_like(m.sum(-1)[:, mask]))
    attr = ValueZeroing().explain(model, batch)
    alone = ValueZeroing().explain(model, batch.select([1])).scores[0]
    torch.testing.assert_close(attr.scores[1, :alone.shape[0]], alone, atol=1e-5, rtol=1e-4)
