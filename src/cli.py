"""The command line: ``python -m src fit --config configs/dpo.yaml`` (also ``validate``, ``test``, ``predict``).

A :class:`~lightning.pytorch.cli.LightningCLI` over any :class:`~src.modules.base.AlignmentModule` subclass and the
one :class:`~src.data.AlignmentDataModule`. Several ``--config`` files compose (last wins); the model path is given
once and linked to the DataModule's tokenizer; the resolved config is saved next to the run and sent to every logger
(W&B uploads it as a file too). Nothing is downloaded: Hugging Face runs offline and W&B in offline mode by default.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
}.items():
    os.environ.setdefault(_k, _v)

from lightning import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402

from src.callbacks import FitSummary, HFExport, LogProbMetrics, TokenThroughput  # noqa: E402
from src.callbacks.checkpoint_io import check_checkpoint  # noqa: E402
from src.data import AlignmentDataModule  # noqa: E402
from src.evaluate import Evaluation  # noqa: E402
from src.models import check_model_path  # noqa: E402
from src.modules.base import AlignmentModule  # noqa: E402
from src.plot import PlotCurves  # noqa: E402


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory and logs the resolved config to every logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"config_yaml": config}, allow_val_change=True)
            logger.log_hyperparams(self.config.as_dict())


def config_tags(paths: Iterable[Any]) -> list[str]:
    """Run tags from the ``--config`` files used: ``configs/papers/dpo_hh.yaml`` -> ``papers/dpo_hh``."""
    tags: list[str] = []
    for p in paths:
        parts = Path(str(getattr(p, "relative", p))).with_suffix("").parts
        below = parts[len(parts) - parts[::-1].index("configs") :] if "configs" in parts else parts[-1:]
        tag = "/".join(below)[:64]  # W&B limits tags to 64 characters
        if tag and tag not in tags:
            tags.append(tag)
    return tags


def tag_wandb_loggers(config: Any) -> None:
    """Give every ``WandbLogger`` in ``config.trainer.logger`` whose ``tags`` are empty the tags of the configs used."""
    loggers = config.get("trainer", {}).get("logger") if hasattr(config, "get") else None
    if not isinstance(loggers, list):
        loggers = [loggers]
    tags = config_tags(config.get("config") or [])
    for logger in loggers:
        if not hasattr(logger, "get") or not str(logger.get("class_path", "")).endswith("WandbLogger"):
            continue
        if logger.get("init_args") is not None and not logger.init_args.get("tags"):
            logger.init_args.tags = tags


def job_name(config: Any) -> str:
    """``dpo`` for ``--config configs/dpo.yaml`` (the first config file), else the module class in lower case."""
    for p in config.get("config") or []:
        return Path(str(getattr(p, "relative", p))).stem
    model = config.get("model") if hasattr(config, "get") else None
    return str(getattr(model, "class_path", "run")).rsplit(".", 1)[-1].lower()


def place_loggers(config: Any) -> None:
    """Logs of a job go under ``runs/<job>/`` whatever the loggers: a ``CSVLogger`` without a ``name`` gets the job
    name, a ``WandbLogger`` without a ``save_dir`` gets ``runs/<job>`` (``configs/logger/wandb.yaml`` leaves both
    empty)."""
    loggers = config.get("trainer", {}).get("logger") if hasattr(config, "get") else None
    job = job_name(config)
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        args = logger.get("init_args") if hasattr(logger, "get") else None
        if args is None:
            continue
        kind = str(logger.get("class_path", ""))
        if kind.endswith("CSVLogger") and not args.get("name"):
            args.name = job
        elif kind.endswith("WandbLogger") and not args.get("save_dir"):
            args.save_dir = f"runs/{job}"


def short_error(message: str) -> str:
    """jsonargparse's nested error for a bad option, as one line: ``"model": 'src.modules.dpo.DPO': "beta": ...``."""
    skip = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")
    parts = []
    for line in message.splitlines():
        text = line.strip().lstrip("-").strip()
        if text and not text.startswith(skip):
            parts.append(text.replace("Problem with given class_path ", "").replace("Parser key ", "").rstrip(":"))
    return ": ".join(parts) or message


def own_error(error: BaseException) -> BaseException | None:
    """The innermost ``ValueError`` / ``ImportError`` / ``FileNotFoundError`` of ``error``'s cause chain that was
    raised in this project's ``src/`` (``None`` if there is none)."""
    src = str(Path(__file__).resolve().parent)
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if isinstance(error, (ValueError, ImportError, FileNotFoundError)) and tb is not None:
            if str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(src):
                found = error
        error = error.__cause__ or error.__context__
    return found


def union_member_error(error: BaseException) -> str | None:
    """For a value of a Union type (e.g. a ``reward_funcs`` entry given as ``class_path``): the one member's error that
    is not a type mismatch, such as the constructor's ``reward model path '/x' does not exist``. jsonargparse writes
    the members' errors into its own message and drops their exceptions, so ``own_error`` cannot find them."""
    noise = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a", "Not a valid", "Type ")
    while error is not None:
        text = str(error)
        if text.startswith("Does not validate against any of the Union subtypes"):
            lines = [line.strip().lstrip("-").strip() for line in text.splitlines()]
            return next((line for line in lines if line and not line.startswith(noise)), None)
        error = error.__cause__ or error.__context__
    return None


class StepsProgressBar(TQDMProgressBar):
    """TQDM whose epoch total is the batches ``max_steps`` leaves: GRPO/PPO make several optimizer steps per batch
    (PPO: ``ppo_epochs × num_mini_batches``), so the dataloader's length overstates the run. Measured on the first
    optimizer step of the fit; the total only ever shrinks."""

    _start: tuple[int, int] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start, self._measured = (trainer.global_step, trainer.fit_loop.total_batch_idx), False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        step0, batch0 = self._start or (0, -1)
        if not self._measured and trainer.max_steps > 0 and trainer.global_step > step0:
            self._measured = True
            bar = self.train_progress_bar
            per_batch = (trainer.global_step - step0) / (trainer.fit_loop.total_batch_idx - batch0)
            total = i + 1 + math.ceil((trainer.max_steps - trainer.global_step) / per_batch)
            if bar.total is None or total < bar.total:
                bar.total = total
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)


def check_same_job(ckpt: str, model_config: Any) -> None:
    """A ``--ckpt_path`` written by another job's module (e.g. a DPO checkpoint given to the GRPO config) is refused
    in one line: its weights would load silently, its hyper-parameters and loop state would not fit."""
    want = getattr(model_config, "class_path", None)
    if want is None or Path(ckpt).is_dir():
        return
    import torch

    hparams = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters") or {}
    have = hparams.get("_class_path")
    if have is not None and have != want:
        raise ValueError(f"--ckpt_path {ckpt!r} is a checkpoint of {have}, but this config builds {want}")


class AlignArgumentParser(LightningArgumentParser):
    """One-line errors: a bad option or an unimportable reward says what and where, without the 100-line usage."""

    def print_usage(self, file: Any = None) -> None:
        prog = self.prog.replace(" [options]", "").replace("__main__.py", "python -m src")
        (file or sys.stderr).write(f"usage: {prog} --config CONFIG [--key value ...]\n")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(short_error(message), ex)


class AlignCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        tag_wandb_loggers(config)
        place_loggers(config)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer_name_or_path")
        parser.add_lightning_class_args(LogProbMetrics, "logprob_metrics")
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        parser.add_lightning_class_args(FitSummary, "fit_summary")
        parser.add_lightning_class_args(HFExport, "hf_export")  # --hf_export.dirpath DIR: save_pretrained at fit end
        parser.add_lightning_class_args(Evaluation, "eval")  # predict / test: sampling, rewards, reference, output
        parser.add_lightning_class_args(PlotCurves, "plot")  # curves.png next to metrics.csv; --plot.enabled false

    def instantiate_classes(self) -> None:
        """A deliberate error of this project's code while building the model, data or callbacks (a bad option
        value, a reward that cannot be imported, a missing file) ends the command in one line instead of
        jsonargparse's chained tracebacks; any other exception propagates as it is."""
        try:
            super().instantiate_classes()
        except Exception as e:  # noqa: BLE001 - re-raised unless it is one of ours
            if (ours := own_error(e) or union_member_error(e)) is None:
                raise
            raise SystemExit(f"error: {ours}") from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The default progress bar is TQDM, drawn in the training loop. Lightning's default (Rich when installed)
        redraws from a 100 Hz background thread that competes with the intra-op threads on small CPU machines: 2% of
        a 2-core DPO step when the machine is idle, ~18% when another job is running (``benchmarks/README.md``).
        A progress bar given in ``trainer.callbacks`` (e.g. ``RichProgressBar``) is used as it is."""
        cfg = self._get(self.config_init, "trainer", default={}) or {}
        if cfg.get("enable_progress_bar", True) is not False and "callbacks" not in kwargs:
            callbacks = cfg.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
            if not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, StepsProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then validate ``--ckpt_path`` (one clear error for a missing, corrupt or foreign file) before
        Lightning reads the module's hyper-parameters from it."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt not in (None, "last", "best", "hpc", "registry"):
            check_checkpoint(ckpt)
            check_same_job(ckpt, self.config[sub].get("model"))
        cfg = self.config[sub] if sub else self.config
        init = (cfg.get("model") or {}).get("init_args") or {}
        ev = cfg.get("eval") or {}
        try:  # models loaded only when the run starts (reference, reward model, teacher): a missing one fails now
            for key in ("ref_model_name_or_path", "reward_model_path", "teacher_model_name_or_path"):
                check_model_path(f"model.init_args.{key}", init.get(key))
            for key in ("reward_model_path", "reference_path"):
                check_model_path(f"eval.{key}", ev.get(key))
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None

    def before_fit(self) -> None:
        """A ``data.batch_size`` the model's options cannot split (GRPO's ``steps_per_generation``, PPO's
        ``num_mini_batches``) ends the command in one line before the fit starts."""
        batch_size = getattr(self.datamodule, "hparams", {}).get("batch_size")
        check = getattr(self.model, "check_batch_size", None)
        if batch_size is None or check is None:
            return
        try:
            check(batch_size)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

    def after_fit(self) -> None:
        """Close W&B runs so offline runs are complete on disk (summary, config, files) when ``fit`` returns."""
        if any(isinstance(logger, WandbLogger) for logger in self.trainer.loggers):
            import wandb

            if wandb.run is not None:
                wandb.run.finish()
            wandb.teardown()  # forget this run's settings (directory...) so a next in-process run starts clean


def main(args: list[str] | None = None, run: bool = True) -> AlignCLI | Path:
    """Run the CLI in-process, e.g. ``main(["fit", "--config", "configs/dpo.yaml", "--trainer.max_steps=2"])``;
    ``main(["export", "--ckpt_path", CKPT, "--out", DIR])`` writes a Hugging Face directory (``src.export``);
    ``main(["plot", RUN_DIR])`` a PNG of a run's curves (``src.plot``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        from src.export import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["plot"]:
        from src.plot import main as plot_main

        try:
            return plot_main(argv[1:])
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    return AlignCLI(
        AlignmentModule,
        AlignmentDataModule,
        subclass_mode_model=True,
        seed_everything_default=42,
        save_config_callback=LoggerSaveConfigCallback,
        parser_class=AlignArgumentParser,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"plugins": [{"class_path": "src.callbacks.checkpoint_io.AtomicCheckpointIO"}]},
        parser_kwargs={"parser_mode": "yaml"},
        args=args,
        run=run,
    )
