"""Attention flow (Abnar & Zuidema 2020) equals networkx's maximum flow on the same layered graph."""
from __future__ import annotations

import networkx as nx
import pytest
import torch
from conftest import make_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import attnaudit.explain.flow as flow_module
from attnaudit.explain import get_explainer
from attnaudit.explain.flow import flow, flow_bounds, max_flows
from attnaudit.explain.rollout import residual_attention


def random_patterns(n_layers: int, seq: int, lengths: list[int], *, seed: int, n_heads: int = 2):
    """Softmax patterns [layer, batch, head, query, key] over each example's first `length` tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]           # [batch, seq]
    scores = 3.0 * torch.randn(n_layers, len(lengths), n_heads, seq, seq, generator=g, dtype=torch.float64)
    scores = scores.masked_fill(~mask[None, :, None, None, :], float("-inf"))
    allowed = mask[:, None, :, None] & mask[:, None, None, :]                     # [batch, 1, query, key]
    return scores.softmax(-1) * allowed, mask


def networkx_flow(a_hat: torch.Tensor, source: int, sink: int) -> float:
    """The paper's reference: the full layered graph, nodes (l, i), edges (l+1, q) -> (l, k) of capacity Â_l[q, k]."""
    n_layers, n, _ = a_hat.shape
    graph = nx.DiGraph()
    for layer in range(n_layers):
        for q in range(n):
            for k in range(n):
                graph.add_edge((layer + 1, q), (layer, k), capacity=float(a_hat[layer, q, k]))
    return nx.maximum_flow_value(graph, (n_layers, source), (0, sink))


def test_one_layer_by_hand():
    a = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    got = flow(a[None, None, None])                                               # [layer=1, batch, head, q, k]
    # one layer: the only path from [CLS] at the top to input k is the edge Â[0, k] = 0.5·A[0, k] + 0.5·[k = 0]
    torch.testing.assert_close(got[0], torch.tensor([0.75, 0.15, 0.10], dtype=torch.float64))


def test_two_layers_by_hand():
    a0 = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)               # Â_0 = [[.5, .5], [.5, .5]]
    a1 = torch.tensor([[0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)               # Â_1 row 0 = [.6, .4]
    got = flow(torch.stack([a0, a1])[:, None, None])
    # paths [CLS] -> i -> k are edge-disjoint: flow(k) = Σ_i min(Â_1[0, i], Â_0[i, k]) = min(.6,.5) + min(.4,.5)
    torch.testing.assert_close(got[0], torch.tensor([0.9, 0.9], dtype=torch.float64))


CASES = [(1, 5, [5, 3]), (2, 6, [6, 4]), (3, 5, [5, 5]), (3, 7, [7, 4]), (4, 6, [3, 6]), (5, 8, [8, 5]), (4, 9, [9, 2])]


@pytest.mark.parametrize("n_layers,seq,lengths", CASES)
def test_equals_networkx_max_flow(n_layers, seq, lengths):
    patterns, mask = random_patterns(n_layers, seq, lengths, seed=n_layers * 100 + seq)
    a_hat = residual_attention(patterns, mask)                                    # [layer, batch, query, key]
    got = flow(patterns, mask)                                                    # [batch, key]
    exact = flow(patterns, mask, tol=1e-12)
    for b, n in enumerate(lengths):
        for k in range(seq):
            want = networkx_flow(a_hat[:, b], 0, k) if k < n else 0.0             # padded inputs carry nothing
            assert abs(float(got[b, k]) - want) <= 1e-6, (b, k)
            assert abs(float(exact[b, k]) - want) <= 1e-10, (b, k)


def test_mean_readout_averages_flows_from_every_real_output():
    patterns, mask = random_patterns(3, 5, [5, 3], seed=7)
    a_hat = residual_attention(patterns, mask)
    got = flow(patterns, mask, readout="mean", tol=1e-12)
    for b, n in enumerate([5, 3]):
        want = [sum(networkx_flow(a_hat[:, b], o, k) for o in range(n)) / n for k in range(n)]
        torch.testing.assert_close(got[b, :n], torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=0)
        assert (got[b, n:] == 0).all()


def test_certified_gap_and_the_generic_path():
    a_hat = residual_attention(random_patterns(4, 10, [10], seed=3)[0])[:, 0].numpy()   # [layer, query, key]
    values, gap = max_flows(a_hat, [0, 4], tol=1e-12)
    assert values.shape == (2, 10) and gap <= 1e-12
    assert abs(values[1, 6] - networkx_flow(torch.from_numpy(a_hat), 4, 6)) <= 1e-10
    assert (values <= 1 + 1e-12).all()                                            # [CLS] sends at most 1


PRUNED_CASES = [(3, 9, [9, 6], 2, 3), (4, 12, [12, 7], 3, 5), (5, 10, [4, 10], 1, 4),
                pytest.param(6, 14, [14, 9], 4, 16, marks=pytest.mark.slow),     # the two largest: seconds each
                pytest.param(4, 20, [20, 13], 16, 16, marks=pytest.mark.slow), (3, 18, [18], 5, 1)]


@pytest.mark.parametrize("n_layers,seq,lengths,keep,per_run", PRUNED_CASES)
@pytest.mark.parametrize("sharpness", [1.0, 6.0])
def test_pruned_runs_and_their_fallback_equal_networkx(monkeypatch, n_layers, seq, lengths, keep, per_run, sharpness):
    # a small PRUNED_KEEP makes the pruned network short, so pairs go to the full network from a partial flow;
    # PAIRS_PER_RUN below n splits the inputs over several joint Dinic runs; sharp patterns leave bounds slack
    monkeypatch.setattr(flow_module, "PRUNED_KEEP", keep)
    monkeypatch.setattr(flow_module, "PAIRS_PER_RUN", per_run)
    g = torch.Generator().manual_seed(n_layers * 1000 + seq)
    patterns, mask = random_patterns(n_layers, seq, lengths, seed=n_layers * 10 + seq)
    if sharpness != 1.0:                                                          # peaked rows: few strong edges
        patterns = (sharpness * torch.randn(patterns.shape, generator=g, dtype=torch.float64)).masked_fill(
            ~mask[None, :, None, None, :], float("-inf")).softmax(-1) * mask[None, :, None, :, None]
    a_hat = residual_attention(patterns, mask)
    for tol, allowed in ((1e-7, 1e-6), (1e-12, 1e-9)):
        got = flow(patterns, mask, tol=tol)
        for b, n in enumerate(lengths):
            for k in range(seq):
                want = networkx_flow(a_hat[:, b], 0, k) if k < n else 0.0
                assert abs(float(got[b, k]) - want) <= allowed, (tol, b, k)


@settings(max_examples=25, deadline=None)
@given(n_layers=st.integers(3, 5), n=st.integers(2, 9), keep=st.integers(1, 4), seed=st.integers(0, 2**16),
       sharpness=st.sampled_from([0.5, 2.0, 8.0]))
def test_max_flows_equal_networkx_on_random_graphs(n_layers, n, keep, seed, sharpness):
    g = torch.Generator().manual_seed(seed)
    scores = sharpness * torch.randn(n_layers, 1, 1, n, n, generator=g, dtype=torch.float64)
    a_hat = residual_attention(scores.softmax(-1))[:, 0].numpy()                  # [layer, query, key]
    old = flow_module.PRUNED_KEEP
    flow_module.PRUNED_KEEP = keep
    try:
        values, gap = max_flows(a_hat, [0, n - 1], tol=1e-12)
    finally:
        flow_module.PRUNED_KEEP = old
    assert gap <= 1e-12
    bounds = [flow_bounds(a_hat, o) for o in (0, n - 1)]
    for row, o in enumerate([0, n - 1]):
        for k in range(n):
            want = networkx_flow(torch.from_numpy(a_hat), o, k)
            assert abs(values[row, k] - want) <= 1e-9, (row, k)
            assert want <= bounds[row][k] + 1e-12                                  # flow_bounds is an upper bound


def test_flow_explainer_on_a_three_layer_model(tiny_examples):
    model = make_tiny_model(n_layers=3)
    batch = model.encode(tiny_examples)
    attr = get_explainer("flow").explain(model, batch)
    assert (attr.extras["flow_gap"] <= 1e-7).all()
    single = get_explainer("flow").explain(model, batch.select([2]))
    n = int(batch.attention_mask[2].sum())
    torch.testing.assert_close(single.scores[0, :n], attr.scores[2, :n], atol=1e-6, rtol=0)


def test_flow_rejects_bad_parameters(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match="readout must be one of 'cls', 'mean'; got 'max'"):
        get_explainer("flow", readout="max").explain(tiny_model, tiny_batch)
    with pytest.raises(ValueError, match=r"tol must be a float in \(0, 1\)"):
        get_explainer("flow", tol=0).explain(tiny_model, tiny_batch)
