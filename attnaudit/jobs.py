"""The jobs behind `attnaudit run` and `attnaudit analyze`: model -> audit -> report folder.

    run_job("reports/default")                           # the built-in default: train or reuse, audit, report
    run_job("reports/quick", quick=True)                 # smaller models and samples, same pipeline
    analyze_job("runs/mine", "reports/mine", data="test.csv", text_col="text", label_col="label")

Each task's model is trained once into `runs/` (reused when a model with the same task and settings is
already there), explained and analysed by `attnaudit.analyses.audit.audit`, and all tasks go into one
report. Finished work is saved item by item (a chunk of examples, the counterfactual tests, the sanity
check) through `attnaudit.analyses.store.ItemStore` under OUT/.attnaudit/, so an interrupted run loses at
most the item in flight and `resume=True` finishes it with the same numbers.
"""
from __future__ import annotations

import json
import platform
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pandas as pd
import torch

from attnaudit.analyses.audit import AuditResult, AuditSettings, audit
from attnaudit.analyses.tables import COLUMNS
from attnaudit.analyses.report import load_results, write_report
from attnaudit.analyses.seq2seq import audit_translator
from attnaudit.analyses.store import ItemStore, check_output_dir, frame_payload, payload_frame, sha256_file, sha256_json
from attnaudit.model.checkpoint import load_model, read_config
from attnaudit.model.datasets import data_format, read_labelled
from attnaudit.model.seq2seq import Translator
from attnaudit.model.tasks import TASK_NAMES, get_task
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


# -- the jobs -------------------------------------------------------------------------------------
def _check_report_folder(out: Path, identity: dict, *, overwrite: bool, resume: bool) -> None:
    """Refuse a folder that holds other files or another model's report (unless overwrite)."""
    check_output_dir(out)
    if overwrite or not out.is_dir():
        return
    present = sorted(p.name for p in out.iterdir() if p.name != ".attnaudit")
    if not present:
        return
    how = "pass --overwrite to replace it, or choose another --out"
    if "results.json" not in present:
        raise ValueError(f"--out {str(out)!r} is not empty ({', '.join(present[:4])}) and holds no attnaudit report; {how}.")
    try:
        old = load_results(out)["results"].get("settings", {}).get("identity")
    except (ValueError, OSError) as e:
        raise ValueError(f"--out {str(out)!r} holds a results.json that cannot be read ({e}); {how}.") from e
    if old != json.loads(json.dumps(identity)):
        raise ValueError(f"--out {str(out)!r} holds the report of different models or settings; {how}.")


def _audit_all(jobs: list[tuple[str, object, list, dict]], settings: AuditSettings, out: Path, *, identity: dict,
               resume: bool, overwrite: bool, progress: bool, echo) -> dict[str, AuditResult]:
    results = {}
    fingerprint = {"identity": identity, "models": {t: card["checkpoint"]["sha256"] for t, _, _, card in jobs}}
    with ItemStore(out, fingerprint=fingerprint, resume=resume, overwrite=overwrite) as store:
        for task, model, examples, card in jobs:
            n = min(len(examples), settings.max_examples or len(examples))
            echo(f"{task}: explaining and analysing {n} examples with {len(settings.explainers)} explainers"
                 + (f" (the first {n} of {len(examples)}: raise max_examples in [audit] for more)" if n < len(examples) else ""))
            if isinstance(model, Translator):
                results[task] = _audit_translator(model, examples, settings, store_runner(store, task))
            else:
                results[task] = audit(model, examples, settings, progress=progress, runner=store_runner(store, task))
            if results[task].settings.get("n_truncated"):
                echo(f"{task}: note: {results[task].settings['n_truncated']} examples were longer than the model's "
                     f"{model.max_len} positions and were cut (marked \"truncated\" in examples.jsonl; a model trained "
                     "with a larger max_len takes them whole)")
        failures = store.failures()
    if failures:
        raise ItemsFailed(failures)
    return results


def _audit_translator(model, examples, settings: AuditSettings, run) -> AuditResult:
    """The encoder-decoder's analyses (attnaudit.analyses.seq2seq), as one saved item, in AuditResult form."""
    examples = list(examples)[: settings.max_examples]
    start = time.perf_counter()
    out = run("seq2seq", lambda: audit_translator(model, examples, seed=settings.seed, max_batch=settings.max_batch,
                                                  n_permutations=settings.n_permutations))
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


def _write(out: Path, results: dict[str, AuditResult], cards: dict, settings: dict, timings: dict, title: str) -> Path:
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
        model_cards=cards, settings=settings, timings=timings, title=title)


def _provenance(settings: AuditSettings, device) -> dict:
    """What reproducing the tables needs besides the settings (versions are in results.json's "versions")."""
    return {"seed": settings.seed, "device": str(device), "deterministic": torch.are_deterministic_algorithms_enabled()}


def run_job(out: str | Path = "reports/default", *, quick: bool = False, config=None, device: str | None = None,
            runs: str | Path | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
            echo: Callable[[str], None] = print) -> Path:
    """`attnaudit run`: for each task train (or reuse) its model, audit it, and write one report -> out."""
    plan = plan_run(quick=quick, config=config, device=device, runs=runs)
    out = Path(out)
    identity = {"tasks": {t: plan.train[t].to_dict() for t in plan.tasks}, "audit": plan.audit.to_dict()}
    _check_report_folder(out, identity, overwrite=overwrite, resume=resume)
    dev = resolve_device(plan.device)
    started = time.perf_counter()
    jobs, cards, timings = [], {}, {}
    for task in plan.tasks:
        folder = model_folder(plan.runs, task, plan.train[task])
        model, metrics, seconds = trained_model(task, plan.train[task], folder, device=plan.device, progress=progress, echo=echo)
        timings[f"{task}.train"] = round(seconds, 2) if seconds is not None else 0.0
        examples = task_examples(task, plan.train[task])["test"]
        cards[task] = model_card(model, folder, metrics, train_seconds=seconds, device=dev)
        jobs.append((task, model, examples, cards[task]))
    results = _audit_all(jobs, plan.audit, out, identity=identity, resume=resume, overwrite=overwrite,
                         progress=progress, echo=echo)
    for task, r in results.items():
        timings.update({f"{task}.{k}": round(v, 2) for k, v in r.timings.items()})
    timings["total"] = round(time.perf_counter() - started, 2)
    settings = {"quick": plan.quick, **_provenance(plan.audit, dev), "threads": torch.get_num_threads(),
                "platform": platform.platform(), "audit": plan.audit.to_dict(), "identity": identity,
                "policy": plan.audit.policy, "n_examples": {t: r.settings["n_examples"] for t, r in results.items()},
                "n_truncated": {t: r.settings.get("n_truncated", 0) for t, r in results.items()}}
    title = "Can attention explain these models' outputs? The built-in tasks" + (" (quick run)" if plan.quick else "")
    return _write(out, results, cards, settings, timings, title)


def analyze_job(model_dir: str | Path, out: str | Path, *, task: str | None = None, data=None,
                text_col: str | None = None, label_col: str | None = None, config=None, device: str | None = None,
                max_examples: int | None = None, name: str | None = None, title: str | None = None,
                resume: bool = False, overwrite: bool = False, progress: bool = True,
                echo: Callable[[str], None] = print) -> Path:
    """`attnaudit analyze`: audit a trained model on a built-in task's test split or the user's file -> out.

    `data` may be a table (text_col, label_col), an ERASER annotation file or a HateXplain file (their human
    rationales feed the plausibility tables). `max_examples` overrides [audit] max_examples; `name` labels
    the data in the report (default: the file's name), `title` heads it.
    """
    if (task is None) == (data is None):
        raise ValueError(f"pass exactly one of --task ({', '.join(TASK_NAMES)}) or --data FILE; "
                         f"got {'both' if task is not None else 'neither'}.")
    if data is not None and (not text_col or not label_col) and data_format(data) == "table":
        raise ValueError(f"--data needs --text-col and --label-col (the columns of {Path(data).name} to use).")
    plan = plan_run(config=config, device=device)
    if max_examples is not None:
        plan = replace(plan, audit=plan.audit.with_(max_examples=max_examples))
    out, folder = Path(out), Path(model_dir)
    dev = resolve_device(plan.device)
    model = load_model(folder, device=dev)
    if task is not None:
        settings = defaults_for(task).replace(seed=plan.audit.seed)
        examples, name, data_hash = task_examples(task, settings)["test"], name or task, sha256_json(settings.to_dict())
    else:
        loaded = read_labelled(data, text_col=text_col, label_col=label_col, label_names=tuple(model.label_names))
        examples, data_hash = loaded.examples, sha256_file(Path(data))
        name = name or Path(data).name.split(".")[0]
    identity = {"model": sha256_file(folder / "model.safetensors"), "data": data_hash, "audit": plan.audit.to_dict()}
    _check_report_folder(out, identity, overwrite=overwrite, resume=resume)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8")) if (folder / "metrics.json").is_file() else {}
    card = model_card(model, folder, metrics, train_seconds=None, device=dev)
    card["data"] = name
    if data is not None:
        card["data_source"] = {"path": str(Path(data)), "sha256": data_hash, **loaded.info}
    started = time.perf_counter()
    results = _audit_all([(name, model, examples, card)], plan.audit, out, identity=identity, resume=resume,
                         overwrite=overwrite, progress=progress, echo=echo)
    timings = {f"{name}.{k}": round(v, 2) for k, v in results[name].timings.items()}
    timings["total"] = round(time.perf_counter() - started, 2)
    settings = {**_provenance(plan.audit, dev), "audit": plan.audit.to_dict(), "identity": identity,
                "policy": plan.audit.policy, "n_examples": {name: results[name].settings["n_examples"]},
                "n_truncated": {name: results[name].settings.get("n_truncated", 0)}}
    return _write(out, results, {name: card}, settings, timings,
                  title or f"Can attention explain this model's outputs? {name}")
