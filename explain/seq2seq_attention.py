"""The attention family for encoder–decoders (`Translator`, `HFTranslator`): scores [batch, tgt, src] over the SOURCE
tokens for every target position t, the unit being log p(y_t | y_<t, x) of the reference token pairs.tgt_out[:, t]
(as `analyses.seq2seq`). The classifier versions are `explain.grad_attention` and `explain.attention`; the
definitions, defaults and names are theirs.

grad_attention      Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and
                    Encoder-Decoder Transformers" (ICCV): the encoder–decoder rules 6–10 (`relevance_rules`, the
                    rules of `analyses.seq2seq.cross_rollout`) on Ē = E_h[(∇A ⊙ A)⁺] (eq. 5), ∇A the gradient of
                    log p(y_t | y_<t, x); row t of R_ts. The gradient differs per t, so the rules run once per t.
attention_x_grad    E_h[A ⊙ ∇A] of one decoder layer's cross-attention (default the last; or "mean" over layers),
                    signed, row t (the classifier's AttentionXGrad).
attention_norm      Kobayashi et al. 2020, "Attention is Not Only a Weight: Analyzing Transformers with Vector Norms":
                    ‖Σ_h α^h_{ts} f_h(x_s)‖₂ with f_h(x_s) = W^O_h (x_s W^V_h + b^V_h) of one decoder layer's
                    cross-attention (b^O left out, as the classifier's `norm_matrix`).

Cost: grad_attention and attention_x_grad run one forward and one backward per target position (retain_graph) per
chunk of `max_batch` examples; examples are independent, so the gradient of the batch sum separates them.
attention_norm runs one forward without gradients. Scores are 0 on source padding and on padded target positions.

    >>> scores = grad_attention(model, model.encode(examples))          # [batch, tgt, src]
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from attnaudit.explain.attention import check_index, layer_index, norm_matrix
from attnaudit.explain.capture import values_site
from attnaudit.explain.gradients import check_positive_int
from attnaudit.explain.seq2seq import Seq2SeqModel, check_pairs, on_cells, reference_log_probs, relevance_rules
from attnaudit.model.hooks import observing, record
from attnaudit.model.seq2seq import PairBatch

HeadMap = Callable[[Tensor, Tensor], Tensor]        # (A, ∇A) [batch, head, query, key] -> [batch, query, key]
Fold = Callable[[list[Tensor], list[Tensor], int], Tensor]   # (patterns, gradients of unit t, t) -> [batch, ...]

__all__ = ["grad_attention", "attention_x_grad", "attention_norm", "relevance_rules", "chefer_map", "head_mean",
           "per_target", "per_target_relevance"]


# -- the rules ------------------------------------------------------------------------------------------
def chefer_map(pattern: Tensor, grad: Tensor) -> Tensor:
    """Chefer et al.'s eq. 5: Ē = mean_h((∇A ⊙ A)⁺) -> [batch, query, key] (`GradFold("chefer")`)."""
    return (grad * pattern).clamp_min(0).mean(1)


def head_mean(pattern: Tensor, grad: Tensor) -> Tensor:
    """Plain head averaging, mean_h A -> [batch, query, key]; `relevance_rules` on it is `cross_rollout`."""
    return pattern.mean(1)


# -- one forward, one backward per target position -----------------------------------------------------
def _keeper(store: dict[str, Tensor], name: str) -> Callable[[Tensor], None]:
    """A watcher that keeps a site's output in the graph (no retain_grad: the gradients come from autograd.grad)."""
    def keep(out: Tensor) -> None:
        store[name] = out
    return keep


def per_target(model: Seq2SeqModel, pairs: PairBatch, names: Sequence[str], fold: Fold, *,
               max_batch: int = 256) -> Tensor:
    """The attention at sites `names` and, for every target position t, its gradient -> fold outputs [batch, tgt, ...].

    Per chunk of `max_batch` examples: one forward keeping the sites' probabilities A [chunk, head, query, key] in
    the graph, then for t = 0 .. tgt-1 one backward (retain_graph) of Σ_b m_bt · log p(y_bt | y_b<t, x_b), m the
    target mask; the examples are independent, so the batch sum's gradient is each example's own ∇A.
    fold(patterns, grads, t) gets the detached float A and ∇A of every site in `names` order and returns
    [chunk, ...]; positions no example of the chunk has get ∇A = 0 without a backward.
    """
    check_pairs(pairs)
    check_positive_int("max_batch", max_batch)
    names = list(names)
    _, tgt_out, tgt_mask = pairs.targets()
    dev, n, n_tgt = model.device, len(tgt_out), tgt_out.shape[1]
    out = []
    with model.evaluating(), torch.enable_grad():
        for lo in range(0, n, max_batch):
            sl = slice(lo, lo + max_batch)
            chunk = pairs.rows(sl)
            kept: dict[str, Tensor] = {}
            with observing(model, {name: _keeper(kept, name) for name in names}):
                logits = model(chunk)                                            # [chunk, tgt, vocab]
            patterns = [kept[name] for name in names]                           # each [chunk, head, query, key]
            if not all(p.requires_grad for p in patterns):
                raise RuntimeError("the attention probabilities are not in the autograd graph; was the model frozen "
                                   "with requires_grad_(False) everywhere?")
            mask = tgt_mask[sl].to(dev)                                          # [chunk, tgt]
            logp = reference_log_probs(logits, tgt_out[sl])                      # [chunk, tgt]
            logp = logp * mask
            plain = [p.detach().float() for p in patterns]
            last = max((t for t in range(n_tgt) if bool(mask[:, t].any())), default=-1)
            rows = []
            for t in range(n_tgt):
                if t <= last and bool(mask[:, t].any()):
                    grads = torch.autograd.grad(logp[:, t].sum(), patterns, retain_graph=t < last, allow_unused=True)
                    g = [torch.zeros_like(p) if x is None else x.float() for p, x in zip(plain, grads)]
                else:
                    g = [torch.zeros_like(p) for p in plain]
                rows.append(fold(plain, g, t))                                   # [chunk, ...]
            out.append(torch.stack(rows, 1).cpu())                               # [chunk, tgt, ...]
            del logits, logp, patterns, kept
    return torch.cat(out)


def _sites(model: Seq2SeqModel) -> tuple[list[str], list[str], list[str]]:
    return list(model.attention_sites), list(model.decoder_self_attention_sites), list(model.cross_attention_sites)


def per_target_relevance(model: Seq2SeqModel, pairs: PairBatch, head_map: HeadMap = chefer_map, *,
                         max_batch: int = 256) -> Tensor:
    """`relevance_rules` on head_map(A, ∇A) of every attention map, ∇A the gradient of unit t -> row t of R_ts.

    Returns [batch, tgt, src]. head_map `chefer_map` is `grad_attention`; `head_mean` (no gradient used) gives
    `cross_rollout`'s rows.
    """
    enc, dec, crs = _sites(model)
    n_enc, n_dec = len(enc), len(dec)

    def fold(patterns: list[Tensor], grads: list[Tensor], t: int) -> Tensor:
        maps = [head_map(p, g) for p, g in zip(patterns, grads)]                # each [chunk, query, key]
        r_ts = relevance_rules(torch.stack(maps[:n_enc]), torch.stack(maps[n_enc:n_enc + n_dec]),
                               torch.stack(maps[n_enc + n_dec:]))                # [chunk, tgt, src]
        return r_ts[:, t]                                                        # [chunk, src]

    return on_cells(per_target(model, pairs, [*enc, *dec, *crs], fold, max_batch=max_batch), pairs)


# -- the explainers ---------------------------------------------------------------------------------------
def _cross_layers(model: Seq2SeqModel, layer: int | str, words: tuple[str, ...] = ("last", "mean")) -> list[int]:
    n = int(model.n_decoder_layers)
    check_index("layer", layer, n, words, "decoder layers")
    return list(range(n)) if layer == "mean" else [layer_index(layer, n)]


def grad_attention(model: Seq2SeqModel, pairs: PairBatch, *, max_batch: int = 256) -> Tensor:
    """Chefer et al. 2021's encoder–decoder relevance on gradient-weighted attention -> [batch, tgt, src].

    Every attention map (encoder self, decoder self, cross; every layer) becomes Ē = mean_h((∇A ⊙ A)⁺) (eq. 5) with
    ∇A = ∂ log p(y_t | y_<t, x) / ∂A, the maps go through `relevance_rules` (rules 6–10: R_ss over the encoder,
    R_tt and R_ts over the decoder, the cross-attention update with the normalised R̄), and the score of target
    position t is row t of its own R_ts. One forward and one backward per target position per `max_batch` chunk.
    """
    return per_target_relevance(model, pairs, chefer_map, max_batch=max_batch)


def attention_x_grad(model: Seq2SeqModel, pairs: PairBatch, *, layer: int | str = "last",
                     max_batch: int = 256) -> Tensor:
    """A ⊙ ∂ log p(y_t | y_<t, x) / ∂A of a decoder layer's cross-attention, heads averaged, row t -> [batch, tgt, src].

    layer: a decoder layer's index, "last" (default) or "mean" (the layer mean of the head-averaged products),
    as the classifier's AttentionXGrad; signed. One forward and one backward per target position per chunk.
    """
    layers = _cross_layers(model, layer)
    names = [model.cross_attention_sites[i] for i in layers]

    def fold(patterns: list[Tensor], grads: list[Tensor], t: int) -> Tensor:
        per_layer = torch.stack([(p * g).mean(1)[:, t] for p, g in zip(patterns, grads)])   # [layer, chunk, src]
        return per_layer.mean(0)                                                 # [chunk, src]

    return on_cells(per_target(model, pairs, names, fold, max_batch=max_batch), pairs)


def attention_norm(model: Seq2SeqModel, pairs: PairBatch, *, layer: int | str = "last", head: int | str = "sum",
                   max_batch: int = 256) -> Tensor:
    """Kobayashi et al. 2020's norm of the attention-weighted, W^O-mapped value vectors of a decoder layer's
    cross-attention -> [batch, tgt, src].

    score[b, t, s] = ‖Σ_h α^h_{ts} W^O_h v^h_s‖₂ with v^h_s = x_s W^V_h + b^V_h, the ``...cross_attn.values`` site
    (b^O left out), by `explain.attention.norm_matrix`: head "sum" (default, the paper), "mean" = mean_h ‖α_h f_h‖,
    or one head's index; layer: a decoder layer's index, "last" (default) or "mean" (the mean of the layers' norms).
    W^O from `model.cross_output_weight(layer)`. One forward per chunk, no gradients.
    """
    check_pairs(pairs)
    check_positive_int("max_batch", max_batch)
    layers = _cross_layers(model, layer)
    n_heads = int(getattr(model, "n_decoder_heads", model.n_heads))
    check_index("head", head, n_heads, ("sum", "mean"), "heads")
    if not hasattr(model, "cross_output_weight"):
        raise ValueError(f"attention_norm needs W^O of the cross-attention: {type(model).__name__} has no "
                         "cross_output_weight(layer).")
    pattern_sites = [model.cross_attention_sites[i] for i in layers]
    points = model.hook_points()
    missing = [values_site(p) for p in pattern_sites if values_site(p) not in points]
    if missing:
        raise ValueError(f"attention_norm needs the value vectors at the hook site {missing[0]!r}, which this model "
                         "does not have; expose a `values` site beside each attention `pattern` site.")
    names = [x for p in pattern_sites for x in (p, values_site(p))]
    n, out = len(pairs.src.input_ids), []
    with model.evaluating(), torch.no_grad():
        w_o = [model.cross_output_weight(i).float() for i in layers]             # each [d_model, head, d_head]
        for lo in range(0, n, max_batch):
            _, cache = record(model, pairs.rows(slice(lo, lo + max_batch)), names)
            per_layer = torch.stack([norm_matrix(cache[p].float(), cache[values_site(p)].float(), w, head)
                                     for p, w in zip(pattern_sites, w_o)])       # [layer, chunk, tgt, src]
            out.append(per_layer.mean(0).cpu())
    return on_cells(torch.cat(out), pairs)
