"""A report from hostile examples: texts, tokens, ids and labels holding line separators (U+2028, U+2029,
U+0085), `</script>`, an <img onerror> and a spreadsheet formula. It must render, stay inert in a real
browser, guard every CSV cell and escape every Markdown cell."""
from __future__ import annotations

import csv
import gzip
import io
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import HtmlCollect, assert_only_own_scripts
from test_report import synthetic_report_inputs

from attnaudit.analyses.report import render_report, write_report

pytestmark = pytest.mark.slow  # the module's report takes tens of seconds to write; one test drives Chromium
SCRIPT = "</script><script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
FORMULA = '=HYPERLINK("http://x","y")'
SEPARATORS = "\u2028\u2029\u0085"
HOSTILE = [SCRIPT, IMG, FORMULA, f"a{SEPARATORS}b", f"{FORMULA}{SEPARATORS}{IMG}"]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def hostile_inputs() -> dict:
    inputs = synthetic_report_inputs(n=8, hostile=False)
    ids = {x["id"]: f"{HOSTILE[i % len(HOSTILE)]}#{i}" for i, x in enumerate(inputs["examples"])}
    inputs["metrics"] = inputs["metrics"].assign(example_id=inputs["metrics"]["example_id"].map(ids))
    inputs["curves"] = inputs["curves"].assign(example_id=inputs["curves"]["example_id"].map(ids))
    perm = inputs["counterfactual"]["permutation"]
    inputs["counterfactual"] = {**inputs["counterfactual"], "permutation": perm.assign(example_id=perm["example_id"].map(ids))}
    records = []
    for r in inputs["attributions"]:
        toks = list(r["tokens"])
        for j, h in enumerate(HOSTILE, start=1):
            if j < len(toks):
                toks[j] = h
        records.append({**r, "id": ids[r["id"]], "tokens": toks, "text": " ".join(HOSTILE)})
    inputs["attributions"] = records
    inputs["examples"] = [{**x, "id": ids[x["id"]], "label": HOSTILE[i % len(HOSTILE)] if i % 2 else x["label"],
                           "text": " ".join(HOSTILE)} for i, x in enumerate(inputs["examples"])]
    card = inputs["model_cards"]["keywords"]
    inputs["model_cards"] = {"keywords": {**card, "data": f"{FORMULA} {IMG}", "label_names": [SCRIPT, f"pos{SEPARATORS}"]}}
    inputs["title"] = f"Hostile {SCRIPT} {IMG} {SEPARATORS}"
    return inputs


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = write_report(tmp_path_factory.mktemp("hostile") / "r", **hostile_inputs())
    render_report(out)                                  # `attnaudit report` on it works too
    return out


def assert_inert(markup: str) -> None:
    page = HtmlCollect(markup)
    assert_only_own_scripts(markup)
    assert all((a.get("src") or "").startswith("data:image/png;base64,") for t, a in page.tags if t == "img")
    assert not [(t, a) for t, a in page.tags if any(k.lower().startswith("on") for k in a)]
    text = "".join(page.text)
    assert SCRIPT in text and IMG in text and FORMULA in text          # shown, as text


def test_the_page_is_inert_as_written(report):
    assert_inert((report / "index.html").read_text(encoding="utf-8"))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium).")
def test_the_page_is_inert_in_a_browser(report, tmp_path):
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", report.joinpath("index.html").as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_inert(proc.stdout)                                          # the live DOM, after parsing and layout


def csv_cells(path: Path) -> list[str]:
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode("utf-8")
    return [c for row in csv.reader(io.StringIO(text, newline="")) for c in row]


def test_every_csv_cell_is_guarded(report):
    tables = sorted(p for p in report.iterdir() if p.name.endswith((".csv", ".csv.gz")))
    assert {p.name for p in tables} >= {"metrics.csv.gz", "counterfactual_permutation.csv"}
    seen = set()
    for path in tables:
        for c in csv_cells(path):
            seen.add(c)
            try:
                float(c)
            except ValueError:
                assert not c.startswith(("=", "+", "-", "@", "\t", "\r")), (path.name, c)
    assert any(c.startswith("'" + FORMULA) for c in seen)


def test_every_markdown_cell_is_escaped(report):
    text = (report / "report.md").read_text(encoding="utf-8")
    assert "<script" not in text and "<img" not in text and "onerror=alert(1)>" not in text
    assert not any(c in text for c in SEPARATORS)
    rows = [line for line in text.split("\n") if line.startswith("|")]
    assert rows
    blocks, current = [], []
    for line in text.split("\n") + [""]:
        if line.startswith("|"):
            current.append(line.replace("\\\\", "").replace("\\|", "").count("|"))
        elif current:
            blocks, current = blocks + [current], []
    assert all(len(set(b)) == 1 for b in blocks), blocks                 # no cell broke out of its row
