"""``bidirlm run RECIPE.yaml``: chain stages (fit, merge, any bidirlm command), skipping finished ones.

A recipe::

    output_dir: runs/quickstart
    stages:
      - name: mntp                       # output: <output_dir>/mntp/hf
        fit: configs/mntp/gemma3-270m.yaml
        args: ["--trainer.max_steps=30"]
      - name: merged
        command: [merge, --models, "${mntp}", gemma3-270m, --weights, "0.5", "0.5", --output, "${out}"]
      - name: contrastive
        fit: configs/contrastive/gemma3-270m.yaml   # or a list: [base, fragment, ...] (repeated --config)
        model: "${merged}"

``${name}`` is the HF folder a finished stage produced, ``${out}`` the current stage's own HF
folder. A stage whose folder holds a ``DONE`` marker is skipped, so a rerun resumes where a
previous one stopped.
"""

from __future__ import annotations

import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from bidirlm_pl.cli import main as cli
from bidirlm_pl.cli.fit import run_lightning
from bidirlm_pl.core import run_lock
from bidirlm_pl.core.checkpoint_io import is_sharded_checkpoint
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.yaml_files import read_yaml_mapping

STAGE_KEYS = {"name", "fit", "args", "model", "command"}


@dataclass
class Stage:
    name: str
    fit: str | list[str] | None = None  # one stage config, or a base and its fragments in order
    args: list[str] = field(default_factory=list)
    model: str | None = None
    command: list[str] | None = None


def load_recipe(path: str | Path) -> tuple[Path, list[Stage]]:
    path = Path(path)
    recipe = read_yaml_mapping(path, "recipe", hint="see configs/recipes/")
    stages = []
    for i, raw in enumerate(recipe.get("stages") or []):
        unknown = set(raw) - STAGE_KEYS
        if unknown or "name" not in raw or (("fit" in raw) == ("command" in raw)):
            raise BidirLMError(
                f"stage {i} of '{path}' must have a name and exactly one of 'fit' or 'command' "
                f"(allowed keys {sorted(STAGE_KEYS)}), got {sorted(raw)}"
            )
        fit = raw.get("fit")
        if fit is not None and not (isinstance(fit, str) or (
                isinstance(fit, list) and fit and all(isinstance(f, str) for f in fit))):
            raise BidirLMError(f"stage '{raw['name']}' of '{path}': fit {fit!r} is not a config path or a list of "
                               "config paths (a stage base, then its fragments)")
        stages.append(Stage(**raw))
    if not stages:
        raise BidirLMError(f"recipe '{path}' lists no stages")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise BidirLMError(f"recipe '{path}' repeats a stage name: {names}")
    return Path(recipe.get("output_dir", "runs/" + path.stem)), stages


def _substitute(value: str, outputs: dict[str, str]) -> str:
    def repl(match):
        key = match.group(1)
        if key not in outputs:
            raise BidirLMError(f"'${{{key}}}' names no earlier stage; known: {sorted(outputs)}")
        return outputs[key]

    return re.sub(r"\$\{([^}]+)\}", repl, value)


def latest_checkpoint(logs: Path) -> Path | None:
    """The newest complete Lightning checkpoint a half-finished fit stage left under its logs folder.

    A checkpoint cut short by a kill during its write is not a complete zip archive (or, sharded,
    a folder without its ``.metadata`` index, which is written last): it is skipped (and reported)
    in favour of the one before it.
    """


    found = list(logs.glob("**/*.ckpt")) if logs.is_dir() else []
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        if (path.is_file() and zipfile.is_zipfile(path)) or is_sharded_checkpoint(path):
            return path
        print(f"skipping the incomplete checkpoint {path} (its write was interrupted)", flush=True)
    return None


WRITE_OPTIONS = ("--output", "default_root_dir", "dirpath", "save_dir")


def check_writes_inside(stage: Stage, argv: list[str], root: Path) -> None:
    """A recipe writes only under its output folder: every output-like option must point inside ``root``."""
    root = root.resolve()
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if not any(key.endswith(option) for option in WRITE_OPTIONS):
            continue
        target = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        resolved = Path(target).expanduser().resolve()
        if target and resolved != root and root not in resolved.parents:
            raise BidirLMError(f"stage '{stage.name}' writes to '{resolved}' ({key}), outside the recipe's output "
                               f"folder '{root}'; use ${{out}} or a path under the output folder")


def run_stage(stage: Stage, out: Path, outputs: dict[str, str]) -> None:

    scope = {**outputs, "out": str(out)}
    if stage.command is not None:
        argv = [_substitute(str(a), scope) for a in stage.command]
        check_writes_inside(stage, argv, out.parent.parent)
        code = cli.main(argv)
        if code:
            raise BidirLMError(f"stage '{stage.name}' failed: bidirlm {' '.join(argv)} exited {code}")
        return
    configs = [stage.fit] if isinstance(stage.fit, str) else list(stage.fit)
    argv = ["fit", *[arg for config in configs for arg in ("--config", config)],
            "--trainer.default_root_dir", str(out.parent / "logs")]
    if stage.model is not None:
        argv += ["--model.init_args.backbone.model", _substitute(stage.model, scope)]
    argv += [_substitute(str(a), scope) for a in stage.args]
    check_writes_inside(stage, argv, out.parent.parent)
    checkpoint = latest_checkpoint(out.parent / "logs")
    if checkpoint is not None and "--ckpt_path" not in argv:
        print(f"[{stage.name}] resuming from {checkpoint} (a previous run stopped before the end)", flush=True)
        argv += ["--ckpt_path", str(checkpoint)]
    run_lightning(argv, export_dir=str(out))


def run_recipe(path: str | Path, *, output_dir: str | None = None, force: bool = False) -> dict[str, str]:

    root, stages = load_recipe(path)
    root = Path(output_dir) if output_dir else root
    count = run_lock.held()
    run_lock.acquire(root)  # one run per output folder: a second `bidirlm run` into it fails in one line
    try:
        return _run_stages(stages, root, force)
    finally:
        run_lock.release_since(count)


def _run_stages(stages: list[Stage], root: Path, force: bool) -> dict[str, str]:
    outputs: dict[str, str] = {}
    for stage in stages:
        out = root / stage.name / "hf"
        done = out / "DONE"
        if done.exists() and not force:
            print(f"[{stage.name}] finished earlier: {out}")
        else:
            if force and stage.fit is not None and (out.parent / "logs").exists():
                shutil.rmtree(out.parent / "logs")  # --force starts the stage over, not from its checkpoint
            print(f"[{stage.name}] running -> {out.resolve()}")
            start = time.time()
            run_stage(stage, out, outputs)
            if not out.is_dir():
                raise BidirLMError(f"stage '{stage.name}' produced no folder at {out}")
            done.write_text(f"{time.time() - start:.1f} s\n")
            print(f"[{stage.name}] done in {time.time() - start:.0f} s")
        outputs[stage.name] = str(out)
    return outputs


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see configs/recipes/)")
    parser.add_argument("--output-dir", help="override the recipe's output_dir")
    parser.add_argument("--force", action="store_true", help="rerun stages that finished earlier")


def main(args) -> int:
    outputs = run_recipe(args.recipe, output_dir=args.output_dir, force=args.force)
    for name, folder in outputs.items():
        print(f"{name}: {folder}")
    return 0
