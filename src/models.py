"""Loading causal LMs: the embedded tiny default built from config, or a local Hugging Face directory (offline)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from src.data import tiny

log = logging.getLogger(__name__)


def load_causal_lm(
    name_or_path: str,
    *,
    model_config: dict[str, Any] | None = None,
    torch_dtype: str | None = None,
    attn_implementation: str | None = None,
    auto_class: str = "AutoModelForCausalLM",
    what: str = "model",
    **kwargs: Any,
) -> nn.Module:
    """``"tiny"`` builds the embedded tiny Llama from config (``model_config`` overrides its fields); anything else is
    loaded with ``from_pretrained`` from a local directory (or the local HF cache; nothing is downloaded). A missing
    one is a one-line ``FileNotFoundError`` that calls it ``what`` (e.g. ``"reward model"``)."""
    import transformers

    if name_or_path == tiny.TINY:
        if auto_class != "AutoModelForCausalLM":
            from transformers import LlamaConfig

            cfg = LlamaConfig(**{**tiny.TINY_MODEL_CONFIG, **(model_config or {}), **kwargs})
            return getattr(transformers, auto_class).from_config(cfg)
        return tiny.build_model(model_config, attn_implementation)
    if model_config:
        rank_zero_info(f"model_config {model_config} applies to the tiny model only: {name_or_path} is loaded as saved")
    if not Path(name_or_path).exists():
        if name_or_path.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"{what} path {name_or_path!r} does not exist")
        log.info("%s %s is not a local path; trying the local Hugging Face cache", what, name_or_path)
    extra: dict[str, Any] = dict(kwargs)
    if torch_dtype is not None:
        extra["dtype"] = getattr(torch, torch_dtype) if torch_dtype != "auto" else "auto"
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    try:
        return getattr(transformers, auto_class).from_pretrained(name_or_path, **extra)
    except OSError as e:
        raise FileNotFoundError(f"{what} {name_or_path!r}: {not_found_hint()}") from e


def check_model_path(option: str, name: str | None) -> None:
    """A ``FileNotFoundError`` naming ``option`` when ``name`` is neither ``"tiny"``, a local path nor (offline) in the
    local HF cache, so a missing reference / reward / teacher model fails at start, not at the first step."""
    if name is None or name == tiny.TINY or Path(name).exists() or not hub_offline():
        return  # online, the hub may provide it
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: not cached
        cached = False
    if not cached:
        raise FileNotFoundError(f"{option}: {name!r}: {not_found_hint()}")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (the CLI sets it unless the user did: nothing is downloaded)."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "False", "")


def not_found_hint() -> str:
    """Why a name that is not a local path failed to load, and the one switch that lets the hub download it."""
    if hub_offline():
        return "not a local directory and not in the HF cache; runs are offline by default: HF_HUB_OFFLINE=0 downloads"
    return "not a local directory, not in the HF cache, and the Hugging Face hub could not provide it"


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


@torch.no_grad()
def mix_into_(target: nn.Module, source: nn.Module, alpha: float) -> None:
    """``θ_target ← α·θ_source + (1 − α)·θ_target`` in place (TR-DPO's reference update, Gorbatovski et al. 2024;
    TRL's ``SyncRefModelCallback``). The source is cast to each target parameter's dtype."""
    for p_t, p in zip(target.parameters(), source.parameters(), strict=True):
        p_t.lerp_(p.detach().to(p_t.dtype), alpha)


class ReferenceSync:
    """TR-DPO's reference update (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"; TRL's
    ``SyncRefModelCallback``): after every ``every``-th optimizer step, ``θ_ref ← α·θ + (1 − α)·θ_ref``.

    Call it as often as convenient (every micro-batch, after every optimizer step): it acts once per optimizer step
    count, so gradient accumulation does not repeat an update. :meth:`save` / :meth:`load` keep the reference weights
    and the step of the last update in the checkpoint, so a resumed run neither misses nor repeats one. ``every = 0``
    is off."""

    def __init__(self, every: int, alpha: float) -> None:
        self.every, self.alpha, self.synced_step = every, alpha, 0

    def __call__(self, ref: nn.Module | None, policy: nn.Module, step: int) -> None:
        if self.every and ref is not None and step and not step % self.every and step != self.synced_step:
            mix_into_(ref, policy, self.alpha)
            self.synced_step = step

    def save(self, checkpoint: dict, ref: nn.Module | None) -> None:
        if self.every and ref is not None:
            checkpoint["ref_model_state_dict"] = ref.state_dict()
            checkpoint["ref_model_synced_step"] = self.synced_step

    def load(self, checkpoint: dict, ref: nn.Module | None) -> None:
        if "ref_model_state_dict" in checkpoint and ref is not None:
            ref.load_state_dict(checkpoint["ref_model_state_dict"])
            self.synced_step = checkpoint.get("ref_model_synced_step", 0)
