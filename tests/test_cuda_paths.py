"""Every CUDA code path, run on the device and compared against the same computation on the CPU (issue 15).

Covered here (the model forward, four explainers and the bf16 perturbation engine are in tests/test_distributed.py,
tests/test_hf.py and tests/test_perturb.py):
    training under bf16 autocast (model/fit.py) for the three model kinds; every registry explainer on the
    classifier and on the decoder-only LM; every encoder–decoder explainer (`translator_scores`); exact flow on a
    128-token input; the faithfulness table (fp32 engine) and the whole audit (bf16 engine); the audit's retry
    after a CUDA out-of-memory error; the capture's memory against a full recording; the sharded run on NCCL.

Every test is marked `cuda` and skips without a CUDA device. ATTNAUDIT_TEST_DEVICE=cpu runs the same tests with
"cpu" in place of "cuda" (CPU against CPU: it checks the tests' logic on a machine without a GPU; the memory and
NCCL tests skip then):

    ATTNAUDIT_TEST_DEVICE=cpu python -m pytest -q tests/test_cuda_paths.py
"""
from __future__ import annotations

import copy
import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import WORDS, make_tiny_model

from attnaudit.analyses.tables import faithfulness_table
from attnaudit.data.examples import Example
from attnaudit.data.tasks import make_examples
from attnaudit.explain.registry import REGISTRY, get_explainer
from attnaudit.model.train import TrainSettings, task_examples, train_task

# the module (attnaudit.analyses re-exports the function `audit` under the same name)
AUDIT = importlib.import_module("attnaudit.analyses.audit")

_ASKED = os.environ.get("ATTNAUDIT_TEST_DEVICE", "") or "cuda"
if _ASKED not in ("cuda", "cpu"):
    raise ValueError(f"ATTNAUDIT_TEST_DEVICE must be 'cuda' (the default) or 'cpu'; got {_ASKED!r}.")
DEVICE = _ASKED                                  # where the "device" side of every comparison runs
ON_CPU = DEVICE == "cpu"

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]

# Tolerances, device against CPU. fp32 kernels differ only in summation order (cuBLAS vs the CPU's BLAS; TF32 is
# off for matmul by default): ~1e-6 relative per op, so 1e-4 relative to the largest score leaves two decades for
# the few layers and the backward. bf16 keeps 8 bits of mantissa (~4e-3 relative) per op: the perturbation
# engine's probabilities agree within 3e-2 (tests/test_perturb.py); the metrics averaged from them within 5e-2.
# Flow is computed in float64 on the CPU from patterns that agree to ~1e-7: 1e-6 absolute.
FP32_RTOL = 1e-4
BF16_ATOL = 5e-2
FLOW_ATOL = 1e-6

# Cheap settings so the whole registry runs in seconds (as tests/test_explain_contract.py).
FAST = {"integrated_gradients": {"n_steps": 16}, "gradient_shap": {"n_samples": 8},
        "lime": {"n_samples": 64}, "kernel_shap": {"n_samples": 64}}
TEXTS = ["the film was good", "a boring plot", "the story was not bad and the actor was great", "good"]
TARGET = torch.tensor([0, 1, 1, 0])   # fixed, so a near-tie predicted differently on the device changes nothing


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


def on_device(model):
    """A copy of `model` with its weights on DEVICE (the original stays on the CPU)."""
    moved = copy.deepcopy(model).to(DEVICE)
    assert moved.device.type == DEVICE
    return moved


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rtol: float = FP32_RTOL, what: str = "") -> None:
    """got ≈ want within rtol of want's largest magnitude (scores near 0 are compared at that scale)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = float(want.abs().nan_to_num(0.0).max()) if want.numel() else 0.0   # NaN: a metric undefined on both
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-7, equal_nan=True, msg=lambda m: f"{what}: {m}")


# -- 1. training under bf16 autocast (model/fit.py) ------------------------------------------------------------------
TINY_TRAIN = TrainSettings(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=16, epochs=1, batch_size=32, warmup=10,
                           lr_factor=0.5, dropout=0.1, n_train=64, n_valid=16, n_test=16)   # 2 steps


@pytest.mark.parametrize("task", ["needle", "reorder", "copy"])          # classifier, encoder–decoder, decoder-only LM
def test_training_runs_under_bf16_autocast_and_the_model_agrees_with_its_cpu_copy(task):
    seen: list[torch.dtype] = []                  # output dtypes of modules run in training mode (the fit's steps)

    def watch(module, args, output):
        if module.training and isinstance(output, torch.Tensor) and output.is_floating_point():
            seen.append(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(watch)
    try:
        model, metrics = train_task(task, TINY_TRAIN, device=DEVICE, progress=False)
    finally:
        handle.remove()
    assert metrics["device"] == DEVICE and model.device.type == DEVICE
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["last_epoch_loss"]))
    # fit's autocast: bf16 activations while training on CUDA, none on the CPU
    assert (torch.bfloat16 in seen) == (DEVICE == "cuda"), sorted(set(map(str, seen)))
    assert all(p.dtype == torch.float32 for p in model.net.parameters())           # the master weights stay fp32
    cpu = copy.deepcopy(model).to("cpu")
    batch = model.encode(task_examples(task, TINY_TRAIN)["test"][:8], truncate=True)
    with torch.no_grad(), model.evaluating(), cpu.evaluating():
        got, want = model(batch), cpu(batch)       # eval forwards run in fp32 on both devices
    assert got.device.type == DEVICE and torch.isfinite(got).all()
    assert_close_scaled(got, want, what=f"{task} logits")


# -- 2. every explainer, device against CPU --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_on", ["cpu", "device"])   # where the Batch is: as encoded, or moved by the caller
@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registry_explainer_on_the_classifier_matches_the_cpu(name, batch_on):
    cpu = make_tiny_model()
    gpu = on_device(cpu)
    batch = cpu.encode(TEXTS)                     # encode gives CPU tensors: the model moves what it reads
    want = get_explainer(name, **FAST.get(name, {})).explain(cpu, batch, target=TARGET)
    got = get_explainer(name, **FAST.get(name, {})).explain(gpu, batch if batch_on == "cpu" else batch.to(DEVICE),
                                                            target=TARGET)
    assert got.scores.device.type == "cpu" and torch.isfinite(got.scores).all()
    assert_close_scaled(got.scores, want.scores, rtol=FLOW_ATOL if name == "flow" else FP32_RTOL, what=name)
    assert_close_scaled(got.target_prob, want.target_prob, what=f"{name} target_prob")


@pytest.fixture(scope="module")
def lm_pair():
    from test_lm import make_lm

    cpu = make_lm()
    examples = [Example("x", "a 1 b 2 ? b", target="2 c a"), Example("y", "c 3 ?", target="c 3")]
    return cpu, on_device(cpu), cpu.encode(examples)      # step rows: prefixes share one forward


ENCODER_ONLY = {"attnlrp"}          # explain/attnlrp.py: the LRP rules are written for encoders


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registry_explainer_on_the_decoder_lm_matches_the_cpu(lm_pair, name):
    cpu, gpu, batch = lm_pair
    if name in ENCODER_ONLY:
        pytest.skip(f"{name} supports encoder classifiers only: it refuses a language model with a clear error")
    assert batch.steps is not None and batch.labels is not None
    want = get_explainer(name, **FAST.get(name, {})).explain(cpu, batch, target=batch.labels)   # as the audit does
    got = get_explainer(name, **FAST.get(name, {})).explain(gpu, batch, target=batch.labels)
    assert torch.isfinite(got.scores).all()
    assert_close_scaled(got.scores, want.scores, rtol=FLOW_ATOL if name == "flow" else FP32_RTOL, what=name)


@pytest.fixture(scope="module")
def translator():
    tiny = TrainSettings(d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16, epochs=1, batch_size=32, warmup=10,
                         lr_factor=0.5, dropout=0.0, n_train=32, n_valid=8, n_test=8)
    model, _ = train_task("reorder", tiny, device="cpu", progress=False)     # one step: a real, barely trained net
    model.net.eval()
    return model


def test_every_seq2seq_explainer_matches_the_cpu(translator):
    from attnaudit.explain.seq2seq import EXPLAINERS, translator_scores

    pairs = translator.encode(make_examples("reorder", "test", n=3, seed=0))
    params = {"integrated_gradients": {"n_steps": 8}, "gradient_shap": {"n_samples": 4}, "lime": {"n_samples": 32},
              "kernel_shap": {"n_samples": 32}}
    want = translator_scores(translator, pairs, EXPLAINERS, params=params)
    got = translator_scores(on_device(translator), pairs, EXPLAINERS, params=params)
    assert set(got) == set(EXPLAINERS) == set(want)
    for name in EXPLAINERS:
        assert got[name].device.type == "cpu" and got[name].shape == want[name].shape, name
        assert_close_scaled(got[name], want[name], what=name)


# -- 3. exact flow on a long input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers", [2, 3])       # 2: the closed form; 3: Dinic on the pruned network
def test_flow_on_a_128_token_input_equals_the_cpu(n_layers):
    from attnaudit.model.interface import TextClassifier
    from attnaudit.model.transformer import TransformerClassifier, TransformerConfig

    small = make_tiny_model(1, n_layers=n_layers)                    # conftest's model has max_len 32: widen it
    torch.manual_seed(1)
    cfg = TransformerConfig(**{**vars(small.net.cfg), "max_len": 160})
    cpu = TextClassifier(TransformerClassifier(cfg), small.vocab, label_names=small.label_names)
    cpu.net.eval()
    text = " ".join(WORDS[(7 * j) % len(WORDS)] for j in range(126))                 # + [CLS], [SEP] = 128 tokens
    batch = cpu.encode([text])
    assert batch.input_ids.shape == (1, 128)
    flow = get_explainer("flow")
    want = flow.explain(cpu, batch, target=0)
    got = flow.explain(on_device(cpu), batch, target=0)
    assert torch.isfinite(got.scores).all() and float(got.scores.abs().max()) > 0
    torch.testing.assert_close(got.scores.double(), want.scores.double(), rtol=0, atol=FLOW_ATOL)


# -- 4. the perturbation engine, the faithfulness table and the audit -------------------------------------------------
def _metric_values(frame: pd.DataFrame) -> pd.Series:
    keys = ["example_id", "explainer", "metric", "setting"]
    assert not frame.duplicated(keys).any()
    return frame.set_index(keys)["value"].astype(float).sort_index()


def test_faithfulness_table_in_fp32_matches_the_cpu():
    from attnaudit.explain.perturb import PerturbationEngine

    cpu = make_tiny_model()
    gpu = on_device(cpu)
    batch = cpu.encode([Example(id=f"ex{i}", text=t, label=i % 2) for i, t in enumerate(TEXTS)])
    names = ("attention", "rollout", "saliency", "random")
    tables = []
    for model in (cpu, gpu):
        attributions = {n: get_explainer(n).explain(model, batch, target=TARGET) for n in names}
        engine = PerturbationEngine(model, batch, autocast=False)                  # fp32 on CUDA too
        tables.append(faithfulness_table(model, batch, attributions, engine=engine,
                                         metrics=("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc",
                                                  "decision_flip_fraction", "tau_loo")))
    want, got = map(_metric_values, tables)
    assert got.index.equals(want.index) and len(got) > 0
    assert_close_scaled(torch.tensor(got.values), torch.tensor(want.values), what="faithfulness_table")


AUDIT_SETTINGS = dict(explainers=("attention", "rollout", "saliency", "random"), analyses=("faithfulness",),
                      chunk_size=2, max_examples=4, progress=False)
# the averages of probabilities move by bf16 rounding only; tau_loo (a rank correlation) and the decision flip (a
# threshold) can jump at a near tie, so for them only the rows are compared on CUDA, not the values
CONTINUOUS = ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc")


def _examples() -> list[Example]:
    return [Example(id=f"ex{i}", text=t, label=i % 2) for i, t in enumerate(TEXTS)]


def assert_same_metrics(got: pd.DataFrame, want: pd.DataFrame, *, atol: float) -> None:
    g, w = _metric_values(got), _metric_values(want)
    assert g.index.equals(w.index) and len(g) > 0
    continuous = g.index.get_level_values("metric").isin(CONTINUOUS)
    assert continuous.any()
    picked = slice(None) if atol < 1e-3 else continuous                      # bf16: the continuous metrics
    torch.testing.assert_close(torch.tensor(g[picked].values), torch.tensor(w[picked].values), rtol=0, atol=atol,
                               equal_nan=True)


@pytest.fixture(scope="module")
def device_audit():
    return AUDIT.audit(on_device(make_tiny_model()), _examples(), **AUDIT_SETTINGS)


def test_audit_with_the_bf16_engine_matches_the_cpu(device_audit):
    want = AUDIT.audit(make_tiny_model(), _examples(), **AUDIT_SETTINGS)
    assert device_audit.failures == {} and [x["id"] for x in device_audit.examples] == [x["id"] for x in want.examples]
    # on CUDA the engine's forwards run under bf16 autocast (explain/perturb.py): within BF16_ATOL
    assert_same_metrics(device_audit.metrics, want.metrics, atol=1e-6 if ON_CPU else BF16_ATOL)


# -- 5. the retry after a CUDA out-of-memory error --------------------------------------------------------------------
def test_out_of_memory_on_the_first_chunk_is_retried_in_halves_with_the_same_metrics(device_audit, monkeypatch):
    real, calls = AUDIT._chunk, []

    def first_call_fails(model, batch, explainers, settings):
        calls.append((list(batch.ids), settings.max_batch))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(model, batch, explainers, settings)

    monkeypatch.setattr(AUDIT, "_chunk", first_call_fails)
    result = AUDIT.audit(on_device(make_tiny_model()), _examples(), **AUDIT_SETTINGS)
    full = AUDIT.AuditSettings().max_batch
    assert calls == [(["ex0", "ex1"], full), (["ex0"], full // 2), (["ex1"], full // 2), (["ex2", "ex3"], full)]
    assert result.failures == {} and [x["id"] for x in result.examples] == [x["id"] for x in device_audit.examples]
    # the halves run other batch shapes: on CUDA, bf16 kernels may round differently; on the CPU the same values
    assert_same_metrics(result.metrics, device_audit.metrics, atol=1e-6 if ON_CPU else BF16_ATOL)


# -- 6. the capture keeps less than a full recording ------------------------------------------------------------------
def test_rollout_peak_cuda_memory_is_below_a_full_recording_of_every_layer():
    if ON_CPU:
        pytest.skip("torch.cuda.max_memory_allocated needs a CUDA device (ATTNAUDIT_TEST_DEVICE=cpu)")
    from attnaudit.model.hooks import record
    from attnaudit.model.interface import TextClassifier
    from attnaudit.model.transformer import TransformerClassifier, TransformerConfig
    from attnaudit.model.vocab import Vocab

    torch.manual_seed(0)
    words = [f"w{i}" for i in range(200)]
    vocab = Vocab.build([" ".join(words)])
    cfg = TransformerConfig(vocab_size=len(vocab), n_classes=2, d_model=32, n_heads=4, n_layers=4, d_ff=64,
                            dropout=0.1, max_len=256)
    model = TextClassifier(TransformerClassifier(cfg), vocab, label_names=["a", "b"]).to(DEVICE)
    model.net.eval()
    batch = model.encode([" ".join(words[(7 * i + j) % 200] for j in range(254)) for i in range(4)])
    assert batch.input_ids.shape == (4, 256)
    rollout = get_explainer("rollout")
    rollout.explain(model, model.encode(["w1 w2"]))                          # warm-up: kernels, allocator

    def peak(run) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        kept = run()
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - before
        del kept
        return used

    def full_recording():
        with torch.no_grad(), model.evaluating():                            # the cheapest full recording
            _, cache = record(model, batch, model.attention_sites)
            return cache.stack()                                             # [layer, batch, head, query, key]

    rollout_peak = peak(lambda: rollout.explain(model, batch))
    record_peak = peak(full_recording)
    one_stack = 4 * 4 * 4 * 256 * 256 * 4                                   # L·B·H·n² float32 bytes: 16 MiB
    assert record_peak >= one_stack
    assert rollout_peak < record_peak, (rollout_peak, record_peak)


# -- 7. the sharded run on NCCL ---------------------------------------------------------------------------------------
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from conftest import make_tiny_model
from attnaudit import distributed
from attnaudit.analyses.audit import AuditSettings
from attnaudit.data.examples import Example
from attnaudit.jobs.store import dumps, frame_payload
texts = ["the film was good", "a boring plot", "the story was not bad and the actor was great", "good", "bad plot"]
examples = [Example(id=f"ex{{i}}", text=t, label=i % 2) for i, t in enumerate(texts)]
env = distributed.from_env()
model = make_tiny_model().to(f"cuda:{{env.local_rank if env.world_size > 1 else 0}}")
result = distributed.audit(model, examples, AuditSettings(**{small!r}), out={out!r})
if env.is_main:
    open({saved!r}, "w").write(dumps({{"metrics": frame_payload(result.metrics), "curves": frame_payload(result.curves),
        "attributions": result.attributions, "examples": result.examples}}))
"""
NCCL_SMALL = dict(explainers=("attention", "rollout", "saliency", "random"), analyses=("faithfulness",), chunk_size=2,
                  max_examples=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_on_nccl_gives_the_single_process_bytes(tmp_path):
    if ON_CPU:
        pytest.skip("NCCL needs CUDA devices (ATTNAUDIT_TEST_DEVICE=cpu)")
    if torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL with two ranks needs two CUDA devices; this machine has {torch.cuda.device_count()}")
    tests = str(Path(__file__).resolve().parent)
    saved = {}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port())]
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env = {**clean, "OMP_NUM_THREADS": "1", "ATTNAUDIT_DIST_TIMEOUT": "60", "ATTNAUDIT_DIST_BACKEND": "nccl"}
    for label, prefix in (("one", [sys.executable]), ("two", torchrun)):
        script = tmp_path / f"{label}.py"
        script.write_text(SCRIPT.format(tests=tests, small=NCCL_SMALL, out=str(tmp_path / f"out-{label}"),
                                        saved=str(tmp_path / f"{label}.json")))
        done = subprocess.run([*prefix, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        saved[label] = (tmp_path / f"{label}.json").read_bytes()
    assert saved["two"] == saved["one"]
