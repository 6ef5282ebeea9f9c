"""The warm-up learning-rate schedule of Vaswani et al. 2017 (eq. 3).

lr(step) = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5), with step counted from 1.
"""
from __future__ import annotations

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def noam_lr(step: int, *, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """The learning rate at optimizer step `step` (1-based): rises linearly, then decays as step^-0.5."""
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


class NoamLR(LRScheduler):
    """Sets every parameter group's lr to `noam_lr(step)`; call `scheduler.step()` after `optimizer.step()`.

    >>> opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    >>> sched = NoamLR(opt, d_model=512, warmup=4000)
    """

    def __init__(self, optimizer: Optimizer, *, d_model: int, warmup: int, factor: float = 1.0, last_epoch: int = -1):
        for name, value in (("d_model", d_model), ("warmup", warmup)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}.")
        if not factor > 0:
            raise ValueError(f"factor must be > 0; got {factor!r}.")
        self.d_model, self.warmup, self.factor = d_model, warmup, factor
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:        # torch's type; ours are all floats
        # last_epoch counts scheduler.step() calls: 0 at construction, so the first update uses step 1.
        lr = noam_lr(self.last_epoch + 1, d_model=self.d_model, warmup=self.warmup, factor=self.factor)
        return [lr for _ in self.optimizer.param_groups]
