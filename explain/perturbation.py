"""Perturbation explainers: leave-one-out occlusion, LIME and KernelSHAP.

Occlusion (Zeiler & Fergus 2014; "leave one out" in Li et al. 2016) removes one token at a time.
LIME (Ribeiro et al. 2016) and KernelSHAP (Lundberg & Lee 2017) fit a linear model of token presence to
the outputs on random subsets of the tokens, through captum.

    >>> get_explainer("occlusion", policy="delete").explain(model, ["a fine film"])

What is explained: f = the target class's probability (softmax of the logits), the scale on which
"removing this word lowers the probability by 0.3" reads naturally. [CLS]/[SEP] are never perturbed
or removed and get score 0; padding stays padding. Every perturbed forward runs through the project's
one engine, `attnaudit.explain.perturb.PerturbationEngine` (in float32: no bf16 autocast on CUDA, as
explanation scores are small differences of probabilities), so identical perturbations run once.
"""
from __future__ import annotations

import captum.attr
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr._core.lime import get_exp_kernel_similarity_function
from torch import Tensor

from attnaudit.explain.base import MAX_ROWS, Explainer, check_choice, check_max_cost, forwards_cost
from attnaudit.explain.control import check_seed, example_seed, seeded
from attnaudit.explain.gradients import baseline_embeds, check_positive_int
from attnaudit.explain.perturb import engine_for, leave_one_out
from attnaudit.model.interface import Batch, ExplainableModel

POLICIES = ("mask", "delete")


def target_probs(model: ExplainableModel, input_ids: Tensor, attention_mask: Tensor, target: Tensor, *,
                 max_batch: int) -> Tensor:
    """P(target | input) for each row, in chunks of at most `max_batch` rows -> [rows] (CPU).

    A plain forward with no perturbation logic: tests use it as the reference the engine must match.
    """
    out = []
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], max_batch):
            part = slice(start, start + max_batch)
            embeds = model.embed(input_ids[part])                                 # [chunk, seq, d_model]
            logits = model.logits_from_embeds(embeds, attention_mask[part])       # [chunk, n_classes]
            probs = logits.float().softmax(-1).cpu()                              # [chunk, n_classes]
            out.append(probs.gather(1, target[part, None].cpu())[:, 0])
    return torch.cat(out)


def _engine(model: ExplainableModel, batch: Batch, *, policy: str, max_batch: int):
    """The perturbation engine for one explain call: the enclosing `perturb.sharing` block's (the audit's, per
    chunk) when it serves this model and batch, so its cached forwards are reused; else a fresh one."""
    return engine_for(model, batch, policy=policy, max_batch=max_batch, autocast=False)


class Occlusion(Explainer):
    """score_i = f(x) − f(x without token i), f the target probability.

    Args:
        policy: "mask" replaces token i by [MASK]; "delete" removes it (later tokens shift left, the
            attention mask loses one position), so the model sees a shorter, well-formed input.
        max_batch: at most this many perturbed inputs per forward pass. The perturbed inputs of a batch
            (one per real, non-special token) are `leave_one_out` on the perturbation engine.
    """

    name = "occlusion"
    family = "perturbation"

    def __init__(self, *, policy: str = "mask", max_batch: int = 256):
        self.policy = policy
        self.max_batch = max_batch

    def validate(self, model: ExplainableModel) -> None:
        check_choice("policy", self.policy, POLICIES, " 'mask' writes [MASK] over the token; 'delete' removes it.")
        check_positive_int("max_batch", self.max_batch, maximum=MAX_ROWS)

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> Tensor:
        engine = _engine(model, batch, policy=self.policy, max_batch=self.max_batch)
        return leave_one_out(engine, batch, target=target.cpu(), policy=self.policy)  # [batch, seq], 0 on specials


class _Sampled(Explainer):
    """LIME / KernelSHAP through captum: one binary feature per real, non-special token.

    A token that is "absent" in a sample is replaced by [MASK] (the engine's "mask" policy; the
    attention mask is unchanged). captum sees each example as its vector of token presences (all ones,
    baseline all zeros) and the forward turns a sample into a keep-mask for the engine, so repeated
    coalitions run once. captum fits one surrogate per example, so examples are explained one at a
    time, each with draws seeded from `seed` and its token ids (`example_seed`): an example gets the
    same scores alone or in a batch. New coalitions run `max_batch` per forward pass.
    """

    family = "perturbation"
    exact_for_one_word = False
    n_samples: int                  # the parameters every subclass stores (annotations only: get_params
    max_batch: int                  # reads what the subclass's constructor set)
    seed: int
    max_cost: int | None

    def validate(self, model: ExplainableModel) -> None:
        check_positive_int("n_samples", self.n_samples)
        check_positive_int("max_batch", self.max_batch, maximum=MAX_ROWS)
        check_max_cost(self.max_cost)
        check_seed(self.seed)

    def costs(self, model: ExplainableModel, batch: Batch):
        return [forwards_cost("n_samples", self.n_samples, self.max_cost)]   # one forward per sample

    def make_method(self, forward, model: ExplainableModel, one: Batch, pos: Tensor):
        """The captum method for one example `one` whose features are the word positions `pos`."""
        raise NotImplementedError

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> Tensor:
        engine = _engine(model, batch, policy="mask", max_batch=self.max_batch)
        words = engine.attention_mask & ~engine.special_mask                       # [batch, seq]
        out = torch.zeros(batch.input_ids.shape)                                   # [batch, seq]
        for i in range(len(batch)):
            pos = words[i].nonzero()[:, 0]                                         # [n_features]
            if len(pos) == 0:
                continue

            def forward(present: Tensor, i=i, pos=pos) -> Tensor:                 # [rows, n_features] 0/1
                keep = engine.attention_mask[i].repeat(len(present), 1)            # [rows, seq]
                keep[:, pos] = present.cpu() > 0.5
                return engine.evaluate(torch.full((len(present),), i), keep, policy="mask")  # [rows, n_classes]

            everything = torch.ones(1, len(pos))                                   # [1, n_features]
            if len(pos) == 1 and self.exact_for_one_word:                          # Shapley value of a lone player
                p = forward(torch.cat([everything, torch.zeros_like(everything)]))[:, int(target[i])]
                out[i, pos] = p[0] - p[1]
                continue
            method = self.make_method(forward, model, batch.select([i]), pos)
            real = batch.input_ids[i][batch.attention_mask[i]].tolist()
            with seeded(example_seed(self.seed, real)), torch.no_grad():
                coef = method.attribute(
                    everything, baselines=torch.zeros_like(everything), target=int(target[i]),
                    feature_mask=torch.arange(len(pos))[None], n_samples=self.n_samples,
                    perturbations_per_eval=min(self.max_batch, self.n_samples), return_input_shape=False,
                )                                                                  # [1, n_features]
            out[i, pos] = coef[0].detach().float().cpu()
        return out


class Lime(_Sampled):
    """LIME: a ridge regression of the target probability on token presence, weighted by similarity.

    Args:
        n_samples: random subsets per example (each token kept with probability 1/2).
        alpha: the ridge penalty (the lime package's default, 1.0; captum's default Lasso zeroes every
            coefficient when the probability barely moves, as on an untrained model).
        max_batch: samples per forward pass.
        seed: with the example's token ids, seeds its samples (the same scores alone or in a batch).
        max_cost: the most samples (forward passes) per example, None = MAX_FORWARDS (4096).
    Samples are weighted by exp(−d²/2) with d the cosine distance between the sample's token embeddings
    (absent words as the [MASK] embedding) and the input's (captum's default kernel, width 1).
    """

    name = "lime"

    def __init__(self, *, n_samples: int = 256, alpha: float = 1.0, max_batch: int = 256, seed: int = 0,
                 max_cost: int | None = None):
        self.n_samples = n_samples
        self.alpha = alpha
        self.max_batch = max_batch
        self.seed = seed
        self.max_cost = max_cost

    def validate(self, model: ExplainableModel) -> None:
        super().validate(model)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
            raise ValueError(f"alpha must be a number >= 0 (the ridge penalty); got {self.alpha!r}.")

    def make_method(self, forward, model: ExplainableModel, one: Batch, pos: Tensor):
        with torch.no_grad():
            embeds = model.embed(one.input_ids)                                    # [1, seq, d_model]
            masked = baseline_embeds(model, one, embeds, "mask")                   # [MASK] on words only
        kernel = get_exp_kernel_similarity_function("cosine", kernel_width=1.0)

        def as_embeds(present: Tensor) -> Tensor:                                 # [1, n_features] -> [1, seq, d_model]
            on = torch.ones(embeds.shape[1], dtype=torch.bool)
            on[pos] = present[0].cpu() > 0.5
            return torch.where(on[None, :, None].to(embeds.device), embeds, masked)

        def similarity(original: Tensor, perturbed: Tensor, interpretable: Tensor, **kwargs) -> float:
            return kernel(as_embeds(original), as_embeds(perturbed), interpretable)

        return captum.attr.Lime(forward, interpretable_model=SkLearnRidge(alpha=float(self.alpha)),
                                similarity_func=similarity)


class KernelShap(_Sampled):
    """KernelSHAP: Shapley values of token presence, estimated by captum's weighted linear regression.

    Args:
        n_samples: coalitions per example (the first two are all tokens and none). A one-word example
            gets its exact Shapley value, f(x) − f(x with the word masked).
        max_batch: samples per forward pass.
        seed: with the example's token ids, seeds its samples (the same scores alone or in a batch).
        max_cost: the most coalitions (forward passes) per example, None = MAX_FORWARDS (4096).
    """

    name = "kernel_shap"
    exact_for_one_word = True  # captum's coalition-size distribution is empty (NaN) for one feature

    def __init__(self, *, n_samples: int = 256, max_batch: int = 256, seed: int = 0, max_cost: int | None = None):
        self.n_samples = n_samples
        self.max_batch = max_batch
        self.seed = seed
        self.max_cost = max_cost

    def make_method(self, forward, model: ExplainableModel, one: Batch, pos: Tensor):
        return captum.attr.KernelShap(forward)
