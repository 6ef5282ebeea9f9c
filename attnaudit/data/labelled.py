"""Any labelled file the command line accepts (`--data`), its format recognised from its contents: an ERASER
annotation file, a HateXplain file or a table (.csv, .tsv, .jsonl, optionally .gz).

    read_labelled("../shared/data/eraser_movies/test.jsonl")        # ERASER: documents + rationales
    read_labelled("reviews.csv", text_col="text", label_col="label")  # a table: names its columns
"""
from __future__ import annotations

import os
from pathlib import Path

from attnaudit.data.eraser import read_eraser
from attnaudit.data.examples import json_lines, read_table
from attnaudit.data.hatexplain import read_hatexplain
from attnaudit.data.splits import LoadedSplit, cleaned_summary


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
                                         "cleaned": cleaned_summary(cleaned)})
