"""Training the decoder-only LM on prompt -> target Examples (the `recall` and `copy` tasks).

    model, metrics = train_lm(train, valid, test, settings=defaults_for("copy"))
    metrics["test_accuracy"]        # teacher-forced accuracy over every target token (what each step row predicts)

Teacher forcing on ``[CLS] prompt target``: one forward per example, cross-entropy only where the next token
is a target token (the prompt is given, not predicted). `fit`'s Adam + warm-up loop, best-epoch selection on
the valid token accuracy (ties: lower valid loss). The vocabulary comes from the training prompts and targets.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnaudit.data.examples import Example
from attnaudit.model.fit import fit
from attnaudit.model.lm import LanguageModel
from attnaudit.model.settings import TrainSettings, defaults_for, resolve_device
from attnaudit.model.transformer import DecoderLMConfig, TransformerDecoderLM
from attnaudit.model.vocab import CLS, Vocab, words

IGNORE = -100           # cross-entropy's ignore_index: positions whose next token is not a target token


def lm_architecture(settings: TrainSettings, *, vocab_size: int, pad_id: int) -> DecoderLMConfig:
    """The DecoderLMConfig (head="lm") that `settings` describe; `pooling` does not apply."""
    return DecoderLMConfig(vocab_size=vocab_size, head="lm", d_model=settings.d_model, n_heads=settings.n_heads,
                           n_layers=settings.n_layers, d_ff=settings.d_ff, dropout=settings.dropout,
                           max_len=settings.max_len, norm=settings.norm, pad_id=pad_id)


def lm_sequences(examples: Sequence[Example], vocab: Vocab) -> tuple[Tensor, Tensor, Tensor]:
    """Examples -> (ids [n, seq], mask [n, seq], next [n, seq]) for teacher forcing.

    ids = [CLS] prompt target[:-1] (right-padded); next[j] is the token to predict after position j: the
    target token where one follows, IGNORE elsewhere (prompt positions and padding).
    """
    rows, nexts = [], []
    for e in examples:
        assert e.target is not None                                       # train_lm checked every Example
        prompt, target = vocab.ids([CLS, *words(e.text)]), vocab.ids(words(e.target))
        rows.append(prompt + target[:-1])
        nexts.append([IGNORE] * (len(prompt) - 1) + target)
    seq = max(map(len, rows))
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.tensor([r + [vocab.pad_id] * (seq - len(r)) for r in rows], dtype=torch.long)   # [n, seq]
    nxt = torch.tensor([r + [IGNORE] * (seq - len(r)) for r in nexts], dtype=torch.long)       # [n, seq]
    mask = torch.arange(seq)[None, :] < lengths[:, None]                                       # [n, seq]
    return ids, mask, nxt


@torch.no_grad()
def evaluate_lm(model: LanguageModel, examples: Sequence[Example], *, batch_size: int = 512,
                generation: bool = False) -> dict[str, float]:
    """Teacher-forced target-token accuracy and loss; with `generation`, greedy exact match of whole targets."""
    ids, mask, nxt = lm_sequences(examples, model.vocab)
    correct = total = 0
    loss_sum = 0.0
    with model.evaluating():
        for start in range(0, len(ids), batch_size):
            sl = slice(start, start + batch_size)
            logits = model.sequence_logits(ids[sl], mask[sl]).float()                         # [batch, seq, vocab]
            y = nxt[sl].to(logits.device)                                                     # [batch, seq]
            keep = y != IGNORE
            loss_sum += float(F.cross_entropy(logits[keep], y[keep], reduction="sum"))
            correct += int((logits.argmax(-1)[keep] == y[keep]).sum())
            total += int(keep.sum())
    scores = {"accuracy": correct / total, "loss": loss_sum / total}
    if generation:
        hits = 0
        by_len: dict[int, list[Example]] = {}
        for e in examples:
            by_len.setdefault(len(words(e.target or "")), []).append(e)
        for n, group in by_len.items():
            for start in range(0, len(group), batch_size):
                part = group[start : start + batch_size]
                out = model.generate([e.text for e in part], n)
                hits += sum(o == " ".join(words(e.target or "")) for o, e in zip(out, part))
        scores["exact_match"] = hits / len(examples)
    return scores


def train_lm(
    train: Sequence[Example], valid: Sequence[Example], test: Sequence[Example] | None = None, *,
    settings: TrainSettings | None = None, device: str = "auto", progress: bool | None = None, log_path=None,
    progress_label: str = "train lm",
) -> tuple[LanguageModel, dict]:
    """Train a TransformerDecoderLM with teacher forcing; loss on the target tokens only.

    Args:
        train, valid, test: Examples whose `text` is the prompt and `target` the continuation; test may be None.
        settings: sizes and optimisation (`pooling` is ignored); None uses `defaults_for("recall")`.
    Returns:
        (model, metrics): valid_accuracy / test_accuracy (teacher-forced, over every target token: recall's one
        answer, each of copy's tokens), valid_loss / test_loss, valid_generation_exact_match /
        test_generation_exact_match (greedy, whole target), best_epoch, epochs_run, steps, train_seconds,
        n_train, n_valid, n_test, n_params, vocab_size, device.
    """
    from attnaudit.model.train import _check_splits, _finish  # shared helpers; train.py imports this module

    settings = settings or defaults_for("recall")
    dev = resolve_device(device)

    def with_target(name: str, e: Example) -> None:
        if e.target is None or not words(e.target):
            raise ValueError(f"{name}: Example {e.id!r} has no target text; LM training needs one.")
        n = 1 + len(words(e.text)) + len(words(e.target)) - 1
        if n > settings.max_len:
            raise ValueError(f"{name}: Example {e.id!r} needs {n} positions ([CLS], prompt, target but its last "
                             f"word) but max_len={settings.max_len}; raise max_len.")

    _check_splits(train, valid, test, with_target)
    vocab = Vocab.build([t for e in train for t in (e.text, e.target or "")], min_freq=settings.min_freq,
                        max_size=settings.max_vocab)
    torch.manual_seed(settings.seed)                                           # initialisation and dropout
    cfg = lm_architecture(settings, vocab_size=len(vocab), pad_id=vocab.pad_id)
    model = LanguageModel(TransformerDecoderLM(cfg), vocab).to(dev)
    ids, mask, nxt = (t.to(dev) for t in lm_sequences(train, vocab))

    def step_loss(idx: Tensor) -> Tensor:
        m = mask[idx]                                                          # [batch, seq]
        n = int(m.sum(1).max())                                                # trim shared padding
        logits = model.net(ids[idx, :n], m[:, :n])                             # [batch, seq, vocab]
        return F.cross_entropy(logits.float().flatten(0, 1), nxt[idx, :n].flatten(), ignore_index=IGNORE,
                               label_smoothing=settings.label_smoothing)

    def evaluate() -> tuple[float, float]:
        scores = evaluate_lm(model, valid)
        return scores["accuracy"], scores["loss"]

    result = fit(model.net, len(train), step_loss, evaluate, settings, dev, progress=progress, desc=progress_label)
    metrics: dict[str, Any] = {"kind": "lm"}
    for name, split in (("valid", valid), ("test", test)):
        if split is not None:
            scores = evaluate_lm(model, split, generation=True)
            metrics.update({f"{name}_accuracy": scores["accuracy"], f"{name}_loss": float(f"{scores['loss']:.4g}"),
                            f"{name}_generation_exact_match": scores["exact_match"]})
    metrics.update(n_train=len(train), n_valid=len(valid), n_test=len(test) if test is not None else 0,
                   n_params=sum(p.numel() for p in model.net.parameters()), vocab_size=len(vocab), n_truncated=0,
                   device=str(dev))
    return model, _finish(result, log_path, metrics)
