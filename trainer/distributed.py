"""torch.distributed for the side trainer: process groups, wrapping, rank sync.

Started either by `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment:
one process per GPU, any number of nodes, nothing here changes) or by `spawn` for
`--procs N` on one machine. The backend is NCCL on CUDA and gloo on CPU.

Strategies:
- `ddp` (default): DistributedDataParallel over the whole model. Gradients are averaged
  across ranks every step, so the replicas stay identical.
- `fsdp2`: `torch.distributed.fsdp.fully_shard` on each dense block (Wukong, the sequence arch,
  trunk, towers, user tower) over a 1-D DeviceMesh, then on the root, which holds the
  embedding tables: parameters, gradients and optimizer state are sharded.
- `hsdp`: the same over a 2-D mesh (replicate across nodes x shard within a node).
FSDP2 here is for GPUs: on CPU (gloo) it is refused with a message. Only ddp on CPU-gloo
is validated on this project's machines (they have no GPU).

Rank 0 alone evaluates, exports and publishes; its decisions reach the other ranks
through `broadcast` (broadcast_object_list), so every rank takes the same shard, the same
gate decision and the same number of steps (see `rank_rows`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("ddp", "fsdp2", "hsdp")
# The GEM submodules that are dense compute (FSDP units of their own).
DENSE_BLOCKS = ("wukong", "sequence", "trunk", "towers", "user_tower")


class DistributedError(ValueError):
    """The requested distributed setup cannot run here."""


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # None: a single process, no process group
    strategy: str = "ddp"
    # Train on the GPU of this rank (LOCAL_RANK), else on the CPU.
    cuda: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.cuda else torch.device("cpu")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_strategy(strategy: str, cuda: bool | None = None) -> None:
    if strategy not in STRATEGIES:
        raise DistributedError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if strategy != "ddp" and not cuda:
        raise DistributedError(
            f"--strategy {strategy} shards the dense part with FSDP2 over NCCL and needs CUDA GPUs; "
            "this machine has none: use --strategy ddp (gloo on CPU)"
        )


def init(strategy: str = "ddp") -> Runtime:
    """Joins the process group described by the environment (torchrun or `spawn`); a
    plain single process (no RANK) gets a Runtime without a group."""
    check_strategy(strategy)
    if not launched_by_torchrun():
        return Runtime(strategy=strategy, cuda=torch.cuda.is_available())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    else:
        # Ranks on one machine share its cores; oversubscribing them slows every rank.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    log.debug("rank %d/%d joined (%s, %s)", rank, world, backend, strategy)
    return Runtime(rank, world, local_rank, local_world, backend, strategy, cuda=backend == "nccl")


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _spawned(local_rank: int, fn: Callable[..., Any], procs: int, port: int, args: tuple) -> None:
    # What torchrun would set, for one node.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), WORLD_SIZE=str(procs),
        LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(procs),
    )  # fmt: skip
    fn(*args)


def spawn(fn: Callable[..., Any], procs: int, *args: Any) -> None:
    """Runs fn(*args) in `procs` processes on this machine, as torchrun would; raises
    if any of them fails (and then stops the others)."""
    import torch.multiprocessing as mp

    from serving.local.ports import free_ports

    (port,) = free_ports(1)
    mp.spawn(_spawned, args=(fn, procs, port, args), nprocs=procs, join=True)


def wrap(model: nn.Module, rt: Runtime) -> nn.Module:
    """The model as trained: as is (one process), DDP, or FSDP2 units (sharded)."""
    model.to(rt.device)
    if not rt.distributed:
        return model
    if rt.strategy == "ddp":
        # Every parameter feeds the logits (each surface tower gets zero gradient rows,
        # not none), so no unused-parameter search per step.
        return DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.cuda else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if rt.strategy == "hsdp":
        if rt.world_size % rt.local_world_size:
            raise DistributedError(f"hsdp: world size {rt.world_size} is not nodes x {rt.local_world_size}")
        mesh = init_device_mesh(
            "cuda",
            (rt.world_size // rt.local_world_size, rt.local_world_size),
            mesh_dim_names=("replicate", "shard"),
        )
    else:
        mesh = init_device_mesh("cuda", (rt.world_size,), mesh_dim_names=("shard",))
    for name in DENSE_BLOCKS:
        block = getattr(model, name, None)
        if block is not None:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state_dict(model: nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU. A collective under FSDP2: every rank calls it."""
    if rt.distributed and rt.strategy != "ddp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return cast(dict[str, torch.Tensor], full)  # full_state_dict: plain tensors, no DTensor
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], rt: Runtime) -> None:
    """Sets every rank's weights to `state` (a collective under FSDP2, from rank 0's copy)."""
    if rt.distributed and rt.strategy != "ddp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # get_model_state_dict(cpu_offload=True) leaves the full state on rank 0 only.
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, cast(dict[str, Any], state), options=options)
        return
    unwrap(model).load_state_dict(state)


def rank_rows(n: int, rank: int, world: int) -> np.ndarray:
    """This rank's rows of an n-row shard: every world-th row from `rank`, cut to the same
    count on every rank (up to world - 1 rows dropped), so that all ranks take the same
    number of steps: a rank with one step more would wait forever in its all-reduce."""
    per_rank = n // world
    return np.arange(rank, per_rank * world, world)


def broadcast(obj: Any, rt: Runtime) -> Any:
    """Rank 0's `obj` on every rank (the others pass anything)."""
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def full_optimizer_state(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], rt: Runtime, snapshot: bool = False
) -> list[dict[str, Any]]:
    """The optimizers' whole state (what a checkpoint keeps to resume exactly); a
    collective under FSDP2, where it is whole on rank 0 only. `snapshot`: a copy that
    later steps do not change (else the live state, to be saved before the next step)."""
    if rt.distributed and rt.strategy != "ddp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return [get_optimizer_state_dict(model, opt, options=options) for opt in optimizers]
    # DDP: every rank steps on the same averaged gradients, so each holds the whole state.
    return [copy.deepcopy(opt.state_dict()) if snapshot else opt.state_dict() for opt in optimizers]


def load_optimizer_state(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], states: list[dict[str, Any]], rt: Runtime
) -> None:
    """Sets every rank's optimizer state to `states` (from rank 0's copy under FSDP2)."""
    if rt.distributed and rt.strategy != "ddp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        for opt, state in zip(optimizers, states, strict=True):
            set_optimizer_state_dict(model, opt, state, options=options)
        return
    for opt, state in zip(optimizers, states, strict=True):
        opt.load_state_dict(state)
