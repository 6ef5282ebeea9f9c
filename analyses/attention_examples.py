"""The attention examples an audit saves for its report: exactly the examples the report shows (issue 17).

    ids = shown_ids(result.attributions, result.examples)       # `report_files.select_examples`' choice
    saved = translator_attention_example(model, example)        # encoder, decoder (causal) and cross-attention
    panels = saved_panels(saved)                                # -> `attention_view.attention_panel` dicts
    saved = pick_example(json.load(open("reports/x/attention.json")), example="ex3")

A saved example: {"id", "tokens", "attention" [layer, head, query, key]} (a classifier's or language model's
self-attention, `analyses.audit.attention_example`; optional "key_tokens", "kind", "name"). An encoder–decoder's
adds "target_tokens" (the decoder's input tokens, [CLS] first, teacher-forced on the reference),
"decoder_attention" [layer, head, target, target] (causal) and "cross_attention" [layer, head, target, source].
In a report each also has "task" and "n_positions" (and "n_target_positions"): attention.json keeps the first
`report_files.ATTENTION_POSITIONS` positions of each side.

The audit computes them after its saved items are merged, one forward per shown example, outside the items: a
resumed audit reuses every saved item and runs only these forwards again.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from attnaudit.data.examples import Example
    from attnaudit.model.seq2seq import Translator

ENCODER_DECODER_KEYS = ("target_tokens", "decoder_attention", "cross_attention")
PANEL_NAMES = {"self": "encoder self-attention", "causal": "decoder self-attention (causal)",
               "cross": "cross-attention (target → source)"}


def shown_ids(attributions: Sequence[Mapping], examples: Sequence[Mapping]) -> list[str]:
    """The ids of the examples a report of these records shows, in its order (`report_files.select_examples`:
    up to N_EXAMPLES correctly and N_EXAMPLES incorrectly classified ones, then those of unknown label)."""
    from attnaudit.analyses.report_files import select_examples

    data = {"attributions": [{**r, "task": ""} for r in attributions], "examples": [{**x, "task": ""} for x in examples]}
    return [ex["id"] for ex in select_examples("", data, {})]


def translator_attention_example(model: Translator, example: Example | str) -> dict:
    """One source sentence's attention in an encoder–decoder, teacher-forced on its reference target (the audited
    one; without a target, on the model's greedy translation) -> a saved example (see the module doc)."""
    import torch

    from attnaudit.data.examples import Example
    from attnaudit.model.hooks import record

    if not isinstance(example, Example):
        example = Example(id="0", text=str(getattr(example, "text", example)), label=0,
                          target=getattr(example, "target", None))
    if example.target is None:
        example = replace(example, target=model.translate([example.text])[0])
    pairs = model.encode([example])
    sites = {"attention": model.attention_sites, "decoder_attention": model.decoder_self_attention_sites,
             "cross_attention": model.cross_attention_sites}
    with model.evaluating(), torch.no_grad():
        _, cache = record(model, pairs, names=[n for names in sites.values() for n in names])
    n_src, n_tgt = int(pairs.src.attention_mask[0].sum()), int(pairs.tgt_mask[0].sum())
    size = {"attention": (n_src, n_src), "decoder_attention": (n_tgt, n_tgt), "cross_attention": (n_tgt, n_src)}

    def stack(key: str) -> list:
        q, k = size[key]
        att = torch.stack([cache[n][0, :, :q, :k] for n in sites[key]])           # [layer, head, query, key]
        return att.float().cpu().numpy().round(5).tolist()

    return {"id": example.id, "tokens": list(pairs.src.tokens[0])[:n_src], "attention": stack("attention"),
            "target_tokens": model.target_tokens(pairs.tgt_in[0, :n_tgt].tolist()),     # tgt_in: [CLS] w1 w2 …
            "decoder_attention": stack("decoder_attention"), "cross_attention": stack("cross_attention")}


def translator_attention_examples(model: Translator, examples: Sequence[Example], attributions: Sequence[Mapping],
                                  info: Sequence[Mapping]) -> list[dict]:
    """`translator_attention_example` of every example the report of `audit_translator`'s records and examples
    shows (the first example's when it shows none)."""
    by_id = {str(e.id): e for e in examples}
    ids = [i for i in shown_ids(attributions, info) if i in by_id] or ([str(examples[0].id)] if examples else [])
    return [translator_attention_example(model, by_id[i]) for i in ids]


def check_saved(a: Mapping, name: str = "attention example") -> None:
    """A saved example's arrays against its tokens; ValueError naming the key, the shapes and what they must be."""
    for key in ("tokens", "attention"):
        if key not in a:
            raise ValueError(f"{name} must have 'tokens' and 'attention' [layer, head, query, key]; got keys {sorted(a)}.")
    att = np.asarray(a["attention"], dtype=float)
    n_keys = len(a.get("key_tokens") or a["tokens"])
    if att.ndim != 4 or att.shape[2:] != (len(a["tokens"]), n_keys):
        raise ValueError(f"{name}: 'attention' must be [layer, head, query, key] with {len(a['tokens'])} queries (tokens) "
                         f"and {n_keys} keys; got shape {att.shape}.")
    present = [k for k in ENCODER_DECODER_KEYS if k in a]
    if not present:
        return
    if len(present) < len(ENCODER_DECODER_KEYS) and present != ["target_tokens", "cross_attention"]:
        raise ValueError(f"{name}: an encoder–decoder example needs 'target_tokens' and 'cross_attention' "
                         f"('decoder_attention' optional); got {present}.")
    n_src, n_tgt = len(a["tokens"]), len(a["target_tokens"])
    for key, shape in (("decoder_attention", (n_tgt, n_tgt)), ("cross_attention", (n_tgt, n_src))):
        if key in a:
            got = np.asarray(a[key], dtype=float)
            if got.ndim != 4 or got.shape[:2] != att.shape[:2] or got.shape[2:] != shape:
                raise ValueError(f"{name}: {key!r} must be [layer, head, target, {'target' if key[0] == 'd' else 'source'}]"
                                 f" = [{att.shape[0]}, {att.shape[1]}, {shape[0]}, {shape[1]}] ({n_tgt} target_tokens, "
                                 f"{n_src} tokens); got shape {got.shape}.")


def saved_panels(a: Mapping, **options) -> list[dict]:
    """A saved example -> its view panels: the self-attention; for an encoder–decoder the encoder's, the decoder's
    (causal) and the cross-attention (target queries, source keys). options: `attention_panel`'s."""
    from attnaudit.analyses.attention_view import attention_panel

    check_saved(a)
    if "cross_attention" not in a:
        return [attention_panel(a["attention"], a["tokens"], a.get("key_tokens"), kind=a.get("kind", "self"),
                                name=a.get("name", "self-attention"), **options)]
    target = a["target_tokens"]
    panels = [attention_panel(a["attention"], a["tokens"], name=PANEL_NAMES["self"], **options)]
    if "decoder_attention" in a:
        panels.append(attention_panel(a["decoder_attention"], target, name=PANEL_NAMES["causal"], kind="causal", **options))
    panels.append(attention_panel(a["cross_attention"], target, a["tokens"], name=PANEL_NAMES["cross"], kind="cross",
                                  **options))
    return panels


def pick_example(saved: Mapping | Sequence[Mapping], *, example=None, task: str | None = None) -> dict:
    """One saved example: of a list (attention.json's), the one with id `example` (and `task`, where ids repeat
    across tasks), or the first; a ValueError listing the ids there are when none matches."""
    items = [saved] if isinstance(saved, Mapping) else list(saved)
    if not items or not all(isinstance(a, Mapping) for a in items):
        raise ValueError("a saved attention file must hold one attention example (a dict with 'tokens' and "
                         "'attention') or a list of them; got " + ("an empty list." if not items else "other values."))
    pool = [a for a in items if task is None or str(a.get("task")) == str(task)]
    if not pool:
        tasks = sorted({str(a.get("task")) for a in items})
        raise ValueError(f"task {task!r} has no saved attention example; tasks with one: {', '.join(tasks)}.")
    if example is None:
        return dict(pool[0])
    hits = [a for a in pool if str(a.get("id")) == str(example)]
    if len(hits) == 1 or (hits and len({str(a.get("task")) for a in hits}) == 1):
        return dict(hits[0])
    if hits:
        raise ValueError(f"example {example!r} is saved for several tasks ({', '.join(sorted({str(a.get('task')) for a in hits}))}); "
                         "pass task= as well.")
    available = ", ".join(f"{a.get('id')!r}" + (f" (task {a['task']})" if "task" in a else "") for a in pool[:40])
    more = f" and {len(pool) - 40} more" if len(pool) > 40 else ""
    raise ValueError(f"example {example!r} has no saved attention" + (f" in task {task!r}" if task is not None else "")
                     + f"; available: {available}{more}.")


def shown_attention_from_model(model, data: Mapping) -> list[dict]:
    """A report's shown examples' attention, recomputed from its own model -> saved examples (with "task").

    data: `report_files.load_files`' dict of the report. Each task's records' texts are encoded (truncated as
    the audit did) and `audit.attention_examples` picks and runs the shown ones, as an audit does; their tokens
    must be the records' tokens, else ValueError (another model or tokenizer). Classifiers only: a language
    model's or encoder–decoder's report is refused (their examples are not rebuilt from one text).
    """
    from attnaudit.analyses.audit import attention_examples
    from attnaudit.data.examples import Example

    kind = getattr(model, "kind", None)
    if kind in ("lm", "seq2seq"):
        what = "language model" if kind == "lm" else "encoder-decoder"
        raise ValueError(f"--attention-model takes a classifier; got a {what}, whose report's attention comes from "
                         f"its audit (run it again instead).")
    out = []
    for task in data["results"]["tasks"]:
        records = [r for r in data["attributions"] if r["task"] == task]
        by_id: dict[str, Mapping] = {}
        for r in records:
            by_id.setdefault(str(r["id"]), r)                                      # each id's first record
        batch = model.encode([Example(id=i, text=r["text"]) for i, r in by_id.items()], truncate=True)
        for saved in attention_examples(model, batch, records, [x for x in data["examples"] if x["task"] == task]):
            ex_id, record = str(saved["id"]), by_id[str(saved["id"])]
            if list(saved["tokens"]) != list(record["tokens"]):
                raise ValueError(f"example {ex_id!r} of task {task!r} encodes to other tokens than its report records "
                                 f"({len(saved['tokens'])} vs {len(record['tokens'])} tokens): --attention-model must be "
                                 f"the model the report audited.")
            out.append({**saved, "id": ex_id, "task": task})
    return out


__all__ = ["shown_ids", "translator_attention_example", "translator_attention_examples", "check_saved",
           "saved_panels", "pick_example", "shown_attention_from_model", "ENCODER_DECODER_KEYS", "PANEL_NAMES"]
