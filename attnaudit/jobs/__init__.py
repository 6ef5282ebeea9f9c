"""The jobs behind `attnaudit run` and `attnaudit analyze`: model -> audit -> report folder.

    run_job("reports/default")                           # the built-in default: train or reuse, audit, report
    run_job("reports/quick", quick=True)                 # smaller models and samples, same pipeline
    analyze_job("runs/mine", "reports/mine", data="test.csv", text_col="text", label_col="label")

Each task's model is trained once into `runs/` (reused when a model with the same task and settings is
already there), explained and analysed by `attnaudit.analyses.audit.audit`, and all tasks go into one
report. Finished work is saved item by item (a chunk of examples, the counterfactual tests, the sanity
check) through `attnaudit.jobs.store.ItemStore` under OUT/.attnaudit/, so an interrupted run loses at
most the item in flight and `resume=True` finishes it with the same numbers.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pandas as pd
import tomllib
import torch

from attnaudit import distributed
from attnaudit.analyses.audit import AuditResult, AuditSettings, audit
from attnaudit.analyses.report import write_report
from attnaudit.analyses.seq2seq import audit_translator
from attnaudit.analyses.tables import COLUMNS
from attnaudit.data.labels import name_classes, parse_label_names
from attnaudit.data.readers import data_format, read_labelled
from attnaudit.data.tasks import TASK_NAMES
from attnaudit.jobs.store import (
    ItemStore,
    RankStore,
    StoreError,
    check_output_dir,
    differences,
    frame_payload,
    payload_frame,
    sha256_file,
    sha256_json,
    short_repr,
)
from attnaudit.model.checkpoint import load_model, read_config
from attnaudit.model.seq2seq import Translator
from attnaudit.model.train import TrainSettings, defaults_for, resolve_device, task_examples, train_to_folder

DEFAULT_TASKS = ("keywords", "needle", "majority", "reorder")
QUICK_TRAIN = {"keywords": dict(n_train=6000, epochs=6), "needle": dict(n_train=2000, epochs=3),
               "majority": dict(n_train=2000, epochs=3), "reorder": dict(n_train=4000, epochs=4)}
QUICK_AUDIT = dict(max_examples=48, chunk_size=48, counterfactual_examples=48, n_permutations=10,
                   adversarial_steps=15, sanity_examples=12, explainer_params={
                       "integrated_gradients": {"n_steps": 64}, "lime": {"n_samples": 200},
                       "kernel_shap": {"n_samples": 200}, "gradient_shap": {"n_samples": 16}})
CONFIG_SECTIONS = {"run": ("tasks", "seed", "device", "runs"), "audit": None, "train": None}


@dataclass(frozen=True)
class RunPlan:
    """What `attnaudit run` does: which tasks, how each model is trained, how they are audited."""

    tasks: tuple[str, ...]
    train: dict[str, TrainSettings]
    audit: AuditSettings
    runs: Path
    device: str
    quick: bool


def plan_run(*, quick: bool = False, config: str | Path | None = None, device: str | None = None,
             runs: str | Path | None = None) -> RunPlan:
    """The embedded default (or --quick), with a TOML file's choices on top -> RunPlan.

    TOML sections: [run] tasks, seed, device, runs; [audit] any AuditSettings field (explainer options
    under [audit.explainer_params.NAME]); [train] any TrainSettings field for every task, or
    [train.TASK] for one.
    """
    cfg = read_toml(config) if config is not None else {}
    run = cfg.get("run", {})
    tasks = tuple(run.get("tasks", DEFAULT_TASKS))
    bad = [t for t in tasks if t not in TASK_NAMES]
    if not tasks or bad or isinstance(run.get("tasks", []), str) or len(set(tasks)) != len(tasks):
        raise ValueError(f"[run] tasks must list distinct built-in tasks ({', '.join(TASK_NAMES)}); got {run.get('tasks')!r}.")
    seed = run.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"[run] seed must be a non-negative integer; got {seed!r}.")
    train_cfg = cfg.get("train", {})
    shared = {k: v for k, v in train_cfg.items() if not isinstance(v, dict)}
    per_task = {k: v for k, v in train_cfg.items() if isinstance(v, dict)}
    unknown = [t for t in per_task if t not in tasks]
    if unknown:
        raise ValueError(f"[train.{unknown[0]}] names a task that is not in [run] tasks {list(tasks)}.")
    train = {}
    for t in tasks:
        changes = {**(QUICK_TRAIN[t] if quick else {}), "seed": seed, **shared, **per_task.get(t, {})}
        train[t] = _replace(defaults_for(t), changes, f"[train.{t}]" if t in per_task else "[train]")
    audit_changes = {**(QUICK_AUDIT if quick else {}), "seed": seed, **cfg.get("audit", {})}
    if "explainer_params" in cfg.get("audit", {}) and quick:
        audit_changes["explainer_params"] = {**QUICK_AUDIT["explainer_params"], **cfg["audit"]["explainer_params"]}
    try:
        settings = AuditSettings().with_(**audit_changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"[audit] {e}") from e
    settings = settings.with_(explainer_params={k: v for k, v in settings.explainer_params.items()
                                                if k in settings.explainers})
    device = device or run.get("device", "auto")
    resolve_device(device)
    runs_dir = Path(runs or run.get("runs", "runs"))
    return RunPlan(tasks=tasks, train=train, audit=settings, runs=runs_dir, device=device, quick=quick)


def read_toml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config must be a TOML file; {str(path)!r} does not exist.")
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {str(path)!r} is not valid TOML: {e}.") from e
    for section, value in cfg.items():
        if section not in CONFIG_SECTIONS:
            raise ValueError(f"--config {str(path)!r}: unknown section [{section}]; sections: "
                             f"{', '.join(CONFIG_SECTIONS)}.")
        if not isinstance(value, dict):
            raise ValueError(f"--config {str(path)!r}: {section} must be a [{section}] table; got {value!r}.")
        known = CONFIG_SECTIONS[section]
        extra = [k for k in value if known is not None and k not in known]
        if extra:
            raise ValueError(f"--config {str(path)!r}: unknown key {extra[0]!r} in [{section}]; keys: {', '.join(known)}.")
    return cfg


def _replace(settings: TrainSettings, changes: Mapping, where: str) -> TrainSettings:
    names = {f.name for f in fields(settings)}
    unknown = [k for k in changes if k not in names]
    if unknown:
        raise ValueError(f"{where} has unknown training setting {unknown[0]!r}; settings: {', '.join(sorted(names))}.")
    try:
        return settings.replace(**changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


# -- models ---------------------------------------------------------------------------------------
def model_folder(runs: Path, task: str, settings: TrainSettings) -> Path:
    """runs/TASK for the default settings, runs/TASK-<hash of the settings> otherwise (never a clash)."""
    same = settings.to_dict() == defaults_for(task).to_dict()
    return runs / (task if same else f"{task}-{sha256_json(settings.to_dict())[:10]}")


def trained_model(task: str, settings: TrainSettings, folder: Path, *, device: str, progress: bool,
                  echo: Callable[[str], None]) -> tuple[object, dict, float | None]:
    """Reuse folder's model when it was trained on this task with these settings, else train it there.

    -> (model, metrics, training seconds or None when reused)."""
    if (folder / "metrics.json").is_file() and (folder / "config.json").is_file():
        cfg = read_config(folder)
        if cfg.get("training", {}).get("settings") == settings.to_dict() and cfg.get("task", {}).get("name") == task:
            echo(f"{task}: reusing the model in {folder}")
            metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
            return load_model(folder, device=resolve_device(device)), metrics, None
    echo(f"{task}: training the default model into {folder}")
    start = time.perf_counter()
    path, metrics = train_to_folder(folder, task=task, settings=settings, device=device, progress=progress)
    return load_model(path, device=resolve_device(device)), metrics, time.perf_counter() - start


def model_card(model, folder: Path, metrics: Mapping, *, train_seconds: float | None, device) -> dict:
    """Architecture, training data and metrics, seed, device, checkpoint hash -> a JSON-able dict."""
    if getattr(model, "config", {}).get("format") == "huggingface":
        return _hf_card(model, folder, metrics, device=device)
    cfg = read_config(folder)
    arch = cfg.get("architecture", {})
    training = cfg.get("training", {})
    n_params = sum(p.numel() for p in model.net.parameters()) if hasattr(model, "net") else None
    keep = ("test_accuracy", "valid_accuracy", "test_exact_match", "test_bleu", "valid_exact_match", "best_epoch",
            "epochs_run", "train_seconds", "n_train", "test_set")
    return {
        "task": cfg.get("task", {}).get("name"), "data": cfg.get("task", {}).get("description") or cfg.get("task", {}).get("name"),
        "architecture": {"kind": cfg.get("kind"), "n_layers": model.n_layers, "n_heads": model.n_heads,
                         **{k: arch[k] for k in ("d_model", "d_ff", "norm", "pooling", "max_len", "vocab_size") if k in arch},
                         "parameters": n_params},
        "training": {**{k: metrics[k] for k in keep if k in metrics},
                     "stage_seconds": round(train_seconds, 2) if train_seconds is not None else "reused"},
        "seed": training.get("seed"), "label_names": list(getattr(model, "label_names", ())), "device": str(device),
        "checkpoint": {"folder": str(folder), "sha256": sha256_file(folder / "model.safetensors")},
    }


def _hf_card(model, folder: Path, metrics: Mapping, *, device) -> dict:
    """model_card for a HuggingFace folder: its config.json, and metrics.json when attnaudit finetune wrote it."""
    hf = model.hf_config
    keep = ("test_accuracy", "valid_accuracy", "best_epoch", "epochs_run", "train_seconds", "n_train", "test_set")
    return {
        "task": None, "data": None,
        "architecture": {"kind": "classifier", "model_type": hf.model_type, "class": model.config["architecture"],
                         "n_layers": model.n_layers, "n_heads": model.n_heads, "d_model": int(hf.hidden_size),
                         "d_ff": getattr(hf, "intermediate_size", None) or getattr(hf, "hidden_dim", None),
                         "max_len": model.max_len, "vocab_size": model.vocab_size,
                         "parameters": sum(p.numel() for p in model.net.parameters())},
        "training": {**{k: metrics[k] for k in keep if k in metrics}, "head": model.config["head"],
                     "stage_seconds": "reused"},
        "seed": metrics.get("seed"), "label_names": list(model.label_names), "device": str(device),
        "checkpoint": {"folder": str(folder), "sha256": sha256_file(folder / "model.safetensors")},
    }


# -- the store runner -----------------------------------------------------------------------------
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


def shard_runner(store: ItemStore, prefix: str, index, ranks: distributed.Ranks):
    """store_runner for this rank's items only (item i of the job: rank distributed.owner(i, world_size));
    None for the others, which their ranks compute. `index` counts the job's items across tasks."""
    def run(item, compute):
        if distributed.owner(next(index), ranks.world_size) != ranks.rank:
            return None
        store.run(f"{prefix}.{item}", lambda: _encode(compute()))
        return None
    return run


def gather_runner(store: ItemStore, prefix: str, index, ranks: distributed.Ranks):
    """Rank 0's runner after its own items: wait for each item's rank to save it, then read it back
    (None when it failed, as store_runner gives)."""
    def run(item, compute):
        name = f"{prefix}.{item}"
        distributed.wait_for(store, name, distributed.owner(next(index), ranks.world_size))
        return _decode(store.load(name)) if store.done(name) else None
    return run


# -- the jobs -------------------------------------------------------------------------------------
BUILTIN_TITLE = "Can attention explain these models' outputs? The built-in tasks"


def _check_report_folder(out: Path, identity: dict, *, overwrite: bool, resume: bool,
                         builtin: bool = False, quick: bool = False) -> bool:
    """Refuse a folder that holds other files or another model's report (unless overwrite).

    -> True when the folder holds `attnaudit run`'s own built-in report made with other settings (an older
    package's defaults, e.g. the report committed in the repository): `run` with the built-in plan
    (`builtin`) regenerates that in place, since it is the package's own output; any other report
    (a `--config` run, an `analyze` report, other files) is still refused without --overwrite.
    """
    check_output_dir(out)
    if overwrite or not out.is_dir():
        return False
    present = sorted(p.name for p in out.iterdir() if p.name != ".attnaudit")
    if not present:
        return False
    how = "pass --overwrite to replace it, or choose another --out"
    if "results.json" not in present:
        raise ValueError(f"--out {str(out)!r} is not empty ({', '.join(present[:4])}) and holds no attnaudit report; {how}.")
    try:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))   # the identity only: no tables
    except (ValueError, OSError) as e:
        raise ValueError(f"--out {str(out)!r} holds a results.json that cannot be read ({e}); {how}.") from e
    old = results.get("settings", {}).get("identity")
    if old == json.loads(json.dumps(identity)):
        return False
    if builtin and not resume and is_builtin_report(results, quick=quick):
        return True
    diffs = differences(old, json.loads(json.dumps(identity)))
    changed = ", ".join(f"{k}: {short_repr(a, 40)} -> {short_repr(b, 40)}" for k, a, b in diffs[:3]) + (", ..." if len(diffs) > 3 else "")
    raise ValueError(f"--out {str(out)!r} holds the report of different models or settings ({changed}); {how}.")


def is_builtin_report(results: Mapping, *, quick: bool) -> bool:
    """Was this results.json written by `attnaudit run` with the built-in plan (no --config)?

    Reports record it as settings.builtin; those written before that marker existed are recognised by
    run's title and identity layout (tasks + audit)."""
    settings = results.get("settings", {})
    identity = settings.get("identity") or {}
    if bool(settings.get("quick")) != quick:
        return False
    if "builtin" in settings:
        return settings["builtin"] is True
    return (set(identity) == {"tasks", "audit"}
            and str(results.get("title", "")).startswith(BUILTIN_TITLE) and identity.get("tasks") is not None)


def _audit_all(jobs: list[tuple[str, object, list, dict]], settings: AuditSettings, out: Path, *, identity: dict,
               resume: bool, overwrite: bool, progress: bool, echo) -> dict[str, AuditResult]:
    results = {}
    fingerprint = {"identity": identity, "models": {t: card["checkpoint"]["sha256"] for t, _, _, card in jobs}}
    if distributed.current() is not None:
        return _audit_sharded(jobs, settings, out, fingerprint=fingerprint, resume=resume, overwrite=overwrite,
                              progress=progress, echo=echo)
    with ItemStore(out, fingerprint=fingerprint, resume=resume, overwrite=overwrite) as store:
        for task, model, examples, _card in jobs:
            results[task] = _audit_one(task, model, examples, settings, store_runner(store, task), progress, echo)
        failures = store.failures()
    if failures:
        raise ItemsFailed(failures)
    return results


def _audit_one(task: str, model, examples, settings: AuditSettings, runner, progress, echo) -> AuditResult:
    n = min(len(examples), settings.max_examples or len(examples))
    echo(f"{task}: explaining and analysing {n} examples with {len(settings.explainers)} explainers"
         + (f" (the first {n} of {len(examples)}: raise max_examples in [audit] for more)" if n < len(examples) else ""))
    if isinstance(model, Translator):
        result = _audit_translator(model, examples, settings, runner, progress=progress, label=f"audit {task}")
    else:
        result = audit(model, examples, settings, progress=progress, progress_label=f"audit {task}", runner=runner)
    if result.settings.get("n_truncated"):
        echo(f"{task}: note: {result.settings['n_truncated']} examples were longer than the model's "
             f"{model.max_len} positions and were cut (marked \"truncated\" in examples.jsonl; a model trained "
             "with a larger max_len takes them whole)")
    return result


def _audit_sharded(jobs, settings: AuditSettings, out: Path, *, fingerprint: dict, resume: bool, overwrite: bool,
                   progress: bool, echo) -> dict[str, AuditResult]:
    """`_audit_all` on every rank of a torchrun job (attnaudit.distributed) -> the results on rank 0, {} elsewhere.

    The ranks check that they run the same audit; rank 0 opens the folder's store (lock, resume, overwrite),
    then the others attach; each computes the items `distributed.owner` gives it; rank 0 waits for the rest
    and assembles the results from the store, as a resumed single process would: the same bytes.
    """
    ranks = distributed.current().ranks
    distributed.check_same(fingerprint)
    store, error = None, None
    if ranks.is_main:
        store, error = _enter(lambda: ItemStore(out, fingerprint=fingerprint, resume=resume, overwrite=overwrite))
    distributed.agree(error)
    if not ranks.is_main:
        store, error = _enter(lambda: RankStore(out, rank=ranks.rank, fingerprint=fingerprint))
    try:
        distributed.agree(error)
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
    except (KeyboardInterrupt, distributed.RankFailed) as e:   # a rank died: torchrun stops the others, or a
        dead = distributed.dead_ranks(store) if ranks.is_main else []   # collective fails; name the dead rank
        if not dead:
            raise
        message = (f"rank(s) {', '.join(map(str, dead))} stopped before finishing their items; "
                   f"{distributed.resume_hint()}")
        if isinstance(e, KeyboardInterrupt):
            import sys
            print(f"error: {message}", file=sys.stderr)
            raise
        raise distributed.RankFailed(message) from e
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
    """make().__enter__() -> (store, None), or (None, the StoreError) for `distributed.agree` to share."""
    try:
        return make().__enter__(), None
    except StoreError as e:
        return None, e


def _own_items(task, model, examples, settings, runner, progress, echo) -> None:
    """The audit with a runner that computes only this rank's items and answers None for the others: the
    audit's own tables are thrown away (they lack the other ranks' items), hence its refusal when this rank
    owns no chunk ("every chunk of the audit failed") is expected here."""
    try:
        _audit_one(task, model, examples, settings, runner, progress, echo)
    except RuntimeError as e:
        if not str(e).startswith("every chunk of the audit failed"):
            raise


def _audit_translator(model, examples, settings: AuditSettings, run, *, progress: bool | None = None,
                      label: str = "audit") -> AuditResult:
    """The encoder-decoder's analyses (attnaudit.analyses.seq2seq), as one saved item, in AuditResult form."""
    from attnaudit.core.progress import progress_bar
    examples = list(examples)[: settings.max_examples]
    start = time.perf_counter()
    with progress_bar(len(examples), desc=f"{label}: seq2seq analyses", enabled=progress) as bar:
        out = run("seq2seq", lambda: audit_translator(model, examples, seed=settings.seed, max_batch=settings.max_batch,
                                                      n_permutations=settings.n_permutations))
        bar.update(len(examples))
    seconds = time.perf_counter() - start
    if out is None:
        return AuditResult(metrics=pd.DataFrame(columns=COLUMNS), counterfactual={}, curves=_NO_CURVES, attributions=[],
                           examples=[], attention_example=None, settings={"n_examples": 0}, timings={})
    return AuditResult(metrics=out["metrics"], counterfactual=out["counterfactual"], curves=_NO_CURVES,
                       attributions=out["attributions"], examples=out["examples"], attention_example=None,
                       settings={**settings.to_dict(), "n_examples": len(examples)}, timings={"seq2seq": seconds})


_NO_CURVES = pd.DataFrame(columns=["example_id", "explainer", "curve", "fraction", "prob"])


class ItemsFailed(RuntimeError):
    """Some items failed; the others are saved. The CLI lists them and exits with status 3."""

    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        super().__init__(f"{len(failures)} item(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))


def _write(out: Path, results: dict[str, AuditResult], cards: dict, settings: dict, timings: dict, title: str, *,
           full_tables: bool = False) -> Path:
    def cat(name):
        frames = [getattr(r, name).assign(task=t) for t, r in results.items()]
        return pd.concat(frames, ignore_index=True)
    cf = {k: pd.concat([r.counterfactual[k].assign(task=t) for t, r in results.items() if k in r.counterfactual],
                       ignore_index=True) for k in ("summary", "permutation")
          if any(k in r.counterfactual for r in results.values())}
    return write_report(
        out, metrics=cat("metrics"), counterfactual=cf or None, curves=cat("curves"),
        attributions=[{**a, "task": t} for t, r in results.items() for a in r.attributions],
        examples=[{**x, "task": t} for t, r in results.items() for x in r.examples],
        attention_examples=[{**r.attention_example, "task": t} for t, r in results.items() if r.attention_example],
        model_cards=cards, settings=settings, timings=timings, title=title, full_tables=full_tables)


# Environment variables that pin the CPU kernels (README "Reproducibility"): recorded when set.
KERNEL_PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def _provenance(settings: AuditSettings, device) -> dict:
    """What reproducing the tables needs besides the settings (versions are in results.json's "versions")."""
    return {"seed": settings.seed, "device": str(device), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{k.lower(): os.environ[k] for k in KERNEL_PINS if k in os.environ}}


def run_identity(plan: RunPlan) -> dict:
    """What decides `attnaudit run`'s numbers: each task's training settings and the audit settings."""
    return {"tasks": {t: plan.train[t].to_dict() for t in plan.tasks}, "audit": plan.audit.to_dict()}


@distributed.sharded
def run_job(out: str | Path = "reports/default", *, quick: bool = False, config=None, device: str | None = None,
            runs: str | Path | None = None, resume: bool = False, overwrite: bool = False, progress: bool | None = True,
            full_tables: bool = False, echo: Callable[[str], None] = print) -> Path:
    """`attnaudit run`: for each task train (or reuse) its model, audit it, and write one report -> out.

    Under torchrun the items are shared among the ranks (attnaudit.distributed); rank 0 trains missing models
    first, the others then load them; rank 0 writes the report."""
    echo = echo if distributed.is_main() else (lambda _: None)
    plan = plan_run(quick=quick, config=config, device=device, runs=runs)
    out = Path(out)
    identity = run_identity(plan)
    builtin = config is None
    stale = _check_report_folder(out, identity, overwrite=overwrite, resume=resume, builtin=builtin,
                                 quick=plan.quick)
    if stale:
        echo(f"{out} holds attnaudit run's built-in report made with other settings (an older version's "
             "defaults); regenerating it in place")
        overwrite = True
    dev = resolve_device(plan.device)
    started = time.perf_counter()
    jobs, cards, timings = [], {}, {}
    for task in plan.tasks:
        folder = model_folder(plan.runs, task, plan.train[task])
        with distributed.main_first():             # one rank trains a missing model, the others then reuse it
            model, metrics, seconds = trained_model(task, plan.train[task], folder, device=plan.device,
                                                    progress=progress and distributed.is_main(), echo=echo)
        timings[f"{task}.train"] = round(seconds, 2) if seconds is not None else 0.0
        examples = task_examples(task, plan.train[task])["test"]
        cards[task] = model_card(model, folder, metrics, train_seconds=seconds, device=dev)
        jobs.append((task, model, examples, cards[task]))
    results = _audit_all(jobs, plan.audit, out, identity=identity, resume=resume, overwrite=overwrite,
                         progress=progress, echo=echo)
    if not distributed.is_main():                      # its items are saved; rank 0 writes the report
        return out
    for task, r in results.items():
        timings.update({f"{task}.{k}": round(v, 2) for k, v in r.timings.items()})
    timings["total"] = round(time.perf_counter() - started, 2)
    settings = {"quick": plan.quick, "builtin": builtin, **_provenance(plan.audit, dev), "threads": torch.get_num_threads(),
                "platform": platform.platform(), "audit": plan.audit.to_dict(), "identity": identity,
                "policy": plan.audit.policy, "n_examples": {t: r.settings["n_examples"] for t, r in results.items()},
                "n_truncated": {t: r.settings.get("n_truncated", 0) for t, r in results.items()}}
    title = BUILTIN_TITLE + (" (quick run)" if plan.quick else "")
    echo(f"writing the report (tables, figures, index.html) into {out}")
    return _write(out, results, cards, settings, timings, title, full_tables=full_tables)


@distributed.sharded
def analyze_job(model_dir: str | Path, out: str | Path, *, task: str | None = None, data=None,
                text_col: str | None = None, label_col: str | None = None, config=None, device: str | None = None,
                max_examples: int | None = None, name: str | None = None, title: str | None = None,
                label_names=None, allow_untrained: bool = False, resume: bool = False, overwrite: bool = False,
                progress: bool | None = True, full_tables: bool = False, echo: Callable[[str], None] = print) -> Path:
    """`attnaudit analyze`: audit a trained model on a built-in task's test split or the user's file -> out.

    `data` may be a table (text_col, label_col), an ERASER annotation file or a HateXplain file (their human
    rationales feed the plausibility tables); integer labels in range are class indices. `max_examples`
    overrides [audit] max_examples; `name` labels the data in the report (default: the file's name), `title`
    heads it. `label_names` ("a,b,c" or a list, in class-index order) names the model's classes (e.g. a
    HuggingFace head's LABEL_0, LABEL_1). A model with weights newly initialised at load (an untrained head:
    `model.untrained_weights`) is refused unless `allow_untrained`; the model card lists them.
    Under torchrun the items are shared among the ranks (attnaudit.distributed); rank 0 writes the report.
    """
    echo = echo if distributed.is_main() else (lambda _: None)
    if (task is None) == (data is None):
        raise ValueError(f"pass exactly one of --task ({', '.join(TASK_NAMES)}) or --data FILE; "
                         f"got {'both' if task is not None else 'neither'}.")
    if data is not None and (not text_col or not label_col) and data_format(data) == "table":
        raise ValueError(f"--data needs --text-col and --label-col (the columns of {Path(data).name} to use).")
    names = parse_label_names(label_names)           # a malformed list fails before the model is loaded
    plan = plan_run(config=config, device=device)
    if max_examples is not None:
        plan = replace(plan, audit=plan.audit.with_(max_examples=max_examples))
    out, folder = Path(out), Path(model_dir)
    dev = resolve_device(plan.device)
    model = name_classes(load_model(folder, device=dev), names)
    untrained = list(getattr(model, "untrained_weights", None) or [])
    if untrained and not allow_untrained:
        raise ValueError(
            f"--model {str(folder)!r} has weights newly initialised at load ({', '.join(untrained[:3])}"
            f"{', ...' if len(untrained) > 3 else ''}): an untrained classification head, whose predictions are "
            f"arbitrary, so a verdict would mean nothing. Fine-tune it first (attnaudit finetune --hf {folder} "
            "--data FILE --out DIR), or pass --allow-untrained to analyse it anyway.")
    if task is not None:
        settings = defaults_for(task).replace(seed=plan.audit.seed)
        examples, name, data_hash = task_examples(task, settings)["test"], name or task, sha256_json(settings.to_dict())
    else:
        loaded = read_labelled(data, text_col=text_col, label_col=label_col, label_names=tuple(model.label_names))
        examples, data_hash = loaded.examples, sha256_file(Path(data))
        name = name or Path(data).name.split(".")[0]
    identity = {"model": sha256_file(folder / "model.safetensors"), "data": data_hash, "audit": plan.audit.to_dict()}
    if label_names is not None:
        identity["label_names"] = list(model.label_names)
    _check_report_folder(out, identity, overwrite=overwrite, resume=resume)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8")) if (folder / "metrics.json").is_file() else {}
    card = model_card(model, folder, metrics, train_seconds=None, device=dev)
    card["data"] = name
    if untrained:
        card["untrained_weights"] = untrained
    if data is not None:
        card["data_source"] = {"path": str(Path(data)), "sha256": data_hash, **loaded.info}
    started = time.perf_counter()
    results = _audit_all([(name, model, examples, card)], plan.audit, out, identity=identity, resume=resume,
                         overwrite=overwrite, progress=progress, echo=echo)
    if not distributed.is_main():                      # its items are saved; rank 0 writes the report
        return out
    timings = {f"{name}.{k}": round(v, 2) for k, v in results[name].timings.items()}
    timings["total"] = round(time.perf_counter() - started, 2)
    settings = {**_provenance(plan.audit, dev), "audit": plan.audit.to_dict(), "identity": identity,
                "policy": plan.audit.policy, "n_examples": {name: results[name].settings["n_examples"]},
                "n_truncated": {name: results[name].settings.get("n_truncated", 0)}}
    echo(f"{name}: writing the report (tables, figures, index.html) into {out}")
    return _write(out, results, {name: card}, settings, timings,
                  title or f"Can attention explain this model's outputs? {name}", full_tables=full_tables)
