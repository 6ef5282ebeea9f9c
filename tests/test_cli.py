"""The command line: a tiny training run succeeds, and every user error is one `error:` line with status 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import cli_run

from attnaudit.model import train as train_module
from attnaudit.model.train import TrainSettings

TINY = TrainSettings(d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=32, epochs=1, batch_size=32,
                     warmup=20, n_train=96, n_valid=32, n_test=32)



@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield

@pytest.fixture(autouse=True)
def tiny_defaults(monkeypatch):
    """The CLI trains with `defaults_for(task)`; here those are a seconds-long tiny model."""
    monkeypatch.setattr(train_module, "defaults_for", lambda task=None: TINY)



def assert_user_error(result, *fragments: str) -> None:
    code, out, err = result
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} film {i},{i % 2}\n" for i in range(40)))
    return path


def test_train_task_writes_a_model_and_prints_where(capsys, tmp_path):
    code, out, err = cli_run(capsys, "train", "--task", "needle", "--out", tmp_path / "m", "--epochs", "2", "--quiet")
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith(f"model saved to {tmp_path / 'm'} (test accuracy ")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["training"]["settings"]["epochs"] == 2
    # the identical configuration may retrain into its own folder; another seed may not
    assert cli_run(capsys, "train", "--task", "needle", "--out", tmp_path / "m", "--epochs", "2", "--quiet")[0] == 0
    assert_user_error(cli_run(capsys, "train", "--task", "needle", "--out", tmp_path / "m", "--epochs", "2",
                          "--seed", "1"), "different model", "settings.seed 0 there, 1 now", "--overwrite")
    assert_user_error(cli_run(capsys, "train", "--task", "majority", "--out", tmp_path / "m"), "different model")
    code, out, _ = cli_run(capsys, "train", "--task", "majority", "--out", tmp_path / "m", "--overwrite")
    assert code == 0 and "majority: test accuracy" in out


def test_train_data_file_summary_and_held_out_split(capsys, tmp_path, table):
    code, out, err = cli_run(capsys, "train", "--data", table, "--text-col", "text", "--label-col", "label",
                         "--out", tmp_path / "m", "--device", "cpu")
    assert code == 0, err
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["n_valid"] == 4 and "held-out 10% of reviews.csv" in metrics["test_set"]
    assert "reviews.csv: test accuracy" in out


def test_non_empty_folder_that_is_not_a_model_is_refused(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    assert_user_error(cli_run(capsys, "train", "--task", "needle", "--out", tmp_path), "holds no attnaudit model",
                      "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("args, fragments", [
    (["--task", "needles"], ["Unknown task 'needles'", "copy, keywords, majority, needle, recall, reorder"]),
    ([], ["exactly one of --task", "neither"]),
    (["--task", "needle", "--data", "x.csv"], ["exactly one of --task", "got --task and --data"]),
    (["--parallel", "x.txt", "--text-col", "a"], ["--text-col and --label-col go with --data"]),
    (["--parallel", "missing.txt"], ["missing.txt"]),
    (["--task", "needle", "--device", "tpu"], ["device must be one of auto, cpu, cuda"]),
    (["--data", "missing.csv", "--text-col", "text", "--label-col", "label"], ["missing.csv", "does not exist"]),
    (["--data", "{table}"], ["--data needs --text-col and --label-col"]),
])
def test_train_usage_errors(capsys, tmp_path, table, args, fragments):
    args = [str(table) if a == "{table}" else a for a in args]
    assert_user_error(cli_run(capsys, "train", "--out", tmp_path / "m", *args), *fragments)
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_asked_but_unavailable(capsys, tmp_path):
    assert_user_error(cli_run(capsys, "train", "--task", "needle", "--out", tmp_path, "--device", "cuda"),
                      "CUDA is not available")


@pytest.mark.parametrize("content, fragments", [
    ("", ["is empty"]),
    ("text,label\n", ["no data rows"]),
    ("sentence,label\nfine,1\n", ["no column 'text'", "Columns present: sentence, label"]),
    ("text,label\ngood,1\nbad,1\n", ["single class '1'"]),
])
def test_bad_data_files(capsys, tmp_path, content, fragments):
    data = tmp_path / "bad.csv"
    data.write_text(content)
    assert_user_error(cli_run(capsys, "train", "--data", data, "--text-col", "text", "--label-col", "label",
                          "--out", tmp_path / "m"), *fragments)


def test_option_errors_are_one_line_too(capsys, tmp_path):
    assert_user_error(cli_run(capsys, "train", "--task", "needle"), "Missing option '--out'")
    assert_user_error(cli_run(capsys, "train", "--task", "needle", "--out", tmp_path, "--epochs", "many"), "--epochs")
    assert_user_error(cli_run(capsys, "trian"), "No such command 'trian'")


def test_tasks_export_writes_jsonl_with_one_rationale_entry_per_word(capsys, tmp_path):
    out = tmp_path / "kw.jsonl"
    code, stdout, err = cli_run(capsys, "tasks", "export", "--task", "keywords", "--split", "test", "--out", out,
                            "--n", "25", "--seed", "3")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 25 and f"wrote 25 keywords test examples to {out}" in stdout
    for r in records:
        assert len(r["rationale"]) == len(r["text"].split()) and r["label"] in (0, 1)
    assert_user_error(cli_run(capsys, "tasks", "export", "--task", "keywords", "--split", "dev", "--out", out),
                      "split must be one of train, valid, test")


@pytest.mark.slow
def test_python_dash_m_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "attnaudit", "train", "--task", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: Unknown task 'nope'") and "Traceback" not in proc.stderr


def test_train_data_file_with_a_valid_file(capsys, tmp_path, table):
    valid = tmp_path / "dev.csv"
    valid.write_text("text,label\ngood film,1\nbad film,0\n")
    code, out, err = cli_run(capsys, "train", "--data", table, "--valid", valid, "--text-col", "text",
                         "--label-col", "label", "--out", tmp_path / "m", "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_valid"]) == (40, 2) and "on dev.csv" in metrics["test_set"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["training"]["data"]["valid_sha256"] and cfg["training"]["data"]["holdout_fraction"] is None


@pytest.mark.parametrize("command", ["train", "finetune", "run", "analyze", "explain"])
def test_help_keeps_brackets_and_shows_flags_as_flags(capsys, command):
    code, out, _ = cli_run(capsys, command, "--help")
    assert code == 0
    assert "<bool>" not in out and "--quiet" in out               # a flag reads "--quiet", not "--quiet <bool>"
    if command == "analyze":
        assert "TOML file with [audit] choices" in " ".join(out.split())   # not eaten as Rich markup
        assert "--allow-untrained" in out and "--label-names <str>" in out
    if command == "run":
        assert "--quick " in out and "--resume " in out


def test_train_without_quiet_reports_steps_on_stderr(capsys, tmp_path):
    code, out, err = cli_run(capsys, "train", "--task", "needle", "--out", tmp_path / "m", "--epochs", "1")
    assert code == 0, err
    assert "train needle 0/" in err and " steps (100%)" in err and "\r" not in err   # plain lines: stderr is no tty
