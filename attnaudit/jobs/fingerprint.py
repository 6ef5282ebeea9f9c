"""Fingerprints: what decides a job's results, as hashes of files and of JSON, and where two of them differ.

    sha256_files("runs/keywords")                      # one hash over a folder's files, wherever it lies
    sha256_json({"k": 0.2, "seed": 0})                 # the canonical JSON's sha256
    differences({"a": 1}, {"a": 2})                    # [("a", 1, 2)]
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attnaudit.core.io import file_sha256
from attnaudit.jobs.payload import encode

# The message for a missing file that `attnaudit.model.checkpoint.file_sha256` gave (a model folder's files are
# what is hashed most): kept word for word.
_MISSING = "a model folder holds config.json and model.safetensors"


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of one file (`attnaudit.core.io.file_sha256`, the one definition)."""
    return file_sha256(Path(path), missing=_MISSING)


def sha256_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> str:
    """One hash over files: a folder's files (recursively, names starting with "." skipped) or a list of paths.

    Each file contributes its name relative to the folder (for a list: to the files' common parent) and its
    sha256, in sorted name order, so the hash is the same wherever the files lie and however they are listed.
    """
    if isinstance(paths, (str, os.PathLike)) and Path(paths).is_dir():
        root = Path(paths)
        files = [Path(d, f) for d, dirs, names in os.walk(root) for f in names]
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    else:
        files = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        root = Path(os.path.commonpath([p.resolve().parent for p in files])) if files else Path(".")
        files = [p.resolve() for p in files]
    named = sorted((p.relative_to(root).as_posix(), p) for p in files)
    return sha256_json([[name, sha256_file(p)] for name, p in named])


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no spaces, NaN encoded as in items)."""
    text = json.dumps(encode(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def short_repr(value: Any, n: int = 60) -> str:
    """repr(value) cut to n characters ("..." at the end), for one difference in a one-line message."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The leaves where two JSON values differ -> [(dotted key, old, new)]; a missing key reads "<missing>"."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            out += differences(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if old == new else [(prefix or "<fingerprint>", old, new)]
