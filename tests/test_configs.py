"""Every YAML under configs/ runs through ``src.cli.main`` with a tiny budget (lightning-hydra-template style).

Top-level configs are full jobs; files in sub-folders are overlays, run on top of the job they name in a
``# base: <config>`` header line (default ``dpo.yaml``). ``configs/bench/`` is executed by tests/test_benchmark.py.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import CONFIGS, FAST

JOBS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
OVERLAYS = sorted(
    str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS and p.parent.name != "bench"
)
CPU_ONLY_SKIP = {"fsdp", "deepspeed"}  # Lightning refuses these strategies on CPU: checked by --print_config only


def base_of(overlay: str) -> str:
    m = re.search(r"^# base: (\S+)", (CONFIGS / overlay).read_text(), re.M)
    return m.group(1) if m else "dpo.yaml"


@pytest.mark.parametrize("config", JOBS)
def test_job_config_runs(run_cli, config):
    cli = run_cli(["fit", "--config", config, *FAST])
    assert cli.trainer.global_step == 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_config(run_cli, overlay, capsys):
    args = ["--config", base_of(overlay), "--config", overlay]
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", *args, "--print_config"])
    assert e.value.code == 0
    assert "class_path" in capsys.readouterr().out
    if any(k in overlay for k in CPU_ONLY_SKIP):
        return
    cli = run_cli(["fit", *args, *FAST])
    assert cli.trainer.global_step == 3
