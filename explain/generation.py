"""Explaining generation: one [target step, input token] matrix per example, from step-row attributions.

A language model's explanation of a continuation t_1..t_T is one attribution row per step (`attnaudit.model.steps`:
row s is ``prompt + t_<s`` and explains p(t_s | prompt, t_<s)). Any explainer produces those rows in one call;
`step_matrices` reassembles them per example:

    batch = lm.encode([Example("p0", "k1 v1 k2 v2 ? k2", target="v2")])
    attr = get_explainer("rollout").explain(lm, batch, target=batch.labels)
    m = step_matrices(attr)[0]
    m.scores                 # [target step, prompt token]: row s = what step s's token is attributed to
    m.prompt_tokens, m.target_tokens

Columns are the prompt's tokens (special ones included, scored 0 where the explainer does not score them);
with ``include_prefix=True`` the target prefix's columns are kept too (row s then also scores t_<s; the prefix is
never perturbed, so those columns are attention-family readings only). `words` pools both sides into words.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnaudit.explain.attribution import Attribution
from attnaudit.explain.words import HOWS


@dataclass(frozen=True)
class StepMatrix:
    """One example's generation attribution.

    scores [step, column] float: row s explains target token s over `columns` (the prompt tokens, then, with
    include_prefix, the target tokens before the last step); target [step] long: the explained token ids;
    target_prob [step]: their probabilities; rows [step]: the attribution rows they came from.
    """

    example: int
    id: str
    prompt_tokens: list[str]
    target_tokens: list[str]
    columns: list[str]
    scores: Tensor
    target: Tensor
    target_prob: Tensor
    rows: list[int]
    method: str

    def to_frame(self):
        """Tidy table: one row per (step, column): example_id, step, target_token, position, token, score, method."""
        import pandas as pd

        rows = [(self.id, s, self.target_tokens[s], j, self.columns[j], float(self.scores[s, j]), self.method)
                for s in range(self.scores.shape[0]) for j in range(self.scores.shape[1])]
        return pd.DataFrame(rows, columns=["example_id", "step", "target_token", "position", "token", "score",
                                           "method"])

    def words(self, prompt_word_ids: Sequence[int | None], target_word_ids: Sequence[int | None] | None = None, *,
              how: str = "sum") -> tuple[Tensor, list[int], list[int]]:
        """Pool into words on both sides -> (scores [target word, prompt word], prompt words, target words).

        prompt_word_ids: per column, the whitespace word of the prompt it belongs to (None: special, dropped);
        target_word_ids: per step, the word of the target its token belongs to (None: one word per step).
        how: "sum", "max" or "mean" over the tokens of each (target word, prompt word) cell.
        """
        if how not in HOWS:
            raise ValueError(f"how must be one of {', '.join(map(repr, HOWS))}; got {how!r}.")
        n_steps, n_cols = self.scores.shape
        if len(prompt_word_ids) < n_cols:
            raise ValueError(f"prompt_word_ids must give one entry per column ({n_cols}); got {len(prompt_word_ids)}.")
        tgt = list(range(n_steps)) if target_word_ids is None else list(target_word_ids)
        if len(tgt) != n_steps:
            raise ValueError(f"target_word_ids must give one entry per step ({n_steps}); got {len(tgt)}.")
        src_words = sorted({w for w in prompt_word_ids[:n_cols] if w is not None})
        tgt_words = sorted({w for w in tgt if w is not None})
        out = torch.zeros(len(tgt_words), len(src_words))
        for a, tw in enumerate(tgt_words):
            steps = [s for s in range(n_steps) if tgt[s] == tw]
            for b, sw in enumerate(src_words):
                cols = [j for j in range(n_cols) if prompt_word_ids[j] == sw]
                cell = self.scores[steps][:, cols].float()                          # [steps, pieces]
                out[a, b] = cell.sum() if how == "sum" else cell.max() if how == "max" else cell.mean()
        return out, src_words, tgt_words


def step_matrices(attr: Attribution, *, include_prefix: bool = False,
                  target_tokens: Sequence[str] | None = None) -> list[StepMatrix]:
    """Step-row attribution (`Attribution.steps` set) -> one StepMatrix per example, in example order.

    target_tokens: the vocabulary's token strings (e.g. `model.label_names`) to name the explained tokens;
    None names them by the next row's token where there is one, else by id.
    """
    if not attr.steps:
        raise ValueError(f"{attr.method}: this attribution has no generation steps (Attribution.steps is None); "
                         "encode prompts with targets through a language model (kind 'lm') first.")
    by_example: dict[int, list[tuple[int, int]]] = {}
    for row, (e, s) in enumerate(attr.steps):
        by_example.setdefault(int(e), []).append((int(s), row))
    out = []
    for e in sorted(by_example):
        pairs = sorted(by_example[e])
        steps = [s for s, _ in pairs]
        if steps != list(range(len(steps))):
            raise ValueError(f"example {e}: its steps are {steps}; every step 0..T-1 must be present once.")
        rows = [r for _, r in pairs]
        n_prompt = int(attr.attention_mask[rows[0]].sum())                          # step 0 = the prompt alone
        n_cols = int(attr.attention_mask[rows[-1]].sum()) if include_prefix else n_prompt
        scores = torch.zeros(len(rows), n_cols)
        for s, r in enumerate(rows):
            width = min(n_cols, int(attr.attention_mask[r].sum()))
            scores[s, :width] = attr.scores[r, :width].float()
        target = attr.target[rows]
        last = attr.tokens[rows[-1]]
        names = [target_tokens[int(t)] if target_tokens is not None else
                 (last[n_prompt + s] if n_prompt + s < int(attr.attention_mask[rows[-1]].sum()) else f"<{int(t)}>")
                 for s, t in enumerate(target.tolist())]
        eid = attr.example_id(rows[0]).rsplit("@", 1)[0]
        out.append(StepMatrix(e, eid, attr.tokens[rows[0]][:n_prompt], names, last[:n_cols], scores, target,
                              attr.target_prob[rows], rows, attr.method))
    return out
