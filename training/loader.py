"""Loading batches in worker processes, in exactly the order of the stream, so resume stays exact.

The job's stream (``job.batches(start, decode=False)``) decides *which* samples form each batch
and the position after it; that part is cheap (tar reading and a seeded shuffle). Decoding (PNG,
stored latents and text states) is the expensive part, and it is what the workers do: with N
workers, every worker walks the same stream and decodes only batches i with i % N == its rank.
torch's DataLoader takes batches from its workers in turn, so batch i comes out i-th: the
sequence is the same as with no workers, and each batch carries the position after it, so a
checkpoint resumes at the exact batch whatever the worker count.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.streaming import Batch, DataPosition


class _Stream(IterableDataset):
    def __init__(self, job, start: DataPosition, part: tuple[int, int] = (0, 1)) -> None:
        self.job, self.start, self.part = job, start, part

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        rank, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for raw in itertools.islice(self.job.batches(self.start, decode=False), rank, None, n):
            yield raw.decode(self.part)


def load_batches(
    job, start: DataPosition, workers: int = 0, pin_memory: bool = False, part: tuple[int, int] = (0, 1)
) -> Iterator[Batch]:
    """The job's batches from ``start``: decoded here (``workers=0``) or by ``workers`` processes.
    With ``part=(rank, world)`` (a rank of an island) the job's stream makes global batches and
    only this rank's slice of each is decoded."""
    if workers <= 0:
        if part[1] == 1:
            return iter(job.batches(start))
        return (raw.decode(part) for raw in job.batches(start, decode=False))
    loader = DataLoader(
        _Stream(job, start, part),
        batch_size=None,  # the stream already makes batches
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4,
    )
    return iter(loader)
