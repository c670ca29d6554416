"""Processes under torchrun: who this process is, and the process group the stages share.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; without them this is a
world of one and nothing is initialised. Stages open the group with `process_group()`
(gloo on the CPU, nccl on CUDA) and talk through the returned `Dist`.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from hant.errors import HantError

__all__ = ["Dist", "from_env", "process_group"]


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks (world 1 when not under torchrun) and its device.

    The collective helpers do nothing in a world of one, so a stage calls them unconditionally.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=_default_device)

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes shared files and logs."""
        return self.rank == 0

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (picklable)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def agree(self, error: str | None) -> None:
        """Raise HantError(error) on every rank when any rank has one (the first, by rank), so
        that no rank waits forever for one that could not start. Returns None otherwise."""
        first = next((e for e in self.gather(error) if e), None)
        if first:
            raise HantError(first)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            torch.distributed.barrier()


def from_env() -> Dist:
    """This process's ranks from torchrun's environment, and its device (cuda:LOCAL_RANK when
    CUDA is available, else the CPU). Reads only; initialises nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    return Dist(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=local,
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
                device=torch.device("cuda", local) if cuda else torch.device("cpu"))


@contextlib.contextmanager
def process_group(timeout: datetime.timedelta | None = None) -> Iterator[Dist]:
    """Join torchrun's process group for the duration of the block; yields `from_env()`.

    On CUDA the process's device is made current first. With WORLD_SIZE > 1 the group is
    initialised (nccl on CUDA, gloo on the CPU; `timeout` bounds every collective, None:
    torch's default) unless it already is, and destroyed on the way out if initialised here.
    """
    d = from_env()
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
    own = False
    if d.world > 1 and not torch.distributed.is_initialized():
        kwargs = {"timeout": timeout} if timeout is not None else {}
        torch.distributed.init_process_group(backend="nccl" if d.device.type == "cuda" else "gloo", **kwargs)
        own = True
    if d.world > 1:
        # The group may count ranks differently from the environment (an outer caller made it).
        d = Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(),
                 local_rank=d.local_rank, local_world=d.local_world, device=d.device)
    try:
        yield d
    finally:
        if own and torch.distributed.is_initialized():
            # A DistributedDataParallel wrapper kept alive by a reference cycle would otherwise
            # be freed at interpreter exit, after the group is gone, and its reducer's threads
            # abort the process ("terminate called without an active exception", seen once in
            # the two-process fine-tuning test under load): free it while the group exists.
            gc.collect()
            torch.distributed.destroy_process_group()
