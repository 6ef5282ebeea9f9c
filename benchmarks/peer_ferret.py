"""attnaudit against ferret-xai 0.4.2, side by side on the same model and sentences. Prints figures; not a test.

    python -m venv /tmp/ferret-venv --system-site-packages
    /tmp/ferret-venv/bin/pip install ferret-xai==0.4.2 "pyarrow<15" "transformers<5" torch==2.13.0
    python benchmarks/peer_ferret.py --ferret-python /tmp/ferret-venv/bin/python --model runs/sst2-minilm-brief \\
        [--data ../shared/data/sst2/dev.tsv] [--rounds 3] [--threads 2]

(torch==2.13.0 pins the system's CPU torch, so pip keeps it instead of pulling a CUDA wheel; ferret needs
transformers 4, attnaudit 5, hence the side virtualenv: ferret never enters attnaudit's dependencies.)
A model folder with a trained head, e.g. `attnaudit finetune --hf $(python -c "from attnaudit.model.hf_load
import minilm_path; print(minilm_path())") --data ../shared/data/sst2/train.tsv.gz --text-col sentence
--label-col label --valid ../shared/data/sst2/dev.tsv --n-train 3000 --epochs 1 --lr 1e-4 --max-len 64
--out runs/sst2-minilm-brief`.

What is compared: the first --n SST-2 dev sentences of 20–35 word pieces (special tokens not counted), the
predicted class, and the explainers both tools have with ferret's settings: Gradient (captum Saliency,
|∂f/∂e| summed over d_model), Gradient × Input, Integrated Gradients × Input (50 Gauss–Legendre steps,
baseline [CLS][PAD]…[SEP]); ferret's faithfulness evaluators (AOPC comprehensiveness and sufficiency at
10 %…100 %, positive scores only, τ-LOO; tokens deleted). attnaudit runs them as FERRET_EXACT_DELETE: its
`ferret_aopc` (the `ferret=True` / "ferret_aopc" rows of faithfulness_table) and `tau_loo` with
policy="delete", on ids, with one perturbation engine shared by the three explainers. ferret scores are
not L1-normalised (its Benchmark.explain default); that scaling changes no evaluator.

Each round starts one process per tool (ferret with --ferret-python, attnaudit with this python), in
alternating order; model loading is outside the times. The attnaudit process also measures the floor of
integrated gradients: the plain transformers model (eager attention), one sentence at a time, one forward
+ backward of the target logit over exactly its 50 interpolated inputs, nothing else; and the floor of the
evaluation: plain transformers forwards over exactly the distinct inputs attnaudit's engine ran, sorted by length,
at the best of 16/32/64/128 rows a call (ferret / that floor bounds any tool's evaluation ratio). Also timed there:
attnaudit's IG as one captum call (`max_tokens=None`, bit-identical to captum) beside its default grouping by length
(`max_tokens`, TOKENS_PER_PASS tokens per pass), which agrees with it to float noise.

Numbers: the largest |difference| of every attribution and every evaluator value between the tools, and
how many evaluator cases differ by more than 1e-6 where ferret's decode -> re-tokenise round trip changed
the ids of some perturbed input (found by re-tokenising ferret's decoded strings and comparing ids), and
how many differ without such a change. attnaudit's evaluators are also run on ferret's own scores, which
separates evaluator differences from the explainers' float noise.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
EXPLAINERS = ("gradient", "gradient_x_input", "ig_x_input")
EVALUATORS = ("aopc_compr", "aopc_suff", "taucorr_loo")
FERRET_EXACT_DELETE = "ferret_exact_delete"      # the preset: ferret's evaluators on id-level deletion
TOLERANCE = 1e-6


# -- the sentences -------------------------------------------------------------------------------
def pick_sentences(data: Path, folder: Path, n: int, lo: int, hi: int) -> list[str]:
    """The first n sentences of the TSV (header sentence, label) with lo..hi word pieces, in file order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    with open(data, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    column = rows[0].index("sentence")
    texts = [r[column] for r in rows[1:] if lo <= len(tok.tokenize(r[column])) <= hi][:n]
    if len(texts) < n:
        sys.exit(f"error: only {len(texts)} sentences of {data} have {lo}-{hi} word pieces; lower --n.")
    return texts


def describe_model(folder: Path) -> str:
    prov = folder / "attnaudit_finetune.json"
    if prov.is_file():
        p = json.loads(prov.read_text(encoding="utf-8"))
        s = p.get("settings", {})
        metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
        acc = metrics.get("valid_accuracy", metrics.get("best_valid_accuracy"))
        return (f"fine-tuned head (attnaudit finetune: n_train {s.get('n_train')}, epochs {s.get('epochs')}"
                + (f", valid accuracy {acc:.3f}" if isinstance(acc, float) else "") + ")")
    return "head of unknown provenance (no attnaudit_finetune.json; a seeded random head is untrained)"


# -- ferret's side (runs in the side virtualenv) -------------------------------------------------
def ferret_child(spec: dict) -> dict:
    import numpy as np
    import torch
    from ferret import GradientExplainer, IntegratedGradientExplainer
    from ferret.evaluators.faithfulness_measures import (
        AOPC_Comprehensiveness_Evaluation,
        AOPC_Sufficiency_Evaluation,
        TauLOO_Evaluation,
    )
    from ferret.evaluators.utils_from_soft_to_discrete import _get_id_tokens_percentage, parse_evaluator_args
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"]).eval()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    texts = spec["texts"]
    explainers = {"gradient": GradientExplainer(model, tok, multiply_by_inputs=False),
                  "gradient_x_input": GradientExplainer(model, tok, multiply_by_inputs=True),
                  "ig_x_input": IntegratedGradientExplainer(model, tok, multiply_by_inputs=True)}
    evaluators = {"aopc_compr": AOPC_Comprehensiveness_Evaluation(model, tok),
                  "aopc_suff": AOPC_Sufficiency_Evaluation(model, tok), "taucorr_loo": TauLOO_Evaluation(model, tok)}
    for explainer in explainers.values():                                # warm-up of every part, untimed
        warm = explainer(texts[0], 0)
    for evaluator in evaluators.values():
        evaluator.compute_evaluation(warm, 0)
    times: dict[str, float] = {}
    t = time.perf_counter()
    with torch.no_grad():
        targets = [int(model(**tok(x, return_tensors="pt")).logits.argmax(-1)) for x in texts]
    times["predict"] = time.perf_counter() - t
    explanations = {}
    for name, explainer in explainers.items():
        t = time.perf_counter()
        call = {"call_args": {"n_steps": spec["n_steps"]}} if name == "ig_x_input" else {}
        explanations[name] = [explainer(x, y, **call) for x, y in zip(texts, targets)]
        times[f"explain/{name}"] = time.perf_counter() - t
    values = {}
    for ev_name, evaluator in evaluators.items():
        t = time.perf_counter()
        for name in explainers:
            values[f"{name}/{ev_name}"] = [float(evaluator.compute_evaluation(e, y).score)
                                           for e, y in zip(explanations[name], targets)]
        times[f"evaluate/{ev_name}"] = time.perf_counter() - t
    out = {"times": times, "targets": targets, "values": values,
           "scores": {k: [e.scores.tolist() for e in v] for k, v in explanations.items()},
           "ids": [tok(x)["input_ids"] for x in texts]}
    if spec.get("round_trip"):
        out["round_trip"] = ferret_round_trips(tok, texts, explanations, _get_id_tokens_percentage,
                                               parse_evaluator_args({})[2]["thresholds"], np)
    return out


def ferret_round_trips(tok, texts, explanations, top_ids, thresholds, np) -> dict[str, list[bool]]:
    """For each explainer/evaluator and sentence: does any input ferret decodes re-tokenise to other ids?"""
    def changed(ids: list[int]) -> bool:
        return tok(tok.decode(ids))["input_ids"] != [tok.cls_token_id, *ids, tok.sep_token_id]

    flags: dict[str, list[bool]] = {}
    for name, exps in explanations.items():
        for ev in EVALUATORS:
            flags[f"{name}/{ev}"] = []
        for x, e in zip(texts, exps):
            ids = tok(x)["input_ids"][1:-1]                              # ferret's remove_first_last
            scores = np.asarray(e.scores)[1:-1]
            flags[f"{name}/taucorr_loo"].append(any(changed(ids[:j] + ids[j + 1:]) for j in range(len(ids))))
            for ev in ("aopc_compr", "aopc_suff"):
                any_changed, last = False, None
                for v in thresholds:                                     # ferret's loop, deduplicated rationales
                    top = top_ids(scores, v, only_pos=True)
                    if top is None or (last is not None and set(top) == last):
                        continue
                    last = set(top)
                    kept = (np.delete(np.array(ids), top) if ev == "aopc_compr" else np.array(ids)[np.sort(top)])
                    any_changed |= changed([int(i) for i in kept])
                flags[f"{name}/{ev}"].append(any_changed)
    return flags


# -- attnaudit's side ----------------------------------------------------------------------------
def attnaudit_explainers(n_steps: int, max_tokens: int | str | None = "auto") -> dict:
    import captum.attr

    from attnaudit.explain.gradients import CaptumExplainer, InputXGradient, IntegratedGradients

    return {"gradient": CaptumExplainer(captum.attr.Saliency, name="gradient", reduction="sum", abs=True),
            "gradient_x_input": InputXGradient(reduction="sum"),
            "ig_x_input": IntegratedGradients(baseline="pad", n_steps=n_steps, max_tokens=max_tokens)}


def ferret_exact_delete(model, batch, attributions: dict, engines: list | None = None) -> tuple[dict, dict]:
    """FERRET_EXACT_DELETE: ferret's aopc_compr, aopc_suff and taucorr_loo on id-level deletion -> (values, times).

    values "explainer/evaluator" -> [batch] list; one engine (policy "delete") serves every explainer, so an
    input two explainers or evaluators share is evaluated once. times: seconds per evaluator, all explainers.
    """
    from attnaudit.analyses import faithfulness as F
    from attnaudit.explain.perturb import PerturbationEngine

    engine = PerturbationEngine(model, batch, policy="delete")
    if engines is not None:
        engines.append(engine)
    metrics = {"aopc_compr": lambda a: F.ferret_aopc(engine, batch, a, kind="comprehensiveness"),
               "aopc_suff": lambda a: F.ferret_aopc(engine, batch, a, kind="sufficiency"),
               "taucorr_loo": lambda a: F.tau_loo(engine, batch, a, policy="delete")}
    values, times = {}, {}
    for ev, metric in metrics.items():
        t = time.perf_counter()
        for name, attr in attributions.items():
            values[f"{name}/{ev}"] = metric(attr).tolist()
        times[ev] = time.perf_counter() - t
    return values, times


def ig_floor(hf, batch, targets, n_steps: int, pad_id: int) -> float:
    """Plain transformers forward + input-gradient backward over exactly each sentence's n_steps interpolated inputs."""
    import numpy as np
    import torch

    nodes, _ = np.polynomial.legendre.leggauss(n_steps)
    alphas = torch.tensor((nodes + 1) / 2, dtype=torch.float32)                   # captum's Gauss–Legendre points
    embedding = hf.get_input_embeddings()
    t = time.perf_counter()
    for i in range(len(batch)):
        n = int(batch.attention_mask[i].sum())
        x = embedding(batch.input_ids[i:i + 1, :n]).detach()                     # [1, seq, d_model]
        ref = x.clone()
        ref[:, 1:n - 1] = embedding(torch.tensor([pad_id])).detach()              # [CLS][PAD]…[SEP]
        path = (ref + alphas[:, None, None] * (x - ref)).requires_grad_()         # [n_steps, seq, d_model]
        logit = hf(inputs_embeds=path, attention_mask=torch.ones(n_steps, n, dtype=torch.long)).logits
        torch.autograd.grad(logit[:, int(targets[i])].sum(), path)
    return time.perf_counter() - t


def evaluation_floor(hf, engine, sizes=(16, 32, 64, 128)) -> tuple[float, int]:
    """The evaluation floor: plain transformers forwards (eager attention) over exactly the distinct inputs
    `engine` ran, pre-built, sorted by length, each call cut to its longest row -> (seconds at the best of
    `sizes` rows a call, that size). Nothing else: no cache, no materialising, no bookkeeping."""
    import torch

    ids, mask = engine.inputs()                                                   # [n, seq] each
    width = mask.sum(1)
    order = torch.argsort(width, stable=True)
    ids, mask, width = ids[order], mask[order], width[order]
    best = (float("inf"), 0)
    with torch.inference_mode():
        for size in sizes:
            t = time.perf_counter()
            for lo in range(0, len(ids), size):
                w = int(width[lo: lo + size].max())
                hf(input_ids=ids[lo: lo + size, :w], attention_mask=mask[lo: lo + size, :w].long()).logits.softmax(-1)
            best = min(best, (time.perf_counter() - t, size))
    return best


def attnaudit_child(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    import attnaudit

    torch.set_num_threads(spec["threads"])
    model = attnaudit.load_model(spec["model"])
    hf = AutoModelForSequenceClassification.from_pretrained(spec["model"], attn_implementation="eager").eval()
    batch = model.encode(spec["texts"])
    explainers = attnaudit_explainers(spec["n_steps"], spec["max_tokens"])
    one_call = attnaudit_explainers(spec["n_steps"], None)["ig_x_input"]
    from attnaudit.explain.gradients import IntegratedGradients
    adaptive = IntegratedGradients(baseline="pad")                                # attnaudit's default: adaptive steps
    first = batch.select([0])                                                     # warm-up of every part, untimed
    ferret_exact_delete(model, first, {k: e.explain(model, first) for k, e in explainers.items()})
    adaptive.explain(model, first)
    ig_floor(hf, first, [0], spec["n_steps"], model.pad_id)
    times: dict[str, float] = {}
    attributions = {}
    for name, explainer in explainers.items():
        t = time.perf_counter()
        attributions[name] = explainer.explain(model, batch)
        times[f"explain/{name}"] = time.perf_counter() - t
    engines: list = []
    values, eval_times = ferret_exact_delete(model, batch, attributions, engines)
    times.update({f"evaluate/{k}": v for k, v in eval_times.items()})
    times["evaluate_floor"], floor_rows = evaluation_floor(hf, engines[0])
    targets = attributions["ig_x_input"].target
    # the IG floor and IG as one captum call, interleaved with nothing else of this process
    times["ig_floor"] = ig_floor(hf, batch, targets, spec["n_steps"], model.pad_id)
    t = time.perf_counter()
    grouped = one_call.explain(model, batch)
    times["explain/ig_x_input_one_call"] = time.perf_counter() - t
    t = time.perf_counter()
    auto = adaptive.explain(model, batch)
    times["explain/ig_x_input_adaptive"] = time.perf_counter() - t
    steps, gaps = auto.extras["n_steps"].tolist(), auto.extras["completeness_gap_relative"].abs().tolist()
    fixed = attributions["ig_x_input"].scores
    scale = fixed.abs().amax(1).clamp_min(1e-12)                                  # [batch] each sentence's largest |score|
    one = time.perf_counter()
    for i in range(len(batch)):
        explainers["ig_x_input"].explain(model, batch.select([i]))
    times["explain/ig_x_input_one_per_call"] = time.perf_counter() - one
    n = batch.attention_mask.sum(1).tolist()
    return {"times": times, "targets": targets.tolist(), "values": values,
            "scores": {k: [a.scores[i, :n[i]].tolist() for i in range(len(batch))] for k, a in attributions.items()},
            "grouped_max_diff": float((grouped.scores - attributions["ig_x_input"].scores).abs().max()),
            "adaptive": {"steps": steps, "gaps": gaps, "converged": auto.extras["converged"].tolist(),
                         "max_rel_diff": float(((auto.scores - fixed).abs().amax(1) / scale).max())},
            "ids": [batch.input_ids[i, :n[i]].tolist() for i in range(len(batch))],
            "evaluate_inputs": engines[0].stats.forwards, "evaluate_floor_rows": floor_rows}


def child_main(side: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = ferret_child(spec) if side == "ferret" else attnaudit_child(spec)
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")


# -- the parent: rounds, then figures ------------------------------------------------------------
def run_side(python: str, side: str, spec: dict, tmp: Path) -> dict:
    spec_path, out_path = tmp / f"{side}-spec.json", tmp / f"{side}-out.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    if side == "ferret":                 # the side venv must not see this checkout's packages first
        env.pop("PYTHONPATH", None)
    t = time.perf_counter()
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--child", side, str(spec_path), str(out_path)],
                          env=env, capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        sys.exit(f"error: the {side} process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(out_path.read_text(encoding="utf-8"))
    out["process_seconds"] = time.perf_counter() - t
    return out


def totals(times: dict, *, ig_key: str = "explain/ig_x_input") -> dict:
    explain = sum(times[f"explain/{e}"] for e in EXPLAINERS if e != "ig_x_input") + times[ig_key]
    evaluate = sum(times[f"evaluate/{e}"] for e in EVALUATORS)
    return {"explain": explain, "evaluate": evaluate, "end to end": explain + evaluate + times.get("predict", 0.0)}


def spread(xs: list[float], unit: str = " s") -> str:
    return f"{statistics.median(xs):7.2f}{unit} [{min(xs):.2f}–{max(xs):.2f}]"


def ratio(f: list[float], a: list[float]) -> str:
    r = [x / y for x, y in zip(f, a)]
    return f"{statistics.median(r):5.2f}× [{min(r):.2f}–{max(r):.2f}]"


def compare(ferret: dict, ours: dict, round_trip: dict, cross: dict | None) -> list[str]:
    import math

    lines = [f"targets equal: {ferret['targets'] == ours['targets']}; "
             f"token ids equal: {ferret['ids'] == ours['ids']} ({len(ours['ids'])} sentences)"]
    lines.append("attributions, largest |difference| (absolute; relative to the sentence's largest |score|):")
    for name in EXPLAINERS:
        absd, reld = 0.0, 0.0
        for f, a in zip(ferret["scores"][name], ours["scores"][name]):
            d = max(abs(x - y) for x, y in zip(f, a))
            absd, reld = max(absd, d), max(reld, d / max(max(map(abs, f)), 1e-30))
        lines.append(f"  {name:<18} {absd:.3g}   {reld:.3g}")
    lines.append(f"evaluators ({FERRET_EXACT_DELETE} vs ferret), per explainer: largest |difference| (and where no "
                 f"re-tokenisation changed the ids); cases > "
                 f"{TOLERANCE:g}: of them with re-tokenised ids changed / without; ids changed in all cases")
    unexplained = 0
    for key in ferret["values"]:
        f, a, rt = ferret["values"][key], ours["values"][key], round_trip[key]
        diffs = [0.0 if (math.isnan(x) and math.isnan(y)) else abs(x - y) for x, y in zip(f, a)]
        diffs = [math.inf if math.isnan(d) else d for d in diffs]
        bad = [i for i, d in enumerate(diffs) if d > TOLERANCE]
        with_rt = sum(rt[i] for i in bad)
        unexplained += len(bad) - with_rt
        clean = max((d for d, changed in zip(diffs, rt) if not changed), default=0.0)
        line = (f"  {key:<30} {max(diffs):9.3g} (ids kept: {clean:8.2g})  {len(bad):2d}: {with_rt:2d} / {len(bad) - with_rt:2d}   "
                f"re-tokenised {sum(rt):2d} of {len(rt)}")
        if cross is not None:
            cd = [0.0 if (math.isnan(x) and math.isnan(y)) else abs(x - y) for x, y in zip(f, cross[key])]
            cbad = [i for i, d in enumerate(cd) if not d <= TOLERANCE]
            line += (f"   on ferret's scores: {max(cd):.3g}, {len(cbad)} > {TOLERANCE:g} "
                     f"({len(cbad) - sum(rt[i] for i in cbad)} without re-tokenisation)")
        lines.append(line)
    lines.append(f"cases beyond {TOLERANCE:g} not explained by re-tokenisation: {unexplained}")
    return lines


def evaluate_on_ferret_scores(spec: dict, ferret: dict) -> dict:
    """attnaudit's FERRET_EXACT_DELETE applied to ferret's own attributions (untimed)."""
    import torch

    import attnaudit
    from attnaudit.explain.base import Explainer, package_attribution

    model = attnaudit.load_model(spec["model"])
    batch = model.encode(spec["texts"])
    with torch.no_grad():
        probs = model(batch).float().softmax(-1)
    target = torch.tensor(ferret["targets"])
    attributions = {}
    for name in EXPLAINERS:
        scores = torch.zeros(batch.input_ids.shape)
        for i, s in enumerate(ferret["scores"][name]):
            scores[i, : len(s)] = torch.tensor(s)
        stub = Explainer()
        stub.name = name
        attributions[name] = package_attribution(stub, batch, scores, target, probs, 0.0)
    return ferret_exact_delete(model, batch, attributions)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ferret-python", required=True, help="python of a virtualenv where `import ferret` works")
    parser.add_argument("--model", type=Path, required=True, help="HuggingFace folder with a classification head")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TSV with a `sentence` column (SST-2 dev)")
    parser.add_argument("--n", type=int, default=20, help="sentences (default 20)")
    parser.add_argument("--pieces", default="20-35", help="word pieces per sentence, LO-HI (default 20-35)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides (default 2)")
    parser.add_argument("--n-steps", type=int, default=50, help="integrated-gradients steps on both sides (default 50)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="attnaudit's IG grouping by length, tokens per pass (default TOKENS_PER_PASS)")
    parser.add_argument("--json", type=Path, help="also write every round's raw figures here")
    args = parser.parse_args()
    from attnaudit.explain.gradients import TOKENS_PER_PASS

    lo, hi = (int(v) for v in args.pieces.split("-"))
    folder = args.model.resolve()
    if not (folder / "config.json").is_file():
        sys.exit(f"error: --model {args.model} is not a HuggingFace folder (no config.json); see --help for one.")
    texts = pick_sentences(args.data, folder, args.n, lo, hi)
    spec = {"model": str(folder), "texts": texts, "threads": args.threads, "n_steps": args.n_steps,
            "max_tokens": args.max_tokens or TOKENS_PER_PASS}
    print(f"model {args.model}: {describe_model(folder)}", flush=True)
    print(f"{len(texts)} sentences of {lo}-{hi} word pieces from {args.data}; {args.threads} threads; "
          f"IG {args.n_steps} Gauss–Legendre steps; {args.rounds} rounds, sides alternating", flush=True)
    rounds: list[tuple[dict, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            sides = ("ferret", "attnaudit") if r % 2 == 0 else ("attnaudit", "ferret")
            got = {}
            for side in sides:
                python = args.ferret_python if side == "ferret" else sys.executable
                got[side] = run_side(python, side, {**spec, "round_trip": r == 0 and side == "ferret"}, Path(tmp))
            rounds.append((got["ferret"], got["attnaudit"]))
            f_t, a_t = totals(got["ferret"]["times"]), totals(got["attnaudit"]["times"])
            print(f"round {r + 1}: ferret {f_t['end to end']:.1f} s, attnaudit {a_t['end to end']:.1f} s "
                  f"(processes {got['ferret']['process_seconds']:.0f} s, {got['attnaudit']['process_seconds']:.0f} s)",
                  flush=True)
    ferret0, ours0 = rounds[0]
    print("\ntimes: median [range] over rounds; ratio = ferret / attnaudit, per round")
    print(f"  {'':<34} {'ferret-xai 0.4.2':<24} {'attnaudit':<24} ratio")
    rows = [f"explain/{e}" for e in EXPLAINERS] + [f"evaluate/{e}" for e in EVALUATORS]
    for key in rows:
        f = [fr["times"][key] for fr, _ in rounds]
        a = [ar["times"][key] for _, ar in rounds]
        print(f"  {key:<34} {spread(f):<24} {spread(a):<24} {ratio(f, a)}")
    for key in ("explain", "evaluate", "end to end"):
        f = [totals(fr["times"])[key] for fr, _ in rounds]
        a = [totals(ar["times"])[key] for _, ar in rounds]
        print(f"  {key:<34} {spread(f):<24} {spread(a):<24} {ratio(f, a)}")
    a_g = [totals(ar["times"], ig_key="explain/ig_x_input_one_call")["end to end"] for _, ar in rounds]
    f_e = [totals(fr["times"])["end to end"] for fr, _ in rounds]
    print(f"  {'end to end, IG one captum call':<34} {spread(f_e):<24} {spread(a_g):<24} {ratio(f_e, a_g)}")
    a_a = [totals(ar["times"], ig_key="explain/ig_x_input_adaptive")["end to end"] for _, ar in rounds]
    print(f"  {'end to end, IG adaptive (default)':<34} {spread(f_e):<24} {spread(a_a):<24} {ratio(f_e, a_a)}")
    ad = ours0["adaptive"]
    print(f"  adaptive IG (attnaudit's default, tolerance 1% of |F(x) - F(x')|): steps median "
          f"{statistics.median(ad['steps']):.0f}, max {max(ad['steps']):.0f}; relative completeness gap max "
          f"{max(ad['gaps']):.2%}; {sum(ad['converged']):.0f} of {len(ad['steps'])} converged; largest |score - "
          f"50-step score| / the sentence's largest |score|: {ad['max_rel_diff']:.2%}")
    ev_floor = [ar["times"]["evaluate_floor"] for _, ar in rounds]
    ev = [totals(ar["times"])["evaluate"] for _, ar in rounds]
    f_ev = [totals(fr["times"])["evaluate"] for fr, _ in rounds]
    fr_ev = [x / y for x, y in zip(ev_floor, ev)]
    print(f"\nevaluation against its floor (plain HF forwards over the {ours0['evaluate_inputs']} distinct inputs attnaudit "
          f"ran, sorted by length, best rows a call ({ours0['evaluate_floor_rows']} in round 1)): floor {spread(ev_floor)}; "
          f"attnaudit at {statistics.median(fr_ev):.0%} of it [{min(fr_ev):.0%}–{max(fr_ev):.0%}]; ferret / floor "
          f"{statistics.median([x / y for x, y in zip(f_ev, ev_floor)]):.2f}× (the most any evaluator of these inputs "
          "could reach)")
    print("\nintegrated gradients against its floor (attnaudit's process; floor / IG time = fraction of the floor)")
    floor = [ar["times"]["ig_floor"] for _, ar in rounds]
    print(f"  {'floor (plain HF fwd + bwd)':<34} {spread(floor)}")
    for key, label in (("explain/ig_x_input", f"default (by length, max_tokens {spec['max_tokens']})"),
                       ("explain/ig_x_input_one_call", "max_tokens=None (one captum call)"),
                       ("explain/ig_x_input_adaptive", "adaptive steps (default; not 50)"),
                       ("explain/ig_x_input_one_per_call", "default, one sentence per call")):
        a = [ar["times"][key] for _, ar in rounds]
        fr = [x / y for x, y in zip(floor, a)]
        print(f"  {label:<34} {spread(a)}   at {statistics.median(fr):.0%} of the floor "
              f"[{min(fr):.0%}–{max(fr):.0%}]")
    f_ig = [fr["times"]["explain/ig_x_input"] for fr, _ in rounds]
    fr = [x / y for x, y in zip(floor, f_ig)]
    print(f"  {'ferret':<34} {spread(f_ig)}   at {statistics.median(fr):.0%} of the floor "
          f"[{min(fr):.0%}–{max(fr):.0%}]")
    print(f"  default vs one-captum-call IG scores: largest |difference| {ours0['grouped_max_diff']:.3g}")
    print("\nnumbers (round 1; every round computes the same)")
    cross = evaluate_on_ferret_scores(spec, ferret0)
    for line in compare(ferret0, ours0, ferret0["round_trip"], cross):
        print(line)
    same = all(a["values"] == ours0["values"] for _, a in rounds) and all(f["values"] == ferret0["values"]
                                                                         for f, _ in rounds)
    print(f"every round gave the same evaluator values on each side: {same}")
    if args.json:
        args.json.write_text(json.dumps({"spec": spec, "rounds": rounds}), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
