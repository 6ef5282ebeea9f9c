"""The report folder's data files: their names, encodings, the JSON-lines reader, and the atomic folder swap.

    files = compact(full_files, full_tables=False)    # {name: bytes}: old or new layout in, new layout out
    data = load_files(files)                          # the tables and records the pages are drawn from
    commit_folder("reports/x", {**files, **pages})   # all of it appears at once, or nothing changes

Layout (format_version 2 and 3; 3 renamed measures, `upgrade`). Per-example tables are gzip-compressed (mtime 0, no file name: same table,
same bytes): metrics.csv.gz (always every row: `attnaudit report --reverdict` derives the verdicts from it),
examples.jsonl.gz, attributions.jsonl.gz (the examples the report shows, or every record when
full_tables) and curves.csv.gz (per-example curves, only when full_tables). Small tables stay plain:
counterfactual.csv, counterfactual_permutation.csv, comparisons.csv, curves_mean.csv (mean and standard
error per explainer, curve and fraction: what the curve figure draws), agreement.csv (Kendall τ and
Spearman ρ between explainers, mean and bootstrap interval over all examples: what the agreement figure draws) and attention.json (the attention of the
shown examples, each one's first ATTENTION_POSITIONS positions, 3 decimals; `analyses.attention_examples`). results.json's "tables" says which are full
and which sampled. Version-1 folders (plain metrics.csv, curves.csv, attributions.jsonl, examples.jsonl,
every attention example in full) are read too, and `compact` turns them into this layout.

CSV cells that start with = + - @ (formula triggers) get a leading '. JSON lines are split on "\\n" only:
str.splitlines would also split inside a text holding U+2028, U+0085 or \\x1c, which json.dumps
(ensure_ascii=False) leaves raw.

`commit_folder` writes every file into a hidden sibling folder, then swaps it in (renameat2
RENAME_EXCHANGE where Linux has it, else rename aside + rename in), carrying over what is not a report file
(the `.attnaudit/` item store of resumable runs, anything the user put there). On an OSError (a full disk)
the sibling is removed and the old folder is left as it was.
"""
from __future__ import annotations

import ctypes
import errno
import gzip
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from attnaudit.analyses import figures as F
from attnaudit.analyses.agreement import agreement_table, from_mean_tau
from attnaudit.analyses.schema import normalize_setting
from attnaudit.core.io import DIR_MODE, fsync_folder, is_temp_name, jsonable

FORMAT, FORMAT_VERSION = "attnaudit-report", 4
# audit settings that format 4 added, with the values every earlier audit ran with (the adversarial search of 1
# adversary at Adam lr 0.1): `upgrade` writes them into an older folder's settings, so its settings say what ran
LEGACY_AUDIT = {"n_adversaries": 1, "adversarial_lr": 0.1}
# format_version 3 renamed measures (issue 16): what versions 1-2 called gold_auprc / rationale_auprc was ERASER's
# average_precision, and tau_loo rows had no setting; `upgrade` renames them so old reports read as new ones
RENAMED_METRICS = {"gold_auprc": "gold_average_precision", "rationale_auprc": "rationale_average_precision"}
CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "'")   # "'" too, so that guarding can be undone exactly
N_EXAMPLES = 3              # correctly and incorrectly classified examples shown per task
ATTENTION_POSITIONS = 48    # positions of the attention example that the figures draw
ATTENTION_DECIMALS = 3
# key -> (file name in this layout, file name in format_version 1, text columns)
TABLES = {"metrics": ("metrics.csv.gz", "metrics.csv"), "counterfactual": ("counterfactual.csv", "counterfactual.csv"),
          "permutation": ("counterfactual_permutation.csv", "counterfactual_permutation.csv"),
          "curves": ("curves.csv.gz", "curves.csv"), "curves_mean": ("curves_mean.csv", None),
          "comparisons": ("comparisons.csv", "comparisons.csv"), "agreement": ("agreement.csv", None)}
RECORDS = {"attributions": ("attributions.jsonl.gz", "attributions.jsonl"), "examples": ("examples.jsonl.gz", "examples.jsonl")}
PAGES = ("index.html", "report.md", "results.json")
REPORT_NAMES = ({n for pair in [*TABLES.values(), *RECORDS.values()] for n in pair if n}
                | {"attention.json", "figures", *PAGES})
TEXT_COLUMNS = ("task", "example_id", "explainer", "metric", "setting", "note", "test", "layer", "head", "statistic",
                "curve", "vs", "reference", "reference_explainer", "verdict", "other")


class ReportWriteError(OSError):
    """The report folder could not be written; the previous one is unchanged. str() is the one-line message."""

    def __str__(self) -> str:
        return str(self.strerror)


# -- encodings -----------------------------------------------------------------------------------
def gzip_bytes(data: bytes) -> bytes:
    """gzip with mtime 0 and no file name in the header: the same data gives the same bytes."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def guard_cell(value):
    """A text cell that a spreadsheet would run as a formula gets a leading ' (OWASP CSV injection)."""
    return "'" + value if isinstance(value, str) and value.startswith(CSV_TRIGGERS) else value


def unguard_cell(value):
    return value[1:] if isinstance(value, str) and len(value) > 1 and value[0] == "'" and value[1:].startswith(CSV_TRIGGERS) else value


def guarded_csv(frame: pd.DataFrame) -> str:
    """CSV text with every text cell guarded (numbers are left as numbers, to 6 significant digits)."""
    f = frame.copy()
    for c in f.columns:
        if f[c].dtype == object or pd.api.types.is_string_dtype(f[c]):
            f[c] = f[c].map(guard_cell)
    f.columns = [guard_cell(str(c)) for c in f.columns]
    return f.to_csv(index=False, lineterminator="\n", float_format="%.6g")   # 6 significant digits: plenty, and small


def read_guarded_csv(path, text_columns: Sequence[str] = TEXT_COLUMNS) -> pd.DataFrame:
    """A CSV written by `guarded_csv` (plain or .gz) -> DataFrame with the guards taken off."""
    return _csv_frame(Path(path).read_bytes(), str(path).endswith(".gz"), text_columns)


def _csv_frame(data: bytes, gz: bool, text_columns: Sequence[str] = TEXT_COLUMNS) -> pd.DataFrame:
    raw = gzip.decompress(data) if gz else data
    cols = pd.read_csv(io.BytesIO(raw), nrows=0).columns
    frame = pd.read_csv(io.BytesIO(raw), dtype={c: str for c in cols if c in text_columns}, keep_default_na=False,
                        na_values=[""])
    for c in frame.columns:
        if frame[c].dtype == object or pd.api.types.is_string_dtype(frame[c]):
            frame[c] = frame[c].map(unguard_cell)
    return frame


def dumps(x) -> str:
    return json.dumps(jsonable(x), ensure_ascii=False, allow_nan=False)


def json_lines_text(rows) -> str:
    return "".join(dumps(r) + "\n" for r in rows)


def parse_json_lines(text: str, *, name: str = "JSON lines") -> list:
    """One JSON value per "\\n"-terminated line (blank lines skipped). Never str.splitlines: a value may hold
    U+2028, U+2029, U+0085 or \\x0b-\\x0c, \\x1c-\\x1e raw, and those are not line ends here."""
    out = []
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} line {i} must be one JSON value; {e.msg} at column {e.colno}.") from e
    return out


def read_json_lines(path) -> list:
    """A .jsonl or .jsonl.gz file -> list of values (see `parse_json_lines`)."""
    data = Path(path).read_bytes()
    return parse_json_lines((gzip.decompress(data) if str(path).endswith(".gz") else data).decode("utf-8"), name=str(path))


# -- reading a folder ----------------------------------------------------------------------------
def read_folder(out: Path) -> dict[str, bytes]:
    """The data files of a report folder (either layout) -> {name: bytes}; results.json must be there."""
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"out_dir must be a folder written by write_report (with results.json); "
                                f"{str(path)!r} does not exist.")
    names = REPORT_NAMES - {"figures", "index.html", "report.md"}
    return {n: (out / n).read_bytes() for n in sorted(names) if (out / n).is_file()}


def _pick(files: Mapping[str, bytes], new: str, old: str | None):
    for name in (new, old):
        if name and name in files:
            return name, files[name]
    return None, None


def load_files(files: Mapping[str, bytes]) -> dict:
    """{name: bytes} of either layout -> {"results": dict, "metrics", "counterfactual", "permutation", "curves",
    "curves_mean", "comparisons", "agreement": DataFrame or None, "attributions", "examples", "attention": lists}.
    A folder of format_version 1-2 is read with this version's names (`upgrade`)."""
    files = upgrade(files)[0]
    results = json.loads(files["results.json"].decode("utf-8"))
    if results.get("format") != FORMAT:
        raise ValueError(f"results.json must have format {FORMAT!r}; got {results.get('format')!r}.")
    loaded = {"results": results}
    for key, (new, old) in TABLES.items():
        name, data = _pick(files, new, old)
        frame = None if data is None else _csv_frame(data, name.endswith(".gz"))
        if frame is not None and "setting" in frame.columns:
            frame = normalize_setting(frame)
        loaded[key] = frame
    for key, (new, old) in RECORDS.items():
        name, data = _pick(files, new, old)
        text = "" if data is None else (gzip.decompress(data) if name.endswith(".gz") else data).decode("utf-8")
        loaded[key] = parse_json_lines(text, name=name or key)
    loaded["attention"] = json.loads(files["attention.json"].decode("utf-8")) if "attention.json" in files else []
    return loaded


def upgrade(files: Mapping[str, bytes]) -> tuple[dict[str, bytes], bool]:
    """Data files of format_version 1-3 -> their names in this version, and whether anything was upgraded.

    Format 3: the audit settings (settings.audit and settings.identity.audit) get `LEGACY_AUDIT`'s values for the
    settings they lack. Formats 1-2, before that:

    In the metrics and comparisons tables: gold_auprc and rationale_auprc (which held average precision) become
    `RENAMED_METRICS`' names, so no old value stands under the name of ERASER's trapezoid AUPRC; tau_loo rows get
    the setting `tables.tau_loo_setting` of the audit's policy (results.json settings.audit.policy, else "mask").
    agreement.csv's mean Kendall τ (column tau) becomes measure kendall_tau of `analyses.agreement.COLUMNS`, its
    interval unknown.
    The tables are re-encoded as the writer encodes them; results.json says FORMAT_VERSION. Its summaries and
    verdicts still hold the old names: derive them again (`render_report` does, with reverdict).
    """
    from attnaudit.analyses.tables import tau_loo_setting

    res = json.loads(files["results.json"].decode("utf-8"))
    version = int(res.get("format_version", 1))
    if res.get("format") != FORMAT or version >= FORMAT_VERSION:
        return dict(files), False
    settings = res.get("settings") or {}
    for audit in (settings.get("audit"), (settings.get("identity") or {}).get("audit")):
        if isinstance(audit, dict):
            for key, value in LEGACY_AUDIT.items():
                audit.setdefault(key, value)
    out = dict(files)
    if version < 3:
        _upgrade_names(files, out, tau_loo_setting(str((settings.get("audit") or {}).get("policy") or "mask")))
    res["format_version"] = FORMAT_VERSION
    out["results.json"] = json.dumps(jsonable(res), indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return out, True


def _upgrade_names(files: Mapping[str, bytes], out: dict[str, bytes], setting: str) -> None:
    """Format 1-2 -> 3 in `out`: the renamed measures, tau_loo's setting and the agreement table (see upgrade)."""
    for key in ("metrics", "comparisons"):
        name, raw = _pick(files, *TABLES[key])
        if raw is None:
            continue
        gz = name.endswith(".gz")
        frame = _csv_frame(raw, gz)
        frame["metric"] = frame["metric"].replace(RENAMED_METRICS)
        tau = (frame["metric"] == "tau_loo") & frame["setting"].fillna("").eq("")
        frame.loc[tau, "setting"] = setting
        text = guarded_csv(frame).encode("utf-8")
        out[name] = gzip_bytes(text) if gz else text
    name, raw = _pick(files, *TABLES["agreement"])
    if raw is not None:
        frame = _csv_frame(raw, False)
        if "tau" in frame.columns:
            out[name] = guarded_csv(from_mean_tau(frame)).encode("utf-8")


def load_results(out_dir) -> dict:
    """The saved report data (either layout) -> the dict of `load_files`."""
    return load_files(read_folder(Path(out_dir)))


# -- which examples the report shows ---------------------------------------------------------------
def label_text(x, names) -> str:
    """A label once: its name (with the index when the name differs from it), or the value itself."""
    if names and isinstance(x, int) and not isinstance(x, bool) and 0 <= x < len(names) and str(names[x]) != str(x):
        return f"{names[x]} ({x})"
    return x


def select_examples(task: str, data: dict, card: Mapping) -> list[dict]:
    """Up to N_EXAMPLES correctly and N_EXAMPLES incorrectly classified examples with their records.

    Each item: id, status ("correct"/"incorrect"/"label unknown"), label, prediction, gold (or None), records.
    """
    by_id: dict = {}
    for r in data["attributions"]:
        if r["task"] == task:
            by_id.setdefault(str(r["id"]), []).append(r)
    info = {str(x["id"]): x for x in data["examples"] if x["task"] == task and "id" in x}
    names = card.get("label_names") if isinstance(card.get("label_names"), list) else None
    picked = {"correct": [], "incorrect": [], "label unknown": []}
    for ex_id, recs in by_id.items():
        x = info.get(ex_id, {})
        pred = x.get("prediction", recs[0].get("target"))
        gold_label = x.get("label")
        status = "label unknown" if gold_label is None or pred is None else \
            "correct" if str(gold_label) == str(pred) else "incorrect"
        if len(picked[status]) < N_EXAMPLES:
            gold = x.get("gold", x.get("rationale"))
            if all("words" in r for r in recs):          # sub-word models: show whitespace words
                gold = x.get("word_gold")
                recs = [{**r, "tokens": r["words"], "scores": r["word_scores"], "special": [False] * len(r["words"])}
                        for r in recs]
            picked[status].append(dict(id=ex_id, status=status, label=label_text(gold_label, names),
                                       prediction=label_text(pred, names), prob=recs[0].get("prob"), gold=gold,
                                       records=recs))
    return picked["correct"] + picked["incorrect"] + picked["label unknown"]


# -- the compact layout ----------------------------------------------------------------------------
def compact(files: Mapping[str, bytes], *, full_tables: bool) -> dict[str, bytes]:
    """Data files of either layout -> this layout's data files (results.json updated: files, tables, format).

    Full tables (metrics, examples, counterfactual, comparisons) are re-encoded byte for byte; the figures'
    inputs (curves_mean.csv, agreement.csv) are derived from the per-example data where it is present, else
    kept; attributions are cut to the shown examples unless full_tables; attention to what is drawn.
    """
    data = load_files(files)
    res = data["results"]
    out: dict[str, bytes] = {}
    tables: dict[str, str] = {}
    for key in ("metrics", "counterfactual", "permutation", "comparisons"):
        new, old = TABLES[key]
        name, raw = _pick(files, new, old)
        if raw is not None:
            text = gzip.decompress(raw) if name.endswith(".gz") else raw
            out[new] = gzip_bytes(text) if new.endswith(".gz") else text
            tables[new] = "full"
    curves = data["curves"]
    if curves is not None:
        out["curves_mean.csv"] = guarded_csv(F.curve_means(curves)).encode("utf-8")
        if full_tables:
            out["curves.csv.gz"] = gzip_bytes(guarded_csv(curves).encode("utf-8"))
    elif data["curves_mean"] is not None:
        out["curves_mean.csv"] = files["curves_mean.csv"]
    if "curves_mean.csv" in out:
        tables["curves_mean.csv"] = "full: mean, standard error and n per task, explainer, curve and fraction"
    if "curves.csv.gz" in out:
        tables["curves.csv.gz"] = "full"
    records = data["attributions"]
    before = res.get("tables", {}).get("attributions.jsonl.gz", "full")    # version 1 kept every record
    if data["agreement"] is not None:
        out["agreement.csv"] = files["agreement.csv"]
    elif records:
        out["agreement.csv"] = guarded_csv(agreement_table(records)).encode("utf-8")
    if "agreement.csv" in out:
        tables["agreement.csv"] = ("full: Kendall tau and Spearman rho between explainers per example: mean and 95% "
                                   "bootstrap interval over all examples, per task")
    if data["examples"]:
        out["examples.jsonl.gz"] = gzip_bytes(json_lines_text(data["examples"]).encode("utf-8"))
        tables["examples.jsonl.gz"] = "full"
    if records:
        shown = {(t, ex["id"]) for t in res["tasks"]
                 for ex in select_examples(t, data, res.get("model_cards", {}).get(t) or {})}
        keep = records if full_tables else [r for r in records if (r["task"], str(r["id"])) in shown]
        out["attributions.jsonl.gz"] = gzip_bytes(json_lines_text(keep).encode("utf-8"))
        n_all = len({(r["task"], str(r["id"])) for r in records})
        tables["attributions.jsonl.gz"] = (before if before != "full" else "full" if full_tables else
                                           f"sampled: the {len(shown)} examples the report shows (of {n_all})")
    attention = compact_attention(data["attention"])
    if attention:                           # no spaces: a sixth smaller, now that it holds every shown example
        out["attention.json"] = json.dumps(jsonable(attention), ensure_ascii=False, allow_nan=False,
                                           separators=(",", ":")).encode("utf-8")
        tables["attention.json"] = (f"sampled: the attention of the examples the report shows, their first "
                                    f"{ATTENTION_POSITIONS} positions, {ATTENTION_DECIMALS} decimals")
    res = {**res, "format_version": FORMAT_VERSION, "tables": tables,
           "files": sorted(out) + ["results.json", "index.html", "report.md", "figures/"]}
    out["results.json"] = json.dumps(jsonable(res), indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return out


def compact_attention(items: Sequence[dict]) -> list[dict]:
    """Every attention example (each task's shown ones; one per task and id), cut to the first ATTENTION_POSITIONS
    positions of each side and rounded to ATTENTION_DECIMALS. A folder of one example per task reads the same."""
    out, seen = [], set()
    for a in items:
        key = (a.get("task"), str(a.get("id")))
        if key in seen:
            continue
        seen.add(key)
        att = np.asarray(a["attention"], dtype=float)                  # [layer, head, query, key]
        n, nk = min(att.shape[2], ATTENTION_POSITIONS), min(att.shape[3], ATTENTION_POSITIONS)
        cut = lambda x, q, k: np.round(np.asarray(x, dtype=float)[:, :, :q, :k], ATTENTION_DECIMALS).tolist()  # noqa: E731
        one = {**a, "tokens": list(a["tokens"])[:n], "n_positions": int(a.get("n_positions", att.shape[2])),
               "attention": cut(att, n, nk)}
        if a.get("key_tokens"):
            one["key_tokens"] = list(a["key_tokens"])[:nk]
        if "target_tokens" in a:                                       # an encoder–decoder's (`attention_examples`)
            m = min(len(a["target_tokens"]), ATTENTION_POSITIONS)
            one.update(target_tokens=list(a["target_tokens"])[:m],
                       n_target_positions=int(a.get("n_target_positions", len(a["target_tokens"]))))
            for name, k in (("decoder_attention", m), ("cross_attention", n)):
                if name in a:
                    one[name] = cut(a[name], m, k)
        out.append(one)
    return out


# -- writing the folder at once --------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    """A plain write (mode `attnaudit.core.io.FILE_MODE`): the staging folder is invisible until the swap."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def commit_folder(out, files: Mapping[str, bytes]) -> Path:
    """Make `out` hold exactly `files` ({relative name: bytes}) plus what it held that is not a report file.

    The files go into a hidden sibling folder first; the swap is one rename where the kernel can exchange
    two paths. On an OSError while writing, the sibling is removed, `out` is untouched and a
    ReportWriteError names the path, the error and the space needed against the space free.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir must be a folder; got {str(out)!r}, which is an existing file.")
    if out.is_symlink():
        out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    need = sum(len(b) for b in files.values())
    stage = None
    try:
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".new"))
        os.chmod(stage, DIR_MODE)                   # mkdtemp makes 0700
        for name in sorted(files):
            path = stage / name
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_file(path, files[name])
        fsync_folder(stage)
    except OSError as e:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        raise _write_error(out, e, need) from e
    try:
        if not out.exists():
            os.rename(stage, out)
            fsync_folder(out.parent)
            return out
        aside = _swap(stage, out)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise _write_error(out, e, need) from e
    try:
        for item in sorted(aside.iterdir()):        # .attnaudit/ (resume data) and the user's own files
            if item.name not in REPORT_NAMES and not is_temp_name(item.name) and not (out / item.name).exists():
                os.rename(item, out / item.name)
    except OSError as e:
        raise ReportWriteError(e.errno, f"the new report is in {str(out)!r}, but moving {item.name!r} over from the "
                               f"previous one failed ({e.strerror}); it is still in {str(aside)!r}.") from e
    shutil.rmtree(aside, ignore_errors=True)
    fsync_folder(out.parent)
    return out


def _write_error(out: Path, e: OSError, need: int) -> ReportWriteError:
    """One line: the folder, the error, the space needed against the space free (for a full disk), what is kept."""
    space = ""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
        space = f"; it needs about {_mb(need)} free there and {_mb(free)} are available"
    kept = " and its .attnaudit/ are" if (out / ".attnaudit").exists() else " is"
    return ReportWriteError(e.errno, f"could not write the report folder {str(out)!r}: {e.strerror or e} (errno "
                                     f"{e.errno}){space}. The previous report{kept} unchanged.")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE) -> False where that is unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(stage: Path, out: Path) -> Path:
    """Put `stage` at `out` -> where the previous `out` now is (to be emptied by the caller)."""
    if _exchange(stage, out):
        return stage
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.rmdir(aside)
    os.rename(out, aside)
    try:
        os.rename(stage, out)
    except OSError:
        os.rename(aside, out)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return aside


__all__ = ["FORMAT", "FORMAT_VERSION", "RENAMED_METRICS", "upgrade", "TABLES", "RECORDS", "REPORT_NAMES", "ReportWriteError", "gzip_bytes",
           "guard_cell", "unguard_cell", "guarded_csv", "read_guarded_csv", "parse_json_lines", "read_json_lines",
           "json_lines_text", "dumps", "read_folder", "load_files", "load_results", "select_examples", "label_text",
           "compact", "compact_attention", "commit_folder"]
