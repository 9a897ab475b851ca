"""The preparer's swarm role (``--role prepare --serve``): the run's owner. It publishes the run
record (signed by its key, which names the run), lists the run in the swarm's directory, provides
the run's manifest and shards by sha256, verifies every published checkpoint (it is the verifier
everyone trusts), publishes checkpoints trained here when they are ahead of the swarm's, and
mirrors every job's latest verified checkpoint, until stopped. It keeps the run's contribution
ledger (``swarm.ledger``): every acceptance it sees is appended to ``ledger/<run>.jsonl`` beside the
data, served by its sha256 and named in its signed ``ledger`` record.

Two threads: the verify and mirror loop, which fetches strangers' checkpoints and may spend a
while in one fetch, and a :class:`RecordKeeper` that renews this node's own records (the run
record, the directory entry, its presence with its bans, its provider announcements, its local
checkpoints' records) on a schedule of its own, so no fetch can let them expire: every other
job's checkpoints are fetched from the providers it announces.

Admission is the owner's to set while the run lives: with ``--allow FILE`` the run admits only
the trainer keys (fingerprints) listed in FILE, re-read every round; a FILE that says ``open``
admits anyone again."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from hivemind.utils import get_dht_time
from rich.console import Console

from data.checkpoint import CheckpointError, latest_checkpoint
from data.manifest import load_manifest
from swarm import claims, proof
from swarm.blobs import BlobService, BlobStore, announce
from swarm.dht import SwarmNode
from swarm.ledger import LedgerError, LedgerFile, from_snapshot
from swarm.mirror import mirror_checkpoints, publish_checkpoint
from swarm.records import (
    CKPT_TTL_S,
    CLAIM_GRACE_S,
    MAX_ALLOWED,
    PROVIDER_TTL_S,
    RUN_TTL_S,
    LedgerRecord,
    PeerRecord,
    RunDirRecord,
    RunRecord,
    ledger_key,
    peers_key,
    run_key,
    runs_key,
)
from swarm.verify import Verifier, VerifyConfig

console = Console(stderr=True, markup=False)  # logged errors hold multiaddrs like [/ip4/...]


class AdmissionError(ValueError):
    """An allowlist file that cannot be read as one."""


def read_admission(path: Path) -> tuple[str, list[str]]:
    """("open", []) or ("allowlist", fingerprints) from an allowlist file: one trainer key
    fingerprint per line (``#`` starts a comment), or the single word ``open``."""
    try:
        words = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    except OSError as e:
        raise AdmissionError(f"cannot read the allowlist {path}: {e.strerror}") from None
    words = [w for w in words if w]
    if words == ["open"]:
        return "open", []
    bad = [w for w in words if not re.fullmatch(r"[0-9a-f]{32}", w)]
    if bad:
        raise AdmissionError(f"{path}: {bad[0]!r} is not a key fingerprint (32 hex digits) nor 'open'")
    if len(words) > MAX_ALLOWED:
        raise AdmissionError(f"{path} lists {len(words)} keys; at most {MAX_ALLOWED}")
    return "allowlist", sorted(set(words))


@dataclass
class ServeRunConfig:
    expert_steps: int = 0  # an expert job is done at this step (0: never)
    router_steps: int = 0
    distill_steps: int = 0  # the distill job is done at this step (0: the run has none)
    distill_preset: str = ""  # the student's preset ("": the experts')
    period_s: float = 2.0  # verify and mirror rounds (a stopping trainer waits for one); admission re-reads
    ckpt_dir: Path | None = None  # publish checkpoints trained here when ahead of the swarm's
    allow: Path | None = None  # an allowlist file (None: anyone may train)
    grace_s: float = CLAIM_GRACE_S  # a claim with no verified checkpoint for this long expires
    text_encoder: str = "minilm"  # what the verifier measures held-out losses with
    vae: str = ""


def _started(data_dir: Path, name: str, digest: str) -> float:
    """When this run was first published; kept beside the data so a restarted preparer keeps it
    (claims made since stay plausible)."""
    path = data_dir / "run_state.json"
    try:
        state = json.loads(path.read_text())
        if state.get("name") == name and state.get("manifest_sha256") == digest:
            return float(state["started"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    started = float(get_dht_time())
    path.write_text(json.dumps({"name": name, "manifest_sha256": digest, "started": started}))
    return started


class RecordKeeper(threading.Thread):
    """Keeps the preparer's own records alive, whatever its verify and mirror loop is doing.

    Every ``period_s`` it re-reads the allowlist and shows a changed admission or a new ban at once;
    every third of the records' lifetime it renews them all: the run record, the runs directory
    entry, its presence (with its bans), its provider announcements and, with ``ckpt_dir``, the
    records of checkpoints trained here. :attr:`record` is the run as published now.
    """

    def __init__(self, node: SwarmNode, store: BlobStore, run: RunRecord, cfg: ServeRunConfig) -> None:
        super().__init__(name="preparer-records", daemon=True)
        self.node, self.store, self.cfg = node, store, cfg
        self.record = run
        self.ledger: LedgerRecord | None = None  # set by the verify loop when the ledger grows
        self._halt = threading.Event()

    def run(self) -> None:
        renewed, stored, shown, ledger = -math.inf, None, None, None
        while True:
            try:
                if self.cfg.allow is not None:
                    self.record = _admission(self.cfg.allow, self.record)
                run, bans = self.record, self.node.bans.lines()
                # Read each time (not at import): tests shorten the lifetimes.
                due = time.monotonic() - renewed > min(RUN_TTL_S, PROVIDER_TTL_S) / 3
                if due or run != stored:
                    self.node.store(run_key(), run, RUN_TTL_S)
                    self.node.store(runs_key(), RunDirRecord(run.name, run.manifest_sha256), RUN_TTL_S)
                    stored = run
                if due or bans != shown:
                    # Trainers hold a job until a mirror has its last checkpoint; this says one is up.
                    presence = PeerRecord(self.node.peer_id, "preparer", "mirroring", bans=bans)
                    self.node.store(peers_key(), presence, PROVIDER_TTL_S)
                    shown = bans
                if self.ledger is not None and (due or self.ledger != ledger):
                    if self.ledger != ledger:
                        announce(self.node, self.store, ttl=PROVIDER_TTL_S, only={self.ledger.sha256})
                    self.node.store(ledger_key(), self.ledger, CKPT_TTL_S)
                    ledger = self.ledger
                if due:
                    announce(self.node, self.store, ttl=PROVIDER_TTL_S)
                    renewed = time.monotonic()
                    if self.cfg.ckpt_dir is not None:
                        _publish_local(self.node, self.store, run, self.cfg.ckpt_dir)
            except Exception as e:  # the DHT may fail a write now and then: the next tick tries again
                console.log(f"renewing the preparer's records failed ({e!r}); trying again")
            if self._halt.wait(self.cfg.period_s):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def serve_run(node: SwarmNode, data_dir: Path, stop: threading.Event, cfg: ServeRunConfig | None = None) -> None:
    """The preparer's side, until stopped: see the module's docstring."""
    cfg = cfg or ServeRunConfig()
    if node.ref is None or node.ref.owner != node.fingerprint:
        raise ValueError("the preparer's node must own its run (SwarmConfig.own_run)")
    manifest, digest = load_manifest(data_dir)
    store = BlobStore()
    store.add_file(data_dir / "manifest.json", digest)
    for c in manifest.clusters:
        for entry in c.shards + c.holdout:
            url = manifest.resolve(entry.url)
            if Path(url).is_file():
                store.add_file(Path(url), entry.sha256)
    blobs = BlobService(node.dht, store, bans=node.bans)
    node.on_restart(blobs.rebind)
    admission, allowed = read_admission(cfg.allow) if cfg.allow else ("open", [])
    run = RunRecord(
        digest,
        manifest.num_clusters,
        [c.preset for c in manifest.clusters],
        [c.objective for c in manifest.clusters],
        (data_dir / "manifest.json").stat().st_size,
        cfg.expert_steps,
        cfg.router_steps,
        name=node.ref.name,
        started=_started(data_dir, node.ref.name, digest),
        admission=admission,
        allowed=allowed,
        grace_s=cfg.grace_s,
        distill_steps=cfg.distill_steps,
        distill_preset=cfg.distill_preset,
    )
    mirror = data_dir.parent / "mirror"
    verifier = Verifier(node, blobs, run, manifest, mirror, VerifyConfig(cfg.text_encoder, cfg.vae))
    keeper = RecordKeeper(node, store, run, cfg)
    ledger = _open_ledger(data_dir, run, store, keeper)
    keeper.start()
    proofs_held: set[str] = set()
    proofs_failed: dict[str, str] = {}
    try:
        while True:
            run = verifier.run = keeper.record
            snap = node.snapshot(run)
            if verifier.verify_pending(snap):
                snap = node.snapshot(run)  # (a refusal's ban shows in the presence the keeper renews)
            mirror_checkpoints(node, blobs, snap, mirror, publish=True, accepted=verifier.accepted)
            _keep_ledger(ledger, snap, store, keeper)
            # Proofs against lying servers outlive the clients that caught them (the keeper announces them).
            before = dict(proofs_failed)
            for p in proof.mirror(node, blobs, run, mirror / "proofs", proofs_held, proofs_failed):
                console.log(f"holding a proof against server {p.peer} (expert {p.expert}) for clients to check")
            for digest, why in proofs_failed.items():
                if before.get(digest) != why:
                    console.log(f"a proof's blobs could not be had ({why})")
            if stop.wait(cfg.period_s):
                break
    finally:
        keeper.stop()
        try:
            node.store(peers_key(), PeerRecord(node.peer_id, "preparer", "offline"), PROVIDER_TTL_S)
        except Exception:  # shutting down; the record expires by itself
            pass
        blobs.shutdown()


def _open_ledger(data_dir: Path, run: RunRecord, store: BlobStore, keeper: RecordKeeper) -> LedgerFile:
    """This run's ledger file (one per run name and manifest), served and named from the start."""
    path = data_dir.parent / "ledger" / f"{run.name}-{run.manifest_sha256[:16]}.jsonl"
    try:
        ledger = LedgerFile(path, run)
    except LedgerError as e:  # never rewrite what it held: the operator decides
        raise LedgerError(f"{e}; move it away to start a new ledger") from None
    _serve_ledger(ledger, store, keeper)
    return ledger


def _keep_ledger(ledger: LedgerFile, snap: claims.Snapshot, store: BlobStore, keeper: RecordKeeper) -> None:
    """Append the acceptances the trusted verdicts show that the ledger lacks, and serve the result."""
    new = ledger.add(from_snapshot(snap))
    if new:
        console.log(f"ledger: {len(new)} accepted checkpoint(s) added, {len(ledger.entries)} in all")
        _serve_ledger(ledger, store, keeper)


def _serve_ledger(ledger: LedgerFile, store: BlobStore, keeper: RecordKeeper) -> None:
    copy = ledger.frozen_copy(ledger.path.parent / "served")
    store.add_file(copy, ledger.digest)
    run = keeper.record
    keeper.ledger = LedgerRecord(run.manifest_sha256, ledger.digest, ledger.size, len(ledger.entries), ledger.newest)


def _admission(path: Path, run: RunRecord) -> RunRecord:
    """The run with the allowlist file's admission as it reads now (unchanged if unreadable)."""
    try:
        admission, allowed = read_admission(path)
    except AdmissionError as e:
        console.log(f"keeping the admission as it was: {e}")
        return run
    if (admission, allowed) != (run.admission, run.allowed):
        console.log(f"admission is now {admission}" + (f": {len(allowed)} trainer key(s)" if allowed else ""))
    return replace(run, admission=admission, allowed=allowed)


def _publish_local(node: SwarmNode, store: BlobStore, run: RunRecord, ckpt_dir: Path) -> None:
    snap = node.snapshot(run)
    for job in run.jobs():
        try:
            ck = latest_checkpoint(ckpt_dir / job)
        except CheckpointError as e:
            console.log(f"not publishing {job}: {e}")
            continue
        if ck is None or ck.meta.get("manifest_sha256") != run.manifest_sha256:
            continue
        rec = claims.latest_checkpoint(snap, job)
        if rec is None or rec.step < ck.step or rec.sha256 == ck.sha256:
            if rec is None or rec.sha256 != ck.sha256:
                console.log(f"publishing local checkpoint of {job}: step {ck.step} ({ck.sha256[:12]})")
            publish_checkpoint(node, store, run, job, ck)
