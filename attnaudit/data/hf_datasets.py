"""HuggingFace `datasets` splits as Examples (the optional `datasets` library is imported on use).

    loaded = from_hf_dataset(datasets.load_from_disk("my_data")["validation"], "sentence", "label")
"""
from __future__ import annotations

from attnaudit.data.examples import Example, sorted_labels
from attnaudit.data.splits import LoadedSplit


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
        names = tuple(label_names) if label_names is not None else sorted_labels({y for y in labels if y})
    names = tuple(str(n) for n in names)
    index = {name: i for i, name in enumerate(names)}
    texts = list(ds[text_col])
    rationales = list(ds[rationale_col]) if rationale_col else [None] * len(texts)
    ids = [str(x) for x in ds[id_col]] if id_col else [str(i) for i in range(len(texts))]

    examples: list[Example] = []
    seen: dict[str, int] = {}                                 # id -> row
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
