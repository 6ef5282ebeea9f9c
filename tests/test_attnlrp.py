"""AttnLRP (Achtibat et al. 2024) against an explicit LRP backward pass written out here in plain torch.

The reference pass below propagates relevance layer by layer with the formulas of LXT's explicit rules
(github.com/rachtibat/LRP-eXplains-Transformers, lxt/explicit/functional.py): `linear_epsilon_fn` (ε-rule),
`add2_tensors_fn` (residuals), `layer_norm_grad_fn` (LayerNorm with σ constant), `softmax_fn`
(R_x = x ⊙ (R_s − s ΣR_s)), `matmul_fn` (ε + uniform: half to each factor), `mean_fn`, and the identity rule on
ReLU. No autograd is used there; the explainer computes the same by gradient × input with modified gradients.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from attnaudit.explain.attnlrp import AttnLRP, attnlrp_rules, divide_gradient, identity_rule
from attnaudit.model.hooks import active_hook_count

TEXTS = ["the film was good", "a boring plot", "the story was not bad and the actor was great", "good"]
EPS = 1e-12


# -- the explicit LRP rules (LXT's formulas) -------------------------------------------------------------
def stab(z: torch.Tensor) -> torch.Tensor:
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z)


def lrp_linear(x, weight, z, r):
    """ε-rule for z = x Wᵀ + b: R_x = x ⊙ (R_z / z) W."""
    return x * ((r / stab(z)) @ weight)


def lrp_add(a, b, r):
    """ε-rule for a + b: each summand its share."""
    share = r / stab(a + b)
    return a * share, b * share


def lrp_layer_norm(x, ln, y, r):
    """R_x = x ⊙ Jᵀ(R_y / y), J the Jacobian of γ ⊙ (x − mean x) / σ with σ held constant."""
    sigma = ((x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    u = ln.weight * r / stab(y) / sigma
    return x * (u - u.mean(-1, keepdim=True))                        # the centring matrix is symmetric


def lrp_matmul(a, b, z, r):
    """z = a @ b, both inputs: R_a = a ⊙ (R/(2z)) bᵀ, R_b = b ⊙ aᵀ (R/(2z))."""
    rn = r / stab(2 * z)
    return a * (rn @ b.transpose(-1, -2)), b * (a.transpose(-1, -2) @ rn)


def lrp_softmax(x, s, r):
    return x * (r - s * r.sum(-1, keepdim=True))


def layer_norm(x, ln):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


# -- the reference pass on the built-in model ------------------------------------------------------------
def forward_layer(layer, x):
    att = layer.self_attn
    h, dh = att.n_heads, att.d_head
    pre = layer.attn_block.pre
    ln1, ln2 = layer.attn_block.norm, layer.ff_block.norm
    t = dict(x=x, src=layer_norm(x, ln1) if pre else x)
    for name, lin in (("q", att.w_q), ("k", att.w_k), ("v", att.w_v)):
        t[name] = F.linear(t["src"], lin.weight, lin.bias)                       # [n, d]
    heads = []
    for i in range(h):
        cut = slice(i * dh, (i + 1) * dh)
        q, k, v = t["q"][:, cut], t["k"][:, cut], t["v"][:, cut]
        z = q @ k.T                                                              # [query, key]
        scores = z / math.sqrt(dh)
        a = scores.softmax(-1)
        heads.append(dict(cut=cut, q=q, k=k, v=v, z=z, scores=scores, a=a, c=a @ v))
    t["heads"] = heads
    t["ctx"] = torch.cat([hd["c"] for hd in heads], -1)
    t["o"] = F.linear(t["ctx"], att.w_o.weight, att.w_o.bias)
    t["a"] = t["x"] + t["o"] if pre else layer_norm(t["x"] + t["o"], ln1)
    t["fin"] = layer_norm(t["a"], ln2) if pre else t["a"]
    lin1, lin2 = layer.ff.net[0], layer.ff.net[3]
    t["h1"] = F.linear(t["fin"], lin1.weight, lin1.bias)
    t["f"] = t["h1"].relu()
    t["h2"] = F.linear(t["f"], lin2.weight, lin2.bias)
    t["out"] = t["a"] + t["h2"] if pre else layer_norm(t["a"] + t["h2"], ln2)
    return t


def backward_layer(layer, t, r_out):
    """-> (R at the layer input, relevance the softmaxes absorbed: Σ R_A − Σ R_scores)."""
    att = layer.self_attn
    pre = layer.attn_block.pre
    ln1, ln2 = layer.attn_block.norm, layer.ff_block.norm
    lin1, lin2 = layer.ff.net[0], layer.ff.net[3]
    r_r2 = r_out if pre else lrp_layer_norm(t["a"] + t["h2"], ln2, t["out"], r_out)
    r_a, r_h2 = lrp_add(t["a"], t["h2"], r_r2)
    r_f = lrp_linear(t["f"], lin2.weight, t["h2"], r_h2)
    r_h1 = r_f                                                                   # identity rule on ReLU
    r_fin = lrp_linear(t["fin"], lin1.weight, t["h1"], r_h1)
    r_a = r_a + (lrp_layer_norm(t["a"], ln2, t["fin"], r_fin) if pre else r_fin)
    r_r1 = r_a if pre else lrp_layer_norm(t["x"] + t["o"], ln1, t["a"], r_a)
    r_x, r_o = lrp_add(t["x"], t["o"], r_r1)
    r_ctx = lrp_linear(t["ctx"], att.w_o.weight, t["o"], r_o)
    r_q, r_k, r_v = (torch.zeros_like(t[n]) for n in "qkv")
    absorbed = 0.0
    for hd in t["heads"]:
        cut = hd["cut"]
        r_att, r_v[:, cut] = lrp_matmul(hd["a"], hd["v"], hd["c"], r_ctx[:, cut])
        r_scores = lrp_softmax(hd["scores"], hd["a"], r_att)
        absorbed += float(r_att.sum() - r_scores.sum())
        r_q[:, cut], r_kt = lrp_matmul(hd["q"], hd["k"].T, hd["z"], r_scores)   # the 1/√d_head scale: R unchanged
        r_k[:, cut] = r_kt.T
    r_src = sum(lrp_linear(t["src"], lin.weight, t[n], r)
                for n, lin, r in (("q", att.w_q, r_q), ("k", att.w_k, r_k), ("v", att.w_v, r_v)))
    r_x = r_x + (lrp_layer_norm(t["x"], ln1, t["src"], r_src) if pre else r_src)
    return r_x, absorbed


def reference_attnlrp(model, ids, target):
    """One example's ids [n] -> (R at the word embeddings [n], R at the summed input [n], absorbed, logit)."""
    net = model.net
    enc, cfg = net.encoder, net.cfg
    e = enc.embed(ids)                                                           # [n, d]
    scaled, pe = e * math.sqrt(cfg.d_model), enc.pos.table[: len(ids)].to(e)
    x = scaled + pe
    layers = list(enc.layers)
    trace = []
    for layer in layers:
        trace.append(forward_layer(layer, x))
        x = trace[-1]["out"]
    h = layer_norm(x, enc.final_norm) if cfg.norm == "pre" else x
    pooled = h[0] if cfg.pooling == "cls" else h.mean(0)
    logits = F.linear(pooled, net.head.weight, net.head.bias)
    r_logits = torch.zeros_like(logits)
    r_logits[target] = logits[target]
    r_pooled = lrp_linear(pooled, net.head.weight, logits, r_logits)
    if cfg.pooling == "cls":
        r_h = torch.zeros_like(h)
        r_h[0] = r_pooled
    else:
        r_h = h * r_pooled / stab(h.sum(0))                                      # LXT's mean_fn
    r = lrp_layer_norm(x, enc.final_norm, h, r_h) if cfg.norm == "pre" else r_h
    absorbed = 0.0
    for layer, t in zip(reversed(layers), reversed(trace)):
        r, lost = backward_layer(layer, t, r)
        absorbed += lost
    r_word, _ = lrp_add(scaled, pe, r)
    return r_word.sum(-1), r.sum(-1), absorbed, float(logits[target])


def double_model(**kw):
    model = make_tiny_model(**kw)
    model.net.double()
    return model


def zero_biases(net):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.zero_()


# -- (1) equal to the explicit pass ----------------------------------------------------------------------
@pytest.mark.parametrize("norm, pooling", [("post", "cls"), ("pre", "mean")])
@pytest.mark.parametrize("embedding", ["word", "sum"])
def test_matches_the_explicit_lrp_pass(norm, pooling, embedding):
    model = double_model(norm=norm, pooling=pooling)
    batch = model.encode(TEXTS)
    attr = AttnLRP(embedding=embedding).explain(model, batch, target=[0, 1, 1, 0])
    for e, n in enumerate(batch.attention_mask.sum(1).tolist()):
        with torch.no_grad():
            word, whole, _, _ = reference_attnlrp(model, batch.input_ids[e, :n], int(attr.target[e]))
        want = (word if embedding == "word" else whole).float()
        torch.testing.assert_close(attr.scores[e, :n], want, atol=1e-5, rtol=1e-5)
        assert (attr.scores[e, n:] == 0).all()


def test_float32_matches_too():
    import copy

    model = make_tiny_model()
    batch = model.encode(TEXTS[:2])
    attr = AttnLRP().explain(model, batch)
    wide = copy.deepcopy(model)
    wide.net.double()
    with torch.no_grad():
        want = reference_attnlrp(wide, batch.input_ids[0, :6], int(attr.target[0]))[0]
    torch.testing.assert_close(attr.scores[0, :6], want.float(), atol=1e-4, rtol=1e-3)


# -- (2) conservation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_bias_free_model_conserves_up_to_the_softmax_terms(norm):
    """Without biases every rule but the softmax's conserves: Σ_j R_j + (what the softmaxes keep) = the logit."""
    model = double_model(norm=norm)
    zero_biases(model.net)
    batch = model.encode(TEXTS)
    attr = AttnLRP(embedding="sum").explain(model, batch)
    for e, n in enumerate(batch.attention_mask.sum(1).tolist()):
        with torch.no_grad():
            _, _, absorbed, logit = reference_attnlrp(model, batch.input_ids[e, :n], int(attr.target[e]))
        assert float(attr.scores[e].sum()) + absorbed == pytest.approx(logit, rel=1e-4, abs=1e-4)


def cp_sums_and_logits(model):
    """CP-LRP's relevance sum per example and the target logit it should conserve."""
    batch = model.encode(TEXTS)
    attr = AttnLRP(embedding="sum", attention="cp").explain(model, batch)
    with torch.no_grad():
        logits = model(batch).gather(1, attr.target[:, None])[:, 0]
    return attr.scores.sum(1), logits


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_cp_lrp_on_a_bias_free_model_conserves_the_logit(norm):
    model = make_tiny_model(norm=norm)
    zero_biases(model.net)
    torch.testing.assert_close(*cp_sums_and_logits(model), atol=1e-4, rtol=1e-4)
    with_biases = make_tiny_model(norm=norm)                          # biases (and LN's β) take their share
    assert not torch.allclose(*cp_sums_and_logits(with_biases), atol=1e-3)


def test_the_rules_gradients():
    x = torch.tensor([-2.0, -0.5, 0.3, 1.5], requires_grad=True)
    y = identity_rule(x, F.gelu(x))
    torch.testing.assert_close(y, F.gelu(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(x * g, F.gelu(x).detach())                     # R_in = R_out
    (g,) = torch.autograd.grad(divide_gradient(x * 3, 4.0).sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 0.75))


# -- (3) HuggingFace -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_models():
    test_hf = pytest.importorskip("test_hf")
    return {arch: test_hf.tiny_classifier(arch) for arch in ("bert", "roberta")}


@pytest.mark.parametrize("embedding", ["word", "sum"])
def test_hf_bert_runs(hf_models, embedding):
    model = hf_models["bert"]
    batch = model.encode(TEXTS)
    attr = AttnLRP(embedding=embedding).explain(model, batch)
    assert attr.scores.shape == batch.input_ids.shape
    assert torch.isfinite(attr.scores).all() and (attr.scores[~batch.attention_mask] == 0).all()
    assert (attr.scores[batch.attention_mask] != 0).all()
    alone = AttnLRP(embedding=embedding).explain(model, batch.select([1])).scores[0]
    torch.testing.assert_close(attr.scores[1, :alone.shape[0]], alone, atol=1e-5, rtol=1e-4)
    assert active_hook_count(model.net) == 0


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_hf_cp_lrp_on_a_bias_free_model_conserves_the_logit(hf_models, arch):
    """GELU and tanh (a module in BERT's pooler, `torch.tanh` in RoBERTa's head) under the identity rule:
    with their plain gradients the sum would not be the logit."""
    import copy

    model = copy.deepcopy(hf_models[arch])
    zero_biases(model.net)
    torch.testing.assert_close(*cp_sums_and_logits(model), atol=1e-4, rtol=1e-4)


# -- (4) the patching is undone ---------------------------------------------------------------------------
def test_forward_unchanged_after_explain_and_after_an_error():
    model = make_tiny_model()
    batch = model.encode(TEXTS)
    with torch.no_grad():
        before = model(batch)
    AttnLRP().explain(model, batch)
    with torch.no_grad():
        assert torch.equal(model(batch), before)
        with attnlrp_rules(model):
            torch.testing.assert_close(model(batch), before, atol=1e-6, rtol=1e-5)   # only gradients change
    with pytest.raises(RuntimeError, match="boom"):
        with attnlrp_rules(model):
            raise RuntimeError("boom")
    assert active_hook_count(model.net) == 0
    with torch.no_grad():
        assert torch.equal(model(batch), before)
    x = torch.linspace(-1, 1, 5, requires_grad=True)
    (g,) = torch.autograd.grad(model.net.encoder.layers[0].ff.net[1](x).sum(), x)   # ReLU's own gradient again
    assert torch.equal(g, (x > 0).float())


# -- (5) refusals -----------------------------------------------------------------------------------------
def test_unsupported_models_are_refused():
    from attnaudit.model.lm import DecoderClassifier
    from attnaudit.model.transformer import DecoderLMConfig, TransformerDecoderLM

    gpt2 = SimpleNamespace(hf_config=SimpleNamespace(model_type="gpt2"), net=None, SITES="decoder")
    with pytest.raises(ValueError, match=r"attnlrp supports the built-in encoder classifier .*albert\); "
                                         r"got a HuggingFace 'gpt2' model \(a decoder\)"):
        AttnLRP().validate(gpt2)
    vocab = make_tiny_model().vocab
    cfg = DecoderLMConfig(vocab_size=len(vocab), head="classifier", n_classes=2, d_model=16, n_heads=2, n_layers=1,
                          d_ff=32, max_len=16)
    decoder = DecoderClassifier(TransformerDecoderLM(cfg).eval(), vocab, label_names=["a", "b"])
    with pytest.raises(ValueError, match=r"attnlrp supports .*; got a DecoderClassifier"):
        AttnLRP().explain(decoder, ["a film"])


@pytest.mark.parametrize("params, match", [
    ({"embedding": "position"}, "embedding must be one of 'word', 'sum'; got 'position'"),
    ({"attention": "softmax"}, "attention must be one of 'attnlrp', 'cp'; got 'softmax'"),
])
def test_validate_errors(params, match):
    with pytest.raises(ValueError, match=match):
        AttnLRP(**params).explain(make_tiny_model(), TEXTS[:1])
