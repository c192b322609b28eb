"""Peak memory and time of scoring completion tokens with a real vocabulary: the fused LM head of ``src/logprobs.py``
(``src.losses.linear_token_logps_and_entropy``: no ``[N, V]`` logits) against the materialised logits
(``lm_head(states)`` then ``token_logps_and_entropy``), forward + backward.

The model is SmolLM2-135M-shaped (hidden 576, vocabulary 49,152, tied embeddings), random weights, ``--layers``
decoder layers (2 by default: the head's share is what changes). Each path runs in a fresh process; the peak is the
process's peak resident set (``ru_maxrss``) minus its resident set just before scoring, so it counts every buffer
that scoring and its backward allocate (CPU; glibc returns blocks of this size to the system when freed). ``states``
runs the decoder alone (the completion states' sum, no head): the part of the peak no head choice changes.

    python benchmarks/fused_head_memory.py                       # N = 8 x 256 = 2048 positions, float32
    python benchmarks/fused_head_memory.py --dtype bfloat16 --rows 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("materialised", "fused", "states")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import src.logprobs
    from src.logprobs import completion_hidden, completion_logps, linear_head

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    if args.path == "materialised":
        src.logprobs.linear_head = lambda m: None
    assert linear_head(model) is not None and (src.logprobs.linear_head(model) is None) == (args.path == "materialised")
    ids = torch.randint(3, cfg.vocab_size, (args.rows, args.seq + 1))
    attn, comp = torch.ones_like(ids), torch.ones_like(ids)
    comp[:, :1] = 0  # every other position predicts a completion token: N = rows x seq

    def score() -> float:
        model.zero_grad(set_to_none=True)
        if args.path == "states":  # the decoder alone, no head: what scoring costs without any logits
            hidden, _ = completion_hidden(model, ids, attn, comp)
            hidden.sum().backward()
            return 0.0
        lp, ent = completion_logps(model, ids, attn, comp, temperature=0.7, with_entropy=True)
        lp.sum().backward()
        return float(lp.sum())

    before = _rss_mib()
    value = score()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        score()
        times.append(time.perf_counter() - t)
    n = args.rows * args.seq
    return {
        "path": args.path, "dtype": args.dtype, "N": n, "V": cfg.vocab_size, "layers": args.layers,
        "peak_mib": round(peak, 1), "logits_NxV_mib": round(n * cfg.vocab_size * 4 / 2**20, 1),
        "median_s": round(statistics.median(times), 3), "logps_sum": value,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.path:
        print(json.dumps(child(args)))
        return
    for path in PATHS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--path", path]
        out = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
