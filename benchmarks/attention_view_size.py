"""How big is the attention view's page, and how fast is it built and drawn, for a 512-token, 12-layer, 12-head example?

Builds softmax(3·Gaussian) patterns [layer=12, head=12, query=512, key=512] (peaked like trained heads),
times `attention_panel` (top-k per query, threshold, cap, quantisation, model-view pooling) and
`render_page`, and prints the page size against the float32 array it stands for. With Chromium and
selenium present it then opens the page headless and prints the script's own `performance.now()` figures,
read back from the DOM: data-render-ms (script start to first drawing) and data-draw-ms (one redraw), plus
the time of a head toggle.

    python benchmarks/attention_view_size.py [--tokens 512] [--layers 12] [--heads 12] [--top-k 8] [--no-browser]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from attnaudit.analyses.attention_view import attention_panel, render_page


def peaked(n_layers: int, n_heads: int, n: int, *, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_layers, n_heads, n, n), dtype=np.float32) * 3
    a = np.exp(a - a.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)                                       # [layer, head, query, key]


def browser_times(page: Path) -> dict[str, float] | None:
    chromium, driver_path = shutil.which("chromium") or shutil.which("google-chrome"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if not chromium or not driver_path:
        return None
    opts = Options()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        t = time.perf_counter()
        driver.get(page.resolve().as_uri())
        box = driver.find_element("css selector", "div.aav")
        while box.get_attribute("data-aav-state") != "ready":
            time.sleep(0.01)
        load = time.perf_counter() - t
        out = {"load_s": load, "render_ms": float(box.get_attribute("data-render-ms")),
               "first_draw_ms": float(box.get_attribute("data-draw-ms"))}
        t = time.perf_counter()
        driver.find_element("css selector", 'button.aav-hbtn[data-head="0"]').click()
        out["toggle_s"] = time.perf_counter() - t
        out["toggle_draw_ms"] = float(box.get_attribute("data-draw-ms"))
        return out
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()
    att = peaked(args.layers, args.heads, args.tokens, seed=args.seed)
    tokens = [f"tok{i}" for i in range(args.tokens)]
    t = time.perf_counter()
    panel = attention_panel(att, tokens, top_k=args.top_k)
    build = time.perf_counter() - t
    t = time.perf_counter()
    page = render_page([panel])
    render = time.perf_counter() - t
    kept = att.size - panel["omitted"]["total"]
    print(f"example: {args.layers} layers × {args.heads} heads × {args.tokens}² = {att.size:,} weights "
          f"({att.nbytes / 1e6:.0f} MB as float32)")
    print(f"payload build (attention_panel): {build:.2f} s; page render (render_page): {render:.3f} s")
    print(f"kept {kept:,} weights ({panel['omitted']['rule']}); page {len(page.encode()) / 1e6:.2f} MB, "
          f"of which the model-view grid {len(panel['grid']['data']) / 1e6:.2f} MB")
    if args.no_browser:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "view.html"
        path.write_text(page, encoding="utf-8")
        times = browser_times(path)
    if times is None:
        print("browser: skipped (chromium, chromedriver or selenium missing)")
    else:
        print(f"browser: script start -> first drawing {times['render_ms']:.0f} ms (of which the head view "
              f"{times['first_draw_ms']:.0f} ms); load to ready {times['load_s']:.2f} s; head toggle "
              f"{times['toggle_s'] * 1000:.0f} ms round trip ({times['toggle_draw_ms']:.0f} ms drawing)")


if __name__ == "__main__":
    main()
