"""Every device-, model-family- or library-internals-specific speed path, behind one switch.

The modules take ``accel: auto | off | [feature, ...]`` (``--model.init_args.accel``). ``off`` is the plain path of
``src/logprobs.py`` and ``src/rollout.py``; ``auto`` turns on only what was measured and checked for the current
device and model family (below); a list turns on exactly the named features (each still falls back to the plain path
where it cannot apply: e.g. the prefix layouts need rows of the form ``[pad] prompt completion [pad]``).

========================  ================================================  =========================================
feature                   what it does                                      where it was measured (``auto`` on)
========================  ================================================  =========================================
``prefix_sharing``        rows sharing a prompt run it once (tree / cache)  CPU, Llama (tiny + benchmark model)
``packed_rows``           tree rows packed end to end, attention by block   CPU, Llama / Mistral / Qwen2
``sparse_last_layer``     last layer only where states are read             CPU, Llama / Mistral / Qwen2
``length_groups``         large batches in length-sorted groups             CPU, Llama
``fast_decode``           lean decode loop over a preallocated KV buffer    CPU, Llama / Mistral / Qwen2
``growing_cache``         KV cache layers append into a buffer              CPU, any transformers 5 model
``fused_layers``          RMSNorm, SwiGLU MLP, RoPE as autograd functions   CPU, Llama / Mistral / Qwen2
``onednn_linear``         fp32 linear layers of scoring by oneDNN           non-Intel CPU, one process, hidden >= 512
``clip_with_norm``        clipping reuses the logged gradient norm          CPU, any model
``dot_norm``              gradient norm by BLAS dot products                CPU, any model
``concurrent_reference``  DPO's reference forward on a second thread        CPU, any model (separate reference)
``malloc``                glibc allocator settings during a CPU fit         CPU (glibc), any model
``own_weights``           trained weights copied out of the file mapping    CPU, any model
``early_adam_state``      Adam's state allocated when the fit starts        CPU, Adam / AdamW
========================  ================================================  =========================================

Nothing is on by ``auto`` on CUDA or other accelerators until it has been measured there. Every feature has an
equivalence test against the plain path (``tests/test_accel.py``: states, log-probs, gradients, tokens). Features
that use private attributes of transformers are checked against its major version 5 (measured with 5.24); on any
other version they are dropped with one log line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

FEATURES = (
    "prefix_sharing",
    "packed_rows",
    "sparse_last_layer",
    "length_groups",
    "fast_decode",
    "growing_cache",
    "fused_layers",
    "onednn_linear",
    "clip_with_norm",
    "dot_norm",
    "concurrent_reference",
    "malloc",
    "own_weights",
    "early_adam_state",
)
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2"})
# features measured on the Llama family only (its module layout, or only measured there)
_LLAMA_ONLY = frozenset(
    {"prefix_sharing", "packed_rows", "sparse_last_layer", "length_groups", "fast_decode", "fused_layers"}
)
# what ``auto`` turns on, per device type: family-independent features, and those measured on the Llama family
_AUTO_ANY_MODEL = {"cpu": tuple(f for f in FEATURES if f not in _LLAMA_ONLY)}
_AUTO_LLAMA_FAMILY = {"cpu": FEATURES}
# features that read or subclass private transformers internals, and the major versions they were checked against
_PRIVATE_TRANSFORMERS = frozenset(
    {"prefix_sharing", "packed_rows", "sparse_last_layer", "fast_decode", "growing_cache", "fused_layers"}
)
CHECKED_TRANSFORMERS_MAJOR = (5,)
# ``onednn_linear`` pays per call and per op of the forward: SmolLM2-135M (hidden 576) -7% per DPO step, the tiny
# benchmark model (hidden 128) +17%; ``auto`` turns it on from this hidden size
ONEDNN_MIN_HIDDEN = 512

AccelSpec = str | list[str] | tuple[str, ...] | None


def parse(spec: AccelSpec) -> str | frozenset[str]:
    """``"auto"``, ``"off"`` or the named features; a clear error for anything else."""
    if spec is None or spec is False or spec == "off":
        return "off"
    if spec == "auto":
        return "auto"
    names = [spec] if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"accel: unknown feature(s) {unknown}; choose 'auto', 'off' or a list of {list(FEATURES)}")
    return frozenset(names)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


_LOCAL = threading.local()


@contextmanager
def _linear_mode():
    from src.accel.onednn import LinearMode

    _LOCAL.linears = True
    try:
        with LinearMode():
            yield
    finally:
        _LOCAL.linears = False


class Accel:
    """The features in effect for one model on one device; hands out the speed paths (``None`` = use the plain
    path). Build it with :meth:`resolve`."""

    def __init__(self, features: Iterable[str] = ()) -> None:
        self.features = frozenset(features)

    def __contains__(self, name: str) -> bool:
        return name in self.features

    def __repr__(self) -> str:
        return f"Accel({sorted(self.features)})"

    @classmethod
    def resolve(cls, spec: AccelSpec, model: nn.Module | None, device: torch.device | str) -> Accel:
        parsed = parse(spec)
        if parsed == "off":
            return cls()
        device = torch.device(device)
        family = getattr(getattr(model, "config", None), "model_type", None)
        if parsed == "auto":
            from src.accel import onednn

            chosen = set(_AUTO_ANY_MODEL.get(device.type, ()))
            if family in LLAMA_FAMILY:
                chosen |= set(_AUTO_LLAMA_FAMILY.get(device.type, ()))
            if (
                getattr(getattr(model, "config", None), "hidden_size", 0) or 0
            ) < ONEDNN_MIN_HIDDEN or onednn.intel_cpu():
                chosen.discard("onednn_linear")
        else:
            chosen = set(parsed)
        if chosen & _PRIVATE_TRANSFORMERS and _transformers_major() not in CHECKED_TRANSFORMERS_MAJOR:
            dropped = sorted(chosen & _PRIVATE_TRANSFORMERS)
            log.warning(
                "accel: transformers %s is not a checked version (major %s): plain path for %s",
                _transformers_major(),
                CHECKED_TRANSFORMERS_MAJOR,
                dropped,
            )
            chosen -= _PRIVATE_TRANSFORMERS
        return cls(chosen)

    # -- scoring (src/logprobs.py) --------------------------------------------------------------------------------
    def completion_hidden(
        self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
    ) -> Tensor | None:
        """The ``[N, H]`` completion-position states of :func:`src.logprobs.completion_hidden` by a faster layout,
        or ``None`` where none applies."""
        from src.accel import prefix

        if "prefix_sharing" in self:
            states = prefix.shared_prompt_hidden(
                model,
                input_ids,
                attention_mask,
                completion_mask,
                packed="packed_rows" in self,
                sparse="sparse_last_layer" in self,
                grouped="length_groups" in self,
            )
            if states is not None:
                return states
        if "length_groups" in self:
            return prefix.grouped_hidden(model, input_ids, attention_mask, completion_mask)
        return None

    @contextmanager
    def scoring(self, model: nn.Module) -> Iterator[None]:
        """The context scoring forwards run in: ``model``'s RMSNorm and MLP modules by :mod:`src.accel.layers`
        (``fused_layers``) and ``F.linear`` by oneDNN (``onednn_linear``). Nested uses enter each once (a nested
        ``fused_layers`` finds the modules switched already and leaves them)."""
        with ExitStack() as stack:
            if "fused_layers" in self:
                from src.accel.layers import fused_layers

                stack.enter_context(fused_layers(model))
            if "onednn_linear" in self and not getattr(_LOCAL, "linears", False):
                from src.accel import onednn

                if onednn.available() and not onednn.several_processes():
                    stack.enter_context(_linear_mode())
            yield

    # -- sampling (src/rollout.py) --------------------------------------------------------------------------------
    def decoder(self, model: nn.Module, cache: Any, attn_mask: Tensor, positions: Tensor, repeats: int) -> Any:
        """A :class:`src.accel.decode.FastDecoder` over the prefill ``cache``, or ``None``."""
        if "fast_decode" not in self:
            return None
        from src.accel.decode import FastDecoder

        return FastDecoder.build(model, cache, attn_mask, positions, repeats)

    def preallocate(self, cache: Any, capacity: int) -> bool:
        """Move the cache's filled layers into ``capacity``-long buffers (``growing_cache``)."""
        if "growing_cache" not in self:
            return False
        from src.accel.decode import preallocate_cache

        return preallocate_cache(cache, capacity)

    # -- the training loop (src/modules/base.py) ------------------------------------------------------------------
    def total_norm(self, grads: list[Tensor]) -> Tensor:
        """The global L2 norm of ``grads``: by BLAS dot products (``dot_norm``) where that applies, else
        ``torch.nn.utils.get_total_norm``."""
        if "dot_norm" in self:
            from src.accel.runtime import dot_norm

            norm = dot_norm(grads)
            if norm is not None:
                return norm
        return torch.nn.utils.get_total_norm(grads)

    def together(self, policy: Any, reference: Any, ref_model: nn.Module | None) -> tuple[Any, Any]:
        """``(policy(), reference())``: concurrently (``concurrent_reference``) where the reference is a model of its
        own on the CPU (not the policy with its adapters off, not precomputed log-probs), else one after the other."""
        cpu = ref_model is not None and next(ref_model.parameters()).device.type == "cpu"
        if "concurrent_reference" in self and cpu:
            from src.accel.runtime import together

            return together(policy, reference)
        return policy(), reference()

    def clip(self, trainer: Any, optimizer: torch.optim.Optimizer, max_norm: float, norm: Tensor | None) -> bool:
        """Clip with the already computed ``norm`` (``clip_with_norm``); ``False``: clip the plain way."""
        if "clip_with_norm" not in self:
            return False
        from src.accel.runtime import clip_with_norm

        return clip_with_norm(trainer, optimizer, max_norm, norm)

    def on_fit_start(self, module: nn.Module | None = None, optimizers: Iterable[Any] = ()) -> None:
        """Process-wide settings of a fit (``malloc``); ``module``'s trained weights in memory of their own
        (``own_weights``); the optimizers' state allocated (``early_adam_state``)."""
        from src.accel import runtime

        if "malloc" in self and runtime.tune_malloc():
            log.info("accel: glibc malloc thresholds set for CPU training (opt out: ALIGN_MALLOC=default)")
        if "own_weights" in self and module is not None:
            log.info("accel: %.0f MiB of trained weights copied to private memory", runtime.own_weights(module) / 2**20)
        if "early_adam_state" in self:
            runtime.early_adam_state(list(optimizers))
