"""Loaders for user files: every format reads the same rows, and every bad file gets a named error."""
from __future__ import annotations

import gzip
import json

import pytest

from attnaudit.data.examples import Example, read_table, write_jsonl

TSV = 'sentence\tlabel\nit \'s a "charming" film\t1\nNA\t0\nnull and void\t1\n'


def _write(path, text):
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["train.tsv", "train.tsv.gz"])
def test_tsv_keeps_quotes_and_na_words(tmp_path, name):
    examples, names = read_table(_write(tmp_path / name, TSV), text_col="sentence", label_col="label")
    assert names == ("0", "1")
    assert [e.text for e in examples] == ['it \'s a "charming" film', "NA", "null and void"]
    assert [e.label for e in examples] == [1, 0, 1]
    assert [e.id for e in examples] == ["0", "1", "2"]


@pytest.mark.parametrize("name", ["data.csv", "data.csv.gz"])
def test_csv_with_id_column_and_string_labels(tmp_path, name):
    text = 'id,text,label\na7,"good, really",pos\nb2,bad,neg\nc1,fine,pos\n'
    examples, names = read_table(_write(tmp_path / name, text), text_col="text", label_col="label")
    assert names == ("neg", "pos")
    assert examples == [Example("a7", "good, really", 1), Example("b2", "bad", 0), Example("c1", "fine", 1)]


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.jsonl.gz"])
def test_jsonl_with_integer_labels_sorted_numerically(tmp_path, name):
    lines = [{"t": "a b", "y": 10}, {"t": "c", "y": 2}, {}, {"t": "d", "y": 2}]
    text = "\n".join("" if not r else json.dumps(r) for r in lines) + "\n"   # a blank line is skipped
    examples, names = read_table(_write(tmp_path / name, text), text_col="t", label_col="y")
    assert names == ("2", "10")
    assert [e.label for e in examples] == [1, 0, 0]


def test_validation_file_uses_training_label_names(tmp_path):
    path = _write(tmp_path / "dev.tsv", "sentence\tlabel\nonly ones\t1\n")
    examples, names = read_table(path, text_col="sentence", label_col="label", label_names=("0", "1"))
    assert names == ("0", "1") and examples[0].label == 1   # a single class is fine here


def test_unknown_label_names_value_and_line(tmp_path):
    path = _write(tmp_path / "dev.tsv", "sentence\tlabel\nok\t1\nodd\t2\n")
    with pytest.raises(ValueError, match=r"line 3: label '2' is not one of the label_names 0, 1"):
        read_table(path, text_col="sentence", label_col="label", label_names=("0", "1"))


@pytest.mark.parametrize("name, text, match", [
    ("data.txt", "x", r"Unknown file type for 'data.txt'\. Supported: \.csv, \.tsv, \.jsonl"),
    ("empty.csv", "", r"is empty"),
    ("empty.jsonl", "\n\n", r"has no data rows"),
    ("header.tsv", "sentence\tlabel\n", r"has no data rows"),
    ("cols.csv", "text,y\na,1\n", r"has no column 'label'\. Columns present: text, y"),
    ("keys.jsonl", '{"text": "a"}\n', r"line 1 has no key 'label'\. Keys present: text"),
    ("one.tsv", "sentence\tlabel\na\t1\nb\t1\nc\t1\n", r"single class '1' in all 3 rows"),
    ("blank.tsv", "sentence\tlabel\na\t1\n   \t0\n", r"line 3: column 'sentence' is empty or whitespace"),
    ("bad.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", label: 0}\n', r"line 2: not valid JSON"),
    ("list.jsonl", "[1, 2]\n", r"line 1: expected a JSON object, got list"),
    ("dup.csv", "id,sentence,label\nx,a,0\nx,b,1\n", r"line 3: id 'x' was already used on line 2"),
])
def test_bad_files_get_named_errors(tmp_path, name, text, match):
    path = _write(tmp_path / name, text)
    with pytest.raises(ValueError, match=match):
        read_table(path, text_col="sentence" if "sentence" in text else "text", label_col="label")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.tsv' does not exist"):
        read_table(tmp_path / "nope.tsv", text_col="sentence", label_col="label")


def test_write_jsonl_round_trips_and_leaves_no_temp_file(tmp_path):
    examples = [Example("0", "a b", label=1, rationale=(1, 0)),
                Example("1", "cat sees dog", target="chat voit chien", alignment=((0, 0), (1, 1), (2, 2)))]
    path = write_jsonl(examples, tmp_path / "out" / "tasks.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [e.to_json() for e in examples]
    assert [p.name for p in path.parent.iterdir()] == ["tasks.jsonl"]
    write_jsonl(examples[:1], path)                      # replaces, not appends
    assert len(path.read_text().splitlines()) == 1
    back, names = read_table(path, text_col="text", label_col="label", label_names=("0", "1"))
    assert back == [Example("0", "a b", label=1)]


def test_write_jsonl_refuses_an_existing_folder_and_writes_nothing(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"path must name a file to write, not an existing folder; got '.*exports'\. "
                                         r"Pass a file name inside it, e\.g\. '.*exports/examples\.jsonl'"):
        write_jsonl([Example("0", "a b", label=1)], folder)
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["exports"]
