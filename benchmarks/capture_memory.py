"""Peak memory of one attention-family `explain` call against input length: the full capture vs what each reads.

A random BERT-base-sized built-in Transformer (12 layers, 12 heads, d_model 768, d_ff 3072, max_len 512; no
downloads) explains a batch of `batch` texts of n tokens (the last one 3n/4, so there is padding). Each
configuration runs in a fresh subprocess: it builds the model, runs one warm-up `explain` at 8 tokens, reads
the baseline, runs one `explain` and reports its peak: resource.getrusage's ru_maxrss minus the baseline
(and torch.cuda.max_memory_allocated minus the memory allocated before the call, with CUDA). Modes:

    full     the full capture (`capture(..., reads=None)`: every layer's pattern, gradient and value vectors,
             what every attention explainer kept before `reads`), the explainer reading its stacks
    reads    `Explainer.explain` as it is: the capture keeps what the explainer's `reads` names
    forward  the model's forward alone (no_grad), the floor every explain call pays for its prediction

It prints medians over --rounds rounds, and the budget rule: peak ≈ c · L·H·n²·4 bytes per example, c the
median over the configurations with n >= 256 of peak / (batch · L·H·n²·4) (L·H·n²·4 bytes: one float32 copy
of the whole pattern stack, 151 MB per example at n = 512). Flow is measured at n <= --flow-max (its exact max
flow takes ~2.6 min per example at 512; the benchmark lifts its max_cells). RSS is glibc's as a user gets it:
freed blocks under its mmap threshold may stay resident, so it can exceed the live tensors.

The defaults (batch 1, 46 subprocesses) took 336 s on 2 loaded cores; README's figures add batch 8 (~18 min):

    OMP_NUM_THREADS=1 python benchmarks/capture_memory.py [--rounds 1] [--lengths 64,128,256,512]
        [--batch-sizes 1] [--batch8-max 128] [--flow-max 64] [--workers 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

EXPLAINERS = ("attention", "rollout", "flow", "grad_attention", "attention_x_grad", "attention_norm")
N_LAYERS, N_HEADS, D_MODEL = 12, 12, 768
WORDS = [f"w{i}" for i in range(1000)]


def build_model(device: str):
    import torch

    from attnaudit.model.interface import TextClassifier
    from attnaudit.model.transformer import TransformerClassifier, TransformerConfig
    from attnaudit.model.vocab import Vocab

    torch.manual_seed(0)
    vocab = Vocab.build([" ".join(WORDS)])
    cfg = TransformerConfig(vocab_size=len(vocab), n_classes=2, d_model=D_MODEL, n_heads=N_HEADS, n_layers=N_LAYERS,
                            d_ff=4 * D_MODEL, dropout=0.1, max_len=512)
    model = TextClassifier(TransformerClassifier(cfg), vocab, label_names=["neg", "pos"])
    model.net.eval()
    return model.to(device) if device != "cpu" else model


def texts(n: int, batch: int) -> list[str]:
    """`batch` texts of n tokens with [CLS] and [SEP]; the last of a batch > 1 has 3n/4 (padding)."""
    lengths = [n] * batch
    if batch > 1:
        lengths[-1] = 3 * n // 4
    return [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(length - 2)) for i, length in enumerate(lengths)]


def peak_rss() -> int:
    """The process's peak resident set in bytes: ru_maxrss (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    """Lower the peak to the current resident set (Linux: 5 > /proc/self/clear_refs), so that what model building
    reached does not hide the call's peak -> whether it worked (else the baseline is the earlier peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss() <= current_rss() + 2**20


def child(config: dict) -> dict:
    """One measurement in this (fresh) process -> {"rss": bytes, "cuda": bytes or None, "seconds": s}."""
    import torch

    from attnaudit.explain import get_explainer
    from attnaudit.explain.capture import AttentionExplainer

    torch.set_num_threads(1)
    device = config["device"]
    model = build_model(device)
    name = config["explainer"]
    explainer = None if config["mode"] == "forward" else get_explainer(name, **({"max_cells": 10**9} if name == "flow" else {}))
    if config["mode"] == "full":                       # the full capture: every layer's pattern, gradient, values
        explainer.reads = AttentionExplainer.reads.__get__(explainer)   # type: ignore[method-assign]
    batch = model.encode(texts(config["n"], config["batch"]))
    assert batch.input_ids.shape == (config["batch"], config["n"]), batch.input_ids.shape

    def run(b):
        if config["mode"] == "forward":
            with torch.no_grad(), model.evaluating():
                return model(b)
        assert explainer is not None
        return explainer.explain(model, b)

    run(model.encode(texts(8, config["batch"])))       # warm-up: kernels, allocator, lazy imports
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before_cuda = torch.cuda.memory_allocated()
    reset = reset_peak_rss()
    before = current_rss() if reset else peak_rss()
    start = time.perf_counter()
    run(batch)
    seconds = time.perf_counter() - start
    out = {"rss": peak_rss() - before, "cuda": None, "seconds": seconds, "reset": reset}
    if cuda:
        torch.cuda.synchronize()
        out["cuda"] = torch.cuda.max_memory_allocated() - before_cuda
    return out


def measure(config: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--lengths", default="64,128,256,512")
    parser.add_argument("--batch-sizes", default="1", help="e.g. 1,8 (batch 8 adds ~10 min on 2 cores)")
    parser.add_argument("--batch8-max", type=int, default=128, help="longest n for batches > 1 (0: every length)")
    parser.add_argument("--flow-max", type=int, default=64, help="longest n for flow (its exact max flow, not the "
                        "capture, dominates its time and memory: ~1 s per example at 128, ~2.6 min at 512)")
    parser.add_argument("--explainers", default=",".join(EXPLAINERS))
    parser.add_argument("--workers", type=int, default=2, help="subprocesses at once (memory is per process)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    configs = []
    for batch in (int(x) for x in args.batch_sizes.split(",")):
        for n in lengths:
            if batch > 1 and args.batch8_max and n > args.batch8_max:
                continue
            configs.append({"explainer": "(forward)", "mode": "forward", "n": n, "batch": batch})
            for name in args.explainers.split(","):
                if name == "flow" and n > args.flow_max:
                    continue
                for mode in ("full", "reads"):
                    configs.append({"explainer": name, "mode": mode, "n": n, "batch": batch})
    jobs = [dict(c, device=args.device, round=r) for r in range(args.rounds) for c in configs]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(measure, jobs))
    by_config: dict[tuple, list[dict]] = {}
    for job, result in zip(jobs, results):
        by_config.setdefault((job["explainer"], job["mode"], job["n"], job["batch"]), []).append(result)

    def median(key, field):
        values = [r[field] for r in by_config.get(key, []) if r[field] is not None]
        return statistics.median(values) if values else None

    mb = 1e6
    cuda = args.device.startswith("cuda")
    print(f"{N_LAYERS} layers × {N_HEADS} heads, d_model {D_MODEL}, device {args.device}, {args.rounds} round(s), "
          f"medians; MB = 1e6 bytes of peak {'CUDA memory' if cuda else 'RSS'} above the baseline")
    print(f"{'explainer':<17} {'batch':>5} {'n':>4} {'patterns':>9} {'full':>9} {'reads':>9} {'full/reads':>10} "
          f"{'s (reads)':>9}")
    field = "cuda" if cuda else "rss"
    for batch in sorted({c["batch"] for c in configs}):
        for name in ["(forward)", *args.explainers.split(",")]:
            for n in lengths:
                cells = batch * N_LAYERS * N_HEADS * n * n * 4 / mb
                if name == "(forward)":
                    value = median((name, "forward", n, batch), field)
                    if value is not None:
                        print(f"{name:<17} {batch:>5} {n:>4} {cells:>9.1f} {value / mb:>9.1f}")
                    continue
                full, reads = median((name, "full", n, batch), field), median((name, "reads", n, batch), field)
                if full is None or reads is None:
                    continue
                seconds = median((name, "reads", n, batch), "seconds")
                print(f"{name:<17} {batch:>5} {n:>4} {cells:>9.1f} {full / mb:>9.1f} {reads / mb:>9.1f} "
                      f"{full / max(reads, 1):>10.1f} {seconds:>9.2f}")
    print("\nbudget rule: peak ≈ c · L·H·n²·4 bytes per example (c: median over n >= 256 of peak / (batch·L·H·n²·4))")
    for name in ["(forward)", *args.explainers.split(",")]:
        parts = []
        for mode in (("forward",) if name == "(forward)" else ("full", "reads")):
            ratios = [median(key, field) / (key[3] * N_LAYERS * N_HEADS * key[2] ** 2 * 4)
                      for key in by_config if key[0] == name and key[1] == mode and key[2] >= 256]
            if ratios:
                parts.append(f"{mode} c = {statistics.median(ratios):.2f}")
        if parts:
            print(f"  {name:<17} " + ", ".join(parts))
    print(f"\n{len(jobs)} subprocesses in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
