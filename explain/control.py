"""The random control explainer, and the seeding every stochastic explainer shares.

A faithfulness metric means little until it is compared with chance: `RandomScores` gives each real
token a uniform [0, 1) score drawn from the seed, the example's tokens and a fingerprint of the model's
weights (the "random attribution" baseline of Hooker et al. 2019 and Adebayo et al. 2018). The scores
carry no information about the model, yet they are re-drawn when its weights change, as a fresh
random map would be: so in the cascading-randomisation check `random` has similarity ~0, not 1.

    >>> attr = get_explainer("random", seed=3).explain(model, ["a fine film", "a dull plot"])

`example_seed` and `seeded` are what GradientShap, LIME and KernelSHAP use, so that an example's
random draws are the same whether it is explained alone or inside a batch.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from attnaudit.explain.base import Explainer
from attnaudit.model.interface import Batch, ExplainableModel


def example_seed(seed: int, token_ids: Sequence[int], salt: str = "") -> int:
    """A 63-bit seed from `seed`, one example's real token ids and a `salt` (SHA-256: stable across processes).

    Python's hash() is salted per process, so it would not reproduce between runs.
    """
    text = f"{seed}:{salt}:" + ",".join(str(int(t)) for t in token_ids)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's and numpy's global RNGs seeded with `seed` inside the block, their states restored after.

    captum draws from both (GradientShap: numpy for baselines and interpolation points, torch for
    noise; LIME and KernelSHAP: torch for the coalitions), and offers no generator argument.
    """
    np_state = np.random.get_state()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(np_state)


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}. Pass e.g. seed=0.")


class RandomScores(Explainer):
    """Uniform [0, 1) scores per real, non-special token; model-independent and reproducible.

    Args:
        seed: with the example's real token ids, decides its scores (via `example_seed`), so an
            example gets the same scores alone or in any batch, and identical texts get identical scores.
    Special tokens ([CLS]/[SEP]) and padding get 0: no metric ranks or removes them.
    """

    name = "random"
    family = "control"

    def __init__(self, *, seed: int = 0):
        self.seed = seed

    def validate(self, model: ExplainableModel) -> None:
        check_seed(self.seed)

    def scores(self, model: ExplainableModel, batch: Batch, target: Tensor) -> Tensor:
        out = torch.zeros(batch.input_ids.shape)                                 # [batch, seq]
        mask, ids = batch.attention_mask.cpu(), batch.input_ids.cpu()            # a Batch may be on the device
        scored = mask & ~batch.special_mask.cpu()                                # [batch, seq]
        salt = weights_fingerprint(model)
        for i in range(len(batch)):
            real = ids[i][mask[i]].tolist()                                      # padding excluded
            gen = torch.Generator().manual_seed(example_seed(self.seed, real, salt))
            draws = torch.rand(len(real), generator=gen)                         # one per real token
            out[i, mask[i]] = draws
        return out * scored


def weights_fingerprint(model: ExplainableModel) -> str:
    """A short digest of the model's weights: one float64 sum per parameter tensor (cheap, deterministic)."""
    net = getattr(model, "net", model)
    params = list(net.parameters()) if hasattr(net, "parameters") else []
    with torch.no_grad():
        sums = [f"{float(p.detach().double().sum()):.10e}" for p in params]
    return hashlib.sha256(",".join(sums).encode()).hexdigest()[:16]
