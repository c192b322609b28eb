"""``python -m src.data.prepare``: each public format (small hand-written samples in tests/fixtures/prepare/) becomes
a JSONL file that loads in ``AlignmentDataModule`` as the right row kind, with the right prompt/response boundary."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from src.data import AlignmentDataModule
from src.data.prepare import clean_review, main, parse_transcript, read_source, split_hh

FIXTURES = Path(__file__).parent / "fixtures" / "prepare"


def prepare(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / f"{args[0]}_{len(list(tmp_path.iterdir()))}.jsonl"
    assert main([args[0], "--out", str(out), *args[1:]]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rows_in_dm = load(out, kind_of(rows[0]))
    assert rows_in_dm == len(rows)
    return rows


def kind_of(row: dict) -> str:
    return "preference" if "chosen" in row else "sft" if "completion" in row else "prompt"


def load(path: Path, kind: str) -> int:
    """Tokenize every row with the tiny tokenizer through the DataModule (raises on a malformed row)."""
    dm = AlignmentDataModule(str(path), kind=kind, val_size=0, max_prompt_length=None, max_completion_length=None)
    dm.setup("fit")
    return len(dm.train_set)


def test_hh_preference_boundaries(tmp_path, capsys):
    rows = prepare(tmp_path, "hh", "--from", str(FIXTURES / "hh"), "--split", "train")
    assert "1 identical chosen and rejected" in capsys.readouterr().out
    assert len(rows) == 3  # 2 helpful-base (one identical pair dropped) + 1 harmless-base; no test rows
    raw = [json.loads(line) for f in sorted(FIXTURES.glob("hh/*/train.jsonl")) for line in f.read_text().splitlines()]
    for row, src in zip(rows, raw):  # files in sorted order: harmless-base, then helpful-base
        assert row["prompt"].startswith("\n\nHuman:") and row["prompt"].endswith("\n\nAssistant:")
        assert row["prompt"] + row["chosen"] == src["chosen"] and row["prompt"] + row["rejected"] == src["rejected"]
        assert row["chosen"].startswith(" ") and "\n\nHuman:" not in row["chosen"]
    multi_turn = rows[2]["prompt"]
    assert multi_turn.count("\n\nAssistant:") == 2 and multi_turn.count("\n\nHuman:") == 2


def test_hh_messages_sft_and_gzip(tmp_path):
    folder = tmp_path / "src" / "harmless-base"
    folder.mkdir(parents=True)
    with gzip.open(folder / "test.jsonl.gz", "wb") as f:
        f.write((FIXTURES / "hh/harmless-base/test.jsonl").read_bytes())
    (tmp_path / "out").mkdir()
    rows = prepare(tmp_path / "out", "hh", "--from", str(tmp_path / "src"), "--format", "messages")
    assert [m["role"] for m in rows[0]["prompt"]] == ["user", "assistant", "user"]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": rows[0]["chosen"][0]["content"]}]
    assert rows[0]["chosen"][0]["content"].startswith('"The Martian"')
    sft = prepare(tmp_path / "out", "hh", "--from", str(FIXTURES / "hh"), "--split", "train", "--as", "sft")
    assert set(sft[0]) == {"prompt", "completion"} and len(sft) == 4  # identical pairs are fine for SFT


def test_split_hh_falls_back_to_the_common_prefix():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you"
    rejected = "\n\nHuman: hi\n\nAssistant: go away"
    prompt, c, r = split_hh(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant:" and c == " hello\n\nHuman: bye\n\nAssistant: see you"
    assert r == " go away"
    assert split_hh("no markers", "none here") is None
    assert parse_transcript(prompt[: -len("\n\nAssistant:")]) == [{"role": "user", "content": "hi"}]


def test_imdb_prompts_sft_and_pairs(tmp_path):
    src = str(FIXTURES / "imdb" / "train.jsonl")
    prompts = prepare(tmp_path, "imdb", "--from", src)
    assert len(prompts) == 4 and all(2 <= len(r["prompt"].split()) <= 8 for r in prompts)
    assert [r["label"] for r in prompts] == [1, 0, 1, 0] and "<br" not in json.dumps(prompts)
    sft = prepare(tmp_path, "imdb", "--from", src, "--as", "sft", "--completion-words", "20")
    assert all(len(r["completion"].split()) == 20 and r["completion"].startswith(" ") for r in sft)
    pairs = prepare(tmp_path, "imdb", "--from", src, "--as", "preference")
    assert len(pairs) == 2  # two positives paired with two negatives
    first_review = clean_review(json.loads((FIXTURES / "imdb/train.jsonl").read_text().splitlines()[0])["text"])
    assert first_review.startswith(pairs[0]["prompt"] + pairs[0]["chosen"])  # the positive review goes on
    assert pairs[0]["rejected"].startswith(" ") and pairs[0]["rejected"] not in first_review


def test_gsm8k_answer_column_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "gsm8k" / "main"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (FIXTURES / f"gsm8k/main/{split}.jsonl").read_text().splitlines()]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000-of-00001.parquet")
    (tmp_path / "out").mkdir()
    rows = prepare(tmp_path / "out", "gsm8k", "--from", str(tmp_path / "gsm8k"), "--split", "train")
    assert [r["answer"] for r in rows] == ["27", "1200", "16"]
    assert rows[0]["prompt"].endswith("within \\boxed{}.") and "<<" not in rows[0]["solution"]
    args = ["--split", "test", "--format", "messages", "--instruction", ""]
    chat = prepare(tmp_path / "out", "gsm8k", "--from", str(tmp_path / "gsm8k"), *args)
    assert len(chat) == 1 and chat[0]["answer"] == "51"
    assert chat[0]["prompt"] == [{"role": "user", "content": chat[0]["prompt"][0]["content"]}]
    assert chat[0]["prompt"][0]["content"].endswith("How many trees are left?")  # no instruction appended

    from src.rewards import accuracy

    assert accuracy(["q"] * 2, ["so \\boxed{1200}", "#### 1,201"], answer=["1200", "1200"]) == [1.0, 0.0]
    sft = prepare(tmp_path / "out", "gsm8k", "--from", str(FIXTURES / "gsm8k/main/train.jsonl"), "--as", "sft")
    assert sft[2]["completion"] == " He needs 240 / 15 = 16 days.\n#### 16"


def test_tldr_comparisons_sft_and_prompts(tmp_path, capsys):
    comparisons = str(FIXTURES / "tldr" / "comparisons")
    pref = prepare(tmp_path, "tldr", "--from", comparisons, "--split", "train")
    assert "1 not a Reddit post" in capsys.readouterr().out
    assert len(pref) == 1 and pref[0]["prompt"].startswith("SUBREDDIT: r/relationships\n\nTITLE: Roommate")
    assert pref[0]["prompt"].endswith("\n\nTL;DR:") and pref[0]["chosen"].startswith(" Roommate's boyfriend")
    assert pref[0]["rejected"] == " my roommate is annoying"
    valid = prepare(tmp_path, "tldr", "--from", comparisons, "--split", "valid1")
    assert valid[0]["chosen"].startswith(" Self-taught")  # choice 1

    trl = str(FIXTURES / "tldr" / "trl-lib-tldr" / "train.jsonl")
    sft = prepare(tmp_path, "tldr", "--from", trl)
    assert len(sft) == 2 and sft[0]["prompt"] == pref[0]["prompt"]  # the same query format from both sources
    prompts = prepare(tmp_path, "tldr", "--from", trl, "--as", "prompt", "--limit", "1")
    assert prompts == [{"prompt": sft[0]["prompt"], "reference": sft[0]["completion"]}]


def test_read_source_save_to_disk_and_errors(tmp_path):
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "gsm8k/main/train.jsonl").read_text().splitlines()]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert len(read_source(tmp_path / "dd", "train")) == 3
    with pytest.raises(ValueError, match="no split 'test'"):
        read_source(tmp_path / "dd", "test")
    with pytest.raises(FileNotFoundError):
        read_source(tmp_path / "missing")
    shutil.copy(FIXTURES / "imdb/train.jsonl", tmp_path / "imdb.jsonl")
    assert main(["gsm8k", "--from", str(tmp_path / "imdb.jsonl"), "--out", str(tmp_path / "x.jsonl")]) == 1
