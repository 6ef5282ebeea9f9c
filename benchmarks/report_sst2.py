"""Regenerate reports/sst2: the built-in Transformer trained on SST-2, audited on the SST-2 dev set.

    python benchmarks/report_sst2.py                 # reuses runs/sst2 when it holds this exact run
    python benchmarks/report_sst2.py --retrain       # train again first

Equivalent commands:
    attnaudit train --data ../shared/data/sst2/train.tsv.gz --text-col sentence --label-col label \\
        --valid ../shared/data/sst2/dev.tsv --out runs/sst2
    attnaudit analyze --model runs/sst2 --data ../shared/data/sst2/dev.tsv --text-col sentence --label-col label \\
        --config benchmarks/report_sst2.toml --out reports/sst2 --overwrite

The model's epoch is chosen on the dev set (GLUE's test labels are not public), so its dev accuracy is
optimistic by the amount that choice adds; the audit's faithfulness figures are about the model's own
predictions and do not depend on that. Prints the stage times; the report states them too.
"""
from __future__ import annotations

from _real_data import ROOT, Stopwatch, arguments, audit_and_report, trained_here

from attnaudit.model.settings import defaults_for
from attnaudit.model.train import train_to_folder

CONFIG = ROOT / "benchmarks" / "report_sst2.toml"


def main() -> None:
    args = arguments(__doc__, report="sst2", model="sst2")
    sst2 = args.data / "sst2"
    train, dev = sst2 / "train.tsv.gz", sst2 / "dev.tsv"
    settings = defaults_for(None)
    clock = Stopwatch()
    metrics = None if args.retrain else trained_here(args.model, settings.to_dict(), {"sha256": train, "valid_sha256": dev})
    if metrics is None:
        _, metrics = train_to_folder(args.model, data=train, text_col="sentence", label_col="label", valid=dev,
                                     settings=settings, device=args.device, overwrite=True)
        clock.stage("train")
    else:
        print(f"reusing the model in {args.model}")
    print(f"SST-2 dev accuracy {metrics['valid_accuracy']:.3f} (best epoch {metrics['best_epoch']} of "
          f"{metrics['epochs_run']}, trained in {metrics['train_seconds']:.0f} s on {metrics['device']})")
    audit_and_report(args, clock, data=dev, text_col="sentence", label_col="label", config=CONFIG, name="sst2-dev",
                     title="Can attention explain the built-in Transformer on SST-2? (dev set)")


if __name__ == "__main__":
    main()
