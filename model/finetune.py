"""Fine-tuning a HuggingFace classifier on labelled Examples, saved as an ordinary HuggingFace folder.

Encoders ([CLS] head: BERT, MiniLM, RoBERTa, ...) and decoders (GPT-2, Llama, Qwen2, Mistral: a score head on the
last real token, `attnaudit.model.hf_lm.HFDecoderClassifier`; a causal-LM folder gets a fresh one) alike.

    model = load_hf(minilm_path(), num_labels=2)                     # a fresh head, or a trained one to go on with
    model, metrics = finetune_hf(model, train, valid, settings=finetune_settings(model, n_train=len(train)))
    path, metrics = finetune_to_folder(minilm_path(), "runs/minilm-sst2", data="train.tsv.gz",
                                       text_col="sentence", label_col="label", valid="dev.tsv", n_train=4000)

Every weight (encoder and head) is trained with the loop of `attnaudit.model.fit` (Adam β=(0.9, 0.98), ε=1e-9,
the warm-up schedule of Vaswani et al. 2017, eq. 3; the best validation epoch is kept). That schedule's peak,
reached at step `warmup`, is lr_factor·d_model^-0.5·warmup^-0.5, so `finetune_settings` sets d_model to the
model's hidden size and lr_factor = lr·d_model^0.5·warmup^0.5 for the peak learning rate `lr` you ask for; after
the peak the rate decays as step^-0.5. Training inputs are cut to `max_len` tokens (the closing special token
kept) and batched with texts of similar length (`length_grouped`); validation and test inputs are scored as the
saved model will see them, up to its own length limit.

The folder is what `save_pretrained` writes (config.json with `architectures` and the label names in
id2label, model.safetensors, the tokenizer), so plain transformers and `attnaudit.load_model` both read it,
plus metrics.json, train_log.csv and attnaudit_finetune.json (base model and data with their sha256,
settings, seed, versions). It is written into a hidden sibling folder and renamed into place at the end.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnaudit.core.io import DIR_MODE, atomic_write_text, file_sha256
from attnaudit.data.examples import Example
from attnaudit.model.checkpoint import CONFIG
from attnaudit.model.fit import classification_step_loss, fit, log_csv
from attnaudit.model.hf import ATTENTION, HFClassifier, load_hf, transformers_module
from attnaudit.model.run_folder import (
    HOLDOUT,
    METRICS,
    TRAIN_LOG,
    _differences,
    check_out_dir,
    labelled_splits,
)
from attnaudit.model.settings import TrainSettings, resolve_device

PROVENANCE = "attnaudit_finetune.json"
FORMAT = "attnaudit-finetune"
# The shipped MiniLM on 16,000 SST-2 training rows, one epoch, one thread of a shared 2-core CPU (about 200 s of
# training): dev accuracy 0.857 at lr 5e-5, 0.865 at 1e-4; 8,000 rows for two epochs reached 0.849 (1e-4) and
# 0.847 (2e-4), so more rows help more than more epochs. 5e-5 is also safe for wider models (BERT-base), and
# three epochs, the best one kept, suit the small data sets most users bring.
LR, EPOCHS, BATCH_SIZE, MAX_LEN, WARMUP_FRACTION = 5e-5, 3, 32, 128, 0.1
# TrainSettings fields that mean something for a pretrained model (the rest describe our own architecture).
USED = ("d_model", "max_len", "epochs", "batch_size", "warmup", "lr_factor", "weight_decay", "label_smoothing",
        "clip_norm", "patience", "seed", "n_train")
EVAL_BATCH = 128
GROUP_BATCHES = 50          # texts are sorted by length within runs of this many shuffled batches


# -- settings ------------------------------------------------------------------------------------------
def finetune_settings(model: HFClassifier, *, n_train: int, lr: float = LR, epochs: int = EPOCHS,
                      batch_size: int = BATCH_SIZE, max_len: int = MAX_LEN, warmup: int | None = None,
                      seed: int = 0, **other) -> TrainSettings:
    """TrainSettings for fine-tuning `model` on `n_train` examples with peak learning rate `lr`.

    Args:
        lr: the peak learning rate, reached after `warmup` steps; lr_factor = lr·d_model^0.5·warmup^0.5.
        warmup: warm-up steps; None takes 10% of all steps (epochs·⌈n_train / batch_size⌉), at least 1.
        max_len: training inputs are cut to this many tokens, special tokens included (speed only).
        other: any other TrainSettings field (weight_decay, label_smoothing, clip_norm, patience).
    """
    for name, value, low in (("n_train", n_train, 1), ("epochs", epochs, 1), ("batch_size", batch_size, 1),
                             ("max_len", max_len, 3)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}"
                             + (" (two special tokens and at least one word)." if name == "max_len" else "."))
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise ValueError(f"lr must be a peak learning rate in (0, 1), typically 1e-5 to 2e-4; got {lr!r}.")
    d_model = int(model.hf_config.hidden_size)
    if warmup is None:
        warmup = max(1, round(WARMUP_FRACTION * epochs * math.ceil(n_train / batch_size)))
    return TrainSettings(d_model=d_model, max_len=max_len, epochs=epochs, batch_size=batch_size, warmup=warmup,
                         lr_factor=lr * d_model**0.5 * warmup**0.5, seed=seed, **other)


def peak_lr(settings: TrainSettings) -> float:
    """The largest learning rate of the schedule: lr_factor·d_model^-0.5·warmup^-0.5 (at step `warmup`)."""
    return settings.lr_factor * settings.d_model**-0.5 * settings.warmup**-0.5


# -- tensors -------------------------------------------------------------------------------------------
def training_tensors(model: HFClassifier, examples: Sequence[Example], max_len: int | None = None):
    """Examples -> (input_ids [n, seq], attention_mask [n, seq], labels [n], number of texts cut).

    Texts are cut at the model's limit, and then at `max_len` tokens: the first max_len - 1 tokens and the
    closing special token ([SEP], </s>), which is what the tokenizer's own truncation gives.
    """
    batch = model.encode(list(examples), truncate=True)
    ids, mask = batch.input_ids, batch.attention_mask                              # [n, seq]
    lengths = mask.sum(1)                                                          # [n]
    cut = lengths > max_len if max_len is not None else torch.zeros_like(lengths, dtype=torch.bool)
    if max_len is not None and cut.any():                                           # cut is all False without max_len
        rows = torch.arange(len(batch))
        closing = batch.special_mask[rows, lengths - 1]                            # the text ends on a special
        ids, mask = ids[:, :max_len].clone(), mask[:, :max_len]
        keep = cut & closing
        ids[keep, max_len - 1] = batch.input_ids[rows[keep], lengths[keep] - 1]
    return ids, mask, batch.labels, int(sum(batch.truncated or ())) + int(cut.sum())


def length_grouped(lengths: Tensor, batch_size: int, *, n_batches: int = GROUP_BATCHES):
    """An epoch order for `fit(group=...)`: the shuffle cut into runs of n_batches·batch_size, each sorted longest
    first, so a batch holds texts of similar length (little padding; on SST-2 about 3× fewer tokens computed).
    """
    def group(order: Tensor) -> Tensor:                                            # [n_train] -> [n_train]
        runs = order.split(batch_size * n_batches)
        return torch.cat([r[lengths[r].argsort(descending=True, stable=True)] for r in runs])
    return group


@torch.inference_mode()
def accuracy_and_loss(model: HFClassifier, ids: Tensor, mask: Tensor, labels: Tensor, *,
                      batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """Accuracy and mean cross-entropy in eval mode, batches sorted by length so little padding is computed."""
    order = mask.sum(1).argsort()                                                  # [n], shortest first
    correct, total = 0, 0.0
    with model.evaluating():
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            n = int(mask[idx].sum(1).max())                                        # trim shared padding
            logits = model.logits(ids[idx, :n], mask[idx, :n]).float().cpu()       # [batch, n_classes]
            correct += int((logits.argmax(-1) == labels[idx]).sum())
            total += float(F.cross_entropy(logits, labels[idx], reduction="sum"))
    return correct / len(order), total / len(order)


# -- fine-tuning ---------------------------------------------------------------------------------------
def finetune_hf(
    model: HFClassifier, train: Sequence[Example], valid: Sequence[Example], test: Sequence[Example] | None = None,
    *, settings: TrainSettings | None = None, device: str = "auto", progress: bool | None = None, log_path=None,
) -> tuple[HFClassifier, dict]:
    """Train every weight of `model.net` on labelled Examples; returns the best-validation model (eval mode).

    Args:
        model: an `HFClassifier` (`load_hf`), with a fresh or a trained head; it is trained in place.
        train, valid, test: Examples whose `label` is a class index of `model.label_names`; test may be None.
        settings: from `finetune_settings(model, n_train=len(train), lr=...)`; None takes its defaults.
        log_path: where to write the per-step CSV log (step, epoch, lr, loss), or None.
    Returns:
        (model, metrics): valid_accuracy, valid_loss, initial_valid_accuracy (before any step), test_accuracy
        and test_loss (with test), peak_lr, best_epoch, epochs_run, steps, train_seconds, n_train, n_valid,
        n_test, n_truncated, device, n_params.
    """
    if not isinstance(model, HFClassifier) or model.kind != "classifier":
        raise TypeError(f"model must be an HFClassifier (attnaudit.model.hf.load_hf) or HFDecoderClassifier; got "
                        f"{type(model).__name__}" + (" (a language model: load it with kind='classifier' for a "
                                                    "classification head)." if getattr(model, "kind", None) == "lm" else "."))
    settings = settings or finetune_settings(model, n_train=max(1, len(train)))
    d_model = int(model.hf_config.hidden_size)
    if settings.d_model != d_model:
        raise ValueError(f"settings.d_model must be the model's hidden size {d_model} (it scales the learning "
                         f"rate); got {settings.d_model}. Build settings with finetune_settings(model, lr=...).")
    dev = resolve_device(device)
    for name, split in (("train", train), ("valid", valid)) + ((("test", test),) if test is not None else ()):
        if len(split) == 0:
            raise ValueError(f"{name} must hold at least one Example; got an empty list.")
        for e in split:
            if e.label is None or not 0 <= e.label < model.n_classes:
                raise ValueError(f"{name}: Example {e.id!r} has label {e.label!r}; every example needs a class "
                                 f"index in [0, {model.n_classes - 1}] (this model's labels: "
                                 f"{', '.join(model.label_names)}).")
    model.to(dev)
    ids, mask, labels, n_cut = (t.to(dev) if isinstance(t, Tensor) else t
                                for t in training_tensors(model, train, settings.max_len))
    held = {name: training_tensors(model, split) for name, split in (("valid", valid), ("test", test))
            if split is not None}                                       # the saved model's own length limit
    torch.manual_seed(settings.seed)                                    # dropout

    step_loss = classification_step_loss(model.logits, ids, mask, labels, label_smoothing=settings.label_smoothing)

    def evaluate() -> tuple[float, float]:
        return accuracy_and_loss(model, *held["valid"][:3])

    initial = evaluate()[0]
    result = fit(model.net, len(train), step_loss, evaluate, settings, dev, progress=progress,
                 desc=f"finetune {model.hf_config.model_type}",
                 group=length_grouped(mask.sum(1).cpu(), settings.batch_size))
    log = result.pop("log")
    if log_path is not None:
        atomic_write_text(Path(log_path), log_csv(log))
    metrics: dict[str, Any] = {"kind": "classification"}
    for name, (t_ids, t_mask, t_labels, _) in held.items():
        accuracy, loss = accuracy_and_loss(model, t_ids, t_mask, t_labels)
        metrics.update({f"{name}_accuracy": accuracy, f"{name}_loss": float(f"{loss:.4g}")})
    model.config["head"] = "fine-tuned"
    model.config["untrained_weights"] = []                  # every weight, a fresh head's too, is trained now
    metrics.update(initial_valid_accuracy=initial, peak_lr=float(f"{peak_lr(settings):.6g}"), n_train=len(train),
                   n_valid=len(valid), n_test=len(test) if test is not None else 0,
                   n_truncated=n_cut + sum(h[3] for h in held.values()), device=str(dev),
                   n_params=sum(p.numel() for p in model.net.parameters()))
    return model, {**metrics, **result}


# -- the folder ----------------------------------------------------------------------------------------
def save_hf(model: HFClassifier, folder: Path) -> list[str]:
    """`save_pretrained` the net (safetensors) and tokenizer into `folder`, labels in id2label -> file names.

    config.json names no attention implementation, so plain transformers loads it with its default one.
    """
    tf = transformers_module()
    net = model.net
    net.config.id2label = dict(enumerate(model.label_names))
    net.config.label2id = {name: i for i, name in enumerate(model.label_names)}
    bars = tf.logging.is_progress_bar_enabled()
    tf.logging.disable_progress_bar()
    try:
        net.save_pretrained(folder, safe_serialization=True)
        model.tokenizer.save_pretrained(folder)
    finally:
        if bars:
            tf.logging.enable_progress_bar()
    cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    stale = [k for k in ("_attn_implementation", "attn_implementation", "_attn_implementation_internal")
             if cfg.get(k) == ATTENTION]                                # ours is registered only inside attnaudit
    if stale:
        atomic_write_text(folder / CONFIG, json.dumps({k: v for k, v in cfg.items() if k not in stale}, indent=2))
    return sorted(p.name for p in folder.iterdir())


def _sha256_of(folder: Path) -> dict:
    weights = sorted(folder.glob("*.safetensors"))
    return {"config_sha256": file_sha256(folder / CONFIG),
            "weights_sha256": {p.name: file_sha256(p) for p in weights}}


def check_finetune_out(out: Path, identity: dict, *, overwrite: bool = False) -> None:
    """Refuse an out folder holding other files or another fine-tune (unless overwrite); the same run may redo."""
    provenance = out / PROVENANCE
    if overwrite or not provenance.is_file():
        if not overwrite and (out / CONFIG).is_file():
            raise ValueError(f"out {str(out)!r} holds a model that `attnaudit finetune` did not write (no "
                             f"{PROVENANCE}); pass --overwrite (overwrite=True) to replace it, or choose another "
                             "output folder.")
        check_out_dir(out, identity, overwrite=overwrite)           # a file, other files, or empty
        return
    how = "pass --overwrite (overwrite=True) to replace it, or choose another output folder"
    try:
        old = json.loads(provenance.read_text(encoding="utf-8"))
        diffs = _differences(old["identity"], identity)
        ours = set(old["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"out {str(out)!r}: {PROVENANCE} is unreadable ({e}); {how}.") from e
    if diffs:
        raise ValueError(f"out {str(out)!r} already holds a different fine-tuned model ({'; '.join(diffs[:3])}"
                         f"{'; ...' if len(diffs) > 3 else ''}); {how}.")
    others = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.endswith(".tmp"))
    if others:
        raise ValueError(f"out {str(out)!r} also holds files this fine-tune did not write ({', '.join(others[:5])}), "
                         f"which replacing the folder would delete; {how}.")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` folder to `out`; an existing `out` is moved aside first and then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old.", suffix=".tmp"))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _subset(examples: list[Example], n: int | None, seed: int, source) -> list[Example]:
    if n is None:
        return examples
    if n > len(examples):
        raise ValueError(f"n_train must be at most the {len(examples)} training rows of {source}; got {n}.")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n]
    return [examples[i] for i in sorted(order.tolist())]


def finetune_to_folder(
    hf_dir, out_dir, *, data, text_col: str | None = None, label_col: str | None = None, valid=None, test=None,
    n_train: int | None = None, lr: float = LR, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE,
    max_len: int = MAX_LEN, seed: int = 0, device: str = "auto", overwrite: bool = False, progress: bool | None = None,
) -> tuple[Path, dict]:
    """Fine-tune the HuggingFace folder `hf_dir` on a labelled file; write an ordinary HF folder -> (folder, metrics).

    Args:
        hf_dir: config.json + model.safetensors + tokenizer; without a head (MiniLM) a fresh one is added,
            a trained head must have as many classes as the data.
        data, text_col, label_col: the training file: a table and its two columns, or an ERASER / HateXplain
            file, which names its own (`attnaudit.data.read_labelled`).
        valid: a validation file; None holds out a seeded 10% of `data`. test: an optional test file.
        n_train: train on a seeded random subset of this many training rows (None: all of them).
        lr, epochs, batch_size, max_len, seed: see `finetune_settings`.
        overwrite: replace an out folder that holds something else (refused otherwise, before training).
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not (hf_dir / CONFIG).is_file():
        raise FileNotFoundError(f"hf_dir {str(hf_dir)!r} has no {CONFIG}; pass a HuggingFace model folder "
                                "(config.json, model.safetensors and the tokenizer files).")
    if out.resolve() == hf_dir.resolve():
        raise ValueError(f"out must be a new folder, not the base model's {str(hf_dir)!r}; fine-tuning keeps the base.")
    dev = resolve_device(device)
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1):
        raise ValueError(f"n_train must be None (all rows) or an int >= 1; got {n_train!r}.")
    splits = labelled_splits(data, text_col=text_col, label_col=label_col, valid=valid, test=test, seed=seed)
    held, tests, label_names, data_info = splits["valid"], splits["test"], splits["label_names"], splits["info"]
    train = _subset(splits["train"], n_train, seed, data)
    data_info.update(n_train_rows=len(splits["train"]), n_train_subset=n_train)
    base = {"path": str(hf_dir.resolve()), **_sha256_of(hf_dir)}
    with warnings.catch_warnings():             # a fresh head is about to be trained: no "UNTRAINED" warning
        warnings.filterwarnings("ignore", message=".*has no classification head", category=UserWarning)
        model = load_hf(hf_dir, device=dev, num_labels=len(label_names), label_names=label_names, seed=seed,
                        kind="classifier")
    settings = finetune_settings(model, n_train=len(train), lr=lr, epochs=epochs, batch_size=batch_size,
                                 max_len=max_len, seed=seed).replace(n_train=n_train)
    used = {k: settings.to_dict()[k] for k in USED}
    identity = json.loads(json.dumps({
        "base": {k: base[k] for k in ("config_sha256", "weights_sha256")}, "settings": used,
        "label_names": list(label_names),
        "data": {k: data_info.get(k) for k in ("sha256", "valid_sha256", "test_sha256", "text_col", "label_col",
                                               "holdout_fraction")}}))
    check_finetune_out(out, identity, overwrite=overwrite)              # before minutes of training
    base.update(model_type=model.hf_config.model_type, architectures=model.config["source_architectures"],
                head=model.config["head"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))   # hidden until complete
    try:
        os.chmod(tmp, DIR_MODE)                                         # mkdtemp makes 0700
        model, metrics = finetune_hf(model, train, held, tests, settings=settings, device=str(dev),
                                     progress=progress, log_path=tmp / TRAIN_LOG)
        if tests is None:
            metrics["test_accuracy"] = metrics["valid_accuracy"]
            metrics["test_set"] = ("none: test_accuracy is the validation accuracy "
                                   + (f"on {Path(valid).name}" if valid is not None else
                                      f"on a held-out {HOLDOUT:.0%} of {Path(data).name} (seed {seed})")
                                   + "; the best epoch was chosen on it, so it is optimistic")
        else:
            metrics["test_set"] = Path(test).name
        metrics = {"task": Path(data).name, **metrics}
        files = save_hf(model, tmp)
        atomic_write_text(tmp / METRICS, json.dumps(metrics, indent=2))
        provenance = {"format": FORMAT, "format_version": 1, "base": base, "data": data_info,
                      "label_names": list(label_names), "settings": used, "peak_lr": metrics["peak_lr"],
                      "seed": seed, "device": str(dev), "torch": torch.__version__,
                      "transformers": transformers_module().__version__, "torch_threads": torch.get_num_threads(),
                      "identity": identity, "files": sorted({*files, METRICS, PROVENANCE})}
        atomic_write_text(tmp / PROVENANCE, json.dumps(provenance, indent=2))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, metrics
