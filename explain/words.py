"""Word-level views of token attributions: sub-word scores pooled into whitespace words.

Sub-word tokenizers split words ("unlikely" -> "un", "##like", "##ly"), while people read, and rationales
(ERASER, DeYoung et al. 2020) annotate, whitespace words. `aggregate_words` pools a token-level `Attribution`
into words: "sum" (the word scores add up to the token scores, so completeness is kept), "max" (the largest
signed piece score) or "mean". Special tokens and padding belong to no word. Faithfulness metrics and
perturbations stay token-level; this is a view for reading, reports and plausibility.

    >>> attr = get_explainer("integrated_gradients").explain(model, ["an unlikely hit"])
    >>> words = aggregate_words(attr, how="max", word_ids=model.word_ids(attr))
    >>> words.words[0], words.scores[0]          # ['an', 'unlikely', 'hit'], tensor([...])
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnaudit.explain.attribution import Attribution

HOWS = ("sum", "max", "mean")
SUBWORD_MARKS = ("##", "▁", "Ġ")      # WordPiece continuation, SentencePiece and byte-level BPE word starts


@dataclass(frozen=True)
class WordAttribution:
    """Word scores with their provenance.

    words: per example, the words that own at least one scored token, in text order; word_index: their index
    among the example's whitespace words (`text.split()`; truncation may drop words at the end);
    scores [batch, n_words] float (0 beyond each example's words); word_mask [batch, n_words] bool;
    how: the pooling; method, params, target: the token-level attribution's.
    """

    words: list[list[str]]
    word_index: list[list[int]]
    scores: Tensor
    word_mask: Tensor
    how: str
    method: str
    params: dict[str, Any]
    target: Tensor
    ids: list[str] | None = None

    def __len__(self) -> int:
        return self.scores.shape[0]

    def to_frame(self):
        """Tidy table: one row per word (example_id, word_index, word, score, how, method, target)."""
        import pandas as pd

        rows = []
        for i, (words, index) in enumerate(zip(self.words, self.word_index)):
            eid = self.ids[i] if self.ids else str(i)
            rows += [(eid, w_i, w, float(self.scores[i, j]), self.how, self.method, int(self.target[i]))
                     for j, (w_i, w) in enumerate(zip(index, words))]
        return pd.DataFrame(rows, columns=["example_id", "word_index", "word", "score", "how", "method", "target"])


def aggregate_words(attribution: Attribution, how: str = "sum", *,
                    word_ids: Sequence[Sequence[int | None]] | None = None) -> WordAttribution:
    """Pool token scores into whitespace words.

    Args:
        attribution: token-level scores [batch, seq].
        how: "sum", "max" or "mean" over each word's scored tokens.
        word_ids: per example and position, the whitespace-word index of the token (None for special tokens
            and padding), e.g. `model.word_ids(attribution)` for a HuggingFace model. None: one word per scored
            token, as the built-in tokenizer makes them (refused when the tokens look like sub-words).
    Returns:
        a `WordAttribution`.
    """
    if how not in HOWS:
        raise ValueError(f"how must be one of {', '.join(map(repr, HOWS))}; got {how!r}.")
    scored = attribution.scored_mask
    b, seq = scored.shape
    if word_ids is None:
        word_ids = _one_word_per_token(attribution)
    if len(word_ids) != b or any(len(w) < int(attribution.attention_mask[i].sum()) for i, w in enumerate(word_ids)):
        raise ValueError(f"word_ids must hold {b} lists, each covering its example's real tokens (seq={seq}); "
                         f"got {len(word_ids)} lists of lengths {[len(w) for w in word_ids][:5]}.")
    per_example: list[tuple[list[int], list[float]]] = []
    for i in range(b):
        groups: dict[int, list[float]] = {}
        for j in range(seq):
            w = word_ids[i][j] if j < len(word_ids[i]) else None
            if w is not None and bool(scored[i, j]):
                groups.setdefault(int(w), []).append(float(attribution.scores[i, j]))
        index = sorted(groups)
        pooled = [_pool(torch.tensor(groups[w], dtype=torch.float64), how) for w in index]
        per_example.append((index, pooled))
    n_words = max((len(ix) for ix, _ in per_example), default=0)
    scores = torch.zeros(b, n_words)
    word_mask = torch.zeros(b, n_words, dtype=torch.bool)
    words: list[list[str]] = []
    for i, (index, pooled) in enumerate(per_example):
        scores[i, : len(pooled)] = torch.tensor(pooled, dtype=torch.float)
        word_mask[i, : len(pooled)] = True
        words.append(_word_texts(attribution, i, index, word_ids[i]))
    return WordAttribution(words=words, word_index=[ix for ix, _ in per_example], scores=scores, word_mask=word_mask,
                           how=how, method=attribution.method, params={**attribution.params, "words": how},
                           target=attribution.target, ids=attribution.ids)


def _pool(values: Tensor, how: str) -> float:
    if how == "sum":
        return float(values.sum())
    return float(values.max()) if how == "max" else float(values.mean())


def _one_word_per_token(attribution: Attribution) -> list[list[int | None]]:
    """Each scored token its own word, numbered in order; refuse sub-word tokens (they need real word_ids)."""
    out = []
    for i, toks in enumerate(attribution.tokens):
        ids: list[int | None] = []
        n = 0
        for j, tok in enumerate(toks):
            if not bool(attribution.scored_mask[i, j]):
                ids.append(None)
                continue
            if any(mark in tok for mark in SUBWORD_MARKS):
                raise ValueError(f"example {i}, token {tok!r} looks like a sub-word piece; pass the word alignment: "
                                 "aggregate_words(attribution, how, word_ids=model.word_ids(attribution)).")
            ids.append(n)
            n += 1
        out.append(ids)
    return out


def _word_texts(attribution: Attribution, i: int, index: list[int], word_ids: Sequence[int | None]) -> list[str]:
    """The words as written in the text when it is known, else their tokens joined."""
    text = attribution.texts[i] if attribution.texts else None
    split = text.split() if isinstance(text, str) else None
    if split is not None and all(w < len(split) for w in index):
        return [split[w] for w in index]
    pieces: dict[int, list[str]] = {}
    for j, w in enumerate(word_ids):
        if w is not None and j < len(attribution.tokens[i]) and bool(attribution.scored_mask[i, j]):
            pieces.setdefault(int(w), []).append(attribution.tokens[i][j].removeprefix("##"))
    return ["".join(pieces[w]) for w in index]
