"""Process-group setup for ``torchrun`` (single node, multi-node rendezvous) and gradient averaging.

Launched without torchrun everything degrades to one process. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0  # global rank
    world_size: int = 1
    local_rank: int = 0  # GPU index on this node
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group (reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo, group=None) -> None:
    """Data-parallel gradient sync (what DDP does, once per optimizer step after accumulation): one all-reduce
    over a flat buffer of all trainable gradients, divided by the world size. Missing grads count as zero.
    ``group``: a process subgroup of ``info.world_size`` ranks (default: all ranks)."""
    if info.world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def all_mean(value: Tensor, info: DistInfo) -> Tensor:
    """Mean of a tensor over ranks (for logging)."""
    if info.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size


def any_rank(flag: bool, info: DistInfo, group=None) -> bool:
    """True on every rank if ``flag`` is set on any rank (e.g. SIGTERM reached only some ranks): all ranks then stop
    after the same step instead of deadlocking in the next collective. ``group``: a subgroup of ``info.world_size``."""
    if info.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


# FSDP: shard the frozen base (and the adapters inside each block) across ranks


def shard_flux(flux: torch.nn.Module, info: DistInfo) -> None:
    """FSDP2 ``fully_shard`` on every module that owns parameters, then on the whole model: each rank keeps
    1/world of the weights and gathers a module's weights only while it runs; gradients are reduce-scattered
    (averaged) by FSDP. Not per block: ComfyUI's blocks add to their inputs in place, which FSDP's input hooks
    forbid, and they call sub-layers such as ``img_attn.qkv`` directly rather than through ``img_attn``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    owners = [m for name, m in flux.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    for module in reversed(owners):  # children before parents
        fully_shard(module, mesh=mesh)
    fully_shard(flux, mesh=mesh)


def is_sharded(params: list[torch.nn.Parameter]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def full_trainable_state(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, Tensor]:
    """Unsharded CPU copies of the trainable parameters (a collective under FSDP: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone() for n, p in named}


def load_trainable_state(named: list[tuple[str, torch.nn.Parameter]], state: dict[str, Tensor]) -> None:
    """Copy full tensors into (possibly sharded) parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for n, p in named:
            value = state[n].to(p.device, p.dtype)
            p.copy_(distribute_tensor(value, p.device_mesh, p.placements) if isinstance(p, DTensor) else value)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
