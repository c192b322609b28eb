"""``benchmarks/gpu_check.sh`` (the GPU readiness check of issue 16) and its report, checked without a GPU."""

from __future__ import annotations

import os
import subprocess

import pytest

from benchmarks.gpu_report import peak_flops, report
from tests.conftest import ROOT


def test_report_reads_throughput_and_computes_mfu_from_the_device_peak(tmp_path):
    run = tmp_path / "dpo_bf16_auto" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(
        "step,train/loss,train/tokens_per_s,train/samples_per_s,train/device/flops_per_sec\n"
        "4,0.69,1000,10,\n9,0.5,2000.4,20,98.9e12\n10,0.45,,,\n"
    )
    line = report(tmp_path / "dpo_bf16_auto", "NVIDIA H200")
    assert line == "dpo_bf16_auto: tokens/s 2,000, samples/s 20.0, MFU 10.00%, last train/loss 0.4500"
    assert "MFU -%" in report(tmp_path / "dpo_bf16_auto", "some CPU")  # unknown peak: no MFU
    assert "no metrics.csv" in report(tmp_path / "missing")
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.mark.slow
def test_gpu_check_runs_every_fit_on_the_cpu(tmp_path):
    """``GPU_CHECK_DRY=1``: each run of the script for one step on the CPU (FSDP left out), all successful."""
    env = {**os.environ, "GPU_CHECK_DRY": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    names = [
        "dpo_bf16_auto",
        "grpo_bf16_auto",
        "dpo_bf16_off",
        "grpo_bf16_off",
        "smollm2_dpo_bf16",
        "smollm2_grpo_bf16",
    ]
    for name in names:
        assert f"ok   {name}" in proc.stdout, proc.stdout
        assert f"{name}: tokens/s" in proc.stdout  # the report line
