"""Sampling with the swarm's experts (``DiffswarmPipeline.from_swarm``, ``--role client
--initial-peers ...``): the router fetched from the swarm, every expert run on its servers over
``swarm.protocol`` unless asked to run here, and the servers' answers audited against the
experts' public checkpoints.

One binary stream per server for the whole generation (opened at the first step, reused by
every later one), so a step costs one round trip on an open stream — not a new RPC. Among the
replicas of an expert each step goes to one drawn at random, weighted by its measured latency and
announced queue (:func:`router.audit.replica_order`): no peer id wins by sorting first. A server
that fails (no answer within the timeout, a closed stream, an error reply, a reply that does not
check out) is banned for a while and the step is retried on the next replica of the same expert;
with no replica left the expert raises :class:`ExpertUnavailable` and the sampler renormalises the
router's choice over the others.

Auditing (``--audit RATE``; :mod:`router.audit`): the client fetches every remote expert's
latest verified checkpoint (hash-checked, or a copy already in its checkpoint folder) and
recomputes each server's first answer and then a random ``RATE`` of the others. A server whose
answer differs beyond the tolerance is caught: banned for the rest of the generation here and in
``node.bans`` (so this node's other roles skip it too), and the step is redone on another replica
(its answer checked against the one computed here) or, with none left, taken from the local copy.
For an expert whose checkpoint cannot be had here (or whose servers serve another checkpoint), an
audited step is also asked of a second server of the same checkpoint: if the two agree it passes;
if not, a third server's answer decides (the one it agrees with is kept, the other caught), and
failing that the local copy, fetched once more now; when nothing can tell them apart the expert is
dropped for this generation rather than trusted. Two servers run by one liar can outvote an honest
one there: only a local copy settles an audit against a stranger who runs many peers. The routing
table and JSON say who was caught, at which step, after serving how many steps, which steps were
redone, and the audit's cost in extra expert forwards per image.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import secrets
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from data.checkpoint import Checkpoint, CheckpointError
from data.job_id import JobId, slot_shown
from diffswarm.pipeline import DiffswarmPipeline
from router import audit
from router.audit import AuditStats, Reference
from router.ensemble import check_compatible, encoder_for, space_for
from router.network import RouterNet
from router.sampling import ExpertUnavailable, LocalExpert
from swarm import proof
from swarm.bans import Bans
from swarm.blobs import BlobService
from swarm.dht import SwarmError, SwarmNode
from swarm.mirror import fetch_published
from swarm.protocol import (
    PROTOCOL,
    DenoiseRequest,
    ServerBusy,
    frame,
    parse_reply,
    read_frame,
    reply_timing,
    request_parts,
)
from swarm.proxy import open_stream
from swarm.records import ServeRecord

T = TypeVar("T")


@dataclass
class RemoteConfig:
    timeout_s: float = 30.0  # one request, queueing at the server included
    connect_timeout_s: float = 5.0
    ban_s: float = 60.0  # a failed server is not asked again for this long
    rediscover_s: float = 0.0  # with every server of an expert failed: look again in the DHT this long
    audit_rate: float = audit.DEFAULT_RATE  # answers recomputed beyond each server's first (0: trust servers)
    tolerance: float = audit.TOLERANCE  # relative L2 difference per image that still counts as the same answer
    seed: int | None = None  # replica choice and audited steps; None: drawn from the OS, so no server can predict


class RemotePool:
    """Live sessions to the servers of every remote expert, with bans, failover and audits."""

    def __init__(
        self,
        p2p_service,
        servers: dict[int, list[ServeRecord]],
        cfg: RemoteConfig | None = None,
        discover: Callable[[int], list[ServeRecord]] | None = None,
        references: dict[int, Reference] | None = None,
        fetch_reference: Callable[[int], Reference | None] | None = None,
        bans: Bans | None = None,
        publish: Callable[[int, tuple], object] | None = None,
    ) -> None:
        self.service, self.cfg = p2p_service, cfg or RemoteConfig()
        self.discover = discover  # expert → its servers online now (re-read from the DHT)
        self.servers = {k: list(v) for k, v in servers.items() if v}
        self.references = dict(references or {})  # expert → the verified local copy audits recompute with
        self.fetch_reference = fetch_reference  # expert → its local copy fetched now (None: not to be had)
        self.bans = bans  # the node's bans: servers it ignores, and where a caught liar is banned for all roles
        self.publish = publish  # (expert, evidence) → publish a proof against a server caught lying
        # peer → (its record, request header, request payload, reply bytes, its signature) of its last answer
        self.evidence: dict[str, tuple[ServeRecord, dict, bytes, bytes, str]] = {}
        self.sessions: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.paths: dict[str, str] = {}  # server → "direct" or "relayed", as its stream's address says
        self.banned: dict[str, float] = {}  # peer → until (monotonic); a caught liar: forever
        self.where: dict[int, str] = {}  # expert → who gave the answer last used ("local": the local copy)
        self.events: list[str] = []  # failovers, for the summary
        self.latency: list[tuple[float, dict]] = []  # (seconds per request, the server's timings in ms)
        self.rtt: dict[str, float] = {}  # peer → smoothed seconds per request, for replica choice
        seed = self.cfg.seed if self.cfg.seed is not None else secrets.randbits(63)
        self.rng = random.Random(seed)
        self.stats = AuditStats(self.cfg.audit_rate, self.cfg.tolerance, seed)
        self.accepted: dict[str, int] = defaultdict(int)  # peer → answers used in the image
        self.unchecked: dict[str, int] = defaultdict(int)  # peer → of them, not audited
        self.audited: dict[str, int] = defaultdict(int)  # peer → answers audited
        self.caught: set[str] = set()
        self.notes: dict[int, list[dict]] = defaultdict(list)  # expert → audit events not yet in the routing log
        self._refetched: set[int] = set()
        self._why: dict[int, str] = {}
        self._ids = itertools.count()

    def experts(self) -> dict[int, RemoteExpert]:
        return {k: RemoteExpert(self, k) for k in self.servers}

    def take_notes(self, k: int) -> list[dict]:
        return self.notes.pop(k, [])

    # ---------------------------------------------------------------- choosing and asking servers
    def _live(self, k: int, exclude: set[str], ckpt: str | None = None) -> list[ServeRecord]:
        """The servers of expert ``k`` to ask now (of checkpoint ``ckpt`` if given). While one serves
        the checkpoint held here, those naming another are left out: an answer from a checkpoint
        nobody here holds cannot be recomputed, and naming a made-up hash must not buy a liar that."""
        now = time.monotonic()
        live = [
            r
            for r in self.servers.get(k, [])
            if r.peer not in exclude
            and self.banned.get(r.peer, 0.0) <= now
            and not (self.bans is not None and self.bans.banned(r.peer))
            and (ckpt is None or r.ckpt == ckpt)
        ]
        ref = self.references.get(k)
        if ref is not None and self.cfg.audit_rate > 0 and any(r.ckpt == ref.sha256 for r in live):
            for r in live:
                if r.ckpt != ref.sha256:
                    self.stats.skipped.setdefault(r.peer, f"serves checkpoint {r.ckpt[:12]}, not the verified one")
            live = [r for r in live if r.ckpt == ref.sha256]
        return live

    def _order(self, k: int, exclude: set[str], ckpt: str | None = None) -> list[ServeRecord]:
        """Servers reached directly first (each step through a relay costs its hops and its
        bandwidth), then those reached through a relay; within each, a weighted random draw."""
        out: list[ServeRecord] = []
        for relayed in (False, True):
            live = {r.peer: r for r in self._live(k, exclude, ckpt) if (self.path_of(r) == "relayed") == relayed}
            order = audit.replica_order(self.rng, [(r.peer, self.rtt.get(r.peer), r.queue) for r in live.values()])
            out += [live[p] for p in order]
        return out

    def path_of(self, rec: ServeRecord) -> str:
        """How this client reaches a server: what its stream showed, else what the server announced
        (a server announcing itself direct but reached through a relay is ranked by what was seen)."""
        return self.paths.get(rec.peer) or ("relayed" if rec.reach in ("relayed", "unreachable") else "direct")

    def call(self, k: int, x: torch.Tensor, t: torch.Tensor, states, mask, guidance: float, t_next: float):
        # Padding tokens are masked out of attention anyway: leave them off the wire (a short
        # prompt's states are a quarter of their padded size).
        used = mask.amax(0).nonzero()
        keep = int(used.max()) + 1 if len(used) else 1
        states, mask = states[:, :keep], mask[:, :keep]
        req = DenoiseRequest(next(self._ids), k, "", x, t, float(t_next), states, mask, float(guidance))
        got = self._answer(k, req, set()) or self._rediscover(k, req)
        if got is None:
            raise ExpertUnavailable(k, f"no live server left ({self._why.get(k, 'no server')})")
        rec, v = got
        self.stats.answers += 1
        return self._checked(k, rec, v, req)

    def _answer(
        self, k: int, req: DenoiseRequest, exclude: set[str], ckpt: str | None = None
    ) -> tuple[ServeRecord, torch.Tensor] | None:
        """(record, velocity) from the first replica of expert ``k`` that answers, in the weighted
        random order; each one that fails is banned for a while. None when none is left."""
        for rec in self._order(k, exclude, ckpt):
            try:
                return rec, self._ask(rec, req)
            except ServerBusy as e:  # a valid request refused for its load: no fault, the next replica
                self._why[k] = str(e)
                self.events.append(f"{slot_shown(k)}: server {rec.peer[:12]}… is busy; asked another")
            except Exception as e:  # any other failure of one server: ban it, try the next replica
                self._why[k] = str(e) or type(e).__name__
                self.banned[rec.peer] = time.monotonic() + self.cfg.ban_s
                self.events.append(
                    f"{slot_shown(k)}: server {rec.peer[:12]}… failed ({self._why[k]}); banned for a while"
                )
        return None

    def _ask(self, rec: ServeRecord, req: DenoiseRequest) -> torch.Tensor:
        """One request to one server; on any failure its session is dropped and the error raised."""
        req.ckpt = rec.ckpt
        t0 = time.perf_counter()
        try:
            v, timing, (header, payload, reply, sig) = self.service.call(
                self._request(rec.peer, req, req.x.shape), timeout=self.cfg.timeout_s + 5
            )
            # An answer counts only when the key of the server's record signed it: every answer is
            # then one the server stands behind, and a wrong one is a proof against it.
            if not proof.signed_by(rec.owner, proof.request_digest(header, payload), reply, list(v.shape), sig):
                raise ConnectionError("its answer is not signed by the key of its serve record")
        except Exception:
            self._drop(rec.peer)
            raise
        self.evidence[rec.peer] = (rec, header, payload, reply, sig)
        dt = time.perf_counter() - t0
        self.latency.append((dt, timing))
        old = self.rtt.get(rec.peer)
        self.rtt[rec.peer] = dt if old is None else 0.7 * old + 0.3 * dt  # smoothed: one slow reply is no verdict
        return v

    def _rediscover(self, k: int, req: DenoiseRequest) -> tuple[ServeRecord, torch.Tensor] | None:
        """Every known server of expert ``k`` failed: in a churning swarm one is often restarting
        (with the same peer id) or another has just come up. Look again in the DHT and try what is
        listed, failure bans aside (a dial to a dead server is refused at once), until
        ``rediscover_s``. A server caught lying, or banned by this node, stays out."""
        if self.discover is None or self.cfg.rediscover_s <= 0:
            return None
        deadline = time.monotonic() + self.cfg.rediscover_s
        self.events.append(
            f"{slot_shown(k)}: every server failed; looking for one for up to {self.cfg.rediscover_s:.0f}s"
        )
        while time.monotonic() < deadline:
            for rec in self.discover(k):
                if rec.peer in self.caught or (self.bans is not None and self.bans.banned(rec.peer)):
                    continue
                try:
                    v = self._ask(rec, req)
                except Exception:  # not back yet
                    continue
                self.banned.pop(rec.peer, None)
                self.servers[k] = [rec, *(r for r in self.servers[k] if r.peer != rec.peer)]
                self.events.append(f"{slot_shown(k)}: server {rec.peer[:12]}… found again")
                return rec, v
            time.sleep(2.0)
        return None

    # ---------------------------------------------------------------- auditing answers
    def _checked(self, k: int, rec: ServeRecord, v: torch.Tensor, req: DenoiseRequest) -> torch.Tensor:
        """The velocity to use for this step: the server's, unless an audit of it finds it wrong."""
        if not audit.should_audit(self.rng, self.cfg.audit_rate, self.audited[rec.peer]):
            self.unchecked[rec.peer] += 1
            return self._accept(k, rec.peer, v)
        ref = self.references.get(k)
        if ref is not None and ref.sha256 == rec.ckpt:
            return self._against_local(k, rec, v, req, ref)
        return self._against_servers(k, rec, v, req)

    def _accept(self, k: int, peer: str, v: torch.Tensor) -> torch.Tensor:
        self.accepted[peer] += 1
        self.where[k] = peer
        return v

    def _recompute(self, ref: Reference, req: DenoiseRequest) -> torch.Tensor:
        self.stats.extra_local += len(req.x)
        return ref.runner(req.x, req.t, req.states, req.mask, req.guidance)

    def _audit(self, peer: str, error: float, by_local: bool) -> bool:
        """Count one audited answer; whether it passed."""
        self.audited[peer] += 1
        self.stats.audited += 1
        if by_local:
            self.stats.by_local += 1
        else:
            self.stats.by_servers += 1
        if error <= self.cfg.tolerance:
            self.stats.passed(error)
            return True
        return False

    def _against_local(
        self, k: int, rec: ServeRecord, v: torch.Tensor, req: DenoiseRequest, ref: Reference
    ) -> torch.Tensor:
        want = self._recompute(ref, req)
        error = audit.disagreement(v, want)
        if self._audit(rec.peer, error, by_local=True):
            return self._accept(k, rec.peer, v)
        self._catch(k, rec.peer, error, "the local copy")
        # Redo the step on another replica of the same checkpoint: its answer is checked against the
        # one computed here, so the redo is an audit of that server too.
        tried = {rec.peer}
        while (got := self._answer(k, req, tried, rec.ckpt)) is not None:
            other, v2 = got
            tried.add(other.peer)
            self.stats.extra_remote += len(req.x)
            error = audit.disagreement(v2, want)
            if self._audit(other.peer, error, by_local=True):
                self._note(k, "redone", peer=rec.peer, by=other.peer)
                return self._accept(k, other.peer, v2)
            self._catch(k, other.peer, error, "the local copy")
        self._note(k, "redone", peer=rec.peer, by="local")
        self.where[k] = "local"
        return want

    def _against_servers(self, k: int, rec: ServeRecord, v: torch.Tensor, req: DenoiseRequest) -> torch.Tensor:
        """No local copy of the checkpoint ``rec`` serves: ask a second server of it and compare."""
        got = self._answer(k, req, {rec.peer}, rec.ckpt)
        if got is None:
            self.stats.unchecked.setdefault(k, "no local copy of its checkpoint and no second server of it")
            self.unchecked[rec.peer] += 1
            return self._accept(k, rec.peer, v)
        other, v2 = got
        self.stats.extra_remote += len(req.x)
        error = audit.disagreement(v, v2)
        if self._audit(rec.peer, error, by_local=False):
            self.audited[other.peer] += 1  # its answer was checked too (counted once in the stats)
            return self._accept(k, rec.peer, v)
        self.audited[other.peer] += 1
        return self._settle(k, req, [(rec, v), (other, v2)], error)

    def _settle(
        self, k: int, req: DenoiseRequest, opinions: list[tuple[ServeRecord, torch.Tensor]], error: float
    ) -> torch.Tensor:
        """Two servers disagree: the answer a third server agrees with wins; failing that the local
        copy (fetched once more now) decides. Whoever disagrees with the winner is caught."""
        ckpt = opinions[0][0].ckpt
        third = self._answer(k, req, {r.peer for r, _ in opinions}, ckpt)
        if third is not None:
            judge, v3 = third
            self.stats.extra_remote += len(req.x)
            self.audited[judge.peer] += 1
            right = [(r, v) for r, v in opinions if audit.agree(v, v3, self.cfg.tolerance)]
            if len(right) == 1:
                by = f"servers {right[0][0].peer[:12]}… and {judge.peer[:12]}…"
                return self._verdict(k, opinions, right[0], by, lambda v: audit.disagreement(v, v3))
            opinions.append((judge, v3))
        ref = self._reference(k, ckpt)
        if ref is not None:
            want = self._recompute(ref, req)
            right = [(r, v) for r, v in opinions if audit.agree(v, want, self.cfg.tolerance)]
            winner = right[0] if right else (None, want)
            return self._verdict(k, opinions, winner, "the local copy", lambda v: audit.disagreement(v, want))
        peers = [r.peer for r, _ in opinions]
        for peer in peers:  # one of them lies; which, nobody here can tell: none is asked again
            self.banned[peer] = math.inf
        self._note(k, "unresolved", peers=peers, error=error)
        raise ExpertUnavailable(k, f"its servers disagree (relative difference {error:.2g}) and none can be trusted")

    def _verdict(self, k: int, opinions, winner, by: str, error: Callable[[torch.Tensor], float]) -> torch.Tensor:
        """Catch every opinion but ``winner`` (a (record, velocity), record None for the local copy);
        note the step as redone when the first server's answer was not the one kept."""
        rec, v = winner
        for other, v_other in opinions:
            if rec is None or other.peer != rec.peer:
                self._catch(k, other.peer, error(v_other), by)
        first = opinions[0][0]
        if rec is None:
            self._note(k, "redone", peer=first.peer, by="local")
            self.where[k] = "local"
            return v
        if rec.peer != first.peer:
            self._note(k, "redone", peer=first.peer, by=rec.peer)
        return self._accept(k, rec.peer, v)

    def _reference(self, k: int, ckpt: str) -> Reference | None:
        """The local copy of expert ``k`` at checkpoint ``ckpt``: the one held, or one fetched now
        (tried once per generation: a fetch that failed at the start rarely works a step later)."""
        ref = self.references.get(k)
        if (ref is None or ref.sha256 != ckpt) and self.fetch_reference is not None and k not in self._refetched:
            self._refetched.add(k)
            try:
                ref = self.fetch_reference(k)
            except Exception as e:  # noqa: BLE001 (whatever the fetch hit, the audit goes on without it)
                self.events.append(f"{slot_shown(k)}: its checkpoint could not be had to settle a dispute ({e})")
                ref = None
            if ref is not None:
                self.references[k] = ref
        return ref if ref is not None and ref.sha256 == ckpt else None

    def _catch(self, k: int, peer: str, error: float, by: str) -> None:
        """A server answered wrong: out for the rest of this generation, and banned by this node."""
        if peer in self.caught:
            return
        self.caught.add(peer)
        self.banned[peer] = math.inf
        if self.bans is not None:
            self.bans.ban(peer, f"answered {slot_shown(k)} wrong (relative error {error:.2g} against {by})")
        evidence = self.evidence.get(peer)
        if self.publish is not None and evidence is not None:
            try:
                self.publish(k, evidence)
                self._note(k, "proof published", peer=peer)
            except Exception as e:  # noqa: BLE001 (the catch stands; only the proof for others is lost)
                self.events.append(f"{slot_shown(k)}: no proof against {peer[:12]}… could be published ({e})")
        self._note(
            k,
            "caught",
            peer=peer,
            error=error,
            checked_by=by,
            served_before=self.accepted[peer],
            unchecked_before=self.unchecked[peer],
        )
        self._drop(peer)

    def _note(self, k: int, event: str, **what) -> None:
        self.notes[k].append({"event": event, **what})

    # ---------------------------------------------------------------- streams
    async def _request(self, peer: str, req: DenoiseRequest, shape) -> tuple[torch.Tensor, dict, tuple]:
        """The velocity, the server's timings, and what a proof needs: (request header, request
        payload, reply bytes, the server's signature)."""
        if peer not in self.sessions:
            path, reader, writer = await open_stream(self.service.p2p, peer, PROTOCOL, self.cfg.connect_timeout_s)
            self.sessions[peer] = (reader, writer)
            self.paths[peer] = path
        reader, writer = self.sessions[peer]
        req_header, req_payload = request_parts(req)
        writer.write(frame(req_header, req_payload))
        await writer.drain()
        limit = 4 * req.x.numel() + 4096  # a reply larger than the velocity asked for is refused
        header, payload = await asyncio.wait_for(read_frame(reader, limit), self.cfg.timeout_s)
        if header.get("id") != req.id:
            raise ConnectionError(f"reply {header.get('id')} to request {req.id}: the stream is out of step")
        v = parse_reply(header, payload, tuple(shape))
        return v, reply_timing(header), (req_header, req_payload, payload, header.get("sig"))

    def _drop(self, peer: str) -> None:
        session = self.sessions.pop(peer, None)
        if session is not None:
            try:
                self.service.call(_close(session[1]), timeout=5)
            except Exception:  # the stream is gone with its server
                pass

    def close(self) -> None:
        for peer in list(self.sessions):
            try:
                self._drop(peer)
            except Exception:  # already gone
                pass


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()


class RemoteExpert:
    """The :data:`router.sampling.ExpertRunner` of one remote expert."""

    def __init__(self, pool: RemotePool, expert: int) -> None:
        self.pool, self.expert = pool, expert

    @property
    def where(self) -> str:
        return self.pool.where.get(self.expert, "remote")

    def take_notes(self) -> list[dict]:
        return self.pool.take_notes(self.expert)

    @property
    def path(self) -> str:
        """How the latest step reached its server: direct or relayed ("local": the local copy answered)."""
        who = self.pool.where.get(self.expert, "")
        return "local" if who == "local" else self.pool.paths.get(who, "direct")

    def __call__(self, x_t, t, states, mask, guidance, t_next: float = 0.0) -> torch.Tensor:
        return self.pool.call(self.expert, x_t, t, states, mask, guidance, t_next)


def swarm_ensemble(
    node: SwarmNode,
    blobs: BlobService,
    folder: Path,
    local: Sequence[int] | str | None,
    vae: str = "",
    cfg: RemoteConfig | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    server_wait_s: float = 0.0,
) -> tuple[DiffswarmPipeline, RemotePool | None]:
    """Discover the run's router and servers through the DHT; fetch (and verify) the router and the
    experts asked to run locally (ids or "all"); every other expert with a live server runs remotely,
    its checkpoint fetched too when answers are audited (``cfg.audit_rate`` > 0) and loaded as the
    audit's reference. A server whose record names another text encoder or image shape than the
    router's is not asked. Returns the pipeline and the pool of remote experts (close it when done)."""
    run = node.run()
    if run is None:
        raise SwarmError("no run is published in this swarm yet (python node.py --role prepare --serve ...)")
    everyone = list(range(run.num_clusters))
    local = everyone if local == "all" else list(local or [])
    unknown = [k for k in local if k not in everyone]
    if unknown:
        raise SwarmError(f"unknown expert(s) {unknown}; this run has experts 0..{run.num_clusters - 1}")
    remote = [k for k in everyone if k not in local]

    def some_server() -> dict[int, list[ServeRecord]]:
        if not (up := node.servers(run, remote)) and not local:
            raise SwarmError(
                f"no server is up for any expert of run {run.manifest_sha256[:12]} "
                "(start one with --role server --expert K, or run experts here with --local-experts 0,1 or all)"
            )
        return up

    servers = _retrying(some_server, server_wait_s, 1.0)  # in a churning swarm one may be restarting
    cfg = cfg or RemoteConfig(rediscover_s=server_wait_s)
    audited = sorted(servers) if cfg.audit_rate > 0 else []  # an expert that cannot be had is audited by servers
    jobs = [str(JobId.ROUTER)] + [str(JobId.expert(k)) for k in [*local, *audited]]
    got = _fetch_router(node, blobs, run, Path(folder), jobs, server_wait_s)
    router_ckpt = got[str(JobId.ROUTER)]
    router = RouterNet.from_pretrained(router_ckpt.model_dir, low_cpu_mem_usage=False).eval()
    experts, metas = {}, {}
    for k in local:
        ck = got.get(str(JobId.expert(k)))
        if ck is None:
            continue
        experts[k] = LocalExpert.from_checkpoint(ck, device, precision)
        experts[k].source = ck.model_dir
        metas[k] = {**ck.meta, "sha256": ck.sha256}
    c = router.config
    shape = (int(c.in_channels), int(c.sample_size), int(c.sample_size))
    reads = router_ckpt.meta.get("text_encoder")  # None: the router does not read the prompt
    encoder = reads or next((m["text_encoder"] for m in metas.values()), None)
    for k in list(servers):
        fits = [r for r in servers[k] if tuple(r.shape) == shape and (encoder is None or r.text_encoder == encoder)]
        if not fits:  # not this run's experts, whatever their records say
            del servers[k]
            continue
        servers[k] = fits
        metas[k] = {"objective": fits[0].objective, "text_encoder": fits[0].text_encoder, "shape": list(shape)}
    references = {k: ref for k in audited if (ref := _reference(got.get(str(JobId.expert(k))), k, device, precision))}

    def fetch_reference(k: int) -> Reference | None:  # to settle a dispute between servers
        job = str(JobId.expert(k))
        got = fetch_published(node, blobs, run, Path(folder), [job])
        return _reference(got.get(job), k, device, precision)

    def recompute(k: int, _ckpt: str, req: DenoiseRequest) -> torch.Tensor:
        return references[k].runner(req.x, req.t, req.states, req.mask, req.guidance)

    def publish(k: int, evidence: tuple) -> None:
        rec, header, payload, reply, sig = evidence
        p = proof.publish(node, blobs, run, Path(folder) / "proofs", k, rec, header, payload, reply, sig)
        published.append(p)

    # Servers convicted by another client's proof, checked here against the local copies, are not asked.
    published: list[proof.Proof] = []
    held = {(k, ref.sha256) for k, ref in references.items()}
    convicted = proof.convicted(
        node, blobs, run, Path(folder) / "proofs", servers, held, recompute, audit.disagreement, cfg.tolerance
    )
    for peer, why in convicted.items():
        node.bans.ban(peer, why)
    servers = {k: kept for k, recs in servers.items() if (kept := [r for r in recs if r.peer not in convicted])}
    pool = None
    if servers:
        pool = RemotePool(
            blobs,
            servers,
            cfg,
            discover=lambda k: node.servers(run, [k]).get(k, []),
            references=references,
            fetch_reference=fetch_reference,
            bans=node.bans,
            publish=publish,
        )
        pool.events += [f"server {peer[:12]}… not asked: {why}" for peer, why in convicted.items()]
    served_by = dict.fromkeys(experts, "local")
    for k, recs in servers.items():
        experts[k] = RemoteExpert(pool, k)
        served_by[k] = f"{len(recs)} server(s)"
    if not experts:
        raise SwarmError("no expert could be loaded here or reached on a server")
    try:
        enc_name = check_compatible(router_ckpt.meta, metas)
    except CheckpointError as e:
        raise SwarmError(str(e)) from None
    pipe = DiffswarmPipeline(
        router,
        experts,
        metas,
        {**router_ckpt.meta, "sha256": router_ckpt.sha256},
        encoder_for(enc_name),
        space_for(router_ckpt.meta["space"], vae),
        served_by,
    )
    pipe.published = published  # proofs this client published (see hand_over_proofs)
    if pool is not None:
        pipe.failovers = pool.events
        pipe.audit = pool.stats if cfg.audit_rate > 0 else None
    return pipe, pool


def swarm_distilled(
    node: SwarmNode,
    blobs: BlobService,
    folder: Path,
    cfg: RemoteConfig | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    local: bool = False,
    vae: str = "",
) -> tuple[DiffswarmPipeline, RemotePool | None]:
    """The run's distilled student: its verified checkpoint fetched into ``folder`` (it names the
    student's text encoder and space, and it is the audit's reference), every step sent to the
    student's servers (``--role server --expert distilled``) and audited like an expert's; with no
    server up, or ``local``, the student runs here. Returns the pipeline and the pool (None: local)."""
    run = node.run()
    if run is None or str(JobId.DISTILL) not in run.jobs():
        raise SwarmError("this swarm's run has no distill job (its preparer sets --distill-steps)")
    if not fetch_published(node, blobs, run, folder, [str(JobId.DISTILL)]):
        raise SwarmError("no verified distilled checkpoint is published yet")
    pipe = DiffswarmPipeline.distilled(folder, vae, device=device, precision=precision)
    if local:
        return pipe, None
    meta, here = pipe.expert_meta[0], pipe.experts[0]
    slot = JobId.DISTILL.slot
    # Only servers of the verified checkpoint held here: their answers are the ones an audit can redo.
    servers = [
        r
        for r in node.servers(run, [slot]).get(slot, [])
        if r.ckpt == meta["sha256"] and tuple(r.shape) == pipe.shape and r.text_encoder == meta["text_encoder"]
    ]
    cfg = cfg or RemoteConfig()
    ref = Reference(meta["sha256"], here)
    published: list[proof.Proof] = []

    def recompute(_k: int, _ckpt: str, req: DenoiseRequest) -> torch.Tensor:
        return here(req.x, req.t, req.states, req.mask, req.guidance)

    convicted = proof.convicted(
        node, blobs, run, folder / "proofs", {slot: servers}, {(slot, ref.sha256)}, recompute,
        audit.disagreement, cfg.tolerance,
    )  # fmt: skip
    for peer, why in convicted.items():
        node.bans.ban(peer, why)
    servers = [r for r in servers if r.peer not in convicted]
    if not servers:
        print("no server of the distilled student is up: it runs here", file=sys.stderr, flush=True)
        return pipe, None

    def publish(k: int, evidence: tuple) -> None:
        rec, header, payload, reply, sig = evidence
        published.append(proof.publish(node, blobs, run, folder / "proofs", k, rec, header, payload, reply, sig))

    pool = RemotePool(
        blobs,
        {slot: servers},
        cfg,
        discover=lambda k: [r for r in node.servers(run, [k]).get(k, []) if r.ckpt == ref.sha256],
        references={slot: ref},
        bans=node.bans,
        publish=publish,
    )
    pool.events += [f"server {peer[:12]}… not asked: {why}" for peer, why in convicted.items()]
    pipe.experts[0] = RemoteExpert(pool, slot)  # the pipeline's one network, answered by the pool's slot
    pipe.served_by[0] = f"{len(servers)} server(s)"
    pipe.published = published
    pipe.failovers = pool.events
    pipe.audit = pool.stats if cfg.audit_rate > 0 else None
    return pipe, pool


def _reference(ck: Checkpoint | None, k: int, device: str, precision: str) -> Reference | None:
    """The audit's local copy of expert ``k`` from its fetched (hash-verified) checkpoint."""
    if ck is None or ck.meta.get("kind") != "expert" or ck.meta.get("cluster") != k:
        return None
    return Reference(ck.sha256, LocalExpert.from_checkpoint(ck, device, precision))


def _fetch_router(node: SwarmNode, blobs: BlobService, run, folder: Path, jobs: list[str], wait_s: float) -> dict:
    """``fetch_published``, retried for up to ``wait_s``: in a churning swarm the router's owner
    may have been killed before any mirror held its newest checkpoint, until it restarts."""
    return _retrying(lambda: fetch_published(node, blobs, run, folder, jobs), wait_s, 2.0)


def _retrying(get: Callable[[], T], wait_s: float, every_s: float) -> T:
    """``get()``, tried again every ``every_s`` while it raises ``SwarmError``, for up to ``wait_s``
    (then its error is raised); the first failure is printed once, with how long it will wait."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            return get()
        except SwarmError as e:
            if time.monotonic() >= deadline:
                raise
            if not said:
                print(f"{e}; waiting up to {wait_s:.0f}s", file=sys.stderr, flush=True)
                said = True
            time.sleep(every_s)


def hand_over_proofs(node: SwarmNode, published: list[proof.Proof], wait_s: float = 20.0) -> None:
    """A client is often gone a moment after it caught a liar: before it leaves, it waits (up to
    ``wait_s``) until another peer (the run's preparer mirrors proofs) provides every blob of the
    proofs it published, so other clients can check them."""
    digests = {d for p in published for d in (p.request, p.reply)}
    if not digests:
        return
    print(f"waiting up to {wait_s:.0f}s for the run's preparer to hold the proof(s) this client published", flush=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if all(node.providers(d) - {node.peer_id} for d in digests):
                print("the proof(s) are held by the swarm", flush=True)
                return
        except SwarmError:
            return
        time.sleep(1.0)
    print("no other peer holds the proof(s) yet; they leave with this client", file=sys.stderr, flush=True)
