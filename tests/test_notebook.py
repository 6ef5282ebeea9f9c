"""The README's "In a notebook" cells, executed for real in a Jupyter kernel (nbclient) on a tiny model."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the test extras: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the test extras: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="ipykernel is in the test extras: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parents[1]
WIDGET = "application/vnd.jupyter.widget-view+json"


def readme_cells() -> list[str]:
    """The README's notebook block, one cell per paragraph (blank-line separated)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## In a notebook\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md has no ```python block under '## In a notebook'"
    return [c.strip() for c in block.group(1).split("\n\n") if c.strip()]


def split_lines(cell: str) -> list[str]:
    """A README cell whose lines each show a value (`attr`, `attr.to_frame()`) -> one cell per such line,
    as a person runs them, so that each value is displayed."""
    lines = cell.splitlines()
    shown = [i for i, line in enumerate(lines) if not re.match(r"^\s*(import|from|\w+\s*=)", line)]
    if not shown:
        return [cell]
    cells, start = [], 0
    for i in shown:
        cells.append("\n".join(lines[start: i + 1]))
        start = i + 1
    if start < len(lines):
        cells.append("\n".join(lines[start:]))
    return cells


@pytest.mark.slow
def test_the_readme_notebook_cells_run_in_a_kernel(tmp_path):
    from attnaudit.model.settings import defaults_for
    from attnaudit.model.train import train_to_folder

    small = defaults_for("keywords").replace(n_train=600, epochs=1, d_model=16, n_heads=2, d_ff=32)
    train_to_folder(tmp_path / "runs" / "keywords", task="keywords", settings=small, progress=False)
    cells = [c for cell in readme_cells() for c in split_lines(cell)]
    cells = [c.replace("n=100", "n=6") for c in cells]        # the same calls on fewer examples
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import torch; torch.set_num_threads(1)"),
                                         *(nbformat.v4.new_code_cell(c) for c in cells)])
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    attr_cells = [c for c in nb.cells if re.search(r"^attr\s", c.source.splitlines()[-1])]
    assert attr_cells, "the README shows `attr` on its own line"
    html = [o for o in attr_cells[-1].outputs if o.get("output_type") == "execute_result"]
    assert html and "text/html" in html[0]["data"], "the Attribution did not render as HTML"
    assert "<span" in html[0]["data"]["text/html"]

    summary_cells = [c for c in nb.cells if c.source.splitlines()[-1].startswith("result.summary()")]
    result = [o for o in summary_cells[-1].outputs if o.get("output_type") == "execute_result"]
    assert result and "text/html" in result[0]["data"] and "<table" in result[0]["data"]["text/html"], \
        "result.summary() did not display as a DataFrame"

    audit_cells = [c for c in nb.cells if "attnaudit.audit(" in c.source]
    widgets = [o for o in audit_cells[-1].outputs if WIDGET in o.get("data", {})]
    assert widgets, ("the audit showed no progress widget in the notebook; outputs: "
                     + repr([o.get("output_type") for o in audit_cells[-1].outputs]))
    assert (tmp_path / "reports" / "keywords" / "index.html").is_file()
    errors = [o for c in nb.cells for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
