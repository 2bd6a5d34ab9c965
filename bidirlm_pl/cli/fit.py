"""``bidirlm fit|validate|test|predict``: LightningCLI over a stage and a DataModule, from YAML.

The one place the CLI changes a user's config is :func:`complete_config`, a named step run on the parsed
config before any class is built: default loggers, atomic checkpoint writes, preemption handling, and under
``bidirlm run`` the stage's output folder.
"""

from __future__ import annotations

import contextvars
import os
import sys
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from bidirlm_pl.callbacks.preemption import PREEMPTED_CKPT
from bidirlm_pl.cli.preflight import check_fit_config
from bidirlm_pl.core import run_lock
from bidirlm_pl.core.yaml_files import read_yaml_mapping
from bidirlm_pl.stages.base import BackboneStage
from bidirlm_pl.stages.resume import check_resume

HF_EXPORT = "bidirlm_pl.callbacks.HFExport"
ATOMIC_IO = "bidirlm_pl.stages.atomic_checkpoints.AtomicCheckpointIO"
ATOMIC_MODEL_PARALLEL = "bidirlm_pl.stages.atomic_checkpoints.AtomicModelParallelStrategy"
MODEL_PARALLEL = ("lightning.pytorch.strategies.ModelParallelStrategy",
                  "lightning.pytorch.strategies.model_parallel.ModelParallelStrategy", "ModelParallelStrategy")
PREEMPTION = "bidirlm_pl.callbacks.Preemption"
LOGGERS = (("CSVLogger", "csv"), ("TensorBoardLogger", "tensorboard"))


def add_default_loggers(trainer: Namespace) -> None:
    """CSV and TensorBoard side by side under the run's ``default_root_dir``, unless the config names loggers."""
    if trainer.get("logger") in (None, True):
        root = trainer.get("default_root_dir") or "runs"
        trainer["logger"] = [Namespace(class_path=f"lightning.pytorch.loggers.{cls}",
                                       init_args=Namespace(save_dir=root, name=name)) for cls, name in LOGGERS]


def add_safety_defaults(trainer: Namespace) -> None:
    """Atomic checkpoint writes and preemption handling for every fit, unless the config brings its own."""
    strategy = trainer.get("strategy")
    if isinstance(strategy, Namespace) and strategy.class_path in MODEL_PARALLEL:
        strategy.class_path = ATOMIC_MODEL_PARALLEL  # sharded checkpoint folders renamed into place
    plugins = trainer.get("plugins")
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
    if not any(isinstance(p, Namespace) and "CheckpointIO" in p.class_path for p in plugins):
        plugins.append(Namespace(class_path=ATOMIC_IO, init_args=Namespace()))
        trainer["plugins"] = plugins
    callbacks = list(trainer.get("callbacks") or [])
    if not any(isinstance(c, Namespace) and c.class_path.endswith("Preemption") for c in callbacks):
        root = str(trainer.get("default_root_dir") or os.getcwd())
        callbacks.append(Namespace(class_path=PREEMPTION, init_args=Namespace(dirpath=root, signals=None)))
        trainer["callbacks"] = callbacks


def redirect_outputs(trainer: Namespace, export_dir: str) -> None:
    """Under `bidirlm run`: logs under the stage's root, the final HF export into the stage folder."""
    root = trainer.get("default_root_dir")
    for logger in trainer.get("logger") or []:
        if root and isinstance(logger, Namespace) and "save_dir" in (logger.get("init_args") or {}):
            logger.init_args.save_dir = root
    callbacks = list(trainer.get("callbacks") or [])
    exports = [c for c in callbacks if isinstance(c, Namespace) and c.class_path.endswith("HFExport")]
    for callback in exports:
        callback.init_args.dirpath = export_dir
    if not exports:
        callbacks.append(Namespace(class_path=HF_EXPORT, init_args=Namespace(dirpath=export_dir, every_n_steps=0)))
    trainer["callbacks"] = callbacks


def complete_config(config: Namespace, subcommand: str | None, export_dir: str | None) -> None:
    """The effective config: the user's, plus the defaults above (see the module docstring)."""
    trainer = config["trainer"]
    add_default_loggers(trainer)
    if export_dir is not None:
        redirect_outputs(trainer, export_dir)
    if subcommand in (None, "fit"):
        add_safety_defaults(trainer)


def resume_after_preemption(config: Namespace) -> None:
    """A fit stopped by a scheduler's signal left <default_root_dir>/preempted.ckpt: resume from it."""
    preempted = Path(config["trainer"].get("default_root_dir") or os.getcwd()) / PREEMPTED_CKPT
    if config.get("ckpt_path") in (None, "last") and preempted.exists():  # a file, or FSDP2 shards
        print(f"resuming from {preempted} (the previous run of this config was preempted)", flush=True)
        config["ckpt_path"] = str(preempted)


class BidirLMCLI(LightningCLI):
    """LightningCLI with one-line parser errors, a linked tokenizer, resume checks and :func:`complete_config`."""

    def __init__(self, *args, export_dir: str | None = None, **kwargs):
        self.export_dir = export_dir
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs):
        # a bad option or value raises (main prints it on one line) instead of printing the usage and exiting
        return super().init_parser(**kwargs, exit_on_error=False)

    def add_arguments_to_parser(self, parser):
        # every DataModule takes the tokenizer of the model it feeds
        parser.link_arguments("model.init_args.backbone.model", "data.init_args.tokenizer")

    def _parse_ckpt_path(self):
        # LightningCLI replaces the configured model with the checkpoint's: refuse a silent swap first
        subcommand = self.config.get("subcommand")
        if subcommand == "fit":
            resume_after_preemption(self.config[subcommand])
        if subcommand:
            check_resume(self.config[subcommand], self.config[subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def before_instantiate_classes(self):
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_fit_config(config)  # placement and batch mistakes: one line, before any process starts
        if self.subcommand == "fit":  # one run per output folder
            run_lock.acquire(config["trainer"].get("default_root_dir") or os.getcwd())
        complete_config(config, self.subcommand, self.export_dir)


def check_config_files(argv: list[str]) -> None:
    """Every ``--config``/``-c`` file exists and holds a YAML mapping (one line otherwise, before parsing)."""
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1] if (
            arg in ("--config", "-c") and i + 1 < len(argv)) else None
        if path is not None and not path.lstrip().startswith(("{", "[")):  # inline YAML is the parser's
            read_yaml_mapping(path, "config", hint="see configs/")


def run_lightning(argv: list[str] | None, *, export_dir: str | None = None) -> BidirLMCLI:
    """Run a LightningCLI subcommand in-process and return the CLI (``.model``, ``.trainer``).

    ``argv`` None reads ``sys.argv``. ``export_dir`` points every HFExport callback (one is added if the
    config has none) at that folder and the loggers at ``default_root_dir``: what ``bidirlm run`` uses for
    each stage.
    """
    check_config_files(sys.argv[1:] if argv is None else argv)
    count = run_lock.held()
    try:
        # jsonargparse keeps parse state in context variables (the instantiated classes among it): a fresh
        # context per run lets the previous stage's model be freed when `bidirlm run` starts the next one.
        return contextvars.copy_context().run(
            BidirLMCLI, BackboneStage, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            args=argv, seed_everything_default=0, save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False, export_dir=export_dir,
        )
    finally:
        run_lock.release_since(count)  # the fit's own lock; an enclosing `bidirlm run` keeps its own
