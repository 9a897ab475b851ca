"""``--role eval``: where does the routed ensemble beat the monolith, and where does it lose? By FID.

For a representative held-out subset of a run (images ``prepare`` kept out of training, drawn from
every cluster in proportion to its held-out size), the evaluation generates one image per
held-out caption with every routing mode (top-1, top-2, threshold, full ensemble), with the
**oracle** (each image denoised by the expert of its own cluster, no router), with the monolith
at equal total compute and with the monolith at the experts' step count (``monolith@S``: equal
wall-clock on K machines) — the same initial noise for each, so the rows differ only in who
denoises — and computes FID against the held-out real images, overall and per cluster, each
with a 95 % bootstrap interval from the already computed Inception features. The run's router is
the default one, which reads the prompt; the ``+xt`` rows (top-2+xt, ...) route the same experts
with a second router that reads only x_t (``--eval-second-router``, the ``tiny`` preset), and the
``+text`` rows with a second router that reads the prompt (for a run whose own router does not), so
two routers are compared on the same images. It writes:

    eval.json / eval.md   FID [95 % CI] overall and per cluster, the three comparisons (equal
                          compute, equal wall-clock, what the router loses), expert forwards and
                          seconds per image, router accuracy, routing along the sampling path
    fid.png               FID per row with its interval, and the compute each spends per image
    usage.png             how often each expert is selected at each noise level (top-1 and top-2)
    routing.png           along the real top-1 sampling path, per step: how often top-1 picks the
                          image's own cluster, and how far apart the experts' velocities are
    samples.png           real | every row, side by side

The reference features of the held-out subset are cached next to the data
(``<data>/fid/holdout_<run>_<n>_<selection>.npz``), so repeated evaluations embed the real images once.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from data.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, verify_checkpoint
from data.job_id import JobId, swarm_jobs
from data.manifest import Manifest, load_manifest
from data.streaming import RawBatch, stream_batches
from diffswarm.pipeline import DiffswarmPipeline
from evaluation.eval_report import EvalReport
from evaluation.fid import (
    FeatureStats,
    bootstrap_fids,
    bootstrap_interval,
    feature_stats,
    fid,
    fid_from_features,
    stratified_resamples,
)
from evaluation.report import (
    ORACLE,
    Row,
    fmt_ci,
    markdown_report,
    plot_fid,
    plot_routing,
    plot_usage,
    sample_grid,
)
from experts.image_encoder import InceptionFeatures
from experts.objectives import sampling_times
from experts.presets import expert_forward
from router.ensemble import load_router
from router.network import pool_text
from router.sampling import LocalExpert, RoutingLog, SamplerConfig
from training.captions import CaptionStates
from training.monolith import (
    MONOLITH,
    SingleExpertRouter,
    equal_wallclock_steps,
    experts_samples_seen,
    wallclock_dir,
)
from training.router_job import router_accuracy

console = Console(stderr=True, markup=False)

# name → (sampler mode, k); the monolith samples as a one-expert ensemble
ROUTINGS = {"top-1": ("top1", 1), "top-2": ("topk", 2), "threshold": ("threshold", 2), "full": ("full", 2)}
AT_EXPERT_STEPS = f"{MONOLITH}@S"  # the monolith at the experts' step count S (equal wall-clock)
ROW_NAMES = (*ROUTINGS, ORACLE, MONOLITH, AT_EXPERT_STEPS)  # the rows evaluated by default
# The same routings with a second router (EvalConfig.second_router) over the same experts, so the
# two routers are compared on the same images: "+text" rows when it reads the prompt, "+xt" rows
# when it reads only x_t (the router the run trained by default reads the prompt).
TEXT, XT = "+text", "+xt"
TEXT_ROUTINGS = {f"{name}{TEXT}": how for name, how in ROUTINGS.items()}
XT_ROUTINGS = {f"{name}{XT}": how for name, how in ROUTINGS.items()}
SECOND_ROUTINGS = {**TEXT_ROUTINGS, **XT_ROUTINGS}  # the rows the second router routes
ROUTED = {**ROUTINGS, **SECOND_ROUTINGS}  # every row a router routes
DISTILLED = "distilled"  # the student of the distill job (<ckpt>/distill): one network, no router
ALL_ROWS = (*ROW_NAMES, DISTILLED, *SECOND_ROUTINGS)  # what --eval-rows may name
_AT_STEP = re.compile(rf"{MONOLITH}@(S|[0-9]+)$")  # monolith@S, or monolith@N for a kept step N
# Resamples per FID interval. At 200 the ends move between sets of resamples by 0.6-0.8 FID (sd)
# on 408 images and 1.7-4 FID on 27 (measured by re-drawing 20-30 times), under a tenth of the
# interval's width; 1000 would halve that for 5x the time. eval.md states each run's own figure.
BOOTSTRAP = 200
DIAGNOSTIC_IMAGES = 32  # images on which the experts' disagreement is measured along the path


@dataclass
class EvalConfig:
    ckpt_dir: str  # the run's checkpoints: expert_K/, router/, monolith/, monolith_at_S/
    data_dir: str = ""  # the prepared run with its held-out split ("": <ckpt_dir>/../data)
    vae: str = ""  # the VAE folder of a latent-space run
    device: str = "cpu"  # where the experts' (and the monolith's) forward passes run
    precision: str = "fp32"  # fp32 or bf16 (autocast)
    out_dir: str = "outputs/eval"
    n: int = 0  # images to evaluate on, drawn in proportion to each cluster (0: all of the reference split)
    reference: str = "holdout"  # FID against "holdout" images (paired) or "train" images (held-out beside)
    steps: int = 30
    guidance: float = 3.0
    tau: float = 0.2  # threshold mode
    seed: int = 0
    batch_size: int = 64  # images generated at once
    rows: list[str] = field(default_factory=lambda: list(ROW_NAMES))
    grid_prompts: int = 8
    bootstrap: int = BOOTSTRAP  # resamples per FID interval (0: no intervals)
    diagnostic_images: int = DIAGNOSTIC_IMAGES
    second_router: str = ""  # checkpoints (a router/ folder) of the router the "+text" or "+xt" rows route with

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in ALL_ROWS and not _AT_STEP.match(r)]
        if unknown:
            raise ValueError(f"unknown evaluation row(s) {unknown}; choose from {list(ALL_ROWS)} (or monolith@N)")
        second = [r for r in self.rows if r in SECOND_ROUTINGS]
        if second and not self.second_router:
            raise ValueError(f"the rows {second} need --eval-second-router DIR: checkpoints holding a router/ folder")
        if any(r in TEXT_ROUTINGS for r in second) and any(r in XT_ROUTINGS for r in second):
            raise ValueError("one evaluation has one second router: ask for its +text rows or its +xt rows")
        if self.reference not in ("holdout", "train"):
            raise ValueError(f"--eval-reference takes holdout or train, got {self.reference!r}")
        if self.n < 0 or self.steps < 1 or self.batch_size < 1 or self.bootstrap < 0:
            raise ValueError("--eval-n and the bootstrap count must be >= 0, --steps and the batch size >= 1")


def heldout_sizes(manifest: Manifest, holdout: bool = True) -> list[int]:
    """Held-out (or, with ``holdout=False``, training) images per cluster, as the manifest records them."""
    return [sum(s.samples for s in (c.holdout if holdout else c.shards)) for c in manifest.clusters]


def proportional_allocation(sizes: list[int], n: int) -> list[int]:
    """How many of ``n`` images each cluster gives: in proportion to ``sizes``, at least one from
    every non-empty cluster, exactly ``n`` in all (largest remainder: each count is its quota
    n·size/total rounded down or up, unless the at-least-one rule forces otherwise)."""
    total = sum(sizes)
    nonempty = sum(1 for s in sizes if s > 0)
    if n > total:
        raise ValueError(f"--eval-n {n} is more than the {total} held-out images of this run")
    if n < nonempty:
        raise ValueError(f"--eval-n {n} is below the {nonempty} clusters with held-out images (one each at least)")
    counts = [min(max(n * s // total, 1), s) if s else 0 for s in sizes]
    # Integer arithmetic: count·total − n·size is how far a count is above its quota (× total).
    while sum(counts) > n:  # only after the at-least-one rule: take from the most over-served
        k = max((k for k, c in enumerate(counts) if c > 1), key=lambda k: (counts[k] * total - n * sizes[k], -k))
        counts[k] -= 1
    while sum(counts) < n:  # the largest remainders get one more
        k = max((k for k, c in enumerate(counts) if c < sizes[k]), key=lambda k: (n * sizes[k] - counts[k] * total, -k))
        counts[k] += 1
    return counts


def heldout_set(
    manifest: Manifest, n: int, seed: int, holdout: bool = True
) -> tuple[torch.Tensor, list[str], list[int], str]:
    """``n`` held-out images (all with n = 0) drawn from every cluster in proportion to its
    held-out size (``proportional_allocation``), uniformly within it with ``seed``; their
    captions, cluster labels and a digest of which images they are (for the reference cache).
    ``holdout=False`` draws training images the same way."""
    sizes = heldout_sizes(manifest, holdout)
    if not any(sizes):
        raise ValueError("this run has no held-out split; prepare it with --holdout-fraction > 0")
    counts = proportional_allocation(sizes, n or sum(sizes))
    rng = np.random.default_rng(seed)
    wanted = {c: set(rng.choice(size, counts[c], replace=False).tolist()) for c, size in enumerate(sizes) if size}
    clusters = [c for c, size in enumerate(sizes) if size]
    seen: collections.Counter[int] = collections.Counter()
    chosen, keys = [], []
    stream = stream_batches(
        manifest, clusters, 256, manifest.image_size, seed, holdout=holdout, epochs=1, shuffle_buffer=0, decode=False
    )
    for raw in stream:
        for sample, c in raw.samples:  # only the chosen ones are decoded
            if seen[c] in wanted[c]:
                chosen.append((sample, c))
                keys.append(f"{c}/{sample.get('__key__')}")
            seen[c] += 1
        if len(chosen) == sum(counts):
            break
    if len(chosen) < sum(counts):
        c = next(c for c in clusters if seen[c] < sizes[c])
        split = "held-out" if holdout else "training"
        raise ValueError(f"the {split} shards of cluster {c} hold {seen[c]} images, its manifest says {sizes[c]}")
    batches = [
        RawBatch(chosen[i : i + 256], raw.position, manifest, manifest.image_size).decode()
        for i in range(0, len(chosen), 256)
    ]
    images = torch.cat([b.images for b in batches])
    caps = [c for b in batches for c in b.captions]
    labs = [int(x) for b in batches for x in b.labels.tolist()]
    # Interleave clusters so a first few images (the sample grid) show several of them.
    rank, nth = [], collections.Counter()
    for lab in labs:
        rank.append(nth[lab])
        nth[lab] += 1
    order = sorted(range(len(caps)), key=lambda i: (rank[i], labs[i]))
    digest = hashlib.sha256(("" if holdout else "train\n").encode() + "\n".join(keys[i] for i in order).encode())
    digest = digest.hexdigest()
    return images[order], [caps[i] for i in order], [labs[i] for i in order], digest


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def reference_stats(
    digest: str, selection: str, images: torch.Tensor, inception: InceptionFeatures, cache: Path
) -> FeatureStats:
    """Inception statistics and features of the held-out subset, cached per run and selection."""
    path = cache / f"holdout_{digest[:16]}_{len(images)}_{selection[:12]}.npz"
    if path.is_file():
        stats = FeatureStats.load(path)
        if stats.features is not None and stats.n == len(images):
            console.log(f"reference statistics from {path}")
            return stats
    stats = _stats(inception, images, "held-out images")
    stats.save(path)
    return stats


def _stats(inception: InceptionFeatures, images: torch.Tensor, label: str) -> FeatureStats:
    with _progress() as bar:
        task = bar.add_task(f"Inception: {label}", total=len(images))
        return feature_stats(inception, images.split(inception.batch_size), lambda n: bar.advance(task, n))


RouterFor = Callable[[int, int], torch.nn.Module]  # (first, end) of a chunk of prompts → its router


def _generate_all(
    prompts: list[str],
    pipe: DiffswarmPipeline,
    router_for: RouterFor,
    experts,
    sampler: SamplerConfig,
    batch: int,
    label: str,
) -> tuple[torch.Tensor, list[RoutingLog], float]:
    out, logs = [], []
    t0 = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task(f"sampling: {label}", total=len(prompts))
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            cfg = SamplerConfig(**{**asdict(sampler), "seed": sampler.seed + i})  # same noise for every row
            images, log = pipe.sample(chunk, cfg, router=router_for(i, i + len(chunk)), experts=experts)
            out.append(images)
            logs.append(log)
            bar.advance(task, len(chunk))
    return torch.cat(out), logs, (time.perf_counter() - t0) / len(prompts)


def usage_by_noise(logs: list[RoutingLog], num_experts: int, steps: int) -> np.ndarray:
    """(steps, K): fraction of images whose selected set included expert k at each step."""
    counts = np.zeros((steps, num_experts))
    total = 0
    for log in logs:
        for s, w in enumerate(log.weights):
            counts[s] += (w > 0).sum(0).numpy()
        total += log.weights[0].shape[0] if log.weights else 0
    return counts / max(total, 1)


# --- the oracle and the routing diagnostics -------------------------------------------------


def oracle_logits(labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(B, K) logits whose softmax is exactly one-hot on each image's own cluster."""
    logits = torch.full((len(labels), num_experts), float("-inf"))
    logits[torch.arange(len(labels)), labels.long()] = 0.0
    return logits


class OracleRouter(torch.nn.Module):
    """Routes image i to the expert of its held-out image's cluster at every step, ignoring x_t:
    what a router that is always right would do. ``labels`` are the chunk's, in prompt order."""

    def __init__(self, labels: list[int], num_experts: int) -> None:
        super().__init__()
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.config = type("Config", (), {"num_experts": num_experts})()

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        if x_t.shape[0] != len(self.labels):
            raise ValueError(f"the oracle holds {len(self.labels)} labels, the batch has {x_t.shape[0]} images")
        return oracle_logits(self.labels, self.config.num_experts)


class RecordingRouter(torch.nn.Module):
    """A router that passes every call through and keeps x_t of the first ``keep`` images: the
    sampler calls its router once per step with the current x_t, so this records the real path."""

    def __init__(self, router: torch.nn.Module, keep: int) -> None:
        super().__init__()
        self.router, self.keep = router, keep
        self.config = router.config
        self.path: list[torch.Tensor] = []  # x_t at each step, (keep, C, H, W)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        self.path.append(x_t[: self.keep].detach().clone())
        return self.router(x_t, timestep, text)


def own_cluster_rate(weights_by_step: list[torch.Tensor], labels: list[int]) -> np.ndarray:
    """(steps,): at each step, the fraction of images whose largest routing weight is on their
    own cluster's expert (for top-1: how often the one expert chosen is the right one)."""
    lab = torch.as_tensor(labels)
    return np.array([float((w.argmax(-1) == lab).float().mean()) for w in weights_by_step])


def expert_spread(velocities: torch.Tensor) -> tuple[float, float]:
    """Of (K, B, ...) velocity predictions of K experts for the same B inputs: the mean L2
    distance between two experts' predictions (over pairs and images) and the mean L2 norm of
    a prediction (its scale). K = 1 has no pair: distance 0."""
    k = velocities.shape[0]
    flat = velocities.reshape(k, velocities.shape[1], -1).double()
    norm = float(flat.norm(dim=-1).mean())
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    if not pairs:
        return 0.0, norm
    return float(torch.stack([(flat[i] - flat[j]).norm(dim=-1).mean() for i, j in pairs]).mean()), norm


def disagreement_along_path(
    path: list[torch.Tensor], times: list[float], experts, encoder, prompts: list[str], guidance: float
) -> tuple[list[float], list[float]]:
    """At every step of a recorded path, every expert predicts the guided velocity at that x_t;
    returns the mean pairwise distance and the mean norm per step (``expert_spread``)."""
    b = len(path[0])
    cond, cmask = encoder.encode(prompts[:b])
    uncond, umask = encoder.encode([""] * b)
    states, mask = torch.cat([cond, uncond]), torch.cat([cmask, umask])  # as ``generate`` lays them out
    dist, norm = [], []
    for i, x_t in enumerate(path):
        tt = torch.full((b,), float(times[i]))
        v = torch.stack([experts[k](x_t, tt, states, mask, guidance, t_next=times[i + 1]) for k in sorted(experts)])
        d, n = expert_spread(v)
        dist.append(d)
        norm.append(n)
    return dist, norm


# --- the evaluation --------------------------------------------------------------------------


def evaluate(cfg: EvalConfig) -> EvalReport:
    """Load the run and its trained set, check they belong together, and run the evaluation."""
    ckpt = Path(cfg.ckpt_dir)
    manifest, digest = load_manifest(Path(cfg.data_dir) if cfg.data_dir else ckpt.parent / "data")
    _check_n(manifest, cfg.n, cfg.reference == "holdout")  # before the slow loading
    ensemble = DiffswarmPipeline.from_checkpoints(ckpt, vae=cfg.vae, device=cfg.device, precision=cfg.precision)
    if ensemble.router_meta.get("manifest_sha256") != digest:
        raise CheckpointError(f"the checkpoints under {ckpt} were not trained on the run in {manifest.root}")
    return run_eval(cfg, manifest, digest, ensemble)


def _check_n(manifest: Manifest, n: int, holdout: bool = True) -> list[int]:
    """The reference split's sizes per cluster, once ``n`` is known to be drawable from them."""
    sizes = heldout_sizes(manifest, holdout)
    if not any(heldout_sizes(manifest)):
        raise ValueError("this run has no held-out split; prepare it with --holdout-fraction > 0")
    proportional_allocation(sizes, n or sum(sizes))
    return sizes


def expert_step_count(ckpt_root: Path, num_experts: int, monolith: Checkpoint | None) -> int:
    """S, the monolith step at equal wall-clock with the experts: their step count, in the
    monolith's own samples per step (its latest checkpoint's) when it has one."""
    seen = experts_samples_seen(ckpt_root, num_experts)
    if monolith is not None and monolith.step:
        per_step = round(int(monolith.meta["samples_seen"]) / monolith.step)
    else:
        first = latest_checkpoint(JobId.expert(min(seen)).folder(ckpt_root)) if seen else None
        per_step = round(int(first.meta["samples_seen"]) / first.step) if first is not None else 1
    return equal_wallclock_steps(seen, max(per_step, 1))


def monolith_at(ckpt_root: Path, step: int) -> Checkpoint | None:
    """The monolith's checkpoint at ``step``: kept in monolith_at_<step>, or still in monolith/."""
    kept = latest_checkpoint(wallclock_dir(ckpt_root, step))
    if kept is not None:
        return kept
    folder = ckpt_root / MONOLITH / f"step_{step:08d}"
    return verify_checkpoint(folder) if folder.is_dir() else None


MonolithRow = tuple[str, Checkpoint, LocalExpert]  # (row name in the report, checkpoint, model)


def _monolith_rows(cfg: EvalConfig, ckpt_root: Path, num_experts: int) -> dict[str, MonolithRow]:
    """For each monolith row of ``cfg.rows`` (as named there): its report name, checkpoint and model.
    ``monolith@S`` becomes ``monolith@<S>`` with S the experts' step count."""
    out: dict[str, MonolithRow] = {}
    latest = latest_checkpoint(ckpt_root / MONOLITH)
    for name in cfg.rows:
        if name == DISTILLED:
            ck = latest_checkpoint(JobId.DISTILL.folder(ckpt_root))
            if ck is None:
                raise CheckpointError(
                    f"no distilled checkpoint under {JobId.DISTILL.folder(ckpt_root)}; train it with --role trainer "
                    "--local --job distill (or leave it out with --eval-rows)"
                )
            out[name] = (name, ck, LocalExpert.from_checkpoint(ck, cfg.device, cfg.precision))
        elif name == MONOLITH:
            if latest is None:
                raise CheckpointError(
                    f"no monolith checkpoint under {ckpt_root / MONOLITH}; train the baseline with "
                    "--role trainer --local --job monolith (or leave it out with --eval-rows)"
                )
            out[name] = (name, latest, LocalExpert.from_checkpoint(latest, cfg.device, cfg.precision))
        elif m := _AT_STEP.match(name):
            step = expert_step_count(ckpt_root, num_experts, latest) if m[1] == "S" else int(m[1])
            ck = monolith_at(ckpt_root, step)
            if ck is None:
                raise CheckpointError(
                    f"no monolith checkpoint at the experts' step {step} under {wallclock_dir(ckpt_root, step)}; "
                    "train it with --role trainer --local --job monolith (it keeps that step on its way to the "
                    f"equal-compute budget; a monolith already past step {step} needs a fresh --ckpt-dir), "
                    f"or leave {name} out with --eval-rows"
                )
            out[name] = (f"{MONOLITH}@{step}", ck, LocalExpert.from_checkpoint(ck, cfg.device, cfg.precision))
    return out


def _fid_row(
    ref: FeatureStats, gen: FeatureStats, labels: np.ndarray, resamples: np.ndarray
) -> tuple[float, list[float], dict[str, dict], np.ndarray]:
    """FID, its interval and the per-cluster FIDs of one row; also its bootstrap FIDs (for
    paired differences between rows, which use the same resamples)."""
    point = fid(ref, gen)
    boot = bootstrap_fids(ref.features, gen.features, resamples) if len(resamples) else np.zeros(0)
    by_cluster = {}
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        entry: dict = {"fid": None, "fid_ci95": None, "n": len(where)}
        if len(where) >= 2:
            entry["fid"] = fid_from_features(ref.features[where], gen.features[where])
            if len(resamples):
                # A stratified resample draws cluster c's images from where; renumber them within it.
                local = np.searchsorted(where, resamples[:, where])
                sub = bootstrap_fids(ref.features[where], gen.features[where], local)
                entry["fid_ci95"] = list(bootstrap_interval(entry["fid"], sub))
        by_cluster[str(int(c))] = entry
    return point, list(bootstrap_interval(point, boot)) if len(boot) else None, by_cluster, boot


def interval_end_sd(intervals: list[tuple[float, np.ndarray]]) -> float | None:
    """How much the intervals' ends would move with another set of resamples of the same count
    (their Monte-Carlo standard deviation), from the resamples already drawn: each (estimate,
    bootstrap FIDs) is split into two halves, and the ends of the two half-count intervals differ
    by d with E[d²] = 2·var(B/2) = 4·var(B) (a quantile's variance ∝ 1/count). Pooled over every
    row and both ends: sd(B) = √(mean d²) / 2. None with fewer than 4 resamples."""
    d2 = []
    for point, boot in intervals:
        if len(boot) >= 4:
            a, b = bootstrap_interval(point, boot[0::2]), bootstrap_interval(point, boot[1::2])
            d2 += [(a[0] - b[0]) ** 2, (a[1] - b[1]) ** 2]
    return float(np.sqrt(np.mean(d2)) / 2) if d2 else None


def run_eval(
    cfg: EvalConfig,
    manifest: Manifest,
    digest: str,
    ensemble: DiffswarmPipeline,
    inception: InceptionFeatures | None = None,
) -> EvalReport:
    """Generate with every row of ``cfg.rows``, compute FID against the held-out split, write the report."""
    encoder, space = ensemble.text_encoder, ensemble.space
    out = Path(cfg.out_dir)
    ckpt_root = Path(cfg.ckpt_dir)
    holdout = cfg.reference == "holdout"
    sizes = _check_n(manifest, cfg.n, holdout)
    missing = sorted(set(range(ensemble.num_experts)) - set(ensemble.experts))
    if missing and any(r in ROUTED or r == ORACLE for r in cfg.rows):
        raise CheckpointError(f"experts {missing} have no checkpoint under {ckpt_root}; train them first")
    monoliths = _monolith_rows(cfg, ckpt_root, ensemble.num_experts)
    other_router = second_ckpt = None
    if any(r in SECOND_ROUTINGS for r in cfg.rows):
        other_router, second_ckpt = load_router(Path(cfg.second_router), ensemble.expert_meta)
        wants_text = any(r in TEXT_ROUTINGS for r in cfg.rows)
        if other_router.reads_text != wants_text:
            rows, need, has = ("+text", "the prompt", "only x_t") if wants_text else ("+xt", "only x_t", "the prompt")
            raise CheckpointError(
                f"the {rows} rows need a second router that reads {need}; the one under {cfg.second_router} reads {has}"
            )

    real, captions, labels, selection = heldout_set(manifest, cfg.n, cfg.seed, holdout)
    drawn = dict(sorted(collections.Counter(labels).items()))
    split = "held-out" if holdout else "training"
    console.log(
        f"{split} subset: {len(captions)} of {sum(sizes)} images, in proportion to each cluster's {split} size: "
        + ", ".join(f"cluster {c} {drawn.get(c, 0)}/{size}" for c, size in enumerate(sizes))
    )
    out.mkdir(parents=True, exist_ok=True)
    inception = inception or InceptionFeatures()
    cache = Path(manifest.root or ".") / "fid"
    ref = reference_stats(digest, selection, real, inception, cache)
    beside = None  # against the training split, every row's FID against all held-out images too
    if not holdout:
        held, _, _, held_selection = heldout_set(manifest, 0, cfg.seed)
        beside = reference_stats(digest, held_selection, held, inception, cache)
    label_arr = np.asarray(labels)
    resamples = stratified_resamples(label_arr, cfg.bootstrap, cfg.seed)

    rows: list[Row] = []
    boots: dict[str, np.ndarray] = {}
    samples: dict[str, torch.Tensor] = {}
    usage: dict[str, np.ndarray] = {}
    routing: dict | None = None
    times = sampling_times(cfg.steps, 1.0)
    for asked in dict.fromkeys(cfg.rows):  # in the order asked, once each
        name = monoliths[asked][0] if asked in monoliths else asked
        if name in boots:
            continue  # monolith@S and monolith@<S> named together
        recorder: RecordingRouter | None = None
        step = None
        sampler = SamplerConfig("top1", 1, cfg.tau, cfg.guidance, cfg.steps, cfg.seed)
        if asked in monoliths:
            _, ck, model = monoliths[asked]
            step, experts = ck.step, {0: model}
            router_for: RouterFor = lambda i, j: SingleExpertRouter()  # noqa: E731
        elif name == ORACLE:
            experts = ensemble.experts
            router_for = lambda i, j: OracleRouter(labels[i:j], ensemble.num_experts)  # noqa: E731
        else:
            mode, k = ROUTED[name]
            experts = ensemble.experts
            sampler = SamplerConfig(mode, k, cfg.tau, cfg.guidance, cfg.steps, cfg.seed)
            router = other_router if name in SECOND_ROUTINGS else ensemble.router
            if name == "top-1" and cfg.diagnostic_images:
                recorder = RecordingRouter(router, cfg.diagnostic_images)
            router_for = lambda i, j, rec=recorder, r=router: rec if (rec is not None and i == 0) else r  # noqa: E731
        images, logs, spi = _generate_all(captions, ensemble, router_for, experts, sampler, cfg.batch_size, name)
        stats = _stats(inception, images, name)
        point, ci, by_cluster, boots[name] = _fid_row(ref, stats, label_arr, resamples)
        used = [sum(log.usage[k] for log in logs) for k in range(logs[0].num_experts)]
        rows.append(Row(name, point, ci, by_cluster, sum(used) / len(captions), spi, used, step))
        if beside is not None:
            rows[-1].fid_heldout = fid(beside, stats)
        samples[name] = images[: cfg.grid_prompts]
        if name.removesuffix(TEXT).removesuffix(XT) in ("top-1", "top-2"):
            usage[name] = usage_by_noise(logs, ensemble.num_experts, cfg.steps)
        if recorder is not None:
            weights = [torch.cat([log.weights[s] for log in logs]) for s in range(cfg.steps)]
            dist, norm = disagreement_along_path(recorder.path, times, experts, encoder, captions, cfg.guidance)
            routing = routing_by_step(weights, labels, times[: cfg.steps], dist, norm, len(recorder.path[0]))
        console.log(
            f"{name}: FID {point:.2f} {fmt_ci(ci)} ({rows[-1].expert_forwards_per_image:.0f} expert forwards/image)"
        )

    captions_of = CaptionStates(encoder, manifest)
    text = lambda batch: pool_text(*captions_of(batch))  # noqa: E731  (a router without text ignores it)
    accuracy = router_accuracy(ensemble.router, manifest, space.encode, manifest.image_size, cfg.seed, text)
    second_accuracy = second_info = None
    if other_router is not None:
        preset = second_ckpt.meta["router_preset"]
        second_info = {"step": second_ckpt.step, "sha256": second_ckpt.sha256, "preset": preset}
        second_accuracy = router_accuracy(other_router, manifest, space.encode, manifest.image_size, cfg.seed, text)
    second = None if other_router is None else (other_router, second_ckpt)
    flops = training_flops(ckpt_root, ensemble, encoder, monoliths, second)
    end_sd = interval_end_sd([(r.fid, boots[r.name]) for r in rows])
    report = EvalReport(
        run=digest,
        reference=cfg.reference,
        heldout_images=len(captions),
        heldout_by_cluster={str(c): drawn.get(c, 0) for c in range(len(sizes))},
        heldout_available_by_cluster={str(c): s for c, s in enumerate(sizes)},
        heldout_reference_images=None if beside is None else beside.n,
        steps=cfg.steps,
        guidance=cfg.guidance,
        tau=cfg.tau,
        seed=cfg.seed,
        bootstrap={
            "resamples": cfg.bootstrap,
            "method": "the resamples' spread around their mean, placed on the estimate; paired resamples "
            "of held-out images, stratified by cluster",
            "end_sd": None if end_sd is None else round(end_sd, 2),
        },
        checkpoints=_checkpoint_summary(ckpt_root, ensemble.num_experts, monoliths),
        train_flops={r.name: flops.get(r.name) for r in rows},
        rows=[asdict(r) for r in rows],
        comparisons=comparisons(rows, boots),
        router_accuracy=accuracy,
        second_router_accuracy=second_accuracy,
        second_router=second_info,
        usage_by_noise={
            name: {"t": [round(float(t), 4) for t in times[: cfg.steps]], "fraction": u.round(4).tolist()}
            for name, u in usage.items()
        },
        routing_by_step=routing,
    )
    (out / "eval.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    (out / "eval.md").write_text(markdown_report(report))
    plot_fid(rows, out / "fid.png", len(captions), cfg.reference)
    if usage:
        plot_usage(usage, times[: cfg.steps], out / "usage.png")
    if routing is not None:
        plot_routing(routing, accuracy, ensemble.num_experts, out / "routing.png")
    sample_grid(real[: cfg.grid_prompts], samples, captions[: cfg.grid_prompts], out / "samples.png")
    return report


def routing_by_step(
    weights: list[torch.Tensor],
    labels: list[int],
    times: list[float],
    dist: list[float],
    norm: list[float],
    distance_images: int,
) -> dict:
    """The routing diagnostics of the top-1 path, per step, as the report stores them."""
    lab = np.asarray(labels)
    by_cluster = {}
    for c in np.unique(lab):
        where = np.flatnonzero(lab == c)
        by_cluster[str(int(c))] = own_cluster_rate([w[where] for w in weights], lab[where].tolist()).round(4).tolist()
    return {
        "t": [round(float(t), 4) for t in times],
        "top1_own_cluster": own_cluster_rate(weights, labels).round(4).tolist(),
        "top1_own_cluster_by_cluster": by_cluster,
        "images": len(labels),
        "expert_distance": [round(d, 4) for d in dist],
        "expert_distance_rel": [round(d / n, 4) if n > 0 else None for d, n in zip(dist, norm, strict=True)],
        "velocity_norm": [round(n, 4) for n in norm],
        "distance_images": distance_images,
    }


# The comparisons eval.md states: (what, the row to test, the row it is measured against).
COMPARISONS = (
    ("equal total compute", "routed", MONOLITH),
    ("equal wall-clock on K machines", "routed", f"{MONOLITH}@"),
    ("what the router loses", "top-1", ORACLE),
    ("what the router that reads the prompt loses", f"top-1{TEXT}", ORACLE),
    ("what the router that reads only x_t loses", f"top-1{XT}", ORACLE),
    ("the router that reads only x_t against the default", f"top-2{XT}", "top-2"),
    ("what the experts give", ORACLE, MONOLITH),
    ("what the experts give at equal steps", ORACLE, f"{MONOLITH}@"),
    ("the distilled student against the ensemble", DISTILLED, f"top-2{TEXT}"),
    ("the distilled student against the ensemble", DISTILLED, "top-2"),
    ("the distilled student against the monolith", DISTILLED, MONOLITH),
    # monolith@S: as many steps and samples as the student when it trains for an expert's steps (the default)
    ("the distilled student against the monolith at a step count", DISTILLED, f"{MONOLITH}@"),
    ("the distilled student against the oracle", DISTILLED, ORACLE),
)


def comparisons(rows: list[Row], boots: dict[str, np.ndarray]) -> list[dict]:
    """Δ = FID(a) − FID(b) for each pair of ``COMPARISONS`` present, with a 95 % interval from the
    paired resamples (both rows scored on the same resampled images): negative means a is better."""
    names = [r.name for r in rows]
    fids = {r.name: r.fid for r in rows}
    routed = [n for n in names if n in ROUTED]
    out = []
    for what, a_spec, b_spec in COMPARISONS:
        bs = [n for n in names if n == b_spec or (b_spec.endswith("@") and n.startswith(b_spec))]
        a_names = routed if a_spec == "routed" else [a_spec]
        for b in bs:
            for a in a_names:
                if a not in fids:
                    continue
                delta = fids[a] - fids[b]
                diff = boots[a] - boots[b]
                ci = list(bootstrap_interval(delta, diff, floor=None)) if len(diff) else None
                if ci is None:
                    verdict = "no interval (no resamples)"
                else:
                    verdict = f"{a} better" if ci[1] < 0 else f"{b} better" if ci[0] > 0 else "not resolved at this n"
                out.append(
                    {
                        "comparison": what,
                        "a": a,
                        "b": b,
                        "fid_a": fids[a],
                        "fid_b": fids[b],
                        "delta": delta,
                        "delta_ci95": ci,
                        "verdict": verdict,
                    }
                )
    return out


def forward_flops(call: Callable[[], object]) -> int:
    """FLOPs of one forward call, counted by torch on the real network (2 per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call()
    return int(counter.get_total_flops())


def training_flops(
    root: Path,
    ensemble,
    encoder,
    monoliths: dict[str, MonolithRow],
    other_router: tuple[torch.nn.Module, Checkpoint] | None = None,
) -> dict[str, float]:
    """Training FLOPs spent on what each row samples with (forward + backward = 3x the forward, per
    sample seen): the experts plus the router for the routed rows and the oracle's experts, the
    monolith's own for each monolith row. Counted on the networks themselves, one sample each.
    ``other_router`` (the second router and its checkpoint) is the router of the "+text" or "+xt" rows."""
    states, mask = encoder.encode(["a"])
    x = torch.zeros(1, *ensemble.shape)
    t = torch.full((1,), 500.0)
    cpu = lambda m: copy.deepcopy(m).float().cpu().eval()  # noqa: E731  counted in fp32 on the CPU

    def per_sample(expert) -> int:
        net = cpu(expert.model)
        return 3 * forward_flops(lambda: expert_forward(net, x, t, states, mask))

    def router_spent(router: torch.nn.Module, ck: Checkpoint | None) -> float:
        """Its training FLOPs (per sample with ``ck`` None)."""
        net, text = cpu(router), pool_text(states, mask)
        seen = 1.0 if ck is None else float(ck.meta.get("samples_seen", 0) or 0)
        return 3 * forward_flops(lambda: net(x, t, text)) * seen

    experts = 0.0
    for k, expert in ensemble.experts.items():
        ck = latest_checkpoint(JobId.expert(k).folder(root))
        experts += per_sample(expert) * float(ck.meta.get("samples_seen", 0)) if ck else 0.0
    router_ck = latest_checkpoint(JobId.ROUTER.folder(root))
    spent = router_spent(ensemble.router, router_ck)
    # The distilled student's own training, its teacher's forwards (top-2 experts and the router
    # per sample) and what the teacher cost to train.
    teacher_fwd = 2 * per_sample(next(iter(ensemble.experts.values()))) / 3 + router_spent(ensemble.router, None) / 3
    out = {name: experts + spent for name in (*ROUTINGS, ORACLE)}
    out[ORACLE] = experts
    if other_router is not None:
        out |= {name: experts + router_spent(*other_router) for name in SECOND_ROUTINGS}
    for name, ck, model in monoliths.values():
        seen = float(ck.meta.get("samples_seen", 0))
        out[name] = per_sample(model) * seen
        if name == DISTILLED:  # its teacher is the run's own router, never the second one
            out[name] += (teacher_fwd * seen) + experts + spent
    return out


def _checkpoint_summary(root: Path, k: int, monoliths: dict[str, MonolithRow]) -> dict:
    out = {}
    for job in map(str, swarm_jobs(k)):
        ck = latest_checkpoint(root / job)
        if ck is not None:
            out[job] = {"step": ck.step, "samples_seen": ck.meta.get("samples_seen"), "sha256": ck.sha256}
    for name, ck, _ in monoliths.values():
        out[name] = {"step": ck.step, "samples_seen": ck.meta.get("samples_seen"), "sha256": ck.sha256}
    if MONOLITH not in out and (ck := latest_checkpoint(root / MONOLITH)) is not None:
        out[MONOLITH] = {"step": ck.step, "samples_seen": ck.meta.get("samples_seen"), "sha256": ck.sha256}
    return out
