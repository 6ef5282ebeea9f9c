"""Attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", ACL), computed exactly.

The attention graph has a node per (layer boundary, token): layer 0 holds the inputs, layer L the outputs.
The edge from node (l+1, q) down to node (l, k) has capacity Â_l[q, k], the residual-augmented attention
of rollout (heads averaged, 0.5·A + 0.5·I, rows renormalised; `attnaudit.explain.rollout.residual_attention`).
The flow of input k is the maximum flow from the output node (L, cls) to the input node (0, k); the other
input nodes are not sinks. This is the paper's quantity (one `networkx.maximum_flow_value` per pair there).

How it is computed, exactly and fast (6 layers: ~0.5 ms per pair at n = 64, ~1.6 ms at 128, 3-4x faster
than one plain scipy `maximum_flow` per pair on the whole graph: benchmarks/flow_speed.py):
  * Pruning. The other top-layer nodes have no in-edges and the other input nodes no out-edges, so by flow
    conservation they carry nothing: a pair's network is s -> (L-1 layers of n nodes) -> t, with
    V = (L-1)·n + 2 nodes and E = (L-2)·n² + 2n edges. Its structure is built once per (L, n) and shared by
    every pair; only the n capacities into t change with the input. (Sharing more is not sound: the graph is
    directed, so a Gomory–Hu tree does not exist, and a super-sink would give one flow, not one per input.)
  * L = 1: the flow is the edge Â_0[cls, k]. L = 2: the paths s -> i -> t are edge-disjoint, so the flow is
    Σ_i min(Â_1[cls, i], Â_0[i, k]). Both closed forms are vectorised over outputs and inputs.
  * L >= 3, a bound and a flow that meets it. `flow_bounds` bounds the flow through every node layer by layer
    (the L = 2 closed form, generalised; for random patterns it is the max flow of nearly every pair). Then
    Dinic's algorithm (compiled: `scipy.sparse.csgraph.maximum_flow`) runs on the integer capacities
    floor(c·(2^30 - 1)/B), B the bound, of a pruned network that keeps only the max(PRUNED_KEEP, n/8)
    largest edges of each middle node: its flow is a feasible flow of the real network, and once it is within tol of the bound
    no cut is needed. PAIRS_PER_RUN pairs share one Dinic run as disjoint copies under a super-source
    (`Copies`), so scipy's per-call overhead is paid once per run. Rounds on the real residual network repeat
    (each gains ~30 bits) while they gain at least half of the remaining gap.
  * Fallback, exact in general: a pair the pruned network cannot bring within tol of its bound continues on the
    whole pair network from the flow found so far: Dinic rounds as above, each followed by the integer min
    cut's real capacity as a new bound (s side = the nodes reachable in the integer residual network).
  The value returned is the best upper bound; the true maximum lies in [value - gap, value], gap <= tol. The
  default tol = 1e-7 (below the float32 resolution of captured patterns) takes one round; 1e-12 two.

Complexity: Dinic is O(V²·E) = O(L³n⁴) per (output, input) pair and round, so O(rounds · L³n⁵) per output node,
in compiled code (the pruned network has E' = (L-2)·n·keep + 2n edges, so O(L³n⁴) per output there);
the reference, Edmonds–Karp in Python on the full (L+1)·n-node graph, is O(V'·E'²) = O(L³n⁵) per pair,
O(L³n⁶) per output node.

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

from attnaudit.explain.base import check_choice
from attnaudit.explain.capture import AttentionExplainer, Capture, Reads
from attnaudit.explain.rollout import ResidualFold, real_positions, residual_attention
from attnaudit.model.interface import Batch, ExplainableModel

INT_RANGE = 2**30 - 1   # integer capacities stay below 2^30: forward + backward residuals fit scipy's int32
MAX_ROUNDS = 8
PRUNED_KEEP = 10        # edges kept per middle node's row in the first, pruned, max flow (`max_flows_pruned`):
                        # max(PRUNED_KEEP, n // 8), the fastest of 10, 12, 16 at n = 64 and 128 (random patterns)
PAIRS_PER_RUN = 16      # pairs per Dinic run: fewer pay scipy's overhead more often, more share idle phases
MAX_CELLS = 1_000_000   # layers × tokens² per example: 12 × 288² at most, ≈ 18 s by `flow_seconds`
# The time of one example's exact flow (L >= 3) on one CPU thread of a shared 2-core machine
# (`python benchmarks/flow_cost_fit.py`, 4 heads, the slower of near-uniform softmax(0.3·N(0, 1)) and peaked
# softmax(2·N(0, 1)) patterns): 6 layers × 64, 128, 192 tokens took 0.16, 1.2 and 5.0 s, 8 × 160 5.0 s, and
# 12 × 48, 64, 96, 128 took 0.03, 0.06, 0.14 and 0.38 s. The layer count changes it little and not
# monotonically (across many layers the residual-augmented patterns mix towards uniform, where the bounds are
# tight), so the estimate depends on tokens alone: seconds ≈ FLOW_SECONDS · tokens^3.65, within 0.4–2.3× of
# every measurement; 12 × 512 -> ~2.6 min.
FLOW_SECONDS = 2.0e-8
FLOW_GROWTH = (0.0, 3.65)   # the exponents of layers and tokens


def flow_seconds(n_layers: int, n: int) -> float:
    """Estimated seconds of `max_flows` for one example of `n` tokens and `n_layers` layers (see FLOW_SECONDS)."""
    if n_layers <= 2:                                          # closed forms: n³ vectorised operations at most
        return 1e-8 * n_layers * n ** 3
    return FLOW_SECONDS * n_layers ** FLOW_GROWTH[0] * n ** FLOW_GROWTH[1]


@dataclass(frozen=True)
class PairNetwork:
    """The pruned network of one (output, input) pair, both directions of every edge, in CSR order.

    Nodes: 0 = the output node s; then L-1 layers of n nodes (layer L-1 first); t = the last node.
    Forward edge e (of E) sits at CSR position `forward[e]`, its reverse (capacity 0 until flow moves) at
    `backward[e]`, so scipy's flow matrix comes back on exactly these positions. The arrays are read-only
    (shared by every pair); scipy gets copies, as its compiled code wants writable buffers.
    """

    n_nodes: int
    indptr: np.ndarray      # [n_nodes + 1] int32
    indices: np.ndarray     # [2E] int32, column of each position
    rows: np.ndarray        # [2E] row of each position
    forward: np.ndarray     # [E] position of each forward edge
    backward: np.ndarray    # [E] position of each forward edge's reverse
    sink_edges: np.ndarray  # [n] positions of the edges (layer 1, i) -> t
    source_edges: np.ndarray  # [n] positions of the edges s -> (layer L-1, i)


def network(n_nodes: int, src: np.ndarray, dst: np.ndarray, n: int) -> PairNetwork:
    """CSR structure of forward edges src -> dst [E] (the first n leave s, the last n enter t) and reverses."""
    n_edges = len(src)
    rows, cols = np.r_[src, dst], np.r_[dst, src]                                 # [2E] forward then reverse
    order = np.lexsort((cols, rows))                                              # CSR order: by row, then column
    where = np.empty_like(order)
    where[order] = np.arange(2 * n_edges)
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n_nodes))].astype(np.int32)
    arrays = [indptr, cols[order].astype(np.int32), rows[order], where[:n_edges], where[n_edges:],
              where[n_edges - n : n_edges], where[:n]]
    for a in arrays:
        a.setflags(write=False)                                                   # shared by every pair: no edits
    return PairNetwork(n_nodes, *arrays)


@lru_cache(maxsize=64)
def pair_network(n_layers: int, n: int) -> PairNetwork:
    """The shared structure for `n_layers` >= 2 attention layers over `n` real tokens."""
    n_nodes = 2 + (n_layers - 1) * n
    t = n_nodes - 1
    node = lambda layer: 1 + (n_layers - 1 - layer) * n + np.arange(n)          # layer in [1, L-1]
    src = [np.zeros(n, np.int64)] + [np.repeat(node(l), n) for l in range(n_layers - 1, 1, -1)] + [node(1)]
    dst = [node(n_layers - 1)] + [np.tile(node(l - 1), n) for l in range(n_layers - 1, 1, -1)] + [np.full(n, t)]
    return network(n_nodes, np.concatenate(src), np.concatenate(dst), n)          # forward edges in that order


def pruned_network(a_hat: np.ndarray, keep: int) -> tuple[PairNetwork, np.ndarray]:
    """The pair network of one example with only the `keep` largest edges of each middle node's row
    -> (network, [E'] the full network's index of each kept forward edge). Source and sink edges all stay."""
    n_layers, n, _ = a_hat.shape
    full = pair_network(n_layers, n)
    top = np.argsort(-a_hat[1 : n_layers - 1], axis=-1, kind="stable")[..., :keep]   # [layer-2, query, keep]
    top = top[::-1]                                                              # pair-network order: layer L-2 first
    base = n + n * n * np.arange(n_layers - 2)[:, None, None] + n * np.arange(n)[None, :, None]
    kept = np.r_[np.arange(n), np.sort((base + top).ravel()), full.forward.size - n + np.arange(n)]
    src, dst = full.rows[full.forward[kept]], full.indices[full.forward[kept]]
    return network(full.n_nodes, src, dst.astype(np.int64), n), kept


def forward_capacities(a_hat: np.ndarray, output: int) -> np.ndarray:
    """Capacities of the forward edges in `pair_network` order, sink edges left 0 -> [E] float64."""
    n_layers, n, _ = a_hat.shape
    middle = [a_hat[l - 1].ravel() for l in range(n_layers - 1, 1, -1)]           # (layer l, q) -> (layer l-1, k)
    return np.concatenate([a_hat[n_layers - 1, output], *middle, np.zeros(n)])


def flow_bounds(a_hat: np.ndarray, output: int) -> np.ndarray:
    """Upper bounds on the flow from `output` to every input -> [n], by bounding the flow through each node.

    Node (L-1, i) passes at most Â_{L-1}[o, i] (its one in-edge) and any node at most its row sum (its
    out-edges); node (l-1, k) at most Σ_q min(u_l[q], Â_{l-1}[q, k]); a whole layer at most the layer above.
    The flow into input k is then <= Σ_i min(u_1[i], Â_0[i, k]). At L = 2 this is the exact closed form.
    """
    n_layers = a_hat.shape[0]
    u = a_hat[n_layers - 1, output]                                              # [n] through (L-1, i)
    total = u.sum()
    for l in range(n_layers - 1, 1, -1):
        u = np.minimum(u, a_hat[l - 1].sum(1))                                   # out-capacity of (l, q)
        u = np.minimum(u[:, None], a_hat[l - 1]).sum(0)                          # [n] through (l-1, k)
        total = min(total, u.sum())
        u = np.minimum(u, total)
    return np.minimum(np.minimum(u[:, None], a_hat[0]).sum(0), total)            # [n] into (0, k)


def integer_round(net: PairNetwork, r: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """One Dinic run on caps = floor(r · (2^30 - 1)/bound), a feasible flow of `r`
    -> (caps [2E], flows [2E] antisymmetric integers, the flow's real value, scale)."""
    scale = INT_RANGE / bound
    caps = np.floor(np.clip(r, 0.0, bound) * scale).astype(np.int32)              # <= 2^30 - 1 each
    graph = sp.csr_array((caps, net.indices.copy(), net.indptr.copy()), shape=(net.n_nodes, net.n_nodes))
    result = maximum_flow(graph, 0, net.n_nodes - 1, method="dinic")
    return caps, aligned_flows(result.flow, net), result.flow_value / scale, scale


def max_flow_certified(net: PairNetwork, residual: np.ndarray, *, tol: float) -> tuple[float, float]:
    """Maximum s-t flow of real capacities `residual` [2E] (CSR positions) -> (value, gap).

    The true maximum lies in [value - gap, value]: `value` is the best cut bound found, `value - gap` the
    value of a feasible flow. Rounds repeat until gap <= tol (at most MAX_ROUNDS).
    """
    r = residual.copy()
    pushed = 0.0
    bound = min(r[net.source_edges].sum(), r[net.sink_edges].sum())             # the cuts around s and t
    for _ in range(MAX_ROUNDS):
        if bound <= tol:
            break
        caps, flows, gained, scale = integer_round(net, r, bound)
        r -= flows / scale                                                        # forward loses, reverse gains
        pushed += gained
        bound -= gained                                                           # the old bound, less what moved
        if bound > tol:                                                           # not enough: the min cut's
            reach = reachable(caps - flows, net)                                  # s side, from integer residuals
            cut = reach[net.rows] & ~reach[net.indices]
            bound = min(bound, float(np.clip(r[cut], 0.0, None).sum()))           # remaining flow <= this cut
    bound = max(bound, 0.0)
    return pushed + bound, bound


@dataclass(frozen=True)
class Copies:
    """`n_copies` disjoint copies of a pair network in one CSR graph, joined by a super-source S and a super-sink T.

    Nodes: 0 = S; copy c's node v is 1 + c·V + v; T the last. S -> s_c and t_c -> T carry what each copy may
    pass, so one Dinic run is a max flow of every copy at once (the copies share no node, so a maximum of the
    union is a maximum of each copy; the flow on S -> s_c is copy c's value). Positions: S's row [0, n_copies),
    then a block of `block` = 2E + 2 positions per copy (s_c -> S, the copy's 2E in its own CSR order,
    t_c -> T), then T's row. Scipy's per-call overhead is then paid once per round, not once per pair.
    """

    n_nodes: int
    n_copies: int
    block: int
    indptr: np.ndarray      # [n_nodes + 1] int32
    indices: np.ndarray     # [n_copies·(block + 2)] int32


def copies(net: PairNetwork, n_copies: int) -> Copies:
    """`n_copies` copies of `net` joined by a super-source and a super-sink."""
    n_local = net.n_nodes
    lengths = np.diff(net.indptr)
    lengths[0] += 1                                                               # s_c -> S, first in s_c's row
    lengths[-1] += 1                                                              # t_c -> T, last in t_c's row
    n_nodes = 2 + n_copies * n_local
    offsets = 1 + n_local * np.arange(n_copies, dtype=np.int32)                   # [copy] node of s_c
    body = np.empty((n_copies, len(net.indices) + 2), np.int32)                   # [copy, block]
    body[:, 1:-1] = net.indices[None, :] + offsets[:, None]
    body[:, 0], body[:, -1] = 0, n_nodes - 1
    indices = np.r_[offsets, body.ravel(), offsets + n_local - 1].astype(np.int32)
    indptr = np.r_[0, np.cumsum(np.r_[n_copies, np.tile(lengths, n_copies), n_copies])].astype(np.int32)
    return Copies(n_nodes, n_copies, body.shape[1], indptr, indices)


def joint_rounds(net: PairNetwork, r: np.ndarray, bound: np.ndarray, *, tol: float,
                 unions: dict[int, Copies]) -> np.ndarray:
    """Dinic rounds of several pairs at once (`Copies`) on residuals r [pair, 2E] (updated in place), each pair's
    flow bounded by `bound` [pair] (lowered in place by what moves) -> [pair] the flow pushed.

    A pair leaves when its bound is within tol, or when a round gains less than half of its bound: the rest is
    not on this network (a pruned one) or the bound is not attained, and the caller goes on from there.
    """
    n_pairs = len(bound)
    pushed = np.zeros(n_pairs)
    active = bound > tol
    for _ in range(MAX_ROUNDS):
        pairs = np.flatnonzero(active)
        if len(pairs) == 0:
            break
        union = unions.get(len(pairs)) or unions.setdefault(len(pairs), copies(net, len(pairs)))
        scale = INT_RANGE / bound[pairs]                                          # [open pair]
        caps = np.zeros(len(union.indices), np.int32)
        body = caps[len(pairs) : len(pairs) * (union.block + 1)].reshape(len(pairs), union.block)
        body[:, 1:-1] = np.floor(np.clip(r[pairs], 0.0, bound[pairs, None]) * scale[:, None])  # <= 2^30 - 1
        body[:, -1] = INT_RANGE                                                   # t_c -> T passes anything
        caps[: len(pairs)] = INT_RANGE                                            # S -> s_c
        graph = sp.csr_array((caps, union.indices, union.indptr), shape=(union.n_nodes,) * 2)
        flows = aligned_flows(maximum_flow(graph, 0, union.n_nodes - 1, method="dinic").flow, union)
        gained = flows[: len(pairs)] / scale                                      # [open pair] each copy's value
        moved = flows[len(pairs) : len(pairs) * (union.block + 1)].reshape(len(pairs), union.block)[:, 1:-1]
        r[pairs] -= moved / scale[:, None]                                        # forward loses, reverse gains
        pushed[pairs] += gained
        bound[pairs] -= gained
        active[pairs] = (bound[pairs] > tol) & (gained >= 0.5 * (bound[pairs] + gained))
    return pushed


def max_flows_pruned(pruned: PairNetwork, kept: np.ndarray, full: PairNetwork, capacities: np.ndarray,
                     sinks: np.ndarray, upper: np.ndarray, *, tol: float,
                     unions: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Maximum flows of several pairs -> (values [pair], gaps [pair]), in three stages, each going on from the
    flow of the last: joint Dinic rounds (`joint_rounds`) on the pruned network, then on the whole pair network,
    then, one pair at a time, rounds with min cuts (`max_flow_certified`). The first two are certified by
    `upper` (bounds of the real flow, `flow_bounds`): a flow of the pruned network is one of the whole, so once
    it comes within tol of `upper` no cut is needed. Random patterns nearly all finish in the first stage.

    Args:
        capacities: [E] the full network's forward capacities, sink edges aside (`forward_capacities`).
        sinks: [pair, n] each pair's sink-edge capacities; upper: [pair] bounds of each pair's flow.
        unions: `Copies` by (network, size), reused across calls on the same networks (filled here).
    """
    n_pairs, n = sinks.shape
    unions = {} if unions is None else unions
    bound = upper.astype(np.float64).copy()
    r = np.zeros((n_pairs, len(pruned.indices)))                                  # [pair, 2E'] real residuals
    r[:, pruned.forward] = capacities[kept]
    r[:, pruned.sink_edges] = sinks
    start = r[:, pruned.forward]                                                  # [pair, E'] capacities
    pushed = joint_rounds(pruned, r, bound, tol=tol, unions=unions.setdefault(id(pruned), {}))
    rest = np.flatnonzero(bound > tol)
    if len(rest):                                                                 # the whole network, from there
        moved = start[rest] - r[rest][:, pruned.forward]                          # [rest, E'] flow on kept edges
        whole = np.zeros((len(rest), len(full.indices)))
        whole[:, full.forward] = capacities
        whole[:, full.sink_edges] = sinks[rest]
        whole[:, full.forward[kept]] -= moved
        whole[:, full.backward[kept]] += moved
        if pruned is not full:
            left = bound[rest]
            pushed[rest] += joint_rounds(full, whole, left, tol=tol, unions=unions.setdefault(id(full), {}))
            bound[rest] = left
    values, gaps = upper.astype(np.float64).copy(), np.maximum(bound, 0.0)
    for i, p in enumerate(rest):
        if bound[p] <= tol:
            continue
        value, gap = max_flow_certified(full, whole[i], tol=tol)                  # the bound is not attained
        lower = pushed[p] + value - gap
        values[p] = min(upper[p], pushed[p] + value)
        gaps[p] = max(values[p] - lower, 0.0)
    return values, gaps


def aligned_flows(flow: sp.csr_array, net: PairNetwork | Copies) -> np.ndarray:
    """The flow matrix's values on `net`'s CSR positions (scipy keeps the structure; check, then fall back)."""
    if np.array_equal(flow.indptr, net.indptr) and np.array_equal(flow.indices, net.indices):
        return flow.data.astype(np.int64)
    rows = np.repeat(np.arange(len(net.indptr) - 1), np.diff(net.indptr))
    return np.asarray(flow[rows, net.indices]).ravel().astype(np.int64)


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
    keep = max(PRUNED_KEEP, n // 8)
    pruned, kept = pruned_network(a_hat, keep) if n > keep else (net, np.arange(net.forward.size))
    out = np.zeros((len(outputs), n))
    worst = 0.0
    unions: dict = {}                                                             # joint-run graphs, reused
    for row, o in enumerate(outputs):
        capacities, upper = forward_capacities(a_hat, o), flow_bounds(a_hat, o)
        for k in range(0, n, PAIRS_PER_RUN):                                     # sink k: Â_0[:, k]
            ks = slice(k, k + PAIRS_PER_RUN)
            out[row, ks], gaps = max_flows_pruned(pruned, kept, net, capacities, a_hat[0].T[ks], upper[ks], tol=tol,
                                                  unions=unions)
            worst = max(worst, float(gaps.max()))
    return out, worst


def flow_values(a_hat: Tensor, attention_mask: Tensor, *, readout: str = "cls",
                tol: float = 1e-7, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Flows to every input token, per example -> (values [batch, key] float64, certified gaps [batch]).

    Args:
        a_hat: [layer, batch, query, key] capacities (`residual_attention`), padded rows and columns 0.
        attention_mask: [batch, seq] bool.
        readout: "cls" = from the top-layer [CLS] node; "mean" = the mean of the flows from every real top node.
        tol: the certified absolute error allowed per value.
        rows: [batch] the top node "cls" reads (a decoder's last real token); None = position 0.
    """
    caps = a_hat.detach().double().cpu().numpy()                                  # [layer, batch, query, key]
    mask = attention_mask.cpu()
    values = torch.zeros(caps.shape[1], caps.shape[-1], dtype=torch.float64)
    gaps = torch.zeros(caps.shape[1], dtype=torch.float64)
    for b in range(caps.shape[1]):
        real = mask[b].nonzero()[:, 0].numpy()                                    # padding nodes carry nothing
        example = caps[:, b][:, real][:, :, real]                                 # [layer, n, n]
        top = 0 if rows is None else int((real < int(rows[b])).sum())           # its index among real nodes
        outputs = [top] if readout == "cls" else list(range(len(real)))
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
            grows like tokens^3.65 (`flow_seconds`: about 1 s at 128 tokens, 2.6 min at 512, one CPU thread),
            so a longer example is refused, with that estimate, before any attention
            is computed; raise max_cells to allow it.
    extras["flow_gap"] [batch]: the largest certified error of the example's values (<= tol).
    """

    name = "flow"

    def __init__(self, *, readout: str = "cls", add_residual: bool = True, tol: float = 1e-7,
                 max_cells: int = MAX_CELLS):
        self.readout = readout
        self.add_residual = add_residual
        self.tol = tol
        self.max_cells = max_cells

    def validate(self, model: ExplainableModel) -> None:
        check_choice("readout", self.readout, ("cls", "mean"))
        if not isinstance(self.add_residual, bool):
            raise ValueError(f"add_residual must be True or False; got {self.add_residual!r}.")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 < self.tol < 1:
            raise ValueError(f"tol must be a float in (0, 1), the certified error per flow value; got {self.tol!r}.")
        if isinstance(self.max_cells, bool) or not isinstance(self.max_cells, int) or self.max_cells < 1:
            raise ValueError(f"max_cells must be an int >= 1 (attention cells, layers × tokens², per example); "
                             f"got {self.max_cells!r}.")

    def check_limits(self, model: ExplainableModel, batch: Batch) -> None:
        super().check_limits(model, batch)
        self._check_cells(len(model.attention_sites), batch)

    def _check_cells(self, n_layers: int, batch: Batch) -> None:
        lengths = batch.attention_mask.sum(1)                                    # [batch] real tokens
        i = int(lengths.argmax())
        n = int(lengths[i])
        if n_layers * n * n > self.max_cells:
            name = batch.ids[i] if batch.ids else i
            seconds = flow_seconds(n_layers, n)
            raise ValueError(f"flow: example {name!r} has {n} tokens, so {n_layers} layers × {n}² = "
                             f"{n_layers * n * n:,} attention cells, more than max_cells={self.max_cells:,}: its exact "
                             f"flow would take ≈ {seconds:,.3g} s ({seconds / 60:,.3g} min) on one CPU thread, growing "
                             f"like tokens^{FLOW_GROWTH[1]}; pass "
                             f"max_cells={n_layers * n * n} to the flow explainer ([audit.explainer_params.flow] in a "
                             "config) or shorten the example.")

    def fold(self, n_layers: int) -> ResidualFold:
        """Â in float64 per layer, as the forward passes: [layer, batch, seq, seq] instead of the patterns."""
        return ResidualFold(tuple(range(n_layers)), head_fusion="mean", add_residual=self.add_residual, double=True)

    def reads(self, model: ExplainableModel) -> Reads:
        return Reads(folds=(self.fold(len(model.attention_sites)),))

    def from_capture(self, capture: Capture, batch: Batch, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._check_cells(capture.n_layers, batch)              # also for a capture made outside explain_all
        mask = capture.attention_mask
        a_hat = capture.folds.get(self.fold(capture.n_layers).key)             # [layer, batch, query, key] float64
        if a_hat is None:
            a_hat = residual_attention(capture.patterns.double(), mask, head_fusion="mean",
                                       add_residual=self.add_residual)
        values, gaps = flow_values(a_hat, mask, readout=self.readout, tol=self.tol, rows=capture.readout_rows)
        return values.float(), {"flow_gap": gaps}
