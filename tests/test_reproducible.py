"""What is reproduced, and where: the same seed gives the same weights bit for bit in fresh processes on
one CPU kind (torch's CPU capability), thread count and package versions; the capability is recorded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# What makes an AVX2 machine and an AVX-512 machine compute the same bits (measured: pinning ATen alone is not
# enough, MKL's and oneDNN's kernels differ too).
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
TRAIN = ("import sys, torch; torch.set_num_threads(1)\n"
         "from attnaudit.model.settings import defaults_for\n"
         "from attnaudit.model.train import train_to_folder\n"
         "s = defaults_for('needle').replace(n_train=400, epochs=1, d_model=16, n_heads=2, d_ff=32)\n"
         "train_to_folder(sys.argv[1], task='needle', settings=s, progress=False)\n")


def _train(folder: Path, **env) -> tuple[str, dict]:
    subprocess.run([sys.executable, "-c", TRAIN, str(folder)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    from attnaudit.jobs.store import sha256_file
    return sha256_file(folder / "model.safetensors"), cfg["training"]


@pytest.mark.slow
def test_two_fresh_processes_train_identical_weights_and_record_the_cpu_kind(tmp_path):
    sha_a, training = _train(tmp_path / "a")
    sha_b, _ = _train(tmp_path / "b")
    assert sha_a == sha_b
    assert training["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert training["torch_threads"] == 1 and training["torch"] == torch.__version__


@pytest.mark.slow
def test_a_pinned_cpu_kind_is_recorded_and_reproduces(tmp_path):
    """PINNED fixes the vector kernels of torch, MKL and oneDNN to AVX2 (what differs between AVX2 and AVX-512 CPUs)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU's capability is {torch.backends.cpu.get_cpu_capability()}, not AVX2 or AVX512")
    sha_a, training = _train(tmp_path / "a", **PINNED)
    sha_b, _ = _train(tmp_path / "b", **PINNED)
    assert training["cpu_capability"] == "AVX2"
    assert sha_a == sha_b
