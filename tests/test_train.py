"""Training: tiny runs learn, the same seed gives the same bits, and a model folder round-trips exactly."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from attnaudit.data.examples import Example
from attnaudit.model import train as train_module
from attnaudit.model.checkpoint import load_model, save_checkpoint
from attnaudit.model.schedule import noam_lr
from attnaudit.model.train import (
    TrainSettings,
    check_out_dir,
    defaults_for,
    resolve_device,
    train_classifier,
    train_seq2seq,
    train_task,
    train_to_folder,
)
from attnaudit.model.transformer import TransformerClassifier, TransformerSeq2Seq

# A 1-layer, d_model=32 model on a few hundred examples: each run takes well under a second of compute.
TINY = TrainSettings(d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=32, epochs=2, batch_size=32,
                     warmup=40, lr_factor=0.5, dropout=0.1, n_train=480, n_valid=100, n_test=200)



@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield

@pytest.fixture(scope="module")
def needle_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "needle"
    path, metrics = train_to_folder(out, task="needle", settings=TINY, device="cpu", progress=False)
    return path, metrics


def test_short_needle_run_learns_above_chance(needle_run):
    _, metrics = needle_run
    assert metrics["test_accuracy"] > 0.6            # chance is 0.25 (four needles)
    assert metrics["n_train"] == 480 and metrics["n_test"] == 200
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] <= TINY.epochs


def test_folder_holds_model_config_metrics_and_log(needle_run):
    path, metrics = needle_run
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "config.json", "metrics.json", "train_log.csv"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["task"]["name"] == "needle" and cfg["task"]["label_names"] == ["apple", "river", "stone", "cloud"]
    assert cfg["training"]["settings"] == TINY.to_dict() and cfg["training"]["seed"] == 0
    assert cfg["architecture"]["norm"] == "post" and cfg["architecture"]["d_model"] == 32
    saved = json.loads((path / "metrics.json").read_text())
    assert saved["test_accuracy"] == metrics["test_accuracy"] and "test_set" in saved
    rows = list(csv.DictReader((path / "train_log.csv").open()))
    assert list(rows[0]) == ["step", "epoch", "lr", "loss"] and len(rows) == metrics["steps"]
    # the logged lr is the one each step used: the Noam formula at steps 1 and 2
    for row in rows[:2]:
        expected = noam_lr(int(row["step"]), d_model=32, warmup=40, factor=TINY.lr_factor)
        assert float(row["lr"]) == pytest.approx(expected, rel=1e-5)


def test_checkpoint_round_trip_gives_identical_logits(needle_run, tmp_path):
    path, _ = needle_run
    model = load_model(path)
    batch = model.encode(["the apple was in the film", "river"])
    save_checkpoint(model, tmp_path / "copy")
    again = load_model(tmp_path / "copy")
    with model.evaluating(), again.evaluating():
        torch.testing.assert_close(model(batch), again(batch), rtol=0, atol=0)
    assert again.label_names == model.label_names


def test_same_seed_gives_bitwise_identical_weights_other_seed_does_not():
    small = TINY.replace(n_train=96, n_valid=32, n_test=32, epochs=1)
    a, _ = train_task("needle", small, device="cpu", progress=False)
    b, _ = train_task("needle", small, device="cpu", progress=False)
    c, _ = train_task("needle", small.replace(seed=1), device="cpu", progress=False)
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("task", ["needle", "reorder"])
def test_training_starts_from_the_constructors_weights(task, monkeypatch):
    """train.py seeds torch and builds the model; it does not re-initialise what the constructor drew."""
    seen = {}

    def no_steps(net, *args, **kwargs):                                      # stands in for the loop
        seen.update({k: v.detach().clone() for k, v in net.state_dict().items()})
        return {"best_epoch": 0, "epochs_run": 0, "steps": 0, "train_seconds": 0.0, "last_epoch_loss": 0.0,
                "valid_scores": [], "valid_losses": [], "log": []}

    monkeypatch.setattr(train_module, "fit", no_steps)
    small = TINY.replace(n_train=32, n_valid=8, n_test=8, seed=3, max_len=16)
    model, _ = train_task(task, small, device="cpu", progress=False)
    torch.manual_seed(small.seed)
    if task == "needle":
        fresh = TransformerClassifier(small.architecture(vocab_size=len(model.vocab), n_classes=4,
                                                         pad_id=model.vocab.pad_id))
    else:
        fresh = TransformerSeq2Seq(small.architecture(vocab_size=len(model.src_vocab),
                                                      tgt_vocab_size=len(model.tgt_vocab), pad_id=model.src_vocab.pad_id))
    assert seen.keys() == fresh.state_dict().keys()
    assert all(torch.equal(seen[k], v) for k, v in fresh.state_dict().items())


def test_split_modules_are_re_exported_from_train():
    from attnaudit.model import evaluate, fit, run_folder, settings

    assert train_module.TrainSettings is settings.TrainSettings and train_module.defaults_for is settings.defaults_for
    assert train_module.resolve_device is settings.resolve_device and train_module.fit is fit.fit
    assert train_module.evaluate_classifier is evaluate.evaluate_classifier
    assert train_module.check_out_dir is run_folder.check_out_dir and train_module._identity is run_folder.run_identity
    assert all(hasattr(train_module, name) for name in train_module.__all__)


def test_retraining_same_configuration_is_allowed_a_different_one_refused(needle_run, tmp_path):
    path, _ = needle_run
    cfg = json.loads((path / "config.json").read_text())
    from attnaudit.model.train import _identity
    check_out_dir(path, _identity(cfg["task"], cfg["training"]))            # same run: fine
    with pytest.raises(ValueError, match=r"different model \(settings\.seed 0 there, 1 now"):
        check_out_dir(path, _identity(cfg["task"], {**cfg["training"], "settings": TINY.replace(seed=1).to_dict()}))
    check_out_dir(path, {}, overwrite=True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no attnaudit model.*--overwrite"):
        check_out_dir(tmp_path, _identity(cfg["task"], cfg["training"]))


def test_seq2seq_tiny_run_translates_and_reports_metrics(tmp_path):
    small = TINY.replace(n_train=256, n_valid=32, n_test=32, epochs=1, max_len=16)
    model, metrics = train_task("reorder", small, device="cpu", progress=False, log_path=tmp_path / "log.csv")
    out = model.translate(["the cat sees a dog", "red fox likes bear"])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    for key in ("valid_exact_match", "valid_bleu", "test_exact_match", "test_bleu", "best_epoch", "train_seconds"):
        assert key in metrics
    assert 0.0 <= metrics["test_exact_match"] <= 1.0 and 0.0 <= metrics["test_bleu"] <= 100.0
    assert (tmp_path / "log.csv").read_text().startswith("step,epoch,lr,loss\n")


def test_train_from_a_data_file_holds_out_ten_percent_and_records_its_hash(tmp_path):
    rows = ["text,label"] + [f"{'good fine' if i % 2 else 'bad poor'} movie number{i % 7},{'pos' if i % 2 else 'neg'}"
                             for i in range(60)]
    data = tmp_path / "reviews.csv"
    data.write_text("\n".join(rows) + "\n")
    path, metrics = train_to_folder(tmp_path / "run", data=data, text_col="text", label_col="label",
                                    settings=TINY.replace(epochs=3, warmup=10), device="cpu", progress=False)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["label_names"] == ["neg", "pos"] and cfg["task"]["source"] == "file"
    assert len(cfg["training"]["data"]["sha256"]) == 64 and cfg["training"]["data"]["holdout_fraction"] == 0.1
    assert (metrics["n_train"], metrics["n_valid"]) == (54, 6)
    assert metrics["test_accuracy"] == metrics["valid_accuracy"] and "held-out 10%" in metrics["test_set"]


def test_classifier_refuses_missing_or_out_of_range_labels():
    good = [Example("a", "good film", label=1), Example("b", "bad film", label=0)]
    with pytest.raises(ValueError, match=r"label 2; every example needs a class index in \[0, 1\]"):
        train_classifier(good + [Example("c", "odd", label=2)], good, label_names=("neg", "pos"),
                         settings=TINY, device="cpu", progress=False)
    with pytest.raises(ValueError, match="no target text"):
        train_seq2seq(good, good, settings=TINY, device="cpu", progress=False)


def test_settings_and_device_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"TrainSettings.epochs must be an int >= 1; got 0"):
        TrainSettings(epochs=0)
    with pytest.raises(ValueError, match="Unknown TrainSettings field 'epoch'. Available: d_model"):
        TINY.replace(epoch=3)
    with pytest.raises(ValueError, match="Unknown task 'needles'. Available: copy, keywords, majority, needle, recall, reorder"):
        defaults_for("needles")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_defaults_are_the_small_post_ln_model():
    for task in ("keywords", "needle", "majority", "reorder"):
        s = defaults_for(task)
        assert (s.norm, s.d_model, s.n_layers, s.n_heads) == ("post", 64, 2, 4)
