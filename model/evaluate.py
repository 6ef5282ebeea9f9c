"""Scoring a trained model on labelled examples: accuracy and cross-entropy for classifiers; exact match,
corpus BLEU (sacrebleu; Papineni et al. 2002) and teacher-forced loss for the encoder–decoder.

    evaluate_classifier(model, model.encode(examples))   # {"accuracy", "loss"}
    evaluate_translator(translator, examples)            # {"exact_match", "bleu", "loss"}
"""
from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
import torch
import torch.nn.functional as F
from torch import Tensor

from attnaudit.data.examples import Example
from attnaudit.model.interface import Batch, TextClassifier
from attnaudit.model.seq2seq import PairBatch, Translator
from attnaudit.model.transformer import TransformerSeq2Seq
from attnaudit.model.vocab import words


@torch.inference_mode()
def evaluate_classifier(model: TextClassifier, batch: Batch, *, batch_size: int = 512) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `batch` (which has labels), in eval mode -> {"accuracy", "loss"}."""
    correct, total_loss = 0, 0.0
    with model.evaluating():
        for i in range(0, len(batch), batch_size):
            part = batch.select(slice(i, i + batch_size))
            logits = model(part).float().cpu()                                    # [batch, n_classes]
            if part.labels is None:
                raise ValueError("batch must have labels: encode Examples that have a label.")
            correct += int((logits.argmax(-1) == part.labels).sum())
            total_loss += float(F.cross_entropy(logits, part.labels, reduction="sum"))
    return {"accuracy": correct / len(batch), "loss": total_loss / len(batch)}


def pair_loss(net: TransformerSeq2Seq, pairs: PairBatch, idx: Tensor, *, pad_id: int,
              label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Teacher-forced next-token cross-entropy of examples `idx` [batch], padding trimmed and ignored."""
    dev = next(net.parameters()).device
    tgt_in, tgt_out, tgt_mask = pairs.targets()
    sm, tm = pairs.src.attention_mask[idx], tgt_mask[idx]                       # [batch, src], [batch, tgt]
    ns, nt = int(sm.sum(1).max()), int(tm.sum(1).max())
    logits = net(pairs.src.input_ids[idx, :ns].to(dev), sm[:, :ns].to(dev),
                 tgt_in[idx, :nt].to(dev), tm[:, :nt].to(dev))                   # [batch, tgt, tgt_vocab]
    return F.cross_entropy(logits.float().flatten(0, 1), tgt_out[idx, :nt].flatten().to(dev),
                           ignore_index=pad_id, label_smoothing=label_smoothing, reduction=reduction)


@torch.inference_mode()
def evaluate_translator(model: Translator, examples: Sequence[Example], *, batch_size: int = 512) -> dict[str, float]:
    """Greedy translations against the targets, and the teacher-forced loss per target token.

    Returns:
        {"exact_match", "bleu" (sacrebleu corpus BLEU, 0-100), "loss"}.
    """
    hyps = model.translate([e.text for e in examples], batch_size=batch_size)
    refs = [" ".join(words(e.target)) for e in examples if e.target is not None]
    if len(refs) != len(examples):
        raise ValueError("examples must have a target text to evaluate translations against.")
    pairs = model.encode(list(examples), truncate=True)
    total, n_tokens = 0.0, int((pairs.targets()[1] != model.tgt_vocab.pad_id).sum())
    with model.evaluating():
        for i in range(0, len(examples), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(examples)))
            total += float(pair_loss(model.net, pairs, idx, pad_id=model.tgt_vocab.pad_id, reduction="sum"))
    return {"exact_match": sum(h == r for h, r in zip(hyps, refs)) / len(refs),
            "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "loss": total / n_tokens}
