"""The verdict: can attention explain this model's outputs? Derived from the numbers, never hand-written.

    verdict = derive_verdict(metrics, task="keywords", counterfactual=cf["summary"], model_card=card)
    verdict.answer          # "yes", "partly", "no" or "undetermined"
    verdict.paragraph       # plain language, generated from verdict.facts and verdict.caveats

Evidence, each from its own analysis: where the attention family (raw attention, rollout, flow,
gradient-weighted attention, ...) ranks among all explainers on the faithfulness measures of ERASER
(DeYoung et al. 2020) and the deletion/insertion curves (Petsiuk et al. 2018), τ-LOO and decision flips
(Serrano & Smith 2019) and gold rationales; paired Wilcoxon tests against the best explainer and against
`random` (`attnaudit.analyses.stats`); the counterfactual attention tests (Jain & Wallace 2019, Wiegreffe &
Pinter 2019); and the cascading-randomisation sanity check (Adebayo et al. 2018). The rule that turns
them into one word is `RULE`, printed verbatim in every report.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from attnaudit.analyses.sanity import DEFAULT_THRESHOLD as RANDOMIZATION_THRESHOLD
from attnaudit.analyses.sanity import METRIC as RANDOMIZATION_METRIC
from attnaudit.analyses.sanity import randomization_verdict
from attnaudit.analyses.schema import TIDY_COLUMNS, check_tidy, normalize_setting
from attnaudit.analyses.stats import direction, paired_comparisons
from attnaudit.analyses.tables import summarize
from attnaudit.core.io import jsonable
from attnaudit.data.tasks import TASK_NAMES
from attnaudit.explain.registry import ATTENTION_FAMILY

# agreement with the gold tokens (ERASER's average_precision): a headline measure only where they cause the label
GOLD_HEADLINE = "gold_average_precision"
# (metric, preferred setting): the faithfulness and ground-truth measures the attention family is ranked on
HEADLINE_METRICS: tuple[tuple[str, str | None], ...] = (
    ("comprehensiveness", "aopc"), ("sufficiency", "aopc"), ("deletion_auc", None), ("insertion_auc", None),
    ("tau_loo", None), ("decision_flip_fraction", None), (GOLD_HEADLINE, None))
PERTURBATION_METRICS = ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc", "tau_loo",
                        "decision_flip_fraction")
GOLD_KINDS = ("causal", "human")   # gold tokens that decide the label by construction, or annotators' rationales
ALPHA = 0.05                 # significance level on Holm-adjusted p-values
NEAR_BEST_SHARE = 0.5        # near the best on at least this share of measured headline metrics ...
YES_RANDOM_SHARE = 0.75      # ... and better than random on at least this share -> the method "qualifies"
NO_RANDOM_SHARE = 0.5        # no attention method better than random on this share -> "no"
TVD_SMALL, TVD_LARGE = 0.05, 0.2    # median output TVD: < small is "small", >= large is "large"
JSD_LARGE = 0.3              # adversarial attention this far (nats; max ln 2 ≈ 0.693) from the original ...
ADVERSARIAL_SHARE = 0.5      # ... with the output TVD <= ε for at least this share of examples
SEARCH_CONVERGED = 0.02      # the adversarial search converged: its second half added at most this share of its JSD
SMALL_MODEL = (4, 256)       # at most this many layers and this d_model: a small model
FEW_EXAMPLES = 30            # fewer examples than this per (explainer, metric): wide intervals

# what each measure of the tables is, in the words the report shows (one home: the HTML and Markdown pages read it)
DEFINITIONS: tuple[tuple[str, str], ...] = (
    ("comprehensiveness", "p(target | x) − p(target | x without the top k% tokens), per k (ERASER, DeYoung et al. "
     "2020); aopc is its mean over k. Higher is better."),
    ("sufficiency", "p(target | x) − p(target | only the top k% tokens), per k; aopc its mean. Lower is better."),
    ("deletion_auc / insertion_auc", "area under p(target) as tokens are removed (deletion, lower is better) or "
     "restored (insertion, higher is better) in the explainer's order (RISE, Petsiuk et al. 2018)."),
    ("tau_loo", "Kendall τ_b between the scores and leave-one-out importance p(target | x) − p(target | x with "
     "token j replaced); the setting names the replacement (policy=mask: [MASK]; only policy=delete is ferret's "
     "τ-LOO). Higher is better."),
    ("decision_flip_fraction", "the fraction of tokens removed in the explainer's order before the decision "
     "flips (lower is better)."),
    ("gold_average_precision / gold_auprc", "agreement of the scores with the gold tokens: ERASER's "
     "average_precision (sklearn's step sum; single-class examples skipped) and auprc (the trapezoid area under "
     "the precision-recall curve). Evidence of faithfulness where the gold tokens cause the label (the built-in "
     "tasks), plausibility against human rationales."),
    ("rationale_*", "agreement with human rationales (plausibility, not faithfulness): token F1 and IOU F1 of "
     "the top n_gold tokens, average precision and AUPRC as above."),
    ("adversarial jsd_reached", "the mean Jensen–Shannon divergence (nats, at most ln 2) between the model's "
     "attention and the most different attention an adversarial search found with the output held within TVD "
     "ε = 0.01 (Jain & Wallace 2019; the settings n_adversaries, adversarial_steps, adversarial_lr say how hard "
     "it searched); jsd_reached_half_steps reads the same search at half its steps, so their gap shows whether "
     "it had converged."),
    ("randomization_spearman", "Spearman similarity of the map to the original as layers are re-initialised "
     "from the top (Adebayo et al. 2018); a map that stays similar fails the check."),
)

RULE = (
    f"Per task, each attention-family explainer is scored on the headline metrics it has "
    f"({', '.join(m if s is None else f'{m} ({s})' for m, s in HEADLINE_METRICS)}; {GOLD_HEADLINE} only where "
    f"the gold tokens cause the label by construction, as in the built-in tasks: agreement with human rationales is "
    f"plausibility, not faithfulness). It is 'near the best' on a "
    f"metric when it ranks first or a paired Wilcoxon test against the best explainer is not significant "
    f"(Holm-adjusted p >= {ALPHA}); it is 'better than random' when its mean is on the better side of "
    f"random's and the test against random is significant (Holm-adjusted p < {ALPHA}). A method qualifies "
    f"when it is near the best on at least {NEAR_BEST_SHARE:.0%} of its metrics, better than random on at "
    f"least {YES_RANDOM_SHARE:.0%}, and does not fail the randomisation check (mean Spearman similarity "
    f"> {RANDOMIZATION_THRESHOLD} at the last step). YES: some method qualifies and the counterfactual tests "
    f"(when run) show neither that the output ignores attention (median TVD under permutation and uniform "
    f"attention < {TVD_SMALL} at every layer) nor that very different attention gives the same output "
    f"(adversarial JSD >= {JSD_LARGE} with TVD <= ε for >= {ADVERSARIAL_SHARE:.0%} of examples at some layer). "
    f"PARTLY: some method qualifies but the counterfactual tests contradict it, or no method qualifies but "
    f"some attention-family method is better than random on at least {NO_RANDOM_SHARE:.0%} of its metrics. "
    f"NO: no attention-family method is better than random on {NO_RANDOM_SHARE:.0%} of its metrics. "
    f"UNDETERMINED: no attention-family method has any headline metric.")


@dataclass(frozen=True)
class Verdict:
    """The answer for one task, the rule that produced it, and the facts and caveats behind it.

    answer is "yes", "partly", "no" or "undetermined", derived by `RULE` (see the module constants):
    a method of the attention family qualifies when it is near the best explainer on at least half of the
    headline metrics, better than random on at least three quarters, and passes the randomisation check;
    "yes" needs a qualifying method and counterfactual tests that do not contradict it, "no" means no
    attention method beats random on half of its metrics, "partly" is everything in between.
    """

    task: str
    answer: str
    rule: str
    facts: tuple[str, ...]
    caveats: tuple[str, ...]
    paragraph: str
    ranks: tuple[dict, ...] = ()              # one per (attention method, headline metric): rank, CI, tests
    qualifying: tuple[str, ...] = ()
    counterfactual: dict = field(default_factory=dict)
    randomization: tuple[dict, ...] = ()

    def __post_init__(self):
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}; got {self.answer!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> Verdict:
        tuples = ("facts", "caveats", "ranks", "qualifying", "randomization")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


ANSWERS = ("yes", "partly", "no", "undetermined")


# -- ranks and tests -----------------------------------------------------------------------------
def headline_settings(summary: pd.DataFrame) -> dict[str, str]:
    """metric -> the setting ranked on: the preferred one ("aopc") when present, else "" or the first sorted."""
    out = {}
    for metric, preferred in HEADLINE_METRICS:
        settings = sorted(summary.loc[summary["metric"] == metric, "setting"].astype(str).unique())
        if settings:
            out[metric] = preferred if preferred in settings else ("" if "" in settings else settings[0])
    return out


def rank_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every explainer's rank (1 = best, ties share the better rank) on each headline metric.

    Returns columns metric, setting, explainer, mean, ci_low, ci_high, n, rank, n_explainers, best.
    """
    rows = []
    for metric, setting in headline_settings(summary).items():
        g = summary[(summary["metric"] == metric) & (summary["setting"].astype(str) == setting)]
        g = g[g["mean"].notna()]
        if g.empty:
            continue
        signed = g["mean"] if direction(metric) else -g["mean"]
        ranks = signed.rank(ascending=False, method="min").astype(int)
        best = g.loc[signed.idxmax(), "explainer"]
        for (_, r), rank in zip(g.iterrows(), ranks):
            rows.append(dict(metric=metric, setting=setting, explainer=r["explainer"], mean=float(r["mean"]),
                             ci_low=float(r["ci_low"]), ci_high=float(r["ci_high"]), n=int(r["n"]), rank=int(rank),
                             n_explainers=len(g), best=best))
    return pd.DataFrame(rows, columns=["metric", "setting", "explainer", "mean", "ci_low", "ci_high", "n", "rank",
                                       "n_explainers", "best"])


def normalize_comparisons(comparisons: pd.DataFrame) -> pd.DataFrame:
    """Given comparisons -> columns explainer, metric, setting, vs ("best"/"random"), p_value, p_holm, mean_diff.

    Accepts the brief's `vs` column or `attnaudit.analyses.stats.paired_comparisons`' `reference` column.
    """
    c = comparisons.copy()
    if "vs" not in c.columns:
        if "reference" not in c.columns:
            raise ValueError(f"comparisons must have a 'vs' (or 'reference') column naming 'best' or 'random'; "
                             f"got columns {list(c.columns)}.")
        c["vs"] = c["reference"]
    missing = [k for k in ("explainer", "metric", "setting", "vs", "p_holm") if k not in c.columns]
    if missing:
        raise ValueError(f"comparisons must have columns explainer, metric, setting, vs, p_holm; missing {missing}.")
    for k in ("p_value", "mean_diff"):
        if k not in c.columns:
            c[k] = math.nan
    c = normalize_setting(c)
    return c[["explainer", "metric", "setting", "vs", "p_value", "p_holm", "mean_diff"]].reset_index(drop=True)


def compute_comparisons(metrics: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Paired Wilcoxon + Holm (`stats.paired_comparisons`) on the headline (metric, setting) rows only."""
    chosen = headline_settings(summary)
    keep = metrics["metric"].map(chosen).eq(metrics["setting"].astype(str)) & metrics["metric"].isin(chosen)
    rows = metrics[keep]
    if rows.empty:
        return normalize_comparisons(pd.DataFrame(columns=["explainer", "metric", "setting", "vs", "p_holm"]))
    return normalize_comparisons(paired_comparisons(rows[list(TIDY_COLUMNS)],
                                                    against=("best", "random"), alpha=ALPHA))


def attention_ranks(ranks: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
    """Rank rows of the attention family with p_vs_best, p_vs_random, near_best and beats_random added."""
    fam = ranks[ranks["explainer"].isin(ATTENTION_FAMILY)].copy()
    means = ranks.set_index(["metric", "explainer"])["mean"]
    out = []
    for _, r in fam.iterrows():
        def p(vs):
            hit = comparisons[(comparisons["explainer"] == r["explainer"]) & (comparisons["metric"] == r["metric"])  # noqa: B023
                              & (comparisons["setting"] == r["setting"]) & (comparisons["vs"] == vs)]  # noqa: B023
            return float(hit["p_holm"].iloc[0]) if len(hit) else math.nan
        p_best, p_random = p("best"), p("random")
        random_mean = means.get((r["metric"], "random"), math.nan)
        better = (r["mean"] > random_mean) if direction(r["metric"]) else (r["mean"] < random_mean)
        out.append({**r.to_dict(), "p_vs_best": p_best, "p_vs_random": p_random,
                    "near_best": bool(r["rank"] == 1 or p_best >= ALPHA),
                    "beats_random": bool(better and p_random < ALPHA)})
    cols = [*ranks.columns, "p_vs_best", "p_vs_random", "near_best", "beats_random"]
    return pd.DataFrame(out, columns=cols)


# -- counterfactual tests and the randomisation check ---------------------------------------------
def tvd_size(value: float) -> str:
    return "small" if value < TVD_SMALL else "large" if value >= TVD_LARGE else "moderate"


def _stat(cf: pd.DataFrame, test: str, statistic: str) -> pd.Series:
    """layer (str) -> value for one test and statistic, over all heads ("all" rows)."""
    g = cf[(cf["test"] == test) & (cf["statistic"] == statistic) & (cf["head"].astype(str) == "all")]
    return pd.Series(g["value"].to_numpy(dtype=float), index=g["layer"].astype(str).to_numpy())


def counterfactual_findings(cf: pd.DataFrame) -> tuple[dict, list[str]]:
    """What the counterfactual summary says -> (findings dict, fact sentences).

    findings: attention_changes_output (bool or None: not run), max_median_tvd, max_median_tvd_at,
    adversarial_found (bool or None), plus the per-layer numbers the facts quote.
    """
    missing = {"test", "layer", "head", "statistic", "value"} - set(cf.columns)
    if missing:
        raise ValueError(f"counterfactual must have columns test, layer, head, statistic, value; missing {sorted(missing)}.")
    found: dict = {"attention_changes_output": None, "adversarial_found": None}
    facts = []
    tvds = []
    for test, verb in (("permutation", "Permuting attention"), ("uniform", "Making attention uniform")):
        s = _stat(cf, test, "median_tvd").dropna()
        if s.empty:
            continue
        layer, value = s.idxmax(), float(s.max())
        tvds.append((value, test, layer))
        found[f"{test}_median_tvd"] = {k: float(v) for k, v in s.items()}
        facts.append(f"{verb} changes the output by a median TVD of at most {value:.3f} (layer {layer}): "
                     f"{tvd_size(value)} (small < {TVD_SMALL} <= moderate < {TVD_LARGE} <= large).")
    if tvds:
        value, test, layer = max(tvds)
        found.update(attention_changes_output=value >= TVD_SMALL, max_median_tvd=value,
                     max_median_tvd_at=f"{test}, layer {layer}")
    acc, orig = _stat(cf, "uniform", "accuracy"), _stat(cf, "uniform", "accuracy_original")
    if not acc.dropna().empty and not orig.dropna().empty:
        drop = (orig.reindex(acc.index) - acc).dropna()
        if not drop.empty:
            layer = drop.idxmax()
            found["uniform_accuracy"] = {k: float(v) for k, v in acc.items()}
            facts.append(f"With uniform attention at layer {layer} accuracy goes from {orig[layer]:.3f} to "
                         f"{acc[layer]:.3f}.")
    jsd, sat = _stat(cf, "adversarial", "jsd_reached"), _stat(cf, "adversarial", "constraint_satisfied_fraction")
    if not jsd.dropna().empty:
        sat = sat.reindex(jsd.index).fillna(0.0)
        hits = (jsd >= JSD_LARGE) & (sat >= ADVERSARIAL_SHARE)
        found["adversarial_found"] = bool(hits.any())
        layer = (jsd * (sat >= ADVERSARIAL_SHARE)).idxmax() if hits.any() else jsd.idxmax()
        facts.append(f"Adversarial attention reached a mean JSD of {jsd[layer]:.3f} from the original (max ln 2 ≈ 0.693) "
                     f"with the output held within ε for {sat[layer]:.0%} of examples (layer {layer}): "
                     + ("very different attention can give the same output." if hits.any() else
                        f"no layer reached JSD >= {JSD_LARGE} for {ADVERSARIAL_SHARE:.0%} of examples."))
        half = _stat(cf, "adversarial", "jsd_reached_half_steps").get(layer, math.nan)
        if half == half:
            gain = (jsd[layer] - half) / max(jsd[layer], 1e-12)
            facts.append(f"At half its steps the search had reached {half:.3f} there: "
                         + (f"it had converged (within {SEARCH_CONVERGED:.0%})." if gain <= SEARCH_CONVERGED else
                            f"it was still gaining ({gain:.1%} of its JSD in its second half), so a longer search may find more."))
    fmax, frand = _stat(cf, "erasure", "flip_rate_max"), _stat(cf, "erasure", "flip_rate_random")
    if not fmax.dropna().empty and not frand.dropna().empty:
        layer = fmax.idxmax()
        facts.append(f"Erasing the most-attended token flips the decision for {fmax[layer]:.0%} of examples vs "
                     f"{frand.get(layer, math.nan):.0%} for a random token (layer {layer}).")
    rho = _stat(cf, "head_ablation", "importance_tvd_mass_spearman").dropna()
    if not rho.empty:
        facts.append(f"Across heads, the output change when a head is ablated and its attention mass on the decisive "
                     f"tokens have Spearman ρ = {float(rho.iloc[0]):.2f}.")
    return found, facts


def randomization_results(metrics: pd.DataFrame) -> pd.DataFrame:
    """`sanity.randomization_verdict` on the randomisation rows; empty when there are none."""
    cols = ["explainer", "final_similarity", "passed", "final_step"]
    if not (metrics["metric"] == RANDOMIZATION_METRIC).any():
        return pd.DataFrame(columns=cols)
    return randomization_verdict(metrics)[cols]


# -- the verdict ---------------------------------------------------------------------------------
def _share(flags: pd.Series) -> float:
    return float(flags.mean()) if len(flags) else 0.0


def _ranked_summary(ranks_att: pd.DataFrame, name: str) -> str:
    g = ranks_att[ranks_att["explainer"] == name]
    parts = [f"{r.metric} {r.rank}/{r.n_explainers}" for r in g.itertuples()]
    return ", ".join(parts)


def is_synthetic(task: str, card: Mapping | None) -> bool:
    """A built-in task (or a model card that says "synthetic"): its gold tokens cause the label by construction."""
    card = card or {}
    named = {str(v) for k, v in card.items() if k in ("task", "data", "dataset") and isinstance(v, str)}
    return task in TASK_NAMES or bool(named & set(TASK_NAMES)) or card.get("synthetic") is True


def _card_caveats(task: str, card: Mapping | None) -> list[str]:
    out = []
    card = card or {}
    arch = card.get("architecture") or {}
    n_layers, d_model = arch.get("n_layers"), arch.get("d_model")
    if isinstance(n_layers, int) and isinstance(d_model, int) and n_layers <= SMALL_MODEL[0] and d_model <= SMALL_MODEL[1]:
        out.append(f"The model is small ({n_layers} layers, d_model {d_model}); conclusions may not carry over to "
                   f"large pretrained Transformers.")
    if is_synthetic(task, card):
        out.append("The task is a built-in synthetic task whose decisive tokens are known by construction; real text "
                   "is less clear-cut.")
    return out


def derive_verdict(metrics: pd.DataFrame, *, task: str = "default", counterfactual: pd.DataFrame | None = None,
                   comparisons: pd.DataFrame | None = None, model_card: Mapping | None = None,
                   summary: pd.DataFrame | None = None, gold: str | None = None) -> Verdict:
    """The verdict for one task from its tidy metrics (and optional counterfactual summary and comparisons).

    Args:
        metrics: tidy rows example_id, explainer, metric, setting, value (one task).
        counterfactual: rows test, layer, head, statistic, value (`counterfactual_table(...)["summary"]`).
        comparisons: explainer, metric, setting, vs, p_holm (...); None -> paired Wilcoxon + Holm computed here.
        model_card: architecture etc., for the caveats; summary: `tables.summarize(metrics)` if already computed.
        gold: what the gold tokens behind GOLD_HEADLINE are: "causal" (they decide the label by construction, as in
            the built-in tasks: evidence of faithfulness, a headline measure) or "human" (annotators' rationales:
            plausibility, reported but kept out of the verdict). None: "causal" for a built-in or synthetic task
            (`is_synthetic`), else "human".
    Returns:
        A `Verdict` whose answer follows `RULE`.
    """
    check_tidy(metrics, name="metrics")
    if gold not in (None, *GOLD_KINDS):
        raise ValueError(f"gold must be one of {', '.join(GOLD_KINDS)} or None (inferred from the task); got {gold!r}.")
    gold = gold or ("causal" if is_synthetic(task, model_card) else "human")
    metrics = normalize_setting(metrics)
    summary = summarize(metrics) if summary is None else normalize_setting(summary)
    ranks = rank_table(summary)
    plausibility = gold == "human" and bool((ranks["metric"] == GOLD_HEADLINE).any())
    if plausibility:                           # agreement with annotators is not evidence of faithfulness
        ranks = ranks[ranks["metric"] != GOLD_HEADLINE].reset_index(drop=True)
    given = comparisons is not None
    comps = normalize_comparisons(comparisons) if given else compute_comparisons(metrics, summary)
    att = attention_ranks(ranks, comps)
    facts, caveats = [], []

    per_method = {}
    randomization = randomization_results(metrics)
    failed = set(randomization.loc[~randomization["passed"].astype(bool), "explainer"])
    for name in [m for m in ATTENTION_FAMILY if m in set(att["explainer"])]:
        g = att[att["explainer"] == name]
        per_method[name] = (_share(g["near_best"]), _share(g["beats_random"]), len(g))
        facts.append(f"{name}: near the best on {int(g['near_best'].sum())} of {len(g)} headline metrics, better than "
                     f"random on {int(g['beats_random'].sum())} of {len(g)} (ranks: {_ranked_summary(att, name)}).")
    qualifying = [m for m, (nb, br, _) in per_method.items()
                  if nb >= NEAR_BEST_SHARE and br >= YES_RANDOM_SHARE and m not in failed]

    cf_found: dict = {}
    if counterfactual is not None and len(counterfactual):
        cf_found, cf_facts = counterfactual_findings(counterfactual)
        facts += cf_facts
    else:
        caveats.append("The counterfactual attention tests were not run, so whether the output depends on attention "
                       "was not checked.")
    if len(randomization):
        step = randomization["final_step"].iloc[0]
        facts.append(f"Randomisation check (mean Spearman > {RANDOMIZATION_THRESHOLD} at the last step, {step}, fails): "
                     + (f"fail: {', '.join(sorted(failed))}." if failed else "every explainer passes."))
    else:
        caveats.append("The randomisation sanity check was not run.")

    contradicted = []
    if cf_found.get("attention_changes_output") is False:
        contradicted.append("the output barely changes when attention is permuted or made uniform")
    if cf_found.get("adversarial_found"):
        contradicted.append("very different attention gives the same output")
    if not per_method:
        answer = "undetermined"
    elif qualifying and not contradicted:
        answer = "yes"
    elif qualifying or any(br >= NO_RANDOM_SHARE for _, br, _ in per_method.values()):
        answer = "partly"
    else:
        answer = "no"

    measured = set(ranks["metric"])
    if plausibility:
        caveats.append(f"{GOLD_HEADLINE} here is agreement with human rationales (plausibility, ERASER's average "
                       "precision against the annotators' tokens), not evidence that the model uses those tokens; "
                       "it is reported in the tables but not counted in the verdict.")
    absent = [m for m, _ in HEADLINE_METRICS if m not in measured and not (plausibility and m == GOLD_HEADLINE)]
    if absent:
        caveats.append(f"Not measured, so not part of the verdict: {', '.join(absent)}.")
    if measured & set(PERTURBATION_METRICS):
        caveats.append("Deletion-based metrics feed the model inputs with tokens removed, which it never saw in "
                       "training (out of distribution); a score can reflect that shift as well as the explanation.")
    if "random" not in set(ranks["explainer"]):
        caveats.append("No 'random' explainer was scored, so no method can be shown to beat random.")
    if len(ranks) and int(ranks["n"].min()) < FEW_EXAMPLES:
        caveats.append(f"Some means rest on fewer than {FEW_EXAMPLES} examples (min n = {int(ranks['n'].min())}); "
                       f"intervals are wide and tests have little power.")
    caveats += _card_caveats(task, model_card)
    caveats.append("p-values: " + ("taken from the comparisons given." if given else
                   "paired two-sided Wilcoxon signed-rank tests over examples, Holm-corrected per metric and reference."))

    paragraph = _paragraph(task, answer, per_method, qualifying, failed, contradicted, cf_found, att, caveats)
    return Verdict(task=str(task), answer=answer, rule=RULE, facts=tuple(facts), caveats=tuple(caveats),
                   paragraph=paragraph, ranks=tuple(_records(att)), qualifying=tuple(qualifying),
                   counterfactual=jsonable(cf_found), randomization=tuple(_records(randomization)))


def _paragraph(task, answer, per_method, qualifying, failed, contradicted, cf, att, caveats) -> str:
    if answer == "undetermined":
        return (f"Task {task}: undetermined. No attention-based explainer was scored on a headline faithfulness "
                f"metric, so the numbers cannot say whether attention explains this model's outputs.")
    medians = {m: float(np.median(att.loc[att["explainer"] == m, "rank"])) for m in per_method}
    # most measures near the best or better than random; ties go to the better median rank, then family order
    best = max(per_method, key=lambda m: (per_method[m][0] + per_method[m][1], -medians[m], -ATTENTION_FAMILY.index(m)))
    nb, br, n = per_method[best]
    median_rank = medians[best]
    n_expl = int(att["n_explainers"].max())
    s = [f"Task {task}: {answer}."]
    if answer == "yes":
        s.append(f"{', '.join(qualifying)} {'is' if len(qualifying) == 1 else 'are'} about as faithful as the best "
                 f"explainer on most measures and clearly better than random.")
    elif answer == "no":
        s.append("No attention-based explanation does reliably better than random scores.")
    elif qualifying:
        s.append(f"{', '.join(qualifying)} rank{'s' if len(qualifying) == 1 else ''} well, but {' and '.join(contradicted)}, "
                 f"so attention is not a reliable account of why the model decides.")
    else:
        s.append("Attention-based explanations beat random scores but fall behind the best explainers.")
    s.append(f"The best-placed attention method, {best}, is near the best explainer on {round(nb * n)} of {n} "
             f"measures and better than random on {round(br * n)} of {n} (median rank {median_rank:g} of {n_expl}).")
    if "attention" in per_method and best != "attention":
        a_nb, a_br, a_n = per_method["attention"]
        s.append(f"Raw attention is near the best on {round(a_nb * a_n)} of {a_n} and better than random on "
                 f"{round(a_br * a_n)} of {a_n}.")
    if cf.get("attention_changes_output") is not None:
        size = tvd_size(cf["max_median_tvd"])
        s.append(f"Changing the attention weights changes the output {'only a little' if size == 'small' else 'moderately' if size == 'moderate' else 'a lot'} "
                 f"(median TVD up to {cf['max_median_tvd']:.2f}, {cf['max_median_tvd_at']}).")
    if cf.get("adversarial_found") is not None:
        s.append("Very different attention can leave the output unchanged." if cf["adversarial_found"] else
                 "The adversarial search found no very different attention that keeps the output.")
    fam_failed = sorted(set(per_method) & failed)
    if fam_failed:
        s.append(f"Failing the randomisation check (the map barely changes when the weights are destroyed): "
                 f"{', '.join(fam_failed)}.")
    short = [c for c in caveats if c.startswith(("Deletion-based", "The model is small", "The task is a built-in"))]
    if short:
        s.append("Caveats: " + " ".join(short))
    return " ".join(s)


def _records(df: pd.DataFrame) -> list[dict]:
    return [jsonable(r) for r in df.to_dict("records")]


__all__ = ["Verdict", "RULE", "DEFINITIONS", "ANSWERS", "GOLD_KINDS", "is_synthetic", "derive_verdict", "rank_table", "headline_settings", "counterfactual_findings",
           "randomization_results", "normalize_comparisons", "compute_comparisons", "attention_ranks"]
