"""Named hook sites on attention probabilities: record them (optionally with gradients) and edit them.

Every attention module routes its post-softmax probabilities through a `HookPoint`; its dotted module
name is the site name, e.g. ``encoder.layers.1.self_attn.pattern``. Hooks are attached only inside a
``with`` block and removed on exit, even when the forward raises (TransformerLens-style named sites,
scoped like ``torch.no_grad``).

    logits, cache = record(model, batch, grads=True)
    patterns = cache.stack()                                # [layer, batch, head, query, key]
    with hooks(model, {"encoder.layers.1.self_attn.pattern": zero_head(0)}):
        ablated = model(batch)
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from attnaudit.model.interface import AttentionModel

# An edit receives the probabilities [batch, head, query, key] and the bool mask of allowed
# (query, key) pairs [batch, 1, query, key]; it returns probabilities of the same shape.
Edit = Callable[[Tensor, Tensor], Tensor]


class HookPoint(nn.Module):
    """An identity site: forward(x, allowed) -> x. Record and edit it with `record`/`hooks`.

    Attention modules have two: ``pattern`` (probabilities [batch, head, query, key]) and ``values``
    (value vectors [batch, head, key, d_head], read by norm-based explainers).
    """

    def forward(self, pattern: Tensor, allowed: Tensor) -> Tensor:
        return pattern


def hook_points(model: AttentionModel[Any] | nn.Module) -> dict[str, HookPoint]:
    """All hook sites of `model` (an interface with `.hook_points()` or any nn.Module), in forward order."""
    if hasattr(model, "hook_points"):                       # the interface (or a module that names its own)
        return cast("AttentionModel[Any]", model).hook_points()
    return {name: m for name, m in cast(nn.Module, model).named_modules() if isinstance(m, HookPoint)}


def resolve_sites(model: AttentionModel[Any] | nn.Module, names: str | list[str] | None) -> dict[str, HookPoint]:
    """Site names, or glob patterns such as ``"*.self_attn.pattern"``; None means every ``*.pattern`` site."""
    points = hook_points(model)
    if names is None:
        return {n: p for n, p in points.items() if n.endswith(".pattern")}
    if isinstance(names, str):
        names = [names]
    chosen: dict[str, HookPoint] = {}
    for pattern in names:
        hits = [n for n in points if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"Unknown hook site {pattern!r}. Available: {', '.join(points) or '(none)'}."
            )
        chosen.update((n, points[n]) for n in hits)
    return {n: points[n] for n in points if n in chosen}  # keep forward order


@dataclass
class Cache:
    """Recorded tensors by site name (patterns are [batch, head, query, key]), in forward order."""

    patterns: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.patterns:
            raise KeyError(f"site {name!r} was not recorded. Recorded: {', '.join(self.patterns)}.")
        return self.patterns[name]

    def __len__(self) -> int:
        return len(self.patterns)

    def names(self, pattern: str = "*") -> list[str]:
        return [n for n in self.patterns if fnmatch.fnmatchcase(n, pattern)]

    def stack(self, pattern: str = "*") -> Tensor:
        """The recorded sites matching `pattern`, stacked -> [layer, batch, head, query, key]."""
        names = self.names(pattern)
        if not names:
            raise KeyError(f"no recorded site matches {pattern!r}. Recorded: {', '.join(self.patterns)}.")
        return torch.stack([self.patterns[n] for n in names])

    def grads(self, pattern: str = "*") -> Tensor:
        """d(output)/d(pattern) after `.backward()` on a `grads=True` recording -> [layer, batch, head, query, key]."""
        names = self.names(pattern)
        grads = [self.patterns[n].grad for n in names]
        missing = [n for n, g in zip(names, grads) if g is None]
        if missing or not names:
            raise RuntimeError(
                "no gradient on the recorded patterns: record with grads=True and call .backward() "
                f"on a scalar of the output first (missing for {missing or pattern!r})."
            )
        return torch.stack([g for g in grads if g is not None])                # every one, checked above


@contextmanager
def recording(model: AttentionModel[Any] | nn.Module, names: str | list[str] | None = None, *, grads: bool = False) -> Iterator[Cache]:
    """Record the probabilities of the chosen sites during every forward inside the block.

    With ``grads=True`` the recorded tensors stay in the autograd graph and keep their ``.grad``, so
    ``cache.grads()`` reads d(output)/d(attention) after a backward. Otherwise they are detached.
    A second forward in the same block overwrites the first one's entries.
    """
    cache = Cache()
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            if grads:
                if output.requires_grad:
                    output.retain_grad()
                cache.patterns[name] = output
            else:
                cache.patterns[name] = output.detach()

        return hook

    try:
        for name, point in resolve_sites(model, names).items():
            handles.append(point.register_forward_hook(make_hook(name)))
        yield cache
    finally:
        for h in handles:
            h.remove()


@contextmanager
def observing(model: AttentionModel[Any] | nn.Module, watchers: dict[str, Callable[[Tensor], None]]) -> Iterator[None]:
    """Call `watchers[site](output)` at every forward of each named site inside the block; nothing is stored.

    Unlike `recording`, which keeps every tensor, a watcher reduces what it needs as the forward goes (e.g. the
    attention capture folds rollout layer by layer) and the site's tensor is freed with the layer.
    """
    handles = []

    def make_hook(watch: Callable[[Tensor], None]):
        def hook(module, args, output):
            watch(output)

        return hook

    try:
        for name, watch in watchers.items():
            for point in resolve_sites(model, name).values():
                handles.append(point.register_forward_hook(make_hook(watch)))
        yield
    finally:
        for h in handles:
            h.remove()


def record(model: AttentionModel[Any] | nn.Module, batch: Any, names: str | list[str] | None = None, *,
           grads: bool = False) -> tuple[Tensor, Cache]:
    """Run `model(batch)` once and return (logits, cache of the chosen sites).

    Recording never changes the output: the sites are identities and the hooks only store tensors.
    """
    with recording(model, names, grads=grads) as cache, torch.set_grad_enabled(grads or torch.is_grad_enabled()):
        logits = model(batch)
    return logits, cache


@contextmanager
def hooks(model: AttentionModel[Any] | nn.Module, edits: dict[str, Edit]) -> Iterator[None]:
    """Replace the probabilities at the named sites (names or glob patterns) by `edit(pattern, allowed)`."""
    handles = []

    def make_hook(name: str, edit: Edit):
        def hook(module, args, output):
            new = edit(output, args[1])
            if not isinstance(new, Tensor) or new.shape != output.shape:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(
                    f"the edit at {name!r} must return a tensor of shape {tuple(output.shape)} "
                    f"[batch, head, query, key]; got {got}."
                )
            return new.to(output.dtype)

        return hook

    try:
        for pattern, edit in edits.items():
            if not callable(edit):
                raise TypeError(f"edits[{pattern!r}] must be callable (pattern, allowed) -> pattern; got {type(edit).__name__}.")
            for name, point in resolve_sites(model, pattern).items():
                handles.append(point.register_forward_hook(make_hook(name, edit)))
        yield
    finally:
        for h in handles:
            h.remove()


def active_hook_count(module: nn.Module) -> int:
    """How many forward / pre-forward / backward / pre-backward hooks remain anywhere in `module` (0 outside `with`)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {})) for m in module.modules()
    )
