"""Built-in tasks whose evidence is known by construction, so explanations can be scored against it.

Each task plants the words that decide the answer among neutral fillers and records them: a 0/1
`rationale` per word for classification (in the spirit of ERASER's human rationales, DeYoung et al.
2020, but exact), or word `alignment`s for the toy translation task. The next-token tasks (kind "lm",
`LM_TASK_NAMES`: `recall`, `copy`) give the prompt as `text`, the continuation as `target`, and the
evidence as a `rationale` over the prompt words (`copy` adds the per-step `alignment`). Everything is
generated from a seed, offline:

    >>> ex = make_examples("needle", "test", n=2, seed=0)[0]
    >>> ex.id, len(ex.rationale) == len(ex.text.split()), sum(ex.rationale)
    ('needle-test-000000', True, 1)
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from attnaudit.data.examples import Example

# Neutral words shared by the classification tasks; none of them decides anything.
FILLERS = (
    "the", "movie", "was", "a", "story", "with", "and", "plot", "film", "of",
    "it", "this", "in", "to", "scene", "actor", "cast", "about", "that", "is",
    "on", "for", "an", "script", "ending", "music", "characters", "director", "some", "time",
    "at", "its", "by", "there", "as", "camera", "we", "then", "from", "night",
)
POSITIVE = ("good", "great", "excellent", "wonderful", "brilliant",
            "superb", "delightful", "charming", "enjoyable", "fantastic")
NEGATIVE = ("bad", "awful", "boring", "terrible", "dull",
            "poor", "dreadful", "tedious", "weak", "horrible")
NEGATOR = "not"
NEEDLES = ("apple", "river", "stone", "cloud")
MAJORITY_WORDS = ("blue", "red")  # label index = position here: 1 means "red" occurs more often

# reorder: English -> pseudo-French, one-to-one; no target word is also a source word.
NOUNS = {
    "cat": "chat", "dog": "chien", "bird": "oiseau", "horse": "cheval", "fish": "poisson",
    "mouse": "souris", "child": "enfant", "woman": "femme", "man": "homme", "teacher": "professeur",
    "doctor": "medecin", "farmer": "fermier", "king": "roi", "queen": "reine", "friend": "ami",
    "baker": "boulanger", "sailor": "marin", "wolf": "loup", "fox": "renard", "bear": "ours",
}
ADJECTIVES = {
    "red": "rouge", "green": "vert", "blue": "bleu", "black": "noir", "white": "blanc",
    "happy": "heureux", "sad": "triste", "tired": "fatigue", "hungry": "affame", "clever": "malin",
}
VERBS = {
    "sees": "voit", "likes": "aime", "follows": "suit", "finds": "trouve",
    "hears": "entend", "helps": "aide", "watches": "regarde", "calls": "appelle",
}
LEXICON = {**NOUNS, **ADJECTIVES, **VERBS}

SPLITS = ("train", "valid", "test")
# Decoder-only next-token tasks (kind "lm"): a decoder-only LM explains each target token
LM_TASK_NAMES = ("recall", "copy")
TASK_NAMES = ("keywords", "needle", "majority", "reorder", *LM_TASK_NAMES)

# recall: distinct keys, each followed by its value; "?" then the queried key; the answer is its value.
RECALL_KEYS = tuple("abcdefghijklmnop")
RECALL_VALUES = tuple("0123456789")
RECALL_QUERY = "?"
RECALL_PAIRS = (2, 6)               # number of key-value pairs, inclusive
# copy: distinct symbols, "=", then the same symbols again as the target.
COPY_SYMBOLS = ("ka", "ki", "ku", "ke", "ko", "sa", "si", "su", "se", "so",
                "ta", "ti", "tu", "te", "to", "na")
COPY_SEPARATOR = "="
COPY_LENGTH = (3, 6)                # source length, inclusive


@dataclass(frozen=True)
class Task:
    """A built-in task: what it asks, its classes and its default split sizes."""

    name: str
    kind: str                        # "classification" | "seq2seq" | "lm" (decoder-only next tokens)
    label_names: tuple[str, ...]     # () for seq2seq and lm
    sizes: dict = field(default_factory=dict)  # split -> default number of examples
    description: str = ""


_CLASSIFICATION_SIZES = {"train": 8000, "valid": 1000, "test": 1000}

_TASKS = {
    "keywords": Task(
        "keywords", "classification", ("negative", "positive"), dict(_CLASSIFICATION_SIZES),
        "Sentiment from 1-2 planted polar words among fillers; 'not' right before a polar word flips "
        "it. Evidence: the polar words and their negators (a 'not' before a filler decides nothing).",
    ),
    "needle": Task(
        "needle", "classification", NEEDLES, dict(_CLASSIFICATION_SIZES),
        "Which of four needle words is hidden at a random position among 8-20 fillers. "
        "Evidence: the needle alone.",
    ),
    "majority": Task(
        "majority", "classification", MAJORITY_WORDS, dict(_CLASSIFICATION_SIZES),
        "Does 'red' or 'blue' occur more often (1-6 times each, never tied)? "
        "Evidence: every 'red' and 'blue'.",
    ),
    "reorder": Task(
        "reorder", "seq2seq", (), {"train": 16000, "valid": 1000, "test": 1000},
        "Word-by-word toy translation of '[adj] noun verb [adj] noun' into pseudo-French, where "
        "adjectives follow their noun. Evidence: the one-to-one word alignment.",
    ),
    "recall": Task(
        "recall", "lm", (), {"train": 8000, "valid": 500, "test": 1000},
        "Associative recall: 2-6 pairs 'key value' (distinct keys a-p, values 0-9), then '?' and one of the "
        "keys; the next token is its value. Evidence: the queried key's occurrence in the pairs, its value, "
        "and the query key after '?'.",
    ),
    "copy": Task(
        "copy", "lm", (), {"train": 8000, "valid": 500, "test": 1000},
        "Copy: 3-6 distinct symbols, '=', then the same symbols again as the target. Evidence for target "
        "step s: source symbol s (Example.alignment pairs (s, s)); the rationale is their union.",
    ),
}


def get_task(name: str) -> Task:
    """The built-in task called `name` (one of TASK_NAMES or LM_TASK_NAMES)."""
    if name not in _TASKS:
        raise ValueError(f"Unknown task {name!r}. Available: {', '.join(sorted(TASK_NAMES))} (next-token LM tasks: "
                         f"{', '.join(sorted(LM_TASK_NAMES))}).")
    return _TASKS[name]


def make_examples(task: str | Task, split: str, *, n: int | None = None, seed: int = 0) -> list[Example]:
    """Generate `n` examples of a built-in task, identical for the same (task, split, seed).

    Args:
        task: a name from TASK_NAMES or a Task from get_task.
        split: "train", "valid" or "test"; each split draws from its own random stream.
        n: number of examples; None uses task.sizes[split].
        seed: any int; the stream is seeded by the string "task:split:seed" (stable across processes).
    Returns:
        Examples with ids like "keywords-test-000017".
    """
    task = get_task(task) if isinstance(task, str) else task
    if not isinstance(task, Task):
        raise TypeError(f"task must be a task name or a Task; got {type(task).__name__}. "
                        f"Available names: {', '.join(TASK_NAMES)}.")
    if task.name not in _GENERATORS:
        raise ValueError(f"No generator for task {task.name!r}. Available: {', '.join(sorted(_GENERATORS))}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}.")
    if n is None:
        n = task.sizes[split]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (or None for the default {task.sizes[split]}); "
                         f"got {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}.")
    # A str seed is hashed with SHA-512 by random.Random, not with the per-process salted hash().
    rng = random.Random(f"{task.name}:{split}:{seed}")
    make_one = _GENERATORS[task.name]
    return [make_one(rng, f"{task.name}-{split}-{i:06d}") for i in range(n)]


def _flatten_shuffled(rng: random.Random, units: list[list[tuple[str, int]]], n_fill: int):
    """Scatter multi-word units among `n_fill` fillers (units stay contiguous) -> (words, rationale)."""
    units = units + [[(w, 0)] for w in rng.choices(FILLERS, k=n_fill)]
    rng.shuffle(units)
    pairs = [p for unit in units for p in unit]
    return " ".join(w for w, _ in pairs), tuple(r for _, r in pairs)


def _keywords(rng: random.Random, id: str) -> Example:
    label = rng.randrange(2)                      # 1 = positive
    n_polar = rng.randint(1, 2)
    negated = [False] * n_polar
    if rng.random() < 0.5:                        # half the examples negate at least one polar word
        negated = [rng.random() < 0.5 for _ in range(n_polar)]
        negated[rng.randrange(n_polar)] = True
    units = []
    for neg in negated:
        # a negated word must carry the opposite lexical polarity to end up with the label's
        positive_word = (label == 1) != neg
        word = rng.choice(POSITIVE if positive_word else NEGATIVE)
        units.append([(NEGATOR, 1), (word, 1)] if neg else [(word, 1)])
    if rng.random() < 0.2:                        # distractor: "not" before a filler decides nothing
        units.append([(NEGATOR, 0), (rng.choice(FILLERS), 0)])
    n_words = rng.randint(8, 20)
    text, rationale = _flatten_shuffled(rng, units, n_words - sum(len(u) for u in units))
    return Example(id, text, label=label, rationale=rationale)


def _needle(rng: random.Random, id: str) -> Example:
    label = rng.randrange(len(NEEDLES))
    words = rng.choices(FILLERS, k=rng.randint(8, 20))
    at = rng.randint(0, len(words))               # uniform over all len+1 slots
    words.insert(at, NEEDLES[label])
    rationale = tuple(int(i == at) for i in range(len(words)))
    return Example(id, " ".join(words), label=label, rationale=rationale)


def _majority(rng: random.Random, id: str) -> Example:
    label = rng.randrange(2)                      # 1 = "red" occurs more often
    more = rng.randint(2, 6)
    less = rng.randint(1, more - 1)
    n_red, n_blue = (more, less) if label == 1 else (less, more)
    n_words = rng.randint(max(10, n_red + n_blue), 24)
    units = [[("red", 1)]] * n_red + [[("blue", 1)]] * n_blue
    text, rationale = _flatten_shuffled(rng, units, n_words - n_red - n_blue)
    return Example(id, text, label=label, rationale=rationale)


def _noun_phrase(rng: random.Random) -> tuple[list[str], list[int]]:
    """English "[adj] noun" and, per source word, its offset in the French "noun [adj]"."""
    noun = rng.choice(list(NOUNS))
    if rng.random() < 0.5:
        return [noun], [0]
    return [rng.choice(list(ADJECTIVES)), noun], [1, 0]   # adjective moves after its noun


def _reorder(rng: random.Random, id: str) -> Example:
    subject, subject_pos = _noun_phrase(rng)
    verb = rng.choice(list(VERBS))
    obj, obj_pos = _noun_phrase(rng)
    source = subject + [verb] + obj
    # target index of each source word: phrases keep their order, words reorder inside an NP
    target_pos = subject_pos + [len(subject)] + [len(subject) + 1 + p for p in obj_pos]
    target = [""] * len(source)
    for s, t in enumerate(target_pos):
        target[t] = LEXICON[source[s]]
    alignment = tuple((s, t) for s, t in enumerate(target_pos))
    return Example(id, " ".join(source), target=" ".join(target), alignment=alignment)


def _recall(rng: random.Random, id: str) -> Example:
    """'k1 v1 k2 v2 ... ? kq' -> 'vq'.

    rationale (one 0/1 per prompt word): 1 at the queried key's position 2i in the pairs, at its value
    2i+1, and at the final query key; 0 on the other pairs and on '?'. Keys are distinct, so the answer is
    unique; values may repeat.
    """
    n_pairs = rng.randint(*RECALL_PAIRS)
    keys = rng.sample(RECALL_KEYS, n_pairs)
    values = rng.choices(RECALL_VALUES, k=n_pairs)
    asked = rng.randrange(n_pairs)
    prompt = [w for kv in zip(keys, values) for w in kv] + [RECALL_QUERY, keys[asked]]
    rationale = [0] * len(prompt)
    rationale[2 * asked] = rationale[2 * asked + 1] = rationale[-1] = 1
    return Example(id, " ".join(prompt), target=values[asked], rationale=tuple(rationale))


def _copy(rng: random.Random, id: str) -> Example:
    """'s1 .. sn =' -> 's1 .. sn' (distinct symbols).

    rationale: 1 on every source symbol, 0 on '=' (the union of the steps' evidence); alignment: (s, s) for
    each step s, i.e. (source word index, target word index): target step s is decided by source word s.
    """
    source = rng.sample(COPY_SYMBOLS, rng.randint(*COPY_LENGTH))
    rationale = (1,) * len(source) + (0,)
    return Example(id, " ".join(source + [COPY_SEPARATOR]), target=" ".join(source), rationale=rationale,
                   alignment=tuple((s, s) for s in range(len(source))))


_GENERATORS: dict[str, Callable[[random.Random, str], Example]] = {
    "keywords": _keywords, "needle": _needle, "majority": _majority, "reorder": _reorder,
    "recall": _recall, "copy": _copy,
}
