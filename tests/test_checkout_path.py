"""The tests pass wherever the checkout lives: a folder named attnaudit (what `git clone` gives), with a space above it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_path_sensitive_tests_pass_in_a_folder_named_attnaudit_under_a_space(tmp_path):
    clone = tmp_path / "my projects" / "attnaudit"
    shutil.copytree(REPO / "tests", clone / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "benchmarks", clone / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    for results in (REPO / "reports").glob("*/results.json"):
        (clone / "reports" / results.parent.name).mkdir(parents=True)
        shutil.copy(results, clone / "reports" / results.parent.name / "results.json")
    shutil.copy(REPO / "pyproject.toml", clone / "pyproject.toml")
    tests = ["tests/test_model.py::test_installed_names_import",
             "tests/test_model.py::test_the_install_exposes_only_the_attnaudit_names",
             "tests/test_committed_reports.py"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                          "-k", "not stays_small and not audited_the_shared_file and not draws_the_attention"],
                         cwd=clone, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout
