"""How many forward rows explaining a 32-token continuation costs, per explainer, with and without step sharing.

    python benchmarks/generation_forwards.py [--rounds 5] [--target 32] [--d-model 128]

A language model's explanation of a T-token continuation is T step rows (`attnaudit.model.steps`). Row s is a
prefix of row T-1, so under the causal mask one forward of the longest row serves every step: the attention
capture (`explain/capture.py`) and the gradients (`explain/gradients.step_gradients`, one forward and one batched
backward) share it, and so do perturbations that are the same for every step (occlusion's leave-one-out rows:
`model/steps.last_logits`). The gradients still take one backward per step (a vector-Jacobian product each), so
they save at most the forwards; integrated gradients runs through captum row by row and shares nothing. This script counts the rows that reach the network per explainer and times both ways, sides
interleaved, several rounds, medians; the shared scores are checked equal to the unshared ones (≤ 1e-5).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnaudit.data.examples import Example
from attnaudit.explain.run import explain_all
from attnaudit.model import steps
from attnaudit.model.lm import LanguageModel
from attnaudit.model.transformer import DecoderLMConfig, TransformerDecoderLM
from attnaudit.model.vocab import Vocab

EXPLAINERS = ("attention", "rollout", "flow", "attention_norm", "saliency", "input_x_gradient", "occlusion", "lime")


def build(d_model: int, n_prompt: int, n_target: int, seed: int = 0):
    words = [f"w{i}" for i in range(50)]
    vocab = Vocab.build([" ".join(words)])
    torch.manual_seed(seed)
    cfg = DecoderLMConfig(vocab_size=len(vocab), d_model=d_model, n_heads=4, n_layers=4, d_ff=4 * d_model,
                          dropout=0.0, max_len=n_prompt + n_target + 2)
    model = LanguageModel(TransformerDecoderLM(cfg), vocab)
    rng = torch.Generator().manual_seed(seed)
    pick = lambda n: " ".join(words[int(i)] for i in torch.randint(0, 50, (n,), generator=rng))   # noqa: E731
    examples = [Example("e0", pick(n_prompt), target=pick(n_target))]
    return model, model.encode(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--target", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, batch = build(args.d_model, args.prompt, args.target)
    print(f"{len(batch)} step rows (prompt {args.prompt} tokens + {args.target}-token continuation), "
          f"d_model {args.d_model}, 4 layers, 1 torch thread")
    rows: list[int] = []
    forward = model.net.forward_embeds

    def counting(embeds, mask):
        rows.append(len(embeds))
        return forward(embeds, mask)

    model.net.forward_embeds = counting
    saved = steps.carriers

    def every_row_alone(input_ids, attention_mask):                         # no row shares another's forward
        rows = torch.arange(len(input_ids))
        return rows, rows.clone()

    def run(shared: bool, name: str):
        steps.carriers = saved if shared else every_row_alone              # every sharing path calls it
        rows.clear()
        start = time.perf_counter()
        out = explain_all(model, batch, [name], target=batch.labels)[name]
        return out, time.perf_counter() - start, sum(rows)

    print(f"{'explainer':<18} {'rows shared':>11} {'rows alone':>10} {'s shared':>9} {'s alone':>8} {'ratio':>6} "
          f"{'max |diff|':>10}")
    for name in EXPLAINERS:
        times: dict[bool, list[float]] = {True: [], False: []}
        counts, scores = {}, {}
        for _ in range(args.rounds):
            for shared in (True, False):                                    # interleaved
                out, seconds, n = run(shared, name)
                times[shared].append(seconds)
                counts[shared], scores[shared] = n, out.scores
        diff = float((scores[True] - scores[False]).abs().max())
        a, b = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name:<18} {counts[True]:>11} {counts[False]:>10} {a:>9.3f} {b:>8.3f} {b / a:>5.1f}× {diff:>10.1e}")
        assert diff <= 1e-5, f"{name}: shared scores differ by {diff}"
    steps.carriers = saved


if __name__ == "__main__":
    main()
