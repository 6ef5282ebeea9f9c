"""How fast is our exact attention flow against two baselines: one plain scipy max flow per pair, and the
paper's reference (one networkx Edmonds–Karp max flow per pair)?

Abnar & Zuidema 2020 compute attention flow with one `networkx.maximum_flow_value` per (output, input) pair
on the layered attention graph. The obvious faster call is one `scipy.sparse.csgraph.maximum_flow` (Dinic) per
pair on the same whole graph, capacities rounded to integers × 1e9 (so about 1e-9 off per cut edge, not
exact). For random patterns (softmax of 2·N(0, 1) scores, 4 heads) at 6 layers and n = 64 and 128 tokens, this
script times, interleaved over --rounds rounds: our `max_flows` for all n inputs of the [CLS] output; the scipy
baseline for all n inputs (the graph built once per output, one call per input); networkx on --pairs inputs
per round (extrapolated × n per output). It prints medians, ranges, ratios of medians and largest differences.
Then it times `Flow` on a tiny 6-layer model at batch 64 × n = 32.

    OMP_NUM_THREADS=1 python benchmarks/flow_speed.py [--rounds 5] [--pairs 1] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
from networkx.algorithms.flow import edmonds_karp
from scipy.sparse.csgraph import maximum_flow

from attnaudit.explain import get_explainer
from attnaudit.explain.flow import max_flows
from attnaudit.explain.rollout import residual_attention
from attnaudit.model.interface import TextClassifier
from attnaudit.model.transformer import TransformerClassifier, TransformerConfig
from attnaudit.model.vocab import Vocab

SCIPY_SCALE = 1e9


def random_patterns(n_layers: int, n_heads: int, n: int, *, seed: int) -> torch.Tensor:
    """Softmax of Gaussian scores (std 2) -> [layer, batch=1, head, query, key] in float64."""
    g = torch.Generator().manual_seed(seed)
    scores = 2.0 * torch.randn(n_layers, 1, n_heads, n, n, generator=g, dtype=torch.float64)
    return scores.softmax(-1)


def reference_graph(a_hat: np.ndarray) -> nx.DiGraph:
    """The paper's layered graph: node (l, i) for l in 0..L; edge (l+1, q) -> (l, k) with capacity Â_l[q, k]."""
    n_layers, n, _ = a_hat.shape
    graph = nx.DiGraph()
    for layer in range(n_layers):
        for q in range(n):
            for k in range(n):
                graph.add_edge((layer + 1, q), (layer, k), capacity=float(a_hat[layer, q, k]))
    return graph


def scipy_flows(a_hat: np.ndarray, output: int) -> np.ndarray:
    """The obvious scipy call: the whole (L+1)·n-node graph, integer capacities round(Â · 1e9), one Dinic
    `maximum_flow` per input -> [n]. Node (l, i) is (L - l)·n + i, so the outputs come first."""
    n_layers, n, _ = a_hat.shape
    q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    rows = np.concatenate([(n_layers - l - 1) * n + q.ravel() for l in range(n_layers)])
    cols = np.concatenate([(n_layers - l) * n + k.ravel() for l in range(n_layers)])
    caps = np.round(np.concatenate([a_hat[l].ravel() for l in range(n_layers)]) * SCIPY_SCALE).astype(np.int32)
    size = (n_layers + 1) * n
    graph = sp.csr_array((caps, (rows, cols)), shape=(size, size))
    return np.array([maximum_flow(graph, output, n_layers * n + k, method="dinic").flow_value
                     for k in range(n)]) / SCIPY_SCALE


def tiny_model(n_layers: int, n_heads: int, d_model: int, max_len: int, seed: int) -> TextClassifier:
    torch.manual_seed(seed)
    vocab = Vocab.build(["the a film plot was not good bad great boring and with story actor"])
    cfg = TransformerConfig(vocab_size=len(vocab), n_classes=2, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                            d_ff=2 * d_model, dropout=0.0, max_len=max_len)
    return TextClassifier(TransformerClassifier(cfg), vocab, label_names=["neg", "pos"])


def spread(values: list[float], unit: float = 1e3) -> str:
    return f"median {np.median(values) * unit:.1f} (range {min(values) * unit:.1f}-{max(values) * unit:.1f})"


def compare(n_layers: int, n_heads: int, n: int, *, rounds: int, pairs: int, seed: int) -> None:
    a_hat = residual_attention(random_patterns(n_layers, n_heads, n, seed=seed))[:, 0].numpy()   # [layer, q, k]
    max_flows(a_hat[:, :8, :8], [0])                                              # warm the imports
    graph = reference_graph(a_hat)
    rng = np.random.default_rng(seed)
    t_ours, t_scipy, t_nx, ref = [], [], [], {}
    ours = baseline = None
    for _ in range(rounds):                                                       # interleaved: ours, scipy, nx
        start = time.perf_counter()
        ours = max_flows(a_hat, [0])[0][0]                                        # [n], tol = 1e-7 (the default)
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        baseline = scipy_flows(a_hat, 0)
        t_scipy.append(time.perf_counter() - start)
        for k in rng.choice(n, pairs, replace=False):
            start = time.perf_counter()
            ref[int(k)] = nx.maximum_flow_value(graph, (n_layers, 0), (0, int(k)), flow_func=edmonds_karp)
            t_nx.append((time.perf_counter() - start) * n)                         # extrapolated per output
    exact = max_flows(a_hat, [0], tol=1e-12)[0][0]
    print(f"{n_layers} layers, n = {n} tokens, {n_heads} heads, seed {seed}; ms per output ([CLS] to all {n} "
          f"inputs), {rounds} interleaved rounds:")
    print(f"  ours (max_flows, tol 1e-7)            {spread(t_ours)}")
    print(f"  scipy maximum_flow per pair (×1e9)     {spread(t_scipy)}   ours is "
          f"{np.median(t_scipy) / np.median(t_ours):.2f}x faster (ratio of medians)")
    print(f"  networkx edmonds_karp, {len(t_nx)} pairs × {n}  {spread(t_nx)}   ours is "
          f"{np.median(t_nx) / np.median(t_ours):.0f}x faster (EXTRAPOLATED from single pairs)")
    print(f"  largest |ours - networkx| over {len(ref)} pairs: tol 1e-7 "
          f"{max(abs(ours[k] - v) for k, v in ref.items()):.1e}, tol 1e-12 "
          f"{max(abs(exact[k] - v) for k, v in ref.items()):.1e}; largest |ours - scipy ×1e9| over all {n}: "
          f"{np.abs(ours - baseline).max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=1, help="networkx pairs per round (slow: seconds each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for n in (64, 128):
        compare(6, 4, n, rounds=args.rounds, pairs=args.pairs, seed=args.seed)

    n_layers, n_heads, batch, length = 6, 4, 64, 32
    model = tiny_model(n_layers, n_heads, 32, length + 2, args.seed)
    rng = np.random.default_rng(args.seed)
    words = "the a film plot was not good bad great boring and with story actor".split()
    texts = [" ".join(rng.choice(words, length - 2)) for _ in range(batch)]
    attr = get_explainer("flow").explain(model, texts)
    print(f"Flow.explain on a tiny {n_layers}-layer model, batch {batch} x n = {length}: {attr.seconds:.2f} s, "
          f"{attr.seconds / batch * 1e3:.1f} ms per example (largest certified gap {float(attr.extras['flow_gap'].max()):.1e})")


if __name__ == "__main__":
    main()
