"""The ``bidirlm`` command: LightningCLI for fit/validate/test/predict, plus tool subcommands.

Tool subcommands live in their own modules, each exposing ``add_arguments(parser)`` and
``main(args)``; register one by adding a line to ``TOOLS``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from bidirlm_pl.errors import PREEMPTED_EXIT, BidirLMError, Preempted

LIGHTNING_SUBCOMMANDS = {
    "fit": "train a stage from a YAML config (LightningCLI)",
    "validate": "run a stage's validation loop",
    "test": "run a stage's test loop",
    "predict": "run a stage's predict loop",
}

# name -> (module, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "assets": ("bidirlm_pl.assets_cli", "prepare offline assets (real Gemma3-270M, tiny test models); print paths"),
    "merge": ("bidirlm_pl.merging.cli", "merge checkpoints (linear, slerp, task_arithmetic, ties), streaming"),
    "similarity": ("bidirlm_pl.merging.similarity_cli", "cosine similarity of two checkpoints, per tensor group"),
    "compare": ("bidirlm_pl.evaluation.compare", "compare models: causal perplexity, Lee Spearman, continuations"),
    "dependence": ("bidirlm_pl.evaluation.dependence",
                   "attention dependence: DP-before / DP-main / DP-after per length bucket and layer"),
    "compose": ("bidirlm_pl.omni.compose",
                "compose an omni model: merge text/VL/ASR backbones, attach their frozen towers"),
    "omni-encode": ("bidirlm_pl.omni.encode_cli", "embed sentences, images and audio clips with an omni model"),
    "run": ("bidirlm_pl.pipeline", "run a recipe: chain stage configs, skip finished stages"),
    "export": ("bidirlm_pl.export_cli", "export a Lightning checkpoint as an HF (+ Sentence-Transformers) folder"),
}


HF_EXPORT = "bidirlm_pl.callbacks.HFExport"
ATOMIC_IO = "bidirlm_pl.atomic_checkpoints.AtomicCheckpointIO"
ATOMIC_MODEL_PARALLEL = "bidirlm_pl.atomic_checkpoints.AtomicModelParallelStrategy"
MODEL_PARALLEL = ("lightning.pytorch.strategies.ModelParallelStrategy",
                  "lightning.pytorch.strategies.model_parallel.ModelParallelStrategy", "ModelParallelStrategy")
PREEMPTION = "bidirlm_pl.callbacks.Preemption"


def _lightning_cli(argv: list[str] | None, *, export_dir: str | None = None):
    import lightning as L
    from jsonargparse import Namespace
    from lightning.pytorch.cli import LightningCLI

    from bidirlm_pl.stages.base import BackboneStage

    class BidirLMCLI(LightningCLI):
        def init_parser(self, **kwargs):
            # a bad option or value raises (main prints it on one line) instead of printing the usage and exiting
            return super().init_parser(**kwargs, exit_on_error=False)

        def add_arguments_to_parser(self, parser):
            # every DataModule takes the tokenizer of the model it feeds
            parser.link_arguments("model.init_args.backbone.model", "data.init_args.tokenizer")

        def _parse_ckpt_path(self):
            # LightningCLI replaces the configured model with the checkpoint's: refuse a silent swap first
            from bidirlm_pl.stages.resume import check_resume

            subcommand = self.config.get("subcommand")
            if subcommand == "fit":
                self._resume_after_preemption(self.config[subcommand])
            if subcommand:
                check_resume(self.config[subcommand], self.config[subcommand].get("ckpt_path"))
            super()._parse_ckpt_path()

        def _resume_after_preemption(self, config):
            """A fit stopped by a scheduler's signal left <default_root_dir>/preempted.ckpt: resume from it."""
            import os
            from pathlib import Path

            from bidirlm_pl.callbacks.preemption import PREEMPTED_CKPT

            preempted = Path(config["trainer"].get("default_root_dir") or os.getcwd()) / PREEMPTED_CKPT
            if config.get("ckpt_path") in (None, "last") and preempted.exists():  # a file, or FSDP2 shards
                print(f"resuming from {preempted} (the previous run of this config was preempted)", flush=True)
                config["ckpt_path"] = str(preempted)

        def before_instantiate_classes(self):
            from bidirlm_pl.preflight import check_fit_config

            config = self.config[self.subcommand] if self.subcommand else self.config
            check_fit_config(config)  # placement and batch mistakes: one line, before any process starts
            if self.subcommand == "fit":  # one run per output folder
                import os

                from bidirlm_pl.run_lock import acquire

                acquire(config["trainer"].get("default_root_dir") or os.getcwd())
            # default logging: CSV and TensorBoard side by side under the run's default_root_dir
            trainer = config["trainer"]
            if trainer.get("logger") in (None, True):
                root = trainer.get("default_root_dir") or "runs"
                trainer["logger"] = [
                    Namespace(class_path=f"lightning.pytorch.loggers.{cls}", init_args=Namespace(save_dir=root, name=name))
                    for cls, name in (("CSVLogger", "csv"), ("TensorBoardLogger", "tensorboard"))
                ]
            if export_dir is not None:
                self._redirect_outputs(trainer)
            self._add_safety_defaults(trainer)

        def _add_safety_defaults(self, trainer):
            """Atomic checkpoint writes and preemption handling for every fit, unless the config brings its own."""
            import os

            if self.subcommand not in (None, "fit"):
                return
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

        def _redirect_outputs(self, trainer):
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
                callbacks.append(Namespace(class_path=HF_EXPORT, init_args=Namespace(dirpath=export_dir,
                                                                                       every_n_steps=0)))
            trainer["callbacks"] = callbacks

    from bidirlm_pl import run_lock

    _check_config_files(sys.argv[1:] if argv is None else argv)
    count = run_lock.held()
    try:
        return _build(BidirLMCLI, BackboneStage, L, argv)
    finally:
        run_lock.release_since(count)  # the fit's own lock; an enclosing `bidirlm run` keeps its own


def _check_config_files(argv: list[str]) -> None:
    """Every ``--config``/``-c`` file exists and holds a YAML mapping (one line otherwise, before any import)."""
    from bidirlm_pl.yaml_files import read_yaml_mapping

    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1] if (
            arg in ("--config", "-c") and i + 1 < len(argv)) else None
        if path is not None and not path.lstrip().startswith(("{", "[")):  # inline YAML is the parser's
            read_yaml_mapping(path, "config", hint="see configs/")


def _build(cli_class, stage_class, L, argv):
    return cli_class(
        stage_class,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def run_lightning(argv: list[str], *, export_dir: str | None = None):
    """Run a LightningCLI subcommand in-process and return the CLI (``.model``, ``.trainer``).

    ``export_dir`` points every HFExport callback (one is added if the config has none) at that
    folder and the loggers at ``default_root_dir``: what ``bidirlm run`` uses for each stage.
    """
    return _lightning_cli(argv, export_dir=export_dir)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown option, missing or bad value) are one-line errors, not usage + exit."""

    def error(self, message):
        raise BidirLMError(f"{self.prog}: {message} ({self.prog} --help lists the options)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported (``--help`` imports none)."""
    parser = OneLineParser(
        prog="bidirlm",
        description="Turn causal decoder LLMs into bidirectional encoders (PyTorch Lightning).",
        epilog="Run 'bidirlm COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in LIGHTNING_SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    for name, (module, text) in TOOLS.items():
        tool = sub.add_parser(name, help=text, description=text)
        if name == command:
            importlib.import_module(module).add_arguments(tool)
    return parser


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            _lightning_cli(None if from_command_line else argv)
            return 0
        parser = build_parser(argv[0] if argv else None)
        if not argv:
            parser.print_help()
            return 0
        args = parser.parse_args(argv)
        module = importlib.import_module(TOOLS[args.command][0])
        return int(module.main(args) or 0)
    except BidirLMError as err:
        print(f"bidirlm: error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(f"bidirlm: {err}", file=sys.stderr)
        return PREEMPTED_EXIT
    except FileNotFoundError as err:
        print(f"bidirlm: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {err.filename}" if err.filename else ""
        print(f"bidirlm: error: the disk is full ({err.strerror or 'No space left on device'}){where}; "
              "the partial output was removed and earlier outputs are untouched: free space and rerun",
              file=sys.stderr)
        return 2
    except argparse.ArgumentError as err:  # LightningCLI's parser: a bad option, key or value
        message = parser_message(str(err))
        command = f" {argv[0]}" if argv else ""
        print(f"bidirlm: error: {message} (bidirlm{command} --help lists the options)", file=sys.stderr)
        return 2
    except ValueError as err:  # jsonargparse wraps errors raised while instantiating a config's classes
        cause = _bidirlm_cause(err)
        if cause is None:
            raise
        print(f"bidirlm: error: {cause}", file=sys.stderr)
        return 2


def parser_message(text: str) -> str:
    """jsonargparse's multi-line error as one line; for a class option, the class and its own problem only."""
    import re

    flat = " ".join(line.strip() for line in text.splitlines() if line.strip())
    nested = re.search(r"Problem with given class_path '([^']+)': (.*?)(?: - Expected a <class 'NoneType'>| - |$)", flat)
    if nested is None:
        return flat
    key = re.match(r'Parser key "([^"]+)"', flat)
    inner = re.sub(r'^Parser key "([^"]+)": ', r"\1: ", nested.group(2))
    return f"{key.group(1) if key else 'config'} ({nested.group(1)}): {inner}"


def _bidirlm_cause(err: BaseException) -> BidirLMError | None:
    """The BidirLMError behind a wrapped exception (jsonargparse's ValueError), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BidirLMError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
