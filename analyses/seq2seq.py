"""Can cross-attention explain an encoder–decoder's outputs? The issue-4 analyses of a `Translator`, `HFTranslator`.

    tables = audit_translator(model, make_examples("reorder", "test", n=100))
    write_report("reports/reorder", metrics=tables["metrics"], counterfactual=tables["counterfactual"],
                 attributions=tables["attributions"], examples=tables["examples"])
    examples = read_parallel("pairs.txt", alignments="pairs.gold")       # `src ||| tgt`, `i-j` / `ipj` links
    tables = audit_translator(load_hf_seq2seq("my-marian"), examples, gold=read_alignments("pairs.gold", examples))

Models: the built-in `Translator` and `attnaudit.model.hf_seq2seq.HFTranslator` (BART, T5, Marian), through the
members both have: encode -> PairBatch, model(pairs) -> teacher-forced logits, encoder_embeds /
logits_from_src_embeds (gradients), pad_id / mask_id (perturbations), word_ids / target_word_ids (token -> word),
target_tokens / target_texts (labels, exact match), attention_sites / decoder_self_attention_sites /
cross_attention_sites, translate.
Unit of explanation: one target TOKEN t of the reference (teacher forcing) that belongs to a target word, explained
over the source tokens through p(y_t | y_<t, x); EOS, BOS and padding are no units (the built-in tokenizer has
one token a word, so its units are the target words, [SEP] excluded). A target word of several sub-word tokens
gives one unit per token, each with its word's gold: the tokens of every source word Sure-linked to it. Per-unit
scores are averaged over the example's units, so a table row is one example: examples, not the correlated words of
one sentence, are the independent units that bootstrap intervals and paired tests assume.
Explainers, scores [batch, tgt, src]: the 15 of `attnaudit.explain.seq2seq` (`EXPLAINERS`: the attention family
on cross-attention, with Chefer et al.'s encoder–decoder rules; the gradient family on log p(y_t | y_<t, x); occlusion,
LIME and KernelSHAP on the source; random). "attention" and "rollout" keep the classifier's names, so the verdict
counts them, with grad_attention, attention_x_grad, attention_norm and attention_layers, as the attention family.
Metrics (`analyses.tables` formats): comprehensiveness / sufficiency at k = 0.1, 0.2, 0.5 and "aopc", RISE
deletion / insertion AUC (removed tokens → [MASK], the reference prefix kept), gold_average_precision, gold_auprc
(ERASER's names, `analyses.plausibility`) and gold_precision_at_k against the word alignment (Sure links). Alignment rows (`analyses.alignment`, Och & Ney 2003), after all the others:
metrics alignment_error_rate, alignment_precision and alignment_recall at the WORD level: each explainer's
[tgt token, src token] scores are summed onto [tgt word, src word] (`merge_subwords`), then links are taken by a
rule (setting "argmax", the default: each target word's highest-scoring source word), one row per example and one
corpus row (example_id CORPUS_ID, setting "argmax:corpus": counts summed over examples, the standard AER), for
every explainer and for every cross-attention head (explainer "cross_attention_L{layer}_H{head}", which has only
these rows). Gold: Sure S and Possible P ⊇ S (`GoldAlignment`), by default from each Example (`alignment` Sure,
`possible_alignment` Possible; the reorder task's links are all Sure). Counterfactual tests at
``decoder.layers.{i}.cross_attn.pattern`` (each layer and "all"), as in `analyses.counterfactual`: permutation
(Jain & Wallace 2019), adversarial attention (Jain & Wallace 2019; `analyses.seq2seq_counterfactual`), uniform
(Wiegreffe & Pinter 2019), erasure of the most-attended vs a random source token (Serrano & Smith 2019), and the
ablation of each cross-attention head.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from attnaudit.analyses.alignment import RULES, alignment_counts, extract_links, merge_subwords
from attnaudit.analyses.counterfactual import TESTS as COUNTERFACTUAL_TESTS
from attnaudit.analyses.counterfactual import tvd
from attnaudit.analyses.faithfulness import curve_auc
from attnaudit.analyses.plausibility import pr_metrics, precision_at_k
from attnaudit.analyses.schema import tidy_frame, tidy_rows
from attnaudit.analyses.seq2seq_counterfactual import adversarial_search, cross_head_table, example_means, head_rows
from attnaudit.analyses.tables import bin_setting
from attnaudit.core.ranking import spearman
from attnaudit.data.examples import Example
from attnaudit.data.parallel import GoldAlignment
from attnaudit.explain.attribution import Attribution
from attnaudit.explain.perturb import (
    deletion_path,
    insertion_path,
    keep_top_k,
    remove_top_k,
)
from attnaudit.explain.seq2seq import (  # noqa: F401  (ALIASES, EXPLAINERS, cross_rollout: re-exported)
    ALIASES,
    EXPLAINERS,
    Seq2SeqModel,
    TeacherForcedEngine,
    cross_rollout,
    teacher_forced,
    translator_scores,
)
from attnaudit.model.hooks import hooks, record
from attnaudit.model.interventions import permute, uniform, zero_key
from attnaudit.model.seq2seq import PairBatch
from attnaudit.model.vocab import words

BINS = (0.1, 0.2, 0.5)
ALIGNMENT_METRICS = ("alignment_error_rate", "alignment_precision", "alignment_recall")
CORPUS_ID = "(corpus)"      # example_id of the corpus-level alignment rows
ALIGNMENT_RULES = tuple(r for r in RULES if r != "threshold")   # the rules that need no threshold


@dataclass(frozen=True)
class Units:
    """The explained target tokens, flattened: unit u is target position tgt[u] of example src[u]."""

    src: Tensor      # [unit] long: example index
    tgt: Tensor      # [unit] long: target position (index into tgt_out)
    gold: Tensor     # [unit, src_seq] bool: the source tokens of the Sure-aligned source word(s)
    src_words: list[list[int | None]] = field(default_factory=list)   # per example and source token: its word
    tgt_words: list[list[int | None]] = field(default_factory=list)   # per example and target position: its word


def prepare(model: Seq2SeqModel, examples: Sequence[Example],
            gold: Sequence[GoldAlignment] | None = None) -> tuple[PairBatch, Units]:
    """Encode the examples (targets required) and list their target tokens with their gold source tokens.

    Units: every target position whose token belongs to a target word (`model.target_word_ids`); EOS, BOS and
    padding are none. A target word of several tokens gives one unit per token, each with the gold of its word:
    the tokens (`model.word_ids`) of every source word Sure-linked to it (gold: as `translator_metrics`).
    """
    if not examples or any(not isinstance(e, Example) or e.target is None for e in examples):
        raise ValueError("examples must be a non-empty list of Examples with a target (e.g. make_examples('reorder', ...)).")
    golds = _golds(examples, gold)
    pairs = model.encode(list(examples))
    _, tgt_out, tgt_mask = pairs.targets()
    src_words = model.word_ids(pairs)                                                # [batch][src]
    tgt_words = model.target_word_ids([e.target for e in examples], tgt_out)         # [batch][tgt]
    has_word = torch.tensor([[w is not None for w in row] for row in tgt_words], dtype=torch.bool)  # [batch, tgt]
    real = has_word & tgt_mask                                                       # [batch, tgt]
    empty = [e.id for e, r in zip(examples, real) if not r.any()]
    if empty:
        raise ValueError(f"example {empty[0]!r} has no target token that belongs to a target word; every example "
                         "needs at least one target word to explain.")
    src, tgt = real.nonzero(as_tuple=True)                                           # [unit] each, row-major
    gold_t = torch.zeros(*real.shape, pairs.src.input_ids.shape[1], dtype=torch.bool)  # [batch, tgt, src]
    for i, g in enumerate(golds):
        tokens_of: dict[int, list[int]] = {}                                         # source word -> its tokens
        for j, w in enumerate(src_words[i]):
            if w is not None:
                tokens_of.setdefault(w, []).append(j)
        for s, t in g.sure:
            for j, w in enumerate(tgt_words[i]):
                if w == t:
                    gold_t[i, j, tokens_of.get(s, [])] = True                        # built-in: word s is token s + 1
    return pairs, Units(src, tgt, gold_t[src, tgt], src_words, tgt_words)


# -- metrics ----------------------------------------------------------------------------------------
def _per_example(units: Units, values: Tensor, n: int) -> Tensor:
    """[unit] -> [example]: the mean over each example's target words, NaN ignored (NaN if none)."""
    return example_means(units.src, values, n)


def _unit_name(units: Units) -> str:
    """"target word" when every target word is one token (the built-in tokenizer), else "target token"."""
    per_word = [row.count(w) for row in units.tgt_words for w in set(row) - {None}]   # tokens of each word
    return "target word" if all(n == 1 for n in per_word) else "target token"


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
                       method=name, params={"unit": _unit_name(units), "target": "reference"},
                       ids=[f"{s.ids[i] if s.ids else i}:t{j}" for i, j in zip(r.tolist(), units.tgt.tolist())])


def translator_metrics(model: Seq2SeqModel, examples: Sequence[Example], *, explainers: Sequence[str] = EXPLAINERS,
                       scores: Mapping[str, Tensor] | None = None, seed: int = 0, max_batch: int = 256,
                       gold: Sequence[GoldAlignment] | None = None, heads: bool = True,
                       alignment_rules: Sequence[str] = ("argmax",)) -> tuple[pd.DataFrame, dict[str, Attribution]]:
    """Faithfulness, gold and alignment metrics per example -> (tidy table, {name: unit Attribution}).

    `scores` adds precomputed explanations {name: [batch, tgt, src]} (e.g. an oracle) to the named explainers.
    gold: one `GoldAlignment` per example, word links (e.g. `read_alignments`): Sure and Possible for the alignment
    rows, Sure for the gold_* rows (default: each Example's `alignment` as Sure and
    `possible_alignment` as Possible); heads: also the alignment rows of each cross-attention head;
    alignment_rules: `analyses.alignment.RULES` to score. model: a `Translator` or an `HFTranslator`.
    """
    bad = [r for r in alignment_rules if r not in ALIGNMENT_RULES]
    if bad or isinstance(alignment_rules, str):
        raise ValueError(f"alignment_rules must be a list of rules from {', '.join(ALIGNMENT_RULES)}; got "
                         f"{alignment_rules!r}.")
    golds = _golds(examples, gold)
    pairs, units = prepare(model, examples, golds)
    engine = TeacherForcedEngine(model, pairs, max_batch=max_batch)
    start = time.perf_counter()
    named = {**(translator_scores(model, pairs, explainers, engine=engine, seed=seed, max_batch=max_batch)
                if explainers else {}), **dict(scores or {})}
    ids, n, rows, attrs = [e.id for e in examples], len(examples), [], {}
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
        ap, area = pr_metrics(a, units.gold)
        add("gold_average_precision", "", ap)
        add("gold_auprc", "", area)
        add("gold_precision_at_k", "k=n_gold", precision_at_k(a, units.gold))
    maps = list(zip(units.src_words, units.tgt_words))
    n_words = [(len(words(e.text)), len(words(e.target or ""))) for e in examples]
    for name, sc in named.items():
        rows += alignment_rows(ids, name, sc, maps, golds, alignment_rules, n_words=n_words)
    if heads:
        cross = _cross_attention(model, pairs)                                       # [layer, batch, head, tgt, src]
        for layer, per_head in enumerate(cross):                                     # [batch, head, tgt, src]
            for head in range(per_head.shape[1]):
                rows += alignment_rows(ids, f"cross_attention_L{layer}_H{head}", per_head[:, head], maps, golds,
                                       alignment_rules, n_words=n_words)
    table = tidy_frame(rows)
    table.attrs.update(policy="mask", bins=list(BINS), unit=f"{_unit_name(units)}, averaged per example",
                       engine={"forwards": engine.forwards, "seconds": round(time.perf_counter() - start, 3)})
    return table, attrs


def _golds(examples: Sequence[Example], gold: Sequence[GoldAlignment] | None) -> list[GoldAlignment]:
    """The gold per example: `gold` as given (checked), else each Example's alignment as Sure links."""
    if gold is None:
        return [GoldAlignment.from_example(e) for e in examples]
    gold = list(gold)
    if len(gold) != len(examples) or not all(isinstance(g, GoldAlignment) for g in gold):
        raise ValueError(f"gold must be one GoldAlignment per example ({len(examples)}); got "
                         f"{len(gold)} items of types {sorted({type(g).__name__ for g in gold})}.")
    for e, g in zip(examples, gold):
        n_src, n_tgt = len(words(e.text)), len(words(e.target or ""))
        bad = [(s, t) for s, t in g.possible if not (0 <= s < n_src and 0 <= t < n_tgt)]
        if bad:
            raise ValueError(f"gold for example {e.id!r} has link {min(bad)} outside its {n_src} source and {n_tgt} "
                             f"target words (links are 0-based (source, target) pairs).")
    return gold


def _cross_attention(model: Seq2SeqModel, pairs: PairBatch) -> Tensor:
    """Every decoder layer's cross-attention -> [layer, batch, head, tgt, src]."""
    sites = model.cross_attention_sites
    with model.evaluating():
        cache = record(model, pairs, names=sites)[1]
    return torch.stack([cache[n] for n in sites]).float().cpu()


def alignment_rows(ids: Sequence[str], name: str, scores: Tensor, maps: Sequence[tuple[list, list]],
                   golds: Sequence[GoldAlignment], rules: Sequence[str] = ("argmax",), *,
                   n_words: Sequence[tuple[int, int]] | None = None) -> list[tuple]:
    """AER, alignment precision and recall of `scores` [batch, tgt, src] -> tidy rows: per example, then the corpus.

    maps: per example, (word of each source token, word of each target position), None for special tokens and
    padding (`model.word_ids`, `model.target_word_ids`). Each example's token scores are merged onto its words
    (`merge_subwords`, the default "sum": a target word's pieces and a source word's pieces are added; the
    built-in tokenizer has one token a word), links are taken by each rule (`extract_links`) and scored against
    the example's Sure and Possible links (`alignment_counts`). n_words: per example, (source, target) word counts
    (default: the highest mapped word + 1). Setting: the rule; the corpus row (example_id CORPUS_ID) has setting
    "{rule}:corpus" and sums the counts over the examples.
    """
    rows: list[tuple] = []
    sc = scores.detach().float().cpu().numpy()                                       # [batch, tgt, src]
    counts_of = n_words or [(None, None)] * len(maps)
    words_scores = [merge_subwords(sc[i], src_map, tgt_map, n_src_words=n_s, n_tgt_words=n_t)
                    for i, ((src_map, tgt_map), (n_s, n_t)) in enumerate(zip(maps, counts_of))]
    why = {"alignment_error_rate": "no predicted and no Sure link", "alignment_precision": "no predicted link",
           "alignment_recall": "no Sure gold link"}
    for rule in rules:
        counts = [alignment_counts(extract_links(w, rule), g.sure, g.possible) for w, g in zip(words_scores, golds)]
        total = sum(counts[1:], counts[0])
        for metric, score in zip(ALIGNMENT_METRICS, ("aer", "precision", "recall")):
            for example_id, setting, c in [*((i, rule, c) for i, c in zip(ids, counts)),
                                           (CORPUS_ID, f"{rule}:corpus", total)]:
                v = getattr(c, score)
                rows.append((example_id, name, metric, setting, float(v), "" if v == v else why[metric]))
    return rows


# -- counterfactual tests ---------------------------------------------------------------------------
def translator_counterfactual(model: Seq2SeqModel, examples: Sequence[Example], *, n_permutations: int = 20,
                              seed: int = 0, max_batch: int = 256, tests: Sequence[str] = COUNTERFACTUAL_TESTS,
                              adversarial_steps: int = 40, epsilon: float = 0.01, adversarial_lr: float = 0.1,
                              n_adversaries: int = 1) -> dict[str, pd.DataFrame]:
    """The counterfactual tests on cross-attention -> {"summary", "permutation", "adversarial", "head_ablation"}.

    tests: a subset of COUNTERFACTUAL_TESTS (the classifier's `analyses.counterfactual.TESTS`): permutation,
    adversarial (`seq2seq_counterfactual.adversarial_search`: per unit, its query row of the cross-attention
    at the layer, as far as possible in JSD while the next-token distribution moves at most `epsilon` in TVD,
    `adversarial_steps` Adam steps at lr `adversarial_lr`, `n_adversaries` searches per unit), uniform and erasure at every decoder layer and "all"; head_ablation once
    (`seq2seq_counterfactual.cross_head_table`: each cross-attention head zeroed in turn). Frames hold only the
    tests run ("permutation": per example and layer; "adversarial": per example and layer; "head_ablation": per
    layer and head).

    Per example, max_attention and median_tvd are means over its units (target tokens, see the module doc) of each
    unit's max cross-attention weight and of its median TVD over `n_permutations`; uniform and erasure statistics
    are over units (teacher forcing), plus greedy exact match of the whole translation (against
    `model.target_texts` of the references) under uniform attention.
    """
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations must be an int >= 1; got {n_permutations!r}.")
    unknown = [t for t in tests if t not in COUNTERFACTUAL_TESTS]
    if unknown or isinstance(tests, str):
        raise ValueError(f"tests must be a list of {', '.join(COUNTERFACTUAL_TESTS)}; got {tests!r}.")
    pairs, units = prepare(model, examples)
    n, ids, sites = len(examples), [e.id for e in examples], model.cross_attention_sites
    rows = torch.arange(n)
    at = lambda probs: probs[units.src, units.tgt]                                   # noqa: E731 [batch, tgt, v] -> [unit, v]
    base = at(teacher_forced(model, pairs, rows, max_batch=max_batch))                     # [unit, vocab]
    ref = pairs.tgt_out[units.src, units.tgt]                                        # [unit]
    cross = _cross_attention(model, pairs).transpose(2, 3)[:, units.src, units.tgt]  # [layer, unit, head, src]
    scored = (pairs.src.attention_mask & ~pairs.src.special_mask)[units.src]        # [unit, src]
    refs = model.target_texts([e.target for e in examples])
    exact = lambda: float(np.mean([h == r for h, r in zip(model.translate(examples), refs)]))  # noqa: E731
    summary, perm_frames = [], []

    def add(test, layer, statistic, value):
        summary.append((test, str(layer), "all", statistic, float(value)))

    exact_original = exact() if "uniform" in tests else float("nan")
    adversarial_frames = []
    for layer in [*range(len(sites)), "all"]:
        edit_sites = sites if layer == "all" else [sites[layer]]
        att = cross.mean(0) if layer == "all" else cross[layer]                     # [unit, head, src]
        if "adversarial" in tests:
            found = adversarial_search(model, pairs, units, layer=layer, epsilon=epsilon, n_steps=adversarial_steps,
                                       lr=adversarial_lr, n_adversaries=n_adversaries, seed=seed, max_batch=max_batch)
            summary.extend(found.rows(n))
            adversarial_frames.append(found.frame(ids))
        if "permutation" in tests:
            gen = torch.Generator().manual_seed(seed)
            tiled = rows.repeat(n_permutations)                                          # copy c = rows c·n … c·n + n − 1
            probs = teacher_forced(model, pairs, tiled, edits={s: permute(gen) for s in edit_sites}, max_batch=max_batch)
            probs = probs.view(n_permutations, n, *probs.shape[1:])                       # [perm, batch, tgt, vocab]
            dist = tvd(probs[:, units.src, units.tgt], base[None])                       # [perm, unit]
            med = _per_example(units, dist.median(0).values, n).float()                  # [batch]
            top = _per_example(units, att.amax((1, 2)), n).float()                       # [batch]
            add("permutation", layer, "median_tvd", med.median())
            add("permutation", layer, "mean_tvd", med.mean())
            add("permutation", layer, "max_attention_tvd_spearman", spearman(top.numpy(), med.numpy()))
            perm_frames.append(pd.DataFrame({"example_id": ids, "layer": str(layer), "max_attention": top.numpy(),
                                             "median_tvd": med.numpy()}))
        if "uniform" in tests:
            edits = {s: uniform() for s in edit_sites}
            probs = at(teacher_forced(model, pairs, rows, edits=edits, max_batch=max_batch))  # [unit, vocab]
            d = _per_example(units, tvd(probs, base), n)
            add("uniform", layer, "median_tvd", d.median())
            add("uniform", layer, "mean_tvd", d.mean())
            add("uniform", layer, "flip_rate", (probs.argmax(-1) != base.argmax(-1)).float().mean())
            add("uniform", layer, "accuracy", (probs.argmax(-1) == ref).float().mean())
            add("uniform", layer, "accuracy_original", (base.argmax(-1) == ref).float().mean())
            with hooks(model, edits):
                add("uniform", layer, "exact_match", exact())
            add("uniform", layer, "exact_match_original", exact_original)
        if "erasure" in tests:
            key_max = att.mean(1).masked_fill(~scored, float("-inf")).argmax(1)          # [unit]
            rand = torch.rand(scored.shape, generator=torch.Generator().manual_seed(seed))
            key_random = rand.masked_fill(~scored, -1.0).argmax(1)                       # [unit]
            for name, key in (("max", key_max), ("random", key_random)):
                p = teacher_forced(model, pairs, units.src, edits=lambda sl, key=key: {s: zero_key(key[sl]) for s in edit_sites},  # noqa: B023
                             max_batch=max_batch, reduce=lambda pr, sl: pr[torch.arange(pr.shape[0]), units.tgt[sl]])
                add("erasure", layer, f"flip_rate_{name}", (p.argmax(-1) != base.argmax(-1)).float().mean())
                add("erasure", layer, f"median_tvd_{name}", tvd(p, base).median())
    frames = {"permutation": perm_frames, "adversarial": adversarial_frames}
    if "head_ablation" in tests:
        heads = cross_head_table(model, pairs, units, max_batch=max_batch)
        summary.extend(head_rows(heads))
        frames["head_ablation"] = [heads]
    out = {"summary": pd.DataFrame(summary, columns=["test", "layer", "head", "statistic", "value"])}
    out.update({k: pd.concat(v, ignore_index=True) for k, v in frames.items() if v})
    return out



# -- the entry point --------------------------------------------------------------------------------
TRANSLATION_EXPLAINER = "model"          # the explainer column of rows about the model itself, not an explanation


def translation_rows(model: Seq2SeqModel, examples: Sequence[Example]) -> pd.DataFrame:
    """The model's greedy translations of the audited examples against their references: exact match (per example
    and over the corpus) and sacrebleu's corpus BLEU (0-100) -> tidy rows with explainer "model"."""
    import sacrebleu

    hyps = model.translate(list(examples))
    refs = model.target_texts([e.target or "" for e in examples])
    same = [float(h == r) for h, r in zip(hyps, refs)]
    rows = [(e.id, TRANSLATION_EXPLAINER, "exact_match", "greedy", v, "") for e, v in zip(examples, same)]
    rows += [(CORPUS_ID, TRANSLATION_EXPLAINER, "exact_match", "greedy:corpus", float(np.mean(same)), ""),
             (CORPUS_ID, TRANSLATION_EXPLAINER, "bleu", "greedy:corpus", sacrebleu.corpus_bleu(hyps, [refs]).score,
              "sacrebleu corpus BLEU, 0-100")]
    return pd.DataFrame(rows, columns=["example_id", "explainer", "metric", "setting", "value", "note"])


def audit_translator(model: Seq2SeqModel, examples: Sequence[Example], *, explainers: Sequence[str] = EXPLAINERS,
                     seed: int = 0, max_batch: int = 256, n_permutations: int = 20,
                     gold: Sequence[GoldAlignment] | None = None, tests: Sequence[str] = COUNTERFACTUAL_TESTS,
                     adversarial_steps: int = 40, sanity_examples: int = 32, adversarial_lr: float = 0.1,
                     n_adversaries: int = 1) -> dict:
    """Every issue-4 analysis on a Translator or HFTranslator -> {"metrics", "counterfactual", "attributions",
    "examples", "timings"}.

    sanity_examples: the randomisation check (`analyses.seq2seq_sanity`) on this many first examples, every
    explainer (0: none); its rows ("randomization_spearman") join the metrics, as an audit's do.

    metrics: tidy example_id, explainer, metric, setting, value, note (one row per example, see the module doc;
    the alignment metrics add a corpus row per explainer, example_id CORPUS_ID). gold: as `translator_metrics`.
    counterfactual: {"summary": test, layer, head, statistic, value; "permutation": example_id, layer,
    max_attention, median_tvd}. attributions: `Attribution.to_records()` dicts, one per example and explainer,
    explaining the example's FIRST unit (its first target word's first token; id = the example id), with "matrix"
    (every unit's scores over the real source tokens, [unit, src], 6 significant digits) and "target_tokens" (the
    units' reference tokens) for the report's target × source heatmap; examples: id,
    gold (per source token, that unit's Sure alignment), label (the reference token) and prediction (teacher-forced
    argmax there) for `write_report`.
    """
    t0 = time.perf_counter()
    metrics, attrs = translator_metrics(model, examples, explainers=explainers, seed=seed, max_batch=max_batch,
                                        gold=gold)
    metrics = pd.concat([metrics, translation_rows(model, examples)], ignore_index=True).__finalize__(metrics)
    t1 = time.perf_counter()
    cf = translator_counterfactual(model, examples, n_permutations=n_permutations, seed=seed, max_batch=max_batch,
                                   tests=tests, adversarial_steps=adversarial_steps, adversarial_lr=adversarial_lr,
                                   n_adversaries=n_adversaries)
    t2 = time.perf_counter()
    pairs, units = prepare(model, examples, gold)
    if sanity_examples:                           # the randomisation check on the first examples, every explainer
        from attnaudit.analyses.seq2seq_sanity import translator_randomization
        few = list(examples)[:sanity_examples]
        few_pairs, few_units = prepare(model, few, None if gold is None else list(gold)[: len(few)])
        sanity = tidy_frame(translator_randomization(model, few_pairs, few_units, [ALIASES.get(n, n) for n in explainers],
                                                     ids=[e.id for e in few], seed=seed, max_batch=max_batch))
        metrics = pd.concat([metrics, sanity], ignore_index=True).__finalize__(metrics)
    t3 = time.perf_counter()
    n = len(examples)
    first = torch.full((n,), len(units.src), dtype=torch.long).scatter_reduce(
        0, units.src, torch.arange(len(units.src)), "amin")                          # [example] its first unit
    at = units.tgt[first]                                                            # [example] its target position
    n_real = pairs.src.attention_mask.sum(1).tolist()                                # [batch]
    own = [(units.src == i).nonzero()[:, 0] for i in range(n)]                       # per example: its units
    said = [model.target_tokens(pairs.tgt_out[i, units.tgt[u]].tolist()) for i, u in enumerate(own)]
    records = [{**r, "id": examples[i].id, "target_tokens": said[i],
                "matrix": [[float(f"{x:.6g}") for x in row] for row in a.scores[own[i], : n_real[i]].tolist()]}
               for a in attrs.values() for i, r in zip(range(n), a.select(first.tolist()).to_records())]
    pred = teacher_forced(model, pairs, torch.arange(n), max_batch=max_batch)[torch.arange(n), at].argmax(-1)  # [batch]
    labels = model.target_tokens(pairs.tgt_out[torch.arange(n), at].tolist())
    predictions = model.target_tokens(pred.tolist())
    info = [{"id": e.id, "gold": units.gold[u, : n_real[i]].int().tolist(), "label": labels[i],
             "prediction": predictions[i]} for i, (e, u) in enumerate(zip(examples, first.tolist()))]
    return {"metrics": metrics, "counterfactual": cf, "attributions": records, "examples": info,
            "timings": {"metrics_seconds": round(t1 - t0, 3), "counterfactual_seconds": round(t2 - t1, 3),
                        "sanity_seconds": round(t3 - t2, 3)}}
