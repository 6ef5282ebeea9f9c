"""`Attribution`: the one result every explainer returns (scores per token, with provenance).

Frozen: methods return something new and never mutate. JSON is the on-disk form (no pickle).
"""
from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnaudit.core.io import jsonable


@dataclass(frozen=True)
class Attribution:
    """Token scores with what produced them.

    scores [batch, seq] float (exactly 0 on padding); input_ids, attention_mask, special_mask [batch, seq];
    tokens: per example, aligned with seq; target [batch] long (the explained class); target_prob [batch]
    (the model's probability of it); method + params (all hyper-parameters, verbatim); seconds (wall time);
    extras: per-example diagnostics [batch] (e.g. IG's completeness gap), by name.
    steps: for generation rows (`attnaudit.model.steps`), (example, target step) per row; None otherwise.
    `attnaudit.explain.generation.step_matrices` turns them into one [target step, input token] matrix per example.
    """

    scores: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    special_mask: Tensor
    tokens: list[list[str]]
    target: Tensor
    target_prob: Tensor
    method: str
    params: dict[str, Any]
    seconds: float = 0.0
    extras: dict[str, Tensor] = field(default_factory=dict)
    ids: list[str] | None = None
    texts: Sequence[str | None] | None = None     # None where a loaded record has no text
    steps: list[tuple[int, int]] | None = None     # generation rows: (example, target step)

    def __post_init__(self):
        shape = tuple(self.input_ids.shape)
        if tuple(self.scores.shape) != shape:
            raise ValueError(f"scores has shape {tuple(self.scores.shape)} but input_ids has {shape}; "
                             "reduce to token level first.")
        for name in ("attention_mask", "special_mask"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected {shape}.")
        if len(self.tokens) != shape[0] or any(len(t) != shape[1] for t in self.tokens):
            raise ValueError(f"tokens must be {shape[0]} lists of {shape[1]} tokens, aligned with input_ids.")
        if tuple(self.target.shape) != shape[:1] or tuple(self.target_prob.shape) != shape[:1]:
            raise ValueError(f"target and target_prob must have shape ({shape[0]},).")
        if (self.scores[~self.attention_mask] != 0).any():
            raise ValueError(f"{self.method}: scores must be exactly 0 on padding.")

    def __len__(self) -> int:
        return self.scores.shape[0]

    @property
    def scored_mask(self) -> Tensor:
        """[batch, seq] bool: the positions a metric may rank or remove (real, not special)."""
        return self.attention_mask & ~self.special_mask

    def lengths(self) -> Tensor:
        """[batch]: number of scored (real, non-special) tokens per example."""
        return self.scored_mask.sum(1)

    # -- derived values -------------------------------------------------------------------------
    def normalized(self) -> Attribution:
        """Scores divided by the sum of |scores| over scored tokens (each example sums to 1 in |·|)."""
        s = self.scores * self.scored_mask
        total = s.abs().sum(1, keepdim=True)
        return replace(self, scores=torch.where(total > 0, s / total.clamp_min(1e-30), s),
                       params={**self.params, "normalized": True})

    def ranking(self) -> Tensor:
        """[batch, seq] long: positions ordered by score, highest first; unscored positions last.

        Ties break by position (stable sort), so the order is deterministic.
        """
        key = self.scores.float().masked_fill(~self.scored_mask, float("-inf"))
        return torch.argsort(key, dim=1, descending=True, stable=True)

    def ranks(self) -> Tensor:
        """[batch, seq] long: the rank of each position (0 = highest score, ties by position); unscored ones last."""
        order = self.ranking()                                                          # [batch, seq]
        steps = torch.arange(order.shape[1]).expand_as(order).contiguous()              # [batch, seq]
        return torch.empty_like(order).scatter_(1, order, steps)                        # [batch, seq]

    def top_k_counts(self, k: int | float, *, rounding: str = "ceil") -> Tensor:
        """[batch] long: how many tokens `top_k(k)` takes from each example of n scored tokens.

        k an int: min(k, n). k a float in [0, 1], a fraction: ⌈k·n⌉ (ERASER; robust to 0.28·25 =
        7.000000000000001), or ⌊k·n⌋ with rounding="floor" (ferret's int(k·n), no tolerance).
        """
        if rounding not in ("ceil", "floor"):
            raise ValueError(f"rounding must be 'ceil' or 'floor'; got {rounding!r}.")
        n = self.lengths()                                                              # [batch]
        if isinstance(k, float):
            if not 0.0 <= k <= 1.0:
                raise ValueError(f"k as a fraction must be in [0, 1]; got {k}.")
            if rounding == "floor":
                return torch.floor(k * n.double()).long()
            return torch.ceil(k * n.double() - 1e-9).long()
        if isinstance(k, int) and k >= 0:
            return torch.minimum(torch.full_like(n, k), n)
        raise ValueError(f"k must be an int >= 0 or a float in [0, 1]; got {k!r}.")

    def top_k(self, k: int | float, *, rounding: str = "ceil") -> Tensor:
        """[batch, seq] bool: the top-k scored tokens, k an int count or a fraction of each example (`top_k_counts`).

        Ties break by position (`ranking`); special tokens and padding are never in it.
        """
        counts = self.top_k_counts(k, rounding=rounding)                                # [batch]
        return (self.ranks() < counts[:, None]) & self.scored_mask                      # [batch, seq]

    def select(self, index) -> Attribution:
        """Examples `index` (a list of ints) as a new Attribution, trimmed to their longest sequence."""
        idx = list(index)
        seq = int(self.attention_mask[idx].sum(1).max()) if idx else 0
        cut = {f.name: getattr(self, f.name)[idx][:, :seq] for f in fields(self)
               if f.name in ("scores", "input_ids", "attention_mask", "special_mask")}
        return replace(self, **cut, tokens=[self.tokens[i][:seq] for i in idx], target=self.target[idx],
                       target_prob=self.target_prob[idx], extras={k: v[idx] for k, v in self.extras.items()},
                       ids=[self.ids[i] for i in idx] if self.ids else None,
                       texts=[self.texts[i] for i in idx] if self.texts else None,
                       steps=[self.steps[i] for i in idx] if self.steps else None)

    # -- tables, files, pictures ----------------------------------------------------------------
    def example_id(self, i: int) -> str:
        return self.ids[i] if self.ids else str(i)

    def to_frame(self):
        """Tidy table: one row per real token (example_id, position, token, score, special, method)."""
        import pandas as pd

        rows = []
        for i in range(len(self)):
            for j in range(int(self.attention_mask[i].sum())):
                rows.append((self.example_id(i), j, self.tokens[i][j], float(self.scores[i, j]),
                             bool(self.special_mask[i, j]), self.method, int(self.target[i])))
        return pd.DataFrame(rows, columns=["example_id", "position", "token", "score", "special", "method", "target"])

    def to_records(self) -> list[dict]:
        """One JSON-ready dict per example: the `attributions.jsonl` / `explain --jsonl` format."""
        out = []
        for i in range(len(self)):
            n = int(self.attention_mask[i].sum())
            rec = {"id": self.example_id(i), "text": self.texts[i] if self.texts else None,
                   "tokens": self.tokens[i][:n], "scores": [float(x) for x in self.scores[i, :n]],
                   "special": [bool(x) for x in self.special_mask[i, :n]], "explainer": self.method,
                   "params": jsonable(self.params, default=repr), "target": int(self.target[i]),
                   "prob": float(self.target_prob[i]), "seconds": self.seconds / max(len(self), 1)}
            rec.update({k: float(v[i]) for k, v in self.extras.items()})
            if self.steps:
                rec["example"], rec["step"] = map(int, self.steps[i])
            out.append(rec)
        return out

    @classmethod
    def from_records(cls, records: list[dict]) -> Attribution:
        """Inverse of `to_records` (token ids are not stored, so input_ids are positions' placeholders: -1)."""
        if not records:
            raise ValueError("records must hold at least one example.")
        methods = {r["explainer"] for r in records}
        if len(methods) != 1:
            raise ValueError(f"records must come from one explainer; got {sorted(methods)}.")
        seq = max(len(r["tokens"]) for r in records)
        b = len(records)
        scores = torch.zeros(b, seq)
        mask = torch.zeros(b, seq, dtype=torch.bool)
        special = torch.zeros(b, seq, dtype=torch.bool)
        for i, r in enumerate(records):
            n = len(r["tokens"])
            scores[i, :n] = torch.tensor(r["scores"], dtype=torch.float)
            mask[i, :n] = True
            special[i, :n] = torch.tensor(r.get("special", [False] * n))
        extras_keys = set(records[0]) - {"id", "text", "tokens", "scores", "special", "explainer", "params",
                                           "target", "prob", "seconds", "example", "step"}
        steps = [(int(r["example"]), int(r["step"])) for r in records] if all("step" in r for r in records) else None
        return cls(scores=scores, input_ids=torch.full((b, seq), -1, dtype=torch.long), attention_mask=mask,
                   special_mask=special, tokens=[r["tokens"] + ["[PAD]"] * (seq - len(r["tokens"])) for r in records],
                   target=torch.tensor([r["target"] for r in records]), target_prob=torch.tensor([r["prob"] for r in records]),
                   method=records[0]["explainer"], params=records[0].get("params", {}),
                   seconds=sum(r.get("seconds", 0.0) for r in records),
                   extras={k: torch.tensor([r[k] for r in records]) for k in sorted(extras_keys)},
                   ids=[r["id"] for r in records], texts=[r.get("text") for r in records], steps=steps)

    def save(self, path: str | Path) -> Path:
        """Write JSON Lines (one record per example), atomically."""
        from attnaudit.model.checkpoint import atomic_write_text

        atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in self.to_records()))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        lines = Path(path).read_text(encoding="utf-8").split("\n")    # never splitlines: U+2028 is no line end
        records = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}).") from e
        return cls.from_records(records)

    def _repr_html_(self) -> str:
        """Token heatmap for Jupyter: red = positive, blue = negative; every token HTML-escaped."""
        rows = []
        for i in range(min(len(self), 20)):
            n = int(self.attention_mask[i].sum())
            s = self.scores[i, :n].float()
            scale = float(s.abs().max()) or 1.0
            spans = []
            for tok, v in zip(self.tokens[i][:n], s.tolist()):
                a = abs(v) / scale
                rgb = "220,40,40" if v >= 0 else "40,90,220"
                spans.append(f'<span title="{v:.4g}" style="background:rgba({rgb},{a:.3f});padding:1px 3px;'
                             f'border-radius:3px;margin:1px">{html.escape(tok)}</span>')
            head = html.escape(f"{self.example_id(i)} · target {int(self.target[i])} · p={float(self.target_prob[i]):.3f}")
            rows.append(f"<div style='margin:4px 0'><small>{head}</small><br>{' '.join(spans)}</div>")
        more = f"<small>… {len(self) - 20} more</small>" if len(self) > 20 else ""
        return f"<div><b>{html.escape(self.method)}</b>{''.join(rows)}{more}</div>"

    def plot(self, i: int = 0, ax=None):
        """Bar plot of example i's token scores (seaborn); returns the matplotlib Axes."""
        import matplotlib.pyplot as plt
        import seaborn as sns

        if not 0 <= i < len(self):
            raise ValueError(f"i must be in [0, {len(self) - 1}]; got {i}.")
        n = int(self.attention_mask[i].sum())
        if ax is None:
            _, ax = plt.subplots(figsize=(max(4.0, 0.45 * n), 2.6))
        labels = [f"{j}:{t}" for j, t in enumerate(self.tokens[i][:n])]
        sns.barplot(x=labels, y=self.scores[i, :n].float().numpy(), ax=ax, color="#c0392b")
        ax.set_title(f"{self.method} · {self.example_id(i)}")
        ax.tick_params(axis="x", rotation=60)
        ax.set_ylabel("score")
        return ax
