"""``python -m src export --ckpt_path CKPT --out DIR``: a Lightning checkpoint -> a Hugging Face model directory.

The module class and its arguments come from the checkpoint (LightningCLI stores them), so no config is needed. A
LoRA policy is merged into its base weights. Sharded checkpoints are consolidated first: an FSDP sharded-state-dict
directory (``meta.pt`` + shards) with Lightning's distributed-checkpoint loader, a DeepSpeed directory with
``convert_zero_checkpoint_to_fp32_state_dict``. The result loads with ``AutoModelForCausalLM.from_pretrained(DIR)``
(``AutoModelForSequenceClassification`` for reward models).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def consolidate(ckpt_path: str | Path, workdir: Path) -> Path:
    """A single-file checkpoint for ``ckpt_path`` (returned as is when it already is one)."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_file():
        return path
    out = workdir / "consolidated.ckpt"
    if (path / "latest").exists() or (path / "checkpoint").is_dir():  # DeepSpeed ZeRO
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
        return out
    if (path / "meta.pt").exists():  # FSDP sharded state dict
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        torch.save(_load_distributed_checkpoint(path), out)
        return out
    raise ValueError(f"{path}: a directory that is neither a DeepSpeed nor an FSDP sharded checkpoint")


def export(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's model and tokenizer as a ``save_pretrained`` directory; returns ``out``."""
    from src.callbacks.export import HFExport
    from src.data import load_tokenizer
    from src.modules.base import AlignmentModule

    with tempfile.TemporaryDirectory() as tmp:
        single = consolidate(ckpt_path, Path(tmp))
        try:
            module = AlignmentModule.load_from_checkpoint(single, map_location="cpu", weights_only=False)
        except (KeyError, RuntimeError, EOFError) as e:
            raise ValueError(f"{ckpt_path}: not a checkpoint of this project, or corrupt ({e})") from e
    module.tokenizer = getattr(module, "tokenizer", None) or load_tokenizer(module.hparams.model_name_or_path)
    return HFExport(dirpath=str(out)).export(module)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m src export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file, or a sharded FSDP/DeepSpeed directory")
    parser.add_argument("--out", required=True, help="output directory (save_pretrained)")
    args = parser.parse_args(argv)
    return export(args.ckpt_path, args.out)
