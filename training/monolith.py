"""The monolith baseline: one model of the experts' preset trained on every cluster's shards.

It is what the K experts plus a router are compared against, so it gets the same training
compute: as many samples as all experts saw together (``equal_compute_steps``), the same preset,
batch size and learning rate, and the same loop. Its checkpoints live beside the experts'
(``<ckpt>/monolith/step_N``) and it samples as a one-expert ensemble.

On its way there it passes the experts' own step count S (``equal_wallclock_steps``): K machines
training the K experts side by side finish after S steps' time, so a monolith at step S is the
baseline at equal wall-clock. That checkpoint is kept (``<ckpt>/monolith_at_S/step_S``, hard
links) where the loop's pruning of ``<ckpt>/monolith`` cannot reach it.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from data.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, verify_checkpoint
from data.job_id import JobId
from data.manifest import Manifest
from data.streaming import Batch, DataPosition, RawBatch, stream_batches
from experts.presets import ExpertPreset
from experts.text_encoder import TextEncoder
from training.expert_job import ExpertJob
from training.loop import TrainConfig

MONOLITH = str(JobId.MONOLITH)  # the job's name: its checkpoint folder, its meta's kind, its rows' name


def monolith_objective(manifest: Manifest) -> str:
    """The experts' objective when they share one; flow matching for a mixed run."""
    objectives = {c.objective for c in manifest.clusters}
    return objectives.pop() if len(objectives) == 1 else "fm"


class MonolithJob(ExpertJob):
    """Every cluster's shards, interleaved by cluster size, into one model."""

    def __init__(
        self,
        manifest: Manifest,
        manifest_sha256: str,
        encoder: TextEncoder,
        space_name: str,
        encode_space,
        cfg: TrainConfig,
        preset: ExpertPreset | None = None,
    ) -> None:
        super().__init__(manifest, manifest_sha256, 0, encoder, space_name, encode_space, cfg, preset)
        self.cluster = -1
        self.objective = monolith_objective(manifest)
        self.name = f"monolith ({self.objective})"

    def batches(self, start: DataPosition, decode: bool = True) -> Iterator[Batch | RawBatch]:
        clusters = list(range(self.manifest.num_clusters))
        return stream_batches(
            self.manifest, clusters, self.batch_size, self.preset.image_size, self.seed, start, decode=decode
        )

    def meta(self) -> dict:
        return super().meta() | {"kind": MONOLITH}


def experts_samples_seen(ckpt_root: Path, num_experts: int) -> dict[int, int]:
    """Samples each expert's latest checkpoint under ``ckpt_root`` has trained on."""
    seen = {}
    for k in range(num_experts):
        ck = latest_checkpoint(JobId.expert(k).folder(ckpt_root))
        if ck is not None:
            seen[k] = int(ck.meta.get("samples_seen", 0))
    return seen


def equal_compute_steps(seen: dict[int, int], num_experts: int, batch_size: int) -> int:
    """Steps at ``batch_size`` that see as many samples as all K experts together."""
    missing = sorted(set(range(num_experts)) - set(seen))
    if missing:
        raise CheckpointError(
            f"experts {missing} have no checkpoint yet; the monolith's budget is the experts' total, "
            "so train them first (or give --steps)"
        )
    return max(1, math.ceil(sum(seen.values()) / batch_size))


def equal_wallclock_steps(seen: dict[int, int], samples_per_step: int) -> int:
    """Steps of ``samples_per_step`` that take as long as the slowest expert's training: K experts
    of one preset train side by side on K machines, so the run's wall-clock is its longest job."""
    if not seen:
        raise CheckpointError("no expert has a checkpoint yet; train them first")
    return max(1, math.ceil(max(seen.values()) / samples_per_step))


def wallclock_dir(ckpt_root: Path, step: int) -> Path:
    """Where the monolith's checkpoint at the experts' step ``step`` is kept."""
    return ckpt_root / f"{MONOLITH}_at_{step}"


def keep_checkpoint(ckpt: Checkpoint, dest_root: Path) -> Checkpoint:
    """Put checkpoint ``ckpt`` under ``dest_root`` as well (hard links where the file system allows,
    so no bytes are copied; a checkpoint's files are never rewritten in place), verified."""
    dest_root.mkdir(parents=True, exist_ok=True)
    final, tmp = dest_root / ckpt.path.name, dest_root / f".tmp_{ckpt.path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt.path, tmp, copy_function=_link_or_copy)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return verify_checkpoint(final, ckpt.sha256)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


class SingleExpertRouter(torch.nn.Module):
    """A router over one expert: lets the monolith sample through the routed sampler unchanged."""

    class _Config:
        num_experts = 1

    config = _Config()

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(x_t.shape[0], 1)
