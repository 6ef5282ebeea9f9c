"""The decoder-only Transformer behind the classifier interface: generation as classification.

    model = LanguageModel(TransformerDecoderLM(cfg), vocab)
    batch = model.encode(make_examples("copy", "test", n=2))    # one row per (example, target step)
    logits = model(batch)                                        # [rows, vocab]: each row's last real token
    model.generate(["a 3 b 7 ? b"], n_tokens=1)                  # ['7'] once trained

An explainer sees a classifier over the vocabulary (`n_classes` = vocabulary size, `label_names` = its
tokens, `readout = "last"`): row s of an example is ``[CLS] prompt t_1 .. t_{s-1}`` with label ``t_s``
(`attnaudit.model.steps.step_batch`). [CLS] plays BOS, the target prefix is special (kept by perturbations,
never scored), and the gold evidence is the Example's `rationale` over its prompt words (word i -> token
i+1); an Example with an `alignment` (copy) gets per-step evidence instead: row s marks the source words
aligned to target word s. Sites: ``decoder.layers.{i}.self_attn.pattern`` (causal) and ``...values``.

`DecoderClassifier` is the same net with head="classifier": words then [SEP], read at [SEP] (the last
real token), so every classifier explainer and analysis applies to a causal model.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import cast

import torch
from torch import Tensor, nn

from attnaudit.data.examples import Example
from attnaudit.model import steps
from attnaudit.model.interface import Batch, BuiltinClassifier, class_names, encode_words
from attnaudit.model.transformer import CausalLayer, TransformerDecoderLM
from attnaudit.model.vocab import CLS, PAD, Vocab, words


def _as_inputs(inputs: str | Example | Sequence[str] | Sequence[Example]) -> list:
    if isinstance(inputs, (str, Example)):
        return [inputs]
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one text; got an empty list.")
    return list(inputs)


def _prompt_words(i: int, x: str | Example) -> list[str]:
    text = x.text if isinstance(x, Example) else x
    if not isinstance(text, str):
        raise TypeError(f"inputs[{i}] must be a str or an Example; got {type(x).__name__}.")
    w = words(text)
    if not w:
        raise ValueError(f"inputs[{i}] is empty or whitespace-only; every example needs at least one word.")
    return w


class _DecoderBase(BuiltinClassifier):
    """What the LM and the decoder classifier share: vocabulary, ids, decoder sites, W^O, randomisation order."""

    readout = "last"
    net: TransformerDecoderLM                        # BuiltinSizes reads only net.cfg's sizes

    def __init__(self, net: TransformerDecoderLM, vocab: Vocab, *, config: dict | None = None):
        if len(vocab) != net.cfg.vocab_size:
            raise ValueError(f"vocab must have vocab_size={net.cfg.vocab_size} tokens; got {len(vocab)}.")
        super().__init__(net, vocab, config=config)

    @property
    def attention_sites(self) -> list[str]:
        return [f"decoder.layers.{i}.self_attn.pattern" for i in range(self.n_layers)]

    def output_weight(self, layer: int) -> Tensor:
        block = cast(CausalLayer, self.net.decoder.layers[layer])
        return block.self_attn.output_weight()                                              # [d_model, head, d_head]

    def cascading_layers(self) -> list[tuple[str, list[nn.Module]]]:
        """Randomisation order, output first: "head" (+ the final LayerNorm when pre-LN), "decoder.layers.{L-1}"
        … "decoder.layers.0", "embeddings" (the sinusoidal positions have no weights)."""
        dec = self.net.decoder
        head: list[nn.Module] = [self.net.head] + ([dec.final_norm] if any(True for _ in dec.final_norm.parameters())
                                                  else [])
        layers = [(f"decoder.layers.{i}", [dec.layers[i]]) for i in reversed(range(len(dec.layers)))]
        return [("head", head), *layers, ("embeddings", [dec.embed])]


class LanguageModel(_DecoderBase):
    """A decoder-only LM as a classifier over its vocabulary, one Batch row per (example, target step)."""

    kind = "lm"

    def __init__(self, net: TransformerDecoderLM, vocab: Vocab, *, config: dict | None = None):
        if net.cfg.head != "lm":
            raise ValueError(f"LanguageModel needs a net with head='lm'; got head={net.cfg.head!r} "
                             "(use DecoderClassifier for a classification head).")
        super().__init__(net, vocab, config=config)
        self.label_names = tuple(vocab.itos)

    @property
    def n_classes(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        c = self.net.cfg
        return (f"LanguageModel(layers={c.n_layers}, heads={c.n_heads}, d_model={c.d_model}, norm={c.norm!r}, "
                f"vocab={len(self.vocab)})")

    # -- text in ----------------------------------------------------------------------------------
    def encode(self, inputs: str | Sequence[str] | Sequence[Example], *, truncate: bool = False) -> Batch:
        """Texts or Examples -> Batch with one row per (example, target step) (`steps.step_batch`).

        Prompt tokens: [CLS] (BOS, special) + the prompt words. Examples with a `target` give one row per target
        word (label: that word's id; `batch.steps[r]` = (example, step)); texts, or Examples without one, give
        one row (the next token; labels None). Gold evidence: `rationale` over prompt words -> prompt tokens
        (0 on [CLS] and on the target prefix); with an `alignment`, row s holds only the words aligned to target
        word s. A prompt + target longer than max_len raises unless `truncate`: the prompt then loses its
        earliest words (the most recent context is kept) and `batch.truncated` marks the example's rows.
        """
        inputs = _as_inputs(inputs)
        examples = [x if isinstance(x, Example) else None for x in inputs]
        prompts, targets, gold, cut, align = [], [], [], [], []
        for i, x in enumerate(inputs):
            w = _prompt_words(i, x)
            e = examples[i]
            tgt = words(e.target) if e is not None and e.target is not None else None
            if tgt is not None and not tgt:
                raise ValueError(f"inputs[{i}] has an empty target; give at least one target word or None.")
            room = self.max_len - 1 - (len(tgt) - 1 if tgt else 0)       # [CLS] + prompt + target[:-1]
            if room < 1:
                raise ValueError(f"inputs[{i}]: its {len(tgt or ())}-word target leaves no room for the prompt in "
                                 f"max_len={self.max_len} tokens; shorten the target.")
            drop = max(0, len(w) - room)
            if drop and not truncate:
                raise ValueError(f"inputs[{i}] has {len(w)} prompt words but this model takes at most {room} with "
                                 f"its target (max_len={self.max_len} minus [CLS] and all but the last target "
                                 "word); pass truncate=True or shorten it.")
            cut.append(bool(drop))
            prompts.append(self.vocab.ids([CLS, *w[drop:]]))
            targets.append(self.vocab.ids(tgt) if tgt is not None else None)
            r = e.rationale if e is not None else None
            gold.append(None if r is None else [0.0, *map(float, r[drop:])])
            align.append((e.alignment, drop) if e is not None and e.alignment is not None and tgt is not None else None)
        if any(t is None for t in targets):                               # a mix: every row predicts the next token
            targets = [None] * len(targets)
            align = [None] * len(align)
        has_gold = all(g is not None for g in gold)
        batch = steps.step_batch(prompts, targets, pad_id=self.pad_id, tokens=self.vocab.tokens, max_len=self.max_len,
                                 prompt_special=[[True] + [False] * (len(p) - 1) for p in prompts],
                                 texts=[x.text if isinstance(x, Example) else x for x in inputs],
                                 ids=[e.id for e in examples] if all(e is not None for e in examples) else None,  # type: ignore[union-attr]
                                 rationale=gold if has_gold else None, pad_token=PAD)
        assert batch.steps is not None                                    # step_batch always records them
        rationale = batch.rationale
        if rationale is not None and any(a is not None for a in align):
            rationale = rationale.clone()
            for row, (ex, s) in enumerate(batch.steps):
                link = align[ex]
                if link is None:
                    continue
                pairs, drop = link
                rationale[row] = 0.0
                for src, t in pairs:
                    if t == s and src >= drop:
                        rationale[row, 1 + src - drop] = 1.0                # word src -> token 1 + src (after [CLS])
        return replace(batch, rationale=rationale, truncated=[cut[e] for e, _ in batch.steps])

    # -- forward ----------------------------------------------------------------------------------
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [rows, seq] and mask [rows, seq] -> next-token logits [rows, vocab] at each row's last real token.

        Rows that are prefixes of another row share its forward unless hooks record or edit the attention.
        """
        self.check_ids(input_ids)
        dev = self.device
        return steps.last_logits(self.net, input_ids.to(dev), attention_mask.to(dev),
                                 share=not steps.hooks_active(self.hook_points()))

    def logits_from_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.to(embeds.device)
        return steps.gather_last(self.net.forward_embeds(embeds, mask), mask)                # [rows, vocab]

    def sequence_logits_from_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Next-token logits at every position from token embeddings -> [batch, seq, vocab] (one forward for every
        step of a continuation: `attnaudit.explain.gradients.step_gradients`)."""
        return self.net.forward_embeds(embeds, attention_mask.to(embeds.device))

    def sequence_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Next-token logits at every position -> [batch, seq, vocab] (teacher forcing)."""
        self.check_ids(input_ids)
        dev = self.device
        return self.net(input_ids.to(dev), attention_mask.to(dev))

    # -- text out ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, texts: str | Sequence[str] | Sequence[Example], n_tokens: int) -> list[str]:
        """Greedy continuation of each prompt by `n_tokens` tokens -> one string per prompt (its new tokens)."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be an int >= 1; got {n_tokens!r}.")
        inputs = _as_inputs(texts)
        prompts = [self.vocab.ids([CLS, *_prompt_words(i, x)]) for i, x in enumerate(inputs)]
        longest = max(map(len, prompts)) + n_tokens - 1
        if longest > self.max_len:
            raise ValueError(f"the longest prompt plus n_tokens={n_tokens} needs {longest} positions but max_len is "
                             f"{self.max_len}; shorten the prompts or ask for fewer tokens.")
        dev = self.device
        ids = torch.full((len(prompts), longest + 1), self.pad_id, dtype=torch.long, device=dev)  # [batch, seq]
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, device=dev)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)                       # [batch]
        rows = torch.arange(len(prompts), device=dev)
        with self.evaluating():
            for _ in range(n_tokens):
                n = int(lengths.max())
                mask = torch.arange(n, device=dev)[None, :] < lengths[:, None]               # [batch, seq]
                logits = self.net(ids[:, :n], mask)                                          # [batch, seq, vocab]
                nxt = logits[rows, lengths - 1].argmax(-1)                                   # [batch]
                ids[rows, lengths] = nxt
                lengths = lengths + 1
        return [" ".join(self.vocab.tokens(ids[i, len(p) : len(p) + n_tokens].tolist()))
                for i, p in enumerate(prompts)]


class DecoderClassifier(_DecoderBase):
    """A causal Transformer with a classification head read at the last real token ([SEP])."""

    kind = "classifier"

    def __init__(self, net: TransformerDecoderLM, vocab: Vocab, *, label_names: Sequence[str], config: dict | None = None):
        if net.cfg.head != "classifier":
            raise ValueError(f"DecoderClassifier needs a net with head='classifier'; got head={net.cfg.head!r}.")
        names = class_names(label_names, net.cfg.n_classes)
        super().__init__(net, vocab, config=config)
        self.label_names = names

    def __repr__(self) -> str:
        c = self.net.cfg
        return (f"DecoderClassifier(layers={c.n_layers}, heads={c.n_heads}, d_model={c.d_model}, norm={c.norm!r}, "
                f"vocab={len(self.vocab)}, labels={list(self.label_names)})")

    def encode(self, inputs: str | Sequence[str] | Sequence[Example], *, truncate: bool = False) -> Batch:
        """Texts or Examples -> Batch: words [SEP], right-padded (`encode_words` without [CLS])."""
        return encode_words(inputs, self.vocab, max_len=self.max_len, truncate=truncate, cls=False)
