"""`attnaudit run / analyze / report / explain`: the whole pipeline on seconds-long settings, its files and refusals."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import cli_run

from attnaudit.jobs import plan_run

TINY_TOML = """
[run]
tasks = ["needle", "majority"]
seed = 3

[train]
d_model = 32
n_heads = 2
n_layers = 2
d_ff = 64
epochs = 1
n_train = 256
n_valid = 64
n_test = 64

[train.majority]
epochs = 2

[audit]
max_examples = 8
chunk_size = 4
explainers = ["attention", "rollout", "saliency", "occlusion", "random"]
n_permutations = 4
adversarial_steps = 3
sanity_examples = 3
counterfactual_examples = 8
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path



def test_plan_reads_the_config_on_top_of_the_defaults(config):
    plan = plan_run(config=config)
    assert plan.tasks == ("needle", "majority")
    assert plan.train["needle"].epochs == 1 and plan.train["majority"].epochs == 2
    assert plan.train["needle"].seed == 3 and plan.audit.seed == 3
    assert plan.audit.explainers == ("attention", "rollout", "saliency", "occlusion", "random")
    assert plan_run(quick=True).audit.max_examples < plan_run().audit.max_examples


@pytest.mark.parametrize("text, fragment", [
    ("[colour]\nx = 1\n", "unknown section [colour]"),
    ("[run]\ntask = ['needle']\n", "unknown key 'task' in [run]"),
    ("[run]\ntasks = ['translate']\n", "[run] tasks must list distinct built-in tasks"),
    ("[run]\ntasks = ['needle', 'needle']\n", "[run] tasks must list distinct built-in tasks"),
    ("[run]\ntasks = ['needle']\n[train]\nepoch = 3\n", "unknown training setting 'epoch'"),
    ("[run]\ntasks = ['needle']\n[train.majority]\nepochs = 3\n", "[train.majority] names a task that is not"),
    ("[audit]\nexplainers = ['attention', 'vibes']\n", "[audit] explainers must be drawn from"),
    ("[run\n", "is not valid TOML"),
])
def test_bad_config_is_one_line_with_status_2(tmp_path, capsys, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, out, err = cli_run(capsys, "run", "--config", path, "--out", tmp_path / "rep", "--runs", tmp_path / "runs")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert not (tmp_path / "rep").exists()


@pytest.mark.slow
def test_run_writes_the_report_reuses_models_and_refuses_to_lose_work(tmp_path, config, capsys):
    out, runs = tmp_path / "rep", tmp_path / "runs"
    code, stdout, err = cli_run(capsys, "run", "--config", config, "--out", out, "--runs", runs)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == f"report written to {out / 'index.html'}"
    assert "needle: " in stdout and "majority: " in stdout
    for name in ("index.html", "report.md", "results.json", "metrics.csv.gz", "attributions.jsonl.gz", "curves_mean.csv",
                 "counterfactual.csv"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["verdicts"]) == {"needle", "majority"}
    assert results["model_cards"]["needle"]["architecture"]["d_model"] == 32
    metrics = pd.read_csv(out / "metrics.csv.gz")
    assert set(metrics["task"]) == {"needle", "majority"} and metrics["example_id"].nunique() == 16

    # the same command again: finished items exist, so it refuses rather than silently recomputing
    code, _, err = cli_run(capsys, "run", "--config", config, "--out", out, "--runs", runs)
    assert code == 2 and "--resume" in err, err
    # --resume: every item is reused, models too; the tables are the same bytes
    before = (out / "metrics.csv.gz").read_bytes()
    code, stdout, err = cli_run(capsys, "run", "--config", config, "--out", out, "--runs", runs, "--resume")
    assert code == 0, err
    assert "reusing the model" in stdout and (out / "metrics.csv.gz").read_bytes() == before
    # other settings into the same report folder: refused, then replaced with --overwrite
    other = tmp_path / "other.toml"
    other.write_text(TINY_TOML.replace("seed = 3", "seed = 4"))
    code, _, err = cli_run(capsys, "run", "--config", other, "--out", out, "--runs", runs)
    assert code == 2 and "different models or settings" in err and "--overwrite" in err, err
    code, _, err = cli_run(capsys, "run", "--config", other, "--out", out, "--runs", runs, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["settings"]["identity"]["audit"]["seed"] == 4

    # re-render from the saved files only
    (out / "index.html").unlink()
    code, stdout, err = cli_run(capsys, "report", out)
    assert code == 0 and (out / "index.html").is_file(), err

    # analyze a trained model on a built-in task, and explain a text with it
    model_dir = next(p for p in runs.iterdir() if p.name.startswith("needle"))
    small = tmp_path / "small.toml"
    small.write_text(TINY_TOML.split("[audit]")[0].split("[train]")[0] + "[audit]" + TINY_TOML.split("[audit]")[1])
    code, stdout, err = cli_run(capsys, "analyze", "--model", model_dir, "--task", "needle", "--out", tmp_path / "an",
                            "--config", small)
    assert code == 0, err
    assert json.loads((tmp_path / "an" / "results.json").read_text())["tasks"] == ["needle"]
    # a report that saved only its first example's attention gets every shown one back from its own model
    saved = (tmp_path / "an" / "attention.json").read_text()
    every = json.loads(saved)
    assert len(every) > 1
    (tmp_path / "an" / "attention.json").write_text(json.dumps(every[:1]))
    code, _, err = cli_run(capsys, "report", tmp_path / "an", "--attention-model", model_dir)
    assert code == 0, err
    again = json.loads((tmp_path / "an" / "attention.json").read_text())
    assert [a["id"] for a in again] == [a["id"] for a in every] and again == every
    other_model = next(p for p in runs.iterdir() if p.name.startswith("majority"))
    code, _, err = cli_run(capsys, "report", tmp_path / "an", "--attention-model", other_model)
    assert code == 2 and "is not the model" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli_run(capsys, "report", out, "--attention-model", model_dir)
    assert code == 2 and "records no model hash" in err, err
    code, stdout, err = cli_run(capsys, "explain", "--model", model_dir, "--text", "x1 x2 <script>",
                            "--explainer", "rollout,occlusion", "--jsonl", tmp_path / "e.jsonl")
    assert code == 0, err
    assert "rollout" in stdout and "occlusion" in stdout and "predicted" in stdout
    records = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["explainer"] for r in records] == ["rollout", "occlusion"]
    assert {"text", "tokens", "scores", "explainer", "params", "target", "prob"} <= set(records[0])


def test_out_that_is_a_file_or_another_folder_is_refused_before_training(tmp_path, config, capsys):
    f = tmp_path / "file.txt"
    f.write_text("mine")
    code, _, err = cli_run(capsys, "run", "--config", config, "--out", f, "--runs", tmp_path / "runs")
    assert code == 2 and "--out" in err, err
    d = tmp_path / "notes"
    d.mkdir()
    (d / "todo.txt").write_text("mine")
    code, _, err = cli_run(capsys, "run", "--config", config, "--out", d, "--runs", tmp_path / "runs")
    assert code == 2 and "holds no attnaudit report" in err, err
    assert not (tmp_path / "runs").exists() and (d / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("args, fragment", [
    (["explain", "--model", "MODEL", "--text", "a", "--explainer", "vibes"], "--explainer must be registry names"),
    (["explain", "--model", "MODEL"], "exactly one of --text or --data"),
    (["analyze", "--model", "MODEL", "--out", "OUT"], "exactly one of --task"),
    (["analyze", "--model", "MODEL", "--out", "OUT", "--data", "x.csv"], "--data needs --text-col"),
    (["report", "NOWHERE"], "results.json"),
])
def test_command_errors_are_one_line(tmp_path, capsys, args, fragment):
    args = [str(tmp_path / a) if a in ("MODEL", "OUT", "NOWHERE") else a for a in args]
    code, _, err = cli_run(capsys, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err


@pytest.mark.slow
def test_run_covers_the_seq2seq_task(tmp_path, capsys):
    path = tmp_path / "reorder.toml"
    path.write_text('[run]\ntasks = ["reorder"]\n[train]\nd_model = 32\nn_heads = 2\nd_ff = 64\nepochs = 2\n'
                    'n_train = 1500\nn_valid = 100\nn_test = 40\nmax_len = 16\n[audit]\nmax_examples = 20\n'
                    'n_permutations = 4\n')
    code, stdout, err = cli_run(capsys, "run", "--config", path, "--out", tmp_path / "rep", "--runs", tmp_path / "runs")
    assert code == 0, err
    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert results["tasks"] == ["reorder"] and results["verdicts"]["reorder"]["answer"] != "undetermined"
    metrics = pd.read_csv(tmp_path / "rep" / "metrics.csv.gz")
    assert {"gold_auprc", "comprehensiveness"} <= set(metrics["metric"])
    assert set(metrics["example_id"]) - {"(corpus)"} == {f"reorder-test-{i:06d}" for i in range(20)}   # + corpus rows
    assert {"alignment_error_rate", "bleu", "exact_match"} <= set(metrics["metric"])
