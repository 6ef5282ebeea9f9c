"""Faithfulness metrics against known answers: hand loops, hand-made curves, scipy, ferret's formula, oracles."""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau
from test_perturb import make_attribution, random_attribution

from attnaudit.analyses import faithfulness as F
from attnaudit.explain.base import Explainer
from attnaudit.explain.perturb import PerturbationEngine
from attnaudit.model.interface import Batch

PAD, CLS, SEP, MASK = 0, 1, 2, 4


class BagOfWords:
    """logits = Σ over attended tokens of W[token]: the output provably depends on known tokens only.

    [PAD], [CLS], [SEP] and [MASK] weigh nothing, so masking, un-attending and deleting a token are
    the same removal and every policy gives the same probabilities.
    """

    n_classes = 2
    pad_id, mask_id = PAD, MASK
    device = torch.device("cpu")

    def __init__(self, weights: dict[int, tuple[float, float]], vocab_size: int = 32):
        self.w = torch.zeros(vocab_size, 2)
        for token, row in weights.items():
            self.w[token] = torch.tensor(row)

    def logits(self, input_ids, attention_mask):
        return (self.w[input_ids] * attention_mask[..., None]).sum(1)               # [batch, n_classes]

    def __call__(self, batch):
        return self.logits(batch.input_ids, batch.attention_mask)

    @contextmanager
    def evaluating(self):
        yield self


def bow_batch(rows: list[list[int]]) -> Batch:
    """[CLS] row [SEP], right-padded."""
    seq = max(len(r) for r in rows) + 2
    ids = torch.full((len(rows), seq), PAD)
    for i, r in enumerate(rows):
        ids[i, : len(r) + 2] = torch.tensor([CLS, *r, SEP])
    mask = ids != PAD
    special = (ids == CLS) | (ids == SEP)
    tokens = [[str(int(t)) for t in row] for row in ids]
    return Batch(ids, mask, special, tokens, ids=[f"b{i}" for i in range(len(rows))])


# -- hand loops: comprehensiveness and sufficiency ------------------------------------------------
def hand_eraser(model, batch, attr, k, kind, policy):
    """One forward per perturbed input, built from Python lists (the definition, written out)."""
    out = []
    for i in range(len(batch)):
        n_real = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i, :n_real].tolist()
        scored = [j for j in range(n_real) if not batch.special_mask[i, j]]
        ranked = sorted(scored, key=lambda j: (-float(attr.scores[i, j]), j))
        top = set(ranked[: math.ceil(k * len(scored) - 1e-9)])
        removed = top if kind == "comprehensiveness" else set(scored) - top
        if policy == "mask":
            x, m = [model.mask_id if j in removed else t for j, t in enumerate(ids)], [True] * n_real
        elif policy == "attention":
            x, m = ids, [j not in removed for j in range(n_real)]
        else:
            x = [t for j, t in enumerate(ids) if j not in removed]
            m = [True] * len(x)
        with torch.no_grad():
            full = model.logits(torch.tensor([ids]), torch.tensor([[True] * n_real])).softmax(-1)[0, attr.target[i]]
            part = model.logits(torch.tensor([x]), torch.tensor([m])).softmax(-1)[0, attr.target[i]]
        out.append(float(full - part))
    return torch.tensor(out)


@pytest.mark.parametrize("policy", ["mask", "attention", "delete"])
def test_comprehensiveness_and_sufficiency_equal_hand_loops(tiny_model, tiny_batch, policy):
    attr = random_attribution(tiny_model, tiny_batch, seed=1)
    engine = PerturbationEngine(tiny_model, tiny_batch, policy=policy, max_batch=5)
    comp = F.comprehensiveness_curve(engine, tiny_batch, attr, bins=F.ERASER_BINS)
    suff = F.sufficiency_curve(engine, tiny_batch, attr, bins=F.ERASER_BINS)
    for j, k in enumerate(F.ERASER_BINS):
        torch.testing.assert_close(comp[:, j], hand_eraser(tiny_model, tiny_batch, attr, k, "comprehensiveness", policy),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(suff[:, j], hand_eraser(tiny_model, tiny_batch, attr, k, "sufficiency", policy),
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(F.aopc_comprehensiveness(engine, tiny_batch, attr), comp.mean(1))


def test_metrics_do_not_depend_on_max_batch(tiny_model, tiny_batch):
    attr = random_attribution(tiny_model, tiny_batch, seed=2)
    metrics = (F.aopc_comprehensiveness, F.aopc_sufficiency, F.deletion_auc, F.insertion_auc,
               F.decision_flip_fraction, F.tau_loo)
    got = [torch.stack([m(PerturbationEngine(tiny_model, tiny_batch, max_batch=mb), tiny_batch, attr) for m in metrics])
           for mb in (1, 7, 1000)]
    for g in got[1:]:
        torch.testing.assert_close(g, got[0], atol=1e-6, rtol=0, equal_nan=True)


def test_removing_nothing_scores_zero(tiny_model, tiny_batch):
    attr = random_attribution(tiny_model, tiny_batch)
    assert (F.comprehensiveness(tiny_model, tiny_batch, attr, k=0.0) == 0).all()
    assert (F.sufficiency(tiny_model, tiny_batch, attr, k=1.0) == 0).all()


def test_a_model_given_directly_builds_its_own_engine(tiny_model, tiny_batch):
    attr = random_attribution(tiny_model, tiny_batch)
    torch.testing.assert_close(F.deletion_auc(tiny_model, tiny_batch, attr),
                               F.deletion_auc(PerturbationEngine(tiny_model, tiny_batch), tiny_batch, attr))


# -- curves, flips, τ ---------------------------------------------------------------------------
def test_auc_of_a_hand_made_curve():
    nan = float("nan")
    curve = torch.tensor([[1.0, 0.5, 0.0, nan],          # n = 2: (0.75 + 0.25) / 2 = 0.5
                          [0.8, 0.8, 0.2, 0.2],          # n = 3: (0.8 + 0.5 + 0.2) / 3 = 0.5
                          [0.3, nan, nan, nan]])         # n = 0: undefined
    got = F.curve_auc(curve)
    torch.testing.assert_close(got[:2], torch.tensor([0.5, 0.5]))
    assert math.isnan(got[2])


def test_deletion_and_insertion_on_a_bag_of_words():
    # token 10 pushes class 0 hard, 11 a little, 12 is neutral; the explanation ranks 10, 11, 12
    model = BagOfWords({10: (4.0, 0.0), 11: (1.0, 0.0)})
    batch = bow_batch([[12, 10, 11]])
    attr = make_attribution(model, batch, torch.tensor([[0.0, 0.1, 0.9, 0.5, 0.0]]))
    sig = lambda z: 1 / (1 + math.exp(-z))                                           # noqa: E731
    deletion = [sig(5.0), sig(1.0), sig(0.0), sig(0.0)]                              # remove 10, then 11, then 12
    insertion = [sig(0.0), sig(4.0), sig(5.0), sig(5.0)]
    trap = lambda y: sum((a + b) / 2 for a, b in zip(y, y[1:])) / (len(y) - 1)       # noqa: E731
    for policy in ("mask", "attention", "delete"):
        torch.testing.assert_close(F.deletion_curve(model, batch, attr, policy=policy)[0], torch.tensor(deletion))
        assert math.isclose(float(F.deletion_auc(model, batch, attr, policy=policy)), trap(deletion), rel_tol=1e-6)
        assert math.isclose(float(F.insertion_auc(model, batch, attr, policy=policy)), trap(insertion), rel_tol=1e-6)


def test_decision_flip_on_a_constructed_case():
    # class 0 wins with 10 and 11 present; removing 10 then 11 flips it after 2 of 4 tokens
    model = BagOfWords({10: (2.0, 0.0), 11: (2.0, 0.0), 12: (0.0, 1.0), 13: (0.0, 1.0)})
    batch = bow_batch([[10, 11, 12, 13], [10, 11, 12, 13]])
    good = torch.tensor([0.0, 0.9, 0.8, 0.1, 0.2, 0.0])           # ranks 10, 11, 13, 12
    bad = torch.tensor([0.0, 0.1, 0.2, 0.9, 0.8, 0.0])            # ranks 12, 13, 11, 10
    attr = make_attribution(model, batch, torch.stack([good, bad]))
    # good: after 10 -> (2, 2) tie, argmax stays 0; after 10, 11 -> (0, 2) flips: 2/4
    # bad: removing 12, 13 only strengthens class 0; then 11 -> (2, 0); then 10 -> (0, 0) tie: argmax 0, never flips
    got = F.decision_flip_fraction(model, batch, attr)
    torch.testing.assert_close(got, torch.tensor([0.5, 1.0]))
    assert math.isnan(float(F.decision_flip_fraction(model, batch, attr, never=float("nan"))[1]))


def test_kendall_tau_b_matches_scipy():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (5, 9), generator=g).float()        # many ties
    y = torch.randn(5, 9, generator=g)
    y[1, :4] = 0.5                                               # ties in y too
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[2, 6:] = False
    got = F.kendall_tau_b(x, y, mask)
    for i in range(5):
        m = mask[i]
        want = kendalltau(x[i, m].numpy(), y[i, m].numpy()).statistic
        assert math.isclose(float(got[i]), want, abs_tol=1e-6)
    constant = F.kendall_tau_b(torch.ones(1, 4), torch.randn(1, 4), torch.ones(1, 4, dtype=torch.bool))
    assert math.isnan(float(constant[0]))


def test_tau_loo_uses_leave_one_out_from_the_engine(tiny_model, tiny_batch):
    engine = PerturbationEngine(tiny_model, tiny_batch)
    attr = random_attribution(tiny_model, tiny_batch)
    loo = F.leave_one_out(engine, tiny_batch, target=attr.target)                  # [batch, seq]
    i, j = 2, 3
    ids = tiny_batch.input_ids[i:i + 1].clone()
    ids[0, j] = tiny_model.mask_id
    with torch.no_grad():
        p = tiny_model.logits(ids, tiny_batch.attention_mask[i:i + 1]).softmax(-1)[0, attr.target[i]]
    assert math.isclose(float(loo[i, j]), float(attr.target_prob[i] - p), abs_tol=1e-5)
    before = engine.stats.forwards
    tau = F.tau_loo(engine, tiny_batch, attr)                                       # LOO reused: no new forward
    assert engine.stats.forwards == before
    m = attr.scored_mask[i]
    assert math.isclose(float(tau[i]), kendalltau(attr.scores[i, m], loo[i, m]).statistic, abs_tol=1e-6)



@pytest.mark.parametrize("policy", ["delete", "mask"])
def test_tau_loo_by_policy_against_a_hand_computation_and_named_in_the_table(tiny_model, tiny_batch, policy):
    """τ-LOO = Kendall τ_b(scores, p(target | x) − p(target | x with token j deleted / masked)): each input is
    built here by hand (the token cut out of the ids, or [MASK] in its place) and run through the model alone."""
    from attnaudit.analyses.tables import faithfulness_table

    attr = random_attribution(tiny_model, tiny_batch)
    table = faithfulness_table(tiny_model, tiny_batch, {"random": attr}, metrics=("tau_loo",), policy=policy)
    assert set(table["setting"]) == {f"policy={policy}"}
    for i in range(len(tiny_batch)):
        n = int(tiny_batch.attention_mask[i].sum())
        ids = tiny_batch.input_ids[i, :n]
        tokens = [j for j in range(n) if bool(attr.scored_mask[i, j])]
        if len(tokens) < 2:
            continue
        loo = []
        for j in tokens:
            edited = torch.cat([ids[:j], ids[j + 1:]]) if policy == "delete" else ids.clone().index_fill_(0, torch.tensor([j]), tiny_model.mask_id)
            with torch.no_grad():
                p = tiny_model.logits(edited[None], torch.ones(1, len(edited), dtype=torch.bool)).softmax(-1)[0, attr.target[i]]
            loo.append(float(attr.target_prob[i] - p))
        want = kendalltau(attr.scores[i, tokens].numpy(), np.array(loo)).statistic
        got = float(table.loc[table["example_id"] == tiny_batch.ids[i], "value"].iloc[0])
        assert (math.isnan(want) and math.isnan(got)) or abs(got - want) < 1e-5, (policy, i)

# -- ferret's preset ------------------------------------------------------------------------------
def ferret_by_hand(model, batch, attr, kind, only_pos=True):
    """ferret's AOPC_Comprehensiveness/Sufficiency_Evaluation.compute_evaluation, transcribed (ids, not text)."""
    out = []
    for i in range(len(batch)):
        n_real = int(batch.attention_mask[i].sum())
        input_ids = batch.input_ids[i, 1 : n_real - 1].tolist()                     # remove_first_last
        score = attr.scores[i, 1 : n_real - 1].numpy()
        forward = lambda x: float(model.logits(torch.tensor([[CLS, *x, SEP]]), torch.ones(1, len(x) + 2, dtype=torch.bool)
                                               ).softmax(-1)[0, attr.target[i]])  # noqa: B023, E731
        baseline = forward(input_ids)
        probs, last = [], None
        for v in np.arange(0.1, 1.1, 0.1):
            count = int(v * len(score))                                             # _get_id_tokens_percentage
            top = None
            if 0 < count <= len(score):
                if only_pos:
                    top = [j for j in np.array(score).argsort()[-count:][::-1] if score[j] > 0]
                else:
                    top = list(np.abs(np.array(score)).argsort()[-count:][::-1])
                top = top if top else None
            if top is not None and last is not None and set(top) == last:
                top = None
            if top is None:
                continue
            last = set(top)
            sample = np.array(copy.copy(input_ids))
            kept = np.delete(sample, top) if kind == "comprehensiveness" else sample[np.sort(top)]
            probs.append(forward(kept.tolist()))
        out.append(np.mean([baseline - p for p in probs]) if probs else (0.0 if kind == "comprehensiveness" else 1.0))
    return torch.tensor(out, dtype=torch.float)


def test_ferret_preset_reproduces_ferret_by_hand():
    model = BagOfWords({10: (3.0, 0.0), 11: (1.0, 0.5), 12: (0.0, 1.0), 13: (0.5, 0.0), 14: (0.2, 0.1)})
    rows = [[10, 11, 12, 13, 14, 12, 11], [13, 12], [10, 14, 11, 12, 13, 10, 11, 12, 14, 13, 12], [12, 11, 10]]
    batch = bow_batch(rows)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(batch.input_ids.shape, generator=g)                        # no ties, some negative
    scores[3] = -scores[3].abs()                                                    # no positive score at all
    attr = make_attribution(model, batch, scores)
    for kind in ("comprehensiveness", "sufficiency"):
        for only_pos in (True, False):
            want = ferret_by_hand(model, batch, attr, kind, only_pos)
            got = F.ferret_aopc(model, batch, attr, kind=kind, only_pos=only_pos)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert float(F.ferret_aopc(model, batch, attr)[3]) == 0.0                       # ferret's value without rationale
    assert float(F.ferret_aopc(model, batch, attr, kind="sufficiency")[3]) == 1.0


def test_ferret_rationales_skip_repeats_and_empty_thresholds():
    model = BagOfWords({})
    batch = bow_batch([[10, 11, 12]])
    attr = make_attribution(model, batch, torch.tensor([[0.0, 0.5, -1.0, 0.2, 0.0]]))
    rationale, used = F.ferret_rationales(attr)
    counts = [int(v * 3) for v in np.arange(0.1, 1.1, 0.1)]                       # 0,0,0,1,1,1,2,2,2,3
    assert counts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    # k=0.4 -> {10}; k=0.7 -> {10, 12}; k=1.0 -> top-3 has 11 (negative) dropped -> {10, 12}: a repeat
    assert used[0].tolist() == [False, False, False, True, False, False, True, False, False, False]


# -- oracle explanations on a trained model -----------------------------------------------------
@pytest.fixture(scope="module")
def needle():
    """A model trained for a few seconds on `needle` (the label is the one needle word), and 120 test examples."""
    try:
        from attnaudit.data.tasks import make_examples
        from attnaudit.model.train import defaults_for, train_task
    except ImportError:            # the bag-of-words oracle test below still runs: its model provably reads one token
        pytest.skip("attnaudit.model.train is not importable")
    settings = defaults_for("needle").replace(n_train=1500, n_valid=200, n_test=200, epochs=4, d_model=32,
                                              n_heads=2, d_ff=64, warmup=100)
    model, metrics = train_task("needle", settings, device="cpu", progress=False)
    assert metrics["valid_accuracy"] > 0.9
    batch = model.encode(make_examples("needle", "test", n=120, seed=1))
    return model, batch


@pytest.mark.slow
def test_oracle_beats_random_and_inverse_oracle_loses(needle):
    model, batch = needle
    engine = PerturbationEngine(model, batch)
    oracle = make_attribution(model, batch, batch.rationale, method="oracle")
    inverse = make_attribution(model, batch, -batch.rationale, method="inverse")
    rand = random_attribution(model, batch, seed=0)
    comp = {a.method: F.aopc_comprehensiveness(engine, batch, a).mean() for a in (oracle, rand, inverse)}
    suff = {a.method: F.aopc_sufficiency(engine, batch, a).mean() for a in (oracle, rand, inverse)}
    assert comp["oracle"] > comp["random"] + 0.1 > comp["inverse"] + 0.1
    assert suff["oracle"] + 0.1 < suff["random"] < suff["inverse"] - 0.1
    assert F.deletion_auc(engine, batch, oracle).mean() < F.deletion_auc(engine, batch, rand).mean()
    assert F.insertion_auc(engine, batch, oracle).mean() > F.insertion_auc(engine, batch, rand).mean()


def test_oracle_on_a_model_that_provably_reads_one_token():
    # class 1 iff token 20 is present; every policy removes it the same way
    model = BagOfWords({20: (0.0, 6.0)})
    batch = bow_batch([[11, 12, 20, 13], [20, 14, 15, 16, 17, 18]])
    oracle = make_attribution(model, batch, (batch.input_ids == 20).float(), method="oracle")
    inverse = make_attribution(model, batch, -(batch.input_ids == 20).float(), method="inverse")
    p = 1 / (1 + math.exp(-6.0))
    for policy in ("mask", "attention", "delete"):
        torch.testing.assert_close(F.comprehensiveness(model, batch, oracle, k=0.01, policy=policy),
                                   torch.full((2,), p - 0.5))
        torch.testing.assert_close(F.sufficiency(model, batch, oracle, k=0.01, policy=policy), torch.zeros(2))
        torch.testing.assert_close(F.comprehensiveness(model, batch, inverse, k=0.5, policy=policy), torch.zeros(2))


# -- captum metrics -----------------------------------------------------------------------------
class GradTimesInput(Explainer):
    """Σ_d x·∂p/∂x through the model interface: the first-order ideal of the gated infidelity."""

    name = "grad_times_input_test"
    family = "gradient"

    def scores(self, model, batch, target):
        embeds = model.embed(batch.input_ids).detach().requires_grad_(True)          # [batch, seq, d_model]
        probs = model.logits_from_embeds(embeds, batch.attention_mask).float().softmax(-1)
        grad, = torch.autograd.grad(probs.gather(1, target[:, None].to(probs.device)).sum(), embeds)
        return (grad * embeds).sum(-1)                                              # [batch, seq]


def test_infidelity_prefers_gradient_times_input(tiny_model, tiny_batch):
    ixg = GradTimesInput().explain(tiny_model, tiny_batch)
    rand = random_attribution(tiny_model, tiny_batch)
    good = F.infidelity(tiny_model, tiny_batch, ixg, noise_std=0.05, n_perturb_samples=30)
    bad = F.infidelity(tiny_model, tiny_batch, rand, noise_std=0.05, n_perturb_samples=30)
    assert good.shape == (4,) and torch.isfinite(good).all()
    assert good.mean() < bad.mean()
    again = F.infidelity(tiny_model, tiny_batch, ixg, noise_std=0.05, n_perturb_samples=30)
    torch.testing.assert_close(good, again)                                        # seeded


def test_sensitivity_max_runs_gradient_explainers_and_refuses_others(tiny_model, tiny_batch):
    ixg = GradTimesInput().explain(tiny_model, tiny_batch)
    sens = F.sensitivity_max(tiny_model, tiny_batch, ixg, explainer=GradTimesInput(), n_perturb_samples=3)
    assert sens.shape == (4,) and torch.isfinite(sens).all() and (sens > 0).all()
    small = F.sensitivity_max(tiny_model, tiny_batch, ixg, explainer=GradTimesInput(), n_perturb_samples=3,
                              perturb_radius=1e-4)
    assert (small < sens).all()                                                     # less noise, smaller change
    with pytest.raises(F.MetricNotApplicable, match="gradient explainers only"):
        F.sensitivity_max(tiny_model, tiny_batch, random_attribution(tiny_model, tiny_batch), explainer=_Attention())
    with pytest.raises(F.MetricNotApplicable, match="not in the registry"):
        F.sensitivity_max(tiny_model, tiny_batch, random_attribution(tiny_model, tiny_batch, method="no_such"))


class _Attention(Explainer):
    name = "attention_test"
    family = "attention"
