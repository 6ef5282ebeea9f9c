"""Attention explainers on hand-checkable patterns: raw attention, rollout, grad_attention, attention norms."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from attnaudit.explain import Explainer, get_explainer
from attnaudit.explain.attention import attention_scores
from attnaudit.explain.capture import capture
from attnaudit.explain.rollout import residual_attention, rollout
from attnaudit.explain.run import explain_all
from attnaudit.model.hooks import hooks, record
from attnaudit.model.interventions import replace

ATTENTION = ["attention", "rollout", "flow", "grad_attention", "attention_x_grad", "attention_norm"]


# -- rollout -------------------------------------------------------------------------------------------
def test_rollout_two_layers_by_hand():
    a0 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])       # [query, key]
    a1 = torch.full((3, 3), 1 / 3)
    got = rollout(torch.stack([a0, a1])[:, None, None])                           # -> [layer, batch, query, key]
    # Â_0 = 0.5·(A_0 + I) = [[.5, .5, 0], [0, .5, .5], [.5, 0, .5]]
    torch.testing.assert_close(got[0, 0], torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]))
    # Â_1 = 0.5·(1/3 + I): 2/3 on the diagonal, 1/6 elsewhere. R_1 = Â_1·Â_0, row 0:
    # 2/3·[.5, .5, 0] + 1/6·[0, .5, .5] + 1/6·[.5, 0, .5] = [5/12, 5/12, 2/12]; rows 1, 2 likewise
    want = torch.tensor([[5, 5, 2], [2, 5, 5], [5, 2, 5]]) / 12
    torch.testing.assert_close(got[1, 0], want)
    # from start_layer=1 only Â_1 is multiplied in; layer 0's entry is the identity
    late = rollout(torch.stack([a0, a1])[:, None, None], start_layer=1)
    torch.testing.assert_close(late[0, 0], torch.eye(3))
    torch.testing.assert_close(late[1, 0], torch.tensor([[4, 1, 1], [1, 4, 1], [1, 1, 4]]) / 6)


def test_rollout_of_identity_attention_is_the_identity():
    eye = torch.eye(5).expand(3, 2, 4, 5, 5)                                      # [layer, batch, head, query, key]
    for add_residual in (True, False):
        got = rollout(eye, add_residual=add_residual)
        torch.testing.assert_close(got, torch.eye(5).expand(3, 2, 5, 5))


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_rollout_rows_sum_to_one_and_padding_stays_zero(tiny_model, tiny_batch, head_fusion):
    _, cache = record(tiny_model, tiny_batch, names=tiny_model.attention_sites)
    patterns = cache.stack()                                                      # [layer, batch, head, query, key]
    mask = tiny_batch.attention_mask
    for given in (mask, None):                                                    # explicit or inferred padding
        got = rollout(patterns, head_fusion=head_fusion, attention_mask=given)
        sums = got.sum(-1)                                                        # [layer, batch, query]
        torch.testing.assert_close(sums[:, mask], torch.ones_like(sums[:, mask]))
        pad = ~mask
        assert (got[:, pad] == 0).all()                                           # padded rows
        assert (got.transpose(-1, -2)[:, pad] == 0).all()                         # padded columns


def test_residual_attention_is_half_attention_plus_half_identity():
    a = torch.tensor([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 0.0]])         # token 2 is padding
    got = residual_attention(a[None, None, None])[0, 0]
    want = torch.tensor([[0.8, 0.2, 0.0], [0.15, 0.85, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want)


# -- raw attention -------------------------------------------------------------------------------------
def known_patterns():
    """[layer=2, batch=1, head=2, query=3, key=3], rows summing to 1."""
    l0h0 = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    l0h1 = torch.tensor([[0.1, 0.7, 0.2], [0.3, 0.3, 0.4], [0.4, 0.4, 0.2]])
    l1h0 = torch.tensor([[0.2, 0.2, 0.6], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    l1h1 = torch.tensor([[0.6, 0.2, 0.2], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    return torch.stack([torch.stack([l0h0, l0h1]), torch.stack([l1h0, l1h1])])[:, None]


@pytest.mark.parametrize("layer,head,readout,want", [
    (0, 0, "cls", [0.5, 0.25, 0.25]),
    (0, 1, "cls", [0.1, 0.7, 0.2]),
    ("last", "mean", "cls", [0.4, 0.2, 0.4]),                                     # (l1h0 + l1h1)/2, row 0
    ("last", "max", "cls", [0.6, 0.2, 0.6]),
    ("mean", 0, "cls", [0.35, 0.225, 0.425]),                                     # (l0h0 + l1h0)/2, row 0
    (1, 0, "mean", [1.7 / 3, 0.7 / 3, 0.6 / 3]),                                  # column means of l1h0
    (1, 1, "max", [0.6, 1.0, 0.5]),                                               # column maxima of l1h1
])
def test_raw_attention_options_by_hand(layer, head, readout, want):
    mask = torch.ones(1, 3, dtype=torch.bool)
    got = attention_scores(known_patterns(), mask, layer=layer, head=head, readout=readout)
    torch.testing.assert_close(got[0], torch.tensor(want))


def test_raw_attention_readout_ignores_padded_rows():
    p = known_patterns()[:, :, :, :2, :2]                                         # 2 tokens, the 3rd is padding
    p = torch.nn.functional.pad(p, (0, 1, 0, 1))                                  # -> [2, 1, 2, 3, 3], zeros padded
    mask = torch.tensor([[True, True, False]])
    got = attention_scores(p, mask, layer=0, head=0, readout="mean")
    torch.testing.assert_close(got[0], torch.tensor([0.35, 0.425, 0.0]))          # mean of rows 0, 1 only
    got = attention_scores(p, mask, layer=0, head=0, readout="max")
    torch.testing.assert_close(got[0], torch.tensor([0.5, 0.6, 0.0]))


def test_raw_attention_reads_the_pattern_the_model_used(tiny_model):
    batch = tiny_model.encode(["the film was good"])                              # 6 tokens, no padding
    n = batch.input_ids.shape[1]
    g = torch.Generator().manual_seed(1)
    known = torch.rand(1, tiny_model.n_heads, n, n, generator=g).softmax(-1)      # [batch, head, query, key]
    with hooks(tiny_model, {tiny_model.attention_sites[0]: replace(known)}):
        attr = get_explainer("attention", layer=0, head=1).explain(tiny_model, batch)
    torch.testing.assert_close(attr.scores[0], known[0, 1, 0])


@pytest.mark.parametrize("name,params,message", [
    ("attention", {"layer": 7}, "layer must be an int in [0, 1], 'last' or 'mean'; got 7 (this model has 2 layers)."),
    ("attention", {"head": 2}, "head must be an int in [0, 1], 'mean' or 'max'; got 2 (this model has 2 heads)."),
    ("attention", {"readout": "first"}, "readout must be one of 'cls', 'mean', 'max'; got 'first'."),
    ("attention_norm", {"head": "max"}, "head must be an int in [0, 1], 'sum' or 'mean'; got 'max'"),
    ("rollout", {"head_fusion": "median"}, "head_fusion must be one of 'mean', 'max', 'min'; got 'median'."),
    ("rollout", {"start_layer": 2}, "start_layer must be an int in [0, 1]; got 2 (this model has 2 layers)."),
    ("attention_x_grad", {"layer": True}, "layer must be an int in [0, 1], 'last' or 'mean'; got True"),
])
def test_bad_parameters_name_rule_and_value(tiny_model, tiny_batch, name, params, message):
    with pytest.raises(ValueError) as err:
        get_explainer(name, **params).explain(tiny_model, tiny_batch)
    assert message in str(err.value)


# -- gradient-weighted attention ----------------------------------------------------------------------
def test_grad_attention_matches_a_float64_autograd_recomputation():
    model = make_tiny_model(seed=2)
    model.net.double()
    batch = model.encode(["the story was not bad"])                               # 7 tokens, no padding
    n, h, target = batch.input_ids.shape[1], model.n_heads, 1
    g = torch.Generator().manual_seed(0)
    known = [torch.rand(1, h, n, n, generator=g, dtype=torch.float64).softmax(-1) for _ in model.attention_sites]
    edits = {site: replace(p) for site, p in zip(model.attention_sites, known)}
    with hooks(model, edits):
        got = get_explainer("grad_attention").explain(model, batch, target=target).scores[0]
        got_x = get_explainer("attention_x_grad", layer="last").explain(model, batch, target=target).scores[0]
    # explicit: the known patterns as leaves, d(logit of target)/dA by autograd, then Chefer et al.'s rule
    leaves = [p.clone().requires_grad_() for p in known]
    with hooks(model, {site: (lambda pattern, allowed, leaf=leaf: leaf) for site, leaf in zip(model.attention_sites, leaves)}):
        logit = model(batch)[0, target]
    grads = torch.autograd.grad(logit, leaves)
    relevance = torch.eye(n, dtype=torch.float64)
    for a, da in zip(known, grads):
        a_bar = torch.stack([(da[0, i] * a[0, i]).clamp(min=0) for i in range(h)]).mean(0)   # [query, key]
        relevance = relevance + a_bar @ relevance
    want = relevance[0].clone()
    want[0] = 0.0
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)
    want_x = (known[-1][0] * grads[-1][0]).mean(0)[0]                             # A ⊙ ∇A, heads mean, [CLS] row
    torch.testing.assert_close(got_x, want_x.float(), atol=1e-6, rtol=1e-5)


def test_capture_gradients_of_a_batch_equal_one_example_at_a_time(tiny_model, tiny_batch):
    target = torch.tensor([0, 1, 1, 0])
    with tiny_model.evaluating():
        whole = capture(tiny_model, tiny_batch, target, grads=True)
        one = capture(tiny_model, tiny_batch.select([2]), target[2:3], grads=True)
    n = one.patterns.shape[-1]
    torch.testing.assert_close(whole.grads[:, 2, :, :n, :n], one.grads[:, 0], atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in tiny_model.net.parameters())              # weights' .grad untouched
    seq = tiny_batch.input_ids.shape[1]
    assert whole.patterns.shape == whole.grads.shape == (tiny_model.n_layers, 4, tiny_model.n_heads, seq, seq)
    assert whole.values.shape[:4] == (tiny_model.n_layers, 4, tiny_model.n_heads, seq)


# -- attention norms -----------------------------------------------------------------------------------
def test_attention_norm_matches_an_explicit_loop(tiny_model):
    batch = tiny_model.encode(["a boring plot with a great actor"])
    attn = tiny_model.net.encoder.layers[-1].self_attn
    seen = {}
    handle = attn.register_forward_hook(lambda module, args, out: seen.update(x=args[1].detach()))
    try:
        _, cache = record(tiny_model, batch, names=tiny_model.attention_sites[-1])
    finally:
        handle.remove()
    alpha = cache[tiny_model.attention_sites[-1]][0]                              # [head, query, key]
    x = seen["x"][0]                                                              # [seq, d_model], keys' input
    d_head = attn.d_head
    v = x @ attn.w_v.weight.T + attn.w_v.bias                                     # [seq, d_model] = heads side by side
    want = torch.zeros(x.shape[0])
    for k in range(x.shape[0]):
        total = torch.zeros(x.shape[1])
        for h in range(attn.n_heads):
            cols = slice(h * d_head, (h + 1) * d_head)
            f = attn.w_o.weight[:, cols] @ v[k, cols]                             # f_h(x_k) = W^O_h v_h(x_k)
            total = total + alpha[h, 0, k] * f
        want[k] = total.norm()                                                    # ‖Σ_h α_h f_h(x_k)‖, [CLS] row
    got = get_explainer("attention_norm").explain(tiny_model, batch).scores[0]
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    per_head = get_explainer("attention_norm", head=0).explain(tiny_model, batch).scores[0]
    f0 = v[:, :d_head] @ attn.w_o.weight[:, :d_head].T                            # [key, d_model]
    torch.testing.assert_close(per_head, (alpha[0, 0] * f0.norm(dim=-1)).detach(), atol=1e-5, rtol=1e-5)


# -- explain_all ---------------------------------------------------------------------------------------
class Constant(Explainer):
    """A non-attention explainer: explain_all must call its own explain()."""

    name = "constant"
    family = "control"

    def scores(self, model, batch, target):
        return torch.ones(batch.input_ids.shape)


def test_explain_all_equals_each_explain(tiny_model, tiny_batch):
    chosen = [*ATTENTION[:3], get_explainer("attention_norm", head="mean"), "grad_attention", "attention_x_grad",
              Constant()]
    together = explain_all(tiny_model, tiny_batch, chosen, target=1)
    assert list(together) == [*ATTENTION[:3], "attention_norm", "grad_attention", "attention_x_grad", "constant"]
    for e in chosen:
        e = get_explainer(e) if isinstance(e, str) else e
        alone = e.explain(tiny_model, tiny_batch, target=1)
        got = together[e.name]
        assert torch.equal(got.scores, alone.scores)
        assert got.params == alone.params and got.method == alone.method
        assert torch.equal(got.target, alone.target) and torch.equal(got.target_prob, alone.target_prob)
        assert set(got.extras) == set(alone.extras) and got.seconds > 0


def test_explain_all_runs_one_capture_for_the_attention_family(tiny_model, tiny_batch):
    calls = []
    handle = tiny_model.net.encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        explain_all(tiny_model, tiny_batch, ATTENTION)
    finally:
        handle.remove()
    assert len(calls) == 2                         # the prediction, then one capture (with gradients) for all six


def test_explain_all_rejects_repeated_names(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match="explainers must have distinct names; 'rollout' appears 2 times"):
        explain_all(tiny_model, tiny_batch, ["rollout", get_explainer("rollout", head_fusion="max")])


# -- rollout's readouts and vit-explain's discard ratio (issue 16, item 4) ------------------------------------
def _vit_explain_rollout(patterns: torch.Tensor, discard_ratio: float, head_fusion: str = "mean") -> torch.Tensor:
    """Gildenblat's vit-explain `rollout` (one example, no padding), written out: fuse heads, zero the smallest
    int(n² · ratio) weights except flat index 0, add I and halve, renormalise rows, multiply bottom-up."""
    n = patterns.shape[-1]
    result = torch.eye(n, dtype=torch.float64)
    for att in patterns.double():                                      # [head, n, n] per layer
        fused = {"mean": att.mean(0), "max": att.amax(0), "min": att.amin(0)}[head_fusion]
        flat = fused.reshape(-1).clone()
        _, idx = flat.topk(int(flat.numel() * discard_ratio), largest=False)
        idx = idx[idx != 0]
        flat[idx] = 0
        a = (flat.view(n, n) + torch.eye(n, dtype=torch.float64)) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result


@pytest.mark.parametrize("ratio, fusion", [(0.0, "mean"), (0.5, "mean"), (0.9, "max"), (0.3, "min")])
def test_rollout_discard_ratio_equals_vit_explain(ratio, fusion):

    gen = torch.Generator().manual_seed(7)
    patterns = torch.rand(3, 1, 2, 6, 6, generator=gen, dtype=torch.float64).softmax(-1)  # [layer, 1, head, q, k]
    ours = rollout(patterns, head_fusion=fusion, discard_ratio=ratio)[-1, 0]
    assert torch.allclose(ours, _vit_explain_rollout(patterns[:, 0], ratio, fusion), atol=1e-12)


def test_rollout_discard_ignores_padding_and_readout_max_is_the_max_over_query_rows(tiny_model, tiny_batch):

    gen = torch.Generator().manual_seed(3)
    patterns = torch.rand(2, 2, 2, 5, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    real = (mask[:, None, :, None] & mask[:, None, None, :])[None]                 # [1, batch, 1, q, k]
    patterns = (patterns * real).div((patterns * real).sum(-1, keepdim=True).clamp_min(1e-30))
    both = rollout(patterns, attention_mask=mask, discard_ratio=0.4)[-1]
    alone = rollout(patterns[:, 1:, :, :3, :3], attention_mask=mask[1:, :3], discard_ratio=0.4)[-1, 0]
    assert torch.allclose(both[1, :3, :3], alone) and both[1, 3:].abs().sum() == 0 and both[1, :, 3:].abs().sum() == 0
    joint = get_explainer("rollout", readout="max").explain(tiny_model, tiny_batch)
    full = rollout(record(tiny_model, tiny_batch)[1].stack("*self_attn.pattern"),
                   attention_mask=tiny_batch.attention_mask)[-1]                  # [batch, q, k]
    m = tiny_batch.attention_mask
    want = full.masked_fill(~m[:, :, None], float("-inf")).amax(1).masked_fill(~m, 0.0)
    assert torch.allclose(joint.scores, want.float(), atol=1e-6)
    with pytest.raises(ValueError, match=r"discard_ratio must be a number in \[0, 1\)"):
        get_explainer("rollout", discard_ratio=1.0).explain(tiny_model, tiny_batch)
