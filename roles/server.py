"""The expert server: serves the denoising forward pass of one or more published experts, or of
the run's distilled student.

    find the expert's latest checkpoint record → fetch it peer-to-peer (sha256-verified) → load
    → serve ``swarm.protocol`` on the node's libp2p endpoint, announce ``serve_expert_K``
    every ~15 s (state, requests/s, queue, checkpoint, step), provide the checkpoint's blobs.

The distilled student (``--expert distilled``) is served the same way, in the slot
``data.job_id.DISTILL_SLOT`` (its requests name that slot), announced as ``serve_distill``: a
client that samples with it sends every step here and audits the answers as it audits an expert's.

Requests from all clients go through one queue that is fair across peers
(:class:`roles.fair_queue.FairQueue`) to the worker loop, which batches the requests waiting for the
same checkpoint up to ``max_batch`` images into one forward pass (each request keeps its own
guidance scale). A peer — however many streams it opens — may have ``max_peer_rows`` images
waiting; beyond that, or when the whole queue (``max_queue`` requests) is full and that peer holds
the most of it, its request is answered "busy" at once (the payload is not even checked when the
header already says so), so a client can go to another replica; nobody is banned for a valid
request. Each batch starts with the peer served least recently and shares its rows evenly among
the peers waiting for that checkpoint; while several peers are active a forward pass is kept to
about ``fair_quantum_s`` (its cost measured as it runs; a large request is then served in slices),
so a flooder's full batches cannot make an honest one-image request wait long at every step.

A request can be no larger than the run can produce: ``max_batch`` images, and no more text
tokens than the served checkpoints' text encoder makes (``swarm.protocol.encoder_tokens``); a frame
announcing more is refused before its payload is read, and its sender banned like any malformed
request's. The worker loop runs on the process's main thread and announcing on a helper thread:
torch's OpenMP thread team is fast from the main thread, while the same forward called from
another thread measured twice as slow (2 cores, ``tiny``).

A request that waits past its timeout gets an error reply. A malformed request gets an error reply
and the server keeps serving. With ``follow`` a newer published checkpoint is fetched and loaded
beside the old one: requests naming the old hash are still answered until the old one has gone
unused for ``keep_old_s`` — a generation in flight finishes on the weights it started with,
however long it takes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from data.checkpoint import Checkpoint
from data.job_id import DISTILL_SLOT, JobId
from roles.fair_queue import Busy, FairQueue, ForwardCost, Slice
from router.ensemble import expert_shape
from router.sampling import LocalExpert
from swarm import claims, proof
from swarm.blobs import BlobError, BlobService, BlobStore, announce
from swarm.dht import SwarmError, SwarmNode
from swarm.mirror import mirror_checkpoints
from swarm.protocol import (
    PROTOCOL,
    DenoiseRequest,
    ExpectedInput,
    ProtocolError,
    RequestRefused,
    encode_reply,
    encoder_tokens,
    parse_request,
    read_header,
    request_rows,
)
from swarm.records import PROVIDER_TTL_S, SERVE_ANNOUNCE_S, SERVE_TTL_S, RunRecord, ServeRecord, serve_key
from swarm.rundata import fetch_manifest, fetch_shards
from swarm.verify import Verifier

console = Console(stderr=True, markup=False)


@dataclass
class ServerConfig:
    experts: list[int]  # slots: expert K, or DISTILL_SLOT for the distilled student
    work_dir: str  # fetched checkpoints go in <work_dir>/expert_K/step_N (distill/step_N)
    max_batch: int = 32  # images per forward pass (and per request)
    max_queue: int = 64  # requests waiting in all; when full, the peer holding the most gives way ("busy")
    max_peer_rows: int = 64  # images one peer may have waiting (at least max_batch); beyond that "busy"
    fair_quantum_s: float = 0.025  # with several peers active, a forward pass is kept about this short
    busy_pause_s: float = 0.5  # a stream answered "busy" is read again after this (an honest client moves on)
    request_timeout_s: float = 30.0
    announce_s: float = SERVE_ANNOUNCE_S
    follow: bool = False  # load newer published checkpoints of the served experts
    keep_old_s: float = 120.0  # after a reload, the previous checkpoint is served until unused this long
    run_timeout_s: float = 60.0  # wait this long for a run record
    device: str = "cpu"  # where the forward passes run (cuda, cuda:1, ...)
    precision: str = "fp32"  # fp32 or bf16 (autocast; replies are fp32 either way)


class _NotYet(SwarmError):
    """A served expert's checkpoint is not (yet) to be had: worth another try."""


@dataclass
class Served:
    """One loaded checkpoint of an expert."""

    ckpt: Checkpoint
    runner: LocalExpert
    last_used: float = field(default_factory=time.monotonic)


@dataclass(eq=False)  # compared and hashed by identity: requests hold tensors
class _Job:
    req: DenoiseRequest
    future: asyncio.Future
    deadline: float
    out: torch.Tensor | None = None  # the velocities of a request served in slices, as they come
    forward_s: float = 0.0  # the forward passes its rows were in


class ExpertServer:
    def __init__(self, node: SwarmNode, cfg: ServerConfig, stop: threading.Event | None = None) -> None:
        self.node, self.cfg = node, cfg
        self.stop = stop or threading.Event()
        self.blobs = BlobService(node.dht, BlobStore(), bans=node.bans)
        node.on_restart(self.blobs.rebind)
        self.served: dict[int, list[Served]] = {}  # newest first
        self._verify: Verifier | None = None
        self._lock = threading.Lock()
        self.fair: FairQueue[_Job] = FairQueue(max(cfg.max_peer_rows, cfg.max_batch), cfg.max_queue)
        self.cost = ForwardCost()  # seconds per forward pass, to keep contended ones short
        self.answered = 0
        self._window = (time.monotonic(), 0)
        try:
            self.run_rec = self._wait_for_run()
            bad = [k for k in cfg.experts if k != DISTILL_SLOT and not 0 <= k < self.run_rec.num_clusters]
            if bad:
                raise SwarmError(f"unknown expert(s) {bad}; this run has experts 0..{self.run_rec.num_clusters - 1}")
            if DISTILL_SLOT in cfg.experts and "distill" not in self.run_rec.jobs():
                raise SwarmError("this run has no distilled student to serve (its preparer sets --distill-steps)")
            self._first_load()
        except BaseException:
            self.blobs.shutdown()
            raise
        first = self.served[cfg.experts[0]][0].ckpt.meta
        self.text_encoder = first["text_encoder"]
        self.max_tokens = encoder_tokens(self.text_encoder)
        self.text_dim = int(self.served[cfg.experts[0]][0].runner.model.config.caption_channels)
        shapes = {k: expert_shape(v[0].ckpt.meta) for k, v in self.served.items()}
        self.shape = shapes[cfg.experts[0]]
        if len(set(shapes.values())) > 1:  # one request format per server: its x has one shape
            self.shutdown()
            raise SwarmError(
                "these networks draw images of different shapes "
                f"({', '.join(f'{JobId.from_slot(k).shown}: {s}' for k, s in sorted(shapes.items()))}); "
                "serve them from two servers"
            )
        self._announcer = threading.Thread(target=self._announce_loop, name="announce", daemon=True)
        self.blobs.add_stream_handler(PROTOCOL, self._serve)

    # ---------------------------------------------------------------- checkpoints
    def _wait_for_run(self) -> RunRecord:
        deadline = time.monotonic() + self.cfg.run_timeout_s
        while True:
            run = self.node.run()
            if run is not None:
                return run
            if self.stop.wait(1.0):
                raise InterruptedError("stopped while waiting for a run")
            if time.monotonic() > deadline:
                raise SwarmError("no run is published in this swarm (python node.py --role prepare --serve ...)")

    def _first_load(self) -> None:
        """Load every served expert, waiting up to ``run_timeout_s`` for a checkpoint record to
        reach this node or for a provider to answer (both can lag a moment behind a publish)."""
        deadline = time.monotonic() + self.cfg.run_timeout_s
        said = ""
        while True:
            try:
                return self._load_latest(initial=True)
            except _NotYet as e:
                if self.stop.wait(2.0):
                    raise InterruptedError(f"stopped while waiting: {e}") from None
                if time.monotonic() > deadline:
                    raise SwarmError(str(e)) from None
                if str(e) != said:
                    console.log(f"{e}; trying again")
                    said = str(e)

    def _load_latest(self, initial: bool = False) -> None:
        """Fetch and load the newest published checkpoint of each served network, if it is new."""
        index = {str(JobId.from_slot(k)): k for k in self.cfg.experts}  # job name → slot
        jobs = list(index)
        snap = self.node.snapshot(self.run_rec, jobs)
        if any(claims.pending(snap, j) for j in jobs) and (verifier := self._verifier()) is not None:
            if verifier.verify_pending(snap, jobs):  # what no trusted verifier judged yet: judge it here
                snap = self.node.snapshot(self.run_rec, jobs)
        if initial:
            missing = [j for j in jobs if claims.latest_checkpoint(snap, j) is None]
            if missing:
                raise _NotYet(f"no checkpoint of {', '.join(missing)} is published yet; train it first")
        current = {k: self.served[k][0].ckpt.sha256 for k in self.served}
        todo = [
            j
            for j in jobs
            if (rec := claims.latest_checkpoint(snap, j)) is not None and current.get(index[j]) != rec.sha256
        ]
        if not todo:
            return
        got = mirror_checkpoints(self.node, self.blobs, snap, Path(self.cfg.work_dir), todo)
        for job in todo:
            k = index[job]
            ck = got.get(job)
            if not isinstance(ck, Checkpoint):
                if initial:
                    raise _NotYet(f"could not fetch the checkpoint of {job}: {ck}")
                continue
            if not serves(ck.meta, k):
                raise SwarmError(f"the published checkpoint of {job} is not {JobId.from_slot(k).shown}'s")
            served = Served(ck, LocalExpert.from_checkpoint(ck, self.cfg.device, self.cfg.precision))
            with self._lock:
                now = time.monotonic()
                old = [s for s in self.served.get(k, []) if now - s.last_used < self.cfg.keep_old_s]
                self.served[k] = [served, *old[:1]]  # the new one, and the previous while in use
            console.log(f"{JobId.from_slot(k).shown}: serving step {ck.step} ({ck.sha256[:12]})")

    def _verifier(self) -> Verifier | None:
        """This server's verifier, built on first need: the run's manifest and the held-out shards
        of the served experts are fetched for it. ``None`` (others' verdicts count) if they cannot be."""
        if self._verify is None:
            work = Path(self.cfg.work_dir)
            try:
                manifest, _ = fetch_manifest(self.node, self.blobs, work, self.run_rec)
            except (BlobError, ValueError, OSError) as e:
                console.log(f"cannot verify checkpoints here ({e}); relying on the run's verifiers")
                return None
            self._verify = Verifier(
                self.node,
                self.blobs,
                self.run_rec,
                manifest,
                work,
                ensure_data=lambda clusters: fetch_shards(self.node, self.blobs, manifest, clusters, holdout_only=True),
            )
        return self._verify

    def expected(self) -> ExpectedInput:
        with self._lock:
            now = time.monotonic()
            hashes = {
                k: [s.ckpt.sha256 for i, s in enumerate(v) if i == 0 or now - s.last_used < self.cfg.keep_old_s]
                for k, v in self.served.items()
            }
        return ExpectedInput(hashes, self.shape, self.text_dim, self.cfg.max_batch, self.max_tokens)

    def _runner(self, expert: int, sha256: str) -> LocalExpert:
        with self._lock:
            served = next(s for s in self.served[expert] if s.ckpt.sha256 == sha256)
            served.last_used = time.monotonic()
            return served.runner

    # ---------------------------------------------------------------- the stream handler
    async def _serve(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(getattr(info, "peer_id", ""))
        console.log(f"session from {peer[:16]}…")
        try:
            if self.node.bans.banned(peer):
                writer.write(encode_reply(-1, error="this server has banned your peer id for a while"))
                await writer.drain()
                return
            while await self._one_request(peer, reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client finished or went away
        finally:
            writer.close()

    async def _one_request(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read, check, queue and answer one request of ``peer``; False when the stream is to close."""
        expected = self.expected()
        try:
            header = await read_header(reader, expected.max_payload())
        except ProtocolError as e:  # framing is lost (or the frame is larger than any valid one): ban, close
            self.node.bans.ban(peer, f"malformed request: {e}")
            writer.write(encode_reply(-1, error=str(e)))
            await writer.drain()
            return False
        req_id = header.get("id") if isinstance(header.get("id"), int) else -1
        rows = request_rows(header)
        if 0 < rows <= expected.max_batch and not self.fair.admits(peer, rows):
            # Over its share already: read past the payload without checking it, to keep the framing.
            await reader.readexactly(header["nbytes"])
            await self._busy(writer, req_id, f"busy: your share of this queue is full ({self.fair.rows(peer)} images)")
            return True
        payload = await reader.readexactly(header["nbytes"])
        received = time.perf_counter()
        try:
            req = parse_request(header, payload, expected)
        except RequestRefused as e:  # well-formed, just not for this server now
            writer.write(encode_reply(req_id, error=str(e)))
            await writer.drain()
            return True
        except ProtocolError as e:  # malformed: no honest client sends it
            self.node.bans.ban(peer, f"malformed request: {e}")
            writer.write(encode_reply(req_id, error=str(e)))
            await writer.drain()
            return False
        job = _Job(req, asyncio.get_running_loop().create_future(), time.monotonic() + self.cfg.request_timeout_s)
        try:
            pushed_out = self.fair.put(peer, job, len(req.x), (req.expert, req.ckpt))
        except Busy as e:
            await self._busy(writer, req_id, str(e))
            return True
        for other in pushed_out:  # another peer's newest request gave way to this one
            self._resolve(other, error=Busy("busy: the queue is full and your peer id holds the most of it"))
        try:
            v, forward_s = await asyncio.wait_for(job.future, self.cfg.request_timeout_s)
            # Timings let a client tell network and queueing from compute.
            timing = {"forward_ms": forward_s * 1e3, "server_ms": (time.perf_counter() - received) * 1e3}
            digest = proof.request_digest(header, payload)
            reply = encode_reply(
                req_id,
                v,
                timing=timing,
                sign=lambda data, shape: proof.sign(self.node.key, digest, data, shape),
            )
        except Busy as e:
            await self._busy(writer, req_id, str(e))
            return True
        except TimeoutError:
            reply = encode_reply(req_id, error=f"timed out after {self.cfg.request_timeout_s:.0f}s")
        except Exception as e:  # the forward pass failed: tell the client, keep serving
            reply = encode_reply(req_id, error=f"forward failed: {e}")
        finally:
            self.fair.discard(job)  # whatever of it is still queued (timed out): its share is free again
        writer.write(reply)
        await writer.drain()
        return True

    async def _busy(self, writer: asyncio.StreamWriter, req_id: int, why: str) -> None:
        """Answer "busy" at once, then leave the stream unread a moment: an honest client goes to
        another replica, while a flooder resending at once would keep this loop parsing its frames."""
        writer.write(encode_reply(req_id, error=why, busy=True))
        await writer.drain()
        await asyncio.sleep(self.cfg.busy_pause_s)

    # ---------------------------------------------------------------- the worker
    def _work(self) -> None:
        while not self.stop.is_set():
            # With several peers active a forward pass is kept short (a quantum of measured cost), so
            # another peer's request never waits long behind it; alone, a peer gets full batches.
            quantum = self.cost.rows_within(self.cfg.fair_quantum_s, self.cfg.max_batch)
            batch, late = self.fair.take(self.cfg.max_batch, quantum, timeout=0.2, live=self._live)
            for j in late:
                self._resolve(j, error=TimeoutError("waited past its timeout"))
            if batch:
                self._forward(batch)  # never raises: a failed batch becomes error replies

    @staticmethod
    def _live(job: _Job) -> bool:
        return job.deadline > time.monotonic() and not job.future.done()

    def _forward(self, batch: list[Slice[_Job]]) -> None:
        reqs = [_rows(s.item.req, s.start, s.stop) for s in batch]
        try:
            runner = self._runner(reqs[0].expert, reqs[0].ckpt)
            if len(reqs) == 1:  # nothing to pad or join: the common case of one waiting client
                r = reqs[0]
                t0 = time.perf_counter()
                v = runner(r.x, r.t, r.states, r.mask, r.guidance)
            else:
                t0, v = self._batched_forward(runner, reqs)
        except Exception as e:  # noqa: BLE001 (one failed batch must not stop the server)
            for s in batch:
                self.fair.discard(s.item)  # the rest of a sliced request is not worth computing
                self._resolve(s.item, error=e)
            return
        forward_s = time.perf_counter() - t0
        self.cost.add(len(v), forward_s)
        for s, part in zip(batch, torch.split(v, [s.rows for s in batch]), strict=True):
            job = s.item
            job.forward_s += forward_s
            if s.start == 0 and s.last:  # the whole request in this batch
                job.out = part.contiguous()
            else:
                if job.out is None:
                    job.out = torch.empty((len(job.req.x), *part.shape[1:]), dtype=part.dtype)
                job.out[s.start : s.stop] = part
            if s.last:
                self._resolve(job, value=(job.out, job.forward_s))
                self.answered += 1

    @staticmethod
    def _batched_forward(runner: LocalExpert, reqs: list) -> tuple[float, torch.Tensor]:
        """One forward for several requests: their rows joined, text states padded to one length
        (masked), one guidance scale per row. Returns (start time of the forward, velocities)."""
        length = max(r.states.shape[1] for r in reqs)

        def pad(t: torch.Tensor) -> torch.Tensor:  # text states of different lengths: masked padding
            extra = length - t.shape[1]
            return t if extra == 0 else torch.nn.functional.pad(t, (0, 0, 0, extra) if t.dim() == 3 else (0, extra))

        sizes = [len(r.x) for r in reqs]
        states = torch.cat(
            [pad(r.states[:b]) for r, b in zip(reqs, sizes, strict=True)]
            + [pad(r.states[b:]) for r, b in zip(reqs, sizes, strict=True)]
        )
        mask = torch.cat(
            [pad(r.mask[:b]) for r, b in zip(reqs, sizes, strict=True)]
            + [pad(r.mask[b:]) for r, b in zip(reqs, sizes, strict=True)]
        )
        guidance = torch.cat([torch.full((b,), r.guidance) for r, b in zip(reqs, sizes, strict=True)])
        t0 = time.perf_counter()
        return t0, runner(torch.cat([r.x for r in reqs]), torch.cat([r.t for r in reqs]), states, mask, guidance)

    @staticmethod
    def _resolve(job: _Job, value=None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if job.future.done():  # the handler gave up on it already
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(value)

        job.future.get_loop().call_soon_threadsafe(settle)

    # ---------------------------------------------------------------- announcing
    def record(self, expert: int, state: str = "online") -> ServeRecord:
        now, n = time.monotonic(), self.answered
        t0, n0 = self._window
        rps = (n - n0) / max(now - t0, 1e-6)
        cur = self.served[expert][0].ckpt
        return ServeRecord(
            self.run_rec.manifest_sha256,
            self.node.peer_id,
            state,
            round(rps, 3),
            len(self.fair),
            cur.sha256,
            cur.step,
            cur.meta["objective"],
            self.text_encoder,
            self.text_dim,
            list(self.shape),
            self.cfg.max_batch,
        )

    def announce(self, state: str = "online") -> None:
        for k in self.cfg.experts:
            self.node.store(serve_key(k), self.record(k, state), SERVE_TTL_S)
        self._window = (time.monotonic(), self.answered)

    def run(self) -> None:
        """Serve on this (the main) thread until stopped; announce, reload and say OFFLINE beside it."""
        self._announcer.start()
        try:
            self._work()
        finally:
            self.stop.set()
            self._announcer.join(timeout=30)

    def _announce_loop(self) -> None:
        """Announce and (with ``follow``) reload until stopped; then announce OFFLINE."""
        last_blobs = 0.0
        try:
            while True:
                if self.cfg.follow:
                    try:
                        self._load_latest()
                    except Exception as e:  # a bad new checkpoint: keep serving the one we have
                        console.log(f"reload failed: {e}")
                self.announce()
                if time.monotonic() - last_blobs > PROVIDER_TTL_S / 3:
                    announce(self.node, self.blobs.store)
                    last_blobs = time.monotonic()
                if self.stop.wait(self.cfg.announce_s):
                    break
        finally:
            try:
                self.announce("offline")
            except Exception as e:  # shutting down; the record expires by itself
                console.log(f"could not announce OFFLINE: {e}")

    def shutdown(self) -> None:
        self.stop.set()
        self.blobs.shutdown()


def serves(meta: dict, slot: int) -> bool:
    """Whether a checkpoint's metadata is that of the network served in ``slot``: expert K's own,
    or (``DISTILL_SLOT``) a distilled student's."""
    if slot == DISTILL_SLOT:
        return meta.get("kind") == "distill"
    return meta.get("kind") == "expert" and meta.get("cluster") == slot


def _rows(req: DenoiseRequest, start: int, stop: int) -> DenoiseRequest:
    """Images ``start:stop`` of a request, as a request of its own (a slice for one batch): their
    conditional text rows and their unconditional ones."""
    b = len(req.x)
    if start == 0 and stop == b:
        return req
    cond, uncond = slice(start, stop), slice(b + start, b + stop)
    return DenoiseRequest(
        req.id,
        req.expert,
        req.ckpt,
        req.x[start:stop],
        req.t[start:stop],
        req.t_next,
        torch.cat([req.states[cond], req.states[uncond]]),
        torch.cat([req.mask[cond], req.mask[uncond]]),
        req.guidance,
    )
