"""Explainers are scikit-learn-style: `type(e)(**e.get_params())` rebuilds e; and top-k has one definition.

Every registered explainer is rebuilt from its parameters, at the defaults and with each parameter set to
something else, and must report the same parameters again (constructors store their arguments verbatim).
`Attribution.top_k` and the perturbation plans' `top_k_mask` must select the same tokens, ties included.
"""
from __future__ import annotations

import inspect
from functools import partial

import captum.attr
import pytest
import torch

from attnaudit.explain import CaptumExplainer, get_explainer, list_explainers
from attnaudit.explain.attribution import Attribution
from attnaudit.explain.base import Explainer
from attnaudit.explain.perturb import keep_top_k, rank_positions, rationale_counts, remove_top_k, top_k_mask


# -- get_params round trip --------------------------------------------------------------------------
def clone(e: Explainer) -> Explainer:
    return type(e)(**e.get_params())


def check_round_trip(e: Explainer) -> None:
    params = e.get_params()
    again = clone(e)
    assert type(again) is type(e)
    assert again.get_params() == params, (type(e).__name__, params, again.get_params())
    assert repr(again) == repr(e)


def constructor_params(cls: type) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {n: p for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def other_value(value):
    """A plausible value different from `value` (constructors store it without validating)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.125
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, tuple):
        return value[:1] if len(value) > 1 else (*value, *value)
    return 3 if value is None else None


def check_clonable(make) -> None:
    """`make(**params)` builds an explainer: at its defaults and with each parameter changed, every argument is
    reported by get_params, verbatim (the very object), and `type(e)(**e.get_params())` reports the same again."""
    e = make()
    params = constructor_params(type(e))
    assert set(e.get_params()) == set(params), "get_params reports every constructor argument, and only those"
    check_round_trip(e)
    for param, p in params.items():
        changed = other_value(p.default)
        assert changed != p.default
        e = make(**{param: changed})
        assert e.get_params()[param] is changed, (type(e).__name__, param)
        check_round_trip(e)


@pytest.mark.parametrize("name", list_explainers())
def test_every_registered_explainer_round_trips(name):
    check_clonable(lambda **params: get_explainer(name, **params))


def test_captum_explainer_round_trips_with_attribute_keywords():
    old_style = CaptumExplainer(captum.attr.IntegratedGradients, name="ig8", baseline="mask", n_steps=8)
    assert old_style.get_params()["attribute_kwargs"] == {"n_steps": 8}
    check_round_trip(old_style)
    explicit = CaptumExplainer(captum.attr.IntegratedGradients, name="ig8", baseline="mask",
                               attribute_kwargs={"n_steps": 8})
    assert explicit.get_params() == old_style.get_params()
    assert explicit.captum_kwargs() == old_style.captum_kwargs() == {"n_steps": 8}
    generic = CaptumExplainer(captum.attr.InputXGradient)
    check_round_trip(generic)
    assert generic.get_params()["attribute_kwargs"] == {} and clone(generic).name == "captum_input_x_gradient"


class RenamesItsParameter(Explainer):
    name = "broken_rename"

    def __init__(self, *, alpha: float = 1.0):
        self.weight = alpha                     # stored under another name: get_params cannot report it


class SwallowsKeywords(Explainer):
    name = "broken_kwargs"

    def __init__(self, *, alpha: float = 1.0, **options):
        self.alpha = alpha
        self.options = options                  # reported as options={...}, which the constructor nests again


class ChangesItsParameter(Explainer):
    name = "broken_change"

    def __init__(self, *, alpha: tuple = (1, 2)):
        self.alpha = list(alpha)                # not verbatim: a tuple comes back as a list


@pytest.mark.parametrize("make", [RenamesItsParameter, ChangesItsParameter, partial(SwallowsKeywords, n_steps=3)])
def test_the_check_catches_a_broken_explainer(make):
    with pytest.raises(AssertionError):
        check_clonable(make)


def test_keywords_kept_under_the_catch_alls_name_break_the_round_trip():
    with pytest.raises(AssertionError):                # the former CaptumExplainer(**attribute_kwargs)
        check_round_trip(SwallowsKeywords(n_steps=3))


# -- one top-k --------------------------------------------------------------------------------------
def tied_attribution(seed: int) -> Attribution:
    """Random examples with padding, [CLS]/[SEP] at both ends and scores drawn from a few values (many ties)."""
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 6, (1,), generator=g))
    lengths = torch.randint(2, 14, (b,), generator=g)                             # >= 2: [CLS] and [SEP]
    seq = int(lengths.max()) + int(torch.randint(0, 3, (1,), generator=g))
    mask = torch.arange(seq)[None, :] < lengths[:, None]                            # [batch, seq]
    special = torch.zeros(b, seq, dtype=torch.bool)
    special[:, 0] = True
    special[torch.arange(b), lengths - 1] = True
    levels = torch.tensor([-1.0, 0.0, 0.0, 0.25, 0.5, 0.5, 1.0])
    scores = levels[torch.randint(0, len(levels), (b, seq), generator=g)] * mask     # [batch, seq], ties
    return Attribution(scores=scores, input_ids=torch.arange(b * seq).view(b, seq), attention_mask=mask,
                       special_mask=special, tokens=[["t"] * seq for _ in range(b)], target=torch.zeros(b).long(),
                       target_prob=torch.full((b,), 0.5), method="test", params={})


def reference_top_k(attr: Attribution, k: int | float, rounding: str = "ceil") -> torch.Tensor:
    """The two former definitions, written out independently: counts, then the stable ranking by score."""
    n = attr.lengths()
    if isinstance(k, float):
        counts = torch.ceil(k * n.double() - 1e-9).long() if rounding == "ceil" else torch.floor(k * n.double()).long()
    else:
        counts = torch.minimum(torch.full_like(n, k), n)
    key = attr.scores.float().masked_fill(~attr.scored_mask, float("-inf"))
    out = torch.zeros_like(attr.attention_mask)
    for i in range(len(attr)):
        order = sorted(range(key.shape[1]), key=lambda j: (-float(key[i, j]), j))   # ties: the earlier position
        for j in order[: int(counts[i])]:
            out[i, j] = bool(attr.scored_mask[i, j])
    return out


FRACTIONS = [0.0, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.7, 0.999, 1.0]


@pytest.mark.parametrize("seed", range(12))
def test_top_k_and_top_k_mask_agree_with_ties(seed):
    attr = tied_attribution(seed)
    for k in FRACTIONS:
        for rounding in ("ceil", "floor"):
            want = reference_top_k(attr, k, rounding)
            assert torch.equal(attr.top_k(k, rounding=rounding), want), (seed, k, rounding)
            assert torch.equal(top_k_mask(attr, k, rounding=rounding), want), (seed, k, rounding)
            assert torch.equal(rationale_counts(attr, k, rounding=rounding), attr.top_k_counts(k, rounding=rounding))
            positive = top_k_mask(attr, k, only_pos=True, rounding=rounding)
            assert torch.equal(positive, want & (attr.scores > 0))
            assert torch.equal(remove_top_k(attr, k, rounding=rounding), attr.attention_mask & ~want)
            assert torch.equal(keep_top_k(attr, k, rounding=rounding), (attr.special_mask & attr.attention_mask) | want)
    for k in range(0, 15):                                                          # an int k is a count
        assert torch.equal(attr.top_k(k), reference_top_k(attr, k))
    assert torch.equal(top_k_mask(attr, 1), attr.top_k(1.0))                        # ... but a fraction for top_k_mask
    assert torch.equal(rank_positions(attr), attr.ranks())


def test_fraction_rounding_is_robust_to_float_error():
    seq = 27                                                                        # [CLS], 25 words, [SEP]
    special = torch.zeros(1, seq, dtype=torch.bool)
    special[0, [0, seq - 1]] = True
    attr = Attribution(scores=torch.rand(1, seq), input_ids=torch.zeros(1, seq).long(),
                       attention_mask=torch.ones(1, seq, dtype=torch.bool), special_mask=special,
                       tokens=[["t"] * seq], target=torch.zeros(1).long(), target_prob=torch.ones(1), method="test",
                       params={})
    assert 0.28 * 25 > 7                                                            # 7.000000000000001
    assert attr.top_k_counts(0.28).tolist() == rationale_counts(attr, 0.28).tolist() == [7]
    assert attr.top_k_counts(0.28, rounding="floor").tolist() == [7]
    assert int(attr.top_k(0.28).sum()) == int(top_k_mask(attr, 0.28).sum()) == 7


@pytest.mark.parametrize("k, message", [(1.5, "k as a fraction must be in"), (-1, "k must be an int >= 0"),
                                        ("2", "k must be an int >= 0")])
def test_top_k_refuses_a_bad_k(k, message):
    with pytest.raises(ValueError, match=message):
        tied_attribution(0).top_k(k)


def test_top_k_mask_refuses_what_is_not_a_fraction():
    attr = tied_attribution(0)
    for k in (True, 1.5, -0.1, float("nan"), "0.2"):
        with pytest.raises(ValueError, match=r"k must be a fraction of the scored tokens in \[0, 1\]"):
            top_k_mask(attr, k)
    with pytest.raises(ValueError, match="rounding must be 'ceil' or 'floor'; got 'round'"):
        top_k_mask(attr, 0.2, rounding="round")
