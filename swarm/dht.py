"""Joining the swarm: a hivemind DHT with a persistent identity and the swarm's validators,
plus typed reads and writes of the records in :mod:`swarm.records`.

With no initial peers a node starts a new swarm and prints the exact ``--initial-peers`` line
for others. Unreachable initial peers end in a clear error within ``join_timeout`` seconds.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass, field

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from swarm.claims import Snapshot
from swarm.identity import identity_paths, load_or_create_rsa_key
from swarm.lifeline import detach_and_watch
from swarm.records import (
    CLAIM_TTL_S,
    CheckpointRecord,
    ClaimRecord,
    ProviderRecord,
    RunRecord,
    ServeRecord,
    blob_key,
    ckpt_key,
    claim_key,
    decode,
    encode,
    run_key,
    serve_key,
    validators,
)


class SwarmError(RuntimeError):
    """The swarm could not be joined or answered nothing usable."""


@dataclass
class SwarmConfig:
    identity_dir: str  # holds p2p.key and rsa.der: the same folder gives the same peer id
    initial_peers: list[str] = field(default_factory=list)  # empty: start a new swarm
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    join_timeout: float = 30.0  # seconds to reach the initial peers before giving up
    op_timeout: float = 60.0  # one DHT read or write; a DHT process that is gone fails at once


class OwnedDHT(DHT):
    """hivemind's DHT process, tied to the node that forked it: it ignores the signals meant for
    the node and ends itself and its p2pd when the node is gone (see :mod:`swarm.lifeline`)."""

    def __init__(self, *args, **kwargs) -> None:
        self._node_pid = os.getpid()  # set before DHT.__init__, which forks at once
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        detach_and_watch(self._node_pid)
        super().run()


class SwarmNode:
    """One DHT participant; every record it writes is signed and owned by its RSA key."""

    def __init__(self, cfg: SwarmConfig) -> None:
        p2p_key, rsa_path = identity_paths(cfg.identity_dir)
        self.rsa = RSASignatureValidator(load_or_create_rsa_key(rsa_path))
        self.owner: bytes = self.rsa.local_public_key
        kwargs = dict(
            initial_peers=cfg.initial_peers or None,
            start=True,
            host_maddrs=cfg.host_maddrs,
            identity_path=str(p2p_key),
            record_validators=validators(self.rsa),
            await_ready=True,
        )
        if cfg.announce_maddrs:
            kwargs["announce_maddrs"] = cfg.announce_maddrs
        pool = concurrent.futures.ThreadPoolExecutor(1)
        future = pool.submit(OwnedDHT, **kwargs)
        try:
            self.dht = future.result(timeout=cfg.join_timeout)
        except concurrent.futures.TimeoutError:
            raise SwarmError(
                f"could not join the swarm within {cfg.join_timeout:.0f}s: "
                f"initial peers {cfg.initial_peers} did not answer"
            ) from None
        except Exception as e:  # hivemind raises several types here; all mean "cannot join"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SwarmError(f"could not join the swarm via {cfg.initial_peers}: {reason}") from None
        finally:
            pool.shutdown(wait=False)
        self.op_timeout = cfg.op_timeout
        self.peer_id = str(self.dht.peer_id)
        self._expiry: dict[str, float] = {}  # key → expiration of our last write under it
        self._lock = threading.RLock()  # heartbeat, publisher and trainer threads share the node

    def maddrs(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def initial_peers_line(self) -> str:
        loopback_last = sorted(self.maddrs(), key=lambda a: ("/127.0.0.1/" in a, a))
        return "--initial-peers " + " ".join(loopback_last)

    def _wait(self, future):
        """The result of one DHT operation. A node must never hang on its DHT: if the DHT process
        is gone (killed apart from its node, e.g. ``pkill -f``) or does not answer in
        ``op_timeout`` seconds, this raises instead."""
        deadline = time.monotonic() + self.op_timeout
        while True:
            try:
                return future.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if not self.dht.is_alive():
                    raise SwarmError("this node's DHT process is gone; restart the node") from None
                if time.monotonic() > deadline:
                    raise SwarmError(f"the DHT did not answer within {self.op_timeout:.0f}s") from None

    # ---------------------------------------------------------------- writes
    def store(self, key: str, record, ttl: float) -> bool:
        """Write ``record`` under our owner subkey; False if the swarm refused it.

        The DHT keeps whichever record expires last, so a write never expires before the
        previous one this node made under the same key.
        """
        with self._lock:
            expiration = max(get_dht_time() + ttl, self._expiry.get(key, 0.0) + 1e-3)
            pending = self.dht.store(key, encode(record), expiration, subkey=self.owner, return_future=True)
            ok = bool(self._wait(pending))
            if ok:
                self._expiry[key] = expiration
            return ok

    def withdraw_claim(self, job: str, claim: ClaimRecord) -> bool:
        """Release a claim now. The DHT has no delete and keeps the record with the later expiry,
        so the release is a fresh record marked inactive, which the claim rule ignores."""
        released = ClaimRecord(claim.run, claim.peer, claim.t0, active=False)
        return self.store(claim_key(job), released, CLAIM_TTL_S)

    # ---------------------------------------------------------------- reads
    def get(self, key: str):
        """hivemind's latest value under ``key`` (subkey → ValueWithExpiration), or None."""
        with self._lock:
            return self._wait(self.dht.get(key, latest=True, return_future=True))

    def read(self, key: str, cls) -> dict[bytes, object]:
        """Live, well-formed records under ``key`` by owner (malformed ones are dropped)."""
        found = self.get(key)
        if found is None or not isinstance(found.value, dict):
            return {}
        out = {}
        for owner, item in found.value.items():
            rec = decode(cls, getattr(item, "value", None))
            if rec is not None and isinstance(owner, bytes):
                out[owner] = rec
        return out

    def run(self) -> RunRecord | None:
        """The run this swarm trains: the newest well-formed run record, if any."""
        runs = self.read(run_key(), RunRecord)
        return max(runs.values(), key=lambda r: r.manifest_sha256) if runs else None

    def snapshot(self, run: RunRecord, jobs: list[str] | None = None, checkpoints: bool = True) -> Snapshot:
        """Claims and (unless ``checkpoints`` is off) checkpoint records with their live providers,
        of ``jobs`` (default: every job of the run). Reading only what a decision needs keeps the
        frequent ones (a claim renewal, a settle re-read) to one DHT read."""
        jobs = run.jobs() if jobs is None else jobs
        ckpts = {j: self.read(ckpt_key(j), CheckpointRecord) for j in jobs} if checkpoints else {}
        hashes = {r.sha256 for recs in ckpts.values() for r in recs.values() if r.run == run.manifest_sha256}
        return Snapshot(
            run=run,
            claims={j: self.read(claim_key(j), ClaimRecord) for j in jobs},
            ckpts=ckpts,
            providers={h: self.providers(h) for h in hashes},
        )

    def providers(self, sha256: str) -> set[str]:
        """Peers (this one included) whose provider record for the blob ``sha256`` is live."""
        return {r.peer for r in self.read(blob_key(sha256), ProviderRecord).values()}

    def servers(self, run: RunRecord, experts: list[int], online_only: bool = True) -> dict[int, list[ServeRecord]]:
        """Serve records of this run per expert (only those online, unless ``online_only`` is off)."""
        out: dict[int, list[ServeRecord]] = {}
        for k in experts:
            recs = [
                r
                for r in self.read(serve_key(k), ServeRecord).values()
                if r.run == run.manifest_sha256 and (r.state == "online" or not online_only)
            ]
            if recs:
                out[k] = recs
        return out

    def shutdown(self) -> None:
        self.dht.shutdown()
