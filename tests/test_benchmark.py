"""The benchmark runner (``benchmarks/run.py``) and the forward-pass savings it measures.

* A smoke run of the shared CPU workload through the CLI (2 steps, not timed): JSON keys, step-1 loss = ln 2.
(The speed paths it measures are checked against the plain path in ``tests/test_accel.py``.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = (Path(__file__).parents[1] / ".." / "shared" / "bench" / "artifacts").resolve()
KEYS = {
    "steps", "train_wall_s", "steps_per_s", "tokens_per_s", "tokens_total", "tokens_padded_total", "peak_rss_mib",
    "final_loss", "losses", "first_step_s", "median_step_s_excl_first", "setup_s",
}  # fmt: skip


@pytest.mark.skipif(
    not (ARTIFACTS / "model").exists() or not (ARTIFACTS / "dpo_pairs.jsonl").exists(),
    reason=f"benchmark workload not built at {ARTIFACTS} (python ../shared/bench/workload.py --out DIR)",
)
@pytest.mark.slow  # a fresh process loading the CLI (~8 s): the default tier stays under 5 minutes on 2 cores
def test_run_dpo_two_steps_through_the_cli():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "dpo", "--artifacts", str(ARTIFACTS), "--steps", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result), KEYS - set(result)
    assert result["steps"] == 2 and len(result["losses"]) == 2
    assert result["first_loss"] == pytest.approx(0.693147, abs=1e-6)  # policy == reference at step 1: ln 2
    assert result["losses"][0] == pytest.approx(0.69315, abs=1e-5)  # the curve is rounded to 5 digits, as TRL's
    assert result["tokens_total"] < result["tokens_padded_total"]
    assert result["tokens_per_s"] > 0 and result["peak_rss_mib"] > 0
