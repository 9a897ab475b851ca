"""Verifying published checkpoints before anyone resumes from, mirrors, serves or counts them.

A checkpoint record is a stranger's claim. A verifier (the preparer, idle trainers, a trainer
before it resumes, a server before it loads) judges the records of a job that are ahead of its
latest verified checkpoint, most advanced first, each as the record of the key that signed it,
and publishes a signed verdict:

1. cheap, for every record (no byte fetched), a verdict on that signer's record alone: its preset
   and objective are the run's; its size is within what a checkpoint of that preset takes; its
   signer held the job's claim (the run owner aside: it may publish what it trained before); its
   step is reachable from the last accepted checkpoint within the time its signer held the claim
   since then, at a rate no hardware reaches for the preset (:data:`MAX_STEPS_PER_S`);
2. then for the most advanced record a live peer provides, a verdict on the checkpoint's bytes: its
   blobs are fetched and hash-checked, its metadata is the job's (kind, cluster, objective,
   manifest, step), its weights fit the run's network, and their held-out loss passes
   :func:`loss_refusal`: neither its sampling nor its training weights are worse than the untrained
   network's, and its sampling weights (what is served) are no worse than the *best* accepted
   checkpoint's, beyond :data:`LOSS_MARGIN`. That refuses garbage weights that carry a valid hash,
   and a chain of small regressions by its second link.

A refused checkpoint's copy is deleted, so it is never provided, and its signer is banned locally,
except when the only fault is a loss above the best accepted one's (training is noisy: that refuses
the checkpoint and leaves its honest trainer alone; an owner that shows no accepted checkpoint for
the run's grace period loses its claim all the same, :func:`claims.stale`) or a record signed by a
key without the claim (an honest mirror may republish what it accepted before others judged it).
A verifier that accepts a checkpoint has fetched it; the mirrors (preparer, idle trainers) then
hold and publish it at once, so a job whose owner checkpoints faster than it can be judged still
shows verified progress.
A checkpoint that could not be fetched gets no verdict (the provider may only be slow): it stays
pending and is tried again next round.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hivemind.utils import get_dht_time
from rich.console import Console

from data.checkpoint import Checkpoint, CheckpointError, verify_checkpoint
from data.job_id import JobId
from data.manifest import Manifest
from swarm import claims
from swarm.blobs import BlobError, BlobService
from swarm.dht import SwarmNode
from swarm.mirror import checkpoint_budget, fetch_budget, gather_teacher, sources
from swarm.records import CLOCK_SLACK_S, MAX_VERDICTS, CheckpointRecord, RunRecord, Verdict, fingerprint
from training.heldout import checkpoint_losses, heldout_loss
from training.jobs import build_job
from training.loop import TrainConfig

console = Console(stderr=True, markup=False)

# Steps per second no machine reaches with a preset (expert and router presets by name). Measured
# on an H100 the tiny expert does ~30 steps/s at batch 64; the bounds leave a wide margin, so only
# the impossible (a billion steps in an hour) is refused.
MAX_STEPS_PER_S = {
    "tiny": 500.0,
    "tiny16": 500.0,
    "small": 300.0,
    "B/2": 100.0,
    "XL/2": 30.0,
    "tiny-text": 500.0,  # routers that read the prompt: the router's rate, plus a pooling
    "B/2-text": 100.0,
}
LOSS_MARGIN = 0.25  # relative: a checkpoint may be this much worse than the last accepted one
LOSS_SLACK = 0.01  # and this much in absolute terms (losses near zero)


def loss_refusal(sampling: float, train: float, untrained: float, bar: float, margin: float) -> tuple[str | None, bool]:
    """Judge a checkpoint by its held-out losses: ``(reason, ban)``, reason ``None`` to accept.

    Worse than the untrained network (or not finite) is garbage: refused, its signer banned.
    Sampling weights worse than ``bar`` (the last accepted checkpoint's loss) is a regression:
    refused, its signer not banned. The raw training weights are only held to the untrained bar,
    since they swing between steps where their average (the sampling weights) does not.
    """

    def above(loss: float, ref: float) -> bool:
        return not (math.isfinite(loss) and loss <= ref * (1 + margin) + LOSS_SLACK)

    for name, loss in (("sampling", sampling), ("training", train)):
        if above(loss, untrained):
            return f"held-out loss of its {name} weights {loss:.4f} is worse than untrained ({untrained:.4f})", True
    if above(sampling, bar):
        return f"held-out loss {sampling:.4f} is worse than {bar:.4f} (+{margin:.0%})", False
    return None, False


@dataclass
class VerifyConfig:
    text_encoder: str = "minilm"
    vae: str = ""
    batches: int = 2  # held-out batches the loss is measured on
    batch_size: int = 32
    seed: int = 0
    margin: float = LOSS_MARGIN


def expected_config(run: RunRecord, job: str) -> tuple[str, str]:
    """(preset, objective) a record of ``job`` must carry in ``run``."""
    jid = JobId.parse(job)
    if jid.is_router:
        return "", "router"  # the router's preset is the trainer's choice
    if jid.is_distill:
        return run.student_preset(), "fm"  # the student predicts the ensemble's velocity
    return run.presets[jid.expert_index], run.objectives[jid.expert_index]


def cheap_refusal(
    snap: claims.Snapshot, job: str, key: bytes, rec: CheckpointRecord, tenure: claims.Tenure | None = None
) -> tuple[str, bool] | None:
    """Why the record ``rec`` signed by ``key`` is refused without fetching a byte, with whether
    its signer is banned for it; ``None`` if it passes. Pure: a function of the snapshot and what
    the verifier saw of the job's claims (``tenure``).

    The run owner may publish anything it trained (before the run, or by itself). Anyone else adds
    steps only while holding the job's claim: its step must be reachable from the last accepted one
    at :data:`MAX_STEPS_PER_S` within the time it held the claim since then. A record by a key that
    held no claim is refused (its signer not banned: an honest mirror may republish a checkpoint it
    accepted before others judged it); a step nobody could have reached is refused and banned."""
    preset, objective = expected_config(snap.run, job)
    if rec.objective != objective or (preset and rec.preset != preset):
        return f"config {rec.preset}/{rec.objective} is not the run's {preset or 'any'}/{objective}", True
    rate = MAX_STEPS_PER_S.get(rec.preset)
    if rate is None:
        return f"unknown preset {rec.preset!r}", True
    try:  # a checkpoint's size is a function of its preset: a fetch never goes past it
        limit = checkpoint_budget(snap.run, job, rec.preset)
    except ValueError as e:
        return str(e), True
    if rec.size > limit:
        return f"size {rec.size} is over the {limit} bytes a {rec.preset} checkpoint takes", True
    if fingerprint(key) == snap.owner or snap.now == 0.0:
        return None
    span = claims.held_span(snap, job, key, tenure)
    if span is None:
        return f"its signer does not hold the {job} claim", False
    held_from, held_until = span
    prev = claims.last_accepted(snap, job)
    step0, t0 = (prev.step, prev.t) if prev else (0, snap.run.started)
    start = max(t0, held_from)
    reachable = rate * (max(0.0, held_until - start) + CLOCK_SLACK_S)
    if rec.step - step0 > reachable:
        gap = rec.step - step0
        return (
            f"step {rec.step} is {gap} steps past {step0} in the {max(0.0, held_until - start):.0f}s "
            f"its signer held the claim: beyond {rate:.0f} steps/s",
            True,
        )
    return None


class CannotJudge(Exception):
    """This node lacks what judging a checkpoint takes (a VAE, the run's text encoder): it gives
    no verdict, which is not a refusal."""


class Verifier:
    """Judges pending checkpoints of a run and publishes the verdicts under this node's key."""

    def __init__(
        self,
        node: SwarmNode,
        blobs: BlobService,
        run: RunRecord,
        manifest: Manifest,
        folder: Path,
        cfg: VerifyConfig | None = None,
        ensure_data: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.node, self.blobs, self.run, self.manifest = node, blobs, run, manifest
        self.folder = folder  # fetched checkpoints land where the mirror keeps them
        self.cfg = cfg or VerifyConfig()
        self.ensure_data = ensure_data or (lambda clusters: None)
        self._jobs: dict[tuple[str, str], tuple[object, float]] = {}  # (job, preset) → (job, untrained loss)
        self._cannot: set[str] = set()  # hashes this node cannot judge (said once)
        # (sha256, step, "") → this node's verdict on the bytes; (sha256, step, fingerprint) → on
        # one signer's record of them
        self._judged: dict[tuple[str, int, str], Verdict] = {}
        self.tenure = claims.Tenure()  # who this node saw hold each job's claim
        self._best: dict[str, float] = {}  # job → lowest held-out loss this node accepted
        # Per job, the most advanced checkpoint accepted here, fetched into ``folder``: what a
        # mirror holds when the owner's record has moved on before the verdict landed.
        self.accepted: dict[str, CheckpointRecord] = {}

    def _job(self, job: str, preset: str, snap: claims.Snapshot | None = None):
        """The job's network freshly built (seeded) and its untrained held-out loss, cached. A
        distilled student's job holds its teacher: the verified experts and router of ``snap``."""
        if (job, preset) not in self._jobs:
            jid = JobId.parse(job)
            teacher = None
            if jid.is_distill and snap is not None:
                teacher = gather_teacher(self.node, self.blobs, snap, self.folder, self.folder.parent / "teacher")
            self.ensure_data([jid.expert_index] if jid.is_expert else list(range(self.run.num_clusters)))
            torch.manual_seed(self.cfg.seed)
            tcfg = TrainConfig(ckpt_root="", batch_size=self.cfg.batch_size, seed=self.cfg.seed)
            built = build_job(
                self.manifest,
                self.run.manifest_sha256,
                job,
                tcfg,
                self.cfg.text_encoder,
                self.cfg.vae,
                preset if jid.is_router else "tiny",
                # a distilled student is measured against the teacher it must have learned from
                teacher_root=teacher,
                distill_preset=preset if jid.is_distill else "",
            )
            self._jobs[(job, preset)] = (
                built,
                heldout_loss(built, self.cfg.batches, self.cfg.batch_size, self.cfg.seed),
            )
        return self._jobs[(job, preset)]

    def _judge(
        self,
        snap: claims.Snapshot,
        job: str,
        key: bytes,
        rec: CheckpointRecord,
        reason: str | None,
        loss: float = 0.0,
        ban: bool = True,
        about: str = "bytes",
        publish: bool = True,
        samples: int = 0,
    ) -> Verdict:
        """Publish a verdict on ``key``'s record ``rec``: on its bytes (every record of this hash and
        step shares it) or, with ``about="record"``, on that signer's record alone. A refusal and
        its ban land on the signer of the record judged, never on another holder of the hash."""
        fp = fingerprint(key)
        t = get_dht_time()
        # A reason may quote a stranger's metadata: cut to what the verdict's schema holds, or
        # publishing the verdict would fail.
        why = "" if reason is None else reason if len(reason) <= 160 else reason[:159] + "…"
        verdict = Verdict(rec.sha256, rec.step, fp, reason is None, t, loss, why, about, samples)
        self._judged[(rec.sha256, rec.step, fp if about == "record" else "")] = verdict
        if publish:  # else the caller publishes it with the others of its round, in one write
            self.node.publish_verdict(job, snap.run, verdict)
        if reason is None:
            console.log(f"verified {job} step {rec.step} ({rec.sha256[:12]}): held-out loss {loss:.4f}")
            if job not in self.accepted or self.accepted[job].step < rec.step:
                self.accepted[job] = rec
            if loss > 0:
                self._best[job] = min(loss, self._best.get(job, math.inf))
        else:
            console.log(f"refused {job} step {rec.step} ({rec.sha256[:12]}) signed by {fp[:12]}: {reason}")
            if ban and fingerprint(key) not in (snap.owner, snap.me):
                self.node.bans.ban(fingerprint(key), f"{job} checkpoint refused: {reason}")
        return verdict

    def _full(
        self, snap: claims.Snapshot, job: str, rec: CheckpointRecord
    ) -> tuple[str | None, float, bool, int] | None:
        """(refusal or None, held-out loss, ban, samples it says it saw) after fetching; ``None`` if
        it could not be fetched."""
        dest = self.folder / job / f"step_{rec.step:08d}"
        try:
            try:
                ckpt = verify_checkpoint(dest, expected_sha256=rec.sha256)
            except CheckpointError:
                ckpt = self.blobs.fetch_checkpoint(
                    rec.sha256, sources(self.node, rec.sha256, rec.providers), dest, fetch_budget(snap, job, rec)
                )
        except CheckpointError as e:  # its bytes arrived and do not add up
            return f"unusable checkpoint: {e}", 0.0, True, 0
        except BlobError as e:
            console.log(f"{job} step {rec.step}: not verified yet, could not fetch it ({e})")
            return None
        try:
            reason, loss, ban = self._check(snap, job, rec, ckpt)
        except CannotJudge as e:
            if rec.sha256 not in self._cannot:
                console.log(f"{job} step {rec.step}: not judged here ({e}); other verifiers will")
                self._cannot.add(rec.sha256)
            return None
        if reason is not None:
            shutil.rmtree(ckpt.path, ignore_errors=True)  # never provided, never loaded
        seen = ckpt.meta.get("samples_seen")
        # The trainer's word (the ledger bounds it by the verified steps).
        samples = seen if isinstance(seen, int) and 0 <= seen < 1 << 62 else 0
        return reason, loss, ban, samples

    def _check(
        self, snap: claims.Snapshot, job: str, rec: CheckpointRecord, ckpt: Checkpoint
    ) -> tuple[str | None, float, bool]:
        meta, jid = ckpt.meta, JobId.parse(job)
        want = {"kind": jid.kind, "manifest_sha256": snap.run.manifest_sha256, "step": rec.step}
        if jid.is_expert:
            want |= {"cluster": jid.expert_index, "objective": rec.objective}
        if jid.is_distill:
            if any(j not in snap.ckpts for j in snap.run.jobs()):  # read for this job alone: read them all
                snap = self.node.snapshot(snap.run)
            if not claims.teacher_done(snap):  # as far as this node sees: not a fault of the signer's
                raise CannotJudge("this node does not see every expert and the router done yet")
            teacher = {j: ck.sha256 for j in snap.run.jobs() if not JobId.parse(j).is_distill
                       if (ck := claims.latest_checkpoint(snap, j)) is not None}  # fmt: skip
            want |= {"teacher": teacher}
        for key, value in want.items():
            if meta.get(key) != value:
                return f"its metadata says {key}={meta.get(key)!r}, the record {value!r}", 0.0, True
        try:
            built, untrained = self._job(job, rec.preset, snap)
        except (ValueError, OSError, CheckpointError) as e:  # e.g. a latent run and no VAE here: others judge it
            raise CannotJudge(f"cannot build the job here: {e}") from None
        if (jid.is_expert or jid.is_distill) and meta.get("text_encoder") != built.encoder.name:
            raise CannotJudge(f"it was trained with text encoder {meta.get('text_encoder')!r}, this node has another")
        try:
            sampling, train = checkpoint_losses(built, ckpt, self.cfg.batches, self.cfg.batch_size, self.cfg.seed)
        except CheckpointError as e:
            return str(e), 0.0, True
        # Held to the best accepted checkpoint (the trusted verifiers' and this node's own), never
        # only the last: small regressions each within the margin must not add up.
        best = claims.best_accepted(snap, job)
        bar = min([untrained, *([best.loss] if best else []), *([self._best[job]] if job in self._best else [])])
        reason, ban = loss_refusal(sampling, train, untrained, bar, self.cfg.margin)
        return reason, sampling, ban

    def verify_pending(self, snap: claims.Snapshot, jobs: list[str] | None = None) -> list[Verdict]:
        """Judge what is pending in ``jobs`` (default: all): every record cheaply, and per job the
        most advanced one that passes through the full check. Returns the new verdicts.

        Each record is judged as its signer's: who signed it is who a refusal and a ban land on. A
        record whose signer holds no claim now waits until this node has watched the claims for a
        claim's lifetime (a verifier that just started cannot tell a holder that has since
        released from a stranger that never held the claim)."""
        self.tenure.observe(snap)
        out: list[Verdict] = []
        for job in jobs or snap.run.jobs():
            best = claims.latest_checkpoint(snap, job)
            recs = [
                (o, r)
                for o, r in snap.ckpts.get(job, {}).items()
                if r.run == snap.run.manifest_sha256
                and snap.admitted(o)
                and claims.verdict(snap, job, r, o) is None
                and (best is None or r.step > best.step)
            ]
            full_done = False
            cheap: list[Verdict] = []  # refused without a byte fetched: published together, one write
            for key, rec in sorted(recs, key=lambda item: (-item[1].step, item[1].sha256, item[0])):
                fp = fingerprint(key)
                if (rec.sha256, rec.step, "") in self._judged or (rec.sha256, rec.step, fp) in self._judged:
                    continue  # judged here already (the DHT may lag)
                if (
                    fp != snap.owner
                    and claims.held_span(snap, job, key, self.tenure) is None
                    and not self.tenure.watched(snap.now)
                ):
                    continue
                refusal = cheap_refusal(snap, job, key, rec, self.tenure)
                if refusal is not None:
                    cheap.append(
                        self._judge(snap, job, key, rec, refusal[0], ban=refusal[1], about="record", publish=False)
                    )
                    continue
                if full_done or not claims.available(snap, rec):
                    continue
                full_done = True
                result = self._full(snap, job, rec)
                if result is not None:
                    reason, loss, ban, samples = result
                    out.append(self._judge(snap, job, key, rec, reason, loss, ban=ban, samples=samples))
            # Many strangers' records cost this node CPU, not one DHT write each.
            self.node.publish_verdict(job, snap.run, *cheap[-MAX_VERDICTS:])
            out += cheap
        return out
