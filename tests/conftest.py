"""Shared fixtures: a seeded tiny 2-layer model and a padded batch, built in milliseconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnaudit.data.examples import Example
from attnaudit.model.interface import TextClassifier
from attnaudit.model.transformer import TransformerClassifier, TransformerConfig
from attnaudit.model.vocab import Vocab

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

WORDS = "the a film plot was not good bad great boring and with story actor".split()


def make_tiny_model(seed: int = 0, *, n_classes: int = 2, norm: str = "post", pooling: str = "cls",
                    n_layers: int = 2, n_heads: int = 2, d_model: int = 16) -> TextClassifier:
    torch.manual_seed(seed)
    vocab = Vocab.build([" ".join(WORDS)])
    cfg = TransformerConfig(vocab_size=len(vocab), n_classes=n_classes, d_model=d_model, n_heads=n_heads,
                            n_layers=n_layers, d_ff=2 * d_model, dropout=0.1, max_len=32, norm=norm, pooling=pooling)
    model = TextClassifier(TransformerClassifier(cfg), vocab, label_names=[f"c{i}" for i in range(n_classes)])
    model.net.eval()
    return model


@pytest.fixture
def tiny_model() -> TextClassifier:
    return make_tiny_model()


@pytest.fixture
def tiny_examples() -> list[Example]:
    texts = ["the film was good", "a boring plot", "the story was not bad and the actor was great", "good"]
    return [Example(id=f"ex{i}", text=t, label=i % 2, rationale=tuple(int(w in ("good", "bad", "boring", "great", "not"))
            for w in t.split())) for i, t in enumerate(texts)]


@pytest.fixture
def tiny_batch(tiny_model, tiny_examples):
    """4 examples of different lengths, so rows 0, 1 and 3 carry padding."""
    return tiny_model.encode(tiny_examples)


@pytest.fixture(autouse=True, scope="session")
def one_thread_session():
    """The whole suite on one torch thread, as `one_thread_module` does for some modules: every model here is tiny,
    and on a busy 2-core machine two threads wait on each other (the fast loop takes twice as long on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a module: tiny models run no faster on two, and on a busy 2-core machine two wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"../shared/data is absent ({data}); these tests read the benchmark data beside the repo.")
    return data


def cli_run(capsys, *args) -> tuple[int, str, str]:
    """Run `attnaudit ARGS` in this process -> (exit status, stdout, stderr)."""
    from attnaudit import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_only_own_scripts(markup: str) -> None:
    """A report page may hold only the attention view's scripts: its one code block (whose sha256 the page's
    CSP names) and JSON data blocks with no raw "<"; any other <script> is an injection."""
    import re

    from attnaudit.analyses.attention_view import script_text

    pattern = re.compile(r"<script\b([^>]*)>(.*?)</script\s*>", flags=re.S | re.I)
    blocks = pattern.findall(markup)
    assert not re.search(r"<script\b", pattern.sub("", markup), flags=re.I), "a <script> outside the view's blocks"
    code = [body for attrs, body in blocks if not attrs.strip()]
    data = [(attrs, body) for attrs, body in blocks if attrs.strip()]
    assert len(code) <= 1 and all(body == script_text() for body in code), "an inline script that is not the view's"
    for attrs, body in data:
        assert re.fullmatch(r'\s*type="application/json"\s+class="aav-data"(\s+id="[\w-]+")?\s*', attrs), attrs
        assert "<" not in body, "a data block with a raw '<'"


class HtmlCollect:
    """Start tags (with their attributes) and text of an HTML page, as the standard library parses it."""

    def __init__(self, markup: str):
        from html.parser import HTMLParser

        collect = self

        class _Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                collect.tags.append((tag, dict(attrs)))

            def handle_startendtag(self, tag, attrs):
                collect.tags.append((tag, dict(attrs)))

            def handle_data(self, data):
                collect.text.append(data)

        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        parser = _Parser(convert_charrefs=True)
        parser.feed(markup)
        parser.close()


# -- the fast loop, `pytest -m "not slow"` ---------------------------------------------------------------------------
# Module-scoped fixtures (by name) that train a model or run a whole `attnaudit` job. A test that uses one must carry
# @pytest.mark.slow, or the fast loop pays for the training: collection stops here and names the test.
TRAINING_FIXTURES = frozenset({"needle", "needle_model", "reorder_model", "keywords_models", "reference", "workdir",
                               "run"})


def pytest_collection_modifyitems(config, items):
    unmarked = sorted(item.nodeid for item in items if item.get_closest_marker("slow") is None
                      and TRAINING_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if unmarked:
        raise pytest.UsageError(
            f"{len(unmarked)} test(s) use a fixture that trains a model ({', '.join(sorted(TRAINING_FIXTURES))}) but "
            f"have no @pytest.mark.slow, so the fast loop would train it: {', '.join(unmarked)}")
