"""Attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", ACL), computed exactly.

The attention graph has a node per (layer boundary, token): layer 0 holds the inputs, layer L the outputs.
The edge from node (l+1, q) down to node (l, k) has capacity Â_l[q, k], the residual-augmented attention
of rollout (heads averaged, 0.5·A + 0.5·I, rows renormalised; `attnaudit.explain.rollout.residual_attention`).
The flow of input k is the maximum flow from the output node (L, cls) to the input node (0, k); the other
input nodes are not sinks. This is the paper's quantity (one `networkx.maximum_flow_value` per pair there).

How it is computed, exactly and fast (Flow's time is ~1 ms per pair at L = 6, n = 64: benchmarks/flow_speed.py):
  * Pruning. The other top-layer nodes have no in-edges and the other input nodes no out-edges, so by flow
    conservation they carry nothing: a pair's network is s -> (L-1 layers of n nodes) -> t, with
    V = (L-1)·n + 2 nodes and E = (L-2)·n² + 2n edges. Its structure is built once per (L, n) and shared by
    every pair; only the n capacities into t change with the input. (Sharing more is not sound: the graph is
    directed, so a Gomory–Hu tree does not exist, and a super-sink would give one flow, not one per input.)
  * L = 1: the flow is the edge Â_0[cls, k]. L = 2: the paths s -> i -> t are edge-disjoint, so the flow is
    Σ_i min(Â_1[cls, i], Â_0[i, k]). Both closed forms are vectorised over outputs and inputs.
  * L >= 3: Dinic's algorithm (compiled: `scipy.sparse.csgraph.maximum_flow`) on the integer capacities
    floor(c·(2^30 - 1)/B), B an upper bound on the flow, which is a feasible flow of the real network; then the
    integer min cut's real capacity bounds the optimum from above. If the two differ by more than `tol`, the
    same is done on the real residual network (capacities clipped to the new B, so each round gains ~30 bits).
    The value returned is that upper bound; the true maximum lies in [value - gap, value], gap <= tol. The
    default tol = 1e-7 (below the float32 resolution of captured patterns) takes one round; 1e-12 two.

Complexity: Dinic is O(V²·E) = O(L³n⁴) per (output, input) pair and round, so O(rounds · L³n⁵) per output node,
in compiled code; the reference, Edmonds–Karp in Python on the full (L+1)·n-node graph, is O(V'·E'²) =
O(L³n⁵) per pair, O(L³n⁶) per output node.

    >>> flows = flow(patterns, attention_mask)     # patterns [layer, batch, head, query, key] -> [batch, key]
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import breadth_first_order, maximum_flow
from torch import Tensor

from attnaudit.explain.attention import check_choice
from attnaudit.explain.capture import AttentionExplainer, Capture
from attnaudit.explain.rollout import real_positions, residual_attention
from attnaudit.model.interface import Batch

INT_RANGE = 2**30 - 1   # integer capacities stay below 2^30: forward + backward residuals fit scipy's int32
MAX_ROUNDS = 8
MAX_CELLS = 1_000_000   # layers × tokens² per example; 12 × 256² took 27 s on one CPU thread (random patterns)


@dataclass(frozen=True)
class PairNetwork:
    """The pruned network of one (output, input) pair, both directions of every edge, in CSR order.

    Nodes: 0 = the output node s; then L-1 layers of n nodes (layer L-1 first); t = the last node.
    Forward edge e (of E) sits at CSR position `forward[e]`; its reverse (capacity 0 until flow moves) too has
    a position, so scipy's flow matrix comes back on exactly these positions. The arrays are read-only
    (shared by every pair); scipy gets copies, as its compiled code wants writable buffers.
    """

    n_nodes: int
    indptr: np.ndarray      # [n_nodes + 1] int32
    indices: np.ndarray     # [2E] int32, column of each position
    rows: np.ndarray        # [2E] row of each position
    forward: np.ndarray     # [E] position of each forward edge
    sink_edges: np.ndarray  # [n] positions of the edges (layer 1, i) -> t
    source_edges: np.ndarray  # [n] positions of the edges s -> (layer L-1, i)


@lru_cache(maxsize=64)
def pair_network(n_layers: int, n: int) -> PairNetwork:
    """The shared structure for `n_layers` >= 2 attention layers over `n` real tokens."""
    n_nodes = 2 + (n_layers - 1) * n
    t = n_nodes - 1
    node = lambda layer: 1 + (n_layers - 1 - layer) * n + np.arange(n)          # layer in [1, L-1]
    src = [np.zeros(n, np.int64)] + [np.repeat(node(l), n) for l in range(n_layers - 1, 1, -1)] + [node(1)]
    dst = [node(n_layers - 1)] + [np.tile(node(l - 1), n) for l in range(n_layers - 1, 1, -1)] + [np.full(n, t)]
    src, dst = np.concatenate(src), np.concatenate(dst)                          # [E] forward edges, in order
    n_edges = len(src)
    rows, cols = np.r_[src, dst], np.r_[dst, src]                                 # [2E] forward then reverse
    order = np.lexsort((cols, rows))                                              # CSR order: by row, then column
    where = np.empty_like(order)
    where[order] = np.arange(2 * n_edges)
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n_nodes))].astype(np.int32)
    arrays = [indptr, cols[order].astype(np.int32), rows[order], where[:n_edges], where[n_edges - n : n_edges],
              where[:n]]
    for a in arrays:
        a.setflags(write=False)                                                   # shared by every pair: no edits
    return PairNetwork(n_nodes, *arrays)


def forward_capacities(a_hat: np.ndarray, output: int) -> np.ndarray:
    """Capacities of the forward edges in `pair_network` order, sink edges left 0 -> [E] float64."""
    n_layers, n, _ = a_hat.shape
    middle = [a_hat[l - 1].ravel() for l in range(n_layers - 1, 1, -1)]           # (layer l, q) -> (layer l-1, k)
    return np.concatenate([a_hat[n_layers - 1, output], *middle, np.zeros(n)])


def max_flow_certified(net: PairNetwork, residual: np.ndarray, *, tol: float) -> tuple[float, float]:
    """Maximum s-t flow of real capacities `residual` [2E] (CSR positions) -> (value, gap).

    The true maximum lies in [value - gap, value]: `value` is the best cut bound found, `value - gap` the
    value of a feasible flow. Rounds repeat until gap <= tol (at most MAX_ROUNDS).
    """
    t = net.n_nodes - 1
    r = residual.copy()
    pushed = 0.0
    bound = min(r[net.source_edges].sum(), r[net.sink_edges].sum())             # the cuts around s and t
    for _ in range(MAX_ROUNDS):
        if bound <= tol:
            break
        scale = INT_RANGE / bound
        caps = np.floor(np.clip(r, 0.0, bound) * scale).astype(np.int32)          # <= 2^30 - 1 each
        graph = sp.csr_array((caps, net.indices.copy(), net.indptr.copy()), shape=(net.n_nodes, net.n_nodes))
        result = maximum_flow(graph, 0, t, method="dinic")
        flows = aligned_flows(result.flow, net)                                   # [2E] antisymmetric integers
        r -= flows / scale                                                        # forward loses, reverse gains
        gained = result.flow_value / scale
        pushed += gained
        bound -= gained                                                           # the old bound, less what moved
        if bound > tol:                                                           # not enough: the min cut's
            reach = reachable(caps - flows, net)                                  # s side, from integer residuals
            cut = reach[net.rows] & ~reach[net.indices]
            bound = min(bound, float(np.clip(r[cut], 0.0, None).sum()))           # remaining flow <= this cut
    bound = max(bound, 0.0)
    return pushed + bound, bound


def aligned_flows(flow: sp.csr_array, net: PairNetwork) -> np.ndarray:
    """The flow matrix's values on `net`'s CSR positions (scipy keeps the structure; check, then fall back)."""
    if np.array_equal(flow.indptr, net.indptr) and np.array_equal(flow.indices, net.indices):
        return flow.data.astype(np.int64)
    return np.asarray(flow[net.rows, net.indices]).ravel().astype(np.int64)


def reachable(residual: np.ndarray, net: PairNetwork) -> np.ndarray:
    """[n_nodes] bool: nodes reachable from s along positions with positive integer residual."""
    positive = sp.csr_array(((residual > 0).astype(np.int8), net.indices.copy(), net.indptr.copy()),
                            shape=(net.n_nodes, net.n_nodes))
    positive.eliminate_zeros()                                                    # explicit zeros are no edge
    reach = np.zeros(net.n_nodes, dtype=bool)
    reach[breadth_first_order(positive, 0, directed=True, return_predecessors=False)] = True
    return reach


def max_flows(a_hat: np.ndarray, outputs: list[int], *, tol: float = 1e-7) -> tuple[np.ndarray, float]:
    """Flows from each output node to every input node of one example -> ([len(outputs), n], largest gap).

    Args:
        a_hat: [layer, query, key] capacities (the residual-augmented attention of the real tokens).
        outputs: top-layer nodes to start from (0 = [CLS]).
        tol: the certified absolute error allowed per value.
    """
    n_layers, n, _ = a_hat.shape
    if n_layers == 1:
        return a_hat[0, outputs].copy(), 0.0
    if n_layers == 2:
        first = a_hat[1, outputs]                                                  # [output, middle]
        return np.minimum(first[:, :, None], a_hat[0][None]).sum(1), 0.0           # Σ_i min(Â_1[o,i], Â_0[i,k])
    net = pair_network(n_layers, n)
    out = np.zeros((len(outputs), n))
    worst = 0.0
    for row, o in enumerate(outputs):
        residual = np.zeros(len(net.indices))
        residual[net.forward] = forward_capacities(a_hat, o)
        for k in range(n):
            residual[net.sink_edges] = a_hat[0, :, k]                             # edges (layer 1, i) -> (0, k)
            out[row, k], gap = max_flow_certified(net, residual, tol=tol)
            worst = max(worst, gap)
    return out, worst


def flow_values(a_hat: Tensor, attention_mask: Tensor, *, readout: str = "cls",
                tol: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Flows to every input token, per example -> (values [batch, key] float64, certified gaps [batch]).

    Args:
        a_hat: [layer, batch, query, key] capacities (`residual_attention`), padded rows and columns 0.
        attention_mask: [batch, seq] bool.
        readout: "cls" = from the top-layer [CLS] node; "mean" = the mean of the flows from every real top node.
        tol: the certified absolute error allowed per value.
    """
    caps = a_hat.detach().double().cpu().numpy()                                  # [layer, batch, query, key]
    mask = attention_mask.cpu()
    values = torch.zeros(caps.shape[1], caps.shape[-1], dtype=torch.float64)
    gaps = torch.zeros(caps.shape[1], dtype=torch.float64)
    for b in range(caps.shape[1]):
        real = mask[b].nonzero()[:, 0].numpy()                                    # padding nodes carry nothing
        example = caps[:, b][:, real][:, :, real]                                 # [layer, n, n]
        outputs = [0] if readout == "cls" else list(range(len(real)))
        flows, gaps[b] = max_flows(example, outputs, tol=tol)                     # [output, n]
        values[b, real] = torch.from_numpy(flows.mean(0))
    return values, gaps


def flow(patterns: Tensor, attention_mask: Tensor | None = None, *, readout: str = "cls", add_residual: bool = True,
         tol: float = 1e-7) -> Tensor:
    """Attention flow from the output node(s) to each input token (heads averaged, as in the paper).

    Args:
        patterns: [layer, batch, head, query, key], real rows summing to 1.
        attention_mask: [batch, seq] bool; None infers it from the patterns.
        readout: "cls" or "mean" (see `flow_values`); add_residual: the 0.5·(A + I) of rollout.
        tol: certified absolute error per value (the default is below float32 resolution of the patterns;
            1e-12 costs about one more Dinic round per pair).
    Returns:
        [batch, key] maximum-flow values (not normalised), 0 on padding.
    """
    check_choice("readout", readout, ("cls", "mean"))
    mask = real_positions(patterns) if attention_mask is None else attention_mask
    a_hat = residual_attention(patterns.double(), mask, head_fusion="mean", add_residual=add_residual)
    return flow_values(a_hat, mask, readout=readout, tol=tol)[0].to(patterns.dtype)


class Flow(AttentionExplainer):
    """Attention flow (Abnar & Zuidema 2020): max flow from the [CLS] output node to each input token.

    Args:
        readout: "cls" or "mean"; add_residual: the 0.5·(A + I) of rollout; tol: certified error per value.
        max_cells: the most attention cells (layers × real tokens²) one example may have. The exact flow's time
            grows like tokens⁵ (about 0.2 s at 6 layers × 128 tokens, 27 s at 12 × 256, one CPU thread), so a
            longer example is refused before any flow is computed; raise max_cells to allow it.
    extras["flow_gap"] [batch]: the largest certified error of the example's values (<= tol).
    """

    name = "flow"

    def __init__(self, *, readout: str = "cls", add_residual: bool = True, tol: float = 1e-7,
                 max_cells: int = MAX_CELLS):
        self.readout = readout
        self.add_residual = add_residual
        self.tol = tol
        self.max_cells = max_cells

    def validate(self, model) -> None:
        check_choice("readout", self.readout, ("cls", "mean"))
        if not isinstance(self.add_residual, bool):
            raise ValueError(f"add_residual must be True or False; got {self.add_residual!r}.")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 < self.tol < 1:
            raise ValueError(f"tol must be a float in (0, 1), the certified error per flow value; got {self.tol!r}.")
        if isinstance(self.max_cells, bool) or not isinstance(self.max_cells, int) or self.max_cells < 1:
            raise ValueError(f"max_cells must be an int >= 1 (attention cells, layers × tokens², per example); "
                             f"got {self.max_cells!r}.")

    def check_limits(self, model, batch: Batch) -> None:
        self._check_cells(len(model.attention_sites), batch)

    def _check_cells(self, n_layers: int, batch: Batch) -> None:
        lengths = batch.attention_mask.sum(1)                                    # [batch] real tokens
        i = int(lengths.argmax())
        n = int(lengths[i])
        if n_layers * n * n > self.max_cells:
            name = batch.ids[i] if batch.ids else i
            raise ValueError(f"flow: example {name!r} has {n} tokens, so {n_layers} layers × {n}² = "
                             f"{n_layers * n * n:,} attention cells, more than max_cells={self.max_cells:,} (the exact "
                             f"flow's time grows like tokens⁵); pass max_cells={n_layers * n * n} to the flow "
                             "explainer ([audit.explainer_params.flow] in a config) or shorten the example.")

    def from_capture(self, capture: Capture, batch: Batch, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._check_cells(capture.patterns.shape[0], batch)     # explain_all calls no check_limits
        mask = capture.attention_mask
        a_hat = residual_attention(capture.patterns.double(), mask, head_fusion="mean", add_residual=self.add_residual)
        values, gaps = flow_values(a_hat, mask, readout=self.readout, tol=self.tol)
        return values.float(), {"flow_gap": gaps}
