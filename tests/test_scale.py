"""Scale and reliability: DDP on CPU equals one process with the same global batch, HF export round trip, strategy
overlays instantiate, bad inputs and faults give one clear error."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from src.data.tiny import generate_rows
from tests.conftest import CONFIGS, FAST, SMALL_LLAMA, column, fresh_env

SAVE_LAST = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.dirpath=ckpt",
    "--trainer.callbacks.filename=last",
    "--trainer.callbacks.every_n_train_steps=3",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.shuffle=false",
    "--data.tiny_rows=64",
    "--trainer.max_steps=3",
    "--trainer.log_every_n_steps=1",
]


def run_subprocess(args: list[str], cwd: Path) -> None:
    env = fresh_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "src", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    """Per-step ``train/loss`` (logged with sync_dist: the mean over ranks), or another logged ``key``, of a run."""
    (metrics,) = run_dir.glob("runs/*/version_0/metrics.csv")
    return column(list(csv.DictReader(metrics.open())), key)


@pytest.mark.slow  # ~27 s each (two gloo processes plus a one-process run)
@pytest.mark.parametrize(
    "config,batch,extra,metric",
    [
        ("dpo.yaml", 4, [], "train/rewards/margins"),
        ("grpo.yaml", 2, ["--model.init_args.max_new_tokens=8"], "train/entropy"),
    ],
)
def test_ddp_two_processes_match_one_process(tmp_path, config, batch, extra, metric):
    """2 ranks x B rows == 1 process x 2B rows: DDP averages gradients, the dapo normaliser counts tokens over ranks,
    and rollout noise is seeded per prompt, so the updates agree to fp32 tolerance; LogProbMetrics' per-sample means
    are all-reduced over ranks."""
    common = ["fit", "--config", str(CONFIGS / config), *SAVE_LAST, *extra]
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    run_subprocess(
        [
            *common,
            "--config",
            str(CONFIGS / "trainer/ddp.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            f"--data.batch_size={batch}",
        ],
        tmp_path / "ddp",
    )
    run_subprocess([*common, f"--data.batch_size={2 * batch}"], tmp_path / "one")
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(one) == 3 and ddp == pytest.approx(one, abs=1e-5)
    assert len(losses(tmp_path / "one", metric)) == 3
    assert losses(tmp_path / "ddp", metric) == pytest.approx(losses(tmp_path / "one", metric), abs=1e-5)
    assert torch.load(tmp_path / "ddp/ckpt/last.ckpt", weights_only=False)["global_step"] == 3


def test_export_round_trip_reproduces_logps(run_cli, tmp_path):
    from transformers import AutoModelForCausalLM

    from src.logprobs import completion_logps

    cli = run_cli(["fit", "--config", "dpo.yaml", *FAST, *SAVE_LAST])
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    out = run_cli(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "hf")])
    assert out == tmp_path / "hf" and (out / "tokenizer.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = next(iter(cli.datamodule.train_dataloader()))
    args = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    module = cli.model.eval()
    with torch.no_grad():
        assert torch.allclose(completion_logps(loaded, *args)[0], completion_logps(module.model, *args)[0], atol=1e-5)


def test_export_merges_lora(run_cli, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from src.logprobs import completion_logps

    lora = '{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}'
    cli = run_cli(["fit", "--config", "dpo.yaml", *FAST, *SAVE_LAST, f"--model.init_args.lora={lora}"])
    out = run_cli(["export", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "hf")])
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    batch = next(iter(cli.datamodule.train_dataloader()))
    args = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        assert torch.allclose(
            completion_logps(loaded, *args)[0], completion_logps(cli.model.model, *args)[0], atol=1e-5
        )


@pytest.mark.slow  # two spawned processes (~10 s): the default tier stays under 5 minutes on 2 cores
def test_export_consolidates_a_fsdp_sharded_checkpoint(run_cli, tmp_path):
    """A checkpoint directory in the layout Lightning's ``FSDPStrategy(state_dict_type="sharded")`` writes (its own
    ``_distributed_checkpoint_save`` + ``meta.pt``; FSDP itself does not run on CPU) exports from a fresh process."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
    from transformers import AutoModelForCausalLM

    cli = run_cli(["fit", "--config", "dpo.yaml", *FAST, *SAVE_LAST])
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    converted = {"model": checkpoint.pop("state_dict")}  # what FSDPStrategy.save_checkpoint does for "sharded"
    converted.update({f"optimizer_{i}": o for i, o in enumerate(checkpoint.pop("optimizer_states", []))})
    _distributed_checkpoint_save(converted, sharded)
    torch.save(checkpoint, sharded / "meta.pt")

    run_subprocess(["export", "--ckpt_path", str(sharded), "--out", str(tmp_path / "hf")], tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    trained = cli.model.model.state_dict()
    assert all(torch.equal(p, trained[n]) for n, p in loaded.state_dict().items())


def test_fsdp_overlay_instantiates_with_decoder_layer_policy():
    """The FSDP overlay wraps whatever decoder layer the model declares (``_no_split_modules``): Llama and Qwen2."""
    from typing import Union

    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from src.models import load_causal_lm
    from src.strategies import NoSplitModulesPolicy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Union[str, Strategy])  # noqa: UP007 - jsonargparse needs the Union form
    cfg = yaml.safe_load((CONFIGS / "trainer/fsdp.yaml").read_text())["trainer"]["strategy"]
    strategy = parser.instantiate(parser.parse_object({"strategy": cfg})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], NoSplitModulesPolicy)
    for model, layer in (
        (load_causal_lm("tiny"), "LlamaDecoderLayer"),
        (Qwen2ForCausalLM(Qwen2Config(**SMALL_LLAMA)), "Qwen2DecoderLayer"),
    ):
        policy = NoSplitModulesPolicy()
        root = torch.nn.ModuleDict({"policy": model})  # as FSDP sees it: the LightningModule around the HF model
        assert policy(root, recurse=True, nonwrapped_numel=0)
        wrapped = [m for m in root.modules() if policy(m, recurse=False, nonwrapped_numel=0)]
        assert wrapped and {type(m).__name__ for m in wrapped} == {layer}
        assert len(wrapped) == model.config.num_hidden_layers
    for name in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        assert yaml.safe_load((CONFIGS / "trainer" / name).read_text())["trainer"]["strategy"].startswith("deepspeed")


# ------------------------------------------------------------------------------------------------------ bad input
def test_missing_model_path_is_one_clear_error(run_cli, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*path '.*nope' does not exist"):
        run_cli(["fit", "--config", "dpo.yaml", *FAST, f"--model.init_args.model_name_or_path={tmp_path / 'nope'}"])


def test_unknown_config_key_is_rejected(run_cli, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", "dpo.yaml", "--model.init_args.betta=0.2"])
    assert "betta" in capsys.readouterr().err


def test_tokenizer_without_eos_is_rejected(tmp_path):
    from src.data import load_tokenizer
    from src.data.tiny import load_tokenizer as tiny_tokenizer

    tok = tiny_tokenizer()
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    cfg.pop("eos_token", None)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no EOS token"):
        load_tokenizer(str(tmp_path / "tok"))


def test_corrupt_checkpoint_is_one_clear_error(run_cli, tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken\.ckpt' is corrupt or not a PyTorch checkpoint"):
        run_cli(["fit", "--config", "dpo.yaml", *FAST, f"--ckpt_path={bad}"])
    torch.save({"foo": 1}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="is not a Lightning checkpoint"):
        run_cli(["fit", "--config", "dpo.yaml", *FAST, f"--ckpt_path={tmp_path / 'foreign.ckpt'}"])


def test_checkpoint_of_another_model_names_the_parameter(run_cli, tmp_path):
    from src.modules.dpo import DPO

    run_cli(["fit", "--config", "dpo.yaml", *FAST, *SAVE_LAST])
    other = DPO(model_config={"hidden_size": 64})  # the CLI would take hparams from the checkpoint: load by hand
    other.configure_model()
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    with pytest.raises(RuntimeError, match="size mismatch for model.model.embed_tokens.weight"):
        other.load_state_dict(state)


def test_zero_usable_rows(run_cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no usable rows"):
        run_cli(["fit", "--config", "dpo.yaml", *FAST, f"--data.path={empty}"])


def test_nan_gradient_is_caught_or_skipped(run_cli, tmp_path):
    from src.modules.dpo import DPO

    class NaNGrad(DPO):
        def on_after_backward(self) -> None:
            next(self.model.parameters()).grad.fill_(float("nan"))

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_rows("preference", 16)))
    module = NaNGrad()
    module.configure_model()
    import lightning as L

    from src.data import AlignmentDataModule

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(FloatingPointError, match="gradient norm is NaN at global step 0"):
        trainer.fit(module, AlignmentDataModule(str(path), kind="preference", val_size=0))
    skip = NaNGrad(nan_policy="skip")
    skip.configure_model()
    before = {n: p.detach().clone() for n, p in skip.model.named_parameters()}
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(skip, AlignmentDataModule(str(path), kind="preference", val_size=0))
    assert skip.skipped_steps == 2
    assert all(torch.equal(before[n], p) for n, p in skip.model.named_parameters())  # nothing was applied


def test_atomic_checkpoint_save_leaves_no_partial_file(tmp_path, monkeypatch):
    from src.callbacks.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=False)["state_dict"]["w"], torch.ones(2))  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # no temporary left behind


def test_checkpoint_in_a_read_only_directory_names_the_file(tmp_path, monkeypatch):
    """A read-only directory (simulated: tests run as root, where chmod 0o500 does not stop writes) fails the save
    with the same kind of OSError, naming the checkpoint; the one there stays."""
    import errno
    import tempfile

    from src.callbacks.checkpoint_io import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)

    def read_only(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError, match=f"cannot write checkpoint '{target}': Permission denied \\(the previous"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=False)["state_dict"]["w"], torch.ones(2))
