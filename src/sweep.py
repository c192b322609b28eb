"""Run a W&B sweep definition locally, without W&B: a grid or random search with CSV logs and a summary table.

    python -m src.sweep configs/sweeps/dpo_beta.yaml [--max-trials N] [--out runs/sweeps/dpo_beta] [-- EXTRA ARGS]

The same YAML drives ``wandb sweep`` (see ``configs/sweeps/``). Read from it: ``command`` (the ``python -m src fit
--config ...`` part; ``${env}``, ``${interpreter}``, ``${program}`` and ``${args}`` are dropped), ``method``
(``grid``; ``random`` and ``bayes`` sample ``run_cap``/``--max-trials`` points at random), ``parameters`` (``value``,
``values``, or ``distribution`` with ``min``/``max``: uniform, int_uniform, q_uniform, log_uniform_values, normal...)
and ``metric`` (``name``, ``goal``). Each trial runs in-process through ``src.cli.main`` (``--subprocess`` for a fresh
interpreter per trial) with its parameters as ``--key=value`` options after the command's, then the EXTRA ARGS (e.g.
``--config configs/smoke.yaml``), and a CSV logger writing to ``OUT/trial_NNN/metrics.csv`` in place of any logger
the command configures. ``OUT/summary.csv`` gets one row per trial, rewritten after every trial: trial, status, the
parameters, the final and best value of the metric, the step count and the log directory.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import random
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {"${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_json}"}
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def load_sweep(path: str | Path) -> dict[str, Any]:
    sweep = yaml.safe_load(Path(path).read_text())
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict):
        raise ValueError(f"{path}: a sweep needs a 'parameters' mapping")
    return sweep


def base_args(sweep: dict[str, Any]) -> list[str]:
    """The CLI args of the sweep's ``command`` from the subcommand on (``fit --config ...``), placeholders dropped."""
    command = [str(c) for c in sweep.get("command") or []]
    start = next((i for i, c in enumerate(command) if c in SUBCOMMANDS), None)
    if start is None:
        raise ValueError(f"sweep command {command} has no {'/'.join(SUBCOMMANDS)} subcommand (python -m src fit ...)")
    args = [c for c in command[start:] if c not in PLACEHOLDERS]
    # Config paths are relative to the repository root; resolve them there when not found from the working dir.
    return [
        str(ROOT / a) if i > 0 and args[i - 1] == "--config" and not Path(a).exists() and (ROOT / a).exists() else a
        for i, a in enumerate(args)
    ]


def _sample(spec: dict[str, Any], rng: random.Random) -> Any:
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
    lo, hi = spec.get("min"), spec.get("max")
    dist = spec.get("distribution") or ("int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform")
    if dist == "int_uniform":
        return rng.randint(lo, hi)
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "q_uniform":
        return round(rng.uniform(lo, hi) / spec.get("q", 1)) * spec.get("q", 1)
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "log_uniform":  # W&B: min/max are exponents of e
        return math.exp(rng.uniform(lo, hi))
    if dist == "normal":
        return rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0))
    if dist == "categorical":
        return rng.choice(spec["values"])
    raise ValueError(f"unsupported distribution {dist!r} in {spec}")


def trials(sweep: dict[str, Any], max_trials: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Parameter sets: the full grid (``method: grid``, in YAML order) or random samples (``random``/``bayes``)."""
    params: dict[str, dict[str, Any]] = sweep["parameters"]
    method = sweep.get("method", "grid")
    if method == "grid":
        axes = []
        for name, spec in params.items():
            if "value" in spec:
                axes.append([spec["value"]])
            elif "values" in spec:
                axes.append(list(spec["values"]))
            else:
                raise ValueError(f"grid search needs value/values for every parameter; {name!r} has {spec}")
        points = [dict(zip(params, combo)) for combo in itertools.product(*axes)]
        return points[:max_trials] if max_trials else points
    if method not in ("random", "bayes"):
        raise ValueError(f"unknown sweep method {method!r}; expected grid, random or bayes")
    n = max_trials or sweep.get("run_cap")
    if not n:
        raise ValueError(f"method {method!r} needs --max-trials or run_cap in the sweep")
    rng = random.Random(seed)
    return [{name: _sample(spec, rng) for name, spec in params.items()} for _ in range(n)]


def as_cli(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def csv_logger(out: Path, name: str) -> str:
    return json.dumps(
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(out), "name": name, "version": ""},  # logs in OUT/NAME/metrics.csv
        }
    )


def read_metric(log_dir: Path, metric: str | None, goal: str) -> tuple[float | None, float | None, int | None]:
    """Final and best value of ``metric`` in ``log_dir/metrics.csv``, and the last logged step."""
    path = log_dir / "metrics.csv"
    if not path.exists():
        return None, None, None
    with path.open() as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get("step")]
    values = [float(r[metric]) for r in rows if metric and r.get(metric)]
    if not values:
        return None, None, max(steps, default=None)
    best = max(values) if goal == "maximize" else min(values)
    return values[-1], best, max(steps, default=None)


def run_trial(args: list[str], subprocess_mode: bool) -> None:
    if subprocess_mode:
        subprocess.run([sys.executable, "-m", "src", *args], check=True, cwd=Path.cwd())
        return
    from src.cli import main

    main(args)


def run_sweep(
    sweep_path: str | Path,
    *,
    out: str | Path | None = None,
    max_trials: int | None = None,
    extra: list[str] | None = None,
    seed: int = 0,
    subprocess_mode: bool = False,
) -> Path:
    """Run every trial and write ``summary.csv``; returns its path."""
    sweep = load_sweep(sweep_path)
    name = sweep.get("name") or Path(sweep_path).stem
    out = Path(out or Path("runs") / "sweeps" / name)
    out.mkdir(parents=True, exist_ok=True)
    metric = (sweep.get("metric") or {}).get("name")
    goal = (sweep.get("metric") or {}).get("goal", "minimize")
    points = trials(sweep, max_trials, seed)
    command = base_args(sweep)
    rows: list[dict[str, Any]] = []
    for i, point in enumerate(points):
        trial = f"trial_{i:03d}"
        log_dir = out / trial
        args = [*command, *(f"--{k}={as_cli(v)}" for k, v in point.items()), *(extra or [])]
        args += [f"--trainer.logger={csv_logger(out, trial)}"]
        print(f"[sweep {name}] {trial} ({i + 1}/{len(points)}): {point}", flush=True)
        status = "ok"
        (log_dir / "metrics.csv").unlink(missing_ok=True)  # a re-run of the same sweep starts each trial afresh
        try:
            run_trial(args, subprocess_mode)
        except (Exception, SystemExit) as e:  # a failed trial is recorded, the sweep goes on
            status = f"failed: {type(e).__name__}: {e}"[:300]
            traceback.print_exc()
        final, best, step = read_metric(log_dir, metric, goal)
        rows.append(
            {"trial": trial, "status": status, **point, f"{metric}/final": final, f"{metric}/best": best}
            | {"step": step, "log_dir": str(log_dir)}
        )
        write_summary(rows, out / "summary.csv")
    ranked = sorted((r for r in rows if r[f"{metric}/best"] is not None), key=lambda r: r[f"{metric}/best"])
    if goal == "maximize":
        ranked.reverse()
    for r in ranked:
        print(f"  {r['trial']}  {metric}: best {r[f'{metric}/best']:.4g}  final {r[f'{metric}/final']:.4g}  ", end="")
        print({k: r[k] for k in points[0]})
    print(f"[sweep {name}] {len(rows)} trials -> {out / 'summary.csv'}")
    return out / "summary.csv"


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m src.sweep",
        description="Run a W&B sweep YAML locally (grid/random), logging to CSV; writes OUT/summary.csv.",
        epilog="Arguments after -- are appended to every trial, e.g. -- --config configs/smoke.yaml",
    )
    parser.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/dpo_beta.yaml")
    parser.add_argument("--max-trials", type=int, default=None, help="run at most N trials (needed for random)")
    parser.add_argument("--out", default=None, help="output directory (default runs/sweeps/<sweep name>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search")
    parser.add_argument("--subprocess", action="store_true", help="run each trial in a fresh `python -m src`")
    a = parser.parse_args(argv)
    return run_sweep(
        a.sweep, out=a.out, max_trials=a.max_trials, extra=extra, seed=a.seed, subprocess_mode=a.subprocess
    )


if __name__ == "__main__":
    main()
