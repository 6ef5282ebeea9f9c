"""The decoder half from the command line: explain an LM step by step and an encoder-decoder per target token,
train the encoder-decoder on `source ||| target` lines, analyze it with gold alignments; every bad input is one
`error:` line with status 2."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_run

from attnaudit.data.examples import Example
from attnaudit.data.prompts import read_prompts
from attnaudit.data.tasks import make_examples
from attnaudit.model.checkpoint import load_model, save_checkpoint
from attnaudit.model.lm import LanguageModel
from attnaudit.model.seq2seq import Translator
from attnaudit.model.transformer import DecoderLMConfig, TransformerConfig, TransformerDecoderLM, TransformerSeq2Seq
from attnaudit.model.vocab import Vocab

pytestmark = pytest.mark.usefixtures("one_thread_module")
WORDS = "a b c d e f 1 2 3 4 ? ="


def assert_user_error(result, *fragments: str) -> None:
    code, out, err = result
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    torch.manual_seed(0)
    vocab = Vocab.build([WORDS])
    net = TransformerDecoderLM(DecoderLMConfig(vocab_size=len(vocab), d_model=16, n_heads=2, n_layers=2, d_ff=32,
                                               max_len=24, dropout=0.0))
    return save_checkpoint(LanguageModel(net, vocab), tmp_path_factory.mktemp("lm") / "m")


@pytest.fixture(scope="module")
def s2s_folder(tmp_path_factory):
    torch.manual_seed(0)
    train = make_examples("reorder", "train", n=50, seed=0)
    src = Vocab.build(e.text for e in train)
    tgt = Vocab.build(e.target for e in train)
    cfg = TransformerConfig(vocab_size=len(src), tgt_vocab_size=len(tgt), d_model=16, n_heads=2, n_layers=2, d_ff=32,
                            max_len=16, dropout=0.0)
    return save_checkpoint(Translator(TransformerSeq2Seq(cfg), src, tgt), tmp_path_factory.mktemp("s2s") / "m")


def test_explain_lm_prints_a_prompt_by_target_table_and_writes_step_records(capsys, lm_folder, tmp_path):
    out = tmp_path / "x.jsonl"
    code, text, err = cli_run(capsys, "explain", "--model", lm_folder, "--text", "a 1 b 2 ? a", "--target", "1 b",
                              "--explainer", "attention,rollout,saliency,occlusion", "--jsonl", out)
    assert code == 0, err
    assert text.count("prompt tokens (rows) x target tokens (columns") == 4      # one table per explainer
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 * 2 and {(r["example"], r["step"]) for r in records} == {(0, 0), (0, 1)}
    model = load_model(lm_folder)
    ids = model.vocab.ids(["1", "b"])
    assert [r["target"] for r in records if r["explainer"] == "rollout"] == ids      # the given continuation


def test_explain_lm_generates_and_reads_prompt_files(capsys, lm_folder, tmp_path):
    code, text, err = cli_run(capsys, "explain", "--model", lm_folder, "--text", "a 1 b", "--generate", "3",
                              "--explainer", "attention")
    assert code == 0, err
    model = load_model(lm_folder)
    said = model.generate(["a 1 b"], 3)[0].split()
    assert text.count("0: attention") == 1 and all(t in text for t in said)
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "q1", "prompt": "a 1 ? a", "target": "1", "evidence": [1, 1, 0, 1]}\n'
                    '{"id": "q2", "prompt": "b 2 ? b", "target": "2"}\n')
    code, text, err = cli_run(capsys, "explain", "--model", lm_folder, "--data", data, "--explainer", "rollout")
    assert code == 0, err
    assert "q1: rollout" in text and "q2: rollout" in text


@pytest.mark.parametrize("args, fragments", [
    (["--text", "a 1", "--target", "b", "--generate", "2"], ["at most one of --target", "--generate"]),
    (["--text", "a 1", "--target", "zzz"], []),                                     # out of vocabulary: [UNK] is fine
    (["--text", "a 1", "--explainer", "nope"], ["--explainer must be registry names", "nope"]),
])
def test_explain_lm_usage(capsys, lm_folder, args, fragments):
    result = cli_run(capsys, "explain", "--model", lm_folder, *args)
    if fragments:
        assert_user_error(result, *fragments)
    else:
        assert result[0] == 0, result


def test_read_prompts_rules(tmp_path):
    good = tmp_path / "p.csv"
    good.write_text("prompt,target,evidence\na b,c,1 0\n")
    (ex,) = read_prompts(good)
    assert ex == Example("0", "a b", target="c", rationale=(1, 0))
    cases = {
        "mixed.jsonl": ('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n', "line 2: no 'target'"),
        "empty.jsonl": ('{"prompt": " ", "target": "b"}\n', "line 1: 'prompt' is empty"),
        "dup.jsonl": ('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', "id 'x' was already used on line 1"),
        "ev.jsonl": ('{"prompt": "a b", "evidence": [1]}\n', "one 0/1 per whitespace word of the prompt (2)"),
        "nokey.jsonl": ('{"text": "a"}\n', "has no key 'prompt'"),
    }
    for name, (body, message) in cases.items():
        (tmp_path / name).write_text(body)
        with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
            read_prompts(tmp_path / name)


def test_explain_seq2seq_per_target_token(capsys, s2s_folder, tmp_path):
    code, text, err = cli_run(capsys, "explain", "--model", s2s_folder, "--text", "red cat sees the dog",
                              "--target", "chat rouge voit chien", "--explainer", "attention,occlusion",
                              "--jsonl", tmp_path / "s.jsonl")
    assert code == 0, err
    assert text.count("source tokens (rows) x target tokens (columns)") == 2
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["target_tokens"] for r in records][0] == ["chat", "rouge", "voit", "chien"]
    att = torch.tensor(records[0]["scores"])                                        # [target, source]
    assert att.shape == (4, 7) and torch.allclose(att.sum(1), torch.ones(4), atol=1e-5)   # cross-attention rows
    code, text, err = cli_run(capsys, "explain", "--model", s2s_folder, "--text", "red cat sees the dog")
    assert code == 0, err                                                           # its own greedy translation
    assert_user_error(cli_run(capsys, "explain", "--model", s2s_folder, "--text", "red cat", "--explainer", "flow"),
                      "--explainer 'flow' is not defined for an encoder-decoder", "grad_attention")


@pytest.mark.slow
def test_train_and_analyze_parallel_with_gold_alignments(capsys, s2s_folder, tmp_path, monkeypatch):
    from attnaudit.model import train as train_module
    from attnaudit.model.train import TrainSettings

    tiny = TrainSettings(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=16, epochs=1, batch_size=16,
                         warmup=10, n_train=64, n_valid=16, n_test=16)
    monkeypatch.setattr(train_module, "defaults_for", lambda task=None: tiny)
    examples = make_examples("reorder", "test", n=24, seed=1)
    par = tmp_path / "pairs.txt"
    par.write_text("".join(f"{e.text} ||| {e.target}\n" for e in examples))
    gold = tmp_path / "pairs.gold"
    gold.write_text("".join(" ".join(f"{s + 1}{'-' if k % 2 else 'p'}{t + 1}" for k, (s, t) in enumerate(e.alignment))
                            + "\n" for e in examples))
    code, out, err = cli_run(capsys, "train", "--parallel", par, "--out", tmp_path / "trained", "--quiet")
    assert code == 0, err
    assert isinstance(load_model(tmp_path / "trained"), Translator)
    report = tmp_path / "rep"
    code, out, err = cli_run(capsys, "analyze", "--model", s2s_folder, "--parallel", par, "--alignments", gold,
                             "--out", report, "--quiet")
    assert code == 0, err
    md = (report / "report.md").read_text()
    assert "## Alignment with gold word links" in md and "greedy translations of these examples" in md
    import pandas as pd
    m = pd.read_csv(report / "metrics.csv.gz")
    aer = m[(m.metric == "alignment_error_rate") & (m.example_id == "(corpus)")]
    assert {"attention", "cross_attention_L1_H1"} <= set(aer.explainer)
    assert aer["value"].between(0, 1).all()


@pytest.mark.parametrize("args, fragments", [
    (["--task", "reorder", "--parallel", "p.txt"], ["exactly one of --task", "--task and --parallel"]),
    (["--data", "x.csv", "--alignments", "g.txt"], ["--alignments goes with --parallel"]),
])
def test_analyze_parallel_usage(capsys, s2s_folder, tmp_path, args, fragments):
    assert_user_error(cli_run(capsys, "analyze", "--model", s2s_folder, "--out", tmp_path / "o", *args), *fragments)


def test_analyze_parallel_refuses_a_classifier_and_bad_gold(capsys, lm_folder, s2s_folder, tmp_path):
    par = tmp_path / "p.txt"
    par.write_text("red cat ||| chat rouge\n")
    assert_user_error(cli_run(capsys, "analyze", "--model", lm_folder, "--parallel", par, "--out", tmp_path / "o"),
                      "--parallel goes with an encoder-decoder")
    gold = tmp_path / "g.txt"
    gold.write_text("1-3\n")
    assert_user_error(cli_run(capsys, "analyze", "--model", s2s_folder, "--parallel", par, "--alignments", gold,
                              "--out", tmp_path / "o2"), "g.txt, line 1", "target index 3 out of range [1, 2]")


@pytest.mark.slow
@pytest.mark.parametrize("family, arch", [("decoder", "gpt2"), ("decoder", "llama"), ("decoder", "qwen2"),
                                          ("decoder", "mistral"), ("seq2seq", "bart"), ("seq2seq", "t5"),
                                          ("seq2seq", "marian")])
def test_every_hf_generative_family_is_explained_from_the_command_line(capsys, tmp_path, family, arch):
    """A tiny random folder of each architecture loads (its logits checked against plain HF at load) and
    `attnaudit explain` runs every explainer that applies: all 15 for an LM, the 15 of `explain.seq2seq` (flow
    excepted, attention_layers added) for an encoder-decoder."""
    pytest.importorskip("transformers")
    if family == "decoder":
        from test_hf_decoder import write_folder
        folder = write_folder(tmp_path / arch, arch, "lm")
        args, tables, per_step = ["--text", "the cat sat on", "--target", "the mat", "--explainer", "all"], 15, True
    else:
        from test_hf_seq2seq import write_folder
        folder = write_folder(tmp_path / arch, arch)
        from attnaudit.explain.seq2seq import EXPLAINERS
        args, tables, per_step = ["--text", "the cat sat", "--target", "die katze sass", "--explainer", "all"], \
            len(EXPLAINERS), False
    code, out, err = cli_run(capsys, "explain", "--model", folder, *args, "--jsonl", tmp_path / "x.jsonl")
    assert code == 0, err
    header = "prompt tokens (rows)" if per_step else "source tokens (rows)"
    assert out.count(header) == tables
    records = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert len({r["explainer"] for r in records}) == tables
    scores = [v for r in records for v in (r["scores"] if per_step else [x for row in r["scores"] for x in row])]
    assert all(map(lambda v: v == v and abs(v) != float("inf"), scores))          # finite everywhere
