"""The one model interface every explainer and analysis uses, as a type: `ExplainableModel`.

Explainers and analyses call a model only through these members (`ExplainableModel` below; the built-in
`TextClassifier` and the HuggingFace adapter `attnaudit.model.hf.HFClassifier` implement all of them):

    batch = model.encode(texts_or_examples)      # Batch: token ids, masks, tokens, labels, rationale
    logits = model(batch)                        # [batch, n_classes]; model.logits(input_ids, attention_mask) alike
    embeds = model.embed(batch.input_ids)        # [batch, seq, d_model]: what gradient methods attribute to
    logits = model.logits_from_embeds(embeds, batch.attention_mask)
    model.check_ids(input_ids)                   # ids outside the vocabulary raise before they index garbage
    model.hook_points()                          # {site name: HookPoint}, attention capture and edits
    model.attention_sites                        # encoder self-attention pattern sites, layer order
    model.n_layers, model.n_heads, model.n_classes, model.max_len, model.label_names
    model.output_weight(layer)                   # W^O split by head [d_model, head, d_head]
    model.pad_id, model.mask_id                  # replacement tokens for perturbations
    model.device, model.to(device)               # where the weights are; move them -> the model
    with model.evaluating(): ...                 # eval mode (no dropout) inside, the previous mode restored after
    model.predict_proba(texts)                   # numpy [n, n_classes]

`AttentionModel[B]` is the part every model family shares, whatever its batch type `B` (`Translator`, the
encoder–decoder, is an `AttentionModel[PairBatch]`): encode, forward, hook sites, sizes, device and eval mode.
Optional members are looked up with `hasattr`: `word_ids(batch)` (sub-word -> word, HuggingFace) and
`cascading_layers()` (randomisation order for `analyses.sanity`). Capture and interventions go through
`attnaudit.model.hooks.record` / `hooks` on the sites.

How a model family plugs in. Subclass `ModelBase` (or `ClassifierBase` for a classifier); they implement
`device`, `to`, `evaluating`, `hook_points` (every HookPoint under `net`), `attention_sites` and, for
classifiers, `__call__`, `check_ids`, `predict_proba` and `predict`, once. A new family sets `net` (its
nn.Module) and `kind`, and implements:

- every family: `encode` (-> its batch type), `__call__`, `n_layers`, `n_heads`; `attention_sites` when its
  pattern sites are not ``encoder.layers.{i}.self_attn.pattern``; `hook_points` when its sites do not live
  under `net` (the HuggingFace adapter keeps its own).
- classifiers: `logits`, `embed`, `logits_from_embeds`, `output_weight`, `vocab_size`, `max_len`,
  `n_classes`, `label_names`, `pad_id`, `mask_id`.
- a decoder-only LM (prompt -> target tokens): a `ClassifierBase` over the vocabulary whose rows are generation
  steps (`attnaudit.model.steps`: row s = prompt + t_<s, label t_s, the target prefix special), `kind = "lm"`,
  `readout = "last"` (the prediction is read at the last real token; explainers read that row), `logits` ->
  [rows, vocab] through `steps.last_logits` (one forward per distinct longest row), `attention_sites`
  ``decoder.layers.{i}.self_attn.pattern`` (causal), and `sequence_logits_from_embeds` ([rows, seq, vocab]) so
  gradients share that forward too. `LanguageModel` (model/lm.py) and `HFLanguageModel` (model/hf_lm.py) do so;
  a decoder classifier (`DecoderClassifier`, `HFDecoderClassifier`) is an ordinary classifier with
  `readout = "last"`.
- an encoder–decoder (source -> target tokens): as `Translator` and `HFTranslator` (`ModelBase[PairBatch]`):
  `encode` builds the source (`encode_words` or its tokenizer) and the teacher-forcing target, `__call__` returns
  [batch, tgt, vocab], `cross_attention_sites` and `decoder_self_attention_sites` name the decoder's patterns
  besides `attention_sites` (the encoder's); `analyses.seq2seq` also reads `translate`, `encoder_embeds`,
  `logits_from_src_embeds`, `word_ids`, `target_word_ids`, `target_tokens`, `target_texts`, `pad_id`, `mask_id`
  and `eos_id`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, Generic, Protocol, TypeVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from attnaudit.data.examples import Example
from attnaudit.model.hooks import HookPoint
from attnaudit.model.transformer import EncoderLayer, TransformerClassifier, TransformerDecoderLM, TransformerSeq2Seq
from attnaudit.model.vocab import CLS, PAD, SEP, Vocab, words

B = TypeVar("B")                        # a model family's batch type (Batch, PairBatch, ...)
M = TypeVar("M")                        # the model itself, for `to` -> self
_Model = TypeVar("_Model", bound="ModelBase[Any]")
Device = str | torch.device


@dataclass(frozen=True)
class Batch:
    """Token-level inputs, aligned: position j of `tokens[i]` is `input_ids[i, j]`.

    input_ids [batch, seq] long; attention_mask [batch, seq] bool (True = real token);
    special_mask [batch, seq] bool (True = [CLS]/[SEP]-like: never removed, never scored);
    labels [batch] long or None; rationale [batch, seq] float 0/1 or None (0 on special and padding).
    """

    input_ids: Tensor
    attention_mask: Tensor
    special_mask: Tensor
    tokens: list[list[str]]
    texts: list[str] | None = None
    labels: Tensor | None = None
    rationale: Tensor | None = None
    ids: list[str] | None = None
    truncated: list[bool] | None = None
    steps: list[tuple[int, int]] | None = None    # generation rows: (example, target step), `model.steps`

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> Batch:
        moved: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        tensors: dict[str, Any] = {k: v.to(device) for k, v in moved.items() if isinstance(v, Tensor)}
        return replace(self, **tensors)

    def select(self, index: Sequence[int] | slice, *, trim: bool = True) -> Batch:
        """A sub-batch (examples `index`, repeats allowed), trimmed to its longest sequence (trim=False: the full
        width, so positions stay aligned with tensors of this batch)."""
        idx = list(range(len(self)))[index] if isinstance(index, slice) else list(index)
        seq = (int(self.attention_mask[idx].sum(1).max()) if idx else 0) if trim else self.input_ids.shape[1]
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v[idx]
                out[f.name] = v[:, :seq] if v.dim() == 2 else v
            elif isinstance(v, list):
                out[f.name] = [v[i][:seq] if f.name == "tokens" else v[i] for i in idx]
            else:
                out[f.name] = v
        return Batch(**out)


class AttentionModel(Protocol[B]):
    """What every model family offers, whatever its batch type `B` (see the module docstring)."""

    kind: str                           # "classifier", "seq2seq" or "lm"

    @property
    def net(self) -> nn.Module: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def n_heads(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def attention_sites(self) -> list[str]: ...

    def to(self: M, device: Device) -> M: ...

    def evaluating(self) -> AbstractContextManager[Any]: ...

    def encode(self, inputs: Sequence[str] | Sequence[Example], *, truncate: bool = False) -> B: ...

    def __call__(self, batch: B) -> Tensor: ...

    def hook_points(self) -> dict[str, HookPoint]: ...


class ExplainableModel(AttentionModel[Batch], Protocol):
    """A classifier that explainers and analyses may explain: everything they call on it (module docstring)."""

    @property
    def label_names(self) -> tuple[str, ...]: ...

    @property
    def n_classes(self) -> int: ...

    @property
    def max_len(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def mask_id(self) -> int: ...

    def encode(self, inputs: str | Sequence[str] | Sequence[Example], *, truncate: bool = False) -> Batch: ...

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...

    def embed(self, input_ids: Tensor) -> Tensor: ...

    def logits_from_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor: ...

    def check_ids(self, input_ids: Tensor) -> None: ...

    def output_weight(self, layer: int) -> Tensor: ...

    def predict_proba(self, texts: str | Sequence[str], *, batch_size: int | None = None,
                      truncate: bool = True) -> np.ndarray: ...


class ModelBase(Generic[B]):
    """What every model family implements the same way: device, eval mode, hook sites (see the module docstring).

    Subclasses set `net` (an nn.Module) and `kind`, and implement `encode`, `__call__`, `n_layers` and `n_heads`.
    """

    kind: str
    net: nn.Module

    @property
    def n_layers(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define n_layers")

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self: _Model, device: Device) -> _Model:
        """Move the weights to `device` -> self."""
        self.net.to(device)
        return self

    @contextmanager
    def evaluating(self) -> Iterator[ModelBase[B]]:
        """Eval mode inside the block (no dropout: deterministic), the previous mode restored after."""
        was = self.net.training
        self.net.eval()
        try:
            yield self
        finally:
            self.net.train(was)

    # -- attention --------------------------------------------------------------------------------
    def hook_points(self) -> dict[str, HookPoint]:
        return {n: m for n, m in self.net.named_modules() if isinstance(m, HookPoint)}

    @property
    def attention_sites(self) -> list[str]:
        return [f"encoder.layers.{i}.self_attn.pattern" for i in range(self.n_layers)]


class ClassifierBase(ModelBase[Batch]):
    """What every classifier shares (ours and the HuggingFace adapter): the forward on a Batch, id checks, predictions.

    Subclasses implement `encode`, `logits`, `vocab_size`, `label_names` and `n_classes`.
    """

    PREDICT_BATCH = 256
    label_names: tuple[str, ...]
    readout = "first"         # the position the prediction is read from: "first" ([CLS]) or "last" (decoders)

    @property
    def n_classes(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define n_classes")

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define vocab_size")

    def encode(self, inputs: str | Sequence[str] | Sequence[Example], *, truncate: bool = False) -> Batch:
        raise NotImplementedError(f"{type(self).__name__} must define encode")

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define logits")

    def __call__(self, batch: Batch) -> Tensor:
        return self.logits(batch.input_ids, batch.attention_mask)

    def check_ids(self, input_ids: Tensor) -> None:
        """Ids outside the vocabulary would index garbage (or crash on CUDA): refuse them first."""
        check_ids(input_ids, self.vocab_size)

    # -- notebook surface -------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_proba(self, texts: str | Sequence[str], *, batch_size: int | None = None, truncate: bool = True) -> np.ndarray:
        """Class probabilities -> numpy [n, n_classes] (columns in `label_names` order)."""
        if isinstance(texts, str):
            texts = [texts]
        out, batch_size = [], batch_size or self.PREDICT_BATCH
        with self.evaluating():
            for start in range(0, len(texts), batch_size):
                batch = self.encode(texts[start : start + batch_size], truncate=truncate)
                out.append(self(batch).float().softmax(-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.n_classes), dtype=np.float32)

    def predict(self, texts: str | Sequence[str]) -> list[str]:
        return [self.label_names[i] for i in self.predict_proba(texts).argmax(1)]


def check_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Refuse token ids that are not integers or lie outside [0, vocab_size): they would index garbage (or crash
    on CUDA). What every model's `check_ids` runs."""
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an integer tensor; got {input_ids.dtype}.")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size - 1}] (the vocabulary size is "
                         f"{vocab_size}); got values from {int(input_ids.min())} to {int(input_ids.max())}.")


def class_names(label_names: Sequence[str], n_classes: int) -> tuple[str, ...]:
    """A classifier's label_names as a tuple, checked to name each of its n_classes classes."""
    if len(label_names) != n_classes:
        raise ValueError(f"label_names must have n_classes={n_classes} entries; got {len(label_names)}.")
    return tuple(label_names)


def batch_labels(examples: Sequence[Example | None], seq: int, word_of_token: Sequence[Sequence[int | None]]
                 ) -> tuple[Tensor | None, Tensor | None, list[str] | None]:
    """What a Batch takes from its Examples -> (labels [batch] or None, rationale [batch, seq] or None, ids or None).

    Each is None unless every input is an Example that has it. `word_of_token[i][j]`: the whitespace word of
    example i that token j belongs to (None for special tokens and padding); word w's 0/1 rationale goes to
    every token of w.

    >>> labels, rationale, ids = batch_labels(examples, seq, [[None, 0, 1, None]] * len(examples))  # [CLS] a b [SEP]
    """
    labels = rationale = None
    ids = None
    if all(e is not None and e.label is not None for e in examples):
        labels = torch.tensor([e.label for e in examples if e is not None], dtype=torch.long)         # [batch]
    if all(e is not None and e.rationale is not None for e in examples):
        rationale = torch.zeros(len(examples), seq)                                                 # [batch, seq]
        for i, e in enumerate(examples):
            assert e is not None and e.rationale is not None                                       # checked just above
            for j, w in enumerate(word_of_token[i]):
                if w is not None:
                    rationale[i, j] = float(e.rationale[w])                                        # every piece of word w
    if all(e is not None for e in examples):
        ids = [e.id for e in examples if e is not None]
    return labels, rationale, ids


def encode_words(inputs: str | Sequence[str] | Sequence[Example], vocab: Vocab, *, max_len: int,
                 truncate: bool = False, cls: bool = True) -> Batch:
    """Texts or Examples -> Batch: [CLS] words [SEP] in `vocab`, right-padded with [PAD] (the built-in models' input).

    An example longer than max_len raises unless `truncate=True` (then words are cut and
    `batch.truncated` says which examples were). cls=False (the built-in decoders): words [SEP], no [CLS] in
    front (a causal [CLS] would see nothing), so word i is token i.
    """
    if isinstance(inputs, (str, Example)):
        inputs = [inputs]
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one text; got an empty list.")
    examples = [x if isinstance(x, Example) else None for x in inputs]
    texts = [x.text if isinstance(x, Example) else x for x in inputs]
    rows, cut = [], []
    lead = [CLS] if cls else []
    room = max_len - len(lead) - 1
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"inputs[{i}] must be a str or an Example; got {type(t).__name__}.")
        w = words(t)
        if not w:
            raise ValueError(f"inputs[{i}] is empty or whitespace-only; every example needs at least one word.")
        if len(w) > room and not truncate:
            raise ValueError(
                f"inputs[{i}] has {len(w)} words but this model takes at most {room} "
                f"(max_len={max_len} minus {'[CLS] and [SEP]' if cls else '[SEP]'}); pass truncate=True or shorten it."
            )
        cut.append(len(w) > room)
        rows.append([*lead, *w[:room], SEP])
    seq = max(map(len, rows))
    tokens = [r + [PAD] * (seq - len(r)) for r in rows]
    input_ids = torch.tensor([vocab.ids(r) for r in tokens], dtype=torch.long)             # [batch, seq]
    lengths = torch.tensor([len(r) for r in rows])
    attention_mask = torch.arange(seq)[None, :] < lengths[:, None]                         # [batch, seq]
    special_mask = torch.zeros_like(attention_mask)
    if cls:
        special_mask[:, 0] = True                                                          # [CLS]
    special_mask[torch.arange(len(rows)), lengths - 1] = True                              # [SEP]
    first = len(lead)                                                                      # word i -> token first + i
    word_of_token = [[None] * first + list(range(len(r) - first - 1)) + [None] for r in rows]
    labels, rationale, ids = batch_labels(examples, seq, word_of_token)
    return Batch(input_ids, attention_mask, special_mask, tokens, texts=list(texts), labels=labels,
                 rationale=rationale, ids=ids, truncated=cut)


class BuiltinSizes:
    """Sizes of the lecture's nets, read from `net.cfg` (a TransformerConfig): shared by TextClassifier and Translator."""

    net: TransformerClassifier | TransformerSeq2Seq | TransformerDecoderLM

    @property
    def n_layers(self) -> int:
        return self.net.cfg.n_layers

    @property
    def n_heads(self) -> int:
        return self.net.cfg.n_heads

    @property
    def max_len(self) -> int:
        return self.net.cfg.max_len


class BuiltinClassifier(BuiltinSizes, ClassifierBase):
    """What the built-in classifiers share (`TextClassifier`, the decoders of `attnaudit.model.lm`): the net and
    its `vocab` (ids, special tokens), and the forward: the net itself maps ids and mask to the logits."""

    net: TransformerClassifier | TransformerDecoderLM

    def __init__(self, net: TransformerClassifier | TransformerDecoderLM, vocab: Vocab, *, config: dict | None = None):
        self.net = net
        self.vocab = vocab
        self.config = dict(config or {})
        self.pad_id, self.mask_id, self.cls_id, self.sep_id, self.unk_id = (
            vocab.pad_id, vocab.mask_id, vocab.cls_id, vocab.sep_id, vocab.unk_id)

    @property
    def n_classes(self) -> int:
        return self.net.cfg.n_classes

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- forward ----------------------------------------------------------------------------------
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [batch, seq] and mask [batch, seq] -> logits [batch, n_classes] (read at the net's readout:
        [CLS] or pooled for the encoder, the last real token for a decoder)."""
        self.check_ids(input_ids)
        dev = self.device
        return self.net(input_ids.to(dev), attention_mask.to(dev))

    def embed(self, input_ids: Tensor) -> Tensor:
        self.check_ids(input_ids)
        return self.net.embed(input_ids.to(self.device))                                     # [batch, seq, d_model]

    def logits_from_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        return self.net.forward_embeds(embeds, attention_mask.to(embeds.device))              # [batch, n_classes]


class TextClassifier(BuiltinClassifier):
    """The built-in Transformer classifier behind the model interface (see the module docstring)."""

    kind = "classifier"
    net: TransformerClassifier

    def __init__(self, net: TransformerClassifier, vocab: Vocab, *, label_names: Sequence[str], config: dict | None = None):
        names = class_names(label_names, net.cfg.n_classes)
        super().__init__(net, vocab, config=config)
        self.label_names = names

    # -- description ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        c = self.net.cfg
        return (f"TextClassifier(layers={c.n_layers}, heads={c.n_heads}, d_model={c.d_model}, norm={c.norm!r}, "
                f"pooling={c.pooling!r}, vocab={len(self.vocab)}, labels={list(self.label_names)})")

    # -- text in ----------------------------------------------------------------------------------
    def encode(self, inputs: str | Sequence[str] | Sequence[Example], *, truncate: bool = False) -> Batch:
        """Texts or Examples -> Batch: [CLS] words [SEP], right-padded with [PAD] (`encode_words`)."""
        return encode_words(inputs, self.vocab, max_len=self.max_len, truncate=truncate)

    # -- attention --------------------------------------------------------------------------------
    def output_weight(self, layer: int) -> Tensor:
        block = cast(EncoderLayer, self.net.encoder.layers[layer])
        return block.self_attn.output_weight()                                              # [d_model, head, d_head]


def name_classes(model: AttentionModel[Any], label_names: Sequence[str] | None, *, option: str = "--label-names"):
    """Give a classifier these class names (one per class, in index order) -> the same model; None changes nothing."""
    if label_names is None:
        return model
    names = tuple(label_names)
    if getattr(model, "kind", None) != "classifier":
        raise ValueError(f"{option} names a classifier's classes; this model is a {type(model).__name__}.")
    clf = cast(ClassifierBase, model)            # kind == "classifier": TextClassifier or HFClassifier
    if len(names) != clf.n_classes:
        raise ValueError(f"{option} must name each of the model's {clf.n_classes} classes in index order; got "
                         f"{len(names)} ({', '.join(names)}); the model calls them {', '.join(clf.label_names)}.")
    clf.label_names = names
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "label_names" in config:
        config["label_names"] = list(names)
    return model
