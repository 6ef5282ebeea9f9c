"""Built-in tasks: deterministic by seed, and the gold evidence is exactly what decides the answer.

Each check recomputes label and rationale from the words alone, with the exported lexicons.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from attnaudit.data.tasks import (
    ADJECTIVES,
    FILLERS,
    LEXICON,
    NEEDLES,
    NEGATIVE,
    NEGATOR,
    NOUNS,
    POSITIVE,
    TASK_NAMES,
    VERBS,
    Task,
    get_task,
    make_examples,
)

N = 600  # per task and split: enough to hit every branch, fast enough for the whole file to run in ~1 s


def _keywords_answer(words: list[str]) -> tuple[set[int], tuple[int, ...]]:
    """(effective polarities of the polar words, rationale), parsed independently of the generator."""
    polarities, rationale = set(), [0] * len(words)
    for i, w in enumerate(words):
        if w in POSITIVE or w in NEGATIVE:
            polarity = int(w in POSITIVE)
            rationale[i] = 1
            if i > 0 and words[i - 1] == NEGATOR:
                polarity, rationale[i - 1] = 1 - polarity, 1
            polarities.add(polarity)
    return polarities, tuple(rationale)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_examples_other_seed_or_split_differs(name):
    a = make_examples(name, "train", n=50, seed=3)
    assert a == make_examples(get_task(name), "train", n=50, seed=3)
    assert [e.text for e in a] != [e.text for e in make_examples(name, "train", n=50, seed=4)]
    assert [e.text for e in a] != [e.text for e in make_examples(name, "test", n=50, seed=3)]
    assert make_examples(name, "train", n=10, seed=3) == a[:10]   # n only truncates the stream


def test_same_examples_in_a_fresh_process():
    code = ("from attnaudit.data.tasks import make_examples as m; "
            "print([e.text for e in m('keywords', 'valid', n=5, seed=1)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([e.text for e in make_examples("keywords", "valid", n=5, seed=1)])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_ids_and_default_sizes(name):
    task = get_task(name)
    assert set(task.sizes) == {"train", "valid", "test"}
    examples = make_examples(name, "test", n=20)
    assert examples[17].id == f"{name}-test-000017"
    assert len({e.id for e in examples}) == 20
    assert len(make_examples(name, "valid")) == task.sizes["valid"]


def test_keywords_rationale_is_exactly_the_polar_words_and_their_negators():
    examples = make_examples("keywords", "train", n=N)
    n_negated = n_distractor = 0
    for ex in examples:
        words = ex.text.split()
        polarities, rationale = _keywords_answer(words)
        assert polarities == {ex.label}, ex            # all planted words agree, and that is the label
        assert ex.rationale == rationale, ex
        assert 8 <= len(words) <= 20 and 1 <= sum(w in POSITIVE or w in NEGATIVE for w in words) <= 2
        assert set(words) <= set(FILLERS) | set(POSITIVE) | set(NEGATIVE) | {NEGATOR}
        n_negated += any(r and w == NEGATOR for w, r in zip(words, rationale))
        n_distractor += any(w == NEGATOR and not r for w, r in zip(words, rationale))
    assert 0.4 < n_negated / N < 0.6
    assert 0.1 < n_distractor / N < 0.3
    assert 0.4 < sum(e.label for e in examples) / N < 0.6


def test_needle_has_exactly_one_needle_marked():
    examples = make_examples("needle", "train", n=N)
    for ex in examples:
        words = ex.text.split()
        at = [i for i, w in enumerate(words) if w in NEEDLES]
        assert len(at) == 1 and words[at[0]] == NEEDLES[ex.label]
        assert ex.rationale == tuple(int(i == at[0]) for i in range(len(words)))
        assert 9 <= len(words) <= 21 and set(words) - {NEEDLES[ex.label]} <= set(FILLERS)
    counts = [sum(e.label == k for e in examples) for k in range(len(NEEDLES))]
    assert min(counts) > N / 4 * 0.7
    assert {ex.rationale.index(1) == 0 for ex in examples} == {True, False}   # first slot is reachable


def test_majority_counts_differ_and_every_colour_is_marked():
    examples = make_examples("majority", "train", n=N)
    assert get_task("majority").label_names == ("blue", "red")
    for ex in examples:
        words = ex.text.split()
        n_red, n_blue = words.count("red"), words.count("blue")
        assert 1 <= n_red <= 6 and 1 <= n_blue <= 6 and n_red != n_blue
        assert ex.label == int(n_red > n_blue)
        assert ex.rationale == tuple(int(w in ("red", "blue")) for w in words)
        assert 10 <= len(words) <= 24
    assert 0.4 < sum(e.label for e in examples) / N < 0.6


def test_reorder_lexicon_is_one_to_one_and_disjoint_from_the_source():
    assert len(LEXICON) == len(NOUNS) + len(ADJECTIVES) + len(VERBS)
    assert len(set(LEXICON.values())) == len(LEXICON)
    assert not set(LEXICON) & set(LEXICON.values())


def test_reorder_alignment_reproduces_the_target():
    examples = make_examples("reorder", "train", n=N)
    for ex in examples:
        src, tgt = ex.text.split(), ex.target.split()
        assert ex.label is None and ex.rationale is None and 3 <= len(src) <= 5
        assert sorted(s for s, _ in ex.alignment) == list(range(len(src)))   # a bijection
        assert sorted(t for _, t in ex.alignment) == list(range(len(tgt)))
        rebuilt = [""] * len(tgt)
        for s, t in ex.alignment:
            rebuilt[t] = LEXICON[src[s]]
        assert rebuilt == tgt
        for i, w in enumerate(src):                        # French order: adjective after its noun
            if w in ADJECTIVES:
                assert tgt[dict(ex.alignment)[i] - 1] == NOUNS[src[i + 1]]
    assert {len(e.text.split()) for e in examples} == {3, 4, 5}


def test_reorder_hand_example():
    ex = next(e for e in make_examples("reorder", "test", n=200) if len(e.text.split()) == 5)
    adj1, noun1, verb, adj2, noun2 = ex.text.split()
    expected = [NOUNS[noun1], ADJECTIVES[adj1], VERBS[verb], NOUNS[noun2], ADJECTIVES[adj2]]
    assert ex.target == " ".join(expected)
    assert ex.alignment == ((0, 1), (1, 0), (2, 2), (3, 4), (4, 3))


def test_unknown_task_lists_the_names():
    expected = r"Unknown task 'x'\. Available: copy, keywords, majority, needle, recall, reorder \(next-token LM tasks: copy, recall\)\."
    with pytest.raises(ValueError, match=expected):
        get_task("x")


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "dev"}, r"split must be one of train, valid, test; got 'dev'"),
    ({"split": "test", "n": 0}, r"n must be a positive int .*got 0"),
    ({"split": "test", "n": 2.5}, r"n must be a positive int .*got 2\.5"),
    ({"split": "test", "seed": "a"}, r"seed must be an int; got 'a'"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_examples("needle", **kwargs)


def test_task_without_generator_is_refused():
    with pytest.raises(ValueError, match=r"No generator for task 'mine'"):
        make_examples(Task("mine", "classification", ("a", "b"), {"test": 1}, ""), "test")
