"""Strategy helpers for the multi-GPU overlays (``configs/trainer/``)."""

from __future__ import annotations

from torch import nn


class NoSplitModulesPolicy:
    """FSDP ``auto_wrap_policy``: every module whose class a Hugging Face model lists in ``_no_split_modules`` (its
    decoder layer: ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...) becomes its own FSDP unit, whatever the family.

    FSDP calls the policy on the root module first (``recurse=True``); the class names are read from every
    transformers model found below it then."""

    def __init__(self) -> None:
        self.names: set[str] | None = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.names is None:
            self.names = {n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
        if recurse:
            return True
        return type(module).__name__ in self.names
