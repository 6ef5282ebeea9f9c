"""The one model interface every explainer and analysis uses.

A model is anything with these members (the built-in `TextClassifier` below; a HuggingFace adapter
implements the same):

    batch = model.encode(texts_or_examples)      # Batch: token ids, masks, tokens, labels, rationale
    logits = model(batch)                        # [batch, n_classes]
    embeds = model.embed(batch.input_ids)        # [batch, seq, d_model]: what gradient methods attribute to
    logits = model.logits_from_embeds(embeds, batch.attention_mask)
    model.hook_points()                          # {site name: HookPoint}, attention capture and edits
    model.attention_sites                        # encoder self-attention pattern sites, layer order
    model.output_weight(layer)                   # W^O split by head [d_model, head, d_head]
    model.pad_id, model.mask_id                  # replacement tokens for perturbations
    model.predict_proba(texts)                   # numpy [n, n_classes]

Capture and interventions go through `attnaudit.model.hooks.record` / `hooks` on those sites.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from attnaudit.data.examples import Example
from attnaudit.model.hooks import HookPoint
from attnaudit.model.transformer import TransformerClassifier
from attnaudit.model.vocab import CLS, PAD, SEP, Vocab, words


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

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if isinstance(v, Tensor)})

    def select(self, index: Sequence[int] | slice) -> Batch:
        """A sub-batch (examples `index`), trimmed to its longest sequence."""
        idx = list(range(len(self)))[index] if isinstance(index, slice) else list(index)
        seq = int(self.attention_mask[idx].sum(1).max()) if idx else 0
        out = {}
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


class ClassifierSurface:
    """What every classifier interface shares (ours and the HuggingFace adapter): eval mode, predictions.

    Subclasses have `net` (an nn.Module), `encode`, `__call__`, `label_names` and `n_classes`.
    """

    PREDICT_BATCH = 256

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device):
        """Move the weights to `device` -> self."""
        self.net.to(device)
        return self

    @contextmanager
    def evaluating(self) -> Iterator[ClassifierSurface]:
        """Eval mode inside the block (no dropout: deterministic), the previous mode restored after."""
        was = self.net.training
        self.net.eval()
        try:
            yield self
        finally:
            self.net.train(was)

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


class TextClassifier(ClassifierSurface):
    """The built-in Transformer classifier behind the model interface (see the module docstring)."""

    kind = "classifier"

    def __init__(self, net: TransformerClassifier, vocab: Vocab, *, label_names: Sequence[str], config: dict | None = None):
        if len(label_names) != net.cfg.n_classes:
            raise ValueError(f"label_names must have n_classes={net.cfg.n_classes} entries; got {len(label_names)}.")
        self.net = net
        self.vocab = vocab
        self.label_names = tuple(label_names)
        self.config = dict(config or {})
        self.pad_id, self.mask_id, self.cls_id, self.sep_id, self.unk_id = (
            vocab.pad_id, vocab.mask_id, vocab.cls_id, vocab.sep_id, vocab.unk_id)

    # -- description ------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return self.net.cfg.n_classes

    @property
    def n_layers(self) -> int:
        return self.net.cfg.n_layers

    @property
    def n_heads(self) -> int:
        return self.net.cfg.n_heads

    @property
    def max_len(self) -> int:
        return self.net.cfg.max_len

    def __repr__(self) -> str:
        c = self.net.cfg
        return (f"TextClassifier(layers={c.n_layers}, heads={c.n_heads}, d_model={c.d_model}, norm={c.norm!r}, "
                f"pooling={c.pooling!r}, vocab={len(self.vocab)}, labels={list(self.label_names)})")

    # -- text in ----------------------------------------------------------------------------------
    def encode(self, inputs: str | Sequence[str] | Sequence[Example], *, truncate: bool = False) -> Batch:
        """Texts or Examples -> Batch: [CLS] words [SEP], right-padded with [PAD].

        An example longer than max_len raises unless `truncate=True` (then words are cut and
        `batch.truncated` says which examples were).
        """
        if isinstance(inputs, (str, Example)):
            inputs = [inputs]
        if len(inputs) == 0:
            raise ValueError("inputs must hold at least one text; got an empty list.")
        examples = [x if isinstance(x, Example) else None for x in inputs]
        texts = [x.text if isinstance(x, Example) else x for x in inputs]
        rows, cut = [], []
        room = self.max_len - 2
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"inputs[{i}] must be a str or an Example; got {type(t).__name__}.")
            w = words(t)
            if not w:
                raise ValueError(f"inputs[{i}] is empty or whitespace-only; every example needs at least one word.")
            if len(w) > room and not truncate:
                raise ValueError(
                    f"inputs[{i}] has {len(w)} words but this model takes at most {room} "
                    f"(max_len={self.max_len} minus [CLS] and [SEP]); pass truncate=True or shorten it."
                )
            cut.append(len(w) > room)
            rows.append([CLS, *w[:room], SEP])
        seq = max(map(len, rows))
        tokens = [r + [PAD] * (seq - len(r)) for r in rows]
        input_ids = torch.tensor([self.vocab.ids(r) for r in tokens], dtype=torch.long)        # [batch, seq]
        lengths = torch.tensor([len(r) for r in rows])
        attention_mask = torch.arange(seq)[None, :] < lengths[:, None]                         # [batch, seq]
        special_mask = torch.zeros_like(attention_mask)
        special_mask[:, 0] = True
        special_mask[torch.arange(len(rows)), lengths - 1] = True                              # [SEP]
        labels = rationale = ids = None
        if all(e is not None and e.label is not None for e in examples):
            labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        if all(e is not None and e.rationale is not None for e in examples):
            rationale = torch.zeros(len(rows), seq)
            for i, e in enumerate(examples):
                r = torch.tensor(e.rationale[:room], dtype=torch.float)
                rationale[i, 1 : 1 + len(r)] = r                                               # word i -> token i+1
        if all(e is not None for e in examples):
            ids = [e.id for e in examples]
        return Batch(input_ids, attention_mask, special_mask, tokens, texts=list(texts), labels=labels,
                     rationale=rationale, ids=ids, truncated=cut)

    # -- forward ----------------------------------------------------------------------------------
    def __call__(self, batch: Batch) -> Tensor:
        return self.logits(batch.input_ids, batch.attention_mask)

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [batch, seq] and mask [batch, seq] -> logits [batch, n_classes]."""
        self.check_ids(input_ids)
        dev = self.device
        return self.net(input_ids.to(dev), attention_mask.to(dev))

    def embed(self, input_ids: Tensor) -> Tensor:
        self.check_ids(input_ids)
        return self.net.embed(input_ids.to(self.device))                                     # [batch, seq, d_model]

    def logits_from_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        return self.net.forward_embeds(embeds, attention_mask.to(embeds.device))              # [batch, n_classes]

    def check_ids(self, input_ids: Tensor) -> None:
        """Ids outside the vocabulary would index garbage (or crash on CUDA): refuse them first."""
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor; got {input_ids.dtype}.")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= len(self.vocab)):
            raise ValueError(
                f"input_ids must lie in [0, {len(self.vocab) - 1}] (the vocabulary size is {len(self.vocab)}); "
                f"got values from {int(input_ids.min())} to {int(input_ids.max())}."
            )

    # -- attention --------------------------------------------------------------------------------
    def hook_points(self) -> dict[str, HookPoint]:
        return {n: m for n, m in self.net.named_modules() if isinstance(m, HookPoint)}

    @property
    def attention_sites(self) -> list[str]:
        return [f"encoder.layers.{i}.self_attn.pattern" for i in range(self.n_layers)]

    def output_weight(self, layer: int) -> Tensor:
        return self.net.encoder.layers[layer].self_attn.output_weight()                     # [d_model, head, d_head]
