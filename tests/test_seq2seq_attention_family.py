"""Known answers for the encoder–decoder attention family (explain/seq2seq_attention.py): Chefer et al. 2021's
gradient-weighted rules, attention × gradient and Kobayashi et al. 2020's norms, on a tiny random built-in Translator
(1 + 1 and 2 + 2 layers) and tiny random HF BART / T5 / Marian folders (tests/test_hf_seq2seq.py's builder)."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from attnaudit.analyses.seq2seq import cross_rollout, translator_scores
from attnaudit.data.examples import Example
from attnaudit.explain.seq2seq_attention import (
    attention_norm,
    attention_x_grad,
    chefer_map,
    grad_attention,
    head_mean,
    per_target,
    per_target_relevance,
    relevance_rules,
)
from attnaudit.model.hooks import record
from attnaudit.model.interface import Batch
from attnaudit.model.seq2seq import PairBatch, Translator
from attnaudit.model.transformer import TransformerConfig, TransformerSeq2Seq
from attnaudit.model.vocab import Vocab

pytestmark = pytest.mark.usefixtures("one_thread_module")

EXAMPLES = [Example("0", "a b c", target="c b a"), Example("1", "a b c d e", target="e d"),
            Example("2", "b", target="b b b b")]            # different lengths: source and target padding


def tiny_translator(n_layers: int, seed: int = 0) -> Translator:
    torch.manual_seed(seed)
    src, tgt = Vocab.build(["a b c d e"]), Vocab.build(["e d c b a"])
    cfg = TransformerConfig(vocab_size=len(src), tgt_vocab_size=len(tgt), d_model=16, n_heads=2, n_layers=n_layers,
                            d_ff=32, max_len=16, dropout=0.1)      # dropout: the explainers must run in eval mode
    model = Translator(TransformerSeq2Seq(cfg), src, tgt)
    with torch.no_grad():                                          # nonzero biases: b^V counts, b^O does not
        for name, p in model.net.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def one_layer():
    return tiny_translator(1)


@pytest.fixture(scope="module")
def two_layers():
    return tiny_translator(2, seed=1)


def _row(pairs: PairBatch, b: int) -> PairBatch:
    """Example b alone, the widths kept."""
    s, (tgt_in, tgt_out, tgt_mask) = pairs.src, pairs.targets()
    return PairBatch(Batch(s.input_ids[b:b + 1], s.attention_mask[b:b + 1], s.special_mask[b:b + 1], tokens=[]),
                     tgt_in[b:b + 1], tgt_out[b:b + 1], tgt_mask[b:b + 1])


def _separate_grads(model, pairs: PairBatch, names: list[str]) -> dict[tuple[int, int], list[torch.Tensor]]:
    """(example, real target position) -> [A, ∇A of each site], from its own forward and backward of log p(y_t)."""
    _, tgt_out, tgt_mask = pairs.targets()
    out = {}
    model.net.eval()
    for b in range(len(tgt_out)):
        for t in tgt_mask[b].nonzero().flatten().tolist():
            logits, cache = record(model, _row(pairs, b), names, grads=True)
            logits.log_softmax(-1)[0, t, tgt_out[b, t]].backward()
            out[b, t] = [(cache[n].detach()[0], cache[n].grad[0]) for n in names]
    return out


def _bar_by_hand(r: torch.Tensor) -> torch.Tensor:
    """I + (R − I) with its rows normalised to sum 1 (a row of zeros stays 0)."""
    eye = torch.eye(len(r))
    rest = r - eye
    sums = rest.sum(1, keepdim=True)
    return eye + torch.where(sums > 0, rest / torch.where(sums > 0, sums, 1.0), 0.0)


# -- (a) grad_attention: the rules by hand; head-averaged it is cross_rollout ------------------------------
def test_grad_attention_one_layer_equals_the_rules_by_hand(one_layer):
    m = one_layer
    pairs = m.encode(EXAMPLES)
    names = [*m.attention_sites, *m.decoder_self_attention_sites, *m.cross_attention_sites]
    got = grad_attention(m, pairs)                                                   # [batch, tgt, src]
    expected = torch.zeros_like(got)
    for (b, t), ((a_e, g_e), (a_d, g_d), (a_c, g_c)) in _separate_grads(m, pairs, names).items():
        e_bar = (g_e * a_e).clamp(min=0).mean(0)                                     # [src, src]   eq. 5
        d_bar = (g_d * a_d).clamp(min=0).mean(0)                                     # [tgt, tgt]
        c_bar = (g_c * a_c).clamp(min=0).mean(0)                                     # [tgt, src]
        r_ss = torch.eye(len(e_bar)) + e_bar @ torch.eye(len(e_bar))                 # rule 6 on the encoder
        r_tt = torch.eye(len(d_bar)) + d_bar @ torch.eye(len(d_bar))                 # rule 6 on the decoder
        r_ts = torch.zeros_like(c_bar) + d_bar @ torch.zeros_like(c_bar)             # rule 7: R_ts from 0
        r_ts = r_ts + _bar_by_hand(r_tt) @ c_bar @ _bar_by_hand(r_ss)                # rule 10
        expected[b, t] = r_ts[t]
    assert bool((got != 0).any())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_grad_attention_two_layers_equals_the_rules_on_explicit_gradients(two_layers):
    """2 + 2 layers: relevance_rules on Ē from separate backward passes, against the per-position batched run."""
    m = two_layers
    pairs = m.encode(EXAMPLES)
    enc, dec, crs = m.attention_sites, m.decoder_self_attention_sites, m.cross_attention_sites
    got = grad_attention(m, pairs)
    expected = torch.zeros_like(got)
    for (b, t), per_site in _separate_grads(m, pairs, [*enc, *dec, *crs]).items():
        bars = [chefer_map(a[None], g[None]) for a, g in per_site]                  # each [1, query, key]
        r_ts = relevance_rules(torch.stack(bars[:2]), torch.stack(bars[2:4]), torch.stack(bars[4:]))
        expected[b, t] = r_ts[0, t]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_relevance_rules_on_head_averaged_attention_are_cross_rollout(n_layers):
    g = torch.Generator().manual_seed(n_layers)
    enc = torch.rand(n_layers, 2, 2, 5, 5, generator=g).softmax(-1).mean(2)         # [layer, batch, src, src]
    dec = (torch.rand(n_layers, 2, 2, 4, 4, generator=g).tril() + 1e-3).tril()
    dec = (dec / dec.sum(-1, keepdim=True)).mean(2)                                  # causal rows
    crs = torch.rand(n_layers, 2, 2, 4, 5, generator=g).softmax(-1).mean(2)
    torch.testing.assert_close(relevance_rules(enc, dec, crs), cross_rollout(enc, dec, crs), rtol=0, atol=0)


def test_per_target_relevance_with_head_mean_is_the_rollout_explainer(two_layers):
    m = two_layers
    pairs = m.encode(EXAMPLES)
    rollout = translator_scores(m, pairs, ["rollout"])["rollout"]                   # [batch, tgt, src]
    got = per_target_relevance(m, pairs, head_mean)
    keep = pairs.tgt_mask[:, :, None] & pairs.src.attention_mask[:, None, :]
    torch.testing.assert_close(got, rollout * keep, rtol=1e-6, atol=1e-7)


# -- (b) one backward per target position for the whole batch = separate passes ----------------------------
def test_per_target_gradients_equal_separate_single_position_passes(two_layers):
    m = two_layers
    pairs = m.encode(EXAMPLES)
    names = [*m.attention_sites, *m.decoder_self_attention_sites, *m.cross_attention_sites]
    flat = per_target(m, pairs, names, lambda p, g, t: torch.cat([x.flatten(1) for x in g], 1))  # [batch, tgt, n]
    _, _, tgt_mask = pairs.targets()
    separate = _separate_grads(m, pairs, names)
    for b in range(len(tgt_mask)):
        for t in range(tgt_mask.shape[1]):
            if (b, t) in separate:
                want = torch.cat([g.flatten() for _, g in separate[b, t]])
                torch.testing.assert_close(flat[b, t], want, rtol=1e-5, atol=1e-7)
            else:                                                                    # padded position: no unit
                assert bool((flat[b, t] == 0).all())
    assert flat.abs().sum() > 0
    chunked = per_target(m, pairs, names, lambda p, g, t: torch.cat([x.flatten(1) for x in g], 1), max_batch=2)
    torch.testing.assert_close(chunked, flat, rtol=1e-5, atol=1e-7)


def test_attention_x_grad_is_a_times_grad_of_the_last_cross_layer(two_layers):
    m = two_layers
    pairs = m.encode(EXAMPLES)
    sites = m.cross_attention_sites
    separate = _separate_grads(m, pairs, sites)
    last, mean = attention_x_grad(m, pairs), attention_x_grad(m, pairs, layer="mean")
    first = attention_x_grad(m, pairs, layer=0)
    want_last, want_mean, want_first = (torch.zeros_like(last) for _ in range(3))
    for (b, t), per_layer in separate.items():
        prods = [(a * g).mean(0)[t] for a, g in per_layer]                           # each [src], signed
        want_first[b, t], want_last[b, t], want_mean[b, t] = prods[0], prods[1], (prods[0] + prods[1]) / 2
    for got, want in ((last, want_last), (mean, want_mean), (first, want_first)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert bool((last < 0).any()) and bool((last > 0).any())                        # signed, as the classifier's


# -- (c) attention_norm by hand ----------------------------------------------------------------------------
def _norm_by_hand(pattern: torch.Tensor, v: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """pattern [batch, head, tgt, src], v [batch, src, head·d_head] (x W^V + b^V), w_o [d_model, head·d_head]
    -> ‖Σ_h α_h W^O[:, head h] v_h‖ [batch, tgt, src], by loops."""
    b, h, t, s = pattern.shape
    d = v.shape[-1] // h
    out = torch.zeros(b, t, s)
    for i in range(b):
        for j in range(t):
            for k in range(s):
                vec = sum(pattern[i, hh, j, k] * (w_o[:, hh * d:(hh + 1) * d] @ v[i, k, hh * d:(hh + 1) * d])
                          for hh in range(h))
                out[i, j, k] = torch.linalg.vector_norm(torch.as_tensor(vec))
    return out


def test_attention_norm_by_hand_on_the_builtin_translator(two_layers):
    m = two_layers
    pairs = m.encode(EXAMPLES)
    with torch.no_grad():
        m.net.eval()
        src = pairs.src
        memory = m.net.encode(src.input_ids, src.attention_mask)                     # [batch, src, d_model]
        _, cache = record(m, pairs, m.cross_attention_sites)
    for layer in (0, 1):
        attn = m.net.decoder.layers[layer].cross_attn
        v = (memory @ attn.w_v.weight.T + attn.w_v.bias).detach()                     # x W^V + b^V
        pattern = cache[m.cross_attention_sites[layer]]
        want = _norm_by_hand(pattern, v, attn.w_o.weight.detach())                    # no b^O
        torch.testing.assert_close(attention_norm(m, pairs, layer=layer), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_norm(m, pairs), attention_norm(m, pairs, layer=1))   # "last"
    mean = (attention_norm(m, pairs, layer=0) + attention_norm(m, pairs, layer=1)) / 2
    torch.testing.assert_close(attention_norm(m, pairs, layer="mean"), mean)
    # head "mean" = mean_h ‖α_h f_h‖ and one head's index, as the classifier's norm_matrix
    per_head = [attention_norm(m, pairs, head=h) for h in range(m.n_heads)]
    torch.testing.assert_close(attention_norm(m, pairs, head="mean"), torch.stack(per_head).mean(0))
    torch.testing.assert_close(attention_norm(m, pairs, head=1), _norm_by_hand(
        cache[m.cross_attention_sites[1]][:, 1:2], (memory @ m.net.decoder.layers[1].cross_attn.w_v.weight.T
                                                    + m.net.decoder.layers[1].cross_attn.w_v.bias)[..., 8:].detach(),
        m.net.decoder.layers[1].cross_attn.w_o.weight[:, 8:].detach()), rtol=1e-5, atol=1e-6)


# -- HF: BART (biases, 1/√d scaling) and T5 (no biases, no scaling) ---------------------------------------
@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    pytest.importorskip("transformers", reason="the HuggingFace adapter needs the optional extra")
    from test_hf_seq2seq import ARCHS, write_folder

    from attnaudit.model.hf_seq2seq import load_hf_seq2seq
    models = {a: load_hf_seq2seq(write_folder(tmp_path_factory.mktemp(a), a)) for a in ARCHS}
    with torch.no_grad():                                          # BART/Marian start with zero biases: make them count
        for a in ("bart", "marian"):
            for name, p in models[a].net.named_parameters():
                if name.endswith("bias") and "layer_norm" not in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return models


HF_EXAMPLES = [Example("e0", "the cat sat on the mat", target="die katze sass auf der matte"),
               Example("e1", "a dog ran", target="der hund lief und lief"), Example("e2", "unlikely", target="die")]


def _cross_modules(model):
    if model.hf_config.model_type == "t5":
        return [b.layer[1].EncDecAttention for b in model.net.get_decoder().block], ("q", "k", "v", "o")
    return [layer.encoder_attn for layer in model.net.get_decoder().layers], ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_attention_norm_by_hand_on_hf(hf_models, arch):
    """α recomputed from the cross-attention's own inputs (BART: biases and 1/√d_head; T5: neither), v = x W^V + b^V
    from the encoder's output, W^O = the module's output projection."""
    m = hf_models[arch]
    pairs = m.encode(HF_EXAMPLES)
    modules, (q_name, k_name, v_name, o_name) = _cross_modules(m)
    seen: dict[int, tuple] = {}
    handles = [mod.register_forward_pre_hook(lambda mod, args, kwargs, i=i: seen.__setitem__(
        i, (args[0] if args else kwargs["hidden_states"], kwargs["key_value_states"])), with_kwargs=True)
        for i, mod in enumerate(modules)]
    try:
        with torch.no_grad():
            _, cache = record(m, pairs, m.cross_attention_sites)
    finally:
        for h in handles:
            h.remove()
    src_mask, tgt_mask = pairs.src.attention_mask, pairs.tgt_mask
    n_h = m.n_decoder_heads
    for layer, mod in enumerate(modules):
        x_q, memory = seen[layer]                                                     # [batch, tgt|src, d_model]
        q, k, v = (getattr(mod, name)(x).detach() for name, x in ((q_name, x_q), (k_name, memory), (v_name, memory)))
        b, t, d = q.shape
        qh, kh = q.view(b, t, n_h, -1).transpose(1, 2), k.view(b, -1, n_h, d // n_h).transpose(1, 2)
        scale = 1.0 if arch == "t5" else (d // n_h) ** -0.5
        scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~src_mask[:, None, None, :], float("-inf"))
        alpha = scores.softmax(-1) * tgt_mask[:, None, :, None]                      # [batch, head, tgt, src]
        recorded = cache[m.cross_attention_sites[layer]]
        torch.testing.assert_close(recorded, alpha, rtol=1e-5, atol=1e-6)
        if arch == "t5":
            assert getattr(mod, v_name).bias is None and getattr(mod, o_name).bias is None
        else:
            assert getattr(mod, v_name).bias.abs().sum() > 0 and getattr(mod, o_name).bias.abs().sum() > 0
        want = _norm_by_hand(alpha, v, getattr(mod, o_name).weight.detach())          # b^V in v, no b^O
        torch.testing.assert_close(attention_norm(m, pairs, layer=layer), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bart", "t5", "marian"])
def test_hf_family_shapes_padding_and_rollout(hf_models, arch):
    m = hf_models[arch]
    pairs = m.encode(HF_EXAMPLES)
    shape = (*pairs.tgt_out.shape, pairs.src.input_ids.shape[1])
    keep = pairs.tgt_mask[:, :, None] & pairs.src.attention_mask[:, None, :]         # [batch, tgt, src]
    for scores in (grad_attention(m, pairs), attention_x_grad(m, pairs), attention_norm(m, pairs)):
        assert tuple(scores.shape) == shape and scores.dtype == torch.float32
        assert bool(torch.isfinite(scores).all()) and bool((scores[~keep] == 0).all())
        assert bool((scores[keep] != 0).any())
    rollout = translator_scores(m, pairs, ["rollout"])["rollout"]
    torch.testing.assert_close(per_target_relevance(m, pairs, head_mean), rollout * keep, rtol=1e-5, atol=1e-6)


# -- (d) cross_output_weight -------------------------------------------------------------------------------
def test_cross_output_weight_is_the_cross_attention_w_o(two_layers, hf_models):
    m = two_layers
    for layer in (0, 1):
        w = m.net.decoder.layers[layer].cross_attn.w_o.weight                        # [d_model, head·d_head]
        got = m.cross_output_weight(layer)
        assert got.shape == (16, 2, 8) and torch.equal(got.reshape(16, 16), w)
        assert torch.equal(got[:, 1], w[:, 8:]) and not torch.equal(got.reshape(16, 16),
                                                                     m.net.decoder.layers[layer].self_attn.w_o.weight)
    for hm in hf_models.values():
        modules, (*_, o_name) = _cross_modules(hm)
        for layer, mod in enumerate(modules):
            w = getattr(mod, o_name).weight
            got = hm.cross_output_weight(layer)
            d_head = w.shape[1] // hm.n_decoder_heads
            assert got.shape == (w.shape[0], hm.n_decoder_heads, d_head) and torch.equal(got.reshape(w.shape), w)
            assert not torch.equal(got.reshape(w.shape), hm.output_weight(layer).reshape(w.shape))


@pytest.mark.parametrize("bad", [-1, 2, "last", 1.0, None])
def test_cross_output_weight_refuses_a_bad_layer(two_layers, hf_models, bad):
    for m in (two_layers, hf_models["t5"]):
        with pytest.raises(ValueError, match=r"layer must be an int in \[0, 1\] \(a decoder layer\)"):
            m.cross_output_weight(bad)


# -- (e) shapes, padding, finite; bad arguments ----------------------------------------------------------
def test_builtin_shapes_zero_padding_and_finite(two_layers):
    m = two_layers
    pairs = m.encode(EXAMPLES)
    keep = pairs.tgt_mask[:, :, None] & pairs.src.attention_mask[:, None, :]
    assert bool((~keep).any())                                                       # the batch has padding
    for scores in (grad_attention(m, pairs), attention_x_grad(m, pairs), attention_norm(m, pairs),
                   attention_norm(m, pairs, layer="mean", head="mean")):
        assert tuple(scores.shape) == (3, 5, 7) and bool(torch.isfinite(scores).all())
        assert bool((scores[~keep] == 0).all()) and bool((scores[keep] != 0).any())
    assert bool((grad_attention(m, pairs) >= 0).all())                               # Ē >= 0: relevance >= 0
    assert m.net.training is False
    m.net.train()
    try:                                                                             # eval inside, mode restored
        torch.testing.assert_close(grad_attention(m, pairs), grad_attention(m, pairs))
        assert m.net.training is True
    finally:
        m.net.eval()


def test_bad_arguments_are_refused(two_layers):
    m = two_layers
    pairs = m.encode(EXAMPLES)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 1\], 'last' or 'mean'.*2 decoder layers"):
        attention_norm(m, pairs, layer=2)
    with pytest.raises(ValueError, match=r"layer must be"):
        attention_x_grad(m, pairs, layer="first")
    with pytest.raises(ValueError, match=r"head must be an int in \[0, 1\], 'sum' or 'mean'"):
        attention_norm(m, pairs, head="max")
    with pytest.raises(ValueError, match="no targets"):
        grad_attention(m, m.encode(["a b c"]))
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        grad_attention(m, pairs, max_batch=0)
    with pytest.raises(ValueError, match="pairs must be a PairBatch"):
        attention_norm(m, pairs.src)
