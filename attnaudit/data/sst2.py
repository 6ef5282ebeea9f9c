"""GLUE SST-2 (Socher et al. 2013, SST): `sentence<TAB>label` files as Examples without rationales.

    sst = read_sst2("../shared/data/sst2", "dev")
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from attnaudit.data.examples import read_table
from attnaudit.data.splits import LoadedSplit


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
