"""Text in for the HuggingFace adapters: inputs checked, tokenised under the length rule, padded into a Batch.

One home for what `HFClassifier` (`attnaudit.model.hf`), the decoders of `attnaudit.model.hf_lm` and
`HFTranslator` (`attnaudit.model.hf_seq2seq`, its source side) do alike with a tokenizer:

    examples, texts = text_inputs(inputs)                                  # Examples or None, and their texts
    rows, special, words, cut = tokenize_texts(tokenizer, texts, max_len=512, truncate=False, word_ids=True)
    batch = text_batch(tokenizer, pad_id, texts, examples, rows, special, words, cut)   # right-padded Batch
    model.word_ids(batch)  ->  align_word_ids(batch, lambda texts: (rows, words))    # checked against the batch

Word alignment: a fast tokenizer's character offsets give each token the whitespace word (`text.split()`) it
starts in (`offsets_to_words`); a slow one gives none unless the adapter passes `slow_words`.
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnaudit.data.examples import Example
from attnaudit.model.interface import Batch, batch_labels

Words = list[list[int | None]]          # per text, per token: the index of its whitespace word, None if special

__all__ = ["text_inputs", "tokenize_texts", "text_batch", "align_word_ids", "offsets_to_words", "is_fast"]


def text_inputs(inputs: str | Example | Sequence[str] | Sequence[Example], *, what: str = "example"
                ) -> tuple[list[Example | None], list[str]]:
    """A text, an Example or a list of them -> (the Example or None per input, the text per input).

    Refuses an empty list, an input that is neither a str nor an Example, and an empty or whitespace-only
    text (`what` names the input in that message: "example", "prompt").
    """
    items: Sequence[str | Example] = [inputs] if isinstance(inputs, (str, Example)) else inputs
    if len(items) == 0:
        raise ValueError("inputs must hold at least one text; got an empty list.")
    examples = [x if isinstance(x, Example) else None for x in items]
    texts = [x.text if isinstance(x, Example) else x for x in items]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"inputs[{i}] must be a str or an Example; got {type(t).__name__}.")
        if not t.strip():
            raise ValueError(f"inputs[{i}] is empty or whitespace-only; every {what} needs at least one word.")
    return examples, texts


def is_fast(tokenizer: Any) -> bool:
    """A fast (Rust) tokenizer: it gives character offsets, hence word alignments."""
    return bool(getattr(tokenizer, "is_fast", False))


def tokenize_texts(tokenizer: Any, texts: Sequence[str], *, max_len: int | None = None, truncate: bool = False,
                   word_ids: bool = False, slow_words: Callable[[str, list[int], list[bool]], list[int | None]]
                   | None = None) -> tuple[list[list[int]], list[list[bool]], Words, list[bool]]:
    """Texts -> (ids per text, special flags per text, whitespace-word index per token or None, truncated flags).

    Special tokens are added. A text longer than max_len tokens (special tokens included) raises unless
    `truncate=True`; max_len None: no limit. Words come from a fast tokenizer's offsets; from a slow one only
    through `slow_words(text, ids, special)`, and asking for them (`word_ids=True`) without it raises.
    """
    fast = is_fast(tokenizer)
    if word_ids and not fast and slow_words is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer, so sub-words cannot be "
                         "aligned with words (rationales, word_ids); save the model with a tokenizer.json.")
    options = dict(add_special_tokens=True, return_special_tokens_mask=True, return_offsets_mapping=fast,
                   return_attention_mask=False, return_token_type_ids=False, verbose=False)
    enc = tokenizer(list(texts), truncation=False, **options)
    lengths = [len(r) for r in enc["input_ids"]]
    cut = [max_len is not None and n > max_len for n in lengths]
    if any(cut):
        if not truncate:
            i = cut.index(True)
            raise ValueError(f"inputs[{i}] has {lengths[i]} tokens but this model takes at most {max_len} "
                             "(special tokens included); pass truncate=True or shorten it.")
        enc = tokenizer(list(texts), truncation=True, max_length=max_len, **options)
    rows = [list(map(int, r)) for r in enc["input_ids"]]
    special = [[bool(x) for x in s] for s in enc["special_tokens_mask"]]
    words: Words
    if fast:
        words = [offsets_to_words(t, o, s) for t, o, s in zip(texts, enc["offset_mapping"], special)]
    elif word_ids and slow_words is not None:
        words = [slow_words(t, r, s) for t, r, s in zip(texts, rows, special)]
    else:
        words = [[None] * len(r) for r in rows]
    return rows, special, words, cut


def text_batch(tokenizer: Any, pad_id: int, texts: Sequence[str], examples: Sequence[Example | None],
               rows: list[list[int]], special: list[list[bool]], words: Words, cut: list[bool], *,
               labels: bool = True) -> Batch:
    """Tokenised texts (`tokenize_texts`) -> a Batch right-padded with `pad_id`, the tokenizer's pad token string.

    The Examples' labels (unless labels=False), rationales (word w's 0/1 on each of its tokens) and ids are
    taken as `interface.batch_labels` does.
    """
    seq = max(map(len, rows))
    lengths = torch.tensor([len(r) for r in rows])
    input_ids = torch.tensor([r + [pad_id] * (seq - len(r)) for r in rows], dtype=torch.long)      # [batch, seq]
    attention_mask = torch.arange(seq)[None, :] < lengths[:, None]                              # [batch, seq]
    special_mask = torch.zeros_like(attention_mask)                                             # [batch, seq]
    for i, s in enumerate(special):
        special_mask[i, : len(s)] = torch.tensor(s, dtype=torch.bool)
    pad = tokenizer.pad_token
    tokens = [tokenizer.convert_ids_to_tokens(r) + [pad] * (seq - len(r)) for r in rows]
    label_ids, rationale, ids = batch_labels(examples, seq, words)
    return Batch(input_ids, attention_mask, special_mask, tokens, texts=list(texts),
                 labels=label_ids if labels else None, rationale=rationale, ids=ids, truncated=cut)


def align_word_ids(inputs: Any, rows_and_words: Callable[[list[str]], tuple[list[list[int]], Words]], *,
                   holders: str = "a Batch or Attribution", row: str = "example", ids: str = "token ids") -> Words:
    """`word_ids(inputs)` of an adapter: per row and position, the whitespace word a token belongs to.

    inputs: texts, or anything with `texts` (and `input_ids`, checked to be what the tokenizer makes of them:
    `holders` and `row`/`ids` word the errors); rows_and_words(texts) -> (ids per text, words per text).
    Rows are padded with None to the batch's width.
    """
    texts = [inputs] if isinstance(inputs, str) else getattr(inputs, "texts", inputs)
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"word_ids needs the texts: pass {holders} with `texts`, or a list of str.")
    rows, words = rows_and_words(list(texts))
    given = getattr(inputs, "input_ids", None)
    seq = max(map(len, rows)) if given is None else given.shape[1]
    for i, r in enumerate(rows):
        if given is not None and given[i, : len(r)].tolist() != r:
            raise ValueError(f"{row} {i}: its {ids} are not what this tokenizer makes of its text (a "
                             "perturbed or foreign batch?); word_ids aligns only the model's own encoding.")
    return [w + [None] * (seq - len(w)) for w in words]


def offsets_to_words(text: str, offsets, special: Sequence[bool]) -> list[int | None]:
    """Character offsets of tokens -> index of the whitespace word each starts in (None for special tokens)."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    starts = [s for s, _ in spans]
    out: list[int | None] = []
    for (start, _), is_special in zip(offsets, special):
        if is_special or not spans:
            out.append(None)
            continue
        j = start
        while j < len(text) and text[j].isspace():                  # byte-level BPE offsets may start on the space
            j += 1
        out.append(max(bisect.bisect_right(starts, j) - 1, 0))
    return out
