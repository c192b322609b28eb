"""Exact resume: stop at step k, resume from the checkpoint, get the same per-step losses as an uninterrupted run."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, read_metrics

CKPT = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.dirpath=ckpts",
    "--trainer.callbacks.every_n_train_steps=3",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.filename={step}",
    "--trainer.limit_val_batches=0",
]


def losses_by_step(log_dir, key):
    rows = read_metrics(log_dir)
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.mark.parametrize(
    "config,key,extra",
    [
        ("dpo.yaml", "train/loss", []),
        # 4 batches an epoch: the resumed epoch ends after one batch, the next is whole (it was cut to one, issue 17)
        ("dpo.yaml", "train/loss", ["--data.tiny_rows=64"]),
        # TR-DPO: the checkpoint at step 3 holds the reference before its step-3 update, the resumed run makes it once
        ("dpo.yaml", "train/loss", ["--model.init_args.ref_model_sync_steps=3", "--trainer.accumulate_grad_batches=2"]),
        ("grpo.yaml", "train/loss", ["--model.init_args.micro_batch_size=8"]),
        ("ppo.yaml", "train/loss", ["--model.init_args.kl_target=0.5"]),  # the adaptive KL state resumes too
    ],
)
def test_resume_gives_identical_losses(run_cli, tmp_path, config, key, extra):
    base = ["fit", "--config", config, *FAST, *CKPT, "--data.tiny_rows=200", *extra]
    full = run_cli([*base, "--trainer.max_steps=6", "--trainer.logger.init_args.version=full"])
    ref = losses_by_step(full.trainer.logger.log_dir, key)
    assert full.trainer.global_step == 6
    ckpt = tmp_path / "ckpts" / "step=3.ckpt"
    assert ckpt.exists()
    resumed = run_cli(
        [*base, "--trainer.max_steps=6", "--trainer.logger.init_args.version=resumed", f"--ckpt_path={ckpt}"]
    )
    got = losses_by_step(resumed.trainer.logger.log_dir, key)
    # the resumed run logs exactly the steps after the checkpoint (CSV steps count batches; PPO takes 3 optimizer
    # steps per batch), each with the uninterrupted run's value
    assert resumed.trainer.global_step == 6 and got and max(got) == max(ref) and min(got) > min(ref)
    assert sorted(got) == [k for k in sorted(ref) if k >= min(got)]
    for step in got:
        assert got[step] == pytest.approx(ref[step], abs=1e-6), step
