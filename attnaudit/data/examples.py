"""Examples: the unit every task, loader, explainer and report shares.

An `Example` is one text with its label (classification) or target (seq2seq) and, where known,
its evidence: a 0/1 rationale per whitespace token of `text`, or word alignments for seq2seq.
`read_table` loads your own text-classification files (CSV, TSV, JSONL, optionally gzipped) into
Examples; `write_jsonl` saves Examples one JSON record per line.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnaudit.core.io import atomic_write_text


@dataclass(frozen=True)
class Example:
    """One input with its answer and its known evidence.

    Args:
        id: unique within a dataset (used in tables and file names after sanitising).
        text: whitespace-separated words; the built-in tokenizer lower-cases and splits on whitespace.
        label: class index for classification tasks, else None.
        target: the reference output text for seq2seq tasks, else None.
        rationale: one 0/1 per whitespace token of `text` (1 = decides the label), or None if unknown.
        alignment: for seq2seq, (source word index, target word index) pairs, 0-based, or None: the Sure links.
        possible_alignment: Possible-only links (Och & Ney 2003), same form, or None; AER reads P = S ∪ these.
        meta: what a reader changed on the way in, e.g. {"cleaned": {"nul": 2}} (NUL characters removed from
            this example's line, `read_source`); None if nothing. Not compared.
    """

    id: str
    text: str
    label: int | None = None
    target: str | None = None
    rationale: tuple[int, ...] | None = None
    alignment: tuple[tuple[int, int], ...] | None = None
    possible_alignment: tuple[tuple[int, int], ...] | None = None
    meta: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.rationale is not None and len(self.rationale) != len(self.text.split()):
            raise ValueError(
                f"Example {self.id!r}: rationale has {len(self.rationale)} entries but text has "
                f"{len(self.text.split())} whitespace tokens; give one 0/1 per token."
            )

    def to_json(self) -> dict:
        """The `tasks export` record: text, label or target, rationale or alignment."""
        out: dict = {"id": self.id, "text": self.text}
        if self.label is not None:
            out["label"] = self.label
        if self.target is not None:
            out["target"] = self.target
        if self.rationale is not None:
            out["rationale"] = list(self.rationale)
        if self.alignment is not None:
            out["alignment"] = [list(p) for p in self.alignment]
        if self.possible_alignment is not None:
            out["possible_alignment"] = [list(p) for p in self.possible_alignment]
        return out


SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".csv.gz", ".tsv.gz", ".jsonl.gz", ".json.gz")


def read_table(
    path: str | os.PathLike,
    *,
    text_col: str,
    label_col: str,
    label_names: tuple[str, ...] | None = None,
    cleaned: dict | None = None,
) -> tuple[list[Example], tuple[str, ...]]:
    """Read a labelled text file into Examples.

        train, names = read_table("train.tsv.gz", text_col="sentence", label_col="label")
        valid, _ = read_table("dev.tsv", text_col="sentence", label_col="label", label_names=names)

    Args:
        path: .csv, .tsv (no quoting: quotes are text, as in SST-2) or .jsonl/.json (one object per
            line), each optionally with a .gz suffix. All values are read as text ("NA" stays "NA").
        text_col, label_col: the column (or JSON key) holding the text and the label.
        label_names: the training file's label names, to index another split the same way;
            None derives them from this file.
        cleaned: a dict to receive what `read_source` removed (a BOM, NUL characters); each example whose
            line lost NULs also says so in its `meta`.
    Returns:
        (examples, label_names): ids come from an `id` column when present, else the 0-based row
        number; label_names are the sorted label strings (numerically if all are integers).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; pass a data file (.csv, .tsv, .jsonl, optionally .gz).")
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} does not exist or is not a file; check the name and folder.")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty; expected a header or JSON lines with "
                         f"{text_col!r} and {label_col!r}.")
    cleaned = {} if cleaned is None else cleaned
    rows = _read_rows(path, [text_col, label_col], cleaned)
    if not rows:
        raise ValueError(f"{path} has no data rows; expected at least one row with "
                         f"{text_col!r} and {label_col!r}.")

    for line, row in rows:
        if not row[text_col].strip():
            raise ValueError(f"{path}, line {line}: column {text_col!r} is empty or whitespace only; "
                             f"remove the row or fill in its text.")
        if not row[label_col].strip():
            raise ValueError(f"{path}, line {line}: column {label_col!r} is empty; every row needs a label.")
    labels = [row[label_col].strip() for _, row in rows]
    label_names, index = label_index(labels, label_names, single=lambda name: (
        f"{path}: column {label_col!r} has a single class {name!r} in all {len(rows)} rows; a classifier needs "
        "at least two labels."))

    examples: list[Example] = []
    seen: dict[str, int] = {}                                 # id -> line
    for row_number, ((line, row), label) in enumerate(zip(rows, labels)):
        if label not in index:
            as_index = "" if any(_INTEGER.fullmatch(n) for n in label_names) else \
                f" nor a class index in [0, {len(label_names) - 1}]"
            raise ValueError(f"{path}, line {line}: label {label!r} is not one of the label_names "
                             f"{', '.join(label_names)}{as_index}; pass the training file's label names.")
        ex_id = row["id"] if "id" in row else str(row_number)
        if ex_id in seen:
            raise ValueError(f"{path}, line {line}: id {ex_id!r} was already used on line {seen[ex_id]}; "
                             f"ids must be unique.")
        seen[ex_id] = line
        examples.append(Example(id=ex_id, text=row[text_col], label=index[label], meta=_line_meta(cleaned, line)))
    return examples, label_names


def write_jsonl(examples, path: str | os.PathLike) -> Path:
    """Write `Example.to_json()` one per line, atomically: readers see the old file or the whole new one.

    `path` names the file (an existing one is replaced; missing parent folders are created); it may not
    be an existing folder.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path must name a file to write, not an existing folder; got {str(path)!r}. "
                         f"Pass a file name inside it, e.g. {str(path / 'examples.jsonl')!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(ex.to_json(), ensure_ascii=False) + "\n" for ex in examples))
    return path


def _table_suffix(path: Path) -> str:
    """The format suffix (".csv", ".tsv", ".jsonl" or ".json"), ignoring a trailing ".gz"."""
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    for suffix in (".csv", ".tsv", ".jsonl", ".json"):
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"Unknown file type for {path.name!r}. Supported: {', '.join(SUPPORTED_SUFFIXES)}.")


def read_source(path: Path, cleaned: dict | None = None) -> str:
    """The text of a data file (optionally .gz): the one place where every reader's text comes in.

    A UTF-8 byte-order mark at the start is dropped and NUL characters are removed; what was removed is
    added to `cleaned` ({"bom": True, "nul": total, "nul_lines": {line: count}}), so readers can record it
    (`Example.meta`, a split's info). Bytes that are not UTF-8 (lone surrogates included) are refused with
    the file and line: there is no faithful way to guess what they meant.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError as e:
        raise ValueError(f"{path} is a folder; pass a data file (.csv, .tsv, .jsonl, optionally .gz).") from e
    except PermissionError as e:
        raise PermissionError(f"{path} cannot be read (permission denied); give this user read permission "
                              f"(e.g. chmod a+r {str(path)!r}) or copy the file somewhere readable.") from e
    except (OSError, EOFError) as e:
        raise ValueError(f"while reading {path}: {e}") from e
    bom = raw.startswith(codecs.BOM_UTF8)
    raw = raw[len(codecs.BOM_UTF8):] if bom else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}, line {line}: the bytes {raw[e.start:e.end + 3]!r} are not UTF-8 ({e.reason}); "
                         "save the file as UTF-8 or remove them.") from e
    if cleaned is not None and bom:
        cleaned["bom"] = True
    if "\x00" in text:
        lines = {i: n for i, n in enumerate((ln.count("\x00") for ln in text.split("\n")), start=1) if n}
        text = text.replace("\x00", "")
        if cleaned is not None:
            cleaned["nul"] = cleaned.get("nul", 0) + sum(lines.values())
            cleaned.setdefault("nul_lines", {}).update(lines)
    return text


def _line_meta(cleaned: dict, line: int) -> dict | None:
    """Example.meta for the row on `line`: the NUL characters removed from it, if any."""
    n = cleaned.get("nul_lines", {}).get(line)
    return {"cleaned": {"nul": n}} if n else None


def _read_delimited_rows(path: Path, suffix: str, needed: list[str],
                         cleaned: dict | None = None) -> list[tuple[int, dict[str, str]]]:
    """CSV/TSV rows as (line number, {column: text}); the header is line 1. `cleaned`: see `read_source`."""
    import pandas as pd  # here, not at the top: the CLI's --help and `tasks` stay fast

    tsv = suffix == ".tsv"
    text = read_source(path, cleaned)
    try:
        frame = pd.read_csv(
            io.StringIO(text), sep="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
            dtype=str, keep_default_na=False, na_filter=False,
        )
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"{path} is empty; expected a header with the columns {', '.join(needed)}.") from e
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}, {_bad_row(text, tsv) or str(e).strip()}") from e
    columns = [str(c) for c in frame.columns]
    for col in needed:
        if col not in columns:
            raise ValueError(f"{path} has no column {col!r}. Columns present: {', '.join(columns)}.")
    rows = frame.itertuples(index=False, name=None)
    return [(i + 2, dict(zip(columns, values))) for i, values in enumerate(rows)]


def _bad_row(text: str, tsv: bool) -> str | None:
    """Where a delimited file that pandas refused goes wrong: "line N: what" (physical line numbers), or None."""
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
                            strict=True)
        width, start = None, 1
        try:
            for row in reader:
                width = len(row) if width is None else width
                if len(row) > width:
                    return (f"line {start}: {len(row)} fields where the header has {width}; "
                            + ("a tab inside a text splits it." if tsv else "put a text holding commas in double quotes."))
                start = reader.line_num + 1
        except csv.Error as e:
            return f"line {start}: malformed row ({e}); check its quotes (a quoted field must be closed)."
    return None


def json_lines(path: Path, cleaned: dict | None = None):
    """(line number, parsed JSON) for each non-blank line of a .jsonl / .json file, optionally .gz.

    The text comes through `read_source` (`cleaned` records what it removed); a string holding a lone
    surrogate (a "\\ud800" escape without its pair) is refused with the line, as undecodable bytes are.
    """
    for line, raw in enumerate(read_source(path, cleaned).split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {line}: not valid JSON ({e.msg}); "
                             f"expected one JSON object per line.") from e
        if "\\u" in raw:                                         # only escapes can make a lone surrogate
            try:
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{path}, line {line}: a string holds a lone surrogate "
                                 f"({json.dumps(e.object[e.start:e.end])}), which is not text; fix or remove "
                                 "that escape.") from e
        yield line, record


def _read_rows(path: Path, needed: list[str], cleaned: dict | None = None) -> list[tuple[int, dict[str, str]]]:
    """(line number, {column: text}) of a table or JSON-lines file, by its suffix; `cleaned`: see `read_source`."""
    suffix = _table_suffix(path)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl_rows(path, needed, cleaned)
    return _read_delimited_rows(path, suffix, needed, cleaned)


def _read_jsonl_rows(path: Path, needed: list[str], cleaned: dict | None = None) -> list[tuple[int, dict[str, str]]]:
    """JSON-lines rows as (line number, {key: text}); blank lines are skipped."""
    rows = []
    for line, record in json_lines(path, cleaned):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {line}: expected a JSON object, got {type(record).__name__}.")
        for key in needed:
            if key not in record:
                raise ValueError(f"{path}, line {line} has no key {key!r}. "
                                 f"Keys present: {', '.join(map(str, record))}.")
        rows.append((line, {k: "" if v is None else str(v) for k, v in record.items()}))
    return rows


def label_index(labels, label_names, *, single) -> tuple[tuple[str, ...], dict[str, int]]:
    """(label names, label -> class index): the given names, or the sorted distinct `labels` (at least two;
    `single(name)` is the error message when there is only one).

    With given names, integer labels in [0, n_classes) are class indices too ("1" is the second class of
    ("negative", "positive") or of a HuggingFace head's ("LABEL_0", "LABEL_1")), unless the names are
    themselves integers: then "1" can only mean the class named "1".
    """
    if label_names is None:
        label_names = sorted_labels(set(labels))
        if len(label_names) < 2:
            raise ValueError(single(label_names[0]))
    label_names = tuple(str(name) for name in label_names)
    index = {name: i for i, name in enumerate(label_names)}
    if not any(_INTEGER.fullmatch(name) for name in label_names):
        for label in set(labels) - set(index):
            if _INTEGER.fullmatch(label) and 0 <= int(label) < len(label_names):
                index[label] = int(label)
    return label_names, index


_INTEGER = re.compile(r"[+-]?\d+")


def sorted_labels(labels: set[str]) -> tuple[str, ...]:
    """Sorted label strings; numerically when every label is an integer ("2" before "10")."""
    if all(re.fullmatch(r"[+-]?\d+", label) for label in labels):
        return tuple(sorted(labels, key=lambda label: (int(label), label)))
    return tuple(sorted(labels))


def read_texts(path: str | os.PathLike, *, text_col: str = "text") -> list[Example]:
    """Unlabelled Examples from a .csv/.tsv/.jsonl file's `text_col` (ids from an `id` column, else row numbers)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--data must be a .csv, .tsv or .jsonl file; {str(path)!r} is a folder.")
    if not path.is_file():
        raise FileNotFoundError(f"--data must be a .csv, .tsv or .jsonl file; {str(path)!r} does not exist.")
    cleaned: dict = {}
    rows = _read_rows(path, [text_col], cleaned)
    if not rows:
        raise ValueError(f"{path} holds no rows; expected at least one text in column {text_col!r}.")
    examples = [Example(id=r.get("id") or str(i), text=r[text_col], meta=_line_meta(cleaned, line))
                for i, (line, r) in enumerate(rows)]
    seen: dict[str, int] = {}
    for (line, _), ex in zip(rows, examples):
        if ex.id in seen:
            raise ValueError(f"{path}, line {line}: id {ex.id!r} was already used on line {seen[ex.id]}; ids must be unique.")
        seen[ex.id] = line
    empty = [line for line, r in rows if not r[text_col].split()]
    if empty:
        raise ValueError(f"{path}, line {empty[0]}: column {text_col!r} is empty; every row needs a text.")
    return examples
