"""The imports follow the data flow: core -> data -> model -> explain -> analyses -> jobs / CLI.

Every `import` and `from ... import` in the package (at module level or inside a function) and every
`importlib.import_module("attnaudit...")` with a literal name is an edge; none may point to a higher layer.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"attnaudit": "attnaudit", "model": "attnaudit.model", "explain": "attnaudit.explain",
           "analyses": "attnaudit.analyses"}            # folder -> package (pyproject's package-dir)
LAYERS = ["attnaudit.core", "attnaudit.data", "attnaudit.model", "attnaudit.explain", "attnaudit.analyses",
          "attnaudit.jobs"]                              # low to high; anything else in attnaudit/ is the top
# Deprecated names kept importable from their old home for one release (each re-export says so when used).
SHIMS = {("attnaudit.analyses", "attnaudit.jobs.store")}


def layer(module: str) -> int:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return len(LAYERS)                                   # attnaudit, attnaudit.cli, attnaudit.distributed, ...


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    return ".".join(p for p in parts if p != "__init__")


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import of an attnaudit module in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node.lineno))
    return [(m, line) for m, line in out if m == "attnaudit" or m.startswith("attnaudit.")]


SOURCES = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_the_walk_sees_the_whole_package():
    names = {module_name(p) for p in SOURCES}
    assert {"attnaudit.model.transformer", "attnaudit.explain.rollout", "attnaudit.analyses.audit",
            "attnaudit.jobs.store", "attnaudit.data.tasks", "attnaudit.core.io", "attnaudit.cli"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_against_the_data_flow(path):
    here = module_name(path)
    against = [f"line {line}: {here} (layer {LAYERS[layer(here)] if layer(here) < len(LAYERS) else 'top'}) "
               f"imports {target}"
               for target, line in imports(path)
               if layer(target) > layer(here) and (here, target) not in SHIMS]
    assert not against, "imports against model -> explain -> analyses -> jobs:\n" + "\n".join(against)


def test_the_rule_catches_a_backward_import(tmp_path):
    """The check itself can fail: a model module importing the analyses is an edge against the flow."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from attnaudit.analyses.audit import audit\n    import attnaudit\n")
    edges = imports(bad)
    assert edges == [("attnaudit.analyses.audit", 2), ("attnaudit", 3)]
    assert all(layer(t) > layer("attnaudit.model.hf") for t, _ in edges)
