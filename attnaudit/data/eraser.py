"""ERASER (DeYoung et al. 2020): annotation lines with evidence spans over documents, as Examples whose
rationale marks the evidence tokens (Movies: Zaidan, Eisner & Piatko 2007, annotator rationales).

    movies = read_eraser("../shared/data/eraser_movies", "test", max_tokens=512)
    movies.info["n_truncated"]    # reviews longer than 512 tokens, each cut to its first 512
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from attnaudit.data.examples import Example, json_lines, label_index, read_source
from attnaudit.data.splits import LoadedSplit, cleaned_summary


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

    examples: list[Example] = []
    seen: dict[str, int] = {}                                 # annotation_id -> line
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
            "cleaned": cleaned_summary(cleaned)}
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
        docs: dict[str, str] = {}
        for wanted_id in wanted:
            file = folder / "docs" / wanted_id
            if Path(wanted_id).name == wanted_id and file.is_file():  # a docid never reaches outside docs/
                docs[wanted_id] = read_source(file, cleaned)
        return docs, str(folder / "docs")
    for name in ("docs.jsonl", "docs.jsonl.gz"):
        path = folder / name
        if path.is_file():
            docs = {}
            lines: dict[str, int] = {}                         # docid -> the line it is on
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
