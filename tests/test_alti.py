"""ALTI (Ferrando et al. 2022): against the reference code's steps computed here by hand, the LayerNorm
decomposition invariant, row sums, padding and validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from attnaudit.explain.alti import ALTI, alti_matrices, blocks, decompose, recording_layers

TEXTS = ["the film was good", "a boring plot", "the story was not bad and the actor was great", "good"]


# -- the reference code's steps (mt-upc/transformer-contributions, src/contributions.py), in plain torch ----------
def l_transform(x, w_ln):
    """The reference's `l_transform`: x (I − 1/d) diag(γ)."""
    d = w_ln.size(0)
    return torch.einsum("...e,ef,fg->...g", x, torch.eye(d) - torch.ones(d, d) / d, torch.diag(w_ln))


def reference_layer(attn, ln, x, mask):
    """One post-LN attention block of the built-in net from its weights, as the reference's `get_contributions`
    -> (contributions [seq, seq], resultant [seq, d], the block's output LN(x + Attn(x)) [seq, d]). No padding."""
    n, d = x.shape
    h, dh = attn.n_heads, attn.d_head
    q = attn.w_q(x).view(n, h, dh).transpose(0, 1)                                 # [head, seq, d_head]
    k = attn.w_k(x).view(n, h, dh).transpose(0, 1)
    v = attn.w_v(x).view(n, h, dh).transpose(0, 1)
    probs = (q @ k.transpose(1, 2) / dh ** 0.5).softmax(-1)                        # [head, query, key]
    dense = attn.w_o.weight.view(d, h, dh)
    transformed = torch.einsum("hsv,dhv->hsd", v, dense)                           # VW_O
    summed = torch.einsum("hks,hsd->ksd", probs, transformed)                      # AVW_O summed over heads
    residual = torch.einsum("sk,sd->skd", torch.eye(n), x)
    rw = summed + residual                                                         # [query, key, d]
    pre_ln = x + (probs @ v).transpose(0, 1).reshape(n, d) @ attn.w_o.weight.T + attn.w_o.bias
    coef = 1 / (pre_ln + ln.eps).std(-1, unbiased=False).view(-1, 1)              # as written in the reference
    resultant = (l_transform(rw, ln.weight).sum(1) + l_transform(attn.w_o.bias, ln.weight)) * coef + ln.bias
    tv_std = l_transform(rw, ln.weight) * coef[..., None]
    importance = -F.pairwise_distance(tv_std, resultant[:, None], p=1)             # [query, key]
    # normalize_contributions(..., scaling='min_sum', resultant_norm=‖resultant‖₁)
    c = torch.clip(importance + resultant.norm(p=1, dim=-1)[:, None], min=0)
    return c / c.sum(-1, keepdim=True), resultant, ln(pre_ln)


def reference_alti(model, text):
    """ALTI of one unpadded text on the built-in post-LN classifier from its weights -> scores [seq] ([CLS] row)."""
    net = model.net
    batch = model.encode([text])
    ids, mask = batch.input_ids, batch.attention_mask
    x = net.encoder.pos(net.encoder.embed(ids))[0]                                 # dropout off (eval)
    layers = []
    for layer in net.encoder.layers:
        c, _, x = reference_layer(layer.self_attn, layer.attn_block.norm, x, mask)
        x = layer.ff_block.norm(x + layer.ff(x))
        layers.append(c)
    joint = [layers[0]]                                                            # compute_joint_attention
    for c in layers[1:]:
        joint.append(c @ joint[-1])
    return joint[-1][0], torch.stack(layers)


@torch.no_grad()
def test_matches_the_reference_code_steps_on_the_built_in_model():
    model = make_tiny_model(seed=3, n_layers=3)
    for text in TEXTS[:3]:
        expected, layers = reference_alti(model, text)
        got = ALTI().explain(model, [text]).scores[0]
        assert torch.allclose(got, expected, atol=2e-5), (got, expected)
        assert torch.allclose(alti_matrices(model, model.encode([text]))[:, 0], layers, atol=2e-5)
        last = ALTI(aggregation="last").explain(model, [text]).scores[0]
        assert torch.allclose(last, layers[-1][0], atol=2e-5)
    # the reference's std(s + ε) drops ε; with ε = 0 in the LayerNorms both are the same to rounding
    for m in model.net.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 0.0
    expected, _ = reference_alti(model, TEXTS[2])
    assert torch.allclose(ALTI().explain(model, [TEXTS[2]]).scores[0], expected, atol=1e-5)


def decomposition_error(model, batch) -> float:
    """max |Σ_j T̃_i(x_j) + bias_i − y_i| over layers and real rows, y_i the block's actual output."""
    parts = blocks(model)
    with torch.no_grad(), recording_layers(model, parts) as records:
        model.logits(batch.input_ids, batch.attention_mask)
    worst = 0.0
    real = batch.attention_mask
    for i, (r, part) in enumerate(zip(records, parts)):
        b_o = part.dense.bias.detach()
        t, bias = decompose(r.x, r.pattern, r.values, model.output_weight(i).detach(), b_o, part.norm, r.s)
        worst = max(worst, float((t.sum(2) + bias - r.y)[real].abs().max()))
    return worst


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_decomposition_sums_to_the_layer_output_on_the_built_in_model(norm):
    model = make_tiny_model(norm=norm)
    assert decomposition_error(model, model.encode(TEXTS)) < 1e-5


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_hf import write_folder

    return write_folder(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def hf_bert(bert_folder):
    import attnaudit

    return attnaudit.load_model(bert_folder)


@pytest.mark.slow
@torch.no_grad()
def test_matches_the_reference_code_on_a_tiny_bert(bert_folder, hf_bert):
    """The reference's own recipe on transformers' eager BERT: hidden states and attentions from the forward,
    the values from a hook on `attention.self.value`, the LayerNorm's input from a hook, then its steps."""
    from test_hf import eager_reference

    net = eager_reference(bert_folder)
    text = "the film was not good"
    batch = hf_bert.encode([text])
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(net.bert.encoder.layer):
        handles.append(layer.attention.self.value.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(f"v{i}", out)))
        handles.append(layer.attention.output.LayerNorm.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(f"s{i}", a[0])))
    try:
        out = net(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), output_hidden_states=True,
                  output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    cfg = net.config
    n_heads, d = cfg.num_attention_heads, cfg.hidden_size
    layers = []
    for i, layer in enumerate(net.bert.encoder.layer):
        x, probs = out.hidden_states[i][0], out.attentions[i][0]                    # [seq, d], [head, q, k]
        n = x.shape[0]
        v = seen[f"v{i}"][0].view(n, n_heads, d // n_heads).transpose(0, 1)         # transpose_for_scores
        dense, ln = layer.attention.output.dense, layer.attention.output.LayerNorm
        transformed = torch.einsum("hsv,dhv->hsd", v, dense.weight.view(d, n_heads, d // n_heads))
        rw = torch.einsum("hks,hsd->ksd", probs, transformed) + torch.einsum("sk,sd->skd", torch.eye(n), x)
        coef = 1 / (seen[f"s{i}"][0] + ln.eps).std(-1, unbiased=False).view(-1, 1)
        resultant = (l_transform(rw, ln.weight).sum(1) + l_transform(dense.bias, ln.weight)) * coef + ln.bias
        importance = -F.pairwise_distance(l_transform(rw, ln.weight) * coef[..., None], resultant[:, None], p=1)
        c = torch.clip(importance + resultant.norm(p=1, dim=-1)[:, None], min=0)
        layers.append(c / c.sum(-1, keepdim=True))
    joint = layers[0]
    for c in layers[1:]:
        joint = c @ joint
    assert torch.allclose(ALTI().explain(hf_bert, [text]).scores[0], joint[0], atol=2e-5)
    assert torch.allclose(alti_matrices(hf_bert, batch)[:, 0], torch.stack(layers), atol=2e-5)


@pytest.mark.slow
def test_decomposition_sums_to_the_layer_norm_output_on_a_tiny_bert(hf_bert):
    batch = hf_bert.encode(["the film was not good", "a boring plot"])
    assert decomposition_error(hf_bert, batch) < 1e-5


@pytest.mark.slow
def test_hf_bert_rows_and_padding(hf_bert):
    batch = hf_bert.encode(["the film was not good", "a boring plot"])
    check_rows(alti_matrices(hf_bert, batch), batch.attention_mask)
    together = ALTI().explain(hf_bert, batch).scores
    alone = ALTI().explain(hf_bert, ["a boring plot"]).scores[0]
    n = len(alone)
    assert torch.allclose(together[1, :n], alone, atol=1e-5) and (together[1, n:] == 0).all()


def check_rows(matrices, mask):
    real = mask[:, :, None] & mask[:, None, :]
    assert (matrices >= 0).all()
    sums = matrices.sum(-1)                                                        # [layer, batch, query]
    assert torch.allclose(sums[:, mask], torch.ones_like(sums[:, mask]), atol=1e-5)
    assert (matrices[:, ~real] == 0).all()


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_rows_sum_to_one_and_padding_gives_the_scores_alone(norm):
    model = make_tiny_model(norm=norm)
    batch = model.encode(TEXTS)
    check_rows(alti_matrices(model, batch), batch.attention_mask)
    together = ALTI().explain(model, batch)
    assert torch.allclose(together.scores[batch.attention_mask].sum() / len(TEXTS), torch.tensor(1.0), atol=1e-5)
    for i, text in enumerate(TEXTS):
        alone = ALTI().explain(model, [text]).scores[0]
        n = len(alone)
        assert torch.allclose(together.scores[i, :n], alone, atol=1e-6)
        assert (together.scores[i, n:] == 0).all()


def test_decoder_classifier_reads_the_last_token():
    from tests.test_lm import make_lm

    model = make_lm(head="classifier")
    batch = model.encode(["a 1 b 2 ? a", "c 3 ? c"])
    matrices = alti_matrices(model, batch)
    check_rows(matrices, batch.attention_mask)
    assert (matrices.triu(1) == 0).all()                                           # causal: no future token
    scores = ALTI().explain(model, batch).scores
    assert torch.allclose(scores.sum(-1), torch.ones(2), atol=1e-5)


def test_params_and_validation(tiny_model):
    e = ALTI(aggregation="last", readout="mean")
    assert type(e)(**e.get_params()).get_params() == {"aggregation": "last", "readout": "mean"}
    assert (ALTI.name, ALTI.family) == ("alti", "attention")
    with pytest.raises(ValueError, match="aggregation must be one of 'rollout', 'last'; got 'sum'"):
        ALTI(aggregation="sum").validate(tiny_model)
    with pytest.raises(ValueError, match="readout must be one of"):
        ALTI(readout="first").validate(tiny_model)

    class Other:
        net = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="alti supports the built-in Transformer classifiers"):
        ALTI().validate(Other())                                                   # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["roberta", "electra", "distilbert", "albert"])
def test_other_hf_encoders(arch, tmp_path):
    """RoBERTa, ELECTRA and DistilBERT decompose like BERT; ALBERT (shared layers) is refused by validate."""
    pytest.importorskip("transformers")
    from test_hf import write_folder

    import attnaudit

    model = attnaudit.load_model(write_folder(tmp_path, arch))
    batch = model.encode(["the film was not good", "a plot"])
    if arch == "albert":
        with pytest.raises(ValueError, match="got 'albert'"):
            ALTI().validate(model)
        return
    assert decomposition_error(model, batch) < 1e-5
    check_rows(alti_matrices(model, batch), batch.attention_mask)
