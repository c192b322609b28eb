"""The one LightningDataModule for every algorithm: SFT, preference and prompt-only rows.

Row kinds (plain text, or conversational messages rendered with the tokenizer's chat template):

* ``sft``: ``prompt`` + ``completion``, or ``messages`` (the last message is the assistant's answer).
* ``preference``: ``prompt`` + ``chosen`` + ``rejected``.
* ``prompt``: ``prompt``; every other column is passed through to reward functions.
* ``unpaired``: ``prompt`` + ``completion`` + ``label`` (``true`` = desirable); a preference row becomes one desirable
  and one undesirable row (KTO, as TRL's ``unpair_preference_dataset``; ``unpair_rows`` says in which order).

Sources: JSONL, JSON, Parquet, or a ``datasets.save_to_disk`` directory; ``path=None`` uses the embedded tiny task.
Prompt and completion are tokenized separately, so the completion mask covers exactly the response tokens plus
EOS. Bad rows raise one :class:`DataError` that names the file, row and field of the first few and counts them all
(or, with ``skip_bad_rows``, are skipped, counted and logged); truncation is counted and logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import reprlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from src.data import tiny
from src.data.collate import PreferenceCollator, PromptCollator, SFTCollator, UnpairedCollator

log = logging.getLogger(__name__)

Kind = Literal["sft", "preference", "prompt", "unpaired"]
Truncation = Literal["keep_end", "keep_start", "error"]
REQUIRED = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
    "unpaired": ("prompt", "completion", "label"),
}


ROLES = ("system", "developer", "user", "assistant", "tool")  # the message roles of chat templates
MAX_LISTED = 5  # bad rows named in the error / warning; all are counted


class DataError(ValueError):
    """A bad input row; the message names the source, the row and the field."""


class BadRow:
    """A row that could not be read (broken JSON, not UTF-8, not an object), kept in place by ``read_rows(...,
    keep_bad=True)`` so that the rows after it keep their numbers; ``message`` names the file and row."""

    def __init__(self, message: str) -> None:
        self.message = message


class BadRows:
    """The bad rows of one load: every one is counted, the first :data:`MAX_LISTED` messages kept (bounded memory)."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.first) < MAX_LISTED:
            self.first.append(message)

    def summary(self) -> str:
        if self.count == 1:
            return self.first[0]
        return f"{self.count} bad rows (the first {len(self.first)}: {'; '.join(self.first)})"

    def check(self, skip: bool) -> None:
        """Raise one :class:`DataError` for all bad rows, or, with ``skip``, log their count and the first few."""
        if not self.count:
            return
        if not skip:
            raise DataError(f"{self.summary()}; fix them, or set data.skip_bad_rows=true to skip and count them")
        listed = "; ".join(self.first)
        log.warning("skipped %d bad rows (skip_bad_rows=true); the first %d: %s", self.count, len(self.first), listed)


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 40, 40, 3, 3, 2


def _short(value: Any, n: int = 60) -> str:
    """``repr(value)`` in at most ``n`` characters, in time bounded whatever the value's size."""
    text = _REPR.repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def readable(row: Any, where: str) -> dict[str, Any]:
    """The row, if it is an object; a :class:`DataError` for a :class:`BadRow` (unreadable line) or any other value."""
    if isinstance(row, BadRow):
        raise DataError(row.message)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    return row


def load_tokenizer(name_or_path: str):
    """The embedded tiny tokenizer for ``"tiny"``, else ``AutoTokenizer.from_pretrained`` (local dirs, no download)."""
    if name_or_path == tiny.TINY:
        return tiny.load_tokenizer()
    from transformers import AutoTokenizer

    from src.models import not_found_hint

    if not Path(name_or_path).exists():
        if name_or_path.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"tokenizer path {name_or_path!r} does not exist")
        log.info("tokenizer %s is not a local path; trying the local Hugging Face cache", name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise FileNotFoundError(f"tokenizer {name_or_path!r}: {not_found_hint()}") from e
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; set one (tokenizer.eos_token) before training")
    if tok.pad_token_id is None:
        log.warning("tokenizer %s has no pad token; using EOS as pad (padding is always masked)", name_or_path)
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------------------------------------- loading
def read_rows(path: str | Path, keep_bad: bool = False) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Rows of a JSONL / JSON / Parquet file or a ``save_to_disk`` directory, plus any extra named splits.

    A JSONL line that is not UTF-8, not JSON or not an object raises :class:`DataError`; with ``keep_bad`` it becomes
    a :class:`BadRow` in its place instead (the caller counts and reports them)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{p}: dataset dict has splits {list(ds)}, expected a 'train' split")
            return ds["train"].to_list(), {k: v.to_list() for k, v in ds.items() if k != "train"}
        return ds.to_list(), {}
    if p.suffix == ".jsonl":
        rows: list[Any] = []
        with p.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                    error = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
                except UnicodeDecodeError as e:
                    error = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
                except json.JSONDecodeError as e:
                    error = f"broken JSON line ({e.msg} at column {e.colno})"
                if error is not None:
                    if not keep_bad:
                        raise DataError(f"{p}: row {n}: {error}")
                    row = BadRow(f"{p}: row {n}: {error}")
                rows.append(row)
        return rows, {}
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: broken JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict) and "train" in data:
            return data["train"], {k: v for k, v in data.items() if k != "train"}
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a list of row objects or {{'train': [...]}}")
        return data, {}
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(str(p)).to_pylist(), {}
    raise DataError(f"{p}: unsupported format {p.suffix!r}; use .jsonl, .json, .parquet or a save_to_disk directory")


def _check_text(value: Any, where: str, field: str) -> None:
    """A field is a non-empty string or a non-empty list of ``{"role", "content"}`` messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {field!r}: empty string")
        return
    if isinstance(value, list) and value:
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(
                    f"{where}: field {field!r}: messages must be {{'role': str, 'content': str}}, got {_short(m)}"
                )
            if m["role"] not in ROLES:
                raise DataError(f"{where}: field {field!r}: message role {_short(m['role'])} is not one of {ROLES}")
        return
    kind = "empty list" if isinstance(value, list) else f"{type(value).__name__} ({_short(value, 40)})"
    raise DataError(f"{where}: field {field!r}: expected a string or a list of messages, got {kind}")


def normalise_row(row: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    """Validate one row for ``kind``; ``messages`` SFT rows become prompt/completion. Raises :class:`DataError`."""
    if kind == "sft" and "messages" in row and "prompt" not in row:
        _check_text(row["messages"], where, "messages")
        if not isinstance(row["messages"], list) or row["messages"][-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages': the last message must be the assistant's")
        row = {**row, "prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
        if not row["prompt"]:
            raise DataError(f"{where}: field 'messages': needs at least one message before the assistant's")
    for field in REQUIRED[kind]:
        if field not in row or row[field] is None:
            raise DataError(f"{where}: field {field!r}: missing (a {kind} row needs {', '.join(REQUIRED[kind])})")
        if field == "label":
            if not isinstance(row["label"], bool):
                raise DataError(f"{where}: field 'label': expected true or false, got {_short(row['label'], 40)}")
            continue
        _check_text(row[field], where, field)
    if kind == "preference" and row.get("margin") is not None:
        m = row["margin"]
        if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m):
            raise DataError(f"{where}: field 'margin': expected a finite number, got {_short(m, 40)}")
    return row


def unpair_rows(rows: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """``(row number, row)`` of a source as unpaired rows (KTO). Each preference row (``chosen`` + ``rejected``, no
    ``completion``) becomes a desirable ``{prompt, completion: chosen, label: true}`` and an undesirable
    ``{..., completion: rejected, label: false}`` row, other columns copied (TRL's ``unpair_preference_dataset``).

    Order: the rows that were unpaired already, as they are; then the split pairs interleaved, desirable row ``i``
    followed by the undesirable row of pair ``i + n/2`` (mod ``n``). TRL puts all desirable rows first: unshuffled
    (validation) batches would then hold one label only and KTO's KL rows (prompt ``i`` + completion ``i − 1``)
    the completions of that label only. Interleaved, every batch mixes both and no KL row pairs a prompt with its
    own other completion (unless a batch spans half the dataset)."""
    kept, desirable, undesirable = [], [], []
    for n, row in rows:
        if isinstance(row, dict) and "chosen" in row and "rejected" in row and "completion" not in row:
            rest = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
            desirable.append((n, {**rest, "completion": row["chosen"], "label": True}))
            undesirable.append((n, {**rest, "completion": row["rejected"], "label": False}))
        else:
            kept.append((n, row))
    half = len(undesirable) // 2
    undesirable = undesirable[half:] + undesirable[:half]
    return kept + [row for pair in zip(desirable, undesirable) for row in pair]


# -------------------------------------------------------------------------------------------------------- tokenizing
class Tokenize:
    """Tokenize prompt and completion separately (exact boundary), with a counted truncation policy."""

    def __init__(
        self,
        tokenizer,
        max_prompt_length: int | None,
        max_completion_length: int | None,
        max_length: int | None,
        truncation: str,
    ) -> None:
        self.tok = tokenizer
        self.max_prompt, self.max_completion, self.max_length = max_prompt_length, max_completion_length, max_length
        self.truncation = truncation
        self.cut: Counter[str] = Counter()

    def _template(self, messages: list[dict], where: str, field: str, **kw: Any) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, **kw)
        except Exception as e:  # noqa: BLE001 - a template that refuses the row (e.g. roles out of order)
            raise DataError(f"{where}: field {field!r}: the chat template fails ({type(e).__name__}: {e})") from e

    def prompt(self, prompt: str | list[dict], where: str) -> list[int]:
        if isinstance(prompt, list):
            text = self._template(prompt, where, "prompt", add_generation_prompt=True)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tok(prompt, add_special_tokens=True)["input_ids"]
        if self.max_prompt is not None and len(ids) > self.max_prompt:
            if self.truncation == "error":
                raise DataError(
                    f"{where}: field 'prompt': {len(ids)} tokens exceeds max_prompt_length={self.max_prompt} "
                    "(truncation='error'; use keep_end or keep_start to cut)"
                )
            self.cut["prompt"] += 1
            ids = ids[-self.max_prompt :] if self.truncation == "keep_end" else ids[: self.max_prompt]
        return ids

    def completion(
        self, prompt: str | list[dict], completion: str | list[dict], n_prompt: int, where: str, field: str
    ) -> list[int]:
        eos = self.tok.eos_token_id
        if isinstance(completion, list):
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            head = self._template(msgs, where, field, add_generation_prompt=True)
            full = self._template(msgs + completion, where, field)
            if not full.startswith(head):
                raise DataError(f"{where}: field {field!r}: the chat template does not render the prompt as a prefix")
            text = full[len(head) :].rstrip()
            if self.tok.eos_token and text.endswith(self.tok.eos_token):
                text = text[: -len(self.tok.eos_token)]
        else:
            text = completion
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [eos]
        limit = self.max_completion
        if self.max_length is not None:
            limit = min(limit or self.max_length, self.max_length - n_prompt)
        if limit is not None and len(ids) > limit:
            if self.truncation == "error" or limit < 1:
                raise DataError(
                    f"{where}: field {field!r}: {len(ids)} tokens exceeds the limit of {limit} "
                    f"(max_completion_length={self.max_completion}, max_length={self.max_length}, "
                    f"prompt {n_prompt} tokens, truncation={self.truncation!r})"
                )
            self.cut[field] += 1
            ids = ids[:limit]
        return ids

    def row(self, row: dict[str, Any], kind: str, where: str, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index, "prompt_ids": self.prompt(row["prompt"], where)}
        n = len(out["prompt_ids"])
        if kind in ("sft", "unpaired"):
            out["completion_ids"] = self.completion(row["prompt"], row["completion"], n, where, "completion")
            if kind == "unpaired":
                out["label"] = row["label"]
        elif kind == "preference":
            for f in ("chosen", "rejected"):
                out[f"{f}_ids"] = self.completion(row["prompt"], row[f], n, where, f)
            if row.get("margin") is not None:  # reward modelling: Llama 2's per-pair margin (src.losses)
                out["margin"] = float(row["margin"])
        else:
            prompt = row["prompt"]
            out["prompt"] = prompt if isinstance(prompt, str) else self.tok.decode(out["prompt_ids"])
            out["columns"] = {k: v for k, v in row.items() if k != "prompt"}
        return out


class RowDataset(Dataset):
    """Tokenized rows held in memory; extra per-row fields (e.g. precomputed reference log-probs) can be added."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def add_column(self, name: str, values: list[Any]) -> None:
        if len(values) != len(self.rows):
            raise ValueError(f"add_column {name!r}: {len(values)} values for {len(self.rows)} rows")
        for r, v in zip(self.rows, values):
            r[name] = v


class ResumableSampler(DistributedSampler):
    """Row order for one epoch: a permutation seeded by ``(seed, epoch)`` (or file order), sharded across ranks
    (rank r takes rows r, r + W, ...), able to start part-way through the epoch.

    It needs no global RNG and shards the same global order whatever the world size, so a resumed run sees exactly
    the rows it would have seen, and W ranks x B rows see the rows of one process with W x B. Being a
    ``DistributedSampler``, Lightning uses it as is instead of injecting its own.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0  # rows of this epoch's global order already consumed (all ranks)

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        order, self.start = order[self.start :], 0
        if order and len(order) % self.num_replicas:  # pad by repeating, as DistributedSampler does
            order += order[: self.num_replicas - len(order) % self.num_replicas]
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        """A whole epoch's rows per rank, even when this one starts part-way: Lightning sizes every epoch by the
        loader's first length and counts a resumed epoch's batches from where the checkpoint was, so a remaining-rows
        length would cut every later epoch short (issue 17)."""
        return -(-len(self.dataset) // self.num_replicas)


# -------------------------------------------------------------------------------------------------------- datamodule
class AlignmentDataModule(LightningDataModule):
    """One DataModule for SFT, reward modelling, DPO, KTO, GRPO and PPO.

    Args:
        path: JSONL / JSON / Parquet file or ``save_to_disk`` directory; ``None`` = the embedded tiny task.
        kind: ``sft`` | ``preference`` | ``prompt`` | ``unpaired``; ``None`` takes the LightningModule's ``data_kind``.
        tokenizer_name_or_path: linked from ``model.model_name_or_path`` by the CLI (``"tiny"`` = embedded).
        val_path: a separate validation file; else a ``test``/``validation`` split of ``path``; else ``val_size``.
        val_size: fraction (< 1) or number of rows held out for validation (0 = no validation).
        batch_size: rows per step per device (preference pairs, SFT or unpaired rows, or prompts).
        truncation: ``keep_end`` keeps the end of a too-long prompt, ``keep_start`` its start, ``error`` raises.
            Completions are always cut at the end. Every cut is counted and logged.
        shuffle: shuffle training rows each epoch (seeded by ``seed_everything``); ``False`` keeps file order.
        tiny_rows: rows generated for the embedded task.
        identical_pairs: a preference pair whose chosen equals its rejected (after tokenization) is an ``error``
            naming its file and row; ``keep`` keeps such pairs (they carry no gradient in DPO) and logs their count.
        skip_bad_rows: bad rows (broken JSON, not UTF-8, missing, empty or mistyped fields, unknown message roles,
            too long under ``truncation: error``, identical pairs under ``identical_pairs: error``) raise one
            :class:`DataError` naming the first few (file, row, field) and counting all; ``True`` skips them and
            logs a warning with their count and the first few.
        predict_path: held-out prompts for ``predict`` and ``test`` (``prompt`` + any columns, e.g. ``answer``);
            ``None`` = the prompts of the validation rows (their other fields become columns).
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        kind: Kind | None = None,
        tokenizer_name_or_path: str = tiny.TINY,
        val_path: str | None = None,
        val_size: float = 0.05,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        max_prompt_length: int | None = 512,
        max_completion_length: int | None = 512,
        max_length: int | None = None,
        truncation: Truncation = "keep_end",
        shuffle: bool = True,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        tiny_rows: int = 2048,
        split_seed: int = 0,
        identical_pairs: Literal["error", "keep"] = "error",
        predict_path: str | None = None,
        skip_bad_rows: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer_name_or_path)
        self.train_set: RowDataset | None = None
        self.val_set: RowDataset | None = None
        self.truncated: Counter[str] = Counter()
        self.identical_pairs = 0  # pairs whose chosen equals their rejected (kept under identical_pairs=keep)
        self.bad_rows = 0  # rows skipped under skip_bad_rows=True
        self.sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] = (0, 0)  # (epoch, rows consumed) restored from a checkpoint

    @property
    def kind(self) -> str:
        kind = self.hparams.kind
        if kind is None and self.trainer is not None:
            kind = getattr(self.trainer.lightning_module, "data_kind", None)
        if kind not in REQUIRED:
            raise ValueError(f"data.kind must be one of {list(REQUIRED)} (or set by the model), got {kind!r}")
        return kind

    def _raw(self) -> tuple[list[tuple[str, list[dict]]], list[tuple[str, list[dict]]]]:
        """``(source name, rows)`` lists for train and validation before tokenization."""
        h = self.hparams
        if h.path is None:
            # KTO's unpaired rows are the preference task's pairs, split (``unpair_rows``)
            rows = list(tiny.generate_rows("preference" if self.kind == "unpaired" else self.kind, h.tiny_rows))
            src, extra = "<embedded tiny task>", {}
        else:
            rows, extra = read_rows(h.path, keep_bad=True)
            src = str(h.path)
        if h.val_path is not None:
            return [(src, rows)], [(str(h.val_path), read_rows(h.val_path, keep_bad=True)[0])]
        for name in ("validation", "test"):
            if name in extra:
                return [(src, rows)], [(f"{src}[{name}]", extra[name])]
        n_val = int(round(h.val_size * len(rows))) if h.val_size < 1 else int(h.val_size)
        if n_val <= 0:
            return [(src, rows)], []
        held = set(random.Random(h.split_seed).sample(range(len(rows)), n_val))
        train = [r for i, r in enumerate(rows) if i not in held]
        val = [r for i, r in enumerate(rows) if i in held]
        return [(src, train)], [(f"{src}[val split]", val)]

    def _tokenize(self, parts: list[tuple[str, list[dict]]], tokenize: Tokenize, bad: BadRows) -> RowDataset:
        """Validate and tokenize rows; bad ones go to ``bad``. Once a bad row is found and ``skip_bad_rows`` is off,
        the remaining rows are only validated (cheap), not tokenized: the error comes in bounded time."""
        out = []
        kind, skip = self.kind, self.hparams.skip_bad_rows
        for src, rows in parts:
            numbered = list(enumerate(rows, 1))
            for i, row in unpair_rows(numbered) if kind == "unpaired" else numbered:
                where = f"{src}: row {i}"
                try:
                    row = normalise_row(readable(row, where), kind, where)
                    if bad.count and not skip:
                        continue
                    tokenized = tokenize.row(row, kind, where, len(out))
                    if kind == "preference" and tokenized["chosen_ids"] == tokenized["rejected_ids"]:
                        if self.hparams.identical_pairs == "error":
                            raise DataError(
                                f"{where}: fields 'chosen' and 'rejected' are identical after tokenization (the "
                                "pair states no preference); set data.identical_pairs=keep to keep and count them"
                            )
                        self.identical_pairs += 1
                except DataError as e:
                    bad.add(str(e))
                    continue
                out.append(tokenized)
                if ("margin" in out[-1]) != ("margin" in out[0]):  # a batch needs a margin on every row or none
                    raise DataError(f"{where}: field 'margin': given on some rows only (every row needs one, or none)")
        return RowDataset(out)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        train_parts, val_parts = self._raw()
        tok = Tokenize(self.tokenizer, h.max_prompt_length, h.max_completion_length, h.max_length, h.truncation)
        bad = BadRows()
        train_set = self._tokenize(train_parts, tok, bad)
        val_set = self._tokenize(val_parts, tok, bad) if val_parts else None
        bad.check(h.skip_bad_rows)
        self.bad_rows = bad.count
        if len(train_set) == 0:
            raise DataError(f"{train_parts[0][0]}: no usable rows")
        self.train_set, self.val_set = train_set, val_set
        self.truncated = tok.cut
        if self.identical_pairs:
            log.warning(
                "%d preference pairs have identical chosen and rejected (kept: identical_pairs=keep)",
                self.identical_pairs,
            )
        if tok.cut:
            n = len(self.train_set) + (len(self.val_set) if self.val_set else 0)
            detail = ", ".join(f"{v} {k}" for k, v in sorted(tok.cut.items()))
            log.warning("truncation (%s) cut %s of %d rows", h.truncation, detail, n)

    def collator(self):
        pad, kind = self.tokenizer.pad_token_id, self.kind
        if kind == "preference":
            return PreferenceCollator(pad, self.hparams.pad_to_multiple_of)
        if kind == "sft":
            return SFTCollator(pad, self.hparams.pad_to_multiple_of)
        if kind == "unpaired":
            return UnpairedCollator(pad, self.hparams.pad_to_multiple_of, self.hparams.max_length)
        return PromptCollator(pad)

    def _loader(self, ds: RowDataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        self.sampler = ResumableSampler(self.train_set, self.hparams.shuffle, seed)
        epoch, consumed = self._resume
        self.sampler.set_epoch(epoch)
        self.sampler.start = consumed if consumed < len(self.train_set) else 0
        self._resume = (0, 0)
        return self._loader(self.train_set, self.hparams.batch_size, self.sampler)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.hparams.val_batch_size or self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.predict_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Left-padded prompt batches of ``predict_path`` (or of the validation rows) in file order; Lightning adds
        the distributed sampler (for ``predict`` one that gives every prompt to exactly one rank)."""
        h = self.hparams
        if h.predict_path is not None:
            parts = [(str(h.predict_path), read_rows(h.predict_path, keep_bad=True)[0])]
        else:
            parts = self._raw()[1]
            if not parts:
                raise DataError(
                    "predict/test need held-out prompts: set data.predict_path (or keep a validation split)"
                )
        tok = Tokenize(self.tokenizer, h.max_prompt_length, h.max_completion_length, h.max_length, h.truncation)
        rows, bad = [], BadRows()
        for src, part in parts:
            for i, row in enumerate(part, 1):
                where = f"{src}: row {i}"
                try:
                    row = normalise_row(dict(readable(row, where)), "prompt", where)
                    rows.append(tok.row(row, "prompt", where, len(rows)))
                except DataError as e:
                    bad.add(str(e))
        bad.check(h.skip_bad_rows)
        loader_bs = h.val_batch_size or h.batch_size
        return DataLoader(
            RowDataset(rows), batch_size=loader_bs, collate_fn=PromptCollator(self.tokenizer.pad_token_id)
        )

    @torch.no_grad()
    def add_columns(self, names: tuple[str, ...], score: Callable[[dict[str, Any]], tuple[Tensor, ...]]) -> None:
        """Score every train and validation row once, in batches of ``data.batch_size`` (``score(batch)`` returns one
        ``[B]`` tensor per name), and keep the values as columns that the collator passes on (DPO's
        ``precompute_ref_logps``). Sets that already have the columns are left as they are; the run's RNG stream is
        kept (iterating a DataLoader draws a seed)."""
        with torch.random.fork_rng(devices=[]):
            for ds in (self.train_set, self.val_set):
                if ds is None or names[0] in ds[0]:
                    continue
                values: list[list[float]] = [[] for _ in names]
                for batch in DataLoader(ds, batch_size=self.hparams.batch_size, collate_fn=self.collator()):
                    for column, v in zip(values, score(batch)):
                        column += v.tolist()
                for name, column in zip(names, values):
                    ds.add_column(name, column)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the data position (epoch and rows consumed, all ranks) for exact resume."""
        state: dict[str, Any] = {"truncated": dict(self.truncated)}
        if self.trainer is not None:
            loop = self.trainer.fit_loop
            batches = loop.epoch_loop.batch_progress.current.ready
            state["epoch"] = self.trainer.current_epoch
            state["consumed"] = batches * self.hparams.batch_size * self.trainer.world_size
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.truncated = Counter(state.get("truncated", {}))
        self._resume = (state.get("epoch", 0), state.get("consumed", 0))
