"""The report folder's files: compact layout, deterministic gzip, one JSON-lines reader, older folders
converted, and the folder swapped in whole (a full disk leaves the previous report and .attnaudit/ as they were)."""
from __future__ import annotations

import errno
import gzip
import json
from pathlib import Path

import pytest
from test_report import synthetic_report_inputs

from attnaudit.analyses import report_files
from attnaudit.analyses.report import load_results, read_json_lines, render_report, write_report
from attnaudit.analyses.report_files import ReportWriteError, parse_json_lines

SEPARATORS = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e"      # str.splitlines splits on each of these


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def staging_left(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.fixture(scope="module")
def inputs():
    return synthetic_report_inputs(n=8, hostile=False)


def test_json_lines_split_on_newline_only():
    text = "".join(json.dumps({"id": f"a{c}b", "text": f"x{c}y"}, ensure_ascii=False) + "\n" for c in SEPARATORS)
    rows = parse_json_lines(text)
    assert [r["id"] for r in rows] == [f"a{c}b" for c in SEPARATORS]
    assert len(text.splitlines()) > len(rows)                       # what the old reader tripped on
    with pytest.raises(ValueError, match="line 2 must be one JSON value"):
        parse_json_lines('{"a": 1}\n{"a": \n')


@pytest.mark.slow
def test_separators_in_ids_texts_and_labels_round_trip(tmp_path, inputs):
    odd = {ex["id"]: f"ex{SEPARATORS}{i}" for i, ex in enumerate(inputs["examples"])}
    metrics = inputs["metrics"].assign(example_id=inputs["metrics"]["example_id"].map(odd))
    records = [{**r, "id": odd[r["id"]], "text": r["text"] + SEPARATORS,
                "tokens": [t + "\u2028" for t in r["tokens"]]} for r in inputs["attributions"]]
    examples = [{**x, "id": odd[x["id"]], "label": f"lab{SEPARATORS}"} for x in inputs["examples"]]
    out = write_report(tmp_path / "r", **{**inputs, "metrics": metrics, "attributions": records, "examples": examples,
                                         "curves": None, "counterfactual": None})
    loaded = load_results(out)
    assert {x["id"] for x in loaded["examples"]} == set(odd.values())
    assert {x["label"] for x in loaded["examples"]} == {f"lab{SEPARATORS}"}
    assert set(loaded["metrics"]["example_id"]) == set(odd.values())
    assert all(t.endswith("\u2028") for r in read_json_lines(out / "attributions.jsonl.gz") for t in r["tokens"])
    render_report(out)                                              # `attnaudit report` on that folder
    assert not any(c in line for line in (out / "report.md").read_text().split("\n") for c in SEPARATORS)


@pytest.mark.slow
def test_compressed_tables_are_deterministic_and_small(tmp_path, inputs):
    a, b = write_report(tmp_path / "a", **inputs), write_report(tmp_path / "b", **inputs)
    for name in ("metrics.csv.gz", "examples.jsonl.gz", "attributions.jsonl.gz"):
        data = (a / name).read_bytes()
        assert data == (b / name).read_bytes(), name
        assert data[3] == 0 and data[4:8] == b"\0\0\0\0"         # no FNAME flag, mtime 0
    res = json.loads((a / "results.json").read_text())
    shown = {r["id"] for r in read_json_lines(a / "attributions.jsonl.gz")}
    assert len(shown) < 8 and res["tables"]["attributions.jsonl.gz"] == f"sampled: the {len(shown)} examples the report shows (of 8)"
    assert "curves.csv.gz" not in res["tables"] and res["tables"]["curves_mean.csv"].startswith("full")
    sizes = {k: len(v) for k, v in tree(a).items()}
    assert sum(sizes.values()) < 1_000_000 and sizes["index.html"] < 600_000, sizes


@pytest.mark.slow
def test_full_tables_keep_every_record_and_curve(tmp_path, inputs):
    out = write_report(tmp_path / "r", **inputs, full_tables=True)
    res = json.loads((out / "results.json").read_text())
    assert res["tables"]["attributions.jsonl.gz"] == "full" and res["tables"]["curves.csv.gz"] == "full"
    assert len(read_json_lines(out / "attributions.jsonl.gz")) == len(inputs["attributions"])
    assert len(load_results(out)["curves"]) == len(inputs["curves"])
    before = tree(out)
    render_report(out)                                              # default: keeps what the folder has
    assert tree(out) == before
    render_report(out, full_tables=False)
    assert "curves.csv.gz" not in tree(out)


OLD_NAMES = {"gold_average_precision": "gold_auprc", "rationale_average_precision": "rationale_auprc"}


def to_version_1(folder: Path) -> None:
    """Rewrite a full-tables folder in the older layout: plain CSV/JSONL, no derived tables, no "tables", and the
    measures' old names (average precision as *_auprc, tau_loo without a setting)."""
    for name in ("metrics.csv.gz", "curves.csv.gz", "attributions.jsonl.gz", "examples.jsonl.gz"):
        (folder / name[:-3]).write_bytes(gzip.decompress((folder / name).read_bytes()))
        (folder / name).unlink()
    metrics = report_files.read_guarded_csv(folder / "metrics.csv")
    assert {"gold_average_precision", "tau_loo"} <= set(metrics["metric"])
    metrics = metrics[~metrics["metric"].isin(["gold_auprc", "rationale_auprc"])]      # not measured then
    metrics["metric"] = metrics["metric"].replace(OLD_NAMES)
    metrics.loc[metrics["metric"] == "tau_loo", "setting"] = ""
    (folder / "metrics.csv").write_text(report_files.guarded_csv(metrics))
    for name in ("agreement.csv", "curves_mean.csv"):
        (folder / name).unlink()
    res = json.loads((folder / "results.json").read_text())
    res.pop("tables")
    res.update(format_version=1, files=["metrics.csv", "curves.csv", "attributions.jsonl", "examples.jsonl"])
    (folder / "results.json").write_text(json.dumps(res))


@pytest.mark.slow
def test_older_folders_are_read_and_converted(tmp_path, inputs):
    sampled = write_report(tmp_path / "new", **inputs)
    out = write_report(tmp_path / "old", **inputs, full_tables=True)
    to_version_1(out)
    (out / ".attnaudit").mkdir()
    (out / ".attnaudit" / "manifest.json").write_text('{"items": {}}')
    (out / "notes.txt").write_text("mine")
    old = load_results(out)
    assert len(old["attributions"]) == len(inputs["attributions"]) and len(old["curves"]) == len(inputs["curves"])
    render_report(out, reverdict=True)
    names = {p.name for p in out.iterdir()}
    assert not names & {"metrics.csv", "curves.csv", "attributions.jsonl", "examples.jsonl"}      # superseded
    assert names == {p.name for p in sampled.iterdir()} | {".attnaudit", "notes.txt"}
    assert (out / ".attnaudit" / "manifest.json").read_text() == '{"items": {}}' and (out / "notes.txt").read_text() == "mine"
    for name in ("attributions.jsonl.gz", "agreement.csv", "curves_mean.csv", "attention.json"):
        assert (out / name).read_bytes() == (sampled / name).read_bytes(), name
    upgraded, fresh = (report_files.read_guarded_csv(f / "metrics.csv.gz") for f in (out, sampled))
    measured_then = ~fresh["metric"].isin(["gold_auprc", "rationale_auprc"])   # the trapezoid AUPRC is new
    assert upgraded.equals(fresh[measured_then].reset_index(drop=True))         # names and settings upgraded
    new, res = json.loads((out / "results.json").read_text()), json.loads((sampled / "results.json").read_text())
    assert new["tables"] == res["tables"] and new["format_version"] == report_files.FORMAT_VERSION == 4
    assert [(v["answer"], v["paragraph"]) for v in new["verdicts"].values()] == \
        [(v["answer"], v["paragraph"]) for v in res["verdicts"].values()]     # derived again from metrics.csv
    assert staging_left(out) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
@pytest.mark.slow
def test_a_full_disk_leaves_the_previous_report(tmp_path, inputs, monkeypatch, exchange):
    out = write_report(tmp_path / "r", **inputs)
    (out / ".attnaudit").mkdir()
    (out / ".attnaudit" / "item.json").write_text("resume data")
    before = tree(out)
    if not exchange:
        monkeypatch.setattr(report_files, "_exchange", lambda a, b: False)
    real, calls = report_files._write_file, []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == 4:                                         # part way through the new folder
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(report_files, "_write_file", full_disk)
    with pytest.raises(ReportWriteError) as info:
        write_report(out, **{**inputs, "title": "another title"})
    message = str(info.value)
    assert str(out) in message and "No space left on device" in message and "errno 28" in message
    assert "MB free there" in message and "available" in message and "\n" not in message
    assert info.value.errno == errno.ENOSPC
    assert tree(out) == before                                      # index.html, results.json, .attnaudit/: unchanged
    assert staging_left(out) == []
    monkeypatch.setattr(report_files, "_write_file", real)
    write_report(out, **{**inputs, "title": "another title"})      # and with space, the swap carries .attnaudit/ over
    assert "another title" in (out / "index.html").read_text()
    assert (out / ".attnaudit" / "item.json").read_text() == "resume data" and staging_left(out) == []


def test_a_label_is_shown_once():
    from attnaudit.analyses.report_files import label_text

    assert label_text(1, ["negative", "positive"]) == "positive (1)"
    assert label_text(1, ["0", "1"]) == 1                          # not "1 (1)"
    assert label_text("spam", ["ham", "spam"]) == "spam" and label_text(True, ["a", "b"]) is True


@pytest.mark.slow
def test_attnaudit_report_converts_an_older_folder(tmp_path, inputs, capsys):
    from conftest import cli_run

    out = write_report(tmp_path / "r", **inputs, full_tables=True)
    to_version_1(out)
    code, stdout, err = cli_run(capsys, "report", out, "--reverdict", "--full-tables")
    assert code == 0, err
    assert stdout.strip() == f"report written to {out / 'index.html'}"
    res = json.loads((out / "results.json").read_text())
    assert res["tables"]["attributions.jsonl.gz"] == "full" and "curves.csv.gz" in res["files"]
    assert not (out / "metrics.csv").exists() and (out / "metrics.csv.gz").is_file()
    code, _, err = cli_run(capsys, "report", tmp_path / "nowhere")
    assert code != 0 and "results.json" in err


def test_a_format_3_folder_gets_the_adversarial_settings_every_earlier_audit_ran_with():
    audit = {"policy": "mask", "adversarial_steps": 40}
    res = {"format": report_files.FORMAT, "format_version": 3,
           "settings": {"audit": dict(audit), "identity": {"audit": dict(audit, n_adversaries=7)}}}
    files = {"results.json": json.dumps(res).encode("utf-8"), "metrics.csv.gz": b"kept as it is"}
    out, upgraded = report_files.upgrade(files)
    new = json.loads(out["results.json"])
    assert upgraded and new["format_version"] == report_files.FORMAT_VERSION and out["metrics.csv.gz"] == b"kept as it is"
    assert new["settings"]["audit"] == {**audit, "n_adversaries": 1, "adversarial_lr": 0.1}
    assert new["settings"]["identity"]["audit"] == {**audit, "n_adversaries": 7, "adversarial_lr": 0.1}   # kept
    assert report_files.LEGACY_AUDIT == {"n_adversaries": 1, "adversarial_lr": 0.1}
    again, upgraded = report_files.upgrade(out)
    assert not upgraded and again == out
