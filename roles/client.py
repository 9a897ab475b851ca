"""The swarm client (``--role client --initial-peers ...``): the router fetched from the swarm,
every expert run on its servers over ``swarm.protocol`` unless asked to run here.

One binary stream per server for the whole generation (opened at the first step, reused by
every later one), so a step costs one round trip on an open stream — not a new RPC. A server
that fails (no answer within the timeout, a closed stream, an error reply, a reply that does
not check out) is banned for a while and the step is retried on the next replica of the same
expert; with no replica left the expert raises :class:`ExpertUnavailable` and the sampler
renormalises the router's choice over the others.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from router.client import ClientConfig, ClientEnsemble, draw
from router.ensemble import encoder_for, space_for
from router.network import RouterNet
from router.sampling import ExpertUnavailable, LocalExpert
from swarm.blobs import BlobService, BlobStore
from swarm.dht import SwarmError, SwarmNode
from swarm.mirror import fetch_published
from swarm.protocol import PROTOCOL, DenoiseRequest, encode_request, parse_reply, read_frame, reply_timing
from swarm.proxy import open_stream
from swarm.records import ServeRecord

T = TypeVar("T")


@dataclass
class RemoteConfig:
    timeout_s: float = 30.0  # one request, queueing at the server included
    connect_timeout_s: float = 5.0
    ban_s: float = 60.0  # a failed server is not asked again for this long
    rediscover_s: float = 0.0  # with every server of an expert failed: look again in the DHT this long


class RemotePool:
    """Live sessions to the servers of every remote expert, with bans and failover."""

    def __init__(
        self,
        p2p_service,
        servers: dict[int, list[ServeRecord]],
        cfg: RemoteConfig | None = None,
        discover: Callable[[int], list[ServeRecord]] | None = None,
    ) -> None:
        self.service, self.cfg = p2p_service, cfg or RemoteConfig()
        self.discover = discover  # expert → its servers online now (re-read from the DHT)
        self.servers = {k: list(v) for k, v in servers.items() if v}
        self.sessions: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.paths: dict[str, str] = {}  # server → "direct" or "relayed", as its stream's address says
        self.banned: dict[str, float] = {}
        self.last: dict[int, str] = {}
        self.events: list[str] = []  # failovers, for the summary
        self.latency: list[tuple[float, dict]] = []  # (seconds per request, the server's timings in ms)
        self._ids = itertools.count()

    def experts(self) -> dict[int, RemoteExpert]:
        return {k: RemoteExpert(self, k) for k in self.servers}

    def _candidates(self, k: int) -> list[ServeRecord]:
        now = time.monotonic()
        live = [r for r in self.servers[k] if self.banned.get(r.peer, 0.0) <= now]
        # A server reached directly before one reached through a relay (each step through a relay
        # costs the relay's hops and its bandwidth); among those, the one already used keeps the
        # stream warm; otherwise the least loaded first.
        return sorted(live, key=lambda r: (self.path_of(r) == "relayed", r.peer != self.last.get(k), r.queue, r.peer))

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
        reason = "no server"
        for rec in self._candidates(k):
            try:
                return self._ask(k, rec, req, x.shape)
            except Exception as e:  # any failure of one server: ban it, try the next replica
                reason = str(e) or type(e).__name__
                self.banned[rec.peer] = time.monotonic() + self.cfg.ban_s
                self.events.append(f"expert {k}: server {rec.peer[:12]}… failed ({reason}); banned for a while")
        v = self._rediscover(k, req, x.shape)
        if v is not None:
            return v
        raise ExpertUnavailable(k, f"no live server left ({reason})")

    def _ask(self, k: int, rec: ServeRecord, req: DenoiseRequest, shape) -> torch.Tensor:
        """One request to one server of expert ``k``; on any failure its session is dropped and
        the error raised."""
        req.ckpt = rec.ckpt
        t0 = time.perf_counter()
        try:
            v, timing = self.service.call(self._request(rec.peer, req, shape), timeout=self.cfg.timeout_s + 5)
        except Exception:
            self._drop(rec.peer)
            raise
        self.latency.append((time.perf_counter() - t0, timing))
        self.last[k] = rec.peer
        return v

    def _rediscover(self, k: int, req: DenoiseRequest, shape) -> torch.Tensor | None:
        """Every known server of expert ``k`` failed: in a churning swarm one is often restarting
        (with the same peer id) or another has just come up. Look again in the DHT and try what is
        listed, bans aside (a dial to a dead server is refused at once), until ``rediscover_s``."""
        if self.discover is None or self.cfg.rediscover_s <= 0:
            return None
        deadline = time.monotonic() + self.cfg.rediscover_s
        self.events.append(f"expert {k}: every server failed; looking for one for up to {self.cfg.rediscover_s:.0f}s")
        while time.monotonic() < deadline:
            for rec in self.discover(k):
                try:
                    v = self._ask(k, rec, req, shape)
                except Exception:  # not back yet
                    continue
                self.banned.pop(rec.peer, None)
                self.servers[k] = [rec, *(r for r in self.servers[k] if r.peer != rec.peer)]
                self.events.append(f"expert {k}: server {rec.peer[:12]}… found again")
                return v
            time.sleep(2.0)
        return None

    async def _request(self, peer: str, req: DenoiseRequest, shape) -> tuple[torch.Tensor, dict]:
        if peer not in self.sessions:
            path, reader, writer = await open_stream(self.service.p2p, peer, PROTOCOL, self.cfg.connect_timeout_s)
            self.sessions[peer] = (reader, writer)
            self.paths[peer] = path
        reader, writer = self.sessions[peer]
        writer.write(encode_request(req))
        await writer.drain()
        limit = 4 * req.x.numel() + 4096  # a reply larger than the velocity asked for is refused
        header, payload = await asyncio.wait_for(read_frame(reader, limit), self.cfg.timeout_s)
        if header.get("id") != req.id:
            raise ConnectionError(f"reply {header.get('id')} to request {req.id}: the stream is out of step")
        return parse_reply(header, payload, tuple(shape)), reply_timing(header)

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
        return self.pool.last.get(self.expert, "remote")

    @property
    def path(self) -> str:
        """How the latest step reached its server: direct or relayed."""
        return self.pool.paths.get(self.pool.last.get(self.expert, ""), "direct")

    def __call__(self, x_t, t, states, mask, guidance, t_next: float = 0.0) -> torch.Tensor:
        return self.pool.call(self.expert, x_t, t, states, mask, guidance, t_next)


def swarm_ensemble(
    node: SwarmNode,
    blobs: BlobService,
    folder: Path,
    local: list[int] | str | None,
    vae: str = "",
    cfg: RemoteConfig | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    server_wait_s: float = 0.0,
) -> tuple[ClientEnsemble, RemotePool | None]:
    """Discover the run's router and servers through the DHT; fetch (and verify) the router and the
    experts asked to run locally (ids or "all"); every other expert with a live server runs remotely.
    Returns the ensemble and the pool of remote experts (close it when done)."""
    run = node.run()
    if run is None:
        raise SwarmError("no run is published in this swarm yet (python node.py --role prepare --serve ...)")
    everyone = list(range(run.num_clusters))
    local = everyone if local == "all" else (local or [])
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
    got = _fetch_router(node, blobs, run, Path(folder), ["router"] + [f"expert_{k}" for k in local], server_wait_s)
    router_ckpt = got["router"]
    router = RouterNet.from_pretrained(router_ckpt.model_dir, low_cpu_mem_usage=False).eval()
    experts, objectives, served_by, encoders, shapes = {}, {}, {}, set(), set()
    for k in local:
        ck = got.get(f"expert_{k}")
        if ck is None:
            continue
        experts[k] = LocalExpert.from_checkpoint(ck, device, precision)
        objectives[k], served_by[k] = ck.meta["objective"], "local"
        encoders.add(ck.meta["text_encoder"])
        p = ck.meta["preset"]
        shapes.add((p["channels"], p["sample_size"], p["sample_size"]))
    cfg = cfg or RemoteConfig(rediscover_s=server_wait_s)
    pool = RemotePool(blobs, servers, cfg, discover=lambda k: node.servers(run, [k]).get(k, [])) if servers else None
    for k, recs in servers.items():
        experts[k] = RemoteExpert(pool, k)
        objectives[k], served_by[k] = recs[0].objective, f"{len(recs)} server(s)"
        encoders.update(r.text_encoder for r in recs)
        shapes.update(tuple(r.shape) for r in recs)
    if not experts:
        raise SwarmError("no expert could be loaded here or reached on a server")
    if len(encoders) != 1 or len(shapes) != 1:
        raise SwarmError(f"the experts disagree on text encoder {sorted(encoders)} or shape {sorted(shapes)}")
    reads = router_ckpt.meta.get("text_encoder")  # None: the router does not read the prompt
    if reads is not None and reads not in encoders:
        raise SwarmError(f"the router reads the prompt through {reads!r}, the experts through {encoders.pop()!r}")
    ens = ClientEnsemble(
        router,
        experts,
        objectives,
        served_by,
        encoder_for(encoders.pop()),
        space_for(router_ckpt.meta["space"], vae),
        shapes.pop(),
        pool.events if pool is not None else [],
    )
    return ens, pool


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


def run_swarm_client(node: SwarmNode, cfg: ClientConfig) -> Path:
    """Draw ``cfg.prompts`` with the swarm's router and experts: the ones in ``cfg.local_experts``
    run here, every other one on its servers. Returns the PNG's path."""
    blobs = BlobService(node.dht, BlobStore(), bans=node.bans)
    node.on_restart(blobs.rebind)
    pool = None
    try:
        ens, pool = swarm_ensemble(
            node,
            blobs,
            Path(cfg.ckpt_dir),
            cfg.local_experts,
            cfg.vae,
            device=cfg.device,
            precision=cfg.precision,
            server_wait_s=cfg.server_wait_s,
        )
        return draw(ens, cfg)
    finally:
        if pool is not None:
            pool.close()
        blobs.shutdown()
