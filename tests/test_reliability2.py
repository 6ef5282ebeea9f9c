"""Bounded work, checked checkpoints, clean text and messages that say what to do (issue 12).

Every size-like parameter is refused, with its cost, before anything is allocated; a checkpoint's config is
checked against the safetensors header and its recorded sha256; NUL bytes and a BOM are stripped and recorded,
undecodable text is refused with its line; unreadable files say so; and the promises of the command line
(resume, locks, empty or odd data files) are tested.
"""
from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, cli_run, make_tiny_model

from attnaudit import get_explainer, load_model
from attnaudit.analyses.audit import AuditSettings
from attnaudit.data import read_labelled
from attnaudit.data.examples import read_table, read_texts
from attnaudit.explain.flow import flow, flow_seconds
from attnaudit.model.checkpoint import save_checkpoint
from attnaudit.model.interface import TextClassifier
from attnaudit.model.transformer import TransformerClassifier, TransformerConfig
from attnaudit.model.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


# -- 2. no work without a bound -----------------------------------------------------------------------
def test_a_billion_integrated_gradients_steps_is_refused_before_any_allocation(tiny_model, monkeypatch):
    get_explainer("integrated_gradients", n_steps=4).explain(tiny_model, "the film")     # captum imported, warm
    monkeypatch.setattr(np.polynomial.legendre, "leggauss",
                        lambda n: pytest.fail("the quadrature was set up although the cost refuses it"))
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        get_explainer("integrated_gradients", n_steps=10**9).explain(tiny_model, "the film was good")
    assert time.perf_counter() - start < 2
    assert str(info.value).startswith(
        "integrated_gradients: n_steps=1000000000 would need ≈ 8.0e+18 bytes / 1.0e+09 forward passes per example; "
        "the limit is 4,096; pass max_cost=... (or lower n_steps) to raise it.")


@pytest.mark.parametrize("name, params, message", [
    ("lime", {"n_samples": 10**6}, "lime: n_samples=1000000 would need 1.0e+06 forward passes per example; the limit "
                                   "is 4,096; pass max_cost=..."),
    ("kernel_shap", {"n_samples": 10**6}, "kernel_shap: n_samples=1000000 would need 1.0e+06 forward passes"),
    ("gradient_shap", {"n_samples": 10**6}, "gradient_shap: n_samples=1000000 would need ≈ "),
    ("lime", {"n_samples": 100, "max_cost": 50}, "the limit is 50; pass max_cost=..."),
    ("occlusion", {"max_batch": 10**9}, "max_batch must be an int in [1, 65,536]; got 1,000,000,000."),
    ("lime", {"max_batch": 10**9}, "max_batch must be an int in [1, 65,536]"),
    ("integrated_gradients", {"max_batch": 10**9}, "max_batch must be an int in [1, 65,536]"),
    ("integrated_gradients", {"max_cost": 0}, "max_cost must be an int >= 1 (forward passes per example) or None"),
])
def test_every_size_parameter_has_a_limit(tiny_model, name, params, message):
    with pytest.raises(ValueError) as info:
        get_explainer(name, **params).explain(tiny_model, "the film was good")
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_max_cost_raises_the_limit(tiny_model):
    attr = get_explainer("lime", n_samples=40, max_cost=40).explain(tiny_model, "the film was good")
    assert attr.scores.shape == (1, 6)
    with pytest.raises(ValueError, match="the limit is 30"):
        get_explainer("lime", n_samples=40, max_cost=30).explain(tiny_model, "the film was good")


@pytest.mark.parametrize("setting", ["n_permutations", "adversarial_steps", "n_adversaries", "chunk_size", "curve_steps",
                                     "max_batch", "counterfactual_examples", "sanity_examples", "max_examples"])
def test_audit_sizes_have_limits(setting):
    limit = AuditSettings.LIMITS[setting][0]
    AuditSettings(**{setting: limit, **({"n_adversaries": 1} if setting == "adversarial_steps" else {})})
    with pytest.raises(ValueError) as info:
        AuditSettings(**{setting: 10**9})
    assert str(info.value).startswith(f"{setting}=1,000,000,000 is above its limit of {limit:,} (")
    assert f"lower {setting}" in str(info.value)


def test_counterfactual_and_engine_sizes_have_limits(tiny_model, tiny_batch, monkeypatch):
    from attnaudit.analyses import counterfactual as cf
    from attnaudit.explain.perturb import PerturbationEngine

    monkeypatch.setattr(cf, "output_probs", lambda *a, **k: pytest.fail("a forward ran although a limit refuses it"))
    with pytest.raises(ValueError, match=r"n_permutations=1,000,000,000 would need 1.0e\+09 forward passes per "
                                         r"example and layer; the limit is MAX_PERMUTATIONS=10,000"):
        cf.permutation_tvd(tiny_model, tiny_batch, layer=0, n_permutations=10**9)
    with pytest.raises(ValueError, match=r"n_steps=1,000,000,000 would need 1.0e\+09 forward \+ backward passes"):
        cf.adversarial_attention(tiny_model, tiny_batch, layer=0, n_steps=10**9)
    with pytest.raises(ValueError, match=r"max_batch must be an int in \[1, 65,536\] \(sequences per forward\)"):
        PerturbationEngine(tiny_model, tiny_batch, max_batch=10**9)


def twelve_layers(max_len: int = 520) -> TextClassifier:
    torch.manual_seed(0)
    vocab = Vocab.build([" ".join(WORDS)])
    cfg = TransformerConfig(vocab_size=len(vocab), n_classes=2, d_model=8, n_heads=2, n_layers=12, d_ff=16,
                            max_len=max_len)
    return TextClassifier(TransformerClassifier(cfg), vocab, label_names=["a", "b"])


def test_flow_on_12_layers_and_512_tokens_is_refused_at_once_with_a_time_estimate(monkeypatch):
    model = twelve_layers()
    import attnaudit.explain.flow as flow_module
    monkeypatch.setattr(flow_module, "max_flows", lambda *a, **k: pytest.fail("a flow was computed"))
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        get_explainer("flow").explain(model, " ".join(["film"] * 510))
    assert time.perf_counter() - start < 2
    seconds = flow_seconds(12, 512)
    assert 60 < seconds < 600                                  # ~2.6 min by the fitted growth
    assert (f"flow: example 0 has 512 tokens, so 12 layers × 512² = 3,145,728 attention cells, more than "
            f"max_cells=1,000,000: its exact flow would take ≈ {seconds:,.3g} s") in str(info.value)
    assert "growing like tokens^3.65" in str(info.value)


def test_the_flow_time_estimate_matches_a_measured_flow():
    """At 6 layers × 128 tokens of near-uniform patterns (a point of the fit) the measured time is within a
    factor 4 of the estimate (a loaded machine is slower, a quiet one faster)."""
    g = torch.Generator().manual_seed(0)
    patterns = (0.3 * torch.randn(6, 1, 4, 128, 128, generator=g, dtype=torch.float64)).softmax(-1)
    start = time.perf_counter()
    flow(patterns)
    measured = time.perf_counter() - start
    assert 0.25 < measured / flow_seconds(6, 128) < 4, (measured, flow_seconds(6, 128))


# -- 3. a config that does not fit its weights --------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(make_tiny_model(), tmp_path / "m")


def edit_config(folder: Path, **architecture) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architecture"].update(architecture)
    (folder / "config.json").write_text(json.dumps(cfg))
    return cfg


def test_an_absurd_d_model_is_refused_from_the_header_before_the_model_is_built(checkpoint, monkeypatch):
    import attnaudit.model.checkpoint as ckpt
    monkeypatch.setattr(ckpt, "load_file", lambda *a, **k: pytest.fail("the tensors were read"))
    edit_config(checkpoint, d_model=10**7)
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_model(checkpoint)
    assert time.perf_counter() - start < 5
    assert str(info.value) == (
        f"{str(checkpoint / 'model.safetensors')!r}: tensor 'encoder.embed.weight' has shape (19, 16), but "
        f"{str(checkpoint / 'config.json')!r} (architecture.d_model = 10000000) implies (19, 10000000); the config "
        "does not belong to these weights: restore the folder's own config.json.")


@pytest.mark.parametrize("architecture, fragment", [
    ({"d_ff": 10**6}, "(architecture.d_ff = 1000000) implies (1000000, 16)"),
    ({"n_layers": 10**7}, "architecture.n_layers = 10000000, but it must be an int in [0, 1,024]"),
    ({"max_len": 10**9}, "needs 6.4e+10 bytes of tables beyond the weights, more than the limit of 1.1e+09; lower "
                         "max_len"),
    ({"n_layers": 3}, "does not match the architecture in config.json: missing ['encoder.layers.2."),
])
def test_sizes_in_the_config_are_checked_against_the_weights(checkpoint, architecture, fragment):
    edit_config(checkpoint, **architecture)
    with pytest.raises(ValueError) as info:
        load_model(checkpoint)
    assert fragment in str(info.value), str(info.value)


def test_cli_refuses_an_absurd_config_with_one_line_and_status_2(checkpoint, capsys):
    edit_config(checkpoint, d_model=10**7)
    code, out, err = cli_run(capsys, "explain", "--model", checkpoint, "--text", "the film", "--explainer", "attention")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "architecture.d_model = 10000000" in err and "(19, 16)" in err


# -- 5. damaged weights and odd text ------------------------------------------------------------------
def test_a_bit_flip_in_the_weights_is_refused_naming_both_hashes(checkpoint, capsys):
    cfg = json.loads((checkpoint / "config.json").read_text())
    recorded = cfg["weights_sha256"]
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01                                          # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        load_model(checkpoint)
    import hashlib
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert str(info.value) == (f"{str(weights)!r} has sha256 {actual}, but {str(checkpoint / 'config.json')!r} records "
                               f"weights_sha256 {recorded}: the weights were damaged or replaced after saving; "
                               "restore the file from a copy or retrain.")
    code, _, err = cli_run(capsys, "explain", "--model", checkpoint, "--text", "the film", "--explainer", "attention")
    assert code == 2 and recorded in err and actual in err and err.count("\n") == 1, err


def test_a_checkpoint_saved_without_a_hash_still_loads(checkpoint, tiny_batch):
    cfg = json.loads((checkpoint / "config.json").read_text())
    del cfg["weights_sha256"]
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(load_model(checkpoint)(tiny_batch), make_tiny_model()(tiny_batch))
    import hashlib
    resaved = save_checkpoint(load_model(checkpoint), checkpoint.parent / "again")   # a new save records its hash
    assert json.loads((resaved / "config.json").read_text())["weights_sha256"] == \
        hashlib.sha256((resaved / "model.safetensors").read_bytes()).hexdigest()


def test_nul_and_bom_are_stripped_and_recorded(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfid,text,label\na,the fi\x00lm,0\nb,a plot,1\nc,bad\x00\x00,1\n")
    examples, _ = read_table(csv_path, text_col="text", label_col="label")
    assert [x.text for x in examples] == ["the film", "a plot", "bad"]
    assert [x.id for x in examples] == ["a", "b", "c"]                # the BOM did not stick to the header "id"
    assert [x.meta for x in examples] == [{"cleaned": {"nul": 1}}, None, {"cleaned": {"nul": 2}}]
    info = read_labelled(csv_path, text_col="text", label_col="label").info
    assert info["cleaned"] == {"bom": True, "nul": 3, "nul_lines": [2, 4]}
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "a fi\x00ne film"}\n{"text": "bad"}\n')
    texts = read_texts(jsonl)
    assert [x.text for x in texts] == ["a fine film", "bad"] and texts[0].meta == {"cleaned": {"nul": 1}}


@pytest.mark.parametrize("name, content, message", [
    ("s.jsonl", b'{"text": "ok", "label": 0}\n{"text": "ok too", "label": 1}\n{"text": "x \\ud800 y", "label": 1}\n',
     "s.jsonl, line 3: a string holds a lone surrogate (\"\\ud800\"), which is not text"),
    ("u.csv", b"text,label\nthe film,0\na plot,1\nbad \xff\xfe here,1\n",
     "u.csv, line 4: the bytes b'\\xff\\xfe h' are not UTF-8 (invalid start byte); save the file as UTF-8"),
    ("e.csv", b"text,label\nthe film,0\nbad \xed\xa0\x80 here,1\n", "e.csv, line 3: the bytes b'\\xed\\xa0"),
])
def test_undecodable_text_is_refused_with_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_table(path, text_col="text", label_col="label")
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


# -- 6. messages that name the path, the rule and the fix ---------------------------------------------
def refuse_to_open(monkeypatch, target: Path):
    real = builtins.open

    def fake_open(file, *args, **kwargs):
        if Path(os.fspath(file)) == target if isinstance(file, (str, os.PathLike)) else False:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("which", ["model.safetensors", "config.json"])
def test_an_unreadable_checkpoint_file_says_permission_denied(checkpoint, monkeypatch, capsys, which):
    refuse_to_open(monkeypatch, checkpoint / which)
    with pytest.raises(PermissionError) as info:
        load_model(checkpoint)
    message = str(info.value)
    assert str(checkpoint / which) in message and "cannot be read (permission denied)" in message
    assert "chmod" in message and "No such file" not in message and "[Errno" not in message
    code, _, err = cli_run(capsys, "explain", "--model", checkpoint, "--text", "the film", "--explainer", "attention")
    assert code == 2 and "cannot be read (permission denied)" in err and err.count("\n") == 1, err


def test_an_unreadable_data_file_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nthe film,0\na plot,1\n")
    refuse_to_open(monkeypatch, path)
    with pytest.raises(PermissionError, match=r"d\.csv cannot be read \(permission denied\); give this user read "):
        read_table(path, text_col="text", label_col="label")


def test_a_baseline_tensor_is_named_by_its_shape_not_printed(tiny_model):
    with pytest.raises(ValueError) as info:
        get_explainer("integrated_gradients", baseline=torch.zeros(2, 50, 16)).explain(tiny_model, "the film")
    message = str(info.value)
    assert message.startswith("baseline must be one of 'pad', 'mask', 'zero'; got a Tensor of shape (2, 50, 16) and "
                              "dtype torch.float32.")
    assert "tensor(" not in message and "\n" not in message and "CaptumExplainer" in message


# -- 7. data files: empty, a folder, a bad row in the middle ------------------------------------------
@pytest.mark.parametrize("reader", ["read_table", "read_texts", "read_labelled"])
@pytest.mark.parametrize("kind", ["empty csv", "empty jsonl", "folder"])
def test_an_empty_data_file_or_a_folder_is_a_clear_error(tmp_path, reader, kind):
    path = tmp_path / ("data.jsonl" if "jsonl" in kind else "data.csv")
    path.mkdir() if kind == "folder" else path.write_text("")
    call = {"read_table": lambda: read_table(path, text_col="text", label_col="label"),
            "read_texts": lambda: read_texts(path),
            "read_labelled": lambda: read_labelled(path, text_col="text", label_col="label")}[reader]
    with pytest.raises((ValueError, OSError)) as info:
        call()
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert ("is a folder" if kind == "folder" else ("empty" in message or "no rows" in message)), message


@pytest.mark.parametrize("kind", ["empty", "folder", "bad row"])
def test_cli_data_that_is_empty_a_folder_or_malformed_is_one_line_with_status_2(checkpoint, capsys, tmp_path, kind):
    path = tmp_path / "texts.jsonl"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_text("" if kind == "empty" else '{"text": "the film"}\n{"text": "a plot"}\n{"text": \n{"text": "x"}\n')
    code, _, err = cli_run(capsys, "explain", "--model", checkpoint, "--data", path, "--explainer", "attention")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(path) in err and {"empty": "holds no rows", "folder": "is a folder",
                                 "bad row": "line 3: not valid JSON"}[kind] in err, err


@pytest.mark.parametrize("name, content, message", [
    ("m.csv", "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(5)) + "a,b,c\n" + "fine,0\n" * 4,
     "m.csv, line 7: 3 fields where the header has 2"),
    ("m.jsonl", "".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(5)) + '{"text": \n'
     + '{"text": "fine", "label": 0}\n' * 4, "m.jsonl, line 6: not valid JSON"),
    ("q.csv", "text,label\n" + "fine,0\n" * 3 + '"open quote,1\n' + "fine,1\n" * 3,
     "q.csv, line 5: malformed row"),
])
def test_a_malformed_row_in_the_middle_names_its_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        read_table(path, text_col="text", label_col="label")
    assert message in str(info.value), str(info.value)


# -- 7. the command line: resume against other inputs, and one folder for two runs -------------------
AUDIT_TOML = """[audit]
max_examples = 6
chunk_size = 3
explainers = ["attention", "occlusion"]
n_permutations = 2
adversarial_steps = 2
sanity_examples = 2
counterfactual_examples = 4
"""


@pytest.fixture(scope="module")
def keywords_models(tmp_path_factory):
    """Two tiny keywords models (seeds 0 and 1), trained in a few seconds."""
    from attnaudit.model.settings import defaults_for
    from attnaudit.model.train import train_to_folder

    root = tmp_path_factory.mktemp("keywords")
    small = defaults_for("keywords").replace(n_train=200, n_valid=40, n_test=40, epochs=1, d_model=16, n_heads=2,
                                             d_ff=32)
    folders = [train_to_folder(root / f"m{s}", task="keywords", settings=small.replace(seed=s), device="cpu",
                               progress=False)[0] for s in (0, 1)]
    (root / "audit.toml").write_text(AUDIT_TOML)
    return root, folders


@pytest.mark.slow
def test_resume_against_another_model_dataset_or_settings_is_refused_with_the_differences(keywords_models, capsys,
                                                                                          tmp_path):
    root, (first, second) = keywords_models
    out = tmp_path / "report"
    base = ("analyze", "--out", out, "--quiet", "--config", root / "audit.toml")
    code, _, err = cli_run(capsys, *base, "--model", first, "--task", "keywords")
    assert code == 0, err
    code, _, err = cli_run(capsys, *base, "--model", first, "--task", "keywords", "--resume")
    assert code == 0, err                                     # the same inputs: everything is reused

    code, _, err = cli_run(capsys, *base, "--model", second, "--task", "keywords", "--resume")
    assert code == 2 and "holds the report of different models or settings (model: '" in err, err
    assert json.loads((first / "config.json").read_text())["weights_sha256"][:12] in err   # the earlier value
    assert json.loads((second / "config.json").read_text())["weights_sha256"][:12] in err  # and the new one

    other = root / "other.toml"
    other.write_text(AUDIT_TOML.replace("n_permutations = 2", "n_permutations = 3"))
    code, _, err = cli_run(capsys, "analyze", "--out", out, "--quiet", "--config", other, "--model", first, "--task",
                           "keywords", "--resume")
    assert code == 2 and "audit.n_permutations: 2 -> 3" in err and "--overwrite" in err, err

    data = tmp_path / "kw.jsonl"
    code, _, err = cli_run(capsys, "tasks", "export", "--task", "keywords", "--split", "test", "--n", "8", "--seed", "5",
                           "--out", data)
    assert code == 0, err
    code, _, err = cli_run(capsys, *base, "--model", first, "--data", data, "--text-col", "text", "--label-col",
                           "label", "--resume")
    assert code == 2 and "holds the report of different models or settings (data: '" in err, err
    assert (out / "results.json").is_file()                   # the earlier report is untouched


@pytest.mark.slow
def test_a_second_run_on_a_locked_folder_is_refused_naming_the_lock_and_the_pid(keywords_models, capsys, tmp_path):
    root, (first, _) = keywords_models
    out = tmp_path / "busy"
    slow = root / "slow.toml"
    slow.write_text(AUDIT_TOML.replace('["attention", "occlusion"]', '["attention", "kernel_shap"]')
                    .replace("max_examples = 6", "max_examples = 40") + "\n[audit.explainer_params.kernel_shap]\n"
                    "n_samples = 4000\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "attnaudit", "analyze", "--model", str(first), "--task", "keywords",
                             "--out", str(out), "--config", str(slow), "--quiet"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".attnaudit" / "lock"
    try:
        deadline = time.monotonic() + 240
        while not (lock.is_file() and lock.stat().st_size):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.02)
        code, _, err = cli_run(capsys, "analyze", "--model", first, "--task", "keywords", "--out", out, "--config",
                               root / "audit.toml", "--quiet")
        assert proc.poll() is None, "the first run ended before the second tried: make it slower"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert code == 2 and err.count("\n") == 1, err
    assert f"is in use by pid {proc.pid} on host" in err and str(lock) in err, err


# -- 7. a HuggingFace model saved for SDPA or flash attention -----------------------------------------
@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_a_huggingface_model_saved_for_fused_attention_is_explained_from_eager_patterns(tmp_path, implementation):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from attnaudit.model.hooks import record

    vocab = "[PAD] [UNK] [CLS] [SEP] [MASK] the a film plot was not good great bad".split()
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)
    torch.manual_seed(0)
    reference = transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update({"attn_implementation": implementation, "_attn_implementation": implementation})
    (tmp_path / "config.json").write_text(json.dumps(saved))

    model = load_model(tmp_path)
    assert model.net.config._attn_implementation not in ("sdpa", "flash_attention_2")
    batch = model.encode(["the film was not good", "a plot"])
    with torch.no_grad():
        out = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), output_attentions=True)
        _, cache = record(model, batch)
    patterns = cache.stack()                                  # [layer, batch, head, query, key]
    real = batch.attention_mask[None, :, None, :, None].expand_as(patterns)
    torch.testing.assert_close(patterns[real], torch.stack(out.attentions)[real], atol=1e-5, rtol=1e-5)


def test_training_sizes_have_the_checkpoint_caps():
    from attnaudit.model.checkpoint import MAX_ARCHITECTURE
    from attnaudit.model.settings import TrainSettings

    with pytest.raises(ValueError, match=r"TrainSettings.max_len must be an int in \[1, 1,048,576\]; got 1000000000"):
        TrainSettings(max_len=10**9)
    TrainSettings(max_len=MAX_ARCHITECTURE["max_len"])           # the cap itself is allowed


def test_an_attribution_with_line_separators_in_its_texts_saves_and_loads(tmp_path, tiny_model):
    from attnaudit import get_explainer
    from attnaudit.explain.attribution import Attribution

    texts = ["the film\u2028was good", "a\u2029boring\x85plot", "not\x1cbad"]
    attr = get_explainer("attention").explain(tiny_model, texts)
    path = attr.save(tmp_path / "a.jsonl")
    back = Attribution.load(path)
    assert back.texts == attr.texts == texts
    assert torch.equal(back.scores, attr.scores)
