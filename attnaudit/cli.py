"""The `attnaudit` command line: a thin typer shell over library functions that return data.

    attnaudit train --task needle --out runs/needle
    attnaudit train --data reviews.csv --text-col text --label-col label --out runs/reviews
    attnaudit finetune --hf my-bert --data reviews.csv --text-col text --label-col label --out runs/my-bert-reviews
    attnaudit train --data movies/train.jsonl --valid movies/val.jsonl --test movies/test.jsonl --out runs/movies
    attnaudit tasks export --task keywords --split test --out keywords-test.jsonl
    attnaudit run [--quick] [--config FILE.toml]       # the main job: train, explain, analyse, report
    attnaudit analyze --model runs/needle --task needle --out reports/needle
    attnaudit report reports/default                    # re-render from the saved results
    attnaudit explain --model runs/needle --text "a b c" --explainer rollout,occlusion

Library functions raise ValueError / TypeError / OSError (FileNotFoundError...); `main` turns them (and usage
errors) into one `error: ...` line on stderr and exit status 2, without a traceback. Ctrl-C or SIGTERM:
the item in flight is abandoned, finished items stay saved, exit status 130 (continue with --resume).
Items that failed (the others finished): listed, exit status 3. Under torchrun (attnaudit.distributed), a rank
that died, hung or refused: named with the --resume command, exit status 4; only rank 0 prints the report lines.
"""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from attnaudit.data.tasks import TASK_NAMES  # light: `--help` and `tasks list` import no torch, pandas or captum

# rich_markup_mode=None: plain help, so "[audit]" is text rather than Rich markup and flags read "--quick"
# (typer's Rich panels print every flag as "--quick <bool>").
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Can a Transformer's attention explain its outputs? Train, explain, audit.")
tasks_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The built-in tasks with known evidence.")
app.add_typer(tasks_app, name="tasks")

USER_ERRORS = (ValueError, TypeError, OSError)   # OSError: missing files, folders, permissions
LABEL_NAMES_HELP = ("Names of the model's classes in index order, comma-separated (e.g. negative,positive for a "
                    "HuggingFace head's LABEL_0,LABEL_1). Integer labels in --data are class indices either way.")
EXPLAIN_CHUNK = 64                               # texts explained together (one progress step)


def _headline(metrics: dict) -> str:
    if "test_exact_match" in metrics:
        return f"test exact match {metrics['test_exact_match']:.3f}, test BLEU {metrics['test_bleu']:.1f}"
    return f"test accuracy {metrics['test_accuracy']:.3f}"


@app.command("train")
def train_cli(
    out: Path = typer.Option(..., "--out", help="Model folder to write (created if missing)."),
    task: str = typer.Option(None, "--task", help=f"Built-in task: {', '.join(TASK_NAMES)}."),
    data: Path = typer.Option(None, "--data", help="Your labelled file (.csv, .tsv, .jsonl, optionally .gz; "
                              "or an ERASER .jsonl / HateXplain .json, which name their own columns)."),
    parallel: Path = typer.Option(None, "--parallel", help="Or 'source ||| target' lines: train the lecture's "
                                  "encoder-decoder on them."),
    text_col: str = typer.Option(None, "--text-col", help="Column of --data holding the text."),
    label_col: str = typer.Option(None, "--label-col", help="Column of --data holding the label."),
    valid: Path = typer.Option(None, "--valid", help="Validation file for --data/--parallel (default: hold out 10%)."),
    test: Path = typer.Option(None, "--test", help="Test file for --data: scored once with the chosen weights."),
    seed: int = typer.Option(None, "--seed", help="Seed for data, initialisation and shuffling (default 0)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    epochs: int = typer.Option(None, "--epochs", help="Override the default number of epochs."),
    max_len: int = typer.Option(None, "--max-len", help="Longest input in tokens; longer texts are cut (default 128)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different model in --out."),
    threads: int = typer.Option(1, "--threads", min=0, help="CPU threads for torch; 1 is fastest for these "
                                "small models and stays fast on a busy machine. 0 leaves torch's default."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar and no summary; only the last line."),
):
    """Train the lecture's Transformer on a built-in task or your own file; write a model folder."""
    from attnaudit.data import data_format
    from attnaudit.model.train import defaults_for, resolve_device, train_to_folder
    given = [n for n, v in (("--task", task), ("--data", data), ("--parallel", parallel)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of --task ({', '.join(TASK_NAMES)}), --data FILE or --parallel FILE; "
                         f"got {' and '.join(given) or 'neither'}.")
    if task is not None and (text_col or label_col or valid or test):
        raise ValueError("--text-col, --label-col, --valid and --test go with --data; built-in tasks bring their own.")
    if parallel is not None and (text_col or label_col):
        raise ValueError("--text-col and --label-col go with --data; --parallel lines are 'source ||| target'.")
    if data is not None and (not text_col or not label_col) and data_format(data) == "table":
        raise ValueError(f"--data needs --text-col and --label-col (the columns of {data.name} to use).")
    resolve_device(device)                          # a bad --device fails before any data is read
    _threads(threads)                               # results are bitwise reproducible per thread count
    settings = defaults_for("reorder" if parallel is not None else task)   # unknown task names fail here
    changes = {k: v for k, v in {"seed": seed, "epochs": epochs, "max_len": max_len}.items() if v is not None}
    settings = settings.replace(**changes)
    path, metrics = train_to_folder(out, task=task, data=data, text_col=text_col, label_col=label_col,
                                    valid=valid, test=test, settings=settings, device=device, overwrite=overwrite,
                                    progress=not quiet, parallel=parallel)
    if not quiet:
        score = "valid exact match" if metrics["kind"] == "seq2seq" else "valid accuracy"
        best = metrics.get("valid_exact_match", metrics.get("valid_accuracy"))
        typer.echo(f"{metrics['task']}: {_headline(metrics)} ({score} {best:.3f}); best epoch "
                   f"{metrics['best_epoch']} of {metrics['epochs_run']}, {metrics['train_seconds']:.1f} s "
                   f"on {metrics['device']}, {metrics['n_train']} training examples")
        if metrics.get("n_truncated"):
            typer.echo(f"note: {metrics['n_truncated']} texts were longer than max_len and were cut")
    typer.echo(f"model saved to {path} ({_headline(metrics)})")


@app.command("finetune")
def finetune_cli(
    hf: Path = typer.Option(..., "--hf", help="HuggingFace model folder to start from (config.json, "
                            "model.safetensors, tokenizer); one without a classification head gets a new one."),
    data: Path = typer.Option(..., "--data", help="Your labelled file (.csv, .tsv, .jsonl, optionally .gz; "
                              "or an ERASER .jsonl / HateXplain .json, which name their own columns)."),
    out: Path = typer.Option(..., "--out", help="Folder to write: an ordinary HuggingFace model folder."),
    text_col: str = typer.Option(None, "--text-col", help="Column of --data holding the text."),
    label_col: str = typer.Option(None, "--label-col", help="Column of --data holding the label."),
    valid: Path = typer.Option(None, "--valid", help="Validation file (default: hold out 10% of --data)."),
    test: Path = typer.Option(None, "--test", help="Test file: scored once with the chosen weights."),
    n_train: int = typer.Option(None, "--n-train", help="Train on a seeded random subset of this many rows."),
    epochs: int = typer.Option(None, "--epochs", help="Passes over the training rows (default 3)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate, reached after warm-up over the first 10% "
                             "of the steps (default 5e-5)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Training examples per step (default 32)."),
    max_len: int = typer.Option(None, "--max-len", help="Training texts are cut to this many tokens (default 128)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the subset, the held-out split, a new head and shuffling."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds."),
    threads: int = typer.Option(1, "--threads", min=0, help="CPU threads for torch. More help on an idle machine "
                                "but are several times slower when other jobs share the cores; 0 leaves torch's "
                                "default (all cores)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar and no summary; only the last line."),
):
    """Fine-tune a HuggingFace classifier (or add and train a head) on your file; write a HuggingFace folder."""
    from attnaudit.jobs.store import interruptible
    from attnaudit.model.finetune import finetune_to_folder
    from attnaudit.model.settings import resolve_device
    resolve_device(device)                          # a bad --device fails before any data is read
    _threads(threads)
    options = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size, "max_len": max_len}.items()
               if v is not None}
    with interruptible():                           # SIGTERM, like Ctrl-C, removes the unfinished folder
        path, metrics = finetune_to_folder(hf, out, data=data, text_col=text_col, label_col=label_col, valid=valid,
                                           test=test, n_train=n_train, seed=seed, device=device,
                                           overwrite=overwrite, progress=not quiet, **options)
    if not quiet:
        tested = f"test accuracy {metrics['test_accuracy']:.3f}, " if metrics["n_test"] else ""
        typer.echo(f"{metrics['task']}: {tested}valid accuracy {metrics['valid_accuracy']:.3f} (before fine-tuning "
                   f"{metrics['initial_valid_accuracy']:.3f}); best epoch {metrics['best_epoch']} of "
                   f"{metrics['epochs_run']}, {metrics['train_seconds']:.1f} s on {metrics['device']}, "
                   f"{metrics['n_train']} training examples")
        if metrics.get("n_truncated"):
            typer.echo(f"note: {metrics['n_truncated']} texts were longer than max_len and were cut")
    typer.echo(f"model saved to {path} (valid accuracy {metrics['valid_accuracy']:.3f})")


@app.command("run")
def run_cli(
    out: Path = typer.Option(None, "--out", help="Report folder to write (default reports/default, "
                             "or reports/quick with --quick)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller models and samples: the whole pipeline in about 2 minutes."),
    config: Path = typer.Option(None, "--config", help="TOML file choosing tasks, explainers, analyses, sizes, seeds."),
    device: str = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
    runs: Path = typer.Option(None, "--runs", help="Where trained models are kept and reused (default runs/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out; finished items are kept."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different report (or its saved items) in --out."),
    full_tables: bool = typer.Option(False, "--full-tables", help="Also keep every example's attributions and "
                                     "curves (default: only what the report shows; metrics are always complete)."),
    threads: int = typer.Option(1, "--threads", min=0, help="CPU threads for torch (0: torch's default)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars; only the last line."),
):
    """The main job: train (or reuse) each built-in task's model, run every explainer and analysis, write the report."""
    from attnaudit.jobs import run_job
    out = out or Path("reports/quick" if quick else "reports/default")
    _job(run_job, threads, quiet, out, quick=quick, config=config, device=device, runs=runs, resume=resume,
         overwrite=overwrite, full_tables=full_tables)


@app.command("analyze")
def analyze_cli(
    model: Path = typer.Option(..., "--model", help="A trained model folder (attnaudit train, or HuggingFace)."),
    out: Path = typer.Option(..., "--out", help="Report folder to write."),
    task: str = typer.Option(None, "--task", help=f"Analyse on a built-in task's test split: {', '.join(TASK_NAMES)}."),
    data: Path = typer.Option(None, "--data", help="Or your labelled file (.csv, .tsv, .jsonl, optionally .gz; "
                              "or ERASER .jsonl / HateXplain .json, whose rationales are scored). For a language "
                              "model: rows with 'prompt' and 'target' (the continuation to explain)."),
    parallel: Path = typer.Option(None, "--parallel", help="Or, for an encoder-decoder, 'source ||| target' lines."),
    alignments: Path = typer.Option(None, "--alignments", help="Gold word alignments for --parallel: one line per "
                                    "pair of 1-indexed 'i-j' (Sure) and 'ipj' (Possible) links; AER is reported."),
    text_col: str = typer.Option(None, "--text-col", help="Column of --data holding the text."),
    label_col: str = typer.Option(None, "--label-col", help="Column of --data holding the label."),
    config: Path = typer.Option(None, "--config", help="TOML file with [audit] choices (explainers, analyses, sizes)."),
    max_examples: int = typer.Option(None, "--max-examples", min=1, help="Analyse the first N examples "
                                     "(default 100, or [audit] max_examples)."),
    name: str = typer.Option(None, "--name", help="What the report calls the data (default: the file's name)."),
    title: str = typer.Option(None, "--title", help="The report's title."),
    label_names: str = typer.Option(None, "--label-names", help=LABEL_NAMES_HELP),
    allow_untrained: bool = typer.Option(False, "--allow-untrained", help="Analyse a model whose classification "
                                         "head was newly initialised at load (its verdict means little)."),
    device: str = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted analysis in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different report in --out."),
    full_tables: bool = typer.Option(False, "--full-tables", help="Also keep every example's attributions and "
                                     "curves (default: only what the report shows; metrics are always complete)."),
    threads: int = typer.Option(1, "--threads", min=0, help="CPU threads for torch (0: torch's default)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars; only the last line."),
):
    """Run every explainer and analysis on a trained model and a dataset; write the report."""
    from attnaudit.jobs import analyze_job
    _job(analyze_job, threads, quiet, _model_folder(model), out, task=task, data=data, parallel=parallel,
         alignments=alignments, text_col=text_col, label_col=label_col,
         config=config, device=device, max_examples=max_examples, name=name, title=title, label_names=label_names,
         allow_untrained=allow_untrained, resume=resume, overwrite=overwrite, full_tables=full_tables)


@app.command("report")
def report_cli(out: Path = typer.Argument(..., help="A report folder written by run or analyze."),
               reverdict: bool = typer.Option(False, "--reverdict", help="Derive the verdicts again from the saved "
                                              "tables with this version's rule (no model is run)."),
               full_tables: bool = typer.Option(None, "--full-tables/--sampled-tables", help="Keep every attribution "
                                                "and per-example curve the folder has, or only what the report shows "
                                                "(default: as the folder has them; an older folder is cut to what is shown)."),
               attention_model: Path = typer.Option(None, "--attention-model", help="The classifier folder the report "
                                                    "audited (its weights' sha256 is checked): save and draw the "
                                                    "attention of every example the report shows, one forward each.")):
    """Re-render index.html, report.md and figures/ from a report folder's saved results (no recomputation but
    --attention-model's forwards); a folder of the older layout is rewritten in the current one."""
    from attnaudit.analyses.report import render_report
    attention = None
    if attention_model is not None:
        attention = _shown_attention(out, attention_model)
    path = render_report(out, reverdict=reverdict, full_tables=full_tables, attention=attention)
    typer.echo(f"report written to {path / 'index.html'}")


def _shown_attention(out: Path, folder: Path) -> list[dict]:
    """The report's shown examples' attention from `folder`, refused unless it holds the model the report audited."""
    from attnaudit.analyses.attention_examples import shown_attention_from_model
    from attnaudit.analyses.report_files import load_results
    from attnaudit.jobs.fingerprint import sha256_file
    from attnaudit.model.checkpoint import load_model

    data = load_results(out)
    expected = ((data["results"].get("settings") or {}).get("identity") or {}).get("model")
    weights = Path(folder) / "model.safetensors"
    if expected is None:
        raise ValueError(f"--attention-model: {str(out)!r} records no model hash (a report of `attnaudit run`, whose "
                         f"models are per task); rerun it instead.")
    if not weights.is_file() or sha256_file(weights) != expected:
        raise ValueError(f"--attention-model {str(folder)!r} is not the model {str(out)!r} audited (its "
                         f"model.safetensors sha256 must be {expected[:12]}…); pass that model's folder.")
    return shown_attention_from_model(load_model(folder, device="cpu"), data)


EXPLAIN_DEFAULT = "attention,rollout,grad_attention,integrated_gradients,occlusion"


@app.command("explain")
def explain_cli(
    model: Path = typer.Option(..., "--model", help="A trained model folder."),
    text: str = typer.Option(None, "--text", help="One text to explain."),
    data: Path = typer.Option(None, "--data", help="Or a .jsonl/.csv/.tsv file of texts."),
    text_col: str = typer.Option("text", "--text-col", help="Column of --data holding the text."),
    explainer: str = typer.Option(EXPLAIN_DEFAULT, "--explainer",
                                  help="Comma-separated registry names ('all' for every one). An encoder-decoder "
                                       "takes every one but flow, plus attention_layers (default: all of them)."),
    jsonl: Path = typer.Option(None, "--jsonl", help="Also write one JSON object per (example, explainer) here."),
    target: str = typer.Option(None, "--target", help="Classifier: the class to explain, a label name or index "
                               "(default: the predicted one). Language model: the continuation to explain."),
    generate: int = typer.Option(None, "--generate", min=1, help="Language model: explain its greedy continuation "
                                 "of this many tokens (default: the next token)."),
    label_names: str = typer.Option(None, "--label-names", help=LABEL_NAMES_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Print the token scores of the chosen explainers as a table (and write them as JSON lines).

    For a language model each example is explained step by step: one row per target token, one column per
    prompt token (the target is --target, or a greedy --generate N continuation, or the next token)."""

    from attnaudit.core.progress import progress_bar
    from attnaudit.data import parse_label_names, read_texts
    from attnaudit.explain.registry import REGISTRY
    from attnaudit.explain.run import explain_all
    from attnaudit.model.checkpoint import load_model
    from attnaudit.model.interface import name_classes
    from attnaudit.model.settings import resolve_device
    if (text is None) == (data is None):
        raise ValueError(f"pass exactly one of --text or --data; got {'both' if text is not None else 'neither'}.")
    names = list(REGISTRY) if explainer.strip() == "all" else [n.strip() for n in explainer.split(",") if n.strip()]
    from attnaudit.analyses.seq2seq import ALIASES
    from attnaudit.analyses.seq2seq import EXPLAINERS as SEQ2SEQ_EXPLAINERS
    unknown = [n for n in names if n not in REGISTRY and n not in SEQ2SEQ_EXPLAINERS and n not in ALIASES]
    if unknown or not names:
        raise ValueError(f"--explainer must be registry names separated by commas; got {unknown[0] if unknown else explainer!r}. "
                         f"Available: {', '.join(REGISTRY)}, or all.")
    if jsonl is not None and jsonl.is_dir():
        raise ValueError(f"--jsonl must be a file path; {str(jsonl)!r} is a folder.")
    given_names = parse_label_names(label_names)
    m = name_classes(load_model(_model_folder(model), device=resolve_device(device)), given_names)
    if explainer.strip() == "all" and getattr(m, "kind", None) != "seq2seq":
        names = [n for n in names if _applies(n, m)]            # "all": every registry explainer this model takes
    if getattr(m, "kind", None) == "lm":
        return _explain_lm(m, names, text=text, data=data, target=target, generate=generate, jsonl=jsonl, quiet=quiet)
    if getattr(m, "kind", None) == "seq2seq":
        every = explainer == EXPLAIN_DEFAULT or explainer.strip() == "all"
        undefined = [n for n in names if n not in SEQ2SEQ_EXPLAINERS and n not in ALIASES]
        if undefined and not every:
            raise ValueError(f"--explainer {undefined[0]!r} is not defined for an encoder-decoder; it takes "
                             f"{', '.join(SEQ2SEQ_EXPLAINERS)} (or all).")
        return _explain_seq2seq(m, None if every else names, text=text, data=data, target=target, jsonl=jsonl)
    if generate is not None:
        raise ValueError(f"--generate goes with a language model; {str(model)!r} is a {getattr(m, 'kind', 'model')}.")
    inputs = [text] if text is not None else read_texts(data, text_col=text_col)
    if target is not None and target.strip().lstrip("+-").isdigit():
        target = int(target)                        # "1" is class 1; a label name stays a name
    records, cut = [], []
    # a file is explained EXPLAIN_CHUNK texts at a time: bounded memory, a progress step, tables as they come
    with progress_bar(len(inputs), desc=f"explain ({len(names)} explainers)", unit="texts",
                      enabled=False if quiet else None if len(inputs) <= EXPLAIN_CHUNK else True) as bar:
        for start in range(0, len(inputs), EXPLAIN_CHUNK):
            batch = m.encode(inputs[start : start + EXPLAIN_CHUNK], truncate=True)
            attributions = explain_all(m, batch, names, target=target)
            chunk_cut = batch.truncated or [False] * len(batch)
            records += [{**r, "truncated": chunk_cut[i]} for a in attributions.values()
                        for i, r in enumerate(a.to_records())]
            cut += chunk_cut
            _print_tables(m, batch, attributions, names, explaining=target is not None, first_index=start)
            bar.update(len(batch))
    if any(cut):
        typer.echo(f"note: {sum(cut)} text(s) had more words than the model's {m.max_len} positions and were cut "
                   "(\"truncated\": true in --jsonl); a model trained with a larger max_len takes them whole")
    _write_records(jsonl, records)


def _applies(name: str, model) -> bool:
    """Whether registry explainer `name` (default parameters) takes this model: its `validate` passes."""
    from attnaudit.explain.registry import get_explainer
    try:
        get_explainer(name).validate(model)
    except ValueError:
        return False
    return True


def _explain_seq2seq(m, names, *, text, data, target, jsonl) -> None:
    """`explain` for an encoder-decoder: a [source token x target token] table per example and explainer."""

    from attnaudit.analyses.seq2seq import EXPLAINERS, prepare, translator_scores
    from attnaudit.data import Example
    from attnaudit.data.parallel import read_parallel
    chosen = list(EXPLAINERS) if names is None else names
    if text is not None:
        examples = [Example(id="0", text=text, target=target)]
    else:
        if target is not None:
            raise ValueError("--target goes with --text; with --data give 'source ||| target' lines (or sources only).")
        lines = Path(data).read_text(encoding="utf-8")
        examples = read_parallel(data) if "|||" in lines else \
            [Example(id=str(i), text=line.strip()) for i, line in enumerate(lines.splitlines()) if line.strip()]
    missing = [e for e in examples if e.target is None]
    if missing:                                       # no reference: explain the model's greedy translation
        said = m.translate([e.text for e in missing])
        done = dict(zip([e.id for e in missing], said))
        examples = [e if e.target is not None else Example(id=e.id, text=e.text, target=done[e.id]) for e in examples]
    pairs, units = prepare(m, examples)
    scores = translator_scores(m, pairs, chosen)
    tgt_tokens = [m.target_tokens(row.tolist()) for row in pairs.tgt_out] if hasattr(m, "target_tokens") else None
    records = []
    for i, ex in enumerate(examples):
        steps = units.tgt[units.src == i].tolist()
        n_src = int(pairs.src.attention_mask[i].sum())
        src = pairs.src.tokens[i][:n_src]
        tgt = [tgt_tokens[i][t] for t in steps] if tgt_tokens is not None else [str(t) for t in steps]
        for name, s in scores.items():
            typer.echo(f"\n{ex.id}: {name}; source tokens (rows) x target tokens (columns) of '{ex.target}'")
            width = max(8, *(len(t) for t in src))
            typer.echo(f"{'token':<{width}} " + " ".join(f"{t[:12]:>12}" for t in tgt))
            for j, tok in enumerate(src):
                typer.echo(f"{tok:<{width}} " + " ".join(f"{float(s[i, t, j]):>12.4f}" for t in steps))
            records.append({"id": ex.id, "text": ex.text, "target": ex.target, "explainer": name, "source_tokens": src,
                            "target_tokens": tgt, "scores": [[float(s[i, t, j]) for j in range(n_src)] for t in steps]})
    _write_records(jsonl, records)


def _explain_lm(m, names, *, text, data, target, generate, jsonl, quiet) -> None:
    """`explain` for a language model: a [prompt token x target step] table per example and explainer."""

    from attnaudit.core.progress import progress_bar
    from attnaudit.data import Example
    from attnaudit.data.prompts import read_prompts
    from attnaudit.explain.generation import step_matrices
    from attnaudit.explain.run import explain_all
    if target is not None and generate is not None:
        raise ValueError("pass at most one of --target (the continuation to explain) or --generate N (a greedy one); "
                         "got both.")
    if text is not None:
        examples = [Example(id="0", text=text, target=target)]
    else:
        if target is not None:
            raise ValueError("--target goes with --text; with --data give each row's continuation in its 'target' field.")
        examples = read_prompts(data)
    if generate is not None:
        if any(e.target is not None for e in examples):
            raise ValueError("--generate N explains a greedy continuation, but the data file gives targets; leave out "
                             "--generate to explain those.")
        continuations = m.generate([e.text for e in examples], generate)
        examples = [Example(id=e.id, text=e.text, target=c, rationale=e.rationale) for e, c in zip(examples, continuations)]
    records = []
    with progress_bar(len(examples), desc=f"explain ({len(names)} explainers)", unit="texts",
                      enabled=False if quiet else None if len(examples) <= EXPLAIN_CHUNK else True) as bar:
        for start in range(0, len(examples), EXPLAIN_CHUNK):
            chunk = examples[start : start + EXPLAIN_CHUNK]
            batch = m.encode(chunk)
            attributions = explain_all(m, batch, names, target=batch.labels)
            for a in attributions.values():
                records += [{**r, "example_id": chunk[r["example"]].id} for r in a.to_records()]   # step rows
            per_method = {name: step_matrices(a, target_tokens=m.label_names) for name, a in attributions.items()}
            for e, ex in enumerate(chunk):
                for name in names:
                    mat = per_method[name][e]
                    typer.echo(f"\n{ex.id}: {name}; prompt tokens (rows) x target tokens (columns; p = probability)")
                    width = max(8, *(len(t) for t in mat.prompt_tokens))
                    heads = [f"{t[:10]} {float(p):.2f}" for t, p in zip(mat.target_tokens, mat.target_prob.tolist())]
                    typer.echo(f"{'token':<{width}} " + " ".join(f"{h:>15}" for h in heads))
                    for j, tok in enumerate(mat.prompt_tokens):
                        typer.echo(f"{tok:<{width}} " + " ".join(f"{float(v):>15.4f}" for v in mat.scores[:, j]))
            bar.update(len(chunk))
    _write_records(jsonl, records)


def _write_records(jsonl: Path | None, records: list[dict]) -> None:
    """`explain --jsonl`: one JSON object per line, written atomically (nothing without --jsonl)."""
    import json

    from attnaudit.core.io import atomic_write_text
    if jsonl is not None:
        atomic_write_text(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        typer.echo(f"wrote {len(records)} records to {jsonl}")


def _print_tables(m, batch, attributions, names, *, explaining: bool, first_index: int) -> None:
    """One token x explainer table per example of `batch`."""
    first = next(iter(attributions.values()))
    for i in range(len(batch)):
        n = int(batch.attention_mask[i].sum())
        label = m.label_names[int(first.target[i])]
        typer.echo(f"\n{batch.ids[i] if batch.ids else first_index + i}: {'explaining' if explaining else 'predicted'} "
                   f"{label} (p = {float(first.target_prob[i]):.3f})")
        width = max(8, *(len(t) for t in batch.tokens[i][:n]))
        typer.echo(f"{'token':<{width}} " + " ".join(f"{name[:12]:>12}" for name in names))
        for j in range(n):
            cells = " ".join(f"{float(attributions[name].scores[i, j]):>12.4f}" for name in names)
            typer.echo(f"{batch.tokens[i][j]:<{width}} {cells}")


def _model_folder(path: Path) -> Path:
    """Refuse a pickle file given as --model, naming the option, before any other work."""
    from attnaudit.model.checkpoint import refuse_pickle_file
    return refuse_pickle_file(path, name="--model")


def _threads(threads: int) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def _job(job, threads: int, quiet: bool, *args, **options) -> None:
    """Run a report job with SIGTERM acting as Ctrl-C; print the verdict lines and where the report is."""
    from attnaudit.jobs.store import interruptible
    _threads(threads)
    with interruptible():
        path = job(*args, **options, progress=not quiet, echo=(lambda _: None) if quiet else typer.echo)
    from attnaudit.distributed import from_env
    if not from_env().is_main:                     # under torchrun: rank 0 wrote the report and prints it
        return
    _verdict_lines(path, quiet)
    typer.echo(f"report written to {path / 'index.html'}")


def _verdict_lines(path: Path, quiet: bool) -> None:
    if quiet:
        return
    import json

    from attnaudit.analyses.report_html import verdict_lines
    from attnaudit.analyses.verdict import Verdict
    results = json.loads((path / "results.json").read_text(encoding="utf-8"))
    for task, v in results.get("verdicts", {}).items():
        headline, _ = verdict_lines(Verdict.from_dict(v))     # what the answer means, as the page's first line
        typer.echo(f"{task}: {str(v.get('answer', '')).upper()}: {headline}")


@tasks_app.command("list")
def tasks_list_cli():
    """Print the built-in tasks with their classes and default sizes."""
    from attnaudit.data.tasks import get_task
    for name in TASK_NAMES:
        t = get_task(name)
        classes = ", ".join(t.label_names) if t.label_names else "next token" if t.kind == "lm" else "seq2seq"
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
    from attnaudit.data.examples import write_jsonl
    from attnaudit.data.tasks import make_examples
    examples = make_examples(task, split, n=n, seed=seed)
    typer.echo(f"wrote {len(examples)} {task} {split} examples to {write_jsonl(examples, out)}")


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one stderr line (Python's default adds the file, the line number and the source line)."""
    typer.echo(f"warning: {' '.join(str(message).split())}", err=True)


def main(argv: list[str] | None = None) -> None:
    """The `attnaudit` entry point: runs `app`, turning user errors into `error: ...` and exit status 2
    and warnings into one `warning: ...` line each."""
    import warnings

    from attnaudit.jobs.sharding import exit_process
    command = typer.main.get_command(app)
    try:
        with warnings.catch_warnings():                # restores the caller's warning display afterwards
            warnings.showwarning = _warning_line
            code = command.main(args=argv, prog_name="attnaudit", standalone_mode=False)
    except typer.Abort:
        typer.echo("error: aborted.", err=True)
        sys.exit(1)
    except typer.TyperException as e:              # usage errors: unknown option, missing --out, bad int
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if message:                                # empty when the help was shown for a bare command
            typer.echo(f"error: {message}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        code = 130
    except USER_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        exit_process(2)
    except RuntimeError as e:
        from attnaudit.distributed import RankFailed
        from attnaudit.jobs import ItemsFailed
        if isinstance(e, RankFailed):              # a sharded run's rank died, hung or refused
            typer.echo(f"error: {e}", err=True)
            exit_process(4)
        if not isinstance(e, ItemsFailed):
            raise
        typer.echo(f"error: {len(e.failures)} item(s) failed; the others are saved:", err=True)
        for item, reason in e.failures.items():
            typer.echo(f"  {item}: {reason}", err=True)
        typer.echo("fix the cause and run the same command with --resume to compute only the failed items.", err=True)
        exit_process(3)
    if code == 130:                                # typer turns KeyboardInterrupt into exit code 130 itself
        args = sys.argv[1:] if argv is None else list(argv)
        if any(a in ("train", "finetune") for a in args[:1]):
            typer.echo("interrupted: the model folder is written only when training ends, so nothing was saved; "
                       "run the same command again.", err=True)
        else:
            typer.echo("interrupted: finished items are saved; run the same command with --resume to continue.", err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
