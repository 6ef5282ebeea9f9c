"""The jobs' models: one folder per task and settings under runs/, trained once and reused, and their model cards.

    folder = model_folder(Path("runs"), "keywords", settings)     # runs/keywords for the default settings
    model, metrics, seconds = trained_model("keywords", settings, folder, device="cpu", progress=False, echo=print)
    card = model_card(model, folder, metrics, train_seconds=seconds, device="cpu")
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from attnaudit.jobs.store import sha256_file, sha256_json
from attnaudit.model.checkpoint import load_model, read_config
from attnaudit.model.train import TrainSettings, defaults_for, resolve_device, train_to_folder

if TYPE_CHECKING:
    from attnaudit.model.hf import HFClassifier
    from attnaudit.model.interface import TextClassifier
    from attnaudit.model.seq2seq import Translator


def model_folder(runs: Path, task: str, settings: TrainSettings) -> Path:
    """runs/TASK for the default settings, runs/TASK-<hash of the settings> otherwise (never a clash)."""
    same = settings.to_dict() == defaults_for(task).to_dict()
    return runs / (task if same else f"{task}-{sha256_json(settings.to_dict())[:10]}")


def trained_model(task: str, settings: TrainSettings, folder: Path, *, device: str, progress: bool,
                  echo: Callable[[str], None]) -> tuple[object, dict, float | None]:
    """Reuse folder's model when it was trained on this task with these settings, else train it there.

    -> (model, metrics, training seconds or None when reused)."""
    if (folder / "metrics.json").is_file() and (folder / "config.json").is_file():
        cfg = read_config(folder)
        if cfg.get("training", {}).get("settings") == settings.to_dict() and cfg.get("task", {}).get("name") == task:
            echo(f"{task}: reusing the model in {folder}")
            metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
            return load_model(folder, device=resolve_device(device)), metrics, None
    echo(f"{task}: training the default model into {folder}")
    start = time.perf_counter()
    path, metrics = train_to_folder(folder, task=task, settings=settings, device=device, progress=progress)
    return load_model(path, device=resolve_device(device)), metrics, time.perf_counter() - start


def model_card(model: TextClassifier | Translator | HFClassifier, folder: Path, metrics: Mapping, *, train_seconds: float | None, device) -> dict:
    """Architecture, training data and metrics, seed, device, checkpoint hash -> a JSON-able dict."""
    if getattr(model, "config", {}).get("format") == "huggingface":
        return _hf_card(model, folder, metrics, device=device)
    cfg = read_config(folder)
    arch = cfg.get("architecture", {})
    training = cfg.get("training", {})
    n_params = sum(p.numel() for p in model.net.parameters()) if hasattr(model, "net") else None
    keep = ("test_accuracy", "valid_accuracy", "test_exact_match", "test_bleu", "valid_exact_match", "best_epoch",
            "epochs_run", "train_seconds", "n_train", "test_set")
    return {
        "task": cfg.get("task", {}).get("name"), "data": cfg.get("task", {}).get("description") or cfg.get("task", {}).get("name"),
        "architecture": {"kind": cfg.get("kind"), "n_layers": model.n_layers, "n_heads": model.n_heads,
                         **{k: arch[k] for k in ("d_model", "d_ff", "norm", "pooling", "max_len", "vocab_size") if k in arch},
                         "parameters": n_params},
        "training": {**{k: metrics[k] for k in keep if k in metrics},
                     "stage_seconds": round(train_seconds, 2) if train_seconds is not None else "reused"},
        "seed": training.get("seed"), "label_names": list(getattr(model, "label_names", ())), "device": str(device),
        "checkpoint": {"folder": str(folder), "sha256": sha256_file(folder / "model.safetensors")},
    }


def _hf_card(model: HFClassifier, folder: Path, metrics: Mapping, *, device) -> dict:
    """model_card for a HuggingFace folder: its config.json, and metrics.json when attnaudit finetune wrote it."""
    hf = model.hf_config
    keep = ("test_accuracy", "valid_accuracy", "best_epoch", "epochs_run", "train_seconds", "n_train", "test_set")
    return {
        "task": None, "data": None,
        "architecture": {"kind": getattr(model, "kind", "classifier"), "model_type": hf.model_type, "class": model.config["architecture"],
                         "n_layers": model.n_layers, "n_heads": model.n_heads, "d_model": int(hf.hidden_size),
                         "d_ff": getattr(hf, "intermediate_size", None) or getattr(hf, "hidden_dim", None),
                         "max_len": model.max_len, "vocab_size": model.vocab_size,
                         "parameters": sum(p.numel() for p in model.net.parameters())},
        "training": {**{k: metrics[k] for k in keep if k in metrics}, "head": model.config.get("head"),
                     "stage_seconds": "reused"},
        "seed": metrics.get("seed"), "label_names": list(model.label_names), "device": str(device),
        "checkpoint": {"folder": str(folder), "sha256": sha256_file(folder / "model.safetensors")},
    }
