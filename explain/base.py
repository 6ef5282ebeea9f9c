"""The explainer contract: one verb, `explain(model, batch_or_texts, *, target=None) -> Attribution`.

Constructors only store their keyword arguments (scikit-learn style); `explain` validates them at first
use, puts the model in eval mode for the call (restoring its mode after), resolves the target (None =
the predicted class), asks the subclass for token scores [batch, seq], zeroes padding and records
provenance: the method name, every parameter, the target probability and the wall time.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attnaudit.explain.attribution import Attribution
from attnaudit.model.data import Example
from attnaudit.model.interface import Batch


class Explainer:
    """Base class. Subclasses set `name` and `family` and implement `scores(model, batch, target)`."""

    name: str = ""
    family: str = ""          # "attention", "gradient", "perturbation" or "control"

    def get_params(self) -> dict[str, Any]:
        """The constructor's keyword arguments as stored (provenance for reports)."""
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self" and hasattr(self, p)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def validate(self, model) -> None:
        """Check the stored parameters against the model; raise ValueError naming parameter, rule, value."""

    def check_limits(self, model, batch: Batch) -> None:
        """Refuse a batch this explainer would need too much time or memory for, before allocating anything.

        Raise ValueError naming the limit, the value it would take and the option that raises it.
        """

    def scores(self, model, batch: Batch, target: Tensor) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Token scores [batch, seq] for class `target` [batch]; optionally (scores, extras)."""
        raise NotImplementedError

    def explain(self, model, batch_or_texts, *, target=None) -> Attribution:
        batch = as_batch(model, batch_or_texts)
        self.validate(model)
        self.check_limits(model, batch)
        start = time.perf_counter()
        with model.evaluating():
            with torch.no_grad():
                probs = model(batch).float().softmax(-1).cpu()                   # [batch, n_classes]
            tgt = resolve_target(model, target, probs)                            # [batch]
            out = self.scores(model, batch, tgt)
        return package_attribution(self, batch, out, tgt, probs, time.perf_counter() - start)


def package_attribution(explainer: Explainer, batch: Batch, out, target: Tensor, probs: Tensor,
                        seconds: float) -> Attribution:
    """Scores [batch, seq] (or (scores, extras)) -> Attribution: padding zeroed, provenance attached."""
    scores, extras = out if isinstance(out, tuple) else (out, {})
    scores = scores.detach().float().cpu()
    if tuple(scores.shape) != tuple(batch.input_ids.shape):
        raise RuntimeError(f"{explainer.name} produced scores of shape {tuple(scores.shape)}; expected "
                           f"{tuple(batch.input_ids.shape)} (an explainer bug, please report it).")
    scores = scores.masked_fill(~batch.attention_mask.cpu(), 0.0)                # exactly 0 on padding
    return Attribution(
        scores=scores, input_ids=batch.input_ids.cpu(), attention_mask=batch.attention_mask.cpu(),
        special_mask=batch.special_mask.cpu(), tokens=batch.tokens, target=target.cpu(),
        target_prob=probs.gather(1, target.cpu()[:, None])[:, 0], method=explainer.name,
        params=explainer.get_params(), seconds=seconds,
        extras={k: v.detach().float().cpu() for k, v in extras.items()}, ids=batch.ids, texts=batch.texts,
    )


def as_batch(model, batch_or_texts) -> Batch:
    """A Batch as is; a text, list of texts or list of Examples encoded with the model's tokenizer."""
    if isinstance(batch_or_texts, Batch):
        empty = (~batch_or_texts.attention_mask.any(1)).nonzero()[:, 0].tolist()
        if empty:
            ids = batch_or_texts.ids
            raise ValueError(f"every example needs at least one real token; example "
                             f"{ids[empty[0]] if ids else empty[0]!r} is all padding (its attention_mask row is all False).")
        return batch_or_texts
    if isinstance(batch_or_texts, (str, Example)) or (
        isinstance(batch_or_texts, Sequence) and all(isinstance(x, (str, Example)) for x in batch_or_texts)
    ):
        return model.encode(batch_or_texts)
    raise TypeError(f"batch_or_texts must be a Batch, a str, or a list of str/Example; got {type(batch_or_texts).__name__}.")


def resolve_target(model, target, probs: Tensor) -> Tensor:
    """None -> predicted class; an int, a label name, or one per example (list / LongTensor) -> [batch] long."""
    b, n_classes = probs.shape
    if target is None:
        return probs.argmax(-1)
    names = list(getattr(model, "label_names", ()))
    rule = (f"target must be None (the predicted class), a class index in [0, {n_classes - 1}]"
            + (f", a label name in {names}" if names else "") + ", or one of those per example")
    items = target.tolist() if isinstance(target, Tensor) else target
    if isinstance(items, (int, str)) or (isinstance(target, Tensor) and target.dim() == 0):
        items = [items] * b
    if not isinstance(items, (list, tuple)) or len(items) != b:
        raise ValueError(f"{rule}; got {target!r} for a batch of {b}.")
    out = []
    for t in items:
        if isinstance(t, str):
            if t not in names:
                raise ValueError(f"{rule}; got the label {t!r}, which this model does not have.")
            t = names.index(t)
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_classes:
            raise ValueError(f"{rule}; got {t!r}.")
        out.append(t)
    return torch.tensor(out, dtype=torch.long)
