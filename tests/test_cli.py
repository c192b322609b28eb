"""What a user of the command line meets: export from a fresh process, ``--ckpt_path last`` resumes the job configs'
own checkpoints, one-line errors, logs under ``runs/<job>/`` whatever the loggers, the end-of-fit "Outputs" lines,
the step-1 row and a progress bar whose total matches ``max_steps``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, fresh_env, read_metrics

# The job configs' own ModelCheckpoint (runs/<job>/checkpoints, step=N.ckpt + last.ckpt), saving every 3 steps.
EVERY_3 = ["--trainer.callbacks.every_n_train_steps=3", "--trainer.limit_val_batches=0", "--data.shuffle=false"]


def python_m_src(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m src ARGS`` in a fresh process (nothing of this test process imported)."""
    env = fresh_env(OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "src", *args], cwd=cwd, env=env, capture_output=True, text=True)


def greedy(model, batch, n: int = 6) -> torch.Tensor:
    ids, attn = batch["prompt_ids"][:2], batch["prompt_mask"][:2]
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False)[:, ids.shape[1] :]


JOBS = [
    pytest.param("dpo", id="dpo", marks=pytest.mark.slow),  # ~9 s each: every job runs in the slow tier (CI)
    pytest.param("sft", id="sft", marks=pytest.mark.slow),
    pytest.param("rm", id="rm", marks=pytest.mark.slow),
    pytest.param("grpo", id="grpo", marks=pytest.mark.slow),
    pytest.param("ppo", id="ppo", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("job", JOBS)
def test_export_from_a_fresh_process(run_cli, tmp_path, job, prompt_batch):
    """``python -m src export`` imports the module class the checkpoint names (Lightning 2.6 refuses classes that
    are not imported yet); the exported directory loads with the Auto class and behaves like the module."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cli = run_cli(["fit", "--config", f"{job}.yaml", *FAST, *EVERY_3])
    ckpt = tmp_path / "runs" / job / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    proc = python_m_src(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "hf")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module = cli.model.eval()
    if job == "rm":
        batch = next(iter(cli.datamodule.train_dataloader()))
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
        ids, attn = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            ours, theirs = module.model(input_ids=ids, attention_mask=attn).logits, loaded(ids, attention_mask=attn)
        assert torch.allclose(ours, theirs.logits, atol=1e-5)
        return
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    batch, _ = prompt_batch
    assert torch.equal(greedy(loaded, batch), greedy(module.model, batch))


@pytest.mark.slow  # a fresh `python -m src` process (~6-8 s): the default tier stays under 5 minutes
def test_export_rejects_a_checkpoint_of_another_project(tmp_path):
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "their_pkg.Model"}}, ckpt)
    proc = python_m_src(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "hf")], tmp_path)
    assert proc.returncode != 0
    assert "not a module of this project" in proc.stderr and "their_pkg.Model" in proc.stderr


def test_ckpt_path_last_resumes_the_job_config_checkpoints(run_cli, tmp_path):
    """The README's resume recipe in miniature: stop, then ``--ckpt_path last``: the uninterrupted run's losses."""
    base = ["fit", "--config", "grpo.yaml", *FAST, *EVERY_3, "--model.init_args.micro_batch_size=8"]
    first = run_cli([*base, "--trainer.max_steps=3", "--trainer.logger.init_args.version=first"])
    assert (tmp_path / "runs/grpo/checkpoints/last.ckpt").exists() and first.trainer.global_step == 3
    resumed = run_cli(
        [*base, "--trainer.max_steps=6", "--trainer.logger.init_args.version=resumed", "--ckpt_path=last"]
    )
    full = run_cli([*base, "--trainer.max_steps=6", "--trainer.logger.init_args.version=full"])

    def losses(cli):
        return {
            int(r["step"]): float(r["train/loss"])
            for r in read_metrics(cli.trainer.logger.log_dir)
            if r.get("train/loss")
        }

    got, ref = losses(resumed), losses(full)
    assert resumed.trainer.global_step == 6 and sorted(got) == [3, 4, 5]
    assert all(got[s] == pytest.approx(ref[s], abs=1e-6) for s in got)


def test_full_disk_fails_the_save_naming_it_and_last_still_resumes(run_cli, tmp_path, monkeypatch):
    """Issue 17: a checkpoint write that fails (disk full; a read-only directory fails the same way, but tests run
    as root, where chmod does not stop writes) raises naming the file, and leaves the previous checkpoint usable:
    ``--ckpt_path last`` resumes from it."""
    import errno

    from src.callbacks.checkpoint_io import check_checkpoint

    base = ["fit", "--config", "dpo.yaml", *FAST, *EVERY_3]
    run_cli([*base, "--trainer.max_steps=3"])
    last = tmp_path / "runs/dpo/checkpoints/last.ckpt"
    before = last.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m, pytest.raises(OSError) as e:
        m.setattr(torch, "save", full)
        run_cli([*base, "--trainer.max_steps=6", "--ckpt_path=last"])
    assert e.value.errno == errno.ENOSPC
    assert f"cannot write checkpoint '{last.parent}/step=6.ckpt': No space left on device" in str(e.value)
    assert last.read_bytes() == before and not list(last.parent.glob(".*.tmp"))  # untouched, no temporary left
    check_checkpoint(last)
    resumed = run_cli([*base, "--trainer.max_steps=6", "--ckpt_path=last", "--trainer.logger.init_args.version=r"])
    steps = sorted(int(r["step"]) for r in read_metrics(resumed.trainer.logger.log_dir) if r.get("train/loss"))
    assert resumed.trainer.global_step == 6 and steps == [3, 4, 5]  # resumed at step 3


def test_bad_option_is_one_line(run_cli, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", "dpo.yaml", "--model.init_args.beta=abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 3, err  # usage line, the --help tip, the error
    assert err[-1].startswith("error:") and "beta" in err[-1] and "abc" in err[-1]


BAD_VALUES = [  # (config, option, what the one-line error says); the first two fail in the parser (exit code 2)
    ("dpo.yaml", "--model.init_args.loss_type=nosuch", "\"loss_type\": Expected a typing.Literal['sigmoid'"),
    ("dpo.yaml", "--model.init_args.optimizer.init_args.lr=abc", '"lr": Expected a path but abc'),
    ("dpo.yaml", "--model.init_args.beta=-1", "beta must be > 0, got -1.0"),
    ("kto.yaml", "--model.init_args.beta=0", "beta must be > 0, got 0.0"),
    ("grpo.yaml", "--model.init_args.beta=-0.5", "beta must be >= 0, got -0.5"),
    ("ppo.yaml", "--model.init_args.kl_coef=-1", "kl_coef must be >= 0, got -1.0"),
    ("dpo.yaml", "--data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
    ("grpo.yaml", "--model.init_args.num_generations=1", "num_generations must be >= 2"),
    (
        "grpo.yaml",
        "--model.init_args.steps_per_generation=3",
        "steps_per_generation=3 does not divide the 16 completions of a batch (data.batch_size=4 x num_generations=4)",
    ),
    ("ppo.yaml", "--model.init_args.num_mini_batches=3", "num_mini_batches=3 does not divide the 16 completions"),
]


@pytest.mark.parametrize("config,option,message", BAD_VALUES, ids=[o.split("=")[0][2:] for _, o, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_option(run_cli, capsys, config, option, message):
    """Issue 17: a bad option value ends the command at start with one line that names the option."""
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", config, *FAST, option])
    if isinstance(e.value.code, str):  # raised by the module or the DataModule (src.cli.AlignCLI)
        line = e.value.code
    else:  # jsonargparse
        assert e.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error:") and "\n" not in line and message in line, line


def test_unimportable_reward_is_one_line(run_cli):
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", "grpo.yaml", *FAST, "--model.init_args.reward_funcs=[nosuch.module.fn]"])
    assert str(e.value).startswith("error: cannot import reward 'nosuch.module.fn'")
    assert "\n" not in str(e.value)


def test_missing_model_names_the_download_switch(run_cli):
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", "dpo.yaml", *FAST, "--model.init_args.model_name_or_path=someone/no-such-model"])
    assert "someone/no-such-model" in str(e.value) and "HF_HUB_OFFLINE=0" in str(e.value)


def test_model_config_with_a_saved_model_is_reported_not_silently_dropped(tmp_path, caplog):
    """``model_config`` shapes the tiny model only: given with a saved checkpoint, the model loads as saved and the
    log says the overrides were not applied."""
    from src.models import load_causal_lm

    load_causal_lm("tiny").save_pretrained(tmp_path / "m")
    with caplog.at_level("INFO"):
        model = load_causal_lm(str(tmp_path / "m"), model_config={"num_hidden_layers": 2})
    assert model.config.num_hidden_layers == load_causal_lm("tiny").config.num_hidden_layers != 2
    assert "applies to the tiny model only" in caplog.text and str(tmp_path / "m") in caplog.text


def test_wandb_overlay_keeps_logs_under_the_job(run_cli, tmp_path):
    cli = run_cli(["fit", "--config", "dpo.yaml", "--config", "logger/wandb.yaml", *FAST])
    csv_dir, wandb = (Path(lg.log_dir if i == 0 else lg.save_dir) for i, lg in enumerate(cli.trainer.loggers))
    assert csv_dir.parent == Path("runs/dpo") and wandb == Path("runs/dpo")
    assert (tmp_path / "runs/dpo/wandb").is_dir()


def test_fit_summary_lists_outputs_and_metrics_start_at_step_one(run_cli, caplog, tmp_path):
    with caplog.at_level("INFO"):
        cli = run_cli(["fit", "--config", "dpo.yaml", *FAST, *EVERY_3, "--trainer.log_every_n_steps=2"])
    text = caplog.text
    log_dir = cli.trainer.logger.log_dir
    for line in ("Outputs:", f"metrics: {log_dir}/metrics.csv", f"config: {log_dir}/config.yaml", "last.ckpt"):
        assert line in text, line
    rows = read_metrics(log_dir)
    first = [r for r in rows if r["step"] == "0" and r.get("train/loss")]
    assert first and float(first[0]["train/loss"]) == pytest.approx(0.693147, abs=1e-5)  # step 1: ln 2
    assert float(first[0]["train/rewards/accuracies"]) == 0.0


def test_progress_bar_total_matches_max_steps(run_cli):
    """PPO makes ppo_epochs × num_mini_batches = 3 optimizer steps per batch: 9 steps are 3 batches, not the
    dataloader's length."""
    cli = run_cli(["fit", "--config", "ppo.yaml", *FAST, "--trainer.max_steps=9", "--trainer.enable_progress_bar=true"])
    bar = cli.trainer.progress_bar_callback
    assert type(bar).__name__ == "StepsProgressBar" and bar.train_progress_bar.total == 3


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("ppo.yaml", "reward_model_path"),
        ("dpo.yaml", "ref_model_name_or_path"),
        ("distill.yaml", "teacher_model_name_or_path"),
    ],
)
def test_a_missing_model_loaded_at_fit_start_fails_before_it_in_one_line(run_cli, config, key):
    """The reference, reward and teacher models load when the fit starts: a missing one is refused at parse time."""
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", config, *FAST, f"--model.init_args.{key}=runs/nope/hf"])
    assert str(e.value).startswith(f"error: model.init_args.{key}: 'runs/nope/hf': not a local directory")
    assert "\n" not in str(e.value)


def test_a_missing_reward_model_given_as_a_class_path_is_one_line(run_cli):
    """A reward given as ``class_path`` whose constructor fails: its own error, not jsonargparse's Union dump."""
    bad = "[{class_path: src.rewards.RewardModelScorer, init_args: {path: /no/such/rm}}]"
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", "grpo.yaml", *FAST, f"--model.init_args.reward_funcs={bad}"])
    assert str(e.value) == "error: reward model path '/no/such/rm' does not exist"
