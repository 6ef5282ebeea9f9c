"""attnaudit.core.io: one permission policy, atomic writes that leave the old file on failure, one JSON NaN rule."""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from attnaudit.core.io import (
    FILE_MODE,
    NOT_SAFETENSORS_SUFFIXES,
    PICKLE_SUFFIXES,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    file_sha256,
    is_temp_name,
    jsonable,
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")                                    # what open() gives a new file under this umask
    for path, write in ((tmp_path / "a.bin", lambda p: atomic_write_bytes(p, b"x")),
                        (tmp_path / "b.txt", lambda p: atomic_write_text(p, "x")),
                        (tmp_path / "c.csv", lambda p: atomic_write(p, lambda tmp: tmp.write_text("x")))):
        assert write(path) == path and path.read_bytes() == b"x"
        assert mode(path) == FILE_MODE == mode(plain), path.name    # not mkstemp's 0600


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_the_mode_follows_the_umask(tmp_path):
    code = ("import os, stat, sys\nos.umask(0o027)\nfrom attnaudit.core.io import atomic_write, atomic_write_bytes\n"
            "a = atomic_write_bytes(sys.argv[1] + '/a', b'x')\n"
            "b = atomic_write(sys.argv[1] + '/b', lambda tmp: tmp.write_bytes(b'x'))\n"
            "print(oct(stat.S_IMODE(os.stat(a).st_mode)), oct(stat.S_IMODE(os.stat(b).st_mode)))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0o640", "0o640"]          # 0o666 & ~0o027


def test_a_failing_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("new, half written")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half_then_fail)
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")                 # fails inside the write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_successful_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "näive\n")
    assert path.read_bytes() == "näive\n".encode()            # UTF-8, no newline translation
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_temporary_names_are_recognised():
    assert is_temp_name(".metrics.csv.abc123.tmp") and not is_temp_name("metrics.csv") and not is_temp_name(".tmp")


def test_file_sha256_reads_the_whole_file_and_names_a_missing_one(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * (3 << 20) + b"end")               # more than one 1 MiB chunk
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match="is missing; a model folder holds"):
        file_sha256(tmp_path / "nope", missing="a model folder holds config.json and model.safetensors")


def test_the_json_rule_is_nan_and_infinity_to_null():
    got = jsonable({"nan": math.nan, "inf": float("inf"), "ninf": -math.inf, "f32": np.float32("nan"),
                    1: (np.int64(2), np.float64(0.5), np.bool_(True)), "s": "nan", "none": None})
    assert got == {"nan": None, "inf": None, "ninf": None, "f32": None, "1": [2, 0.5, True], "s": "nan", "none": None}
    assert type(got["1"][0]) is int and type(got["1"][1]) is float and type(got["1"][2]) is bool
    assert json.dumps(got, allow_nan=False)                    # strict JSON
    obj = object()
    assert jsonable([obj]) == [obj]                            # other values pass through ...
    assert jsonable({"x": obj, "n": 3}, default=repr) == {"x": repr(obj), "n": 3}   # ... or through `default`


def test_the_pickle_lists():
    assert ".pickle" in PICKLE_SUFFIXES and ".h5" not in PICKLE_SUFFIXES
    assert set(PICKLE_SUFFIXES) < set(NOT_SAFETENSORS_SUFFIXES) and {".h5", ".msgpack"} <= set(NOT_SAFETENSORS_SUFFIXES)


def test_core_io_imports_nothing_heavy():
    code = "import sys\nimport attnaudit.core.io\nprint([m for m in ('torch', 'pandas', 'numpy') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
