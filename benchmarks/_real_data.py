"""What the three real-data report scripts share: where the data is, reusing a trained model, timing.

The package never reads ../shared; these scripts do, and stop with one clear line when it is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from attnaudit.jobs import analyze_job
from attnaudit.model.checkpoint import read_config
from attnaudit.model.run_folder import file_sha256

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def _relative(path: Path) -> Path:
    """path relative to the repository root (the scripts run there), so reports carry no machine's paths."""
    return Path(os.path.relpath(path.resolve(), ROOT))


def arguments(doc: str, *, report: str, model: str, threads: int = 1) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / report, help="report folder")
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / model, help="model folder (reused when it "
                        "holds this exact training run)")
    parser.add_argument("--retrain", action="store_true", help="train again even when --model holds this run")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted audit in --out (finished "
                        "items are kept; the report is not overwritten otherwise)")
    parser.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default {threads})")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    args.data, args.out, args.model = (_relative(p) for p in (args.data, args.out, args.model))
    os.chdir(ROOT)
    if not args.data.is_dir():
        sys.exit(f"error: the data folder {args.data} does not exist; pass --data (it holds sst2/, eraser_movies/).")
    torch.set_num_threads(args.threads)
    return args


def trained_here(folder: Path, settings: dict, files: dict[str, Path]) -> dict | None:
    """metrics.json of `folder` when it holds a model trained with `settings` on exactly `files`, else None.

    files: provenance key ("sha256", "valid_sha256", "test_sha256") -> the file whose contents must match.
    """
    if not (folder / "metrics.json").is_file() or not (folder / "config.json").is_file():
        return None
    training = read_config(folder).get("training", {})
    data = training.get("data") or {}
    if training.get("settings") != settings or any(data.get(k) != file_sha256(p) for k, p in files.items()):
        return None
    return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))


class Stopwatch:
    """Named wall-clock stages, printed as they finish and at the end."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def stage(self, name: str, seconds: float | None = None) -> None:
        self.stages[name] = seconds if seconds is not None else time.perf_counter() - self._last()
        print(f"[{name}] {self.stages[name]:.1f} s", flush=True)

    def _last(self) -> float:
        return self.start + sum(self.stages.values())

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in self.stages.items())
        return f"total {total / 60:.1f} min ({parts}; {torch.get_num_threads()} torch thread(s))"


def audit_and_report(args: argparse.Namespace, clock: Stopwatch, *, data: Path, config: Path, name: str, title: str,
                     **columns) -> Path:
    """`attnaudit analyze` of args.model on `data` with the script's TOML into args.out; prints the times."""
    path = analyze_job(args.model, args.out, data=data, config=config, device=args.device, name=name, title=title,
                       resume=args.resume, overwrite=not args.resume, **columns)
    clock.stage("audit")
    print(f"report written to {path / 'index.html'}; {clock.summary()}")
    return path
