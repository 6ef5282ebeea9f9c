"""The lecture's Transformer: attention math, masks, positions, schedule, hooks, interventions, checkpoints."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from attnaudit.model.attention import MultiHeadAttention
from attnaudit.model.checkpoint import load_model, save_checkpoint
from attnaudit.model.hooks import active_hook_count, hooks, record, recording
from attnaudit.model.interventions import permute, replace, uniform, zero_head, zero_key
from attnaudit.model.positional import sinusoidal_table
from attnaudit.model.schedule import NoamLR, noam_lr
from attnaudit.model.seq2seq import Translator
from attnaudit.model.transformer import (
    TransformerClassifier,
    TransformerConfig,
    TransformerSeq2Seq,
    causal_allowed,
    padding_allowed,
)
from attnaudit.model.vocab import Vocab


# -- attention math --------------------------------------------------------------------------------
def reference_mha(mha: MultiHeadAttention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Float64 loops over heads: head_i = softmax(Q_i K_iᵀ/√d_k) V_i, then Concat · W^O."""
    d = lambda lin: (lin.weight.double(), lin.bias.double())
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = map(d, (mha.w_q, mha.w_k, mha.w_v, mha.w_o))
    x = x.double()
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    heads = []
    for h in range(mha.n_heads):
        sl = slice(h * mha.d_head, (h + 1) * mha.d_head)
        s = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(mha.d_head)
        s = s.masked_fill(~allowed[:, 0], float("-inf"))
        heads.append(torch.softmax(s, -1) @ v[..., sl])
    return torch.cat(heads, -1) @ wo.T + bo


def test_attention_matches_float64_reference_and_sdpa():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    allowed = padding_allowed(mask, mask)
    got = mha(x, x, allowed)
    ref = reference_mha(mha, x, allowed)
    torch.testing.assert_close(got[mask].double(), ref[mask], atol=1e-5, rtol=1e-5)
    # torch's fused kernel on the same projections agrees on real query positions
    q = mha.w_q(x).view(3, 5, 4, 4).transpose(1, 2)
    k = mha.w_k(x).view(3, 5, 4, 4).transpose(1, 2)
    v = mha.w_v(x).view(3, 5, 4, 4).transpose(1, 2)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    fused = mha.w_o(sdpa.transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(got[mask], fused[mask], atol=1e-5, rtol=1e-5)


def test_padding_keys_exactly_zero_and_rows_sum_to_one(tiny_model, tiny_batch):
    _, cache = record(tiny_model, tiny_batch)
    p = cache.stack()                                                     # [layer, batch, head, query, key]
    m = tiny_batch.attention_mask
    pad_key = (~m)[None, :, None, None, :].expand_as(p)
    pad_query = (~m)[None, :, None, :, None].expand_as(p)
    assert (p[pad_key] == 0).all()                                          # padded keys: exactly 0
    assert (p[pad_query] == 0).all()                                        # padded queries: zero rows
    rows = p.sum(-1)[m[None, :, None, :].expand(p.shape[:4])]               # real queries
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_causal_mask_upper_triangle_exactly_zero():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=10, tgt_vocab_size=12, d_model=16, n_heads=2, n_layers=2, dropout=0.0)
    net = TransformerSeq2Seq(cfg).eval()
    src, tgt = torch.randint(5, 10, (2, 6)), torch.randint(5, 12, (2, 5))
    tgt_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with recording(net, "decoder.layers.*.pattern") as cache:
        net(src, torch.ones_like(src, dtype=torch.bool), tgt, tgt_mask)
    self_p = cache.stack("decoder.layers.*.self_attn.pattern")             # [layer, batch, head, tgt, tgt]
    upper = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert (self_p[..., upper] == 0).all()
    rows = self_p.sum(-1)[:, tgt_mask[:, None, :].expand(2, 2, 5)]
    torch.testing.assert_close(rows, torch.ones_like(rows))
    cross = cache.stack("decoder.layers.*.cross_attn.pattern")
    assert cross.shape == (2, 2, 2, 5, 6)                                  # queries from decoder, keys from encoder
    assert causal_allowed(tgt_mask)[1, 0, 4].sum() == 0                    # padded query attends nothing


def test_sinusoidal_values():
    pe = sinusoidal_table(50, 8)
    for pos in (0, 1, 7, 49):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_noam_schedule_values():
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = NoamLR(opt, d_model=512, warmup=4000)
    seen = []
    for _ in range(8000):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(512**-0.5 * 1 * 4000**-1.5)           # step 1
    assert seen[3999] == pytest.approx(512**-0.5 * 4000**-0.5)            # peak at step = warmup
    assert seen[7999] == pytest.approx(512**-0.5 * 8000**-0.5)            # then step^-0.5
    assert max(range(8000), key=seen.__getitem__) == 3999
    assert noam_lr(10, d_model=64, warmup=4, factor=2.0) == pytest.approx(2 * 64**-0.5 * 10**-0.5)
    with pytest.raises(ValueError, match="warmup must be a positive int"):
        NoamLR(opt, d_model=512, warmup=0)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_post_and_pre_ln_blocks(norm):
    model = make_tiny_model(norm=norm)
    layer = model.net.encoder.layers[0]
    x = torch.randn(1, 4, 16)
    allowed = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    a = layer.self_attn
    if norm == "post":   # LayerNorm(x + sublayer(x))
        expected = layer.attn_block.norm(x + a(x, x, allowed))
    else:                # x + sublayer(LayerNorm(x))
        h = layer.attn_block.norm(x)
        expected = x + a(h, h, allowed)
    torch.testing.assert_close(layer.attn_block(x, lambda h: a(h, h, allowed)), expected)
    assert isinstance(model.net.encoder.final_norm, torch.nn.LayerNorm) == (norm == "pre")


def test_mean_pooling_ignores_padding():
    model = make_tiny_model(pooling="mean")
    one = model(model.encode(["the film was good"]))
    padded = model(model.encode(["the film was good", "a boring plot and the story was bad"]))[:1]
    torch.testing.assert_close(one, padded, atol=1e-6, rtol=1e-5)


# -- initialisation ----------------------------------------------------------------------------------
def glorot_bound(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape                                              # nn.Linear / nn.Embedding layout
    return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize("kind", ["classifier", "seq2seq"])
def test_constructors_start_glorot_uniform_with_zero_pad_rows(kind):
    cfg = TransformerConfig(vocab_size=50, n_classes=3, tgt_vocab_size=40 if kind == "seq2seq" else 0,
                            d_model=64, n_heads=4, n_layers=2, d_ff=128)
    torch.manual_seed(0)
    net = TransformerClassifier(cfg) if kind == "classifier" else TransformerSeq2Seq(cfg)
    embeddings = [m for m in net.modules() if isinstance(m, torch.nn.Embedding)]
    assert len(embeddings) == (1 if kind == "classifier" else 2)
    for m in embeddings:
        assert (m.weight[cfg.pad_id] == 0).all()                            # [PAD] contributes nothing
    for name, w in net.named_parameters():
        if w.dim() < 2:
            continue
        real = torch.cat([w[: cfg.pad_id], w[cfg.pad_id + 1 :]]) if "embed" in name else w
        bound = glorot_bound(w)
        assert real.abs().max() <= bound, name
        # U(-b, b) has standard deviation b/√3; N(0, 1) embeddings or Kaiming-uniform linears would not
        assert real.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), name
    torch.manual_seed(0)
    again = TransformerClassifier(cfg) if kind == "classifier" else TransformerSeq2Seq(cfg)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


# -- hooks -----------------------------------------------------------------------------------------
def test_recording_is_bitwise_neutral_and_leaves_no_hook(tiny_model, tiny_batch):
    plain = tiny_model(tiny_batch)
    logits, cache = record(tiny_model, tiny_batch, grads=True)
    assert torch.equal(plain, logits)
    assert len(cache) == tiny_model.n_layers and cache.stack().shape[:3] == (2, 4, 2)
    assert active_hook_count(tiny_model.net) == 0


def test_gradients_reach_the_recorded_patterns(tiny_model, tiny_batch):
    logits, cache = record(tiny_model, tiny_batch, grads=True)
    logits[:, 1].sum().backward()
    g = cache.grads()                                                      # [layer, batch, head, query, key]
    assert g.shape == cache.stack().shape and g.abs().sum() > 0
    # d(output)/d(A) by finite differences on one entry of layer 1
    site = "encoder.layers.1.self_attn.pattern"
    base = cache[site].detach()
    eps = 1e-3
    bumped = base.clone()
    bumped[0, 0, 0, 1] += eps
    with hooks(tiny_model, {site: replace(bumped)}):
        up = tiny_model(tiny_batch)[0, 1]
    fd = (up - logits[0, 1]).item() / eps
    assert fd == pytest.approx(g[1, 0, 0, 0, 1].item(), rel=2e-2, abs=1e-4)


def test_hooks_removed_after_exception(tiny_model, tiny_batch):
    def boom(pattern, allowed):
        raise RuntimeError("inside forward")

    with pytest.raises(RuntimeError, match="inside forward"):
        with hooks(tiny_model, {"encoder.layers.0.self_attn.pattern": boom}):
            tiny_model(tiny_batch)
    with pytest.raises(RuntimeError, match="inside forward"):
        with recording(tiny_model):
            with hooks(tiny_model, {"*.pattern": boom}):
                tiny_model(tiny_batch)
    assert active_hook_count(tiny_model.net) == 0


def test_unknown_site_lists_valid_names(tiny_model):
    with pytest.raises(ValueError, match=r"Unknown hook site 'encoder.layers.9.*Available: encoder.layers.0.self_attn.pattern"):
        with hooks(tiny_model, {"encoder.layers.9.self_attn.pattern": uniform()}):
            pass
    assert active_hook_count(tiny_model.net) == 0


# -- interventions -----------------------------------------------------------------------------------
def edited_patterns(model, batch, edit, site="*.pattern"):
    with hooks(model, {site: edit}):
        logits, cache = record(model, batch)
    return logits, cache.stack()


def test_uniform_intervention(tiny_model, tiny_batch):
    plain = tiny_model(tiny_batch)
    logits, p = edited_patterns(tiny_model, tiny_batch, uniform())
    m = tiny_batch.attention_mask
    n = m.sum(1).float()                                                   # [batch]
    for i in range(len(tiny_batch)):
        real = m[i]
        got = p[:, i][:, :, real][..., real]                               # [layer, head, query, key], real only
        torch.testing.assert_close(got, (1 / n[i]).expand_as(got))
    assert not torch.allclose(plain, logits)


def test_permutation_keeps_values_and_masks(tiny_model, tiny_batch):
    _, orig = record(tiny_model, tiny_batch)
    site = "encoder.layers.0.self_attn.pattern"
    _, p = edited_patterns(tiny_model, tiny_batch, permute(seed=3), site)
    a, b = orig[site], p[0]
    torch.testing.assert_close(a.sort(-1).values, b.sort(-1).values)     # same multiset per row
    pad_key = (~tiny_batch.attention_mask)[:, None, None, :].expand_as(b)
    assert (b[pad_key] == 0).all()                                         # masked keys stay 0
    assert not torch.equal(a, b)
    _, again = edited_patterns(tiny_model, tiny_batch, permute(seed=3), site)
    assert torch.equal(b, again[0])                                        # seeded


def test_zero_head_and_zero_key(tiny_model, tiny_batch):
    site = "encoder.layers.1.self_attn.pattern"
    _, p = edited_patterns(tiny_model, tiny_batch, zero_head(1), site)
    assert (p[1, :, 1] == 0).all() and (p[1, :, 0] != 0).any()
    _, orig = record(tiny_model, tiny_batch)
    _, q = edited_patterns(tiny_model, tiny_batch, zero_key(2), site)
    a = orig[site]
    assert (q[1][..., 2] == 0).all()
    expected = a.clone()
    expected[..., 2] = 0
    expected = expected / expected.sum(-1, keepdim=True).clamp_min(1e-30)
    real = tiny_batch.attention_mask
    torch.testing.assert_close(q[1].permute(0, 2, 1, 3)[real], expected.permute(0, 2, 1, 3)[real])
    # zeroing a head's probabilities equals zeroing its slice of W^O (the head contributes nothing)
    with hooks(tiny_model, {"*.pattern": zero_head(0)}):
        ablated = tiny_model(tiny_batch)
    import copy
    twin = copy.deepcopy(tiny_model)
    for layer in twin.net.encoder.layers:
        layer.self_attn.w_o.weight.data[:, : layer.self_attn.d_head] = 0
    torch.testing.assert_close(ablated, twin(tiny_batch), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="head must be an int in"):
        edited_patterns(tiny_model, tiny_batch, zero_head(5), site)


def test_replace_with_wrong_shape_is_a_clear_error(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match="does not broadcast"):
        edited_patterns(tiny_model, tiny_batch, replace(torch.ones(3, 3)), "encoder.layers.0.self_attn.pattern")
    assert active_hook_count(tiny_model.net) == 0


# -- interface and checkpoints ---------------------------------------------------------------------
def test_encode_layout_and_errors(tiny_model, tiny_examples):
    b = tiny_model.encode(tiny_examples)
    assert b.tokens[1][:5] == ["[CLS]", "a", "boring", "plot", "[SEP]"]
    assert b.special_mask[1].tolist()[:5] == [True, False, False, False, True]
    assert b.rationale[1].tolist()[:5] == [0, 0, 1, 0, 0]                # word i -> token i + 1
    assert b.labels.tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="empty or whitespace-only"):
        tiny_model.encode(["fine", "   "])
    with pytest.raises(ValueError, match="takes at most 30"):
        tiny_model.encode(["word " * 40])
    cut = tiny_model.encode(["word " * 40], truncate=True)
    assert cut.truncated == [True] and cut.input_ids.shape[1] == 32
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 18\]"):
        tiny_model.logits(torch.tensor([[1, 99]]), torch.ones(1, 2, dtype=torch.bool))


def test_predict_proba_shape_and_sum(tiny_model):
    p = tiny_model.predict_proba(["the film was good", "bad", "a great story"])
    assert p.shape == (3, 2)
    assert abs(p.sum(1) - 1).max() < 1e-6


def test_checkpoint_round_trip_identical_logits(tmp_path, tiny_model, tiny_batch):
    save_checkpoint(tiny_model, tmp_path / "m", extra={"task": {"name": "unit"}})
    loaded = load_model(tmp_path / "m")
    loaded.net.eval()
    assert torch.equal(tiny_model(tiny_batch), loaded(tiny_batch))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architecture"]["norm"] == "post" and cfg["vocab"][:5] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    assert cfg["task"] == {"name": "unit"}


def test_seq2seq_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    v = Vocab.build(["a b c d"])
    net = TransformerSeq2Seq(TransformerConfig(vocab_size=len(v), tgt_vocab_size=len(v), d_model=16, n_heads=2, n_layers=1))
    model = Translator(net, v, v)
    save_checkpoint(model, tmp_path / "s")
    loaded = load_model(tmp_path / "s")
    assert isinstance(loaded, Translator) and loaded.translate(["a b c"]) == model.translate(["a b c"])


def test_checkpoint_errors(tmp_path, tiny_model):
    folder = save_checkpoint(tiny_model, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_model(tmp_path / "nowhere")
    (folder / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(folder)
    save_checkpoint(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architecture"]["d_model"] = 32
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(folder)


def test_pickle_checkpoint_is_refused_and_never_run(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    (folder / "config.json").write_text(json.dumps({"format": "attnaudit", "kind": "classifier"}))
    with pytest.raises(ValueError, match="pickle-based checkpoint"):
        load_model(folder)
    assert not marker.exists()


def test_non_finite_weights_refused(tmp_path, tiny_model):
    folder = tmp_path / "m"
    tiny_model.net.head.bias.data[0] = float("nan")
    save_checkpoint(tiny_model, folder)
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_model(folder)


def test_installed_names_import():
    import attnaudit
    import attnaudit.analyses
    import attnaudit.explain
    import attnaudit.model

    assert attnaudit.__version__
    assert attnaudit.model.__name__ == "attnaudit.model"


@pytest.mark.slow
def test_the_install_exposes_only_the_attnaudit_names(tmp_path):
    """Outside the checkout, the folders model/, explain/, analyses/ are reachable only as attnaudit.*.

    Run from an empty folder so that the checkout (whatever its folder is called) is not on sys.path."""
    code = ("import importlib.util, attnaudit.model, attnaudit.explain, attnaudit.analyses\n"
            "print([n for n in ('model', 'explain', 'analyses') if importlib.util.find_spec(n) is not None])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_pickle_file_path_is_refused_with_how_to_convert(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pt"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")     # a pickle that would run a command
    with pytest.raises(ValueError, match="pickle-based checkpoint file.*safetensors.torch.save_file"):
        load_model(path)
    assert not marker.exists()
