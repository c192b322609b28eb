"""HFExport: write the trained model and its tokenizer as a Hugging Face ``save_pretrained`` directory at the end of
``fit``, so the next stage of a pipeline loads it by path (SFT → reward model → PPO/GRPO)::

    python -m src fit --config configs/sft.yaml --hf_export.dirpath runs/sft/hf
    python -m src fit --config configs/rm.yaml --model.init_args.model_name_or_path runs/sft/hf
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from lightning import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


class HFExport(Callback):
    """Args:
    dirpath: output directory (created; existing files are overwritten); ``None`` = no export.
    merge_lora: save a LoRA policy with its adapter merged into the weights (a plain model directory); ``False``
        saves the adapter only.
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True) -> None:
        self.dirpath = dirpath
        self.merge_lora = merge_lora

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.dirpath is None or getattr(pl_module, "model", None) is None:
            return
        if trainer.is_global_zero:
            self.export(pl_module, trainer)
        trainer.strategy.barrier("hf_export")

    def export(self, pl_module: LightningModule, trainer: Trainer | None = None) -> Path:
        """Save ``pl_module.model`` (and the data module's or the module's tokenizer) to ``dirpath``."""
        out = Path(self.dirpath)
        out.mkdir(parents=True, exist_ok=True)
        model = pl_module.model
        if self.merge_lora and hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(out)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        tokenizer = getattr(dm, "tokenizer", None) or getattr(pl_module, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        log.info("exported %s to %s", type(model).__name__, out)
        print(f"HFExport: wrote {type(model).__name__} and its tokenizer to {out}")
        return out
