"""One line per run of ``benchmarks/gpu_check.sh``: tokens/s, samples/s, step time and MFU from a run's ``metrics.csv``.

    python benchmarks/gpu_report.py RUN_DIR [RUN_DIR ...]

MFU is Lightning's ``train/device/mfu`` when Lightning knows the device's peak; otherwise ``train/device/flops_per_sec``
(6 · trainable parameters · tokens per second, the FLOPs estimate of ``src.callbacks.TokenThroughput``) divided by the
dense bf16 peak of :data:`PEAK_BF16` for the device name, and ``-`` for an unknown device.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIE": 756e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of the first :data:`PEAK_BF16` key found in ``device_name`` (case-insensitive)."""
    name = device_name.upper()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def last(rows: list[dict[str, str]], key: str) -> float | None:
    """The last finite value of ``key`` in the CSV rows."""
    for row in reversed(rows):
        value = row.get(key) or ""
        if value:
            try:
                x = float(value)
            except ValueError:
                continue
            if math.isfinite(x):
                return x
    return None


def report(run_dir: Path, device_name: str = "") -> str:
    """``name: tokens/s ..., samples/s ..., MFU ...`` for the newest ``metrics.csv`` under ``run_dir``."""
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return f"{run_dir.name}: no metrics.csv (the run failed: see its log)"
    with open(files[-1], newline="") as f:
        rows = list(csv.DictReader(f))
    tokens, samples = last(rows, "train/tokens_per_s"), last(rows, "train/samples_per_s")
    mfu = last(rows, "train/device/mfu")
    if mfu is None and (flops := last(rows, "train/device/flops_per_sec")) is not None:
        peak = peak_flops(device_name)
        mfu = flops / peak if peak else None
    loss = last(rows, "train/loss")

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    return (
        f"{run_dir.name}: tokens/s {fmt(tokens, ',.0f')}, samples/s {fmt(samples, ',.1f')}, "
        f"MFU {fmt(None if mfu is None else 100 * mfu, '.2f')}%, last train/loss {fmt(loss, '.4f')}"
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python benchmarks/gpu_report.py RUN_DIR [RUN_DIR ...]")
    device = ""
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    except Exception:  # noqa: BLE001 - the report works without torch, MFU then only from Lightning
        pass
    for run in args:
        print(report(Path(run), device))


if __name__ == "__main__":
    main()
