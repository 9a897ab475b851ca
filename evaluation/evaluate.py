"""``--role eval``: does the routed ensemble beat the monolith at equal compute? Measured by FID.

For the held-out split of a run (images ``prepare`` kept out of training), the evaluation
generates one image per held-out caption with every routing mode (top-1, top-2, threshold, full
ensemble) and with the monolith baseline — the same initial noise for each, so the rows differ
only in who denoises — and computes FID against the held-out real images. It writes:

    eval.json / eval.md   FID, expert forwards per image, seconds per image, router accuracy
    fid.png               FID per mode, with the compute each spends per image
    usage.png             how often each expert is selected at each noise level (top-1 and top-2)
    samples.png           real | top-1 | top-2 | threshold | full | monolith, side by side

The reference statistics of the held-out split are cached next to the data
(``<data>/fid/holdout_<run>_<n>.npz``), so repeated evaluations embed the real images once.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from data.checkpoint import CheckpointError, latest_checkpoint
from data.manifest import Manifest, load_manifest
from data.streaming import stream_batches
from evaluation.fid import FeatureStats, InceptionFeatures, fid
from experts.latent_space import tensor_to_pil
from experts.objectives import sampling_times
from router.ensemble import load_ensemble
from router.sampling import LocalExpert, RoutingLog, SamplerConfig, generate
from training.monolith import MONOLITH, SingleExpertRouter
from training.router_job import router_accuracy

console = Console(stderr=True, markup=False)

# name → (sampler mode, k); the monolith samples as a one-expert ensemble
ROUTINGS = {"top-1": ("top1", 1), "top-2": ("topk", 2), "threshold": ("threshold", 2), "full": ("full", 2)}
ROW_NAMES = (*ROUTINGS, MONOLITH)  # what --eval-rows may name


@dataclass
class EvalConfig:
    ckpt_dir: str  # the run's checkpoints: expert_K/, router/, monolith/
    data_dir: str = ""  # the prepared run with its held-out split ("": <ckpt_dir>/../data)
    vae: str = ""  # the VAE folder of a latent-space run
    device: str = "cpu"  # where the experts' (and the monolith's) forward passes run
    precision: str = "fp32"  # fp32 or bf16 (autocast)
    out_dir: str = "outputs/eval"
    n: int = 0  # held-out images to evaluate on (0: all of them)
    steps: int = 30
    guidance: float = 3.0
    tau: float = 0.2  # threshold mode
    seed: int = 0
    batch_size: int = 64  # images generated at once
    rows: list[str] = field(default_factory=lambda: list(ROW_NAMES))
    grid_prompts: int = 8

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in ROW_NAMES]
        if unknown:
            raise ValueError(f"unknown evaluation row(s) {unknown}; choose from {list(ROW_NAMES)}")
        if self.n < 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("--eval-n must be >= 0, --steps and the batch size >= 1")


@dataclass
class Row:
    name: str
    fid: float
    expert_forwards_per_image: float  # guided expert calls (cond + uncond each) per image
    seconds_per_image: float
    usage: list[int]  # (image, step) pairs per expert


def heldout_set(manifest: Manifest, n: int, seed: int) -> tuple[torch.Tensor, list[str], list[int]]:
    """The first ``n`` held-out images (all with n = 0), their captions and cluster labels."""
    if not any(c.holdout for c in manifest.clusters):
        raise ValueError("this run has no held-out split; prepare it with --holdout-fraction > 0")
    clusters = list(range(manifest.num_clusters))
    imgs, caps, labs = [], [], []
    for b in stream_batches(
        manifest, clusters, 256, manifest.image_size, seed, holdout=True, epochs=1, shuffle_buffer=0
    ):
        imgs.append(b.images)
        caps += b.captions
        labs += b.labels.tolist()
        if n and len(caps) >= n:
            break
    images = torch.cat(imgs)
    if n:
        images, caps, labs = images[:n], caps[:n], labs[:n]
    # Interleave clusters so a first few images (the sample grid) show several of them.
    rank, seen = [], collections.Counter()
    for lab in labs:
        rank.append(seen[lab])
        seen[lab] += 1
    order = sorted(range(len(caps)), key=lambda i: (rank[i], labs[i]))
    return images[order], [caps[i] for i in order], [labs[i] for i in order]


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def reference_stats(
    manifest: Manifest, digest: str, images: torch.Tensor, inception: InceptionFeatures, cache: Path
) -> FeatureStats:
    path = cache / f"holdout_{digest[:16]}_{len(images)}.npz"
    if path.is_file():
        console.log(f"reference statistics from {path}")
        return FeatureStats.load(path)
    stats = _stats(inception, images, "held-out images")
    stats.save(path)
    return stats


def _stats(inception: InceptionFeatures, images: torch.Tensor, label: str) -> FeatureStats:
    with _progress() as bar:
        task = bar.add_task(f"Inception: {label}", total=len(images))
        return inception.stats(images.split(inception.batch_size), lambda n: bar.advance(task, n))


def _generate_all(
    prompts: list[str], router, experts, encoder, space, shape, sampler: SamplerConfig, batch: int, label: str
) -> tuple[torch.Tensor, list[RoutingLog], float]:
    out, logs = [], []
    t0 = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task(f"sampling: {label}", total=len(prompts))
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            cfg = SamplerConfig(**{**asdict(sampler), "seed": sampler.seed + i})  # same noise for every row
            images, log = generate(chunk, router, experts, encoder, space, shape, cfg)
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


def evaluate(cfg: EvalConfig) -> dict:
    """Load the run and its trained set, check they belong together, and run the evaluation."""
    ckpt = Path(cfg.ckpt_dir)
    manifest, digest = load_manifest(Path(cfg.data_dir) if cfg.data_dir else ckpt.parent / "data")
    ensemble, encoder, space = load_ensemble(ckpt, vae=cfg.vae, device=cfg.device, precision=cfg.precision)
    if ensemble.router_meta.get("manifest_sha256") != digest:
        raise CheckpointError(f"the checkpoints under {ckpt} were not trained on the run in {manifest.root}")
    return run_eval(cfg, manifest, digest, ensemble, encoder, space)


def run_eval(
    cfg: EvalConfig,
    manifest: Manifest,
    digest: str,
    ensemble,
    encoder,
    space,
    inception: InceptionFeatures | None = None,
) -> dict:
    """Generate with every row of ``cfg.rows``, compute FID against the held-out split, write the report."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = Path(cfg.ckpt_dir)
    missing = sorted(set(range(ensemble.num_experts)) - set(ensemble.experts))
    if missing and any(r in ROUTINGS for r in cfg.rows):
        raise CheckpointError(f"experts {missing} have no checkpoint under {ckpt_root}; train them first")
    mono = None
    if MONOLITH in cfg.rows:
        ck = latest_checkpoint(ckpt_root / MONOLITH)
        if ck is None:
            raise CheckpointError(
                f"no monolith checkpoint under {ckpt_root / MONOLITH}; train the baseline with "
                "--role trainer --local --job monolith (or leave it out with --eval-rows)"
            )
        mono = (ck, LocalExpert.from_checkpoint(ck, cfg.device, cfg.precision))

    real, captions, labels = heldout_set(manifest, cfg.n, cfg.seed)
    console.log(f"held-out split: {len(captions)} images of {manifest.num_clusters} clusters")
    inception = inception or InceptionFeatures()
    ref = reference_stats(manifest, digest, real, inception, Path(manifest.root or ".") / "fid")

    rows: list[Row] = []
    samples: dict[str, torch.Tensor] = {}
    usage: dict[str, np.ndarray] = {}
    shape = ensemble.shape
    for name in cfg.rows:
        if name == MONOLITH:
            router, experts = SingleExpertRouter(), {0: mono[1]}
            sampler = SamplerConfig(mode="top1", k=1, guidance=cfg.guidance, steps=cfg.steps, seed=cfg.seed)
        else:
            mode, k = ROUTINGS[name]
            router, experts = ensemble.router, ensemble.experts
            sampler = SamplerConfig(mode, k, cfg.tau, cfg.guidance, cfg.steps, cfg.seed)
        images, logs, spi = _generate_all(
            captions, router, experts, encoder, space, shape, sampler, cfg.batch_size, name
        )
        stats = _stats(inception, images, name)
        used = [sum(log.usage[k] for log in logs) for k in range(logs[0].num_experts)]
        rows.append(Row(name, fid(ref, stats), sum(used) / len(captions), spi, used))
        samples[name] = images[: cfg.grid_prompts]
        if name in ("top-1", "top-2"):
            usage[name] = usage_by_noise(logs, ensemble.num_experts, cfg.steps)
        console.log(f"{name}: FID {rows[-1].fid:.2f} ({rows[-1].expert_forwards_per_image:.0f} expert forwards/image)")

    accuracy = router_accuracy(ensemble.router, manifest, space.encode, manifest.image_size, cfg.seed)
    times = sampling_times(cfg.steps, 1.0)[: cfg.steps]
    report = {
        "run": digest,
        "heldout_images": len(captions),
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "tau": cfg.tau,
        "seed": cfg.seed,
        "checkpoints": _checkpoint_summary(ckpt_root, ensemble.num_experts),
        "rows": [asdict(r) for r in rows],
        "router_accuracy": accuracy,
        "usage_by_noise": {
            name: {"t": [round(float(t), 4) for t in times], "fraction": u.round(4).tolist()}
            for name, u in usage.items()
        },
    }
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "eval.md").write_text(markdown_report(report))
    plot_fid(rows, out / "fid.png", len(captions))
    if usage:
        plot_usage(usage, times, out / "usage.png")
    sample_grid(real[: cfg.grid_prompts], samples, captions[: cfg.grid_prompts], out / "samples.png")
    return report


def _checkpoint_summary(root: Path, k: int) -> dict:
    out = {}
    for job in [*(f"expert_{i}" for i in range(k)), "router", MONOLITH]:
        ck = latest_checkpoint(root / job)
        if ck is not None:
            out[job] = {"step": ck.step, "samples_seen": ck.meta.get("samples_seen"), "sha256": ck.sha256}
    return out


def markdown_report(report: dict) -> str:
    ck = report["checkpoints"]
    expert_samples = sum(v["samples_seen"] or 0 for k, v in ck.items() if k.startswith("expert_"))
    lines = [
        f"# Evaluation of run {report['run'][:12]}",
        "",
        f"FID against {report['heldout_images']} held-out real images (their captions as prompts); "
        f"{report['steps']} Euler steps, guidance {report['guidance']}, the same noise for every row.",
        f"Training compute: experts together {expert_samples} samples"
        + (f", monolith {ck[MONOLITH]['samples_seen']} samples." if MONOLITH in ck else "."),
        "",
        "| model | FID ↓ | expert forwards / image | s / image |",
        "|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['fid']:.2f} | {r['expert_forwards_per_image']:.1f} | {r['seconds_per_image']:.3f} |"
        )
    acc = report["router_accuracy"]
    lines += [
        "",
        f"Router top-1 accuracy on {acc.get('samples')} {acc.get('split')} images, by noise level: "
        + ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if k.startswith("t=")),
        "",
        "One expert forward is one guided call (conditional and unconditional rows together).",
        "",
    ]
    return "\n".join(lines)


def plot_fid(rows: list[Row], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = [r.name for r in rows]
    colors = ["tab:gray" if r.name == MONOLITH else "tab:blue" for r in rows]
    bars = ax.bar(names, [r.fid for r in rows], color=colors)
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(
            f"{r.fid:.1f}\n{r.expert_forwards_per_image:.0f} fwd/img",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(ylabel="FID (lower is better)", title=f"FID on {n} held-out images, per routing mode")
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_usage(usage: dict[str, np.ndarray], times, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(usage), figsize=(5 * len(usage), 3.5), squeeze=False)
    for ax, (name, u) in zip(axes[0], usage.items(), strict=True):
        for k in range(u.shape[1]):
            ax.plot(times, u[:, k], label=f"expert {k}")
        ax.set(xlabel="noise level t (1 = pure noise)", ylabel="fraction of images", title=f"experts selected: {name}")
        ax.invert_xaxis()  # sampling runs from t = 1 to t = 0
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(real: torch.Tensor, samples: dict[str, torch.Tensor], captions: list[str], path: Path) -> None:
    """Rows: held-out captions; columns: the real image, then each evaluated model."""
    cell, label_w, head = 96, 180, 18
    cols = [("real", real), *samples.items()]
    sheet = Image.new("RGB", (label_w + cell * len(cols), head + cell * len(captions)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (name, _) in enumerate(cols):
        draw.text((label_w + j * cell + 4, 3), name, fill="black")
    for i, cap in enumerate(captions):
        y = head + i * cell
        draw.text((4, y + cell // 2 - 6), cap[:28], fill="black")
        for j, (_, imgs) in enumerate(cols):
            if i < len(imgs):
                sheet.paste(
                    tensor_to_pil(imgs[i]).resize((cell, cell), Image.Resampling.NEAREST), (label_w + j * cell, y)
                )
    sheet.save(path)
