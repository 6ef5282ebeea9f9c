"""Bad input gets a clear error: the parameter, the rule and the value, as ValueError/TypeError (never assert).

One table of (what the user did, what they see) for the library, and the same mistakes through the command
line: one `error: ...` line on stderr, exit status 2, no traceback.
"""
from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
from conftest import cli_run, make_tiny_model

from attnaudit import get_explainer
from attnaudit.analyses.audit import AuditSettings, audit
from attnaudit.data.examples import Example, read_table, read_texts
from attnaudit.explain.registry import REGISTRY
from attnaudit.model.checkpoint import save_checkpoint
from attnaudit.model.hooks import record

FAST = dict(explainers=("attention", "saliency"), analyses=("faithfulness",))
QUICK = {"integrated_gradients": {"n_steps": 8}, "lime": {"n_samples": 20}, "kernel_shap": {"n_samples": 20},
         "gradient_shap": {"n_samples": 4}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


def _oov(model):
    batch = model.encode(["the film was good"])
    ids = batch.input_ids.clone()
    ids[0, 2] = len(model.vocab) + 5                                    # a token id the embedding does not have
    return dataclasses.replace(batch, input_ids=ids)


def _all_padding(model):
    batch = model.encode(["the film was good", "a plot"])
    mask = batch.attention_mask.clone()
    mask[1] = False
    return dataclasses.replace(batch, attention_mask=mask)


def _file(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# (case, call(model, tmp_path), exception type, the message the user sees must contain this)
CASES = [
    ("target above the classes", lambda m, p: get_explainer("rollout").explain(m, "the film", target=2), ValueError,
     "target must be None (the predicted class), a class index in [0, 1], a label name in ['c0', 'c1'], or one of "
     "those per example; got 2."),
    ("target -1", lambda m, p: get_explainer("saliency").explain(m, "the film", target=-1), ValueError,
     "a class index in [0, 1]"),
    ("target -1 as a tensor", lambda m, p: get_explainer("occlusion").explain(m, "the film", target=torch.tensor([-1])),
     ValueError, "got -1."),
    ("target a label the model lacks", lambda m, p: get_explainer("attention").explain(m, "the film", target="positive"),
     ValueError, "got the label 'positive', which this model does not have."),
    ("one target per example, wrong count", lambda m, p: get_explainer("attention").explain(m, ["a", "the"], target=[0]),
     ValueError, "got [0] for a batch of 2."),
    ("n_steps = 0", lambda m, p: get_explainer("integrated_gradients", n_steps=0).explain(m, "the film"), ValueError,
     "n_steps must be an int >= 1; got 0."),
    ("n_steps < 0", lambda m, p: get_explainer("integrated_gradients", n_steps=-4).explain(m, "the film"), ValueError,
     "n_steps must be an int >= 1; got -4."),
    ("n_samples = 0", lambda m, p: get_explainer("gradient_shap", n_samples=0).explain(m, "the film"), ValueError,
     "n_samples must be an int >= 1; got 0."),
    ("unknown explainer", lambda m, p: get_explainer("rolout"), ValueError,
     "Unknown explainer 'rolout'. Available: alti, attention, attention_norm,"),
    ("unknown explainer option", lambda m, p: get_explainer("rollout", n_step=3), ValueError,
     "explainer 'rollout' got invalid parameters ['n_step']; valid: ['add_residual', 'head_fusion', 'start_layer', "
     "'readout', 'discard_ratio']."),
    ("unknown layer (attention)", lambda m, p: get_explainer("attention", layer=5).explain(m, "the film"), ValueError,
     "layer must be"),
    ("unknown layer (rollout start)", lambda m, p: get_explainer("rollout", start_layer=2).explain(m, "the film"),
     ValueError, "start_layer must be an int in [0, 1]; got 2"),
    ("unknown hook site", lambda m, p: record(m, m.encode("the film"), names="encoder.layers.7.self_attn.pattern"),
     ValueError, "Unknown hook site 'encoder.layers.7.self_attn.pattern'. Available: encoder.layers.0.self_attn.pattern"),
    ("empty example", lambda m, p: get_explainer("rollout").explain(m, ""), ValueError,
     "inputs[0] is empty or whitespace-only; every example needs at least one word."),
    ("whitespace-only example", lambda m, p: get_explainer("rollout").explain(m, ["the film", " \t\n "]), ValueError,
     "inputs[1] is empty or whitespace-only"),
    ("no examples", lambda m, p: get_explainer("rollout").explain(m, []), ValueError,
     "inputs must hold at least one text; got an empty list."),
    ("example longer than the positions", lambda m, p: get_explainer("rollout").explain(m, "the " * 40), ValueError,
     "inputs[0] has 40 words but this model takes at most 30 (max_len=32 minus [CLS] and [SEP]); pass truncate=True"),
    ("token id outside the vocabulary", lambda m, p: get_explainer("saliency").explain(m, _oov(m)), ValueError,
     "input_ids must lie in [0, 18] (the vocabulary size is 19); got values from 1 to 24."),
    ("token id outside the vocabulary, attention family", lambda m, p: get_explainer("rollout").explain(m, _oov(m)),
     ValueError, "input_ids must lie in [0, 18]"),
    ("all-padding example", lambda m, p: get_explainer("saliency").explain(m, _all_padding(m)), ValueError,
     "every example needs at least one real token; example 1 is all padding (its attention_mask row is all False)."),
    ("not a text", lambda m, p: get_explainer("rollout").explain(m, 3), TypeError,
     "batch_or_texts must be a Batch, a str, or a list of str/Example; got int."),
    ("CSV row with an extra field", lambda m, p: read_table(_file(p, "d.csv", "text,label\nthe film,1\nthe,plot,0\n"),
                                                          text_col="text", label_col="label"), ValueError,
     "d.csv, line 3: 3 fields where the header has 2; put a text holding commas in double quotes."),
    ("CSV quote never closed", lambda m, p: read_table(_file(p, "q.csv", 'text,label\n"the film,1\na plot,0\n'),
                                                      text_col="text", label_col="label"), ValueError,
     "q.csv, line 2: malformed row (unexpected end of data); check its quotes"),
    ("CSV without the label column", lambda m, p: read_table(_file(p, "c.csv", "text,y\nthe film,1\n"),
                                                            text_col="text", label_col="label"), ValueError,
     "has no column 'label'. Columns present: text, y."),
    ("JSONL line that is not JSON", lambda m, p: read_texts(_file(p, "b.jsonl", '{"text": "a"}\n{"text": "b"\n')),
     ValueError, "b.jsonl, line 2: not valid JSON (Expecting ',' delimiter); expected one JSON object per line."),
    ("JSONL line that is not an object", lambda m, p: read_texts(_file(p, "l.jsonl", '{"text": "a"}\n["b"]\n')),
     ValueError, "l.jsonl, line 2: expected a JSON object, got list."),
    ("JSONL line without the text", lambda m, p: read_table(_file(p, "k.jsonl", '{"text": "a", "label": 1}\n'
                                                                  '{"label": 0}\n'), text_col="text", label_col="label"),
     ValueError, "k.jsonl, line 2 has no key 'text'."),
    ("JSONL empty text", lambda m, p: read_texts(_file(p, "e.jsonl", '{"text": "a"}\n{"text": "  "}\n')), ValueError,
     "e.jsonl, line 2: column 'text' is empty"),
    ("duplicate ids in a table", lambda m, p: read_table(_file(p, "u.csv", "id,text,label\na,the film,1\na,a plot,0\n"),
                                                         text_col="text", label_col="label"), ValueError,
     "u.csv, line 3: id 'a' was already used on line 2; ids must be unique."),
    ("duplicate ids in texts", lambda m, p: read_texts(_file(p, "u.jsonl", '{"id": "x", "text": "a"}\n'
                                                             '{"id": "x", "text": "b"}\n')), ValueError,
     "u.jsonl, line 2: id 'x' was already used on line 1; ids must be unique."),
    ("duplicate ids in an audit", lambda m, p: audit(m, [Example(id="a", text="the film"), Example(id="a", text="a plot")],
                                                     **FAST), ValueError,
     "example ids must be unique (rows of the tables are keyed by them); 'a' repeats."),
    ("a label outside the training labels", lambda m, p: read_table(_file(p, "v.csv", "text,label\nthe film,maybe\n"),
                                                                    text_col="text", label_col="label",
                                                                    label_names=("neg", "pos")), ValueError,
     "v.csv, line 2: label 'maybe' is not one of the label_names neg, pos"),
    ("flow over its cell limit", lambda m, p: get_explainer("flow", max_cells=100).explain(m, "the film was good and bad"),
     ValueError, "flow: example 0 has 8 tokens, so 2 layers × 8² = 128 attention cells, more than max_cells=100"),
    ("flow max_cells = 0", lambda m, p: get_explainer("flow", max_cells=0).explain(m, "the film"), ValueError,
     "max_cells must be an int >= 1"),
    ("integrated gradients over its memory budget",
     lambda m, p: get_explainer("integrated_gradients", max_memory_mb=0.01).explain(m, "the film was good"), ValueError,
     "integrated_gradients: one interpolated input of 6 tokens needs about 0.0"),
    ("max_memory_mb < 0", lambda m, p: get_explainer("integrated_gradients", max_memory_mb=-1).explain(m, "the film"),
     ValueError, "max_memory_mb must be a number > 0 (megabytes per forward + backward pass) or None; got -1."),
    ("max_examples = 0", lambda m, p: AuditSettings(max_examples=0), ValueError,
     "max_examples must be a positive integer or None (all); got 0."),
    ("unknown audit setting", lambda m, p: AuditSettings().with_(max_exampels=3), ValueError,
     "unknown audit setting 'max_exampels'; known: explainers,"),
    ("unknown explainer option in the audit settings",
     lambda m, p: AuditSettings(explainers=("integrated_gradients",),
                                explainer_params={"integrated_gradients": {"steps": 8}}), ValueError,
     "explainer 'integrated_gradients' got invalid parameters ['steps']"),
]


@pytest.mark.parametrize("case, call, kind, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(tiny_model, tmp_path, case, call, kind, message):
    with pytest.raises(kind) as info:
        call(tiny_model, tmp_path)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_audit_limits_are_checked_before_the_first_chunk(tiny_model, monkeypatch):
    monkeypatch.setattr(importlib.import_module("attnaudit.analyses.audit"), "_chunk",
                        lambda *a, **k: pytest.fail("a chunk ran although a limit refuses the data"))
    xs = [Example(id=f"e{i}", text="the film was good " * (1 + i)) for i in range(4)]
    with pytest.raises(ValueError, match=r"flow: example 'e3' has 18 tokens, so 2 layers × 18² = 648 attention cells, "
                                         r"more than max_cells=100"):
        audit(tiny_model, xs, explainers=("attention", "flow"), explainer_params={"flow": {"max_cells": 100}})


def test_model_output_that_is_not_finite_fails_the_chunk(tiny_model):
    tiny_model.net.head.bias.data[0] = float("nan")
    with pytest.raises(ValueError, match=r"the model's output is not finite \(NaN or infinite\) for example\(s\) "
                                         r"\['a', 'b'\]"):
        audit(tiny_model, [Example(id="a", text="the film"), Example(id="b", text="a plot")], **FAST)


def test_too_long_examples_are_cut_and_recorded_in_an_audit(tiny_model):
    xs = [Example(id="long", text="the film " * 20, label=0), Example(id="short", text="a plot", label=1)]
    result = audit(tiny_model, xs, **FAST)
    assert {x["id"]: x["truncated"] for x in result.examples} == {"long": True, "short": False}
    assert result.settings["n_truncated"] == 1


@pytest.mark.parametrize("name", list(REGISTRY))
def test_a_model_in_training_mode_is_explained_deterministically_and_left_training(name):
    model = make_tiny_model()                                 # dropout 0.1: training mode would change every forward
    model.net.train()
    explainer = get_explainer(name, **QUICK.get(name, {}))
    texts = ["the film was not good", "a boring plot"]
    first = explainer.explain(model, texts)
    assert model.net.training
    model.net.eval()
    reference = explainer.explain(model, texts)
    assert not model.net.training
    torch.testing.assert_close(first.scores, reference.scores, rtol=0, atol=0)


# -- the command line ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_checkpoint(make_tiny_model(), tmp_path_factory.mktemp("model") / "tiny")



CLI_CASES = [
    ("empty --text", ["--text", ""], "error: inputs[0] is empty or whitespace-only; every example needs at least one word."),
    ("whitespace --text", ["--text", "  \t "], "error: inputs[0] is empty or whitespace-only"),
    ("--target above the classes", ["--text", "the film", "--target", "5"],
     "error: target must be None (the predicted class), a class index in [0, 1], a label name in ['c0', 'c1'], or one "
     "of those per example; got 5."),
    ("--target -1", ["--text", "the film", "--target", "-1"], "got -1."),
    ("--target unknown label", ["--text", "the film", "--target", "positive"],
     "got the label 'positive', which this model does not have."),
    ("unknown --explainer", ["--text", "the film", "--explainer", "rolout"],
     "error: --explainer must be registry names separated by commas; got 'rolout'. Available: attention, rollout,"),
    ("malformed CSV row", ["--data", "BAD_CSV"], "bad.csv, line 3: 3 fields where the header has 2"),
    ("malformed JSONL row", ["--data", "BAD_JSONL"], "bad.jsonl, line 2: not valid JSON"),
    ("duplicate ids", ["--data", "DUP_JSONL"], "dup.jsonl, line 2: id 'a' was already used on line 1"),
]


@pytest.mark.parametrize("case, args, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_with_status_2(capsys, tmp_path, model_dir, case, args, message):
    files = {"BAD_CSV": _file(tmp_path, "bad.csv", "text,label\nthe film,1\nthe,plot,0\n"),
             "BAD_JSONL": _file(tmp_path, "bad.jsonl", '{"text": "the film"}\n{"text": "a plot"\n'),
             "DUP_JSONL": _file(tmp_path, "dup.jsonl", '{"id": "a", "text": "the film"}\n{"id": "a", "text": "a"}\n')}
    args = [files.get(a, a) for a in args]
    explainer = [] if "--explainer" in args else ["--explainer", "attention"]
    code, out, err = cli_run(capsys, "explain", "--model", model_dir, *args, *explainer)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    assert "Traceback" not in out + err
    assert message in err, err


def test_cli_records_truncation_and_explains_a_chosen_label(capsys, tmp_path, model_dir):
    code, out, err = cli_run(capsys, "explain", "--model", model_dir, "--text", "the film " * 20, "--explainer",
                             "attention", "--target", "c1", "--jsonl", tmp_path / "e.jsonl")
    assert code == 0, err
    assert "explaining c1" in out and "note: 1 text(s) had more words than the model's 32 positions and were cut" in out
    record = json.loads((tmp_path / "e.jsonl").read_text())
    assert record["truncated"] is True and record["target"] == 1
