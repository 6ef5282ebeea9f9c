"""Long analyses survive faults and hostile inputs and lose nothing (issue 7).

Ctrl-C / SIGTERM mid-run then --resume equals an uninterrupted run; an injected fault or out-of-memory error
on one item leaves the others saved; example ids cannot lead writes out of the output folder; no hook stays
behind; the same seed gives byte-identical tables; a pickle is never unpickled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_run, make_tiny_model
from test_jobs import TINY_TOML

from attnaudit import get_explainer, load_model
from attnaudit.analyses.audit import audit
from attnaudit.analyses.report_files import read_json_lines
from attnaudit.data.examples import Example
from attnaudit.explain.registry import REGISTRY
from attnaudit.jobs.store import ItemStore
from attnaudit.model.checkpoint import save_checkpoint
from attnaudit.model.hooks import active_hook_count, hooks, record

REPO = Path(__file__).resolve().parents[1]
AUDIT = sys.modules.get("attnaudit.analyses.audit") or importlib.import_module("attnaudit.analyses.audit")
# two tasks × (8 chunks of 2 examples + 13 counterfactual items (4 tests × 3 layers: 0, 1, all, + head ablation)
# + 4 sanity items: attention and rollout share one, saliency, occlusion, random one each) = 50 saved items,
# each a fraction of a second
CONFIG = (TINY_TOML.replace("max_examples = 8", "max_examples = 16").replace("chunk_size = 4", "chunk_size = 2")
          .replace("[train.majority]\nepochs = 2\n\n", ""))
N_ITEMS = 50
TABLES = ("metrics.csv.gz", "curves_mean.csv", "counterfactual.csv", "counterfactual_permutation.csv")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


def attnaudit_process(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "attnaudit", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted `attnaudit run` (it trains the two tiny models into runs/, which later runs reuse)."""
    root = tmp_path_factory.mktemp("reliability")
    (root / "tiny.toml").write_text(CONFIG)
    proc = attnaudit_process("run", "--config", root / "tiny.toml", "--out", root / "reference", "--runs", root / "runs",
                             "--quiet")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return root


def _done(out: Path) -> int:
    path = out / ".attnaudit" / "manifest.json"
    return sum(e["status"] == "done" for e in manifest_items(out).values()) if path.is_file() else 0


def manifest_items(out: Path) -> dict:
    return json.loads((out / ".attnaudit" / "manifest.json").read_text())["items"]



# -- interrupted and resumed --------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_interrupted_run_exits_130_and_resume_equals_an_uninterrupted_run(reference, signum):
    out, args = reference / f"interrupted-{signum.name}", ("--config", reference / "tiny.toml", "--runs",
                                                            reference / "runs", "--quiet")
    proc = attnaudit_process("run", "--out", out, *args)
    try:
        deadline = time.monotonic() + 300
        # wait for an item the manifest records as done (its file lands a moment before the manifest does)
        while proc.poll() is None and not _done(out):
            assert time.monotonic() < deadline, "no item was saved in 300 s"
            time.sleep(0.005)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("interrupted: finished items are saved; run the same command with --resume "
                                            "to continue.") and "Traceback" not in err
    done = [k for k, e in manifest_items(out).items() if e["status"] == "done"]
    assert 1 <= len(done) < N_ITEMS                                   # interrupted mid-analysis, work kept
    assert not (out / "metrics.csv.gz").exists() and not (out / "results.json").exists()                         # no report from a part of the items
    assert not (out / ".attnaudit" / "lock").exists()                 # the lock is released
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left

    proc = attnaudit_process("run", "--out", out, "--resume", *args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert len(manifest_items(out)) == N_ITEMS
    for name in TABLES:
        assert (out / name).read_bytes() == (reference / "reference" / name).read_bytes(), name


# -- reproducible -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_same_seed_gives_byte_identical_tables_and_records_provenance(reference):
    """A second run from scratch (its own training too) gives the same bytes; results.json says how they were made."""
    again = reference / "again"
    proc = attnaudit_process("run", "--config", reference / "tiny.toml", "--out", again, "--runs", again / "runs",
                             "--quiet")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    for name in TABLES:
        assert (again / name).read_bytes() == (reference / "reference" / name).read_bytes(), name
    for task in ("needle", "majority"):
        weights = [next((r / "runs").glob(f"{task}*")) / "model.safetensors" for r in (reference, again)]
        assert len({hashlib.sha256(w.read_bytes()).hexdigest() for w in weights}) == 1
    results = json.loads((reference / "reference" / "results.json").read_text())
    settings = results["settings"]
    assert settings["seed"] == 3 and settings["device"] == "cpu" and results["device"] == "cpu"
    assert settings["deterministic"] is torch.are_deterministic_algorithms_enabled() is False
    assert settings["n_truncated"] == {"needle": 0, "majority": 0}
    assert {"attnaudit", "torch", "captum", "numpy", "python"} <= set(results["versions"])


# -- one bad item -------------------------------------------------------------------------------------
def faulty_chunk(fault, calls: list):
    """_chunk that raises `fault` on the examples of the second chunk it sees (while more than `fits` of them)."""
    real, bad = AUDIT._chunk, []

    def chunk(model, batch, explainers, settings):
        calls.append((list(batch.ids), settings.max_batch))
        if len(calls) == 2:
            bad.extend(batch.ids)
        if bad and set(batch.ids) <= set(bad) and fault(len(batch)):
            raise fault.error
        return real(model, batch, explainers, settings)
    return chunk


class Fault:
    def __init__(self, error: BaseException, fits: int = 0):
        self.error, self.fits = error, fits

    def __call__(self, n: int) -> bool:
        return n > self.fits


@pytest.mark.parametrize("error", [RuntimeError("injected fault"),
                                   torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")],
                         ids=["RuntimeError", "OutOfMemoryError-twice"])
@pytest.mark.slow
def test_one_failed_item_leaves_the_others_saved_exit_3_and_resume_finishes(reference, capsys, monkeypatch, error):
    out = reference / f"faulty-{type(error).__name__}"
    args = ("run", "--config", reference / "tiny.toml", "--runs", reference / "runs", "--out", out, "--quiet")
    calls = []
    monkeypatch.setattr(AUDIT, "_chunk", faulty_chunk(Fault(error), calls))
    code, _, err = cli_run(capsys, *args)
    assert code == 3, err
    item = "needle.chunk-0001-of-0008"
    assert err.splitlines() == [
        "error: 1 item(s) failed; the others are saved:", f"  {item}: {type(error).__name__}: {error}",
        "fix the cause and run the same command with --resume to compute only the failed items."]
    entries = manifest_items(out)
    assert entries[item]["status"] == "failed"
    assert sorted(k for k, e in entries.items() if e["status"] == "done") == sorted(set(entries) - {item})
    assert len(entries) == N_ITEMS
    if isinstance(error, torch.cuda.OutOfMemoryError):                # retried once, as two halves at half the batch
        assert [len(ids) for ids, _ in calls[1:3]] == [2, 1] and calls[2][1] == calls[1][1] // 2
        assert not set(calls[3][0]) & set(calls[1][0])                 # the first half failed too: no third try
    monkeypatch.undo()
    code, _, err = cli_run(capsys, *args[:-1], "--resume", "--quiet")
    assert code == 0, err
    assert (out / "metrics.csv.gz").read_bytes() == (reference / "reference" / "metrics.csv.gz").read_bytes()


def test_out_of_memory_on_a_chunk_is_retried_as_two_halves(tiny_model, monkeypatch, tmp_path):
    from attnaudit.jobs import store_runner
    calls = []
    monkeypatch.setattr(AUDIT, "_chunk", faulty_chunk(Fault(torch.cuda.OutOfMemoryError("CUDA out of memory"), fits=1),
                                                      calls))
    xs = [Example(id=f"e{i}", text=t, label=i % 2) for i, t in enumerate(
        ["the film was good", "a boring plot", "not bad", "great story and actor", "the plot", "good film"])]
    with ItemStore(tmp_path, fingerprint={"test": 1}) as store:
        result = audit(tiny_model, xs, chunk_size=2, explainers=("attention", "saliency"), analyses=("faithfulness",),
                       runner=store_runner(store, "t"))
        assert store.failures() == {} and len(store.items()) == 3
    assert result.failures == {}
    assert [x["id"] for x in result.examples] == [x.id for x in xs]
    assert set(result.metrics["example_id"]) == {x.id for x in xs}
    full = AUDIT.AuditSettings().max_batch
    assert calls[1:5] == [(["e2", "e3"], full), (["e2"], full // 2), (["e3"], full // 2), (["e4", "e5"], full)]


def test_an_all_padding_example_fails_its_item_and_the_others_finish(tiny_model, tmp_path):
    from attnaudit.jobs import store_runner
    batch = tiny_model.encode([Example(id=f"e{i}", text=t, label=i % 2) for i, t in enumerate(
        ["the film was good", "a boring plot", "not bad", "great story and actor"])])
    mask = batch.attention_mask.clone()
    mask[2] = False                                                   # e2: nothing but padding
    batch = dataclasses.replace(batch, attention_mask=mask)
    with ItemStore(tmp_path, fingerprint={"test": 1}) as store:
        result = audit(tiny_model, batch, chunk_size=2, explainers=("attention", "saliency"), analyses=("faithfulness",),
                       runner=store_runner(store, "t"))
        assert store.failures() == {"t.chunk-0001-of-0002": "ValueError: every example needs at least one real token; "
                                    "example 'e2' is all padding (its attention_mask row is all False)."}
    assert result.failures == {"chunk-0001-of-0002": "examples 2..3 failed"}
    assert set(result.metrics["example_id"]) == {"e0", "e1"}


# -- paths from user data -----------------------------------------------------------------------------
EVIL_IDS = ["../../evil", "/tmp/evil-absolute", "..\\..\\evil", "..", "a/../../../evil", "<img src=x>", "=1+1"]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_path_traversal_ids_stay_inside_the_store(tmp_path):
    out = tmp_path / "out"
    before = files_under(tmp_path)
    with ItemStore(out, fingerprint={"t": 1}) as store:
        for i, item in enumerate(EVIL_IDS):
            assert store.run(item, lambda i=i: {"i": i}) == {"i": i}
    with ItemStore(out, fingerprint={"t": 1}, resume=True) as store:
        assert [store.load(item)["i"] for item in EVIL_IDS] == list(range(len(EVIL_IDS)))
    new = files_under(tmp_path) - before
    assert all(p.resolve().is_relative_to(out.resolve()) for p in new), sorted(new)
    assert len(list((out / ".attnaudit" / "items").glob("*.json"))) == len(EVIL_IDS)
    assert not Path("/tmp/evil-absolute").exists() and not (tmp_path.parent / "evil").exists()


@pytest.mark.slow
def test_path_traversal_ids_stay_inside_the_report_folder(tmp_path, capsys):
    model_dir = save_checkpoint(make_tiny_model(), tmp_path / "model")
    data = tmp_path / "data" / "reviews.csv"
    data.parent.mkdir()
    rows = ["the film was good", "a boring plot", "not bad", "great story", "the plot", "good film", "a film " * 20]
    data.write_text("id,text,label\n" + "".join(f'"{i}",{t},c{n % 2}\n' for n, (i, t) in enumerate(zip(EVIL_IDS, rows))))
    config = tmp_path / "audit.toml"
    config.write_text('[audit]\nexplainers = ["attention", "occlusion"]\nchunk_size = 3\nn_permutations = 2\n'
                      'adversarial_steps = 2\nsanity_examples = 2\ncounterfactual_examples = 4\n')
    out = tmp_path / "report"
    before = files_under(tmp_path)
    code, _, err = cli_run(capsys, "analyze", "--model", model_dir, "--data", data, "--text-col", "text",
                           "--label-col", "label", "--config", config, "--out", out, "--quiet")
    assert code == 0, err
    new = files_under(tmp_path) - before
    assert new and all(p.resolve().is_relative_to(out.resolve()) for p in new), sorted(new - files_under(out))
    assert not Path("/tmp/evil-absolute").exists() and not (tmp_path / "evil").exists()
    examples = read_json_lines(out / "examples.jsonl.gz")
    assert [x["id"] for x in examples] == EVIL_IDS                   # kept as data, never as a path
    assert [x["truncated"] for x in examples] == [False] * 6 + [True]   # 40 words, 30 positions: cut, and recorded
    assert json.loads((out / "results.json").read_text())["settings"]["n_truncated"] == {"reviews": 1}
    # and straight through the library: audit -> write_report
    result = audit(make_tiny_model(), [Example(id=i, text=t, label=n % 2) for n, (i, t) in enumerate(zip(EVIL_IDS, rows))],
                   explainers=("attention",), analyses=("faithfulness",))
    before = files_under(tmp_path)
    result.write_report(tmp_path / "lib" / "report")
    new = files_under(tmp_path) - before
    assert all(p.resolve().is_relative_to((tmp_path / "lib").resolve()) for p in new)


# -- hook hygiene -------------------------------------------------------------------------------------
QUICK = {"integrated_gradients": {"n_steps": 8}, "lime": {"n_samples": 20}, "kernel_shap": {"n_samples": 20},
         "gradient_shap": {"n_samples": 4}}
TEXTS = ["the film was not good", "a boring plot"]


class Boom(RuntimeError):
    pass


def failing_forward(module, after: int):
    """Make `module` raise Boom in every forward after its first `after` calls."""
    real, calls = module.forward, []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise Boom("raised inside a forward")
        return real(*args, **kwargs)
    module.forward = forward


def _use(what: str, model, target):
    batch = model.encode(TEXTS)
    if what == "record":
        if target == "bad":
            record(model, batch, names="encoder.layers.9.self_attn.pattern")
        for _ in range(2):
            record(model, batch, grads=True)[0].sum().backward()
    elif what == "hooks":
        edit = (lambda p, allowed: p[:, :1]) if target == "bad" else (lambda p, allowed: p)   # bad: wrong shape
        with hooks(model, {"*.self_attn.pattern": edit}):
            model(batch)
            model(batch)
    elif what == "audit":
        audit(model, [Example(id=str(i), text=t, label=i) for i, t in enumerate(TEXTS)],
              explainers=("attention", "rollout", "saliency", "deeplift"), n_permutations=2, adversarial_steps=2,
              sanity_examples=2, **({"explainer_params": {"rollout": {"start_layer": 7}}} if target == "bad" else {}))
    else:
        get_explainer(what, **QUICK.get(what, {})).explain(model, batch, target=5 if target == "bad" else None)


@pytest.mark.parametrize("what", ["record", "hooks", *REGISTRY, "audit"])
@pytest.mark.parametrize("how", ["success", "bad target", "exception in the first forward",
                                 "exception in a later forward"])
def test_no_hook_remains(what, how):
    if what == "random" and "later" in how:
        pytest.skip("the random control makes one forward only")
    model = make_tiny_model()
    if how.startswith("exception"):
        failing_forward(model.net.encoder.layers[1].ff, after=0 if "first" in how else 1)
    expected = {"success": None, "bad target": ValueError}.get(how, Boom)
    if expected is None:
        _use(what, model, None)
    else:
        with pytest.raises(expected):
            _use(what, model, "bad" if how == "bad target" else None)
    assert active_hook_count(model.net) == 0
    assert not model.net.training


# -- pickles ------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates the marker file: the proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def pickles(tmp_path):
    marker = tmp_path / "payload-ran"
    raw = pickle.dumps(Payload(marker))
    made = {"file.pt": tmp_path / "evil.pt", "file.bin": tmp_path / "evil.bin"}
    made["file.pt"].write_bytes(raw)
    torch.save({"weights": Payload(marker)}, made["file.bin"])       # torch's zip format, a pickle inside
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "pytorch_model.bin").write_bytes(raw)
    (ours / "config.json").write_text(json.dumps({"format": "attnaudit", "kind": "classifier"}))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "pytorch_model.bin").write_bytes(raw)
    (hf / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"],
                                                "model_type": "bert"}))
    made.update({"our folder": ours, "HuggingFace folder": hf})
    assert not marker.exists()
    return marker, made


@pytest.mark.parametrize("kind", ["file.pt", "file.bin", "our folder", "HuggingFace folder"])
def test_a_pickle_is_refused_by_load_model_and_never_run(pickles, kind):
    marker, made = pickles
    with pytest.raises((ValueError, OSError)) as info:
        load_model(made[kind])
    assert not marker.exists()
    if kind != "file.pt" and kind != "file.bin":
        assert "pickle" in str(info.value)


@pytest.mark.parametrize("kind", ["file.pt", "file.bin", "our folder", "HuggingFace folder"])
def test_a_pickle_is_refused_by_explain_and_never_run(pickles, capsys, kind):
    marker, made = pickles
    code, out, err = cli_run(capsys, "explain", "--model", made[kind], "--text", "the film")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "pickle" in err and not marker.exists()


@pytest.mark.slow
def test_a_pickle_file_is_refused_in_a_fresh_process(pickles):
    marker, made = pickles
    proc = attnaudit_process("explain", "--model", made["file.pt"], "--text", "the film")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.startswith("error: --model ") and "Traceback" not in err, err
    assert "is a pickle-based checkpoint file, which attnaudit never loads" in err and not marker.exists()
