"""Adaptive step counts for integrated gradients: more Gauss–Legendre nodes only where the gap asks for them.

Completeness (Sundararajan et al. 2017, Prop. 1): the exact integral gives Σ attributions = F(x) − F(x').
A quadrature with n nodes misses it by the completeness gap |Σ attributions − (F(x) − F(x'))|, which is
measured for free (captum's convergence delta: two forwards without gradients). `adaptive_scores` runs every
example at the schedule's first count, then only the examples whose gap is above the tolerance again at more
nodes, until each is under it or has reached the schedule's last count:

    >>> schedule = step_schedule(16, 512)                       # [16, 32, 64, 128, 256, 512]
    >>> scores, extras = adaptive_scores(run, len(batch), schedule, tolerance=0.01, atol=1e-4)

An example's result is exactly what the last `run` returned for it. Gauss–Legendre nodes are not nested, so
a new count shares no forward with the previous one; the worst case is the whole schedule, `sum(schedule)`
(1,008 passes for 16…512), which is what a cost check must bound.

The gap is a necessary condition, not an error bound: on a ReLU model the integrand jumps where a unit
switches and errors of opposite signs can cancel at a small count by luck. `min_steps` bounds how small.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

SAFETY = 2.0          # a predicted count aims at half the tolerance: the gap of a ReLU model is noisy in n
RATE_RANGE = (1.0, 4.0)  # assumed decay exponents: 1/n for a jumping (ReLU) integrand, at most n⁻⁴ when smooth

Run = Callable[[int, list[int]], tuple[Tensor, dict[str, Tensor]]]


def step_schedule(min_steps: int, max_steps: int) -> list[int]:
    """The counts an example may be run at: min_steps doubled until max_steps, which is always the last.

    >>> step_schedule(16, 512), step_schedule(16, 100), step_schedule(8, 8)
    ([16, 32, 64, 128, 256, 512], [16, 32, 64, 100], [8])
    """
    out = [min_steps]
    while out[-1] * 2 < max_steps:
        out.append(out[-1] * 2)
    return out if out[-1] == max_steps else [*out, max_steps]


def excess(gap: Tensor, relative: Tensor, *, tolerance: float, atol: float) -> Tensor:
    """[batch] how many times over its allowance each gap is; <= 1 means converged.

    The allowance is max(tolerance · |F(x) − F(x')|, atol): the relative gap alone is undefined where
    F(x) ≈ F(x') (captum's delta is then float noise), so an absolute gap of atol (logit units) also passes.
    """
    by_relative = relative / tolerance
    by_absolute = gap / atol if atol > 0 else torch.full_like(gap, math.inf)
    return torch.minimum(by_relative, by_absolute)


def next_steps(schedule: list[int], history: list[tuple[int, float]]) -> int:
    """The next count for an example not yet converged, from its (n_steps, excess) history.

    After one count, or when the excess did not fall since the previous count (a smooth integrand can be
    pre-asymptotic at a few nodes: measured 6.6 %, 12.8 %, 0.6 % at 4, 8, 16 steps on a tiny BERT): the next
    count in the schedule (doubling). Otherwise the decay exponent p between the last two counts, clamped to
    RATE_RANGE, predicts the count where the excess would be 1/SAFETY; the smallest schedule count at least
    that (and above the last) is next, so a ReLU example at 20× its allowance after 32 steps jumps to 512
    instead of visiting 64, 128 and 256.
    """
    n, e = history[-1]
    later = [s for s in schedule if s > n]
    assert later, "an example at the schedule's last count is finished"      # adaptive_scores stops there
    if len(history) < 2 or not history[-2][1] > e:
        return later[0]
    n_prev, e_prev = history[-2]
    p = min(max(math.log(e_prev / e) / math.log(n / n_prev), RATE_RANGE[0]), RATE_RANGE[1])
    needed = n * (SAFETY * e) ** (1.0 / p)
    return next((s for s in later if s >= needed), later[-1])


def adaptive_scores(run: Run, shape: tuple[int, int], schedule: list[int], *, tolerance: float,
                    atol: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Token scores [batch, seq] and per-example extras, each example at the fewest schedule counts that pass.

    Args:
        run: run(n_steps, rows) -> (scores [len(rows), seq_rows], extras with "completeness_gap" and
            "completeness_gap_relative" [len(rows)]): a fixed-count IG of those examples of the batch.
        shape: (batch, seq) of the scores to return.
        schedule: increasing counts (`step_schedule`); every example starts at the first.
        tolerance, atol: an example is done when its gap is at most max(tolerance · |F(x) − F(x')|, atol).
    Returns:
        scores [batch, seq], 0 past each row's own run; extras "completeness_gap", "completeness_gap_relative",
        "n_steps" (the count of the returned scores) and "converged" (1.0, or 0.0 at the last count above it).
    """
    n_examples, seq = shape
    pending = dict.fromkeys(range(n_examples), schedule[0])            # example -> its next count
    history: dict[int, list[tuple[int, float]]] = {i: [] for i in range(n_examples)}
    parts: dict[int, Tensor] = {}                                       # example -> its latest scores [seq_i]
    gap, relative = torch.zeros(n_examples), torch.zeros(n_examples)
    steps, converged = torch.zeros(n_examples), torch.zeros(n_examples)
    while pending:
        todo: dict[int, list[int]] = {}
        for i, n in pending.items():
            todo.setdefault(n, []).append(i)
        pending = {}
        for n, rows in sorted(todo.items()):                            # one fixed-count call per count
            s, e = run(n, rows)                                         # [len(rows), seq_rows]
            g, r = e["completeness_gap"].detach().cpu(), e["completeness_gap_relative"].detach().cpu()
            over = excess(g, r, tolerance=tolerance, atol=atol)         # [len(rows)]
            for j, i in enumerate(rows):
                parts[i] = s[j].detach().cpu()
                gap[i], relative[i], steps[i] = g[j], r[j], n
                history[i].append((n, float(over[j])))
                if over[j] <= 1:
                    converged[i] = 1.0
                elif n < schedule[-1]:
                    pending[i] = next_steps(schedule, history[i])
    scores = torch.zeros(n_examples, seq)
    for i, p in parts.items():
        scores[i, : p.shape[0]] = p
    return scores, {"completeness_gap": gap, "completeness_gap_relative": relative, "n_steps": steps,
                    "converged": converged}
