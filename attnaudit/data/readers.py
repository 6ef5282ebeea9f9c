"""Loaders for the benchmark data: ERASER (Movies), HateXplain, SST-2 and HuggingFace `datasets` objects.

Each loader turns one split into `Example`s (text = whitespace-separated tokens, label = class index,
rationale = one 0/1 per token) and returns `LoadedSplit(examples, label_names, info)`. `info` records
what the loader did (files read, truncation, examples dropped) so that a report can state it verbatim.

    movies = read_eraser("../shared/data/eraser_movies", "test", max_tokens=512)
    movies.info["n_truncated"]    # reviews longer than 512 tokens, each cut to its first 512
    hate = read_hatexplain("../shared/data/hatexplain", "val")
    sst = read_sst2("../shared/data/sst2", "dev")

Label names are sorted as `read_table` sorts them (numerically when all are integers); pass a training
split's `label_names` to index another split the same way.

References: DeYoung et al. (2020), ERASER; Zaidan, Eisner & Piatko (2007), annotator rationales;
Mathew et al. (2021), HateXplain; Socher et al. (2013), SST.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from attnaudit.data.examples import Example, _sorted_labels, json_lines, label_index, read_source, read_table

HATEXPLAIN_RULES = ("mean", "union")


class LoadedSplit(NamedTuple):
    """One split: its Examples, the label names their `label` indexes, and what the loader did."""

    examples: list[Example]
    label_names: tuple[str, ...]
    info: dict[str, Any]


def split_stats(examples: list[Example]) -> dict[str, float]:
    """n_examples, mean/max tokens and rationale density of a split, for a report's data table.

    `rationale_fraction` is the mean over examples (that carry a rationale) of the fraction of their
    tokens marked 1, as ERASER reports it; `rationale_fraction_pooled` divides all marked tokens by all tokens.
    """
    n_tokens = [len(e.text.split()) for e in examples]
    with_r = [e for e in examples if e.rationale is not None]
    per_example = [sum(e.rationale) / len(e.rationale) for e in with_r]
    marked = sum(sum(e.rationale) for e in with_r)
    total = sum(len(e.rationale) for e in with_r)
    return {
        "n_examples": len(examples),
        "mean_tokens": sum(n_tokens) / len(examples) if examples else float("nan"),
        "max_tokens": max(n_tokens, default=0),
        "n_with_rationale": len(with_r),
        "rationale_fraction": sum(per_example) / len(per_example) if per_example else float("nan"),
        "rationale_fraction_pooled": marked / total if total else float("nan"),
    }


# -- ERASER ---------------------------------------------------------------------------------------
def read_eraser(
    folder: str | os.PathLike,
    split: str,
    *,
    max_tokens: int | None = None,
    label_names: tuple[str, ...] | None = None,
) -> LoadedSplit:
    """One ERASER split (`{split}.jsonl` + documents) as Examples with per-token rationale masks.

        train = read_eraser("../shared/data/eraser_movies", "train", max_tokens=512)
        test = read_eraser("../shared/data/eraser_movies", "test", max_tokens=512, label_names=train.label_names)

    Args:
        folder: holds `{split}.jsonl` (one annotation per line: annotation_id, classification, evidences)
            and the documents, as a `docs/` folder with one file per docid or as `docs.jsonl[.gz]` lines
            `{"docid", "document"}`.
        split: "train", "val" or "test" (any `{split}.jsonl` in the folder).
        max_tokens: keep only each document's first `max_tokens` tokens (and their rationale); None keeps all.
        label_names: another split's names, to index this one the same way; None sorts this split's classes.
    Returns:
        LoadedSplit: text = `" ".join(document.split())`, so sentence breaks become spaces and ERASER's token
        offsets (into `document.split()`, end exclusive) index `text.split()`; rationale = the union of every
        evidence span of every group; id = annotation_id. `info` gives max_tokens, n_truncated (documents
        cut), n_rationale_tokens_cut and n_rationale_emptied (documents whose whole rationale lay past the cut).
    Single-document annotations only (Movies, and the other classification sets); the query is not used.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} is not a folder; pass the ERASER data set's folder "
                         f"(holding {split}.jsonl and docs/ or docs.jsonl.gz).")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None; got {max_tokens!r}.")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        found = sorted(p.name[: -len(".jsonl")] for p in folder.glob("*.jsonl") if p.name != "docs.jsonl")
        raise ValueError(f"ERASER split {split!r} not found: {path} does not exist. "
                         f"Splits in {folder}: {', '.join(found) or 'none'}.")

    cleaned: dict = {}
    records = [(line, _eraser_annotation(path, line, raw)) for line, raw in json_lines(path, cleaned)]
    if not records:
        raise ValueError(f"{path} holds no annotations; expected one JSON object per line.")
    docs, docs_source = _eraser_documents(folder, {ann["docid"] for _, ann in records}, cleaned)

    label_names, index = label_index([ann["label"] for _, ann in records], label_names, single=lambda name: (
        f"{path}: every annotation has classification {name!r}; a classifier needs at least two labels (pass the "
        "training split's label_names)."))

    examples, seen = [], {}
    n_truncated = n_cut = n_emptied = n_no_evidence = n_empty_spans = 0
    for line, ann in records:
        where = f"{path}, line {line}"
        if ann["id"] in seen:
            raise ValueError(f"{where}: annotation_id {ann['id']!r} was already used on line {seen[ann['id']]}; "
                             f"ids must be unique.")
        seen[ann["id"]] = line
        if ann["label"] not in index:
            raise ValueError(f"{where}: classification {ann['label']!r} is not one of the label_names "
                             f"{', '.join(label_names)}; pass the training split's label names.")
        if ann["docid"] not in docs:
            raise ValueError(f"{where}: document {ann['docid']!r} is not in {docs_source}.")
        tokens = docs[ann["docid"]].split()
        if not tokens:
            raise ValueError(f"{where}: document {ann['docid']!r} in {docs_source} is empty.")
        mask = [0] * len(tokens)
        for start, end, text in ann["spans"]:
            if not 0 <= start <= end <= len(tokens):
                raise ValueError(f"{where}: evidence span [{start}, {end}) is outside document {ann['docid']!r} "
                                 f"of {len(tokens)} tokens; need 0 <= start_token <= end_token <= {len(tokens)} "
                                 f"(end_token exclusive).")
            n_empty_spans += start == end                     # ERASER's Movies test has 20, with text ""
            marked = " ".join(tokens[start:end])
            if text is not None and " ".join(text.split()) != marked:
                raise ValueError(f"{where}: evidence text {_clip(text)!r} does not match tokens [{start}, {end}) "
                                 f"of document {ann['docid']!r}, which read {_clip(marked)!r}; the offsets must "
                                 f"index document.split() with end_token exclusive.")
            mask[start:end] = [1] * (end - start)
        n_no_evidence += not ann["spans"]
        if max_tokens is not None and len(tokens) > max_tokens:
            n_truncated += 1
            n_cut += sum(mask[max_tokens:])
            n_emptied += any(mask) and not any(mask[:max_tokens])
            tokens, mask = tokens[:max_tokens], mask[:max_tokens]
        examples.append(Example(id=ann["id"], text=" ".join(tokens), label=index[ann["label"]],
                                rationale=tuple(mask)))
    info = {"dataset": "eraser", "split": split, "annotations": str(path), "documents": docs_source,
            "n_examples": len(examples), "n_without_evidence": n_no_evidence,
            "n_empty_spans": n_empty_spans, "max_tokens": max_tokens,
            "n_truncated": n_truncated, "n_rationale_tokens_cut": n_cut, "n_rationale_emptied": n_emptied,
            "cleaned": _cleaned_summary(cleaned)}
    return LoadedSplit(examples, label_names, info)


def _eraser_annotation(path: Path, line: int, record: Any) -> dict:
    """Check one annotation line -> {id, label, docid, spans: [(start, end, text or None)]}."""
    where = f"{path}, line {line}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    for key in ("annotation_id", "classification", "evidences"):
        if key not in record:
            raise ValueError(f"{where} has no key {key!r}. Keys present: {', '.join(map(str, record)) or 'none'}.")
    ann_id, label, groups = record["annotation_id"], record["classification"], record["evidences"]
    if not isinstance(ann_id, str) or not ann_id:
        raise ValueError(f"{where}: annotation_id must be a non-empty string; got {ann_id!r}.")
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{where}: classification must be a non-empty string such as 'POS'; got {label!r}.")
    if not isinstance(groups, list):
        raise ValueError(f"{where}: evidences must be a list of evidence groups (lists of spans); "
                         f"got {type(groups).__name__}.")
    spans, docids = [], set()
    for g, group in enumerate(groups):
        if not isinstance(group, (list, dict)):
            raise ValueError(f"{where}: evidences[{g}] must be a list of spans; got {type(group).__name__}.")
        for s, span in enumerate([group] if isinstance(group, dict) else group):   # a bare span is a group of one
            name = f"{where}: evidences[{g}][{s}]"
            if not isinstance(span, dict):
                raise ValueError(f"{name} must be an object with start_token and end_token; "
                                 f"got {type(span).__name__}.")
            for key in ("start_token", "end_token"):
                value = span.get(key)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{name}: {key} must be an integer token offset; got {value!r}.")
            text = span.get("text")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{name}: text must be a string or absent; got {type(text).__name__}.")
            if "docid" in span:
                docids.add(span["docid"])
            spans.append((span["start_token"], span["end_token"], text))
    listed = record.get("docids")
    if listed is not None and (not isinstance(listed, list) or len(listed) != 1):
        raise ValueError(f"{where}: docids {listed!r} names {len(listed) if isinstance(listed, list) else 'no'} "
                         f"documents; only single-document annotations are supported.")
    docids |= set(listed or [])
    if len(docids) > 1:
        raise ValueError(f"{where}: the evidences refer to several documents ({', '.join(sorted(map(str, docids)))}); "
                         f"only single-document annotations are supported.")
    docid = docids.pop() if docids else ann_id
    if not isinstance(docid, str):
        raise ValueError(f"{where}: docid must be a string; got {docid!r}.")
    return {"id": ann_id, "label": label.strip(), "docid": docid, "spans": spans}


def _eraser_documents(folder: Path, wanted: set[str], cleaned: dict | None = None) -> tuple[dict[str, str], str]:
    """The wanted documents' texts from `docs/` (one file per docid) or `docs.jsonl[.gz]`, and their source."""
    if (folder / "docs").is_dir():
        docs = {}
        for docid in wanted:
            file = folder / "docs" / docid
            if Path(docid).name == docid and file.is_file():          # a docid never reaches outside docs/
                docs[docid] = read_source(file, cleaned)
        return docs, str(folder / "docs")
    for name in ("docs.jsonl", "docs.jsonl.gz"):
        path = folder / name
        if path.is_file():
            docs, lines = {}, {}
            for line, record in json_lines(path, cleaned):
                if not isinstance(record, dict):
                    raise ValueError(f"{path}, line {line}: expected a JSON object, got {type(record).__name__}.")
                docid, text = record.get("docid"), record.get("document")
                if not isinstance(docid, str) or not isinstance(text, str):
                    raise ValueError(f"{path}, line {line}: expected string keys 'docid' and 'document'. "
                                     f"Keys present: {', '.join(map(str, record)) or 'none'}.")
                if docid in lines:
                    raise ValueError(f"{path}, line {line}: docid {docid!r} was already used on line {lines[docid]}.")
                lines[docid] = line
                if docid in wanted:
                    docs[docid] = text
            return docs, str(path)
    raise ValueError(f"{folder} has no documents: expected a docs/ folder (one file per docid) or "
                     f"docs.jsonl / docs.jsonl.gz.")


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# -- HateXplain -----------------------------------------------------------------------------------
def read_hatexplain(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    rationale: str = "mean",
    label_names: tuple[str, ...] | None = None,
) -> LoadedSplit:
    """HateXplain posts (Mathew et al. 2021) as Examples: majority label, aggregated annotator rationale.

        val = read_hatexplain("../shared/data/hatexplain", "val")       # reads hatexplain/val.json
        val.info["n_no_majority"]                                        # posts dropped: no label won

    Args:
        path: a JSON file `{post_id: {post_id, annotators, rationales, post_tokens}}` (or a list of such
            records), or a folder holding `{split}.json`, or the original `dataset.json` with
            `post_id_divisions.json`.
        split: with a folder, which split to read; with a file, None reads every post and a split name keeps
            only that split's ids from the `post_id_divisions.json` beside the file.
        rationale: "mean": token-wise mean over ALL annotators ≥ 0.5, an annotator without a rationale vector
            counting as all zeros (HateXplain's `returnMask` pads the vectors to 3 with zeros), i.e. with 3
            annotators a token marked by at least 2; "union": marked by any annotator (HateXplain's
            ERASER-format conversion for its plausibility scores).
        label_names: another split's names, to index this one the same way; None sorts the majority labels.
    Returns:
        LoadedSplit: text = `" ".join(post_tokens)`, label = the label more than half of the annotators gave
        (HateXplain's "undecided" posts, where no label has a majority, are dropped and counted in
        info["n_no_majority"], their ids in info["no_majority_ids"]); a post without rationale vectors (all
        majority-normal ones) gets an all-zero rationale, which the plausibility metrics score as NaN (no gold).
    """
    if rationale not in HATEXPLAIN_RULES:
        raise ValueError(f"rationale must be one of {', '.join(map(repr, HATEXPLAIN_RULES))}; got {rationale!r}.")
    file, keep = _hatexplain_source(Path(path), split)
    cleaned: dict = {}
    records = _hatexplain_records(file, _load_json(file, cleaned))
    if keep is not None:
        records = [r for r in records if r[1] in keep]
        if not records:
            raise ValueError(f"{file} holds none of the {len(keep)} post ids of split {split!r}.")

    kept, dropped = [], []
    for i, post_id, record in records:
        tokens, labels, vectors = _hatexplain_post(file, i, post_id, record)
        top, n_top = Counter(labels).most_common(1)[0]
        if 2 * n_top <= len(labels):
            dropped.append(post_id)
            continue
        sums = [sum(col) for col in zip(*vectors)] if vectors else [0] * len(tokens)
        if rationale == "mean":
            mask = tuple(int(2 * s >= len(labels)) for s in sums)   # mean over all annotators >= 0.5
        else:
            mask = tuple(int(s >= 1) for s in sums)
        kept.append((i, post_id, tokens, top, mask, bool(vectors)))
    if not kept:
        raise ValueError(f"{file}: none of its {len(records)} posts has a majority label.")

    if label_names is None:
        label_names = _sorted_labels({top for _, _, _, top, _, _ in kept})
        if len(label_names) < 2:
            raise ValueError(f"{file}: every post's majority label is {label_names[0]!r}; a classifier needs at "
                             f"least two labels (pass the other split's label_names).")
    label_names = tuple(str(name) for name in label_names)
    index = {name: j for j, name in enumerate(label_names)}
    examples = []
    for i, post_id, tokens, top, mask, _ in kept:
        if top not in index:
            raise ValueError(f"{file}, record {i} (post_id {post_id!r}): majority label {top!r} is not one of the "
                             f"label_names {', '.join(label_names)}.")
        examples.append(Example(id=post_id, text=" ".join(tokens), label=index[top], rationale=mask))
    n_vectors = sum(has for *_, has in kept)
    info = {"dataset": "hatexplain", "split": split, "source": str(file), "n_records": len(records),
            "n_examples": len(examples), "n_no_majority": len(dropped), "no_majority_ids": dropped,
            "rationale_rule": rationale, "n_with_rationale_vectors": n_vectors,
            "n_rationale_empty": sum(has and not any(m) for *_, m, has in kept), "cleaned": _cleaned_summary(cleaned)}
    return LoadedSplit(examples, label_names, info)


def _hatexplain_source(path: Path, split: str | None) -> tuple[Path, set[str] | None]:
    """The JSON file to read and, when a split must be cut out of it, that split's post ids."""
    if path.is_dir():
        if split is None:
            raise ValueError(f"{path} is a folder; pass split='val' or 'test' (or the path of a .json file).")
        if (path / f"{split}.json").is_file():
            return path / f"{split}.json", None
        if not (path / "dataset.json").is_file():
            found = sorted(p.stem for p in path.glob("*.json") if p.name != "post_id_divisions.json")
            raise ValueError(f"HateXplain split {split!r} not found: {path} has no {split}.json and no dataset.json. "
                             f"Splits there: {', '.join(found) or 'none'}.")
        path = path / "dataset.json"
    elif not path.is_file():
        raise ValueError(f"path {str(path)!r} does not exist; pass a HateXplain .json file or its folder.")
    if split is None:
        return path, None
    divisions_file = path.parent / "post_id_divisions.json"
    if not divisions_file.is_file():
        raise ValueError(f"split {split!r} of {path} needs {divisions_file} (HateXplain's split ids); "
                         f"it is absent. Pass split=None to read every post in the file.")
    divisions = _load_json(divisions_file)
    if not isinstance(divisions, dict) or not isinstance(divisions.get(split), list):
        names = ", ".join(map(str, divisions)) if isinstance(divisions, dict) else "none"
        raise ValueError(f"{divisions_file} has no list of ids for split {split!r}. Splits there: {names}.")
    return path, set(divisions[split])


def _load_json(path: Path, cleaned: dict | None = None) -> Any:
    text = read_source(path, cleaned)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}).") from e
    if "\\u" in text:                                              # only escapes can make a lone surrogate
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{path}: a string holds a lone surrogate ({json.dumps(e.object[e.start:e.end])}), "
                             "which is not text; fix or remove that escape.") from e
    return data


def _cleaned_summary(cleaned: dict) -> dict:
    """What `read_source` removed, for a split's info: {"bom": bool, "nul": count, "nul_lines": [first lines]}."""
    lines = sorted(cleaned.get("nul_lines", {}))
    return {"bom": bool(cleaned.get("bom")), "nul": cleaned.get("nul", 0), "nul_lines": lines[:20]}


def _hatexplain_records(path: Path, data: Any) -> list[tuple[int, str, dict]]:
    """(1-based record number, post_id, record) in file order; the post_id key and field must agree."""
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = [(r.get("post_id") if isinstance(r, dict) else None, r) for r in data]
    else:
        raise ValueError(f"{path}: expected a JSON object keyed by post_id (or a list of posts); "
                         f"got {type(data).__name__}.")
    out = []
    for i, (key, record) in enumerate(items, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, record {i} (post_id {key!r}): expected an object, got {type(record).__name__}.")
        if not isinstance(key, str) or not key:
            raise ValueError(f"{path}, record {i}: post_id must be a non-empty string; got {key!r}.")
        if record.get("post_id", key) != key:
            raise ValueError(f"{path}, record {i}: key {key!r} but post_id {record['post_id']!r}; they must agree.")
        out.append((i, key, record))
    if len({key for _, key, _ in out}) != len(out):
        twice = [k for k, n in Counter(key for _, key, _ in out).items() if n > 1]
        raise ValueError(f"{path}: post_id {twice[0]!r} occurs more than once; ids must be unique.")
    if not out:
        raise ValueError(f"{path} holds no posts.")
    return out


def _hatexplain_post(path: Path, i: int, post_id: str, record: dict) -> tuple[list[str], list[str], list[list[int]]]:
    """Checked (post_tokens, annotator labels, rationale vectors) of one record."""
    where = f"{path}, record {i} (post_id {post_id!r})"
    for key in ("post_tokens", "annotators"):
        if key not in record:
            raise ValueError(f"{where} has no key {key!r}. Keys present: {', '.join(map(str, record)) or 'none'}.")
    tokens, annotators, vectors = record["post_tokens"], record["annotators"], record.get("rationales") or []
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"{where}: post_tokens must be a non-empty list of strings; got {tokens!r}.")
    for t, token in enumerate(tokens):
        if not isinstance(token, str) or not token or len(token.split()) != 1 or token != token.strip():
            raise ValueError(f"{where}: post_tokens[{t}] = {token!r} is not one whitespace-free token; "
                             f"the rationale is aligned to whitespace tokens.")
    if not isinstance(annotators, list) or not annotators:
        raise ValueError(f"{where}: annotators must be a non-empty list of {{label, ...}} objects; got {annotators!r}.")
    labels = []
    for a, annotator in enumerate(annotators):
        label = annotator.get("label") if isinstance(annotator, dict) else None
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"{where}: annotators[{a}] needs a string label such as 'offensive'; got {annotator!r}.")
        labels.append(label.strip())
    if not isinstance(vectors, list) or len(vectors) > len(annotators):
        raise ValueError(f"{where}: rationales must be a list of at most {len(annotators)} vectors (one per "
                         f"annotator); got {vectors!r:.80}.")
    for v, vector in enumerate(vectors):
        if not isinstance(vector, list) or len(vector) != len(tokens):
            n = len(vector) if isinstance(vector, list) else type(vector).__name__
            raise ValueError(f"{where}: rationales[{v}] has {n} entries but post_tokens has {len(tokens)}; "
                             f"give one 0/1 per token.")
        bad = [x for x in vector if isinstance(x, bool) or x not in (0, 1)]
        if bad:
            raise ValueError(f"{where}: rationales[{v}] holds {bad[0]!r}; entries must be 0 or 1.")
    return tokens, labels, [[int(x) for x in vector] for vector in vectors]


# -- SST-2 ----------------------------------------------------------------------------------------
def read_sst2(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    label_names: tuple[str, ...] | None = None,
) -> LoadedSplit:
    """GLUE SST-2 (`sentence<TAB>label`, no quoting) as Examples without rationales.

        dev = read_sst2("../shared/data/sst2", "dev")      # or read_sst2(".../sst2/dev.tsv")

    Args:
        path: a .tsv / .tsv.gz file, or the folder holding `{split}.tsv` or `{split}.tsv.gz`.
        split: the split name when `path` is a folder.
        label_names: another split's names; None gives ("0", "1") (0 = negative, 1 = positive).
    Returns:
        LoadedSplit from `read_table(path, text_col="sentence", label_col="label")`, with GLUE's trailing
        space removed from each sentence; ids are 0-based row numbers.
    """
    path = Path(path)
    if path.is_dir():
        if split is None:
            raise ValueError(f"{path} is a folder; pass split='train' or 'dev' (or the path of a .tsv file).")
        candidates = [path / f"{split}.tsv", path / f"{split}.tsv.gz"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            present = sorted(p.name for p in path.iterdir() if p.name.endswith((".tsv", ".tsv.gz")))
            raise ValueError(f"SST-2 split {split!r} not found: neither {candidates[0].name} nor {candidates[1].name} "
                             f"is in {path}. Files there: {', '.join(present) or 'none'}.")
        path = found[0]
    examples, names = read_table(path, text_col="sentence", label_col="label", label_names=label_names)
    examples = [replace(e, text=" ".join(e.text.split())) for e in examples]
    info = {"dataset": "sst2", "split": split, "source": str(path), "n_examples": len(examples)}
    return LoadedSplit(examples, names, info)


# -- any labelled file ----------------------------------------------------------------------------
def data_format(path: str | os.PathLike) -> str:
    """"eraser" (annotation JSONL with evidences), "hatexplain" (one JSON object of posts) or "table"."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".jsonl") and path.is_file():
        first = next(iter(json_lines(path)), (0, None))[1]
        if isinstance(first, dict) and "annotation_id" in first and "evidences" in first:
            return "eraser"
    if name.endswith(".json") and path.is_file():
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                head = f.read(4096).lstrip()
        except OSError:                     # unreadable: the reader's `read_source` says why, with the fix
            return "table"
        if head.startswith("{") and '"post_tokens"' in head:
            return "hatexplain"
    return "table"


def read_labelled(
    path: str | os.PathLike,
    *,
    text_col: str | None = None,
    label_col: str | None = None,
    label_names: tuple[str, ...] | None = None,
    max_tokens: int | None = None,
) -> LoadedSplit:
    """Any labelled file the command line accepts, its format recognised from its contents.

        read_labelled("../shared/data/eraser_movies/test.jsonl")        # ERASER: documents + rationales
        read_labelled("../shared/data/hatexplain/val.json")              # HateXplain: majority label + rationale
        read_labelled("reviews.csv", text_col="text", label_col="label")  # a table: names its columns

    ERASER annotation files (`{split}.jsonl` beside the documents) and HateXplain files name their own
    fields, so `text_col`/`label_col` go only with tables (.csv, .tsv, .jsonl, optionally .gz).
    `max_tokens` (ERASER only) keeps each document's first tokens; models cut longer texts themselves.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; pass a data file (a table, an ERASER {{split}}.jsonl or a "
                         "HateXplain .json).")
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} does not exist or is not a file; check the name and folder.")
    kind = data_format(path)
    if kind != "table":
        if text_col or label_col:
            raise ValueError(f"{path} is a {kind} file, which names its own text and label fields; leave out "
                             f"text_col/label_col (--text-col/--label-col); got {text_col!r}, {label_col!r}.")
        if kind == "eraser":
            split = read_eraser(path.parent, path.name[: -len(".jsonl")], max_tokens=max_tokens,
                                label_names=label_names)
        else:
            split = read_hatexplain(path, label_names=label_names)
        return LoadedSplit(split.examples, split.label_names, {**split.info, "format": kind})
    if not text_col or not label_col:
        raise ValueError(f"{path.name} is a table: name its columns with text_col and label_col (--text-col, "
                         f"--label-col); got text_col={text_col!r}, label_col={label_col!r}.")
    if max_tokens is not None:
        raise ValueError(f"max_tokens goes with ERASER files; {path.name} is a table (the model's max_len cuts "
                         f"long texts).")
    cleaned: dict = {}
    examples, names = read_table(path, text_col=text_col, label_col=label_col, label_names=label_names,
                                 cleaned=cleaned)
    return LoadedSplit(examples, names, {"format": "table", "source": str(path), "text_col": text_col,
                                         "label_col": label_col, "n_examples": len(examples),
                                         "cleaned": _cleaned_summary(cleaned)})


# -- HuggingFace datasets -------------------------------------------------------------------------
def from_hf_dataset(
    ds,
    text_col: str,
    label_col: str,
    rationale_col: str | None = None,
    *,
    id_col: str | None = None,
    label_names: tuple[str, ...] | None = None,
) -> LoadedSplit:
    """A HuggingFace `datasets.Dataset` split as Examples (needs `pip install datasets`).

        ds = datasets.load_from_disk("my_data")["validation"]
        loaded = from_hf_dataset(ds, "sentence", "label")

    Args:
        ds: one split (a `datasets.Dataset`; index a DatasetDict by split name first).
        text_col: a string column (whitespace is normalised to single spaces) or a list-of-tokens column.
        label_col: a ClassLabel column (its names and indices are kept as they are), or string / integer
            labels (sorted as `read_table` sorts them).
        rationale_col: optional column with one 0/1 per whitespace token of the text.
        id_col: column of ids; None uses an `id` column when present, else the 0-based row number.
        label_names: names to index the labels by (for ClassLabel columns, matched by name).
    """
    datasets = _datasets_module()
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"ds is a DatasetDict with splits {', '.join(ds)}; pass one split, "
                         f"e.g. ds[{next(iter(ds))!r}].")
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"ds must be a datasets.Dataset; got {type(ds).__name__}.")
    if id_col is None and "id" in ds.column_names:
        id_col = "id"
    for role, col in (("text_col", text_col), ("label_col", label_col), ("rationale_col", rationale_col),
                      ("id_col", id_col)):
        if col is not None and col not in ds.column_names:
            raise ValueError(f"{role}={col!r} is not a column of the dataset. Columns: {', '.join(ds.column_names)}.")
    if len(ds) == 0:
        raise ValueError("the dataset has no rows.")

    feature = ds.features[label_col]
    raw_labels = list(ds[label_col])
    if isinstance(feature, datasets.ClassLabel):
        labels = [feature.names[y] if y is not None and y >= 0 else None for y in raw_labels]
        names = tuple(label_names) if label_names is not None else tuple(feature.names)
    else:
        labels = [None if y is None else str(y).strip() for y in raw_labels]
        names = tuple(label_names) if label_names is not None else _sorted_labels({y for y in labels if y})
    names = tuple(str(n) for n in names)
    index = {name: i for i, name in enumerate(names)}
    texts = list(ds[text_col])
    rationales = list(ds[rationale_col]) if rationale_col else [None] * len(texts)
    ids = [str(x) for x in ds[id_col]] if id_col else [str(i) for i in range(len(texts))]

    examples, seen = [], {}
    for row, (ex_id, text, label, r) in enumerate(zip(ids, texts, labels, rationales)):
        where = f"dataset row {row}"
        if isinstance(text, list):
            if not all(isinstance(t, str) and t and len(t.split()) == 1 for t in text):
                raise ValueError(f"{where}: column {text_col!r} must list whitespace-free tokens; got {text!r:.80}.")
            text = " ".join(text)
        if not isinstance(text, str) or not text.split():
            raise ValueError(f"{where}: column {text_col!r} is empty or not text; got {text!r:.80}.")
        if not label or label not in index:
            raise ValueError(f"{where}: label {label!r} is not one of the label_names {', '.join(names)}.")
        if ex_id in seen:
            raise ValueError(f"{where}: id {ex_id!r} was already used on row {seen[ex_id]}; ids must be unique.")
        seen[ex_id] = row
        text = " ".join(text.split())
        if r is not None:
            if not isinstance(r, (list, tuple)) or len(r) != len(text.split()) or any(x not in (0, 1) for x in r):
                raise ValueError(f"{where}: column {rationale_col!r} must hold one 0/1 per whitespace token "
                                 f"({len(text.split())} here); got {r!r:.80}.")
            r = tuple(int(x) for x in r)
        examples.append(Example(id=ex_id, text=text, label=index[label], rationale=r))
    info = {"dataset": "huggingface", "n_examples": len(examples), "text_col": text_col, "label_col": label_col,
            "rationale_col": rationale_col}
    return LoadedSplit(examples, names, info)


def _datasets_module():
    """`import datasets`, or an ImportError that says how to install it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("from_hf_dataset needs the optional HuggingFace `datasets` library: pip install datasets. "
                          "Without it, export the split to CSV/JSONL and use read_table.") from e
    return datasets
