"""torchrun's environment: rank, world size, the process group, and the few collectives
vaelab needs. One process is rank 0 of a world of one, with no process group.

Under `torchrun --nproc-per-node N -m vaelab ...` every rank computes and rank 0 alone
writes files and shows progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import VaelabError


class PeerFailed(VaelabError):
    """Another rank stopped with an error (it printed the reason)."""


@dataclass(frozen=True)
class World:
    """Where this process stands: rank of size, its GPU on the node, and how often torchrun
    restarted the group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restarts: int = 0
    torchrun: bool = False  # launched by torchrun (then even a world of one joins a process group)
    run_id: str = ""        # torchrun's id of the job, the same across its restarts

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.torchrun or self.size > 1


SINGLE = World()


def from_environment(env=os.environ) -> World:
    """The world torchrun describes in the environment; one process without it."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return SINGLE
    return World(rank=int(env["RANK"]), size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                 restarts=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)), torchrun=True,
                 run_id=env.get("TORCHELASTIC_RUN_ID", ""))


def pick_device(name: str, world: World = SINGLE) -> torch.device:
    """'auto' means CUDA when there is a GPU, else the CPU; on CUDA each rank takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise VaelabError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "cpu":
        return torch.device("cpu")
    if world.distributed:
        count = torch.cuda.device_count()
        if world.local_rank >= count:
            raise VaelabError(f"this node has {count} GPU{'s' if count != 1 else ''} but torchrun started local "
                              f"rank {world.local_rank}: use --nproc-per-node {count} at most, or --device cpu")
        torch.cuda.set_device(world.local_rank)  # so that nothing of this rank lands on GPU 0
        return torch.device("cuda", world.local_rank)
    return torch.device("cuda")


def _store(world: World, env=os.environ) -> dist.Store:
    """The key-value store the ranks meet in: torchrun's (its agent's, or one rank 0 hosts), seen
    under a prefix of this attempt. After torchrun restarted the group, the store still holds the
    keys of the attempt before, such as the killed ranks' addresses; read under the same prefix,
    they made gloo connect to ports nobody listened on any more."""
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.size,
                          is_master=not agent and world.main, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"vaelab/attempt-{world.restarts}", store)


def start(world: World) -> None:
    """Join the process group (gloo for CPU tensors, NCCL for CUDA ones); nothing for one process."""
    if world.distributed and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=_store(world), rank=world.rank, world_size=world.size)


def finish(world: World) -> None:
    """Wait until every rank is done: a rank that left the group while another still wrote its
    files was seen to abort in gloo's threads at exit."""
    if world.distributed and dist.is_initialized():
        dist.barrier()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_min(t: torch.Tensor, world: World) -> torch.Tensor:
    """The least of t over the ranks, in place (t itself for one process)."""
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of t over the ranks, in place (t itself for one process)."""
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def share(obj, world: World):
    """Rank 0's obj (any picklable value), on every rank."""
    if not world.distributed:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_result(make, world: World):
    """Run make() on rank 0 and give its result to every rank. If it raised, rank 0 raises
    it and the other ranks raise PeerFailed, so no rank is left waiting."""
    if not world.distributed:
        return make()
    result, error = None, None
    if world.main:
        try:
            result = make()
        except Exception as e:  # passed on below, after the other ranks have heard
            error = e
    ok, result = share((error is None, result if error is None else None), world)
    if error is not None:
        raise error
    if not ok:
        raise PeerFailed("rank 0 stopped with an error; its message says why")
    return result
