"""A fast front door: `attnaudit --help`, `tasks list` and `import attnaudit` load no captum, pandas or matplotlib
(nor torch); each is imported by the first name that needs it. Each check runs in a fresh interpreter."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test starts a fresh Python process
HEAVY = ("captum", "pandas", "matplotlib", "seaborn", "transformers", "torch")


def loaded_after(code: str) -> list[str]:
    """Run `code` in a fresh interpreter -> the HEAVY modules it imported."""
    probe = (f"import sys\n{code}\n"
             f"print('\\nLOADED ' + __import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.rsplit("LOADED ", 1)[1])


def cli(*args: str) -> str:
    return (f"from attnaudit.cli import main\ntry:\n    main({list(args)!r})\n"
            "except SystemExit as e:\n    assert not e.code, e.code")


@pytest.mark.parametrize("args", [("--help",), ("tasks", "list"), ("analyze", "--help"), ("train", "--help"),
                                  ("explain", "--help")])
def test_cli_help_and_tasks_list_import_nothing_heavy(args):
    assert loaded_after(cli(*args)) == []


def test_import_attnaudit_is_light_until_a_name_is_used():
    assert loaded_after("import attnaudit, attnaudit.explain, attnaudit.model") == []
    assert loaded_after("import attnaudit\nattnaudit.list_explainers()") == []
    assert "captum" not in loaded_after("import attnaudit\nattnaudit.get_explainer('rollout')")   # torch, not captum
    assert "captum" in loaded_after("import attnaudit\nattnaudit.get_explainer('saliency')")


def test_the_public_api_still_resolves():
    import attnaudit
    from attnaudit.analyses.audit import audit
    from attnaudit.explain.attribution import Attribution
    from attnaudit.model.checkpoint import load_model
    from attnaudit.model.hooks import hooks, record

    assert (attnaudit.load_model, attnaudit.audit, attnaudit.Attribution) == (load_model, audit, Attribution)
    assert (attnaudit.record, attnaudit.hooks) == (record, hooks)
    assert "rollout" in attnaudit.list_explainers() and attnaudit.get_explainer("rollout").name == "rollout"
    assert set(attnaudit.__all__) <= set(dir(attnaudit))
    import attnaudit.explain as explain
    import attnaudit.model as model
    for module in (explain, model):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        attnaudit.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        model.nope  # noqa: B018
