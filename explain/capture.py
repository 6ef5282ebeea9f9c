"""One forward (and at most one backward) that every attention explainer of a batch can share.

Attention-based explanations read the encoder's self-attention probabilities A (Vaswani et al. 2017), the
value vectors and W^O (norm-based analysis, Kobayashi et al. 2020) and the gradient of the explained logit
with respect to A (Chefer et al. 2021). `capture` records all of them from a single pass:

    cap = capture(model, batch, target, grads=True)
    cap.patterns      # [layer, batch, head, query, key]
    cap.grads         # [layer, batch, head, query, key]: d(logit of target)/dA, one backward for the batch

Examples in a batch are independent (padding is masked, eval mode has no dropout), so one backward of the
sum over the batch of the target logits gives every example's own gradient.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from attnaudit.explain.base import Explainer
from attnaudit.model.hooks import hooks, recording
from attnaudit.model.interface import Batch, ExplainableModel


@dataclass(frozen=True)
class Capture:
    """What the attention explainers read; every tensor is detached.

    patterns [layer, batch, head, query, key] (padded query rows and key columns 0); values
    [layer, batch, head, key, d_head] and output_weights [layer, d_model, head, d_head] (None when the model
    has no value sites); grads like patterns (None unless captured with grads=True); attention_mask
    [batch, seq] bool; seconds: the wall time of the capture.
    """

    patterns: Tensor
    values: Tensor | None
    output_weights: Tensor | None
    grads: Tensor | None
    attention_mask: Tensor
    seconds: float


def values_site(pattern_site: str) -> str:
    """The value-vector site beside a pattern site: ``...self_attn.pattern`` -> ``...self_attn.values``."""
    return pattern_site.rsplit(".", 1)[0] + ".values"


def capture(model: ExplainableModel, batch: Batch, target: Tensor, *, grads: bool) -> Capture:
    """Record the encoder's attention of every layer in one forward; with grads=True also dA from one backward.

    Args:
        model: the model interface (`attention_sites`, `embed`, `logits_from_embeds`, `output_weight`).
        batch: the inputs; target: [batch] long, the class whose logit is differentiated.
        grads: also compute d(logit of target)/d(pattern) for every layer.
    Returns:
        a `Capture`. Call inside `model.evaluating()` (as `Explainer.explain` does) for deterministic values.
    """
    start = time.perf_counter()
    sites = list(model.attention_sites)
    points = model.hook_points()
    value_sites = [values_site(s) for s in sites]
    has_values = all(v in points for v in value_sites)
    mask = batch.attention_mask
    # in_graph is attached first so that the recording sees (and differentiates) what the forward used
    with hooks(model, {s: in_graph for s in sites} if grads else {}), \
            recording(model, sites + (value_sites if has_values else []), grads=grads) as cache, \
            torch.set_grad_enabled(grads):
        embeds = model.embed(batch.input_ids)                                         # [batch, seq, d_model]
        if grads:
            embeds = embeds.detach().requires_grad_()    # the graph exists even if the weights are frozen
        logits = model.logits_from_embeds(embeds, mask)                               # [batch, n_classes]
        pattern_grads = None
        if grads:
            chosen = logits.gather(1, target.to(logits.device)[:, None])              # [batch, 1]
            # examples are independent: one backward of the sum gives each its own dlogit/dA; autograd.grad
            # (not .backward()) leaves the weights' .grad untouched
            found = torch.autograd.grad(chosen.sum(), [cache[s] for s in sites], allow_unused=True)
            pattern_grads = torch.stack([_checked(g, s) for g, s in zip(found, sites)])  # [layer, batch, head, query, key]
    patterns = torch.stack([cache[s].detach() for s in sites])                        # [layer, batch, head, query, key]
    values = weights = None
    if has_values:
        values = torch.stack([cache[v].detach() for v in value_sites])                # [layer, batch, head, key, d_head]
        weights = torch.stack([model.output_weight(i).detach() for i in range(len(sites))])  # [layer, d_model, head, d_head]
    return Capture(patterns, values, weights, pattern_grads, mask.to(patterns.device), time.perf_counter() - start)


def in_graph(pattern: Tensor, allowed: Tensor) -> Tensor:
    """Identity edit that keeps a site differentiable even when an earlier edit replaced it by a constant."""
    return pattern if pattern.requires_grad else pattern.detach().clone().requires_grad_()


def _checked(grad: Tensor | None, site: str) -> Tensor:
    if grad is None:
        raise RuntimeError(f"no gradient reached the attention site {site!r}: the target logit does not depend "
                           "on it (was the site replaced by a constant after this capture's hooks?).")
    return grad.detach()


class AttentionExplainer(Explainer):
    """An explainer that reads a `Capture`: `scores` captures, then calls `from_capture`.

    Subclasses set `needs_grads` (True when they read `capture.grads`) and implement `from_capture`.
    `attnaudit.explain.run.explain_all` shares one capture between all of them.
    """

    family = "attention"
    needs_grads = False

    def from_capture(self, capture: Capture, batch: Batch, target: Tensor) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Token scores [batch, seq] (or (scores, extras)) from a capture of `batch`."""
        raise NotImplementedError

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor):
        return self.from_capture(capture(model, batch, target, grads=self.needs_grads), batch, target)
