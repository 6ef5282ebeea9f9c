"""Forward precision: run the perturbation engine's and the explainers' forwards (and backwards) in bfloat16.

    with precision("bfloat16"):                       # opt-in; without a block everything stays float32
        attribution = get_explainer("saliency").explain(model, batch)     # forward + backward under autocast
        comp = comprehensiveness(model, batch, attribution)               # the engine's forwards too
    attribution.scores.dtype                          # torch.float32: results are converted back

Inside the block the forwards of `PerturbationEngine` (every faithfulness metric, occlusion, LIME, KernelSHAP),
of `Explainer.explain` and of `explain_all` run under `torch.autocast(dtype=torch.bfloat16)` on the model's
device (CPU or CUDA): matrix products run in bf16 (8 mantissa bits: a relative rounding of 2⁻⁹ ≈ 0.2 %), the
residual stream, LayerNorm and the attention softmax stay float32 (`attention_softmax`), and everything
returned (probabilities, scores) is float32. `precision("float32")` forces float32 even where the engine would
otherwise use bf16 (its `autocast=True` on CUDA). The block only reaches those entry points: the model's own
`model(batch)` outside them, training and the counterfactual adversaries run as they would without it.

The setting is a context variable: it holds in the calling thread (and asyncio task) only, not in worker
threads or processes that the block starts. A report built inside a block should record `current_precision()`.
benchmarks/bf16_speed.py measures the speed-up and the largest change to every faithfulness number.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

FORWARD_DTYPES = ("float32", "bfloat16")
_FORWARD_DTYPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnaudit_forward_dtype", default=None)


def check_forward_dtype(dtype) -> str:
    """`dtype` if it names a forward precision; else ValueError naming the parameter, the choices and the value."""
    if isinstance(dtype, str) and dtype in FORWARD_DTYPES:
        return dtype
    shown = repr(dtype) if isinstance(dtype, (str, int, float, type(None))) else type(dtype).__name__
    raise ValueError(f"precision must be one of {', '.join(map(repr, FORWARD_DTYPES))}; got {shown}. It is the dtype "
                     "the forwards' matrix products run in (for stored attention use capture_precision).")


@contextmanager
def precision(dtype: str) -> Iterator[None]:
    """Run the engine's and the explainers' forwards inside the block in `dtype` ("bfloat16" or "float32").

    The previous setting comes back when the block ends, also when it raises. Whether the device runs bf16 is
    checked at the first forward (`check_bf16_supported`), where the model's device is known.

    >>> with precision("bfloat16"):
    ...     attribution = get_explainer("attention", layer="mean").explain(model, batch)
    """
    token = _FORWARD_DTYPE.set(check_forward_dtype(dtype))
    try:
        yield
    finally:
        _FORWARD_DTYPE.reset(token)


def current_precision() -> str | None:
    """The dtype of the innermost `precision` block, or None outside every block (the default: float32)."""
    return _FORWARD_DTYPE.get()


def bf16_supported(device: torch.device) -> bool:
    """Whether autocast runs bfloat16 on `device`: CUDA's `is_bf16_supported()`, oneDNN's check on the CPU."""
    if not torch.amp.is_autocast_available(device.type):
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:            # oneDNN's own rule (AVX-512 BW/VL/DQ, AMX or Arm BF16); private, so guarded
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True        # other autocast devices (mps, xpu): torch.autocast itself refuses what they lack


def check_bf16_supported(device: torch.device) -> None:
    """RuntimeError (what, rule, what we found, what to do) when `device` cannot run bfloat16 autocast."""
    if bf16_supported(device):
        return
    found = {"cuda": "torch.cuda.is_bf16_supported() is False (bf16 needs compute capability >= 8.0)",
             "cpu": "oneDNN reports no bf16 support on this CPU (it needs AVX-512 BW/VL/DQ, AMX or Arm BF16)"}
    raise RuntimeError(f"precision('bfloat16') needs a device whose autocast runs bfloat16; the model is on "
                       f"{device} and {found.get(device.type, 'torch has no autocast for this device type')}; "
                       "leave the precision block out (float32) or move the model to a device with bf16.")


def forward_autocast(device: torch.device | str, *, default_bf16: bool = False):
    """The autocast context for one forward on `device`: the `precision` block's, else bf16 when `default_bf16`.

    A float32 block disables any autocast around the call; a bfloat16 block checks the device first; no block
    and not default_bf16 changes nothing (bit-identical to not calling it).
    """
    device = torch.device(device)
    dtype = current_precision()
    if dtype == "bfloat16":
        check_bf16_supported(device)
    if dtype == "bfloat16" or (dtype is None and default_bf16):   # the default path stays as the engine had it
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype == "float32" and torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def attention_softmax(scores: Tensor) -> Tensor:
    """softmax over keys (the last dimension); under autocast in float32 -> a float32 pattern.

    CUDA autocast already runs softmax in float32; CPU autocast would keep the bf16 of the Q·Kᵀ product, so the
    probabilities the hook sites and the explainers read would carry bf16 rounding. Outside autocast it is
    exactly `scores.softmax(dim=-1)`.
    """
    if scores.dtype != torch.float32 and torch.is_autocast_enabled(scores.device.type):
        return scores.float().softmax(dim=-1)
    return scores.softmax(dim=-1)
