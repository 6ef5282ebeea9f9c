"""Auditing the jobs' models through the item store: each finished item saved, reused on resume, shared
among the ranks of a torchrun job (attnaudit.jobs.sharding).

    results = audit_all([(task, model, examples, card)], settings, out, identity=identity, resume=False,
                        overwrite=False, progress=True, echo=print)      # {task: AuditResult}

Alone, one `ItemStore` under OUT/.attnaudit/ and `store_runner`; under torchrun, `shard_runner` computes this
rank's items and rank 0 reads every item back through `gather_runner`. Failed items raise `ItemsFailed`
once all the others are saved.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from attnaudit.analyses.attention_examples import translator_attention_examples
from attnaudit.analyses.audit import AuditResult, AuditSettings, audit
from attnaudit.analyses.counterfactual import TESTS
from attnaudit.analyses.schema import COLUMNS, CURVE_COLUMNS
from attnaudit.analyses.seq2seq import audit_translator
from attnaudit.jobs import sharding
from attnaudit.jobs.store import ItemStore, RankStore, StoreError, frame_payload, payload_frame
from attnaudit.model.seq2seq import Translator

if TYPE_CHECKING:
    from attnaudit.model.interface import ExplainableModel


def _encode(x):
    if isinstance(x, pd.DataFrame):
        return {"__frame__": frame_payload(x)}
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    return x


def _decode(x):
    if isinstance(x, dict):
        if set(x) == {"__frame__"}:
            return payload_frame(x["__frame__"])
        return {k: _decode(v) for k, v in x.items()}
    return x


def store_runner(store: ItemStore, prefix: str):
    """An audit runner that saves each finished item in `store` under "prefix.item" and reuses it."""
    def run(item, compute):
        payload = store.run(f"{prefix}.{item}", lambda: _encode(compute()))
        return None if payload is None else _decode(payload)
    return run


def shard_runner(store: ItemStore, prefix: str, index, ranks: sharding.Ranks):
    """store_runner for this rank's items only (item i of the job: rank sharding.owner(i, world_size));
    None for the others, which their ranks compute. `index` counts the job's items across tasks."""
    def run(item, compute):
        if sharding.owner(next(index), ranks.world_size) != ranks.rank:
            return None
        store.run(f"{prefix}.{item}", lambda: _encode(compute()))
        return None
    return run


def gather_runner(store: ItemStore, prefix: str, index, ranks: sharding.Ranks):
    """Rank 0's runner after its own items: wait for each item's rank to save it, then read it back
    (None when it failed, as store_runner gives)."""
    def run(item, compute):
        name = f"{prefix}.{item}"
        sharding.wait_for(store, name, sharding.owner(next(index), ranks.world_size))
        return _decode(store.load(name)) if store.done(name) else None
    return run


def audit_all(jobs: list[tuple[str, object, list, dict]], settings: AuditSettings, out: Path, *, identity: dict,
               resume: bool, overwrite: bool, progress: bool, echo) -> dict[str, AuditResult]:
    results = {}
    fingerprint = {"identity": identity, "models": {t: card["checkpoint"]["sha256"] for t, _, _, card in jobs}}
    if sharding.current() is not None:
        return _audit_sharded(jobs, settings, out, fingerprint=fingerprint, resume=resume, overwrite=overwrite,
                              progress=progress, echo=echo)
    with ItemStore(out, fingerprint=fingerprint, resume=resume, overwrite=overwrite) as store:
        for task, model, examples, _card in jobs:
            results[task] = _audit_one(task, model, examples, settings, store_runner(store, task), progress, echo)
        failures = store.failures()
    if failures:
        raise ItemsFailed(failures)
    return results


def _audit_one(task: str, model: ExplainableModel | Translator, examples, settings: AuditSettings, runner, progress, echo) -> AuditResult:
    n = min(len(examples), settings.max_examples or len(examples))
    echo(f"{task}: explaining and analysing {n} examples with {len(settings.explainers)} explainers"
         + (f" (the first {n} of {len(examples)}: raise max_examples in [audit] for more)" if n < len(examples) else ""))
    if getattr(model, "kind", None) == "seq2seq":          # the built-in Translator or a HuggingFace one
        result = _audit_translator(model, examples, settings, runner, progress=progress, label=f"audit {task}")
    else:
        result = audit(model, examples, settings, progress=progress, progress_label=f"audit {task}", runner=runner)
    if result.settings.get("left_out"):
        echo(f"{task}: left out {', '.join(result.settings['left_out'])}: not defined for this model's architecture "
             "(the reasons are in results.json, settings.left_out)")
    if result.settings.get("n_truncated"):
        echo(f"{task}: note: {result.settings['n_truncated']} examples were longer than the model's "
             f"{model.max_len} positions and were cut (marked \"truncated\" in examples.jsonl; a model trained "
             "with a larger max_len takes them whole)")
    return result


def _audit_sharded(jobs, settings: AuditSettings, out: Path, *, fingerprint: dict, resume: bool, overwrite: bool,
                   progress: bool, echo) -> dict[str, AuditResult]:
    """`audit_all` on every rank of a torchrun job (attnaudit.jobs.sharding) -> the results on rank 0, {} elsewhere.

    The ranks check that they run the same audit; rank 0 opens the folder's store (lock, resume, overwrite),
    then the others attach; each computes the items `sharding.owner` gives it; rank 0 waits for the rest
    and assembles the results from the store, as a resumed single process would: the same bytes.
    """
    ranks = sharding.current().ranks
    sharding.check_same(fingerprint)
    store, error = None, None
    if ranks.is_main:
        store, error = _enter(lambda: ItemStore(out, fingerprint=fingerprint, resume=resume, overwrite=overwrite))
    sharding.agree(error)
    if not ranks.is_main:
        store, error = _enter(lambda: RankStore(out, rank=ranks.rank, fingerprint=fingerprint))
    try:
        sharding.agree(error)
        index = iter(range(1 << 62))                   # one count over all tasks' items: the same on every rank
        for task, model, examples, _card in jobs:       # pass 1: this rank's own items
            _own_items(task, model, examples, settings, shard_runner(store, task, index, ranks),
                       progress if ranks.is_main else False, echo if ranks.is_main else (lambda _: None))
        if not ranks.is_main:
            store.finish()
            return {}
        index = iter(range(1 << 62))                   # pass 2 (rank 0): every item, read back from the store
        notes = lambda line: echo(line) if ": note:" in line else None   # noqa: E731 (pass 1 said the rest)
        results = {task: _audit_one(task, model, examples, settings, gather_runner(store, task, index, ranks),
                                    False, notes) for task, model, examples, card in jobs}
        for task, result in results.items():           # pass 2 only read the items: report their compute time
            result.timings = _item_seconds(store.items(), task)
        failures = store.failures()
    except (KeyboardInterrupt, sharding.RankFailed) as e:   # a rank died: torchrun stops the others, or a
        dead = sharding.dead_ranks(store) if ranks.is_main else []   # collective fails; name the dead rank
        if not dead:
            raise
        message = (f"rank(s) {', '.join(map(str, dead))} stopped before finishing their items; "
                   f"{sharding.resume_hint()}")
        if isinstance(e, KeyboardInterrupt):
            import sys
            print(f"error: {message}", file=sys.stderr)
            raise
        raise sharding.RankFailed(message) from e
    finally:
        if store is not None:
            store.__exit__(None, None, None)
    if failures:
        raise ItemsFailed(failures)
    return results


def _item_seconds(items: dict, task: str) -> dict[str, float]:
    """Seconds the ranks spent on `task`'s items, summed per stage (as the audit's timings name them)."""
    stages = {"chunk-": "explain_and_faithfulness", "counterfactual": "counterfactual", "sanity": "sanity",
              "seq2seq": "seq2seq"}
    out: dict[str, float] = {}
    for name, entry in items.items():
        if name.startswith(f"{task}."):
            stage = next((v for k, v in stages.items() if name[len(task) + 1:].startswith(k)), "other")
            out[stage] = out.get(stage, 0.0) + float(entry.get("seconds", 0.0))
    return {v: out[v] for v in [*stages.values(), "other"] if v in out}


def _enter(make):
    """make().__enter__() -> (store, None), or (None, the StoreError) for `sharding.agree` to share."""
    try:
        return make().__enter__(), None
    except StoreError as e:
        return None, e


def _own_items(task, model: ExplainableModel | Translator, examples, settings, runner, progress, echo) -> None:
    """The audit with a runner that computes only this rank's items and answers None for the others: the
    audit's own tables are thrown away (they lack the other ranks' items), hence its refusal when this rank
    owns no chunk ("every chunk of the audit failed") is expected here."""
    try:
        _audit_one(task, model, examples, settings, runner, progress, echo)
    except RuntimeError as e:
        if not str(e).startswith("every chunk of the audit failed"):
            raise


def _audit_translator(model: Translator, examples, settings: AuditSettings, run, *, progress: bool | None = None,
                      label: str = "audit") -> AuditResult:
    """The encoder-decoder's analyses (attnaudit.analyses.seq2seq), as one saved item, in AuditResult form."""
    from attnaudit.core.progress import progress_bar
    examples = list(examples)[: settings.max_examples]
    start = time.perf_counter()
    with progress_bar(len(examples), desc=f"{label}: seq2seq analyses", enabled=progress) as bar:
        out = run("seq2seq", lambda: audit_translator(model, examples, seed=settings.seed, max_batch=settings.max_batch,
                                                      n_permutations=settings.n_permutations,
                                                      tests=tuple(t for t in settings.counterfactual_tests
                                                                  if t in TESTS),   # the opt-in ones are encoders
                                                      adversarial_steps=settings.adversarial_steps,
                                                      adversarial_lr=float(settings.adversarial_lr),
                                                      n_adversaries=settings.n_adversaries,
                                                      sanity_examples=settings.sanity_examples
                                                      if "sanity" in settings.analyses else 0))
        bar.update(len(examples))
    seconds = time.perf_counter() - start
    if out is None:
        return AuditResult(metrics=pd.DataFrame(columns=COLUMNS), counterfactual={}, curves=_NO_CURVES, attributions=[],
                           examples=[], attention_example=None, settings={"n_examples": 0}, timings={})
    with model.evaluating():     # after the item, not in it: a resumed audit runs only these forwards again
        attention = translator_attention_examples(model, examples, out["attributions"], out["examples"])
    return AuditResult(metrics=out["metrics"], counterfactual=out["counterfactual"], curves=_NO_CURVES,
                       attributions=out["attributions"], examples=out["examples"],
                       attention_example=attention[0] if attention else None, attention_examples=attention,
                       settings={**settings.to_dict(), "n_examples": len(examples)}, timings={"seq2seq": seconds})


_NO_CURVES = pd.DataFrame(columns=list(CURVE_COLUMNS))


class ItemsFailed(RuntimeError):
    """Some items failed; the others are saved. The CLI lists them and exits with status 3."""

    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        super().__init__(f"{len(failures)} item(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
