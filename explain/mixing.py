"""What the context-mixing explainers share (ALTI, GlobEnc, value zeroing): their layer aggregation and the
hook sites they need.

Each builds one [batch, query, key] matrix per layer whose rows say how much each token's representation after
the layer draws on each input token, the residual already inside; across layers the matrices are multiplied
without the identity rollout adds (the reference codes' ``compute_joint_attention(res=False)``).
"""
from __future__ import annotations

from torch import Tensor

from attnaudit.explain.capture import values_site
from attnaudit.model.interface import ExplainableModel


def joint_product(matrices: Tensor) -> Tensor:
    """[layer, batch, query, key] -> R_{L-1}: R_0 = M_0, R_l = M_l · R_{l-1} (no identity added)."""
    joint = matrices[0]
    for m in matrices[1:]:
        joint = m @ joint                                                         # [batch, query, key]
    return joint


def require_value_sites(model: ExplainableModel, name: str) -> None:
    """Refuse a model without a ``values`` hook site beside each attention pattern site (ValueError)."""
    points = model.hook_points()
    missing = [values_site(s) for s in model.attention_sites if values_site(s) not in points]
    if missing:
        raise ValueError(f"{name} needs the value vectors at the hook site {missing[0]!r}, which this model does "
                         "not have; expose a `values` site beside each attention `pattern` site.")
