"""The committed reports stay true: each one's identity equals what its command plans with today's defaults.

No model runs here. A changed default (a new AuditSettings field, a new training default) that is not
followed by regenerating the report makes these tests fail, instead of `attnaudit run` failing on a fresh
clone with "holds the report of different models or settings".
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED

from attnaudit.jobs import BUILTIN_TITLE, check_report_folder, is_builtin_report, plan_run, run_identity
from attnaudit.jobs.store import sha256_file

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "reports"
# report folder -> (its audit config under benchmarks/, the data file under ../shared/data it audits)
REAL = {"sst2": ("report_sst2.toml", "sst2/dev.tsv"),
        "sst2-minilm": ("report_sst2_minilm.toml", "sst2/dev.tsv"),
        "movies": ("report_movies.toml", "eraser_movies/test.jsonl"),
        "sst2-gpt2": ("report_sst2_gpt2.toml", "sst2/dev.tsv")}
MAX_REPORT_BYTES = 8 * 2**20    # reports/default, 19 explainers on six tasks: 7.4 MB


def _json(x):
    return json.loads(json.dumps(x))


def _results(name: str) -> dict:
    return json.loads((REPORTS / name / "results.json").read_text(encoding="utf-8"))


def test_the_default_report_is_what_run_plans_today():
    results = _results("default")
    assert results["settings"]["identity"] == _json(run_identity(plan_run())), (
        "reports/default was made with other settings than `attnaudit run` uses now: regenerate it with "
        "`attnaudit run --overwrite`")
    assert results["settings"].get("builtin") is True and results["title"].startswith(BUILTIN_TITLE)


@pytest.mark.parametrize("name", sorted(REAL))
def test_each_real_data_report_is_what_its_script_plans_today(name):
    config, _ = REAL[name]
    identity = _results(name)["settings"]["identity"]
    plan = plan_run(config=REPO / "benchmarks" / config)
    assert identity["audit"] == _json(plan.audit.to_dict()), (
        f"reports/{name} was audited with other settings than benchmarks/{config} gives now: regenerate it "
        f"with its script in benchmarks/")


@pytest.mark.parametrize("name", sorted(REAL))
def test_each_real_data_report_audited_the_shared_file(name):
    data = SHARED / "data" / REAL[name][1]
    if not data.is_file():
        pytest.skip(f"{data} is absent (../shared is not beside this checkout)")
    assert _results(name)["settings"]["identity"]["data"] == sha256_file(data)


@pytest.mark.parametrize("name", ["default", *sorted(REAL)])
def test_each_committed_report_stays_small(name):
    folder = REPORTS / name
    files = [p for p in folder.rglob("*") if p.is_file() and ".attnaudit" not in p.parts]
    size = sum(p.stat().st_size for p in files)
    biggest = max(files, key=lambda p: p.stat().st_size)
    assert size <= MAX_REPORT_BYTES, (f"reports/{name} weighs {size / 2**20:.1f} MB (limit {MAX_REPORT_BYTES / 2**20:.0f} MB); "
                                      f"the biggest file is {biggest.name} ({biggest.stat().st_size / 2**20:.1f} MB)")


# -- what `run` does with a report folder --------------------------------------------------------------
def _folder_with(tmp_path: Path, results: dict) -> Path:
    out = tmp_path / "out"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(results), encoding="utf-8")
    (out / "index.html").write_text("<p>old</p>", encoding="utf-8")
    return out


def _builtin_results(identity, **settings) -> dict:
    return {"format": "attnaudit-report", "title": BUILTIN_TITLE,
            "settings": {"quick": False, "identity": identity, **settings}}


def test_run_regenerates_its_own_stale_builtin_report(tmp_path):
    plan = plan_run()
    old = _json(run_identity(plan))
    del old["audit"]["curve_steps"]                  # as the report committed before curve_steps existed
    out = _folder_with(tmp_path, _builtin_results(old))            # no "builtin" marker: recognised by title
    assert check_report_folder(out, run_identity(plan), overwrite=False, resume=False, builtin=True) is True
    out2 = _folder_with(tmp_path / "b", _builtin_results(old, builtin=True))
    assert check_report_folder(out2, run_identity(plan), overwrite=False, resume=False, builtin=True) is True


def test_run_with_the_same_identity_proceeds_without_overwriting(tmp_path):
    plan = plan_run()
    out = _folder_with(tmp_path, _builtin_results(_json(run_identity(plan)), builtin=True))
    assert check_report_folder(out, run_identity(plan), overwrite=False, resume=False, builtin=True) is False


@pytest.mark.parametrize("case", ["config run", "analyze report", "quick report", "resume", "user run"])
def test_run_still_refuses_other_reports(tmp_path, case):
    plan = plan_run()
    old = _json(run_identity(plan))
    old["audit"]["seed"] = 7
    results = _builtin_results(old, builtin=True)
    builtin, resume = True, False
    if case == "config run":
        results["settings"]["builtin"] = False
    elif case == "analyze report":
        results = {"format": "attnaudit-report", "title": "Can attention explain this model's outputs? mine",
                   "settings": {"identity": {"model": "ab", "data": "cd", "audit": old["audit"]}}}
    elif case == "quick report":
        results["settings"]["quick"] = True
    elif case == "resume":
        resume = True
    elif case == "user run":                        # `attnaudit run --config ...` planning into a built-in report
        builtin = False
    out = _folder_with(tmp_path, results)
    with pytest.raises(ValueError, match=r"holds the report of different models or settings \(.*seed.*\); pass --overwrite"):
        check_report_folder(out, run_identity(plan), overwrite=False, resume=resume, builtin=builtin)
    assert (out / "index.html").read_text(encoding="utf-8") == "<p>old</p>"


def test_builtin_marker_wins_over_the_title():
    identity = {"tasks": {}, "audit": {}}
    assert is_builtin_report(_builtin_results(identity), quick=False)
    assert not is_builtin_report(_builtin_results(identity, builtin=False), quick=False)
    assert not is_builtin_report(_builtin_results(identity), quick=True)


@pytest.mark.parametrize("name", ["default", *sorted(REAL)])
def test_each_committed_report_draws_the_attention_of_every_example_it_shows(name):
    from attnaudit.analyses.attention_examples import shown_ids
    from attnaudit.analyses.report_files import load_results

    data = load_results(REPORTS / name)
    saved = {(a["task"], str(a["id"])) for a in data["attention"]}
    html = (REPORTS / name / "index.html").read_text(encoding="utf-8")
    for task in data["results"]["tasks"]:
        records = [r for r in data["attributions"] if r["task"] == task]
        shown = shown_ids(records, [x for x in data["examples"] if x["task"] == task])
        assert shown and {(task, i) for i in shown} <= saved, (task, shown, sorted(saved))
        for ex_id in shown:                                   # in the page's view data (escaped JSON)
            assert json.dumps(ex_id)[1:-1] in html
