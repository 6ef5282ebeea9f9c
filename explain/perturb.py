"""The one perturbation engine: every perturbed forward of every metric runs here.

A perturbed input is a boolean keep-mask over one source example's tokens (True = the token stays),
plus the index of that example in the batch. The engine normalises the mask (special tokens always
kept, padding never), de-duplicates identical (example, policy, mask) triples against everything it
has already evaluated, materialises the new ones at the token-id level with the replacement policy,
sorts them by length, and runs them in chunks of at most `max_batch` rows and `max_tokens` tokens under `torch.inference_mode` (bf16
autocast on CUDA; inside an `attnaudit.model.precision.precision` block, as the block says). It caches
the full class distribution, so metrics, explainers and targets share forwards: comprehensiveness at k
is the deletion curve at step ⌈k·n⌉, sufficiency the insertion curve at step ⌈k·n⌉, and leaving out
the top token is deletion step 1.

    engine = PerturbationEngine(model, batch, policy="mask", max_batch=128)
    keep = remove_top_k(attribution, 0.2)                 # [batch, seq] bool
    p = engine.probs(keep, attribution.target)            # [batch]: probability of the explained class
    engine.stats                                          # requested, forwards run, saved, seconds

    with sharing(engine):                                 # occlusion, LIME and KernelSHAP on this batch use it too
        explain_all(model, batch, ["occlusion", "lime"])

Replacement policies (recorded in `engine.policy` and in every table built on the engine):
    "mask"      removed tokens become [MASK] (`model.mask_id`); the length is unchanged.
    "attention" removed tokens stay in the input (positions unchanged) but leave the attention mask: no
                query attends them (in the built-in model their own query attends nothing either, and
                mean pooling skips them).
    "delete"    removed tokens are cut out and the rest shifts left (a shorter sequence).
"""
from __future__ import annotations

import numbers
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attnaudit.explain.attribution import Attribution
from attnaudit.explain.base import MAX_ROWS
from attnaudit.model.interface import Batch, ExplainableModel
from attnaudit.model.precision import current_precision, forward_autocast

POLICIES = ("mask", "attention", "delete")
DEFAULT_MAX_BATCH = 128
# Tokens (rows × the chunk's widest row) per forward on the CPU: on MiniLM at 2 threads, ferret's evaluators over
# 1,380 distinct inputs of ~19 tokens took 3.10 s at 128 rows a call, 2.62 s at 32, 2.63 s at 768 tokens (the wide rows of a
# call pad its short ones; 512: 2.65 s, 1024: 2.70 s, 2048: 2.9 s); a budget gives short inputs many rows, long ones few.
# On CUDA, where a forward's cost hardly grows with its size, rows alone (max_batch) set the chunk.
DEFAULT_MAX_TOKENS = 768
AUTO = "auto"


def length_chunks(width: Tensor, max_rows: int, max_tokens: int | None) -> list[slice]:
    """Rows sorted by `width` (ascending, [n]) -> consecutive slices of at most max_rows rows whose rows × the
    slice's widest row stay within max_tokens (None: no budget; a row wider than the budget runs alone)."""
    bounds, start, n = [], 0, len(width)
    widths = width.tolist()
    while start < n:
        stop = min(start + max_rows, n)
        if max_tokens is not None:
            fit = start + 1
            while fit < stop and (fit + 1 - start) * max(widths[fit], 1) <= max_tokens:
                fit += 1
            stop = fit
        bounds.append(slice(start, stop))
        start = stop
    return bounds


# -- plans: keep-masks built from an attribution ------------------------------------------------
def check_fraction(k: float) -> float:
    """`k` as a float fraction of the scored tokens; a bool, a non-number or a value outside [0, 1] is refused.

    An int 0 or 1 here means 0 % or 100 % (`Attribution.top_k` reads an int as a count).
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0.0 <= float(k) <= 1.0:
        raise ValueError(f"k must be a fraction of the scored tokens in [0, 1]; got {k!r}.")
    return float(k)


def rationale_counts(attribution: Attribution, k: float, *, rounding: str = "ceil") -> Tensor:
    """[batch] long: tokens in the top-k rationale, ⌈k·n⌉ (ERASER) or ⌊k·n⌋ (`rounding="floor"`, ferret)."""
    return attribution.top_k_counts(check_fraction(k), rounding=rounding)


def rank_positions(attribution: Attribution) -> Tensor:
    """[batch, seq] long: the rank of each position (0 = highest score); unscored positions rank last."""
    return attribution.ranks()


def top_k_mask(attribution: Attribution, k: float, *, only_pos: bool = False, rounding: str = "ceil") -> Tensor:
    """[batch, seq] bool: the rationale, the top-⌈k·n⌉ scored tokens by score (`Attribution.top_k` of fraction k).

    With `only_pos`, tokens whose score is not > 0 never join the rationale (it may then be smaller).
    """
    top = attribution.top_k(check_fraction(k), rounding=rounding)                   # [batch, seq]
    return top & (attribution.scores > 0) if only_pos else top


def remove_top_k(attribution: Attribution, k: float, *, only_pos: bool = False, rounding: str = "ceil") -> Tensor:
    """[batch, seq] bool keep-mask: every real token except the top-k rationale (comprehensiveness)."""
    return attribution.attention_mask & ~top_k_mask(attribution, k, only_pos=only_pos, rounding=rounding)


def keep_top_k(attribution: Attribution, k: float, *, only_pos: bool = False, rounding: str = "ceil") -> Tensor:
    """[batch, seq] bool keep-mask: the special tokens and the top-k rationale only (sufficiency)."""
    special = attribution.special_mask & attribution.attention_mask
    return special | top_k_mask(attribution, k, only_pos=only_pos, rounding=rounding)


def path_counts(lengths: Tensor, max_steps: int | None = None) -> tuple[Tensor, Tensor]:
    """How many tokens each step of a deletion/insertion path has moved -> counts, valid [batch, step].

    One token per step, s = 0..n, for an example of n <= max_steps scored tokens (or max_steps None);
    a longer one takes max_steps + 1 evenly spaced steps, round(j·n / max_steps) for j = 0..max_steps, so
    long documents cost max_steps + 1 forwards and every curve still spans the fractions 0..1 evenly.
    """
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be None (one token per step) or a positive int; got {max_steps!r}.")
    n = lengths.long()                                                              # [batch]
    n_max = int(n.max()) if len(n) else 0
    if max_steps is None or n_max <= max_steps:
        s = torch.arange(n_max + 1)                                                 # [step]
        return s[None, :].expand(len(n), -1), s[None, :] <= n[:, None]
    j = torch.arange(max_steps + 1)[None, :]                                        # [1, step]
    spread = (2 * j * n[:, None] + max_steps) // (2 * max_steps)                    # round half up, integers only
    long = n[:, None] > max_steps                                                   # [batch, 1]
    return torch.where(long, spread, j), long | (j <= n[:, None])


def deletion_path(attribution: Attribution, *, max_steps: int | None = None) -> tuple[Tensor, Tensor]:
    """Remove tokens most relevant first (RISE deletion): one per step, or max_steps even steps (`path_counts`).

    Returns:
        keep [batch, step, seq] bool: step s has the top-count[s] tokens removed (count[0] = 0);
        valid [batch, step] bool: the step exists for that example (n = its number of scored tokens).
    """
    rank = rank_positions(attribution)                                              # [batch, seq]
    counts, valid = path_counts(attribution.lengths(), max_steps)                   # [batch, step]
    removed = (rank[:, None, :] < counts[:, :, None]) & attribution.scored_mask[:, None, :]  # [batch, step, seq]
    keep = attribution.attention_mask[:, None, :] & ~removed                        # [batch, step, seq]
    return keep, valid


def insertion_path(attribution: Attribution, *, max_steps: int | None = None) -> tuple[Tensor, Tensor]:
    """Insert tokens most relevant first, starting from the special tokens alone (RISE insertion).

    Returns keep [batch, step, seq] (step s holds the specials and the top-count[s] tokens) and valid [batch, step].
    """
    rank = rank_positions(attribution)                                              # [batch, seq]
    counts, valid = path_counts(attribution.lengths(), max_steps)                   # [batch, step]
    inserted = (rank[:, None, :] < counts[:, :, None]) & attribution.scored_mask[:, None, :]  # [batch, step, seq]
    special = (attribution.special_mask & attribution.attention_mask)[:, None, :]   # [batch, 1, seq]
    return special | inserted, valid


def leave_one_out_path(attention_mask: Tensor, special_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Remove each scored token alone (occlusion with a window of 1).

    Returns keep [batch, position, seq] (row j lacks token j) and valid [batch, position] (j is scored).
    """
    scored = attention_mask & ~special_mask                                         # [batch, seq]
    eye = torch.eye(attention_mask.shape[1], dtype=torch.bool)                      # [position, seq]
    return attention_mask[:, None, :] & ~eye[None], scored


# -- materialising perturbed inputs -------------------------------------------------------------
def materialize(input_ids: Tensor, attention_mask: Tensor, keep: Tensor, *, policy: str,
                pad_id: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """Build perturbed token ids and attention masks from keep-masks.

    Args:
        input_ids, attention_mask: [n, seq], the source example of each perturbed input (rows repeated).
        keep: [n, seq] bool, True = the token stays. Padding stays padding whatever keep says;
            the caller keeps special tokens (the engine does).
        policy: "mask", "attention" or "delete" (see the module docstring).
    Returns:
        (input_ids [n, seq], attention_mask [n, seq]); "delete" left-packs the kept tokens and pads the rest.
    """
    check_policy(policy)
    keep = keep & attention_mask                                                    # [n, seq]
    if policy == "mask":
        ids = torch.where(attention_mask & ~keep, torch.full_like(input_ids, mask_id), input_ids)
        return ids, attention_mask.clone()
    if policy == "attention":
        return input_ids.clone(), keep.clone()
    # delete: a stable sort on "removed" moves kept tokens to the front in their original order
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)               # [n, seq]
    n_kept = keep.sum(1, keepdim=True)                                              # [n, 1]
    mask = torch.arange(keep.shape[1])[None, :] < n_kept                            # [n, seq]
    ids = input_ids.gather(1, order).masked_fill(~mask, pad_id)                     # [n, seq]
    return ids, mask


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}; got {policy!r}.")
    return policy


# -- the engine ---------------------------------------------------------------------------------
@dataclass
class EngineStats:
    """Counters since the engine was built: what metrics asked for and what actually ran."""

    requested: int = 0      # perturbed inputs asked for (valid entries only)
    unique: int = 0         # distinct (example, policy, keep-mask) among them, summed over calls
    forwards: int = 0       # sequences actually run through the model
    batches: int = 0        # forward calls (chunks)
    seconds: float = 0.0    # total time inside the engine
    forward_seconds: float = 0.0

    @property
    def saved(self) -> int:
        """Forwards avoided by de-duplication and the cache."""
        return self.requested - self.forwards

    def as_dict(self) -> dict:
        return {"requested": self.requested, "unique": self.unique, "forwards": self.forwards,
                "saved": self.saved, "batches": self.batches, "seconds": round(self.seconds, 4),
                "forward_seconds": round(self.forward_seconds, 4)}


class PerturbationEngine:
    """Evaluates perturbed versions of the examples of one batch, with a cache shared by every caller.

    Args:
        model: the model interface (`logits(input_ids, attention_mask)`, `evaluating()`, `pad_id`, `mask_id`).
        batch: the source examples; keep-masks are [batch, ..., seq] over its positions.
        policy: the default replacement policy ("mask", "attention" or "delete"); each call may override it.
        max_batch: most sequences per forward, at most MAX_ROWS (65,536).
        max_tokens: most tokens per forward (rows × the widest row of the call); "auto" (default):
            DEFAULT_MAX_TOKENS on the CPU, None (rows alone) on CUDA. The chunking changes only the float
            summation order of the batched matmuls, not what is computed.
        autocast: bf16 autocast when the model is on CUDA (ignored on CPU). Inside an
            `attnaudit.model.precision.precision(...)` block the block decides instead, on CPU and CUDA.
    """

    def __init__(self, model: ExplainableModel, batch: Batch, *, policy: str = "mask",
                 max_batch: int = DEFAULT_MAX_BATCH, autocast: bool = True, max_tokens: int | str | None = AUTO):
        check_policy(policy)
        if not (max_tokens is None or max_tokens == AUTO or (isinstance(max_tokens, int)
                                                              and not isinstance(max_tokens, bool) and max_tokens >= 1)):
            raise ValueError(f"max_tokens must be {AUTO!r}, an int >= 1 (tokens per forward) or None; got {max_tokens!r}.")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1 (sequences per forward); got {max_batch!r}.")
        if max_batch > MAX_ROWS:
            raise ValueError(f"max_batch must be an int in [1, {MAX_ROWS:,}] (sequences per forward); got {max_batch:,}.")
        self.model = model
        self.batch = batch
        self.policy = policy
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.autocast = autocast
        self.input_ids = batch.input_ids.cpu()                                      # [batch, seq]
        self.attention_mask = batch.attention_mask.cpu().bool()                     # [batch, seq]
        self.special_mask = batch.special_mask.cpu().bool() & self.attention_mask   # [batch, seq]
        self.stats = EngineStats()
        self._slot: dict[tuple[int, str, bytes], int] = {}   # (example, policy, packed keep-mask) -> row
        self._table = torch.zeros(0, 0)                      # [n_cached, n_classes] probabilities

    def tokens_per_forward(self) -> int | None:
        """max_tokens with "auto" resolved for the model's device."""
        if self.max_tokens == AUTO:
            return None if _device(self.model).type == "cuda" else DEFAULT_MAX_TOKENS
        return self.max_tokens  # type: ignore[return-value]

    def chunks(self, width: Tensor) -> list[slice]:
        """The forwards over rows sorted by `width` ([n], ascending): `length_chunks` at this engine's limits."""
        return length_chunks(width, self.max_batch, self.tokens_per_forward())

    def __repr__(self) -> str:
        return (f"PerturbationEngine(policy={self.policy!r}, max_batch={self.max_batch}, "
                f"examples={len(self.batch)}, cached={len(self._slot)})")

    # -- public calls --------------------------------------------------------------------------
    def probs(self, keep: Tensor, target: Tensor, *, valid: Tensor | None = None, policy: str | None = None) -> Tensor:
        """Probability of class `target` [batch] for keep-masks [batch, ..., seq] -> [batch, ...] (NaN where not valid)."""
        p = self.class_probs(keep, valid=valid, policy=policy)                      # [batch, ..., n_classes]
        target = torch.as_tensor(target).long().cpu()
        if tuple(target.shape) != (keep.shape[0],):
            raise ValueError(f"target must have shape ({keep.shape[0]},), one class per example; "
                             f"got {tuple(target.shape)}.")
        idx = target.view(-1, *([1] * (p.dim() - 1))).expand(*p.shape[:-1], 1)     # [batch, ..., 1]
        return p.gather(-1, idx)[..., 0]                                            # [batch, ...]

    def full_probs(self, target: Tensor, *, policy: str | None = None) -> Tensor:
        """[batch]: p(target | x), the unperturbed input, through the same path as every perturbation."""
        return self.probs(self.attention_mask, target, policy=policy)

    def class_probs(self, keep: Tensor, *, valid: Tensor | None = None, policy: str | None = None) -> Tensor:
        """Class distributions for keep-masks [batch, ..., seq] -> [batch, ..., n_classes] (NaN where not valid)."""
        keep = torch.as_tensor(keep).cpu().bool()
        b, seq = self.attention_mask.shape
        if keep.dim() < 2 or keep.shape[0] != b or keep.shape[-1] != seq:
            raise ValueError(f"keep must have shape [batch={b}, ..., seq={seq}] over this engine's batch; "
                             f"got {tuple(keep.shape)}.")
        middle = keep.shape[1:-1]
        source = torch.arange(b).view(b, *([1] * len(middle))).expand(b, *middle).reshape(-1)  # [n]
        flat = keep.reshape(-1, seq)                                                # [n, seq]
        ok = torch.ones(len(flat), dtype=torch.bool) if valid is None else torch.as_tensor(valid).cpu().bool().reshape(-1)
        if len(ok) != len(flat):
            assert valid is not None                        # all-True when valid is None: same length
            raise ValueError(f"valid must have shape {tuple(keep.shape[:-1])}; got {tuple(valid.shape)}.")
        out = torch.full((len(flat), self._n_classes()), float("nan"))              # [n, n_classes]
        if ok.any():
            out[ok] = self.evaluate(source[ok], flat[ok], policy=policy)
        return out.view(*keep.shape[:-1], -1)

    def evaluate(self, source: Tensor, keep: Tensor, *, policy: str | None = None) -> Tensor:
        """The primitive: source example indices [n] and keep-masks [n, seq] -> class probabilities [n, n_classes]."""
        start = time.perf_counter()
        policy = check_policy(policy or self.policy)
        source = torch.as_tensor(source).long().cpu()
        keep = self.normalize(source, keep)                                         # [n, seq]
        keys = self._keys(source, keep, policy)
        rows: list[int] = []
        new: dict[tuple[int, str, bytes], int] = {}         # key -> its row in the table
        first: list[int] = []                               # where each new key first appears
        for i, key in enumerate(keys):
            row = self._slot.get(key)
            if row is None:
                row = new.get(key)
                if row is None:
                    row = new[key] = len(self._slot) + len(new)
                    first.append(i)
            rows.append(row)
        self.stats.requested += len(keys)
        self.stats.unique += len(set(keys))
        if new:
            pick = torch.tensor(first)                                              # [n_new]
            self._store(new, self._forward(source[pick], keep[pick], policy))
        self.stats.seconds += time.perf_counter() - start
        return self._table[torch.tensor(rows, dtype=torch.long)]                    # [n, n_classes]

    def normalize(self, source: Tensor, keep: Tensor) -> Tensor:
        """[n, seq]: keep-masks with the source's special tokens forced in and padding forced out."""
        keep = torch.as_tensor(keep).cpu().bool()
        if keep.dim() != 2 or keep.shape[1] != self.attention_mask.shape[1] or keep.shape[0] != source.shape[0]:
            raise ValueError(f"keep must have shape [n={source.shape[0]}, seq={self.attention_mask.shape[1]}]; "
                             f"got {tuple(keep.shape)}.")
        if len(source) and (int(source.min()) < 0 or int(source.max()) >= len(self.batch)):
            raise ValueError(f"source indices must lie in [0, {len(self.batch) - 1}]; got {int(source.min())}"
                             f" to {int(source.max())}.")
        return (keep | self.special_mask[source]) & self.attention_mask[source]

    def materialize(self, source: Tensor, keep: Tensor, *, policy: str | None = None) -> tuple[Tensor, Tensor]:
        """The exact (input_ids, attention_mask) [n, seq] the engine would run for these perturbations."""
        source = torch.as_tensor(source).long().cpu()
        keep = self.normalize(source, keep)
        return materialize(self.input_ids[source], self.attention_mask[source], keep,
                           policy=check_policy(policy or self.policy),
                           pad_id=self.model.pad_id, mask_id=self.model.mask_id)

    def inputs(self) -> tuple[Tensor, Tensor]:
        """Every distinct input the engine ran, as (input_ids, attention_mask) [n_cached, seq], in cache order
        (a precision block's rows under their policy, without the block)."""
        keys = list(self._slot)
        seq = self.input_ids.shape[1]
        ids = torch.empty(len(keys), seq, dtype=self.input_ids.dtype)
        mask = torch.zeros(len(keys), seq, dtype=torch.bool)
        if not keys:
            return ids, mask
        source = torch.tensor([k[0] for k in keys])
        packed = np.frombuffer(b"".join(k[2] for k in keys), dtype=np.uint8).reshape(len(keys), -1)
        keep = torch.from_numpy(np.unpackbits(packed, axis=1)[:, :seq].astype(bool))
        policies = [k[1].split("@")[0] for k in keys]
        for policy in dict.fromkeys(policies):
            rows = torch.tensor([i for i, p in enumerate(policies) if p == policy])
            ids[rows], mask[rows] = self.materialize(source[rows], keep[rows], policy=policy)
        return ids, mask

    def clear(self) -> None:
        """Forget every cached probability (e.g. after the model's weights changed)."""
        self._slot.clear()
        self._table = torch.zeros(0, 0)

    # -- internals -----------------------------------------------------------------------------
    def _keys(self, source: Tensor, keep: Tensor, policy: str) -> list[tuple[int, str, bytes]]:
        packed = np.packbits(keep.numpy(), axis=1)                                  # [n, ceil(seq/8)] uint8
        rows = [r.tobytes() for r in packed]
        if current_precision() is not None:            # a precision block's rows never mix with the default's
            policy = f"{policy}@{current_precision()}"
        return [(s, policy, r) for s, r in zip(source.tolist(), rows)]

    def _store(self, new: dict, probs: Tensor) -> None:
        if self._table.numel() == 0:
            self._table = torch.zeros(0, probs.shape[1])
        self._table = torch.cat([self._table, probs])
        self._slot.update(new)                                                      # rows in insertion order

    def _n_classes(self) -> int:
        if self._table.shape[1]:
            return self._table.shape[1]
        return int(getattr(self.model, "n_classes", 0)) or self.evaluate(torch.zeros(1, dtype=torch.long),
                                                                         self.attention_mask[:1]).shape[1]

    def _forward(self, source: Tensor, keep: Tensor, policy: str) -> Tensor:
        """Sort by length, materialise and run in `chunks` -> probabilities [n, n_classes] in input order."""
        positions = torch.arange(keep.shape[1])[None, :] + 1                        # [1, seq]
        if policy == "delete":
            width = keep.sum(1)                                                     # [n] kept tokens
        elif policy == "attention":                                                 # the tail past the last kept
            width = torch.where(keep, positions, 0).amax(1)                         # token is never attended: cut it
        else:
            width = self.attention_mask[source].sum(1)                              # [n] the source's length
        order = torch.argsort(width, stable=True)
        device = _device(self.model)
        amp = forward_autocast(device, default_bf16=self.autocast and device.type == "cuda")  # a precision block wins
        start = time.perf_counter()
        chunks = []
        with self.model.evaluating(), torch.inference_mode(), amp:
            for part in self.chunks(width[order]):
                idx = order[part]
                w = max(int(width[idx].max()), 1)
                src = source[idx]
                ids, mask = materialize(self.input_ids[src], self.attention_mask[src], keep[idx], policy=policy,
                                        pad_id=self.model.pad_id, mask_id=self.model.mask_id)  # each [chunk, seq]
                logits = self.model.logits(ids[:, :w].to(device), mask[:, :w].to(device))      # [chunk, n_classes]
                chunks.append(logits.float().softmax(-1).cpu())
                self.stats.batches += 1
        self.stats.forward_seconds += time.perf_counter() - start
        self.stats.forwards += len(source)
        probs = torch.cat(chunks)                                                   # [n, n_classes], sorted order
        out = torch.empty_like(probs)
        out[order] = probs
        return out


# -- one engine for a whole block of work ---------------------------------------------------------
_SHARED: ContextVar[PerturbationEngine | None] = ContextVar("attnaudit_shared_engine", default=None)


@contextmanager
def sharing(engine: PerturbationEngine) -> Iterator[PerturbationEngine]:
    """Inside the block, every explainer that perturbs inputs (occlusion, LIME, KernelSHAP) on `engine`'s model
    and batch evaluates through `engine` (`engine_for`), so an input that a metric or another explainer already
    ran is a cache hit: the audit evaluates each distinct (example, policy, keep-mask) once per chunk. The
    engine's `max_batch` then sets the forward size; each call still names its own policy."""
    if not isinstance(engine, PerturbationEngine):
        raise TypeError(f"sharing needs a PerturbationEngine; got {type(engine).__name__}.")
    token = _SHARED.set(engine)
    try:
        yield engine
    finally:
        _SHARED.reset(token)


def engine_for(model: ExplainableModel, batch: Batch, *, policy: str, max_batch: int,
               autocast: bool = False) -> PerturbationEngine:
    """The engine of the enclosing `sharing` block when it serves this model and batch at this precision
    (its forwards: float32, or bf16 autocast on CUDA when `autocast`), else a fresh engine for one call."""
    shared = _SHARED.get()
    if shared is not None and shared.model is model and _same_batch(shared, batch) and (
            shared.autocast == autocast or _device(model).type != "cuda"):
        return shared
    return PerturbationEngine(model, batch, policy=policy, max_batch=max_batch, autocast=autocast)


def _same_batch(engine: PerturbationEngine, batch: Batch) -> bool:
    if engine.batch is batch:
        return True
    ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu().bool()
    return (ids.shape == engine.input_ids.shape and torch.equal(ids, engine.input_ids)
            and torch.equal(mask, engine.attention_mask))


def _device(model: ExplainableModel) -> torch.device:
    dev = getattr(model, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def as_engine(engine_or_model: PerturbationEngine | ExplainableModel, batch: Batch, *, policy: str | None = None,
              max_batch: int | None = None) -> PerturbationEngine:
    """An engine for `batch`: the one given (checked to be built on this batch) or a fresh one for a model."""
    if isinstance(engine_or_model, PerturbationEngine):
        engine = engine_or_model
        if not _same_batch(engine, batch):
            raise ValueError("the engine was built on a different batch; pass the batch it was built on, "
                             "or a model to build a fresh engine.")
        return engine
    return PerturbationEngine(engine_or_model, batch, policy=policy or "mask",
                              max_batch=max_batch or DEFAULT_MAX_BATCH)


def check_attribution(batch: Batch, attribution: Attribution) -> None:
    """Metrics need the attribution's tokens to be the batch's tokens, position by position."""
    if tuple(attribution.input_ids.shape) != tuple(batch.input_ids.shape) or not torch.equal(
            attribution.input_ids, batch.input_ids.cpu()):
        raise ValueError(
            f"attribution {attribution.method!r} does not match the batch: input_ids of shape "
            f"{tuple(attribution.input_ids.shape)} vs {tuple(batch.input_ids.shape)} (or different ids); "
            "explain and evaluate the same Batch (an Attribution loaded from JSON has no ids: re-explain it).")


# -- leave-one-out (occlusion with a window of one; also τ-LOO's reference) ------------------------------
def leave_one_out(engine_or_model: PerturbationEngine | ExplainableModel, batch: Batch, *, target: Tensor,
                  policy: str | None = None, max_batch: int | None = None) -> Tensor:
    """Occlusion with a window of one: p(x) − p(x without token j) -> [batch, seq] (0 on unscored positions)."""
    engine = as_engine(engine_or_model, batch, policy=policy, max_batch=max_batch)
    keep, valid = leave_one_out_path(engine.attention_mask, engine.special_mask)    # [batch, seq, seq], [batch, seq]
    full = engine.full_probs(target, policy=policy)                                 # [batch]
    return torch.nan_to_num(full[:, None] - engine.probs(keep, target, valid=valid, policy=policy), nan=0.0)
