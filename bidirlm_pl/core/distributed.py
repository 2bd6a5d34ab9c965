"""Process-group helpers every layer may use: is a group running, gather with gradients, full FSDP2 weights."""

from __future__ import annotations

import torch


def is_distributed() -> bool:
    """True under an initialised process group of more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def gather_with_grad(x_ND: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from every rank (gradients flow back to each rank); return it and this rank's offset."""
    if not is_distributed():
        return x_ND, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x_ND.contiguous())
    sizes = [p.shape[0] for p in parts]
    rank = torch.distributed.get_rank()
    return torch.cat(parts, dim=0), sum(sizes[:rank])


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights of an FSDP2-sharded module, on CPU. Collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
