"""Can cross-attention explain an encoder–decoder's outputs? The issue-4 analyses for a `Translator`.

    tables = audit_translator(model, make_examples("reorder", "test", n=100))
    write_report("reports/reorder", metrics=tables["metrics"], counterfactual=tables["counterfactual"],
                 attributions=tables["attributions"], examples=tables["examples"])

Unit of explanation: one word t of the reference target (teacher forcing), explained over the source tokens
through p(y_t | y_<t, x); [SEP] is no unit (it has no gold alignment). Per-word scores are averaged over the
example's words, so a table row is one example: examples, not the correlated words of one sentence, are the
independent units that bootstrap intervals and paired tests assume. Explainers, scores [batch, tgt, src]:
    attention         last decoder layer's cross-attention, mean over heads (alias "cross_attention")
    attention_layers  cross-attention, mean over layers and heads
    rollout           Chefer et al. (2021)'s encoder–decoder rules on head-averaged attention (alias "cross_rollout")
    saliency          ‖∂ log p(y_t | y_<t, x) / ∂ e_s‖₂ per source embedding e_s (Simonyan et al. 2014)
    input_x_gradient  Σ_d e_s · ∂ log p(y_t | y_<t, x) / ∂ e_s (Shrikumar et al. 2016)
    occlusion         p(y_t | x) − p(y_t | x with token s → [MASK]), every s in one batched forward
    random            seeded U(0, 1)
"attention" and "rollout" keep the classifier's names, so the verdict counts them as the attention family.
Metrics (`analyses.tables` formats): comprehensiveness / sufficiency at k = 0.1, 0.2, 0.5 and "aopc", RISE
deletion / insertion AUC (removed tokens → [MASK], the reference prefix kept), gold_auprc and gold_precision_at_k
against the word alignment; `metrics.attrs["alignment_error_rate"]` is the AER (Och & Ney 2003, sure = possible
= gold) of "argmax source token per target word". Counterfactual tests at ``decoder.layers.{i}.cross_attn.pattern``
(each layer and "all"), as in `analyses.counterfactual`: permutation (Jain & Wallace 2019), uniform (Wiegreffe &
Pinter 2019) and erasure of the most-attended vs a random source token (Serrano & Smith 2019).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from attnaudit.analyses.counterfactual import tvd
from attnaudit.analyses.faithfulness import curve_auc
from attnaudit.analyses.plausibility import auprc, precision_at_k
from attnaudit.analyses.schema import tidy_frame, tidy_rows
from attnaudit.analyses.tables import bin_setting
from attnaudit.core.ranking import spearman
from attnaudit.data.examples import Example
from attnaudit.explain.attribution import Attribution
from attnaudit.explain.perturb import (
    deletion_path,
    insertion_path,
    keep_top_k,
    leave_one_out_path,
    materialize,
    remove_top_k,
)
from attnaudit.model.hooks import hooks, record
from attnaudit.model.interventions import permute, uniform, zero_key
from attnaudit.model.seq2seq import PairBatch, Translator
from attnaudit.model.vocab import words

EXPLAINERS = ("attention", "attention_layers", "rollout", "saliency", "input_x_gradient", "occlusion", "random")
ALIASES = {"cross_attention": "attention", "cross_rollout": "rollout"}
BINS = (0.1, 0.2, 0.5)


@dataclass(frozen=True)
class Units:
    """The explained target words, flattened: unit u is word tgt[u] of example src[u]."""

    src: Tensor      # [unit] long: example index
    tgt: Tensor      # [unit] long: target position (index into tgt_out)
    gold: Tensor     # [unit, src_seq] bool: the aligned source token(s)


def prepare(model: Translator, examples: Sequence[Example]) -> tuple[PairBatch, Units]:
    """Encode the examples (targets required) and list their target words with their gold source tokens."""
    if not examples or any(not isinstance(e, Example) or e.target is None for e in examples):
        raise ValueError("examples must be a non-empty list of Examples with a target (e.g. make_examples('reorder', ...)).")
    pairs = model.encode(list(examples))
    real = (pairs.tgt_out != model.tgt_vocab.pad_id) & (pairs.tgt_out != model.tgt_vocab.sep_id)  # [batch, tgt]
    src, tgt = real.nonzero(as_tuple=True)                                           # [unit] each, row-major
    gold = torch.zeros(*real.shape, pairs.src.input_ids.shape[1], dtype=torch.bool)  # [batch, tgt, src]
    for i, e in enumerate(examples):
        for s, t in e.alignment or ():
            gold[i, t, s + 1] = True                                                 # word s is token s + 1 ([CLS] first)
    return pairs, Units(src, tgt, gold[src, tgt])


@contextlib.contextmanager
def _eval(model: Translator):
    was = model.net.training
    try:
        yield model.net.eval()
    finally:
        model.net.train(was)


def _forward(model: Translator, pairs: PairBatch, rows: Tensor, *, src_ids: Tensor | None = None,
             edits: Mapping | Callable[[slice], Mapping] | None = None, max_batch: int = 256,
             reduce: Callable[[Tensor, slice], Tensor] | None = None) -> Tensor:
    """Teacher-forced next-token probabilities of examples `rows` [n] -> [n, tgt, vocab], `max_batch` rows a forward.
    src_ids [n, src] replaces their source ids; edits (or edits(slice of rows)) go to `hooks`; reduce(probs, slice)
    shrinks each chunk before it is kept."""
    dev, out = model.device, []
    with _eval(model), torch.inference_mode():
        for lo in range(0, len(rows), max_batch):
            sl = slice(lo, lo + max_batch)
            r = rows[sl]
            ids = pairs.src.input_ids[r] if src_ids is None else src_ids[sl]                # [chunk, src]
            with hooks(model, (edits(sl) if callable(edits) else edits) or {}):
                logits = model.net(ids.to(dev), pairs.src.attention_mask[r].to(dev), pairs.tgt_in[r].to(dev),
                                   pairs.tgt_mask[r].to(dev))                               # [chunk, tgt, vocab]
            probs = logits.float().softmax(-1).cpu()
            out.append(reduce(probs, sl) if reduce else probs)
    return torch.cat(out)


class TeacherForcedEngine:
    """De-duplicated, cached forwards of [MASK]-perturbed sources -> p(reference y_t) at every target position."""

    def __init__(self, model: Translator, pairs: PairBatch, *, max_batch: int = 256):
        self.model, self.pairs, self.max_batch = model, pairs, max_batch
        self.mask = pairs.src.attention_mask.cpu()                                  # [batch, src]
        self.special = pairs.src.special_mask.cpu() & self.mask                     # [batch, src]
        self.slot: dict[tuple[int, bytes], int] = {}
        self.table = torch.zeros(0, pairs.tgt_out.shape[1])                         # [n_cached, tgt]
        self.forwards = 0

    def probs(self, rows: Tensor, keep: Tensor) -> Tensor:
        """Example indices [n] and keep-masks [n, src] (specials always kept) -> p(y_t) [n, tgt]."""
        keep = (keep.cpu().bool() | self.special[rows]) & self.mask[rows]           # [n, src]
        keys = list(zip(rows.tolist(), (b.tobytes() for b in np.packbits(keep.numpy(), axis=1))))
        new: dict[tuple[int, bytes], int] = {}       # key -> where it first appears
        for i, k in enumerate(keys):
            if k not in self.slot:
                new.setdefault(k, i)
        if new:
            pick = torch.tensor(list(new.values()))                                 # [n_new]
            r = rows[pick]
            ids, _ = materialize(self.pairs.src.input_ids[r], self.mask[r], keep[pick], policy="mask",
                                 pad_id=self.model.src_vocab.pad_id, mask_id=self.model.src_vocab.mask_id)
            ref = self.pairs.tgt_out[r]                                             # [n_new, tgt]
            p = _forward(self.model, self.pairs, r, src_ids=ids, max_batch=self.max_batch,
                         reduce=lambda probs, sl: probs.gather(-1, ref[sl, :, None])[..., 0])  # [n_new, tgt]
            self.slot.update((k, len(self.table) + j) for j, k in enumerate(new))
            self.table = torch.cat([self.table, p])
            self.forwards += len(new)
        return self.table[torch.tensor([self.slot[k] for k in keys], dtype=torch.long)]

    def unit_probs(self, units: Units, keep: Tensor, valid: Tensor | None = None) -> Tensor:
        """keep-masks [unit, ..., src] -> p(y_t) of each unit [unit, ...], NaN where not valid."""
        middle = keep.shape[1:-1]
        rows = units.src.view(-1, *[1] * len(middle)).expand(-1, *middle).reshape(-1)   # [n]
        at = units.tgt.view(-1, *[1] * len(middle)).expand(-1, *middle).reshape(-1)     # [n]
        ok = torch.ones(len(rows), dtype=torch.bool) if valid is None else valid.reshape(-1)
        out = torch.full((len(rows),), float("nan"))
        if ok.any():
            out[ok] = self.probs(rows[ok], keep.reshape(len(rows), -1)[ok]).gather(1, at[ok, None])[:, 0]
        return out.view(keep.shape[:-1])


# -- explainers: [batch, tgt, src] ----------------------------------------------------------------
def cross_rollout(enc: Tensor, dec_self: Tensor, cross: Tensor) -> Tensor:
    """Chefer et al. (2021) rules 6–10 with head-averaged attention, rows = queries.

    Args:
        enc [layer, batch, src, src], dec_self [layer, batch, tgt, tgt], cross [layer, batch, tgt, src].
    Returns:
        [batch, tgt, src]: R_ts after the last decoder layer (R_ss ← R_ss + A·R_ss per encoder layer; per decoder
        layer R_tt ← R_tt + A·R_tt, R_ts ← R_ts + A·R_ts, then R_ts ← R_ts + R̄_tt·A_cross·R̄_ss, R̄ = I + rownorm(R − I)).
    """
    def bar(r: Tensor) -> Tensor:
        eye = torch.eye(r.shape[-1], dtype=r.dtype)
        rest = r - eye                                                               # [batch, n, n]
        return eye + rest / rest.sum(-1, keepdim=True).clamp_min(1e-12)

    b, s, t = enc.shape[1], enc.shape[-1], dec_self.shape[-1]
    r_ss = torch.eye(s, dtype=enc.dtype).expand(b, s, s)                            # [batch, src, src]
    for a in enc:
        r_ss = r_ss + a @ r_ss
    r_tt = torch.eye(t, dtype=enc.dtype).expand(b, t, t)                            # [batch, tgt, tgt]
    r_ts = torch.zeros(b, t, s, dtype=enc.dtype)                                     # [batch, tgt, src]
    for a_self, a_cross in zip(dec_self, cross):
        r_tt, r_ts = r_tt + a_self @ r_tt, r_ts + a_self @ r_ts
        r_ts = r_ts + bar(r_tt) @ a_cross @ bar(r_ss)
    return r_ts


def _gradients(model: Translator, pairs: PairBatch, max_batch: int) -> tuple[Tensor, Tensor]:
    """Saliency and input×gradient of log p(y_t | y_<t, x) w.r.t. the source embeddings -> each [batch, tgt, src]."""
    net, dev, s = model.net, model.device, pairs.src
    sal, ixg = [], []
    with _eval(model), torch.enable_grad():
        for lo in range(0, len(s), max_batch):
            sl = slice(lo, lo + max_batch)
            mask = s.attention_mask[sl].to(dev)                                      # [batch, src]
            emb = net.encoder.embed(s.input_ids[sl].to(dev)).detach().requires_grad_(True)  # [batch, src, d_model]
            logits = net.decode(net.encoder(emb, mask), mask, pairs.tgt_in[sl].to(dev), pairs.tgt_mask[sl].to(dev))
            logp = logits.float().log_softmax(-1).gather(-1, pairs.tgt_out[sl, :, None].to(dev))[..., 0]  # [batch, tgt]
            # one backward per target position; examples are independent, so the batch sum separates them
            g = torch.stack([torch.autograd.grad(logp[:, t].sum(), emb, retain_graph=True)[0]
                             for t in range(logp.shape[1])], 1)                     # [batch, tgt, src, d_model]
            sal.append(g.norm(dim=-1).cpu())
            ixg.append((g * emb[:, None]).sum(-1).detach().cpu())
    return torch.cat(sal), torch.cat(ixg)


def translator_scores(model: Translator, pairs: PairBatch, explainers: Sequence[str] = EXPLAINERS, *,
                      engine: TeacherForcedEngine | None = None, seed: int = 0, max_batch: int = 256) -> dict[str, Tensor]:
    """Each explainer's scores -> {name: [batch, tgt, src]} (names after resolving ALIASES)."""
    names = [ALIASES.get(n, n) for n in explainers]
    unknown = [n for n in names if n not in EXPLAINERS]
    if unknown or not names:
        raise ValueError(f"Unknown explainer {(unknown or [None])[0]!r}. Available: {', '.join(EXPLAINERS + tuple(ALIASES))}.")
    engine = engine or TeacherForcedEngine(model, pairs, max_batch=max_batch)
    b, t = pairs.tgt_out.shape
    out: dict[str, Tensor] = {}
    if {"attention", "attention_layers", "rollout"} & set(names):
        with _eval(model):
            _, cache = record(model, pairs)
        avg = lambda pattern: cache.stack(pattern).float().cpu().mean(2)            # noqa: E731 -> [layer, batch, q, k]
        cross = avg("decoder.layers.*.cross_attn.pattern")                          # [layer, batch, tgt, src]
        out.update(attention=cross[-1], attention_layers=cross.mean(0),
                   rollout=cross_rollout(avg("encoder.*"), avg("decoder.layers.*.self_attn.pattern"), cross))
    if {"saliency", "input_x_gradient"} & set(names):
        out["saliency"], out["input_x_gradient"] = _gradients(model, pairs, max_batch)
    if "occlusion" in names:
        keep, valid = leave_one_out_path(engine.mask, engine.special)                # [batch, pos, src], [batch, pos]
        rows = torch.arange(b)[:, None].expand_as(valid)                             # [batch, pos]
        p = torch.zeros(*valid.shape, t)                                             # [batch, pos, tgt]
        p[valid] = engine.probs(rows[valid], keep[valid])
        full = engine.probs(torch.arange(b), engine.mask)                            # [batch, tgt]
        out["occlusion"] = (full[:, :, None] - p.transpose(1, 2)) * valid[:, None, :]  # [batch, tgt, src]
    if "random" in names:
        out["random"] = torch.rand(b, t, engine.mask.shape[1], generator=torch.Generator().manual_seed(seed))
    return {n: out[n] for n in names}


# -- metrics ----------------------------------------------------------------------------------------
def _per_example(units: Units, values: Tensor, n: int) -> Tensor:
    """[unit] -> [example]: the mean over each example's target words, NaN ignored (NaN if none)."""
    v = values.double()
    ok = ~torch.isnan(v)
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, units.src, torch.where(ok, v, 0.0))
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, units.src, ok.double())
    return torch.where(count > 0, total / count.clamp_min(1), torch.nan)


def unit_attribution(name: str, scores: Tensor, pairs: PairBatch, units: Units, engine: TeacherForcedEngine) -> Attribution:
    """One explainer's scores [batch, tgt, src] as an Attribution with one row per unit (target = the reference word id)."""
    s, r = pairs.src, units.src
    if tuple(scores.shape) != (*pairs.tgt_out.shape, s.input_ids.shape[1]):
        raise ValueError(f"scores for {name!r} must have shape [batch, tgt, src] = {(*pairs.tgt_out.shape, s.input_ids.shape[1])}"
                         f"; got {tuple(scores.shape)}.")
    full = engine.unit_probs(units, engine.mask[r])                                  # [unit]
    return Attribution(scores=(scores[r, units.tgt] * s.attention_mask[r]).float(), input_ids=s.input_ids[r],
                       attention_mask=s.attention_mask[r], special_mask=s.special_mask[r],
                       tokens=[s.tokens[i] for i in r.tolist()], texts=[s.texts[i] for i in r.tolist()],
                       target=pairs.tgt_out[r, units.tgt], target_prob=full,
                       method=name, params={"unit": "target word", "target": "reference"},
                       ids=[f"{s.ids[i] if s.ids else i}:t{j}" for i, j in zip(r.tolist(), units.tgt.tolist())])


def translator_metrics(model: Translator, examples: Sequence[Example], *, explainers: Sequence[str] = EXPLAINERS,
                       scores: Mapping[str, Tensor] | None = None, seed: int = 0,
                       max_batch: int = 256) -> tuple[pd.DataFrame, dict[str, Attribution]]:
    """Faithfulness and gold metrics per example -> (tidy table, {name: unit Attribution}).

    `scores` adds precomputed explanations {name: [batch, tgt, src]} (e.g. an oracle) to the named explainers.
    """
    pairs, units = prepare(model, examples)
    engine = TeacherForcedEngine(model, pairs, max_batch=max_batch)
    start = time.perf_counter()
    named = {**(translator_scores(model, pairs, explainers, engine=engine, seed=seed, max_batch=max_batch)
                if explainers else {}), **dict(scores or {})}
    ids, n, rows, aer, attrs = [e.id for e in examples], len(examples), [], {}, {}
    for name, sc in named.items():
        a = attrs[name] = unit_attribution(name, sc, pairs, units, engine)

        def add(metric: str, setting: str, values: Tensor):
            rows.extend(tidy_rows(ids, name, metric, setting, _per_example(units, values, n)))  # noqa: B023

        full = a.target_prob                                                         # [unit]
        for metric, plan in (("comprehensiveness", remove_top_k), ("sufficiency", keep_top_k)):
            curve = torch.stack([full - engine.unit_probs(units, plan(a, k)) for k in BINS], 1)  # [unit, bin]
            for j, k in enumerate(BINS):
                add(metric, bin_setting(k), curve[:, j])
            add(metric, "aopc", curve.mean(1))
        add("deletion_auc", "", curve_auc(engine.unit_probs(units, *deletion_path(a))))
        add("insertion_auc", "", curve_auc(engine.unit_probs(units, *insertion_path(a))))
        add("gold_auprc", "", auprc(a, units.gold))
        add("gold_precision_at_k", "k=n_gold", precision_at_k(a, units.gold))
        hard = a.top_k(1)                                                            # [unit, src]: argmax link per word
        has = units.gold.any(1)
        hits = int((hard & units.gold)[has].sum())
        aer[name] = 1 - 2 * hits / max(int(hard[has].sum()) + int(units.gold[has].sum()), 1)
    table = tidy_frame(rows)
    table.attrs.update(policy="mask", bins=list(BINS), unit="target word, averaged per example", alignment_error_rate=aer,
                       engine={"forwards": engine.forwards, "seconds": round(time.perf_counter() - start, 3)})
    return table, attrs


# -- counterfactual tests ---------------------------------------------------------------------------
def translator_counterfactual(model: Translator, examples: Sequence[Example], *, n_permutations: int = 20,
                              seed: int = 0, max_batch: int = 256) -> dict[str, pd.DataFrame]:
    """Permutation, uniform and erasure tests on cross-attention -> {"summary", "permutation"} (see module doc).

    Per example, max_attention and median_tvd are means over its target words of each word's max cross-attention
    weight and of its median TVD over `n_permutations`; uniform and erasure statistics are over target words
    (teacher forcing), plus greedy exact match of the whole translation under uniform attention.
    """
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations must be an int >= 1; got {n_permutations!r}.")
    pairs, units = prepare(model, examples)
    n, ids, sites = len(examples), [e.id for e in examples], model.cross_attention_sites
    rows = torch.arange(n)
    at = lambda probs: probs[units.src, units.tgt]                                   # noqa: E731 [batch, tgt, v] -> [unit, v]
    base = at(_forward(model, pairs, rows, max_batch=max_batch))                     # [unit, vocab]
    ref = pairs.tgt_out[units.src, units.tgt]                                        # [unit]
    with _eval(model):
        cross = record(model, pairs, names="decoder.layers.*.cross_attn.pattern")[1].stack().float().cpu()
    cross = cross.transpose(2, 3)[:, units.src, units.tgt]                           # [layer, unit, head, src]
    scored = (pairs.src.attention_mask & ~pairs.src.special_mask)[units.src]        # [unit, src]
    refs = [" ".join(words(e.target)) for e in examples]
    exact = lambda: float(np.mean([h == r for h, r in zip(model.translate(examples), refs)]))  # noqa: E731
    summary, perm_frames = [], []

    def add(test, layer, statistic, value):
        summary.append((test, str(layer), "all", statistic, float(value)))

    exact_original = exact()
    for layer in [*range(model.n_layers), "all"]:
        edit_sites = sites if layer == "all" else [sites[layer]]
        att = cross.mean(0) if layer == "all" else cross[layer]                     # [unit, head, src]
        gen = torch.Generator().manual_seed(seed)
        tiled = rows.repeat(n_permutations)                                          # copy c = rows c·n … c·n + n − 1
        probs = _forward(model, pairs, tiled, edits={s: permute(gen) for s in edit_sites}, max_batch=max_batch)
        probs = probs.view(n_permutations, n, *probs.shape[1:])                       # [perm, batch, tgt, vocab]
        dist = tvd(probs[:, units.src, units.tgt], base[None])                       # [perm, unit]
        med = _per_example(units, dist.median(0).values, n).float()                  # [batch]
        top = _per_example(units, att.amax((1, 2)), n).float()                       # [batch]
        add("permutation", layer, "median_tvd", med.median())
        add("permutation", layer, "mean_tvd", med.mean())
        add("permutation", layer, "max_attention_tvd_spearman", spearman(top.numpy(), med.numpy()))
        perm_frames.append(pd.DataFrame({"example_id": ids, "layer": str(layer), "max_attention": top.numpy(),
                                         "median_tvd": med.numpy()}))
        edits = {s: uniform() for s in edit_sites}
        probs = at(_forward(model, pairs, rows, edits=edits, max_batch=max_batch))  # [unit, vocab]
        d = _per_example(units, tvd(probs, base), n)
        add("uniform", layer, "median_tvd", d.median())
        add("uniform", layer, "mean_tvd", d.mean())
        add("uniform", layer, "flip_rate", (probs.argmax(-1) != base.argmax(-1)).float().mean())
        add("uniform", layer, "accuracy", (probs.argmax(-1) == ref).float().mean())
        add("uniform", layer, "accuracy_original", (base.argmax(-1) == ref).float().mean())
        with hooks(model, edits):
            add("uniform", layer, "exact_match", exact())
        add("uniform", layer, "exact_match_original", exact_original)
        key_max = att.mean(1).masked_fill(~scored, float("-inf")).argmax(1)          # [unit]
        rand = torch.rand(scored.shape, generator=torch.Generator().manual_seed(seed))
        key_random = rand.masked_fill(~scored, -1.0).argmax(1)                       # [unit]
        for name, key in (("max", key_max), ("random", key_random)):
            p = _forward(model, pairs, units.src, edits=lambda sl, key=key: {s: zero_key(key[sl]) for s in edit_sites},  # noqa: B023
                         max_batch=max_batch, reduce=lambda pr, sl: pr[torch.arange(pr.shape[0]), units.tgt[sl]])
            add("erasure", layer, f"flip_rate_{name}", (p.argmax(-1) != base.argmax(-1)).float().mean())
            add("erasure", layer, f"median_tvd_{name}", tvd(p, base).median())
    return {"summary": pd.DataFrame(summary, columns=["test", "layer", "head", "statistic", "value"]),
            "permutation": pd.concat(perm_frames, ignore_index=True)}


# -- the entry point --------------------------------------------------------------------------------
def audit_translator(model: Translator, examples: Sequence[Example], *, explainers: Sequence[str] = EXPLAINERS,
                     seed: int = 0, max_batch: int = 256, n_permutations: int = 20) -> dict:
    """Every issue-4 analysis on a Translator -> {"metrics", "counterfactual", "attributions", "examples", "timings"}.

    metrics: tidy example_id, explainer, metric, setting, value, note (one row per example, see the module doc).
    counterfactual: {"summary": test, layer, head, statistic, value; "permutation": example_id, layer,
    max_attention, median_tvd}. attributions: `Attribution.to_records()` dicts, one per example and explainer,
    explaining the example's FIRST target word (id = the example id); examples: id, gold (per source token, that
    word's alignment), label (the reference word) and prediction (teacher-forced argmax) for `write_report`.
    """
    t0 = time.perf_counter()
    metrics, attrs = translator_metrics(model, examples, explainers=explainers, seed=seed, max_batch=max_batch)
    t1 = time.perf_counter()
    cf = translator_counterfactual(model, examples, n_permutations=n_permutations, seed=seed, max_batch=max_batch)
    t2 = time.perf_counter()
    pairs, units = prepare(model, examples)
    first = (units.tgt == 0).nonzero().flatten()                                     # [example] one unit each
    records = [{**r, "id": examples[int(units.src[u])].id} for a in attrs.values()
               for u, r in zip(first.tolist(), a.select(first.tolist()).to_records())]
    pred = _forward(model, pairs, torch.arange(len(examples)), max_batch=max_batch)[:, 0].argmax(-1)  # [batch]
    vocab = model.tgt_vocab
    n_real = pairs.src.attention_mask.sum(1).tolist()                                # [batch]
    info = [{"id": e.id, "gold": units.gold[u, : n_real[i]].int().tolist(), "label": vocab.itos[int(pairs.tgt_out[i, 0])],
             "prediction": vocab.itos[int(pred[i])]} for i, (e, u) in enumerate(zip(examples, first.tolist()))]
    return {"metrics": metrics, "counterfactual": cf, "attributions": records, "examples": info,
            "timings": {"metrics_seconds": round(t1 - t0, 3), "counterfactual_seconds": round(t2 - t1, 3)}}
