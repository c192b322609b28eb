# Cells of 05_tour_of_the_template.ipynb (built by _build.py). ("md" | "code", source)

CELLS = [
    ("md", r"""
# 05 · A tour of the template: from a YAML file to a trained model

Notebooks 01–04 built the losses; this one shows the machinery that trains with them. It runs a tiny **DPO** and a
tiny **GRPO** end to end through the same command-line entry point you would use in a shell, reads what the runs
wrote (`metrics.csv`, `config.yaml`), and checks the facts the earlier notebooks predicted: the DPO loss starts at
exactly $\ln 2$, and GRPO's KL to the reference starts at exactly 0.

## The layout in ten lines

```text
configs/<algo>.yaml          one YAML per recipe (dpo, grpo, sft): model class + init_args, data, trainer, callbacks
  └─> src/cli.py  main()     LightningCLI (AlignCLI): parses and composes the YAMLs + --flags, seeds, builds, fits
       ├─> src/data/         AlignmentDataModule: ONE DataModule, row kinds sft | preference | prompt; the kind
       │                     comes from the module's `data_kind`; data.path=None -> the embedded tiny task
       ├─> src/modules/      LightningModules, one file per algorithm, all subclasses of AlignmentModule (base.py:
       │     dpo.py          policy + frozen reference, completion log-probs, optimizer):  DPO  (preference pairs)
       │     grpo.py           GRPO (prompts; samples with src/rollout.py, scores with src/rewards.py)
       │     sft.py            SFT  (prompt + completion)
       │        └─> src/losses.py   pure tensor functions: dpo_loss, grpo_loss, group_advantages, kl_estimate, ...
       └─> src/callbacks/    LogProbMetrics (per-sample metrics -> train/*, val/*), TokenThroughput, FitSummary
```

Every `training_step` returns per-sample metrics computed from its own forward pass; `LogProbMetrics` averages and
logs them, so the module files contain only the algorithm.
"""),
    ("code", r"""
%matplotlib inline
import math
import os
import pathlib
import shutil
import sys
import tempfile

# make `import src` work without `pip install -e .`: the kernel starts in notebooks/, the package is one level up
try:
    import src  # noqa: F401
except ImportError:
    sys.path.insert(0, str(pathlib.Path.cwd().parent))
    import src

import matplotlib.pyplot as plt
import pandas as pd  # installed with `datasets`, a dependency of the template
import torch
import yaml

ROOT = pathlib.Path(src.__file__).resolve().parent.parent  # the repository root (configs/ lives here)
# A 1.6M-parameter model gains nothing from intra-op threads, and on a shared machine extra threads mostly wait
# for each other. One thread also makes the seeded runs below bit-for-bit reproducible (the order of floating-point
# reductions depends on the thread count).
torch.set_num_threads(1)
# LightningCLI warns when it gets `args` while sys.argv holds arguments too; in Jupyter those are the kernel's own
# (`-f kernel-....json`), so drop them: the CLI below reads only the list it is given.
sys.argv = sys.argv[:1]
RUNS = tempfile.mkdtemp(prefix="tour05_")  # every run of this notebook is written here, never into the repository
print("repository:", ROOT)
print("runs go to:", RUNS)
"""),
    ("md", r"""
The claims of the layout, checked: the CLI is a `LightningCLI`, there is one `LightningDataModule`, each algorithm is
an `AlignmentModule` that names the row kind it trains on, and the three callbacks are Lightning callbacks that the
CLI adds under their own config keys (`logprob_metrics:`, `throughput:`, `fit_summary:`).
"""),
    ("code", r"""
from lightning import Callback, LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from src.callbacks import FitSummary, LogProbMetrics, TokenThroughput
from src.cli import AlignCLI, main
from src.data import AlignmentDataModule
from src.modules.base import AlignmentModule
from src.modules.dpo import DPO
from src.modules.grpo import GRPO
from src.modules.sft import SFT

assert issubclass(AlignCLI, LightningCLI)
assert issubclass(AlignmentDataModule, LightningDataModule)
assert issubclass(AlignmentModule, LightningModule)
for cls in (LogProbMetrics, TokenThroughput, FitSummary):
    assert issubclass(cls, Callback)

kinds = {}
for name in ("dpo", "grpo", "sft"):
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    module_path, cls_name = cfg["model"]["class_path"].rsplit(".", 1)
    cls = getattr(__import__(module_path, fromlist=[cls_name]), cls_name)
    assert issubclass(cls, AlignmentModule)
    kinds[cls.__name__] = cls.data_kind
    print(f"configs/{name}.yaml -> {cfg['model']['class_path']:24s} data_kind={cls.data_kind!r:14s}"
          f"reference model: {cls.needs_reference}")
assert kinds == {"DPO": "preference", "GRPO": "prompt", "SFT": "sft"}
"""),
    ("md", r"""
(GRPO's `needs_reference` is decided per run: the instance loads a reference only when `beta > 0`, which
`configs/grpo.yaml` sets to 0.04.)

## Part 1 · A tiny DPO run, in-process

`src.cli.main(args)` is exactly what `python -m src ...` calls, so the cell below is the shell command

```bash
python -m src fit --config configs/dpo.yaml --trainer.max_steps=40 --trainer.val_check_interval=20 \
    --trainer.limit_val_batches=2 --trainer.enable_progress_bar=false --trainer.log_every_n_steps=1 \
    --trainer.logger.init_args.save_dir=$RUNS --data.tiny_rows=512
```

`configs/dpo.yaml` trains the embedded tiny Llama (1.6M parameters, built from config, nothing downloaded) on a
synthetic preference task: the *chosen* completion copies the prompt, the *rejected* one is random items with many
numbers. The flags after `--config` override the file: 40 steps instead of 150, validation on 2 batches every 20
steps, 512 generated rows, a metrics row every step (the config logs every 5, which would skip step 1), and the
CSV logger writing to a temporary directory. The seed (42) comes from the config.
"""),
    ("code", r"""
dpo_cli = main([
    "fit",
    "--config", str(ROOT / "configs/dpo.yaml"),
    "--trainer.max_steps=40",
    "--trainer.val_check_interval=20",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
    "--trainer.logger.init_args.save_dir=" + RUNS,
    "--data.tiny_rows=512",
])
dpo_dir = pathlib.Path(dpo_cli.trainer.logger.log_dir)
print("run directory:", dpo_dir, sorted(p.name for p in dpo_dir.iterdir()))
assert dpo_cli.trainer.global_step == 40
assert isinstance(dpo_cli.model, DPO) and isinstance(dpo_cli.datamodule, AlignmentDataModule)
assert dpo_cli.datamodule.kind == "preference"
"""),
    ("md", r"""
The CSV logger writes one row per logged step (`step` counts from 0, so row 0 is the first optimizer step) and
separate rows for validation; a metric's column is empty in the rows where it was not logged, hence `dropna`.
`train/loss` is logged by `DPO.training_step`; `train/rewards/*` and `train/logps/*` are the per-pair metrics the
step returned, averaged by `LogProbMetrics`; `train/tokens_per_s` comes from `TokenThroughput` (a Lightning
`ThroughputMonitor`).
"""),
    ("code", r"""
dpo = pd.read_csv(dpo_dir / "metrics.csv")
print("columns:", list(dpo.columns))
train = dpo.dropna(subset=["train/loss"])[["step", "train/loss", "train/rewards/accuracies", "train/rewards/margins"]]
val = dpo.dropna(subset=["val/loss"])[["step", "val/loss", "val/rewards/accuracies"]]
display(train.head(3))
display(val)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
axes[0].plot(train["step"] + 1, train["train/loss"], label="train")
axes[0].plot(val["step"] + 1, val["val/loss"], "o", label="val")
axes[0].axhline(math.log(2), color="gray", ls=":", lw=1, label=r"$\ln 2$")
axes[0].set_xlabel("optimizer step")
axes[0].set_ylabel("train/loss")
axes[0].legend()
axes[1].plot(train["step"] + 1, train["train/rewards/accuracies"], label="train")
axes[1].plot(val["step"] + 1, val["val/rewards/accuracies"], "o", label="val")
axes[1].set_xlabel("optimizer step")
axes[1].set_ylabel("train/rewards/accuracies")
axes[1].set_ylim(-0.05, 1.05)
axes[1].legend()
fig.suptitle("tiny DPO, 40 steps")
plt.show()

loss = train["train/loss"].to_numpy()
first, last10 = loss[0], loss[-10:].mean()
print(f"step 1 loss {first:.6f} (ln 2 = {math.log(2):.6f}); mean of the last 10 steps {last10:.4f}")
# at step 1 the policy IS the reference: every log-ratio is 0 and every pair costs -log sigmoid(0) = ln 2
assert abs(first - math.log(2)) < 1e-5
assert train["train/rewards/margins"].iloc[0] == 0
assert last10 < first
"""),
    ("md", r"""
Two things to read off the plots:

* **Step 1 is the reference point.** The loss is $\ln 2$ to float precision and the implicit reward margin is exactly
  0, so `rewards/accuracies` (the fraction of pairs with chosen reward *strictly* above rejected) is 0 at step 1, not
  0.5: every pair is a tie.
* **The easy half of the preference is learnt first.** Within 40 steps the accuracy climbs towards 1 and the loss
  falls well below $\ln 2$: the policy quickly learns that the rejected completions contain more numbers. Learning to
  *copy* the prompt (what the chosen completions really do) takes the full 150 steps of the config, and more.

## Part 2 · A tiny GRPO run

Same entry point, another config: `configs/grpo.yaml` samples 4 completions (32 new tokens) for each of 4 prompts per
step, scores them with `src.rewards.digit_fraction` (the fraction of digit characters, a random model scores about
0.05), and minimises `grpo_loss` (DAPO normaliser, clip-higher) with a KL term to the reference (`beta: 0.04`, k3
estimator). We run 20 steps without validation (`limit_val_batches=0`) and without the held-out log-prob statistics
(`logprob_metrics.every_n_steps=0`), which would each cost extra generation.
"""),
    ("code", r"""
grpo_cli = main([
    "fit",
    "--config", str(ROOT / "configs/grpo.yaml"),
    "--trainer.max_steps=20",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
    "--trainer.logger.init_args.save_dir=" + RUNS,
    "--data.tiny_rows=512",
    "--logprob_metrics.every_n_steps=0",
])
grpo_dir = pathlib.Path(grpo_cli.trainer.logger.log_dir)
assert grpo_cli.trainer.global_step == 20
assert isinstance(grpo_cli.model, GRPO) and grpo_cli.datamodule.kind == "prompt"
assert grpo_cli.model.ref_model is not None  # beta > 0 -> a frozen copy of the initial policy
"""),
    ("code", r"""
grpo = pd.read_csv(grpo_dir / "metrics.csv").dropna(subset=["train/reward"])
print("columns:", list(grpo.columns))
display(grpo[["step", "train/reward", "train/reward_std", "train/kl", "train/completions/mean_length"]].head(3))

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
axes[0].plot(grpo["step"] + 1, grpo["train/reward"], marker=".")
axes[0].set_xlabel("optimizer step")
axes[0].set_ylabel("train/reward (mean over 16 completions)")
axes[1].plot(grpo["step"] + 1, grpo["train/kl"], marker=".", color="C1")
axes[1].set_xlabel("optimizer step")
axes[1].set_ylabel("train/kl (k3, to the reference)")
fig.suptitle("tiny GRPO, 20 steps")
plt.show()

reward, kl = grpo["train/reward"].to_numpy(), grpo["train/kl"].to_numpy()
print(f"KL at step 1: {kl[0]:.3g}; KL at step 20: {kl[-1]:.3f}")
print(f"mean reward, steps 1-5: {reward[:5].mean():.4f}; steps 16-20: {reward[-5:].mean():.4f}")
# at step 1 the completions were sampled from, and scored by, the policy before any update: policy = reference
assert abs(kl[0]) < 1e-6
assert (kl >= -1e-6).all()  # k3 = exp(d) - d - 1 >= 0 per token
assert ((reward >= 0) & (reward <= 1)).all()  # a fraction of characters
# With seed 42 and one thread this run is deterministic (measured: identical rewards in repeated runs, and with
# 2 threads too); the rise is large (about 0.06 -> 0.13), not noise.
assert reward[-5:].mean() > reward[:5].mean()
"""),
    ("md", r"""
The KL is exactly 0 at step 1 because the reference is a frozen copy of the initial policy and dropout is off, so
both give bit-identical log-probs for the first batch; it then grows with every update (the learning rate of the
config, 5e-3, is large on purpose so that the tiny model moves within minutes). The reward starts at the random
model's ~0.05 and rises as the policy learns to emit digits; the best completion of step 20 is printed above
(`log_completions_every_n_steps: 20`). With a reward this easy to hack, the KL term (`beta`) is all that keeps the
policy near the reference; with `beta: 0` no reference model is loaded at all and `train/kl` is logged as 0.

## Part 3 · The resolved config, and overriding it

Next to `metrics.csv`, every run saves `config.yaml`: the **fully resolved** configuration, i.e. the YAML files, the
command-line overrides and every default, written by `LoggerSaveConfigCallback` (which also sends it to each logger as
hyperparameters). It is the exact record of what ran, and a valid `--config` to run it again.
"""),
    ("code", r"""
resolved = yaml.safe_load((dpo_dir / "config.yaml").read_text())
print(sorted(resolved))
print("model:", resolved["model"]["class_path"], {k: resolved["model"]["init_args"][k]
                                                   for k in ("beta", "loss_type", "label_smoothing")})
print("optimizer:", resolved["model"]["init_args"]["optimizer"])
print("trainer:", {k: resolved["trainer"][k] for k in ("max_steps", "val_check_interval", "log_every_n_steps")})

# the file holds the command-line overrides ...
assert resolved["trainer"]["max_steps"] == 40 and resolved["trainer"]["val_check_interval"] == 20
assert resolved["data"]["tiny_rows"] == 512
assert resolved["trainer"]["logger"]["init_args"]["save_dir"] == RUNS
# ... the values of configs/dpo.yaml that were not overridden ...
assert resolved["model"]["init_args"]["beta"] == 0.1 and resolved["seed_everything"] == 42
# ... and every default that neither mentioned (here two DPO options and two callback settings)
assert resolved["model"]["init_args"]["label_smoothing"] == 0.0 and resolved["model"]["init_args"]["rpo_alpha"] is None
assert resolved["logprob_metrics"]["every_n_steps"] == 50 and resolved["fit_summary"]["window"] == 10
# the instantiated objects agree with it
assert dpo_cli.model.hparams.beta == resolved["model"]["init_args"]["beta"]
assert dpo_cli.datamodule.hparams.batch_size == resolved["data"]["batch_size"]

grpo_resolved = yaml.safe_load((grpo_dir / "config.yaml").read_text())
assert grpo_resolved["model"]["init_args"]["beta"] == 0.04 and grpo_resolved["logprob_metrics"]["every_n_steps"] == 0
"""),
    ("md", r"""
**Overriding values.** Every key of the resolved config is a command-line flag: join the YAML path with dots.
Arguments are applied left to right, so a flag overrides the `--config` files before it, and of several `--config`
files the last one wins.

```bash
# change the DPO temperature and the batch size (both spellings of a model argument work)
python -m src fit --config configs/dpo.yaml --model.init_args.beta=0.2 --data.batch_size=8
python -m src fit --config configs/dpo.yaml --model.beta=0.2
# a nested class: a different optimizer learning rate
python -m src fit --config configs/dpo.yaml --model.init_args.optimizer.init_args.lr=1e-4
# compose configs: add W&B logging (offline by default) on top of the recipe
python -m src fit --config configs/dpo.yaml --config configs/logger/wandb.yaml
# your own data and model (a local Hugging Face directory; nothing is downloaded)
python -m src fit --config configs/dpo.yaml --data.path my_pairs.jsonl --model.model_name_or_path /models/x
# rerun from a saved config, here with one change
python -m src fit --config runs/dpo/version_0/config.yaml --trainer.max_steps=300
```

Three helpers: `--print_config` prints the resolved config *without* running (put it last, after the overrides);
`--help` lists the trainer and data flags, and `--model.help src.modules.dpo.DPO` lists a module's arguments with their
types and choices. One key is not yours to set: `data.tokenizer_name_or_path` is linked to
`model.init_args.model_name_or_path` by `AlignCLI`, so the tokenizer always matches the model.
"""),
    ("code", r"""
shutil.rmtree(RUNS, ignore_errors=True)  # the runs were only for this tour
assert not os.path.exists(RUNS)
"""),
]
