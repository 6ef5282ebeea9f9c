"""The verdict on tables whose answer is known, and the report folder: contents, escaping, re-rendering."""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HtmlCollect, assert_only_own_scripts

from attnaudit.analyses.report import (
    guard_cell,
    load_results,
    md,
    read_guarded_csv,
    render_report,
    unguard_cell,
    write_report,
)
from attnaudit.analyses.verdict import RULE, Verdict, derive_verdict
from attnaudit.explain.registry import ATTENTION_FAMILY, REGISTRY

EXPLAINERS = list(REGISTRY)
HIGHER = {"comprehensiveness": True, "sufficiency": False, "deletion_auc": False, "insertion_auc": True,
          "tau_loo": True, "decision_flip_fraction": False, "gold_average_precision": True}
SCRIPT_TOKEN = "</script><script>alert(1)</script>"
IMG_TOKEN = '"><img src=x onerror=alert(1)>'
FORMULA = '=HYPERLINK("x")'


# -- synthetic tables with a known answer ---------------------------------------------------------
def quality(attention_quality: float) -> dict[str, float]:
    """Explainer -> how faithful its synthetic scores are (0 = random, 1 = the best)."""
    q = {name: 0.8 for name in EXPLAINERS}
    q.update({"integrated_gradients": 1.0, "occlusion": 0.95, "random": 0.0})
    q.update({name: attention_quality for name in ATTENTION_FAMILY})
    return q


def synthetic_metrics(attention_quality: float, *, n: int = 40, seed: int = 0, sanity_final: dict | None = None,
                      ids: list[str] | None = None) -> pd.DataFrame:
    """Tidy metrics where each explainer's mean moves with its quality; shared per-example noise pairs them."""
    rng = np.random.default_rng(seed)
    ids = ids or [f"ex{i}" for i in range(n)]
    q = quality(attention_quality)
    rows = []
    for metric, higher in HIGHER.items():
        shared = rng.normal(0, 0.05, len(ids))
        for name in EXPLAINERS:
            v = (0.2 + 0.5 * q[name] if higher else 0.7 - 0.5 * q[name]) + shared + rng.normal(0, 0.02, len(ids))
            setting = ("aopc" if metric in ("comprehensiveness", "sufficiency") else
                       "policy=mask" if metric == "tau_loo" else "")
            rows += [(i, name, metric, setting, float(x)) for i, x in zip(ids, v)]
            if setting == "aopc":
                rows += [(i, name, metric, "k=0.1", float(x)) for i, x in zip(ids, v)]
    steps = ["step=0:original", "step=1:head", "step=2:encoder.layers.1", "step=3:encoder.layers.0"]
    for name in EXPLAINERS:
        final = (sanity_final or {}).get(name, 0.1)
        for k, step in enumerate(steps):
            value = 1.0 + (final - 1.0) * k / (len(steps) - 1)
            rows += [(i, name, "randomization_spearman", step, float(value + rng.normal(0, 0.02))) for i in ids]
    return pd.DataFrame(rows, columns=["example_id", "explainer", "metric", "setting", "value"])


def synthetic_counterfactual(tvd: float, *, jsd: float = 0.1, satisfied: float = 0.2) -> pd.DataFrame:
    rows = []
    for layer in ("0", "1", "all"):
        rows += [("permutation", layer, "all", "median_tvd", tvd), ("uniform", layer, "all", "median_tvd", tvd),
                 ("uniform", layer, "all", "accuracy", 0.95 - 2 * tvd), ("uniform", layer, "all", "accuracy_original", 0.95),
                 ("adversarial", layer, "all", "jsd_reached", jsd),
                 ("adversarial", layer, "all", "constraint_satisfied_fraction", satisfied),
                 ("erasure", layer, "all", "flip_rate_max", 0.3), ("erasure", layer, "all", "flip_rate_random", 0.05)]
    return pd.DataFrame(rows, columns=["test", "layer", "head", "statistic", "value"])


def synthetic_report_inputs(*, n: int = 12, seed: int = 0, task: str = "keywords", hostile: bool = True) -> dict:
    """Everything write_report takes, for one task; with hostile tokens, labels and ids when asked."""
    rng = np.random.default_rng(seed)
    ids = [FORMULA if hostile and i == 0 else f"ex{i}" for i in range(n)]
    sanity = {"attention": 0.75, "attention_norm": 0.7, "rollout": 0.45, "random": 0.0}
    metrics = synthetic_metrics(0.9, n=n, seed=seed, ids=ids, sanity_final=sanity)
    words = "the film was not good but the actor was great".split()
    records, examples = [], []
    q = quality(0.9)
    for i, ex_id in enumerate(ids):
        toks = ["[CLS]"] + words[: 5 + i % 5]
        if hostile and i < 2:
            toks[2], toks[3] = SCRIPT_TOKEN, IMG_TOKEN
        gold = [0] + [int(w in ("good", "great", "not")) for w in toks[1:]]
        special = [True] + [False] * (len(toks) - 1)
        label = FORMULA if hostile and i == 0 else i % 2
        pred = label if i % 4 else (1 - i % 2 if not (hostile and i == 0) else 0)
        examples.append({"id": ex_id, "gold": gold, "label": label, "prediction": pred})
        for name in EXPLAINERS:
            s = q[name] * np.asarray(gold, float) + rng.normal(0, 0.3, len(toks))
            s[0] = 0.0
            records.append({"id": ex_id, "text": " ".join(toks[1:]), "tokens": toks, "scores": s.round(4).tolist(),
                            "special": special, "explainer": name, "params": {}, "target": pred, "prob": 0.8})
    curves = []
    for name in EXPLAINERS:
        for ex_id in ids:
            noise = rng.normal(0, 0.05, 2)
            for f in np.linspace(0, 1, 6):
                drop = f ** (0.5 + q[name])                      # faithful maps lose the class probability early
                curves.append((ex_id, name, "deletion", f, float(np.clip(0.9 - 0.6 * drop + f * noise[0], 0, 1))))
                curves.append((ex_id, name, "insertion", f, float(np.clip(0.3 + 0.6 * f ** (2 - q[name]) + f * noise[1], 0, 1))))
    tokens = ["[CLS]"] + words[:7]
    att = rng.dirichlet(np.ones(len(tokens)) * 0.3, size=(2, 2, len(tokens)))                 # [layer, head, query, key]
    perm = pd.DataFrame({"example_id": ids, "layer": "all", "max_attention": rng.uniform(0.2, 0.9, n),
                         "median_tvd": rng.uniform(0.1, 0.4, n)})
    card = {"architecture": {"n_layers": 2, "n_heads": 2, "d_model": 64, "norm": "post"},
            "training": {"data": "keywords", "test_accuracy": 0.97, "epochs": 10}, "seed": 0, "device": "cpu",
            "label_names": ["negative", "positive"]}
    return dict(metrics=metrics, counterfactual={"summary": synthetic_counterfactual(0.3), "permutation": perm},
                attributions=records, examples=examples, model_cards={task: card},
                attention_examples={"id": "ex3", "tokens": tokens, "attention": att},
                curves=pd.DataFrame(curves, columns=["example_id", "explainer", "curve", "fraction", "prob"]),
                settings={"task": task, "policy": "mask", "n_examples": n}, timings={"explain": 1.5, "faithfulness": 3.25},
                title="Can attention explain keywords? " + (SCRIPT_TOKEN if hostile else ""))


# -- verdicts ------------------------------------------------------------------------------------
def test_attention_like_random_and_last_gives_no():
    v = derive_verdict(synthetic_metrics(0.0), task="t", counterfactual=synthetic_counterfactual(0.3))
    assert v.answer == "no", v.paragraph
    assert all(not r["beats_random"] for r in v.ranks)
    assert v.rule == RULE and "NO:" in v.rule


def test_attention_near_the_best_gives_yes():
    v = derive_verdict(synthetic_metrics(1.0), task="t", counterfactual=synthetic_counterfactual(0.3))
    assert v.answer == "yes", v.paragraph
    assert set(v.qualifying) == set(ATTENTION_FAMILY) & set(EXPLAINERS)       # the registry's (not the seq2seq name)
    assert v.paragraph.startswith("Task t: yes.")


@pytest.mark.slow
def test_counterfactual_contradiction_downgrades_yes_to_partly():
    ignored = derive_verdict(synthetic_metrics(0.98), task="t", counterfactual=synthetic_counterfactual(0.01))
    assert ignored.answer == "partly" and ignored.counterfactual["attention_changes_output"] is False
    adversarial = derive_verdict(synthetic_metrics(0.98), task="t",
                                 counterfactual=synthetic_counterfactual(0.3, jsd=0.5, satisfied=0.9))
    assert adversarial.answer == "partly" and adversarial.counterfactual["adversarial_found"] is True


def test_middling_attention_gives_partly():
    v = derive_verdict(synthetic_metrics(0.5), task="t")
    assert v.answer == "partly"
    assert not v.qualifying


def test_best_placed_method_breaks_ties_by_median_rank():
    import re

    v = derive_verdict(synthetic_metrics(0.5), task="t")
    ranks = pd.DataFrame(v.ranks)
    score = ranks.groupby("explainer")[["near_best", "beats_random"]].sum().sum(axis=1)
    median = ranks.groupby("explainer")["rank"].median()
    tied = score[score == score.max()].index
    assert len(tied) > 1                                     # the case this test is about
    named = re.search(r"The best-placed attention method, (\w+),", v.paragraph).group(1)
    assert named in tied and median[named] == median[tied].min()


def test_failing_randomisation_disqualifies():
    fails = {name: 0.9 for name in ATTENTION_FAMILY}
    v = derive_verdict(synthetic_metrics(0.98, sanity_final=fails), task="t", counterfactual=synthetic_counterfactual(0.3))
    assert v.answer == "partly" and not v.qualifying
    assert {r["explainer"] for r in v.randomization if not r["passed"]} == set(ATTENTION_FAMILY) & set(EXPLAINERS)


def test_given_comparisons_are_used():
    m = synthetic_metrics(0.0)
    setting = {"comprehensiveness": "aopc", "sufficiency": "aopc", "tau_loo": "policy=mask"}
    comps = pd.DataFrame([(a, metric, setting.get(metric, ""), vs, 0.5, 0.5, 0.0)
                          for a in ATTENTION_FAMILY for metric in HIGHER for vs in ("best", "random")],
                         columns=["explainer", "metric", "setting", "vs", "p_value", "p_holm", "mean_diff"])
    v = derive_verdict(m, task="t", comparisons=comps)
    assert all(r["near_best"] for r in v.ranks)          # p_holm 0.5: "not significantly worse than the best"
    assert v.answer == "no"                               # ... but not better than random either
    assert any("taken from the comparisons given" in c for c in v.caveats)


def test_no_attention_family_is_undetermined_and_verdict_round_trips():
    m = synthetic_metrics(0.5)
    v = derive_verdict(m[~m["explainer"].isin(ATTENTION_FAMILY)], task="t")
    assert v.answer == "undetermined"
    assert Verdict.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    with pytest.raises(ValueError, match="answer must be one of"):
        Verdict(task="t", answer="maybe", rule=RULE, facts=(), caveats=(), paragraph="")


def test_caveats_follow_the_inputs():
    card = {"architecture": {"n_layers": 2, "d_model": 64}}
    v = derive_verdict(synthetic_metrics(0.5, n=10), task="keywords", model_card=card)
    text = " ".join(v.caveats)
    for needle in ("out of distribution", "small", "synthetic", "fewer than 30", "counterfactual"):
        assert needle in text


# -- the report folder ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    return write_report(tmp_path_factory.mktemp("report"), **synthetic_report_inputs())


def parse(path: Path) -> HtmlCollect:
    return HtmlCollect(path.read_text(encoding="utf-8"))


def test_report_folder_contents(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert names == {"index.html", "report.md", "results.json", "metrics.csv.gz", "counterfactual.csv",
                     "counterfactual_permutation.csv", "attributions.jsonl.gz", "curves_mean.csv", "agreement.csv",
                     "examples.jsonl.gz", "attention.json", "figures"}
    assert not [p for p in report_dir.parent.iterdir() if p.name.startswith(f".{report_dir.name}.")]  # no staging folder
    pngs = sorted((report_dir / "figures").glob("*.png"))
    assert len(pngs) == 10 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert max(p.stat().st_size for p in pngs) < 400_000
    res = json.loads((report_dir / "results.json").read_text())
    assert res["verdicts"]["keywords"]["answer"] in ("yes", "partly", "no")
    assert {"torch", "captum", "pandas", "attnaudit"} <= set(res["versions"])
    assert res["device"] == "cpu" and res["timings"]["explain"] == 1.5
    assert res["tables"]["metrics.csv.gz"] == "full" and res["tables"]["attributions.jsonl.gz"].startswith("sampled")
    assert set(res["tables"]) | {"results.json", "index.html", "report.md", "figures/"} == set(res["files"])


def test_html_order_and_no_injection(report_dir):
    page = parse(report_dir / "index.html")
    tags = [t for t, _ in page.tags]
    assert "iframe" not in tags and "object" not in tags
    assert_only_own_scripts((report_dir / "index.html").read_text(encoding="utf-8"))
    ids = [a.get("id") for _, a in page.tags if a.get("id")]
    assert ids == ["verdict", "verdict-keywords", "summary-figure", "attention", "attention-task00-keywords",
                   "evidence", "agreement", "examples", "model"]
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) == 8 and all(a["src"].startswith("data:image/png;base64,") for a in imgs)   # the attention PNGs: in figures/ and report.md; the page has the interactive view
    allowed = {"lang", "charset", "http-equiv", "content", "name", "href", "id", "class", "style", "title", "src",
               "alt", "open"}
    for tag, attrs in page.tags:
        assert set(attrs) <= allowed | ({"type"} if tag == "script" else set()), (tag, attrs)
        assert not any(k.startswith("on") for k in attrs)
        assert all(v.startswith("#") for k, v in attrs.items() if k == "href")
        assert not any("http://" in (v or "") or "https://" in (v or "") for v in attrs.values())
    text = "".join(page.text)
    assert SCRIPT_TOKEN in text and IMG_TOKEN in text and FORMULA in text     # shown as text, not markup
    csp = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    raw = (report_dir / "index.html").read_text()
    assert "http://" not in raw and "https://" not in raw


def test_csv_cells_are_guarded(report_dir):
    with gzip.open(report_dir / "metrics.csv.gz", "rt", newline="", encoding="utf-8") as f:
        cells = [c for row in csv.reader(f) for c in row]
    assert "'" + FORMULA in cells and FORMULA not in cells
    for c in cells:
        try:
            float(c)
        except ValueError:
            assert not c.startswith(("=", "+", "-", "@")), c
    back = read_guarded_csv(report_dir / "metrics.csv.gz", ["example_id"])
    assert FORMULA in set(back["example_id"])
    assert unguard_cell(guard_cell("'=x")) == "'=x" and guard_cell(-1.5) == -1.5


@pytest.mark.slow
def test_reverdict_derives_the_verdict_again_from_the_saved_tables(tmp_path):
    out = write_report(tmp_path / "r", **synthetic_report_inputs(hostile=False))
    saved = json.loads((out / "results.json").read_text())
    stale = json.loads(json.dumps(saved))
    stale["verdicts"]["keywords"].update(answer="no", paragraph="an older rule's words")
    (out / "results.json").write_text(json.dumps(stale))
    render_report(out)                                           # plain re-render keeps what results.json says
    assert "an older rule" in (out / "report.md").read_text()
    render_report(out, reverdict=True)
    again = json.loads((out / "results.json").read_text())
    assert again["verdicts"]["keywords"]["answer"] == saved["verdicts"]["keywords"]["answer"]
    assert again["verdicts"]["keywords"]["paragraph"] == saved["verdicts"]["keywords"]["paragraph"]
    assert again["timings"] == saved["timings"] and "an older rule" not in (out / "report.md").read_text()


@pytest.mark.slow
def test_render_report_reproduces_the_page(report_dir):
    before = {p.name: p.read_bytes() for p in [report_dir / "index.html", report_dir / "report.md",
                                                *(report_dir / "figures").glob("*.png")]}
    (report_dir / "index.html").unlink()
    (report_dir / "figures" / sorted(n for n in before if n.endswith(".png"))[0]).unlink()
    render_report(report_dir)
    after = {p.name: p.read_bytes() for p in [report_dir / "index.html", report_dir / "report.md",
                                               *(report_dir / "figures").glob("*.png")]}
    assert after == before
    assert load_results(report_dir)["results"]["tasks"] == ["keywords"]


def test_markdown_is_escaped(report_dir):
    assert md("a|b`c`<script>*x*_y_[z](u)") == "a\\|b\\`c\\`&lt;script&gt;\\*x\\*\\_y\\_\\[z\\](u)"
    text = (report_dir / "report.md").read_text()
    assert "<script>" not in text and "<img" not in text
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.replace("\\\\", "").replace("\\|", "").count("|"))   # unescaped pipes only
        elif current:
            blocks, current = blocks + [current], []
    assert len(blocks) >= 3
    assert all(len(set(b)) == 1 for b in blocks), blocks          # no cell broke its row


def test_several_tasks_need_task_keys(tmp_path):
    inputs = synthetic_report_inputs(n=6, hostile=False)
    m = pd.concat([inputs["metrics"].assign(task="a"), inputs["metrics"].assign(task="b")])
    with pytest.raises(ValueError, match="must have a 'task' column"):
        write_report(tmp_path, metrics=m, counterfactual=synthetic_counterfactual(0.3))
    with pytest.raises(ValueError, match="missing"):
        write_report(tmp_path, metrics=m.drop(columns="value"))
