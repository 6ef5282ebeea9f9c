"""HuggingFace folders as users have them: LABEL_0/LABEL_1 heads with 0/1 data, no tokenizer files, an untrained
head. Tiny random models written here (see test_hf.py); nothing is downloaded."""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

transformers = pytest.importorskip(
    "transformers", reason="the HuggingFace adapter needs the optional extra: pip install 'attnaudit[hf]'")

from conftest import cli_run, make_tiny_model
from test_hf import tiny_net, wordpiece_tokenizer, write_folder

import attnaudit
from attnaudit.data import read_labelled

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHEAP = '[audit]\nexplainers = ["attention"]\nanalyses = ["faithfulness"]\nferret = false\nmax_examples = 6\n'


def assert_user_error(result, *fragments: str) -> None:
    code, out, err = result
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in out + err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """What `AutoModelForSequenceClassification.from_config(BertConfig(num_labels=2)).save_pretrained` gives:
    a head whose classes are called LABEL_0 and LABEL_1."""
    return write_folder(tmp_path_factory.mktemp("fresh"), "bert")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A BertModel folder: encoder weights and tokenizer, no classification head."""
    folder = tmp_path_factory.mktemp("base")
    transformers.BertModel(tiny_net("bert", len(wordpiece_tokenizer())).config).save_pretrained(folder)
    wordpiece_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"{'a good film' if i % 2 else 'a bad plot'},{i % 2}\n" for i in range(8)))
    (tmp_path / "audit.toml").write_text(CHEAP)
    return path


# -- integer labels are class indices --------------------------------------------------------------------
def test_integer_labels_index_named_classes(data, fresh):
    model = attnaudit.load_model(fresh)
    assert model.label_names == ("LABEL_0", "LABEL_1")
    loaded = read_labelled(data, text_col="text", label_col="label", label_names=model.label_names)
    assert [e.label for e in loaded.examples] == [i % 2 for i in range(8)]
    builtin = make_tiny_model()                                  # named classes c0, c1; 0/1 in the file
    loaded = read_labelled(data, text_col="text", label_col="label", label_names=builtin.label_names)
    assert [e.label for e in loaded.examples][:2] == [0, 1]
    loaded = read_labelled(data, text_col="text", label_col="label", label_names=("negative", "positive"))
    assert loaded.label_names == ("negative", "positive")


def test_out_of_range_integer_and_integer_names_are_not_indices(tmp_path):
    path = tmp_path / "three.csv"
    path.write_text("text,label\na,0\nb,2\n")
    with pytest.raises(ValueError, match=r"line 3: label '2' is not one of the label_names neg, pos nor a class "
                                         r"index in \[0, 1\]"):
        read_labelled(path, text_col="text", label_col="label", label_names=("neg", "pos"))
    path.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(ValueError, match=r"label '0' is not one of the label_names 1, 2;"):   # "1" names a class
        read_labelled(path, text_col="text", label_col="label", label_names=("1", "2"))


@pytest.mark.slow
def test_analyze_a_fresh_head_with_integer_labels_and_label_names(capsys, tmp_path, data, fresh):
    out = tmp_path / "report"
    code, stdout, err = cli_run(capsys, "analyze", "--model", fresh, "--data", data, "--text-col", "text",
                                "--label-col", "label", "--config", tmp_path / "audit.toml", "--out", out,
                                "--label-names", "negative, positive", "--quiet")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    card = next(iter(results["model_cards"].values()))
    assert card["label_names"] == ["negative", "positive"] and "untrained_weights" not in card
    assert_user_error(cli_run(capsys, "analyze", "--model", fresh, "--data", data, "--text-col", "text",
                              "--label-col", "label", "--out", tmp_path / "r2", "--label-names", "a,b,c"),
                      "--label-names must name each of the model's 2 classes", "got 3 (a, b, c)", "LABEL_0, LABEL_1")
    assert_user_error(cli_run(capsys, "analyze", "--model", fresh, "--data", data, "--text-col", "text",
                              "--label-col", "label", "--out", tmp_path / "r2", "--label-names", "a,a"),
                      "--label-names must be two or more distinct")


def test_explain_names_classes(capsys, fresh):
    code, out, err = cli_run(capsys, "explain", "--model", fresh, "--text", "a good film", "--explainer", "attention",
                             "--label-names", "neg,pos", "--target", "pos")
    assert code == 0, err
    assert "explaining pos (p = " in out
    assert_user_error(cli_run(capsys, "explain", "--model", fresh, "--text", "good", "--label-names", "x"),
                      "--label-names must be two or more")


# -- tokenizer files ---------------------------------------------------------------------------------------
def test_a_folder_without_tokenizer_files_is_refused(capsys, tmp_path):
    folder = tmp_path / "weights-only"
    tiny_net("bert", len(wordpiece_tokenizer())).save_pretrained(folder)       # config.json + model.safetensors
    capsys.readouterr()                                                        # transformers' "Writing model shards"
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files \(tokenizer.json or vocab.txt"):
        attnaudit.load_model(folder)
    assert_user_error(cli_run(capsys, "explain", "--model", folder, "--text", "a good film"),
                      "no tokenizer files", "tokenizer.json or vocab.txt", "[UNK]",
                      f"tokenizer.save_pretrained({str(folder)!r})")


# -- newly initialised weights -----------------------------------------------------------------------------
@pytest.mark.slow
def test_untrained_head_is_recorded_warned_and_refused_by_analyze(capsys, tmp_path, data, base):
    with pytest.warns(UserWarning, match="UNTRAINED"):
        model = attnaudit.load_model(base)
    assert model.untrained_weights == ["classifier.bias", "classifier.weight"]
    assert model.config["untrained_weights"] == model.untrained_weights
    args = ("analyze", "--model", base, "--data", data, "--text-col", "text", "--label-col", "label",
            "--config", tmp_path / "audit.toml", "--out", tmp_path / "report", "--quiet")
    code, out, err = cli_run(capsys, *args)
    assert code == 2 and "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert lines[0].startswith("warning: ") and "UNTRAINED" in lines[0]          # the load's warning: one line
    assert lines[1].startswith("error: ") and len(lines) == 2
    assert "newly initialised at load (classifier.bias, classifier.weight)" in lines[1]
    assert "--allow-untrained" in lines[1] and "attnaudit finetune" in lines[1]
    code, out, err = cli_run(capsys, *args, "--allow-untrained")
    assert code == 0, err
    card = next(iter(json.loads((tmp_path / "report" / "results.json").read_text())["model_cards"].values()))
    assert card["untrained_weights"] == ["classifier.bias", "classifier.weight"]
    assert card["training"]["head"].startswith("untrained")


def test_finetune_trains_the_fresh_head_and_its_folder_is_accepted(capsys, tmp_path, data, base):
    out = tmp_path / "tuned"
    code, stdout, err = cli_run(capsys, "finetune", "--hf", base, "--data", data, "--text-col", "text",
                                "--label-col", "label", "--out", out, "--epochs", "1", "--quiet")
    assert code == 0, err
    assert "warning" not in err                                  # finetune is what a fresh head is for
    model = attnaudit.load_model(out)
    assert model.untrained_weights == [] and model.config["head"] == "trained"
