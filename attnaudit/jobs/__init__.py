"""The jobs behind `attnaudit run` and `attnaudit analyze`: model -> audit -> report folder.

    run_job("reports/default")                           # the built-in default: train or reuse, audit, report
    run_job("reports/quick", quick=True)                 # smaller models and samples, same pipeline
    analyze_job("runs/mine", "reports/mine", data="test.csv", text_col="text", label_col="label")

Each task's model is trained once into `runs/` (reused when a model with the same task and settings is
already there), explained and analysed by `attnaudit.analyses.audit.audit`, and all tasks go into one
report. Finished work is saved item by item (a chunk of examples, the counterfactual tests, the sanity
check) through `attnaudit.jobs.store.ItemStore` under OUT/.attnaudit/, so an interrupted run loses at
most the item in flight and `resume=True` finishes it with the same numbers.

The pieces: `plan` (RunPlan, the TOML file), `models` (runs/ folders, model cards), `runner` (the audit through
the store, sharded or not), `report_folder` (what --out may hold, writing it), `run` (the two jobs); the job
infrastructure beside them: `store` (items and manifest), `payload`, `fingerprint`, `paths`, `locks` and
`sharding` (torchrun ranks). Names are imported on first use, so `attnaudit.jobs.store` or `.sharding` alone
loads no torch.
"""
import importlib

_NAMES = {
    "run_job": "run", "analyze_job": "run", "KERNEL_PINS": "run",
    "plan_run": "plan", "read_toml": "plan", "run_identity": "plan", "RunPlan": "plan", "DEFAULT_TASKS": "plan",
    "QUICK_TRAIN": "plan", "QUICK_AUDIT": "plan",
    "model_folder": "models", "trained_model": "models", "model_card": "models",
    "BUILTIN_TITLE": "report_folder", "check_report_folder": "report_folder", "is_builtin_report": "report_folder",
    "write_results": "report_folder",
    "audit_all": "runner", "store_runner": "runner", "shard_runner": "runner", "gather_runner": "runner",
    "ItemsFailed": "runner",
}

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value                  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
