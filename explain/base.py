"""The explainer contract: one verb, `explain(model, batch_or_texts, *, target=None) -> Attribution`.

Constructors only store their keyword arguments (scikit-learn style); `explain` validates them at first
use, puts the model in eval mode for the call (restoring its mode after), resolves the target (None =
the predicted class), asks the subclass for token scores [batch, seq], zeroes padding and records
provenance: the method name, every parameter, the target probability and the wall time.

Before any of that allocates memory, `check_limits` refuses a batch whose cost is out of bounds: each
explainer lists what its size-like parameters would cost on the batch (`costs`, one `Cost` each: forward
passes per example, bytes), and a cost above its limit (MAX_FORWARDS unless the explainer's max_cost raises it)
is refused with the estimate, the limit and the option that raises it.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnaudit.data.examples import Example
from attnaudit.explain.attribution import Attribution
from attnaudit.model.interface import Batch, ExplainableModel
from attnaudit.model.precision import forward_autocast

MAX_FORWARDS = 4096   # forward passes per example an explainer may run, unless its max_cost says more
MAX_ROWS = 65536      # rows (inputs) in one forward pass: the most any max_batch may be


@dataclass(frozen=True)
class Cost:
    """What one size-like parameter would cost on one batch, estimated before anything is allocated.

    Args:
        parameter, value: the parameter and its value ("n_steps", 1_000_000_000).
        amount, limit: the cost (in the unit of `limit`, e.g. forward passes per example) and the most allowed.
        estimate: the figures a refusal states, e.g. "≈ 8e+18 bytes / 1e+09 forward passes per example".
        option: what raises the limit, e.g. "max_cost".
    """

    parameter: str
    value: Any
    amount: float
    limit: float
    estimate: str
    option: str = "max_cost"

    def refusal(self, name: str) -> str | None:
        """None within the limit, else the one-line message."""
        if self.amount <= self.limit:
            return None
        return (f"{name}: {self.parameter}={self.value!r} would need {self.estimate}; the limit is {self.limit:,}; "
                f"pass {self.option}=... (or lower {self.parameter}) to raise it.")


def forwards_cost(parameter: str, value: int, max_cost: int | None, *, per_forward_bytes: float = 0.0,
                  extra_bytes: float = 0.0) -> Cost:
    """The Cost of `value` forward passes per example (each of `per_forward_bytes`), limited by max_cost."""
    limit = MAX_FORWARDS if max_cost is None else max_cost
    total = extra_bytes + value * per_forward_bytes
    memory = f"≈ {total:.1e} bytes / " if total else ""
    return Cost(parameter, value, value, limit, f"{memory}{value:.1e} forward passes per example")


def check_max_cost(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_cost must be an int >= 1 (forward passes per example) or None (the default limit, "
                         f"{MAX_FORWARDS}); got {value!r}.")


def short_repr(value: Any) -> str:
    """A value as an error message shows it: a tensor or array by its shape and dtype, anything else clipped."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_choice(name: str, value: object, choices: Sequence[str], hint: str = "") -> None:
    """`value` must be one of `choices`; else ValueError naming the parameter, the choices and what came, then `hint`.

    >>> check_choice("readout", "first", ("cls", "mean"))
    ValueError: readout must be one of 'cls', 'mean'; got 'first'.
    """
    if isinstance(value, (str, type(None), int, float, bool)) and value in choices:
        return
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {short_repr(value)}.{hint}")


class Explainer:
    """Base class. Subclasses set `name` and `family` and implement `scores(model, batch, target)`."""

    name: str = ""
    family: str = ""          # "attention", "gradient", "perturbation" or "control"

    def get_params(self) -> dict[str, Any]:
        """The constructor's keyword arguments as stored (provenance for reports): `type(e)(**e.get_params())`
        rebuilds e, as constructors store each argument verbatim under its own name (tests/test_explain_clone.py).
        """
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self" and hasattr(self, p)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def validate(self, model: ExplainableModel) -> None:
        """Check the stored parameters against the model; raise ValueError naming parameter, rule, value."""

    def costs(self, model: ExplainableModel, batch: Batch) -> list[Cost]:
        """What the size-like parameters would cost on `batch` (none by default); computed, never allocated."""
        return []

    def check_limits(self, model: ExplainableModel, batch: Batch) -> None:
        """Refuse a batch this explainer would need too much time or memory for, before allocating anything.

        Raise ValueError naming the limit, the value it would take and the option that raises it.
        """
        for cost in self.costs(model, batch):
            message = cost.refusal(self.name)
            if message:
                raise ValueError(message)

    def scores(self, model: ExplainableModel, batch: Batch,
               target: Tensor) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Token scores [batch, seq] for class `target` [batch]; optionally (scores, extras)."""
        raise NotImplementedError

    def explain(self, model: ExplainableModel, batch_or_texts, *, target=None) -> Attribution:
        batch = as_batch(model, batch_or_texts)
        self.validate(model)
        self.check_limits(model, batch)
        start = time.perf_counter()
        with model.evaluating(), forward_autocast(model.device):      # bf16 only inside a `precision` block
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
        steps=batch.steps,
    )


def as_batch(model: ExplainableModel, batch_or_texts) -> Batch:
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
        return model.encode([batch_or_texts] if isinstance(batch_or_texts, Example) else batch_or_texts)
    raise TypeError(f"batch_or_texts must be a Batch, a str, or a list of str/Example; got {type(batch_or_texts).__name__}.")


def resolve_target(model: ExplainableModel, target, probs: Tensor) -> Tensor:
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
