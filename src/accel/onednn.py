"""``onednn_linear``: fp32 linear layers on CPU through oneDNN's matmul instead of MKL's ``sgemm``.

On CPU torch computes an fp32 ``F.linear`` and its two backward products with MKL. oneDNN (bundled with torch's x86
builds, used by inductor for frozen linears) computes the same products 10-35% faster at the shapes a transformer
trains with on AMD CPUs (SmolLM2-135M, 384-768 rows, 2 threads of an AVX-512 EPYC: forward ``[384, 576] x [576, 1536]``
149 -> 202 GFLOP/s, input gradient 169 -> 197, weight gradient 144 -> 180; the LM head's ``[341, 576] x
[576, 49152]`` 133 -> 165). :class:`LinearMode` routes every fp32 CPU ``F.linear`` called inside it through
:class:`OneDnnLinear`, whose backward computes ``grad_x = g @ W`` and ``grad_W = g^T @ x`` with oneDNN too. Same
dot products, in another summation order: results agree with ``F.linear`` to fp32 rounding.

The mode is entered around the scoring forwards of ``src/logprobs.py`` (policy and reference) of a single-process
job; anything else (autocast, other dtypes or devices, tensor subclasses, a torch without oneDNN, several ranks)
takes ``F.linear`` as usual. With gradient checkpointing the recomputed forward runs outside the mode (plain
``F.linear``), i.e. it may differ from the first forward by fp32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["LinearMode", "OneDnnLinear", "available", "linear", "matmul", "several_processes"]


def available() -> bool:
    """Whether this torch has oneDNN's linear op."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return torch.ops.mkldnn._linear_pointwise.default is not None
    except (AttributeError, RuntimeError):
        return False


def intel_cpu() -> bool:
    """Whether this machine's CPU is Intel's (``vendor_id`` of ``/proc/cpuinfo``). MKL, which computes torch's fp32
    CPU matmuls, takes its fastest kernels on Intel CPUs only, so oneDNN's are faster on others (AMD EPYC, above) but
    not on Intel's: a 2-vCPU Xeon VM (AVX-512, AMX) ran SmolLM2-135M's layer products at 360-440 GFLOP/s with MKL and
    240-410 with oneDNN (weight gradients 16-43% slower; the LM head's 230-390 with MKL, 155-315 with oneDNN), and
    DPO at 128 tokens 1.66 s per step with this path, 1.58 s without. ``auto`` leaves ``onednn_linear`` off on Intel
    CPUs."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:  # no /proc (macOS, Windows): not measured there either way
        return False


def several_processes() -> bool:
    """Whether this process is one rank of several (oneDNN's paths stay off there: not measured)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def matmul(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ w.T + bias`` for 2-D ``x`` and ``w`` (any strides, or ``w`` prepacked by
    ``torch.ops.mkldnn._reorder_linear_weight``) by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


class OneDnnLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with forward and backward products computed by oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = matmul(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = matmul(g, weight.t()).view(x.shape) if need_x else None
        grad_w = matmul(g.t(), x.reshape(-1, x.shape[-1]).t()) if need_w else None
        grad_b = g.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _applies(x: Any, weight: Any, bias: Any) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors)
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and x.dim() >= 2
        and x.numel() > 0
        and weight.dim() == 2
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` by :class:`OneDnnLinear` where it applies (fp32 CPU tensors, no autocast), else ``F.linear``."""
    if _applies(x, weight, bias):
        return OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class LinearMode(TorchFunctionMode):
    """Inside it, every ``F.linear`` (``nn.Linear`` included) is :func:`linear`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(*args, **kwargs)
        return func(*args, **kwargs)
