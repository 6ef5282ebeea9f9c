"""Alignment error rate (Och & Ney 2003) and the word links it is computed on.

    links = extract_links(scores, rule="argmax")          # scores [tgt_word, src_word] -> {(src, tgt), ...}
    aer(links, sure={(0, 0)}, possible={(1, 1)})           # 1 − (|A∩S| + |A∩P|) / (|A| + |S|)
    corpus_aer([links, ...], [sure, ...], [possible, ...])  # counts summed over sentences (the standard)

Links are sets of (source word index, target word index) pairs, 0-based. A is the predicted set, S the Sure gold
links and P the Possible ones with S ⊆ P (Och & Ney 2003, "A Systematic Comparison of Various Statistical
Alignment Models", §6): a gold file that lists a link only as Sure still counts it as Possible (P := P ∪ S), and
possible=None means P = S (all gold Sure, as in the built-in `reorder` task).
    precision = |A∩P| / |A|        recall = |A∩S| / |S|        AER = 1 − (|A∩S| + |A∩P|) / (|A| + |S|)
With P = S, AER = 1 − F1. An empty denominator gives NaN (no links predicted: precision; no Sure link: recall;
neither: AER). Corpus level: the counts are summed over sentences before dividing (average="corpus", the WPT 2003
and fast_align/awesome-align convention, so long sentences weigh more); average="sentence" is the mean of the
per-sentence values, NaN skipped.

Extraction rules, from a score matrix [target word, source word] (attention rows: each target word's weights):
    argmax      each target word links to its highest-scoring source word (default; what analyses.seq2seq uses)
    argmax_src  each source word links to its highest-scoring target word
    intersect   argmax ∩ argmax_src: both directions agree (bidirectional; precise)
    union       argmax ∪ argmax_src (bidirectional; more recall)
    threshold   every pair whose score is > threshold (e.g. a softmax probability, awesome-align's rule)
Ties go to the lower index; NaN and −inf scores are never linked (a row or column without another score gets no
link). `merge_subwords` first sums (or averages, or maxes) a sub-word score matrix onto the gold's words.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

Link = tuple[int, int]        # (source word, target word), 0-based
RULES = ("argmax", "argmax_src", "intersect", "union", "threshold")
MERGES = ("sum", "mean", "max")
AVERAGES = ("corpus", "sentence")


def links(value: Iterable, *, name: str = "links") -> frozenset[Link]:
    """Any iterable of (source word, target word) pairs of ints >= 0 -> a frozenset of int pairs.

        links([(0, 1), [2, 0]])  # frozenset({(0, 1), (2, 0)})
    """
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be an iterable of (source word, target word) pairs; got the string {value!r}.")
    out = set()
    try:
        items = list(value)
    except TypeError as e:
        raise ValueError(f"{name} must be an iterable of (source word, target word) pairs; got "
                         f"{type(value).__name__}.") from e
    for pair in items:
        ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in pair)
        if not ok:
            raise ValueError(f"{name} must hold (source word, target word) pairs of ints >= 0 (0-based); "
                             f"got {pair!r}.")
        out.add((int(pair[0]), int(pair[1])))
    return frozenset(out)


@dataclass(frozen=True)
class AlignmentCounts:
    """The four counts every alignment score is made of; `+` sums them (corpus level).

        c = alignment_counts({(0, 0), (1, 2)}, sure={(0, 0)}, possible={(1, 1)})
        c.n_predicted, c.n_sure, c.n_sure_hits, c.n_possible_hits   # 2, 1, 1, 1
    """

    n_predicted: int          # |A|
    n_sure: int               # |S|
    n_sure_hits: int          # |A ∩ S|
    n_possible_hits: int      # |A ∩ P|, P ⊇ S

    def __add__(self, other: AlignmentCounts) -> AlignmentCounts:
        return AlignmentCounts(self.n_predicted + other.n_predicted, self.n_sure + other.n_sure,
                               self.n_sure_hits + other.n_sure_hits, self.n_possible_hits + other.n_possible_hits)

    @property
    def aer(self) -> float:
        """1 − (|A∩S| + |A∩P|) / (|A| + |S|); NaN when A and S are both empty."""
        d = self.n_predicted + self.n_sure
        return 1 - (self.n_sure_hits + self.n_possible_hits) / d if d else math.nan

    @property
    def precision(self) -> float:
        """|A∩P| / |A|; NaN when nothing was predicted."""
        return self.n_possible_hits / self.n_predicted if self.n_predicted else math.nan

    @property
    def recall(self) -> float:
        """|A∩S| / |S|; NaN when there is no Sure link."""
        return self.n_sure_hits / self.n_sure if self.n_sure else math.nan


def alignment_counts(predicted: Iterable, sure: Iterable, possible: Iterable | None = None) -> AlignmentCounts:
    """|A|, |S|, |A∩S| and |A∩P| of one sentence (P := P ∪ S; possible=None: P = S)."""
    a, s = links(predicted, name="predicted"), links(sure, name="sure")
    p = s if possible is None else links(possible, name="possible") | s
    return AlignmentCounts(len(a), len(s), len(a & s), len(a & p))


def aer(predicted: Iterable, sure: Iterable, possible: Iterable | None = None) -> float:
    """Alignment error rate of one sentence, Och & Ney (2003): 1 − (|A∩S| + |A∩P|) / (|A| + |S|).

        aer({(0, 0), (1, 2)}, sure={(0, 0)}, possible={(1, 1)})   # 1 − (1 + 1) / (2 + 1) = 1/3
    Args:
        predicted: A, (source word, target word) pairs, 0-based. sure: S. possible: P (S is added to it);
            None: P = S.
    Returns:
        A float in [0, 1] (0 = perfect); NaN when A and S are both empty.
    """
    return alignment_counts(predicted, sure, possible).aer


def alignment_precision(predicted: Iterable, sure: Iterable, possible: Iterable | None = None) -> float:
    """|A∩P| / |A|: the share of predicted links the gold allows (P ⊇ S); NaN if A is empty.

        alignment_precision({(0, 0), (1, 2)}, sure={(0, 0)}, possible={(1, 1)})   # 1 / 2
    """
    return alignment_counts(predicted, sure, possible).precision


def alignment_recall(predicted: Iterable, sure: Iterable, possible: Iterable | None = None) -> float:
    """|A∩S| / |S|: the share of Sure links predicted (Possible ones are not required); NaN if S is empty.

        alignment_recall({(0, 0)}, sure={(0, 0), (1, 1)})   # 1 / 2
    """
    return alignment_counts(predicted, sure, possible).recall


def corpus_counts(predicted: Sequence, sure: Sequence, possible: Sequence | None = None) -> list[AlignmentCounts]:
    """Per-sentence `alignment_counts` of parallel lists (possible=None: P = S in every sentence)."""
    n = len(predicted)
    for name, other in (("sure", sure), ("possible", possible)):
        if other is not None and len(other) != n:
            raise ValueError(f"{name} must have one link set per sentence of predicted ({n}); got {len(other)}.")
    poss = [None] * n if possible is None else possible
    return [alignment_counts(a, s, p) for a, s, p in zip(predicted, sure, poss)]


def _corpus(predicted, sure, possible, average: str, score: str) -> float:
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {', '.join(AVERAGES)}; got {average!r}.")
    counts = corpus_counts(predicted, sure, possible)
    if average == "corpus":
        return getattr(sum(counts, AlignmentCounts(0, 0, 0, 0)), score)
    values = [v for v in (getattr(c, score) for c in counts) if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def corpus_aer(predicted: Sequence, sure: Sequence, possible: Sequence | None = None, *,
               average: str = "corpus") -> float:
    """AER over sentences: counts summed (average="corpus", the standard) or the per-sentence mean ("sentence").

        corpus_aer([{(0, 0)}, {(0, 1)}], sure=[{(0, 0)}, {(0, 0), (1, 1)}])   # 1 − 2·1 / (2 + 3) = 0.6
    Args:
        predicted, sure, possible: one link set per sentence (possible None: P = S everywhere).
        average: "corpus" or "sentence" (NaN sentences skipped; NaN if all are).
    """
    return _corpus(predicted, sure, possible, average, "aer")


def corpus_alignment_precision(predicted: Sequence, sure: Sequence, possible: Sequence | None = None, *,
                               average: str = "corpus") -> float:
    """Σ|A∩P| / Σ|A| over sentences (average="corpus"), or the mean per-sentence precision ("sentence")."""
    return _corpus(predicted, sure, possible, average, "precision")


def corpus_alignment_recall(predicted: Sequence, sure: Sequence, possible: Sequence | None = None, *,
                            average: str = "corpus") -> float:
    """Σ|A∩S| / Σ|S| over sentences (average="corpus"), or the mean per-sentence recall ("sentence")."""
    return _corpus(predicted, sure, possible, average, "recall")


# -- from scores to links --------------------------------------------------------------------------
def _matrix(scores, name: str = "scores") -> np.ndarray:
    if hasattr(scores, "detach"):                                                   # a torch Tensor
        scores = scores.detach().cpu().double().numpy()
    try:
        m = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a 2-D array of numbers [target, source]; got {type(scores).__name__}.") from e
    if m.ndim != 2:
        raise ValueError(f"{name} must be 2-D [target, source]; got shape {m.shape}.")
    return m


def _best(m: np.ndarray, axis: int) -> set[Link]:
    """argmax along `axis` (1: per target word over sources; 0: per source word over targets) -> links."""
    ok = ~np.isnan(m) & (m != -np.inf)                                              # [tgt, src]
    best = np.where(ok, m, -np.inf).argmax(axis)                                    # first index on ties
    has = ok.any(axis)
    if axis == 1:
        return {(int(best[t]), t) for t in range(m.shape[0]) if has[t]}
    return {(s, int(best[s])) for s in range(m.shape[1]) if has[s]}


def extract_links(scores, rule: str = "argmax", *, threshold: float | None = None) -> frozenset[Link]:
    """Hard links from a score matrix [target word, source word] by `rule` (see the module doc).

        extract_links([[0.7, 0.3], [0.6, 0.4]])                       # {(0, 0), (0, 1)}: both targets pick source 0
        extract_links([[0.7, 0.3], [0.6, 0.4]], "argmax_src")         # {(0, 0), (1, 1)}
        extract_links([[0.7, 0.3], [0.6, 0.4]], "threshold", threshold=0.5)   # {(0, 0), (0, 1)}
    Args:
        scores: [tgt_word, src_word] array-like or Tensor (word level: merge sub-words first, `merge_subwords`).
        rule: one of RULES. threshold: required by "threshold" (links where score > threshold), else None.
    Returns:
        frozenset of (source word, target word) pairs, 0-based.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}.")
    if (rule == "threshold") != (threshold is not None):
        raise ValueError(f"threshold is required by rule='threshold' and used by no other rule; got "
                         f"threshold={threshold!r} with rule={rule!r}.")
    m = _matrix(scores)
    if rule == "threshold":
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number; got {threshold!r}.")
        t, s = np.nonzero(np.nan_to_num(m, nan=-np.inf) > threshold)
        return frozenset((int(j), int(i)) for i, j in zip(t, s))
    if rule == "argmax":
        return frozenset(_best(m, 1))
    if rule == "argmax_src":
        return frozenset(_best(m, 0))
    forward, backward = _best(m, 1), _best(m, 0)
    return frozenset(forward & backward if rule == "intersect" else forward | backward)


def _word_map(word_of_token: Sequence, n_tokens: int, n_words: int | None, name: str) -> tuple[np.ndarray, int]:
    """token -> word list (None = dropped) -> one-hot [token, word] and the word count."""
    ids = list(word_of_token)
    if len(ids) != n_tokens:
        raise ValueError(f"{name} must have one entry per token ({n_tokens}, the scores' size on that side); "
                         f"got {len(ids)}.")
    for i, w in enumerate(ids):
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0):
            raise ValueError(f"{name} must hold word indices (ints >= 0) or None for special tokens; got {w!r} "
                             f"at token {i}.")
    top = max((int(w) for w in ids if w is not None), default=-1) + 1
    if n_words is None:
        n_words = top
    elif top > n_words:
        raise ValueError(f"{name} names word {top - 1} but n_words is {n_words}; word indices must be < n_words.")
    onehot = np.zeros((n_tokens, n_words))
    for i, w in enumerate(ids):
        if w is not None:
            onehot[i, int(w)] = 1.0
    return onehot, n_words


def merge_subwords(scores, src_word_of_token: Sequence, tgt_word_of_token: Sequence, how: str = "sum", *,
                   n_src_words: int | None = None, n_tgt_words: int | None = None) -> np.ndarray:
    """Sub-word scores [tgt_tok, src_tok] -> word scores [tgt_word, src_word], over each word pair's token block.

        merge_subwords([[0.2, 0.3, 0.5]], [0, 0, None], [0])   # [[0.5]]: "un" + "##like" sum, [SEP] dropped
    Args:
        scores: [tgt_tok, src_tok] array-like or Tensor (e.g. one example's cross-attention rows).
        src_word_of_token, tgt_word_of_token: per token, the gold word it belongs to (0-based), None for a
            special or padding token (dropped).
        how: "sum" (default: a word's attention mass is the sum over its pieces, so attention rows stay
            distributions over source words and additive attributions stay additive; argmax per target word is
            the same as with the mean over target pieces), "mean" (no bias toward words split into many pieces,
            e.g. for argmax_src) or "max".
        n_src_words, n_tgt_words: the gold's word counts (default: highest index + 1); a word with no token gets NaN.
    Returns:
        np.ndarray [tgt_word, src_word], float64.
    """
    if how not in MERGES:
        raise ValueError(f"how must be one of {', '.join(MERGES)}; got {how!r}.")
    m = _matrix(scores)
    src, n_s = _word_map(src_word_of_token, m.shape[1], n_src_words, "src_word_of_token")   # [src_tok, src_word]
    tgt, n_t = _word_map(tgt_word_of_token, m.shape[0], n_tgt_words, "tgt_word_of_token")   # [tgt_tok, tgt_word]
    count = tgt.sum(0)[:, None] * src.sum(0)[None, :]                               # [tgt_word, src_word] tokens
    if how == "max":
        out = np.full((n_t, n_s), -np.inf)
        for t in range(n_t):
            rows = m[tgt[:, t] > 0]                                                 # [pieces of t, src_tok]
            for s in range(n_s):
                if rows.size and (src[:, s] > 0).any():
                    out[t, s] = rows[:, src[:, s] > 0].max()
    else:
        kept = np.where((tgt.sum(1) > 0)[:, None] & (src.sum(1) > 0)[None, :], m, 0.0)   # dropped tokens' NaN too
        out = tgt.T @ kept @ src                                                    # [tgt_word, src_word] block sums
        if how == "mean":
            out = out / np.maximum(count, 1)
    return np.where(count > 0, out, np.nan)


__all__ = ["Link", "RULES", "MERGES", "AVERAGES", "AlignmentCounts", "links", "alignment_counts", "aer",
           "alignment_precision", "alignment_recall", "corpus_counts", "corpus_aer", "corpus_alignment_precision",
           "corpus_alignment_recall", "extract_links", "merge_subwords"]
