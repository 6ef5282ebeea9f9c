"""Lock files that name their holder, flocked while held (the kernel drops an flock when its holder dies), and
SIGTERM made a KeyboardInterrupt, so a killed job releases its folder.

    fd = take_lock(folder / ".attnaudit" / "lock", folder)     # StoreLocked while a live process holds it
    release_lock(fd, folder / ".attnaudit" / "lock")
    with interruptible():                                      # SIGTERM raises KeyboardInterrupt inside
        ...
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

from attnaudit.jobs.paths import StoreError

try:
    import fcntl  # the kernel drops an flock when its holder dies
except ImportError:                                   # pragma: no cover - not on Windows
    fcntl = None


class StoreLocked(StoreError): """Another live process holds the folder's lock."""


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


def lock_holder(path: Path) -> dict | None:
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


def held_elsewhere(path: Path) -> bool:
    """Does lock file `path` name another host? Its flock then proves nothing (a shared file system may keep
    flocks per machine), so such a rank counts as alive; torchrun or the wait's timeout see it die."""
    try:
        info = json.loads(path.read_bytes() or b"{}")
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("host", socket.gethostname()) != socket.gethostname()


def take_lock(path: Path, folder: Path) -> int:
    """O_CREAT|O_EXCL lock file `path` naming its holder, flocked while held (a dead holder's flock is gone)
    -> its open fd; StoreLocked (naming `folder`) while a live process holds it."""
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
                    f"{str(folder)!r} is in use by pid {info.get('pid', '?')} on host "
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
        return fd
    raise StoreLocked(f"could not take the lock {str(path)!r}; other processes keep changing it.")


def release_lock(fd: int, path: Path) -> None:
    """Remove lock file `path` if it is still the one `fd` holds, then close `fd` (which drops the flock)."""
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink()
    os.close(fd)
