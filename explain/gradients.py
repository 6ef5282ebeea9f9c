"""Gradient explainers over token embeddings, through captum.

Saliency (Simonyan et al. 2014), Input×Gradient (Shrikumar et al. 2016), Integrated Gradients
(Sundararajan et al. 2017), DeepLIFT (Shrikumar et al. 2017) and GradientSHAP (Lundberg & Lee 2017),
plus `CaptumExplainer`, which turns any captum attribution class into an explainer:

    >>> from captum.attr import InputXGradient
    >>> CaptumExplainer(InputXGradient, name="ixg").explain(model, ["a fine film"])

What is attributed: f = the target class's logit (not its probability), as a function of the token
embeddings `model.embed(input_ids)` [batch, seq, d_model]; the attention mask is passed unchanged as an
additional forward argument, so padding stays padding. Embedding-level attributions are reduced to one
score per token by `reduction`: "sum" over d_model (keeps completeness: Σ scores = Σ attributions) or
"l2" (the norm, always >= 0).

Baselines ("pad", "mask", "zero") replace the embedding of every real, non-special token by the [PAD]
embedding, the [MASK] embedding or zeros; [CLS]/[SEP] and padding keep their own embedding, so their
(x − x') is 0 and the reference input is still a well-formed "[CLS] ... [SEP]" sequence (the common
practice in captum's BERT tutorials). Positional encodings are added inside the model, after the
embedding, so every baseline keeps them. The built-in model's [PAD] row is zero (nn.Embedding's
padding_idx), so there "pad" and "zero" coincide; a HuggingFace model's need not.
"""
from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import captum.attr
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from attnaudit.explain.base import (
    MAX_FORWARDS,
    MAX_ROWS,
    Cost,
    Explainer,
    check_choice,
    check_max_cost,
    forwards_cost,
    short_repr,
)
from attnaudit.explain.control import check_seed, example_seed, seeded
from attnaudit.explain.quadrature import adaptive_scores, step_schedule
from attnaudit.model.interface import Batch, ExplainableModel

ADAPTIVE = "adaptive"   # IntegratedGradients(n_steps=ADAPTIVE): steps per example from the completeness gap
BASELINES = ("pad", "mask", "zero")
MAX_MEMORY_MB = 4096   # integrated gradients' default budget per forward + backward pass
# IG's tokens per forward + backward pass (rows × padded length), its default length grouping: on MiniLM at 2 threads
# 94 % of the plain HF floor, against 42 % for one captum call of 512 rows (benchmarks/peer_ferret.py)
TOKENS_PER_PASS = 4096
REDUCTIONS = ("sum", "l2")


# -- parameter checks shared with the perturbation explainers (check_choice is in base) ---------------------
def check_positive_int(name: str, value, *, allow_none: bool = False, maximum: int | None = None) -> None:
    """value is an int in [1, maximum] (or None when allowed); a maximum is documented where the parameter is."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        rule = "an int >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {rule}; got {short_repr(value)}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an int in [1, {maximum:,}]; got {value:,}. Lower it.")


def pass_bytes(model: ExplainableModel, rows: int, seq: int) -> int:
    """Estimated peak bytes of one float32 forward + backward pass over `rows` inputs of `seq` tokens.

    Per layer the backward keeps about 10 [seq, d_model] and 2 [seq, d_ff] activations and 5 [head, seq, seq]
    attention tensors; ×6 bytes (float32 plus the backward's working memory). Measured on CPU (2-4 layers,
    d_model 32-128, seq 32-128) the real peak was 0.45-0.65 of this. d_ff is taken as 4·d_model when the
    model does not say.
    """
    cfg = getattr(getattr(model, "net", None), "cfg", None)
    d_model = getattr(cfg, "d_model", None) or int(model.embed(torch.zeros(1, 1, dtype=torch.long)).shape[-1])
    d_ff = getattr(cfg, "d_ff", None) or 4 * d_model
    per_row = model.n_layers * (seq * (10 * d_model + 2 * d_ff) + 5 * model.n_heads * seq * seq)
    return 6 * rows * per_row


# -- building blocks ------------------------------------------------------------------------------
def baseline_embeds(model: ExplainableModel, batch: Batch, embeds: Tensor, kind: str) -> Tensor:
    """The reference input: real non-special tokens replaced by [PAD]/[MASK]/zero embeddings.

    Args:
        embeds: [batch, seq, d_model], `model.embed(batch.input_ids)`.
        kind: "pad", "mask" or "zero".
    Returns:
        [batch, seq, d_model]: equal to `embeds` on [CLS]/[SEP] and padding.
    """
    replaced = (batch.attention_mask & ~batch.special_mask).to(embeds.device)   # [batch, seq]
    if kind == "zero":
        ref = torch.zeros_like(embeds)
    else:
        token = model.pad_id if kind == "pad" else model.mask_id
        ref = model.embed(torch.full_like(batch.input_ids, token)).detach()     # [batch, seq, d_model]
    return torch.where(replaced[..., None], ref, embeds)


def reduce_embedding(attributions: Tensor, reduction: str) -> Tensor:
    """[batch, seq, d_model] -> [batch, seq]: "sum" over d_model, or its "l2" norm."""
    return attributions.sum(-1) if reduction == "sum" else attributions.norm(dim=-1)


class EmbeddingForward(nn.Module):
    """embeds [batch, seq, d_model], attention_mask [batch, seq] -> logits [batch, n_classes].

    An nn.Module (not a lambda) so module-based captum methods (DeepLift, GuidedBackprop) can hook the
    model's layers: every nn.Module held as an attribute of the model object (the built-in model's
    `net`; an adapter's wrapped network) is registered as a child. Nothing is copied.
    """

    def __init__(self, model: ExplainableModel):
        super().__init__()
        self.model = model  # a plain attribute: the interface object itself need not be a Module
        parts = [model] if isinstance(model, nn.Module) else [
            m for m in vars(model).values() if isinstance(m, nn.Module)]
        self.parts = nn.ModuleList(parts)

    def forward(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.logits_from_embeds(embeds, attention_mask)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# -- the generic wrapper --------------------------------------------------------------------------
class CaptumExplainer(Explainer):
    """Any captum attribution class applied to the token embeddings, reduced to token scores.

    Args:
        attribution_class: e.g. `captum.attr.InputXGradient`; built on `EmbeddingForward(model)`.
        name: the method name in results; None -> "captum_" + the class name in snake_case.
        reduction: "sum" or "l2" over d_model.
        baseline: None (no baselines passed), or "pad" / "mask" / "zero" (see the module docstring).
            With a baseline and a class that has a convergence delta, extras hold
            "completeness_gap" = |Σ attributions − (f(x) − f(x'))| and "completeness_gap_relative"
            (divided by |f(x) − f(x')|), per example.
        attribute_kwargs: passed to `attribute` unchanged, e.g. {"n_steps": 64}.
        **more_attribute_kwargs: the same, as keywords (n_steps=64); merged into attribute_kwargs, which is
            what `get_params` reports, so that `CaptumExplainer(**e.get_params())` rebuilds `e`.
    """

    family = "gradient"
    baseline = None

    def __init__(self, attribution_class, *, name: str | None = None, reduction: str = "sum",
                 baseline: str | None = None, attribute_kwargs: dict[str, Any] | None = None,
                 **more_attribute_kwargs: Any):
        self.attribution_class = attribution_class
        self._name = name
        self.reduction = reduction
        self.baseline = baseline
        self.attribute_kwargs = {**(attribute_kwargs or {}), **more_attribute_kwargs}

    @property
    def name(self) -> str:
        return self._name or "captum_" + _snake(self.attribution_class.__name__)

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    def captum_kwargs(self) -> dict:
        """Keyword arguments for `attribute` (subclasses build them from their own parameters)."""
        return dict(self.attribute_kwargs)

    def validate(self, model: ExplainableModel) -> None:
        cls = self.attribution_class
        if not (isinstance(cls, type) and issubclass(cls, captum.attr.Attribution)):
            raise ValueError(f"attribution_class must be a captum.attr attribution class such as "
                             f"captum.attr.InputXGradient; got {self.attribution_class!r}.")
        if getattr(self, "_name", None) is not None and not (isinstance(self._name, str) and self._name):
            raise ValueError(f"name must be a non-empty str or None (derived from the class); got {self._name!r}.")
        check_choice("reduction", self.reduction, REDUCTIONS, " Use 'sum' to keep completeness, 'l2' for magnitudes.")
        if self.baseline is not None:
            check_choice("baseline", self.baseline, BASELINES, " Pick the reference that replaces the words (for a "
                         "baseline tensor of your own, use CaptumExplainer with attribute keyword baselines=...).")

    def make_baselines(self, model: ExplainableModel, batch: Batch, embeds: Tensor) -> Tensor | None:
        return None if self.baseline is None else baseline_embeds(model, batch, embeds, self.baseline)

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.attribution_class in (captum.attr.Saliency, captum.attr.InputXGradient) \
                and not getattr(self, "attribute_kwargs", None):
            shared = step_gradients(model, batch, target)
            if shared is not None:                                                # generation steps: one forward
                embeds, grads = shared                                            # [batch, seq, d_model] each
                out = grads if self.attribution_class is captum.attr.Saliency else embeds * grads
                return reduce_embedding(out, self.reduction), {}
        embeds = model.embed(batch.input_ids).detach()                            # [batch, seq, d_model]
        mask = batch.attention_mask.to(embeds.device)                             # passed through untouched
        method = self.attribution_class(EmbeddingForward(model))
        kwargs = self.captum_kwargs()
        baselines = self.make_baselines(model, batch, embeds)
        if baselines is not None:
            kwargs["baselines"] = baselines
        embeds.requires_grad_()                                                   # the leaf captum differentiates
        with_delta = self.baseline is not None and method.has_convergence_delta()
        if with_delta:
            kwargs["return_convergence_delta"] = True
        out = method.attribute(embeds, target=target.to(embeds.device), additional_forward_args=(mask,), **kwargs)
        attributions, delta = out if with_delta else (out, None)                 # [batch, seq, d_model]
        extras = {}
        if delta is not None:
            total = attributions.sum(dim=(1, 2))                                  # [batch]
            change = total - delta                                                # f(x) − f(x'), as captum measured it
            extras["completeness_gap"] = delta.abs()
            extras["completeness_gap_relative"] = delta.abs() / change.abs().clamp_min(1e-12)
        return reduce_embedding(attributions.detach(), self.reduction), extras


def step_gradients(model: ExplainableModel, batch: Batch, target: Tensor) -> tuple[Tensor, Tensor] | None:
    """d logit(target_r) / d embeddings for generation rows that are prefixes of longer rows, from ONE forward.

    A causal LM's row r (prompt + t_<s) is the first positions of a longer row (`attnaudit.model.steps.carriers`),
    so its target logit is that row's logit at position len(r) - 1 and depends on the same embeddings. One forward
    of the distinct longest rows (`model.sequence_logits_from_embeds`, [n, seq, vocab]) and one batched backward
    (a vector-Jacobian product per row) give every row's gradient. -> (embeds, grads), each [batch, seq, d_model];
    None when the model is not such an LM or no row is shared.
    """
    from attnaudit.model.steps import last_index, reads_last, shared_carriers

    if not (reads_last(model) and hasattr(model, "sequence_logits_from_embeds")):
        return None
    shared = shared_carriers(batch.input_ids, batch.attention_mask)
    if shared is None:
        return None
    chosen, owner = shared
    dev = model.device
    embeds = model.embed(batch.input_ids[chosen]).detach().requires_grad_()      # [n, seq, d_model]
    with torch.enable_grad():
        logits = model.sequence_logits_from_embeds(embeds, batch.attention_mask[chosen].to(dev))   # [n, seq, vocab]
        rows = torch.arange(len(batch), device=logits.device)
        picked = logits[owner.to(logits.device), last_index(batch.attention_mask).to(logits.device),
                        target.to(logits.device)]                                  # [batch]
        try:
            eye = torch.eye(len(batch), dtype=picked.dtype, device=picked.device)  # one vector-Jacobian product per row
            grads = torch.autograd.grad(picked, embeds, grad_outputs=eye, is_grads_batched=True)[0]  # [batch, n, seq, d]
            grads = grads[rows, owner.to(grads.device)]                            # [batch, seq, d_model]
        except RuntimeError:                                                      # an op without a batching rule
            grads = torch.stack([torch.autograd.grad(picked[r], embeds, retain_graph=True)[0][int(owner[r])]
                                 for r in range(len(batch))])                     # [batch, seq, d_model]
    own = batch.attention_mask.to(grads.device)[:, :, None]                       # a row's own positions only
    return embeds.detach()[owner.to(embeds.device)] * own, grads * own


# -- the named methods ----------------------------------------------------------------------------
class Saliency(CaptumExplainer):
    """|∂f/∂embedding| per token: the L2 norm over d_model of the raw gradient (Simonyan et al. 2014)."""

    name = "saliency"
    attribution_class = captum.attr.Saliency

    def __init__(self, *, reduction: str = "l2"):
        self.reduction = reduction

    def captum_kwargs(self) -> dict:
        return {"abs": False}  # keep the sign; "l2" makes it a magnitude anyway, "sum" keeps direction


class InputXGradient(CaptumExplainer):
    """embedding ⊙ ∂f/∂embedding, summed over d_model (Shrikumar et al. 2016)."""

    name = "input_x_gradient"
    attribution_class = captum.attr.InputXGradient

    def __init__(self, *, reduction: str = "sum"):
        self.reduction = reduction

    def captum_kwargs(self) -> dict:
        return {}


class IntegratedGradients(CaptumExplainer):
    """(x − x') ⊙ ∫₀¹ ∂f(x' + α(x − x'))/∂x dα, Gauss–Legendre quadrature (Sundararajan et al. 2017).

    Args:
        baseline: "pad" (default), "mask" or "zero"; [CLS]/[SEP] keep their embeddings.
        n_steps: "adaptive" (default): per example, Gauss–Legendre at min_steps, then at more nodes only while
            the completeness gap is above max(tolerance · |f(x) − f(x')|, atol), up to max_steps
            (`attnaudit.explain.quadrature`). An int: exactly that many nodes for every example (for exact
            comparisons; max_tokens=None makes it one captum call, bit for bit). A ReLU makes the integrand jump, so the error falls only like
            1/n_steps, and no fixed count suits every example: on the trained keywords model 512 steps left 3
            of 32 test examples above 1% while most need 16-32 (benchmarks/ig_adaptive.py).
        tolerance, min_steps, max_steps, atol: the adaptive mode's target (relative gap; 0.01 = 1%), its first
            and last counts (doubling in between; see `quadrature.next_steps`) and the absolute gap (logit units)
            that also passes where f(x) ≈ f(x') makes the relative gap undefined. Ignored with an int n_steps.
        max_batch: at most this many interpolated inputs per forward pass (captum's
            internal_batch_size), so memory stays bounded; None = all batch·n_steps at once.
        max_memory_mb: memory budget of one forward + backward pass; max_batch is lowered until the
            estimate (`pass_bytes`) fits, and a batch whose single interpolated input does not fit is
            refused before anything is allocated. None = no budget.
        reduction: "sum" (default: Σ token scores = Σ attributions ≈ f(x) − f(x')) or "l2".
        max_cost: the most forward + backward passes per example, None = MAX_FORWARDS (4096), checked before
            anything is allocated against n_steps, or in the adaptive mode against the worst case, the sum of
            the schedule (1,008 for 16…512: Gauss–Legendre nodes are not nested, so no count reuses another's).
        max_tokens: "auto" (default): TOKENS_PER_PASS. None: all
            examples go to captum together, padded to the batch's longest, max_batch rows per pass. An int:
            examples are grouped by length and each group, padded only to its own longest, runs passes of at
            most max_tokens tokens (rows × seq), still within max_batch and max_memory_mb. Fewer padded tokens
            and cache-sized passes make it faster; the grouping changes the float summation order, so scores
            differ from one captum call in the last bits.
    extras: completeness_gap and completeness_gap_relative per example; adaptive adds n_steps (the count of the
        returned scores) and converged (1.0, or 0.0 where max_steps left the gap above its allowance). An
        example's scores are those of a fixed-n_steps call at its count on the examples run with it (a call on
        other examples agrees to float noise: tests/test_ig_adaptive.py).
    """

    name = "integrated_gradients"
    attribution_class = captum.attr.IntegratedGradients

    def __init__(self, *, baseline: str = "pad", n_steps: int | str = "adaptive", tolerance: float = 0.01,
                 min_steps: int = 16, max_steps: int = 512, atol: float = 1e-4, max_batch: int | None = 512,
                 max_memory_mb: float | None = MAX_MEMORY_MB, reduction: str = "sum", max_cost: int | None = None,
                 max_tokens: int | str | None = "auto"):
        self.baseline = baseline
        self.n_steps = n_steps
        self.tolerance = tolerance
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.atol = atol
        self.max_batch = max_batch
        self.max_memory_mb = max_memory_mb
        self.reduction = reduction
        self.max_cost = max_cost
        self.max_tokens = max_tokens

    @property
    def adaptive(self) -> bool:
        return isinstance(self.n_steps, str) and self.n_steps == ADAPTIVE

    def validate(self, model: ExplainableModel) -> None:
        super().validate(model)
        n = self.n_steps
        if not self.adaptive:
            if isinstance(n, (int, float)) and not isinstance(n, bool):
                check_positive_int("n_steps", n)                  # the message an int n_steps always had
            else:
                raise ValueError(f"n_steps must be an int >= 1 or {ADAPTIVE!r}; got {short_repr(n)}.")
        check_positive_int("min_steps", self.min_steps, maximum=MAX_ROWS)
        check_positive_int("max_steps", self.max_steps, maximum=MAX_ROWS)
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps must be <= max_steps; got min_steps={self.min_steps}, "
                             f"max_steps={self.max_steps}. Lower min_steps or raise max_steps.")
        t = self.tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
            raise ValueError(f"tolerance must be a number in (0, 1) (the completeness gap over |f(x) − f(x')|; "
                             f"0.01 = 1%); got {short_repr(t)}.")
        a = self.atol
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a >= 0:
            raise ValueError(f"atol must be a number >= 0 (an absolute completeness gap, in logits); "
                             f"got {short_repr(a)}.")
        if self.adaptive and self.baseline is None:
            raise ValueError("n_steps='adaptive' measures the completeness gap against a baseline; got baseline=None. "
                             "Pass baseline='pad', 'mask' or 'zero', or an int n_steps.")
        check_positive_int("max_batch", self.max_batch, allow_none=True, maximum=MAX_ROWS)
        check_max_cost(self.max_cost)
        if not (isinstance(self.max_tokens, str) and self.max_tokens == "auto"):
            if isinstance(self.max_tokens, str):
                raise ValueError(f"max_tokens must be 'auto', an int >= 1 or None; got {self.max_tokens!r}.")
            check_positive_int("max_tokens", self.max_tokens, allow_none=True)
        m = self.max_memory_mb
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
            raise ValueError(f"max_memory_mb must be a number > 0 (megabytes per forward + backward pass) or None; "
                             f"got {m!r}.")

    def schedule(self) -> list[int]:
        """The counts an example may run at: [n_steps], or min_steps doubled up to max_steps when adaptive."""
        return step_schedule(self.min_steps, self.max_steps) if self.adaptive else [int(self.n_steps)]

    def tokens_per_pass(self) -> int | None:
        """max_tokens with "auto" resolved: TOKENS_PER_PASS (None: one captum call)."""
        if isinstance(self.max_tokens, str):                      # "auto", as validate allows
            return TOKENS_PER_PASS
        return None if self.max_tokens is None else int(self.max_tokens)

    def costs(self, model: ExplainableModel, batch: Batch):
        # numpy's Gauss–Legendre nodes come from an n_steps × n_steps float64 eigenproblem
        schedule = self.schedule()
        per_forward = pass_bytes(model, 1, batch.input_ids.shape[1])
        if not self.adaptive:
            return [forwards_cost("n_steps", schedule[0], self.max_cost, extra_bytes=8.0 * schedule[0] ** 2,
                                  per_forward_bytes=per_forward)]
        worst = sum(schedule)                                     # every count of the schedule, none shared
        limit = MAX_FORWARDS if self.max_cost is None else self.max_cost
        memory = 8.0 * schedule[-1] ** 2 + worst * per_forward
        return [Cost("max_steps", self.max_steps, worst, limit,
                     f"≈ {memory:.1e} bytes / {worst:.1e} forward passes per example at worst (adaptive: "
                     f"{' + '.join(map(str, schedule))})")]

    def check_limits(self, model: ExplainableModel, batch: Batch) -> None:
        super().check_limits(model, batch)
        self.rows_per_pass(model, batch)

    def rows_per_pass(self, model: ExplainableModel, batch: Batch) -> int:
        """Interpolated inputs per forward pass: max_batch (or all), lowered to fit max_memory_mb."""
        rows = len(batch) * self.schedule()[-1] if self.max_batch is None else self.max_batch
        if self.max_memory_mb is None:
            return rows
        return min(rows, self.rows_in_memory(model, batch.input_ids.shape[1]))

    def rows_in_memory(self, model: ExplainableModel, seq: int) -> int:
        """How many interpolated inputs of `seq` tokens one pass may hold under max_memory_mb (>= 1, else raise)."""
        if self.max_memory_mb is None:
            return MAX_ROWS
        one = pass_bytes(model, 1, seq)
        budget = self.max_memory_mb * 2**20
        if one > budget:
            raise ValueError(f"integrated_gradients: one interpolated input of {seq} tokens needs "
                             f"about {one / 2**20:,.3g} MB for its forward and backward pass, more than "
                             f"max_memory_mb={self.max_memory_mb}; raise max_memory_mb "
                             "([audit.explainer_params.integrated_gradients] in a config) or shorten the examples.")
        return max(1, int(budget // one))

    def captum_kwargs(self) -> dict:
        return {"n_steps": self.n_steps, "method": "gausslegendre", "internal_batch_size": self.max_batch}

    def with_steps(self, n_steps: int) -> IntegratedGradients:
        """This explainer at a fixed count, max_tokens resolved: what adaptive runs at each of its counts."""
        fixed = copy.copy(self)
        fixed.n_steps, fixed.max_tokens = n_steps, self.tokens_per_pass()
        return fixed

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # captum finds the Gauss–Legendre nodes with numpy (an n_steps × n_steps eigenproblem). Once torch's
        # OpenMP threads exist, numpy's multi-threaded OpenBLAS can stall on it (measured on 2 cores:
        # 4 s instead of 0.05 s for 512 nodes, twice per call), so numpy gets one BLAS thread meanwhile.
        with threadpool_limits(limits=1, user_api="blas"):
            if not self.adaptive:
                return self.with_steps(int(self.n_steps))._fixed_scores(model, batch, target)

            def run(n_steps: int, rows: list[int]) -> tuple[Tensor, dict[str, Tensor]]:
                return self.with_steps(n_steps)._fixed_scores(model, batch.select(rows), target[rows])

            return adaptive_scores(run, (len(batch), batch.input_ids.shape[1]), self.schedule(), tolerance=self.tolerance,
                                   atol=self.atol)

    def _fixed_scores(self, model: ExplainableModel, batch: Batch,
                      target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.tokens_per_pass() is not None:
            return self._scores_by_length(model, batch, target)
        fitted = copy.copy(self)                                  # the same explainer with a smaller batch
        fitted.max_batch, fitted.max_memory_mb = self.rows_per_pass(model, batch), None
        return fitted._scores_in_parts(model, batch, target)

    def _scores_by_length(self, model: ExplainableModel, batch: Batch,
                          target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # max_tokens: examples sorted by length, grouped greedily while the group's n_steps rows per example,
        # padded to its longest, fit max_tokens; a group that does not fit whole is run in chunks of steps.
        budget, n_steps = self.tokens_per_pass(), int(self.n_steps)
        assert budget is not None and not self.adaptive                          # _fixed_scores calls it so
        lengths = batch.attention_mask.sum(1).tolist()                           # [batch]
        order = sorted(range(len(batch)), key=lambda i: lengths[i])
        groups: list[list[int]] = []
        for i in order:                                                          # ascending: i is the group's longest
            if groups and (len(groups[-1]) + 1) * n_steps * lengths[i] <= budget:
                groups[-1].append(i)
            else:
                groups.append([i])
        out = torch.zeros(batch.input_ids.shape)                                 # [batch, seq]
        extras: dict[str, Tensor] = {}
        for group in groups:
            part = batch.select(group)                                           # trimmed to the group's longest
            seq = part.input_ids.shape[1]
            rows = min(max(1, budget // seq), self.rows_in_memory(model, seq))
            if self.max_batch is not None:
                rows = min(rows, self.max_batch)
            fitted = copy.copy(self)
            fitted.max_batch, fitted.max_memory_mb, fitted.max_tokens = rows, None, None
            s, e = fitted._scores_in_parts(model, part, target[group])           # [group, seq_group]
            out[group, :seq] = s.cpu()
            for k, v in e.items():
                extras.setdefault(k, torch.zeros(len(batch)))[group] = v.cpu()
        return out, extras

    def _scores_in_parts(self, model: ExplainableModel, batch: Batch,
                         target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # captum runs at least one step for every example at once, so more than max_batch examples
        # are split here: then no forward pass exceeds max_batch rows.
        size = len(batch) if self.max_batch is None else self.max_batch
        if len(batch) <= size:
            return super().scores(model, batch, target)
        out = torch.zeros(batch.input_ids.shape)                                 # [batch, seq]
        extras: dict[str, list[Tensor]] = {}
        for start in range(0, len(batch), size):
            part = list(range(start, min(start + size, len(batch))))
            s, e = super().scores(model, batch.select(part), target[part])      # [part, seq_part]
            out[part, : s.shape[1]] = s.cpu()
            for k, v in e.items():
                extras.setdefault(k, []).append(v.cpu())
        return out, {k: torch.cat(v) for k, v in extras.items()}


class DeepLift(CaptumExplainer):
    """DeepLIFT with the Rescale rule (Shrikumar et al. 2017), captum's implementation.

    The Rescale rule replaces the gradient by Δout/Δin only at nonlinearities that are nn.Modules captum
    knows (the built-in model: the ReLU in each feed-forward block). The attention softmax (a function
    call, not an nn.Softmax), LayerNorm and the bilinear Q·Kᵀ and pattern·V products pass plain
    gradients at the input, so the result is a hybrid of DeepLIFT and gradient × (x − x'): finite,
    but Σ attributions = f(x) − f(x') does not hold (on the tiny test model the gap is from 10% to
    over 300% of |f(x) − f(x')|); extras["completeness_gap"] says how far off, per example.

    Args:
        baseline: "pad" (default), "mask" or "zero".
        reduction: "sum" (default) or "l2".
    """

    name = "deeplift"
    attribution_class = captum.attr.DeepLift

    def __init__(self, *, baseline: str = "pad", reduction: str = "sum"):
        self.baseline = baseline
        self.reduction = reduction

    def captum_kwargs(self) -> dict:
        return {}

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with warnings.catch_warnings():  # captum announces its (temporary) hooks on every call
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks", category=UserWarning)
            return super().scores(model, batch, target)


class GradientShap(CaptumExplainer):
    """Expected gradients (Lundberg & Lee 2017; Erion et al. 2021): E[(x − x')·∂f(x' + α(x − x'))/∂x].

    The expectation is over a reference drawn from `baselines`, α ~ U(0, 1) and Gaussian noise of
    `stdevs` added to x, estimated from `n_samples` draws per example.

    Args:
        baselines: the reference kinds to draw from (each "pad", "mask" or "zero").
        n_samples: draws per example.
        stdevs: standard deviation of the noise added to the embeddings (0 = none).
        seed: with the example's token ids, seeds its draws (`example_seed`): an example gets the
            same scores alone or in a batch. Examples are explained one at a time for that reason.
        reduction: "sum" (default) or "l2".
        max_cost: the most draws (forward + backward passes, all in one batch) per example, None = MAX_FORWARDS.
    """

    name = "gradient_shap"
    attribution_class = captum.attr.GradientShap

    def __init__(self, *, baselines: tuple[str, ...] = ("pad", "mask", "zero"), n_samples: int = 16,
                 stdevs: float = 0.0, seed: int = 0, reduction: str = "sum", max_cost: int | None = None):
        self.baselines = baselines
        self.n_samples = n_samples
        self.stdevs = stdevs
        self.seed = seed
        self.reduction = reduction
        self.max_cost = max_cost

    def validate(self, model: ExplainableModel) -> None:
        super().validate(model)
        if isinstance(self.baselines, str) or not isinstance(self.baselines, (tuple, list)) or not self.baselines:
            raise ValueError(f"baselines must be a non-empty tuple of {BASELINES}; got {self.baselines!r}. "
                             f"Wrap a single kind in a tuple, e.g. ('pad',).")
        for kind in self.baselines:
            check_choice("each of baselines", kind, BASELINES)
        check_positive_int("n_samples", self.n_samples)
        check_max_cost(self.max_cost)
        if isinstance(self.stdevs, bool) or not isinstance(self.stdevs, (int, float)) or not self.stdevs >= 0:
            raise ValueError(f"stdevs must be a number >= 0 (the noise on the embeddings); got {self.stdevs!r}.")
        check_seed(self.seed)

    def costs(self, model: ExplainableModel, batch: Batch):
        return [forwards_cost("n_samples", self.n_samples, self.max_cost,
                              per_forward_bytes=pass_bytes(model, 1, batch.input_ids.shape[1]))]

    def captum_kwargs(self) -> dict:
        return {"n_samples": self.n_samples, "stdevs": float(self.stdevs)}

    def make_baselines(self, model: ExplainableModel, batch: Batch, embeds: Tensor) -> Tensor:
        # captum draws references from the first dimension, so one example at a time: [n_refs, seq, d_model]
        return torch.cat([baseline_embeds(model, batch, embeds, kind) for kind in self.baselines])

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out = torch.zeros(batch.input_ids.shape)                                  # [batch, seq]
        for i in range(len(batch)):
            one = batch.select([i])                                               # trimmed to its length
            real = one.input_ids[0][one.attention_mask[0]].tolist()
            with seeded(example_seed(self.seed, real)):
                s, _ = super().scores(model, one, target[i : i + 1])              # [1, len_i]
            out[i, : s.shape[1]] = s[0].cpu()
        return out, {}                                                            # no completeness gap: no delta
