"""Loaders for the benchmark data: known answers on hand-made files, counts and spot checks on ../shared/data."""
from __future__ import annotations

import gzip
import json
import sys
from collections import Counter

import pytest

from attnaudit.data import (
    LoadedSplit,
    from_hf_dataset,
    read_eraser,
    read_hatexplain,
    read_sst2,
    split_stats,
)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# -- ERASER: hand-made ----------------------------------------------------------------------------
def _span(docid, start, end, text):
    return {"docid": docid, "start_token": start, "end_token": end, "start_sentence": -1, "end_sentence": -1,
            "text": text}


@pytest.fixture
def eraser_folder(tmp_path):
    """Two documents of two lines each, in a docs/ folder; one evidence crosses the line break."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "d1.txt").write_text("a dull film .\nnothing works here .\n", encoding="utf-8")
    (tmp_path / "docs" / "d2.txt").write_text("what a joy\nto watch !", encoding="utf-8")
    _write_jsonl(tmp_path / "train.jsonl", [
        {"annotation_id": "d1.txt", "classification": "NEG", "query": "?",
         "evidences": [[_span("d1.txt", 1, 2, "dull")], [_span("d1.txt", 3, 6, ". nothing works")]]},
        {"annotation_id": "d2.txt", "classification": "POS", "docids": None,
         "evidences": [[_span("d2.txt", 1, 3, "a joy"), _span("d2.txt", 2, 5, "joy to watch")]]},
    ])
    return tmp_path


def test_eraser_masks_by_hand(eraser_folder):
    loaded = read_eraser(eraser_folder, "train")
    assert isinstance(loaded, LoadedSplit) and loaded.label_names == ("NEG", "POS")
    d1, d2 = loaded.examples
    assert d1.text == "a dull film . nothing works here ."          # the line break became a space
    assert d1.rationale == (0, 1, 0, 1, 1, 1, 0, 0)                 # union of both groups, end exclusive
    assert (d1.id, d1.label, d2.label) == ("d1.txt", 0, 1)
    assert d2.rationale == (0, 1, 1, 1, 1, 0)                       # overlapping spans of one group
    assert loaded.info["max_tokens"] is None and loaded.info["n_truncated"] == 0


def test_eraser_truncation_by_hand(eraser_folder):
    loaded = read_eraser(eraser_folder, "train", max_tokens=4)
    assert [e.text for e in loaded.examples] == ["a dull film .", "what a joy to"]
    assert [e.rationale for e in loaded.examples] == [(0, 1, 0, 1), (0, 1, 1, 1)]
    info = loaded.info
    assert (info["max_tokens"], info["n_truncated"], info["n_rationale_tokens_cut"], info["n_rationale_emptied"]) \
        == (4, 2, 2 + 1, 0)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        read_eraser(eraser_folder, "train", max_tokens=0)


def test_eraser_docs_jsonl_gz_gives_the_same_examples(eraser_folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("gz")
    (other / "train.jsonl").write_bytes((eraser_folder / "train.jsonl").read_bytes())
    with gzip.open(other / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in sorted((eraser_folder / "docs").iterdir()):
            f.write(json.dumps({"docid": doc.name, "document": doc.read_text(encoding="utf-8")}) + "\n")
    assert read_eraser(other, "train").examples == read_eraser(eraser_folder, "train").examples


@pytest.mark.parametrize("line2, message", [
    ("{not json", r"train.jsonl, line 2: not valid JSON"),
    ('{"annotation_id": "d2.txt", "evidences": []}', r"line 2 has no key 'classification'"),
    ('{"annotation_id": "d2.txt", "classification": "POS", "evidences": [[{"start_token": 4, "end_token": 9}]]}',
     r"line 2: evidence span \[4, 9\) is outside document 'd2.txt' of 6 tokens"),
    ('{"annotation_id": "d2.txt", "classification": "POS", "evidences": [[{"start_token": 0, "end_token": 2, '
     '"text": "a joy"}]]}', r"line 2: evidence text 'a joy' does not match tokens \[0, 2\).*'what a'"),
    ('{"annotation_id": "d2.txt", "classification": "POS", "evidences": [[{"start_token": "1", "end_token": 2}]]}',
     r"line 2: evidences\[0\]\[0\]: start_token must be an integer"),
    ('{"annotation_id": "d9.txt", "classification": "POS", "evidences": []}', r"line 2: document 'd9.txt' is not in"),
    ('{"annotation_id": "d1.txt", "classification": "POS", "evidences": []}', r"line 2: annotation_id 'd1.txt' was "
     r"already used on line 1"),
    ('["d2.txt"]', r"line 2: expected a JSON object, got list"),
])
def test_eraser_malformed_lines_are_named(eraser_folder, line2, message):
    lines = (eraser_folder / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (eraser_folder / "train.jsonl").write_text(lines[0] + "\n" + line2 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_eraser(eraser_folder, "train")


def test_eraser_missing_split_docs_and_labels(eraser_folder, tmp_path_factory):
    with pytest.raises(ValueError, match=r"split 'dev' not found.*Splits in .*: train"):
        read_eraser(eraser_folder, "dev")
    with pytest.raises(ValueError, match=r"classification 'POS' is not one of the label_names NEG, NEU"):
        read_eraser(eraser_folder, "train", label_names=("NEG", "NEU"))
    bare = tmp_path_factory.mktemp("bare")
    (bare / "train.jsonl").write_bytes((eraser_folder / "train.jsonl").read_bytes())
    with pytest.raises(ValueError, match=r"has no documents: expected a docs/ folder"):
        read_eraser(bare, "train")
    (bare / "docs.jsonl").write_text('{"docid": "d1.txt", "document": "x"}\n{"docid": "d1.txt"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs.jsonl, line 2: expected string keys 'docid' and 'document'"):
        read_eraser(bare, "train")


# -- ERASER Movies: the real files ---------------------------------------------------------------
def test_movies_counts_and_labels(shared_data):
    movies = shared_data / "eraser_movies"
    for split, n_neg, n_pos in [("train", 800, 800), ("val", 100, 100), ("test", 100, 99)]:
        loaded = read_eraser(movies, split)
        assert loaded.label_names == ("NEG", "POS")
        assert Counter(e.label for e in loaded.examples) == {0: n_neg, 1: n_pos}, split
        assert all(e.rationale is not None and "\n" not in e.text for e in loaded.examples)
    stats = split_stats(loaded.examples)                          # test: ERASER's comprehensive rationales
    assert stats["n_examples"] == 199 and stats["rationale_fraction"] == pytest.approx(0.314, abs=0.001)
    assert loaded.info["n_empty_spans"] == 20                     # spans with start == end and text ""


def test_movies_rationale_tokens_equal_the_evidence_text(shared_data):
    """Every marked token lies in an evidence span, and each span's tokens read as its `text`."""
    movies = shared_data / "eraser_movies"
    loaded = read_eraser(movies, "val")
    first = loaded.examples[0]                                    # negR_800.txt, two one-span groups
    words = first.text.split()
    assert first.id == "negR_800.txt" and first.label == 0
    assert " ".join(words[692:700]) == "definitely the cinematic equivalent of a sleeper car"
    assert " ".join(words[618:622]) == "nothing really worth watching"
    assert [i for i, r in enumerate(first.rationale) if r] == [*range(618, 622), *range(692, 700)]

    raw = [json.loads(line) for line in (movies / "val.jsonl").read_text(encoding="utf-8").splitlines()[:40]]
    for ex, record in zip(loaded.examples, raw):
        words, marked = ex.text.split(), set()
        for span in (s for group in record["evidences"] for s in group):
            assert " ".join(words[span["start_token"]:span["end_token"]]) == span["text"]
            marked |= set(range(span["start_token"], span["end_token"]))
        assert {i for i, r in enumerate(ex.rationale) if r} == marked, ex.id


def test_movies_truncation(shared_data):
    movies = shared_data / "eraser_movies"
    full = read_eraser(movies, "val").examples
    cut = read_eraser(movies, "val", max_tokens=512)
    long = [e for e in full if len(e.text.split()) > 512]
    assert cut.info["max_tokens"] == 512 and cut.info["n_truncated"] == len(long) == 155
    assert cut.info["n_rationale_tokens_cut"] == sum(sum(e.rationale[512:]) for e in long)
    for a, b in zip(full, cut.examples):
        assert b.text.split() == a.text.split()[:512] and b.rationale == a.rationale[:512]


# -- HateXplain: hand-made ------------------------------------------------------------------------
def _post(post_id, labels, rationales, tokens=("you", "are", "all", "idiots")):
    return {"post_id": post_id, "annotators": [{"label": lab, "annotator_id": i, "target": ["None"]}
                                               for i, lab in enumerate(labels)],
            "rationales": rationales, "post_tokens": list(tokens)}


@pytest.fixture
def hatexplain_file(tmp_path):
    posts = [
        _post("p1", ["offensive", "offensive", "normal"], [[1, 1, 0, 0], [0, 1, 1, 0]]),
        _post("p2", ["hatespeech", "offensive", "normal"], []),                    # no majority: dropped
        _post("p3", ["normal", "normal", "normal"], []),
        _post("p4", ["hatespeech", "hatespeech", "hatespeech"], [[0, 0, 1, 1], [0, 0, 0, 1], [1, 0, 0, 1]]),
    ]
    path = tmp_path / "val.json"
    path.write_text(json.dumps({p["post_id"]: p for p in posts}, indent=1), encoding="utf-8")
    return path


def test_hatexplain_majority_and_mean_rule_by_hand(hatexplain_file):
    loaded = read_hatexplain(hatexplain_file)
    assert loaded.label_names == ("hatespeech", "normal", "offensive")
    assert [(e.id, e.label) for e in loaded.examples] == [("p1", 2), ("p3", 1), ("p4", 0)]
    p1, p3, p4 = (e.rationale for e in loaded.examples)
    assert p1 == (0, 1, 0, 0)        # sums 1,2,1,0 over 3 annotators (the normal one counts 0): mean >= 0.5 at 2/3
    assert p3 == (0, 0, 0, 0)        # no annotator gave a rationale
    assert p4 == (0, 0, 0, 1)        # sums 1,0,1,3
    assert loaded.info["n_no_majority"] == 1 and loaded.info["no_majority_ids"] == ["p2"]
    assert loaded.examples[0].text == "you are all idiots"


def test_hatexplain_union_rule_by_hand(hatexplain_file):
    union = read_hatexplain(hatexplain_file, rationale="union")
    assert [e.rationale for e in union.examples] == [(1, 1, 1, 0), (0, 0, 0, 0), (1, 0, 1, 1)]
    with pytest.raises(ValueError, match=r"rationale must be one of 'mean', 'union'; got 'median'"):
        read_hatexplain(hatexplain_file, rationale="median")


def test_hatexplain_folder_with_dataset_json_and_divisions(hatexplain_file, tmp_path):
    (tmp_path / "dataset.json").write_bytes(hatexplain_file.read_bytes())
    hatexplain_file.unlink()
    (tmp_path / "post_id_divisions.json").write_text(json.dumps({"train": ["p1", "p2"], "val": ["p3", "p4"]}))
    loaded = read_hatexplain(tmp_path, "val", label_names=("hatespeech", "normal", "offensive"))
    assert [(e.id, e.label) for e in loaded.examples] == [("p3", 1), ("p4", 0)]
    with pytest.raises(ValueError, match=r"no list of ids for split 'test'. Splits there: train, val"):
        read_hatexplain(tmp_path, "test")


@pytest.mark.parametrize("bad, message", [
    ({"rationales": [[1, 0, 0]]}, r"record 2 \(post_id 'p2'\): rationales\[0\] has 3 entries but post_tokens has 4"),
    ({"rationales": [[1, 0, 0, 2]]}, r"record 2 \(post_id 'p2'\): rationales\[0\] holds 2"),
    ({"post_tokens": ["a", "", "b", "c"]}, r"record 2 \(post_id 'p2'\): post_tokens\[1\] = '' is not one"),
    ({"annotators": [{"label": 1}]}, r"record 2 \(post_id 'p2'\): annotators\[0\] needs a string label"),
    ({"post_id": "p9"}, r"record 2: key 'p2' but post_id 'p9'"),
])
def test_hatexplain_malformed_records_are_named(tmp_path, bad, message):
    good, broken = _post("p1", ["normal"] * 3, []), {**_post("p2", ["offensive"] * 3, []), **bad}
    path = tmp_path / "posts.json"
    path.write_text(json.dumps({"p1": good, "p2": broken}), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_hatexplain(path)


def test_hatexplain_bad_json_names_the_line(tmp_path):
    path = tmp_path / "val.json"
    path.write_text('{\n "p1": {"post_id": "p1",\n "annotators": [}\n}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"val.json, line 3, column \d+: not valid JSON"):
        read_hatexplain(path)
    with pytest.raises(ValueError, match=r"is a folder; pass split='val'"):
        read_hatexplain(tmp_path)


# -- HateXplain: the real files -------------------------------------------------------------------
def test_hatexplain_real_val_counts_and_rule(shared_data):
    folder = shared_data / "hatexplain"
    loaded = read_hatexplain(folder, "val")
    names = loaded.label_names
    assert names == ("hatespeech", "normal", "offensive")
    assert Counter(names[e.label] for e in loaded.examples) == {"normal": 781, "hatespeech": 593, "offensive": 548}
    assert loaded.info["n_no_majority"] == 0 and loaded.info["n_with_rationale_vectors"] == 1141
    assert read_hatexplain(folder / "val.json").examples == loaded.examples

    raw = json.loads((folder / "val.json").read_text(encoding="utf-8"))
    for ex in loaded.examples[:300]:                       # the rule recomputed independently
        post = raw[ex.id]
        votes = Counter(a["label"] for a in post["annotators"]).most_common(1)[0]
        assert votes[1] >= 2 and names[ex.label] == votes[0]
        vectors = post["rationales"] + [[0] * len(post["post_tokens"])] * (3 - len(post["rationales"]))
        mean = [sum(col) / 3 for col in zip(*vectors)]
        assert ex.rationale == tuple(int(m >= 0.5) for m in mean)
        assert ex.text.split() == post["post_tokens"]


def test_hatexplain_real_test_count(shared_data):
    loaded = read_hatexplain(shared_data / "hatexplain", "test")
    assert len(loaded.examples) == 1924 and loaded.info["n_no_majority"] == 0


# -- SST-2 ----------------------------------------------------------------------------------------
def test_sst2_counts(shared_data):
    dev = read_sst2(shared_data / "sst2", "dev")
    assert dev.label_names == ("0", "1") and len(dev.examples) == 872
    assert Counter(e.label for e in dev.examples) == {1: 444, 0: 428}
    assert all(e.rationale is None and e.text == e.text.strip() for e in dev.examples)
    train = read_sst2(shared_data / "sst2" / "train.tsv.gz", label_names=dev.label_names)
    assert len(train.examples) == 67349
    with pytest.raises(ValueError, match=r"SST-2 split 'test' not found.*Files there: dev.tsv, train.tsv.gz"):
        read_sst2(shared_data / "sst2", "test")


# -- summaries and HuggingFace datasets -----------------------------------------------------------
def test_split_stats_by_hand(eraser_folder):
    stats = split_stats(read_eraser(eraser_folder, "train").examples)
    assert stats["n_examples"] == 2 and stats["mean_tokens"] == 7 and stats["max_tokens"] == 8
    assert stats["rationale_fraction"] == pytest.approx((4 / 8 + 4 / 6) / 2)
    assert stats["rationale_fraction_pooled"] == pytest.approx(8 / 14)


def test_from_hf_dataset_without_the_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)           # `import datasets` now raises ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        from_hf_dataset(object(), "text", "label")


def test_from_hf_dataset():
    datasets = pytest.importorskip("datasets", reason="the optional HuggingFace `datasets` library is not installed")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"]),
                                  "r": datasets.Sequence(datasets.Value("int8"))})
    ds = datasets.Dataset.from_dict({"text": ["a  bad film ", "so good"], "label": [0, 1], "r": [[0, 1, 0], [0, 1]]},
                                    features=features)
    loaded = from_hf_dataset(ds, "text", "label", "r")
    assert loaded.label_names == ("neg", "pos")
    assert [(e.id, e.text, e.label, e.rationale) for e in loaded.examples] == [
        ("0", "a bad film", 0, (0, 1, 0)), ("1", "so good", 1, (0, 1))]
    with pytest.raises(ValueError, match=r"text_col='sentence' is not a column.*Columns: text, label, r"):
        from_hf_dataset(ds, "sentence", "label")
    with pytest.raises(ValueError, match=r"pass one split, e.g. ds\['train'\]"):
        from_hf_dataset(datasets.DatasetDict({"train": ds}), "text", "label")
