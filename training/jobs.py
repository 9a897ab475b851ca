"""The jobs a trainer can be given (``expert_K``, ``router``, ``distill``, ``monolith``), built on one run's data."""

from __future__ import annotations

from pathlib import Path

from data.job_id import JobId
from data.manifest import Manifest
from experts.latent_space import load_space
from experts.presets import get_preset, student_preset
from experts.text_encoder import TextEncoderConfig, load_text_encoder
from router.network import get_router_preset
from router.presets import DEFAULT_ROUTER_PRESET
from training.expert_job import ExpertJob
from training.loop import TrainConfig
from training.monolith import MonolithJob
from training.router_job import RouterJob


def build_job(
    manifest: Manifest,
    digest: str,
    job: str,
    cfg: TrainConfig,
    text_encoder: str = "minilm",
    vae: str = "",
    router_preset: str = DEFAULT_ROUTER_PRESET,
    teacher_root: Path | None = None,
    distill_preset: str = "",
):
    """The training job for ``expert_K``, ``router``, ``distill`` or ``monolith`` on this run's data
    (local or swarm). ``ValueError`` for any other ``job``, before anything is loaded. ``distill``
    learns from the experts and router under ``teacher_root`` (``expert_K/``, ``router/``), as a
    student of ``distill_preset`` (default: the experts' preset)."""
    jid = JobId.parse(job)
    preset = get_preset(manifest.clusters[0].preset)
    if preset.space == "latent" and manifest.latents is not None:
        # The shards hold every image's latents: training never runs the VAE, so needs none.
        space_name, encode = manifest.latents["vae"], _no_vae
    elif preset.space == "latent" and not vae:
        raise ValueError("this run's preset works on latents; pass --vae PATH to an AutoencoderKL folder")
    else:
        space = load_space(vae if preset.space == "latent" else "").to(cfg.device)
        space_name, encode = space.name, space.encode
    if jid.is_router:
        if not get_router_preset(router_preset).text:
            return RouterJob(manifest, digest, space_name, encode, cfg, router_preset)
        encoder = load_text_encoder(TextEncoderConfig.parse(text_encoder))
        return RouterJob(manifest, digest, space_name, encode, cfg, router_preset, encoder)
    encoder = load_text_encoder(TextEncoderConfig.parse(text_encoder))
    if jid.is_monolith:
        return MonolithJob(manifest, digest, encoder, space_name, encode, cfg)
    if jid.is_distill:
        from router.ensemble import load_checkpoints
        from router.teacher import Teacher
        from training.distill_job import DistillJob

        if teacher_root is None:
            raise ValueError("the distill job needs the trained experts and router to learn from")
        student = student_preset(distill_preset, preset) if distill_preset else None
        found, router_ckpt = load_checkpoints(Path(teacher_root))
        if len(found) < manifest.num_clusters:
            raise ValueError(f"the distill job needs every expert: found {sorted(found)} under {teacher_root}")
        hashes = {str(JobId.expert(k)): ck.sha256 for k, ck in found.items()} | {"router": router_ckpt.sha256}
        teacher = Teacher.from_checkpoints(Path(teacher_root)).to(cfg.device)
        return DistillJob(manifest, digest, encoder, space_name, encode, cfg, teacher, hashes, student)
    return ExpertJob(manifest, digest, jid.expert_index, encoder, space_name, encode, cfg)


def _no_vae(images):
    raise ValueError("a sample without stored latents in a run whose shards hold them; the shards are inconsistent")
