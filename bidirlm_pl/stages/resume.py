"""What a checkpoint needs beyond Lightning's own state for a resumed run to continue exactly.

Lightning restores weights, optimizer, learning-rate scheduler, loop counters and the data modules'
``state_dict`` (our streams' positions). Two things are added here:

* **RNG states of every rank** (torch CPU and CUDA, numpy, Python: dropout, GradCache's replays).
  They are gathered into the checkpoint when it is written and restored at the first training
  batch after resuming, after the data loader's iterator exists (creating it draws from the RNG).
* **A one-line error for a changed model**: the checkpoint's parameter names and shapes are
  compared with the configured model's before Lightning loads them.
"""

from __future__ import annotations

import random
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch

from bidirlm_pl.core.checkpoint_io import LIGHTNING_META, safe_torch_load
from bidirlm_pl.core.distributed import is_distributed
from bidirlm_pl.core.errors import BidirLMError

RNG_KEY = "bidirlm_rng_states"


def _rng_state() -> dict:
    """This process's RNG states in types a ``weights_only`` checkpoint load accepts (tensors, lists, ints)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["torch.cuda"] = torch.cuda.get_rng_state_all()
    return state


def collect_rng_states() -> list[dict]:
    """This process's RNG states, gathered from every rank (collective under DDP/FSDP: call on all ranks)."""
    mine = _rng_state()
    if not is_distributed():
        return [mine]
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return every


def rng_state_for_rank(states: list[dict] | None, rank: int, world: int) -> dict | None:
    """The saved RNG state of ``rank``, or None when the checkpoint was written by another world size."""
    if not states or len(states) != world:
        return None
    return states[rank]


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "torch.cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch.cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def check_same_model(saved: dict, current: dict[str, torch.Tensor], *, saved_model: str | None,
                     model: str) -> None:
    """One-line error when a checkpoint's weights do not fit the configured model (names or shapes)."""
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    reshaped = [k for k in current if k in saved and tuple(saved[k].shape) != tuple(current[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    if reshaped:
        k = reshaped[0]
        first = f"'{k}' is {tuple(saved[k].shape)} in the checkpoint but {tuple(current[k].shape)} in the model"
    else:
        first = f"'{(missing or unexpected)[0]}' is {'missing from' if missing else 'not in the model but in'} the checkpoint"
    raise BidirLMError(
        f"the checkpoint does not fit model '{model}' ({len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(reshaped)} reshaped tensors; {first}); resume with the model it was trained from"
        f"{f' ({saved_model!r})' if saved_model else ''}"
    )


def _saved_hparams(ckpt_path: Path) -> dict:
    """Hyperparameters of a Lightning checkpoint file or sharded checkpoint folder ({} if unreadable)."""

    source = ckpt_path / LIGHTNING_META if ckpt_path.is_dir() else ckpt_path
    if not source.is_file():
        return {}
    try:  # memory-mapped: the tensors (weights, optimizer moments) are not read for a few hyperparameters
        return dict(safe_torch_load(source, mmap=True).get("hyper_parameters") or {})
    except Exception as err:  # noqa: BLE001 - Lightning's own load reports an unreadable checkpoint in full
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"the stage options of checkpoint '{ckpt_path}' cannot be read safely "
                       f"({type(err).__name__}); they are not compared with the config")
        return {}


def _model_name(backbone) -> str | None:
    if backbone is None:
        return None
    if isinstance(backbone, str):
        return backbone
    return backbone.get("model") if hasattr(backbone, "get") else getattr(backbone, "model", None)


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve())


LIGHTNING_CKPT_WORDS = ("last", "best", "hpc", "registry")  # Lightning resolves these names itself


def check_resume(config, ckpt_path) -> None:
    """Before a resumed run: refuse a checkpoint of another stage or model, then print the options it overrides.

    One line when ``--ckpt_path`` was trained as another stage or from another model than configured
    (LightningCLI would otherwise silently replace the configured model with the checkpoint's); then every
    stage option the checkpoint overrides (LightningCLI restores a stage's options with its weights, so a
    changed value in the config would otherwise be dropped silently). The checkpoint is read once.
    """
    if not ckpt_path:
        return
    if str(ckpt_path) not in LIGHTNING_CKPT_WORDS and not Path(ckpt_path).exists():
        raise BidirLMError(f"ckpt_path '{ckpt_path}' does not exist; expected a checkpoint written by `bidirlm fit` "
                           "(a .ckpt file or a sharded folder) or 'last'")
    hparams = _saved_hparams(Path(ckpt_path))
    model = config.get("model") if hasattr(config, "get") else None
    if not hparams or model is None:
        return
    _check_same_stage_and_model(hparams, model, ckpt_path)
    changes = resumed_option_changes(hparams, model)
    if changes:
        print(f"resuming from {ckpt_path}: the checkpoint's stage options are used where the config differs:\n  "
              + "\n  ".join(changes), flush=True)


def _check_same_stage_and_model(hparams: dict, model, ckpt_path) -> None:
    saved_class, saved_model = hparams.get("_class_path"), _model_name(hparams.get("backbone"))
    class_path = model.get("class_path")
    configured = _model_name((model.get("init_args") or {}).get("backbone"))
    if saved_class and class_path and saved_class != class_path:
        raise BidirLMError(f"the checkpoint '{ckpt_path}' was written by {saved_class}, not the configured "
                           f"{class_path}; resume with the stage config it was trained with")
    if saved_model and configured and not _same_model(str(saved_model), str(configured)):
        raise BidirLMError(f"the checkpoint '{ckpt_path}' was trained from model '{saved_model}', but the config "
                           f"says '{configured}'; resume with the model it was trained from or start the stage "
                           "without --ckpt_path")


def _flat(value, prefix: str = "") -> dict:
    """Nested dicts / dataclasses / Namespaces as ``{"a.b": leaf}``."""

    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def resumed_option_changes(hparams: dict, model) -> list[str]:
    """The stage options that differ between a checkpoint's hyperparameters and the configured model."""
    saved = _flat({k: v for k, v in hparams.items() if not k.startswith("_")})
    given = _flat(model.get("init_args") or {})
    return [f"{key}: {saved[key]!r} in the checkpoint, {given[key]!r} in the config"
            for key in sorted(saved.keys() & given.keys()) if saved[key] != given[key]]
