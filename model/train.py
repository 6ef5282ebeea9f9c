"""Training the lecture's Transformer on Examples, a built-in task, or a labelled file into a model folder.

    settings = defaults_for("needle")
    model, metrics = train_task("needle", settings, progress=False)
    metrics["test_accuracy"]                      # accuracy of the best-validation epoch's weights
    path, metrics = train_to_folder("runs/needle", task="needle")   # what `attnaudit train` calls

The vocabulary comes from the training texts only; the model starts as its constructor builds it
(Glorot-uniform, `transformer.init_weights`); the weights of the epoch with the best validation
accuracy (classification) or exact match (seq2seq), ties going to the lower validation loss, are kept.
On CPU the same seed gives bitwise identical weights (for the same number of torch threads):
initialisation and dropout draw from `torch.manual_seed(seed)`, shuffling from its own seeded
`torch.Generator`. The pieces live beside this file: `settings` (TrainSettings, defaults_for,
resolve_device), `fit` (the Adam + Noam loop), `evaluate` (accuracy, exact match, BLEU) and
`run_folder` (what a model folder holds and when it may be written); their names are re-exported here.
The decoder-only LM tasks (kind "lm": recall, copy) train through `train_lm` (model/train_lm.py): the
same `fit` loop, loss on the target tokens only; `train_task` and `train_to_folder` dispatch to it.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from attnaudit.core.io import atomic_write_text, file_sha256
from attnaudit.data.examples import Example
from attnaudit.data.tasks import TASK_NAMES, get_task, make_examples
from attnaudit.model.checkpoint import save_checkpoint
from attnaudit.model.evaluate import evaluate_classifier, evaluate_translator, pair_loss
from attnaudit.model.fit import LOG_COLUMNS, classification_step_loss, fit, log_csv
from attnaudit.model.interface import TextClassifier
from attnaudit.model.lm import LanguageModel
from attnaudit.model.run_folder import (
    HOLDOUT,
    METRICS,
    TRAIN_LOG,
    check_out_dir,
    labelled_splits,
    run_identity,
    table_splits,
)
from attnaudit.model.seq2seq import PairBatch, Translator
from attnaudit.model.settings import DEVICES, TrainSettings, defaults_for, resolve_device
from attnaudit.model.train_lm import evaluate_lm, train_lm
from attnaudit.model.transformer import TransformerClassifier, TransformerSeq2Seq, init_weights
from attnaudit.model.vocab import Vocab, words

__all__ = [
    "TrainSettings", "defaults_for", "resolve_device", "DEVICES",
    "train_classifier", "train_seq2seq", "train_task", "task_examples", "train_to_folder",
    "evaluate_classifier", "evaluate_translator", "fit", "log_csv", "LOG_COLUMNS", "init_weights",
    "check_out_dir", "labelled_splits", "table_splits", "file_sha256", "run_identity", "METRICS", "TRAIN_LOG", "HOLDOUT",
    "train_lm", "evaluate_lm",
]
_identity = run_identity   # the name tests and older callers import


def _finish(result: dict, log_path, extra: dict) -> dict:
    """Metrics from a `fit` result (the log goes to `log_path`, not into the metrics)."""
    log = result.pop("log")
    if log_path is not None:
        atomic_write_text(log_path, log_csv(log))
    return {**extra, **result}


def _check_splits(train, valid, test, check_example) -> None:
    """Every split is non-empty and each Example passes `check_example(split name, example)`."""
    for name, split in (("train", train), ("valid", valid)) + ((("test", test),) if test is not None else ()):
        if len(split) == 0:
            raise ValueError(f"{name} must hold at least one Example; got an empty list.")
        for e in split:
            check_example(name, e)


# -- classification ------------------------------------------------------------------------------
def train_classifier(
    train: Sequence[Example], valid: Sequence[Example], test: Sequence[Example] | None = None, *,
    label_names: Sequence[str], settings: TrainSettings | None = None, device: str = "auto",
    progress: bool | None = None, log_path=None, progress_label: str = "train classifier",
) -> tuple[TextClassifier, dict]:
    """Train a TransformerClassifier; returns the best-validation model (eval mode, on `device`) and metrics.

    Args:
        train, valid, test: Examples with `label` set (class indices into `label_names`); test may be None.
        settings: sizes and optimisation; None uses `defaults_for(None)`.
        log_path: where to write the per-step CSV log (step, epoch, lr, loss), or None.
        progress: True: a bar counting steps (plain lines in a log), None: at a terminal or in Jupyter only,
            False: none. progress_label: what the bar says.
    Returns:
        (model, metrics): metrics hold valid_accuracy, test_accuracy (when test is given), best_epoch,
        epochs_run, steps, train_seconds, n_train, n_valid, n_test, n_params, vocab_size, n_truncated.
    """
    settings = settings or defaults_for(None)
    dev = resolve_device(device)
    if len(label_names) < 2:
        raise ValueError(f"label_names must hold at least two classes; got {list(label_names)}.")

    def labelled(name: str, e: Example) -> None:
        if e.label is None or not 0 <= e.label < len(label_names):
            raise ValueError(f"{name}: Example {e.id!r} has label {e.label!r}; every example needs a class "
                             f"index in [0, {len(label_names) - 1}] (one per label name).")

    _check_splits(train, valid, test, labelled)
    vocab = Vocab.build((e.text for e in train), min_freq=settings.min_freq, max_size=settings.max_vocab)
    torch.manual_seed(settings.seed)                                           # initialisation and dropout
    cfg = settings.architecture(vocab_size=len(vocab), n_classes=len(label_names), pad_id=vocab.pad_id)
    model = TextClassifier(TransformerClassifier(cfg), vocab, label_names=label_names).to(dev)
    tr, va = model.encode(list(train), truncate=True), model.encode(list(valid), truncate=True)
    te = model.encode(list(test), truncate=True) if test is not None else None
    assert tr.labels is not None                                               # `labelled` checked every Example
    ids, mask, labels = tr.input_ids.to(dev), tr.attention_mask.to(dev), tr.labels.to(dev)

    step_loss = classification_step_loss(model.net, ids, mask, labels, label_smoothing=settings.label_smoothing)

    def evaluate() -> tuple[float, float]:
        scores = evaluate_classifier(model, va)
        return scores["accuracy"], scores["loss"]

    result = fit(model.net, len(train), step_loss, evaluate, settings, dev, progress=progress,
                 desc=progress_label)
    metrics: dict[str, Any] = {"kind": "classification"}
    for name, split in (("valid", va), ("test", te)):
        if split is not None:
            scores = evaluate_classifier(model, split)
            metrics.update({f"{name}_accuracy": scores["accuracy"], f"{name}_loss": float(f"{scores['loss']:.4g}")})
    truncated = sum(sum(b.truncated or ()) for b in (tr, va, te) if b is not None)
    metrics.update(n_train=len(train), n_valid=len(valid), n_test=len(test) if test is not None else 0,
                   n_params=sum(p.numel() for p in model.net.parameters()), vocab_size=len(vocab),
                   n_truncated=truncated, device=str(dev))
    return model, _finish(result, log_path, metrics)


# -- sequence to sequence ------------------------------------------------------------------------
def train_seq2seq(
    train: Sequence[Example], valid: Sequence[Example], test: Sequence[Example] | None = None, *,
    settings: TrainSettings | None = None, device: str = "auto", progress: bool | None = None, log_path=None,
    progress_label: str = "train seq2seq",
) -> tuple[Translator, dict]:
    """Train a TransformerSeq2Seq with teacher forcing; keeps the epoch with the best valid exact match
    (ties: lower teacher-forced valid loss).

    Args:
        train, valid, test: Examples with `target` set; source and target vocabularies come from train.
    Returns:
        (translator, metrics): valid_exact_match, valid_bleu, test_exact_match, test_bleu (with test),
        best_epoch, epochs_run, steps, train_seconds, n_train, n_valid, n_test, n_params.
    """
    settings = settings or defaults_for(None)
    dev = resolve_device(device)

    def with_target(name: str, e: Example) -> None:
        if e.target is None or not words(e.target):
            raise ValueError(f"{name}: Example {e.id!r} has no target text; seq2seq training needs one.")
        if len(words(e.target)) + 1 > settings.max_len:
            raise ValueError(f"{name}: Example {e.id!r} has a {len(words(e.target))}-word target but "
                             f"max_len={settings.max_len} allows {settings.max_len - 1}; raise max_len.")

    _check_splits(train, valid, test, with_target)
    src_vocab = Vocab.build((e.text for e in train), min_freq=settings.min_freq, max_size=settings.max_vocab)
    tgt_vocab = Vocab.build((e.target for e in train if e.target is not None), min_freq=settings.min_freq, max_size=settings.max_vocab)
    torch.manual_seed(settings.seed)                                           # initialisation and dropout
    cfg = settings.architecture(vocab_size=len(src_vocab), tgt_vocab_size=len(tgt_vocab), pad_id=src_vocab.pad_id)
    model = Translator(TransformerSeq2Seq(cfg), src_vocab, tgt_vocab).to(dev)
    pairs = model.encode(list(train), truncate=True)
    pairs = PairBatch(pairs.src.to(dev), *(t.to(dev) for t in pairs.targets()))

    step_loss = partial(pair_loss, model.net, pairs, pad_id=tgt_vocab.pad_id, label_smoothing=settings.label_smoothing)

    def evaluate() -> tuple[float, float]:
        scores = evaluate_translator(model, valid)
        return scores["exact_match"], scores["loss"]

    result = fit(model.net, len(train), step_loss, evaluate, settings, dev, progress=progress, desc=progress_label)
    metrics: dict[str, Any] = {"kind": "seq2seq"}
    for name, split in (("valid", valid), ("test", test)):
        if split is not None:
            scores = evaluate_translator(model, split)
            metrics.update({f"{name}_exact_match": scores["exact_match"], f"{name}_bleu": round(scores["bleu"], 3),
                            f"{name}_loss": float(f"{scores['loss']:.4g}")})
    metrics.update(n_train=len(train), n_valid=len(valid), n_test=len(test) if test is not None else 0,
                   n_params=sum(p.numel() for p in model.net.parameters()),
                   vocab_size=len(src_vocab), tgt_vocab_size=len(tgt_vocab),
                   n_truncated=sum(pairs.src.truncated or ()), device=str(dev))
    return model, _finish(result, log_path, metrics)


# -- built-in tasks ------------------------------------------------------------------------------
def task_examples(task: str, settings: TrainSettings) -> dict[str, list[Example]]:
    """The train/valid/test Examples of a built-in task at the settings' sizes and seed."""
    sizes = {"train": settings.n_train, "valid": settings.n_valid, "test": settings.n_test}
    return {split: make_examples(task, split, n=n, seed=settings.seed) for split, n in sizes.items()}


def train_task(task: str, settings: TrainSettings | None = None, *, device: str = "auto",
               progress: bool | None = None, log_path=None) -> tuple[TextClassifier | Translator | LanguageModel, dict]:
    """Generate a built-in task's splits and train the matching model on them -> (model, metrics)."""
    spec = get_task(task)
    settings = settings or defaults_for(task)
    data = task_examples(task, settings)
    if spec.kind == "lm":
        return train_lm(data["train"], data["valid"], data["test"], settings=settings, device=device,
                        progress=progress, log_path=log_path, progress_label=f"train {task}")
    if spec.kind == "seq2seq":
        return train_seq2seq(data["train"], data["valid"], data["test"], settings=settings, device=device,
                             progress=progress, log_path=log_path, progress_label=f"train {task}")
    return train_classifier(data["train"], data["valid"], data["test"], label_names=spec.label_names,
                            settings=settings, device=device, progress=progress, log_path=log_path,
                            progress_label=f"train {task}")


# -- a model folder ------------------------------------------------------------------------------
def _parallel_splits(path, valid, test, *, seed: int) -> tuple[dict, dict]:
    """Sentence pairs for training an encoder-decoder: the file's, a held-out 10% (or `valid`), and `test`."""
    from attnaudit.data.parallel import read_parallel

    pairs = read_parallel(path)
    if valid is None:
        if len(pairs) < 10:
            raise ValueError(f"{path}: {len(pairs)} sentence pairs are too few to hold out a validation tenth; give "
                             "at least 10 pairs, or a --valid file.")
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        cut = max(1, round(HOLDOUT * len(pairs)))
        held = set(order[:cut])
        train = [p for i, p in enumerate(pairs) if i not in held]
        held_out = [p for i, p in enumerate(pairs) if i in held]
    else:
        train, held_out = pairs, read_parallel(valid)
    tested = read_parallel(test) if test is not None else None
    info = {"path": str(Path(path)), "sha256": file_sha256(Path(path)), "format": "parallel",
            "valid_sha256": file_sha256(Path(valid)) if valid is not None else None,
            "test_sha256": file_sha256(Path(test)) if test is not None else None}
    return {"train": train, "valid": held_out, "test": tested}, info



def train_to_folder(
    out_dir, *, task: str | None = None, data=None, text_col: str | None = None, label_col: str | None = None,
    valid=None, test=None, settings: TrainSettings | None = None, device: str = "auto", overwrite: bool = False,
    progress: bool | None = None, parallel=None,
) -> tuple[Path, dict]:
    """Train on a built-in task, a labelled file or parallel text and write a model folder -> (folder, metrics).

    parallel: `source ||| target` lines (`attnaudit.data.read_parallel`): the built-in encoder-decoder is trained
    on them; `valid` / `test` are files of the same format (default valid: a seeded 10% held out).

    The folder gets model.safetensors + config.json (with `task` and `training` provenance: settings,
    seed, device, example counts, data file and its sha256), metrics.json and train_log.csv, each
    written atomically. A folder holding a different model, or other files, is refused unless
    `overwrite`; retraining the identical configuration into its own folder is allowed.

    >>> path, metrics = train_to_folder("runs/needle", task="needle")
    """
    given = [n for n, v in (("task", task), ("data", data), ("parallel", parallel)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of task (a built-in task: {', '.join(TASK_NAMES)}), data (a labelled "
                         f"file) or parallel ('source ||| target' lines); got {' and '.join(given) or 'neither'}.")
    dev = resolve_device(device)
    settings = settings or defaults_for("reorder" if parallel is not None else task)
    if parallel is not None:
        splits, data_info = _parallel_splits(parallel, valid, test, seed=settings.seed)
        task_info = {"name": Path(parallel).name, "kind": "seq2seq", "label_names": [], "source": "file"}
        data = parallel
    elif task is not None:
        spec = get_task(task)
        splits = task_examples(task, settings)
        task_info = {"name": spec.name, "kind": spec.kind, "label_names": list(spec.label_names),
                     "source": "built-in", "description": spec.description}
        data_info = None
    else:
        loaded = labelled_splits(data, text_col=text_col, label_col=label_col, valid=valid, test=test,
                                 seed=settings.seed)
        splits, data_info = {k: loaded[k] for k in ("train", "valid", "test")}, loaded["info"]
        task_info = {"name": Path(data).name, "kind": "classification", "label_names": list(loaded["label_names"]),
                     "source": "file"}
    training = {"settings": settings.to_dict(), "seed": settings.seed, "device": str(dev),
                "n_train": len(splits["train"]), "n_valid": len(splits["valid"]),
                "n_test": len(splits["test"] or ()), "data": data_info, "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    out = Path(out_dir)
    check_out_dir(out, run_identity(task_info, training), overwrite=overwrite)   # before minutes of training
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / TRAIN_LOG
    model: TextClassifier | Translator | LanguageModel
    if task_info["kind"] == "lm":
        model, metrics = train_lm(splits["train"], splits["valid"], splits["test"], settings=settings,
                                  device=str(dev), progress=progress, log_path=log_path,
                                  progress_label=f"train {task_info['name']}")
    elif task_info["kind"] == "seq2seq":
        model, metrics = train_seq2seq(splits["train"], splits["valid"], splits["test"], settings=settings,
                                       device=str(dev), progress=progress, log_path=log_path,
                                       progress_label=f"train {task_info['name']}")
    else:
        model, metrics = train_classifier(splits["train"], splits["valid"], splits["test"],
                                          label_names=task_info["label_names"], settings=settings,
                                          device=str(dev), progress=progress, log_path=log_path,
                                          progress_label=f"train {task_info['name']}")
    if splits["test"] is None:
        score = "exact_match" if task_info["kind"] == "seq2seq" else "accuracy"
        metrics[f"test_{score}"] = metrics[f"valid_{score}"]
        if score == "exact_match":
            metrics["test_bleu"] = metrics["valid_bleu"]
        metrics["test_set"] = (f"none: test_{score} is the validation {score.replace('_', ' ')} "
                               + (f"on {Path(valid).name}" if valid is not None else
                                  f"on a held-out {HOLDOUT:.0%} of {Path(data).name} (seed {settings.seed})")
                               + "; the best epoch was chosen on it, so it is optimistic")
    elif task is None:
        metrics["test_set"] = f"{Path(test).name} (not used for training or model selection)"
    else:
        metrics["test_set"] = f"generated test split of {task} (seed {settings.seed})"
    metrics = {"task": task_info["name"], **metrics}
    save_checkpoint(model, out, extra={"task": task_info, "training": training})
    atomic_write_text(out / METRICS, json.dumps(metrics, indent=2))
    return out, metrics
