"""The attention view in a real headless Chromium (selenium + chromedriver) and in a Jupyter kernel (nbclient).

The browser tests click a head off, change the layer, click a model-view cell and hover a token, and check
the drawn lines against the counts worked out from the payload in Python; the browser log must hold no
message and the performance log no request but the page itself. Skipped without chromium, chromedriver
or selenium; the notebook test without nbclient/ipykernel.
"""
from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from attnaudit.analyses.attention_view import attention_panel, render_page

pytestmark = pytest.mark.slow  # a real headless Chromium and a Jupyter kernel
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
HOSTILE = '</script><img src=x onerror="alert(1)">'


def peaky(n_layers, n_heads, n_q, n_k, seed) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(n_layers, n_heads, n_q, n_k)) * 3
    a = np.exp(logits - logits.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)                                        # [layer, head, query, key]


def expected_lines(panel, layer: int, heads, rows: int = 48) -> int:
    """Edges of these heads at this layer inside the first window of rows (what the script must draw)."""
    q = np.frombuffer(base64.b64decode(panel["edges"]["q"]), "<u2")
    k = np.frombuffer(base64.b64decode(panel["edges"]["k"]), "<u2")
    start = np.frombuffer(base64.b64decode(panel["edges"]["start"]), "<u4")
    n = 0
    for h in heads:
        c = layer * panel["n_heads"] + h
        n += int(((q[start[c]:start[c + 1]] < rows) & (k[start[c]:start[c + 1]] < rows)).sum())
    return n


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extras: pip install -e '.[test]'")
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver).")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,1600"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def open_page(driver, path, timeout: float = 20.0):
    driver.get_log("browser"), driver.get_log("performance")                    # start both logs empty
    driver.get(path.resolve().as_uri())
    end = time.time() + timeout
    while time.time() < end:
        states = driver.execute_script("return [...document.querySelectorAll('div.aav')].map(b => b.dataset.aavState)")
        if states and all(s in ("ready", "failed") for s in states):
            return states
        time.sleep(0.05)
    raise AssertionError(f"the views did not finish drawing in {timeout} s: {states}")


def requests_made(driver, page) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return [u for u in urls if u != page.resolve().as_uri() and not u.startswith("data:")]   # data: images are inline


def lines(driver) -> list[tuple[int, int, int]]:
    return [tuple(map(int, t)) for t in driver.execute_script(
        "return [...document.querySelectorAll('div.aav svg.aav-svg line')].map(l => [l.dataset.head, l.dataset.q, l.dataset.k])")]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    src = ["[CLS]", "the", HOSTILE, "film", "was", "good", "[SEP]"]
    tgt = ["[CLS]", "good", "was", "film"]
    self_panel = attention_panel(peaky(3, 4, 7, 7, seed=1), src, top_k=3, threshold=0.02)
    cross = attention_panel(peaky(3, 4, 4, 7, seed=2), tgt, src, kind="cross", name="cross-attention", top_k=3)
    evidence = {"per_head": [{"layer": 1, "head": 2, "label": "head ablation: output change (TVD)", "value": 0.125}],
                "global": [{"label": "raw attention's rank on comprehensiveness", "value": "4 of 6"}],
                "token_scores": {"tokens": src, "scores": {"rollout": [0.1, 0.5, -0.2, 0.3, 0.0, 0.9, 0.1]}}}
    path = tmp_path_factory.mktemp("view") / "view.html"
    path.write_text(render_page([self_panel, cross], evidence, title=HOSTILE, uid="v1"), encoding="utf-8")
    return path, self_panel, cross


def test_toggling_heads_and_layers_redraws_the_lines(browser, page):
    path, panel, _ = page
    assert open_page(browser, path) == ["ready"]
    d = browser
    assert lines(d) and len(lines(d)) == expected_lines(panel, 0, range(4))
    assert {h for h, _, _ in lines(d)} <= {0, 1, 2, 3}
    d.find_element("css selector", 'button.aav-hbtn[data-head="0"]').click()
    assert 0 not in {h for h, _, _ in lines(d)}
    assert len(lines(d)) == expected_lines(panel, 0, [1, 2, 3])
    assert d.find_element("css selector", "div.aav").get_attribute("data-heads") == "1,2,3"
    before = set(lines(d))
    from selenium.webdriver.support.ui import Select

    Select(d.find_element("css selector", "select.aav-layer")).select_by_value("2")
    assert d.find_element("css selector", "div.aav").get_attribute("data-layer") == "2"
    assert len(lines(d)) == expected_lines(panel, 2, [1, 2, 3]) and set(lines(d)) != before
    d.find_element("css selector", "button.aav-none").click()
    assert lines(d) == [] and "no head selected" in d.find_element("css selector", ".aav-status").text
    assert browser.get_log("browser") == []
    assert requests_made(browser, path) == []


def test_model_view_cell_opens_in_the_head_view_with_its_evidence(browser, page):
    path, panel, _ = page
    open_page(browser, path)
    d = browser
    cells = d.find_elements("css selector", "canvas.aav-cell")
    assert len(cells) == 3 * 4
    d.find_element("css selector", 'canvas.aav-cell[data-layer="1"][data-head="2"]').click()
    box = d.find_element("css selector", "div.aav")
    assert (box.get_attribute("data-layer"), box.get_attribute("data-heads")) == ("1", "2")
    assert {h for h, _, _ in lines(d)} == {2} and len(lines(d)) == expected_lines(panel, 1, [2])
    evidence = d.find_element("css selector", ".aav-evidence").text
    assert "head ablation: output change (TVD)" in evidence and "0.125" in evidence and "4 of 6" in evidence
    assert "rollout" in evidence and len(d.find_elements("css selector", "rect.aav-score")) == 7
    d.find_element("css selector", 'canvas.aav-cell[data-layer="0"][data-head="1"]').click()
    assert "not available" in d.find_element("css selector", ".aav-evidence").text
    assert browser.get_log("browser") == []


def test_hover_highlights_a_row_and_hostile_tokens_are_text(browser, page):
    from selenium.webdriver.common.action_chains import ActionChains

    path, _, _ = page
    open_page(browser, path)
    d = browser
    tok = d.find_element("css selector", 'text.aav-tok[data-side="q"][data-i="1"]')
    ActionChains(d).move_to_element(tok).perform()
    classes = d.execute_script("return [...document.querySelectorAll('svg.aav-svg line')].map(l => [l.dataset.q, l.getAttribute('class')])")
    assert classes and all((c == "aav-hi") == (q == "1") for q, c in classes)
    shown = d.execute_script("return [...document.querySelectorAll('text.aav-tok')].map(t => t.firstChild.textContent)")
    assert HOSTILE in shown and d.find_elements("css selector", "img") == []
    assert d.execute_script("return document.querySelector('.aav-title').textContent") == HOSTILE


def test_cross_attention_is_the_same_view_with_source_keys(browser, page):
    from selenium.webdriver.support.ui import Select

    path, _, cross = page
    open_page(browser, path)
    d = browser
    Select(d.find_element("css selector", "select.aav-panel")).select_by_value("1")
    keys = d.execute_script("return [...document.querySelectorAll('text.aav-tok[data-side=k]')].map(t => t.firstChild.textContent)")
    queries = d.execute_script("return [...document.querySelectorAll('text.aav-tok[data-side=q]')].map(t => t.firstChild.textContent)")
    assert keys == cross["key_tokens"] and queries == cross["query_tokens"]
    assert len(lines(d)) == expected_lines(cross, 0, range(4))
    assert "not shown for cross-attention" in d.find_element("css selector", ".aav-evidence").text
    assert browser.get_log("browser") == []


def test_512_tokens_12_layers_12_heads_render_fast(browser, tmp_path):
    att = peaky(12, 12, 512, 512, seed=3).astype(np.float32)
    panel = attention_panel(att, [f"w{i}" for i in range(512)])
    path = tmp_path / "big.html"
    path.write_text(render_page([panel]), encoding="utf-8")
    t = time.perf_counter()
    open_page(browser, path)
    wall = time.perf_counter() - t
    box = browser.find_element("css selector", "div.aav")
    render_ms = float(box.get_attribute("data-render-ms"))
    assert render_ms < 3000 and wall < 10, (render_ms, wall)        # ~0.1 s on a quiet machine; generous when shared
    t = time.perf_counter()
    browser.find_element("css selector", 'button.aav-hbtn[data-head="5"]').click()
    assert "5" not in box.get_attribute("data-heads").split(",")
    assert time.perf_counter() - t < 2 and float(box.get_attribute("data-draw-ms")) < 1000
    status = browser.find_element("css selector", ".aav-status").text
    assert "queries 0–47 of 512" in status and "not sent to this page" in status
    q_start = browser.find_element("css selector", "input.aav-qstart")
    q_start.clear()
    q_start.send_keys("100\n")                                  # the token window moves; self-attention keys follow
    shown = browser.execute_script("return [...document.querySelectorAll('text.aav-tok')].map(t => t.dataset.side + t.dataset.i)")
    assert shown[0] == "q100" and "k100" in shown and len(shown) == 2 * 48
    assert all(100 <= q < 148 and 100 <= k < 148 for _, q, k in lines(browser))
    assert browser.get_log("browser") == []


def test_show_attention_renders_in_a_jupyter_kernel(tmp_path, browser):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is in the test extras: pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is in the test extras: pip install -e '.[test]'")
    pytest.importorskip("ipykernel", reason="ipykernel is in the test extras: pip install -e '.[test]'")
    tests = str(Path(__file__).parent)
    setup = (f"import sys, numpy as np, torch; torch.set_num_threads(1); sys.path.insert(0, {tests!r})\n"
             "from conftest import make_tiny_model\nimport attnaudit\nmodel = make_tiny_model()")
    cells = [setup, "attnaudit.show_attention(model, 'the film was not good', layer=1, head=0)",
             "a = np.full((1, 1, 2, 2), 0.5)\nattnaudit.show_attention({'id': 'saved', 'tokens': ['x', 'y'], 'attention': a.tolist()})"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    errors = [o for c in nb.cells for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    shown = [o["data"]["text/html"] for c in nb.cells[1:] for o in c.outputs if o.get("output_type") == "execute_result"]
    assert len(shown) == 2 and all('<div class="aav" id="' in h and "<script>" in h for h in shown)
    ids = [h.split('<div class="aav" id="')[1].split('"')[0] for h in shown]
    assert ids[0] != ids[1]
    # the two outputs on one page, as a notebook shows them: both draw, neither clashes with the other
    path = tmp_path / "notebook.html"
    path.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + "".join(shown) + "</body></html>")
    assert open_page(browser, path) == ["ready", "ready"]
    assert browser.get_log("browser") == []


def test_the_report_page_runs_its_view_under_its_csp(browser, tmp_path):
    from test_report import SCRIPT_TOKEN, synthetic_report_inputs

    from attnaudit.analyses.report import write_report

    page = write_report(tmp_path / "r", **synthetic_report_inputs(n=6)) / "index.html"
    assert open_page(browser, page) == ["ready"]                  # a wrong hash would leave it unstarted and log
    assert browser.get_log("browser") == [] and requests_made(browser, page) == []
    assert browser.execute_script("return document.title").endswith(SCRIPT_TOKEN)   # the title stayed text
    before = len(lines(browser))
    browser.find_element("css selector", 'canvas.aav-cell[data-layer="1"][data-head="0"]').click()
    assert {h for h, _, _ in lines(browser)} <= {0} and len(lines(browser)) < before
    text = browser.find_element("css selector", ".aav-evidence").text
    assert "uniform attention" in text and "Head ablation (run the audit with the head_ablation test): not available" in text


# -- a report of several tasks: one view each, an Example choice in each -----------------------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two tiny classifier audits and a reorder audit in one report -> (index.html, {task: its view's JSON})."""
    import re

    from conftest import make_tiny_model
    from test_attention_examples import FAST, make_examples, tiny_translator

    from attnaudit.analyses.audit import AuditSettings, audit
    from attnaudit.analyses.seq2seq import audit_translator
    from attnaudit.data.tasks import make_examples as task_examples
    from attnaudit.jobs.report_folder import write_results
    from attnaudit.jobs.runner import _audit_translator

    pairs = task_examples("reorder", "test", n=8, seed=0)
    translator = tiny_translator(pairs)
    item = audit_translator(translator, pairs, explainers=("attention",), n_permutations=1, tests=("head_ablation",),
                            sanity_examples=0)
    results = {"keywords": audit(make_tiny_model(0), make_examples(12, 0, "k"), **FAST),
               "needle": audit(make_tiny_model(1), make_examples(12, 1, "n"), **FAST),
               "reorder": _audit_translator(translator, pairs, AuditSettings(), lambda name, compute: item)}
    out = write_results(tmp_path_factory.mktemp("report") / "r", results, {}, {}, {}, "Attention " + HOSTILE)
    page = out / "index.html"
    blocks = re.findall(r'<div class="aav" id="([^"]+)">.*?class="aav-data">(.*?)</script>', page.read_text(), re.S)
    return page, {uid: json.loads(data) for uid, data in blocks}


def view_lines(driver, uid: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, t)) for t in driver.execute_script(
        "return [...document.querySelectorAll('#' + arguments[0] + ' svg.aav-svg line')]"
        ".map(l => [l.dataset.head, l.dataset.q, l.dataset.k])", uid)]


def view_tokens(driver, uid: str, side: str) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#' + arguments[0] + ' text.aav-tok[data-side='"
                                 " + arguments[1] + ']')].map(t => t.firstChild.textContent)", uid, side)


def test_a_head_toggled_in_the_second_view_redraws_only_that_view(browser, report):
    from selenium.webdriver.support.ui import Select

    page, data = report
    first, second, _ = data
    assert open_page(browser, page) == ["ready"] * 3
    d = browser
    before_first, before_second = view_lines(d, first), view_lines(d, second)
    p0 = data[second]["panels"][0]
    assert before_second and len(before_second) == expected_lines(p0, 0, range(2))
    d.find_element("css selector", f'#{second} button.aav-hbtn[data-head="0"]').click()
    assert view_lines(d, first) == before_first                  # the first view did not move
    assert {h for h, _, _ in view_lines(d, second)} == {1} and len(view_lines(d, second)) == expected_lines(p0, 0, [1])
    # another example in the second view: its panel, the same layer and heads, its own token scores
    Select(d.find_element("css selector", f"#{second} select.aav-example")).select_by_value("1")
    p1 = data[second]["panels"][1]
    box = d.find_element("css selector", f"#{second}")
    assert (box.get_attribute("data-example"), box.get_attribute("data-heads")) == (p1["example"], "1")
    assert view_tokens(d, second, "q") == p1["query_tokens"] and len(view_lines(d, second)) == expected_lines(p1, 0, [1])
    assert len(d.find_elements("css selector", f"#{second} rect.aav-score")) == len(p1["query_tokens"])   # rollout
    options = [o.text for o in Select(d.find_element("css selector", f"#{second} select.aav-example")).options]
    assert options == [p["example_label"] for p in data[second]["panels"]]
    assert view_lines(d, first) == before_first
    assert browser.get_log("browser") == [] and requests_made(browser, page) == []


def test_the_reorder_view_opens_on_the_cross_attention_of_each_example(browser, report):
    from selenium.webdriver.support.ui import Select

    page, data = report
    uid = [u for u in data if u.endswith("reorder")][0]
    panels = data[uid]["panels"]
    open_page(browser, page)
    d = browser
    box = d.find_element("css selector", f"#{uid}")
    assert box.get_attribute("data-panel") == "0" and panels[0]["kind"] == "cross"
    assert view_tokens(d, uid, "k") == panels[0]["key_tokens"] and view_tokens(d, uid, "q") == panels[0]["query_tokens"]
    assert len(view_lines(d, uid)) == expected_lines(panels[0], 0, range(2))
    assert "head ablation: output change (TVD)" in d.find_element("css selector", f"#{uid} .aav-evidence").text
    kinds = [panels[int(o.get_attribute("value"))]["kind"]
             for o in Select(d.find_element("css selector", f"#{uid} select.aav-panel")).options]
    assert kinds == ["cross", "self", "causal"]                  # the first example's three
    Select(d.find_element("css selector", f"#{uid} select.aav-example")).select_by_value("1")
    second = next(i for i, p in enumerate(panels) if p["example"] != panels[0]["example"] and p["kind"] == "cross")
    assert box.get_attribute("data-panel") == str(second)        # the same kind of attention, the next example
    assert view_tokens(d, uid, "k") == panels[second]["key_tokens"]
    Select(d.find_element("css selector", f"#{uid} select.aav-panel")).select_by_value(str(second + 1))
    assert panels[second + 1]["kind"] == "self" and "Head-level tests" in d.find_element(
        "css selector", f"#{uid} .aav-evidence").text          # the cross heads' figures are not the encoder's
    assert browser.get_log("browser") == [] and requests_made(browser, page) == []
