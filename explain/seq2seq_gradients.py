"""Path-gradient explainers of an encoder–decoder's teacher-forced target: scores [batch, tgt, src].

    ig = integrated_gradients(model, pairs)                  # [batch, tgt, src]
    full = integrated_gradients_with_gap(model, pairs)       # .scores, .gap, .change: completeness per (example, t)
    dl, gs = deeplift(model, pairs), gradient_shap(model, pairs)

What is attributed: for every target position t, f_t = log p(y_t | y_<t, x) of the reference token
`pairs.tgt_out[:, t]` (log_softmax, as the saliency and input×gradient of `explain.seq2seq`), as a function of the
SOURCE token embeddings `model.encoder_embeds(src_ids)` [batch, src, d_model]; the target prefix is kept
(teacher forcing). Embedding attributions are summed over d_model (so IG keeps completeness: Σ_src scores ≈
f_t(x) − f_t(x')). Positions where no example has a target token (`pairs.tgt_mask` all False) and each
example's own target padding get 0, as does source padding.

Baselines ("pad", "mask", "zero") replace the embedding of every real, non-special source token by the [PAD]
embedding, the [MASK] embedding or zeros; specials and padding keep their own embeddings (as the classifier's
`explain.gradients.baseline_embeds`), so their (x − x') is 0. Defaults and parameter names follow the
classifier's `IntegratedGradients`, `DeepLift` and `GradientShap` (explain/gradients.py), except IG's n_steps (50:
a translator has a backward per target position, so every step costs tgt backwards).

How target positions share work:
    integrated_gradients  one forward of the interpolated inputs (max_batch rows a pass) and one backward per
                          target position from it: Gauss–Legendre nodes and weights are captum's, so the scores
                          equal captum's IntegratedGradients(method="gausslegendre") run once per position
                          (tests/test_seq2seq_gradients.py checks it).
    deeplift              captum's DeepLift on `LogProbForward` (an nn.Module whose children hold model.net), one
                          attribute call per target position.
    gradient_shap         captum's GradientShap, one example at a time, one attribute call per target position,
                          each entered with the same seed (`example_seed` of the seed and the example's source
                          ids): every position sees the same references, α and noise, and an example gets the same
                          scores alone or in a batch.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import captum.attr
import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from attnaudit.explain.base import MAX_ROWS, check_choice
from attnaudit.explain.control import check_seed, example_seed, seeded
from attnaudit.explain.gradients import BASELINES, check_positive_int
from attnaudit.explain.seq2seq import Seq2SeqModel, check_pairs, on_cells, reference_log_probs
from attnaudit.model.interface import Batch
from attnaudit.model.seq2seq import PairBatch

__all__ = ["BASELINES", "IGResult", "LogProbForward", "deeplift", "explained_positions", "forward_args",
           "gauss_legendre", "gradient_shap", "integrated_gradients", "integrated_gradients_with_gap",
           "source_baseline", "trimmed_example"]

# -- building blocks ------------------------------------------------------------------------------
def source_baseline(model: Seq2SeqModel, src: Batch, embeds: Tensor, kind: str) -> Tensor:
    """The reference source: real non-special tokens' embeddings replaced by [PAD]/[MASK]/zero embeddings.

    Args:
        embeds: [batch, src, d_model], `model.encoder_embeds(src.input_ids)`.
        kind: "pad", "mask" or "zero".
    Returns:
        [batch, src, d_model]: equal to `embeds` on special tokens and padding.
    """
    replaced = (src.attention_mask & ~src.special_mask).to(embeds.device)           # [batch, src]
    if kind == "zero":
        ref = torch.zeros_like(embeds)
    else:
        token = model.pad_id if kind == "pad" else model.mask_id
        with torch.no_grad():
            ref = model.encoder_embeds(torch.full_like(src.input_ids, token)).to(embeds.dtype)  # [batch, src, d_model]
    return torch.where(replaced[..., None], ref, embeds)


def explained_positions(pairs: PairBatch) -> list[int]:
    """The target positions t where some example has a target token (`pairs.tgt_mask[:, t]` any True)."""
    _, _, tgt_mask = pairs.targets()
    return tgt_mask.any(0).nonzero()[:, 0].tolist()


class LogProbForward(nn.Module):
    """source embeds [n, src, d_model] + the teacher-forcing tensors -> log p(y_t | y_<t, x) [n, tgt].

    Every argument is a Tensor with the rows first, so captum can repeat them with the inputs (IG's steps,
    DeepLift's input/baseline halves, GradientShap's samples). An nn.Module whose children are the model's
    modules (`model.net`), so DeepLift can hook its nonlinearities; nothing is copied.
    """

    def __init__(self, model: Seq2SeqModel):
        super().__init__()
        self.model = model                            # a plain attribute: the translator itself is no Module
        self.net = model.net

    def forward(self, embeds: Tensor, src_mask: Tensor, tgt_in: Tensor, tgt_out: Tensor, tgt_mask: Tensor) -> Tensor:
        src = Batch(src_mask.long(), src_mask.bool(), torch.zeros_like(src_mask, dtype=torch.bool), tokens=[])
        pairs = PairBatch(src, tgt_in, tgt_out, tgt_mask.bool())
        return reference_log_probs(self.model.logits_from_src_embeds(embeds, pairs), tgt_out)   # [n, tgt]


def forward_args(pairs: PairBatch, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`LogProbForward`'s additional arguments for `pairs`: (src_mask, tgt_in, tgt_out, tgt_mask), on `device`."""
    tgt_in, tgt_out, tgt_mask = pairs.targets()
    return (pairs.src.attention_mask.to(device), tgt_in.to(device), tgt_out.to(device), tgt_mask.to(device))


def _check_common(pairs: PairBatch, baselines: Sequence[str]) -> None:
    check_pairs(pairs)
    for kind in baselines:
        check_choice("baseline", kind, BASELINES, " Pick the reference that replaces the source words.")


# -- integrated gradients -------------------------------------------------------------------------
@dataclass(frozen=True)
class IGResult:
    """Integrated gradients with their completeness check, per (example, target position).

    scores [batch, tgt, src]; change [batch, tgt] = f_t(x) − f_t(x'); gap [batch, tgt] = Σ_src scores − change
    (captum's convergence delta); 0 where the example has no target token.
    """

    scores: Tensor
    change: Tensor
    gap: Tensor

    @property
    def gap_relative(self) -> Tensor:
        """|gap| / |change| [batch, tgt] (0 where both are 0)."""
        return self.gap.abs() / self.change.abs().clamp_min(1e-12)


def gauss_legendre(n_steps: int) -> tuple[list[float], list[float]]:
    """captum's Gauss–Legendre nodes α in (0, 1) and weights (summing to 1), `n_steps` of each."""
    step_sizes, alphas = approximation_parameters("gausslegendre")
    with threadpool_limits(limits=1, user_api="blas"):     # numpy's eigenproblem can stall under torch's threads
        return list(alphas(n_steps)), list(step_sizes(n_steps))


def integrated_gradients_with_gap(model: Seq2SeqModel, pairs: PairBatch, *, n_steps: int = 50, baseline: str = "pad",
                                  max_batch: int = 256) -> IGResult:
    """Integrated gradients (Sundararajan et al. 2017) of f_t = log p(y_t | y_<t, x) w.r.t. the source embeddings,
    summed over d_model, at every target position, with completeness per (example, t).

    Σ_d (x − x') ⊙ Σ_k w_k ∂f_t(x' + α_k (x − x'))/∂x, Gauss–Legendre (α_k, w_k) as captum's. The batch·n_steps
    interpolated inputs (row k·batch + b: step k of example b, captum's order) run `max_batch` rows a forward;
    each forward gives f_t at every t and one backward per explained position, whose gradient is reduced to
    [rows, src] at once (memory: [batch, tgt, src], not × d_model). x' is `source_baseline(baseline)`.
    """
    _check_common(pairs, [baseline])
    check_positive_int("n_steps", n_steps)
    check_positive_int("max_batch", max_batch, maximum=MAX_ROWS)
    alphas, weights = gauss_legendre(n_steps)
    positions = explained_positions(pairs)
    _, tgt_out, tgt_mask = pairs.targets()
    dev, n, n_tgt = model.device, len(pairs.src), tgt_out.shape[1]
    with model.evaluating():
        with torch.no_grad():
            x = model.encoder_embeds(pairs.src.input_ids).float()                      # [batch, src, d_model]
        base = source_baseline(model, pairs.src, x, baseline)                          # [batch, src, d_model]
        diff = x - base                                                                # [batch, src, d_model]
        scores = torch.zeros(n, n_tgt, x.shape[1], device=dev)                         # [batch, tgt, src]
        example = torch.arange(n).repeat(n_steps)                                      # [step·batch] row -> example
        step = torch.arange(n_steps).repeat_interleave(n)                              # [step·batch] row -> step
        alpha = torch.tensor(alphas, dtype=x.dtype, device=dev)                        # [step]
        weight = torch.tensor(weights, dtype=x.dtype, device=dev)                      # [step]
        for lo in range(0, n * n_steps, max_batch):
            ex, st = example[lo : lo + max_batch], step[lo : lo + max_batch]           # [rows] each
            a = alpha[st.to(dev)][:, None, None]                                       # [rows, 1, 1]
            z = (base[ex] + a * diff[ex]).detach().requires_grad_(True)                # [rows, src, d_model]
            chunk = pairs.rows(ex)
            with torch.enable_grad():
                logp = reference_log_probs(model.logits_from_src_embeds(z, chunk), tgt_out[ex])    # [rows, tgt]
                for j, t in enumerate(positions):
                    g = torch.autograd.grad(logp[:, t].sum(), z, retain_graph=j < len(positions) - 1)[0]
                    part = (g.float() * diff[ex]).sum(-1) * weight[st.to(dev)][:, None]   # [rows, src]
                    scores[:, t].index_add_(0, ex.to(dev), part)                       # Σ_k w_k (g_k · (x − x'))
        change = torch.zeros(n, n_tgt)                                                # [batch, tgt]
        with torch.no_grad():
            for lo in range(0, n, max_batch):
                sl = slice(lo, lo + max_batch)
                chunk = pairs.rows(sl)
                f_x = reference_log_probs(model.logits_from_src_embeds(x[sl], chunk), tgt_out[sl])     # [chunk, tgt]
                f_b = reference_log_probs(model.logits_from_src_embeds(base[sl], chunk), tgt_out[sl])  # [chunk, tgt]
                change[lo : lo + max_batch] = (f_x - f_b).cpu()                        # [chunk, tgt]
    scores = on_cells(scores, pairs)
    on = tgt_mask.cpu()                                                                # [batch, tgt]
    change = torch.where(on, change, 0.0)
    return IGResult(scores=scores, change=change, gap=torch.where(on, scores.sum(-1) - change, 0.0))


def integrated_gradients(model: Seq2SeqModel, pairs: PairBatch, *, n_steps: int = 50, baseline: str = "pad",
                         max_batch: int = 256) -> Tensor:
    """Integrated gradients of log p(y_t | y_<t, x) over the source tokens -> [batch, tgt, src] (float32, CPU).

    See `integrated_gradients_with_gap`, which also returns the completeness gap per (example, t).
    """
    return integrated_gradients_with_gap(model, pairs, n_steps=n_steps, baseline=baseline, max_batch=max_batch).scores


# -- DeepLIFT -------------------------------------------------------------------------------------
def deeplift(model: Seq2SeqModel, pairs: PairBatch, *, baseline: str = "pad") -> Tensor:
    """DeepLIFT, Rescale rule (captum's `DeepLift`), of log p(y_t | y_<t, x) over the source tokens -> [batch, tgt, src].

    One captum call per explained target position (target=t) on `LogProbForward(model)`. As on the classifier
    (`explain.gradients.DeepLift`) the Rescale rule applies only at nonlinearities that are nn.Modules captum
    knows; softmax, LayerNorm and the attention products pass plain gradients, so Σ scores = f_t(x) − f_t(x')
    does not hold.
    """
    _check_common(pairs, [baseline])
    dev = model.device
    out = torch.zeros(*pairs.targets()[1].shape, pairs.src.input_ids.shape[1])        # [batch, tgt, src]
    with model.evaluating():
        with torch.no_grad():
            x = model.encoder_embeds(pairs.src.input_ids).float()                      # [batch, src, d_model]
        base = source_baseline(model, pairs.src, x, baseline)                          # [batch, src, d_model]
        method = captum.attr.DeepLift(LogProbForward(model))
        args = forward_args(pairs, dev)
        with warnings.catch_warnings():  # captum announces its (temporary) hooks on every call
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks", category=UserWarning)
            for t in explained_positions(pairs):
                attr = method.attribute(x.clone().requires_grad_(True), baselines=base, target=t,
                                        additional_forward_args=args)                  # [batch, src, d_model]
                out[:, t] = attr.detach().sum(-1).float().cpu()
    return on_cells(out, pairs)


# -- GradientSHAP ---------------------------------------------------------------------------------
def trimmed_example(pairs: PairBatch, i: int) -> PairBatch:
    """Example i of `pairs` alone, its source and target cut to their own lengths (so alone = in a batch)."""
    _, _, tgt_mask = pairs.targets()
    one = pairs.rows(torch.tensor([i]))
    s, t = int(pairs.src.attention_mask[i].sum()), max(1, int(tgt_mask[i].sum()))
    src = Batch(one.src.input_ids[:, :s], one.src.attention_mask[:, :s], one.src.special_mask[:, :s], tokens=[])
    tgt_in, tgt_out, one_mask = one.targets()
    return PairBatch(src, tgt_in[:, :t], tgt_out[:, :t], one_mask[:, :t])


def _check_shap(baselines, n_samples, stdevs, seed) -> None:
    if isinstance(baselines, str) or not isinstance(baselines, (tuple, list)) or not baselines:
        raise ValueError(f"baselines must be a non-empty tuple of {BASELINES}; got {baselines!r}. "
                         f"Wrap a single kind in a tuple, e.g. ('pad',).")
    for kind in baselines:
        check_choice("each of baselines", kind, BASELINES)
    check_positive_int("n_samples", n_samples)
    if isinstance(stdevs, bool) or not isinstance(stdevs, (int, float)) or not stdevs >= 0:
        raise ValueError(f"stdevs must be a number >= 0 (the noise on the embeddings); got {stdevs!r}.")
    check_seed(seed)


def gradient_shap(model: Seq2SeqModel, pairs: PairBatch, *, baselines: tuple[str, ...] = ("pad", "mask", "zero"),
                  n_samples: int = 16, stdevs: float = 0.0, seed: int = 0) -> Tensor:
    """GradientSHAP / expected gradients (captum's `GradientShap`) of log p(y_t | y_<t, x) -> [batch, tgt, src].

    E[(x̃ − x')·∂f_t(x' + α(x̃ − x'))/∂x], x' drawn from `baselines` (`source_baseline` kinds), α ~ U(0, 1),
    x̃ = x + N(0, stdevs²), `n_samples` draws. One example at a time (trimmed to its lengths), one captum call
    per target position, each seeded with `example_seed(seed, the example's real source ids)`: every position
    of an example uses the same draws, and an example gets the same scores alone or in a batch.
    """
    _check_common(pairs, [])
    _check_shap(baselines, n_samples, stdevs, seed)
    dev = model.device
    out = torch.zeros(*pairs.targets()[1].shape, pairs.src.input_ids.shape[1])        # [batch, tgt, src]
    with model.evaluating():
        for i in range(len(pairs.src)):
            one = trimmed_example(pairs, i)
            s, n_t = one.src.input_ids.shape[1], int(pairs.targets()[2][i].sum())
            with torch.no_grad():
                x = model.encoder_embeds(one.src.input_ids).float()                    # [1, src_i, d_model]
            refs = torch.cat([source_baseline(model, one.src, x, k) for k in baselines])   # [n_refs, src_i, d_model]
            method = captum.attr.GradientShap(LogProbForward(model))
            args = forward_args(one, dev)
            real = pairs.src.input_ids[i][pairs.src.attention_mask[i]].tolist()
            for t in range(n_t):
                with seeded(example_seed(seed, real)):
                    attr = method.attribute(x.clone().requires_grad_(True), baselines=refs, target=t,
                                            n_samples=n_samples, stdevs=float(stdevs),
                                            additional_forward_args=args)              # [1, src_i, d_model]
                out[i, t, :s] = attr[0].detach().sum(-1).float().cpu()
    return on_cells(out, pairs)
