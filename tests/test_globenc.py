"""GlobEnc (Modarressi et al. 2022) against the reference code's steps, written out here in plain torch.

The reference (github.com/mohsenfayyaz/GlobEnc, src/modeling/modeling_bert.py): `BertNormOutput.forward` builds
transformed = einsum('bhsv,dhv->bhsd', value_layer, W^O by head), weighted = α ⊗ transformed summed over heads,
+ eye ⊗ hidden_states (the residual), then LN1 linearly: (v - mean(v)) / sqrt(Var(pre_ln_states) + eps) * γ1;
`BertLayer.forward` repeats the LayerNorm step with pre_ln2_states and LN2 (the FFN left out); the norms of the
vectors are the layer's matrix (N-Enc), multiplied up the layers (`output_globenc`).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from attnaudit.explain.globenc import GlobEnc, capture_layers, decompose, globenc_matrices, layer_parts

TEXTS = ["the film was good", "a boring plot", "the story was not bad and the actor was great", "good"]


# -- hand-written forwards, from the weights: every intermediate the reference reads ---------------------
def builtin_parts(layer, x: torch.Tensor) -> dict:
    """One EncoderLayer (post- or pre-LN) on x [n, d]: α, values, W^O by head, LN inputs, outputs."""
    att = layer.self_attn
    n, d = x.shape
    h, dh = att.n_heads, att.d_head
    pre = layer.attn_block.pre
    ln1, ln2 = layer.attn_block.norm, layer.ff_block.norm
    src = F.layer_norm(x, (d,), ln1.weight, ln1.bias, ln1.eps) if pre else x
    q = F.linear(src, att.w_q.weight, att.w_q.bias).view(n, h, dh).transpose(0, 1)
    k = F.linear(src, att.w_k.weight, att.w_k.bias).view(n, h, dh).transpose(0, 1)
    v = F.linear(src, att.w_v.weight, att.w_v.bias).view(n, h, dh).transpose(0, 1)
    probs = (q @ k.transpose(1, 2) / math.sqrt(dh)).softmax(-1)
    attn = F.linear((probs @ v).transpose(0, 1).reshape(n, d), att.w_o.weight, att.w_o.bias)
    lin1, lin2 = layer.ff.net[0], layer.ff.net[3]

    def ffn(t):
        return F.linear(F.relu(F.linear(t, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)

    if pre:
        a = x + attn
        return dict(probs=probs, value=v, dense=att.w_o.weight, b_o=att.w_o.bias, pre_ln=None, a=a,
                    pre_ln2=None, out=a + ffn(F.layer_norm(a, (d,), ln2.weight, ln2.bias, ln2.eps)), ln1=None, ln2=None)
    pre_ln = x + attn
    a = F.layer_norm(pre_ln, (d,), ln1.weight, ln1.bias, ln1.eps)
    pre_ln2 = a + ffn(a)
    out = F.layer_norm(pre_ln2, (d,), ln2.weight, ln2.bias, ln2.eps)
    return dict(probs=probs, value=v, dense=att.w_o.weight, b_o=att.w_o.bias, pre_ln=pre_ln, a=a, pre_ln2=pre_ln2,
                out=out, ln1=ln1, ln2=ln2, ffn=ffn(a))


def bert_parts(layer, x: torch.Tensor) -> dict:
    """One HF BertLayer on x [n, d] from its weights."""
    att, so, io, oo = layer.attention.self, layer.attention.output, layer.intermediate, layer.output
    n, d = x.shape
    h = att.num_attention_heads
    dh = d // h
    q = att.query(x).view(n, h, dh).transpose(0, 1)
    k = att.key(x).view(n, h, dh).transpose(0, 1)
    v = att.value(x).view(n, h, dh).transpose(0, 1)
    probs = (q @ k.transpose(1, 2) / math.sqrt(dh)).softmax(-1)
    pre_ln = so.dense((probs @ v).transpose(0, 1).reshape(n, d)) + x
    a = so.LayerNorm(pre_ln)
    pre_ln2 = oo.dense(F.gelu(io.dense(a))) + a
    return dict(probs=probs, value=v, dense=so.dense.weight, b_o=so.dense.bias, pre_ln=pre_ln, a=a, pre_ln2=pre_ln2,
                out=oo.LayerNorm(pre_ln2), ln1=so.LayerNorm, ln2=oo.LayerNorm)


def reference_layer_norms(x: torch.Tensor, p: dict, block: str) -> torch.Tensor:
    """The reference's BertNormOutput (+ BertLayer's LN2 step) on one example -> the norms [n, n]."""
    n, d = x.shape
    h = p["probs"].shape[0]
    dense = p["dense"].view(d, h, d // h)
    transformed = torch.einsum("hsv,dhv->hsd", p["value"], dense)
    summed = torch.einsum("hks,hsd->hksd", p["probs"], transformed).sum(0)
    layer = summed + torch.einsum("sk,sd->skd", torch.eye(n), x)               # + residual
    if p["ln1"] is None:                                                        # pre-LN: no LayerNorm step
        return layer.norm(dim=-1)
    for pre_states, ln in [(p["pre_ln"], p["ln1"])] + ([(p["pre_ln2"], p["ln2"])] if block == "encoder" else []):
        mean = pre_states.mean(-1, keepdim=True)
        var = (pre_states - mean).pow(2).mean(-1, keepdim=True).unsqueeze(1)   # [n, 1, 1]
        each_mean = layer.mean(-1, keepdim=True)
        layer = torch.einsum("skd,d->skd", (layer - each_mean) / (var + ln.eps) ** 0.5, ln.weight)
    return layer.norm(dim=-1)


def reference_globenc(layers, hidden0, parts_of, *, block: str, normalize: bool) -> torch.Tensor:
    """Rolled-out matrices [n, n] of one example: R = N_0, R = N_l @ R (rows normalised first with `normalize`)."""
    x, joint = hidden0, None
    for layer in layers:
        p = parts_of(layer, x)
        norms = reference_layer_norms(x, p, block)
        if normalize:
            norms = norms / norms.sum(-1, keepdim=True)
        joint = norms if joint is None else norms @ joint
        x = p["out"]
    return joint


def builtin_hidden0(model, ids):
    enc = model.net.encoder
    return enc.pos(enc.embed(ids[None]))[0]


# -- known answers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("block, normalize", [("encoder", True), ("encoder", False), ("attention", True)])
def test_matches_the_reference_computation(norm, block, normalize):
    model = make_tiny_model(norm=norm)
    batch = model.encode(TEXTS)
    got = GlobEnc(block=block, normalize=normalize).explain(model, batch).scores
    last = GlobEnc(block=block, normalize=normalize, aggregation="last").explain(model, batch).scores
    layers = list(model.net.encoder.layers)
    for e, n in enumerate(batch.attention_mask.sum(1).tolist()):
        with torch.no_grad():
            hidden0 = builtin_hidden0(model, batch.input_ids[e, :n])
            want = reference_globenc(layers, hidden0, builtin_parts, block=block, normalize=normalize)
            x = hidden0
            for layer in layers[:-1]:
                x = builtin_parts(layer, x)["out"]
            want_last = reference_layer_norms(x, builtin_parts(layers[-1], x), block)
            if normalize:
                want_last = want_last / want_last.sum(-1, keepdim=True)
        torch.testing.assert_close(got[e, :n], want[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(last[e, :n], want_last[0], atol=1e-5, rtol=1e-4)
        assert (got[e, n:] == 0).all()


def test_decomposition_sums_to_the_layernorm_output_builtin():
    model = make_tiny_model()
    batch = model.encode(TEXTS)
    caps = capture_layers(model, batch)
    x = None
    for layer_index, (layer, cap) in enumerate(zip(model.net.encoder.layers, caps)):
        for e, n in enumerate(batch.attention_mask.sum(1).tolist()):
            with torch.no_grad():
                x = builtin_hidden0(model, batch.input_ids[e, :n])
                for earlier in list(model.net.encoder.layers)[:layer_index]:
                    x = builtin_parts(earlier, x)["out"]
                p = builtin_parts(layer, x)
                ln1, ln2 = p["ln1"], p["ln2"]
                # LN1: Σ_j z̃_ij + γ1 ⊙ (b^O - m(b^O)) / s(y_i) + β1 = LN1(y_i)
                z = decompose(cap, e, n, block="attention")                          # [n, n, d]
                s1 = (p["pre_ln"].var(-1, unbiased=False) + ln1.eps).rsqrt()[:, None]
                bias1 = ln1.weight * (p["b_o"] - p["b_o"].mean()) * s1 + ln1.bias
                torch.testing.assert_close(z.sum(1) + bias1, p["a"], atol=1e-5, rtol=1e-5)
                # LN2 (block "encoder"): the rest of LN2's input (the FFN output and the biases) goes to no token
                z2 = decompose(cap, e, n, block="encoder")
                rest = p["pre_ln2"] - z.sum(1)
                s2 = (p["pre_ln2"].var(-1, unbiased=False) + ln2.eps).rsqrt()[:, None]
                bias2 = ln2.weight * (rest - rest.mean(-1, keepdim=True)) * s2 + ln2.bias
                torch.testing.assert_close(z2.sum(1) + bias2, p["out"], atol=1e-5, rtol=1e-5)


def test_pre_ln_adaptation_decomposes_the_block_output_exactly():
    model = make_tiny_model(norm="pre")
    batch = model.encode(TEXTS[:2])
    caps = capture_layers(model, batch)
    assert all(p.ln1 is None and p.ln2 is None for p in layer_parts(model))
    with torch.no_grad():
        x = builtin_hidden0(model, batch.input_ids[0, :6])
        p = builtin_parts(model.net.encoder.layers[0], x)
    z = decompose(caps[0], 0, 6)                                                  # Σ_j z_ij + b^O = x_i + attention_i
    torch.testing.assert_close(z.sum(1) + p["b_o"], p["a"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decompose(caps[0], 0, 6, block="attention"), z)


# -- the explainer contract ------------------------------------------------------------------------------
def test_shapes_padding_and_params():
    model = make_tiny_model()
    batch = model.encode(TEXTS)
    explainer = GlobEnc()
    attr = explainer.explain(model, batch)
    assert attr.scores.shape == batch.input_ids.shape
    assert attr.method == "globenc" and explainer.family == "attention"
    assert type(explainer)(**explainer.get_params()).get_params() == explainer.get_params()
    for i in range(len(TEXTS)):
        alone = GlobEnc().explain(model, batch.select([i])).scores[0]
        n = alone.shape[0]
        torch.testing.assert_close(attr.scores[i, :n], alone, atol=1e-6, rtol=1e-5)
        assert (attr.scores[i, n:] == 0).all()
    torch.testing.assert_close(attr.scores.sum(1), torch.ones(len(TEXTS)))


@pytest.mark.parametrize("params, match", [
    ({"block": "ffn"}, "block must be one of 'encoder', 'attention'; got 'ffn'"),
    ({"normalize": 1}, "normalize must be True or False"),
    ({"aggregation": "mean"}, "aggregation must be one of 'rollout', 'last'"),
    ({"readout": "first"}, "readout must be one of"),
])
def test_validate_errors(params, match):
    with pytest.raises(ValueError, match=match):
        GlobEnc(**params).explain(make_tiny_model(), TEXTS[:1])


def test_unsupported_model_is_refused():
    gpt2 = SimpleNamespace(hf_config=SimpleNamespace(model_type="gpt2"), net=None)   # a layout not read here
    with pytest.raises(ValueError, match=r"globenc supports the built-in models .*albert\); got a HuggingFace 'gpt2'"):
        GlobEnc().validate(gpt2)


def test_builtin_decoder_reads_the_last_real_token():
    from attnaudit.model.lm import DecoderClassifier
    from attnaudit.model.transformer import DecoderLMConfig, TransformerDecoderLM

    vocab = make_tiny_model().vocab
    torch.manual_seed(0)
    cfg = DecoderLMConfig(vocab_size=len(vocab), head="classifier", n_classes=2, d_model=16, n_heads=2, n_layers=2,
                          d_ff=32, max_len=32)
    decoder = DecoderClassifier(TransformerDecoderLM(cfg).eval(), vocab, label_names=["a", "b"])
    batch = decoder.encode(TEXTS)
    attr = GlobEnc().explain(decoder, batch)
    m = globenc_matrices(decoder, batch)
    last = batch.attention_mask.sum(1) - 1
    torch.testing.assert_close(attr.scores, (m[1] @ m[0])[torch.arange(len(TEXTS)), last], atol=1e-6, rtol=1e-5)
    assert (m[:, :, torch.ones(m.shape[-1], m.shape[-1], dtype=torch.bool).triu(1)] == 0).all()     # causal
    for i in range(len(TEXTS)):
        alone = GlobEnc().explain(decoder, batch.select([i])).scores[0]
        torch.testing.assert_close(attr.scores[i, :alone.shape[0]], alone, atol=1e-6, rtol=1e-5)


# -- HuggingFace BERT --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_bert():
    test_hf = pytest.importorskip("test_hf")
    from attnaudit.model.hf import HFClassifier

    tok = test_hf.wordpiece_tokenizer()
    return HFClassifier(test_hf.tiny_net("bert", len(tok)).eval(), tok)


@pytest.mark.slow
def test_hf_bert_invariant_and_reference(hf_bert):
    batch = hf_bert.encode(TEXTS[:2])
    caps = capture_layers(hf_bert, batch)
    layers = list(hf_bert.net.bert.encoder.layer)
    got = GlobEnc().explain(hf_bert, batch).scores
    for e, n in enumerate(batch.attention_mask.sum(1).tolist()):
        with torch.no_grad():
            x = hf_bert.net.bert.embeddings(input_ids=batch.input_ids[e:e + 1, :n])[0]
            want = reference_globenc(layers, x, bert_parts, block="encoder", normalize=True)
            for layer, cap in zip(layers, caps):
                p = bert_parts(layer, x)
                ln1 = p["ln1"]
                z = decompose(cap, e, n, block="attention")
                s1 = (p["pre_ln"].var(-1, unbiased=False) + ln1.eps).rsqrt()[:, None]
                bias1 = ln1.weight * (p["b_o"] - p["b_o"].mean()) * s1 + ln1.bias
                torch.testing.assert_close(z.sum(1) + bias1, p["a"], atol=1e-5, rtol=1e-5)
                x = p["out"]
        torch.testing.assert_close(got[e, :n], want[0], atol=1e-5, rtol=1e-4)
        assert (got[e, n:] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["distilbert", "albert", "roberta", "electra"])
def test_other_hf_encoders_keep_the_layernorm_invariant(arch):
    test_hf = pytest.importorskip("test_hf")
    model = test_hf.tiny_classifier(arch)
    batch = model.encode(TEXTS[:2])
    parts = layer_parts(model)
    assert len(parts) == model.n_layers
    seen: dict[int, list[torch.Tensor]] = {}
    shared = {id(p.ln1): p.ln1 for p in parts}.values()                           # ALBERT shares one layer
    handles = [ln.register_forward_hook(lambda m, a, out: seen.setdefault(id(m), []).append(out.detach()))
               for ln in shared]
    try:
        caps = capture_layers(model, batch)
    finally:
        for h in handles:
            h.remove()
    calls: dict[int, int] = {}
    for layer, (p, cap) in enumerate(zip(parts, caps)):
        k = calls.get(id(p.ln1), 0)
        calls[id(p.ln1)] = k + 1
        b_o = {"distilbert": lambda m: m.attention.out_lin.bias, "albert": lambda m: m.attention.dense.bias}.get(
            arch, lambda m: m.attention.output.dense.bias)(p.layer).detach()
        for e, n in enumerate(batch.attention_mask.sum(1).tolist()):
            z = decompose(cap, e, n, block="attention")
            s1 = (cap.y1[e, :n].var(-1, unbiased=False) + p.ln1.eps).rsqrt()[:, None]
            bias1 = p.ln1.weight.detach() * (b_o - b_o.mean()) * s1 + p.ln1.bias.detach()
            torch.testing.assert_close(z.sum(1) + bias1, seen[id(p.ln1)][k][e, :n], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, layer=layer: f"layer {layer}: {m}")
    attr = GlobEnc().explain(model, batch)
    alone = GlobEnc().explain(model, batch.select([1])).scores[0]
    torch.testing.assert_close(attr.scores[1, :alone.shape[0]], alone, atol=1e-6, rtol=1e-5)
