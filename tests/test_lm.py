"""The decoder-only LM: causal masking, shared prefix forwards, step rows, the LM tasks, save/load, explainers, training."""
from __future__ import annotations

import json
import time

import pytest
import torch

from attnaudit.data.examples import Example
from attnaudit.data.tasks import LM_TASK_NAMES, TASK_NAMES, get_task, make_examples
from attnaudit.explain.registry import get_explainer
from attnaudit.model import steps
from attnaudit.model.checkpoint import load_model, save_checkpoint
from attnaudit.model.hooks import recording
from attnaudit.model.lm import DecoderClassifier, LanguageModel
from attnaudit.model.settings import defaults_for
from attnaudit.model.train import train_task, train_to_folder
from attnaudit.model.transformer import DecoderLMConfig, TransformerDecoderLM
from attnaudit.model.vocab import CLS, PAD, Vocab

WORDS = "a b c d e f 1 2 3 ? =".split()


def make_lm(seed: int = 0, *, head: str = "lm", norm: str = "post", n_layers: int = 2) -> LanguageModel | DecoderClassifier:
    torch.manual_seed(seed)
    vocab = Vocab.build([" ".join(WORDS)])
    cfg = DecoderLMConfig(vocab_size=len(vocab), head=head, n_classes=0 if head == "lm" else 3, d_model=16,
                          n_heads=2, n_layers=n_layers, d_ff=32, dropout=0.1, max_len=24, norm=norm)
    net = TransformerDecoderLM(cfg)
    model = LanguageModel(net, vocab) if head == "lm" else DecoderClassifier(net, vocab, label_names=["x", "y", "z"])
    model.net.eval()
    return model


def ids_of(model, text: str) -> torch.Tensor:
    return torch.tensor([model.vocab.ids([CLS, *text.split()])])


# -- the causal net ------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_changing_a_later_token_never_changes_earlier_logits(norm):
    model = make_lm(norm=norm)
    a, b = ids_of(model, "a 1 b 2 ? a"), ids_of(model, "a 1 b 2 ? c")
    mask = torch.ones_like(a, dtype=torch.bool)
    with torch.no_grad():
        la, lb = model.net(a, mask), model.net(b, mask)                   # [1, seq, vocab]
    assert torch.equal(la[:, :-1], lb[:, :-1])
    assert not torch.allclose(la[:, -1], lb[:, -1])


def test_decoder_patterns_are_exactly_zero_above_the_diagonal_and_rows_sum_to_one():
    model = make_lm()
    batch = model.encode(["a 1 b 2 ? a", "c 3 ? c"])
    assert model.attention_sites == ["decoder.layers.0.self_attn.pattern", "decoder.layers.1.self_attn.pattern"]
    assert {"decoder.layers.0.self_attn.values", "decoder.layers.1.self_attn.values"} <= set(model.hook_points())
    with recording(model, model.attention_sites) as cache, torch.no_grad():
        model(batch)
    for site in model.attention_sites:
        p = cache.patterns[site]                                          # [batch, head, query, key]
        seq = p.shape[-1]
        above = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        assert torch.equal(p[..., above], torch.zeros_like(p[..., above]))
        real = batch.attention_mask
        sums = p.sum(-1)                                                  # [batch, head, query]
        assert torch.allclose(sums[real[:, None, :].expand_as(sums)], torch.tensor(1.0), atol=1e-6)
        assert torch.equal(sums[~real[:, None, :].expand_as(sums)], torch.zeros_like(sums[~real[:, None, :].expand_as(sums)]))


# -- one forward for all steps -------------------------------------------------------------------
def count_rows(model):
    seen: list[int] = []
    handle = model.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    return seen, handle


def test_last_logits_sharing_equals_per_row_forwards_and_runs_fewer_rows():
    model = make_lm()
    examples = [Example("x", "a 1 b 2 ? b", target="2 c a"), Example("y", "c 3 ?", target="c 3")]
    batch = model.encode(examples)                                        # 3 + 2 rows, 2 carriers
    assert len(batch) == 5
    seen, handle = count_rows(model)
    try:
        with torch.no_grad():
            shared = model(batch)                                         # [rows, vocab]
        assert seen == [2]                                                # one forward of the 2 longest rows
        seen.clear()
        with torch.no_grad():
            alone = torch.cat([model.net(batch.input_ids[i : i + 1, : int(batch.attention_mask[i].sum())],
                                         batch.attention_mask[i : i + 1, : int(batch.attention_mask[i].sum())])[:, -1]
                               for i in range(len(batch))])               # [rows, vocab]
        assert seen == [1] * 5
    finally:
        handle.remove()
    assert shared.shape == (5, model.vocab_size)
    assert torch.allclose(shared, alone, atol=1e-6, rtol=0)


def test_rows_run_as_themselves_while_hooks_record_and_under_gradients():
    model = make_lm()
    batch = model.encode([Example("x", "a 1 b 2 ? b", target="2 c a")])
    with torch.no_grad():
        shared = model(batch)
    seen, handle = count_rows(model)
    try:
        with recording(model, model.attention_sites), torch.no_grad():
            recorded = model(batch)
        assert seen == [3]                                                # hooks on the sites: no sharing
        seen.clear()
        model(batch).sum().backward()
        assert seen == [3]                                                # gradients: no sharing
    finally:
        handle.remove()
    assert torch.allclose(shared, recorded, atol=1e-6, rtol=0)


# -- encode: one row per (example, step) ---------------------------------------------------------
def test_encode_builds_rows_labels_special_mask_and_rationale_by_hand():
    model = make_lm()
    v = model.vocab
    batch = model.encode([Example("q", "a 1 ? a", target="1 b", rationale=(1, 1, 0, 1))])
    # rows: [CLS] a 1 ? a            -> label 1
    #       [CLS] a 1 ? a 1          -> label b
    assert batch.tokens == [[CLS, "a", "1", "?", "a", PAD], [CLS, "a", "1", "?", "a", "1"]]
    assert batch.input_ids.tolist() == [v.ids([CLS, "a", "1", "?", "a"]) + [v.pad_id], v.ids([CLS, "a", "1", "?", "a", "1"])]
    assert batch.attention_mask.tolist() == [[True] * 5 + [False], [True] * 6]
    assert batch.labels is not None and batch.labels.tolist() == v.ids(["1", "b"])
    assert batch.special_mask.tolist() == [[True, False, False, False, False, False],
                                           [True, False, False, False, False, True]]   # [CLS], the target prefix
    assert batch.rationale is not None and batch.rationale.tolist() == [[0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 1, 0]]
    assert batch.steps == [(0, 0), (0, 1)] and batch.ids == ["q@0", "q@1"]
    assert batch.texts == ["a 1 ? a"] * 2 and batch.truncated == [False, False]
    assert steps.readout_index(model, batch.attention_mask).tolist() == [4, 5]


def test_encode_gives_copy_its_per_step_evidence_from_the_alignment():
    model = make_lm()
    ex = Example("c", "a b c =", target="a b c", rationale=(1, 1, 1, 0), alignment=((0, 0), (1, 1), (2, 2)))
    batch = model.encode([ex])
    assert batch.rationale is not None
    assert batch.rationale.tolist() == [[0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]]


def test_encode_texts_gives_one_next_token_row_and_truncates_only_when_asked():
    model = make_lm()
    batch = model.encode(["a b", "c"])
    assert batch.labels is None and batch.steps == [(0, 0), (1, 0)] and len(batch) == 2
    long = " ".join(["a"] * 30)
    with pytest.raises(ValueError, match="truncate=True"):
        model.encode([long])
    cut = model.encode([Example("l", long + " b", target="c", rationale=(0,) * 30 + (1,))], truncate=True)
    assert cut.truncated == [True] and int(cut.attention_mask.sum()) == model.max_len
    assert cut.tokens[0][-1] == "b" and cut.rationale is not None and cut.rationale[0, -1] == 1   # latest words kept


def test_generate_is_greedy_argmax_step_by_step():
    model = make_lm()
    out = model.generate(["a 1 ?", "b"], 3)
    for text, got in zip(["a 1 ?", "b"], out):
        ids = ids_of(model, text)
        for _ in range(3):
            with torch.no_grad():
                nxt = model.net(ids, torch.ones_like(ids, dtype=torch.bool))[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        assert got == " ".join(model.vocab.tokens(ids[0, -3:].tolist()))


# -- tasks ---------------------------------------------------------------------------------------
def test_recall_example_by_hand_and_generators_are_deterministic():
    ex = make_examples("recall", "test", n=1, seed=0)[0]
    assert ex.text == "c 2 b 1 a 3 i 5 n 9 d 1 ? c" and ex.target == "2"
    assert [i for i, r in enumerate(ex.rationale or ()) if r] == [0, 1, 13]   # key c, its value 2, the query c
    for name in LM_TASK_NAMES:
        assert make_examples(name, "train", n=30, seed=3) == make_examples(name, "train", n=30, seed=3)
        assert make_examples(name, "train", n=30, seed=3) != make_examples(name, "train", n=30, seed=4)
        assert make_examples(name, "train", n=30, seed=3) != make_examples(name, "valid", n=30, seed=3)


def test_every_recall_example_is_answerable_and_its_rationale_points_at_the_answer():
    for ex in make_examples("recall", "train", n=200, seed=1):
        w = ex.text.split()
        keys, values = w[:-2:2], w[1:-2:2]
        assert w[-2] == "?" and len(set(keys)) == len(keys) and 2 <= len(keys) <= 6
        at = keys.index(w[-1])
        assert values[at] == ex.target
        assert [i for i, r in enumerate(ex.rationale or ()) if r] == [2 * at, 2 * at + 1, len(w) - 1]


def test_copy_example_by_hand_and_its_alignment():
    ex = make_examples("copy", "test", n=1, seed=0)[0]
    assert ex.text == "ki ku ti tu ka ta =" and ex.target == "ki ku ti tu ka ta"
    assert ex.rationale == (1, 1, 1, 1, 1, 1, 0)
    assert ex.alignment == tuple((s, s) for s in range(6))
    for e in make_examples("copy", "train", n=200, seed=1):
        src = e.text.split()[:-1]
        assert e.text.split()[-1] == "=" and e.target == " ".join(src) and len(set(src)) == len(src)


def test_lm_tasks_are_kind_lm_and_stay_out_of_the_default_run():
    assert set(LM_TASK_NAMES) < set(TASK_NAMES)
    assert all(get_task(t).kind == "lm" and get_task(t).label_names == () for t in LM_TASK_NAMES)
    assert defaults_for("recall").max_len == 32


# -- save / load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["lm", "classifier"])
def test_save_load_round_trip_gives_identical_logits(head, tmp_path):
    model = make_lm(head=head)
    save_checkpoint(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["kind"] == ("lm" if head == "lm" else "classifier") and cfg["net"] == "decoder"
    back = load_model(tmp_path / "m")
    assert type(back) is type(model) and back.vocab.itos == model.vocab.itos
    assert back.label_names == model.label_names and back.readout == "last"
    inputs = [Example("x", "a 1 b 2 ? b", target="2 c")] if head == "lm" else ["a 1 b", "c"]
    batch = model.encode(inputs)
    with torch.no_grad():
        assert torch.equal(model(batch), back(batch))


def test_a_decoder_config_with_the_wrong_kind_is_refused(tmp_path):
    save_checkpoint(make_lm(), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "kind": "classifier"}))
    with pytest.raises(ValueError, match="does not go with a decoder"):
        load_model(tmp_path / "m")


# -- explainers read the last real row -----------------------------------------------------------
def hand_patterns(model, batch, row: int) -> list[torch.Tensor]:
    """The row run alone, unpadded -> per layer the head-mean pattern [query, key]."""
    n = int(batch.attention_mask[row].sum())
    with recording(model, model.attention_sites) as cache, torch.no_grad():
        model.net(batch.input_ids[row : row + 1, :n], batch.attention_mask[row : row + 1, :n])
    return [cache.patterns[s][0].mean(0) for s in model.attention_sites]


def test_attention_and_rollout_explain_each_step_from_its_last_real_token():
    model = make_lm()
    batch = model.encode([Example("x", "a 1 b 2 ? b", target="2 c a"), Example("y", "c 3 ?", target="c 3")])
    raw = get_explainer("attention", layer="last", head="mean").explain(model, batch)
    roll = get_explainer("rollout").explain(model, batch)
    assert raw.steps == batch.steps
    for row in range(len(batch)):
        n = int(batch.attention_mask[row].sum())
        per_layer = hand_patterns(model, batch, row)
        assert torch.allclose(raw.scores[row, :n], per_layer[-1][n - 1], atol=1e-5)
        joint = torch.eye(n)
        for a in per_layer:
            a_hat = 0.5 * a + 0.5 * torch.eye(n)
            joint = (a_hat / a_hat.sum(-1, keepdim=True)) @ joint
        assert torch.allclose(roll.scores[row, :n], joint[n - 1], atol=1e-5)
        assert torch.equal(raw.scores[row, n:], torch.zeros(batch.input_ids.shape[1] - n))


def test_mean_over_layers_attention_also_reads_the_last_real_token():
    model = make_lm()
    batch = model.encode([Example("x", "a 1 b 2 ? b", target="2 c")])
    mean = get_explainer("attention", layer="mean", head="mean").explain(model, batch)
    for row in range(len(batch)):
        n = int(batch.attention_mask[row].sum())
        want = torch.stack(hand_patterns(model, batch, row)).mean(0)[n - 1]
        assert torch.allclose(mean.scores[row, :n], want, atol=1e-5)


def test_decoder_classifier_encodes_words_then_sep_and_explains_from_sep():
    model = make_lm(head="classifier")
    batch = model.encode([Example("x", "a 1 b", label=2, rationale=(0, 1, 0)), Example("y", "c", label=0, rationale=(1,))])
    assert batch.tokens == [["a", "1", "b", "[SEP]"], ["c", "[SEP]", PAD, PAD]]
    assert batch.special_mask.tolist() == [[False, False, False, True], [False, True, False, False]]
    assert batch.rationale is not None and batch.rationale.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert model(batch).shape == (2, 3)
    raw = get_explainer("attention").explain(model, batch)
    assert torch.allclose(raw.scores[1, :2], hand_patterns(model, batch, 1)[-1][1], atol=1e-5)


def test_cascading_layers_run_output_first_for_the_sanity_analysis():
    from attnaudit.analyses.sanity import cascading_layers

    names = [name for name, _ in cascading_layers(make_lm(norm="pre"))]
    assert names == ["head", "decoder.layers.1", "decoder.layers.0", "embeddings"]
    assert len(dict(cascading_layers(make_lm(norm="pre")))["head"]) == 2    # the head and the final LayerNorm


# -- training ------------------------------------------------------------------------------------
def test_a_tiny_training_run_writes_a_folder_that_loads_as_a_language_model(tmp_path):
    settings = defaults_for("copy").replace(n_train=64, n_valid=16, n_test=16, epochs=1, batch_size=32,
                                            d_model=16, n_heads=2, d_ff=32)
    path, metrics = train_to_folder(tmp_path / "copy", task="copy", settings=settings, device="cpu", progress=False)
    assert metrics["kind"] == "lm" and metrics["steps"] == 2 and 0 <= metrics["test_accuracy"] <= 1
    assert {"test_generation_exact_match", "valid_accuracy", "train_seconds"} <= set(metrics)
    model = load_model(path)
    assert isinstance(model, LanguageModel) and model.n_classes == metrics["vocab_size"]
    assert json.loads((path / "config.json").read_text())["task"]["kind"] == "lm"
    assert (path / "train_log.csv").read_text().count("\n") == 3


@pytest.mark.slow
@pytest.mark.parametrize("task", LM_TASK_NAMES)
def test_default_training_reaches_095_on_the_answer_tokens_within_two_minutes(task):
    start = time.perf_counter()
    model, metrics = train_task(task, device="cpu", progress=False)
    seconds = time.perf_counter() - start
    assert isinstance(model, LanguageModel)
    assert metrics["test_accuracy"] >= 0.95, metrics
    assert seconds < 120, seconds
