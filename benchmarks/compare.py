"""Ours vs TRL on a benchmark workload, side by side: alternating fresh processes, medians, ratios.

    python benchmarks/compare.py dpo [--repeats 3] [--artifacts ../shared/bench/artifacts] [--tag NAME]
                                     [--threads N] [--steps N] [--bench-dir ../shared/bench] [--wait-idle S] [--nice N]
    python benchmarks/compare.py real_dpo --length 128 256 512 [--repeats 2] [--accel auto|off] ...

Each repeat runs ``benchmarks/run.py`` and TRL's runner (``<bench-dir>/trl_<workload>.py`` for the shared tiny
workload, ``benchmarks/trl_real.py`` for the real-model one of ``benchmarks/real.py``) as fresh subprocesses (under
``/usr/bin/time -v`` when present), alternating which goes first, so slow drifts of a shared machine hit both; with
several ``--length`` values every repeat runs each length in turn. Prints a markdown table of medians and the ratios
ours/TRL (tokens/s, peak RSS, step time) per length, how the median step time grows with the length on each side,
checks the DPO per-step loss curves against each other, and writes every raw result plus the summary to
``benchmarks/results/<tag>.json``. TRL comes from the ``bench`` extra: ``pip install -e '.[bench]'`` (trl==1.16.0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT.parent / "shared" / "bench"
REAL_ARTIFACTS = ROOT / "benchmarks" / "real_artifacts"
RUNNERS = {"dpo": "trl_dpo.py", "grpo": "trl_grpo.py", "real_dpo": "trl_real.py", "real_grpo": "trl_real.py"}
KEYS = {
    "dpo": [
        "tokens_per_s",
        "train_wall_s",
        "steps_per_s",
        "median_step_s_excl_first",
        "first_step_s",
        "peak_rss_mib",
        "time_v_max_rss_mib",
        "final_loss",
        "setup_s",
        "process_wall_s",
    ],
    "grpo": [
        "tokens_per_s",
        "train_wall_s",
        "steps_per_s",
        "median_step_s_excl_first",
        "first_step_s",
        "peak_rss_mib",
        "time_v_max_rss_mib",
        "final_loss",
        "reward_first_step",
        "reward_last_step",
        "setup_s",
        "process_wall_s",
    ],
}
KEYS["real_dpo"], KEYS["real_grpo"] = KEYS["dpo"], KEYS["grpo"]


def algo(workload: str) -> str:
    """``dpo`` or ``grpo``: what the workload trains (``real_dpo`` -> ``dpo``)."""
    return workload.removeprefix("real_")


def cpu_idle_fraction(window_s: float = 2.0) -> float | None:
    """Fraction of all CPUs' time spent idle over ``window_s`` seconds (``/proc/stat``; ``None`` if unavailable)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return v[3] + v[4], sum(v)

    try:
        idle0, total0 = sample()
        time.sleep(window_s)
        idle1, total1 = sample()
    except OSError:
        return None
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_idle(max_wait_s: float, min_idle: float = 0.85) -> float | None:
    """Wait (at most ``max_wait_s``) until the machine is at least ``min_idle`` idle; returns the last idle fraction.
    A shared VM's other jobs make OpenMP threads spin-wait: a 2-thread run then slows down 5-10×, not 2×."""
    deadline = time.monotonic() + max_wait_s
    idle = cpu_idle_fraction()
    while idle is not None and idle < min_idle and time.monotonic() < deadline:
        idle = cpu_idle_fraction()
    return idle


def run_one(cmd: list[str], cwd: Path, timeout: int, max_wait_idle_s: float = 0.0, nice: int = 0) -> dict:
    full = ["/usr/bin/time", "-v", *cmd] if os.path.exists("/usr/bin/time") else cmd
    if nice:
        full = ["nice", "-n", str(nice), *full]
    idle = wait_idle(max_wait_idle_s) if max_wait_idle_s > 0 else None
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(full, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(lines[-1])
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if m:
        r["time_v_max_rss_mib"] = round(int(m.group(1)) / 1024, 1)
    r["process_wall_s"] = round(wall, 3)
    r["loadavg_1min_before"] = round(load, 2)
    if idle is not None:
        r["cpu_idle_before"] = round(idle, 3)
    return r


def median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
    return str(x)


def curve_diff(a: list[float], b: list[float]) -> float | None:
    n = min(len(a), len(b))
    return round(max(abs(x - y) for x, y in zip(a[:n], b[:n])), 6) if n else None


def commands(args: argparse.Namespace, length: int | None) -> dict[str, tuple[list[str], Path]]:
    """(command, cwd) of each side for one length (``None``: the shared tiny workload)."""
    real = args.workload.startswith("real_")
    artifacts = str(Path(args.artifacts or (REAL_ARTIFACTS if real else BENCH_DIR / "artifacts")).resolve())
    common = ["--artifacts", artifacts]
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.steps:
        common += ["--steps", str(args.steps)]
    if length is not None:
        common += ["--length", str(length)]
    ours = [sys.executable, str(ROOT / "benchmarks" / "run.py"), args.workload, *common]
    if args.accel:
        ours.append(f"--model.init_args.accel={args.accel}")
    if real:
        trl = ([sys.executable, str(ROOT / "benchmarks" / "trl_real.py"), algo(args.workload), *common], ROOT)
    else:
        bench_dir = Path(args.bench_dir).resolve()
        runner = bench_dir / RUNNERS[args.workload]
        if not runner.exists() and args.only != "ours":
            raise SystemExit(
                f"{runner} not found: TRL's runners for the tiny workload live in ../shared/bench (--bench-dir); "
                "the real-model workload (real_dpo, real_grpo) needs no ../shared"
            )
        trl = ([sys.executable, str(runner), *common], bench_dir)
    return {"ours": (ours, ROOT), "trl": trl}


def summarize(args: argparse.Namespace, rows: dict[str, list[dict]], length: int | None) -> dict:
    """Medians, ratios and the loss / reward comparison of one length; prints its table."""
    sides = list(rows)
    keys = KEYS[args.workload]
    med = {s: {k: median(rows[s], k) for k in keys} for s in sides}
    summary: dict = dict(
        workload=args.workload,
        length=length,
        repeats=args.repeats,
        threads=args.threads,
        nice=args.nice,
        steps=args.steps,
        accel=args.accel or "auto",
        median=med,
        runs={s: rows[s] for s in sides},
    )
    if len(sides) == 2:
        o, t = med["ours"], med["trl"]
        summary["ratio_tokens_per_s"] = round(o["tokens_per_s"] / t["tokens_per_s"], 3)
        summary["ratio_peak_rss"] = round(o["peak_rss_mib"] / t["peak_rss_mib"], 3)
        summary["ratio_median_step"] = round(t["median_step_s_excl_first"] / o["median_step_s_excl_first"], 3)
        if algo(args.workload) == "dpo":
            summary["max_abs_loss_diff_vs_trl"] = curve_diff(rows["ours"][0]["losses"], rows["trl"][0]["losses"])
            summary["first_loss_ours"] = rows["ours"][0]["losses"][0]
            summary["losses_ours"], summary["losses_trl"] = rows["ours"][0]["losses"], rows["trl"][0]["losses"]
        else:  # sampling streams differ: compare the reward trend, not the values
            summary["rewards_ours"] = rows["ours"][0].get("rewards")
            summary["rewards_trl"] = rows["trl"][0].get("rewards")

    env = rows[sides[0]][0]
    at = f" at length {length}" if length is not None else ""
    print(
        f"\n### {args.workload}{at}: medians of {args.repeats} alternating runs "
        f"(torch threads {env.get('torch_threads')}, {env.get('cpu', '?')}, {os.cpu_count()} CPUs)\n"
    )
    print("| metric | " + " | ".join(sides) + (" | ours / TRL |" if len(sides) == 2 else " |"))
    print("|---|" + "---|" * len(sides) + ("---|" if len(sides) == 2 else ""))
    for k in keys:
        cells = [fmt(med[s][k]) for s in sides]
        ratio = ""
        if len(sides) == 2 and isinstance(med["ours"][k], (int, float)) and med["trl"][k]:
            ratio = f" {med['ours'][k] / med['trl'][k]:.2f}× |"
        elif len(sides) == 2:
            ratio = " |"
        print(f"| {k} | " + " | ".join(cells) + " |" + ratio)
    for s in sides:
        print(f"\n{s} tokens/s per run: " + ", ".join(fmt(r.get("tokens_per_s")) for r in rows[s]))
    if len(sides) == 2:
        print(
            f"\nratio of medians, tokens/s ours/TRL: {summary['ratio_tokens_per_s']}×; "
            f"peak RSS ours/TRL: {summary['ratio_peak_rss']}×"
        )
        if "max_abs_loss_diff_vs_trl" in summary:
            print(
                f"loss curves: step-1 loss ours {summary['first_loss_ours']}, "
                f"max |ours - TRL| over {len(rows['ours'][0]['losses'])} steps = {summary['max_abs_loss_diff_vs_trl']}"
            )
        if summary.get("rewards_ours") and summary.get("rewards_trl"):

            def trend(r: list[float]) -> str:
                k = max(1, len(r) // 6)
                return f"{statistics.mean(r[:k]):.3f} -> {statistics.mean(r[-k:]):.3f}"

            print(
                f"mean reward, first -> last {max(1, len(summary['rewards_ours']) // 6)} steps: "
                f"ours {trend(summary['rewards_ours'])}, TRL {trend(summary['rewards_trl'])}"
            )
    return summary


def growth(per_length: dict[int, dict]) -> dict:
    """Median step time per length on each side and its growth from one length to the next (x the previous)."""
    lengths = sorted(per_length)
    sides = list(per_length[lengths[0]]["median"])
    out: dict = {}
    for s in sides:
        steps = [per_length[n]["median"][s]["median_step_s_excl_first"] for n in lengths]
        out[s] = dict(
            median_step_s=dict(zip(lengths, steps)),
            growth=[round(b / a, 3) if a and b else None for a, b in zip(steps, steps[1:])],
        )
    print("\n### step time vs length (median step excluding the first, s; growth = x the previous length)\n")
    print("| side | " + " | ".join(str(n) for n in lengths) + " | growth |")
    print("|---|" + "---|" * len(lengths) + "---|")
    for s in sides:
        cells = " | ".join(fmt(v) for v in out[s]["median_step_s"].values())
        print(f"| {s} | {cells} | " + ", ".join(f"{g}×" for g in out[s]["growth"]) + " |")
    if len(sides) == 2:
        print("\n| length | tokens/s ours | tokens/s TRL | ratio | peak RSS ours / TRL MiB | step ours / TRL s |")
        print("|---|---|---|---|---|---|")
        for n in lengths:
            m, summ = per_length[n]["median"], per_length[n]
            print(
                f"| {n} | {fmt(m['ours']['tokens_per_s'])} | {fmt(m['trl']['tokens_per_s'])} | "
                f"**{summ['ratio_tokens_per_s']:.2f}×** | {fmt(m['ours']['peak_rss_mib'])} / "
                f"{fmt(m['trl']['peak_rss_mib'])} | {fmt(m['ours']['median_step_s_excl_first'])} / "
                f"{fmt(m['trl']['median_step_s_excl_first'])} |"
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", choices=sorted(RUNNERS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--length",
        type=int,
        nargs="+",
        default=None,
        help="real_* workloads: sequence lengths to run (128 256 512); every repeat runs each in turn",
    )
    ap.add_argument(
        "--artifacts",
        default=None,
        help="workload dir (default: ../shared/bench/artifacts; real_*: benchmarks/real_artifacts)",
    )
    ap.add_argument("--bench-dir", default=str(BENCH_DIR), help="folder holding trl_dpo.py / trl_grpo.py")
    ap.add_argument("--tag", default=None, help="results/<tag>.json (default: <workload>_<date>)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in both (default: torch's)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run wait up to S seconds for the CPUs to be >= 85%% idle (shared machines)",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run both sides under `nice -n N` (e.g. -10 as root: the scheduler favours the benchmark over other jobs "
        "on a shared machine; both sides get the same priority)",
    )
    ap.add_argument(
        "--accel",
        default=None,
        help="our side's speed-path switch, passed as --model.init_args.accel (auto | off | [feature,...]); "
        "default: the config's (auto)",
    )
    args = ap.parse_args(argv)
    real = args.workload.startswith("real_")
    if real and not args.length:
        raise SystemExit(f"{args.workload} needs --length (one or more of 128 256 512)")
    if not real and args.length:
        raise SystemExit(f"{args.workload} takes no --length (the shared tiny workload has one)")
    lengths: list[int | None] = list(args.length) if real else [None]

    cmds = {n: commands(args, n) for n in lengths}
    sides = [args.only] if args.only else ["ours", "trl"]
    rows: dict[int | None, dict[str, list[dict]]] = {n: {s: [] for s in sides} for n in lengths}
    for i in range(args.repeats):
        order = sides if i % 2 == 0 else sides[::-1]  # ABBA: neither side always runs first
        for n in lengths:
            for side in order:
                cmd, cwd = cmds[n][side]
                r = run_one(cmd, cwd, args.timeout, args.wait_idle, args.nice)
                rows[n][side].append(r)
                at = f" L={n}" if n is not None else ""
                print(
                    f"[{side}{at} {i + 1}/{args.repeats}] tokens/s={fmt(r.get('tokens_per_s'))} "
                    f"train_wall_s={fmt(r.get('train_wall_s'))} step={fmt(r.get('median_step_s_excl_first'))} "
                    f"rss={fmt(r.get('peak_rss_mib'))} MiB final_loss={r.get('final_loss')} "
                    f"load={r['loadavg_1min_before']} idle={r.get('cpu_idle_before')}",
                    file=sys.stderr,
                    flush=True,
                )

    per_length = {n: summarize(args, rows[n], n) for n in lengths}
    if real:
        summary: dict = dict(workload=args.workload, accel=args.accel or "auto", lengths=per_length)
        if len(lengths) > 1:
            summary["step_time_vs_length"] = growth(per_length)
    else:
        summary = per_length[None]
        summary["artifacts"] = str(Path(args.artifacts or BENCH_DIR / "artifacts").resolve())

    tag = args.tag or f"{args.workload}_{time.strftime('%Y%m%d_%H%M%S')}"
    out = ROOT / "benchmarks" / "results" / f"{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    # one file per run, as ../shared/bench/flops.py --dpo-results "results/<tag>_ours_run*.json" reads them
    for n in lengths:
        for s in sides:
            for i, r in enumerate(rows[n][s], 1):
                name = f"{tag}_{s}_run{i}.json" if n is None else f"{tag}_L{n}_{s}_run{i}.json"
                out.with_name(name).write_text(json.dumps(r) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")
    return summary


if __name__ == "__main__":
    main()
