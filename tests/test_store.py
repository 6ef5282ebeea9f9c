"""ItemStore: atomic saves, crash safety, the lock, resume and its fingerprint, failures, SIGTERM, safe paths."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnaudit.jobs.store import (
    MAX_NAME,
    FingerprintMismatch,
    ItemStore,
    OutputPathError,
    StoreExists,
    StoreLocked,
    check_output_dir,
    frame_payload,
    inside,
    interruptible,
    payload_frame,
    safe_name,
    sha256_files,
    sha256_json,
)

FP = {"model": "aaa", "data": "ddd", "settings": {"k": 0.2, "n": 10}}
REPO = Path(__file__).resolve().parents[1]


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity tokens, as other JSON readers do."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


# -- atomic writes ------------------------------------------------------------------------------
def test_save_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    items = tmp_path / ".attnaudit" / "items"
    with ItemStore(tmp_path, fingerprint=FP) as store:
        store.save("a", {"v": 1}, seconds=0.5)
        before = (items / "a.json").read_bytes()
        real = os.replace

        def crash_on_items(src, dst):
            if Path(dst).parent == items:
                raise OSError("simulated crash")
            return real(src, dst)
        monkeypatch.setattr(os, "replace", crash_on_items)
        with pytest.raises(OSError, match="simulated crash"):
            store.save("a", {"v": 2}, seconds=0.5)
        with pytest.raises(OSError, match="simulated crash"):
            store.save("b", {"v": 3}, seconds=0.5)
        monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("crash everywhere")))
        with pytest.raises(OSError, match="crash everywhere"):
            store.save("a", {"v": 4}, seconds=0.5)
        monkeypatch.undo()
        assert (items / "a.json").read_bytes() == before           # the previous version, intact
        assert not (items / "b.json").exists()                      # nothing under the final name
        assert sorted(p.name for p in items.iterdir()) == ["a.json"]  # no temporary files left
        assert store.load("a") == {"v": 1} and not store.done("b")
    with ItemStore(tmp_path, fingerprint=FP, resume=True) as store:
        assert store.load("a") == {"v": 1} and list(store.items()) == ["a"]


def test_sigkill_during_many_writes_leaves_no_torn_json(tmp_path):
    child = python("""
        import sys
        from attnaudit.jobs.store import ItemStore
        with ItemStore(sys.argv[1], fingerprint={"k": 1}) as store:
            i = 0
            while True:
                store.save(f"item {i % 7}", {"i": i, "v": [float(i)] * 3000 + [float("nan")]}, seconds=0.0)
                if i == 10:
                    print("ready", flush=True)
                i += 1
        """, str(tmp_path))
    try:
        assert child.stdout.readline() == "ready\n", child.stderr.read()
        time.sleep(0.5)
    finally:
        child.kill()                                              # SIGKILL: no handler, no cleanup
        child.wait()
    root = tmp_path / ".attnaudit"
    assert (root / "lock").exists()
    manifest = strict_json((root / "manifest.json").read_text())
    final = [p for p in (root / "items").iterdir() if not p.name.startswith(".")]
    assert final
    for p in final:
        assert strict_json(p.read_text())["payload"]["v"][-1] == {"$float": "nan"}
    with ItemStore(tmp_path, fingerprint={"k": 1}, resume=True) as store:   # the dead child's lock is taken over
        done = [k for k, e in manifest["items"].items() if e["status"] == "done"]
        assert len(done) >= 6
        for item in done:
            payload = store.load(item)                              # sha256 matches the manifest
            assert payload["v"][0] == payload["i"] and math.isnan(payload["v"][-1])
        assert not [p for p in (root / "items").iterdir() if p.name.startswith(".")]   # temp files cleaned


# -- the lock -----------------------------------------------------------------------------------
def test_lock_refuses_a_second_store_here_and_in_a_subprocess(tmp_path):
    with ItemStore(tmp_path, fingerprint=FP):
        with pytest.raises(StoreLocked, match=f"in use by pid {os.getpid()}"):
            with ItemStore(tmp_path, fingerprint=FP, resume=True):
                pass
        child = python("""
            import sys
            from attnaudit.jobs.store import ItemStore, StoreLocked
            try:
                with ItemStore(sys.argv[1], fingerprint={}, resume=True):
                    pass
            except StoreLocked as e:
                print(e)
                sys.exit(3)
            """, str(tmp_path))
        out, err = child.communicate(timeout=120)
        assert child.returncode == 3, err
        assert f"in use by pid {os.getpid()}" in out and "--out" in out
    assert not (tmp_path / ".attnaudit" / "lock").exists()         # released on exit
    with ItemStore(tmp_path, fingerprint=FP, resume=True):          # and free again
        pass


def test_stale_lock_of_a_dead_pid_is_taken_over_but_a_live_or_foreign_one_is_not(tmp_path):
    lock = tmp_path / ".attnaudit" / "lock"
    lock.parent.mkdir()
    host = socket.gethostname()
    for info in ({"pid": dead_pid(), "host": host, "time": "earlier"}, None):   # None: torn (empty) file
        lock.write_text(json.dumps(info) if info else "")
        with ItemStore(tmp_path, fingerprint=FP, resume=True):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not lock.exists()
    for info in ({"pid": os.getppid(), "host": host, "time": "t"}, {"pid": dead_pid(), "host": host + "-x", "time": "t"}):
        lock.write_text(json.dumps(info))
        with pytest.raises(StoreLocked, match=f"pid {info['pid']} on host"):
            with ItemStore(tmp_path, fingerprint=FP, resume=True):
                pass
        assert json.loads(lock.read_text()) == info                 # left alone


# -- resume, overwrite, fingerprint -------------------------------------------------------------
def test_resume_returns_saved_payloads_and_skips_compute(tmp_path):
    calls = []

    def compute(x):
        calls.append(x)
        return {"x": x, "values": [x, float("nan")]}
    with ItemStore(tmp_path, fingerprint=FP) as store:
        first = [store.run(f"chunk {i}", lambda i=i: compute(i)) for i in range(3)]
    with ItemStore(tmp_path, fingerprint=json.loads(json.dumps(FP)), resume=True) as store:
        again = [store.run(f"chunk {i}", lambda i=i: compute(i)) for i in range(4)]
        assert store.items()["chunk 0"]["status"] == "done" and store.items()["chunk 0"]["seconds"] >= 0
    assert calls == [0, 1, 2, 3]                                    # only the new chunk computed again
    assert repr(again[:3]) == repr(first) == repr([{"x": i, "values": [i, float("nan")]} for i in range(3)])


def test_existing_items_need_resume_or_overwrite(tmp_path):
    with ItemStore(tmp_path, fingerprint=FP) as store:
        store.save("a", [1, 2], seconds=1.0)
        store.fail("b", "ValueError: no")
    with pytest.raises(StoreExists, match=r"2 items .*1 done, 1 failed.*--resume.*--overwrite"):
        with ItemStore(tmp_path, fingerprint=FP):
            pass
    with pytest.raises(ValueError, match="not both"):
        ItemStore(tmp_path, fingerprint=FP, resume=True, overwrite=True).__enter__()
    with ItemStore(tmp_path, fingerprint={"other": 1}, overwrite=True) as store:
        assert store.items() == {} and not store.done("a")
        assert not list((tmp_path / ".attnaudit" / "items").iterdir())


def test_resume_with_a_changed_fingerprint_refuses_and_names_each_difference(tmp_path):
    with ItemStore(tmp_path, fingerprint=FP) as store:
        store.save("a", 1, seconds=0.0)
    changed = {"model": "bbb", "data": "ddd", "settings": {"k": 0.1, "n": 10}, "seed": 3}
    with pytest.raises(FingerprintMismatch) as e:
        with ItemStore(tmp_path, fingerprint=changed, resume=True):
            pass
    print(e.value)
    assert e.value.differences == [("model", "aaa", "bbb"), ("settings.k", 0.2, 0.1), ("seed", "<missing>", 3)]
    assert "  model: 'aaa' -> 'bbb'\n  settings.k: 0.2 -> 0.1\n  seed: '<missing>' -> 3" in str(e.value)
    assert "settings.n" not in str(e.value) and "--overwrite" in str(e.value)
    assert not (tmp_path / ".attnaudit" / "lock").exists()


# -- run: failures, OOM, interrupts --------------------------------------------------------------
def test_run_records_failures_and_continues(tmp_path):
    def boom():
        raise ValueError("bad chunk")
    with ItemStore(tmp_path, fingerprint=FP) as store:
        got = [store.run("a", lambda: 1), store.run("b", boom), store.run("c", lambda: object()), store.run("d", lambda: 4)]
        assert got == [1, None, None, 4]
        assert store.failures() == {"b": "ValueError: bad chunk",
                                    "c": "TypeError: payloads must be JSON data (dict, list, str, int, float, bool, "
                                         "None); got object."}
        assert store.items()["b"]["status"] == "failed"
    with ItemStore(tmp_path, fingerprint=FP, resume=True) as store:   # failed items are computed again
        assert store.run("b", lambda: "fixed") == "fixed" and store.failures() == {"c": store.failures()["c"]}


def test_run_retries_once_on_cuda_out_of_memory(tmp_path):
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    with ItemStore(tmp_path, fingerprint=FP) as store:
        assert store.run("a", oom, retry_oom=lambda: "smaller batches") == "smaller batches"
        assert store.run("b", oom) is None
        assert store.run("c", oom, retry_oom=oom) is None
        assert store.failures() == {k: "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB" for k in "bc"}


def test_sigterm_inside_interruptible_raises_keyboard_interrupt_and_releases_the_lock(tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):                                        # the handler runs between bytecodes
            time.sleep(0.05)
        return "not reached"
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with interruptible(), ItemStore(tmp_path, fingerprint=FP) as store:
            store.run("a", lambda: 1)
            store.run("b", terminated)
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / ".attnaudit" / "lock").exists()
    with ItemStore(tmp_path, fingerprint=FP, resume=True) as store:
        assert list(store.items()) == ["a"]                         # an interrupt is no failure


# -- paths --------------------------------------------------------------------------------------
def test_check_output_dir_refuses_files_symlinks_and_uncreatable_paths(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputPathError, match=r"--out must be a folder; got '.*file\.txt', which is an existing file"):
        check_output_dir(tmp_path / "file.txt")
    with pytest.raises(OutputPathError, match=r"--out must not be a symbolic link.*link' -> '.*real'"):
        check_output_dir(tmp_path / "link")
    with pytest.raises(OutputPathError, match=r"--out must be a folder that can be created; got '.*file\.txt/sub'"):
        check_output_dir(tmp_path / "file.txt" / "sub")
    with pytest.raises(ValueError, match="existing file"):           # the CLI catches ValueError
        ItemStore(tmp_path / "file.txt", fingerprint=FP).__enter__()
    assert check_output_dir(tmp_path / "new" / "out").is_dir()
    assert os.listdir(tmp_path / "new" / "out") == []                 # the write probe leaves nothing


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root, which ignores file permissions: a read-only folder stays writable")
def test_check_output_dir_refuses_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match=r"--out must be a writable folder; got '.*ro'"):
            check_output_dir(ro)
    finally:
        ro.chmod(0o700)


texts = st.text(max_size=150) | st.text(alphabet="aAzZ09f-._/ é", max_size=130)


@settings(max_examples=300, deadline=None)
@given(texts, texts)
def test_safe_name_is_safe_and_never_collides(a, b):
    for text in (a, b):
        name = safe_name(text)
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name) and len(name) <= MAX_NAME
        assert safe_name(name) != name or name == text              # a made name is never a kept one
        cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text)
        assert text == cleaned or safe_name(cleaned).lower() != name.lower()
    if a != b:
        assert safe_name(a).lower() != safe_name(b).lower()         # also on case-insensitive file systems


def test_safe_name_known_answers(tmp_path):
    assert safe_name("chunk-0007.faithfulness") == "chunk-0007.faithfulness"
    assert re.fullmatch(r"_\.\._etc_passwd-[0-9a-f]{16}", safe_name("../etc/passwd"))
    assert len({safe_name(t) for t in ["a b", "a_b", "a/b", "A_b", "a_b-" + "0" * 16, "", ".", ".."]}) == 8
    assert len(safe_name("x" * 1000)) == MAX_NAME
    assert inside(tmp_path, "a/b.json") == tmp_path.resolve() / "a" / "b.json"
    (tmp_path / "escape").symlink_to("/")
    for bad in ("../x.json", "/etc/passwd", "escape/etc", "", "."):
        with pytest.raises(ValueError, match="must stay inside"):
            inside(tmp_path, bad)


# -- payloads and hashes ------------------------------------------------------------------------
def test_frame_round_trip_keeps_dtypes_and_nan(tmp_path):
    nan = float("nan")
    df = pd.DataFrame({
        "example_id": pd.Series(["ex0", "ex1", "ex2"], dtype="str"),
        "value": [0.1, nan, float("-inf")],
        "f32": np.array([1.5, nan, 1 / 3], dtype=np.float32),
        "n": np.array([1, -2, 2 ** 62], dtype=np.int64),
        "u8": np.array([0, 7, 255], dtype=np.uint8),
        "flag": [True, False, True],
        "note": pd.Series(["", None, "not applicable"], dtype=object),
        "maybe": pd.array([1, None, 3], dtype="Int64"),
        "ok": pd.array([True, None, False], dtype="boolean"),
        "s": pd.Series(["a", None, "c"], dtype="str"),
    }, index=pd.Index(["r0", "r1", "r2"], name="row"))
    df.attrs = {"policy": "mask", "bins": [0.05, 0.1]}
    with ItemStore(tmp_path, fingerprint=FP) as store:
        store.run("table", lambda: frame_payload(df))
        text = (tmp_path / ".attnaudit" / "items" / "table.json").read_text()
        strict_json(text)                                           # strict JSON: no NaN tokens
        back = payload_frame(store.load("table"))
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert back.attrs == df.attrs and list(back.dtypes) == list(df.dtypes)
    assert math.isnan(back["value"].iloc[1]) and back["f32"].dtype == np.float32 and back["f32"].iloc[2] == np.float32(1 / 3)
    with pytest.raises(TypeError, match="column 'c' has dtype category"):
        frame_payload(pd.DataFrame({"c": pd.Categorical(["a"])}))


def test_payload_json_keeps_non_finite_floats_and_refuses_what_it_cannot_keep(tmp_path):
    with ItemStore(tmp_path, fingerprint=FP) as store:
        got = store.run("a", lambda: {"v": (1.0, float("nan"), float("inf"), float("-inf")), "a": np.arange(3)})
        assert got["a"] == [0, 1, 2] and got["v"][0] == 1.0 and math.isnan(got["v"][1])
        assert got["v"][2:] == [math.inf, -math.inf]
        with pytest.raises(TypeError, match="keys must be strings"):
            store.save("b", {1: "x"}, seconds=0.0)
        with pytest.raises(TypeError, match=r"\$float"):
            store.save("b", {"$float": "nan"}, seconds=0.0)
        assert not store.done("b")


def test_sha256_helpers_are_stable(tmp_path):
    for root in (tmp_path / "x", tmp_path / "y"):
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "w.bin").write_bytes(b"weights")
        (root / "config.json").write_text("{}")
    (tmp_path / "y" / ".model.safetensors.tmp").write_text("a writer's temporary file")
    x, y = tmp_path / "x", tmp_path / "y"
    assert sha256_files(x) == sha256_files(y) == sha256_files([x / "sub" / "w.bin", x / "config.json"])
    assert sha256_files([x / "config.json"]) == sha256_files([str(y / "config.json")])
    (y / "sub" / "w.bin").write_bytes(b"weightz")
    assert sha256_files(x) != sha256_files(y)
    assert sha256_json({"a": 1, "b": [1.0, float("nan")]}) == sha256_json({"b": [1.0, float("nan")], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 1.5})
