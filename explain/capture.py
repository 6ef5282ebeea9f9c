"""One forward (and at most one backward) that every attention explainer of a batch can share.

Attention-based explanations read the encoder's self-attention probabilities A (Vaswani et al. 2017), the
value vectors and W^O (norm-based analysis, Kobayashi et al. 2020) and the gradient of the explained logit
with respect to A (Chefer et al. 2021). `capture` records all of them from a single pass:

    cap = capture(model, batch, target, grads=True)
    cap.patterns      # [layer, batch, head, query, key]
    cap.grads         # [layer, batch, head, query, key]: d(logit of target)/dA, one backward for the batch

Examples in a batch are independent (padding is masked, eval mode has no dropout), so one backward of the
sum over the batch of the target logits gives every example's own gradient.

Memory. A full capture keeps L patterns [batch, head, seq, seq] (and L gradients): 12 layers × 12 heads ×
512² float32 is 151 MB per example. An explainer's `reads` says what it needs, and `capture(..., reads=...)`
keeps only that: the raw patterns of the layers it reads, gradients only there, values only for
`attention_norm`, and `Fold`s that reduce each layer as the forward (or the backward) reaches it, so
rollout keeps one [batch, seq, seq] product instead of L patterns. The folds run the very operations the
explainers ran on the full capture, on the same tensors, so the scores are the same bits
(tests/test_capture_memory.py). `capture_precision("float16")` keeps what is captured in half precision.
"""
from __future__ import annotations

import contextvars
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from attnaudit.explain.base import Explainer, short_repr
from attnaudit.model.hooks import hooks, observing
from attnaudit.model.interface import Batch, ExplainableModel
from attnaudit.model.steps import readout_rows, reads_last, shared_carriers

CAPTURE_DTYPES = (None, "float32", "float16", "bfloat16")
_CAPTURE_DTYPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnaudit_capture_dtype", default=None)


def check_capture_dtype(value) -> None:
    """None or a name in CAPTURE_DTYPES; else ValueError naming the parameter, the choices and the value."""
    if value is None or (isinstance(value, str) and value in CAPTURE_DTYPES):
        return
    raise ValueError(f"capture_dtype must be one of {', '.join(map(repr, CAPTURE_DTYPES))}; got {short_repr(value)}. "
                     "It is the dtype the captured attention patterns and gradients are kept in (None: the model's).")


@contextmanager
def capture_precision(capture_dtype: str | None) -> Iterator[None]:
    """Keep the attention captured inside the block in `capture_dtype` ("float16", "bfloat16"; None = the model's).

    Explainers read the kept tensors converted back to the model's dtype, so only their rounding changes: on
    the 3-layer, 4-head test model the largest change to any score of the 15 settings of
    tests/test_capture_memory.py is 6.4e-4 with float16 (attention_norm; at most 5e-4 of the largest score of
    any explainer) and 4.7e-3 with bfloat16. It halves what is kept raw (raw attention's layer, a full capture);
    the folded explainers (rollout, flow, grad_attention, ...) keep no patterns, so for them only rounding changes.

    >>> with capture_precision("float16"):
    ...     attribution = get_explainer("attention", layer="mean").explain(model, batch)
    """
    check_capture_dtype(capture_dtype)
    token = _CAPTURE_DTYPE.set(capture_dtype)
    try:
        yield
    finally:
        _CAPTURE_DTYPE.reset(token)


class Fold:
    """A reduction of each layer's capture, run as the forward (and, with `grads`, the backward) reaches it.

    `key` names the result (two folds with one key compute the same thing, so a shared capture runs one);
    `layers` are the layers it reads; `reset` clears its state; `forward` sees each pattern [batch, head, query, key] (with the value
    vectors and W^O when `values`), `backward` each pattern with its gradient; `result()` is what the
    explainer reads as `capture.folds[key]`. Tensors reach it detached and contiguous, as a stack's slices are.
    """

    grads = False
    values = False
    batch_dim = 0             # where the result's batch dimension is ([layer, batch, ...] folds set 1)

    def __init__(self, layers: tuple[int, ...]):
        self.layers = layers
        self.reset()

    def reset(self) -> None:
        """Forget what an earlier capture folded (`capture` calls it first, so a `Reads` can be used again)."""

    @property
    def key(self) -> Hashable:
        raise NotImplementedError

    def forward(self, layer: int, pattern: Tensor, mask: Tensor, values: Tensor | None, w_o: Tensor | None) -> None:
        """Called in layer order."""

    def backward(self, layer: int, pattern: Tensor, grad: Tensor, mask: Tensor) -> None:
        """Called once per layer of `layers`, in no particular order."""

    def result(self) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Reads:
    """What an explainer reads from a capture: raw patterns, gradients and value vectors of some layers, and folds."""

    patterns: frozenset[int] = frozenset()
    grads: frozenset[int] = frozenset()
    values: frozenset[int] = frozenset()
    folds: tuple[Fold, ...] = ()

    def __or__(self, other: Reads) -> Reads:
        keys = {f.key for f in self.folds}
        return Reads(self.patterns | other.patterns, self.grads | other.grads, self.values | other.values,
                     self.folds + tuple(f for f in other.folds if f.key not in keys))


def everything(n_layers: int, *, grads: bool, values: bool = True) -> Reads:
    """The full capture: every layer's pattern (and gradient, and value vectors)."""
    every = frozenset(range(n_layers))
    return Reads(every, every if grads else frozenset(), every if values else frozenset())


@dataclass(frozen=True)
class Capture:
    """What the attention explainers read; every tensor is detached.

    layer_patterns, layer_grads: layer -> [batch, head, query, key] (padded query rows and key columns 0), kept
    in `capture_dtype`; layer_values: layer -> [batch, head, key, d_head]; layer_output_weights: layer ->
    [d_model, head, d_head]; folds: `Fold.key` -> its result; n_layers; attention_mask [batch, seq] bool;
    dtype: the model's, what `pattern` and the stacks return; seconds: the wall time of the capture.
    The stacks `patterns`, `grads`, `values`, `output_weights` are [layer, ...] over every layer (None for
    grads, values and output_weights when none were kept).
    """

    layer_patterns: dict[int, Tensor]
    layer_values: dict[int, Tensor]
    layer_output_weights: dict[int, Tensor]
    layer_grads: dict[int, Tensor]
    folds: dict[Hashable, Any]
    n_layers: int
    attention_mask: Tensor
    dtype: torch.dtype
    seconds: float
    capture_dtype: str | None = None
    reads: Reads = field(default_factory=Reads)
    readout_rows: Tensor | None = None      # [batch] the position each prediction is read from; None = 0 ([CLS])

    def pattern(self, layer: int) -> Tensor:
        """One layer's pattern [batch, head, query, key] in the model's dtype."""
        return self._kept(self.layer_patterns, layer, "pattern").to(self.dtype).contiguous()

    def _kept(self, kept: dict[int, Tensor], layer: int, what: str) -> Tensor:
        if layer not in kept:
            raise KeyError(f"this capture kept the {what} of layers {sorted(kept)} only, not layer {layer}; capture "
                           "with reads=None (everything) or with the explainer's reads.")
        return kept[layer]

    def _stack(self, kept: dict[int, Tensor], what: str) -> Tensor:
        return torch.stack([self._kept(kept, i, what) for i in range(self.n_layers)]).to(self.dtype)

    @property
    def patterns(self) -> Tensor:
        """[layer, batch, head, query, key]."""
        return self._stack(self.layer_patterns, "pattern")

    @property
    def grads(self) -> Tensor | None:
        """[layer, batch, head, query, key] d(logit of target)/dA, or None when captured without gradients."""
        return self._stack(self.layer_grads, "gradient") if self.layer_grads else None

    @property
    def values(self) -> Tensor | None:
        """[layer, batch, head, key, d_head], or None when the model has no value sites (or they were not read)."""
        return self._stack(self.layer_values, "values") if self.layer_values else None

    @property
    def output_weights(self) -> Tensor | None:
        """[layer, d_model, head, d_head] W^O split by head, or None beside values None."""
        return self._stack(self.layer_output_weights, "W^O") if self.layer_output_weights else None


def values_site(pattern_site: str) -> str:
    """The value-vector site beside a pattern site: ``...self_attn.pattern`` -> ``...self_attn.values``."""
    return pattern_site.rsplit(".", 1)[0] + ".values"


def has_value_sites(model: ExplainableModel) -> bool:
    points = model.hook_points()
    return all(values_site(s) in points for s in model.attention_sites)


def capture(model: ExplainableModel, batch: Batch, target: Tensor, *, grads: bool = False, reads: Reads | None = None,
            capture_dtype: str | None = None) -> Capture:
    """Record the encoder's attention in one forward; with gradients also dA from one backward.

    Args:
        model: the model interface (`attention_sites`, `embed`, `logits_from_embeds`, `output_weight`).
        batch: the inputs; target: [batch] long, the class whose logit is differentiated.
        grads: with reads=None, also compute d(logit of target)/d(pattern) for every layer.
        reads: what to keep (`Reads`, an explainer's `reads(model)`); None keeps everything (the full capture).
        capture_dtype: keep patterns and gradients in "float16" or "bfloat16"; None: the model's dtype, or the
            one `capture_precision` set.
    Returns:
        a `Capture`. Call inside `model.evaluating()` (as `Explainer.explain` does) for deterministic values.
    """
    start = time.perf_counter()
    capture_dtype = capture_dtype or _CAPTURE_DTYPE.get()
    check_capture_dtype(capture_dtype)
    keep_dtype = None if capture_dtype is None else getattr(torch, capture_dtype)
    sites = list(model.attention_sites)
    has_values = has_value_sites(model)
    if reads is None:
        reads = everything(len(sites), grads=grads, values=has_values)
    value_layers = set(reads.values) | {i for f in reads.folds if f.values for i in f.layers}
    if value_layers and not has_values:
        raise ValueError("this capture reads the value vectors, but the model has no `values` hook sites beside its "
                         "attention `pattern` sites.")
    grad_folds = [f for f in reads.folds if f.grads]
    grad_layers = set(reads.grads) | {i for f in grad_folds for i in f.layers}
    want_grads = bool(grad_layers)
    mask = batch.attention_mask
    if not want_grads and reads_last(model):
        shared = _shared_prefixes(model, batch, reads, capture_dtype, start)
        if shared is not None:
            return shared
    kept: dict[int, Tensor] = {}
    kept_values: dict[int, Tensor] = {}
    weights: dict[int, Tensor] = {}
    live: dict[int, Tensor] = {}                      # layer -> the pattern in the graph, for the backward
    seen_values: dict[int, Tensor] = {}
    device_mask: list[Tensor] = []                   # the mask on the patterns' device, and their dtype
    pattern_dtype: list[torch.dtype] = []

    def keep(t: Tensor) -> tuple[Tensor, Tensor]:
        """-> (as kept, as read): in capture_dtype, and converted back (contiguous, as a stack's slice is)."""
        t = t.detach()
        if keep_dtype is None or keep_dtype == t.dtype:
            return t, t.contiguous()
        low = t.to(keep_dtype)
        return low, low.to(t.dtype).contiguous()

    def on_values(layer: int):
        def watch(v: Tensor) -> None:
            seen_values[layer] = v.detach()
        return watch

    def on_pattern(layer: int):
        def watch(p: Tensor) -> None:
            if not device_mask:
                device_mask.append(mask.to(p.device))
                pattern_dtype.append(p.dtype)
            folds = [f for f in reads.folds if layer in f.layers]
            if layer in reads.patterns or folds:
                stored, read = keep(p)
            if layer in reads.patterns:
                kept[layer] = stored
            values = w_o = None
            if layer in value_layers:
                values = seen_values.pop(layer).contiguous()                      # [batch, head, key, d_head]
                w_o = model.output_weight(layer).detach().contiguous()            # [d_model, head, d_head]
                if layer in reads.values:
                    kept_values[layer], weights[layer] = values, w_o
            for fold in folds:
                fold.forward(layer, read, device_mask[0], values, w_o)
            if layer in grad_layers:
                live[layer] = p
        return watch

    for fold in reads.folds:
        fold.reset()
    watchers = {s: on_pattern(i) for i, s in enumerate(sites)}
    watchers.update({values_site(s): on_values(i) for i, s in enumerate(sites) if i in value_layers})
    kept_grads: dict[int, Tensor] = {}
    # in_graph is attached first so that the watchers see (and differentiate) what the forward used
    with hooks(model, {sites[i]: in_graph for i in sorted(grad_layers)}), observing(model, watchers), \
            torch.set_grad_enabled(want_grads):
        embeds = model.embed(batch.input_ids)                                         # [batch, seq, d_model]
        if want_grads:
            embeds = embeds.detach().requires_grad_()    # the graph exists even if the weights are frozen
        logits = model.logits_from_embeds(embeds, mask)                               # [batch, n_classes]
        if want_grads:
            chosen = logits.gather(1, target.to(logits.device)[:, None])              # [batch, 1]
            kept_grads = backward(chosen.sum(), live, reads.grads, grad_folds, sites, keep, device_mask[0])
    return Capture(kept, kept_values, weights, kept_grads, {f.key: f.result() for f in reads.folds}, len(sites),
                   mask.to(embeds.device), (pattern_dtype or [embeds.dtype])[0], time.perf_counter() - start,
                   capture_dtype, reads, readout_rows(model, mask.to(embeds.device)))


def _shared_prefixes(model: ExplainableModel, batch: Batch, reads: Reads, capture_dtype: str | None,
                     start: float) -> Capture | None:
    """A decoder's rows that are prefixes of longer rows (generation steps) captured from those rows' forward.

    Under a causal mask a prefix's patterns are the longer row's first query rows and key columns, and so are
    rollout's and the norms' products (lower-triangular), so one forward per distinct longest row serves every
    step (`attnaudit.model.steps.carriers`). Patterns and values are cut back to each row's own positions; the
    readout row is each row's last real token. None when no row is shared (nothing to save). No gradients: each
    step's target would need its own backward.
    """
    shared = shared_carriers(batch.input_ids, batch.attention_mask)
    if shared is None:
        return None
    chosen, owner = shared
    sub = replace(batch, input_ids=batch.input_ids[chosen], attention_mask=batch.attention_mask[chosen],
                  special_mask=batch.special_mask[chosen], tokens=[batch.tokens[i] for i in chosen.tolist()],
                  texts=None, labels=None, rationale=None, ids=None, truncated=None, steps=None)
    target = torch.zeros(len(chosen), dtype=torch.long)                      # unused: no gradient is taken
    part = capture(model, sub, target, reads=reads, capture_dtype=capture_dtype)
    dev = part.attention_mask.device
    index = owner.to(dev)
    mask = batch.attention_mask.to(dev)                                      # [batch, seq]
    pairs = (mask[:, None, :, None] & mask[:, None, None, :])                # [batch, 1, query, key]

    def rows(t: Tensor) -> Tensor:                                           # [batch, head, query, key]
        return t.index_select(0, index.to(t.device)) * pairs.to(t.device)

    values = {k: v.index_select(0, index.to(v.device)) * mask[:, None, :, None].to(v.device)
              for k, v in part.layer_values.items()}                         # [batch, head, key, d_head]
    folds = {f.key: part.folds[f.key].index_select(f.batch_dim, index.to(part.folds[f.key].device))
             for f in reads.folds}
    return Capture({k: rows(v) for k, v in part.layer_patterns.items()}, values, part.layer_output_weights, {},
                   folds, part.n_layers, mask, part.dtype, time.perf_counter() - start, capture_dtype, reads,
                   readout_rows(model, mask))



def backward(total: Tensor, live: dict[int, Tensor], raw: frozenset[int], folds: list[Fold], sites: list[str],
             keep, mask: Tensor) -> dict[int, Tensor]:
    """One backward of `total` -> {layer: dA} for the `raw` layers; the folds get theirs from tensor hooks.

    A gradient is kept only where it is read raw: the folds' layers get d(total)/dA from a hook on the
    pattern (the same accumulated gradient that autograd.grad returns) and reduce it at once. autograd.grad
    is asked for the raw layers, the graph's leaves (sites an earlier edit made constant) and the earliest
    folded layer, whose backward passes every later one. Examples are independent: one backward of the sum
    gives each its own dlogit/dA, and autograd.grad (not .backward()) leaves the weights' .grad untouched.
    """
    folded = sorted({i for f in folds for i in f.layers})
    fired: set[int] = set()

    def reduce(layer: int, grad: Tensor) -> None:
        fired.add(layer)
        _, grad_read = keep(grad)
        pattern = live[layer].detach().contiguous()
        for fold in folds:
            if layer in fold.layers:
                fold.backward(layer, keep(pattern)[1], grad_read, mask)

    inner = [i for i in folded if live[i].grad_fn is not None]
    asked = sorted(set(raw) | {i for i in folded if live[i].grad_fn is None} | set(inner[:1]))
    handles = [live[i].register_hook(lambda g, i=i: reduce(i, g)) for i in folded if i not in asked]
    try:
        found = torch.autograd.grad(total, [live[i] for i in asked], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    grads: dict[int, Tensor] = {}
    for i, g in zip(asked, found):
        g = _checked(g, sites[i])
        if i in raw:
            grads[i] = keep(g)[0]
        if i in folded:
            reduce(i, g)
    missing = [i for i in folded if i not in fired]
    if missing:
        _checked(None, sites[missing[0]])
    return grads


def in_graph(pattern: Tensor, allowed: Tensor) -> Tensor:
    """Identity edit that keeps a site differentiable even when an earlier edit replaced it by a constant."""
    return pattern if pattern.requires_grad else pattern.detach().clone().requires_grad_()


def _checked(grad: Tensor | None, site: str) -> Tensor:
    if grad is None:
        raise RuntimeError(f"no gradient reached the attention site {site!r}: the target logit does not depend "
                           "on it (was the site replaced by a constant after this capture's hooks?).")
    return grad.detach()


class AttentionExplainer(Explainer):
    """An explainer that reads a `Capture`: `scores` captures what `reads` names, then calls `from_capture`.

    Subclasses set `needs_grads` (True when they read gradients), implement `from_capture` (which must accept a
    full capture, `capture(..., reads=None)`) and may narrow `reads` (the default keeps everything).
    `attnaudit.explain.run.explain_all` shares one capture between all of them.
    """

    family = "attention"
    needs_grads = False

    def reads(self, model: ExplainableModel) -> Reads:
        """What `from_capture` reads (validated parameters): by default every layer's pattern and gradient."""
        return everything(len(model.attention_sites), grads=self.needs_grads, values=has_value_sites(model))

    def from_capture(self, capture: Capture, batch: Batch, target: Tensor) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Token scores [batch, seq] (or (scores, extras)) from a capture of `batch`."""
        raise NotImplementedError

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor):
        return self.from_capture(capture(model, batch, target, reads=self.reads(model)), batch, target)


def shared_reads(model: ExplainableModel, explainers: list[AttentionExplainer]) -> Reads:
    """The union of what `explainers` read, for one capture shared by all of them (`explain_all`)."""
    out = Reads()
    for e in explainers:
        out = out | e.reads(model)
    return out
