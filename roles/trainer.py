"""The swarm trainer: learn the run from the DHT, claim a free job, train it in isolation, and
publish checkpoints that any node can fetch and resume from.

    wait for the run record → fetch the manifest by sha256 → loop:
        read a snapshot → choose a job (claims.choose_job) → claim it → settle → re-read
        lost? withdraw and try again.  won? fetch the job's shards and its latest published
        checkpoint, then train; a heartbeat renews the claim and stops training the moment
        this node no longer wins; every checkpoint is published with this node as provider.
    nothing free? verify the checkpoints others published, mirror the latest verified checkpoint
    of every job (so a job outlives its owner) and wait for a claim to expire.

A clean shutdown (SIGINT/SIGTERM) saves a checkpoint and withdraws the claim at once.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from hivemind.utils import get_dht_time
from rich.console import Console

from data.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, list_checkpoints, verify_checkpoint
from data.job_id import JobId
from data.manifest import Manifest, load_manifest
from router.presets import DEFAULT_ROUTER_PRESET
from swarm import claims
from swarm.blobs import BlobError, BlobService, BlobStore, announce
from swarm.dht import SwarmError, SwarmNode
from swarm.mirror import fetch_budget, gather_teacher, mirror_checkpoints, publish_checkpoint, sources
from swarm.records import (
    HEARTBEAT_S,
    PROVIDER_TTL_S,
    ClaimRecord,
    PeerRecord,
    RunRecord,
    claim_key,
    peers_key,
)
from swarm.rundata import fetch_manifest, fetch_shards
from swarm.verify import Verifier, VerifyConfig
from training.island import Island
from training.jobs import build_job
from training.loop import TrainConfig, train

console = Console(stderr=True, markup=False)  # logged errors hold multiaddrs like [/ip4/...]


@dataclass
class SwarmTrainerConfig:
    work_dir: str  # fetched data, checkpoints and mirrors of this node
    wanted: str | None = None  # "expert_K" or "router": only this job
    heartbeat_s: float = HEARTBEAT_S  # claim renewal; a claim lives 3 heartbeats
    settle_s: float = 0.0  # wait after claiming before re-reading (0: one heartbeat)
    poll_s: float = 2.0  # how often an idle trainer looks again
    run_timeout_s: float = 0.0  # give up if no run appears (0: wait forever)
    text_encoder: str = "minilm"
    vae: str = ""
    router_preset: str = DEFAULT_ROUTER_PRESET
    minutes: float = 0.0  # this node's whole budget (0: until stopped)
    steps: int = 0  # stop a job at this step even before the run's target (0: the run's target)
    chunk_minutes: float = 60.0  # with neither target nor cap, release and re-choose a job this often
    replicas: int = 2  # peers (this one included) that must hold a job's last checkpoint before release
    replica_timeout_s: float = 120.0  # give up waiting for them after this long (and say so)
    # batch size, learning rate, checkpoint cadence, seed; its budget fields are set per job
    train: TrainConfig = field(default_factory=lambda: TrainConfig(ckpt_root="", minutes=60.0))

    @property
    def claim_ttl_s(self) -> float:
        return 3 * self.heartbeat_s


class ClaimKeeper(threading.Thread):
    """Renews a claim every heartbeat and notices when this node stops winning it."""

    def __init__(self, node: SwarmNode, run: RunRecord, job: str, claim: ClaimRecord, cfg: SwarmTrainerConfig):
        super().__init__(name=f"claim-{job}", daemon=True)
        self.node, self.run_rec, self.job, self.claim, self.cfg = node, run, job, claim, cfg
        self.lost = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        heard = time.monotonic()  # when this node last had a peer to renew its claim with
        while not self._halt.wait(self.cfg.heartbeat_s * random.uniform(0.8, 1.0)):  # jitter
            try:
                if self.node.cut_off():
                    # Renewals reach nobody: past the claim's lifetime others see it lapsed and may
                    # own the job, whatever this node's own copy of the DHT says.
                    if time.monotonic() - heard > self.cfg.claim_ttl_s:
                        console.log(
                            f"{self.job}: cut off from every peer for longer than a claim lives "
                            f"({self.cfg.claim_ttl_s:.0f}s): another node may own this job now; stopping"
                        )
                        self.lost.set()
                        return
                    continue
                heard = time.monotonic()
                self.node.store(claim_key(self.job), self.claim, self.cfg.claim_ttl_s)
                self.run_rec = self.node.run() or self.run_rec  # the owner may change admission
                # Its own claim is passed along: a read cut short by a flood of records may lack it,
                # and only a valid claim that beats it may stop this node.
                snap = self.node.snapshot(self.run_rec, [self.job], checkpoints=False)
                if not claims.still_wins(snap, self.job, self.node.owner, self.claim):
                    if claims.stale(snap, self.job, self.node.owner, self.claim):
                        console.log(
                            f"{self.job}: no checkpoint of this node was verified within the run's grace "
                            f"period ({self.run_rec.grace_s:.0f}s), so its claim has lapsed; stopping"
                        )
                    else:
                        console.log(f"{self.job}: another node now wins this job; stopping")
                    self.lost.set()
                    return
            except Exception as e:  # a failed renewal is retried next beat; the lease covers 3
                console.log(f"{self.job}: claim renewal failed ({e!r}); still training, trying again next beat")

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class SwarmTrainer:
    def __init__(
        self,
        node: SwarmNode,
        cfg: SwarmTrainerConfig,
        stop: threading.Event | None = None,
        island: Island | None = None,
    ) -> None:
        self.node, self.cfg = node, cfg
        self.island = island  # rank 0 of a compute island: the other ranks train what this one tells
        self.stop = stop or threading.Event()
        self.store = BlobStore()
        self.blobs = BlobService(node.dht, self.store, bans=node.bans)
        node.on_restart(self.blobs.rebind)
        self.work = Path(cfg.work_dir)
        self.presence = PeerRecord(node.peer_id, "trainer", "joining")
        self.verifier: Verifier | None = None  # built once the run and its manifest are known
        self._waiting_admission = False
        self._announcer = threading.Thread(target=self._announce_loop, name="provider", daemon=True)
        self._announcer.start()
        self._presence = threading.Thread(target=self._presence_loop, name="presence", daemon=True)
        self._presence.start()

    # ---------------------------------------------------------------- plumbing
    def _announce_loop(self) -> None:
        while not self.stop.wait(PROVIDER_TTL_S / 3):
            try:
                announce(self.node, self.store)
            except Exception as e:  # the next round tries again
                console.log(f"provider announcement failed: {e!r}")

    def _presence_loop(self) -> None:
        """Tell the swarm (and its status dashboard) every heartbeat what this node is doing."""
        while True:
            try:
                if self.node.ref is not None:  # known once the run is found
                    self._set_presence(bans=self.node.bans.lines())
                    self.node.store(peers_key(), self.presence, self.cfg.claim_ttl_s)
            except Exception as e:  # the next beat tries again
                console.log(f"presence update failed: {e!r}")
            if self.stop.wait(self.cfg.heartbeat_s):
                break
        try:
            self.node.store(peers_key(), PeerRecord(self.node.peer_id, "trainer", "offline"), self.cfg.claim_ttl_s)
        except Exception:  # shutting down; the record expires anyway
            pass

    def _set_presence(self, **changes) -> None:
        self.presence = PeerRecord(**{**self.presence.__dict__, **changes})

    def _sources(self, digest: str, extra: list[str] = ()) -> list[str]:
        return sources(self.node, digest, extra)

    def wait_for_run(self) -> RunRecord:
        t0 = time.monotonic()
        said = False
        while not self.stop.is_set():
            run = self.node.run()
            if run is not None:
                return run
            if not said:
                console.log("waiting for a run to be published (python node.py --role prepare --serve ...)")
                said = True
            if self.cfg.run_timeout_s and time.monotonic() - t0 > self.cfg.run_timeout_s:
                raise TimeoutError(f"no run was published in the swarm within {self.cfg.run_timeout_s:.0f}s")
            self.stop.wait(self.cfg.poll_s)
        raise InterruptedError("stopped while waiting for a run")

    def fetch_manifest(self, run: RunRecord) -> tuple[Manifest, str]:
        return fetch_manifest(self.node, self.blobs, self.work, run)

    def fetch_shards(self, manifest: Manifest, clusters: list[int]) -> None:
        fetch_shards(self.node, self.blobs, manifest, clusters)

    def _publish(self, job: str, run: RunRecord, ckpt: Checkpoint) -> None:
        try:
            publish_checkpoint(self.node, self.store, run, job, ckpt)
        except SwarmError as e:  # cut off from the swarm for now: training goes on, the next one is published
            console.log(f"{job}: could not publish step {ckpt.step} ({e}); training on")

    def _resume_point(self, job: str, snap: claims.Snapshot, root: Path) -> None:
        """Make the newest published checkpoint of ``job`` the latest one under ``root``."""
        rec = claims.latest_checkpoint(snap, job)
        try:
            local = latest_checkpoint(root)
        except CheckpointError as e:
            console.log(f"{job}: ignoring a bad local checkpoint ({e})")
            local = None
        if rec is None or (local is not None and local.step >= rec.step):
            return
        console.log(f"{job}: fetching published checkpoint step {rec.step} ({rec.sha256[:12]})")
        for stale in list_checkpoints(root):
            if int(stale.name.split("_")[1]) >= rec.step:
                try:
                    verify_checkpoint(stale)
                except CheckpointError as e:  # this node's own broken copy: nothing to keep
                    console.log(f"{job}: removing unusable {stale.name} ({e})")
                    shutil.rmtree(stale)
                    continue
                raise CheckpointError(f"{stale} is newer than the published checkpoint; move it away")
        try:
            self.blobs.fetch_checkpoint(
                rec.sha256,
                self._sources(rec.sha256, rec.providers),
                root / f"step_{rec.step:08d}",
                max_bytes=fetch_budget(snap, job, rec),
            )
            return
        except BlobError as e:
            reason = e
        # Its only holder may have died before anyone mirrored it: the newest checkpoint this node
        # holds (its own, or its mirror of the job) loses less than waiting forever would.
        mirrored = self.work / "mirror" / job
        fallback = None
        for candidate in sorted(mirrored.glob("step_*"), reverse=True):
            try:
                fallback = verify_checkpoint(candidate)
                break
            except CheckpointError:
                continue
        if fallback is not None and (local is None or fallback.step > local.step):
            shutil.copytree(fallback.path, root / fallback.path.name)
            console.log(f"{job}: step {rec.step} cannot be had ({reason}); resuming from mirrored step {fallback.step}")
        elif local is not None:
            console.log(f"{job}: step {rec.step} cannot be had ({reason}); resuming from own step {local.step}")
        else:
            raise reason

    def _mirrors_up(self) -> bool:
        """Another peer that mirrors every job is up: the preparer, or a trainer with no job."""
        mirroring = {"preparer": ("mirroring",), "trainer": ("idle", "done")}
        return any(
            p.peer != self.node.peer_id and p.state in mirroring.get(p.role, ())
            for p in self.node.read(peers_key(), PeerRecord).values()
        )

    def await_replicas(self, job: str, ckpt: Checkpoint, run: RunRecord | None = None) -> int:
        """Hold the job (and the process) until ``replicas`` peers provide ``ckpt``, so leaving
        loses no step; returns how many do. Alone in the swarm, this node's own copy is all.
        A checkpoint a verifier refused is never mirrored: then it stops waiting at once."""
        deadline = time.monotonic() + self.cfg.replica_timeout_s
        said = False
        next_verdict = time.monotonic()
        while True:
            if run is not None and time.monotonic() >= next_verdict:
                next_verdict = time.monotonic() + 2.0  # a snapshot is several DHT reads
                no = [
                    v
                    for v in claims.refused(self.node.snapshot(run, [job]), job)
                    if v.sha256 == ckpt.sha256
                    and v.step == ckpt.step
                    and (v.about == "bytes" or v.owner == self.node.fingerprint)
                ]  # another key's record of this hash under another step is not this checkpoint
                if no:
                    console.log(
                        f"{job}: step {ckpt.step} was refused ({no[0].reason}); releasing, the job "
                        "goes on from its last accepted checkpoint"
                    )
                    return 1
            # Re-read each round: the mirrors may be leaving too (a whole swarm being stopped).
            want = self.cfg.replicas if self._mirrors_up() else 1
            have = len(self.node.providers(ckpt.sha256) | {self.node.peer_id})
            if have >= want:
                if want > 1:
                    console.log(f"{job}: step {ckpt.step} is held by {have} peers")
                return have
            if time.monotonic() > deadline:
                console.log(
                    f"{job}: step {ckpt.step} is held by {have} of {want} peers after "
                    f"{self.cfg.replica_timeout_s:.0f}s; releasing anyway (it is lost if this node does not come back)"
                )
                return have
            if not said:
                console.log(f"{job}: waiting until step {ckpt.step} is held by {want} peers before releasing")
                said = True
            time.sleep(0.5)

    def _teacher(self, run: RunRecord) -> Path:
        """The distill job's teacher, fetched where this node mirrors (see :func:`gather_teacher`)."""
        snap = self.node.snapshot(run)
        return gather_teacher(self.node, self.blobs, snap, self.work / "mirror", self.work / "teacher")

    def mirror(self, snap: claims.Snapshot) -> None:
        """Verify what others published, then hold the latest verified checkpoint of every job."""
        if self.verifier is not None and self.verifier.verify_pending(snap):
            snap = self.node.snapshot(snap.run)
        accepted = self.verifier.accepted if self.verifier is not None else None
        mirror_checkpoints(self.node, self.blobs, snap, self.work / "mirror", publish=True, accepted=accepted)

    # ---------------------------------------------------------------- the loop
    def claim(self, run: RunRecord) -> tuple[str, ClaimRecord] | None:
        return try_claim(
            self.node, run, self.cfg.wanted, self.cfg.claim_ttl_s, self.cfg.settle_s or self.cfg.heartbeat_s, self.stop
        )

    def run(self) -> Checkpoint | None:
        """Train until the budget is spent or the node is stopped; returns the last checkpoint."""
        run = self.wait_for_run()
        manifest, digest = self.fetch_manifest(run)
        console.log(f"joined run {self.node.ref} ({digest[:12]}): {run.num_clusters} experts + router")
        self.verifier = Verifier(
            self.node,
            self.blobs,
            run,
            manifest,
            self.work / "mirror",
            VerifyConfig(self.cfg.text_encoder, self.cfg.vae),
            lambda clusters: fetch_shards(self.node, self.blobs, manifest, clusters, holdout_only=True),
        )
        deadline = time.monotonic() + self.cfg.minutes * 60 if self.cfg.minutes else None
        last = None
        idle_said = None
        while not self.stop.is_set() and (deadline is None or time.monotonic() < deadline):
            run = self.node.run() or run  # admission may change while the run lives
            self.verifier.run = run
            if not self._admitted(run):
                continue
            if self.node.cut_off():  # a job claimed now would be claimed against nobody
                if idle_said != "cut off":
                    console.log("cut off from every peer; claiming nothing until this node rejoins")
                    idle_said = "cut off"
                self.stop.wait(self.cfg.poll_s)
                continue
            won = self.claim(run)
            if won is None:
                snap = self.node.snapshot(run)
                complete = claims.run_complete(snap)
                self._set_presence(state="done" if complete else "idle", job="", samples_per_s=0.0)
                if idle_said != complete:
                    console.log(
                        "run complete: every job reached its target; providing checkpoints until stopped"
                        if complete
                        else "no free job; waiting for a claim to expire"
                    )
                    idle_said = complete
                self.mirror(snap)
                self.stop.wait(self.cfg.poll_s)
                continue
            idle_said = None
            job, claim = won
            console.log(f"claimed {job} as {self.node.peer_id[:12]}…")
            self._set_presence(state="training", job=job)
            keeper = ClaimKeeper(self.node, run, job, claim, self.cfg)
            keeper.start()
            try:
                jid = JobId.parse(job)
                clusters = [jid.expert_index] if jid.is_expert else list(range(run.num_clusters))
                root = jid.folder(self.work / "checkpoints")
                teacher = None
                try:
                    self.fetch_shards(manifest, clusters)
                    if jid.is_distill:  # the verified experts and router it learns from, peer to peer
                        teacher = self._teacher(run)
                    snap = self.node.snapshot(run, [job])
                    if self.verifier.verify_pending(snap, [job]):  # resume from the newest sound one
                        snap = self.node.snapshot(run, [job])
                    self._resume_point(job, snap, root)
                except (BlobError, CheckpointError) as e:
                    # Training from scratch would throw the published progress away: back off instead.
                    console.log(f"{job}: cannot start ({e}); releasing it and retrying later")
                    self.stop.wait(self.cfg.poll_s)
                    continue
                minutes_left = (deadline - time.monotonic()) / 60 if deadline else 0.0
                steps = [n for n in (self.cfg.steps, run.target(job)) if n > 0]
                minutes = max(minutes_left, 1e-3) if deadline else (0.0 if steps else self.cfg.chunk_minutes)
                # A claim lives only while verified checkpoints show progress: publish well within it.
                every = min(self.cfg.train.ckpt_every_minutes, run.grace_s / 60 / 3)
                tcfg = replace(
                    self.cfg.train,
                    ckpt_root=str(root),
                    steps=min(steps) if steps else 0,
                    minutes=minutes,
                    ckpt_every_minutes=every,
                )
                train_job = build_job(
                    manifest, digest, job, tcfg, self.cfg.text_encoder, self.cfg.vae, self.cfg.router_preset,
                    teacher_root=teacher, distill_preset=run.distill_preset,
                )  # fmt: skip
                if jid.is_distill and latest_checkpoint(root) is None:  # nothing to resume: a new student
                    console.log(train_job.start_from_nearest_expert())
                if self.island is not None:  # the other ranks build the same job and train with us
                    self.island.tell(
                        {
                            "job": job,
                            "train": asdict(tcfg),
                            "manifest": str(self.work / "data" / digest[:12] / "manifest.json"),
                            "text_encoder": self.cfg.text_encoder,
                            "vae": self.cfg.vae,
                            "router_preset": self.cfg.router_preset,
                            "teacher": str(teacher or ""),
                            "distill_preset": run.distill_preset,
                        }
                    )
                last = train(
                    train_job,
                    tcfg,
                    island=self.island,
                    should_stop=lambda k=keeper: self.stop.is_set() or k.lost.is_set(),
                    # A node that lost the job publishes nothing more of it: its line ends where the
                    # new owner's begins.
                    on_checkpoint=lambda ck, j=job, r=run, k=keeper: k.lost.is_set() or self._publish(j, r, ck),
                    on_log=lambda st, loss, rate: self._set_presence(
                        step=st, loss=float(loss), samples_per_s=float(rate)
                    ),
                )
                if keeper.lost.is_set():
                    console.log(f"{job}: lost to another node; step {last.step} stays here, unpublished")
                else:
                    rec = claims.latest_checkpoint(self.node.snapshot(run, [job]), job)
                    if rec is None or rec.step < last.step:  # resumed at its target: nothing new was saved
                        self._publish(job, run, last)
                    self.await_replicas(job, last, run)
            finally:
                keeper.stop()
                if not keeper.lost.is_set():
                    self.node.withdraw_claim(job, claim)
                    console.log(f"released {job}")
            if self.cfg.steps and last is not None and last.step >= self.cfg.steps:
                break
        return last

    def _admitted(self, run: RunRecord) -> bool:
        """In an allowlist run, wait (mirroring nothing, claiming nothing) until the owner lists
        this node's key; every node ignores the claims of keys it does not list."""
        if run.admission == "open" or self.node.fingerprint in run.allowed:
            if self._waiting_admission:
                console.log("this node's key is admitted now")
                self._waiting_admission = False
            return True
        if not self._waiting_admission:
            console.log(
                f"not admitted: run {self.node.ref} admits only the trainer keys its owner lists; this "
                f"node's key is {self.node.fingerprint} (the owner adds it to its --allow file); waiting"
            )
            self._waiting_admission = True
        self._set_presence(state="waiting", job="")
        self.stop.wait(self.cfg.poll_s)
        return False

    def shutdown(self) -> None:
        self.stop.set()
        self._presence.join(timeout=10)
        self.blobs.shutdown()


def follow_island(island: Island, stop: threading.Event) -> int:
    """Ranks 1..N-1 of a trainer island: never touch the DHT; train each job rank 0 tells (same
    data and checkpoints, on this machine's filesystem) until it says the island is done.
    Returns how many jobs were trained."""
    jobs = 0
    while (msg := island.hear()) is not None:
        manifest, digest = load_manifest(Path(msg["manifest"]))
        tcfg = TrainConfig(**msg["train"])
        teacher = Path(msg["teacher"]) if msg.get("teacher") else None
        job = build_job(
            manifest, digest, msg["job"], tcfg, msg["text_encoder"], msg["vae"], msg["router_preset"],
            teacher_root=teacher, distill_preset=msg.get("distill_preset", ""),
        )  # fmt: skip
        if JobId.parse(msg["job"]).is_distill and latest_checkpoint(Path(tcfg.ckpt_root)) is None:
            job.start_from_nearest_expert()  # as rank 0 did, on the same first batch
        train(job, tcfg, should_stop=stop.is_set, island=island)
        jobs += 1
    return jobs


def try_claim(
    node: SwarmNode,
    run: RunRecord,
    wanted: str | None,
    ttl_s: float,
    settle_s: float,
    stop: threading.Event | None = None,
) -> tuple[str, ClaimRecord] | None:
    """One round of the claim rule: choose, claim, settle, re-read; withdraw if not the winner."""
    snap = node.snapshot(run)
    job = claims.choose_job(snap, node.owner, wanted)
    if job is None:
        return None
    mine = snap.live_claims(job).get(node.owner)
    claim = mine or ClaimRecord(run.manifest_sha256, node.peer_id, float(get_dht_time()))
    node.store(claim_key(job), claim, ttl_s)
    (stop or threading.Event()).wait(settle_s)
    if claims.still_wins(node.snapshot(run, [job], checkpoints=False), job, node.owner, claim):
        return job, claim
    node.withdraw_claim(job, claim)
    return None
