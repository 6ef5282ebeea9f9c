"""Parallel text with gold word alignments, in the fast_align / awesome-align formats (the WPT 2003 Hansards gold).

    examples = read_parallel("enfr.src-tgt", alignments="enfr.gold")   # Example.alignment = the Sure links
    gold = read_alignments("enfr.gold", examples)                       # [GoldAlignment(sure, possible)] per pair

Text file: one sentence pair per line, `source words ||| target words` (tokens separated by spaces; extra spaces
and trailing spaces are ignored). Gold file: one line per pair (an empty line for a pair without links) of
space-separated 1-indexed links, `i-j` Sure or `ipj` Possible, i indexing the source (left) word and j the target
word (Och & Ney 2003; Mihalcea & Pedersen 2003). Links are stored 0-based as (source word, target word) pairs.

`read_parallel` puts the Sure links in `Example.alignment` (the built-in `reorder` task's gold is all Sure too)
and the Possible-only ones in `Example.possible_alignment`; `GoldAlignment.from_example` reads both back, and
`read_alignments` returns them directly, `GoldAlignment.possible` ⊇ sure (P := P ∪ S, as AER assumes). Every format error is a `ParallelFormatError` (a ValueError) naming the file, the
line and the rule broken.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from attnaudit.core.io import atomic_write_text
from attnaudit.data.examples import Example, read_source

SEPARATOR = "|||"
_LINK = re.compile(r"([0-9]+)([-p])([0-9]+)")


class ParallelFormatError(ValueError):
    """A parallel text or gold alignment file breaks its format; the message names the file, line and rule."""


@dataclass(frozen=True)
class GoldAlignment:
    """One sentence pair's gold links, 0-based (source word, target word): Sure S and Possible P ⊇ S.

        g = GoldAlignment(sure={(0, 0)}, possible={(1, 1)})
        g.possible                     # frozenset({(0, 0), (1, 1)}): P := P ∪ S
    """

    sure: frozenset[tuple[int, int]]
    possible: frozenset[tuple[int, int]]

    def __post_init__(self):
        sure = frozenset((int(s), int(t)) for s, t in self.sure)
        object.__setattr__(self, "sure", sure)
        object.__setattr__(self, "possible", frozenset((int(s), int(t)) for s, t in self.possible) | sure)

    @classmethod
    def from_example(cls, example: Example) -> GoldAlignment:
        """The Example's `alignment` (Sure) and `possible_alignment` (Possible-only); no alignment -> no links."""
        links = frozenset(example.alignment or ())
        return cls(sure=links, possible=links | frozenset(example.possible_alignment or ()))


def read_parallel(path: str | os.PathLike, alignments: str | os.PathLike | None = None) -> list[Example]:
    """Sentence pairs `source ||| target` -> Examples (text = source, target = target, id = 0-based line number).

        examples = read_parallel("enfr.src-tgt", alignments="enfr.gold")
        examples[9].alignment          # ((0, 0), (0, 1), (1, 2)): the Sure links of `1-1 1-2 2-3`
    Args:
        path: the text file. alignments: its gold file (one line per pair), or None (alignment stays None).
    Returns:
        One Example per line; with a gold file, `alignment` = the pair's Sure links, sorted (Possible-only links
        are left out: read them with `read_alignments`).
    """
    path = Path(path)
    examples: list[Example] = []
    for line, raw in _lines(path):
        sides = raw.split(SEPARATOR)
        if len(sides) != 2:
            rule = "has no" if len(sides) == 1 else f"has {len(sides) - 1}"
            raise ParallelFormatError(f"{path}, line {line}: {rule} {SEPARATOR!r} separator; each line must be "
                                      f"'source words {SEPARATOR} target words'; got {_clip(raw)!r}.")
        src, tgt = (" ".join(s.split()) for s in sides)
        for side, text in (("source (left of '|||')", src), ("target (right of '|||')", tgt)):
            if not text:
                raise ParallelFormatError(f"{path}, line {line}: the {side} side is empty; every pair needs "
                                          f"words on both sides; got {_clip(raw)!r}.")
        examples.append(Example(id=str(len(examples)), text=src, target=tgt))
    if not examples:
        raise ParallelFormatError(f"{path}, line 1: the file holds no sentence pairs; expected lines "
                                  f"'source words {SEPARATOR} target words'.")
    if alignments is None:
        return examples
    gold = read_alignments(alignments, examples, text_path=path)
    return [Example(id=e.id, text=e.text, target=e.target, alignment=tuple(sorted(g.sure)),
                    possible_alignment=tuple(sorted(g.possible - g.sure))) for e, g in zip(examples, gold)]


def read_alignments(path: str | os.PathLike, examples: Sequence[Example], *,
                    text_path: str | os.PathLike | None = None) -> list[GoldAlignment]:
    """Gold links, one line per pair of `examples` (`i-j` Sure, `ipj` Possible, 1-indexed) -> GoldAlignments.

        gold = read_alignments("enfr.gold", read_parallel("enfr.src-tgt"))
        gold[9].sure, gold[9].possible - gold[9].sure   # Sure links; the Possible-only ones
    Args:
        path: the gold file. examples: the pairs it aligns (their text and target give each side's word count).
        text_path: the text file's name, for the message when the line counts differ.
    Returns:
        One GoldAlignment per example, 0-based (source word, target word) links, possible ⊇ sure.
    """
    path = Path(path)
    lines = _lines(path)
    where = f" ({text_path})" if text_path is not None else ""
    if len(lines) != len(examples):
        line = min(len(lines), len(examples)) + 1
        raise ParallelFormatError(
            f"{path}, line {line}: the gold file has {len(lines)} lines but the text file{where} has {len(examples)} "
            f"sentence pairs; give one alignment line per pair (an empty line for a pair without links).")
    out = []
    for (line, raw), ex in zip(lines, examples):
        n_src, n_tgt = len(ex.text.split()), len((ex.target or "").split())
        sure: set[tuple[int, int]] = set()
        possible: set[tuple[int, int]] = set()
        for token in raw.split():
            m = _LINK.fullmatch(token)
            if m is None:
                raise ParallelFormatError(f"{path}, line {line}: malformed link {_clip(token)!r}; links are "
                                          f"1-indexed 'i-j' (Sure) or 'ipj' (Possible), e.g. '1-2' or '3p4'.")
            i, j = int(m[1]), int(m[3])
            for side, k, n in (("source", i, n_src), ("target", j, n_tgt)):
                if not 1 <= k <= n:
                    raise ParallelFormatError(
                        f"{path}, line {line}: link {token!r} has {side} index {k} out of range [1, {n}] (the "
                        f"{side} side has {n} words; indices are 1-based).")
            (sure if m[2] == "-" else possible).add((i - 1, j - 1))
        out.append(GoldAlignment(sure=frozenset(sure), possible=frozenset(possible)))
    return out


def format_links(gold: GoldAlignment) -> str:
    """One gold line: Sure links as `i-j`, Possible-only ones as `ipj`, 1-indexed, sorted.

        format_links(GoldAlignment(sure={(0, 0)}, possible={(1, 1)}))   # "1-1 2p2"
    """
    sure = [f"{s + 1}-{t + 1}" for s, t in sorted(gold.sure)]
    return " ".join(sure + [f"{s + 1}p{t + 1}" for s, t in sorted(gold.possible - gold.sure)])


def write_parallel(examples: Sequence[Example], path: str | os.PathLike, *,
                   alignments: str | os.PathLike | None = None,
                   gold: Iterable[GoldAlignment] | None = None) -> Path:
    """Examples -> `source ||| target` lines at `path` (and their gold at `alignments`), atomically.

    The gold lines are `gold` when given, else each Example's `alignment` as Sure links; `read_parallel` /
    `read_alignments` read both back unchanged.
    """
    path = Path(path)
    rows = []
    for i, e in enumerate(examples):
        if e.target is None or not e.text.split() or not e.target.split():
            raise ValueError(f"examples[{i}] ({e.id!r}) must have words in both text and target; got "
                             f"text={e.text!r}, target={e.target!r}.")
        if SEPARATOR in e.text or SEPARATOR in e.target:
            raise ValueError(f"examples[{i}] ({e.id!r}) holds {SEPARATOR!r} in its text or target, which the "
                             f"format uses as the separator.")
        rows.append(f"{' '.join(e.text.split())} {SEPARATOR} {' '.join(e.target.split())}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(rows))
    if alignments is not None:
        golds = [GoldAlignment.from_example(e) for e in examples] if gold is None else list(gold)
        if len(golds) != len(examples):
            raise ValueError(f"gold must have one GoldAlignment per example ({len(examples)}); got {len(golds)}.")
        Path(alignments).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(alignments), "".join(format_links(g) + "\n" for g in golds))
    return path


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of each line; a final newline ends the last line, it starts no new one."""
    if path.is_dir():
        raise ParallelFormatError(f"{path} is a folder; pass a parallel text or gold alignment file.")
    if not path.is_file():
        raise ParallelFormatError(f"{path} does not exist or is not a file; check the name and folder.")
    raw = read_source(path).split("\n")
    if raw and raw[-1] == "":
        raw.pop()
    return [(i, text.rstrip("\r")) for i, text in enumerate(raw, start=1)]


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


__all__ = ["GoldAlignment", "ParallelFormatError", "read_parallel", "read_alignments", "format_links",
           "write_parallel", "SEPARATOR"]
