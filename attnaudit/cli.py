"""The `attnaudit` command line: a thin typer shell over library functions that return data.

    attnaudit train --task needle --out runs/needle
    attnaudit train --data reviews.csv --text-col text --label-col label --out runs/reviews
    attnaudit tasks export --task keywords --split test --out keywords-test.jsonl

Library functions raise ValueError / TypeError / OSError (FileNotFoundError...); `main` turns them (and usage
errors) into one `error: ...` line on stderr and exit status 2, without a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer

from attnaudit.model.data import write_jsonl
from attnaudit.model.tasks import TASK_NAMES, get_task, make_examples
from attnaudit.model.train import defaults_for, resolve_device, train_to_folder

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Can a Transformer's attention explain its outputs? Train, explain, audit.")
tasks_app = typer.Typer(no_args_is_help=True, help="The built-in tasks with known evidence.")
app.add_typer(tasks_app, name="tasks")

USER_ERRORS = (ValueError, TypeError, OSError)   # OSError: missing files, folders, permissions


def _headline(metrics: dict) -> str:
    if "test_exact_match" in metrics:
        return f"test exact match {metrics['test_exact_match']:.3f}, test BLEU {metrics['test_bleu']:.1f}"
    return f"test accuracy {metrics['test_accuracy']:.3f}"


@app.command("train")
def train_cli(
    out: Path = typer.Option(..., "--out", help="Model folder to write (created if missing)."),
    task: str = typer.Option(None, "--task", help=f"Built-in task: {', '.join(TASK_NAMES)}."),
    data: Path = typer.Option(None, "--data", help="Your labelled file (.csv, .tsv, .jsonl, optionally .gz)."),
    text_col: str = typer.Option(None, "--text-col", help="Column of --data holding the text."),
    label_col: str = typer.Option(None, "--label-col", help="Column of --data holding the label."),
    valid: Path = typer.Option(None, "--valid", help="Validation file for --data (default: hold out 10%)."),
    seed: int = typer.Option(None, "--seed", help="Seed for data, initialisation and shuffling (default 0)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    epochs: int = typer.Option(None, "--epochs", help="Override the default number of epochs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different model in --out."),
    threads: int = typer.Option(1, "--threads", min=0, help="CPU threads for torch; 1 is fastest for these "
                                "small models and stays fast on a busy machine. 0 leaves torch's default."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar and no summary; only the last line."),
):
    """Train the lecture's Transformer on a built-in task or your own file; write a model folder."""
    if (task is None) == (data is None):
        raise ValueError(f"pass exactly one of --task ({', '.join(TASK_NAMES)}) or --data FILE; "
                         f"got {'both' if task is not None else 'neither'}.")
    if data is None and (text_col or label_col or valid):
        raise ValueError("--text-col, --label-col and --valid go with --data; built-in tasks name their own columns.")
    if data is not None and (not text_col or not label_col):
        raise ValueError(f"--data needs --text-col and --label-col (the columns of {data.name} to use).")
    resolve_device(device)                          # a bad --device fails before any data is read
    if threads:
        torch.set_num_threads(threads)              # results are bitwise reproducible per thread count
    settings = defaults_for(task)                   # unknown task names fail here, with the valid ones
    changes = {k: v for k, v in {"seed": seed, "epochs": epochs}.items() if v is not None}
    settings = settings.replace(**changes)
    path, metrics = train_to_folder(out, task=task, data=data, text_col=text_col, label_col=label_col,
                                    valid=valid, settings=settings, device=device, overwrite=overwrite,
                                    progress=not quiet)
    if not quiet:
        score = "valid exact match" if metrics["kind"] == "seq2seq" else "valid accuracy"
        best = metrics.get("valid_exact_match", metrics.get("valid_accuracy"))
        typer.echo(f"{metrics['task']}: {_headline(metrics)} ({score} {best:.3f}); best epoch "
                   f"{metrics['best_epoch']} of {metrics['epochs_run']}, {metrics['train_seconds']:.1f} s "
                   f"on {metrics['device']}, {metrics['n_train']} training examples")
        if metrics.get("n_truncated"):
            typer.echo(f"note: {metrics['n_truncated']} texts were longer than max_len and were cut")
    typer.echo(f"model saved to {path} ({_headline(metrics)})")


@tasks_app.command("list")
def tasks_list_cli():
    """Print the built-in tasks with their classes and default sizes."""
    for name in TASK_NAMES:
        t = get_task(name)
        classes = ", ".join(t.label_names) if t.label_names else "seq2seq"
        typer.echo(f"{name:<9} [{classes}] train/valid/test {t.sizes['train']}/{t.sizes['valid']}/"
                   f"{t.sizes['test']}: {t.description}")


@tasks_app.command("export")
def tasks_export_cli(
    task: str = typer.Option(..., "--task", help=f"Built-in task: {', '.join(TASK_NAMES)}."),
    split: str = typer.Option(..., "--split", help="train, valid or test."),
    out: Path = typer.Option(..., "--out", help="JSON-lines file to write."),
    seed: int = typer.Option(0, "--seed", help="Generator seed (training uses the same one)."),
    n: int = typer.Option(None, "--n", help="Number of examples (default: the split's size)."),
):
    """Write a split of a built-in task as JSON lines: text, label or target, rationale or alignment."""
    examples = make_examples(task, split, n=n, seed=seed)
    typer.echo(f"wrote {len(examples)} {task} {split} examples to {write_jsonl(examples, out)}")


def main(argv: list[str] | None = None) -> None:
    """The `attnaudit` entry point: runs `app`, turning user errors into `error: ...` and exit status 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="attnaudit", standalone_mode=False)
    except typer.Abort:
        typer.echo("error: aborted.", err=True)
        sys.exit(1)
    except typer.TyperException as e:              # usage errors: unknown option, missing --out, bad int
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if message:                                # empty when the help was shown for a bare command
            typer.echo(f"error: {message}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except USER_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
