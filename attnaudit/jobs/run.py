"""`attnaudit run` and `attnaudit analyze`: model -> audit -> report folder.

    run_job("reports/default")                           # the built-in default: train or reuse, audit, report
    analyze_job("runs/mine", "reports/mine", data="test.csv", text_col="text", label_col="label")
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from attnaudit.analyses.audit import AuditSettings
from attnaudit.data import TASK_NAMES, LoadedSplit, data_format, parse_label_names, read_labelled
from attnaudit.data.parallel import read_parallel
from attnaudit.data.prompts import read_prompts
from attnaudit.jobs import sharding
from attnaudit.jobs.models import model_card, model_folder, trained_model
from attnaudit.jobs.plan import plan_run, run_identity
from attnaudit.jobs.report_folder import BUILTIN_TITLE, check_report_folder, write_results
from attnaudit.jobs.runner import audit_all
from attnaudit.jobs.store import sha256_file, sha256_json
from attnaudit.model.checkpoint import load_model
from attnaudit.model.interface import name_classes
from attnaudit.model.train import defaults_for, resolve_device, task_examples

# Environment variables that pin the CPU kernels (README "Reproducibility"): recorded when set.
KERNEL_PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def _provenance(settings: AuditSettings, device) -> dict:
    """What reproducing the tables needs besides the settings (versions are in results.json's "versions")."""
    return {"seed": settings.seed, "device": str(device), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{k.lower(): os.environ[k] for k in KERNEL_PINS if k in os.environ}}


@sharding.sharded
def run_job(out: str | Path = "reports/default", *, quick: bool = False, config=None, device: str | None = None,
            runs: str | Path | None = None, resume: bool = False, overwrite: bool = False, progress: bool | None = True,
            full_tables: bool = False, echo: Callable[[str], None] = print) -> Path:
    """`attnaudit run`: for each task train (or reuse) its model, audit it, and write one report -> out.

    Under torchrun the items are shared among the ranks (attnaudit.jobs.sharding); rank 0 trains missing models
    first, the others then load them; rank 0 writes the report."""
    echo = echo if sharding.is_main() else (lambda _: None)
    plan = plan_run(quick=quick, config=config, device=device, runs=runs)
    out = Path(out)
    identity = run_identity(plan)
    builtin = config is None
    stale = check_report_folder(out, identity, overwrite=overwrite, resume=resume, builtin=builtin,
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
        with sharding.main_first():             # one rank trains a missing model, the others then reuse it
            model, metrics, seconds = trained_model(task, plan.train[task], folder, device=plan.device,
                                                    progress=progress and sharding.is_main(), echo=echo)
        timings[f"{task}.train"] = round(seconds, 2) if seconds is not None else 0.0
        examples = task_examples(task, plan.train[task])["test"]
        cards[task] = model_card(model, folder, metrics, train_seconds=seconds, device=dev)
        jobs.append((task, model, examples, cards[task]))
    results = audit_all(jobs, plan.audit, out, identity=identity, resume=resume, overwrite=overwrite,
                         progress=progress, echo=echo)
    if not sharding.is_main():                      # its items are saved; rank 0 writes the report
        return out
    for task, r in results.items():
        timings.update({f"{task}.{k}": round(v, 2) for k, v in r.timings.items()})
    timings["total"] = round(time.perf_counter() - started, 2)
    settings = {"quick": plan.quick, "builtin": builtin, **_provenance(plan.audit, dev), "threads": torch.get_num_threads(),
                "platform": platform.platform(), "audit": plan.audit.to_dict(), "identity": identity,
                "policy": plan.audit.policy, "n_examples": {t: r.settings["n_examples"] for t, r in results.items()},
                "n_truncated": {t: r.settings.get("n_truncated", 0) for t, r in results.items()},
                "left_out": {t: r.settings["left_out"] for t, r in results.items() if r.settings.get("left_out")}}
    title = BUILTIN_TITLE + (" (quick run)" if plan.quick else "")
    echo(f"writing the report (tables, figures, index.html) into {out}")
    return write_results(out, results, cards, settings, timings, title, full_tables=full_tables)


@sharding.sharded
def analyze_job(model_dir: str | Path, out: str | Path, *, task: str | None = None, data=None,
                parallel=None, alignments=None, text_col: str | None = None, label_col: str | None = None, config=None, device: str | None = None,
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
    Under torchrun the items are shared among the ranks (attnaudit.jobs.sharding); rank 0 writes the report.
    """
    echo = echo if sharding.is_main() else (lambda _: None)
    given = [n for n, v in (("--task", task), ("--data", data), ("--parallel", parallel)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of --task ({', '.join(TASK_NAMES)}), --data FILE or --parallel FILE "
                         f"(an encoder-decoder's 'source ||| target' lines); got {' and '.join(given) or 'neither'}.")
    if alignments is not None and parallel is None:
        raise ValueError("--alignments goes with --parallel (gold links for its sentence pairs); got no --parallel.")
    lm = data is not None and _is_lm_folder(Path(model_dir))
    if data is not None and not lm and (not text_col or not label_col) and data_format(data) == "table":
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
    elif parallel is not None:                           # sentence pairs (and their gold alignments)
        if getattr(model, "kind", None) != "seq2seq":
            raise ValueError(f"--parallel goes with an encoder-decoder; --model {str(folder)!r} is a "
                             f"{getattr(model, 'kind', 'model')} (use --data for it).")
        examples = read_parallel(parallel, alignments=alignments)
        files = [Path(parallel)] + ([Path(alignments)] if alignments is not None else [])
        data_hash = sha256_json([sha256_file(f) for f in files])
        loaded = LoadedSplit(examples, (), {"format": "parallel", "source": str(Path(parallel)), "alignments":
                                            str(Path(alignments)) if alignments is not None else None,
                                            "n_examples": len(examples)})
        data, name = parallel, name or Path(parallel).name.split(".")[0]
    elif getattr(model, "kind", None) == "lm":          # prompts and the continuations to explain
        examples = read_prompts(data, prompt_col=text_col or "prompt")
        loaded = LoadedSplit(examples, (), {"format": "prompts", "source": str(Path(data)), "n_examples": len(examples)})
        data_hash, name = sha256_file(Path(data)), name or Path(data).name.split(".")[0]
    else:
        loaded = read_labelled(data, text_col=text_col, label_col=label_col, label_names=tuple(model.label_names))
        examples, data_hash = loaded.examples, sha256_file(Path(data))
        name = name or Path(data).name.split(".")[0]
    identity = {"model": sha256_file(folder / "model.safetensors"), "data": data_hash, "audit": plan.audit.to_dict()}
    if label_names is not None:
        identity["label_names"] = list(model.label_names)
    check_report_folder(out, identity, overwrite=overwrite, resume=resume)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8")) if (folder / "metrics.json").is_file() else {}
    card = model_card(model, folder, metrics, train_seconds=None, device=dev)
    card["data"] = name
    if untrained:
        card["untrained_weights"] = untrained
    if data is not None:
        card["data_source"] = {"path": str(Path(data)), "sha256": data_hash, **loaded.info}
    started = time.perf_counter()
    results = audit_all([(name, model, examples, card)], plan.audit, out, identity=identity, resume=resume,
                         overwrite=overwrite, progress=progress, echo=echo)
    if not sharding.is_main():                      # its items are saved; rank 0 writes the report
        return out
    timings = {f"{name}.{k}": round(v, 2) for k, v in results[name].timings.items()}
    timings["total"] = round(time.perf_counter() - started, 2)
    settings = {**_provenance(plan.audit, dev), "audit": plan.audit.to_dict(), "identity": identity,
                "policy": plan.audit.policy, "n_examples": {name: results[name].settings["n_examples"]},
                "n_truncated": {name: results[name].settings.get("n_truncated", 0)},
                "left_out": {name: results[name].settings["left_out"]} if results[name].settings.get("left_out") else {}}
    echo(f"{name}: writing the report (tables, figures, index.html) into {out}")
    return write_results(out, results, {name: card}, settings, timings,
                  title or f"Can attention explain this model's outputs? {name}", full_tables=full_tables)


def _is_lm_folder(folder: Path) -> bool:
    """Whether a model folder holds a language model (built-in kind "lm", or a HuggingFace causal-LM head)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False                                  # load_model says what is wrong with the folder
    archs = cfg.get("architectures") or []
    return cfg.get("kind") == "lm" or any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
