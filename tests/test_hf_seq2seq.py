"""HuggingFace encoder–decoders (BART, T5, Marian) behind the `Translator` interface: tiny random folders written
here with a tiny WordPiece tokenizer, compared with transformers' own eager forward. Nothing is downloaded."""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the HuggingFace adapter needs the optional extra: pip install 'attnaudit[hf]'")

from attnaudit.data.examples import Example
from attnaudit.model.hf_seq2seq import SEQ2SEQ_ATTENTION, SEQ2SEQ_SUPPORTED, HFTranslator, load_hf_seq2seq
from attnaudit.model.hooks import active_hook_count, hooks, record, recording
from attnaudit.model.interventions import uniform
from attnaudit.model.seq2seq import PairBatch

pytestmark = pytest.mark.usefixtures("one_thread_module")

WORDPIECE = ("[PAD] [UNK] [CLS] [SEP] [MASK] the a cat dog sat ran on mat und die katze hund sass lief auf der "
             "matte is good un ##like ##ly").split()
PAD, CLS, SEP = 0, 2, 3
ARCHS = SEQ2SEQ_SUPPORTED
EXAMPLES = [Example("e0", "the cat sat on the mat", target="die katze sass auf der matte"),
            Example("e1", "a dog ran", target="der hund lief und lief"),
            Example("e2", "unlikely", target="die")]


def tiny_net(arch: str, vocab_size: int):
    """A seeded random encoder–decoder: d_model 32, 2 + 2 layers, 2 or 4 heads; [SEP] ends, [CLS] begins."""
    t = transformers
    ids = dict(vocab_size=vocab_size, d_model=32, pad_token_id=PAD, bos_token_id=CLS, eos_token_id=SEP)
    # init_std 0.3: with the default 0.02 attention is near-uniform and edits barely move the logits
    bart_like = dict(encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     max_position_embeddings=64, init_std=0.3)
    cfg = {
        "bart": lambda: t.BartConfig(**ids, **bart_like, encoder_attention_heads=4, decoder_attention_heads=4,
                                     decoder_start_token_id=SEP, forced_eos_token_id=None),
        "t5": lambda: t.T5Config(**ids, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 decoder_start_token_id=PAD),
        "marian": lambda: t.MarianConfig(**ids, **bart_like, encoder_attention_heads=2, decoder_attention_heads=2,
                                         decoder_start_token_id=PAD),
    }[arch]()
    torch.manual_seed(0)
    return t.AutoModelForSeq2SeqLM.from_config(cfg).eval()


def write_folder(path, arch: str):
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDPIECE)})
    tiny_net(arch, len(tok)).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {a: write_folder(tmp_path_factory.mktemp(a), a) for a in ARCHS}


@pytest.fixture(scope="module")
def models(folders):
    return {a: load_hf_seq2seq(f) for a, f in folders.items()}


@pytest.fixture(scope="module")
def pairs(models):
    return {a: m.encode(EXAMPLES) for a, m in models.items()}


def eager_reference(folder):
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True, attn_implementation="eager").eval()


def reference_logits(net, p: PairBatch) -> torch.Tensor:
    tgt_in, _, tgt_mask = p.targets()
    return net(input_ids=p.src.input_ids, attention_mask=p.src.attention_mask.long(), decoder_input_ids=tgt_in,
               decoder_attention_mask=tgt_mask.long(), use_cache=False).logits           # [batch, tgt, vocab]


# -- loading and encoding -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_loads_verified_with_sizes_and_sites(models, arch):
    m = models[arch]
    assert isinstance(m, HFTranslator) and m.kind == "seq2seq"
    assert m.config["model_type"] == arch and m.config["attention"] == SEQ2SEQ_ATTENTION
    assert m.config["verified_max_abs_diff"] <= 1e-5
    assert m.net.config._attn_implementation == SEQ2SEQ_ATTENTION
    assert (m.n_layers, m.n_decoder_layers) == (2, 2) and m.n_heads == m.n_decoder_heads == (2 if arch == "marian" else 4)
    assert (m.pad_id, m.mask_id, m.vocab_size) == (PAD, WORDPIECE.index("[MASK]"), len(WORDPIECE))
    assert m.attention_sites == ["encoder.layers.0.self_attn.pattern", "encoder.layers.1.self_attn.pattern"]
    assert m.decoder_self_attention_sites == [f"decoder.layers.{i}.self_attn.pattern" for i in range(2)]
    assert m.cross_attention_sites == [f"decoder.layers.{i}.cross_attn.pattern" for i in range(2)]
    assert list(m.hook_points()) == [
        f"{p}.{kind}" for p in ("encoder.layers.0.self_attn", "encoder.layers.1.self_attn",
                                "decoder.layers.0.self_attn", "decoder.layers.0.cross_attn",
                                "decoder.layers.1.self_attn", "decoder.layers.1.cross_attn") for kind in ("pattern", "values")]
    assert m.max_len == (512 if arch == "t5" else 64)


def test_encode_builds_the_teacher_forcing_target(models):
    m = models["bart"]
    p = m.encode(EXAMPLES)
    tgt_in, tgt_out, tgt_mask = p.targets()
    labels = m.tokenizer(text_target=[e.target for e in EXAMPLES])["input_ids"]
    for i, row in enumerate(labels):
        n = len(row)
        assert tgt_out[i, :n].tolist() == row and bool((tgt_out[i, n:] == PAD).all())      # [CLS] ... [SEP], [PAD]
        assert tgt_mask[i].tolist() == [True] * n + [False] * (tgt_mask.shape[1] - n)
    assert bool((tgt_in[:, 0] == m.decoder_start_id).all()) and m.decoder_start_id == SEP
    assert torch.equal(tgt_in[:, 1:][tgt_mask[:, 1:]], tgt_out[:, :-1][tgt_mask[:, 1:]])   # shifted by one
    shifted = transformers.models.bart.modeling_bart.shift_tokens_right(tgt_out, PAD, SEP)
    assert torch.equal(tgt_in[tgt_mask], shifted[tgt_mask])                                  # as transformers does
    s = p.src
    assert s.tokens[2][:5] == ["[CLS]", "un", "##like", "##ly", "[SEP]"]
    assert s.special_mask[0, 0] and s.special_mask[0, 7] and not s.special_mask[0, 1:7].any()
    assert s.attention_mask.sum(1).tolist() == [8, 5, 5]
    assert m.word_ids(p)[2][:5] == [None, 0, 0, 0, None]
    assert m.encode(["a dog ran"]).tgt_in is None                                            # texts: no target


def test_encode_refuses_too_long_and_empty(models):
    m = models["bart"]
    with pytest.raises(ValueError, match="takes at most 64"):
        m.encode(["the " * 70])
    assert m.encode(["the " * 70], truncate=True).src.input_ids.shape == (1, 64)
    with pytest.raises(ValueError, match="empty or whitespace-only"):
        m.encode(["  "])


# -- the forward against transformers -------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forced_logits_equal_plain_eager(folders, models, pairs, arch):
    m, p = models[arch], pairs[arch]
    with torch.no_grad():
        ours = m(p)                                                                          # [batch, tgt, vocab]
        ref = reference_logits(eager_reference(folders[arch]), p)
    real = p.tgt_mask
    assert ours.shape == (3, real.shape[1], len(WORDPIECE))
    diff = float((ours[real] - ref[real]).abs().max())
    print(f"{arch}: max |logit diff| vs plain eager = {diff:.3g}")
    assert diff <= 1e-5 and float(ref.abs().max()) > 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_patterns_shapes_rows_and_causality(models, pairs, arch):
    m, p = models[arch], pairs[arch]
    logits, cache = record(m, p)
    torch.testing.assert_close(logits, m(p))                                                 # recording changes nothing
    b, s, t, h = 3, p.src.input_ids.shape[1], p.tgt_in.shape[1], m.n_heads
    src, tgt = p.src.attention_mask, p.tgt_mask
    shapes = {"encoder.*.self_attn.pattern": (b, h, s, s), "decoder.*.self_attn.pattern": (b, h, t, t),
              "decoder.*.cross_attn.pattern": (b, h, t, s)}
    for glob, shape in shapes.items():
        assert len(cache.names(glob)) == 2 and all(cache[n].shape == shape for n in cache.names(glob))
    for name in cache.names():
        a = cache[name]                                                                      # [batch, head, query, key]
        query = src if name.startswith("encoder.") else tgt
        key = tgt if ".self_attn." in name and name.startswith("decoder.") else src
        sums = a.sum(-1).permute(0, 2, 1)                                                    # [batch, query, head]
        torch.testing.assert_close(sums[query], torch.ones_like(sums[query]))                # real rows sum to 1
        assert bool((sums[~query] == 0).all())                                               # padded rows all 0
        assert bool((a.permute(0, 1, 3, 2)[~key[:, None].expand(b, h, -1)] == 0).all())      # padded keys get 0
    for name in m.decoder_self_attention_sites:
        assert bool((cache[name].triu(1) == 0).all())                                        # causal: exactly 0
    _, values = record(m, p, names="*.values")
    assert values["decoder.layers.0.cross_attn.values"].shape[:3] == (b, h, s)              # [batch, head, key, d_head]


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_edit_changes_nothing_and_hooks_go(models, pairs, arch):
    m, p = models[arch], pairs[arch]
    with torch.no_grad(), hooks(m, {"*.pattern": lambda a, allowed: a.clone()}):
        same = m(p)
    torch.testing.assert_close(same, m(p))
    assert sum(active_hook_count(hp) for hp in m.hook_points().values()) == 0


def uniform_cross_by_hand(folder, arch: str, p: PairBatch) -> torch.Tensor:
    """Plain eager transformers with every cross-attention output replaced by W^O·mean over real source of W^V·h:
    what uniform cross-attention computes (each head's output is the mean of its values)."""
    net = eager_reference(folder)
    mask = p.src.attention_mask[:, :, None].float()                                          # [batch, src, 1]
    v_name, o_name = ("v", "o") if arch == "t5" else ("v_proj", "out_proj")

    def hook(module, args, kwargs, output):
        memory = kwargs["key_value_states"]                                                  # [batch, src, d_model]
        v = getattr(module, v_name)(memory)                                                  # [batch, src, inner]
        mean = (v * mask).sum(1) / mask.sum(1)                                               # [batch, inner]
        out = getattr(module, o_name)(mean)[:, None].expand(-1, output[0].shape[1], -1)     # [batch, tgt, d_model]
        return (out, *output[1:])

    dec = net.get_decoder()
    modules = [blk.layer[1].EncDecAttention for blk in dec.block] if arch == "t5" else [x.encoder_attn for x in dec.layers]
    handles = [mod.register_forward_hook(hook, with_kwargs=True) for mod in modules]
    try:
        return reference_logits(net, p)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_cross_attention_edit_matches_hand_forward(folders, models, pairs, arch):
    m, p = models[arch], pairs[arch]
    with torch.no_grad():
        before = m(p)
        with hooks(m, {"decoder.*.cross_attn.pattern": uniform()}):
            edited, cache = record(m, p, names=m.cross_attention_sites)
        by_hand = uniform_cross_by_hand(folders[arch], arch, p)
    real = p.tgt_mask
    assert float((edited[real] - before[real]).abs().max()) > 1e-3                           # the edit matters
    torch.testing.assert_close(edited[real], by_hand[real], rtol=1e-4, atol=1e-5)
    a = cache[m.cross_attention_sites[0]]                                                    # recorded after the edit
    n_src = p.src.attention_mask.sum(1).float()                                              # [batch]
    torch.testing.assert_close(a[0, :, 0, : int(n_src[0])], torch.full_like(a[0, :, 0, : int(n_src[0])], 1 / n_src[0]))


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_cross_attention_and_source_embeddings(models, pairs, arch):
    m, p = models[arch], pairs[arch]
    logits, cache = record(m, p, names="decoder.*.cross_attn.pattern", grads=True)
    logits[0, 2, int(p.tgt_out[0, 2])].backward()
    g = cache.grads("decoder.*.cross_attn.pattern")                                          # [layer, batch, head, tgt, src]
    assert g.shape == (2, *cache[m.cross_attention_sites[0]].shape)
    assert float(g[:, 0].abs().sum()) > 0 and float(g[:, 1:].abs().sum()) == 0               # only example 0's output
    emb = m.encoder_embeds(p.src.input_ids).detach().requires_grad_(True)                    # [batch, src, d_model]
    out = m.logits_from_src_embeds(emb, p)                                                   # [batch, tgt, vocab]
    torch.testing.assert_close(out, m(p))
    out[1, 0].sum().backward()
    assert emb.grad is not None and float(emb.grad[1].abs().sum()) > 0 and float(emb.grad[0].abs().sum()) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_translate_returns_strings(models, arch):
    m = models[arch]
    out = m.translate(["the cat sat on the mat", "a dog"], max_len=6)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert all(len(m.tokenizer(s, add_special_tokens=False)["input_ids"]) <= 6 for s in out)   # at most 6 tokens
    assert not any(special in s for s in out for special in ("[PAD]", "[SEP]", "[CLS]"))


def test_translate_refuses_a_bad_max_len(models):
    with pytest.raises(ValueError, match="max_len must be an int >= 1.*got 0"):
        models["bart"].translate(["a dog"], max_len=0)


def test_sdpa_in_config_json_still_gets_our_attention(folders, tmp_path):
    for f in folders["bart"].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "_attn_implementation": "sdpa",
                                                      "attn_implementation": "sdpa"}))
    m = load_hf_seq2seq(tmp_path)
    assert m.net.config._attn_implementation == SEQ2SEQ_ATTENTION and m.config["verified_max_abs_diff"] <= 1e-5
    _, cache = record(m, m.encode(EXAMPLES[:1]))
    assert len(cache) == 6


def test_translate_runs_through_the_sites(models):
    """Greedy decoding goes through the sites too: a recording sees the last step's cross-attention."""
    m = models["t5"]
    texts = ["the cat sat on the mat", "a dog"]
    with recording(m, m.cross_attention_sites) as cache:
        out = m.translate(texts, max_len=4)
    a = cache[m.cross_attention_sites[-1]]                                                   # [batch, head, tgt, src]
    assert len(out) == 2 and a.shape[:2] == (2, m.n_heads) and a.shape[3] == 8 and 2 <= a.shape[2] <= 4
    torch.testing.assert_close(a[1, :, :, :4].sum(-1), torch.ones(m.n_heads, a.shape[2]))   # "a dog": 4 real tokens
    assert bool((a[1, :, :, 4:] == 0).all())


# -- refusals -------------------------------------------------------------------------------------
def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: pickle-based weights.*AutoModelForSeq2SeqLM"):
        load_hf_seq2seq(tmp_path)


def test_wrong_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type must be one of bart, t5, marian.*'bert'"):
        load_hf_seq2seq(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_seq2seq(tmp_path / "absent")


def test_missing_tokenizer_is_refused(folders, tmp_path):
    for f in folders["marian"].iterdir():
        if f.name.startswith(("config", "model", "generation")):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_hf_seq2seq(tmp_path)


def test_an_attention_that_differs_from_eager_is_refused(folders, monkeypatch):
    """verify_attention compares with transformers' eager forward: a wrong attention raises at load."""
    import attnaudit.model.hf_seq2seq as hs
    from attnaudit.model import hf_seq2seq_attention as attn

    def too_sharp(module, query, *args, **kwargs):
        return attn.seq2seq_probs_attention(module, query * 3.0, *args, **kwargs)

    net = eager_reference(folders["bart"])
    tok = transformers.AutoTokenizer.from_pretrained(str(folders["bart"]), local_files_only=True)
    attn.register_seq2seq_attention()
    transformers.AttentionInterface.register(SEQ2SEQ_ATTENTION, too_sharp)
    monkeypatch.setattr(hs, "register_seq2seq_attention", lambda: None)
    try:
        with pytest.raises(RuntimeError, match="differ from transformers' eager attention"):
            HFTranslator(net, tok)
    finally:
        attn.register_seq2seq_attention()
