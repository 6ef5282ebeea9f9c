"""HuggingFace decoder-only models: GPT-2, Llama, Qwen2, Mistral, each with a sequence-classification and a causal-LM
head, as tiny random folders written here (hidden 32, 2 layers, 4 heads; Llama and Qwen2 with 2 key/value heads).
GPT-2 and Qwen2 use a byte-level BPE tokenizer built in code (no special tokens added, no pad: EOS pads); Llama and
Mistral the MiniLM BERT tokenizer (a leading [CLS] plays BOS). Nothing is downloaded (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the HuggingFace adapter needs the optional extra: pip install 'attnaudit[hf]'")

import attnaudit
from attnaudit.data.examples import Example
from attnaudit.model.hf_lm import HFDecoderClassifier, HFLanguageModel
from attnaudit.model.hf_load import minilm_path
from attnaudit.model.hooks import hooks, record
from attnaudit.model.interventions import uniform
from attnaudit.model.steps import last_logits

pytestmark = pytest.mark.usefixtures("one_thread_module")

ARCHS = ("gpt2", "llama", "qwen2", "mistral")
HEADS = ("classifier", "lm")
TEXTS = ["the film was good", "a boring plot and the film", "the story was not bad, and the actor was great", "good"]
PROMPTS = [Example(id="p0", text="the film was", target="good"),
           Example(id="p1", text="a boring plot and", target="the film was bad"),
           Example(id="p2", text="the actor", target="was great")]
EXPLAINERS = ("attention", "rollout", "grad_attention", "attention_norm", "saliency", "integrated_gradients")
FAST = {"integrated_gradients": {"n_steps": 4}}


def byte_bpe(cls):
    from tokenizers import pre_tokenizers

    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "f"), ("i", "l"), ("Ġf", "il"), ("Ġfil", "m")]
    tokens = ["<|endoftext|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), *("".join(m) for m in merges)]
    return cls(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def tokenizer(arch: str):
    if arch == "gpt2":
        return byte_bpe(transformers.GPT2Tokenizer)
    if arch == "qwen2":
        return byte_bpe(transformers.Qwen2Tokenizer)
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def tiny_config(arch: str, tok, **extra):
    t = transformers
    # initializer_range 0.3: with the default 0.02 attention is near-uniform and every check is weak
    special = dict(bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id or 0,
                   eos_token_id=tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id)
    common = dict(vocab_size=len(tok), num_labels=2, initializer_range=0.3, **special)
    llama_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return t.GPT2Config(**common, n_embd=32, n_layer=2, n_head=4, n_positions=64, **extra)
    kv = {"llama": 2, "qwen2": 2, "mistral": 4}[arch]
    cls = {"llama": t.LlamaConfig, "qwen2": t.Qwen2Config, "mistral": t.MistralConfig}[arch]
    return cls(**common, **llama_like, num_key_value_heads=kv, **extra)


def write_folder(path, arch: str, head: str, **extra):
    tok = tokenizer(arch)
    auto = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    torch.manual_seed(0)
    net = auto.from_config(tiny_config(arch, tok, **extra))
    net.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {(a, h): write_folder(tmp_path_factory.mktemp(f"{a}-{h}"), a, h) for a in ARCHS for h in HEADS}


@pytest.fixture(scope="module")
def models(folders):
    return {key: attnaudit.load_model(f) for key, f in folders.items()}


def plain_hf(folder, head: str):
    auto = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    return auto.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                attn_implementation="eager").eval()


def measured(key, diff: float) -> None:
    print(f"max |logit diff| vs plain HF {key}: {diff:.3g}")                   # pytest -s shows them


# -- loading ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head", HEADS)
def test_load_model_routes_decoder_folders(arch, head, models):
    model = models[arch, head]
    assert isinstance(model, HFLanguageModel if head == "lm" else HFDecoderClassifier)
    assert model.kind == head and model.readout == "last"
    assert (model.n_layers, model.n_heads) == (2, 4)
    assert model.attention_sites == ["decoder.layers.0.self_attn.pattern", "decoder.layers.1.self_attn.pattern"]
    assert {"decoder.layers.1.self_attn.values", *model.attention_sites} <= set(model.hook_points())
    assert model.config["verified_max_abs_diff"] <= 1e-5
    assert model.net.config._attn_implementation == "attnaudit"
    assert model.net.config.pad_token_id == model.pad_id == model.tokenizer.pad_token_id
    if head == "lm":
        assert model.n_classes == model.vocab_size == len(model.label_names)
        assert model.label_names[5] == model.tokenizer.convert_ids_to_tokens(5)
        assert "label_names" not in model.config
    else:
        assert model.n_classes == 2


def test_unsupported_type_lists_every_supported_one_and_kind_rules(tmp_path, folders):
    (tmp_path / "config.json").write_text('{"architectures": ["GPTJForCausalLM"], "model_type": "gptj"}')
    with pytest.raises(ValueError, match="model_type must be one of bert, distilbert, roberta, albert, electra, "
                                         "gpt2, llama, qwen2, mistral.* has 'gptj'"):
        attnaudit.load_model(tmp_path)
    with pytest.raises(ValueError, match="kind must be None"):
        attnaudit.load_model(folders["gpt2", "lm"], kind="seq2seq")
    with pytest.raises(ValueError, match="a language model's classes are its vocabulary"):
        attnaudit.load_model(folders["gpt2", "lm"], kind="lm", num_labels=2)


def test_causal_lm_folder_as_classifier_gets_a_fresh_score_head(folders):
    with pytest.warns(UserWarning, match="no classification head.*UNTRAINED"):
        clf = attnaudit.load_model(folders["llama", "lm"], kind="classifier", num_labels=3)
    assert isinstance(clf, HFDecoderClassifier) and clf.n_classes == 3
    assert clf.untrained_weights == ["score.weight"]
    lm = attnaudit.load_model(folders["gpt2", "classifier"], kind="lm")       # the trunk; lm_head is tied to wte
    assert isinstance(lm, HFLanguageModel) and lm.config["verified_max_abs_diff"] <= 1e-5
    with pytest.raises(ValueError, match=r"lacks .*\['lm_head.weight'\]; they would be random"):
        attnaudit.load_model(folders["llama", "classifier"], kind="lm")        # Llama's lm_head is its own


# -- logits equal plain transformers ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_classifier_logits_equal_plain_hf_unpadded_and_right_padded(arch, models, folders):
    model = models[arch, "classifier"]
    ref = plain_hf(folders[arch, "classifier"], "classifier")
    batch = model.encode(TEXTS)
    assert not batch.attention_mask.all()                                       # right-padded
    with torch.no_grad():
        theirs = torch.cat([ref(input_ids=batch.input_ids[i : i + 1, : int(n)]).logits       # one unpadded row each
                            for i, n in enumerate(batch.attention_mask.sum(1))])
        padded = model.logits(batch.input_ids, batch.attention_mask)
        alone = torch.cat([model.logits(batch.input_ids[i : i + 1, : int(n)], batch.attention_mask[i : i + 1, : int(n)])
                           for i, n in enumerate(batch.attention_mask.sum(1))])
        from_embeds = model.logits_from_embeds(model.embed(batch.input_ids), batch.attention_mask)
    diff = max(float((padded - theirs).abs().max()), float((alone - theirs).abs().max()))
    measured((arch, "classifier"), diff)
    assert diff <= 1e-5
    torch.testing.assert_close(from_embeds, padded, atol=1e-6, rtol=1e-6)     # inputs_embeds: the last REAL token
    if arch in ("gpt2", "qwen2"):                                              # byte BPE: no special tokens
        assert not batch.special_mask.any() and model.pad_id == model.tokenizer.eos_token_id == 0   # EOS pads
    else:                                                                      # [CLS] ... [SEP] of the BERT tokenizer
        ends = batch.attention_mask.sum(1) - 1
        assert batch.special_mask[:, 0].all() and batch.special_mask[torch.arange(len(batch)), ends].all()
        assert int(batch.special_mask.sum()) == 2 * len(batch)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_logits_equal_plain_hf_at_every_position_and_step(arch, models, folders):
    model = models[arch, "lm"]
    ref = plain_hf(folders[arch, "lm"], "lm")
    ids_mask = model.encode(TEXTS)                                             # one row per prompt, padded
    batch = model.encode(PROMPTS)                                              # one row per target step
    with torch.no_grad():
        positions = model.sequence_logits(ids_mask.input_ids, ids_mask.attention_mask)   # [batch, seq, vocab]
        steps = model(batch)                                                              # [rows, vocab]
        diff = 0.0
        for i, n in enumerate(ids_mask.attention_mask.sum(1).tolist()):
            theirs = ref(input_ids=ids_mask.input_ids[i : i + 1, :n]).logits[0]           # [n, vocab]
            diff = max(diff, float((positions[i, :n] - theirs).abs().max()))
        for r, n in enumerate(batch.attention_mask.sum(1).tolist()):
            theirs = ref(input_ids=batch.input_ids[r : r + 1, :n]).logits[0, -1]          # next token after row r
            diff = max(diff, float((steps[r] - theirs).abs().max()))
        from_embeds = model.logits_from_embeds(model.embed(batch.input_ids), batch.attention_mask)
    measured((arch, "lm"), diff)
    assert diff <= 1e-5
    torch.testing.assert_close(from_embeds, steps, atol=1e-5, rtol=1e-5)


def test_mistral_sliding_window_is_respected(tmp_path):
    """A window of 3 tokens, shorter than the inputs: the same logits as transformers' own forward."""
    for head in HEADS:
        folder = write_folder(tmp_path / head, "mistral", head, sliding_window=3)
        model = attnaudit.load_model(folder)
        ref = plain_hf(folder, head)
        batch = model.encode(TEXTS)
        with torch.no_grad():
            ours = model(batch)
            for i, n in enumerate(batch.attention_mask.sum(1).tolist()):
                out = ref(input_ids=batch.input_ids[i : i + 1, :n]).logits
                torch.testing.assert_close(ours[i], out[0, -1] if head == "lm" else out[0], atol=1e-5, rtol=1e-5)
            _, cache = record(model, batch)
        pattern = cache["decoder.layers.0.self_attn.pattern"]                  # [batch, head, query, key]
        seq = pattern.shape[-1]
        far = torch.ones(seq, seq, dtype=torch.bool).tril(-3)                  # keys 3 or more positions back
        assert (pattern[..., far] == 0).all()


# -- recorded attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_patterns_are_causal_per_query_head_and_sum_to_one(arch, models, folders):
    model = models[arch, "classifier"]
    batch = model.encode(TEXTS)
    with torch.no_grad():
        _, cache = record(model, batch, names=["*.pattern", "*.values"])
        out = plain_hf(folders[arch, "classifier"], "classifier").base_model(       # GPT-2's head needs a pad id
            input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), output_attentions=True)
    b, seq = batch.input_ids.shape
    real = batch.attention_mask
    for layer in range(model.n_layers):
        p = cache[f"decoder.layers.{layer}.self_attn.pattern"]
        assert p.shape == (b, 4, seq, seq)                                     # per QUERY head (GQA repeated)
        assert (p.triu(1) == 0).all()                                          # causal: upper triangle exactly 0
        assert (p.transpose(1, 2)[~real] == 0).all()                          # padded query rows: all 0
        assert (p.permute(0, 3, 1, 2)[~real] == 0).all()                       # padded keys: 0
        sums = p.sum(-1).transpose(1, 2)[real]                                 # [real rows, head]
        torch.testing.assert_close(sums, torch.ones_like(sums))
        rows = real[:, None, :].expand(-1, 4, -1)                              # equal to transformers' on real rows
        torch.testing.assert_close(p[rows], out.attentions[layer][rows], atol=1e-6, rtol=1e-5)
        values = cache[f"decoder.layers.{layer}.self_attn.values"]
        assert values.shape == (b, 4, seq, 8)                                  # repeated values [batch, head, key, d_head]
    if arch in ("llama", "qwen2"):                                             # 2 key/value heads for 4 query heads
        assert model.net.config.num_key_value_heads == 2
        assert torch.equal(values[:, 0], values[:, 1]) and torch.equal(values[:, 2], values[:, 3])


@pytest.mark.parametrize("arch", ARCHS)
def test_output_weight_reproduces_the_attention_output(arch, models):
    """Σ_h pattern_h · values_h · W^O_hᵀ + bias equals the output projection's output (o_proj / c_proj)."""
    model = models[arch, "lm"]
    batch = model.encode(TEXTS[:2])
    layer = 1
    attn = model.net.base_model.h[layer].attn if arch == "gpt2" else model.net.base_model.layers[layer].self_attn
    proj = attn.c_proj if arch == "gpt2" else attn.o_proj
    seen = []
    handle = proj.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            _, cache = record(model, batch, names=["*.pattern", "*.values"])
    finally:
        handle.remove()
    pattern = cache[f"decoder.layers.{layer}.self_attn.pattern"]               # [batch, head, query, key]
    values = cache[f"decoder.layers.{layer}.self_attn.values"]                 # [batch, head, key, d_head]
    w_o = model.output_weight(layer)                                           # [d_model, head, d_head]
    assert w_o.shape == (32, 4, 8)
    mixed = pattern @ values                                                   # [batch, head, query, d_head]
    by_hand = torch.einsum("bhqd,mhd->bqm", mixed, w_o)                        # [batch, query, d_model]
    bias = proj.bias if proj.bias is not None else torch.zeros(32)
    real = batch.attention_mask
    torch.testing.assert_close((by_hand + bias)[real], seen[0][real], atol=1e-5, rtol=1e-5)


# -- explainers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head", HEADS)
def test_explainers_run_on_classifier_and_lm_batches(arch, head, models):
    model = models[arch, head]
    batch = model.encode(PROMPTS) if head == "lm" else model.encode(TEXTS)
    target = batch.labels if head == "lm" else None
    for name in EXPLAINERS:
        attr = attnaudit.get_explainer(name, **FAST.get(name, {})).explain(model, batch, target=target)
        assert attr.scores.shape == batch.input_ids.shape, name
        assert torch.isfinite(attr.scores).all(), name
        assert (attr.scores[~batch.attention_mask] == 0).all(), name


# -- the language model's rows ---------------------------------------------------------------------------
def test_lm_encode_rows_targets_and_special_tokens(models):
    gpt2, llama = models["gpt2", "lm"], models["llama", "lm"]
    for model in (gpt2, llama):
        batch = model.encode(PROMPTS)
        lead = [model.tokenizer.cls_token_id] if model is llama else []       # [CLS] as BOS; GPT-2 adds nothing
        row = 0
        for e, ex in enumerate(PROMPTS):
            prompt = model.tokenizer(ex.text, add_special_tokens=False)["input_ids"]
            joined = model.tokenizer(f"{ex.text} {ex.target}", add_special_tokens=False)["input_ids"]
            target = joined[len(prompt):]                                     # the continuation, split at the prompt
            assert joined[: len(prompt)] == prompt and target
            for s in range(len(target)):
                n = int(batch.attention_mask[row].sum())
                assert batch.steps[row] == (e, s) and batch.ids[row] == f"{ex.id}@{s}"
                assert batch.input_ids[row, :n].tolist() == lead + prompt + target[:s]
                assert int(batch.labels[row]) == target[s]
                assert batch.texts[row] == ex.text
                flags = batch.special_mask[row, :n].tolist()
                assert flags == [True] * len(lead) + [False] * len(prompt) + [True] * s   # target prefix: not scored
                row += 1
        assert row == len(batch)
    assert llama.tokenizer.sep_token_id not in llama.encode(["the film"]).input_ids[0].tolist()   # no [SEP] ends it
    assert gpt2.encode(["the film"]).labels is None                           # texts alone: the next token


def test_lm_refuses_targets_it_cannot_encode(models):
    llama, gpt2 = models["llama", "lm"], models["gpt2", "lm"]
    with pytest.raises(ValueError, match="cannot encode the target 'good \u2603'.*\\[UNK\\]"):
        llama.encode([Example(id="x", text="the film was", target="good \u2603")])
    with pytest.raises(ValueError, match="non-empty"):
        gpt2.encode(["the film"], targets=["  "])
    with pytest.raises(ValueError, match="merges with the prompt's last token"):
        gpt2.encode(["the "], targets=["film"])                                # 'Ġ' + 'film' -> 'Ġfilm'
    assert gpt2.encode(["the"], targets=["film"]).labels.tolist() == \
        gpt2.tokenizer(" film", add_special_tokens=False)["input_ids"]          # the separator belongs to the target
    with pytest.raises(ValueError, match="exceeds this model's context of 64"):
        gpt2.encode(["the film " * 40])
    cut = gpt2.encode(["the film " * 40], truncate=True)
    assert cut.truncated == [True] and int(cut.attention_mask.sum()) == 64


def test_lm_word_ids_and_rationale_cover_the_prompt_only(models):
    model = models["gpt2", "lm"]
    ex = Example(id="r", text="the film was", target="good", rationale=(0, 1, 0))
    batch = model.encode([ex])
    assert model.tokenizer.convert_ids_to_tokens(batch.input_ids[0, :7].tolist()) == \
        ["t", "he", "Ġfilm", "Ġ", "w", "a", "s"]
    assert int(batch.attention_mask[0].sum()) == 7                            # row 0: the prompt alone
    words = model.word_ids(batch)
    assert all(w[:7] == [0, 0, 1, 2, 2, 2, 2] and set(w[7:]) == {None} for w in words)   # target prefix: None
    assert (batch.rationale[:, :7] == torch.tensor([0.0, 0, 1, 0, 0, 0, 0])).all() and (batch.rationale[:, 7:] == 0).all()
    llama = models["llama", "lm"]
    two = llama.encode([ex, Example(id="s", text="a plot", target="was good was bad", rationale=(1, 0))])
    words = llama.word_ids(two)
    assert words[0][0] is None and words[-1][:3] == [None, 0, 1]             # [CLS] / target prefix: None
    assert all(w is None for w in words[-1][3:])


def test_last_logits_sharing_equals_rows_run_alone(models):
    model = models["qwen2", "lm"]
    batch = model.encode(PROMPTS)
    with torch.no_grad():
        shared = model(batch)                                                 # 2 forwards serve 7 rows
        alone = torch.cat([model.logits(batch.input_ids[r : r + 1], batch.attention_mask[r : r + 1])
                           for r in range(len(batch))])
        calls = []
        counted = last_logits(lambda i, m: calls.append(len(i)) or model._hidden(m, input_ids=i),
                              batch.input_ids, batch.attention_mask)
        with hooks(model, {"*.pattern": uniform()}):                           # an edit: every row runs as itself
            edited = model(batch)
            edited_alone = torch.cat([model.logits(batch.input_ids[r : r + 1], batch.attention_mask[r : r + 1])
                                      for r in range(len(batch))])
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    assert calls == [3] and counted.shape == (len(batch), 32)                 # one forward per prompt
    torch.testing.assert_close(edited, edited_alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_step_gradients_equal_each_row_explained_alone(arch, models):
    """saliency / input_x_gradient on step rows use one forward (`sequence_logits_from_embeds`): same scores."""
    model = models[arch, "lm"]
    batch = model.encode(PROMPTS[1:])
    with torch.no_grad():
        embeds = model.embed(batch.input_ids)
        torch.testing.assert_close(model.sequence_logits_from_embeds(embeds, batch.attention_mask),
                                   model.sequence_logits(batch.input_ids, batch.attention_mask))
    for name in ("saliency", "input_x_gradient"):
        explainer = attnaudit.get_explainer(name)
        shared = explainer.explain(model, batch, target=batch.labels).scores
        for r in range(len(batch)):
            alone = explainer.explain(model, batch.select([r]), target=batch.labels[r : r + 1]).scores[0]
            torch.testing.assert_close(shared[r, : len(alone)], alone, atol=1e-5, rtol=1e-4)


def test_rows_with_holes_in_the_mask_are_not_shared(models):
    """The "attention" perturbation policy masks tokens mid-row: such a row is not a prefix of another."""
    model = models["gpt2", "lm"]
    row = model.encode(["the film was good"]).input_ids[0].tolist()          # 12 tokens
    ids = torch.tensor([row + [0], row[:-1] + [5, 6]])                        # row 1 differs at row 0's last token
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, -1] = False                                                       # padding
    mask[:, 2] = False                                                        # the same hole in both rows
    with torch.no_grad():
        got = model.logits(ids, mask)
        alone = torch.cat([model.logits(ids[r : r + 1], mask[r : r + 1]) for r in range(2)])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers_and_feeds_encode(models, folders):
    model = models["gpt2", "lm"]
    ids = model.generate_ids(["the film", "a plot was"], 4)
    ref = plain_hf(folders["gpt2", "lm"], "lm")
    for text, got in zip(["the film", "a plot was"], ids):
        prompt = torch.tensor([model.tokenizer(text)["input_ids"]])
        out = ref.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=model.pad_id,
                           eos_token_id=None)[0, prompt.shape[1]:].tolist()
        eos = model.eos_id
        assert got == (out[: out.index(eos) + 1] if eos in out else out)
    assert model.generate(["the film"], 4) == [model.tokenizer.decode(ids[0], skip_special_tokens=True)]
    batch = model.encode(["the film", "a plot was"], target_ids=ids)
    with torch.no_grad():
        assert torch.equal(model(batch).argmax(-1), batch.labels)              # greedy: each step's top token


# -- training --------------------------------------------------------------------------------------------
def test_gpt2_classifier_from_random_init_finetunes(tmp_path):
    from attnaudit.model.finetune import finetune_hf, finetune_settings, save_hf

    model = attnaudit.load_model(write_folder(tmp_path / "gpt2", "gpt2", "classifier"))
    words = ["good film", "great plot", "bad film", "boring plot", "the film was good", "the plot was bad"]
    train = [Example(id=f"t{i}", text=t, label=int("good" in t or "great" in t)) for i, t in enumerate(words * 2)]
    settings = finetune_settings(model, n_train=len(train), lr=1e-2, epochs=8, batch_size=4, max_len=16)
    before = [p.detach().clone() for p in model.net.parameters()]
    model, metrics = finetune_hf(model, train, train[:6], settings=settings, device="cpu", progress=False)
    assert metrics["valid_accuracy"] == 1.0 and metrics["steps"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.net.parameters()))
    save_hf(model, tmp_path / "out")
    again = attnaudit.load_model(tmp_path / "out")
    assert isinstance(again, HFDecoderClassifier) and again.config["head"] == "trained"
    torch.testing.assert_close(again.predict_proba(words), model.predict_proba(words))


def test_finetune_refuses_a_language_model(models):
    from attnaudit.model.finetune import finetune_hf

    with pytest.raises(TypeError, match="a language model: load it with kind='classifier'"):
        finetune_hf(models["gpt2", "lm"], PROMPTS, PROMPTS)


def test_finetune_command_on_a_random_gpt2_lm_folder(capsys, tmp_path):
    """`attnaudit finetune` on a GPT2LMHeadModel folder (random init): a fresh score head, trained, saved, reloaded."""
    from conftest import cli_run

    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{'a good film' if i % 2 else 'a bad plot'},{i % 2}\n" for i in range(8)))
    out = tmp_path / "tuned"
    code, _, err = cli_run(capsys, "finetune", "--hf", write_folder(tmp_path / "lm", "gpt2", "lm"), "--data", data,
                           "--text-col", "text", "--label-col", "label", "--out", out, "--epochs", "1", "--quiet")
    assert code == 0, err
    model = attnaudit.load_model(out)
    assert isinstance(model, HFDecoderClassifier) and model.config["head"] == "trained"
    assert model.untrained_weights == [] and model.config["verified_max_abs_diff"] <= 1e-5
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2ForSequenceClassification"]


@pytest.mark.parametrize("key", [("gpt2", "lm"), ("llama", "classifier")])
def test_cascading_layers_for_the_sanity_check(key, models):
    from attnaudit.analyses.sanity import cascading_randomization

    model = models[key]
    steps = model.cascading_layers()
    assert [name for name, _ in steps] == ["head", "decoder.layers.1", "decoder.layers.0", "embeddings"]
    head = steps[0][1]
    if key[1] == "lm":                                                         # lm_head is tied to wte: only ln_f
        assert head == [model.net.transformer.ln_f]
    else:
        assert head == [model.net.score, model.net.model.norm]
    batch = model.encode(TEXTS[:2])
    with torch.no_grad():
        before = model(batch)
        changed = {name: not torch.allclose(clone(batch), before) for name, clone in cascading_randomization(model)}
    # a random-init ln_f is already at its reset values (1, 0); the score head is not
    assert changed == {"step=0:original": False, "step=1:head": key[1] == "classifier",
                       "step=2:decoder.layers.1": True, "step=3:decoder.layers.0": True, "step=4:embeddings": True}
    torch.testing.assert_close(model(batch), before)                          # the original is untouched
