"""Files: the one home for how attnaudit writes, hashes and serialises what it keeps.

    atomic_write_text(out / "config.json", json.dumps(jsonable(cfg), allow_nan=False))
    atomic_write(out / "metrics.csv", lambda tmp: frame.to_csv(tmp, index=False))   # pandas writes the temp file

- Every file is written to a temporary file beside its destination, fsynced, then renamed over it
  (`os.replace`): a reader sees the old file or the whole new one, never a torn one, and a failed write
  leaves the old file as it was.
- One permission policy: a written file gets `FILE_MODE` (0o666 & ~umask, what `open(path, "w")` gives a
  new file), a created folder `DIR_MODE` (0o777 & ~umask): results are meant to be shared, although
  `mkstemp` / `mkdtemp` make 0o600 / 0o700. The umask is read once, at import: reading it means setting
  it, which is not safe while other threads create files.
- One JSON rule (`jsonable`): NaN and ±inf become null, so `json.dumps(..., allow_nan=False)` gives strict
  JSON that every reader parses.

Nothing here imports torch, pandas or numpy: numpy scalars are recognised only once numpy is loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

UMASK = os.umask(0)
os.umask(UMASK)
FILE_MODE = 0o666 & ~UMASK        # a written file: readable as a normal file is
DIR_MODE = 0o777 & ~UMASK         # a created folder
TEMP_SUFFIX = ".tmp"              # temporary files are ".<name>.<random>.tmp" beside their destination

# Weights attnaudit never loads. PICKLE_SUFFIXES: torch.save / pickle.dump files (unpickling can run code),
# refused when passed as a model path. NOT_SAFETENSORS_SUFFIXES: the weight files a HuggingFace folder may
# hold instead of safetensors (the pickle ones plus TensorFlow .h5 and Flax .msgpack, which are not pickle
# but which attnaudit cannot load either), named when such a folder is refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NOT_SAFETENSORS_SUFFIXES = (*PICKLE_SUFFIXES, ".h5", ".msgpack")


# -- writing --------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """write(tmp) on a temporary path beside `path`, fsync, `FILE_MODE`, then rename over `path` -> Path(path).

    For writers that want a file name (pandas' to_csv / to_parquet, safetensors' save_file). On any
    exception the temporary file is removed and `path` is as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())             # the bytes are on disk before the rename makes them visible
        os.chmod(tmp, FILE_MODE)             # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary file, fsync, `FILE_MODE`, rename) -> Path(path)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` of `text` as UTF-8 (no newline translation: the bytes are the same everywhere)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of our temporary files (".<name>.<random>.tmp"), e.g. left by a killed process."""
    return re.fullmatch(r"\..*\.tmp", name) is not None


def fsync_folder(path: str | os.PathLike) -> None:
    """fsync a folder so that a rename inside it lasts; silently nothing where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


# -- reading and hashing ----------------------------------------------------------------------------
def open_readable(path: str | os.PathLike, what: str, *, missing: str = ""):
    """open(path, "rb"), with a one-line message naming `what`, the path and the fix when it cannot be read.

    missing: what to add when the file does not exist (e.g. "a model folder holds config.json and ...").
    """
    path = Path(path)
    try:
        return open(path, "rb")
    except PermissionError as e:
        raise PermissionError(f"{what} {str(path)!r} cannot be read (permission denied); give this user read "
                              f"permission (e.g. chmod a+r {str(path)!r}) or copy the folder somewhere readable.") from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} {str(path)!r} is missing" + (f"; {missing}." if missing else ".")) from e
    except IsADirectoryError as e:
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder; it must be a file.") from e


def file_sha256(path: str | os.PathLike, *, what: str = "file", missing: str = "") -> str:
    """The sha256 (hex) of a file, read 1 MiB at a time (a checkpoint need not fit in memory twice).

    what / missing: as in `open_readable`, for the message when the file cannot be read.
    """
    digest = hashlib.sha256()
    with open_readable(path, what, missing=missing) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- JSON -------------------------------------------------------------------------------------------
def jsonable(obj: Any, *, default: Callable[[Any], Any] | None = None) -> Any:
    """`obj` as plain JSON values, recursively: the one NaN rule is NaN / ±inf -> None (null).

    Mappings -> dicts with str keys; lists and tuples -> lists; numpy bools, integers and floats -> bool,
    int, float. Other values (str, int, None, ...) are returned as they are, or as default(value) when
    `default` is given and the value is not a str, int or None (e.g. default=repr for hyper-parameters
    that may hold objects).

        >>> jsonable({"a": float("nan"), 1: (2, 0.5)})
        {'a': None, '1': [2, 0.5]}
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, default=default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, default=default) for v in obj]
    np = sys.modules.get("numpy")                # without numpy loaded there are no numpy values to convert
    if isinstance(obj, bool) or (np is not None and isinstance(obj, np.bool_)):
        return bool(obj)
    if np is not None and isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float) or (np is not None and isinstance(obj, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if default is None or obj is None or isinstance(obj, (str, int)):
        return obj
    return default(obj)


__all__ = ["UMASK", "FILE_MODE", "DIR_MODE", "TEMP_SUFFIX", "PICKLE_SUFFIXES", "NOT_SAFETENSORS_SUFFIXES",
           "atomic_write", "atomic_write_bytes", "atomic_write_text", "is_temp_name", "fsync_folder",
           "open_readable", "file_sha256", "jsonable"]
