"""Training one job on this machine (``--role trainer --local``): an expert, the router, the
distilled student (from the experts and router under the same ``<ckpt>``) or the monolith
baseline, on a prepared run's data, into ``<ckpt>/<job>/step_N``.

With no budget given a job trains for 5 minutes; the monolith's default budget is the experts'
total compute (``training.monolith.equal_compute_steps``). On the way the monolith keeps its
checkpoint at the experts' step count (equal wall-clock on K machines) in ``<ckpt>/monolith_at_S``:
it trains to S, that checkpoint is kept, and a fresh job resumes from it to the full budget, exactly
as a restarted process would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from data.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, verify_checkpoint
from data.job_id import JobId
from data.manifest import Manifest, load_manifest
from experts.presets import get_preset
from experts.text_encoder import TextEncoderConfig
from router.presets import DEFAULT_ROUTER_PRESET
from training.island import Island
from training.jobs import build_job
from training.loop import TrainConfig, TrainJob, train
from training.monolith import (
    equal_compute_steps,
    equal_wallclock_steps,
    experts_samples_seen,
    keep_checkpoint,
    wallclock_dir,
)

console = Console(stderr=True, markup=False)

DEFAULT_MINUTES = 5.0  # a local job given neither --steps nor --minutes


@dataclass
class LocalTrainConfig:
    data_dir: str  # the prepared run (manifest.json and shards)
    ckpt_dir: str  # checkpoints go in <ckpt_dir>/<job>/step_N
    job: str  # "expert_K", "router" or "monolith" (as given: :attr:`job_id` parses it)
    # budget (steps/minutes; both 0: the default), batch, lr, cadence and seed; ckpt_root is set per job
    train: TrainConfig = field(default_factory=lambda: TrainConfig(ckpt_root=""))
    text_encoder: str = "minilm"  # minilm or clip:PATH[@ARCH]
    vae: str = ""  # AutoencoderKL folder for latent presets
    router_preset: str = DEFAULT_ROUTER_PRESET
    distill_preset: str = ""  # the distilled student's preset ("": the experts')
    distill_init: str = "expert"  # start from the expert nearest the teacher, or "scratch"

    @property
    def job_id(self) -> JobId:
        return JobId.parse(self.job)


def _samples_per_step(manifest: Manifest, tc: TrainConfig) -> int:
    """A step of --accum N micro-batches sees N batches: budgets count samples, not micro-batches."""
    return (tc.batch_size or get_preset(manifest.clusters[0].preset).batch_size) * tc.accum


def plan(cfg: LocalTrainConfig, manifest: Manifest) -> TrainConfig:
    """The job's TrainConfig: its checkpoint folder, its seed and its budget."""
    ckpt, tc, job = Path(cfg.ckpt_dir), cfg.train, cfg.job_id
    budget = {} if (tc.steps or tc.minutes) else {"minutes": DEFAULT_MINUTES}
    if job.is_router or job.is_distill:
        return replace(tc, ckpt_root=str(job.folder(ckpt)), **budget)
    if job.is_monolith:
        if tc.steps or tc.minutes:
            return replace(tc, ckpt_root=str(job.folder(ckpt)))
        seen = experts_samples_seen(ckpt, manifest.num_clusters)
        batch = tc.batch_size or get_preset(manifest.clusters[0].preset).batch_size
        steps = equal_compute_steps(seen, manifest.num_clusters, _samples_per_step(manifest, tc))
        of = f"{batch}" if tc.accum == 1 else f"{batch} x {tc.accum}"
        print(
            f"monolith: {steps} steps of {of} = the {sum(seen.values())} samples the "
            f"{manifest.num_clusters} experts saw together",
            flush=True,
        )
        return replace(tc, ckpt_root=str(job.folder(ckpt)), steps=steps, minutes=0.0)
    k = job.expert_index
    if k >= manifest.num_clusters:
        raise ValueError(f"unknown expert {k}; this run has experts 0..{manifest.num_clusters - 1}")
    encoder = TextEncoderConfig.parse(cfg.text_encoder)
    if encoder.name != manifest.text_encoder and cfg.text_encoder != "minilm":
        console.log(f"note: data was embedded with {manifest.text_encoder}, conditioning with {encoder.name}")
    return replace(tc, ckpt_root=str(job.folder(ckpt)), seed=tc.seed + k, **budget)


def _quiet(fn, *args):
    """``fn(*args)`` with its prints swallowed: ranks other than 0 of an island say nothing."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def wallclock_step(cfg: LocalTrainConfig, tc: TrainConfig, manifest: Manifest) -> int:
    """The monolith's step at equal wall-clock with the experts (their step count), where a copy
    is kept; 0 when there is none to keep: not the monolith, no step budget (or a time limit too,
    which two phases would each spend), no resuming (the second phase resumes the first), an
    expert untrained, or a budget that ends before it."""
    if not cfg.job_id.is_monolith or not tc.steps or tc.minutes or not tc.resume:
        return 0
    seen = experts_samples_seen(Path(cfg.ckpt_dir), manifest.num_clusters)
    if len(seen) < manifest.num_clusters:
        return 0
    step = equal_wallclock_steps(seen, _samples_per_step(manifest, tc))
    return step if step <= tc.steps else 0


def _keep_wallclock(
    job: TrainJob, cfg: LocalTrainConfig, tc: TrainConfig, at: int, rebuild: Callable[[], TrainJob]
) -> TrainJob:
    """Train the monolith to step ``at`` (if it is not there yet) and keep that checkpoint in
    ``<ckpt>/monolith_at_<at>``; returns the job to continue with."""
    dest = wallclock_dir(Path(cfg.ckpt_dir), at)
    if list_checkpoints(dest):
        return job  # kept by an earlier run
    root = Path(tc.ckpt_root)
    last = latest_checkpoint(root)
    if last is None or last.step < at:
        ckpt = train(job, replace(tc, steps=at))
        job = rebuild()  # a fresh job resumes from that checkpoint exactly as a restarted process would
    elif (root / f"step_{at:08d}").is_dir():  # still among the kept last few
        ckpt = verify_checkpoint(root / f"step_{at:08d}")
    else:
        ckpt = last
    if ckpt.step != at:
        print(
            f"note: the monolith is at step {ckpt.step}, not at the experts' step {at}, and no checkpoint of "
            f"step {at} is left; for the monolith@{at} row train a fresh monolith (another --ckpt-dir, "
            f"or move {root} away)",
            flush=True,
        )
        return job
    kept = keep_checkpoint(ckpt, dest)
    print(f"monolith: kept step {at} (the experts' step count: equal wall-clock) in {kept.path}", flush=True)
    return job


def train_local(cfg: LocalTrainConfig, should_stop: Callable[[], bool] | None = None) -> Checkpoint | None:
    """Train the job to its budget (resuming its latest checkpoint), or until ``should_stop()``
    (then it saves first), and say what it reached. Started by ``torchrun``, every process of the
    island trains the one job (:mod:`training.island`); rank 0 returns the checkpoint, the others
    ``None``."""
    manifest, digest = load_manifest(Path(cfg.data_dir))
    island = Island.from_env()
    if island is not None and cfg.job_id.is_monolith and wallclock_step(cfg, plan(cfg, manifest), manifest):
        raise ValueError("train the monolith's two phases in one process (it keeps a copy between them)")
    tc = plan(cfg, manifest) if island is None or island.main else _quiet(plan, cfg, manifest)

    def build() -> TrainJob:
        torch.manual_seed(tc.seed)  # the same initial network in every process (DDP also syncs it)
        return build_job(
            manifest, digest, cfg.job, tc, cfg.text_encoder, cfg.vae, cfg.router_preset,
            teacher_root=Path(cfg.ckpt_dir), distill_preset=cfg.distill_preset,
        )  # fmt: skip

    job = build()
    if cfg.job_id.is_distill and cfg.distill_init == "expert" and latest_checkpoint(Path(tc.ckpt_root)) is None:
        print(job.start_from_nearest_expert(), flush=True)
    at = wallclock_step(cfg, tc, manifest)
    if at:
        job = _keep_wallclock(job, cfg, tc, at, build)
    try:
        result = train(job, tc, should_stop=should_stop, island=island)
    finally:
        if island is not None:
            island.leave()
    if result is None:
        return None  # another rank of the island: rank 0 reports
    if island is not None:
        how = "sharded (FSDP)" if tc.shard else "DDP"
        print(f"island of {island.world} processes, {how}: global batch {job.batch_size} x {tc.accum}", flush=True)
    if cfg.job_id.is_router:
        acc = result.meta.get("heldout_accuracy", {})
        print(
            f"router: step {result.step}, held-out accuracy "
            f"({acc.get('split')}, {acc.get('samples')} images) by noise level:"
        )
        levels = "  ".join(f"{k} {v:.2f}" for k, v in acc.items() if k.startswith("t="))
        print(f"  {levels}  (chance {1 / manifest.num_clusters:.2f})")
    else:
        print(
            f"{cfg.job.replace('_', ' ')}: step {result.step}, loss {result.meta.get('loss')}, "
            f"{result.meta['samples_seen']} samples seen, checkpoint {result.path} sha256 {result.sha256[:12]}"
        )
    return result
