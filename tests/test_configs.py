"""Every YAML under configs/ runs through ``src.cli.main`` with a tiny budget (lightning-hydra-template style).

Top-level configs are full jobs; files in sub-folders are overlays, run on top of the job they name in a
``# base: <config>`` header line (default ``dpo.yaml``). ``configs/bench/`` is executed by tests/test_benchmark.py;
``configs/papers/`` and ``configs/smoke.yaml`` by tests/test_papers.py (through each paper's documented commands);
``configs/sweeps/`` holds W&B sweep definitions, not configs (tests/test_sweep.py).
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import CONFIGS, FAST

NOT_HERE = {"bench", "papers", "sweeps"}  # sub-folders tested elsewhere (see the module docstring)
# distill.yaml trains its teacher first (~8 s): slow tier, so the default tier stays under 5 minutes
JOBS = [
    pytest.param(name, marks=pytest.mark.slow) if name == "distill.yaml" else name
    for name in sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "smoke.yaml")
]
OVERLAYS = sorted(
    str(p.relative_to(CONFIGS))
    for p in CONFIGS.rglob("*.yaml")
    if p.parent != CONFIGS and p.relative_to(CONFIGS).parts[0] not in NOT_HERE
)


def gpu_only(overlay: str) -> bool:
    """Overlays that ask for a GPU (FSDP, DeepSpeed, fp16) are checked by --print_config here (and instantiated on
    the CPU side in tests/test_scale.py); Lightning refuses to run them on a CPU."""
    return bool(re.search(r"^\s*accelerator: gpu", (CONFIGS / overlay).read_text(), re.M))


def base_of(overlay: str) -> str:
    m = re.search(r"^# base: (\S+)", (CONFIGS / overlay).read_text(), re.M)
    return m.group(1) if m else "dpo.yaml"


@pytest.mark.parametrize("config", JOBS)
def test_job_config_runs(run_cli, config):
    cli = run_cli(["fit", "--config", config, *FAST])
    # max_steps counts optimizer steps; GRPO/PPO may take several per batch and stop at the batch that reaches 3
    assert cli.trainer.state.finished and cli.trainer.global_step >= 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_config(run_cli, overlay, capsys):
    args = ["--config", base_of(overlay), "--config", overlay]
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", *args, "--print_config"])
    assert e.value.code == 0
    assert "class_path" in capsys.readouterr().out
    if gpu_only(overlay):
        return
    cli = run_cli(["fit", *args, *FAST])
    assert cli.trainer.state.finished and cli.trainer.global_step >= 3
