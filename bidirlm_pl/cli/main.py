"""The ``bidirlm`` command: LightningCLI for fit/validate/test/predict (cli.fit), plus tool subcommands.

Tool subcommands live in their own modules of this package, each exposing ``add_arguments(parser)`` and
``main(args)``; register one by adding a line to ``TOOLS``. A subcommand's module is imported only when it
runs, so ``bidirlm --help`` and light commands (merge, similarity) start without torch or Lightning.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from bidirlm_pl.core.errors import PREEMPTED_EXIT, BidirLMError, Preempted

LIGHTNING_SUBCOMMANDS = {
    "fit": "train a stage from a YAML config (LightningCLI)",
    "validate": "run a stage's validation loop",
    "test": "run a stage's test loop",
    "predict": "run a stage's predict loop",
}

# name -> (module, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "assets": ("bidirlm_pl.cli.assets", "prepare offline assets (real Gemma3-270M, tiny test models); print paths"),
    "merge": ("bidirlm_pl.cli.merge", "merge checkpoints (linear, slerp, task_arithmetic, ties), streaming"),
    "similarity": ("bidirlm_pl.cli.similarity", "cosine similarity of two checkpoints, per tensor group"),
    "compare": ("bidirlm_pl.cli.compare", "compare models: causal perplexity, Lee Spearman, continuations"),
    "dependence": ("bidirlm_pl.cli.dependence",
                   "attention dependence: DP-before / DP-main / DP-after per length bucket and layer"),
    "compose": ("bidirlm_pl.cli.compose",
                "compose an omni model: merge text/VL/ASR backbones, attach their frozen towers"),
    "omni-encode": ("bidirlm_pl.cli.omni_encode", "embed sentences, images and audio clips with an omni model"),
    "run": ("bidirlm_pl.cli.pipeline", "run a recipe: chain stage configs, skip finished stages"),
    "export": ("bidirlm_pl.cli.export", "export a Lightning checkpoint as an HF (+ Sentence-Transformers) folder"),
    "mine": ("bidirlm_pl.cli.mine", "mine hard negatives for pair data with an encoder, filtered against the positive"),
}



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
            from bidirlm_pl.cli.fit import run_lightning  # lazy: Lightning loads only for these subcommands

            run_lightning(None if from_command_line else argv)
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
