"""Output folders and the file names in them: user text made a safe name, names kept inside their folder, and
--out checked before any computation.

    check_output_dir("reports/mine")                   # OutputPathError: a file, a symlink, not writable
    inside(folder, safe_name("chunk-0/../x"))          # folder/<safe name>, never outside folder
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

MAX_NAME = 100


class StoreError(ValueError):
    """An output folder the store cannot use as asked; the message says what to do."""


class OutputPathError(StoreError): """--out is a file, a symlink, read-only or cannot be created."""


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_SUFFIX = re.compile(r"-[0-9a-f]{16}$")


def safe_name(text: str) -> str:
    """A file name for user text: [A-Za-z0-9._-], no leading "." or "-", at most MAX_NAME characters.

    Lower-case safe text is kept as is; any other text gets "-" + 16 hex digits of its sha256, so two
    different texts never share a name, not even on a case-insensitive file system. Text that already
    ends like a suffix is suffixed too, so a kept name never equals a made one.
    """
    if not isinstance(text, str):
        raise TypeError(f"safe_name needs a str; got {type(text).__name__}.")
    name = _UNSAFE.sub("_", text)
    if name[:1] in ("", ".", "-"):
        name = "_" + name
    if name == text and name == name.lower() and len(name) <= MAX_NAME and not _SUFFIX.search(name):
        return name
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{name[:MAX_NAME - 17]}-{digest}"


def inside(folder: str | os.PathLike, name: str | os.PathLike) -> Path:
    """folder/name resolved, refusing a name that leads outside `folder` (.., absolute paths, symlinks)."""
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if path == root or not path.is_relative_to(root):
        raise ValueError(f"file name {str(name)!r} must stay inside {str(root)!r}; it resolves to {str(path)!r}.")
    return path


def check_output_dir(path: str | os.PathLike, *, param: str = "--out") -> Path:
    """Make sure `path` is (or can become) a real, writable folder, before any computation -> Path."""
    path = Path(path)
    if path.is_symlink():
        raise OutputPathError(f"{param} must not be a symbolic link (results could land elsewhere); got "
                              f"{str(path)!r} -> {os.readlink(path)!r}. Pass the real folder instead.")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{param} must be a folder; got {str(path)!r}, which is an existing file. "
                              "Pass a new or existing folder path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{param} must be a folder that can be created; got {str(path)!r} ({e.strerror}). "
                              "Check that its parent exists and is writable.") from e
    try:                                              # os.access lies for root and read-only mounts
        fd, probe = tempfile.mkstemp(dir=path, prefix=".attnaudit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"{param} must be a writable folder; got {str(path)!r} ({e.strerror}). "
                              "Choose another folder or make it writable.") from e
    return path
