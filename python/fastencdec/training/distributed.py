"""Multi-process training under ``torchrun``: DDP, or FSDP2 (``fully_shard``).

Only torch.distributed's own collectives are used. ``init_distributed()`` reads
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a single plain
process gets a :class:`DistInfo` with ``world_size == 1`` and nothing is started.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "init_distributed",
    "wrap_model",
    "unwrap_model",
    "no_grad_sync",
    "all_reduce_sum",
    "barrier",
    "full_model_state",
    "full_optimizer_state",
    "load_full_state",
    "STRATEGIES",
]

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None, backend: str | None = None,
                     ) -> DistInfo:
    """Join the process group torchrun set up (no-op for one process).

    ``device``: ``"cuda"`` (each rank takes ``cuda:LOCAL_RANK``), ``"cpu"``, or None
    (CUDA when available). ``backend`` defaults to nccl on CUDA and gloo on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for but CUDA is not available")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    elif dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def wrap_model(model: nn.Module, strategy: str, info: DistInfo, *,
               fsdp_block_types: tuple[type, ...] = ()) -> nn.Module:
    """Wrap for data parallelism. ``"none"`` returns the model unchanged.

    ``"fsdp"``: each module of ``fsdp_block_types`` (default: every module directly
    inside an ``nn.ModuleList``, i.e. the transformer blocks) is sharded on its own,
    then the root, as FSDP2 recommends.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none" or not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    mesh = None
    if info.device.type == "cpu":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (info.world_size,))
    blocks = [m for m in model.modules()
              if (fsdp_block_types and isinstance(m, fsdp_block_types))
              or (not fsdp_block_types and _in_module_list(model, m))]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _in_module_list(root: nn.Module, module: nn.Module) -> bool:
    return any(isinstance(parent, nn.ModuleList) and any(c is module for c in parent.children())
               for parent in root.modules())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 modifies the model in place)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, skip: bool):
    """Skip the gradient all-reduce for micro-batches before the last one of a step."""
    if not skip:
        yield
        return
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsdp_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(module: nn.Module, fsdp: bool) -> dict:
    """The whole model's state dict (FSDP: gathered on every rank, on the CPU)."""
    if not fsdp:
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_fsdp_options(cpu_offload=True))


def full_optimizer_state(module: nn.Module, optimizer, fsdp: bool) -> dict:
    """The optimizer's state dict (FSDP: full tensors; ``optimizer`` may be a
    :class:`~fastencdec.training.optim.HybridOptimizer`)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer.optimizers,
                                    options=_fsdp_options(cpu_offload=True))


def load_full_state(module: nn.Module, optimizer, model_state: dict, optim_state: dict,
                    fsdp: bool) -> None:
    if not fsdp:
        module.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(module, model_state, options=_fsdp_options())
    set_optimizer_state_dict(module, optimizer.optimizers, optim_state, options=_fsdp_options())
