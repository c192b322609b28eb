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
    if (path / "meta.pt").exists():  # FSDP sharded: torch.distributed.checkpoint shards + Lightning's meta.pt
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, out)
        shards = torch.load(out, map_location="cpu", weights_only=False)
        checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
        # Lightning's FSDPStrategy.save_checkpoint stores the weights under "model" and the optimizers under
        # "optimizer_<i>" (export needs only the weights)
        checkpoint["state_dict"] = shards["model"]
        torch.save(checkpoint, out)
        return out
    raise ValueError(f"{path}: a directory that is neither a DeepSpeed nor an FSDP sharded checkpoint")


def module_class(ckpt_path: str | Path) -> type:
    """The ``AlignmentModule`` subclass a checkpoint of this project was trained with, imported by its class path
    (LightningCLI stores it as ``hyper_parameters["_class_path"]``), so ``export`` works in a fresh process."""
    import importlib

    from src.modules.base import AlignmentModule

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    class_path = hparams.get("_class_path")
    if class_path is None:
        return AlignmentModule  # saved without the CLI: Lightning resolves the class itself if it is imported
    module_name, _, name = str(class_path).rpartition(".")
    if not module_name.startswith("src."):
        raise ValueError(f"{ckpt_path}: trained with {class_path!r}, not a module of this project (src.modules.*)")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, AlignmentModule)):
        raise ValueError(f"{ckpt_path}: {class_path!r} is not an AlignmentModule of this project")
    return cls


def export(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's model and tokenizer as a ``save_pretrained`` directory; returns ``out``."""
    from src.callbacks.checkpoint_io import check_checkpoint
    from src.callbacks.export import HFExport
    from src.data import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        single = consolidate(ckpt_path, Path(tmp))
        check_checkpoint(single)
        cls = module_class(single)
        try:
            module = cls.load_from_checkpoint(single, map_location="cpu", weights_only=False)
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
