"""A checkpoint's loss on the run's held-out shards, measured the same way by everyone.

Verifiers use it to refuse checkpoints whose weights carry a valid hash but are garbage (the
poisoned case): the loss of a job's network on a fixed set of held-out batches, with fixed noise,
times and caption dropout, is a function of the weights alone. The weights are loaded into a
network freshly built from the run's preset with ``strict`` shapes, so a checkpoint cannot make a
verifier build a network of its choosing (say, one too large for memory).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from data.checkpoint import MODEL_DIR, Checkpoint, CheckpointError, load_train_tensors
from data.manifest import ManifestError
from data.streaming import stream_batches

WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name inside model/


def _state(tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"the {what} weights hold NaN or infinite values ({name})")
    return tensors


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, which: str) -> None:
    """Load ``which`` weights of ``ckpt`` into ``model``: "sampling" (the EMA weights in model/,
    what servers load) or "train" (the raw weights a trainer resumes from). Shapes and names must
    match the network built from the run's preset exactly; so must its config."""
    if which == "sampling":
        path = ckpt.path / MODEL_DIR / WEIGHTS
        if not path.is_file():
            raise CheckpointError(f"checkpoint has no {MODEL_DIR}/{WEIGHTS}")
        config = json.loads((ckpt.path / MODEL_DIR / "config.json").read_text())
        for key, want in dict(model.config).items():
            if (
                not key.startswith("_")
                and key in config
                and config[key] != (list(want) if isinstance(want, tuple) else want)
            ):
                raise CheckpointError(f"its network config differs from the run's: {key}={config[key]!r}")
        state = _state(load_file(str(path)), "sampling")
    else:
        raw = load_train_tensors(ckpt)
        state = _state({k[6:]: v for k, v in raw.items() if k.startswith("model.")}, "training")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"its weights do not fit the run's network: {str(e).splitlines()[0]}") from None


@torch.no_grad()
def heldout_loss(job, batches: int = 2, batch_size: int = 32, seed: int = 0) -> float:
    """Mean loss of ``job.model`` (as loaded now) on the first ``batches`` held-out batches of the
    job's clusters (its training shards when the run kept none out), with fixed randomness."""
    manifest = job.manifest
    cluster = getattr(job, "cluster", None)  # an expert's; -1 for jobs of every cluster (monolith, distill)
    clusters = [cluster] if cluster is not None and cluster >= 0 else list(range(manifest.num_clusters))
    size = job.preset.image_size if cluster is not None else job.expert_preset.image_size
    try:
        stream = stream_batches(manifest, clusters, batch_size, size, seed, holdout=True, epochs=1, shuffle_buffer=0)
        first = next(stream)
    except (ManifestError, StopIteration):
        stream = stream_batches(manifest, clusters, batch_size, size, seed, epochs=1, shuffle_buffer=0)
        first = next(stream)
    was_training = job.model.training
    job.model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    try:
        batch = first
        while True:
            losses.append(float(job.loss(batch, gen)))
            if len(losses) >= batches:
                break
            batch = next(stream, None)
            if batch is None:
                break
    finally:
        job.model.train(was_training)
    return sum(losses) / len(losses)


def checkpoint_losses(
    job, ckpt: Checkpoint, batches: int = 2, batch_size: int = 32, seed: int = 0
) -> tuple[float, float]:
    """The held-out losses of a checkpoint's sampling and training weights, in that order: both
    are used (served, resumed), so both must be sound."""
    out = []
    for which in ("sampling", "train"):
        load_weights(job.model, ckpt, which)
        out.append(heldout_loss(job, batches, batch_size, seed))
    return out[0], out[1]
