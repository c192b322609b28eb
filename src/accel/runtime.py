"""Training-loop speed paths (features ``clip_with_norm``, ``dot_norm``, ``concurrent_reference``, ``malloc``,
``own_weights`` and ``early_adam_state``).

``clip_with_norm``: gradient clipping reuses the global norm already computed for ``train/grad_norm``
(``torch.nn.utils.clip_grads_with_norm_``: one pass over the gradients instead of two). Same result as Lightning's
clipping where it applies: whole gradients on every rank (one device or DDP), fp32 or AMP precision without a loss
scaler. Measured on CPU: clip 1.7 -> 0.4 ms per benchmark DPO step. With torch's fused Adam / AdamW the clip costs no
pass of its own: the optimizer's kernel divides each gradient by ``1 / clip_coef`` as it reads it (its ``grad_scale``
input, which ``torch.amp.GradScaler`` uses to unscale; set for that one step). Measured on SmolLM2-135M on CPU: the
clip's ~28 ms pass over 538 MB of gradients (of a ~1.6 s DPO step) gone, DPO at 128 tokens 300-309 instead of
299-302 tokens/s (3 runs each); the weights within 2e-6 of Lightning's clipping after 3 steps (``g / (1 / c)`` and
``g * c`` differ in the last bit).

``dot_norm``: the global gradient norm (``train/grad_norm``, and the clip's) by BLAS dot products (:func:`dot_norm`).

``concurrent_reference``: DPO's reference forward on a second thread beside the policy's (:func:`together`).

``malloc``: glibc ``mallopt`` settings for CPU training loops (mmap threshold 1 GiB, no trimming, top pad 64 MiB),
so large activation and gradient buffers stay in the heap instead of being ``mmap``-ed and unmapped every step. Measured
on CPU only (tiny benchmark: page faults per DPO run 270K -> 160K, DPO step -4.5%, GRPO -7%; SmolLM2-135M, whose
``[49,152, 576]`` embedding gradients are 108 MiB: page faults per DPO step 40-170K -> under 17K, step time within
this VM's noise); applied when a CPU fit starts, never at import. Trimming was at 1 GiB until a step freed more than
that at once (SmolLM2 GRPO at 512 tokens: several GiB of activations), which then went back to the OS and was faulted
in again the next step; without it, 165-169 instead of 163-166 tokens/s there (3 runs each, a 2-vCPU Xeon VM). The
heap keeps its peak size until the process ends.

``own_weights`` and ``early_adam_state``: when a CPU fit starts, the trained parameters are copied out of the
checkpoint's file mapping (:func:`own_weights`) and Adam's state is allocated (:func:`early_adam_state`).
Measured on SmolLM2-135M, DPO at L = 128 on a 2-vCPU Xeon VM: the first two steps fault 590K + 165K pages at
~4-7 us each (1.3 s of copy-on-write in the first optimizer step; in the second step the heap grows again because the
first step's lazily allocated optimizer state took the place of the activations); with both (and the gradients freed
after each optimizer step), 222K + under 28K, and 4 steps take 7.2-7.6 s instead of 9.9-11.7 s (training wall time
of ``python benchmarks/run.py real_dpo --length 128``, the same session).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch
from lightning import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn

from src.accel import onednn


def clip_with_norm(
    trainer: Trainer | None, optimizer: torch.optim.Optimizer, max_norm: float, norm: Tensor | None
) -> bool:
    """Clip ``optimizer``'s gradients to ``max_norm`` with their already computed global ``norm`` where that is what
    Lightning's clipping computes. ``False`` (nothing done) otherwise: the caller then clips through Lightning."""
    if norm is None or trainer is None or not hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch < 2.6
        return False
    plugin = trainer.precision_plugin
    plain = type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)
    if not plain or type(trainer.strategy) not in (SingleDeviceStrategy, DDPStrategy):
        return False
    inner = getattr(optimizer, "optimizer", optimizer)  # under a LightningOptimizer: the torch optimizer it steps
    if type(inner) in (torch.optim.Adam, torch.optim.AdamW) and all(g.get("fused") for g in inner.param_groups):
        coef = (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)  # clip_grads_with_norm_'s coefficient
        inner.grad_scale = coef.reciprocal()  # no loss scaler here (checked above): the attribute is only ours
        if not getattr(inner, "_align_unset_grad_scale", False):
            inner.register_step_post_hook(lambda opt, *_: vars(opt).pop("grad_scale", None))
            inner._align_unset_grad_scale = True
        return True
    grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm)
    return True


def dot_norm(grads: list[Tensor]) -> Tensor | None:
    """The global L2 norm of ``grads`` by one BLAS ``dot`` per tensor (squares summed in float64), or ``None`` unless
    every gradient is a dense, contiguous fp32 CPU tensor (the caller then takes ``torch.nn.utils.get_total_norm``).

    On CPU ``get_total_norm`` (``torch._foreach_norm``, as ``clip_grad_norm_`` uses) reads the gradients at about half
    the memory bandwidth that MKL's ``sdot`` reaches and rounds more: random tensors of SmolLM2-135M's gradient shapes
    (538 MB, its 28M-element embedding among them) on a 2-vCPU Xeon VM, 48 ms with 3.3e-4 relative error (against
    float64) there, 23 ms with 5.2e-6 here. Overflow and NaN propagate as there (``inf`` / ``nan``)."""
    plain = all(
        type(g) in (Tensor, nn.Parameter)
        and g.device.type == "cpu"
        and g.dtype == torch.float32
        and g.layout == torch.strided
        and g.is_contiguous()
        for g in grads
    )
    if not grads or not plain:
        return None
    squares = torch.stack([torch.dot(g.view(-1), g.view(-1)) for g in grads])
    return squares.double().sum().sqrt().float()


_WORKER: ThreadPoolExecutor | None = None


def _one_thread() -> None:
    torch.set_num_threads(1)


def together(policy: Callable[[], Any], reference: Callable[[], Any]) -> tuple[Any, Any]:
    """``(policy(), reference())`` with the reference's forward on a worker thread while the policy's runs here, one
    intra-op thread each (then this thread's thread count as before), or one after the other where that is not safe:
    under autocast (thread-local: the worker would not have it), in a job of several processes, or with fewer than two
    threads. ``reference`` runs without autograd; an exception in either is raised here after both finished.

    A small batch's forward on a few cores parallelises poorly (thread hand-offs, GEMM tiles, Python between kernels
    with a core idle): SmolLM2-135M DPO at 128 tokens on a 2-vCPU Xeon VM, 299, 297, 311, 294 instead of 288, 288, 296,
    294 tokens/s (alternating runs; same losses to 1e-5), 110-170 MiB more peak memory (both forwards' transients at
    once)."""
    global _WORKER

    def run_reference() -> Any:
        with torch.no_grad():
            return reference()

    threads = torch.get_num_threads()
    if threads < 2 or torch.is_autocast_enabled("cpu") or onednn.several_processes():
        return policy(), run_reference()
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(1, thread_name_prefix="align-reference", initializer=_one_thread)
    torch.set_num_threads(1)
    future = _WORKER.submit(run_reference)
    try:
        out = policy()
    finally:
        wait([future])
        torch.set_num_threads(threads)
    return out, future.result()


# mallopt parameter ids and values
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC = {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: -1, _M_TOP_PAD: 64 << 20}  # trim -1: never
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_malloc() -> bool:
    """Keep glibc's malloc from returning large tensor buffers to the OS between steps.

    By default glibc serves allocations above its mmap threshold with ``mmap`` and trims freed heap memory, so a CPU
    training loop re-faults fresh pages for its activations every step (~3.7K page faults per benchmark DPO step).
    Skipped where the C library is not glibc, when the user set any ``MALLOC_*_`` variable of these, or with
    ``ALIGN_MALLOC=default``. Returns whether it applied.
    """
    if os.environ.get("ALIGN_MALLOC") == "default" or any(k in os.environ for k in _MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    applied = [mallopt(param, value) == 1 for param, value in _MALLOC.items()]  # each one, even if one is refused
    return all(applied)


def own_weights(module: nn.Module) -> int:
    """Copy ``module``'s trainable CPU parameters into memory of their own; returns the bytes copied.

    transformers 5 loads a safetensors checkpoint by mapping its file: each parameter is a view of a private file
    mapping, and the first optimizer step's in-place update then copies each 4 KiB page on its first write, one page
    fault at a time (SmolLM2-135M on a 2-vCPU Xeon VM: 1.3 s of the first DPO step, 135K page faults). One ``clone``
    per parameter at fit start costs 0.12 s there. Same values and the same ``Parameter`` objects (the optimizer's
    references and tied weights hold); frozen weights (LoRA's base, a reference model) stay mapped.
    """
    copied = 0
    with torch.no_grad():
        for p in module.parameters():
            # plain parameters only: FSDP's flat parameters (views of the module's), DTensors and DeepSpeed's
            # partitioned ones keep their storage
            plain = type(p) is nn.Parameter and type(p.data) is Tensor and not hasattr(p, "ds_id")
            if plain and p.requires_grad and p.device.type == "cpu":
                p.data = p.data.clone()
                copied += p.numel() * p.element_size()
    return copied


def early_adam_state(optimizers: list[torch.optim.Optimizer]) -> int:
    """Allocate the state of torch's ``Adam`` / ``AdamW`` now, as their first ``step`` would (same tensors: zero
    moments, a zero step count where the step keeps it); returns how many parameters got state.

    Allocated at fit start, the state lies below the activations in the heap rather than in the holes the first
    step's activations left, which the second step's then miss. Parameters that already have state (a restored
    checkpoint's) and other optimizer types are left alone; ``tests/test_accel.py`` checks two steps of both
    optimizers in every variant (fused, foreach, amsgrad) against lazy state, bit for bit.
    """
    try:
        from torch.optim.optimizer import _get_scalar_dtype  # what the optimizers' own init uses
    except ImportError:  # another torch: the first step allocates the state as usual
        return 0
    n = 0
    for opt in optimizers:
        if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        for group in opt.param_groups:
            fused, on_device = group.get("fused") or False, group.get("capturable") or group.get("fused")
            for p in group["params"]:
                state = opt.state[p]
                if state or not p.requires_grad:
                    continue
                if on_device:
                    state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=fused), device=p.device)
                else:
                    state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
                for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                n += 1
    return n
