"""Checkpoints: `model.safetensors` (weights) + `config.json` (architecture, vocabulary, labels, task, training).

Loading reads only safetensors and JSON, never pickle; every problem is reported before any
computation: missing files, malformed JSON, missing or unexpected tensors, wrong shapes, non-finite weights.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attnaudit.model.interface import TextClassifier
from attnaudit.model.seq2seq import Translator
from attnaudit.model.transformer import TransformerClassifier, TransformerConfig, TransformerSeq2Seq
from attnaudit.model.vocab import Vocab

FORMAT = "attnaudit"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers never see a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)          # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def model_config(model: TextClassifier | Translator, extra: dict | None = None) -> dict:
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": model.kind,
           "architecture": model.net.cfg.to_dict()}
    if isinstance(model, TextClassifier):
        cfg.update(vocab=model.vocab.itos, label_names=list(model.label_names))
    else:
        cfg.update(vocab=model.src_vocab.itos, tgt_vocab=model.tgt_vocab.itos)
    cfg.update({k: v for k, v in {**model.config, **(extra or {})}.items() if k not in cfg})
    return cfg


def save_checkpoint(model: TextClassifier | Translator, out_dir: str | Path, *, extra: dict | None = None) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json (atomically); returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(model, extra)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{WEIGHTS}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": FORMAT})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, out / WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(out / CONFIG, json.dumps(cfg, indent=2))
    return out


PICKLE_FILES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")   # torch.save / pickle.dump checkpoints


def refuse_pickle_file(path: str | Path, *, name: str = "model path") -> Path:
    """Path(path), unless it is a pickle-based checkpoint file: that is refused, with how to convert it
    (nothing is unpickled, ever). `name` is what the message calls it (e.g. "--model")."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in PICKLE_FILES:
        raise ValueError(f"{name} {str(path)!r} is a pickle-based checkpoint file, which attnaudit never loads "
                         "(unpickling can run code); pass a model folder (config.json + model.safetensors). To convert, "
                         "load it yourself where you trust it and save the weights with safetensors.torch.save_file.")
    return path


def read_config(path: str | Path) -> dict:
    """config.json of a model folder, checked to be ours."""
    folder = refuse_pickle_file(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model path {str(folder)!r} is not a folder; pass the folder written by `attnaudit train`.")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} is missing; a model folder holds {CONFIG} and {WEIGHTS}.")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON ({e}).") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(cfg_path)!r} must hold a JSON object; got {type(cfg).__name__}.")
    return cfg


def load_model(path: str | Path, *, device: str | torch.device = "cpu", **hf_options) -> TextClassifier | Translator:
    """Load a model folder as the model interface, in eval mode: ours (config.json + model.safetensors) or a
    HuggingFace one (config.json with `architectures`; see `attnaudit.model.hf.load_hf` for `hf_options`:
    num_labels, label_names, seed).

    >>> model = load_model("runs/keywords")
    >>> model.predict_proba(["the plot was not good"])
    """
    folder = Path(path)
    cfg = read_config(folder)
    if "architectures" in cfg:
        from attnaudit.model.hf import load_hf   # transformers is imported only for HuggingFace folders

        return load_hf(folder, device=device, **hf_options)
    if hf_options:
        raise TypeError(f"{', '.join(sorted(hf_options))} apply only to HuggingFace folders; {str(folder)!r} is an "
                        "attnaudit folder (load_model takes only path and device for it).")
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{str(folder / CONFIG)!r} is not an attnaudit config (format={cfg.get('format')!r}).")
    for bad in sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        if not (folder / WEIGHTS).exists():
            raise ValueError(
                f"{str(bad)!r} is a pickle-based checkpoint, which attnaudit never loads (it can run code). "
                "Convert it: load it yourself where you trust it and save with safetensors.torch.save_file."
            )
    try:
        arch = TransformerConfig(**cfg["architecture"])
        vocab = Vocab(cfg["vocab"])
        kind = cfg["kind"]
    except KeyError as e:
        raise ValueError(f"{str(folder / CONFIG)!r} lacks the key {e.args[0]!r}.") from e
    except TypeError as e:
        raise ValueError(f"{str(folder / CONFIG)!r} has an invalid architecture: {e}.") from e
    if kind == "classifier":
        net = TransformerClassifier(arch)
        model = TextClassifier(net, vocab, label_names=cfg.get("label_names", []), config=cfg)
    elif kind == "seq2seq":
        net = TransformerSeq2Seq(arch)
        model = Translator(net, vocab, Vocab(cfg["tgt_vocab"]), config=cfg)
    else:
        raise ValueError(f"config kind must be 'classifier' or 'seq2seq'; got {kind!r}.")
    if len(vocab) != arch.vocab_size:
        raise ValueError(f"the vocabulary has {len(vocab)} tokens but architecture.vocab_size is {arch.vocab_size}.")
    net.load_state_dict(_read_weights(folder / WEIGHTS, net.state_dict()))
    return model.to(device) if str(device) != "cpu" else model


def _read_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; a model folder holds {CONFIG} and {WEIGHTS}.")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not match the architecture in {CONFIG}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{str(path)!r}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}.")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{str(path)!r}: tensor {k!r} holds NaN or infinite values.")
    return state
