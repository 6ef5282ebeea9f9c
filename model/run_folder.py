"""The folder `attnaudit train` writes, and what it records about where its data came from.

A model folder holds model.safetensors + config.json (`save_checkpoint`), metrics.json and
train_log.csv. Its identity is the task, the settings (seed included) and the data files' contents
(sha256), not their paths: retraining the identical run into its own folder is allowed, anything else
that is already there is refused unless the caller asks to overwrite.

    train, valid, names, info = table_splits("reviews.csv", text_col="text", label_col="label")
    check_out_dir("runs/reviews", run_identity(task_info, training))   # raises if it holds something else
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from attnaudit.core.io import file_sha256
from attnaudit.model.checkpoint import CONFIG, FORMAT, read_config

METRICS, TRAIN_LOG = "metrics.json", "train_log.csv"
HOLDOUT = 0.1   # fraction of a data file held out for validation when no valid file is given


def labelled_splits(data, *, text_col: str | None = None, label_col: str | None = None, valid=None, test=None,
                    seed: int = 0) -> dict:
    """Train, valid and test Examples from labelled files -> {"train", "valid", "test", "label_names", "info"}.

    Each file may be a table (text_col, label_col), an ERASER annotation file or a HateXplain file
    (`attnaudit.data.read_labelled`). Without `valid`, a seeded random HOLDOUT (10%) of `data` is
    held out for validation; without `test`, "test" is None. `info` records paths, sha256s and formats.
    """
    from attnaudit.data import read_labelled  # the readers import pandas on use; keep this module light

    first = read_labelled(data, text_col=text_col, label_col=label_col)
    examples, label_names = first.examples, first.label_names
    info = {"path": str(Path(data).resolve()), "sha256": file_sha256(data), "format": first.info["format"],
            "text_col": text_col, "label_col": label_col, "valid_path": None, "valid_sha256": None,
            "holdout_fraction": None, "test_path": None, "test_sha256": None}
    out = {"train": examples, "valid": None, "test": None, "label_names": label_names, "info": info}
    for name, path in (("valid", valid), ("test", test)):
        if path is not None:
            split = read_labelled(path, text_col=text_col, label_col=label_col, label_names=label_names)
            out[name] = split.examples
            info.update({f"{name}_path": str(Path(path).resolve()), f"{name}_sha256": file_sha256(path)})
    if valid is None:
        if len(examples) < 2:
            raise ValueError(f"{data} has {len(examples)} row; holding out a validation split needs at least 2 "
                             "(or pass a separate valid file).")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        n_valid = max(1, round(HOLDOUT * len(examples)))
        info["holdout_fraction"] = HOLDOUT
        out["train"] = [examples[i] for i in sorted(order[n_valid:])]
        out["valid"] = [examples[i] for i in sorted(order[:n_valid])]
    return out


def table_splits(data, *, text_col: str, label_col: str, valid=None, seed: int = 0):
    """(train, valid, label_names, info) of `labelled_splits` without a test file."""
    s = labelled_splits(data, text_col=text_col, label_col=label_col, valid=valid, seed=seed)
    return s["train"], s["valid"], s["label_names"], s["info"]


def run_identity(task: dict, training: dict) -> dict:
    """What makes two runs the same model: task, settings (seed included) and data contents, not paths."""
    data = training.get("data") or {}
    return json.loads(json.dumps({
        "task": {k: task.get(k) for k in ("name", "kind", "source")},
        "settings": training.get("settings"),
        "data": {k: data.get(k) for k in ("sha256", "valid_sha256", "text_col", "label_col", "holdout_fraction")
                 + (("test_sha256",) if data.get("test_sha256") else ())},
    }))


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]} {old!r} there, {new!r} now"]


def check_out_dir(out_dir, identity: dict, *, overwrite: bool = False) -> None:
    """Refuse a folder that holds another model or other files (unless overwrite); the same run may retrain."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file; pass a folder (new, empty, or holding this same model).")
    present = sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp")) if out.is_dir() else []
    if not present or overwrite:
        return
    how = "pass --overwrite (overwrite=True) to replace it, or choose another output folder"
    if CONFIG not in present:
        raise ValueError(f"out {str(out)!r} is not empty ({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}) "
                         f"and holds no attnaudit model; {how}.")
    try:
        cfg = read_config(out)
    except ValueError as e:
        raise ValueError(f"out {str(out)!r} holds a config.json that is not an attnaudit model's ({e}); {how}.") from e
    if cfg.get("format") != FORMAT or not isinstance(cfg.get("task"), dict) or not isinstance(cfg.get("training"), dict):
        raise ValueError(f"out {str(out)!r} holds a config.json that was not written by `attnaudit train`; {how}.")
    diffs = _differences(run_identity(cfg["task"], cfg["training"]), identity)
    if diffs:
        raise ValueError(f"out {str(out)!r} already holds a different model ({'; '.join(diffs[:3])}"
                         f"{'; ...' if len(diffs) > 3 else ''}); {how}.")
