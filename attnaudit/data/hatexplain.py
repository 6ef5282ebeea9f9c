"""HateXplain (Mathew et al. 2021): posts with several annotators' labels and rationale vectors, as Examples
with the majority label and an aggregated rationale.

    hate = read_hatexplain("../shared/data/hatexplain", "val")
    hate.info["n_no_majority"]    # posts dropped: no label won
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from attnaudit.data.examples import Example, read_source, sorted_labels
from attnaudit.data.splits import LoadedSplit, cleaned_summary

HATEXPLAIN_RULES = ("mean", "union")


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
        label_names = sorted_labels({top for _, _, _, top, _, _ in kept})
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
            "n_rationale_empty": sum(has and not any(m) for *_, m, has in kept), "cleaned": cleaned_summary(cleaned)}
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
