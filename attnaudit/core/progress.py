"""Progress a person can read: a tqdm bar at a terminal or in Jupyter, plain lines in a log, or nothing.

    with progress_bar(512, desc="audit keywords: explain", unit="examples", enabled=True) as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))

`enabled`: True shows progress wherever stderr goes; None ("when interactive") only when stderr is a
terminal or the code runs in a Jupyter/IPython kernel; False is silent. At a terminal or in a notebook
the bar is `tqdm.auto` (a widget in Jupyter) with counts, rate and ETA. When stderr is not a terminal
(CI, nohup, a log file) tqdm's carriage returns would pile up into one unreadable line, so instead a
plain line goes to stderr at the start, every `every_s` seconds or `every_fraction` of the total
(but not twice within a second), and at the end; while one step takes long (a chunk of examples
under 15 explainers can take minutes), a background heartbeat adds a line every `heartbeat_s`:

    audit keywords: explain 128/512 examples (25%), 3.1 examples/s, ETA 2m04s
    audit keywords: explain 128/512 examples (25%), 2.1 examples/s, ETA 3m01s, 1m00s since the last update

This module lives in `attnaudit.model`, the lowest layer, so training, the explainers and the analyses
can all use it.
"""
from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TextIO


def in_notebook() -> bool:
    """True inside a Jupyter (or other IPython kernel) session, where tqdm.auto draws a widget."""
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:                            # an IPython too old or half imported: not a kernel
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):         # no isatty, or a closed stream
        return False


def interactive(stream: TextIO | None = None) -> bool:
    """Is someone watching? stderr (or `stream`) is a terminal, or we run in a notebook."""
    return _isatty(stream if stream is not None else sys.stderr) or in_notebook()


def progress_bar(total: int, *, desc: str, unit: str = "examples", enabled: bool | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 every_s: float = 10.0, every_fraction: float = 0.05, heartbeat_s: float | None = 60.0):
    """A progress bar over `total` units -> an object with update(n), set_description(s), set_postfix(**kw), close().

    Args:
        total: how many units (examples, steps) the work has.
        desc: what is being done, e.g. "train keywords" or "audit needle: counterfactual".
        enabled: True: always report; None: only when `interactive()`; False: silent.
        stream: where to write (default: sys.stderr at the time of the call).
        clock, every_s, every_fraction: when the plain (non-terminal) form prints a line.
        heartbeat_s: the plain form also prints when no update came for this long (None: never).
    """
    stream = stream if stream is not None else sys.stderr
    if enabled is False or (enabled is None and not interactive(stream)):
        return NoBar()
    if _isatty(stream) or in_notebook():
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=f" {unit}" if len(unit) > 3 else unit, leave=False, file=stream,
                    dynamic_ncols=True)
    return LineProgress(total, desc=desc, unit=unit, stream=stream, clock=clock, every_s=every_s,
                        every_fraction=every_fraction, heartbeat_s=heartbeat_s)


class NoBar:
    """The silent bar: every method does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LineProgress(NoBar):
    """Plain progress lines for a log: one every `every_s` seconds or `every_fraction` of the total, and at the end."""

    def __init__(self, total: int, *, desc: str, unit: str, stream: TextIO, clock: Callable[[], float],
                 every_s: float = 10.0, every_fraction: float = 0.05, heartbeat_s: float | None = None):
        self.total, self.desc, self.unit, self.stream, self.clock = max(int(total), 0), desc, unit, stream, clock
        self.every_s, self.every_fraction = every_s, every_fraction
        self.n, self.postfix, self.printed_postfix, self.closed = 0, "", "", False
        self.start = self.last_time = self.last_update = clock()
        self.last_n = 0
        self._stop = threading.Event()
        self._print()                            # the log shows what started, before the first unit is done
        if heartbeat_s:
            _heartbeat(self, heartbeat_s)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.last_update = self.clock()
        step = max(1, int(self.total * self.every_fraction)) if self.total else 1
        since = now - self.last_time
        if (since >= self.every_s or (self.n - self.last_n >= step and since >= 1.0)
                or (self.total and self.n >= self.total)):
            self._print(now)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and (self.n != self.last_n or self.postfix != self.printed_postfix):
            self._print()                        # the last count (a loop that stopped early), or the last postfix
        self.closed = True
        self._stop.set()

    def line(self, now: float | None = None) -> str:
        """e.g. "train keywords 1200/4000 steps (30%), 41.3 steps/s, ETA 1m08s, epoch 2"."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 0.0)
        share = f" ({100 * self.n // self.total}%)" if self.total else ""
        parts = [f"{self.desc} {self.n}/{self.total} {self.unit}{share}"]
        if self.n and elapsed > 0:
            rate = self.n / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s per {self.unit.rstrip('s')}")
            if self.total and self.n < self.total:
                parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
            else:
                parts.append(f"took {format_seconds(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _print(self, now: float | None = None, note: str = "") -> None:
        now = self.clock() if now is None else now
        try:
            print(self.line(now) + note, file=self.stream, flush=True)
        except (OSError, ValueError):            # a closed or broken log stream must not stop the work
            pass
        self.last_time, self.last_n, self.printed_postfix = now, self.n, self.postfix


def _heartbeat(bar: LineProgress, period: float) -> None:
    """A daemon thread printing `bar`'s line when nothing was printed for `period` seconds; it ends with the
    bar (closed, or garbage-collected after an exception left it open)."""
    ref, stop = weakref.ref(bar), bar._stop

    def beat():
        while not stop.wait(period):
            b = ref()
            if b is None or b.closed:
                return
            now = b.clock()
            if now - b.last_time >= period:
                b._print(now, note=f", {format_seconds(now - b.last_update)} since the last update")
            del b

    threading.Thread(target=beat, name="attnaudit-progress", daemon=True).start()


def format_seconds(seconds: float) -> str:
    """12 -> "12s", 124 -> "2m04s", 3725 -> "1h02m"."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
