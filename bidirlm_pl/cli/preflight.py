"""Checks of a parsed ``bidirlm fit`` config before anything is built or launched.

Mistakes in the trainer's placement (a GPU config on a CPU machine, more devices than exist), or a
batch that cannot be split over the processes, otherwise surface after model loading, from every
spawned process, as multi-line Lightning or NCCL tracebacks. Here each is one line saying what to change.
"""

from __future__ import annotations

import os

import torch

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.global_batches import per_rank_batch_size

GPU_ACCELERATORS = ("gpu", "cuda")


def _get(namespace, key, default=None):
    if namespace is None:
        return default
    value = namespace.get(key, default) if hasattr(namespace, "get") else getattr(namespace, key, default)
    return default if value is None else value


def _strategy_name(strategy) -> str:
    if isinstance(strategy, str):
        return strategy
    class_path = _get(strategy, "class_path", "")
    return str(class_path).rpartition(".")[2] or type(strategy).__name__


def _device_count(devices, available: int) -> int | None:
    """Processes per node the ``devices`` value asks for (None when Lightning decides: 'auto')."""
    if isinstance(devices, str):
        devices = devices.strip()
        if devices == "auto":
            return None
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()])
        devices = int(devices)
    if isinstance(devices, list | tuple):
        return len(devices)
    return available if devices == -1 else int(devices)


def check_trainer(trainer) -> int | None:
    """Validate accelerator, strategy and devices; return the world size when it is known."""
    accelerator = str(_get(trainer, "accelerator", "auto")).lower()
    strategy = _strategy_name(_get(trainer, "strategy", "auto"))
    has_cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if has_cuda else 0
    on_gpu = accelerator in GPU_ACCELERATORS or (accelerator == "auto" and has_cuda)
    if accelerator in GPU_ACCELERATORS and not has_cuda:
        raise BidirLMError(f"trainer.accelerator '{accelerator}' needs a CUDA GPU but this machine has none; "
                           "use --trainer.accelerator cpu (or configs/trainer/cpu.yaml / fsdp2.yaml on CPU)")
    if strategy.lower() in ("fsdpstrategy", "fsdp") and not on_gpu:
        raise BidirLMError(f"trainer.strategy {strategy} (FSDP1) runs on GPUs only; on CPU use "
                           "configs/trainer/fsdp2.yaml (ModelParallelStrategy, gloo) or strategy ddp")
    available = gpus if on_gpu else (os.cpu_count() or 1)
    devices = _get(trainer, "devices", "auto")
    try:
        count = _device_count(devices, available)
    except ValueError as err:
        raise BidirLMError(f"trainer.devices {devices!r} is not a number, a list of indices, -1 or 'auto'") from err
    if count is not None and count < 1:
        raise BidirLMError(f"trainer.devices {devices!r} asks for no device; use a positive number, -1 (all) or 'auto'")
    kind = "GPU(s)" if on_gpu else "CPU core(s)"
    if count is not None and count > available:
        raise BidirLMError(f"trainer.devices {devices} asks for {count} processes per node but this machine has "
                           f"{available} {kind}; use at most {available}")
    if on_gpu and isinstance(devices, list | tuple) and devices and max(int(d) for d in devices) >= gpus:
        raise BidirLMError(f"trainer.devices {list(devices)} names a GPU index >= the {gpus} GPU(s) of this machine")
    nodes = int(_get(trainer, "num_nodes", 1))
    if nodes < 1:
        raise BidirLMError(f"trainer.num_nodes {nodes} must be >= 1")
    return None if count is None else count * nodes


def check_batches(config, world: int | None) -> None:
    """Global batch divisible by the world size; GradCache chunks no larger than the per-process batch.

    This is the only GradCache chunk check (``gradcache_chunk_size`` of the contrastive stages, see
    ``bidirlm_pl.stages.contrastive.ContrastiveCore``): it fails here, before any process starts.
    """
    data = _get(_get(config, "data"), "init_args")
    model = _get(_get(config, "model"), "init_args")
    global_batch = _get(data, "global_batch_size")
    per_rank = _get(data, "batch_size")
    if global_batch is not None and world:

        per_rank = per_rank_batch_size(int(per_rank or 1), int(global_batch), world)
    chunk = _get(model, "gradcache_chunk_size")
    if chunk is not None and per_rank is not None and (global_batch is None or world) and int(chunk) > int(per_rank):
        split = f" (global batch {global_batch} over {world} processes)" if global_batch is not None else ""
        raise BidirLMError(f"gradcache_chunk_size {chunk} is larger than the per-process batch {per_rank}{split}; set "
                           f"it to at most {per_rank}, or null to embed each batch at once")


def check_fit_config(config) -> None:
    """Every preflight check of one subcommand's config (``cli.config['fit']``)."""
    world = check_trainer(_get(config, "trainer"))
    check_batches(config, world)
