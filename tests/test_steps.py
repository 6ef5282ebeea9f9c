"""Generation as classification (model/steps.py) and the [target step, input token] matrices (explain/generation.py)."""
import pytest
import torch

from attnaudit.explain.attribution import Attribution
from attnaudit.explain.generation import step_matrices
from attnaudit.model.steps import carriers, gather_last, last_index, last_logits, readout_index, step_batch

TOKENS = {i: f"t{i}" for i in range(20)}


def tok(ids):
    return [TOKENS[i] for i in ids]


def test_step_batch_rows_labels_and_special_by_hand():
    b = step_batch([[1, 5, 6]], [[7, 8]], pad_id=0, tokens=tok, max_len=16, prompt_special=[[True, False, False]],
                   ids=["a"], rationale=[[0, 1, 0]])
    # row 0 = prompt, predicts 7; row 1 = prompt + 7, predicts 8
    assert b.input_ids.tolist() == [[1, 5, 6, 0], [1, 5, 6, 7]]
    assert b.attention_mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert b.special_mask.tolist() == [[True, False, False, False], [True, False, False, True]]
    assert b.labels.tolist() == [7, 8]
    assert b.steps == [(0, 0), (0, 1)]
    assert b.ids == ["a@0", "a@1"]
    assert b.rationale.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0]]
    assert b.tokens[0] == ["t1", "t5", "t6", "[PAD]"]


def test_step_batch_without_targets_is_one_row_per_prompt():
    b = step_batch([[1, 2], [3]], [None, None], pad_id=0, tokens=tok, max_len=8, ids=["x", "y"])
    assert b.labels is None and b.steps == [(0, 0), (1, 0)] and b.ids == ["x", "y"]


@pytest.mark.parametrize("prompts, targets, message", [
    ([], [], "at least one prompt"),
    ([[1]], [[2], [3]], "one entry per prompt"),
    ([[1], [2]], [[3], None], "every example or for none"),
    ([[]], [[3]], "prompts\\[0\\] is empty"),
    ([[1]], [[]], "targets\\[0\\] is empty"),
    ([[1, 2, 3]], [[4, 5, 6]], "exceeds the model's context of 4"),
])
def test_step_batch_refuses_bad_input(prompts, targets, message):
    with pytest.raises(ValueError, match=message):
        step_batch(prompts, targets, pad_id=0, tokens=tok, max_len=4)


def test_last_index_gather_and_readout():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]).bool()
    assert last_index(mask).tolist() == [1, 2, 0]
    values = torch.arange(9.0).view(3, 3)
    assert gather_last(values, mask).tolist() == [1.0, 5.0, 6.0]

    class Dec:
        readout = "last"

    class Enc:
        pass

    assert readout_index(Dec(), mask).tolist() == [1, 2, 0]
    assert readout_index(Enc(), mask).tolist() == [0, 0, 0]


def causal_forward(counter):
    """A causal toy LM: logits at position q depend on ids[:q+1] only (a prefix sum, one-hot per vocab)."""
    emb = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))

    def forward(ids, mask):
        counter.append(len(ids))
        return emb[ids].cumsum(1)                                                  # [n, seq, vocab]
    return forward


def test_last_logits_shares_one_forward_across_causal_prefixes():
    b = step_batch([[1, 5, 6], [2, 3]], [[7, 8, 9], [4]], pad_id=0, tokens=tok, max_len=16)
    calls_shared, calls_each = [], []
    with torch.no_grad():
        shared = last_logits(causal_forward(calls_shared), b.input_ids, b.attention_mask)
        each = last_logits(causal_forward(calls_each), b.input_ids, b.attention_mask, share=False)
    assert torch.equal(shared, each)
    assert calls_each == [4] and calls_shared == [2]      # 4 rows; 2 distinct longest rows
    chosen, owner = carriers(b.input_ids, b.attention_mask)
    assert sorted(chosen.tolist()) == [2, 3]              # the last step of each example
    assert owner.tolist() == [0, 0, 0, 1]


def test_last_logits_does_not_share_with_gradients_or_distinct_rows():
    ids = torch.tensor([[1, 2], [1, 3]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    calls = []
    with torch.no_grad():
        last_logits(causal_forward(calls), ids, mask)      # no row is a prefix of the other
    assert calls == [2]
    calls = []
    with torch.enable_grad():
        last_logits(causal_forward(calls), torch.tensor([[1, 2], [1, 0]]), torch.tensor([[1, 1], [1, 0]]).bool())
    assert calls == [2]


def attribution_of(batch, scores):
    n = len(batch)
    return Attribution(scores=scores * batch.attention_mask, input_ids=batch.input_ids,
                       attention_mask=batch.attention_mask, special_mask=batch.special_mask, tokens=batch.tokens,
                       target=batch.labels, target_prob=torch.full((n,), 0.5), method="toy", params={},
                       ids=batch.ids, steps=batch.steps)


def test_step_matrices_reassemble_rows_per_example_by_hand():
    b = step_batch([[1, 5, 6], [2, 3]], [[7, 8], [4]], pad_id=0, tokens=tok, max_len=16, ids=["a", "b"])
    scores = torch.tensor([[1.0, 2, 3, 0], [4, 5, 6, 7], [8, 9, 0, 0]])
    mats = step_matrices(attribution_of(b, scores))
    assert [m.id for m in mats] == ["a", "b"]
    a = mats[0]
    assert a.scores.tolist() == [[1, 2, 3], [4, 5, 6]]     # prompt columns only
    assert a.prompt_tokens == ["t1", "t5", "t6"] and a.target_tokens[0] == "t7"
    assert a.target.tolist() == [7, 8]
    with_prefix = step_matrices(attribution_of(b, scores), include_prefix=True)[0]
    assert with_prefix.scores.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]] and with_prefix.columns[-1] == "t7"
    assert mats[1].scores.tolist() == [[8, 9]]
    # words: prompt tokens 0 | 1 2 -> words 0, 1; both steps one target word
    pooled, src, tgt = a.words([0, 1, 1], [0, 0], how="sum")
    assert pooled.tolist() == [[1 + 4, 2 + 3 + 5 + 6]] and src == [0, 1] and tgt == [0]
    frame = a.to_frame()
    assert len(frame) == 6 and set(frame.step) == {0, 1}


def test_step_matrices_round_trip_through_records_and_refuse_plain_rows():
    b = step_batch([[1, 5]], [[7, 8]], pad_id=0, tokens=tok, max_len=16, ids=["a"])
    attr = attribution_of(b, torch.ones(2, 3))
    back = Attribution.from_records(attr.to_records())
    assert back.steps == [(0, 0), (0, 1)]
    assert torch.equal(step_matrices(back)[0].scores, step_matrices(attr)[0].scores)
    plain = Attribution.from_records([{k: v for k, v in r.items() if k not in ("example", "step")}
                                      for r in attr.to_records()])
    with pytest.raises(ValueError, match="no generation steps"):
        step_matrices(plain)


# -- one forward for every step: the capture and the gradients on a real decoder --------------------------
def test_every_explainer_is_unchanged_when_steps_share_one_forward(monkeypatch):
    """The shared capture (explain/capture.py) and the shared gradients (explain/gradients.py) give the scores of
    running every step row as itself, while the attention family and the gradients forward only the longest rows."""
    from test_lm import make_lm

    from attnaudit.data.examples import Example
    from attnaudit.explain import capture as capture_module
    from attnaudit.explain import gradients as gradients_module
    from attnaudit.explain.run import explain_all

    model = make_lm(3)
    batch = model.encode([Example("a", "b c d e", target="c d e b"), Example("b", "e d", target="b c")])
    assert len(batch) == 6                                                  # 4 + 2 steps, 2 distinct longest rows
    names = ["attention", "rollout", "flow", "attention_norm", "saliency", "input_x_gradient"]
    rows = []
    forward = model.net.forward_embeds

    def counting(embeds, mask):
        rows.append(len(embeds))
        return forward(embeds, mask)

    monkeypatch.setattr(model.net, "forward_embeds", counting)
    shared = {n: explain_all(model, batch, [n], target=batch.labels)[n] for n in names}
    shared_rows = list(rows)
    monkeypatch.setattr(capture_module, "_shared_prefixes", lambda *a, **k: None)
    monkeypatch.setattr(gradients_module, "step_gradients", lambda *a, **k: None)
    rows.clear()
    alone = {n: explain_all(model, batch, [n], target=batch.labels)[n] for n in names}
    for n in names:
        torch.testing.assert_close(shared[n].scores, alone[n].scores, rtol=0, atol=1e-6, msg=n)
    # per explainer: the attention capture / the gradient forward ran 2 rows instead of 6
    assert sum(shared_rows) < sum(rows) and max(shared_rows) <= 2 < 6 == max(rows)


def test_a_row_with_a_masked_gap_is_carried_only_by_the_same_gap():
    """The perturbation engine's "attention" policy masks tokens inside a row: such a row shares a forward only
    with a row that has the same gap and the same tokens up to its last real one."""
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 9, 0], [1, 2, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [1, 0, 1, 1, 0]]).bool()
    chosen, owner = carriers(ids, mask)
    # row 1 (gap at 1, last token 9) and row 2 (gap at 1, last token 4) differ at their last token: no sharing;
    # row 0 has no gap, so it carries neither
    assert sorted(chosen.tolist()) == [0, 1, 2]
    same_gap = torch.tensor([[1, 2, 3, 4, 5], [1, 7, 3, 4, 0]])
    gap_mask = torch.tensor([[1, 0, 1, 1, 1], [1, 0, 1, 1, 0]]).bool()
    chosen, owner = carriers(same_gap, gap_mask)                 # token under the gap does not matter
    assert chosen.tolist() == [0] and owner.tolist() == [0, 0]
    calls = []
    with torch.no_grad():
        got = last_logits(causal_forward(calls), ids, mask)
        want = last_logits(causal_forward([]), ids, mask, share=False)
    assert torch.equal(got, want)
