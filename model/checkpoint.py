"""Checkpoints: `model.safetensors` (weights) + `config.json` (architecture, vocabulary, labels, task, training).

Loading reads only safetensors and JSON, never pickle; every problem is reported before any
computation: missing or unreadable files, malformed JSON, an architecture larger than `MAX_ARCHITECTURE`,
sizes in config.json that disagree with the tensor shapes in the safetensors header (read before the model
is built), weights whose sha256 differs from the `weights_sha256` that `save_checkpoint` records in
config.json (folders saved before it was recorded load unchecked), missing or unexpected tensors, non-finite
weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attnaudit.core.io import PICKLE_SUFFIXES, atomic_write, atomic_write_text, file_sha256, open_readable
from attnaudit.model.interface import TextClassifier
from attnaudit.model.lm import DecoderClassifier, LanguageModel
from attnaudit.model.seq2seq import Translator
from attnaudit.model.transformer import (
    DecoderLMConfig,
    TransformerClassifier,
    TransformerConfig,
    TransformerDecoderLM,
    TransformerSeq2Seq,
)
from attnaudit.model.vocab import Vocab

if TYPE_CHECKING:
    from attnaudit.model.hf import HFClassifier
    from attnaudit.model.hf_seq2seq import HFTranslator

FORMAT = "attnaudit"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"
MISSING = f"a model folder holds {CONFIG} and {WEIGHTS}"     # what a missing-file message adds
# The largest architecture a config.json may describe: beyond these the model would not fit any machine we
# run on, so a value above one is a damaged or hand-edited config, refused before anything is built.
MAX_ARCHITECTURE = {"vocab_size": 2**24, "tgt_vocab_size": 2**24, "n_classes": 2**20, "d_model": 2**16,
                    "n_heads": 2**10, "n_layers": 2**10, "d_ff": 2**18, "max_len": 2**20}
MAX_DERIVED_BYTES = 2**30   # tensors the config implies but the file does not store (the positional table)
MAX_HEADER_BYTES = 100 * 2**20   # the safetensors format's own limit on its JSON header
DECODER_NET = "decoder"          # config.json "net" of a decoder-only model (kind "lm", or a DecoderClassifier)


SavedModel: TypeAlias = "TextClassifier | Translator | LanguageModel | DecoderClassifier"


def model_config(model: SavedModel, extra: dict | None = None) -> dict:
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": model.kind,
           "architecture": model.net.cfg.to_dict()}
    if isinstance(model, LanguageModel):
        cfg.update(net=DECODER_NET, vocab=model.vocab.itos)
    elif isinstance(model, DecoderClassifier):
        cfg.update(net=DECODER_NET, vocab=model.vocab.itos, label_names=list(model.label_names))
    elif isinstance(model, TextClassifier):
        cfg.update(vocab=model.vocab.itos, label_names=list(model.label_names))
    else:
        cfg.update(vocab=model.src_vocab.itos, tgt_vocab=model.tgt_vocab.itos)
    cfg.update({k: v for k, v in {**model.config, **(extra or {})}.items() if k not in cfg})
    return cfg


def save_checkpoint(model: SavedModel, out_dir: str | Path, *, extra: dict | None = None) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json (atomically); returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(model, extra)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}

    def write_weights(tmp: Path) -> None:
        save_file(state, str(tmp), metadata={"format": FORMAT})
        cfg["weights_sha256"] = file_sha256(tmp, missing=MISSING)   # load_model checks the weights against it

    atomic_write(out / WEIGHTS, write_weights)
    atomic_write_text(out / CONFIG, json.dumps(cfg, indent=2))
    return out


def refuse_pickle_file(path: str | Path, *, name: str = "model path") -> Path:
    """Path(path), unless it is a pickle-based checkpoint file: that is refused, with how to convert it
    (nothing is unpickled, ever). `name` is what the message calls it (e.g. "--model")."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
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
    with open_readable(cfg_path, "the model's config", missing=MISSING) as f:
        raw = f.read()
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON ({e}).") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(cfg_path)!r} must hold a JSON object; got {type(cfg).__name__}.")
    return cfg


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's JSON header, without reading the tensors.

    The format: 8 bytes little-endian N, then N bytes of JSON {name: {"dtype", "shape", "data_offsets"}}.
    """
    bad = f"{str(path)!r} is not a readable safetensors file (corrupt or truncated?)"
    with open_readable(path, "the weights file", missing=MISSING) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{bad}: its header length is {n} bytes for a file of {size} bytes.")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{bad}: its header is not JSON ({e}).") from e
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: its header is not a JSON object.")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{bad}: tensor {name!r} has no valid shape in the header ({entry!r:.80}).")
        shapes[name] = tuple(shape)
    return shapes


def check_architecture(arch: dict, cfg_path: Path, keys=tuple(MAX_ARCHITECTURE)) -> None:
    """Each size `keys` in config.json's architecture is an int in [0, MAX_ARCHITECTURE[key]]."""
    for key in keys:
        limit, value = MAX_ARCHITECTURE[key], arch.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise ValueError(f"{str(cfg_path)!r}: architecture.{key} = {value!r}, but it must be an int in [0, {limit:,}] "
                             "(larger models do not fit in memory); the config is damaged or hand-edited: restore it.")


def check_against_header(net_on_meta, shapes: dict[str, tuple[int, ...]], arch: dict, cfg_path: Path,
                         weights: Path) -> None:
    """Refuse a config whose architecture implies tensors the weights file does not hold, or other shapes.

    `net_on_meta` was built on the meta device: its shapes cost no memory.
    """
    expected = {k: tuple(v.shape) for k, v in net_on_meta.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{str(weights)!r} does not match the architecture in {CONFIG}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.")
    for name, want in expected.items():
        got = shapes[name]
        if got != want:
            dims = [w for g, w in zip(got, want) if g != w] if len(got) == len(want) else list(want)
            keys = [f"architecture.{k} = {v}" for k, v in arch.items() if isinstance(v, int) and v in dims
                    and not isinstance(v, bool)]
            raise ValueError(f"{str(weights)!r}: tensor {name!r} has shape {got}, but {str(cfg_path)!r} "
                             f"({', '.join(keys) or 'its architecture'}) implies {want}; the config does not belong to "
                             "these weights: restore the folder's own config.json.")
    derived = sum(b.numel() * b.element_size() for n, b in net_on_meta.named_buffers() if n not in expected)
    if derived > MAX_DERIVED_BYTES:
        raise ValueError(f"{str(cfg_path)!r}: its architecture (max_len = {arch.get('max_len')}, d_model = "
                         f"{arch.get('d_model')}) needs {derived:.2g} bytes of tables beyond the weights, more than the "
                         f"limit of {MAX_DERIVED_BYTES:.2g}; lower max_len in the config.")


def verify_weights(path: Path, cfg: dict, cfg_path: Path) -> None:
    """The weights' sha256 equals the one config.json records (folders saved without it are not checked)."""
    recorded = cfg.get("weights_sha256")
    if recorded is None:
        return
    actual = file_sha256(path, missing=MISSING)
    if actual != recorded:
        raise ValueError(f"{str(path)!r} has sha256 {actual}, but {str(cfg_path)!r} records weights_sha256 {recorded}: "
                         "the weights were damaged or replaced after saving; restore the file from a copy or retrain.")


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               **hf_options) -> TextClassifier | Translator | LanguageModel | DecoderClassifier | HFClassifier \
        | HFTranslator:
    """Load a model folder as the model interface, in eval mode: ours (config.json + model.safetensors) or a
    HuggingFace one (config.json with `architectures`; see `attnaudit.model.hf.load_hf` for `hf_options`:
    num_labels, label_names, seed).

    >>> model = load_model("runs/keywords")
    >>> model.predict_proba(["the plot was not good"])
    """
    folder = Path(path)
    cfg = read_config(folder)
    if "architectures" in cfg:
        from attnaudit.model.hf_seq2seq import SEQ2SEQ_SUPPORTED  # transformers is imported only for HF folders

        if cfg.get("model_type") in SEQ2SEQ_SUPPORTED:          # BART, T5, Marian: an encoder-decoder
            from attnaudit.model.hf_seq2seq import load_hf_seq2seq

            if hf_options:
                raise TypeError(f"{', '.join(sorted(hf_options))} apply only to HuggingFace classifiers; "
                                f"{str(folder)!r} is a {cfg['model_type']} encoder-decoder.")
            return load_hf_seq2seq(folder, device=device)
        from attnaudit.model.hf import load_hf

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
    cfg_path, weights = folder / CONFIG, folder / WEIGHTS
    if not isinstance(cfg.get("architecture"), dict):
        raise ValueError(f"{str(cfg_path)!r} lacks the key 'architecture' (an object of sizes such as d_model).")
    check_architecture(cfg["architecture"], cfg_path, ("n_layers", "n_heads"))   # they size Python loops
    decoder = cfg.get("kind") == "lm" or cfg.get("net") == DECODER_NET
    try:
        arch: TransformerConfig | DecoderLMConfig = \
            (DecoderLMConfig if decoder else TransformerConfig)(**cfg["architecture"])
        vocab = Vocab(cfg["vocab"])
        kind = cfg["kind"]
    except KeyError as e:
        raise ValueError(f"{str(cfg_path)!r} lacks the key {e.args[0]!r}.") from e
    except TypeError as e:
        raise ValueError(f"{str(cfg_path)!r} has an invalid architecture: {e}.") from e
    if kind not in ("classifier", "seq2seq", "lm"):
        raise ValueError(f"config kind must be 'classifier', 'seq2seq' or 'lm'; got {kind!r}.")
    if decoder and (kind == "seq2seq" or (getattr(arch, "head", None) == "lm") != (kind == "lm")):
        raise ValueError(f"{str(cfg_path)!r}: kind {kind!r} does not go with a decoder whose architecture.head is "
                         f"{getattr(arch, 'head', None)!r} ('lm' for kind 'lm', 'classifier' for kind 'classifier').")
    if len(vocab) != arch.vocab_size:
        raise ValueError(f"the vocabulary has {len(vocab)} tokens but architecture.vocab_size is {arch.vocab_size}.")
    build: type[TransformerClassifier | TransformerSeq2Seq | TransformerDecoderLM] = \
        TransformerDecoderLM if decoder else TransformerClassifier if kind == "classifier" else TransformerSeq2Seq
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} is missing; a model folder holds {CONFIG} and {WEIGHTS}.")
    with torch.device("meta"):                                   # shapes only: nothing is allocated
        check_against_header(build(arch), read_header(weights), cfg["architecture"], cfg_path,  # type: ignore[arg-type]
                             weights)
    check_architecture(cfg["architecture"], cfg_path)
    verify_weights(weights, cfg, cfg_path)
    model: SavedModel
    if isinstance(arch, DecoderLMConfig):
        model = LanguageModel(TransformerDecoderLM(arch), vocab, config=cfg) if kind == "lm" else \
            DecoderClassifier(TransformerDecoderLM(arch), vocab, label_names=cfg.get("label_names", []), config=cfg)
    elif kind == "classifier":
        model = TextClassifier(TransformerClassifier(arch), vocab, label_names=cfg.get("label_names", []), config=cfg)
    else:
        model = Translator(TransformerSeq2Seq(arch), vocab, Vocab(cfg["tgt_vocab"]), config=cfg)
    net = model.net
    net.load_state_dict(_read_weights(weights))
    net.eval()                                                   # as documented: dropout off until asked for
    return model.to(device) if str(device) != "cpu" else model


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file whose header `check_against_header` accepted, each checked to be finite."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{str(path)!r}: tensor {k!r} holds NaN or infinite values.")
    return state
