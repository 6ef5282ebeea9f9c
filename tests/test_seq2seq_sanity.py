"""The encoder–decoder's randomisation check: cascading order, per-unit Spearman by hand, the rows in the audit."""
from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import spearmanr
from test_seq2seq_attention_family import EXAMPLES, HF_EXAMPLES, tiny_translator

from attnaudit.analyses.sanity import METRIC, reinitialize
from attnaudit.analyses.seq2seq import audit_translator, prepare
from attnaudit.analyses.seq2seq_sanity import translator_randomization, unit_similarity
from attnaudit.explain.seq2seq import translator_scores

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _covered(model) -> None:
    """Every parameter of the net is re-initialised at exactly one step, and the head comes first."""
    steps = model.cascading_layers()
    seen = [id(p) for _, modules in steps for m in modules for p in m.parameters()]
    assert set(seen) == {id(p) for p in model.net.parameters()}
    assert steps[0][0] == "head" and steps[-1][0] == "embeddings"
    names = [n for n, _ in steps]
    assert names.index("decoder.layers.0") < names.index(f"encoder.layers.{model.n_layers - 1}")


def test_cascading_layers_cover_the_builtin_translator_output_first():
    _covered(tiny_translator(2))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bart", "t5", "marian"])
def test_cascading_layers_cover_each_hf_encoder_decoder(tmp_path, arch):
    pytest.importorskip("transformers")
    from test_hf_seq2seq import write_folder

    from attnaudit.model.hf_seq2seq import load_hf_seq2seq
    model = load_hf_seq2seq(write_folder(tmp_path, arch))
    _covered(model)
    pairs, units = prepare(model, HF_EXAMPLES)
    rows = translator_randomization(model, pairs, units, ["attention", "saliency"], ids=[e.id for e in HF_EXAMPLES])
    first = [r for r in rows if r[3] == "step=0:original"]
    assert all(r[4] == pytest.approx(1.0) for r in first)              # the untouched copy explains the same


def test_rows_are_per_example_means_of_hand_spearman_at_every_step():
    model = tiny_translator(2)
    pairs, units = prepare(model, EXAMPLES)
    ids = [e.id for e in EXAMPLES]
    rows = translator_randomization(model, pairs, units, ["attention", "saliency", "random"], ids=ids, seed=3)
    original = translator_scores(model, pairs, ["attention", "saliency", "random"], seed=3)
    by_hand = copy.deepcopy(model)                                   # the same cascade, written out
    scored = pairs.src.attention_mask & ~pairs.src.special_mask
    steps = by_hand.cascading_layers()
    for k in range(len(steps) + 1):
        if k:
            reinitialize(steps[k - 1][1], seed=3 + k)
        now = translator_scores(by_hand, pairs, ["attention", "saliency", "random"], seed=3)
        setting = "step=0:original" if k == 0 else f"step={k}:{steps[k - 1][0]}"
        for name in ("attention", "saliency", "random"):
            for i, ex in enumerate(ids):
                rhos = []
                for u in (units.src == i).nonzero()[:, 0].tolist():
                    keep = scored[i]
                    a = original[name][i, units.tgt[u], keep].numpy()
                    b = now[name][i, units.tgt[u], keep].numpy()
                    rhos.append(float("nan") if len(a) < 2 else 1.0 if a.std() == 0 and b.std() == 0
                                else 0.0 if a.std() == 0 or b.std() == 0 else spearmanr(a, b).statistic)
                want = [r for r in rhos if r == r]
                got = [r for r in rows if r[:4] == (ex, name, METRIC, setting)]
                assert len(got) == 1
                if want:
                    assert got[0][4] == pytest.approx(sum(want) / len(want), abs=1e-9)
                else:                                              # example "2" has one source word
                    assert got[0][4] != got[0][4] and got[0][5] == "fewer than 2 scored source tokens"
    assert {r[3] for r in rows} == {"step=0:original", *(f"step={k}:{n}" for k, (n, _) in enumerate(steps, 1))}
    # the random control does not depend on the weights: similarity 1 at every step; the model is untouched
    assert all(r[4] == pytest.approx(1.0) for r in rows if r[1] == "random" and r[0] != "2")
    assert torch.equal(translator_scores(model, pairs, ["attention"])["attention"], original["attention"])


def test_unit_similarity_constant_and_short_rules():
    ref = torch.tensor([[[1.0, 2.0, 3.0, 0.0]], [[5.0, 5.0, 5.0, 0.0]]])          # [batch=2, tgt=1, src=4]
    other = torch.tensor([[[3.0, 2.0, 1.0, 0.0]], [[5.0, 5.0, 5.0, 0.0]]])
    scored = torch.tensor([[True, True, True, False], [True, True, True, False]])
    sim = unit_similarity(ref, other, torch.tensor([0, 1]), torch.tensor([0, 0]), scored)
    assert sim.tolist() == [-1.0, 1.0]
    one = unit_similarity(ref, other, torch.tensor([0]), torch.tensor([0]), torch.tensor([[True, False, False, False]]))
    assert torch.isnan(one).all()                                   # one scored token: nothing to rank


@pytest.mark.slow
def test_the_audit_adds_randomisation_rows_that_the_verdict_reads():
    from attnaudit.analyses.verdict import derive_verdict
    model = tiny_translator(1)
    out = audit_translator(model, EXAMPLES, explainers=("attention", "saliency", "random"), n_permutations=2,
                           tests=("uniform",), sanity_examples=2)
    m = out["metrics"]
    sanity = m[m.metric == METRIC]
    assert set(sanity["example_id"]) == {"0", "1"} and set(sanity["explainer"]) == {"attention", "saliency", "random"}
    v = derive_verdict(m[m.explainer != "model"], task="t", counterfactual=out["counterfactual"]["summary"])
    assert {r["explainer"] for r in v.randomization} >= {"attention", "saliency"}
    none = audit_translator(model, EXAMPLES, explainers=("attention",), n_permutations=2, tests=("uniform",),
                            sanity_examples=0)
    assert not (none["metrics"].metric == METRIC).any()
