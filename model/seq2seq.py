"""The encoder–decoder behind a small interface: source texts in, translations and attention out.

Sites: ``encoder.layers.{i}.self_attn.pattern``, ``decoder.layers.{i}.self_attn.pattern`` (causal)
and ``decoder.layers.{i}.cross_attn.pattern`` [batch, head, target, source]. Target sequences are
[CLS] (begin) words [SEP] (end), so one vocabulary class serves both sides.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from attnaudit.data.examples import Example
from attnaudit.model.interface import Batch, BuiltinSizes, ModelBase, encode_words
from attnaudit.model.transformer import TransformerSeq2Seq
from attnaudit.model.vocab import CLS, PAD, SEP, Vocab, words


@dataclass(frozen=True)
class PairBatch:
    """Source batch plus teacher-forcing target: tgt_in [batch, tgt] starts with [CLS]; tgt_out is shifted by one."""

    src: Batch
    tgt_in: Tensor | None = None       # [batch, tgt] long
    tgt_out: Tensor | None = None      # [batch, tgt] long, [PAD] where there is nothing to predict
    tgt_mask: Tensor | None = None     # [batch, tgt] bool

    def rows(self, index: Tensor | slice | list[int], src_ids: Tensor | None = None) -> PairBatch:
        """Examples `index` (no trimming: every part keeps its full src and tgt widths), their source ids replaced
        by src_ids [n, src] if given (a perturbed source)."""
        s = self.src
        ids = s.input_ids[index] if src_ids is None else src_ids
        src = Batch(ids, s.attention_mask[index], s.special_mask[index], tokens=[])
        tgt_in, tgt_out, tgt_mask = self.targets()
        return PairBatch(src, tgt_in[index], tgt_out[index], tgt_mask[index])

    def targets(self) -> tuple[Tensor, Tensor, Tensor]:
        """(tgt_in, tgt_out, tgt_mask); a ValueError when the examples had no target text."""
        if self.tgt_in is None or self.tgt_out is None or self.tgt_mask is None:
            raise ValueError("this PairBatch has no targets: encode Examples that have a target text.")
        return self.tgt_in, self.tgt_out, self.tgt_mask


class Translator(BuiltinSizes, ModelBase[PairBatch]):
    """The built-in encoder–decoder: `translate(texts)`, teacher-forced `__call__`, attention sites.

    An `AttentionModel[PairBatch]` (see `attnaudit.model.interface`): `device`, `to`, `evaluating`, `hook_points`
    and `attention_sites` (the encoder's) come from `ModelBase`, the sizes from `net.cfg`.
    """

    kind = "seq2seq"
    net: TransformerSeq2Seq

    def __init__(self, net: TransformerSeq2Seq, src_vocab: Vocab, tgt_vocab: Vocab, *, config: dict | None = None):
        self.net, self.src_vocab, self.tgt_vocab = net, src_vocab, tgt_vocab
        self.config = dict(config or {})
        self.label_names: tuple[str, ...] = ()

    def encode(self, inputs: Sequence[str] | Sequence[Example], *, truncate: bool = False) -> PairBatch:
        # The source side is encoded as the classifier's input (same [CLS] w [SEP] layout and checks).
        src = encode_words(inputs, self.src_vocab, max_len=self.max_len, truncate=truncate)
        targets = [x.target for x in inputs if isinstance(x, Example) and x.target is not None]
        if len(targets) != len(inputs):                                             # some have no target
            return PairBatch(src)
        rows = [[CLS, *words(t), SEP] for t in targets]
        n = max(map(len, rows)) - 1
        ids = [self.tgt_vocab.ids(r + [PAD] * (n + 1 - len(r))) for r in rows]
        full = torch.tensor(ids, dtype=torch.long)                                  # [batch, tgt + 1]
        tgt_in, tgt_out = full[:, :-1], full[:, 1:]
        return PairBatch(src, tgt_in, tgt_out, tgt_in != self.tgt_vocab.pad_id)

    def __call__(self, batch: PairBatch) -> Tensor:
        """Teacher-forced logits [batch, tgt, tgt_vocab]."""
        dev = self.device
        s, (tgt_in, _, tgt_mask) = batch.src, batch.targets()
        return self.net(s.input_ids.to(dev), s.attention_mask.to(dev), tgt_in.to(dev), tgt_mask.to(dev))

    @torch.inference_mode()
    def translate(self, texts: Sequence[str] | Sequence[Example], *, max_len: int | None = None, batch_size: int = 256) -> list[str]:
        """Greedy decoding -> one target string per source."""
        out: list[str] = []
        with self.evaluating():
            for start in range(0, len(texts), batch_size):
                src = self.encode(texts[start : start + batch_size]).src.to(self.device)
                limit = max_len or int(src.attention_mask.sum(1).max()) + 4
                ids = self.net.greedy_decode(src.input_ids, src.attention_mask, bos_id=self.tgt_vocab.cls_id,
                                             eos_id=self.tgt_vocab.sep_id, max_len=limit)
                for row in ids[:, 1:].tolist():
                    toks = self.tgt_vocab.tokens(row)
                    out.append(" ".join(toks[: toks.index(SEP)] if SEP in toks else [t for t in toks if t != PAD]))
        return out

    # -- the members `analyses.seq2seq` shares with `HFTranslator` ---------------------------------
    @property
    def n_decoder_layers(self) -> int:
        return self.n_layers

    @property
    def pad_id(self) -> int:
        """[PAD], the same id in both vocabularies."""
        return self.src_vocab.pad_id

    @property
    def mask_id(self) -> int:
        """The source's [MASK]: what perturbations put in place of a removed token."""
        return self.src_vocab.mask_id

    @property
    def eos_id(self) -> int:
        """The target's end token, [SEP]."""
        return self.tgt_vocab.sep_id

    @property
    def decoder_start_id(self) -> int:
        """The target's begin token, [CLS]: tgt_in[:, 0]."""
        return self.tgt_vocab.cls_id

    def encoder_embeds(self, src_ids: Tensor) -> Tensor:
        """Source token embeddings, before the positions are added -> [batch, src, d_model]."""
        return self.net.encoder.embed(src_ids.to(self.device))

    def logits_from_src_embeds(self, embeds: Tensor, pairs: PairBatch) -> Tensor:
        """Source embeddings [batch, src, d_model] (`encoder_embeds`) and the pairs' targets -> [batch, tgt, vocab];
        `logits_from_src_embeds(encoder_embeds(ids), pairs)` is `model(pairs)`."""
        dev, mask = self.device, pairs.src.attention_mask.to(self.device)
        tgt_in, _, tgt_mask = pairs.targets()
        return self.net.decode(self.net.encoder(embeds, mask), mask, tgt_in.to(dev), tgt_mask.to(dev))

    def word_ids(self, inputs) -> list[list[int | None]]:
        """Per example and source position, the index of its word (token j is word j - 1); None for [CLS], [SEP]
        and padding. `inputs`: a PairBatch, a Batch or an Attribution (anything with `attention_mask`), or texts."""
        inputs = inputs.src if isinstance(inputs, PairBatch) else inputs
        if isinstance(inputs, str) or (isinstance(inputs, Sequence) and all(isinstance(t, str) for t in inputs)):
            inputs = self.encode([inputs] if isinstance(inputs, str) else list(inputs), truncate=True).src
        mask = inputs.attention_mask                                                # [batch, src]
        seq = mask.shape[1]
        return [[None, *range(n - 2), None] + [None] * (seq - n) for n in mask.sum(1).tolist()]

    def target_word_ids(self, targets: Sequence[str], tgt_out: Tensor | None = None) -> list[list[int | None]]:
        """Per target text and target position (of `tgt_out`, [batch, tgt]), the index of its word (position j is
        word j); None for [SEP] and padding. Without tgt_out the rows are as long as `encode` makes them."""
        n_words = [len(words(t)) for t in targets]
        width = max(n_words) + 1 if tgt_out is None else tgt_out.shape[1]
        return [[*range(n)] + [None] * (width - n) for n in n_words]

    def target_tokens(self, ids: Sequence[int]) -> list[str]:
        """Target token ids -> their strings."""
        return self.tgt_vocab.tokens(ids)

    def target_texts(self, targets: Sequence[str]) -> list[str]:
        """Each reference as `translate` would write it (lower-cased words joined by single spaces)."""
        return [" ".join(words(t)) for t in targets]

    def cascading_layers(self) -> list[tuple[str, list[nn.Module]]]:
        """Randomisation order for `analyses.sanity`, output first: "head" (the generator, and the final LayerNorm
        of a pre-LN model), "decoder.layers.{L-1}" … "decoder.layers.0" (with the target embedding at the end),
        "encoder.layers.{L-1}" … "encoder.layers.0", "embeddings" (the source embedding table)."""
        net = self.net
        head: list[nn.Module] = [net.generator] + ([net.final_norm] if any(True for _ in net.final_norm.parameters())
                                                    else [])
        d_layers = cast(nn.ModuleList, net.decoder.layers)                           # set on a plain nn.Module
        dec: list[tuple[str, list[nn.Module]]] = [(f"decoder.layers.{i}", [d_layers[i]])
                                                 for i in reversed(range(len(d_layers)))]
        dec[-1] = (dec[-1][0], [*dec[-1][1], net.tgt_embed])
        enc_final = [net.encoder.final_norm] if any(True for _ in net.encoder.final_norm.parameters()) else []
        enc: list[tuple[str, list[nn.Module]]] = [(f"encoder.layers.{i}", [net.encoder.layers[i]])
                                                 for i in reversed(range(len(net.encoder.layers)))]
        enc[0] = (enc[0][0], [*enc_final, *enc[0][1]])
        return [("head", head), *dec, *enc, ("embeddings", [net.encoder.embed])]

    @property
    def decoder_self_attention_sites(self) -> list[str]:
        return [f"decoder.layers.{i}.self_attn.pattern" for i in range(self.n_layers)]

    @property
    def cross_attention_sites(self) -> list[str]:
        return [f"decoder.layers.{i}.cross_attn.pattern" for i in range(self.n_layers)]

    def cross_output_weight(self, layer: int) -> Tensor:
        """W^O of decoder layer `layer`'s cross-attention, split by head -> [d_model, head, d_head]: head h's value v
        maps to W^O[:, h] @ v (as `MultiHeadAttention.output_weight`)."""
        if not (isinstance(layer, int) and 0 <= layer < self.n_decoder_layers):
            raise ValueError(f"layer must be an int in [0, {self.n_decoder_layers - 1}] (a decoder layer); got {layer!r}.")
        weight = self.net.get_parameter(f"decoder.layers.{layer}.cross_attn.w_o.weight")   # [d_model, head·d_head]
        return weight.view(weight.shape[0], self.n_heads, -1)                               # [d_model, head, d_head]
