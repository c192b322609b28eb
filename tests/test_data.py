"""The DataModule: exact prompt/completion boundaries, sources, truncation, padding and bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

from src.data import AlignmentDataModule, DataError, read_rows
from src.data.tiny import generate_rows


def make(tmp_path, rows, kind, name="data.jsonl", **kw):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = AlignmentDataModule(str(path), kind=kind, val_size=0, **kw)
    dm.setup()
    return dm


def test_plain_boundary_is_exact(tmp_path):
    rows = [{"prompt": "tamezi 12 pakula", "chosen": " tamezi 12", "rejected": " 45 67 bo"}]
    dm = make(tmp_path, rows, "preference")
    tok, r = dm.tokenizer, dm.train_set[0]
    assert r["prompt_ids"] == tok("tamezi 12 pakula")["input_ids"]  # BOS + prompt
    assert r["prompt_ids"][0] == tok.bos_token_id
    assert r["chosen_ids"] == tok(" tamezi 12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = dm.collator()([r])
    # completion mask covers exactly the response tokens + EOS, aligned with input_ids
    for row, ids in ((0, r["chosen_ids"]), (1, r["rejected_ids"])):
        m = batch["completion_mask"][row].bool()
        assert batch["input_ids"][row][m].tolist() == ids
        assert tok.decode(batch["input_ids"][row][m]) == rows[0]["chosen" if row == 0 else "rejected"] + "</s>"
    assert batch["input_ids"].shape[0] == 2 and batch["num_tokens"] == int(batch["attention_mask"].sum())


def test_conversational_boundary_is_exact(tmp_path):
    msgs = [{"role": "user", "content": "copy tamezi 12"}]
    rows = [{"messages": msgs + [{"role": "assistant", "content": "tamezi 12"}]}]
    dm = make(tmp_path, rows, "sft")
    tok, r = dm.tokenizer, dm.train_set[0]
    head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.decode(r["prompt_ids"]) == head
    assert r["completion_ids"][-1] == tok.eos_token_id
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "tamezi 12"}], tokenize=False)
    assert tok.decode(r["prompt_ids"] + r["completion_ids"]).rstrip() == full.rstrip()
    assert "tamezi 12" in tok.decode(r["completion_ids"]) and "user" not in tok.decode(r["completion_ids"])


def test_conversational_preference(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "ka 1"}],
            "rejected": [{"role": "assistant", "content": "99 98"}],
        }
    ]
    dm = make(tmp_path, rows, "preference")
    r = dm.train_set[0]
    assert dm.tokenizer.decode(r["chosen_ids"]).strip().endswith("ka 1</s>")


def test_prompt_rows_left_padded_with_columns(tmp_path):
    rows = [{"prompt": "ka", "answer": "1"}, {"prompt": "tamezi pakula 12 13", "answer": "2"}]
    dm = make(tmp_path, rows, "prompt")
    batch = dm.collator()([dm.train_set[0], dm.train_set[1]])
    assert batch["prompt_mask"][0, 0] == 0 and batch["prompt_mask"][0, -1] == 1  # left padding
    assert batch["prompt_mask"][1].all()
    assert batch["columns"] == {"answer": ["1", "2"]} and batch["prompts"] == ["ka", "tamezi pakula 12 13"]


@pytest.mark.parametrize("fmt", ["json", "parquet", "disk"])
def test_sources(tmp_path, fmt):
    rows = list(generate_rows("preference", 20))
    if fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        path = tmp_path / "d"
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(rows[:15]), "test": datasets.Dataset.from_list(rows[15:])}
        ).save_to_disk(str(path))
    dm = AlignmentDataModule(str(path), kind="preference", val_size=0)
    dm.setup()
    assert len(dm.train_set) == (15 if fmt == "disk" else 20)
    assert (dm.val_set is not None) == (fmt == "disk")
    assert read_rows(path)[0][0] == rows[0]


def test_val_split_keeps_file_order():
    dm = AlignmentDataModule(kind="sft", val_size=0.25, tiny_rows=40, shuffle=False)
    dm.setup()
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10
    all_prompts = [r["prompt"] for r in generate_rows("sft", 40)]
    tok = dm.tokenizer
    train_prompts = [tok.decode(r["prompt_ids"], skip_special_tokens=True) for r in dm.train_set]
    assert train_prompts == [p for p in all_prompts if p in train_prompts]


def test_truncation_policies_count_cuts(tmp_path):
    rows = [{"prompt": "ka " * 30, "completion": " bo" * 30}, {"prompt": "ka", "completion": " bo"}]
    dm = make(tmp_path, rows, "sft", max_prompt_length=8, max_completion_length=5, truncation="keep_end")
    r = dm.train_set[0]
    assert len(r["prompt_ids"]) == 8 and len(r["completion_ids"]) == 5
    assert dm.truncated == {"prompt": 1, "completion": 1}
    dm2 = make(tmp_path, rows, "sft", max_prompt_length=8, truncation="keep_start")
    assert dm2.train_set[0]["prompt_ids"][0] == dm2.tokenizer.bos_token_id
    assert dm.train_set[0]["prompt_ids"][0] != dm.tokenizer.bos_token_id  # keep_end dropped the start


def test_max_length_limits_total(tmp_path):
    rows = [{"prompt": "ka ka", "completion": " bo" * 30}]
    dm = make(tmp_path, rows, "sft", max_length=12)
    r = dm.train_set[0]
    assert len(r["prompt_ids"]) + len(r["completion_ids"]) == 12


BAD = [
    ({"prompt": "a", "chosen": "b"}, "preference", "row 2: field 'rejected': missing"),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, "preference", "row 2: field 'chosen': empty string"),
    ({"prompt": "a", "chosen": 5, "rejected": "c"}, "preference", "row 2: field 'chosen': expected a string"),
    ({"prompt": None}, "prompt", "row 2: field 'prompt': missing"),
    ({"prompt": ""}, "prompt", "row 2: field 'prompt': empty string"),
    ({"prompt": ["x"]}, "prompt", "row 2: field 'prompt': messages must be"),
    ({"messages": [{"role": "user", "content": "a"}]}, "sft", "row 2: field 'messages': the last message"),
]


@pytest.mark.parametrize("row,kind,message", BAD)
def test_bad_rows_name_file_row_field(tmp_path, row, kind, message):
    good = {"prompt": "a", "chosen": "b", "rejected": "c", "completion": "d"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        AlignmentDataModule(str(path), kind=kind, val_size=0).setup()
    assert str(path) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_broken_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: row 2: broken JSON line"):
        AlignmentDataModule(str(path), kind="prompt", val_size=0).setup()


def test_prompt_too_long_under_error_policy(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "ka " * 50, "completion": " bo"}) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl: row 1: field 'prompt': \d+ tokens exceeds max_prompt_length=8"):
        AlignmentDataModule(str(path), kind="sft", val_size=0, max_prompt_length=8, truncation="error").setup()


def test_missing_path_and_zero_rows(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AlignmentDataModule(str(tmp_path / "nope.jsonl"), kind="sft").setup()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        AlignmentDataModule(str(empty), kind="sft", val_size=0).setup()


def test_right_padding_for_training():
    dm = AlignmentDataModule(kind="sft", tiny_rows=16, val_size=0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(-1)
    for i, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
    assert not (batch["completion_mask"].bool() & ~batch["attention_mask"].bool()).any()
    assert torch.equal(batch["completion_mask"][:, 0], torch.zeros_like(batch["completion_mask"][:, 0]))


def test_identical_chosen_and_rejected(tmp_path):
    rows = [{"prompt": "a b", "chosen": " c", "rejected": " d"}, {"prompt": "a b", "chosen": " c", "rejected": " c"}]
    with pytest.raises(DataError, match=r"same\.jsonl: row 2: fields 'chosen' and 'rejected' are identical"):
        make(tmp_path, rows, "preference", name="same.jsonl")
    dm = make(tmp_path, rows, "preference", name="same.jsonl", identical_pairs="keep")
    assert len(dm.train_set) == 2 and dm.identical_pairs == 1


# A 100k-row file with a handful of bad rows (file row -> line) and one huge row, which truncation handles.
BAD_AT_SCALE = {
    10: b'{"prompt": "ka bo"',  # broken JSON
    20: b'{"prompt": 5}',  # a number
    30: b'{"prompt": ["ka", "bo"]}',  # a list that is not messages
    40: b'{"prompt": "  "}',  # empty
    50: b'{"prompt": "ka \xff\xfe bo"}',  # not UTF-8
    60: b'{"prompt": [{"role": "robot", "content": "ka bo"}]}',  # unknown chat role
    70_000: b"[1, 2]",  # not an object
}
SCALE_ROWS, HUGE_AT = 100_000, 80_000


def scale_file(tmp_path):
    lines = [b'{"prompt": "tamezi %d pakula"}' % n for n in range(1, SCALE_ROWS + 1)]
    for n, line in BAD_AT_SCALE.items():
        lines[n - 1] = line
    lines[HUGE_AT - 1] = json.dumps({"prompt": "ka bo " * 170_000}).encode()  # ~1 MB
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_rows_at_scale_one_error_names_the_first_and_counts_all(tmp_path):
    import time

    path = scale_file(tmp_path)
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        AlignmentDataModule(str(path), kind="prompt", val_size=0, max_prompt_length=16).setup()
    elapsed = time.perf_counter() - start
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 2000
    assert msg.startswith(f"{len(BAD_AT_SCALE)} bad rows (the first 5: ") and "skip_bad_rows=true" in msg
    for n, what in [
        (10, "broken JSON line"),
        (20, "field 'prompt': expected a string or a list of messages, got int (5)"),
        (30, "field 'prompt': messages must be"),
        (40, "field 'prompt': empty string"),
        (50, "not valid UTF-8 (byte 0xff"),
    ]:
        assert f"{path}: row {n}: {what}" in msg, what
    assert "row 60" not in msg  # listed: the first five only
    assert elapsed < 15, elapsed  # validation only after the first bad row: ~2 s on 2 busy cores


def test_skip_bad_rows_skips_counts_and_logs(tmp_path, caplog):
    path = scale_file(tmp_path)
    dm = AlignmentDataModule(str(path), kind="prompt", val_size=0, max_prompt_length=16, skip_bad_rows=True)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert len(dm.train_set) == SCALE_ROWS - len(BAD_AT_SCALE) and dm.bad_rows == len(BAD_AT_SCALE)
    assert dm.truncated["prompt"] == 1  # the huge row is not bad: keep_end cuts it, counted
    assert len(dm.train_set[HUGE_AT - 1 - len(BAD_AT_SCALE)]["prompt_ids"]) == 16  # the bad rows before it skipped
    warning = next(r.getMessage() for r in caplog.records if "bad rows" in r.getMessage())
    assert warning.startswith(f"skipped {len(BAD_AT_SCALE)} bad rows (skip_bad_rows=true); the first 5: ")
    assert f"{path}: row 10: broken JSON line" in warning


def test_unknown_chat_role_and_a_failing_template_name_the_row(tmp_path):
    rows = [{"prompt": [{"role": "robot", "content": "a"}], "completion": "b"}]
    with pytest.raises(DataError, match=r"row 1: field 'prompt': message role 'robot' is not one of"):
        make(tmp_path, rows, "sft")
    dm = AlignmentDataModule(kind="sft", tiny_rows=4, val_size=0)
    dm.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "a"}], "completion": "b"}) + "\n")
    dm.hparams.path = str(path)
    with pytest.raises(DataError, match=r"chat\.jsonl: row 1: field 'prompt': the chat template fails \(.*alternate"):
        dm.setup()
