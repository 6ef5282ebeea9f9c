"""One entry point: the chosen explainers and analyses on a model and a dataset -> tidy tables.

    result = audit(model, examples)                  # every explainer, every analysis, defaults
    result.metrics                                   # example_id, explainer, metric, setting, value, note
    result.summary()                                 # mean and 95% bootstrap interval per explainer × metric × setting
    result.write_report("reports/mine", model_card=card)

The data flow, chunk by chunk (`chunk_size` examples at a time, so memory stays bounded and each
chunk is one unit of saved work when a `store` is given):

    model.encode(chunk) -> explain_all (one attention capture serves the attention family) -> Attributions
      -> one PerturbationEngine per chunk, shared by occlusion / LIME / KernelSHAP (`perturb.sharing`), the
         deletion/insertion curves and faithfulness_table: each distinct perturbed input runs once (its forwards
         per stage: `analyses.forwards`), gold_table / rationale_table where rationales are known
then once, on the first examples: counterfactual_table (attention interventions; one item per test and
layer) and randomization_table (cascading weight randomisation, the sanity check; one item per explainer).
Items are independent, so `attnaudit.distributed` can compute them on different ranks with the same numbers.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from attnaudit.analyses import faithfulness as F
from attnaudit.analyses.counterfactual import (
    ALL_TESTS,
    MAX_ADVERSARIES,
    MAX_PERMUTATIONS,
    MAX_STEPS,
    TESTS,
    adversary_options,
    counterfactual_table,
)
from attnaudit.analyses.forwards import add_forwards, chunk_forwards, forward_figures, plain_seconds
from attnaudit.analyses.plausibility import gold_table, rationale_table
from attnaudit.analyses.sanity import randomization_table
from attnaudit.analyses.schema import COLUMNS, CURVE_COLUMNS, step_means
from attnaudit.analyses.tables import METRICS, faithfulness_table, summarize
from attnaudit.core.progress import progress_bar
from attnaudit.explain.base import MAX_ROWS
from attnaudit.explain.capture import AttentionExplainer
from attnaudit.explain.perturb import DEFAULT_MAX_BATCH, PerturbationEngine, check_policy, sharing
from attnaudit.explain.registry import CONTEXT_MIXING, DEFAULT_EXPLAINERS, REGISTRY, get_explainer
from attnaudit.explain.run import explain_all
from attnaudit.explain.words import aggregate_words
from attnaudit.model.hooks import record
from attnaudit.model.interface import Batch

if TYPE_CHECKING:
    from attnaudit.model.interface import ExplainableModel

ANALYSES = ("faithfulness", "plausibility", "counterfactual", "sanity")
CURVE_GRID = np.round(np.linspace(0.0, 1.0, 11), 2)     # curves are resampled here so examples line up
CHEAP_METRICS = METRICS[:6]                              # the engine's; infidelity/sensitivity_max are opt-in


@dataclass(frozen=True)
class AuditSettings:
    """What an audit runs. Every field is recorded in the report's settings.

    explainers: registry names (default: all of them; a context-mixing one the model's architecture does not
        take is left out and listed in the result's settings["left_out"]); explainer_params: name -> keyword
        options for that explainer.
    analyses: a subset of ANALYSES. max_examples: the first N examples (None: all).
    chunk_size: examples explained and perturbed together. policy: "mask", "attention" or "delete".
    metrics: faithfulness metrics (see attnaudit.analyses.tables.METRICS). ferret: add ferret's AOPC preset
        (opt-in: it deletes tokens, so none of its forwards are shared with the mask-policy curves).
    counterfactual_examples / sanity_examples: how many of the first examples those (costlier) analyses use.
    adversarial_steps, n_adversaries, adversarial_lr: the adversarial-attention search (Jain & Wallace 2019) at
        every layer: n_adversaries searches per example, each adversarial_steps Adam steps at lr adversarial_lr
        (`counterfactual.adversarial_attention`; the default is where the JSD found has converged on the built-in
        tasks, `benchmarks/adversary_strength.py`: see ADVERSARY_PRESETS["audit"]).
    curve_steps: deletion/insertion curves of examples with more scored tokens take this many even steps
        (plus the start) instead of one per token: long documents cost curve_steps + 1 forwards per curve.
    Every size has a documented maximum, `AuditSettings.LIMITS`, checked here, before any work: above it an
    audit would run for days (the message gives the cost); lower the setting (or, knowingly, the limit).
    """

    # size -> (its maximum, what one unit of it costs), for the refusal's estimate
    LIMITS = {"max_examples": (10_000_000, "examples explained by every explainer"),
              "chunk_size": (4096, "examples per batch, each × max_len tokens in memory at once"),
              "counterfactual_examples": (100_000, "examples × layers × (n_permutations + adversarial_steps × "
                                                   "n_adversaries) forwards"),
              "n_permutations": (MAX_PERMUTATIONS, "forward passes per example and layer"),
              "adversarial_steps": (MAX_STEPS, "forward + backward passes per example, adversary and layer"),
              "n_adversaries": (MAX_ADVERSARIES, "adversarial searches per example and layer"),
              "sanity_examples": (100_000, "examples explained again at every randomised layer"),
              "curve_steps": (4096, "forward passes per deletion or insertion curve"),
              "max_batch": (MAX_ROWS, "rows in one forward pass")}

    explainers: tuple[str, ...] = DEFAULT_EXPLAINERS
    explainer_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    analyses: tuple[str, ...] = ANALYSES
    max_examples: int | None = 100
    chunk_size: int = 64
    policy: str = "mask"
    bins: tuple[float, ...] = F.ERASER_BINS
    metrics: tuple[str, ...] = CHEAP_METRICS
    ferret: bool = False
    counterfactual_tests: tuple[str, ...] = TESTS
    counterfactual_examples: int = 128
    n_permutations: int = 50
    adversarial_steps: int = 40
    n_adversaries: int = 3
    adversarial_lr: float = 1.0
    sanity_examples: int = 32
    curve_steps: int = 64
    seed: int = 0
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self):
        for name in ("explainers", "analyses", "bins", "metrics", "counterfactual_tests"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a list; got {value!r}.")
            object.__setattr__(self, name, tuple(value))
        _subset("explainers", self.explainers, tuple(REGISTRY))
        _subset("analyses", self.analyses, ANALYSES)
        _subset("metrics", self.metrics, METRICS)
        _subset("counterfactual_tests", self.counterfactual_tests, ALL_TESTS)
        if not self.explainers:
            raise ValueError("explainers must name at least one explainer; got an empty list.")
        extra = sorted(set(self.explainer_params) - set(self.explainers))
        if extra:
            raise ValueError(f"explainer_params has options for {extra}, which are not among the explainers "
                             f"{list(self.explainers)}; add them to explainers or drop their options.")
        for name, params in self.explainer_params.items():
            if not isinstance(params, Mapping):
                raise ValueError(f"explainer_params[{name!r}] must map option names to values; got {params!r}.")
            get_explainer(name, **dict(params))       # unknown option names fail here, before any work
        for name in ("chunk_size", "counterfactual_examples", "n_permutations", "adversarial_steps",
                     "n_adversaries", "sanity_examples", "curve_steps", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if self.max_examples is not None and (isinstance(self.max_examples, bool)
                                              or not isinstance(self.max_examples, int) or self.max_examples < 1):
            raise ValueError(f"max_examples must be a positive integer or None (all); got {self.max_examples!r}.")
        for name, (limit, unit) in self.LIMITS.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ValueError(f"{name}={value:,} is above its limit of {limit:,} ({unit}: ≈ {value:.1e} of them); "
                                 f"lower {name} (the limits are AuditSettings.LIMITS).")
        lr = self.adversarial_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise ValueError(f"adversarial_lr must be a finite number > 0 (Adam's step size in the adversarial "
                             f"search); got {lr!r}.")
        if self.adversarial_steps * self.n_adversaries > MAX_STEPS:
            raise ValueError(f"adversarial_steps × n_adversaries = {self.adversarial_steps:,} × {self.n_adversaries:,} "
                             f"forward + backward passes per example and layer is above MAX_STEPS={MAX_STEPS:,}; "
                             f"lower adversarial_steps or n_adversaries.")
        check_policy(self.policy)
        F.check_bins(self.bins)

    def with_(self, **changes) -> AuditSettings:
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown audit setting {unknown[0]!r}; known: {', '.join(f.name for f in fields(self))}.")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["explainer_params"] = {k: dict(v) for k, v in self.explainer_params.items()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _subset(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name} must be drawn from {', '.join(allowed)}; got {bad[0]!r}.")


@dataclass
class AuditResult:
    """The tables of one audit; `write_report` renders them (see attnaudit.analyses.report)."""

    metrics: pd.DataFrame                      # example_id, explainer, metric, setting, value, note
    counterfactual: dict[str, pd.DataFrame]    # "summary" (test, layer, head, statistic, value) + per-test frames
    curves: pd.DataFrame                       # example_id, explainer, curve, fraction, prob
    attributions: list[dict]                   # Attribution.to_records() rows, every example × explainer
    examples: list[dict]                       # id, label, prediction, gold (0/1 per token or None)
    attention_example: dict | None             # the first of attention_examples (None: none saved)
    settings: dict
    timings: dict[str, float]
    failures: dict[str, str] = field(default_factory=dict)
    # the attention of each example the report shows (`attention_examples.shown_ids`), or of the first example when
    # it shows none: id, tokens, attention [layer, head, query, key] (+ an encoder–decoder's cross-attention)
    attention_examples: list[dict] = field(default_factory=list)
    # the perturbation engine's figures (`analyses.forwards.forward_figures`): forwards per example and stage,
    # distinct inputs, time per forward against a plain batched forward; {} when no chunk recorded them
    forwards: dict = field(default_factory=dict)

    def summary(self, **options) -> pd.DataFrame:
        return summarize(self.metrics, **options)

    def saved_attention(self) -> list[dict]:
        """attention_examples, or [attention_example] for a result made without them."""
        return list(self.attention_examples) or ([self.attention_example] if self.attention_example else [])

    def write_report(self, out_dir, *, model_card: Mapping | None = None, task: str = "default",
                     title: str | None = None, overwrite: bool = False, full_tables: bool = False):
        """The report of this audit into out_dir (`attnaudit.analyses.report.write_report`); `full_tables`
        keeps every example's attributions and curves, not only the shown ones."""
        from attnaudit.analyses.report import write_report
        return write_report(out_dir, metrics=self.metrics.assign(task=task), counterfactual=_tag(self.counterfactual, task),
                            curves=self.curves.assign(task=task), attributions=[{**r, "task": task} for r in self.attributions],
                            examples=[{**x, "task": task} for x in self.examples],
                            attention_examples=[{**a, "task": task} for a in self.saved_attention()] or None,
                            model_cards={task: dict(model_card or {})}, settings={"task": task, **self.settings},
                            timings=self.timings, forwards={task: self.forwards} if self.forwards else None,
                            full_tables=full_tables, **({"title": title} if title else {}))


def _tag(cf: Mapping[str, pd.DataFrame], task: str) -> dict | None:
    keep = {k: cf[k].assign(task=task) for k in ("summary", "permutation") if k in cf}
    return keep or None


Runner = Callable[[str, Callable[[], Any]], Any]


def _direct(item: str, compute: Callable[[], Any]) -> Any:
    return compute()


# -- the audit ------------------------------------------------------------------------------------
def audit(model: ExplainableModel, data, settings: AuditSettings | None = None, *, progress: bool | None = None,
          progress_label: str = "audit", runner: Runner | None = None, **changes) -> AuditResult:
    """Run the chosen explainers and analyses on `model` over `data` -> AuditResult.

    Args:
        model: the model interface (TextClassifier, or a HuggingFace model through attnaudit.load_model).
        data: Examples (with label and rationale where known), texts, or a Batch.
        settings: AuditSettings; keyword `changes` override its fields (audit(model, xs, max_examples=50)).
        progress: a bar per stage counting its examples, with rate and ETA: True always (plain lines
            every 10 s in a log), None (default) at a terminal or in Jupyter, False never.
            progress_label: what the bars are called, e.g. "audit keywords".
        runner: runner(item_name, compute) -> payload; lets a caller save each finished item (chunk of
            examples, counterfactual, sanity) and skip it on resume (see `attnaudit.jobs.store`).
            Payloads are dicts of DataFrames and lists. A runner may return None for a failed item;
            the audit goes on without it and lists it in `failures`.

    Limits are checked on the whole data before any work (each explainer's `check_limits`: flow's max_cells,
    integrated gradients' max_memory_mb). A chunk that runs out of CUDA memory is computed once more as two
    halves with half the perturbation batch (`max_batch`); a chunk whose model output is not finite fails.
    Examples longer than the model's positions are cut and marked "truncated" in `examples`.
    """
    settings = (settings or AuditSettings()).with_(**changes) if changes else (settings or AuditSettings())
    batch = _as_batch(model, data, settings.max_examples)
    run = runner or _direct
    explainers, left_out = applicable_explainers(model, settings)
    for e in explainers:                       # before the first chunk: a refusal costs nothing
        e.check_limits(model, batch)
    chunks = [list(range(s, min(s + settings.chunk_size, len(batch)))) for s in range(0, len(batch), settings.chunk_size)]
    timings: dict[str, float] = {}
    parts, failures = [], {}
    bar = progress_bar(len(batch), enabled=progress, unit="examples",
                       desc=f"{progress_label}: explain + faithfulness ({len(explainers)} explainers)")
    with model.evaluating():
        for i, idx in enumerate(chunks):
            item = f"chunk-{i:04d}-of-{len(chunks):04d}"
            start = time.perf_counter()
            out = run(item, lambda idx=idx: _retry_oom(lambda: _chunk(model, batch.select(idx), explainers, settings),
                                                       lambda: _chunk_in_halves(model, batch, idx, explainers, settings)))
            timings["explain_and_faithfulness"] = timings.get("explain_and_faithfulness", 0.0) + time.perf_counter() - start
            if out is None:
                failures[item] = f"examples {idx[0]}..{idx[-1]} failed"
            else:
                parts.append(out)
            bar.update(len(idx))
        bar.close()
        cf: dict[str, pd.DataFrame] = {}
        sub = _first(batch, settings.counterfactual_examples)
        if "counterfactual" in settings.analyses:
            bar = progress_bar(len(_counterfactual_plan(model, settings.counterfactual_tests)), enabled=progress, unit="tests",
                               desc=f"{progress_label}: counterfactual attention tests on {len(sub)} examples")
            start = time.perf_counter()
            cf = _counterfactual_items(model, sub, settings, run, failures, done=bar.update)
            timings["counterfactual"] = time.perf_counter() - start
            bar.close()
        sanity = None
        if "sanity" in settings.analyses:
            start = time.perf_counter()
            small = _first(batch, settings.sanity_examples)
            bar = progress_bar(len(explainers), enabled=progress, unit="explainers",
                               desc=f"{progress_label}: randomisation sanity check on {len(small)} examples")
            sanity = _sanity_items(model, small, explainers, settings, run, failures, done=bar.update)
            timings["sanity"] = time.perf_counter() - start
            bar.close()
    if not parts:
        raise RuntimeError(f"every chunk of the audit failed: {failures}")
    metrics = pd.concat([p["metrics"] for p in parts] + ([sanity["metrics"]] if sanity else []), ignore_index=True)
    if batch.steps is not None:                 # a continuation's steps are one example: one row per example
        metrics = step_means(metrics, _example_of(batch))
    records, examples = [r for p in parts for r in p["attributions"]], [x for p in parts for x in p["examples"]]
    with model.evaluating():                    # not an item: a resumed audit reuses its items, runs only these
        attention = attention_examples(model, batch, records, examples)
    return AuditResult(
        metrics=metrics[COLUMNS], counterfactual=cf,
        curves=pd.concat([p["curves"] for p in parts], ignore_index=True),
        attributions=records, examples=examples, attention_example=attention[0], attention_examples=attention,
        settings={**settings.to_dict(), **({"left_out": left_out} if left_out else {}),
                  "n_examples": len({e for e, _ in batch.steps}) if batch.steps else len(batch),
                  **({"n_steps": len(batch)} if batch.steps else {}), "n_truncated": sum(batch.truncated or [])},
        timings=timings, failures=failures, forwards=forward_figures(add_forwards([p.get("forwards") for p in parts])))


def applicable_explainers(model: ExplainableModel, settings: AuditSettings) -> tuple[list, dict[str, str]]:
    """settings.explainers built and checked against the model -> (explainers, {left-out name: why}).

    A context-mixing explainer (`registry.CONTEXT_MIXING`) the model's architecture does not take is left out,
    with its refusal as the reason (ALTI, say, on GPT-2); any other refusal stops the audit before any work.
    """
    explainers, left_out = [], {}
    for name in settings.explainers:
        e = get_explainer(name, **dict(settings.explainer_params.get(name, {})))
        try:
            e.validate(model)
        except ValueError as err:
            if name not in CONTEXT_MIXING:
                raise
            left_out[name] = str(err)
            continue
        explainers.append(e)
    return explainers, left_out


# -- the counterfactual and sanity items ----------------------------------------------------------
# Each test at each layer (and head ablation once) is its own item, and so is each explainer's sanity
# check: every one of them seeds its own generator (counterfactual_table's tests each start from `seed`,
# explainers seed per example), so computing them apart, on any rank, gives the numbers of one call.
# They are not split by example: a permutation, adversarial start or random erasure draws for all the
# examples from one generator, and head ablation averages over them.
def _counterfactual_items(model: ExplainableModel, sub: Batch, settings: AuditSettings, run: Runner, failures: dict, *,
                          done: Callable[[int], Any] = lambda n: None) -> dict:
    """counterfactual_table(model, sub, ...) computed as one item per (test, layer) -> its merged tables."""
    options = dict(n_permutations=settings.n_permutations, adversarial_steps=settings.adversarial_steps,
                   adversarial_lr=float(settings.adversarial_lr),
                   adversary=adversary_options("default", n_adversaries=settings.n_adversaries), seed=settings.seed)
    tests = settings.counterfactual_tests
    if not tests:
        return run("counterfactual", lambda: counterfactual_table(model, sub, tests=tests, **options)) or {}
    pieces = {}
    for test, layer in _counterfactual_plan(model, tests):
        item = f"counterfactual-{test}" + ("" if layer is None else f"-layer-{layer}")
        pieces[test, layer] = run(item, lambda test=test, layer=layer: counterfactual_table(
            model, sub, tests=(test,), layers=[] if layer is None else [layer], **options))
        if pieces[test, layer] is None:
            failures[item] = f"counterfactual test {test}" + ("" if layer is None else f" at layer {layer}") + " failed"
        done(1)
    return merge_counterfactual(pieces, tests, [*range(model.n_layers), "all"])


def _counterfactual_plan(model: ExplainableModel, tests: Sequence[str]) -> list[tuple[str, Any]]:
    """The counterfactual items: each test at each layer and at "all", head ablation once (layer None)."""
    layers = [*range(model.n_layers), "all"]
    plan = [(t, layer) for t in tests if t != "head_ablation" for layer in layers
            if not (t == "attention_zeroing" and layer == "all")]
    return plan + ([("head_ablation", None)] if "head_ablation" in tests else [])


def merge_counterfactual(pieces: Mapping[tuple[str, Any], Mapping | None], tests: Sequence[str],
                         layers: Sequence[Any]) -> dict:
    """One counterfactual_table per (test, layer) -> the tables of one call over all of them, rows in its order
    (per layer the tests in TESTS order, then head ablation); pieces that are None (failed) are left out."""
    per_layer = [t for t in ALL_TESTS if t in tests and t != "head_ablation"]
    keys = [(t, layer) for layer in layers for t in per_layer] + [("head_ablation", None)]
    summaries = [pieces[k]["summary"] for k in keys if pieces.get(k)]
    if not summaries:
        return {}
    out = {"summary": pd.concat(summaries, ignore_index=True)}
    for t in tests:
        frames = [pieces[t, layer][t] for layer in ([None] if t == "head_ablation" else layers) if pieces.get((t, layer))]
        if frames:
            out[t] = pd.concat(frames, ignore_index=True)
    return out


SANITY_GROUP = "sanity-attention-family"     # the item of the attention family's sanity check: one capture per step


def _sanity_items(model: ExplainableModel, small: Batch, explainers, settings: AuditSettings, run: Runner, failures: dict, *,
                  done: Callable[[int], Any] = lambda n: None) -> dict | None:
    """randomization_table(model, small, explainers) as items -> {"metrics"} in its row order.

    The attention family (two or more) is one item, SANITY_GROUP, whose steps share one capture; every other
    explainer is an item of its own ("sanity-NAME"). The items are the same whatever their results (sharded
    ranks meet them in the same order), so a failing family item fails for all its explainers.
    """
    family = [e for e in explainers if isinstance(e, AttentionExplainer)]
    family = family if len(family) > 1 else []
    plan = ([(SANITY_GROUP, family)] if family else []) + [(f"sanity-{e.name}", [e]) for e in explainers
                                                           if all(e is not f for f in family)]
    parts = []
    for item, group in plan:
        out = run(item, lambda group=group: {"metrics": randomization_table(model, small, group, seed=settings.seed)
                                             .assign(note="")})
        if out is None:
            failures[item] = f"sanity check of {', '.join(e.name for e in group)} failed"
        else:
            parts.append(out["metrics"])
        done(len(group))
    return {"metrics": merge_sanity(parts, [e.name for e in explainers])} if parts else None


def merge_sanity(frames: Sequence[pd.DataFrame], order: Sequence[str] | None = None) -> pd.DataFrame:
    """Randomisation tables of some explainers each -> one, ordered as randomization_table orders them: by step, then
    explainer (in `order`, else as the frames give them), then example."""
    whole = pd.concat(frames, ignore_index=True)
    steps = {s: i for i, s in enumerate(dict.fromkeys(whole["setting"]))}
    names = {n: i for i, n in enumerate(order if order is not None else dict.fromkeys(whole["explainer"]))}
    key = whole["setting"].map(steps) * len(names) + whole["explainer"].map(names)
    return whole.iloc[key.argsort(kind="stable")].reset_index(drop=True)


def _as_batch(model: ExplainableModel, data, max_examples: int | None) -> Batch:
    if isinstance(data, Batch):
        batch = data
    else:
        if isinstance(data, str):
            data = [data]
        data = list(data)
        if not data:
            raise ValueError("data must hold at least one example; got none.")
        batch = model.encode(data[:max_examples] if max_examples else data, truncate=True)
    if max_examples is not None:
        batch = _first(batch, max_examples)
    if batch.ids is None:
        batch = replace(batch, ids=[str(i) for i in range(len(batch))])
    if len(set(batch.ids)) != len(batch.ids):
        dup = next(i for i in batch.ids if batch.ids.count(i) > 1)
        raise ValueError(f"example ids must be unique (rows of the tables are keyed by them); {dup!r} repeats.")
    return batch


def _first(batch: Batch, n: int) -> Batch:
    """The first n examples: n rows, or for generation rows (`batch.steps`) every step of the first n examples."""
    if batch.steps is not None:
        keep = [r for r, (e, _) in enumerate(batch.steps) if e < n]
        return batch if len(keep) == len(batch) else batch.select(keep)
    return batch if len(batch) <= n else batch.select(range(n))


def _example_of(batch: Batch) -> dict[str, str]:
    """Generation rows: row id ("id@s") -> its example's id (`model.steps.step_batch`)."""
    assert batch.ids is not None and batch.steps is not None
    return {i: i[: -len(f"@{s}")] if i.endswith(f"@{s}") else i for i, (_, s) in zip(batch.ids, batch.steps)}


def _chunk(model: ExplainableModel, batch: Batch, explainers, settings: AuditSettings) -> dict:
    """Explain one chunk with every explainer and score it -> {"metrics", "curves", "attributions", "examples", ...}."""
    # a language model's rows explain the given continuation's tokens (`attnaudit.model.steps`), a classifier's
    # the predicted class
    generating = getattr(model, "kind", None) == "lm" and batch.labels is not None
    # one engine for the chunk: occlusion, LIME and KernelSHAP evaluate through it (float32, `perturb.sharing`), and
    # the curves, ERASER bins, τ-LOO and decision flips then find every input those ran already in its cache
    engine = PerturbationEngine(model, batch, policy=settings.policy, max_batch=settings.max_batch, autocast=False)
    with sharing(engine):
        attributions = explain_all(model, batch, explainers, target=batch.labels if generating else None)
    explained = engine.stats.as_dict()
    prob = next(iter(attributions.values())).target_prob                  # [batch]
    if not torch.isfinite(prob).all():
        bad = [batch.ids[i] for i in (~torch.isfinite(prob)).nonzero()[:, 0].tolist()]
        raise ValueError(f"the model's output is not finite (NaN or infinite) for example(s) {bad[:5]}; "
                         "check the model's weights and these inputs.")
    with model.evaluating():
        curves = pd.concat([_curves(engine, batch, a, name, settings.curve_steps) for name, a in attributions.items()],
                           ignore_index=True)
        frames = []
        if "faithfulness" in settings.analyses:
            frames.append(faithfulness_table(model, batch, attributions, bins=settings.bins, policy=settings.policy,
                                             metrics=settings.metrics, ferret=settings.ferret, engine=engine,
                                             seed=settings.seed, explainers={e.name: e for e in explainers},
                                             curve_steps=settings.curve_steps))
        forwards = chunk_forwards(engine, explained, plain_seconds(engine))
    if "plausibility" in settings.analyses and batch.rationale is not None:
        named = list(attributions.values())
        frames.append(gold_table(named, batch).assign(note=""))
        frames.append(rationale_table(named, batch).assign(note=""))
    first = next(iter(attributions.values()))
    pred = first.target.tolist()
    if generating:
        with model.evaluating(), torch.no_grad():
            pred = model(batch).argmax(-1).tolist()                               # the greedy next token
    word_ids = model.word_ids(batch) if hasattr(model, "word_ids") and batch.texts is not None else None
    examples = []
    for i in range(len(batch)):
        n = int(batch.attention_mask[i].sum())
        gold = batch.rationale[i, :n].round().int().tolist() if batch.rationale is not None else None
        label = int(batch.labels[i]) if batch.labels is not None and int(batch.labels[i]) >= 0 else None
        cut = bool(batch.truncated[i]) if batch.truncated is not None else False
        examples.append({"id": batch.ids[i], "label": label, "prediction": int(pred[i]), "gold": gold, "truncated": cut})
        if word_ids is not None:
            examples[-1]["word_gold"] = _word_gold(gold, word_ids[i][:n])
    records = [_rounded(r) for a in attributions.values() for r in _with_words(a, word_ids)]
    return {"metrics": pd.concat(frames, ignore_index=True)[COLUMNS] if frames else pd.DataFrame(columns=COLUMNS),
            "curves": curves, "attributions": records, "examples": examples, "forwards": forwards}


def _retry_oom(compute: Callable[[], Any], smaller: Callable[[], Any]) -> Any:
    """compute(); after a CUDA out-of-memory error, smaller() once (a second one propagates)."""
    try:
        return compute()
    except torch.cuda.OutOfMemoryError:
        pass                                   # leave the except first, so the failed frames are freed
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return smaller()


def _chunk_in_halves(model: ExplainableModel, batch: Batch, idx: list[int], explainers, settings: AuditSettings) -> dict:
    """`_chunk` on each half of the examples `idx`, with half the perturbation batch -> one merged payload."""
    half = settings.with_(max_batch=max(1, settings.max_batch // 2))
    middle = (len(idx) + 1) // 2                                         # one example: one "half"
    parts = [_chunk(model, batch.select(p), explainers, half) for p in (idx[:middle], idx[middle:]) if p]
    return {"metrics": pd.concat([p["metrics"] for p in parts], ignore_index=True),
            "curves": pd.concat([p["curves"] for p in parts], ignore_index=True),
            "attributions": [r for p in parts for r in p["attributions"]],
            "examples": [x for p in parts for x in p["examples"]],
            "forwards": add_forwards([p["forwards"] for p in parts])}


def _with_words(attribution, word_ids) -> list[dict]:
    """to_records(), plus "words" and "word_scores" (sub-word scores summed per whitespace word, which keeps
    their total) when the model's tokenizer splits words (HuggingFace models), so reports can show words."""
    records = attribution.to_records()
    if word_ids is None:
        return records
    words = aggregate_words(attribution, "sum", word_ids=word_ids)
    for i, rec in enumerate(records):
        n = int(words.word_mask[i].sum())
        rec.update(words=words.words[i], word_scores=[float(f"{x:.6g}") for x in words.scores[i, :n].tolist()],
                   word_pooling="sum")
    return records


def _word_gold(gold: list[int] | None, word_ids: list[int | None]) -> list[int] | None:
    """A word is gold when any of its tokens is (the rationale was spread from words to their tokens)."""
    if gold is None:
        return None
    marks: dict[int, int] = {}
    for g, w in zip(gold, word_ids):
        if w is not None:
            marks[w] = max(marks.get(w, 0), int(g))
    return [marks[w] for w in sorted(marks)]


def _rounded(record: dict) -> dict:
    """Scores to 6 significant digits and no wall time (that is in the timings): the JSONL stays small and
    byte-identical from run to run."""
    return {**{k: v for k, v in record.items() if k != "seconds"}, "scores": [float(f"{x:.6g}") for x in record["scores"]]}


def _curves(engine: PerturbationEngine, batch: Batch, attribution, name: str, max_steps: int | None) -> pd.DataFrame:
    """Deletion and insertion curves resampled on CURVE_GRID (linear interpolation) -> tidy rows."""
    rows = []
    for kind, curve in (("deletion", F.deletion_curve), ("insertion", F.insertion_curve)):
        values = curve(engine, batch, attribution, max_steps=max_steps).double().numpy()   # [batch, step] NaN-padded
        for i, row in enumerate(values):
            y = row[~np.isnan(row)]
            if len(y) < 2:
                continue
            probs = np.interp(CURVE_GRID, np.linspace(0.0, 1.0, len(y)), y)
            rows += [(batch.ids[i], name, kind, float(f), float(p)) for f, p in zip(CURVE_GRID, probs)]
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def attention_example(model: ExplainableModel, batch: Batch, i: int = 0) -> dict:
    """Every encoder layer's and head's attention for example i -> {"id", "tokens", "attention" [layer, head, q, k]}."""
    one = batch.select([i])
    with torch.no_grad():
        _, cache = record(model, one)
    att = cache.stack("*self_attn.pattern")[:, 0].float().cpu()                  # [layer, head, query, key]
    return {"id": one.ids[0] if one.ids else str(i), "tokens": list(one.tokens[0]), "attention": att.numpy().round(5).tolist()}


def attention_examples(model: ExplainableModel, batch: Batch, attributions: Sequence[dict],
                       examples: Sequence[dict]) -> list[dict]:
    """`attention_example` of each example the report of these records shows (`attention_examples.shown_ids`, the
    rule of `report_files.select_examples`), one forward each; of the first example when it shows none."""
    from attnaudit.analyses.attention_examples import shown_ids

    row = {str(i): r for r, i in enumerate(batch.ids or [])}
    rows = [row[i] for i in shown_ids(attributions, examples) if i in row]
    return [attention_example(model, batch, r) for r in rows or [0]]
