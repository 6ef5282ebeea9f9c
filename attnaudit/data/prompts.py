"""Prompts and the continuations to explain, for language models: what `attnaudit analyze --data` reads for an LM.

    examples = read_prompts("prompts.jsonl")     # {"prompt": "...", "target": "...", "evidence": [0, 1, ...]}

One row per example (.jsonl, .csv or .tsv, optionally .gz): `prompt` (the text the model reads), `target` (the
continuation whose tokens are explained, step by step; optional when every row leaves it out: the model's
greedy next token is explained), optional `id` and optional `evidence`: one 0/1 per whitespace word of the
prompt, the words known to decide the target (scored as ground truth, like a task's rationale). Errors name the
file, the line and the rule.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from attnaudit.data.examples import Example, _line_meta, _read_rows

PROMPT_FIELDS = ("prompt", "target")


def read_prompts(path: str | os.PathLike, *, prompt_col: str = "prompt", target_col: str = "target") -> list[Example]:
    """Examples with text = prompt and target = continuation (None when the file has no target column)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--data must be a .jsonl, .csv or .tsv file of prompts; {str(path)!r} is a folder.")
    if not path.is_file():
        raise ValueError(f"--data must be a .jsonl, .csv or .tsv file of prompts; {str(path)!r} does not exist.")
    cleaned: dict = {}
    rows = _read_rows(path, [prompt_col], cleaned)
    if not rows:
        raise ValueError(f"{path} holds no rows; expected at least one {prompt_col!r}.")
    with_target = [target_col in r and r[target_col].strip() != "" for _, r in rows]
    if any(with_target) and not all(with_target):
        line = rows[with_target.index(False)][0]
        raise ValueError(f"{path}, line {line}: no {target_col!r}, while other rows have one; give a target on every "
                         "row (the continuation to explain) or on none (the greedy next token is explained).")
    out: list[Example] = []
    seen: dict[str, int] = {}
    for i, (line, r) in enumerate(rows):
        prompt = r[prompt_col]
        if not prompt.split():
            raise ValueError(f"{path}, line {line}: {prompt_col!r} is empty; every row needs a prompt.")
        eid = r.get("id") or str(i)
        if eid in seen:
            raise ValueError(f"{path}, line {line}: id {eid!r} was already used on line {seen[eid]}; ids must be unique.")
        seen[eid] = line
        rationale = None
        if r.get("evidence"):
            rationale = _evidence(path, line, r["evidence"], len(prompt.split()))
        out.append(Example(id=eid, text=prompt, target=r[target_col] if with_target[i] else None,
                           rationale=rationale, meta=_line_meta(cleaned, line)))
    return out


def _evidence(path: Path, line: int, value: str, n_words: int) -> tuple[int, ...]:
    """`evidence` as written (a JSON list, or space-separated 0/1 in a table) -> one 0/1 per prompt word."""
    try:
        items = json.loads(value) if value.lstrip().startswith("[") else value.split()
        flags = tuple(int(x) for x in items)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}, line {line}: evidence must be a list of 0/1, one per prompt word; got {value!r}.") from e
    if len(flags) != n_words or any(f not in (0, 1) for f in flags):
        raise ValueError(f"{path}, line {line}: evidence must hold one 0/1 per whitespace word of the prompt "
                         f"({n_words}); got {len(flags)} values ({value!r}).")
    return flags
