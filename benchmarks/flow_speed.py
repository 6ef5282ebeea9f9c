"""How fast is our exact attention flow against the reference (one networkx Edmonds–Karp max flow per pair)?

Abnar & Zuidema 2020 compute attention flow with one `networkx.maximum_flow_value` per (output, input) pair
on the layered attention graph. This script builds random patterns at 6 layers and n = 64 tokens, runs the
reference on a handful of ([CLS], input) pairs and our `flow` on all 64 inputs of the [CLS] output, on the
same capacities, and prints both times, the speed-up and the largest difference. Then it times `Flow` on a
tiny 6-layer model at batch 64 × n = 32.

    python benchmarks/flow_speed.py [--pairs 4] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import networkx as nx
import numpy as np
import torch
from networkx.algorithms.flow import edmonds_karp

from attnaudit.explain import get_explainer
from attnaudit.explain.flow import flow
from attnaudit.explain.rollout import residual_attention
from attnaudit.model.interface import TextClassifier
from attnaudit.model.transformer import TransformerClassifier, TransformerConfig
from attnaudit.model.vocab import Vocab


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


def tiny_model(n_layers: int, n_heads: int, d_model: int, max_len: int, seed: int) -> TextClassifier:
    torch.manual_seed(seed)
    vocab = Vocab.build(["the a film plot was not good bad great boring and with story actor"])
    cfg = TransformerConfig(vocab_size=len(vocab), n_classes=2, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                            d_ff=2 * d_model, dropout=0.0, max_len=max_len)
    return TextClassifier(TransformerClassifier(cfg), vocab, label_names=["neg", "pos"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="(CLS, input) pairs to run the slow reference on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_layers, n_heads, n = 6, 4, 64
    torch.set_num_threads(1)

    patterns = random_patterns(n_layers, n_heads, n, seed=args.seed)              # [layer, 1, head, query, key]
    a_hat = residual_attention(patterns)[:, 0].numpy()                            # [layer, query, key], same Â
    ours = {}
    for tol in (1e-7, 1e-12):
        flow(patterns[:, :, :, :8, :8], tol=tol)                                  # warm the imports and caches
        start = time.perf_counter()
        ours[tol] = flow(patterns, tol=tol)[0].numpy()                            # [key]: all 64 inputs of [CLS]
        ours[f"t{tol}"] = time.perf_counter() - start

    graph = reference_graph(a_hat)
    inputs = np.linspace(0, n - 1, args.pairs).round().astype(int)
    ref, spent = {}, []
    for k in inputs:
        start = time.perf_counter()
        ref[k] = nx.maximum_flow_value(graph, (n_layers, 0), (0, int(k)), flow_func=edmonds_karp)
        spent.append(time.perf_counter() - start)
    per_output = float(np.mean(spent)) * n                                        # extrapolated to all n inputs

    print(f"attention flow, {n_layers} layers, n = {n} tokens, {n_heads} heads (random softmax patterns, seed {args.seed})")
    print(f"reference: networkx.maximum_flow_value(flow_func=edmonds_karp), one call per (output, input) pair")
    print(f"  measured on {len(inputs)} ([CLS], input) pairs {inputs.tolist()}: "
          f"{np.mean(spent):.3f} s per pair (min {min(spent):.3f}, max {max(spent):.3f})")
    print(f"  per output token (all {n} inputs), EXTRAPOLATED as {n} x mean pair time: {per_output:.1f} s")
    for tol in (1e-7, 1e-12):
        diff = max(abs(ours[tol][k] - ref[k]) for k in inputs)
        print(f"ours (tol={tol:g}): all {n} inputs of the [CLS] output in {ours[f't{tol}'] * 1e3:.1f} ms; "
              f"speed-up {per_output / ours[f't{tol}']:.0f}x; largest |ours - reference| over the "
              f"{len(inputs)} shared pairs: {diff:.2e}")

    batch, length = 64, 32
    model = tiny_model(n_layers, n_heads, 32, length + 2, args.seed)
    rng = np.random.default_rng(args.seed)
    words = "the a film plot was not good bad great boring and with story actor".split()
    texts = [" ".join(rng.choice(words, length - 2)) for _ in range(batch)]
    attr = get_explainer("flow").explain(model, texts)
    print(f"Flow.explain on a tiny {n_layers}-layer model, batch {batch} x n = {length}: {attr.seconds:.2f} s, "
          f"{attr.seconds / batch * 1e3:.1f} ms per example (largest certified gap {float(attr.extras['flow_gap'].max()):.1e})")


if __name__ == "__main__":
    main()
