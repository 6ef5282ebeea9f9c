"""Progress a person can read: plain lines with counts, rate and ETA in a log; nothing with progress=False."""
from __future__ import annotations

import io

import pytest

from attnaudit.analyses.audit import audit
from attnaudit.core.progress import LineProgress, NoBar, format_seconds, progress_bar
from attnaudit.model.train import TrainSettings, train_task

TINY = TrainSettings(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=32, epochs=2, batch_size=16,
                     warmup=10, n_train=64, n_valid=16, n_test=16)
CHEAP = dict(explainers=("attention", "random"), analyses=("faithfulness", "sanity"), sanity_examples=2,
             chunk_size=3, ferret=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_log_gets_a_line_every_10_seconds_with_counts_rate_and_eta():
    stream, clock = io.StringIO(), Clock()
    bar = progress_bar(512, desc="audit keywords: explain", unit="examples", enabled=True, stream=stream, clock=clock)
    assert isinstance(bar, LineProgress)                 # StringIO is no terminal: plain lines, not tqdm
    for _ in range(16):                                  # 4 examples (0.8%) every 2.5 s: the clock decides
        clock.now += 2.5
        bar.update(4)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "audit keywords: explain 0/512 examples (0%)"
    # 1.6 examples/s; after 10 s (16 examples) a line, after 20 s the next, ...
    assert lines[1] == "audit keywords: explain 16/512 examples (3%), 1.6 examples/s, ETA 5m10s"
    assert lines[2] == "audit keywords: explain 32/512 examples (6%), 1.6 examples/s, ETA 5m00s"
    assert len(lines) == 5                               # start + at 10, 20, 30, 40 s
    for _ in range(112):
        clock.now += 2.5
        bar.update(4)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[-1] == "audit keywords: explain 512/512 examples (100%), 1.6 examples/s, took 5m20s"
    assert len(lines) == 1 + 32                          # one line per 10 s of the 320 s, no extra one at close


def test_every_5_percent_when_work_is_fast_but_not_twice_a_second():
    stream, clock = io.StringIO(), Clock()
    bar = progress_bar(1000, desc="train needle", unit="steps", enabled=True, stream=stream, clock=clock)
    for step in range(1000):
        clock.now += 0.1                                 # 10 steps/s: 5% (50 steps) takes 5 s
        if step == 499:
            bar.set_postfix(epoch=2, loss="0.123")
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 + 20                          # start + one per 5%
    assert lines[10] == "train needle 500/1000 steps (50%), 10 steps/s, ETA 50s, epoch 2, loss 0.123"
    stream, clock = io.StringIO(), Clock()
    bar = progress_bar(1000, desc="fast", unit="steps", enabled=True, stream=stream, clock=clock)
    for _ in range(1000):
        clock.now += 0.001                               # the whole loop in 1 s: start and end only
        bar.update()
    assert len(stream.getvalue().splitlines()) == 2


def test_silent_when_disabled_or_not_watched():
    stream = io.StringIO()
    for enabled in (False, None):                        # None: only at a terminal or in Jupyter
        bar = progress_bar(10, desc="x", enabled=enabled, stream=stream)
        assert isinstance(bar, NoBar)
        with bar:
            bar.update(10)
            bar.set_postfix(a=1)
    assert stream.getvalue() == ""


def test_a_terminal_gets_tqdm_with_counts():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = progress_bar(64, desc="audit needle: explain", unit="examples", enabled=None, stream=stream)
    assert not isinstance(bar, NoBar | LineProgress)      # tqdm.auto's bar
    bar.update(32)
    bar.refresh()
    text = stream.getvalue()
    bar.close()
    assert "audit needle: explain" in text and "32/64" in text and "examples/s" in text


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 12, 124, 3725)] == ["0s", "12s", "2m04s", "1h02m"]


def test_audit_counts_examples_per_stage_in_a_log(tiny_model, tiny_examples, capsys):
    audit(tiny_model, tiny_examples, progress=True, progress_label="audit tiny", **CHEAP)
    err = capsys.readouterr().err
    assert "audit tiny: explain + faithfulness (2 explainers) 0/4 examples (0%)" in err
    assert "audit tiny: explain + faithfulness (2 explainers) 4/4 examples (100%)" in err
    assert "audit tiny: randomisation sanity check on 2 examples 2/2 explainers (100%)" in err
    assert "\r" not in err and "stage" not in err


def test_audit_is_silent_with_progress_false_and_by_default_in_a_log(tiny_model, tiny_examples, capsys):
    audit(tiny_model, tiny_examples, progress=False, **CHEAP)
    audit(tiny_model, tiny_examples, **CHEAP)            # progress=None and stderr is not a terminal here
    assert capsys.readouterr().err == ""


def test_training_reports_steps_in_a_log(capsys):
    train_task("needle", TINY, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "train needle 0/8 steps (0%)" in err and "train needle 8/8 steps (100%)" in err
    last = err.strip().splitlines()[-1]                  # close() adds the last epoch's loss and valid score
    assert last.startswith("train needle 8/8 steps (100%)") and ", epoch 2, loss " in last and ", valid " in last
    train_task("needle", TINY, device="cpu", progress=False)
    assert capsys.readouterr().err == ""


def test_cli_explain_a_file_reports_texts_and_quiet_silences_it(tmp_path, capsys):
    from conftest import cli_run, make_tiny_model

    from attnaudit.model.checkpoint import save_checkpoint

    folder = save_checkpoint(make_tiny_model(), tmp_path / "m")
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(f'{{"id": "t{i}", "text": "the film was good"}}\n' for i in range(70)))
    code, out, err = cli_run(capsys, "explain", "--model", folder, "--data", data, "--explainer", "attention")
    assert code == 0, err
    assert "explain (1 explainers) 0/70 texts (0%)" in err and "explain (1 explainers) 70/70 texts (100%)" in err
    assert out.count("predicted") == 70 and "t69: predicted" in out
    code, out, err = cli_run(capsys, "explain", "--model", folder, "--data", data, "--explainer", "attention",
                             "--quiet")
    assert code == 0 and err == ""


def test_a_long_step_gets_heartbeat_lines_until_close():
    import time

    stream = io.StringIO()
    bar = progress_bar(4, desc="audit slow: explain", unit="examples", enabled=True, stream=stream, heartbeat_s=0.05)
    time.sleep(0.4)                                      # one chunk in flight: no update, yet the log moves
    bar.close()
    beats = [line for line in stream.getvalue().splitlines() if "since the last update" in line]
    assert len(beats) >= 2 and beats[0].startswith("audit slow: explain 0/4 examples (0%), ")
    n = len(stream.getvalue().splitlines())
    time.sleep(0.2)
    assert len(stream.getvalue().splitlines()) == n      # closed: the heartbeat has stopped


def test_audit_counts_counterfactual_tests_in_a_log(tiny_model, tiny_examples, capsys):
    audit(tiny_model, tiny_examples, progress=True, progress_label="audit tiny", explainers=("attention", "random"),
          analyses=("faithfulness", "counterfactual"), counterfactual_examples=2, n_permutations=2,
          adversarial_steps=2, ferret=False)
    err = capsys.readouterr().err
    n = 4 * (tiny_model.n_layers + 1) + 1               # four tests per layer and "all", head ablation once
    assert f"audit tiny: counterfactual attention tests on 2 examples {n}/{n} tests (100%)" in err
