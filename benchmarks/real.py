"""The real-model benchmark workload: SmolLM2-135M-Instruct on chat rows of English text, 128 / 256 / 512 tokens.

    python benchmarks/real.py build [--out benchmarks/real_artifacts] [--model DIR]   # model + data, offline
    python benchmarks/run.py real_dpo --length 256                                    # ours, one JSON line
    python benchmarks/trl_real.py dpo --length 256                                    # TRL 1.16, same keys
    python benchmarks/compare.py real_dpo --length 128 256 512 --repeats 2            # side by side

This module is the single source of truth of the workload: :data:`LENGTHS`, :data:`DPO_SPEC` / :data:`GRPO_SPEC`
(both runners read them; ``configs/bench/real_{dpo,grpo}.yaml`` repeat them for our CLI and a test keeps them
equal), the data builder and the GRPO reward. It imports neither torch nor the project at module level, so TRL's
runner can read the spec without paying for them.

Rows, per sequence length ``L``: a rendered chat prompt (SmolLM2's ChatML template with its default system
message, the user message ``"Continue the following passage ...\\n\\n<passage>"`` and the generation prompt) of
exactly ``L/2`` tokens; DPO completions (``chosen``: the passage's continuation in its source document, ``rejected``:
text from another document) of exactly ``L/2`` tokens with the EOS, as assistant messages. So every DPO sequence is
``L`` tokens; GRPO samples up to ``max_new_tokens = L/2`` after an ``L/2``-token prompt. The text is sentences from the
docstrings of Python's standard library (:data:`SOURCES`), deterministic for a Python version and :data:`SEED`; the
manifest records a hash of the corpus.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import inspect
import json
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARTIFACTS = ROOT / "benchmarks" / "real_artifacts"  # git-ignored
SEED = 2024
LENGTHS = (128, 256, 512)  # prompt + completion tokens; prompt = completion = L / 2
N_ROWS = 16  # rows per file: DPO needs batch_size x max_steps = 8, GRPO 2 x 3 = 6
INSTRUCTION = "Continue the following passage from the Python documentation.\n\n"

COMMON_SPEC: dict[str, Any] = dict(
    precision="fp32",
    optimizer="AdamW",
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    weight_decay=0.0,
    lr_scheduler="constant",
    max_grad_norm=1.0,
    gradient_accumulation_steps=1,
    gradient_checkpointing=False,
    train_seed=42,
    data_order="sequential",  # step i uses rows [i*B, (i+1)*B) of the file
)
DPO_SPEC: dict[str, Any] = dict(
    COMMON_SPEC,
    loss_type="sigmoid",
    beta=0.1,
    learning_rate=1e-5,
    per_device_train_batch_size=2,  # pairs per step: 4 sequences of L tokens
    max_steps=4,  # the first step is left out of the step-time median
    # max_length = L (never cut: every sequence is exactly L tokens)
    reference_model="frozen copy of the initial policy, forward every step",
)
GRPO_SPEC: dict[str, Any] = dict(
    COMMON_SPEC,
    learning_rate=1e-6,
    prompts_per_step=2,
    num_generations=4,  # 8 completions per step
    per_device_train_batch_size=8,  # TRL counts completions
    max_steps=3,
    # max_new_tokens = L / 2 (completions stop earlier at EOS)
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    beta=0.04,
    epsilon=0.2,
    num_iterations=1,
    loss_type="dapo",
    scale_rewards="group",
    reward="benchmarks.real.overlap_reward",
)

# Pure-Python standard-library modules (present in every CPython build) whose docstrings give the text.
SOURCES = (
    "argparse", "ast", "base64", "bdb", "calendar", "cmd", "codecs", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest",
    "email", "enum", "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "hmac", "http.client", "http.cookies",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "logging.handlers", "mailbox", "netrc", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "platform",
    "poplib", "pprint", "pydoc", "queue", "random", "re", "sched", "shlex", "shutil", "signal", "site", "smtplib",
    "socket", "socketserver", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "webbrowser", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile",
)  # fmt: skip
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def lengths(length: int) -> tuple[int, int]:
    """(prompt tokens, completion tokens incl. EOS) of a row of sequence length ``length``."""
    if length not in LENGTHS:
        raise SystemExit(f"--length must be one of {LENGTHS}, got {length}")
    return length // 2, length - length // 2


# ------------------------------------------------------------------------------------------------------------ text
def _prose(paragraph: str) -> list[str]:
    """The sentences of one docstring paragraph that read as English prose (no code, no markup, 40-300 chars)."""
    if any(s in paragraph for s in (">>>", "::", "    ", "`", "|")):
        return []
    out = []
    for s in _SENTENCE_END.split(" ".join(paragraph.split())):
        plain = sum(c.isalpha() or c in " ,.;:'-()" for c in s)
        if 40 <= len(s) <= 300 and s[0].isupper() and s[-1] in ".!?" and plain >= 0.95 * len(s):
            out.append(s)
    return out


@functools.lru_cache(maxsize=1)
def documents() -> list[list[str]]:
    """One list of sentences per source module (module, class, function and method docstrings, in name order),
    each sentence once over all modules; modules with fewer than 8 sentences are left out."""
    seen: set[str] = set()
    docs = []
    for name in SOURCES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a stripped-down Python: fewer documents, the manifest's hash says so
            continue
        objs: list[Any] = [mod]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj):
                objs.append(obj)
                objs += [m for k, m in sorted(vars(obj).items()) if not k.startswith("_") and inspect.isfunction(m)]
            elif inspect.isfunction(obj):
                objs.append(obj)
        sentences = []
        for obj in objs:
            for para in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):
                for s in _prose(para):
                    if s not in seen:
                        seen.add(s)
                        sentences.append(s)
        if len(sentences) >= 8:
            docs.append(sentences)
    return docs


def _exact(tok: Any, sentences: Iterator[str], n: int, prefix: str = "") -> str:
    """``prefix`` + the next sentences of the stream, cut to exactly ``n`` tokens (``tok(text,
    add_special_tokens=False)``) at a token boundary whose text round-trips; whole sentences are skipped until one
    does."""
    for _ in range(50):
        text, ids = prefix, []
        while len(ids) <= n:
            text = (text + " " if text and not text[-1].isspace() else text) + next(sentences)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        cut = tok.decode(ids[:n]).rstrip()
        if cut.startswith(prefix) and tok(cut, add_special_tokens=False)["input_ids"] == ids[:n]:
            return cut
        next(sentences)  # start one sentence later
    raise RuntimeError(f"no {n}-token cut of the corpus round-trips through the tokenizer")


def _cycle(sentences: Sequence[str], start: int) -> Iterator[str]:
    i = start
    while True:
        yield sentences[i % len(sentences)]
        i += 1


def _prompt_overhead(tok: Any) -> int:
    """Tokens the chat template adds around the user message (system message, role tags, generation prompt)."""
    probe = "Hello"
    full = tok.apply_chat_template([{"role": "user", "content": probe}], tokenize=False, add_generation_prompt=True)
    n_probe = len(tok(probe, add_special_tokens=False)["input_ids"])
    return len(tok(full, add_special_tokens=False)["input_ids"]) - n_probe


def _completion_lead(tok: Any) -> str:
    """Text the chat template puts between the generation prompt and an assistant message's content (ChatML: none;
    a ``"assistant: "`` template: one space): it belongs to the completion's tokens."""
    probe, user = "Hello", [{"role": "user", "content": "Hi"}]
    head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": probe}], tokenize=False)
    tail = full[len(head) :] if full.startswith(head) else ""
    return tail[: tail.index(probe)] if probe in tail else ""


def prompt_tokens(tok: Any, messages: list[dict[str, str]]) -> int:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def make_rows(tok: Any, length: int, kind: str, n_rows: int = N_ROWS, seed: int = SEED) -> list[dict[str, Any]]:
    """``n_rows`` chat rows of sequence length ``length``: ``{"prompt": [user msg]}`` (``kind="prompt"``) plus
    ``chosen`` / ``rejected`` assistant messages (``kind="preference"``), token lengths as the module doc says."""
    n_prompt, n_completion = lengths(length)
    docs = documents()
    rng = random.Random(f"{seed}/{kind}/{length}")
    overhead, lead = _prompt_overhead(tok), _completion_lead(tok)
    rows: list[dict[str, Any]] = []
    while len(rows) < n_rows:
        d = rng.randrange(len(docs))
        stream = _cycle(docs[d], rng.randrange(len(docs[d])))
        user = _exact(tok, stream, n_prompt - overhead, prefix=INSTRUCTION)
        prompt = [{"role": "user", "content": user}]
        if prompt_tokens(tok, prompt) != n_prompt:  # a merge across the template's boundary: draw again
            continue
        row: dict[str, Any] = {"prompt": prompt}
        if kind == "preference":
            other = rng.choice([i for i in range(len(docs)) if i != d])
            rejected = _cycle(docs[other], rng.randrange(len(docs[other])))
            for field, sentences in (("chosen", stream), ("rejected", rejected)):
                content = _exact(tok, sentences, n_completion - 1, prefix=lead)[len(lead) :]  # + EOS = n_completion
                row[field] = [{"role": "assistant", "content": content}]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------- reward
def _text(x: Any) -> str:
    return x[-1]["content"] if isinstance(x, list) else x


_WORD = re.compile(r"[a-z]+")


def overlap_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """GRPO reward: fraction of the completion's words (lower-case letter runs) that occur in the prompt's last
    message (0.0 when it has none): stays on topic. Takes strings or message lists (ours renders the prompt to
    text, TRL passes messages); the rendered template adds only its system message's words."""
    out = []
    for prompt, completion in zip(prompts, completions):
        words = _WORD.findall(_text(completion).lower())
        vocab = set(_WORD.findall(_text(prompt).lower()))
        out.append(sum(w in vocab for w in words) / len(words) if words else 0.0)
    return out


# ---------------------------------------------------------------------------------------------------------- build
def paths(artifacts: str | Path, length: int | None = None) -> dict[str, Path]:
    root = Path(artifacts)
    out = {"root": root, "model": root / "model", "manifest": root / "manifest.json"}
    if length is not None:
        out["dpo"] = root / f"dpo_{length}.jsonl"
        out["grpo"] = root / f"grpo_{length}.jsonl"
    return out


def check_built(artifacts: str | Path, length: int, kind: str) -> dict[str, Path]:
    """The workload's paths; exits with the build command when the model or the data file is missing."""
    p = paths(Path(artifacts).resolve(), length)
    for need in (p["model"], p[kind]):
        if not need.exists():
            raise SystemExit(
                f"{need} not found; build the real workload first: python benchmarks/real.py build --out {p['root']}"
            )
    return p


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=True, sort_keys=True) + "\n")


def build(out: str | Path = DEFAULT_ARTIFACTS, model: str | Path | None = None, log: Callable = print) -> dict:
    """Write ``out/model`` (``scripts/build_smollm2.py``; kept when already there; with ``model``, a link to that
    built directory) and ``out/{dpo,grpo}_{L}.jsonl``; returns the manifest."""
    from transformers import AutoTokenizer

    p = paths(out)
    p["root"].mkdir(parents=True, exist_ok=True)
    if model is not None:
        if p["model"].is_symlink():
            p["model"].unlink()
        if not p["model"].exists():
            p["model"].symlink_to(Path(model).resolve(), target_is_directory=True)
    elif not (p["model"] / "config.json").exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        try:
            from build_smollm2 import build as build_model
        finally:
            sys.path.pop(0)
        t0 = time.perf_counter()
        build_model(p["model"])
        log(f"built {p['model']} in {time.perf_counter() - t0:.0f} s")
    tok = AutoTokenizer.from_pretrained(p["model"])
    corpus = "\n".join("\n".join(d) for d in documents())
    manifest: dict[str, Any] = dict(
        seed=SEED,
        python=sys.version.split()[0],
        corpus_sha256=hashlib.sha256(corpus.encode()).hexdigest(),
        corpus_sentences=corpus.count("\n") + 1,
        files={},
    )
    for length in LENGTHS:
        for kind, name in (("preference", "dpo"), ("prompt", "grpo")):
            rows = make_rows(tok, length, kind)
            path = paths(out, length)[name]
            write_jsonl(path, rows)
            manifest["files"][path.name] = dict(rows=len(rows), prompt_tokens=lengths(length)[0])
            log(f"wrote {path} ({len(rows)} rows)")
    manifest["dpo_spec"], manifest["grpo_spec"] = DPO_SPEC, GRPO_SPEC
    p["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the model directory and the data files (offline)")
    b.add_argument("--out", default=str(DEFAULT_ARTIFACTS))
    b.add_argument("--model", default=None, help="an already built SmolLM2 directory to link instead of building")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        build(args.out, args.model)


if __name__ == "__main__":
    main()
