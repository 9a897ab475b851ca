"""``--role status``: what the swarm is doing, as a live rich dashboard or one JSON snapshot.

For the run it follows (name@owner, admission): for each job its owner, step, loss and samples/s
(from the owner's presence record), its latest verified checkpoint (step, hash prefix, age,
providers), how many newer ones wait for a verdict, and the refused ones with the reason; then the
expert servers (state, requests/s, queue, the checkpoint they serve), every peer that is up, idle
trainers included, and the local bans: this node's and those each peer reports.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext

from hivemind.utils import get_dht_time
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from swarm import claims
from swarm.blobs import providers
from swarm.dht import SwarmNode
from swarm.records import CKPT_TTL_S, CheckpointRecord, PeerRecord, ckpt_key, peers_key


def collect(node: SwarmNode) -> dict:
    """One snapshot of the swarm as plain data (the ``--json`` output)."""
    run = node.run()
    peers = node.read(peers_key(), PeerRecord)
    out: dict = {
        "time": time.time(),
        "self": node.peer_id,
        "run": None,
        "complete": False,
        "jobs": [],
        "servers": [],
        "peers": sorted(
            ({**p.__dict__} for p in peers.values() if p.state != "offline"), key=lambda p: (p["state"], p["peer"])
        ),
        "bans": node.bans.lines(),
    }
    if run is None:
        return out
    out["run"] = {
        "ref": str(node.ref),
        "admission": run.admission,
        "allowed": len(run.allowed),
        "manifest_sha256": run.manifest_sha256,
        "num_clusters": run.num_clusters,
        "objectives": run.objectives,
        "presets": run.presets,
        "expert_steps": run.expert_steps,
        "router_steps": run.router_steps,
    }
    for k, recs in node.servers(run, list(range(run.num_clusters)), online_only=False).items():
        for rec in recs:
            out["servers"].append(
                {"expert": k, "peer": rec.peer, "state": rec.state, "rps": rec.rps, "queue": rec.queue}
                | {"step": rec.step, "ckpt": rec.ckpt, "max_batch": rec.max_batch, "reach": rec.reach}
            )
    out["servers"].sort(key=lambda r: (r["expert"], r["state"] != "online", r["peer"]))
    snap = node.snapshot(run)
    out["complete"] = claims.run_complete(snap)
    by_peer = {p.peer: p for p in peers.values()}
    for job in run.jobs():
        owner = claims.winner(snap, job)
        claim = snap.live_claims(job).get(owner) if owner else None
        ck = claims.latest_checkpoint(snap, job)
        presence = by_peer.get(claim.peer) if claim else None
        out["jobs"].append(
            {
                "job": job,
                "target": run.target(job),
                "done": claims.done(snap, job),
                "owner": claim.peer if claim else None,
                "since": claim.t0 if claim else None,
                "step": presence.step if presence and presence.job == job else (ck.step if ck else 0),
                "loss": presence.loss if presence and presence.job == job else (ck.loss if ck else None),
                "samples_per_s": presence.samples_per_s if presence and presence.job == job else 0.0,
                "pending": len(
                    {r.sha256 for o, r in claims.candidates(snap, job) if claims.verdict(snap, job, r, o) is None}
                ),
                "refused": [
                    {"step": v.step, "sha256": v.sha256, "owner": v.owner, "reason": v.reason}
                    for v in claims.refused(snap, job)
                ],
                "checkpoint": None
                if ck is None
                else {
                    "step": ck.step,
                    "sha256": ck.sha256,
                    "size": ck.size,
                    "age_s": _checkpoint_age(node, job, ck),
                    "providers": sorted(set(ck.providers) | set(providers(node, ck.sha256))),
                },
            }
        )
    return out


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
    if data["run"] is None:
        return Group("[yellow]no run published yet[/] (python node.py --role prepare --serve ...)")
    run = data["run"]
    state = " · [green]complete[/]" if data["complete"] else ""
    admission = "open" if run["admission"] == "open" else f"allowlist of {run['allowed']}"
    jobs = Table(
        title=f"run {run['ref']} ({run['manifest_sha256'][:12]}) · {run['num_clusters']} experts + router"
        f" · {admission}{state}"
    )
    numbers = ("step", "loss", "samples/s", "age", "providers")
    for col in ("job", "owner", "step", "loss", "samples/s", "checkpoint", "age", "providers"):
        jobs.add_column(col, justify="right" if col in numbers else "left")
    for j in data["jobs"]:
        ck = j["checkpoint"]
        jobs.add_row(
            j["job"],
            "[green]done[/]" if j["done"] else (j["owner"] or "[red]unclaimed[/]")[:16],
            f"{j['step']}/{j['target']}" if j["target"] else str(j["step"]),
            "-" if j["loss"] is None else f"{j['loss']:.4f}",
            f"{j['samples_per_s']:.0f}",
            f"{ck['step']} · {ck['sha256'][:12]}" if ck else "-",
            "-" if not ck or ck["age_s"] is None else f"{ck['age_s']:.0f}s",
            str(len(ck["providers"])) if ck else "0",
        )
    tables: list = [jobs]
    waiting = [f"{j['job']}: {j['pending']}" for j in data["jobs"] if j["pending"]]
    if waiting:
        tables.append("newer checkpoints awaiting verification: " + ", ".join(waiting))
    refusals = [(j["job"], v) for j in data["jobs"] for v in j["refused"]]
    if refusals:
        refused = Table(title=f"{len(refusals)} checkpoints refused")
        for col in ("job", "step", "checkpoint", "signer", "why"):
            refused.add_column(col)
        for job, v in refusals:
            refused.add_row(job, str(v["step"]), v["sha256"][:12], v["owner"][:12], escape(v["reason"]))
        tables.append(refused)
    if data["servers"]:
        online = sum(1 for r in data["servers"] if r["state"] == "online")
        servers = Table(title=f"expert servers: {online} online")
        for col in ("expert", "server", "reach", "state", "req/s", "queue", "serving"):
            servers.add_column(col, justify="right" if col in ("req/s", "queue") else "left")
        for r in data["servers"]:
            servers.add_row(
                str(r["expert"]),
                r["peer"][:16],
                _reach(r["reach"]),
                r["state"] if r["state"] == "online" else f"[dim]{r['state']}[/]",
                f"{r['rps']:.1f}",
                str(r["queue"]),
                f"step {r['step']} · {r['ckpt'][:12]}",
            )
        tables.append(servers)
    peers = Table(title=f"{len(data['peers'])} peers up")
    for col in ("peer", "reach", "role", "state", "job"):
        peers.add_column(col)
    for p in data["peers"]:
        peers.add_row(p["peer"][:16], _reach(p.get("reach", "")), p["role"], p["state"], p["job"] or "-")
    tables.append(peers)
    bans = [("this node", b) for b in data["bans"]] + [(p["peer"][:16], b) for p in data["peers"] for b in p["bans"]]
    if bans:
        banned = Table(title=f"{len(bans)} local bans")
        for col in ("banned by", "who: why"):
            banned.add_column(col)
        for by, line in bans:
            banned.add_row(by, escape(line))  # peers' words: shown, never interpreted
        tables.append(banned)
    return Group(*tables)


def _reach(kind: str) -> str:
    """How others reach a peer, as the peer says: direct, relayed (through a relay: slower, and it
    costs the relay's bandwidth) or unreachable (behind NAT with no relay left)."""
    return {"direct": "direct", "relayed": "[yellow]relayed[/]", "unreachable": "[red]unreachable[/]"}.get(kind, "-")


LOG_EVERY_S = 30.0  # without a terminal


def run_status(
    node: SwarmNode, once: bool, as_json: bool, interval: float = 2.0, stop=None, until_done: bool = False
) -> None:
    """Print one snapshot, or keep a live dashboard until stopped (or, ``until_done``, until every
    job of the run reached its target)."""
    if once:
        data = collect(node)
        if as_json:
            print(json.dumps(data, indent=1))
        else:
            Console().print(render(data))
        return
    console = Console()
    data = collect(node)
    # In a terminal a live view; in a log file or a pipe a snapshot when something changed, at
    # most every LOG_EVERY_S, so the log stays readable.
    live = Live(render(data), console=console, refresh_per_second=2, screen=False) if console.is_terminal else None
    if live is None:
        console.print(render(data))
    printed, shown = time.monotonic(), data
    with live or nullcontext():
        while not (until_done and data["complete"]):
            if stop.wait(interval) if stop is not None else time.sleep(interval):
                break
            data = collect(node)
            if live is not None:
                live.update(render(data))
            elif data != shown and (time.monotonic() - printed > LOG_EVERY_S or data["complete"]):
                console.print(render(data))
                printed, shown = time.monotonic(), data
