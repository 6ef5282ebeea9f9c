"""Generation as classification: one Batch row per (example, target step), so every explainer applies.

A decoder-only LM explaining a continuation t_1..t_T of a prompt p asks, at each step s, "why p(t_s | p, t_<s)?".
That is a classifier over the vocabulary that reads the LAST real token of the row ``p + t_<s``:

    batch = step_batch([prompt_ids], [target_ids], pad_id=0, tokens=tok, max_len=128)
    # rows: p, p+t1, p+t1+t2, ...   labels: t1, t2, t3, ...   special_mask: True on the target prefix
    logits = last_logits(forward, batch.input_ids, batch.attention_mask)       # [rows, vocab]

Row s is a prefix of row T-1, and under a causal mask (right padding) a prefix's forward equals the longer
row's first positions exactly: `last_logits` runs each distinct longest row once and reads every shorter row's
logits at its own last position ("one teacher-forced forward serves all steps"). It does so only when nothing
records or edits the attention and no gradient is asked for; otherwise every row runs as itself.

Models whose explained token is the last real one (decoder-only LMs, decoder classifiers such as GPT-2's
sequence classification head) set ``readout = "last"``; encoders keep ``readout = "first"`` ([CLS]).
`readout_index` gives the row explainers read out (`readout_rows`: None for encoders).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from attnaudit.model.hooks import active_hook_count
from attnaudit.model.interface import Batch


def reads_last(model) -> bool:
    """Whether `model` reads its prediction at the last real token (a causal decoder, `readout = "last"`)."""
    return getattr(model, "readout", "first") == "last"


def readout_index(model, attention_mask: Tensor) -> Tensor:
    """The position each row's prediction is read from -> [batch] long: 0 ([CLS]) or the last real token."""
    if reads_last(model):
        return last_index(attention_mask)
    return torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)


def readout_rows(model, attention_mask: Tensor) -> Tensor | None:
    """`Capture.readout_rows`: the last real token per row for a decoder, None for an encoder (row 0, [CLS])."""
    return last_index(attention_mask) if reads_last(model) else None


def last_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real (True) position per row -> [batch] long (right padding assumed; 0 for an empty row)."""
    mask = attention_mask.bool()                                                   # [batch, seq]
    seq = mask.shape[1]
    positions = torch.arange(seq, device=mask.device).expand_as(mask)              # [batch, seq]
    return torch.where(mask, positions, -1).amax(1).clamp(min=0)                   # [batch]


def gather_last(values: Tensor, attention_mask: Tensor) -> Tensor:
    """values [batch, seq, ...] -> [batch, ...] at each row's last real position."""
    index = last_index(attention_mask).to(values.device)                           # [batch]
    return values[torch.arange(values.shape[0], device=values.device), index]


def step_batch(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int] | None], *, pad_id: int,
               tokens: Callable[[list[int]], list[str]], max_len: int,
               prompt_special: Sequence[Sequence[bool]] | None = None, texts: Sequence[str] | None = None,
               ids: Sequence[str] | None = None, rationale: Sequence[Sequence[float] | None] | None = None,
               pad_token: str = "[PAD]") -> Batch:
    """Prompts and continuations (token ids) -> a Batch with one row per (example, target step).

    Args:
        prompts: per example, its prompt ids (special tokens such as BOS already in place).
        targets: per example, the continuation ids to explain step by step; all None -> one row per prompt
            (the next token, whatever it is; labels None). A mix of None and given is refused.
        pad_id: right padding; tokens: ids -> token strings; max_len: the model's context length.
        prompt_special: per example, per prompt token, True where it is special (never removed, never scored).
        rationale: per example, per prompt token, gold evidence 0/1 (or None).
    Rows: ``prompt + target[:s]`` for s = 0..T-1, label ``target[s]``; the target prefix is special (kept by
    perturbations, not scored: the attribution is over the prompt). `batch.steps[r]` = (example, s).
    """
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt; got an empty list.")
    if len(targets) != len(prompts):
        raise ValueError(f"targets must have one entry per prompt ({len(prompts)}); got {len(targets)}.")
    given = [t is not None for t in targets]
    if any(given) and not all(given):
        raise ValueError(f"targets must be given for every example or for none; example {given.index(False)} has none.")
    rows: list[list[int]] = []
    special: list[list[bool]] = []
    labels: list[int] = []
    steps: list[tuple[int, int]] = []
    gold: list[list[float] | None] = []
    for e, prompt in enumerate(prompts):
        prompt = list(map(int, prompt))
        if not prompt:
            raise ValueError(f"prompts[{e}] is empty; a prompt needs at least one token.")
        flags = list(prompt_special[e]) if prompt_special is not None else [False] * len(prompt)
        target = targets[e]
        if target is not None and len(target) == 0:
            raise ValueError(f"targets[{e}] is empty; give at least one target token (or None for the next token).")
        n_steps = len(target) if target is not None else 1
        if len(prompt) + n_steps - 1 > max_len:
            raise ValueError(f"example {e}: prompt ({len(prompt)} tokens) plus target ({n_steps}) exceeds the "
                             f"model's context of {max_len} tokens (the last step reads {len(prompt) + n_steps - 1}); "
                             "shorten the prompt or the target.")
        for s in range(n_steps):
            prefix = [int(t) for t in target[:s]] if target is not None else []
            rows.append(prompt + prefix)
            special.append(flags + [True] * len(prefix))
            if target is not None:
                labels.append(int(target[s]))
            steps.append((e, s))
            r = rationale[e] if rationale is not None else None
            gold.append(None if r is None else [float(x) for x in r] + [0.0] * len(prefix))
    seq = max(map(len, rows))
    lengths = torch.tensor([len(r) for r in rows])
    input_ids = torch.tensor([r + [pad_id] * (seq - len(r)) for r in rows], dtype=torch.long)    # [rows, seq]
    attention_mask = torch.arange(seq)[None, :] < lengths[:, None]                              # [rows, seq]
    special_mask = torch.zeros_like(attention_mask)
    for i, flags in enumerate(special):
        special_mask[i, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    tok = [tokens(r) + [pad_token] * (seq - len(r)) for r in rows]
    rationale_t = None
    if all(g is not None for g in gold):
        rationale_t = torch.zeros(len(rows), seq)
        for i, g in enumerate(gold):
            assert g is not None
            rationale_t[i, : len(g)] = torch.tensor(g)
    row_texts = [texts[e] for e, _ in steps] if texts is not None else None
    row_ids = [ids[e] if s == 0 and len(targets) and targets[e] is None else f"{ids[e]}@{s}" for e, s in steps] \
        if ids is not None else None
    return Batch(input_ids, attention_mask, special_mask, tok, texts=row_texts,
                 labels=torch.tensor(labels, dtype=torch.long) if labels else None, rationale=rationale_t,
                 ids=row_ids, truncated=[False] * len(rows), steps=steps)


def carriers(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows that are prefixes of longer rows share their forward -> (carrier rows [n], carrier of each row [batch]).

    Row i is carried by row j when j reaches at least as far and agrees with i on every position up to i's last
    real token (ids and mask: a masked gap must be the same gap); under a causal mask row i's outputs are then
    row j's first positions. Carriers are the longest rows, chosen first.
    """
    ids = input_ids.masked_fill(~attention_mask.bool(), -1)                         # [batch, seq]; gaps stay gaps
    lengths = last_index(attention_mask) + 1                                        # [batch] through the last real one
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    chosen: list[int] = []
    owner = torch.empty(len(order), dtype=torch.long)
    positions = torch.arange(ids.shape[1])
    for i in order:
        n = int(lengths[i])
        if chosen:
            c = torch.tensor(chosen)
            same = ((ids[c] == ids[i]) | (positions >= n)).all(1)                   # [n_chosen]
            hit = same.nonzero()
            if len(hit):
                owner[i] = int(hit[0, 0])
                continue
        owner[i] = len(chosen)
        chosen.append(i)
    return torch.tensor(chosen, dtype=torch.long), owner


def shared_carriers(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """`carriers` of a batch (on the CPU) when at least one row shares another's forward, else None."""
    if len(input_ids) < 2:
        return None
    chosen, owner = carriers(input_ids.cpu(), attention_mask.cpu())
    return None if len(chosen) == len(input_ids) else (chosen, owner)


def last_logits(forward: Callable[[Tensor, Tensor], Tensor], input_ids: Tensor, attention_mask: Tensor, *,
                share: bool = True) -> Tensor:
    """forward(ids, mask) -> [n, seq, vocab] (causal); -> logits [batch, vocab] at each row's last real token.

    With `share` (and no gradient being recorded), rows that are prefixes of a longer row are read from that
    row's single forward (see `carriers`): a T-step continuation costs one forward, not T.
    """
    shared = shared_carriers(input_ids, attention_mask) if share and not torch.is_grad_enabled() else None
    if shared is None:
        return gather_last(forward(input_ids, attention_mask), attention_mask)
    chosen, owner = shared
    dev = input_ids.device
    c = chosen.to(dev)
    full = forward(input_ids[c], attention_mask[c])                                 # [n, seq, vocab]
    index = last_index(attention_mask).to(full.device)                              # [batch]
    return full[owner.to(full.device), index]                                       # [batch, vocab]


def hooks_active(sites: dict) -> bool:
    """True when any hook is attached to a HookPoint (attention recorded or edited): rows must then run as themselves."""
    return any(active_hook_count(p) for p in sites.values())
