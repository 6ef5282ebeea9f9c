"""Word-level vocabulary with the special tokens, stored in the checkpoint's config.json.

Tokenisation is deliberately simple and reversible: lower-case, split on whitespace. Whitespace tokens
are what rationales (built-in tasks, ERASER) index, so token i of a text is word i.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

PAD, CLS, SEP, UNK, MASK = "[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"
SPECIAL_TOKENS = (PAD, CLS, SEP, UNK, MASK)


def words(text: str) -> list[str]:
    """The built-in tokenizer: lower-cased whitespace tokens."""
    return text.lower().split()


class Vocab:
    """Token <-> id map; ids 0..4 are [PAD], [CLS], [SEP], [UNK], [MASK]."""

    def __init__(self, tokens: Iterable[str]):
        self.itos = list(tokens)
        if tuple(self.itos[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(
                f"a vocabulary must start with {list(SPECIAL_TOKENS)}; got {self.itos[:len(SPECIAL_TOKENS)]}."
            )
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            dup = next(t for t, n in Counter(self.itos).items() if n > 1)
            raise ValueError(f"vocabulary tokens must be unique; {dup!r} appears more than once.")
        self.pad_id, self.cls_id, self.sep_id, self.unk_id, self.mask_id = range(len(SPECIAL_TOKENS))

    @classmethod
    def build(cls, texts: Iterable[str], *, min_freq: int = 1, max_size: int | None = None) -> Vocab:
        """Most frequent words first (ties alphabetical, so the result is deterministic)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1; got {min_freq}.")
        counts = Counter(w for t in texts for w in words(t))
        ranked = sorted((w for w, n in counts.items() if n >= min_freq and w not in SPECIAL_TOKENS),
                        key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(SPECIAL_TOKENS))]
        return cls([*SPECIAL_TOKENS, *ranked])

    def __len__(self) -> int:
        return len(self.itos)

    def ids(self, tokens: Iterable[str]) -> list[int]:
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(range(len(SPECIAL_TOKENS)))
