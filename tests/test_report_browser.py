"""The HTML report in a real headless browser (Debian's chromium): it loads with no console message and no
network request, renders something visible, and shows hostile tokens as text.

Console messages come from `--enable-logging=stderr` (lines with ":CONSOLE"); network requests from the
page come from Chrome's NetLog (`--log-net-log`): URL_REQUEST_START_JOB events whose network isolation
key is the file:// page (the browser's own background traffic has other keys). The page's CSP would also
block and log any fetch. A negative control proves the two detectors fire on a page that misbehaves.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import HtmlCollect, assert_only_own_scripts
from test_report import IMG_TOKEN, SCRIPT_TOKEN, synthetic_report_inputs

from attnaudit.analyses.report import write_report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = [pytest.mark.slow,  # a real headless Chromium, a second or more a page
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                                                          "the browser test of the HTML report is skipped.")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--window-size=1200,2000"]


def run_chromium(page: Path, tmp: Path, mode: list[str]) -> tuple[str, list[str], list[str]]:
    """Open `page` once -> (stdout, console lines, URLs the page itself requested)."""
    net = tmp / "net.json"
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--log-net-log={net}", *mode,
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, console, page_requests(net)


def page_requests(netlog: Path) -> list[str]:
    text = netlog.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:            # a NetLog cut short at exit lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [ev["params"]["url"] for ev in log["events"] if ev["type"] == start
            and "file://" in str(ev["params"].get("network_isolation_key", "")) + str(ev["params"].get("initiator", ""))]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(tmp_path_factory.mktemp("browser_report"), **synthetic_report_inputs(n=8)) / "index.html"


def test_detectors_fire_on_a_misbehaving_page(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><p>x</p><img src="http://example.invalid/x.png">'
                   "<script>console.error('boom'); undefinedFunction();</script></body></html>")
    _, console, requests = run_chromium(bad, tmp_path, ["--dump-dom"])
    assert any("boom" in line for line in console) and any("undefinedFunction" in line for line in console)
    assert requests == ["http://example.invalid/x.png"]


def test_report_loads_cleanly_and_is_not_blank(report, tmp_path):
    shot = tmp_path / "shot.png"
    _, console, requests = run_chromium(report, tmp_path, [f"--screenshot={shot}"])
    assert console == [], console
    assert requests == [], requests
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)                      # [height, width, channels] in [0, 1]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels[..., :3].std() > 0.05                         # text, tables and figures, not one colour
    assert (pixels[..., :3].mean(-1) < 0.5).mean() > 0.005      # some dark ink


def test_injected_tokens_stay_text_in_the_live_dom(report, tmp_path):
    dom, console, requests = run_chromium(report, tmp_path, ["--dump-dom"])
    assert console == [] and requests == []
    parsed = HtmlCollect(dom)
    assert_only_own_scripts(dom)
    assert all(a.get("src", "").startswith("data:image/png;base64,") for t, a in parsed.tags if t == "img")
    assert not any(k.startswith("on") for _, a in parsed.tags for k in a)
    text = "".join(parsed.text)
    assert SCRIPT_TOKEN in text and IMG_TOKEN in text
    assert np.sum([t == "meta" and a.get("http-equiv") == "Content-Security-Policy" for t, a in parsed.tags]) == 1


REPORTS = Path(__file__).resolve().parents[1] / "reports"
COMMITTED = ("default", "sst2", "sst2-minilm", "movies")


@pytest.mark.parametrize("name", COMMITTED)
def test_the_committed_reports_load_cleanly(name, tmp_path):
    """The pages the repository ships (attnaudit run; benchmarks/report_*.py): no console message, no request,
    their figures, a verdict."""
    page = REPORTS / name / "index.html"
    if not page.is_file():
        pytest.skip(f"reports/{name}/index.html is not in this checkout (its script under benchmarks/ writes it).")
    dom, console, requests = run_chromium(page, tmp_path, ["--dump-dom"])
    assert console == [] and requests == [], (console, requests)
    parsed = HtmlCollect(dom)
    images = [a for t, a in parsed.tags if t == "img"]
    # summary, per-task metrics, curves, sanity, permutation, uniform, ...: the attention PNGs are left to
    # figures/ and report.md where the interactive view shows attention
    assert len(images) >= 7 and all(a.get("src", "").startswith("data:image/png;base64,") for a in images)
    text = "".join(parsed.text)
    assert "Verdict" in text and any(w in text for w in ("YES", "PARTLY", "NO", "UNDETERMINED"))


# -- the first screen, measured in a real layout (selenium + chromedriver) ----------------------------
def chrome_driver(width: int = 1400, height: int = 900):
    """A headless Chromium under chromedriver with a viewport of exactly width × height CSS pixels."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        pytest.skip("chromedriver is not installed (apt-get install chromium-driver).")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-extensions",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


def test_verdict_and_summary_figure_are_in_the_first_screen(report, tmp_path):
    from selenium.webdriver.common.by import By

    driver = chrome_driver(1400, 900)
    try:
        driver.get(report.resolve().as_uri())
        boxes = {name: driver.find_element(By.ID, name).rect for name in ("verdict-keywords", "summary-figure")}
        image = driver.find_element(By.CSS_SELECTOR, "#summary-figure img")
        loaded = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
        driver.save_screenshot(str(tmp_path / "first-screen.png"))
        badge = driver.find_element(By.CSS_SELECTOR, "#verdict-keywords .answer").text
        order = [s.get_attribute("id") for s in driver.find_elements(By.CSS_SELECTOR, "main > section")]
    finally:
        driver.quit()
    for name, box in boxes.items():
        assert box["height"] > 0 and box["y"] >= 0 and box["y"] + box["height"] <= 900, (name, box)
    assert boxes["verdict-keywords"]["y"] < boxes["summary-figure"]["y"] and loaded > 100
    assert badge in ("YES", "PARTLY", "NO", "UNDETERMINED")
    assert order == ["verdict", "attention", "evidence", "agreement", "examples", "model"]
    import matplotlib.image

    shot = matplotlib.image.imread(tmp_path / "first-screen.png")
    assert shot.shape[:2] == (900, 1400)


def test_long_texts_wrap_instead_of_running_off(tmp_path):
    from selenium.webdriver.common.by import By

    inputs = synthetic_report_inputs(n=4, hostile=False)
    long = ["[CLS]"] + ("a rather long review that goes on and on " * 30).split()
    inputs["attributions"] = [{**r, "tokens": long, "scores": [0.0] + [0.1] * (len(long) - 1),
                               "special": [True] + [False] * (len(long) - 1)} for r in inputs["attributions"]]
    inputs["examples"] = [{**x, "gold": None} for x in inputs["examples"]]
    page = write_report(tmp_path / "long", **inputs) / "index.html"
    driver = chrome_driver(1400, 900)
    try:
        driver.get(page.resolve().as_uri())
        width = driver.execute_script("return document.documentElement.scrollWidth")
        cell = driver.find_element(By.CSS_SELECTOR, ".sent td").rect
    finally:
        driver.quit()
    assert width <= 1400 and cell["height"] > 60, (width, cell)       # many lines, no horizontal scrolling


@pytest.mark.parametrize("name", ["default", "sst2", "sst2-minilm", "movies"])
def test_each_committed_report_answers_in_the_first_screen(name):
    """At 1400 × 900: every task's verdict badge and the whole summary figure are visible without scrolling."""
    from selenium.webdriver.common.by import By

    page = REPORTS / name / "index.html"
    if not page.is_file():
        pytest.skip(f"reports/{name}/index.html is not in this checkout")
    driver = chrome_driver(1400, 900)
    try:
        driver.get(page.resolve().as_uri())
        badges = [b.rect for b in driver.find_elements(By.CSS_SELECTOR, "article.verdict .answer")]
        figure = driver.find_element(By.ID, "summary-figure").rect
    finally:
        driver.quit()
    assert badges and all(0 <= b["y"] and b["y"] + b["height"] <= 900 for b in badges), badges
    assert figure["height"] > 200 and 0 <= figure["y"] and figure["y"] + figure["height"] <= 900, figure
