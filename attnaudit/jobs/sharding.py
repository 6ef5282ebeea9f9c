"""Sharded audits on torch.distributed: every rank computes its share of the items, rank 0 writes the report.

    torchrun --nproc-per-node 4 -m attnaudit analyze --model runs/m --data test.csv ... --out reports/m
    torchrun --nproc-per-node 4 -m attnaudit analyze ... --out reports/m --resume   # any world size

Every rank runs the same audit and so meets the same items (chunks, counterfactual test × layer, each
explainer's sanity check) in the same order; item i of the job belongs to rank `owner(i, world_size)`
(round robin, a pure function: no scheduler, nothing to agree on). A rank computes and saves only its
own items in the shared output folder's store (rank 0 through the folder's `ItemStore`, which holds the
lock and the manifest; the others through a `RankStore`: the same item files, listed in their own
ranks/rank-R.json). Then rank 0 polls the store until every item is there, rank by rank, and runs the
audit once more reading them all back, exactly as a single process resuming a finished store would, so
the report has the bytes of a single-process run. An item is computed wherever it is computed with the
same numbers because each one seeds its own generators (see `attnaudit.analyses.audit`).

Faults: a rank that dies is seen by rank 0 through its lock (an flock the kernel drops with the process)
and named, with the --resume command; a rank that makes no progress for `timeout()` seconds (a hung
collective, a stuck device) is named too; collectives run on gloo with the same timeout. Ranks whose
package, torch, model, data or settings differ are refused at start, with the differences.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT_ENV = "ATTNAUDIT_DIST_TIMEOUT"      # seconds for collectives and for a rank's next item (default 1800)
BACKEND_ENV = "ATTNAUDIT_DIST_BACKEND"      # force "gloo" or "nccl" (default: nccl with CUDA, else gloo)
DEFAULT_TIMEOUT = 1800.0
POLL = 0.2                                  # seconds between looks at the store while waiting


class RankFailed(RuntimeError):
    """A rank died, hung or refused; the message names it and says how to resume. The CLI exits with status 4."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job, as torchrun (or Slurm with the same variables) sets it."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ: Mapping[str, str] | None = None) -> Ranks:
    """RANK, WORLD_SIZE and LOCAL_RANK -> Ranks (0, 1, 0 when they are not set: a single process)."""
    env = os.environ if environ is None else environ
    try:
        rank, world, local = (int(env.get(k, default)) for k, default in
                              (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); got "
                         f"{env.get('RANK')!r}, {env.get('WORLD_SIZE')!r}, {env.get('LOCAL_RANK')!r}.") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE - 1] and WORLD_SIZE >= 1; got RANK={rank}, WORLD_SIZE={world}.")
    return Ranks(rank=rank, world_size=world, local_rank=local)


def owner(index: int, world_size: int) -> int:
    """The rank that computes item `index` of a job: round robin, index % world_size."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer; got {world_size!r}.")
    return index % world_size


def timeout() -> float:
    """Seconds a collective, or rank 0 waiting for one rank's next item, may take: $ATTNAUDIT_DIST_TIMEOUT or 1800."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds; got {text!r}.") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds; got {text!r}.")
    return value


# -- the session ----------------------------------------------------------------------------------
_CURRENT: Session | None = None


@dataclass
class Session:
    """An initialised process group: `ranks`, and `group`, the gloo group every collective here runs on."""

    ranks: Ranks
    backend: str
    group: Any


def current() -> Session | None:
    """The running sharded session, or None in a single process (WORLD_SIZE unset or 1)."""
    return _CURRENT


def is_main() -> bool:
    """True on rank 0 and in a single process: the one that writes reports and prints."""
    return _CURRENT is None or _CURRENT.ranks.is_main


@contextlib.contextmanager
def session(ranks: Ranks | None = None):
    """Join the process group for the block when WORLD_SIZE > 1 (else do nothing) -> Session | None.

    Rendezvous is torchrun's (MASTER_ADDR, MASTER_PORT: init_method "env://"); the backend is NCCL when
    CUDA is there (each rank on cuda:LOCAL_RANK) and gloo otherwise; small objects travel on a gloo group.
    Already inside a session (or a process group the caller made), the block just runs in it.
    """
    global _CURRENT
    ranks = ranks or from_env()
    if _CURRENT is not None or ranks.world_size == 1:
        yield _CURRENT
        return
    import torch
    import torch.distributed as dist
    limit = datetime.timedelta(seconds=timeout())
    owned = not dist.is_initialized()
    if owned:
        backend = os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"{BACKEND_ENV} must be gloo or nccl; got {backend!r}.")
        if backend == "nccl":
            torch.cuda.set_device(ranks.local_rank)
        try:
            dist.init_process_group(backend=backend, init_method="env://", rank=ranks.rank,
                                    world_size=ranks.world_size, timeout=limit)
        except Exception as e:
            raise RankFailed(f"rank {ranks.rank} of {ranks.world_size} could not join the job at "
                             f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} with {backend} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); start every rank "
                             "with torchrun (or set MASTER_ADDR and MASTER_PORT).") from e
    backend = dist.get_backend()
    group = dist.new_group(backend="gloo", timeout=limit) if backend != "gloo" else dist.group.WORLD
    _CURRENT = Session(ranks=ranks, backend=backend, group=group)
    try:
        yield _CURRENT
    finally:
        _CURRENT = None
    # Only a job that ended well gets here. A failed one leaves its group to the process's exit (the CLI exits at
    # once, `exit_process`): destroying it while a peer is tearing down its own sockets can make gloo abort this
    # rank (SIGABRT), and torchrun would then report that abort instead of the rank's real error and exit status.
    if owned:
        with contextlib.suppress(Exception):          # a peer already gone must not hide the job's result
            dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Exit with `code`. Inside a process group that is still up (a failed sharded job), leave at once, past
    every C++ destructor (os._exit), so gloo cannot abort this rank while the others close their sockets."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


def sharded(job: Callable) -> Callable:
    """Run `job` inside `session()`: under torchrun it joins the process group, alone it runs unchanged."""
    @functools.wraps(job)
    def run(*args, **kwargs):
        with session():
            return job(*args, **kwargs)
    return run


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, over the session's gloo group (with its timeout)."""
    import torch.distributed as dist
    s = _CURRENT
    if s is None:
        return [obj]
    out: list[Any] = [None] * s.ranks.world_size
    try:
        dist.all_gather_object(out, obj, group=s.group)
    except Exception as e:
        raise RankFailed(f"rank {s.ranks.rank}: a collective with the other ranks failed or timed out after "
                         f"{timeout():.0f} s ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); a rank "
                         f"may have died or be stuck. {resume_hint()}") from e
    return out


def agree(error: BaseException | None) -> None:
    """Raise on every rank if any rank passed an error (rank 0's own error is re-raised as it is)."""
    errors = all_gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        raise RankFailed("; ".join(f"rank {r} stopped: {e}" for r, e in bad))


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. trains a missing model); the others run it after rank 0 finished it."""
    s = _CURRENT
    if s is not None and not s.ranks.is_main:
        barrier("waiting for rank 0 to prepare the models")
    yield
    if s is not None and s.ranks.is_main:
        barrier("waiting for the other ranks")


def barrier(what: str) -> None:
    """A barrier with the session's timeout (gloo's monitored_barrier names a rank that does not arrive)."""
    import torch.distributed as dist
    s = _CURRENT
    if s is None:
        return
    try:
        dist.monitored_barrier(group=s.group, timeout=datetime.timedelta(seconds=timeout()))
    except Exception as e:
        raise RankFailed(f"rank {s.ranks.rank}: {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                         f"{resume_hint()}") from e


# -- fingerprints ---------------------------------------------------------------------------------
def environment() -> dict:
    """What besides the job's settings decides the numbers: package, torch and Python versions, device kind,
    CPU kernels and threads (results are bitwise reproducible per thread count)."""
    import torch

    from attnaudit.core.version import __version__
    return {"attnaudit": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled()}


def fingerprint_differences(fingerprints: Sequence[Any]) -> list[str]:
    """Each rank's fingerprint against rank 0's -> lines "rank R differs from rank 0 in KEY: A -> B"."""
    from attnaudit.jobs.store import differences, dumps, loads, short_repr
    first = loads(dumps(fingerprints[0]))
    return [f"rank {r} differs from rank 0 in {key}: {short_repr(a)} -> {short_repr(b)}"
            for r, fp in enumerate(fingerprints[1:], start=1) for key, a, b in differences(first, loads(dumps(fp)))]


def check_same(fingerprint: Mapping) -> None:
    """All-gather `fingerprint` (with `environment()`) and refuse, on every rank, when a rank's differs."""
    lines = fingerprint_differences(all_gather({**environment(), **fingerprint}))
    if lines:
        raise ValueError("the ranks of this job do not run the same audit, so their items could not be merged:\n  "
                         + "\n  ".join(lines[:20]) + ("\n  ..." if len(lines) > 20 else "")
                         + "\ngive every rank the same package, model, data, settings and --threads.")


def resume_hint() -> str:
    """The command that continues this job (finished items of every rank are kept; any world size)."""
    s = _CURRENT
    n = s.ranks.world_size if s else 1
    if not sys.argv or Path(sys.argv[0]).parent.name != "attnaudit":     # a script calling distributed.audit
        return ("finished items are saved; run the same script again with resume=True (any number of processes)")
    args = list(sys.argv[1:]) + ([] if "--resume" in sys.argv else ["--resume"])
    return (f"finished items are saved; continue with: torchrun --nproc-per-node {n} -m attnaudit "
            f"{' '.join(shlex.quote(a) for a in args)} (any number of processes)")


# -- waiting for the other ranks' items -----------------------------------------------------------
def wait_for(store, item: str, rank: int, *, limit: float | None = None, poll: float = POLL) -> None:
    """Poll `store` (rank 0's ItemStore) until `item`, owned by `rank`, is saved (done or failed).

    Raises RankFailed when that rank is gone without it (its lock is free and it did not finish) or when it
    saved nothing new for `limit` seconds (default `timeout()`).
    """
    limit = timeout() if limit is None else limit
    seen, since = -1, time.monotonic()
    while True:
        states = store.collect()
        if store.done(item) or store.saved_now(item):   # done earlier, or saved (done or failed) in this job
            return
        state = states.get(rank, {})
        if state.get("n_items", 0) != seen:
            seen, since = state.get("n_items", 0), time.monotonic()
        if state.get("finished"):
            raise RankFailed(f"rank {rank} finished without saving item {item!r} (do all ranks run the same "
                             f"version?). {resume_hint()}")
        if state.get("started") and not state.get("alive"):
            raise RankFailed(f"rank {rank} stopped (killed or crashed) before saving item {item!r}. {resume_hint()}")
        if time.monotonic() - since > limit:
            raise RankFailed(f"rank {rank} saved no item for {limit:.0f} s (waiting for {item!r}; "
                             f"{TIMEOUT_ENV} sets this limit): it may be stuck. {resume_hint()}")
        time.sleep(poll)


def dead_ranks(store) -> list[int]:
    """Ranks that started writing into `store` and are gone without finishing (rank 0's view)."""
    with contextlib.suppress(Exception):
        return sorted(r for r, s in store.collect().items() if s.get("started") and not s.get("alive")
                      and not s.get("finished"))
    return []


__all__ = ["TIMEOUT_ENV", "BACKEND_ENV", "DEFAULT_TIMEOUT", "POLL", "RankFailed", "Ranks", "from_env", "owner",
           "timeout", "Session", "current", "is_main", "session", "sharded", "all_gather", "agree", "main_first",
           "barrier", "environment", "fingerprint_differences", "check_same", "resume_hint", "wait_for", "dead_ranks"]
