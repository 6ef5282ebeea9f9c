"""The optimisation loop both model kinds share: Adam with the warm-up schedule of Vaswani et al. 2017
(section 5.3), best-epoch selection and the per-step log.

    result = fit(net, n_train, step_loss, evaluate, settings, torch.device("cpu"), progress=False, desc="train")
    result["best_epoch"], result["log"][0]          # (step, epoch, lr, loss) of the first step

Adam(β1=0.9, β2=0.98, ε=1e-9) with lr = factor·d_model^-0.5·min(step^-0.5, step·warmup^-1.5).
Shuffling draws from its own `torch.Generator` seeded with `settings.seed`; dropout draws from torch's
global RNG. On CUDA the forward and backward run under bf16 autocast.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnaudit.core.progress import progress_bar
from attnaudit.model.schedule import NoamLR
from attnaudit.model.settings import TrainSettings

LOG_COLUMNS = ("step", "epoch", "lr", "loss")


def classification_step_loss(forward: Callable[[Tensor, Tensor], Tensor], ids: Tensor, mask: Tensor, labels: Tensor,
                             *, label_smoothing: float) -> Callable[[Tensor], Tensor]:
    """The `step_loss` of `fit` for a classifier: cross-entropy of forward(ids, mask) on the examples `idx`.

    ids / mask [n_train, seq] and labels [n_train] on the training device; each batch is cut to its longest
    sequence (the padding all its rows share is not computed). forward: (ids, mask) -> logits [batch, n_classes].
    """
    def step_loss(idx: Tensor) -> Tensor:
        m = mask[idx]                                                          # [batch, seq]
        n = int(m.sum(1).max())                                                # trim shared padding
        logits = forward(ids[idx, :n], m[:, :n])                               # [batch, n_classes]
        return F.cross_entropy(logits.float(), labels[idx], label_smoothing=label_smoothing)

    return step_loss


def fit(net: torch.nn.Module, n_train: int, step_loss: Callable[[Tensor], Tensor],
        evaluate: Callable[[], tuple[float, float]], settings: TrainSettings, dev: torch.device,
        *, progress: bool | None, desc: str, group: Callable[[Tensor], Tensor] | None = None) -> dict:
    """Adam + Noam over shuffled minibatches; keeps the best epoch's weights (loaded at the end).

    Args:
        step_loss: example indices [batch] (on `dev`) -> the mean loss of those training examples.
        evaluate: () -> (valid score, valid loss), called after each epoch in eval mode. The best epoch
            has the highest score, ties going to the lower loss: a later epoch that classifies as well
            but more confidently wins.
        progress: True: a bar (a plain line every 10 s in a log), None: only at a terminal or in Jupyter,
            False: silent (see attnaudit.core.progress). desc: its label, e.g. "train keywords".
        group: reorders each epoch's shuffled indices [n_train] before they are cut into batches (e.g. to
            put texts of similar length together, so less padding is computed); None keeps the shuffle.
    Returns:
        {"best_epoch", "epochs_run", "steps", "train_seconds", "last_epoch_loss", "valid_scores",
        "valid_losses", "log"}: log holds one (step, epoch, lr, loss) per step, lr the one that step used.
    """
    opt = torch.optim.Adam(net.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9,
                           weight_decay=settings.weight_decay)
    sched = NoamLR(opt, d_model=settings.d_model, warmup=settings.warmup, factor=settings.lr_factor)
    shuffle = torch.Generator().manual_seed(settings.seed)
    bs = settings.batch_size
    steps_per_epoch = math.ceil(n_train / bs)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                else contextlib.nullcontext())
    bar = progress_bar(settings.epochs * steps_per_epoch, desc=desc, unit="steps", enabled=progress)
    log: list[tuple[int, int, float, float]] = []
    scores: list[float] = []                                                     # per epoch
    losses: list[float] = []
    best, best_epoch, best_state, since_best, epoch, step = (-1.0, 0.0), 0, None, 0, 0, 0
    start = time.perf_counter()
    try:
        for epoch in range(1, settings.epochs + 1):
            net.train()
            order = torch.randperm(n_train, generator=shuffle)                      # [n_train]
            order = group(order) if group is not None else order
            for i in range(0, n_train, bs):
                lr = opt.param_groups[0]["lr"]
                with autocast:
                    loss = step_loss(order[i : i + bs].to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if settings.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), settings.clip_norm)
                opt.step()
                sched.step()
                step += 1
                log.append((step, epoch, lr, loss.item()))
                bar.update(1)
            net.eval()
            score, valid_loss = evaluate()
            scores.append(round(score, 5))
            losses.append(float(f"{valid_loss:.4g}"))
            bar.set_postfix(epoch=epoch, loss=f"{log[-1][3]:.3f}", valid=f"{score:.3f}")
            if (score, -valid_loss) > best:
                best, best_epoch, since_best = (score, -valid_loss), epoch, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                since_best += 1
            if settings.patience is not None and since_best >= settings.patience:
                break
    finally:
        bar.close()
    assert best_state is not None                  # epochs >= 1 and every score beats the initial -1
    net.load_state_dict(best_state)
    net.eval()
    last = [row[3] for row in log if row[1] == epoch]
    return {"best_epoch": best_epoch, "epochs_run": epoch, "steps": step,
            "train_seconds": round(time.perf_counter() - start, 2),
            "last_epoch_loss": float(f"{sum(last) / len(last):.4g}"), "valid_scores": scores, "valid_losses": losses,
            "log": log}


def log_csv(log: Sequence[tuple[int, int, float, float]]) -> str:
    """The per-step training log as CSV text: step, epoch, lr, loss."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(LOG_COLUMNS)
    writer.writerows((s, e, f"{lr:.6g}", f"{loss:.6f}") for s, e, lr, loss in log)
    return out.getvalue()
