"""HuggingFace encoder classifiers (BERT, DistilBERT, RoBERTa, ALBERT, ELECTRA) behind the model interface.

Decoder-only models (GPT-2, Llama, Qwen2, Mistral: sequence classification and causal LM) are subclasses of
`HFClassifier` in `attnaudit.model.hf_lm`, with causal sites ``decoder.layers.{i}.self_attn.pattern``.

`load_hf(folder)` (`attnaudit.model.hf_load`; what `attnaudit.load_model` calls for a folder whose config.json
names `architectures`) returns an `HFClassifier`, an `ExplainableModel` (`attnaudit.model.interface`) like the
built-in `TextClassifier`, so every explainer and analysis runs on it unchanged.

Attention is computed by one function of ours (`attnaudit.model.hf_attention.eager_probs_attention`),
registered in transformers' `AttentionInterface` under the name "attnaudit", with the probabilities routed
through the HookPoints ``encoder.layers.{i}.self_attn.pattern`` (and ``...values``) of this adapter.
A model loaded with sdpa or flash attention is switched to this path, and on one batch its logits are
checked against transformers' own eager attention (a mismatch raises).

    >>> model = attnaudit.load_model("my-finetuned-bert")          # config.json + model.safetensors + tokenizer
    >>> model = attnaudit.load_model(minilm_path(), num_labels=2)   # no head in the folder: a fresh, UNTRAINED one
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnaudit.data.examples import Example
from attnaudit.model.hf_attention import (
    _ACTIVE,
    ATTENTION,
    AttentionMasks,
    _Forward,
    allowed_pairs,
    attention_masks,
    eager_probs_attention,
    register_attention,
    use_attention,
)
from attnaudit.model.hf_load import (
    SUPPORTED,
    check_tokenizer_files,
    check_weights,
    fresh_head,
    load_hf,
    minilm_path,
    transformers_module,
)
from attnaudit.model.hf_text import align_word_ids, offsets_to_words, text_batch, text_inputs, tokenize_texts
from attnaudit.model.hooks import HookPoint
from attnaudit.model.interface import Batch, ClassifierBase, class_names

VERIFY_TEXTS = ("attention probabilities are recorded at every layer of this model", "a")

__all__ = ["HFClassifier", "load_hf", "minilm_path", "transformers_module", "offsets_to_words", "VERIFY_TEXTS",
           "ATTENTION", "SUPPORTED", "AttentionMasks", "allowed_pairs", "attention_masks", "eager_probs_attention",
           "register_attention", "check_tokenizer_files", "check_weights", "fresh_head"]


class HFClassifier(ClassifierBase):
    """A HuggingFace `...ForSequenceClassification` model and its tokenizer behind the model interface.

    Args:
        net: the transformers model (any attention implementation: it is switched to ours and verified).
        tokenizer: its tokenizer (a fast one gives word alignments: rationales and `word_ids`).
        label_names: one per class; None takes config.id2label.
        config: provenance stored verbatim in `model.config` (path, head trained or not, ...).
        verify: compare our attention's logits with transformers' eager attention on one batch.
    """

    kind = "classifier"
    # a transformers PreTrainedModel: its config and submodules are looked up by name (transformers ships no
    # complete stubs), so it is typed Any
    net: Any

    PREDICT_BATCH = 64                    # pretrained models are wider than ours
    SITES = "encoder"                     # hook sites ``{SITES}.layers.{i}.self_attn.pattern``; decoders: "decoder"

    def __init__(self, net: Any, tokenizer, *, label_names: Sequence[str] | None = None,
                 config: dict | None = None, verify: bool = True):
        register_attention()
        hf = net.config
        if hf.model_type not in SUPPORTED:
            raise ValueError(f"model_type must be one of {', '.join(SUPPORTED)}; got {hf.model_type!r}.")
        self.net = net
        self.tokenizer = tokenizer
        self.hf_config = hf
        self._vocab_size = int(net.get_input_embeddings().num_embeddings)
        n_classes = self.n_classes
        names = list(label_names) if label_names is not None else self._default_label_names()
        self.label_names = tuple(str(n) for n in class_names(names, n_classes))
        self._special_ids(tokenizer)
        if len(tokenizer) > self.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table only "
                             f"{self.vocab_size}; they do not belong together.")
        n_layers = int(hf.num_hidden_layers) * int(getattr(hf, "inner_group_num", 1) or 1)   # ALBERT reuses layers
        self._sites = [(HookPoint(), HookPoint()) for _ in range(n_layers)]     # (pattern, values) by layer
        self._n_layers = n_layers
        self._attention_modules: list[nn.Module] = []       # in call order, from the first forward
        self._output_linears: list[nn.Module | None] = []        # nn.Linear, or GPT-2's Conv1D (model/hf_lm.py)
        self.config = {"format": "huggingface", "kind": self.kind, "model_type": hf.model_type,
                       "architecture": type(net).__name__, "label_names": list(self.label_names),
                       "transformers_version": transformers_module().__version__, "attention": ATTENTION,
                       "head": "as given", **(config or {})}
        self._use_our_attention()
        if verify:
            self.config["verified_max_abs_diff"] = self.verify_attention()
        else:                                       # one forward still maps layers to modules (W^O, values sites)
            self.config["verified_max_abs_diff"] = None
            with self.evaluating(), torch.no_grad():
                self(self.encode(VERIFY_TEXTS[1:]))

    def _default_label_names(self) -> list[str]:
        return [self.hf_config.id2label.get(i, f"LABEL_{i}") for i in range(self.n_classes)]

    def _special_ids(self, tokenizer) -> None:
        """pad_id, mask_id (the perturbations' replacement), unk_id, cls_id, sep_id from the tokenizer."""
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; attnaudit pads batches and needs one.")
        self.pad_id = int(tokenizer.pad_token_id)
        self.unk_id = tokenizer.unk_token_id
        mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
        if mask_id is None:
            raise ValueError("the tokenizer has neither a mask nor an unknown token; perturbations need one.")
        self.mask_id = int(mask_id)
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id

    # -- description ------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return int(self.hf_config.num_labels)

    @property
    def untrained_weights(self) -> list[str]:
        """Parameters newly initialised at load (a fresh head), empty once trained; the model card records them."""
        return list(self.config.get("untrained_weights") or [])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def n_heads(self) -> int:
        return int(self.hf_config.num_attention_heads)

    @property
    def max_len(self) -> int:
        """Longest input in tokens: the position table (RoBERTa's starts after padding_idx), the tokenizer's limit."""
        positions = int(self.hf_config.max_position_embeddings)
        if self.hf_config.model_type == "roberta":
            positions -= int(self.hf_config.pad_token_id) + 1
        limit = getattr(self.tokenizer, "model_max_length", None)
        return min(positions, int(limit)) if isinstance(limit, int) and limit < 10**6 else positions

    def __repr__(self) -> str:
        head = self.config["head"]
        return (f"HFClassifier({self.config['architecture']}, layers={self.n_layers}, heads={self.n_heads}, "
                f"d_model={self.hf_config.hidden_size}, vocab={self.vocab_size}, labels={list(self.label_names)}, "
                f"head={head!r})")

    # -- text in ----------------------------------------------------------------------------------
    def encode(self, inputs: str | Sequence[str] | Sequence[Example], *, truncate: bool = False) -> Batch:
        """Texts or Examples -> Batch with the model's tokenizer, special tokens added, right-padded.

        An example longer than max_len tokens raises unless `truncate=True`. An Example's rationale (one 0/1
        per whitespace word) is spread over the word's sub-word tokens.
        """
        examples, texts = text_inputs(inputs)
        need_words = any(e is not None and e.rationale is not None for e in examples)
        rows, special, words, cut = self._tokenize(texts, truncate=truncate, word_ids=need_words)
        return text_batch(self.tokenizer, self.pad_id, texts, examples, rows, special, words, cut)

    def _tokenize(self, texts: Sequence[str], *, truncate: bool, word_ids: bool):
        """-> (ids per text, special flags per text, whitespace-word index per token or None, truncated flags)."""
        return tokenize_texts(self.tokenizer, texts, max_len=self.max_len, truncate=truncate, word_ids=word_ids)

    def word_ids(self, inputs) -> list[list[int | None]]:
        """Per example and position, the index of the whitespace word (`text.split()`) a token belongs to.

        None for special tokens and padding. `inputs`: a Batch or an Attribution (anything with `texts` and
        `input_ids`) or texts; for `attnaudit.explain.words.aggregate_words(attr, word_ids=model.word_ids(attr))`.
        """
        return align_word_ids(inputs, lambda texts: self._tokenize(texts, truncate=True, word_ids=True)[::2])  # rows, words

    # -- forward ----------------------------------------------------------------------------------
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [batch, seq] and mask [batch, seq] -> logits [batch, n_classes]."""
        self.check_ids(input_ids)
        dev = self.device
        return self._forward(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev).long())

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings only (positions and token types are added inside) -> [batch, seq, d_embed]."""
        self.check_ids(input_ids)
        return self.net.get_input_embeddings()(input_ids.to(self.device))

    def logits_from_embeds(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        return self._forward(inputs_embeds=embeds, attention_mask=attention_mask.to(embeds.device).long())

    def _forward(self, **inputs) -> Tensor:
        return self._through_our_attention(lambda: self.net(**inputs).logits)   # [batch, n_classes]

    def _through_our_attention(self, forward):
        """forward() with the hook sites of this adapter active: each self-attention call gets its layer's sites."""
        run = _Forward(list(self._sites))
        token = _ACTIVE.set(run)
        try:
            logits = forward()
        finally:
            _ACTIVE.reset(token)
        if len(run.modules) != self.n_layers:
            raise RuntimeError(
                f"{len(run.modules)} of {self.n_layers} self-attention layers ran through attnaudit's attention: "
                f"{self.config['architecture']} does not use transformers' AttentionInterface in transformers "
                f"{self.config['transformers_version']}; upgrade: pip install -U 'transformers>=5'.")
        if not self._attention_modules:
            self._attention_modules = list(run.modules)
            self._output_linears = [self._find_output_linear(m) for m in run.modules]
        return logits

    # -- attention --------------------------------------------------------------------------------
    def _use_our_attention(self) -> None:
        use_attention(self.net, ATTENTION, self.config)

    @torch.no_grad()
    def verify_attention(self, texts: Sequence[str] = VERIFY_TEXTS, *, rtol: float = 1e-4, atol: float = 1e-5) -> float:
        """Logits through our attention vs transformers' eager attention on `texts` -> max |difference|.

        Raises RuntimeError when they differ beyond rtol·|eager| + atol·max(1, max|eager|), or when some layer's
        probabilities do not sum to 1 on real rows.
        """
        batch = self.encode(list(texts), truncate=True)
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        with self.evaluating():
            self.net.set_attn_implementation("eager")
            try:
                reference = self.net(input_ids=ids, attention_mask=mask.long()).logits       # [batch, n_classes]
            finally:
                self._use_our_attention()
            patterns: list[Tensor] = []
            handles = [pair[0].register_forward_hook(lambda m, a, out: patterns.append(out)) for pair in self._sites]
            try:
                ours = self.logits(ids, mask)
            finally:
                for h in handles:
                    h.remove()
        diff = float((ours.float() - reference.float()).abs().max())
        bound = atol * max(1.0, float(reference.abs().max()))
        if not torch.allclose(ours.float(), reference.float(), rtol=rtol, atol=bound):
            raise RuntimeError(f"{self.config['architecture']}: logits with attnaudit's attention differ from "
                               f"transformers' eager attention by up to {diff:.3g} (allowed {bound:.3g} + "
                               f"{rtol:g}·|logit|); this model's attention is not plain softmax attention.")
        rows = mask[:, None, :, None].expand_as(patterns[0])                                  # real query rows
        for i, p in enumerate(patterns):
            sums = p.sum(-1)[rows[..., 0]]
            if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                raise RuntimeError(f"layer {i}: attention rows of real tokens do not sum to 1 "
                                   f"(max error {float((sums - 1).abs().max()):.3g}).")
        return diff

    def hook_points(self) -> dict[str, HookPoint]:
        """Sites ``encoder.layers.{i}.self_attn.pattern`` [batch, head, query, key] and ``.values``.

        The values sites ([batch, head, key, d_head]) are offered only where W^O is known (`output_weight`).
        """
        points: dict[str, HookPoint] = {}
        with_values = all(self._output_linear(i) is not None for i in range(self.n_layers))
        for i, (pattern, values) in enumerate(self._sites):
            points[f"{self.SITES}.layers.{i}.self_attn.pattern"] = pattern
            if with_values:
                points[f"{self.SITES}.layers.{i}.self_attn.values"] = values
        return points

    @property
    def attention_sites(self) -> list[str]:
        """The self-attention pattern sites in layer order (``encoder.layers.{i}.self_attn.pattern``)."""
        return [f"{self.SITES}.layers.{i}.self_attn.pattern" for i in range(self.n_layers)]

    def _output_linear(self, layer: int) -> nn.Module | None:
        return self._output_linears[layer] if self._output_linears else None

    def _find_output_linear(self, module: nn.Module) -> nn.Module | None:
        """W^O of an attention module: DistilBERT's out_lin, ALBERT's dense, BERT/RoBERTa/ELECTRA's output.dense."""
        for name in ("out_lin", "dense"):
            if isinstance(getattr(module, name, None), nn.Linear):
                return getattr(module, name)
        for parent in self.net.modules():
            if getattr(parent, "self", None) is module:
                dense = getattr(getattr(parent, "output", None), "dense", None)
                return dense if isinstance(dense, nn.Linear) else None
        return None

    def output_weight(self, layer: int) -> Tensor:
        """W^O split by (query) head -> [d_model, head, d_head]: head h's value v maps to W^O[:, h] @ v.

        GPT-2's Conv1D stores its weight as [in, out] (y = x @ W + b), so it is transposed first.
        """
        if not (isinstance(layer, int) and 0 <= layer < self.n_layers):
            raise ValueError(f"layer must be an int in [0, {self.n_layers - 1}]; got {layer!r}.")
        linear = self._output_linear(layer)
        if linear is None:
            raise ValueError(f"{self.config['architecture']}: the attention output projection W^O of layer {layer} "
                             "was not found, so attention norms are not available for this model.")
        weight = cast(Tensor, linear.weight)                              # nn.Linear: [d_model, head·d_head]
        weight = weight if isinstance(linear, nn.Linear) else weight.t()  # GPT-2's Conv1D stores [in, out]
        return weight.reshape(weight.shape[0], self.n_heads, -1)          # [d_model, head, d_head]

    def cascading_layers(self) -> list[tuple[str, list[nn.Module]]]:
        """Randomisation order for `analyses.sanity` (output first): head, encoder layers top-down, embeddings."""
        base = self.net.base_model
        head = [m for m in self.net.children() if m is not base]
        head += [base.pooler] if getattr(base, "pooler", None) is not None else []
        encoder = base.transformer if self.hf_config.model_type == "distilbert" else base.encoder
        layers = getattr(encoder, "albert_layer_groups", None) or encoder.layer
        embeddings = [base.embeddings] + [m for name in ("embedding_hidden_mapping_in", "embeddings_project")
                                          for m in [getattr(encoder, name, None) or getattr(base, name, None)]
                                          if m is not None]
        steps = [(f"encoder.layers.{i}", [layers[i]]) for i in reversed(range(len(layers)))]
        return [("head", head), *steps, ("embeddings", embeddings)]

