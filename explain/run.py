"""Run several explainers on one batch, sharing one attention capture among the attention family.

Attention explainers (raw attention, rollout, flow, Chefer et al. 2021's grad_attention, attention × gradient,
Kobayashi et al. 2020's attention norms) all read the same forward pass: `explain_all` records it once (with
the gradient when any of them needs it, `attnaudit.explain.capture.capture`) and hands it to each; every
other explainer runs its own `explain`. The scores equal those of calling each `explain` alone.

    >>> results = explain_all(model, ["a fine film"], ["attention", "rollout", get_explainer("flow")])
    >>> results["rollout"].scores        # [batch, seq]
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from attnaudit.explain.attribution import Attribution
from attnaudit.explain.base import Explainer, as_batch, package_attribution, resolve_target
from attnaudit.explain.capture import AttentionExplainer, capture, shared_reads
from attnaudit.explain.registry import get_explainer
from attnaudit.model.precision import forward_autocast

if TYPE_CHECKING:
    from attnaudit.model.interface import ExplainableModel


def explain_all(model: ExplainableModel, batch_or_texts, explainers: list[Explainer | str], *,
                target=None) -> dict[str, Attribution]:
    """Explain one batch with every explainer -> {explainer name: Attribution}.

    Args:
        model: the model interface; batch_or_texts: a Batch, a text or a list of texts/Examples.
        explainers: Explainer instances or registry names (default parameters), with distinct names.
        target: as for `Explainer.explain` (None = the predicted class).
    Returns:
        one Attribution per explainer, in the given order. For the attention family, `seconds` is an equal
        share of the capture's wall time plus the explainer's own time.
    """
    chosen = [get_explainer(e) if isinstance(e, str) else e for e in explainers]
    for i, e in enumerate(chosen):
        if not isinstance(e, Explainer):
            raise TypeError(f"explainers[{i}] must be an Explainer or a registry name; got {type(e).__name__}.")
    names = [e.name for e in chosen]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"explainers must have distinct names; {repeated[0]!r} appears {names.count(repeated[0])} "
                         "times. Run explain_all once per configuration.")
    batch = as_batch(model, batch_or_texts)
    for e in chosen:
        e.validate(model)
        e.check_limits(model, batch)                  # every cost refused before the shared capture allocates
    shared = [e for e in chosen if isinstance(e, AttentionExplainer)]
    results: dict[str, Attribution] = {}
    if shared:
        with model.evaluating(), forward_autocast(model.device):  # bf16 only inside a `precision` block
            with torch.no_grad():
                probs = model(batch).float().softmax(-1).cpu()                    # [batch, n_classes]
            tgt = resolve_target(model, target, probs)                            # [batch]
            cap = capture(model, batch, tgt, reads=shared_reads(model, shared))
            share = cap.seconds / len(shared)
            for e in shared:
                start = time.perf_counter()
                out = e.from_capture(cap, batch, tgt)
                results[e.name] = package_attribution(e, batch, out, tgt, probs, share + time.perf_counter() - start)
    for e in chosen:
        if not isinstance(e, AttentionExplainer):
            results[e.name] = e.explain(model, batch, target=target)
    return {e.name: results[e.name] for e in chosen}
