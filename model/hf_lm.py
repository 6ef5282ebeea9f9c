"""HuggingFace decoder-only models (GPT-2, Llama, Qwen2, Mistral) behind the model interface.

Two heads, one attention path (`attnaudit.model.hf_attention.eager_probs_attention`, causal, grouped key/value
heads repeated per query head), hook sites ``decoder.layers.{i}.self_attn.pattern`` (and ``...values``):

    >>> clf = attnaudit.load_model("runs/gpt2-sst2")         # GPT2ForSequenceClassification -> HFDecoderClassifier
    >>> clf.predict(["a fine film"])                          # read from the LAST real token (readout = "last")
    >>> lm = attnaudit.load_model("my-gpt2")                  # GPT2LMHeadModel / ...ForCausalLM -> HFLanguageModel
    >>> ids = lm.generate_ids(["The capital of France is"], 3)             # greedy continuation, token ids
    >>> batch = lm.encode(["The capital of France is"], target_ids=ids)   # one row per generated step
    >>> attnaudit.get_explainer("saliency").explain(lm, batch, target=batch.labels)

Logits are computed here, not by transformers' heads: the base model (``net.transformer`` / ``net.model``)
gives hidden states [batch, seq, d_model], the last real token of each row is gathered by the attention mask
(`steps.gather_last`) and the head (``score`` / ``lm_head``) is applied. transformers' own sequence
classification finds the last token from input_ids and, given inputs_embeds (what gradient explainers pass),
falls back to the last POSITION, which is padding under right padding. Position ids are transformers' own
(0..seq-1 on every row): under right padding the real tokens get the positions they have unpadded.
On load, our logits are checked against transformers' eager attention on unpadded inputs (a mismatch raises).

The language model is a classifier over the vocabulary with one Batch row per (example, target step)
(`attnaudit.model.steps`): the prompt is an Example's `text`, the continuation its `target`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from attnaudit.data.examples import Example
from attnaudit.model.hf import VERIFY_TEXTS, HFClassifier
from attnaudit.model.hf_text import align_word_ids, text_inputs, tokenize_texts
from attnaudit.model.interface import Batch
from attnaudit.model.steps import gather_last, hooks_active, last_logits, step_batch

DECODERS = ("gpt2", "llama", "qwen2", "mistral")
TARGET_SEPARATOR = " "       # prompt + " " + target is tokenised, unless one side already has the whitespace

__all__ = ["HFDecoderClassifier", "HFLanguageModel", "DECODERS", "TARGET_SEPARATOR", "prepare_padding"]


def prepare_padding(net: Any, tokenizer) -> None:
    """Give a decoder a pad token: the tokenizer's own, else its end-of-sequence token (GPT-2 has none).

    Sets tokenizer.pad_token and config.pad_token_id when missing, so a saved fine-tune round-trips.
    Padding is always on the right and always masked, so which id pads changes no logit.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an end-of-sequence token; attnaudit "
                             "pads batches and needs one: tokenizer.add_special_tokens({'pad_token': ...}) and "
                             "resize the model's embeddings.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = int(tokenizer.pad_token_id)


class _Decoder:
    """What the decoder classifier and the LM share: causal sites, hidden states, W^O, verification, layers."""

    SITES = "decoder"
    readout = "last"
    net: Any
    tokenizer: Any
    hf_config: Any
    config: dict
    n_layers: int
    n_heads: int
    _through_our_attention: Any
    check_ids: Any
    device: Any
    evaluating: Any
    _sites: list

    # -- set-up ---------------------------------------------------------------------------------------
    def _check_decoder(self, net: Any) -> None:
        hf = net.config
        if hf.model_type not in DECODERS:
            raise ValueError(f"model_type must be one of {', '.join(DECODERS)} for {type(self).__name__}; "
                             f"got {hf.model_type!r}.")
        if getattr(hf, "reorder_and_upcast_attn", False):
            raise ValueError("GPT-2 with reorder_and_upcast_attn=True computes its attention in a different "
                             "order than plain softmax attention; attnaudit needs it False.")

    def _special_ids(self, tokenizer) -> None:
        """pad (the tokenizer's, else EOS: `prepare_padding`), mask_id = the mask, unknown or pad token."""
        self.pad_id = int(tokenizer.pad_token_id)
        self.unk_id = tokenizer.unk_token_id
        for candidate in (tokenizer.mask_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id):
            if candidate is not None:
                self.mask_id = int(candidate)
                break
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id

    # -- forward --------------------------------------------------------------------------------------
    def _hidden(self, attention_mask: Tensor, *, input_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        """The base model's last hidden states (final norm applied) -> [batch, seq, d_model], causal, no cache."""
        base = self.net.base_model                                      # net.transformer (GPT-2) or net.model
        return self._through_our_attention(lambda: base(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(),
            use_cache=False).last_hidden_state)                         # [batch, seq, d_model]

    def _head(self) -> nn.Module:
        raise NotImplementedError

    # -- attention ------------------------------------------------------------------------------------
    def _find_output_linear(self, module: nn.Module) -> nn.Module | None:
        """W^O of a decoder attention: Llama/Qwen2/Mistral's o_proj (Linear), GPT-2's c_proj (Conv1D)."""
        for name in ("o_proj", "c_proj"):
            found = getattr(module, name, None)
            if isinstance(found, nn.Linear) or type(found).__name__ == "Conv1D":
                return found
        return None

    def cascading_layers(self) -> list[tuple[str, list[nn.Module]]]:
        """Randomisation order for `analyses.sanity` (output first): head and final norm, layers top-down, embeddings."""
        base = self.net.base_model
        head = self._head()
        tied = head.weight is base.get_input_embeddings().weight
        norm = getattr(base, "ln_f", None) or getattr(base, "norm", None)
        top = ([] if tied else [head]) + ([norm] if norm is not None else [])
        layers = base.h if hasattr(base, "h") else base.layers
        embeddings = [m for m in (base.get_input_embeddings(), getattr(base, "wpe", None)) if m is not None]
        steps = [(f"decoder.layers.{i}", [layers[i]]) for i in reversed(range(len(layers)))]
        return [("head", top), *steps, ("embeddings", embeddings)]

    # -- verification ---------------------------------------------------------------------------------
    def _reference_and_ours(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """transformers' logits under its eager attention (`_eager`) and ours, on one unpadded row [1, seq]."""
        raise NotImplementedError

    @torch.no_grad()
    def verify_attention(self, texts: Sequence[str] = VERIFY_TEXTS, *, rtol: float = 1e-4, atol: float = 1e-5) -> float:
        """Logits through our attention vs transformers' eager forward, each text unpadded -> max |difference|.

        Raises RuntimeError when they differ beyond rtol·|eager| + atol·max(1, max|eager|), or when a layer's
        probabilities are not causal or do not sum to 1.
        """
        worst = 0.0
        patterns: list[Tensor] = []
        handles = [pair[0].register_forward_hook(lambda m, a, out: patterns.append(out)) for pair in self._sites]
        try:
            runs = []
            for text in texts:
                ids = self._verify_batch(text).input_ids[:1].to(self.device)          # one row, unpadded
                with self.evaluating():
                    runs.append((*self._reference_and_ours(ids), list(patterns)))
                patterns.clear()
        finally:
            for h in handles:
                h.remove()
        for reference, ours, layers in runs:
            diff = float((ours.float() - reference.float()).abs().max())
            bound = atol * max(1.0, float(reference.abs().max()))
            if not torch.allclose(ours.float(), reference.float(), rtol=rtol, atol=bound):
                raise RuntimeError(f"{self.config['architecture']}: logits with attnaudit's attention differ from "
                                   f"transformers' eager forward by up to {diff:.3g} (allowed {bound:.3g} + "
                                   f"{rtol:g}·|logit|); this model's attention is not plain causal softmax attention.")
            for i, p in enumerate(layers):
                seq = p.shape[-1]
                future = torch.ones(seq, seq, dtype=torch.bool, device=p.device).triu(1)
                if bool((p[..., future] != 0).any()):
                    raise RuntimeError(f"layer {i}: a token attends to a later one; the mask is not causal.")
                if not torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-4):
                    raise RuntimeError(f"layer {i}: attention rows do not sum to 1 "
                                       f"(max error {float((p.sum(-1) - 1).abs().max()):.3g}).")
            worst = max(worst, diff)
        return worst

    def _verify_batch(self, text: str) -> Batch:
        return self.encode([text], truncate=True)            # type: ignore[attr-defined]

    def _eager(self, forward):
        """forward() under transformers' own eager attention, ours restored after."""
        self.net.set_attn_implementation("eager")
        try:
            return forward()
        finally:
            self._use_our_attention()                        # type: ignore[attr-defined]


class HFDecoderClassifier(_Decoder, HFClassifier):
    """A decoder `...ForSequenceClassification` (GPT-2, Llama, Qwen2, Mistral): read from the last real token.

    Args as `HFClassifier`. A tokenizer without a pad token pads with its end-of-sequence token
    (`prepare_padding`); the tokenizer adds what it adds (GPT-2: nothing; Llama: BOS), and `special_mask` is
    the tokenizer's own special-tokens mask.
    """

    kind = "classifier"

    def __init__(self, net: Any, tokenizer, *, label_names: Sequence[str] | None = None,
                 config: dict | None = None, verify: bool = True):
        self._check_decoder(net)
        prepare_padding(net, tokenizer)
        super().__init__(net, tokenizer, label_names=label_names, config=config, verify=verify)

    def __repr__(self) -> str:
        return super().__repr__().replace("HFClassifier(", "HFDecoderClassifier(", 1)

    def _head(self) -> nn.Module:
        return self.net.score                                           # [d_model -> n_classes], no bias

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [batch, seq] and mask [batch, seq] (right padding) -> logits [batch, n_classes]."""
        self.check_ids(input_ids)
        dev = self.device
        mask = attention_mask.to(dev)
        hidden = self._hidden(mask, input_ids=input_ids.to(dev))                       # [batch, seq, d_model]
        return self.net.score(gather_last(hidden, mask))                               # [batch, n_classes]

    def logits_from_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.to(embeds.device)
        hidden = self._hidden(mask, inputs_embeds=embeds)                              # [batch, seq, d_model]
        return self.net.score(gather_last(hidden, mask))                               # [batch, n_classes]

    def _reference_and_ours(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        if int(ids[0, -1]) == self.pad_id:
            token = self.tokenizer.convert_ids_to_tokens(self.pad_id)
            raise ValueError(f"the tokenizer ends texts with {token!r}, which is also its pad token: transformers "
                             "reads such a model's class from the token before it, attnaudit from the last real "
                             "token. Give the tokenizer a pad token of its own (and the config its pad_token_id).")
        reference = self._eager(lambda: self.net(input_ids=ids, use_cache=False).logits)   # [1, n_classes]
        return reference, self.logits(ids, torch.ones_like(ids, dtype=torch.bool))


class HFLanguageModel(_Decoder, HFClassifier):
    """A causal LM (`GPT2LMHeadModel`, `...ForCausalLM`) as a classifier over its vocabulary, one row per step.

    `encode(examples)` takes each Example's `text` as the prompt and its `target` as the continuation: row s is
    prompt + target[:s] and its label target[s] (`steps.step_batch`); texts alone (or examples without a
    target) give one row per prompt, for the next token. The prompt keeps the special tokens the tokenizer puts
    BEFORE a text (Llama's BOS; GPT-2 puts none) and drops those after it (an EOS or [SEP] would end the prompt).

    The target is tokenised as a continuation: prompt + TARGET_SEPARATOR + target (no separator when either side
    already has whitespace there) is tokenised without special tokens and split at the prompt's own tokens; a
    target whose first token would merge with the prompt's last, that is empty, or that holds a token the
    tokenizer maps to its unknown token is refused. `encode(prompts, target_ids=...)` takes token ids instead
    (e.g. `generate_ids`), exactly.

    n_classes is the vocabulary size and label_names its tokens; `logits` -> [rows, vocab].
    """

    kind = "lm"

    def __init__(self, net: Any, tokenizer, *, config: dict | None = None, verify: bool = True):
        self._check_decoder(net)
        prepare_padding(net, tokenizer)
        super().__init__(net, tokenizer, label_names=None, config=config, verify=verify)
        self.config.pop("label_names", None)                            # the whole vocabulary: not provenance
        self.config["vocab_size"] = self.n_classes

    def __repr__(self) -> str:
        return (f"HFLanguageModel({self.config['architecture']}, layers={self.n_layers}, heads={self.n_heads}, "
                f"d_model={self.hf_config.hidden_size}, vocab={self.vocab_size})")

    # -- description ------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return int(self.net.get_output_embeddings().weight.shape[0])

    def _default_label_names(self) -> list[str]:
        n_tok = len(self.tokenizer)
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(min(n_tok, self.n_classes))))
        return [str(t) for t in tokens] + [f"<id {i}>" for i in range(n_tok, self.n_classes)]

    def _head(self) -> nn.Module:
        return self.net.get_output_embeddings()                         # lm_head [d_model -> vocab]

    # -- text in ----------------------------------------------------------------------------------
    def encode(self, inputs: str | Sequence[str] | Sequence[Example], *, truncate: bool = False,
               targets: Sequence[str] | None = None, target_ids: Sequence[Sequence[int]] | None = None) -> Batch:
        """Prompts (texts or Examples) and continuations -> a Batch with one row per (example, target step).

        Args:
            inputs: prompts; an Example's `target` is its continuation (unless targets/target_ids are given).
            targets: one continuation text per prompt; target_ids: one list of token ids per prompt (exact).
            truncate: a prompt plus target longer than max_len raises unless True; then the prompt is cut from
                the left (its leading special tokens kept) and `batch.truncated` says which rows were.
        """
        if targets is not None and target_ids is not None:
            raise ValueError("give targets (texts) or target_ids (token ids), not both.")
        examples, texts = text_inputs(inputs, what="prompt")
        for name, given in (("targets", targets), ("target_ids", target_ids)):
            if given is not None and len(given) != len(texts):
                raise ValueError(f"{name} must have one entry per prompt ({len(texts)}); got {len(given)}.")
        need_words = any(e is not None and e.rationale is not None for e in examples)
        prompts, flags, words = self._prompts(texts, word_ids=need_words)
        if target_ids is not None:
            tgt: list[list[int] | None] = [[int(t) for t in row] for row in target_ids]
            for row in tgt:
                if row:
                    self.check_ids(torch.tensor(row))
        else:
            texts_t = list(targets) if targets is not None else [e.target if e is not None else None for e in examples]
            tgt = [None if t is None else self._target_ids(texts[i], prompts[i], t, i) for i, t in enumerate(texts_t)]
        cut = [False] * len(prompts)
        for i, (p, steps) in enumerate(zip(prompts, tgt)):
            n_steps = len(steps) if steps else 1
            extra = len(p) + n_steps - 1 - self.max_len
            if extra > 0:
                if not truncate:
                    raise ValueError(f"inputs[{i}]: prompt ({len(p)} tokens) plus target ({n_steps}) "
                                     f"exceeds this model's context of {self.max_len} tokens; pass truncate=True "
                                     "(the prompt is cut from the left) or shorten it.")
                lead = next((j for j, f in enumerate(flags[i]) if not f), len(p))       # leading specials kept
                if len(p) - lead <= extra:
                    raise ValueError(f"inputs[{i}]: the target alone exceeds this model's context of {self.max_len} "
                                     "tokens; shorten the target.")
                keep = list(range(lead)) + list(range(lead + extra, len(p)))
                prompts[i], flags[i], words[i] = ([r[j] for j in keep] for r in (p, flags[i], words[i]))
                cut[i] = True
        known = [e for e in examples if e is not None]
        rationale = None
        if len(known) == len(examples) and all(e.rationale is not None for e in known):
            rationale = [[0.0 if w is None else float(e.rationale[w]) for w in words[i]]    # type: ignore[index]
                         for i, e in enumerate(known)]                                       # word w -> its pieces
        ids = [e.id for e in known] if len(known) == len(examples) else None
        batch = step_batch(prompts, tgt, pad_id=self.pad_id, tokens=self.tokenizer.convert_ids_to_tokens,
                           max_len=self.max_len, prompt_special=flags, texts=texts, ids=ids, rationale=rationale,
                           pad_token=str(self.tokenizer.pad_token))
        assert batch.steps is not None                                                  # step_batch sets them
        return replace(batch, truncated=[cut[e] for e, _ in batch.steps])

    def _prompts(self, texts: Sequence[str], *, word_ids: bool):
        """-> (prompt ids, special flags, whitespace-word index or None per token), trailing special tokens dropped."""
        full, special, full_words, _ = tokenize_texts(self.tokenizer, texts, word_ids=word_ids)   # no length limit
        rows, flags, words = [], [], []
        for r, s, w in zip(full, special, full_words):
            end = len(r)
            while end > 1 and s[end - 1]:                               # EOS / [SEP] after the text
                end -= 1
            rows.append(r[:end])
            flags.append(s[:end])
            words.append(w[:end])
        return rows, flags, words

    def _target_ids(self, prompt: str, prompt_ids: list[int], target: str, i: int) -> list[int]:
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"inputs[{i}]: the target must be a non-empty text; got {target!r}.")
        sep = "" if prompt[-1:].isspace() or target[:1].isspace() else TARGET_SEPARATOR
        plain = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        joined = self.tokenizer(prompt + sep + target, add_special_tokens=False, verbose=False)["input_ids"]
        if list(joined[: len(plain)]) != list(plain):
            raise ValueError(f"inputs[{i}]: the target {target!r} merges with the prompt's last token when tokenised "
                             "as its continuation, so the prompt's tokens would change; end the prompt on a word "
                             "boundary (without trailing whitespace: the separator goes with the target), or pass "
                             "target_ids.")
        ids = [int(t) for t in joined[len(plain):]]
        if not ids:
            raise ValueError(f"inputs[{i}]: the target {target!r} gives no tokens.")
        if self.unk_id is not None and self.unk_id in ids and str(self.tokenizer.unk_token) not in target:
            bad = [t for t in target.split() if self.unk_id in self.tokenizer(t, add_special_tokens=False)["input_ids"]]
            raise ValueError(f"inputs[{i}]: the tokenizer cannot encode the target {target!r} (it maps "
                             f"{', '.join(map(repr, bad)) or 'part of it'} to {self.tokenizer.unk_token!r}); "
                             "an explanation of an unknown token explains nothing.")
        return ids

    def word_ids(self, inputs) -> list[list[int | None]]:
        """Per row and position, the whitespace word of the PROMPT (`text.split()`) a token belongs to.

        None for special tokens, the target prefix and padding. `inputs`: a Batch or Attribution (with
        `texts`: each row's prompt) or texts.
        """
        return align_word_ids(inputs, lambda texts: self._prompts(texts, word_ids=True)[::2],  # rows, words
                              row="row", ids="prompt ids")

    # -- forward ----------------------------------------------------------------------------------
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [rows, seq] and mask [rows, seq] (right padding) -> next-token logits [rows, vocab].

        Rows that are prefixes of a longer row share its forward (`steps.last_logits`; a masked hole must be the
        same hole) unless a hook records or edits the attention or a gradient is asked for. The head is applied to
        the gathered last hidden state, which is the same as reading [rows, seq, vocab] at the last position (it
        acts position by position).
        """
        self.check_ids(input_ids)
        dev = self.device
        ids, mask = input_ids.to(dev), attention_mask.to(dev)

        def forward(i: Tensor, m: Tensor) -> Tensor:
            return self._hidden(m, input_ids=i)                                       # [n, seq, d_model]

        hidden = last_logits(forward, ids, mask, share=not hooks_active(self.hook_points()))   # [rows, d_model]
        return self._head()(hidden)                                                    # [rows, vocab]

    def logits_from_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.to(embeds.device)
        hidden = self._hidden(mask, inputs_embeds=embeds)                              # [rows, seq, d_model]
        return self._head()(gather_last(hidden, mask))                                 # [rows, vocab]

    def sequence_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Next-token logits at every position (teacher forcing) -> [batch, seq, vocab]; padded positions are
        meaningless."""
        self.check_ids(input_ids)
        dev = self.device
        return self._head()(self._hidden(attention_mask.to(dev), input_ids=input_ids.to(dev)))

    def sequence_logits_from_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Next-token logits at every position from token embeddings -> [batch, seq, vocab] (one forward for
        every step of a continuation: `attnaudit.explain.gradients.step_gradients`)."""
        return self._head()(self._hidden(attention_mask.to(embeds.device), inputs_embeds=embeds))

    def _reference_and_ours(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        reference = self._eager(lambda: self.net(input_ids=ids, use_cache=False).logits)   # [1, seq, vocab]
        return reference, self.sequence_logits(ids, torch.ones_like(ids, dtype=torch.bool))

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, texts: str | Sequence[str], n_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt -> up to n_tokens ids per prompt (it stops after an EOS, kept).

        Feed them back as `encode(texts, target_ids=...)` to explain the model's own generation step by step.
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be an int >= 1; got {n_tokens!r}.")
        prompts, _, _ = self._prompts(list(texts), word_ids=False)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        with self.evaluating():
            for _ in range(n_tokens):
                live = [i for i, d in enumerate(done) if not d]
                if not live:
                    break
                rows = [prompts[i] + out[i] for i in live]
                if max(map(len, rows)) > self.max_len:
                    raise ValueError(f"generation reached this model's context of {self.max_len} tokens; ask for "
                                     "fewer tokens or a shorter prompt.")
                seq = max(map(len, rows))
                ids = torch.tensor([r + [self.pad_id] * (seq - len(r)) for r in rows])          # [live, seq]
                mask = torch.arange(seq)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
                nxt = self.logits(ids, mask).argmax(-1).tolist()                              # [live]
                for i, t in zip(live, nxt):
                    out[i].append(int(t))
                    done[i] = self.eos_id is not None and int(t) == int(self.eos_id)
        return out

    def generate(self, texts: str | Sequence[str], n_tokens: int) -> list[str]:
        """Greedy continuation of each prompt -> its decoded text (special tokens skipped); ids: `generate_ids`."""
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.generate_ids(texts, n_tokens)]
