"""What `attnaudit run` does: the built-in plan (or --quick), a TOML file's choices on top, and the run's identity.

    plan = plan_run(quick=True, config="my.toml")       # RunPlan(tasks, train, audit, runs, device, quick)
    run_identity(plan)                                  # what decides the numbers: training and audit settings
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import tomllib

from attnaudit.analyses.audit import AuditSettings
from attnaudit.data.tasks import TASK_NAMES
from attnaudit.model.train import TrainSettings, defaults_for, resolve_device

DEFAULT_TASKS = ("keywords", "needle", "majority", "reorder", "recall", "copy")
QUICK_TRAIN = {"keywords": dict(n_train=6000, epochs=6), "needle": dict(n_train=2000, epochs=3),
               "majority": dict(n_train=2000, epochs=3), "reorder": dict(n_train=4000, epochs=4),
               "recall": dict(n_train=8000, epochs=6), "copy": dict(n_train=8000, epochs=4)}
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



def run_identity(plan: RunPlan) -> dict:
    """What decides `attnaudit run`'s numbers: each task's training settings and the audit settings."""
    return {"tasks": {t: plan.train[t].to_dict() for t in plan.tasks}, "audit": plan.audit.to_dict()}
