"""``--role status``: what the swarm is doing, as a live rich dashboard, one JSON snapshot, or a
web page (``--web HOST:PORT``, :mod:`roles.web`).

For every run the DHT lists (several runs can share one; ``--run`` shows one of them): its owner,
manifest, K, presets, targets and admission; for each job its owner, step, loss and samples/s (from
the owner's presence record), how long since its step moved, its latest verified checkpoint (step,
hash prefix, age, providers) with the trusted verifiers' verdicts on it, how many newer ones wait
for a verdict, and the refused ones with the reason; then the expert servers (state, requests/s,
queue, the checkpoint they serve), every peer that is up, idle trainers included, the local bans
(this node's and those each peer reports), each job's loss against step, and the contribution
ledger: who trained which verified steps, samples and share of the FLOPs (:mod:`swarm.ledger`).

The ledger is the run's verifiers' file (fetched by the hash their signed ``ledger`` record names,
parsed as untrusted and checked against the verdicts this node reads) merged with the acceptances
those verdicts show now. Everything shown comes from peers: it is data, never markup.

The node only reads: it writes nothing to the DHT, whatever the page's visitors do.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from hivemind.utils import get_dht_time
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from data.job_id import DISTILL_SLOT
from swarm import claims, ledger
from swarm.blobs import BlobError, BlobService, BlobStore, providers
from swarm.dht import SwarmError, SwarmNode
from swarm.records import (
    CKPT_TTL_S,
    CheckpointRecord,
    LedgerRecord,
    PeerRecord,
    RunRecord,
    RunRef,
    ckpt_key,
    fingerprint,
    ledger_key,
    peers_key,
)

HISTORY_POINTS = 400  # per job: older training-loss points are thinned out beyond this
LEDGER_REFETCH_S = 20.0  # a ledger whose digest moved is fetched again at most this often
MAX_RUNS = 16  # runs shown; anyone can list a run, and each one shown costs a snapshot's reads
NO_RUN_RECHECK_S = 30.0  # a listed run with no valid run record is looked at again after this


def parse_web(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1) → (host, port)."""
    m = re.fullmatch(r"(?:(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):)?([0-9]{1,5})", text.strip())
    if m is None or int(m.group(2)) > 65535:
        raise ValueError(f"--web takes HOST:PORT (or PORT, on 127.0.0.1); got {text!r}")
    return (m.group(1) or "127.0.0.1").strip("[]"), int(m.group(2))


class StatusWatcher:
    """Collects snapshots of the swarm and keeps what only time shows: each job's loss against
    step, when its step last moved, and the ledgers fetched (re-fetched only when their digest
    moves). One per status node; the web page and the terminal show what :meth:`collect` returns."""

    def __init__(self, node: SwarmNode, only: RunRef | None = None) -> None:
        self.node, self.only = node, only
        self._history: dict[tuple[str, str], list[list[float]]] = {}  # (run, job) → [[step, loss]]
        self._moved: dict[tuple[str, str], tuple[int, float]] = {}  # (run, job) → (step, when it moved)
        self._ledgers: dict[str, tuple[str, list[ledger.Entry], list[str], float]] = {}  # run → digest, ...
        self._blobs: BlobService | None = None
        self._empty: dict[RunRef, float] = {}  # listed runs whose record was not there → when looked

    def collect(self, with_entries: bool = False) -> dict:
        """One snapshot of every run as plain data (the ``--json`` output and the page's API).
        ``with_entries``: each run's ledger lists its checkpoints too (``--ledger``)."""
        refs = sorted(self.node.runs(), key=str)
        if self.only is not None:
            refs = [r for r in refs if r == self.only] or [self.only]
        runs, now = [], time.monotonic()
        for ref in refs:
            if len(runs) == MAX_RUNS:
                break
            if now - self._empty.get(ref, -NO_RUN_RECHECK_S) < NO_RUN_RECHECK_S:
                continue  # a listing with no run behind it (a stranger's, or one not published yet)
            view = self.node.for_run(ref)
            try:
                run = view.run()
            except SwarmError:
                run = None
            if run is None:
                self._empty[ref] = now
                continue
            self._empty.pop(ref, None)
            runs.append(self._collect_run(view, run, with_entries))
        return {"time": time.time(), "self": self.node.peer_id, "bans": self.node.bans.lines(), "runs": runs}

    def _collect_run(self, node: SwarmNode, run: RunRecord, with_entries: bool) -> dict:
        ref = str(node.ref)
        peers = node.read(peers_key(), PeerRecord)
        out: dict = {
            "ref": ref,
            "name": run.name,
            "owner": node.ref.owner,
            "admission": run.admission,
            "allowed": len(run.allowed),
            "manifest_sha256": run.manifest_sha256,
            "num_clusters": run.num_clusters,
            "objectives": run.objectives,
            "presets": run.presets,
            "expert_steps": run.expert_steps,
            "router_steps": run.router_steps,
            "complete": False,
            "jobs": [],
            "servers": [],
            "peers": sorted(
                ({**p.__dict__} for p in peers.values() if p.state != "offline"),
                key=lambda p: (p["state"], p["peer"]),
            ),
        }
        for k, recs in node.servers(run, run.served_slots(), online_only=False).items():
            what = "distilled" if k == DISTILL_SLOT else k  # the student's server, beside the experts'
            for rec in recs:
                out["servers"].append(
                    {"expert": what, "slot": k, "peer": rec.peer, "state": rec.state, "rps": rec.rps}
                    | {"queue": rec.queue, "step": rec.step, "ckpt": rec.ckpt, "max_batch": rec.max_batch}
                    | {"reach": rec.reach}
                )
        out["servers"].sort(key=lambda r: (r["slot"], r["state"] != "online", r["peer"]))
        snap = node.snapshot(run)
        out["complete"] = claims.run_complete(snap)
        by_peer = {p.peer: p for p in peers.values()}
        now = time.monotonic()
        for job in run.jobs():
            owner = claims.winner(snap, job)
            claim = snap.live_claims(job).get(owner) if owner else None
            ck = claims.latest_checkpoint(snap, job)
            presence = by_peer.get(claim.peer) if claim else None
            live = presence is not None and presence.job == job
            step = presence.step if live else (ck.step if ck else 0)
            loss = presence.loss if live else (ck.loss if ck else None)
            last = self._moved.get((ref, job))
            if last is None or last[0] != step:
                self._moved[(ref, job)] = (step, now if last is not None else float("nan"))
            moved = self._moved[(ref, job)][1]
            if live and presence.step > 0 and presence.loss > 0:
                self._remember(ref, job, presence.step, presence.loss)
            out["jobs"].append(
                {
                    "job": job,
                    "target": run.target(job),
                    "done": claims.done(snap, job),
                    "owner": claim.peer if claim else None,
                    "owner_key": fingerprint(owner) if owner else None,
                    "since": claim.t0 if claim else None,
                    "step": step,
                    "loss": loss,
                    "samples_per_s": presence.samples_per_s if live else 0.0,
                    "step_age_s": None if moved != moved else now - moved,  # nan: not seen moving yet
                    "pending": len(
                        {r.sha256 for o, r in claims.candidates(snap, job) if claims.verdict(snap, job, r, o) is None}
                    ),
                    "refused": [
                        {"step": v.step, "sha256": v.sha256, "owner": v.owner, "reason": v.reason}
                        for v in claims.refused(snap, job)
                    ],
                    "checkpoint": None if ck is None else self._checkpoint(node, snap, job, ck),
                }
            )
        entries, book = self._ledger(node, snap)
        out["ledger"] = book | ledger.summary(entries, run)
        if with_entries:
            out["ledger"]["checkpoints"] = [asdict(e) for e in entries]
        out["history"] = {
            job: {
                "train": self._history.get((ref, job), []),
                "heldout": [[e.step, e.loss] for e in entries if e.job == job and e.loss > 0],
            }
            for job in run.jobs()
        }
        return out

    def _checkpoint(self, node: SwarmNode, snap: claims.Snapshot, job: str, ck: CheckpointRecord) -> dict:
        verdicts = [
            {"verifier": fingerprint(key), "ok": v.ok, "loss": v.loss, "reason": v.reason, "t": v.t}
            for key, rec in (snap.verdicts or {}).get(job, {}).items()
            if fingerprint(key) in claims.trusted(snap) and rec.run == snap.run.manifest_sha256
            for v in rec.entries
            if v.sha256 == ck.sha256 and v.step == ck.step
        ]
        return {
            "step": ck.step,
            "sha256": ck.sha256,
            "size": ck.size,
            "age_s": _checkpoint_age(node, job, ck),
            "providers": sorted(set(ck.providers) | set(providers(node, ck.sha256))),
            "verdicts": verdicts,
        }

    def _remember(self, ref: str, job: str, step: int, loss: float) -> None:
        points = self._history.setdefault((ref, job), [])
        if points and points[-1][0] >= step:
            return
        points.append([step, loss])
        if len(points) > HISTORY_POINTS:  # keep the whole curve's shape: drop every other old point
            points[:] = points[: -HISTORY_POINTS // 2 : 2] + points[-HISTORY_POINTS // 2 :]

    def _ledger(self, node: SwarmNode, snap: claims.Snapshot) -> tuple[list[ledger.Entry], dict]:
        """The run's entries (its verifiers' ledger file merged with the verdicts seen now) and what
        is known of the file: its digest, whether it checks out, and what does not."""
        ref = str(node.ref)
        trusted = claims.trusted(snap) - {snap.me}
        records = [
            r
            for o, r in node.read(ledger_key(), LedgerRecord).items()
            if fingerprint(o) in trusted and r.run == snap.run.manifest_sha256
        ]
        record = max(records, key=lambda r: (r.entries, r.t), default=None)
        held = self._ledgers.get(ref)
        if record is not None and (held is None or held[0] != record.sha256):
            if held is None or time.monotonic() - held[3] > LEDGER_REFETCH_S:
                self._ledgers[ref] = held = self._fetch_ledger(node, snap, record)
        seen = ledger.from_snapshot(snap)
        if held is None:
            return seen, {"digest": None, "checked": None, "problems": []}
        digest, entries, problems, _ = held
        return ledger.merge(entries, seen), {"digest": digest, "checked": not problems, "problems": problems}

    def _fetch_ledger(
        self, node: SwarmNode, snap: claims.Snapshot, record: LedgerRecord
    ) -> tuple[str, list[ledger.Entry], list[str], float]:
        if self._blobs is None:
            self._blobs = BlobService(node.dht, BlobStore(), timeout=60.0, bans=node.bans)
        folder = Path(tempfile.mkdtemp(prefix="diffswarm-ledger-"))
        try:
            path = self._blobs.fetch(
                record.sha256,
                providers(node, record.sha256),
                folder / "ledger.jsonl",
                max_bytes=min(record.size, ledger.MAX_LEDGER_BYTES),
            )
            entries = ledger.parse(path.read_bytes(), snap.run)
            problems = ledger.check(entries, snap, until=record.t)
        except (BlobError, ledger.LedgerError) as e:
            entries, problems = [], [f"the ledger {record.sha256[:12]} could not be used: {e}"]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        # A ledger that disagrees with the verdicts seen here counts for nothing but its problems.
        return record.sha256, entries if not problems else [], problems, time.monotonic()

    def close(self) -> None:
        if self._blobs is not None:
            self._blobs.shutdown()


def collect(node: SwarmNode) -> dict:
    """One snapshot of the swarm as plain data (see :class:`StatusWatcher`)."""
    watcher = StatusWatcher(node)
    try:
        return watcher.collect()
    finally:
        watcher.close()


def _checkpoint_age(node: SwarmNode, job: str, ck: CheckpointRecord) -> float | None:
    """Seconds since the record was written: its expiry minus the TTL it was written with."""
    found = node.get(ckpt_key(job))
    if found is None or not isinstance(found.value, dict):
        return None
    expirations = [
        item.expiration_time
        for item in found.value.values()
        if isinstance(getattr(item, "value", None), dict) and item.value.get("sha256") == ck.sha256
    ]
    return max(0.0, get_dht_time() - (max(expirations) - CKPT_TTL_S)) if expirations else None


def render(data: dict) -> Group:
    if not data["runs"]:
        return Group("[yellow]no run published yet[/] (python node.py --role prepare --serve ...)")
    parts: list = []
    for run in data["runs"]:
        parts += _render_run(run)
    if data["bans"]:
        banned = Table(title=f"{len(data['bans'])} bans of this node")
        banned.add_column("who: why")
        for line in data["bans"]:
            banned.add_row(escape(line))
        parts.append(banned)
    return Group(*parts)


def _render_run(run: dict) -> list:
    state = " · [green]complete[/]" if run["complete"] else ""
    admission = "open" if run["admission"] == "open" else f"allowlist of {run['allowed']}"
    jobs = Table(
        title=f"run {run['ref']} ({run['manifest_sha256'][:12]}) · {run['num_clusters']} experts + router"
        f" · {admission}{state}"
    )
    numbers = ("step", "loss", "samples/s", "age", "providers")
    for col in ("job", "owner", "step", "loss", "samples/s", "checkpoint", "age", "providers"):
        jobs.add_column(col, justify="right" if col in numbers else "left")
    for j in run["jobs"]:
        ck = j["checkpoint"]
        jobs.add_row(
            j["job"],
            "[green]done[/]" if j["done"] else escape(j["owner"] or "")[:16] or "[red]unclaimed[/]",
            f"{j['step']}/{j['target']}" if j["target"] else str(j["step"]),
            "-" if j["loss"] is None else f"{j['loss']:.4f}",
            f"{j['samples_per_s']:.0f}",
            f"{ck['step']} · {ck['sha256'][:12]}" if ck else "-",
            "-" if not ck or ck["age_s"] is None else f"{ck['age_s']:.0f}s",
            str(len(ck["providers"])) if ck else "0",
        )
    tables: list = [jobs]
    waiting = [f"{j['job']}: {j['pending']}" for j in run["jobs"] if j["pending"]]
    if waiting:
        tables.append("newer checkpoints awaiting verification: " + ", ".join(waiting))
    refusals = [(j["job"], v) for j in run["jobs"] for v in j["refused"]]
    if refusals:
        refused = Table(title=f"{len(refusals)} checkpoints refused")
        for col in ("job", "step", "checkpoint", "signer", "why"):
            refused.add_column(col)
        for job, v in refusals:
            refused.add_row(job, str(v["step"]), v["sha256"][:12], v["owner"][:12], escape(v["reason"]))
        tables.append(refused)
    if run["servers"]:
        online = sum(1 for r in run["servers"] if r["state"] == "online")
        servers = Table(title=f"expert servers: {online} online")
        for col in ("expert", "server", "reach", "state", "req/s", "queue", "serving"):
            servers.add_column(col, justify="right" if col in ("req/s", "queue") else "left")
        for r in run["servers"]:
            servers.add_row(
                str(r["expert"]),
                escape(r["peer"][:16]),
                _reach(r["reach"]),
                r["state"] if r["state"] == "online" else f"[dim]{r['state']}[/]",
                f"{r['rps']:.1f}",
                str(r["queue"]),
                f"step {r['step']} · {r['ckpt'][:12]}",
            )
        tables.append(servers)
    peers = Table(title=f"{len(run['peers'])} peers up")
    for col in ("peer", "reach", "role", "state", "job"):
        peers.add_column(col)
    for p in run["peers"]:
        peers.add_row(
            escape(p["peer"][:16]),
            _reach(p.get("reach", "")),
            *(escape(x) for x in (p["role"], p["state"], p["job"] or "-")),
        )
    tables.append(peers)
    book = run["ledger"]
    if book["contributors"]:
        source = "verdicts seen" if book["digest"] is None else f"ledger {book['digest'][:12]}"
        checked = "" if book["checked"] in (None, True) else " · [red]does not check out[/]"
        credit = Table(title=f"contributions ({source}, {book['entries']} checkpoints{checked})")
        for col in ("key", "steps", "samples", "share of FLOPs", "jobs"):
            credit.add_column(col, justify="right" if col in ("steps", "samples", "share of FLOPs") else "left")
        for c in book["contributors"]:
            credit.add_row(
                c["key"][:16],
                str(c["steps"]),
                str(c["samples"]),
                f"{100 * c['share']:.1f}%",
                ", ".join(f"{job} {v['steps']}" for job, v in sorted(c["jobs"].items())),
            )
        tables.append(credit)
    bans = [(p["peer"][:16], b) for p in run["peers"] for b in p["bans"]]
    if bans:
        banned = Table(title=f"{len(bans)} local bans")
        for col in ("banned by", "who: why"):
            banned.add_column(col)
        for by, line in bans:
            banned.add_row(escape(by), escape(line))  # peers' words: shown, never interpreted
        tables.append(banned)
    return tables


def _reach(kind: str) -> str:
    """How others reach a peer, as the peer says: direct, relayed (through a relay: slower, and it
    costs the relay's bandwidth) or unreachable (behind NAT with no relay left)."""
    return {"direct": "direct", "relayed": "[yellow]relayed[/]", "unreachable": "[red]unreachable[/]"}.get(kind, "-")


LOG_EVERY_S = 30.0  # without a terminal


def run_status(
    node: SwarmNode,
    once: bool,
    as_json: bool,
    interval: float = 2.0,
    stop=None,
    until_done: bool = False,
    web: tuple[str, int] | None = None,
    with_ledger: bool = False,
    only: RunRef | None = None,
) -> None:
    """Print one snapshot (``--ledger``: with every run's ledger of checkpoints), or keep a live
    dashboard, and with ``web`` a web page, until stopped (or, ``until_done``, until every job of
    every run reached its target)."""
    watcher = StatusWatcher(node, only)
    try:
        if once:
            data = watcher.collect(with_entries=with_ledger)
            if with_ledger:
                data = {"time": data["time"], "runs": [{"ref": r["ref"], "ledger": r["ledger"]} for r in data["runs"]]}
            if as_json:
                print(json.dumps(data, indent=1))
            else:
                Console().print(render(data))
            return
        _live(watcher, interval, stop, until_done, web)
    finally:
        watcher.close()


def _live(watcher: StatusWatcher, interval: float, stop, until_done: bool, web: tuple[str, int] | None) -> None:
    console = Console()
    page = None
    if web is not None:
        from roles.web import StatusWeb

        page = StatusWeb(*web)
        console.print(f"watch the swarm at {page.start()}", soft_wrap=True)
    data = watcher.collect()
    if page is not None:
        page.publish(data)
    # In a terminal a live view; in a log file or a pipe a snapshot when something changed, at
    # most every LOG_EVERY_S, so the log stays readable.
    live = Live(render(data), console=console, refresh_per_second=2, screen=False) if console.is_terminal else None
    if live is None:
        console.print(render(data))
    printed, shown = time.monotonic(), _shown(data)
    try:
        with live or nullcontext():
            while not (until_done and data["runs"] and all(r["complete"] for r in data["runs"])):
                if stop.wait(interval) if stop is not None else time.sleep(interval):
                    break
                data = watcher.collect()
                if page is not None:
                    page.publish(data)
                if live is not None:
                    live.update(render(data))
                elif _shown(data) != shown and (
                    time.monotonic() - printed > LOG_EVERY_S or all(r["complete"] for r in data["runs"])
                ):
                    console.print(render(data))
                    printed, shown = time.monotonic(), _shown(data)
    finally:
        if page is not None:
            page.stop()


def _shown(data: dict) -> dict:
    """What a logged snapshot shows, without the times that move every snapshot."""
    return {
        "bans": data["bans"],
        "runs": [{k: v for k, v in r.items() if k not in ("history",)} | {"jobs": _jobs(r)} for r in data["runs"]],
    }


def _jobs(run: dict) -> list:
    return [{k: v for k, v in j.items() if k != "step_age_s"} for j in run["jobs"]]
