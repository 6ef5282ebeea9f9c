"""Sharded audits (attnaudit.distributed): the assignment, the split items, the rank stores, and real
torchrun jobs on gloo (1, 2 and 3 processes) whose report tables are the bytes of a single process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_tiny_model

from attnaudit import distributed as D
from attnaudit.analyses.audit import AuditSettings, audit
from attnaudit.analyses.counterfactual import adversary_options, counterfactual_table
from attnaudit.analyses.sanity import randomization_table
from attnaudit.jobs.store import ItemStore, StoreLocked

SMALL = dict(explainers=("attention", "rollout", "saliency", "random"), chunk_size=2, n_permutations=3,
             adversarial_steps=2, counterfactual_examples=4, sanity_examples=3, max_examples=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


# -- the assignment -------------------------------------------------------------------------------
def test_assignment_is_round_robin_and_a_partition():
    assert [D.owner(i, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [D.owner(i, 1) for i in range(4)] == [0, 0, 0, 0]
    for world in (1, 2, 3, 5):
        owners = [D.owner(i, world) for i in range(23)]
        assert sorted(set(owners)) == list(range(world))
    with pytest.raises(ValueError, match="world_size"):
        D.owner(0, 0)


def test_rank_environment_is_read_from_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert D.from_env() == D.Ranks(rank=0, world_size=1, local_rank=0)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert D.from_env() == D.Ranks(rank=2, world_size=3, local_rank=0)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK"):
        D.from_env()


def test_fingerprint_differences_name_the_rank_and_the_key():
    same = {"attnaudit": "0.1.0", "model": "abc", "settings": {"seed": 0}}
    assert D.fingerprint_differences([same, dict(same)]) == []
    other = {**same, "settings": {"seed": 1}}
    lines = D.fingerprint_differences([same, dict(same), other])
    assert lines == ["rank 2 differs from rank 0 in settings.seed: 0 -> 1"]


# -- the split items keep the numbers -------------------------------------------------------------
def test_counterfactual_and_sanity_items_give_the_tables_of_one_call(tiny_examples):
    model = make_tiny_model()
    settings = AuditSettings(**SMALL)
    names = []
    result = audit(model, tiny_examples, settings, progress=False,
                   runner=lambda item, compute: names.append(item) or compute())
    assert "counterfactual-permutation-layer-0" in names and "counterfactual-head_ablation" in names
    assert "sanity-saliency" in names and "counterfactual" not in names and "sanity" not in names
    batch = model.encode(tiny_examples)
    whole = counterfactual_table(model, batch, tests=settings.counterfactual_tests, n_permutations=3,
                                 adversarial_steps=2, adversarial_lr=settings.adversarial_lr, seed=0,
                                 adversary=adversary_options(n_adversaries=settings.n_adversaries))
    assert list(result.counterfactual) == list(whole)
    for k in whole:
        pd.testing.assert_frame_equal(result.counterfactual[k], whole[k], check_exact=True)
    from attnaudit.explain.registry import get_explainer
    sanity = randomization_table(model, batch.select(range(3)), [get_explainer(n) for n in SMALL["explainers"]], seed=0)
    got = result.metrics[result.metrics.metric == "randomization_spearman"].reset_index(drop=True)
    pd.testing.assert_frame_equal(got.drop(columns="note"), sanity[got.columns.drop("note")], check_exact=True)


# -- the rank stores ------------------------------------------------------------------------------
def _fp():
    return {"identity": {"seed": 0}}


def test_rank_items_are_adopted_by_rank_0_and_at_the_next_open_with_any_world_size(tmp_path):
    with ItemStore(tmp_path, fingerprint=_fp()) as main:
        main.save("a", {"x": 1}, seconds=0.1)
        with D_rank_store(tmp_path, 1) as r1, D_rank_store(tmp_path, 2) as r2:
            assert r1.done("a") and not r1.done("b")
            r1.save("b", {"x": 2}, seconds=0.1)
            r2.fail("c", "ValueError: boom")
            states = main.collect()
            assert states[1]["alive"] and not states[1]["finished"] and states[1]["n_items"] == 1
            assert main.done("b") and main.load("b") == {"x": 2} and main.saved_now("c") and not main.done("c")
            r2.save("d", [1.5], seconds=0.1)
            r2.finish()
        # r2 saved "d" after the last collect, then both ranks ended (their locks are free)
        assert main.collect()[2]["finished"] and main.done("d")
    with pytest.raises(Exception, match="--resume"):            # the items are an earlier run's
        ItemStore(tmp_path, fingerprint=_fp()).__enter__()
    # a rank that died after saving "e" (its manifest is on disk, its lock gone): kept at the next open
    with ItemStore(tmp_path, fingerprint=_fp(), resume=True) as main:
        with D_rank_store(tmp_path, 1) as r1:
            r1.save("e", {"y": None}, seconds=0.0)
    with ItemStore(tmp_path, fingerprint=_fp(), resume=True) as main:
        assert {k for k in main.items() if main.done(k)} == {"a", "b", "d", "e"}
        assert main.failures() == {"c": "ValueError: boom"}
    assert not list((tmp_path / ".attnaudit" / "ranks").glob("*.json"))   # merged into the manifest, then removed


def test_a_damaged_rank_item_is_not_adopted(tmp_path):
    with ItemStore(tmp_path, fingerprint=_fp()) as main:
        with D_rank_store(tmp_path, 1) as r1:
            r1.save("b", {"x": 2}, seconds=0.1)
        (tmp_path / ".attnaudit" / "items" / "b.json").write_text('{"item": "b", "payload": 3}')
        main.collect()
        assert not main.done("b")


def test_a_live_rank_of_another_job_keeps_the_folder_locked(tmp_path):
    with ItemStore(tmp_path, fingerprint=_fp()):
        rank = D_rank_store(tmp_path, 1).__enter__()
    try:                                           # rank 0 gone, rank 1 still writing: a new run must wait
        with pytest.raises(StoreLocked, match="rank-1 of another sharded job"):
            ItemStore(tmp_path, fingerprint=_fp(), resume=True).__enter__()
    finally:
        rank.__exit__(None, None, None)
    with ItemStore(tmp_path, fingerprint=_fp(), resume=True):
        pass


def D_rank_store(folder, rank):
    from attnaudit.jobs.store import RankStore
    return RankStore(folder, rank=rank, fingerprint=_fp())


def test_waiting_for_a_dead_rank_names_it_and_the_resume_command(tmp_path):
    with ItemStore(tmp_path, fingerprint=_fp()) as main:
        with D_rank_store(tmp_path, 1):
            pass                                   # started, never finished, lock released: as if killed
        (tmp_path / ".attnaudit" / "ranks" / "rank-1.lock").unlink(missing_ok=True)
        with pytest.raises(D.RankFailed, match=r"rank 1 stopped .*'chunk-0001'.*finished items are saved"):
            D.wait_for(main, "chunk-0001", 1, limit=5, poll=0.01)
        with D_rank_store(tmp_path, 2) as r2:      # alive but silent: the progress timeout names it
            with pytest.raises(D.RankFailed, match="rank 2 saved no item for 0 s"):
                D.wait_for(main, "chunk-0002", 2, limit=0.2, poll=0.01)
            r2.save("chunk-0002", 1, seconds=0.0)
            D.wait_for(main, "chunk-0002", 2, limit=5, poll=0.01)


# -- real torchrun jobs on gloo (subprocesses, loopback only) -------------------------------------
TINY_AUDIT = """[audit]
max_examples = 8
chunk_size = 2
explainers = ["attention", "rollout", "saliency", "occlusion", "random"]
n_permutations = 4
adversarial_steps = 3
sanity_examples = 3
counterfactual_examples = 8
"""
SKIP_BYTES = {"index.html", "report.md", "results.json"}     # they show timings and the creation time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "ATTNAUDIT_DIST_TIMEOUT": "60", **extra}


def _analyze(workdir: Path, out: Path, n: int | None, *extra: str, popen: bool = False):
    """`attnaudit analyze` on the tiny model: one process (n None) or torchrun with n processes."""
    args = ["-m", "attnaudit", "analyze", "--model", str(workdir / "model"), "--task", "needle",
            "--config", str(workdir / "tiny.toml"), "--out", str(out), "--quiet", *extra]
    if n is not None:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), *args]
    if popen:
        return subprocess.Popen([sys.executable, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=240)


def _tables(out: Path) -> dict:
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and ".attnaudit" not in p.parts and p.name not in SKIP_BYTES}
    results = json.loads((out / "results.json").read_text())
    results.pop("timings"), results.pop("created", None)
    return {**files, "results.json less timings": results}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny trained needle model, the audit settings and the single-process report's tables."""
    from attnaudit.model.train import defaults_for, train_to_folder
    root = tmp_path_factory.mktemp("dist")
    settings = defaults_for("needle").replace(d_model=16, n_heads=2, n_layers=2, d_ff=32, epochs=1, n_train=128,
                                              n_valid=32, n_test=32)
    train_to_folder(root / "model", task="needle", settings=settings, progress=False)
    (root / "tiny.toml").write_text(TINY_AUDIT)
    done = _analyze(root, root / "single", None)
    assert done.returncode == 0, done.stderr
    return root


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3])
def test_torchrun_report_tables_are_the_bytes_of_a_single_process(workdir, tmp_path, n):
    done = _analyze(workdir, tmp_path / "out", n)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("report written to") == 1            # rank 0 only
    got, want = _tables(tmp_path / "out"), _tables(workdir / "single")
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    manifest = json.loads((tmp_path / "out" / ".attnaudit" / "manifest.json").read_text())
    assert len(manifest["items"]) >= 8 and all(e["status"] == "done" for e in manifest["items"].values())


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_naming_it_and_resume_on_another_world_size_finishes_it(workdir, tmp_path):
    out = tmp_path / "out"
    job = _analyze(workdir, out, 2, popen=True)
    lock = out / ".attnaudit" / "ranks" / "rank-1.lock"
    start = time.monotonic()
    while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() - start < 120:
        time.sleep(0.02)
    os.kill(json.loads(lock.read_text())["pid"], 9)                # rank 1, in the middle of its first items
    try:
        _, err = job.communicate(timeout=120)                        # never a hang
    finally:
        job.kill()
    assert job.returncode != 0
    assert "rank(s) 1 stopped" in err or "rank 1 stopped" in err, err[-3000:]
    assert "--resume" in err
    done = _analyze(workdir, out, 3, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = _tables(out), _tables(workdir / "single")
    assert [k for k in want if got.get(k) != want[k]] == []


@pytest.mark.slow
def test_a_sharded_job_on_a_folder_in_use_is_refused_on_every_rank(workdir, tmp_path):
    out = tmp_path / "out"
    with ItemStore(out, fingerprint=_fp()):                         # a single run holds the folder
        done = _analyze(workdir, out, 2)
    assert done.returncode != 0, done.stderr[-3000:]          # torchrun: 1 when a worker exits with 2
    # rank 0's refusal, as a single run's (status 2), and rank 1 told of it (status 4): whichever torchrun sees first
    assert f"{str(out)!r} is in use by pid {os.getpid()}" in done.stderr, done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr or "exitcode  : 4" in done.stderr


@pytest.mark.slow
def test_ranks_with_different_settings_are_refused_with_the_difference(workdir, tmp_path):
    port = str(_free_port())
    procs = []
    for rank, n in ((0, "8"), (1, "6")):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "attnaudit", "analyze", "--model", str(workdir / "model"), "--task", "needle",
             "--config", str(workdir / "tiny.toml"), "--out", str(tmp_path / "out"), "--quiet", "--max-examples", n],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=120)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 2, err[-3000:]
        assert "rank 1 differs from rank 0 in identity.audit.max_examples: 8 -> 6" in err, err[-3000:]
    assert not (tmp_path / "out" / ".attnaudit").exists()            # refused before any item


# -- CUDA (skipped without a GPU) -----------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_model_explainers_and_perturbation_engine_on_cuda(tiny_examples):
    from attnaudit.explain.perturb import PerturbationEngine
    from attnaudit.explain.registry import get_explainer
    cpu = make_tiny_model()
    gpu = make_tiny_model().to("cuda") if hasattr(make_tiny_model(), "to") else None
    if gpu is None:
        gpu = make_tiny_model()
        gpu.net.to("cuda")
    batch = gpu.encode(tiny_examples)                 # encode builds CPU tensors; the model moves what it runs
    torch.testing.assert_close(gpu(batch).float().cpu(), cpu(cpu.encode(tiny_examples)).float(), atol=1e-4, rtol=1e-4)
    for name in ("attention", "rollout", "saliency", "occlusion"):
        attr = get_explainer(name).explain(gpu, batch)
        assert attr.scores.shape == batch.input_ids.shape and torch.isfinite(attr.scores).all()
    engine = PerturbationEngine(gpu, batch, policy="mask")
    assert engine is not None
    result = audit(gpu, tiny_examples, AuditSettings(**SMALL), progress=False)
    assert len(result.metrics) > 0


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL with two ranks needs two CUDA devices")
def test_torchrun_on_nccl_matches_a_single_gpu_process(workdir, tmp_path):
    one = _analyze(workdir, tmp_path / "one", None, "--device", "cuda")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _analyze(workdir, tmp_path / "two", 2, "--device", "cuda")
    assert two.returncode == 0, two.stderr[-3000:]
    got, want = _tables(tmp_path / "two"), _tables(tmp_path / "one")
    assert [k for k in want if got.get(k) != want[k]] == []


# -- the Python audit, sharded --------------------------------------------------------------------
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import make_tiny_model
from attnaudit import distributed
from attnaudit.analyses.audit import AuditSettings
from attnaudit.data.examples import Example
texts = ["the film was good", "a boring plot", "the story was not bad and the actor was great", "good", "bad plot"]
examples = [Example(id=f"ex{{i}}", text=t, label=i % 2) for i, t in enumerate(texts)]
result = distributed.audit(make_tiny_model(), examples, AuditSettings(**{small!r}), out={out!r})
if distributed.from_env().is_main:
    from attnaudit.jobs.store import dumps, frame_payload   # exact-float JSON, as the item store writes
    open({saved!r}, "w").write(dumps({{"metrics": frame_payload(result.metrics), "curves": frame_payload(result.curves),
        "counterfactual": {{k: frame_payload(v) for k, v in result.counterfactual.items()}},
        "attributions": result.attributions, "examples": result.examples, "settings": result.settings}}))
else:
    assert result is None
"""


def _examples():
    from attnaudit.data.examples import Example
    texts = ["the film was good", "a boring plot", "the story was not bad and the actor was great", "good", "bad plot"]
    return [Example(id=f"ex{i}", text=t, label=i % 2) for i, t in enumerate(texts)]


def _same_result(a, b):
    for name in ("metrics", "curves"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True)
    assert list(a.counterfactual) == list(b.counterfactual)
    for k in a.counterfactual:
        pd.testing.assert_frame_equal(a.counterfactual[k], b.counterfactual[k], check_exact=True)
    assert a.attributions == b.attributions and a.examples == b.examples and a.settings == b.settings


def test_python_audit_through_the_store_gives_the_tables_of_audit(tmp_path):
    want = audit(make_tiny_model(), _examples(), AuditSettings(**SMALL), progress=False)
    got = D.audit(make_tiny_model(), _examples(), AuditSettings(**SMALL), out=tmp_path / "items", progress=False)
    _same_result(got, want)
    with pytest.raises(Exception, match="--resume"):
        D.audit(make_tiny_model(), _examples(), AuditSettings(**SMALL), out=tmp_path / "items")
    _same_result(D.audit(make_tiny_model(), _examples(), AuditSettings(**SMALL), out=tmp_path / "items", resume=True),
                 want)


@pytest.mark.slow
def test_python_audit_on_two_ranks_gives_the_tables_of_audit(tmp_path):
    from types import SimpleNamespace

    from attnaudit.jobs.store import loads, payload_frame
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), small=SMALL, out=str(tmp_path / "items"),
                                    saved=str(tmp_path / "result.json")))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(_free_port()), str(script)],
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    got = SimpleNamespace(**{**saved, "metrics": payload_frame(saved["metrics"]), "curves": payload_frame(saved["curves"]),
                             "counterfactual": {k: payload_frame(v) for k, v in saved["counterfactual"].items()}})
    want = audit(make_tiny_model(), _examples(), AuditSettings(**SMALL), progress=False)
    _same_result(got, want)
    assert list((tmp_path / "items" / ".attnaudit" / "ranks").glob("rank-1.json"))   # rank 1 did its share


@pytest.mark.slow
def test_five_ranks_simulated_in_one_process_give_the_tables_of_audit(tmp_path, tiny_examples):
    """The sharded path without process groups: ranks 4..1 compute their items (rank 4 owns no chunk),
    then rank 0 its own, then rank 0 assembles them all from the store."""
    from attnaudit.jobs import runner
    from attnaudit.jobs.store import RankStore
    model, settings, noop = make_tiny_model(), AuditSettings(**SMALL), (lambda _: None)
    with ItemStore(tmp_path, fingerprint=_fp()) as main:
        for rank in (4, 3, 2, 1):
            with RankStore(tmp_path, rank=rank, fingerprint=_fp()) as store:
                runner._own_items("t", model, tiny_examples, settings,
                                  runner.shard_runner(store, "t", iter(range(1000)), D.Ranks(rank, 5, rank)), False, noop)
                store.finish()
        runner._own_items("t", model, tiny_examples, settings,
                          runner.shard_runner(main, "t", iter(range(1000)), D.Ranks(0, 5, 0)), False, noop)
        got = runner._audit_one("t", model, tiny_examples, settings,
                                runner.gather_runner(main, "t", iter(range(1000)), D.Ranks(0, 5, 0)), False, noop)
        n_rank_4 = len(json.loads((tmp_path / ".attnaudit" / "ranks" / "rank-4.json").read_text())["items"])
    # 2 chunks, 13 counterfactual, 3 sanity (the attention family: attention and rollout; saliency; random)
    assert n_rank_4 == len([i for i in range(2 + 13 + 3) if i % 5 == 4])
    _same_result(got, audit(model, tiny_examples, settings, progress=False))
