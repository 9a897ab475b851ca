"""What ``--role eval`` writes for people to read: ``eval.md`` and the plots (``fid.png`` with
95 % intervals, ``usage.png``, ``routing.png``) and the sample grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.fonts import label_font
from data.job_id import JobId
from evaluation.eval_report import EvalReport
from experts.latent_space import tensor_to_pil
from training.monolith import (
    MONOLITH,
)

ORACLE = "oracle"  # every image denoised by its own cluster's expert: routing with the answer known


@dataclass
class Row:
    name: str
    fid: float
    fid_ci95: list[float] | None  # [low, high], bootstrap over the reference images (None: no resamples)
    fid_by_cluster: dict[str, dict]  # cluster → {"fid", "fid_ci95", "n"} (fid None below 2 images)
    expert_forwards_per_image: float  # guided expert calls (cond + uncond each) per image
    seconds_per_image: float
    usage: list[int]  # (image, step) pairs per expert
    checkpoint_step: int | None = None  # the monolith rows: the step sampled
    fid_heldout: float | None = None  # against the training split: the same images' FID against all held-out ones


def fmt_ci(ci) -> str:
    return "–" if not ci or any(v is None or not math.isfinite(v) for v in ci) else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def markdown_report(report: EvalReport) -> str:
    ck = report.checkpoints
    experts = {k: v for k, v in ck.items() if (job := JobId.try_parse(k)) is not None and job.is_expert}
    expert_samples = sum(v["samples_seen"] or 0 for v in experts.values())
    expert_steps = sorted({v["step"] for v in experts.values()})
    drawn, avail = report.heldout_by_cluster, report.heldout_available_by_cluster
    boot = report.bootstrap
    end_sd = "–" if boot["end_sd"] is None else f"{boot['end_sd']:.1f}"
    monos = [f"{k} {v['samples_seen']} samples (step {v['step']})" for k, v in ck.items() if k.startswith(MONOLITH)]
    split = split_name(report.reference)
    beside = report.heldout_reference_images
    lines = [
        f"# Evaluation of run {report.run[:12]}",
        "",
        f"FID against {report.heldout_images} {split} real images (their captions as prompts), drawn from "
        f"every cluster in proportion to its {split} size (seed {report.seed}): "
        + ", ".join(f"cluster {c} {drawn[c]} of {avail[c]}" for c in drawn)
        + f". {report.steps} Euler steps, guidance {report.guidance}, the same noise for every row.",
        f"Training compute: {len(experts)} experts together {expert_samples} samples "
        f"(step {'/'.join(map(str, expert_steps))} each)" + ("; " + ", ".join(monos) if monos else "") + ".",
        "",
    ]
    if beside:
        lines += [f"Beside it, the same generated images' FID against all {beside} held-out images.", ""]
    held_col = " FID vs held-out |" if beside else ""
    lines += [
        "| model | FID ↓ | 95 % CI |" + held_col + " expert forwards / image | s / image |",
        "|---|---:|---:|" + ("---:|" if beside else "") + "---:|---:|",
    ]
    for r in report.rows:
        held = ""
        if beside:
            held = " – |" if r.get("fid_heldout") is None else f" {r['fid_heldout']:.2f} |"
        lines.append(
            f"| {r['name']} | {r['fid']:.2f} | {fmt_ci(r['fid_ci95'])} |{held} "
            f"{r['expert_forwards_per_image']:.1f} | {r['seconds_per_image']:.3f} |"
        )
    clusters = list(drawn)
    lines += [
        "",
        f"FID per cluster, against the same cluster's {split} images (n images each; – below 2):",
        "",
        "| model | " + " | ".join(f"cluster {c} (n = {drawn[c]})" for c in clusters) + " |",
        "|---|" + "---:|" * len(clusters),
    ]
    for r in report.rows:
        cells = []
        for c in clusters:
            e = r["fid_by_cluster"].get(c)
            cells.append("–" if not e or e["fid"] is None else f"{e['fid']:.1f} {fmt_ci(e['fid_ci95'])}")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "FID on a small set is biased upward (its expected value falls as the number of images grows), so "
        "rows compare only with each other, on the same images: not with published FIDs, not a per-cluster "
        "FID with the overall one, and not one cluster's with another's (different n).",
        f"Intervals: {boot['resamples']} bootstrap resamples of the already computed Inception features "
        f"({split} images resampled with replacement within each cluster, each real image paired with the "
        "image generated from its caption; no new sampling). An interval is the resamples' spread around "
        "their own mean placed on the estimate, so it covers the expected FID on this many images; the "
        "resamples' own centre is higher, since a resample repeats images and FID's small-set bias grows. "
        "With this count the ends move by about "
        f"{end_sd} FID between sets of resamples (Monte-Carlo sd, pooled over rows from split halves).",
    ]
    if report.comparisons:
        lines += [
            "",
            "## Where the ensemble wins and where it loses",
            "",
            "Δ = FID(a) − FID(b): negative means a is better. Its 95 % interval resamples the same images for "
            "both rows at once (paired), so what the rows share — the images, the noise — does not count "
            "as uncertainty; reading it off the two rows' own intervals would.",
            "",
            "| comparison | a | b | FID a | FID b | Δ [95 % CI] | reading |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        for c in report.comparisons:
            lines.append(
                f"| {c['comparison']} | {c['a']} | {c['b']} | {c['fid_a']:.2f} | {c['fid_b']:.2f} | "
                f"{c['delta']:+.2f} {fmt_ci(c['delta_ci95'])} | {c['verdict']} |"
            )
        lines += [
            "",
            "- equal total compute: the monolith trained on as many samples as the K experts together (K× the "
            "steps of one expert) against the routed rows.",
            "- equal wall-clock on K machines: the monolith at the experts' step count — what one machine "
            "trains in the time K machines train the experts side by side — against the routed rows.",
            "- what the router loses: top-1 (or top-1+xt / top-1+text, routed by the second router) "
            "against the oracle (each image's own cluster's expert at every step); what the experts give: "
            "the oracle against the monolith at equal compute, and at equal "
            "steps (the monolith at the experts' step count).",
        ]
    routing = report.routing_by_step
    if routing:
        lines += [
            "",
            "## Routing along the top-1 sampling path",
            "",
            f"Per denoising step: how often top-1 picks the image's own cluster (all {routing['images']} images, "
            "along the path they were actually sampled on), and how far apart the experts' guided velocity "
            f"predictions are at that x_t (mean L2 distance over expert pairs, on the first "
            f"{routing['distance_images']} images; relative = ÷ the mean L2 norm of a prediction).",
            "",
            "| t | top-1 = own cluster | "
            + " | ".join(f"cluster {c}" for c in routing["top1_own_cluster_by_cluster"])
            + " | expert distance | relative |",
            "|---:|---:|" + "---:|" * len(routing["top1_own_cluster_by_cluster"]) + "---:|---:|",
        ]
        n = len(routing["t"])
        shown = sorted(set(range(0, n, max(1, math.ceil(n / 10)))) | {n - 1})
        for s in shown:
            per = " | ".join(f"{v[s]:.2f}" for v in routing["top1_own_cluster_by_cluster"].values())
            rel = routing["expert_distance_rel"][s]
            lines.append(
                f"| {routing['t'][s]:.3f} | {routing['top1_own_cluster'][s]:.2f} | {per} | "
                f"{routing['expert_distance'][s]:.2f} | {'–' if rel is None else f'{rel:.3f}'} |"
            )
    acc = report.router_accuracy
    lines += [
        "",
        f"Router top-1 accuracy on {acc.get('samples')} {acc.get('split')} images noised by the forward process "
        "(the training distribution), by noise level: "
        + ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if k.startswith("t=")),
        "",
    ]
    # Reports written before the second router could read only x_t name it text_router.
    second_acc, second = report.second_router_accuracy, report.second_router
    if second_acc:
        reads = "also reads the prompt" if second["preset"].get("text") else "reads only x_t"
        suffix = "+text" if second["preset"].get("text") else "+xt"
        lines += [
            "",
            f"The {suffix} rows route with a second router that {reads} (preset "
            f"{second['preset']['name']}, step {second['step']}). Its accuracy on the same images: "
            + ", ".join(f"{k} {v:.2f}" for k, v in second_acc.items() if k.startswith("t=")),
        ]
    lines += [
        "",
        "One expert forward is one guided call (conditional and unconditional rows together).",
        "",
    ]
    return "\n".join(lines)


def _row_color(name: str) -> str:
    if name == MONOLITH:
        return "tab:gray"
    if name.startswith(MONOLITH):
        return "silver"
    if name.endswith(("+text", "+xt")):  # routed by the second router
        return "tab:cyan"
    return "tab:green" if name == ORACLE else "tab:blue"


def split_name(reference: str) -> str:
    """The words for the images a FID is against: ``train`` → "training", ``holdout`` → "held-out"."""
    return "training" if reference == "train" else "held-out"


def plot_fid(rows: list[Row], path: Path, n: int, reference: str) -> None:
    """FID per row with its interval; ``reference``: the images scored against (``holdout`` or ``train``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    names = [r.name for r in rows]
    fids = np.array([r.fid for r in rows])
    ci = np.array([r.fid_ci95 or [r.fid, r.fid] for r in rows])
    err = np.clip(np.stack([fids - ci[:, 0], ci[:, 1] - fids]), 0, None)
    bars = ax.bar(names, fids, color=[_row_color(r.name) for r in rows], yerr=err, capsize=4, ecolor="black")
    for bar, r, hi in zip(bars, rows, ci[:, 1], strict=True):
        ax.annotate(
            f"{r.fid:.1f}\n{r.expert_forwards_per_image:.0f} fwd/img",
            (bar.get_x() + bar.get_width() / 2, max(hi, r.fid)),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    title = f"FID against {n} {split_name(reference)} images, 95 % bootstrap intervals"
    ax.set(ylabel="FID (lower is better)", title=title)
    ax.margins(y=0.2)
    ax.tick_params(axis="x", labelsize=8)
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


def plot_routing(routing: dict, accuracy: dict, num_experts: int, path: Path) -> None:
    """Left: top-1 = own cluster along the sampling path (all and per cluster), beside the router's
    accuracy on the forward process; right: the experts' disagreement along the same path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = routing["t"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.plot(t, routing["top1_own_cluster"], color="black", lw=2, label="all images (sampling path)")
    for c, v in routing["top1_own_cluster_by_cluster"].items():
        left.plot(t, v, lw=1, alpha=0.8, label=f"cluster {c}")
    acc = {float(k[2:]): v for k, v in accuracy.items() if k.startswith("t=")}
    if acc:
        left.plot(list(acc), list(acc.values()), "o--", color="tab:red", label="router, forward-process x_t")
    left.axhline(1 / num_experts, color="gray", ls=":", label="chance (1/K)")
    left.set(
        xlabel="noise level t (1 = pure noise)",
        ylabel="fraction of images",
        ylim=(-0.03, 1.03),  # a cluster at 0 or 1 all along stays visible
        title="top-1 picks the image's own cluster",
    )
    left.invert_xaxis()
    left.legend(fontsize=7)
    right.plot(t, routing["expert_distance"], color="tab:purple", label="mean L2 distance")
    right.set(
        xlabel="noise level t (1 = pure noise)",
        ylabel="L2 distance between experts",
        title=f"experts' disagreement on {routing['distance_images']} images",
    )
    right.invert_xaxis()
    rel = [np.nan if v is None else v for v in routing["expert_distance_rel"]]
    twin = right.twinx()
    twin.plot(t, rel, color="tab:orange", ls="--", label="÷ mean velocity norm")
    twin.set_ylabel("relative distance")
    lines = right.get_lines() + twin.get_lines()
    right.legend(lines, [ln.get_label() for ln in lines], fontsize=7)
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
        draw.text((label_w + j * cell + 4, 3), name, fill="black", font=label_font())
    for i, cap in enumerate(captions):
        y = head + i * cell
        draw.text((4, y + cell // 2 - 6), cap[:28], fill="black", font=label_font())
        for j, (_, imgs) in enumerate(cols):
            if i < len(imgs):
                sheet.paste(
                    tensor_to_pil(imgs[i]).resize((cell, cell), Image.Resampling.NEAREST), (label_w + j * cell, y)
                )
    sheet.save(path)
