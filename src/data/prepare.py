"""Turn public dataset formats into the DataModule's JSONL rows, offline (nothing is downloaded).

    python -m src.data.prepare hh    --from /data/hh-rlhf --split train --out data/hh/train.jsonl [--as sft]
    python -m src.data.prepare imdb  --from /data/imdb --split train --out data/imdb/prompts.jsonl [--as preference]
    python -m src.data.prepare gsm8k --from /data/gsm8k --split train --out data/gsm8k/train.jsonl [--format messages]
    python -m src.data.prepare tldr  --from /data/summarize_from_feedback/comparisons --out data/tldr/rm.jsonl

``--from`` is a file (``.jsonl``, ``.json``, ``.parquet``, optionally ``.gz``) or a directory: a
``datasets.save_to_disk`` directory, or a folder of such files (searched recursively, e.g. a ``git clone`` of the
hub repository). ``--split NAME`` keeps the files whose name contains NAME (``train.jsonl.gz``,
``train-00000-of-00001.parquet``), the split of a ``save_to_disk`` dataset dict, or rows whose ``split`` field is
NAME (OpenAI's comparisons). Output rows, one JSON object per line, are one of the DataModule's kinds:

* ``hh``: Anthropic HH transcripts (``chosen``/``rejected`` = "\\n\\nHuman: ...\\n\\nAssistant: ...") are split at the
  last "\\n\\nAssistant:" of their common part: ``prompt`` ends with it, ``chosen``/``rejected`` are the rest (plain
  text keeps the leading space). ``--format messages`` gives conversational rows instead. ``--as sft`` keeps
  prompt + chosen (the "Preferred-FT" SFT stage), ``--as prompt`` only the prompts.
* ``imdb``: reviews (``text``, ``label``) become prompts of their first 2-8 words (``--min-words``/``--max-words``)
  with the ``label`` column, for sentiment generation. ``--as sft`` adds the review's continuation as the completion
  (the SFT stage). ``--as preference`` is an offline stand-in for the DPO paper's classifier-ranked samples: the
  prefix of a positive review, its continuation as ``chosen``, and the continuation of a negative review (from the
  same word offset) as ``rejected``.
* ``gsm8k``: ``question`` + ``answer`` ("... #### 42") become a ``prompt`` (question + ``--instruction``) and an
  ``answer`` column with the final number, which ``src.rewards.accuracy`` reads; the worked ``solution`` is kept.
  ``--as sft`` makes the solution (calculator annotations ``<<...>>`` removed) the completion.
* ``tldr``: OpenAI's summarize-from-feedback comparisons (``info``, ``summaries``, ``choice``) become preference rows
  with the query "SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:"; posts with a reference ``summary``
  (the filtered TL;DR SFT set) and ``trl-lib/tldr``'s ``prompt``/``completion`` rows become SFT rows; ``--as prompt``
  keeps only the (deduplicated) queries, for PPO/RLOO.

Rows that cannot be converted (empty responses, identical pairs, non-Reddit posts...) are skipped and counted.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

Row = dict[str, Any]
SUFFIXES = (".jsonl", ".json", ".parquet")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
DEEPSEEKMATH_COT = "Please reason step by step, and put your final answer within \\boxed{}."


# ----------------------------------------------------------------------------------------------------------- reading
def _read_file(path: Path) -> list[Row]:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if name.endswith(".json"):
        try:  # a JSON list (or {"train": [...]}); OpenAI's comparison files are JSON lines named .json
            data = json.loads(text)
            if isinstance(data, dict) and "data" in data and isinstance(data["data"], list):
                return data["data"]
            return data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            pass
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _data_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        if p.name.removesuffix(".gz").endswith(SUFFIXES) and p.name not in ("dataset_info.json", "state.json")
    )


def read_source(source: str | Path, split: str | None = None) -> list[Row]:
    """Rows of a file or directory (see the module docstring), filtered to ``split`` when given."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"--from {str(path)!r} does not exist")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            name = split or "train"
            if name not in ds:
                raise ValueError(f"{path}: no split {name!r}; the dataset has {list(ds)}")
            return ds[name].to_list()
        return ds.to_list()
    files = [path] if path.is_file() else _data_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no .jsonl/.json/.parquet files (optionally .gz) found")
    if split is not None and path.is_dir():
        named = [f for f in files if split in f.name]
        files = named or files
    rows = [r for f in files for r in _read_file(f)]
    if split is not None and rows and all(isinstance(r, dict) and "split" in r for r in rows[:100]):
        rows = [r for r in rows if r.get("split") == split]
    return rows


def write_jsonl(rows: Iterable[Row], out: str | Path) -> int:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------------------------------------ Anthropic HH
def parse_transcript(text: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"role": "user", "content": "a"}, {"role": "assistant", ...}]``."""
    parts = re.split(r"\n\n(Human|Assistant):", text if text.startswith("\n\n") else "\n\n" + text)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """``(prompt, chosen_response, rejected_response)``: the prompt is the shared transcript up to and including its
    last "\\n\\nAssistant:"; None if the two transcripts share no assistant turn."""
    idx = chosen.rfind(ASSISTANT)
    prompt = chosen[: idx + len(ASSISTANT)] if idx >= 0 else ""
    if idx < 0 or not rejected.startswith(prompt):
        common = os.path.commonprefix([chosen, rejected])
        idx = common.rfind(ASSISTANT)
        if idx < 0:
            return None
        prompt = common[: idx + len(ASSISTANT)]
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def convert_hh(rows: Iterable[Row], skipped: Counter, *, as_: str = "preference", fmt: str = "plain") -> Iterator[Row]:
    for row in rows:
        parts = split_hh(str(row.get("chosen", "")), str(row.get("rejected", "")))
        if parts is None:
            skipped["no shared assistant turn"] += 1
            continue
        prompt, chosen, rejected = parts
        if not chosen.strip() or (as_ == "preference" and not rejected.strip()):
            skipped["empty response"] += 1
            continue
        if as_ == "preference" and chosen.strip() == rejected.strip():
            skipped["identical chosen and rejected"] += 1
            continue
        if fmt == "messages":
            p: Any = parse_transcript(prompt[: -len(ASSISTANT)])
            c: Any = parse_transcript(ASSISTANT + chosen)
            r: Any = parse_transcript(ASSISTANT + rejected)
        else:
            p, c, r = prompt, chosen, rejected
        if as_ == "sft":
            yield {"prompt": p, "completion": c}
        elif as_ == "prompt":
            yield {"prompt": p}
        else:
            yield {"prompt": p, "chosen": c, "rejected": r}


# ------------------------------------------------------------------------------------------------------------- IMDb
def clean_review(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<br\s*/?>", " ", text)).strip()


def convert_imdb(
    rows: Iterable[Row],
    skipped: Counter,
    *,
    as_: str = "prompt",
    min_words: int = 2,
    max_words: int = 8,
    completion_words: int = 48,
    seed: int = 0,
) -> Iterator[Row]:
    rng = random.Random(seed)
    reviews = []
    for row in rows:
        words = clean_review(str(row.get("text", ""))).split()
        if len(words) < max_words + 2 or row.get("label") not in (0, 1):
            skipped["too short or unlabelled"] += 1
            continue
        reviews.append((words, int(row["label"]), rng.randint(min_words, max_words)))
    if as_ != "preference":
        for words, label, k in reviews:
            out: Row = {"prompt": " ".join(words[:k])}
            if as_ == "sft":
                out["completion"] = " " + " ".join(words[k : k + completion_words])
            yield {**out, "label": label}
        return
    positives = [r for r in reviews if r[1] == 1]
    negatives = [r for r in reviews if r[1] == 0]
    skipped["unpaired reviews"] += abs(len(positives) - len(negatives))
    for (pos, _, k), (neg, _, _) in zip(positives, negatives):
        chosen, rejected = pos[k : k + completion_words], neg[k : k + completion_words]
        yield {"prompt": " ".join(pos[:k]), "chosen": " " + " ".join(chosen), "rejected": " " + " ".join(rejected)}


# ------------------------------------------------------------------------------------------------------------ GSM8K
def gsm8k_final_answer(solution: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution, without thousands separators."""
    if "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
    return answer or None


def convert_gsm8k(
    rows: Iterable[Row], skipped: Counter, *, as_: str = "prompt", fmt: str = "plain", instruction: str = ""
) -> Iterator[Row]:
    for row in rows:
        question, solution = str(row.get("question", "")).strip(), str(row.get("answer", ""))
        answer = gsm8k_final_answer(solution)
        if not question or answer is None:
            skipped["no question or no '####' answer"] += 1
            continue
        text = f"{question}\n{instruction}" if instruction else question
        prompt: Any = [{"role": "user", "content": text}] if fmt == "messages" else text
        worked = re.sub(r"<<[^>]*>>", "", solution).strip()
        if as_ == "sft":
            completion = [{"role": "assistant", "content": worked}] if fmt == "messages" else " " + worked
            yield {"prompt": prompt, "completion": completion, "answer": answer}
        else:
            yield {"prompt": prompt, "answer": answer, "solution": worked}


# ------------------------------------------------------------------------------------------------------------ TL;DR
def tldr_query(subreddit: str | None, title: str | None, post: str) -> str:
    """The query format of Stiennon et al. (2020) and Huang et al. (2024)."""
    return f"SUBREDDIT: r/{subreddit or ''}\n\nTITLE: {(title or '').strip()}\n\nPOST: {post.strip()}\n\nTL;DR:"


def _summary(text: Any) -> str:
    return " " + str(text).strip()


def convert_tldr(rows: Iterable[Row], skipped: Counter, *, as_: str | None = None) -> Iterator[Row]:
    seen: set[str] = set()
    for row in rows:
        if "info" in row and "summaries" in row:  # OpenAI comparisons
            info, summaries, choice = row["info"] or {}, row["summaries"], row.get("choice")
            if not info.get("post"):
                skipped["not a Reddit post (e.g. CNN/DM)"] += 1
                continue
            if choice not in (0, 1) or len(summaries) != 2:
                skipped["no valid choice between two summaries"] += 1
                continue
            query = tldr_query(info.get("subreddit"), info.get("title"), info["post"])
            chosen, rejected = _summary(summaries[choice]["text"]), _summary(summaries[1 - choice]["text"])
            kind = as_ or "preference"
            if kind == "preference":
                if chosen == rejected or not chosen.strip() or not rejected.strip():
                    skipped["identical or empty summaries"] += 1
                    continue
                yield {"prompt": query, "chosen": chosen, "rejected": rejected}
                continue
            completion = chosen
        elif "prompt" in row and "chosen" in row and "rejected" in row:  # already preference rows
            query, completion = row["prompt"], row["chosen"]
            if (as_ or "preference") == "preference":
                yield {"prompt": query, "chosen": row["chosen"], "rejected": row["rejected"]}
                continue
        elif "prompt" in row and "completion" in row:  # trl-lib/tldr
            query, completion = row["prompt"], row["completion"]
        elif "post" in row and "summary" in row:  # the filtered TL;DR SFT set
            query = tldr_query(row.get("subreddit"), row.get("title"), row["post"])
            completion = _summary(row["summary"])
        else:
            skipped["unknown row format"] += 1
            continue
        kind = as_ or "sft"
        if kind == "preference":
            raise ValueError("--as preference needs comparison rows (info/summaries/choice or prompt/chosen/rejected)")
        if kind == "prompt":
            if query in seen:
                skipped["duplicate prompt"] += 1
                continue
            seen.add(query)
            yield {"prompt": query, "reference": completion}
        elif not str(completion).strip():
            skipped["empty summary"] += 1
        else:
            yield {"prompt": query, "completion": completion}


# -------------------------------------------------------------------------------------------------------------- CLI
CONVERTERS: dict[str, Callable[..., Iterator[Row]]] = {
    "hh": convert_hh,
    "imdb": convert_imdb,
    "gsm8k": convert_gsm8k,
    "tldr": convert_tldr,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.data.prepare",
        description="Convert a public dataset (local files) into the DataModule's JSONL rows.",
        epilog="See the module docstring (src/data/prepare.py) for each format.",
    )
    sub = parser.add_subparsers(dest="dataset", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--from", dest="source", required=True, help="file or directory with the public format")
        p.add_argument("--out", required=True, help="output .jsonl")
        p.add_argument("--split", default=None, help="train / test / validation / valid1 ... (see docstring)")
        p.add_argument("--limit", type=int, default=None, help="keep at most this many output rows")

    p = sub.add_parser("hh", help="Anthropic HH-RLHF transcripts -> preference / sft / prompt rows")
    common(p)
    p.add_argument("--as", dest="as_", choices=["preference", "sft", "prompt"], default="preference")
    p.add_argument("--format", dest="fmt", choices=["plain", "messages"], default="plain")
    p = sub.add_parser(
        "imdb",
        help="IMDb reviews -> prompt (default) / sft / preference rows",
        description="Prompts are the first --min-words..--max-words words of each review (with its label). "
        "--as sft adds the next --completion-words words as the completion. --as preference is an offline "
        "stand-in for the DPO paper's classifier-ranked samples: a positive review's prefix, its continuation "
        "as chosen, and a negative review's continuation from the same word offset as rejected.",
    )
    common(p)
    p.add_argument("--as", dest="as_", choices=["prompt", "sft", "preference"], default="prompt")
    p.add_argument("--min-words", type=int, default=2)
    p.add_argument("--max-words", type=int, default=8)
    p.add_argument("--completion-words", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("gsm8k", help="GSM8K question/answer -> prompt rows with an answer column (or sft)")
    common(p)
    p.add_argument("--as", dest="as_", choices=["prompt", "sft"], default="prompt")
    p.add_argument("--format", dest="fmt", choices=["plain", "messages"], default="plain")
    p.add_argument("--instruction", default=DEEPSEEKMATH_COT, help="appended to each question ('' for none)")
    p = sub.add_parser("tldr", help="TL;DR (OpenAI comparisons, filtered SFT set, trl-lib/tldr) -> rows")
    common(p)
    p.add_argument(
        "--as",
        dest="as_",
        choices=["preference", "sft", "prompt"],
        default=None,
        help="default: preference for comparisons, sft for post/summary rows",
    )
    return parser


def prepare(
    dataset: str,
    source: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    limit: int | None = None,
    **options: Any,
) -> tuple[int, Counter]:
    """Convert ``source`` to ``out``; returns ``(rows written, skipped counts by reason)``."""
    skipped: Counter = Counter()
    rows = CONVERTERS[dataset](read_source(source, split), skipped, **options)
    if limit is not None:
        rows = itertools.islice(rows, limit)
    return write_jsonl(rows, out), skipped


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    dataset, source, out = args.pop("dataset"), args.pop("source"), args.pop("out")
    n, skipped = prepare(dataset, source, out, **args)
    detail = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) or "none"
    print(f"{dataset}: wrote {n} rows to {out} (skipped: {detail})")
    if n == 0:
        print("error: no rows written; check --from / --split", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
