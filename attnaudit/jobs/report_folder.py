"""The report folder a job writes: refused when it holds other files or another model's report, and written
from the jobs' audit results (`attnaudit.analyses.report.write_report`).

    stale = check_report_folder(out, identity, overwrite=False, resume=False)   # ValueError when it is not ours
    write_results(out, results, cards, settings, timings, title)                # tables, figures, index.html
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from attnaudit.analyses.audit import AuditResult
from attnaudit.analyses.report import write_report
from attnaudit.jobs.store import check_output_dir, differences, short_repr

BUILTIN_TITLE = "Can attention explain these models' outputs? The built-in tasks"


def check_report_folder(out: Path, identity: dict, *, overwrite: bool, resume: bool,
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


def write_results(out: Path, results: dict[str, AuditResult], cards: dict, settings: dict, timings: dict,
                  title: str, *, full_tables: bool = False) -> Path:
    """One report folder of every task's AuditResult (each table and record gains a task column) -> out."""
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
        attention_examples=[{**a, "task": t} for t, r in results.items() for a in r.saved_attention()],
        model_cards=cards, settings=settings, timings=timings, title=title, full_tables=full_tables,
        forwards={t: r.forwards for t, r in results.items() if r.forwards} or None)
