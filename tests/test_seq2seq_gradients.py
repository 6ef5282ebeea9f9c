"""Integrated gradients, DeepLIFT and GradientSHAP of a teacher-forced target (explain/seq2seq_gradients.py) on a tiny
built-in Translator and tiny random HF BART / T5: equal to captum run once per target position, IG complete,
GradientSHAP's draws seeded per example. Nothing is trained or downloaded."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import captum.attr
import pytest
import torch
from test_seq2seq_attention_family import EXAMPLES

from attnaudit.data.examples import Example
from attnaudit.explain.control import example_seed, seeded
from attnaudit.explain.seq2seq_gradients import (
    LogProbForward,
    deeplift,
    forward_args,
    gradient_shap,
    integrated_gradients,
    integrated_gradients_with_gap,
    source_baseline,
    trimmed_example,
)
from attnaudit.model.seq2seq import PairBatch, Translator
from attnaudit.model.transformer import TransformerConfig, TransformerSeq2Seq
from attnaudit.model.vocab import Vocab

pytestmark = pytest.mark.usefixtures("one_thread_module")

HF_EXAMPLES = [Example("e0", "the cat sat on the mat", target="die katze sass"),
               Example("e1", "unlikely dog", target="der hund lief und lief")]
# measured max |Σ_src IG − (f(x) − f(x'))| over (example, t) at n_steps=50 (medians in brackets): built-in 0.0058
# (0.0008), BART 0.0090 (0.0013), T5 0.031 (0.0066), against a median |f(x) − f(x')| of 0.12, 0.94, 0.22; at 200
# steps 0.0009, 1e-5, 0.0043. The ReLUs of T5 and of the built-in model make the integrand jump along the path.
COMPLETENESS_ATOL = {"builtin": 0.015, "bart": 0.025, "t5": 0.06}
CAPTUM_ATOL = 1e-5        # measured: at most 7e-8 against captum's per-position IntegratedGradients


def tiny_translator(n_layers: int = 2, seed: int = 0) -> Translator:
    """As tests/test_seq2seq_attention_family.py: random weights, nonzero biases, dropout on (eval mode is ours)."""
    torch.manual_seed(seed)
    src, tgt = Vocab.build(["a b c d e"]), Vocab.build(["e d c b a"])
    cfg = TransformerConfig(vocab_size=len(src), tgt_vocab_size=len(tgt), d_model=16, n_heads=2, n_layers=n_layers,
                            d_ff=32, max_len=16, dropout=0.1)
    model = Translator(TransformerSeq2Seq(cfg), src, tgt)
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def tiny_hf(arch: str):
    transformers = pytest.importorskip("transformers", reason="the HF adapter needs: pip install 'attnaudit[hf]'")
    from test_hf_seq2seq import WORDPIECE, tiny_net

    from attnaudit.model.hf_seq2seq import HFTranslator
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDPIECE)})
    return HFTranslator(tiny_net(arch, len(tok)), tok)


@pytest.fixture(scope="module")
def setups():
    """name -> (model, pairs): the built-in translator, BART and T5, each built once (lazily)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model = tiny_translator() if name == "builtin" else tiny_hf(name)
            cache[name] = (model, model.encode(EXAMPLES if name == "builtin" else HF_EXAMPLES))
        return cache[name]
    return get


MODELS = ["builtin", "bart", "t5"]


def captum_per_position(model, pairs: PairBatch, make, t: int, **kwargs) -> torch.Tensor:
    """captum's attribution class `make(forward)` at target position t, summed over d_model -> [batch, src]."""
    with model.evaluating():
        x = model.encoder_embeds(pairs.src.input_ids).detach().float()
        out = make(LogProbForward(model)).attribute(x.clone().requires_grad_(True), target=t,
                                                    additional_forward_args=forward_args(pairs, model.device), **kwargs)
    return out.detach().sum(-1)


# -- integrated gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_ig_equals_captum_per_position_and_is_complete(setups, name):
    model, pairs = setups(name)
    got = integrated_gradients_with_gap(model, pairs, n_steps=50, baseline="pad", max_batch=7)
    with model.evaluating():
        x = model.encoder_embeds(pairs.src.input_ids).detach().float()
        base = source_baseline(model, pairs.src, x, "pad")
    assert got.scores.shape == (*pairs.tgt_out.shape, pairs.src.input_ids.shape[1]) and got.scores.dtype == torch.float32
    on, last = pairs.tgt_mask, pairs.tgt_out.shape[1] - 1
    for t in sorted({0, last // 2, last}):                                       # first, middle and last position
        ref = captum_per_position(model, pairs, lambda f: captum.attr.IntegratedGradients(f), t, baselines=base,
                                  n_steps=50, method="gausslegendre")            # [batch, src]
        torch.testing.assert_close(got.scores[:, t][on[:, t]], ref[on[:, t]], atol=CAPTUM_ATOL, rtol=0)
    # completeness against an explicit forward: f(x) − f(x') from the model's own teacher-forced logits
    with model.evaluating(), torch.no_grad():
        f_x = model(pairs).float().log_softmax(-1).gather(-1, pairs.tgt_out[..., None])[..., 0]
        f_b = model.logits_from_src_embeds(base, pairs).float().log_softmax(-1).gather(-1, pairs.tgt_out[..., None])[..., 0]
    torch.testing.assert_close(got.change[on], (f_x - f_b)[on], atol=1e-5, rtol=1e-5)
    gap = got.scores.sum(-1) - got.change                                          # [batch, tgt]
    torch.testing.assert_close(got.gap, torch.where(on, gap, 0.0))
    assert got.gap[on].abs().max() < COMPLETENESS_ATOL[name]
    assert (got.gap[~on] == 0).all() and (got.scores[~on] == 0).all()             # target padding: no unit


def test_ig_gap_shrinks_with_steps_and_chunks_do_not_matter(setups):
    model, pairs = setups("builtin")
    coarse = integrated_gradients_with_gap(model, pairs, n_steps=10).gap.abs().max()
    fine = integrated_gradients_with_gap(model, pairs, n_steps=200).gap.abs().max()
    assert fine < coarse / 5                                                        # measured 0.027 -> 0.0009
    whole = integrated_gradients(model, pairs, n_steps=20, max_batch=256)
    torch.testing.assert_close(integrated_gradients(model, pairs, n_steps=20, max_batch=3), whole, atol=1e-6, rtol=0)


def test_ig_zero_on_padding_and_specials_keep_their_embeddings(setups):
    model, pairs = setups("builtin")
    for kind in ("pad", "mask", "zero"):
        s = integrated_gradients(model, pairs, n_steps=8, baseline=kind)
        pad = ~pairs.src.attention_mask                                            # [batch, src]
        assert (s.transpose(1, 2)[pad] == 0).all()                                 # source padding
        special = pairs.src.special_mask & pairs.src.attention_mask                # x − x' = 0 there
        assert s.transpose(1, 2)[special].abs().max() == 0
    # the built-in [PAD] row is zero (padding_idx), so "pad" and "zero" coincide
    torch.testing.assert_close(integrated_gradients(model, pairs, n_steps=8, baseline="pad"),
                               integrated_gradients(model, pairs, n_steps=8, baseline="zero"))


# -- DeepLIFT ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["builtin", "bart"])
def test_deeplift_equals_captum_per_position(setups, name):
    model, pairs = setups(name)
    got = deeplift(model, pairs, baseline="mask")
    with model.evaluating():
        base = source_baseline(model, pairs.src, model.encoder_embeds(pairs.src.input_ids).detach().float(), "mask")
    on = pairs.tgt_mask
    for t in (0, pairs.tgt_out.shape[1] - 1):
        with pytest.warns(UserWarning, match="Setting forward, backward hooks"):
            ref = captum_per_position(model, pairs, lambda f: captum.attr.DeepLift(f), t, baselines=base)
        torch.testing.assert_close(got[:, t][on[:, t]], ref[on[:, t]], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all() and (got[~on] == 0).all()


# -- GradientSHAP -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["builtin", "bart"])
def test_gradient_shap_equals_captum_with_the_example_seed_at_every_position(setups, name):
    model, pairs = setups(name)
    got = gradient_shap(model, pairs, n_samples=5, stdevs=0.1, seed=3)
    i = 1
    one = trimmed_example(pairs, i)
    real = pairs.src.input_ids[i][pairs.src.attention_mask[i]].tolist()
    with model.evaluating():
        x = model.encoder_embeds(one.src.input_ids).detach().float()
        refs = torch.cat([source_baseline(model, one.src, x, k) for k in ("pad", "mask", "zero")])
    n_src = one.src.input_ids.shape[1]
    for t in range(int(pairs.tgt_mask[i].sum())):                                 # each position: the same seed
        with seeded(example_seed(3, real)):
            ref = captum_per_position(model, one, lambda f: captum.attr.GradientShap(f), t, baselines=refs,
                                      n_samples=5, stdevs=0.1)                    # [1, src_i]
        torch.testing.assert_close(got[i, t, :n_src], ref[0], atol=1e-5, rtol=1e-5)
    assert (got[i, :, n_src:] == 0).all()


def test_gradient_shap_alone_equals_in_batch_and_seed_matters(setups):
    model, pairs = setups("builtin")
    both = gradient_shap(model, pairs, n_samples=4, seed=0)
    for i in range(len(pairs.src)):
        alone = gradient_shap(model, pairs.rows([i]), n_samples=4, seed=0)        # [1, tgt, src]
        torch.testing.assert_close(alone[0], both[i])
    assert not torch.equal(gradient_shap(model, pairs, n_samples=4, seed=1), both)


# -- parameter checks -------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda m, p: integrated_gradients(m, p, baseline="unk"), "baseline must be one of 'pad', 'mask', 'zero'; got 'unk'"),
    (lambda m, p: integrated_gradients(m, p, n_steps=0), "n_steps must be an int >= 1; got 0"),
    (lambda m, p: integrated_gradients(m, p, max_batch=1.5), "max_batch must be an int >= 1; got 1.5"),
    (lambda m, p: deeplift(m, p, baseline=None), "baseline must be one of"),
    (lambda m, p: gradient_shap(m, p, baselines="pad"), "baselines must be a non-empty tuple"),
    (lambda m, p: gradient_shap(m, p, baselines=("pad", "x")), "each of baselines must be one of"),
    (lambda m, p: gradient_shap(m, p, stdevs=-1.0), "stdevs must be a number >= 0"),
    (lambda m, p: gradient_shap(m, p, seed="0"), "seed must be an int"),
    (lambda m, p: integrated_gradients(m, p.src), "pairs must be a PairBatch"),
    (lambda m, p: deeplift(m, PairBatch(p.src)), "this PairBatch has no targets"),
])
def test_bad_parameters_are_named(setups, call, message):
    model, pairs = setups("builtin")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(model, pairs)
