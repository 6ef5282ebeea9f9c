"""Any labelled file the command line takes: tables, ERASER annotation files and HateXplain files are told
apart by their contents, trained on with --valid/--test, and analysed with their rationales scored."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import cli_run

from attnaudit.data import data_format, read_labelled
from attnaudit.model.run_folder import labelled_splits
from attnaudit.model.settings import defaults_for
from attnaudit.model.train import train_to_folder

WORDS = {0: "dull awful boring", 1: "great joy superb"}
FILLER = "the film was seen by me on a day".split()


def _eraser(folder, split: str, n: int, *, seed: int) -> None:
    """n documents whose one evidence word decides the label; docs.jsonl holds the texts."""
    docs = folder / "docs.jsonl"
    have = [json.loads(x) for x in docs.read_text().splitlines()] if docs.exists() else []
    rows = []
    for i in range(n):
        label = (i + seed) % 2
        word = WORDS[label].split()[i % 3]
        pos = (i * 7 + seed) % len(FILLER)
        tokens = FILLER[:pos] + [word] + FILLER[pos:]
        docid = f"{split}{i}"
        have.append({"docid": docid, "document": " ".join(tokens)})
        rows.append({"annotation_id": docid, "classification": ["NEG", "POS"][label], "query": "?",
                     "evidences": [[{"docid": docid, "start_token": pos, "end_token": pos + 1, "text": word}]]})
    docs.write_text("".join(json.dumps(d) + "\n" for d in have))
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def eraser(tmp_path):
    folder = tmp_path / "movies"
    folder.mkdir()
    for split, n, seed in (("train", 120, 0), ("val", 24, 1), ("test", 24, 2)):
        _eraser(folder, split, n, seed=seed)
    return folder


@pytest.fixture
def hatexplain(tmp_path):
    posts = {f"p{i}": {"post_id": f"p{i}", "post_tokens": ["you", "are", "vile" if i % 2 else "kind"],
                       "annotators": [{"label": "offensive" if i % 2 else "normal"}] * 3,
                       "rationales": [[0, 0, 1]] * 2 if i % 2 else []} for i in range(4)}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(posts))
    return path


def test_formats_are_told_apart_by_content(eraser, hatexplain, tmp_path):
    table = tmp_path / "t.jsonl"                               # a JSONL table is not ERASER
    table.write_text('{"text": "a b", "label": "x"}\n{"text": "c", "label": "y"}\n')
    assert [data_format(p) for p in (eraser / "test.jsonl", hatexplain, table)] == ["eraser", "hatexplain", "table"]
    movies = read_labelled(eraser / "test.jsonl")
    assert movies.info["format"] == "eraser" and movies.label_names == ("NEG", "POS")
    first = movies.examples[0]
    assert first.rationale[first.text.split().index("superb" if first.label else "dull")] == 1 and sum(first.rationale) == 1
    hate = read_labelled(hatexplain)
    assert hate.info["format"] == "hatexplain" and [e.rationale for e in hate.examples][:2] == [(0, 0, 0), (0, 0, 1)]
    rows = read_labelled(table, text_col="text", label_col="label")
    assert [e.text for e in rows.examples] == ["a b", "c"] and rows.info["format"] == "table"


@pytest.mark.parametrize("call, fragment", [
    (lambda e, t: read_labelled(e / "test.jsonl", text_col="text", label_col="label"), "names its own"),
    (lambda e, t: read_labelled(t), "name its columns with text_col and label_col"),
    (lambda e, t: read_labelled(t, text_col="text", label_col="label", max_tokens=3), "max_tokens goes with ERASER"),
    (lambda e, t: read_labelled(e / "nothing.jsonl"), "does not exist"),
])
def test_wrong_combinations_are_named(eraser, tmp_path, call, fragment):
    table = tmp_path / "t.csv"
    table.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(ValueError, match=fragment):
        call(eraser, table)


def test_labelled_splits_index_every_split_by_the_training_names(eraser):
    s = labelled_splits(eraser / "train.jsonl", valid=eraser / "val.jsonl", test=eraser / "test.jsonl")
    assert (len(s["train"]), len(s["valid"]), len(s["test"])) == (120, 24, 24)
    assert s["label_names"] == ("NEG", "POS") and s["info"]["format"] == "eraser"
    assert s["info"]["test_sha256"] and s["info"]["holdout_fraction"] is None
    assert {e.label for e in s["test"]} == {0, 1}



def test_train_cli_takes_eraser_splits_and_scores_test_once(eraser, tmp_path, capsys, one_thread_module):
    model = tmp_path / "model"
    code, stdout, err = cli_run(capsys, "train", "--data", eraser / "train.jsonl", "--valid", eraser / "val.jsonl",
                            "--test", eraser / "test.jsonl", "--max-len", 16, "--epochs", 1, "--out", model)
    assert code == 0, err
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["test_set"].startswith("test.jsonl") and (metrics["n_train"], metrics["n_test"]) == (120, 24)
    assert json.loads((model / "config.json").read_text())["architecture"]["max_len"] == 16


@pytest.mark.slow
def test_analyze_scores_an_eraser_split_against_its_rationales(eraser, tmp_path, capsys, one_thread_module):
    model, out = tmp_path / "model", tmp_path / "report"
    settings = defaults_for(None).replace(max_len=16, d_model=32, n_heads=2, d_ff=64, warmup=20, epochs=12)
    _, metrics = train_to_folder(model, data=eraser / "train.jsonl", valid=eraser / "val.jsonl",
                                 test=eraser / "test.jsonl", settings=settings, progress=False)
    assert metrics["test_accuracy"] >= 0.9                    # one evidence word decides the label
    config = tmp_path / "a.toml"
    config.write_text('[audit]\nexplainers = ["attention", "occlusion", "random"]\nn_permutations = 3\n'
                      'adversarial_steps = 2\nsanity_examples = 2\ncounterfactual_examples = 6\n')
    code, stdout, err = cli_run(capsys, "analyze", "--model", model, "--data", eraser / "test.jsonl", "--config", config,
                            "--max-examples", 12, "--name", "tiny-movies", "--quiet", "--out", out)
    assert code == 0, err
    table = pd.read_csv(out / "metrics.csv.gz")
    plaus = table[table.metric == "rationale_token_f1"].groupby("explainer")["value"]
    assert set(plaus.size().index) == {"attention", "occlusion", "random"} and (plaus.size() == 12).all()
    assert plaus.mean()["occlusion"] >= 0.9                    # the one evidence word is the one that matters
    assert plaus.mean()["random"] < 0.5                        # 1 of ~10 tokens by chance
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["n_examples"] == {"tiny-movies": 12}
    source = results["model_cards"]["tiny-movies"]["data_source"]
    assert source["format"] == "eraser" and source["n_examples"] == 24


def test_table_without_columns_is_one_line_before_any_work(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("text,label\na,x\nb,y\n")
    code, _, err = cli_run(capsys, "train", "--data", table, "--out", tmp_path / "m")
    assert code == 2 and "--data needs --text-col and --label-col" in err and err.count("\n") == 1
