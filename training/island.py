"""A compute island: one job trained by several processes (GPUs, or CPU processes) together with
torch.distributed, started by ``torchrun``.

Within an island everything is data-parallel and exact:

* every rank walks the job's sample stream and decodes only its own slice of each global batch
  (rank r takes rows [r·b, (r+1)·b) of the global batch of N·b samples), so the position after a
  global batch is the same on every rank and a checkpoint resumes exactly, with any N;
* random draws of a loss (noise, times, caption dropout) are made for the whole global batch and
  sliced (:meth:`data.streaming.Batch.draw`), so N processes see the numbers one process would;
* gradients are averaged by DistributedDataParallel; the logged loss is the global mean;
* only rank 0 writes checkpoints, logs and (in a swarm) talks to the DHT; a stop decided by any
  rank (a signal, rank 0's lost claim, the time budget) is agreed on by all at the same step.

Global batch = per-process batch × N × accum. By default the per-process batch is the preset's
divided by N, so the global batch, and with it the preset's learning rate, is the preset's.
"""

from __future__ import annotations

import datetime
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT_S = 120.0  # a training collective that waits this long fails instead of hanging
CONTROL_TIMEOUT_S = 7 * 24 * 3600.0  # rank 0 may wait for a free job for days between jobs


class IslandError(RuntimeError):
    """A rank of the island is gone or the island cannot form."""


@dataclass
class Island:
    rank: int
    world: int
    local_rank: int
    _control: object = None  # a gloo group for rank 0's messages (JSON, never pickle)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Island | None:
        """The island torchrun started this process in; ``None`` for a plain single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # An island of one is only for measuring the DDP wrapper's own cost (benchmarks/island.py).
        if world <= 1 and os.environ.get("DIFFSWARM_ISLAND_OF_ONE") != "1":
            return None
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def join(self, device: torch.device) -> None:
        """Form the process group: NCCL between GPUs, gloo between CPU processes."""
        if dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
            self._control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
        except Exception as e:  # torch raises several types; all mean the island did not form
            raise IslandError(f"could not form the island of {self.world} processes: {e}") from None

    def device(self, device: str) -> str:
        """Each rank's own GPU (cuda → cuda:LOCAL_RANK); the CPU stays the CPU."""
        return f"cuda:{self.local_rank}" if device == "cuda" else device

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the ranks (every rank gets it)."""
        out = value.detach().float().clone()
        self._collective(dist.all_reduce, out)
        return out / self.world

    def any_of(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag True on every rank if it is True on any: how the island agrees to stop, or
        to save, at one step (one collective for all of them)."""
        t = torch.tensor([1 if f else 0 for f in flags], device=device)
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def barrier(self) -> None:
        self._collective(dist.barrier)

    def tell(self, message: dict | None) -> None:
        """Rank 0: send ``message`` (JSON; ``None``: the island is done) to every other rank."""
        data = json.dumps(message).encode()
        self._collective(dist.broadcast, torch.tensor([len(data)], dtype=torch.long), src=0, group=self._control)
        self._collective(
            dist.broadcast, torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=self._control
        )

    def hear(self) -> dict | None:
        """Ranks 1..N-1: wait for rank 0's next message."""
        n = torch.zeros(1, dtype=torch.long)
        self._collective(dist.broadcast, n, src=0, group=self._control)
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
        self._collective(dist.broadcast, buf, src=0, group=self._control)
        return json.loads(bytes(buf.tolist()).decode())

    def _collective(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # gloo/NCCL errors when a peer process is gone
            raise IslandError(f"rank {self.rank} of {self.world}: another rank of the island is gone ({e})") from None

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def forward_through(job, wrapped: torch.nn.Module | None):
    """Let ``job.loss`` run its forward pass through the DDP wrapper (which syncs gradients), while
    everything else (saving, evaluating) keeps seeing the plain network."""
    if wrapped is None:
        yield
        return
    plain = job.model
    job.model = wrapped
    try:
        yield
    finally:
        job.model = plain
