"""Fit the time model behind flow's max_cells refusal: seconds ≈ C · layers^a · tokens^b.

    OMP_NUM_THREADS=1 python benchmarks/flow_cost_fit.py

Times exact flow (`attnaudit.explain.flow.flow`, one example, 4 heads of random softmax patterns, near-uniform
by default as in trained small models, where flow is slowest; FLOW_FIT_SCALE=2 for peaked ones) at a few sizes, fits log(seconds) by least squares, and prints C, a, b with each point's ratio to the fit, for
`FLOW_SECONDS` / `FLOW_GROWTH` in explain/flow.py.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from attnaudit.explain.flow import flow, flow_seconds

SCALE = float(__import__("os").environ.get("FLOW_FIT_SCALE", "0.3"))   # logits scale: 0.3 near-uniform (trained small models), 2 peaked
SIZES = [(6, 64), (6, 128), (6, 192), (12, 48), (12, 64), (12, 96), (12, 128), (8, 160)]


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for layers, n in SIZES:
        g = torch.Generator().manual_seed(0)
        patterns = (SCALE * torch.randn(layers, 1, 4, n, n, generator=g, dtype=torch.float64)).softmax(-1)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            flow(patterns)
            times.append(time.perf_counter() - start)
        rows.append((layers, n, float(np.median(times))))
        print(f"{layers:>3} layers x {n:>4} tokens: median {rows[-1][2]:.3f} s of 3; current estimate {flow_seconds(layers, n):.3f} s")
    x = np.array([[1.0, np.log(r[0]), np.log(r[1])] for r in rows])
    coef, *_ = np.linalg.lstsq(x, np.log([r[2] for r in rows]), rcond=None)
    c, a, b = float(np.exp(coef[0])), float(coef[1]), float(coef[2])
    print(f"fit: seconds ≈ {c:.2e} · layers^{a:.2f} · tokens^{b:.2f}")
    for layers, n, t in rows:
        print(f"  {layers} x {n}: measured / fit = {t / (c * layers ** a * n ** b):.2f}")
    print(f"  12 x 512 by the fit: {c * 12 ** a * 512 ** b:.0f} s")


if __name__ == "__main__":
    main()
