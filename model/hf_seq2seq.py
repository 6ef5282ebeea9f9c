"""HuggingFace encoder–decoders (BART, T5, Marian) behind the interface of the built-in `Translator`.

`load_hf_seq2seq(folder)` returns an `HFTranslator`, an `AttentionModel[PairBatch]` like `Translator`: `encode`
builds the source with the model's tokenizer and the teacher-forcing target (decoder inputs start with the model's
decoder_start_token_id), `model(pairs)` gives teacher-forced logits [batch, tgt, vocab], `translate` decodes
greedily. Every attention module runs `attnaudit.model.hf_seq2seq_attention.seq2seq_probs_attention`, so the sites

    encoder.layers.{i}.self_attn.pattern     [batch, head, src, src]
    decoder.layers.{i}.self_attn.pattern     [batch, head, tgt, tgt]   causal
    decoder.layers.{i}.cross_attn.pattern    [batch, head, tgt, src]

(and ``...values``, [batch, head, key, d_head]) are recorded and edited with `attnaudit.model.hooks`. On load, one
batch's logits are checked against transformers' own eager attention (a mismatch raises).

    >>> model = load_hf_seq2seq("my-t5")                          # config.json + model.safetensors + tokenizer
    >>> pairs = model.encode([Example("0", "the cat sat", target="die Katze sass")])
    >>> logits, cache = record(model, pairs, names="decoder.*.cross_attn.pattern")
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnaudit.data.examples import Example
from attnaudit.model.hf_attention import use_attention
from attnaudit.model.hf_load import (
    check_tokenizer_files,
    check_weights,
    load_eager,
    load_tokenizer,
    transformers_module,
)
from attnaudit.model.hf_seq2seq_attention import (
    ROLES,
    SEQ2SEQ_ATTENTION,
    Seq2SeqRun,
    Site,
    register_seq2seq_attention,
    running,
)
from attnaudit.model.hf_text import align_word_ids, is_fast, offsets_to_words, text_batch, text_inputs, tokenize_texts
from attnaudit.model.hooks import HookPoint
from attnaudit.model.interface import Batch, ModelBase, check_ids
from attnaudit.model.seq2seq import PairBatch

SEQ2SEQ_SUPPORTED = ("bart", "t5", "marian")
# what a tokenizer needs besides tokenizer_config.json: tokenizer.json, or the slow files
SEQ2SEQ_VOCAB_FILES = {"bart": ("vocab.json", "merges.txt"), "t5": ("spiece.model",),
                       "marian": ("source.spm", "target.spm", "vocab.json")}
VERIFY_PAIRS = (("attention probabilities are recorded at every layer of this model", "every layer is recorded"),
                ("a", "b c"))
_SITE_NAMES = {"encoder": "encoder.layers.{}.self_attn", "decoder": "decoder.layers.{}.self_attn",
               "cross": "decoder.layers.{}.cross_attn"}

__all__ = ["HFTranslator", "load_hf_seq2seq", "SEQ2SEQ_SUPPORTED", "SEQ2SEQ_ATTENTION", "VERIFY_PAIRS"]


class HFTranslator(ModelBase[PairBatch]):
    """A HuggingFace `...ForConditionalGeneration` (BART, T5, Marian) and its tokenizer, as a `Translator`.

    Args:
        net: the transformers model (any attention implementation: it is switched to ours and verified).
        tokenizer: its tokenizer (a fast one gives word alignments: `word_ids`, rationales).
        config: provenance stored verbatim in `model.config` (path, ...).
        verify: compare our attention's logits with transformers' eager attention on `VERIFY_PAIRS`.

    >>> model = HFTranslator(T5ForConditionalGeneration.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))
    >>> with hooks(model, {"decoder.layers.1.cross_attn.pattern": uniform()}):
    ...     logits = model(model.encode([Example("0", "the cat", target="die katze")]))   # [batch, tgt, vocab]
    """

    kind = "seq2seq"
    net: Any                 # a transformers PreTrainedModel (no complete stubs): submodules looked up by name

    def __init__(self, net: Any, tokenizer, *, config: dict | None = None, verify: bool = True):
        register_seq2seq_attention()
        hf = net.config
        if hf.model_type not in SEQ2SEQ_SUPPORTED:
            raise ValueError(f"model_type must be one of {', '.join(SEQ2SEQ_SUPPORTED)}; got {hf.model_type!r}.")
        self.net, self.tokenizer, self.hf_config = net, tokenizer, hf
        self.label_names: tuple[str, ...] = ()
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; attnaudit pads batches and needs one.")
        self.pad_id = int(tokenizer.pad_token_id)
        mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
        if mask_id is None:
            raise ValueError("the tokenizer has neither a mask nor an unknown token; perturbations need one.")
        self.mask_id, self.unk_id = int(mask_id), tokenizer.unk_token_id
        if hf.decoder_start_token_id is None:
            raise ValueError(f"{type(net).__name__}'s config has no decoder_start_token_id; teacher forcing and "
                             "decoding start from it. Set config.decoder_start_token_id.")
        self.decoder_start_id = int(hf.decoder_start_token_id)
        eos = hf.eos_token_id if hf.eos_token_id is not None else tokenizer.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        eos = eos if eos is not None else tokenizer.sep_token_id
        if eos is None:
            raise ValueError("neither the config nor the tokenizer names an end-of-sequence token; decoding needs one.")
        self.eos_id = int(eos)
        self._vocab_size = int(net.get_input_embeddings().num_embeddings)
        if len(tokenizer) > self._vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table only "
                             f"{self._vocab_size}; they do not belong together.")
        self._sites = self._make_sites()
        self.config = {"format": "huggingface", "kind": self.kind, "model_type": hf.model_type,
                       "architecture": type(net).__name__, "transformers_version": transformers_module().__version__,
                       "attention": SEQ2SEQ_ATTENTION, **(config or {})}
        self._use_our_attention()
        self.config["verified_max_abs_diff"] = self.verify_attention() if verify else None

    # -- description ------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Encoder layers (`attention_sites`)."""
        return len(self._blocks(self.net.get_encoder()))

    @property
    def n_decoder_layers(self) -> int:
        return len(self._blocks(self.net.get_decoder()))

    def _blocks(self, stack: nn.Module) -> nn.ModuleList:
        """An encoder's or decoder's layers: T5's `block`, BART/Marian's `layers`."""
        return cast(nn.ModuleList, stack.block if self._is_t5 else stack.layers)

    @property
    def n_heads(self) -> int:
        hf = self.hf_config
        return int(hf.num_heads if self._is_t5 else hf.encoder_attention_heads)

    @property
    def n_decoder_heads(self) -> int:
        hf = self.hf_config
        return int(hf.num_heads if self._is_t5 else hf.decoder_attention_heads)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_len(self) -> int:
        """Longest source (and target) in tokens: the position table (T5 has none), the tokenizer's limit."""
        positions = None if self._is_t5 else int(self.hf_config.max_position_embeddings)
        limit = getattr(self.tokenizer, "model_max_length", None)
        limit = int(limit) if isinstance(limit, int) and limit < 10**6 else None
        known = [n for n in (positions, limit) if n is not None]
        return min(known) if known else 512

    @property
    def _is_t5(self) -> bool:
        return self.hf_config.model_type == "t5"

    def __repr__(self) -> str:
        return (f"HFTranslator({self.config['architecture']}, layers={self.n_layers}+{self.n_decoder_layers}, "
                f"heads={self.n_heads}, d_model={self.hf_config.d_model}, vocab={self.vocab_size})")

    # -- text in ----------------------------------------------------------------------------------
    def encode(self, inputs: str | Sequence[str] | Sequence[Example], *, truncate: bool = False) -> PairBatch:
        """Texts or Examples -> PairBatch: the source with the tokenizer's special tokens, right-padded.

        When every Example has a `target`: tgt_out [batch, tgt] = the tokenizer's labels for it (special tokens
        included, [PAD] after the end), tgt_in = the labels shifted right behind decoder_start_token_id
        (transformers' `shift_tokens_right`), tgt_mask = True on real target positions. A source or target longer
        than max_len tokens raises unless `truncate=True`.
        """
        examples, texts = text_inputs(inputs)
        src = self._source(texts, examples, truncate=truncate)
        targets = [e.target for e in examples if e is not None and e.target is not None]
        if len(targets) != len(examples):                                               # some have no target
            return PairBatch(src)
        enc = self.tokenizer(text_target=list(targets), add_special_tokens=True, truncation=False, verbose=False)
        rows = [list(map(int, r)) for r in enc["input_ids"]]
        for i, r in enumerate(rows):
            if len(r) > self.max_len and not truncate:
                raise ValueError(f"inputs[{i}]'s target has {len(r)} tokens but this model takes at most "
                                 f"{self.max_len} (special tokens included); pass truncate=True or shorten it.")
        rows = [r[: self.max_len] for r in rows]
        n = max(map(len, rows))
        lengths = torch.tensor([len(r) for r in rows])
        tgt_out = torch.tensor([r + [self.pad_id] * (n - len(r)) for r in rows], dtype=torch.long)   # [batch, tgt]
        start = torch.full((len(rows), 1), self.decoder_start_id, dtype=torch.long)
        tgt_in = torch.cat([start, tgt_out[:, :-1]], dim=1)                                          # [batch, tgt]
        tgt_mask = torch.arange(n)[None, :] < lengths[:, None]                                       # [batch, tgt]
        tgt_in = tgt_in.masked_fill(~tgt_mask, self.pad_id)
        return PairBatch(src, tgt_in, tgt_out, tgt_mask)

    def _source(self, texts: list[str], examples: list[Example | None], *, truncate: bool) -> Batch:
        need_words = any(e is not None and e.rationale is not None for e in examples)
        rows, special, words, cut = self._tokenize(texts, truncate=truncate, word_ids=need_words)
        return text_batch(self.tokenizer, self.pad_id, texts, examples, rows, special, words, cut, labels=False)

    def _tokenize(self, texts: Sequence[str], *, truncate: bool, word_ids: bool):
        """-> (ids per text, special flags per text, whitespace-word index per token or None, truncated flags)."""
        return tokenize_texts(self.tokenizer, texts, max_len=self.max_len, truncate=truncate, word_ids=word_ids,
                              slow_words=lambda t, r, s: self._words_from_pieces(t, r, s, target=False))

    def word_ids(self, inputs) -> list[list[int | None]]:
        """Per example and source position, the index of the whitespace word (`text.split()`) a token belongs to.

        None for special tokens and padding. `inputs`: a PairBatch, a Batch or an Attribution (anything with `texts`
        and `input_ids`), or texts.
        """
        inputs = inputs.src if isinstance(inputs, PairBatch) else inputs
        return align_word_ids(inputs, lambda texts: self._tokenize(texts, truncate=True, word_ids=True)[::2],  # rows, words
                              holders="a PairBatch, Batch or Attribution")

    def target_word_ids(self, targets: Sequence[str], tgt_out: Tensor | None = None) -> list[list[int | None]]:
        """Per target text and target position (of `tgt_out` [batch, tgt], as `encode` builds it), the index of the
        whitespace word (`target.split()`) the token belongs to; None for special tokens (BOS, EOS) and padding.

        Needs a fast tokenizer (character offsets). tgt_out, when given, must hold this tokenizer's labels for the
        targets (checked); rows are padded to its width.
        """
        fast = is_fast(self.tokenizer)
        targets = list(targets)
        enc = self.tokenizer(text_target=targets, add_special_tokens=True, return_special_tokens_mask=True,
                             return_offsets_mapping=fast, truncation=False, verbose=False)
        offsets = enc["offset_mapping"] if fast else [None] * len(targets)
        out = []
        for i, (t, r, o, sp) in enumerate(zip(targets, enc["input_ids"], offsets, enc["special_tokens_mask"])):
            r, sp = [int(x) for x in r][: self.max_len], [bool(x) for x in sp][: self.max_len]
            if tgt_out is not None and tgt_out[i, : len(r)].tolist() != r:
                raise ValueError(f"example {i}: tgt_out is not what this tokenizer makes of its target text; "
                                 "target_word_ids aligns only the model's own encoding.")
            out.append(offsets_to_words(t, list(o)[: len(r)], sp) if fast else
                       self._words_from_pieces(t, r, sp, target=True))
        width = max(map(len, out)) if tgt_out is None else tgt_out.shape[1]
        return [w + [None] * (width - len(w)) for w in out]

    def _words_from_pieces(self, text: str, ids: list[int], special: list[bool], *, target: bool) -> list[int | None]:
        """A slow tokenizer (no offsets, e.g. Marian's sentencepiece): tokenize word by word -> word of each token.

        Exact when the pieces of the words, concatenated, are the text's non-special tokens (sentencepiece,
        WordPiece); otherwise a ValueError (a byte-level BPE joins across spaces: use its fast tokenizer).
        """
        pieces: list[int] = []
        word_of: list[int] = []
        for w, word in enumerate(text.split()):
            one = {"text_target": word} if target else {"text": word}
            enc = self.tokenizer(**one, add_special_tokens=False, verbose=False)["input_ids"]
            pieces += [int(x) for x in enc]
            word_of += [w] * len(enc)
        real = [x for x, sp in zip(ids, special) if not sp]
        if pieces[: len(real)] != real:
            raise ValueError(f"{type(self.tokenizer).__name__} is not a fast tokenizer and tokenizing {text!r} word by "
                             "word does not give its tokens, so sub-words cannot be aligned with words; save the "
                             "model with a tokenizer.json (a fast tokenizer).")
        it = iter(word_of)
        return [None if sp else next(it) for sp in special]

    def target_tokens(self, ids: Sequence[int]) -> list[str]:
        """Target token ids -> their strings (the tokenizer's pieces)."""
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])

    def target_texts(self, targets: Sequence[str]) -> list[str]:
        """Each reference as `translate` would write it: its labels decoded without special tokens."""
        rows = self.tokenizer(text_target=list(targets), add_special_tokens=True, verbose=False)["input_ids"]
        return [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]

    def check_ids(self, input_ids: Tensor) -> None:
        """Ids outside the vocabulary would index garbage (or crash on CUDA): refuse them first."""
        check_ids(input_ids, self.vocab_size)

    # -- forward ----------------------------------------------------------------------------------
    def __call__(self, batch: PairBatch) -> Tensor:
        """Teacher-forced logits [batch, tgt, vocab] (rows at padded target positions carry no meaning)."""
        self.check_ids(batch.src.input_ids)
        if batch.tgt_in is not None:
            self.check_ids(batch.tgt_in)
        dev = self.device
        return self._teacher_forced(batch, input_ids=batch.src.input_ids.to(dev))

    def encoder_embeds(self, src_ids: Tensor) -> Tensor:
        """Source token embeddings, as the encoder adds positions to them -> [batch, src, d_model].

        Marian's √d_model scale is applied here (BART's lives in its embedding table, T5 has none), so
        `logits_from_src_embeds(encoder_embeds(ids), pairs)` equals `model(pairs)`.
        """
        self.check_ids(src_ids)
        encoder = self.net.get_encoder()
        embeds = encoder.embed_tokens(src_ids.to(self.device))                       # [batch, src, d_model]
        return embeds * encoder.embed_scale if self.hf_config.model_type == "marian" else embeds

    def logits_from_src_embeds(self, embeds: Tensor, pairs: PairBatch) -> Tensor:
        """Source embeddings [batch, src, d_model] (`encoder_embeds`) and the pairs' targets -> [batch, tgt, vocab]."""
        return self._teacher_forced(pairs, inputs_embeds=embeds)

    def _teacher_forced(self, pairs: PairBatch, **source) -> Tensor:
        tgt_in, _, tgt_mask = pairs.targets()
        dev = self.device
        src_mask, tgt_mask = pairs.src.attention_mask.to(dev), tgt_mask.to(dev)
        return self._forward(src_mask, tgt_mask, attention_mask=src_mask.long(), decoder_input_ids=tgt_in.to(dev),
                             decoder_attention_mask=tgt_mask.long(), **source)

    def _forward(self, src_mask: Tensor, tgt_mask: Tensor | None, **inputs) -> Tensor:
        """One forward with our sites active -> logits [batch, tgt, vocab] (or the encoder's hidden states)."""
        run = Seq2SeqRun(self._sites, src_mask, tgt_mask)
        encoder_only = tgt_mask is None
        with running(run):
            if encoder_only:
                out = self.net.get_encoder()(**inputs).last_hidden_state                 # [batch, src, d_model]
            else:
                out = self.net(**inputs, use_cache=False).logits                         # [batch, tgt, vocab]
        ran = run.counts()
        want = {"encoder": 0 if "encoder_outputs" in inputs else self.n_layers,
                "decoder": 0 if encoder_only else self.n_decoder_layers, "cross": 0 if encoder_only else self.n_decoder_layers}
        if ran != want:
            raise RuntimeError(
                f"attention calls through attnaudit's attention by kind: {ran}, expected {want}: "
                f"{self.config['architecture']} does not route all its attention through transformers' "
                f"AttentionInterface in transformers {self.config['transformers_version']}.")
        return out

    @torch.inference_mode()
    def translate(self, texts: str | Sequence[str] | Sequence[Example], *, max_len: int | None = None,
                  batch_size: int = 64) -> list[str]:
        """Greedy decoding from decoder_start_token_id until the end token -> one string per source.

        Plain argmax through our attention (hooks apply), without a cache and without the generation_config's
        penalties or forced tokens, except a `forced_bos_token_id` (BART); [PAD] is never emitted. max_len: the most
        tokens generated (default 2 × the longest source + 4; at most `self.max_len` - 1, the decoder's positions).
        """
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be an int >= 1 (tokens to generate) or None; got {max_len!r}.")
        items: list[str] | list[Example] = [texts] if isinstance(texts, str) else list(texts)  # type: ignore[assignment]
        forced = getattr(getattr(self.net, "generation_config", None), "forced_bos_token_id", None)
        out: list[str] = []
        with self.evaluating():
            for lo in range(0, len(items), batch_size):
                src = self.encode(items[lo : lo + batch_size], truncate=True).src.to(self.device)
                mask = src.attention_mask
                hidden = self._forward(mask, None, input_ids=src.input_ids, attention_mask=mask.long())
                memory = transformers_module().modeling_outputs.BaseModelOutput(last_hidden_state=hidden)
                limit = min(max_len or 2 * int(mask.sum(1).max()) + 4, self.max_len - 1)    # decoder positions
                b = len(src)
                ids = torch.full((b, 1), self.decoder_start_id, dtype=torch.long, device=self.device)
                done = torch.zeros(b, dtype=torch.bool, device=self.device)
                for step in range(limit):
                    logits = self._forward(mask, torch.ones_like(ids, dtype=torch.bool), encoder_outputs=memory,
                                           attention_mask=mask.long(), decoder_input_ids=ids)    # [batch, tgt, vocab]
                    last = logits[:, -1].float()                                                   # [batch, vocab]
                    if self.pad_id != self.eos_id:
                        last[:, self.pad_id] = float("-inf")
                    nxt = last.argmax(-1) if not (step == 0 and forced is not None) else \
                        torch.full((b,), int(forced), device=self.device)
                    nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)                # [batch]
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                    done |= nxt == self.eos_id
                    if bool(done.all()):
                        break
                for row in ids[:, 1:].tolist():
                    row = row[: row.index(self.eos_id)] if self.eos_id in row else row
                    out.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return out

    # -- attention --------------------------------------------------------------------------------
    def _attention_modules(self) -> dict[str, list[nn.Module]]:
        """The attention modules by role, layer order: BART/Marian `layers[i].self_attn` / `encoder_attn`, T5's
        `block[i].layer[0].SelfAttention` / `layer[1].EncDecAttention`."""
        enc, dec = self.net.get_encoder(), self.net.get_decoder()
        if self._is_t5:
            return {"encoder": [b.layer[0].SelfAttention for b in enc.block],
                    "decoder": [b.layer[0].SelfAttention for b in dec.block],
                    "cross": [b.layer[1].EncDecAttention for b in dec.block]}
        return {"encoder": [layer.self_attn for layer in enc.layers], "decoder": [layer.self_attn for layer in dec.layers],
                "cross": [layer.encoder_attn for layer in dec.layers]}

    def _make_sites(self) -> dict[nn.Module, Site]:
        return {m: Site(role, i, HookPoint(), HookPoint())
                for role, modules in self._attention_modules().items() for i, m in enumerate(modules)}

    def hook_points(self) -> dict[str, HookPoint]:
        """Every site -> HookPoint, in forward order: the encoder's, then each decoder layer's self and cross.

        ``<prefix>.pattern`` [batch, head, query, key] and ``<prefix>.values`` [batch, head, key, d_head].
        """
        by_role = {r: sorted((s for s in self._sites.values() if s.role == r), key=lambda s: s.layer) for r in ROLES}
        order = by_role["encoder"] + [s for pair in zip(by_role["decoder"], by_role["cross"]) for s in pair]
        points: dict[str, HookPoint] = {}
        for s in order:
            prefix = _SITE_NAMES[s.role].format(s.layer)
            points[f"{prefix}.pattern"], points[f"{prefix}.values"] = s.pattern, s.values
        return points

    def cascading_layers(self) -> list[tuple[str, list[nn.Module]]]:
        """Randomisation order for `analyses.sanity`, output first: "head" (lm_head and the decoder's final
        LayerNorm), "decoder.layers.{L-1}" … "decoder.layers.0", "encoder.layers.{L-1}" … "encoder.layers.0"
        (the encoder's final LayerNorm with its top layer), "embeddings" (token tables, learned positions and
        embedding LayerNorms of both sides; a tied lm_head shares the token table)."""
        enc, dec = self.net.get_encoder(), self.net.get_decoder()
        top = ("final_layer_norm", "layer_norm")                     # T5 / BART, Marian (pre-LN variants)
        bottom = ("embed_tokens", "embed_positions", "layernorm_embedding")
        pick = lambda part, names: [m for n in names if isinstance(m := getattr(part, n, None), nn.Module)]  # noqa: E731
        head = [self.net.get_output_embeddings(), *pick(dec, top)]
        d_layers, e_layers = self._blocks(dec), self._blocks(enc)
        steps = [(f"decoder.layers.{i}", [d_layers[i]]) for i in reversed(range(len(d_layers)))]
        e_steps = [(f"encoder.layers.{i}", [e_layers[i]]) for i in reversed(range(len(e_layers)))]
        e_steps[0] = (e_steps[0][0], [*pick(enc, top), *e_steps[0][1]])
        embeddings = [*pick(enc, bottom), *pick(dec, bottom)]
        shared = getattr(self.net, "shared", None) or getattr(getattr(self.net, "model", None), "shared", None)
        embeddings += [shared] if isinstance(shared, nn.Module) and all(shared is not m for m in embeddings) else []
        return [("head", head), *steps, *e_steps, ("embeddings", embeddings)]

    @property
    def decoder_self_attention_sites(self) -> list[str]:
        return [f"decoder.layers.{i}.self_attn.pattern" for i in range(self.n_decoder_layers)]

    @property
    def cross_attention_sites(self) -> list[str]:
        return [f"decoder.layers.{i}.cross_attn.pattern" for i in range(self.n_decoder_layers)]

    def output_weight(self, layer: int) -> Tensor:
        """W^O of encoder layer `layer`'s self-attention, split by head -> [d_model, head, d_head]."""
        return self._output_weight("encoder", layer, self.n_layers, self.n_heads, "")

    def cross_output_weight(self, layer: int) -> Tensor:
        """W^O of decoder layer `layer`'s cross-attention, split by head -> [d_model, head, d_head]."""
        return self._output_weight("cross", layer, self.n_decoder_layers, self.n_decoder_heads, " (a decoder layer)")

    def _output_weight(self, role: str, layer: int, n_layers: int, n_heads: int, what: str) -> Tensor:
        if not (isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < n_layers):
            raise ValueError(f"layer must be an int in [0, {n_layers - 1}]{what}; got {layer!r}.")
        module = self._attention_modules()[role][layer]
        linear = getattr(module, "o" if self._is_t5 else "out_proj")                   # T5's o, BART/Marian's out_proj
        return linear.weight.view(linear.weight.shape[0], n_heads, -1)

    def _use_our_attention(self) -> None:
        use_attention(self.net, SEQ2SEQ_ATTENTION, self.config)

    @torch.no_grad()
    def verify_attention(self, pairs: Sequence[tuple[str, str]] = VERIFY_PAIRS, *, atol: float = 1e-5) -> float:
        """Teacher-forced logits through our attention vs transformers' eager attention -> max |difference|.

        Compared on real target positions (a padded one is computed from all-zero attention rows here, as in the
        built-in model). Raises RuntimeError beyond atol·max(1, max|eager|), when a real row of probabilities
        does not sum to 1, or when the decoder's self-attention looks ahead.
        """
        batch = self.encode([Example(f"verify-{i}", s, target=t) for i, (s, t) in enumerate(pairs)], truncate=True)
        tgt_in, _, tgt_mask = batch.targets()
        dev = self.device
        inputs = dict(input_ids=batch.src.input_ids.to(dev), attention_mask=batch.src.attention_mask.to(dev).long(),
                      decoder_input_ids=tgt_in.to(dev), decoder_attention_mask=tgt_mask.to(dev).long(), use_cache=False)
        patterns: dict[str, Tensor] = {}
        with self.evaluating():
            self.net.set_attn_implementation("eager")
            try:
                reference = self.net(**inputs).logits                                    # [batch, tgt, vocab]
            finally:
                self._use_our_attention()
            points = {n: p for n, p in self.hook_points().items() if n.endswith(".pattern")}
            handles = [p.register_forward_hook(lambda m, a, out, n=n: patterns.__setitem__(n, out))
                       for n, p in points.items()]
            try:
                ours = self(batch)
            finally:
                for h in handles:
                    h.remove()
        real = tgt_mask.to(dev)                                                          # [batch, tgt]
        diff = float((ours[real].float() - reference[real].float()).abs().max())
        bound = atol * max(1.0, float(reference[real].abs().max()))
        if not diff <= bound:
            raise RuntimeError(f"{self.config['architecture']}: logits with attnaudit's attention differ from "
                               f"transformers' eager attention by up to {diff:.3g} (allowed {bound:.3g}); this "
                               "model's attention is not plain softmax attention.")
        src = batch.src.attention_mask.to(dev)
        for name, p in patterns.items():
            rows = src if name.startswith("encoder.") else real                          # [batch, query]
            sums = p.sum(-1).permute(0, 2, 1)[rows]                                      # [real rows, head]
            if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                raise RuntimeError(f"{name}: attention rows of real tokens do not sum to 1 "
                                   f"(max error {float((sums - 1).abs().max()):.3g}).")
            if ".self_attn." in name and name.startswith("decoder.") and bool(p.triu(1).ne(0).any()):
                raise RuntimeError(f"{name}: the decoder's self-attention attends to later target positions.")
        return diff


def load_hf_seq2seq(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> HFTranslator:
    """Load a local HuggingFace encoder–decoder folder as an `HFTranslator`, in eval mode, float32, on `device`.

    Args:
        path: a folder with config.json (`model_type` one of SEQ2SEQ_SUPPORTED), model.safetensors and the
            tokenizer files. Nothing is downloaded, no remote code runs, pickle weights are refused.
        verify: check one batch of logits against transformers' eager attention (`HFTranslator.verify_attention`).

    >>> model = load_hf_seq2seq("models/opus-mt-en-de")
    >>> model.translate(["the cat sat on the mat"])
    """
    tf = transformers_module()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json; a HuggingFace model folder holds config.json, "
                                "model.safetensors and the tokenizer files.")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = cfg.get("model_type")
    if model_type not in SEQ2SEQ_SUPPORTED:
        raise ValueError(f"model_type must be one of {', '.join(SEQ2SEQ_SUPPORTED)} for an encoder–decoder; "
                         f"{str(folder / 'config.json')!r} has {model_type!r}.")
    check_weights(folder, auto_class="AutoModelForSeq2SeqLM")
    check_tokenizer_files(folder, model_type, vocab_files=SEQ2SEQ_VOCAB_FILES)
    tokenizer = load_tokenizer(folder)
    net, info = load_eager(folder, tf.AutoModelForSeq2SeqLM)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{str(folder)!r} lacks weights {missing[:5]}{'...' if len(missing) > 5 else ''}; they "
                         "would be random. Is this the right folder?")
    net.eval()
    if str(device) != "cpu":
        net.to(device)
    provenance = {"path": str(folder), "source_architectures": list(cfg.get("architectures") or [])}
    return HFTranslator(net, tokenizer, config=provenance, verify=verify)
