"""Sharded audits on torch.distributed: every rank computes its share of the items, rank 0 writes the report.

    torchrun --nproc-per-node 4 -m attnaudit analyze --model runs/m --data test.csv ... --out reports/m
    result = attnaudit.distributed.audit(model, examples, out="runs/audit-items")   # torchrun ... script.py

The ranks, the session, the collectives and rank 0's waiting are job infrastructure and live in
`attnaudit.jobs.sharding` (which says how the items are shared and how a dead or stuck rank is named); their
names are importable from here. This module adds the Python entry point, `audit`, and the hashes that
check every rank passes the same model and data.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnaudit.jobs.sharding import (
    BACKEND_ENV,
    DEFAULT_TIMEOUT,
    POLL,
    TIMEOUT_ENV,
    RankFailed,
    Ranks,
    Session,
    agree,
    all_gather,
    barrier,
    check_same,
    current,
    dead_ranks,
    environment,
    fingerprint_differences,
    from_env,
    is_main,
    main_first,
    owner,
    resume_hint,
    session,
    sharded,
    timeout,
    wait_for,
)

if TYPE_CHECKING:
    from torch import nn

    from attnaudit.model.interface import AttentionModel, ExplainableModel

# -- the Python audit, sharded --------------------------------------------------------------------
def audit(model: ExplainableModel, data, settings=None, *, out, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None, **changes):
    """`attnaudit.analyses.audit.audit` with its items saved in `out`'s store and shared among the ranks
    of a torchrun job -> the AuditResult on rank 0 (None on the others); alone, a single process's.

        result = attnaudit.distributed.audit(model, examples, out="runs/audit-items")   # torchrun ... script.py

    Every rank passes the same model (compared by a hash of its weights), data and settings. The tables
    are those of `audit(model, data, settings)` in one process. `resume` continues an interrupted run
    with any number of ranks; `overwrite` forgets an earlier one.
    """
    from attnaudit.analyses.audit import AuditSettings
    from attnaudit.jobs.runner import audit_all
    settings = (settings or AuditSettings()).with_(**changes) if changes else (settings or AuditSettings())
    card = {"checkpoint": {"sha256": model_hash(model)}}
    identity = {"data": data_hash(data), "audit": settings.to_dict()}
    with session():
        results = audit_all([("audit", model, data, card)], settings, out, identity=identity, resume=resume,
                            overwrite=overwrite, progress=progress, echo=lambda _: None)
    return results.get("audit")


def model_hash(model: AttentionModel[Any] | nn.Module) -> str:
    """sha256 over the model's parameter and buffer names, shapes, dtypes and values (on CPU)."""
    import hashlib

    import torch
    net = getattr(model, "net", model)
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")   # the exact bits
    return h.hexdigest()


def data_hash(data) -> str:
    """sha256 of what the audit reads from `data`: a Batch's ids and tensors, or the examples / texts."""
    from dataclasses import asdict, is_dataclass

    from attnaudit.jobs.store import sha256_json
    from attnaudit.model.interface import Batch
    if isinstance(data, Batch):
        return sha256_json({"ids": data.ids, "input_ids": data.input_ids.tolist(),
                            "labels": None if data.labels is None else data.labels.tolist()})
    items = [data] if isinstance(data, str) else list(data)
    return sha256_json([asdict(x) if is_dataclass(x) else str(x) for x in items])


__all__ = ["audit", "model_hash", "data_hash", "TIMEOUT_ENV", "BACKEND_ENV", "DEFAULT_TIMEOUT", "POLL", "RankFailed",
           "Ranks", "Session", "from_env", "owner", "timeout", "current", "is_main", "session", "sharded", "all_gather",
           "agree", "main_first", "barrier", "environment", "fingerprint_differences", "check_same", "resume_hint",
           "wait_for", "dead_ranks"]
