"""Saved work for long analyses: each finished item is a JSON file, so a crash, Ctrl-C or SIGTERM loses nothing.

    with interruptible(), ItemStore("runs/audit", fingerprint={"model": sha256_files("runs/keywords"),
                                                              "settings": settings}, resume=True) as store:
        for chunk in chunks:
            table = store.run(f"chunk-{chunk.id}", lambda: frame_payload(analyse(chunk)))  # skipped if done

Files: <out>/.attnaudit/manifest.json (fingerprint and one entry per item: status, seconds, sha256),
<out>/.attnaudit/items/<safe_name(item)>.json and <out>/.attnaudit/lock (pid, host, time of the holder).
A sharded run (attnaudit.distributed) adds ranks/rank-R.json and ranks/rank-R.lock per rank R > 0 (`RankStore`):
its items, which rank 0 adopts while it waits (`collect`) and any later open adopts too.
Every file is written to a temporary file beside it, fsynced, renamed over the final name and the folder
fsynced, and an item file is complete before the manifest calls it done: readers never see a torn file.
JSON is strict (no NaN tokens): a non-finite float is written as {"$float": "nan" | "inf" | "-inf"} and
read back as the float, so float lists keep their NaN. Tuples and arrays (anything with `tolist`) come
back as lists; dict keys must be strings. DataFrames go through `frame_payload` / `payload_frame`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from attnaudit.model.checkpoint import atomic_write_bytes, file_sha256

try:
    import fcntl  # the kernel drops an flock when its holder dies
except ImportError:                                   # pragma: no cover - not on Windows
    fcntl = None

FORMAT, FORMAT_VERSION = "attnaudit-store", 1
MAX_NAME = 100


class StoreError(ValueError):
    """An output folder the store cannot use as asked; the message says what to do."""


class OutputPathError(StoreError): """--out is a file, a symlink, read-only or cannot be created."""
class StoreLocked(StoreError): """Another live process holds the folder's lock."""
class StoreExists(StoreError): """The folder holds an earlier run's items and neither resume nor overwrite was asked."""
class StoreCorrupt(StoreError): """A manifest or item file that does not read back as written."""


class FingerprintMismatch(StoreError):
    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences              # (key path, earlier, now)


# -- hashes -------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of one file (`attnaudit.model.checkpoint.file_sha256`, the one definition)."""
    return file_sha256(Path(path))


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
    text = json.dumps(_encode(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- strict JSON with exact floats --------------------------------------------------------------
def _encode(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    if isinstance(obj, Mapping):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"payload dict keys must be strings (JSON would turn {bad[0]!r} into a string); "
                            f"got a {type(bad[0]).__name__} key.")
        if set(obj) == {"$float"}:
            raise TypeError('a payload dict may not have "$float" as its only key (it marks non-finite floats).')
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if hasattr(obj, "tolist"):                        # numpy / torch arrays and scalars
        return _encode(obj.tolist())
    raise TypeError(f"payloads must be JSON data (dict, list, str, int, float, bool, None); got {type(obj).__name__}.")


def _decode_float(d: dict) -> Any:
    return float(d["$float"]) if set(d) == {"$float"} else d


def dumps(obj: Any) -> str:
    """Strict JSON text of a payload; non-finite floats become {"$float": ...}."""
    return json.dumps(_encode(obj), allow_nan=False, ensure_ascii=False)


def loads(text: str | bytes) -> Any:
    return json.loads(text, object_hook=_decode_float)


def frame_payload(df) -> dict:
    """A DataFrame as JSON data that `payload_frame` turns back into an equal frame.

    Kept exactly: column names and order, dtypes (float/int/uint/bool, their nullable forms, str/object),
    NaN and missing values, the index and `attrs`. Refused: category, datetime and other dtypes.
    """
    import pandas as pd
    for name, dtype in df.dtypes.items():
        if isinstance(dtype, pd.CategoricalDtype) or dtype.kind not in "biufO":
            raise TypeError(f"frame_payload stores float, int, bool and string columns; column {name!r} "
                            f"has dtype {dtype}. Convert it first (e.g. .astype(str)).")
    plain = lambda values: [None if v is pd.NA else v for v in values]          # noqa: E731
    return {"kind": "pandas.DataFrame",
            "columns": plain(df.columns.tolist()), "columns_dtype": str(df.columns.dtype),
            "dtypes": [str(d) for d in df.dtypes],
            "data": [plain(df.iloc[:, j].tolist()) for j in range(df.shape[1])],
            "index": plain(df.index.tolist()), "index_dtype": str(df.index.dtype), "index_name": df.index.name,
            "attrs": dict(df.attrs)}


def payload_frame(obj: Mapping) -> Any:
    """Inverse of `frame_payload` (also after a save/load round trip)."""
    import pandas as pd
    if not isinstance(obj, Mapping) or obj.get("kind") != "pandas.DataFrame":
        raise ValueError("payload_frame needs a dict made by frame_payload (kind 'pandas.DataFrame'); "
                         f"got {type(obj).__name__}.")
    index = pd.Index(obj["index"], dtype=obj["index_dtype"], name=obj["index_name"])
    df = pd.DataFrame({j: pd.Series(values, dtype=dtype, index=index)
                       for j, (values, dtype) in enumerate(zip(obj["data"], obj["dtypes"]))}, index=index)
    df.columns = pd.Index(obj["columns"], dtype=obj["columns_dtype"])
    df.attrs = dict(obj["attrs"])
    return df


# -- paths --------------------------------------------------------------------------------------
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


@contextlib.contextmanager
def interruptible():
    """Inside the block SIGTERM raises KeyboardInterrupt, like Ctrl-C; the old handler is restored after.

    Outside the main thread (where Python cannot install handlers) the block runs unchanged.
    """
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"received signal {signal.Signals(signum).name}")
    try:
        old = signal.signal(signal.SIGTERM, _raise)
    except ValueError:                                # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _write(path: Path, data: bytes) -> None:
    """atomic_write_bytes (temp file, flush, fsync, os.replace) then fsync the folder so the rename lasts."""
    atomic_write_bytes(path, data)
    with contextlib.suppress(OSError):               # folders cannot be opened for fsync on Windows
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)                               # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _read_lock(fd: int) -> dict:
    """The holder a lock file names ({} if empty or torn)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _holder(path: Path) -> dict | None:
    """Who holds the flock on lock file `path` (its recorded pid, host, time), or None when nobody does."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if fcntl is None or _try_flock(fd):           # taken: nobody held it (closing the fd releases it)
            return None
        return _read_lock(fd)
    finally:
        os.close(fd)


def _elsewhere(path: Path) -> bool:
    """Does lock file `path` name another host? Its flock then proves nothing (a shared file system may keep
    flocks per machine), so such a rank counts as alive; torchrun or the wait's timeout see it die."""
    try:
        info = json.loads(path.read_bytes() or b"{}")
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("host", socket.gethostname()) != socket.gethostname()


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


# -- the store ----------------------------------------------------------------------------------
class ItemStore:
    """Named items of a long analysis, each saved once as JSON; a context manager holding the folder's lock.

    Args:
        folder: the output folder (`--out`); the store lives in folder/.attnaudit/.
        fingerprint: JSON data that decides the results (model and data hashes, settings).
        resume: continue a run with the same fingerprint, skipping its done items.
        overwrite: forget an earlier run's items and start again.
    """

    def __init__(self, folder: str | Path, *, fingerprint: Mapping[str, Any], resume: bool = False,
                 overwrite: bool = False):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.resume = resume
        self.overwrite = overwrite
        self.root = self.folder / ".attnaudit"
        self._lock_path = self.root / "lock"
        self._lock_fd: int | None = None
        self._items: dict[str, dict] = {}
        self._saved_now: set[str] = set()             # items saved, failed or collected since open

    # lock ---------------------------------------------------------------------------------------
    def __enter__(self) -> ItemStore:
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other; pass --resume or --overwrite, not both.")
        check_output_dir(self.folder)
        (self.root / "items").mkdir(parents=True, exist_ok=True)
        self._lock_and_open()
        return self

    def _lock_and_open(self) -> None:
        """Take this store's lock, then read (or start) its manifest; a failed open releases the lock."""
        self._lock()
        try:
            self._open()
        except BaseException:
            self._unlock()
            raise

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _lock(self) -> None:
        """O_CREAT|O_EXCL lock file naming its holder, flocked while held: a dead holder's flock is gone."""
        path = self._lock_path
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:             # released meanwhile
                    continue
            try:
                held = fcntl is not None and not _try_flock(fd)
                info = _read_lock(fd)
                if not held and os.fstat(fd).st_ino != os.stat(path).st_ino:
                    raise FileNotFoundError       # replaced meanwhile: look again
                # empty (just created, or torn by a crash) or left by a dead process on this host: ours
                stale = not info or (info.get("host") == me["host"] and isinstance(info.get("pid"), int)
                                     and not _pid_alive(info["pid"]))
                if held or not stale:
                    raise StoreLocked(
                        f"{str(self.folder)!r} is in use by pid {info.get('pid', '?')} on host "
                        f"{info.get('host', '?')} since {info.get('time', '?')}; wait for it to finish or pass "
                        f"another --out. If that process is gone, delete {str(path)!r}.")
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, json.dumps(me).encode())
                os.fsync(fd)
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
            return
        raise StoreLocked(f"could not take the lock {str(path)!r}; other processes keep changing it.")

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        path = self._lock_path
        with contextlib.suppress(OSError):
            if os.fstat(self._lock_fd).st_ino == os.stat(path).st_ino:
                path.unlink()
        os.close(self._lock_fd)
        self._lock_fd = None

    # manifest -----------------------------------------------------------------------------------
    def _open(self) -> None:
        for tmp in [*self.root.glob(".*.tmp"), *(self.root / "items").glob(".*.tmp"),
                    *(self.root / "ranks").glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)               # left by a killed writer; we hold the lock (ranks start after)
        fingerprint = loads(dumps(self.fingerprint))  # as it will read back
        path = self.root / "manifest.json"
        manifest = None
        if path.exists():
            try:
                manifest = loads(path.read_bytes())
                if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
                        or not isinstance(manifest.get("items"), dict):
                    raise ValueError(f"no {FORMAT!r} format and items")
            except ValueError as e:
                if not self.overwrite:
                    raise StoreCorrupt(f"{str(path)!r} is not a store manifest ({e}); "
                                       "pass --overwrite to start again.") from None
                manifest = None
        items = manifest["items"] if manifest else {}
        ranked = self._check_ranks()                  # other ranks' manifests of an earlier sharded run
        if manifest and not self.overwrite:
            items = {**items, **self._valid_entries(ranked, manifest["fingerprint"], items)}
        if self.overwrite:
            for f in (self.root / "items").glob("*.json"):
                f.unlink()
            items = {}
        elif items and not self.resume:
            n_failed = sum(e.get("status") == "failed" for e in items.values())
            raise StoreExists(f"--out {str(self.folder)!r} already holds {len(items)} items of an earlier run "
                              f"({len(items) - n_failed} done, {n_failed} failed); pass --resume to continue it "
                              "or --overwrite to start again.")
        elif items:
            diffs = differences(manifest["fingerprint"], fingerprint)
            if diffs:
                lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in diffs)
                raise FingerprintMismatch(f"--resume: {str(self.folder)!r} was computed with a different "
                                          f"fingerprint (earlier -> now):\n{lines}\npass --overwrite to start "
                                          "again or choose another --out.", diffs)
        self._commit(items, fingerprint)
        for path in ranked:                           # their entries are in the manifest now
            path.unlink(missing_ok=True)

    def _commit(self, items: dict[str, dict], fingerprint: Any = None) -> None:
        """Write the manifest holding `items`; only then adopt them."""
        self._check_open()
        if fingerprint is not None:
            self._fingerprint = fingerprint
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self._fingerprint,
                    "items": items}
        _write(self.root / "manifest.json", dumps(manifest).encode("utf-8"))
        self._items = items

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError("use the ItemStore inside `with ItemStore(...) as store:`; it is not open.")

    def _path(self, item: str) -> Path:
        return inside(self.root / "items", safe_name(item) + ".json")

    # ranks of a sharded run (attnaudit.distributed) ---------------------------------------------
    def _check_ranks(self) -> list[Path]:
        """Refuse when a rank of another job still writes here; drop dead ranks' locks -> their manifests."""
        ranks = self.root / "ranks"
        for lock in sorted(ranks.glob("rank-*.lock")) if ranks.is_dir() else []:
            info = _holder(lock)
            if info is not None:
                raise StoreLocked(f"{str(self.folder)!r} is in use by {lock.stem} of another sharded job (pid "
                                  f"{info.get('pid', '?')} on host {info.get('host', '?')} since "
                                  f"{info.get('time', '?')}); wait for it to finish or pass another --out.")
            lock.unlink(missing_ok=True)
        return sorted(ranks.glob("rank-*.json")) if ranks.is_dir() else []

    def _valid_entries(self, paths: Iterable[Path], fingerprint: Any, known: Mapping[str, dict]) -> dict[str, dict]:
        """The entries of rank manifests written with `fingerprint` that are new to `known` and whose item files
        match their sha256 (failed entries need no file)."""
        new = {}
        for path in paths:
            try:
                m = loads(path.read_bytes())
            except (OSError, ValueError):             # torn or half-written: its items are computed again
                continue
            if not isinstance(m, dict) or m.get("fingerprint") != fingerprint or not isinstance(m.get("items"), dict):
                continue
            for item, entry in m["items"].items():
                if known.get(item) == entry or not isinstance(entry, dict):
                    continue
                if entry.get("status") == "done":
                    file = self._path(item)
                    if not file.is_file() or sha256_file(file) != entry.get("sha256"):
                        continue
                elif entry.get("status") != "failed":
                    continue
                new[item] = entry
        return new

    def collect(self) -> dict[int, dict]:
        """Adopt the items the other ranks saved since -> {rank: {"started", "alive", "finished", "n_items"}}."""
        self._check_open()
        states, paths = {}, []
        folder = self.root / "ranks"
        for rank in sorted({int(f.stem.split("-")[1]) for f in folder.glob("rank-*.*") if f.suffix in (".json", ".lock")}):
            path = folder / f"rank-{rank}.json"
            alive = _holder(path.with_suffix(".lock")) is not None or _elsewhere(path.with_suffix(".lock"))
            try:
                m = loads(path.read_bytes())
            except (OSError, ValueError):             # locked but nothing written yet (or torn)
                m = {}
            states[rank] = {"started": True, "alive": alive, "finished": bool(m.get("finished")),
                            "n_items": len(m.get("items", {}))}
            paths.append(path)
        new = self._valid_entries(paths, self._fingerprint, self._items)
        if new:
            self._commit({**self._items, **new})
            self._saved_now |= set(new)
        return states

    def saved_now(self, item: str) -> bool:
        """Was `item` saved (done or failed) since open, by this store or a rank it collected from?"""
        return item in self._saved_now

    # items --------------------------------------------------------------------------------------
    def items(self) -> dict[str, dict]:
        return loads(dumps(self._items))

    def failures(self) -> dict[str, str]:
        return {k: e["reason"] for k, e in self._items.items() if e["status"] == "failed"}

    def done(self, item: str) -> bool:
        return self._items.get(item, {}).get("status") == "done" and self._path(item).is_file()

    def load(self, item: str) -> Any:
        """The saved payload of a done item; StoreCorrupt if its file does not match the manifest."""
        self._check_open()
        if not self.done(item):
            raise KeyError(f"item {item!r} is not done in {str(self.root)!r}; check done(item) first.")
        data = self._path(item).read_bytes()
        if hashlib.sha256(data).hexdigest() != self._items[item]["sha256"]:
            raise StoreCorrupt(f"{str(self._path(item))!r} does not match its sha256 in the manifest.")
        return loads(data)["payload"]

    def save(self, item: str, payload: Any, *, seconds: float) -> None:
        """Write the item file atomically, then mark it done in the manifest (seconds, sha256)."""
        self._check_open()
        data = dumps({"item": item, "payload": payload}).encode("utf-8")     # fails before any write
        path, old = self._path(item), self._items.get(item)
        if old is not None:                           # never let the manifest vouch for a file being replaced
            self._commit({k: v for k, v in self._items.items() if k != item})
        try:
            _write(path, data)
        except BaseException:
            if old is not None and path.is_file() and sha256_file(path) == old.get("sha256"):
                with contextlib.suppress(Exception):
                    self._commit({**self._items, item: old})
            raise
        entry = {"status": "done", "seconds": float(seconds), "sha256": hashlib.sha256(data).hexdigest(),
                 "file": path.name}
        self._commit({**self._items, item: entry})
        self._saved_now.add(item)

    def fail(self, item: str, reason: str, *, seconds: float = 0.0) -> None:
        self._commit({**self._items, item: {"status": "failed", "reason": str(reason), "seconds": float(seconds)}})
        self._saved_now.add(item)

    def run(self, item: str, compute: Callable[[], Any], *, retry_oom: Callable[[], Any] | None = None) -> Any | None:
        """The item's payload: loaded if done, else computed, saved and returned as it reads back.

        A CUDA out-of-memory error calls `retry_oom` once (e.g. with smaller batches); any other Exception is
        recorded with fail() and gives None, so the analysis goes on. KeyboardInterrupt passes through.
        """
        if self.done(item):
            with contextlib.suppress(StoreCorrupt):   # a damaged file is computed again
                return self.load(item)
        import torch
        start = time.perf_counter()
        try:
            retry = False
            try:
                payload = compute()
            except torch.cuda.OutOfMemoryError:
                if retry_oom is None:
                    raise
                retry = True
            if retry:                                 # outside the except: the failed frames are freed first
                torch.cuda.empty_cache()
                payload = retry_oom()
            self.save(item, payload, seconds=time.perf_counter() - start)
        except Exception as e:
            self.fail(item, f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start)
            return None
        return self.load(item)


class RankStore(ItemStore):
    """Rank R's side (R > 0) of a store that rank 0's ItemStore holds, for a sharded run (attnaudit.distributed).

    The same item files, listed in .attnaudit/ranks/rank-R.json (only this rank writes it) and guarded by
    ranks/rank-R.lock; the folder's lock and manifest stay rank 0's, which adopts these entries (`collect`)
    while it waits and at the next open (any world size, once no rank lock is held). Items done in rank 0's
    manifest at start are skipped. Open it only after rank 0's ItemStore is open.
    """

    def __init__(self, folder: str | Path, *, rank: int, fingerprint: Mapping[str, Any]):
        super().__init__(folder, fingerprint=fingerprint, resume=True)
        self.rank = rank
        self._lock_path = self.root / "ranks" / f"rank-{rank}.lock"
        self._manifest_path = self.root / "ranks" / f"rank-{rank}.json"
        self._base: dict[str, dict] = {}
        self._finished = False

    def __enter__(self) -> RankStore:
        (self.root / "ranks").mkdir(parents=True, exist_ok=True)
        self._lock_and_open()
        return self

    def _open(self) -> None:
        path = self.root / "manifest.json"
        try:
            manifest = loads(path.read_bytes())
            items = manifest["items"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreCorrupt(f"rank {self.rank}: {str(path)!r} cannot be read ({e}); rank 0 writes it before "
                               "the other ranks start, so start every rank together (torchrun).") from None
        fingerprint = loads(dumps(self.fingerprint))
        diffs = differences(manifest.get("fingerprint"), fingerprint)
        if diffs:
            raise FingerprintMismatch(f"rank {self.rank}: {str(self.folder)!r} belongs to another audit (its "
                                      f"fingerprint differs in {diffs[0][0]}).", diffs)
        self._base = {k: e for k, e in items.items() if isinstance(e, dict) and e.get("status") == "done"}
        self._commit(dict(self._base), fingerprint)

    def _commit(self, items: dict[str, dict], fingerprint: Any = None) -> None:
        """Write this rank's manifest: its own entries (not rank 0's, which it only reads)."""
        self._check_open()
        if fingerprint is not None:
            self._fingerprint = fingerprint
        own = {k: v for k, v in items.items() if self._base.get(k) != v}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self._fingerprint,
                    "rank": self.rank, "finished": self._finished, "items": own}
        _write(self._manifest_path, dumps(manifest).encode("utf-8"))
        self._items = items

    def finish(self) -> None:
        """Mark this rank's work done (rank 0 then no longer waits on it)."""
        self._finished = True
        self._commit(self._items)
