"""Saved work for long analyses: each finished item is a JSON file, so a crash, Ctrl-C or SIGTERM loses nothing.

    with interruptible(), ItemStore("runs/audit", fingerprint={"model": sha256_files("runs/keywords"),
                                                              "settings": settings}, resume=True) as store:
        for chunk in chunks:
            table = store.run(f"chunk-{chunk.id}", lambda: frame_payload(analyse(chunk)))  # skipped if done

Files: <out>/.attnaudit/manifest.json (fingerprint and one entry per item: status, seconds, sha256),
<out>/.attnaudit/items/<safe_name(item)>.json and <out>/.attnaudit/lock (pid, host, time of the holder).
A sharded run (attnaudit.jobs.sharding) adds ranks/rank-R.json and ranks/rank-R.lock per rank R > 0 (`RankStore`):
its items, which rank 0 adopts while it waits (`collect`) and any later open adopts too.
Every file is written to a temporary file beside it, fsynced, renamed over the final name and the folder
fsynced, and an item file is complete before the manifest calls it done: readers never see a torn file.
JSON is strict (no NaN tokens): a non-finite float is written as {"$float": "nan" | "inf" | "-inf"} and
read back as the float, so float lists keep their NaN. Tuples and arrays (anything with `tolist`) come
back as lists; dict keys must be strings. DataFrames go through `frame_payload` / `payload_frame`.

The pieces: `attnaudit.jobs.payload` (that JSON, DataFrame payloads), `attnaudit.jobs.fingerprint` (hashes,
differences), `attnaudit.jobs.paths` (safe names, --out checks), `attnaudit.jobs.locks` (lock files, SIGTERM);
their names are importable from here too.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from attnaudit.core.io import atomic_write_bytes, fsync_folder
from attnaudit.jobs.fingerprint import differences, sha256_file, sha256_files, sha256_json, short_repr
from attnaudit.jobs.locks import StoreLocked, held_elsewhere, interruptible, lock_holder, release_lock, take_lock
from attnaudit.jobs.paths import MAX_NAME, OutputPathError, StoreError, check_output_dir, inside, safe_name
from attnaudit.jobs.payload import dumps, frame_payload, loads, payload_frame

FORMAT, FORMAT_VERSION = "attnaudit-store", 1


class StoreExists(StoreError): """The folder holds an earlier run's items and neither resume nor overwrite was asked."""
class StoreCorrupt(StoreError): """A manifest or item file that does not read back as written."""


class FingerprintMismatch(StoreError):
    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences              # (key path, earlier, now)



def _write(path: Path, data: bytes) -> None:
    """atomic_write_bytes (temp file, flush, fsync, os.replace) then fsync the folder so the rename lasts."""
    atomic_write_bytes(path, data)
    fsync_folder(path.parent)                         # a no-op where folders cannot be opened (Windows)


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
        """O_CREAT|O_EXCL lock file naming its holder, flocked while held (`attnaudit.jobs.locks.take_lock`)."""
        self._lock_fd = take_lock(self._lock_path, self.folder)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        release_lock(self._lock_fd, self._lock_path)
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

    # ranks of a sharded run (attnaudit.jobs.sharding) ---------------------------------------------
    def _check_ranks(self) -> list[Path]:
        """Refuse when a rank of another job still writes here; drop dead ranks' locks -> their manifests."""
        ranks = self.root / "ranks"
        for lock in sorted(ranks.glob("rank-*.lock")) if ranks.is_dir() else []:
            info = lock_holder(lock)
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
            alive = lock_holder(path.with_suffix(".lock")) is not None or held_elsewhere(path.with_suffix(".lock"))
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
    """Rank R's side (R > 0) of a store that rank 0's ItemStore holds, for a sharded run (attnaudit.jobs.sharding).

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


__all__ = ["ItemStore", "RankStore", "FORMAT", "FORMAT_VERSION", "StoreError", "OutputPathError", "StoreLocked",
           "StoreExists", "StoreCorrupt", "FingerprintMismatch", "MAX_NAME", "safe_name", "inside",
           "check_output_dir", "interruptible", "dumps", "loads", "frame_payload", "payload_frame", "sha256_file",
           "sha256_files", "sha256_json", "differences", "short_repr"]
