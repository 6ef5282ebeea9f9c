"""Perturbation explainers: leave-one-out occlusion, LIME and KernelSHAP.

Occlusion (Zeiler & Fergus 2014; "leave one out" in Li et al. 2016) removes one token at a time.
LIME (Ribeiro et al. 2016) and KernelSHAP (Lundberg & Lee 2017) fit a linear model of token presence to
the outputs on random subsets of the tokens, through captum.

    >>> get_explainer("occlusion", policy="delete").explain(model, ["a fine film"])

What is explained: f = the target class's probability (softmax of the logits), the scale on which
"removing this word lowers the probability by 0.3" reads naturally. [CLS]/[SEP] are never perturbed
or removed and get score 0; padding stays padding.
"""
from __future__ import annotations

import captum.attr
import torch
from captum._utils.models.linear_model import SkLearnRidge
from torch import Tensor

from attnaudit.explain.base import Explainer
from attnaudit.explain.control import check_seed, example_seed, seeded
from attnaudit.explain.gradients import baseline_embeds, check_choice, check_positive_int
from attnaudit.model.interface import Batch

POLICIES = ("mask", "delete")


def target_probs(model, input_ids: Tensor, attention_mask: Tensor, target: Tensor, *, max_batch: int) -> Tensor:
    """P(target | input) for each row, in chunks of at most `max_batch` rows -> [rows] (CPU)."""
    out = []
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], max_batch):
            part = slice(start, start + max_batch)
            embeds = model.embed(input_ids[part])                                 # [chunk, seq, d_model]
            logits = model.logits_from_embeds(embeds, attention_mask[part])       # [chunk, n_classes]
            probs = logits.float().softmax(-1).cpu()                              # [chunk, n_classes]
            out.append(probs.gather(1, target[part, None].cpu())[:, 0])
    return torch.cat(out)


class Occlusion(Explainer):
    """score_i = f(x) − f(x without token i), f the target probability.

    Args:
        policy: "mask" replaces token i by [MASK]; "delete" removes it (later tokens shift left, the
            attention mask loses one position), so the model sees a shorter, well-formed input.
        max_batch: at most this many perturbed inputs per forward pass. All perturbed inputs of a
            batch (one per real, non-special token) are built as one stacked tensor and run in chunks.
    """

    name = "occlusion"
    family = "perturbation"

    def __init__(self, *, policy: str = "mask", max_batch: int = 256):
        self.policy = policy
        self.max_batch = max_batch

    def validate(self, model) -> None:
        check_choice("policy", self.policy, POLICIES, " 'mask' writes [MASK] over the token; 'delete' removes it.")
        check_positive_int("max_batch", self.max_batch)

    def scores(self, model, batch: Batch, target: Tensor) -> Tensor:
        ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()            # [batch, seq]
        b, seq = ids.shape
        row, pos = (mask & ~batch.special_mask.cpu()).nonzero(as_tuple=True)     # [n] each: one per removal
        ids_p, mask_p = ids[row], mask[row]                                        # [n, seq]
        if self.policy == "mask":
            ids_p = ids_p.index_put((torch.arange(len(row)), pos), torch.tensor(model.mask_id))
        else:
            cols = torch.arange(seq)[None, :]                                      # [1, seq]
            src = cols + (cols >= pos[:, None]).long()                             # from pos on, read one to the right
            beyond = src >= seq
            ids_p = ids_p.gather(1, src.clamp_max(seq - 1)).masked_fill(beyond, model.pad_id)
            mask_p = mask_p.gather(1, src.clamp_max(seq - 1)) & ~beyond           # one real position fewer
        target = target.cpu()
        p_full = target_probs(model, ids, mask, target, max_batch=self.max_batch)             # [batch]
        p_without = target_probs(model, ids_p, mask_p, target[row], max_batch=self.max_batch)  # [n]
        out = torch.zeros(b, seq)
        out[row, pos] = p_full[row] - p_without
        return out


class _Sampled(Explainer):
    """LIME / KernelSHAP through captum: one binary feature per real, non-special token.

    A token that is "absent" in a sample has its embedding replaced by the [MASK] embedding (the
    attention mask is unchanged). captum fits one surrogate per example, so examples are explained one
    at a time, each with draws seeded from `seed` and its token ids (`example_seed`): an example gets
    the same scores alone or in a batch. The samples of one example run `max_batch` per forward pass.
    """

    family = "perturbation"
    exact_for_one_word = False

    def validate(self, model) -> None:
        check_positive_int("n_samples", self.n_samples)
        check_positive_int("max_batch", self.max_batch)
        check_seed(self.seed)

    def make_method(self, forward):
        raise NotImplementedError

    def scores(self, model, batch: Batch, target: Tensor) -> Tensor:
        def forward(embeds: Tensor, attention_mask: Tensor) -> Tensor:          # -> [rows, n_classes]
            return model.logits_from_embeds(embeds, attention_mask).float().softmax(-1)

        method = self.make_method(forward)
        out = torch.zeros(batch.input_ids.shape)                                   # [batch, seq]
        for i in range(len(batch)):
            one = batch.select([i])                                                # trimmed to its length
            pos = (one.attention_mask[0] & ~one.special_mask[0]).nonzero()[:, 0]   # [n_features]
            if len(pos) == 0:
                continue
            with torch.no_grad():
                embeds = model.embed(one.input_ids)                                # [1, seq, d_model]
                baselines = baseline_embeds(model, one, embeds, "mask")            # [MASK] on words only
            # Each word is its own feature; [CLS]/[SEP] join feature 0 but their baseline equals the
            # input, so switching that feature off changes only the word.
            features = torch.zeros(1, embeds.shape[1], 1, dtype=torch.long, device=embeds.device)
            features[0, pos.to(embeds.device), 0] = torch.arange(len(pos), device=embeds.device)
            mask = one.attention_mask.to(embeds.device)                            # [1, seq]
            if len(pos) == 1 and self.exact_for_one_word:
                with torch.no_grad():                                              # Shapley value of a lone player
                    p = forward(torch.cat([embeds, baselines]), mask.expand(2, -1))[:, int(target[i])]
                out[i, pos] = float(p[0] - p[1])
                continue
            real = one.input_ids[0][one.attention_mask[0]].tolist()
            with seeded(example_seed(self.seed, real)), torch.no_grad():
                coef = method.attribute(
                    embeds, baselines=baselines, target=target[i : i + 1].to(embeds.device),
                    additional_forward_args=(mask,), feature_mask=features,
                    n_samples=self.n_samples, perturbations_per_eval=min(self.max_batch, self.n_samples),
                    return_input_shape=False,
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
    Samples are weighted by exp(−d²/2) with d the cosine distance between the sample's embeddings and
    the input's (captum's default kernel, width 1).
    """

    name = "lime"

    def __init__(self, *, n_samples: int = 256, alpha: float = 1.0, max_batch: int = 256, seed: int = 0):
        self.n_samples = n_samples
        self.alpha = alpha
        self.max_batch = max_batch
        self.seed = seed

    def validate(self, model) -> None:
        super().validate(model)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
            raise ValueError(f"alpha must be a number >= 0 (the ridge penalty); got {self.alpha!r}.")

    def make_method(self, forward):
        return captum.attr.Lime(forward, interpretable_model=SkLearnRidge(alpha=float(self.alpha)))


class KernelShap(_Sampled):
    """KernelSHAP: Shapley values of token presence, estimated by captum's weighted linear regression.

    Args:
        n_samples: coalitions per example (the first two are all tokens and none). A one-word example
            gets its exact Shapley value, f(x) − f(x with the word masked).
        max_batch: samples per forward pass.
        seed: with the example's token ids, seeds its samples (the same scores alone or in a batch).
    """

    name = "kernel_shap"
    exact_for_one_word = True  # captum's coalition-size distribution is empty (NaN) for one feature

    def __init__(self, *, n_samples: int = 256, max_batch: int = 256, seed: int = 0):
        self.n_samples = n_samples
        self.max_batch = max_batch
        self.seed = seed

    def make_method(self, forward):
        return captum.attr.KernelShap(forward)
