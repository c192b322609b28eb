"""Atomic checkpoint files: write to a temporary file in the same directory, fsync, then rename over the target.

A crash while saving leaves either the previous checkpoint or none, never a truncated file that a later
``--ckpt_path`` would try to load. Sharded FSDP/DeepSpeed checkpoints are written by their strategies.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic; a failed write (disk full, read-only directory) raises an
    ``OSError`` naming the checkpoint and leaves the file that was there as it was."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise _write_error(path, e) from e
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise _write_error(path, e) from e
            raise


def _write_error(path: Path, e: OSError) -> OSError:
    """The same kind of ``OSError`` (``errno`` kept), naming the checkpoint that could not be written."""
    previous = "the previous checkpoint there is unchanged" if path.exists() else "nothing was written"
    return OSError(e.errno, f"cannot write checkpoint {str(path)!r}: {e.strerror or e} ({previous})")


def check_checkpoint(path: _PATH) -> None:
    """Fail early, in one line, on a missing, truncated or foreign ``--ckpt_path`` file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    if p.is_dir():
        return  # sharded checkpoint: its strategy validates it
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is unusable
        raise ValueError(
            f"checkpoint {str(p)!r} is corrupt or not a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {str(p)!r} is not a Lightning checkpoint (no 'state_dict')")
