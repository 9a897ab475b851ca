"""Auditing expert servers: a client recomputes a random sample of the steps a server answered
and drops a server whose answer is wrong.

Checkpoints are public and content-addressed, so a client can hold the very weights a server
claims to serve (hash-verified) and recompute any step it was answered. This module holds the
pure parts: when two velocities count as the same answer (:func:`disagreement`, :data:`TOLERANCE`),
which steps are audited (:func:`should_audit`), which replica is asked (:func:`replica_order`),
and the audit's summary for the routing table and JSON (:func:`summarize`). The pool of remote
experts (``diffswarm.remote.RemotePool``) does the asking, recomputing and banning.

The tolerance is fitted to honest float differences, measured on the ``tiny`` experts of the
test run (an FM and a DDPM expert, 4 prompts x 30 steps, guidance 3), as the largest relative L2
error of any row:

    batched with another request (padded text) vs one image per forward, fp32   2.2e-6
    2 threads vs 1 thread, fp32                                                  2.3e-6
    bf16 autocast vs fp32 (a CUDA server's default precision)                    3.9e-2
    a constant velocity, or zeros (the lie that got through)                     1.0 or more

A server may run bf16 while its client audits in fp32 (or both in bf16 on different hardware), so
:data:`TOLERANCE` sits well above the bf16 difference, and an order of magnitude below any answer
that is not the expert's. A liar can therefore bend each answer it gives by up to the tolerance
unseen; a client that knows its servers run fp32 can tighten it (``--audit-tolerance``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from data.job_id import slot_shown

TOLERANCE = 0.15  # largest relative L2 difference per image between two honest answers
DEFAULT_RATE = 0.25  # a quarter of the steps: a server lying from some step on is caught after 4 lies on average
LATENCY_FLOOR_S = 0.02  # a reply faster than this earns no more weight (an instant reply is no better answer)


@dataclass(frozen=True)
class Reference:
    """A hash-verified local copy of an expert's checkpoint, loaded to recompute audited steps."""

    sha256: str
    runner: Callable[..., torch.Tensor]  # an ExpertRunner (router.sampling.LocalExpert)


def disagreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest relative L2 difference between two velocities (B, C, H, W), image by image:
    ||a - b|| / max(||a||, ||b||). Symmetric (no answer is trusted more than the other), at most 2,
    and one wrong image in a batch is not diluted by the right ones."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.float().flatten(1), b.float().flatten(1)
    diff = (a - b).norm(dim=1)
    # A floor for the denominator, so two (near-)zero velocities agree rather than divide by zero.
    scale = torch.maximum(a.norm(dim=1), b.norm(dim=1)).clamp_min(1e-6 * math.sqrt(a.shape[1]))
    return float((diff / scale).max()) if len(diff) else 0.0


def agree(a: torch.Tensor, b: torch.Tensor, tolerance: float = TOLERANCE) -> bool:
    """Whether two velocities are the same answer up to honest float differences."""
    return disagreement(a, b) <= tolerance


def should_audit(rng: random.Random, rate: float, audited_before: int) -> bool:
    """Whether to recompute this answer of a server: its first answer always (at least one audited
    step per server per generation, and a server that lies from the start is caught at once), every
    later one with probability ``rate``. The draw happens after the reply, so a server cannot tell
    which of its answers will be checked; ``rate`` 0 audits nothing."""
    if rate <= 0:
        return False
    return audited_before == 0 or rng.random() < rate


def replica_order(rng: random.Random, replicas: Sequence[tuple[str, float | None, int]]) -> list[str]:
    """The replicas of an expert, ``(peer, measured latency in s or None, announced queue)``, in a
    weighted random order: the first is drawn with probability proportional to
    1 / ((latency + floor) x (1 + queue)), the next among the rest likewise (Efraimidis–Spirakis
    keys). A replica not measured yet counts as fast as the fastest measured one, so every new
    server gets tried. Nothing depends on the peer id, so choosing one wins nothing."""
    known = [lat for _, lat, _ in replicas if lat is not None]
    prior = min(known) if known else 0.0
    keyed = []
    for peer, latency, queue in replicas:
        weight = 1.0 / ((prior if latency is None else max(latency, 0.0)) + LATENCY_FLOOR_S) / (1 + max(queue, 0))
        keyed.append((math.log(1.0 - rng.random()) / weight, peer))  # log(u) / w: larger is earlier
    return [peer for _, peer in sorted(keyed, key=lambda item: item[0], reverse=True)]


@dataclass
class AuditStats:
    """What the audit did in one generation (counted by the client's pool of remote experts)."""

    rate: float
    tolerance: float
    seed: int
    answers: int = 0  # remote answers the sampler received (requests)
    audited: int = 0  # answers recomputed here or asked of a second server
    by_local: int = 0  # of them, checked against a local copy
    by_servers: int = 0  # of them, checked against another server's answer
    extra_local: int = 0  # expert forwards (images) run here for the audit
    extra_remote: int = 0  # expert forwards (images) asked of other servers: cross-checks and redone steps
    largest_passed: float = 0.0  # the largest difference of an answer that passed: honest float noise
    unchecked: dict[int, str] = field(default_factory=dict)  # expert → why its answers could not be audited
    skipped: dict[str, str] = field(default_factory=dict)  # server → why it was not asked (another checkpoint)

    def passed(self, error: float) -> None:
        self.largest_passed = max(self.largest_passed, error)


def summarize(stats: AuditStats, notes: list[dict], images: int, forwards: int) -> dict:
    """The audit's report for the routing JSON: its cost in extra expert forwards per image, every
    server caught (at which step, after serving how many steps) and every step redone. ``notes`` are
    the routing log's (each stamped with its step and expert); ``forwards`` the expert forwards the
    images needed, (image, step) pairs over all experts."""
    caught = [
        {
            "peer": n["peer"],
            "expert": n["expert"],
            "step": n["step"],
            "error": round(n["error"], 4),
            "checked_by": n["checked_by"],
            "steps_served_before_caught": n["served_before"],
            "unchecked_steps_before_caught": n["unchecked_before"],
        }
        for n in notes
        if n["event"] == "caught"
    ]
    redone = [
        {"step": n["step"], "expert": n["expert"], "wrong": n["peer"], "by": n["by"]}
        for n in notes
        if n["event"] == "redone"
    ]
    unresolved = [
        {"step": n["step"], "expert": n["expert"], "peers": n["peers"], "error": round(n["error"], 4)}
        for n in notes
        if n["event"] == "unresolved"
    ]
    extra = stats.extra_local + stats.extra_remote
    return {
        "rate": stats.rate,
        "tolerance": stats.tolerance,
        "seed": stats.seed,
        "answers": stats.answers,
        "audited": stats.audited,
        "audited_by_local_copy": stats.by_local,
        "audited_by_other_servers": stats.by_servers,
        "extra_forwards": {"local": stats.extra_local, "remote": stats.extra_remote},
        "extra_forwards_per_image": round(extra / max(images, 1), 3),
        "forwards_per_image": round(forwards / max(images, 1), 3),
        "largest_honest_difference": stats.largest_passed,
        "unchecked_experts": {str(k): why for k, why in sorted(stats.unchecked.items())},
        "skipped_servers": dict(stats.skipped),
        "caught": caught,
        "redone": redone,
        "unresolved": unresolved,
    }


def report_lines(report: dict) -> list[str]:
    """The audit's report as lines for the client's summary."""
    per_image, needed = report["extra_forwards_per_image"], report["forwards_per_image"]
    share = f" (+{100 * per_image / needed:.0f}%)" if needed else ""
    lines = [
        f"audit: {report['audited']} of {report['answers']} server answers checked "
        f"({report['audited_by_local_copy']} against local copies, {report['audited_by_other_servers']} against "
        f"other servers; rate {report['rate']:g}, tolerance {report['tolerance']:g}, largest honest difference "
        f"{report['largest_honest_difference']:.1e}): {per_image:g} extra expert forwards per image on top of "
        f"{needed:g}{share}"
    ]
    for k, why in report["unchecked_experts"].items():
        lines.append(f"audit: {slot_shown(int(k))}'s answers could not all be checked ({why})")
    for peer, why in report["skipped_servers"].items():
        lines.append(f"audit: server {peer[:16]}… not asked: it {why}")
    for c in report["caught"]:
        lines.append(
            f"CAUGHT: server {c['peer']} answered {slot_shown(c['expert'])} wrong at step {c['step'] + 1} "
            f"(relative error {c['error']:.2g}, checked against {c['checked_by']}) after serving "
            f"{c['steps_served_before_caught']} steps ({c['unchecked_steps_before_caught']} unchecked); "
            "banned and its step redone"
        )
    for r in report["redone"]:
        by = "the local copy" if r["by"] == "local" else f"server {r['by'][:16]}…"
        lines.append(f"redone: step {r['step'] + 1} of expert {r['expert']} (wrong from {r['wrong'][:16]}…) by {by}")
    for u in report["unresolved"]:
        lines.append(
            f"audit: at step {u['step'] + 1} the servers of expert {u['expert']} disagreed "
            f"({', '.join(p[:16] + '…' for p in u['peers'])}) and nothing could tell which is right; "
            "the expert was dropped"
        )
    return lines
