"""Joining the swarm: a hivemind DHT with a persistent identity and the swarm's validators,
plus typed reads and writes of the records in :mod:`swarm.records`.

With no initial peers a node starts a new swarm and prints the exact ``--initial-peers`` line
for others. Initial peers that do not answer are asked again (a lossy link, a peer restarting) until
``join_timeout`` seconds have passed, and then end in a clear error.

A node follows one run (``NAME@FINGERPRINT``, :class:`swarm.records.RunRef`): every key it reads or
writes lives in that run's namespace, and the run record counts only when the key named by the
fingerprint signed it. A node given no run follows the only one the swarm lists, and refuses to
guess when there are several.

A node that finds itself cut off heals by itself: every ``rejoin_s`` it looks at its routing table,
and when it holds fewer peers than it has known (down to none), or the run it follows is no longer
to be seen, it pings its initial peers and every peer it has known and looks up its neighbours
again, as it did when it joined (:meth:`SwarmNode.rejoin`). A flood that slows the DHT until peers
drop each other from their tables, or a network that was cut, leaves no lasting split.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from swarm.bans import Bans
from swarm.claims import Snapshot
from swarm.identity import identity_paths, load_or_create_rsa_key
from swarm.lifeline import detach_and_watch
from swarm.proxy import ServeProxy
from swarm.reach import (
    Probe,
    Reach,
    ServeProbes,
    is_relayed,
    listen_ports,
    observed_ip,
    pick_relays,
    relay_peers,
    start_line,
)
from swarm.records import (
    CLAIM_TTL_S,
    MAX_VERDICTS,
    RELAY_TTL_S,
    VERDICT_TTL_S,
    CheckpointRecord,
    ClaimRecord,
    PeerRecord,
    ProviderRecord,
    RelayRecord,
    RunDirRecord,
    RunRecord,
    RunRef,
    ServeRecord,
    Verdict,
    VerdictsRecord,
    blob_key,
    canonical_owner,
    check_run_name,
    ckpt_key,
    claim_key,
    claimed_owner,
    decode,
    encode,
    fingerprint,
    in_run,
    is_global,
    relays_key,
    run_key,
    runs_key,
    serve_key,
    validators,
    verdicts_key,
)

REACH_EVERY_S = 5.0  # how often a relayed node looks at its relay reservations
RELAY_RETRY_S = 15.0  # with none left, how often it looks for a relay that answers again
KNOWN_S = 3600.0  # a peer not seen in the routing table for this long is no longer tried on a rejoin


JOIN_RETRY_S = 2.0  # pause between attempts to reach the initial peers, within join_timeout


def join_retryable(reason: str) -> bool:
    """Whether a failed join may succeed if tried again: the initial peers did not answer (lost
    packets, a peer still starting), as opposed to a refusal that another try would repeat."""
    # hivemind's words when its peers connected but did not answer, and its p2p daemon's when
    # none could be connected to at all
    return "responded to a ping" in reason or "failed to connect to bootstrap peers" in reason


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
    run: str = ""  # NAME@FINGERPRINT of the run to follow ("": the only one the swarm lists)
    relay: bool = False  # relay for peers behind NAT (when this node is public) and list itself as a relay
    # "auto": ask an initial peer to dial this node back, and go behind relays if it cannot;
    # "public" / "private": take this node to be reachable, or not, without asking
    reachability: str = "auto"
    own_run: str = ""  # the name of a run this node owns (the preparer): it follows NAME@<its own key>
    rejoin_s: float = 20.0  # how often to check that this node is still joined (0: never)


class OwnedDHT(DHT):
    """hivemind's DHT process, tied to the node that forked it: it ignores the signals meant for
    the node and ends itself and its p2pd when the node is gone (see :mod:`swarm.lifeline`)."""

    def __init__(self, *args, p2pd_extra: dict | None = None, **kwargs) -> None:
        self._node_pid = os.getpid()  # set before DHT.__init__, which forks at once
        self._p2pd_extra = dict(p2pd_extra or {})
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        detach_and_watch(self._node_pid)
        if self._p2pd_extra:
            _extend_p2pd_flags(self._p2pd_extra)
        super().run()


def _extend_p2pd_flags(extra: dict) -> None:
    """Pass p2pd flags hivemind's ``P2P.create`` has no parameter for (the relay service on or off;
    static relays without p2pd's relay discovery, which waits minutes for four candidates before it
    reserves anything). Called in the DHT process only, before it starts its p2pd."""
    make = P2P._make_process_args

    def with_extra(*args, **kwargs):
        kwargs.update(extra)
        if kwargs.get("trustedRelays"):
            kwargs["relayDiscovery"] = False
        return make(*args, **kwargs)

    P2P._make_process_args = staticmethod(with_extra)


class SwarmNode:
    """One DHT participant; every record it writes is signed and owned by its RSA key."""

    def __init__(self, cfg: SwarmConfig) -> None:
        _, rsa_path = identity_paths(cfg.identity_dir)
        self.key = load_or_create_rsa_key(rsa_path)  # signs its records and, serving, its answers
        self.rsa = RSASignatureValidator(self.key)
        self.owner: bytes = self.rsa.local_public_key
        self.fingerprint = fingerprint(self.owner)
        self.ref: RunRef | None = RunRef.parse(cfg.run) if cfg.run else None
        if cfg.own_run:
            self.ref = RunRef(check_run_name(cfg.own_run), self.fingerprint)
        self.bans = Bans()
        self._verdicts: dict[str, list[Verdict]] = {}  # job → this node's own recent verdicts
        self.op_timeout = cfg.op_timeout
        self._cfg = cfg
        self.dht = self._start(cfg, relays=None)
        self.peer_id = str(self.dht.peer_id)
        self._expiry: dict[str, float] = {}  # key → expiration of our last write under it
        self._lock = threading.RLock()  # heartbeat, publisher and trainer threads share the node
        self.initial_peers = list(cfg.initial_peers)
        self._known: dict[str, float] = {}  # peers this node has had in its routing table → when last
        self._most = 0  # the most peers it has had at once
        self._last_rejoin = 0.0
        self._said_alone = False
        self._saw_run = False
        self.rejoins = 0  # how many times a rejoin reached some peer
        self._halt = threading.Event()
        self.reach = Reach("unknown")
        self._restart_hooks: list[Callable[[DHT], None]] = []
        self._lost_relays = 0.0
        self._pending_restart = False
        self._relays_seen: list[str] = []  # relay addresses this node was given, for a restart
        self.reach = self._find_reach(cfg)
        self._relay_listed = 0.0
        if cfg.relay and self.reach.kind == "direct":
            self._list_as_relay()
        if cfg.rejoin_s > 0:
            threading.Thread(target=self._watch, args=(cfg.rejoin_s,), name="rejoin", daemon=True).start()

    def _start(self, cfg: SwarmConfig, relays: list[str] | None) -> DHT:
        """Start the DHT process and its p2pd: directly reachable, or (with ``relays``) behind those
        relays, in DHT client mode. Raises SwarmError when the swarm cannot be joined."""
        kwargs = dict(
            initial_peers=cfg.initial_peers or None,
            start=True,
            host_maddrs=cfg.host_maddrs,
            identity_path=str(identity_paths(cfg.identity_dir)[0]),
            record_validators=validators(self.rsa, self.ref),
            await_ready=True,
            p2pd_extra={"relayService": bool(cfg.relay)},
        )
        if cfg.announce_maddrs:
            kwargs["announce_maddrs"] = cfg.announce_maddrs
        if relays is not None:
            # Behind NAT: hold reservations with these relays at once (static relays: p2pd's own
            # relay discovery would wait minutes for more candidates), say so without waiting for
            # AutoNAT, and hold no DHT keys (client mode): others could not reach them here.
            kwargs.update(
                use_auto_relay=True,
                trusted_relays=relays,
                force_reachability="private",
                client_mode=True,
                check_if_identity_free=False,  # this node held the identity a moment ago
            )
        deadline = time.monotonic() + cfg.join_timeout
        while True:
            pool = concurrent.futures.ThreadPoolExecutor(1)
            future = pool.submit(OwnedDHT, **kwargs)
            try:
                dht = future.result(timeout=max(deadline - time.monotonic(), 1.0))
                break
            except concurrent.futures.TimeoutError:
                raise SwarmError(
                    f"could not join the swarm within {cfg.join_timeout:.0f}s: "
                    f"initial peers {cfg.initial_peers} did not answer"
                ) from None
            except Exception as e:  # hivemind raises several types here; all mean "cannot join"
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                # hivemind pings the initial peers once: on a lossy link a lost SYN or two outlasts
                # that ping, so it is asked again (a fresh DHT process) while the join time lasts.
                if not join_retryable(reason) or time.monotonic() + JOIN_RETRY_S >= deadline:
                    raise SwarmError(f"could not join the swarm via {cfg.initial_peers}: {reason}") from None
                print(f"no initial peer answered yet ({reason}); trying again", file=sys.stderr, flush=True)
                kwargs["check_if_identity_free"] = False  # the attempt that failed may have shown this id
                time.sleep(JOIN_RETRY_S)
            finally:
                pool.shutdown(wait=False)
        dht.run_coroutine(ServeProbes())  # every node answers dial-back probes
        if cfg.relay:
            dht.run_coroutine(ServeProxy())  # and a relay carries bulk streams to the peers behind it
        return dht

    # ---------------------------------------------------------------- reachability
    def _find_reach(self, cfg: SwarmConfig) -> Reach:
        """Ask an initial peer to dial this node back; behind NAT, restart behind relays."""
        ports = tuple(listen_ports(self.maddrs()))
        if cfg.reachability == "public":
            return Reach("direct", tuple(a for a in self._direct_maddrs()), ports=ports)
        if cfg.reachability == "auto":
            askable = [m.rsplit("/p2p/", 1)[1] for m in cfg.initial_peers if "/p2p/" in m]
            askable = [p for p in dict.fromkeys(askable) if p != self.peer_id]
            if not askable:
                return Reach("unknown", ports=ports)
            announced = listen_ports(cfg.announce_maddrs) if cfg.announce_maddrs else []
            probe = Probe(askable, announced or list(ports), self.op_timeout / 4)
            reached = self._wait(self.dht.run_coroutine(probe, return_future=True))
            if reached:
                return Reach("direct", tuple(reached), ports=ports)
            if reached is None:  # nobody answered the probe at all: say unknown rather than guess
                return Reach("unknown", ports=ports)
        relays = pick_relays(cfg.initial_peers, self._listed_relays())
        if not relays:
            return Reach("unreachable", ports=ports)
        self.dht.shutdown()
        self._relays_seen = list(relays)
        self.dht = self._start(cfg, relays=relays)
        self.peer_id = str(self.dht.peer_id)
        deadline = time.monotonic() + min(self.op_timeout, 20.0)
        while time.monotonic() < deadline:  # a reservation takes a round trip or two
            reach = self._relay_reach()
            if reach.kind == "relayed":
                return reach
            time.sleep(0.5)
        return self._relay_reach()

    def _relay_reach(self) -> Reach:
        maddrs = self.maddrs(latest=True)
        relays = relay_peers(maddrs)
        return Reach("relayed" if relays else "unreachable", relays=tuple(relays), ports=tuple(listen_ports(maddrs)))

    def _direct_maddrs(self) -> list[str]:
        return [a for a in self.maddrs() if not is_relayed(a) and "/127.0.0.1/" not in a] or self.maddrs()

    def _listed_relays(self) -> list[str]:
        """Relay addresses the DHT lists now (each relay's own record, signed by it)."""
        try:
            return [a for r in self.read(relays_key(), RelayRecord).values() for a in r.addrs]
        except SwarmError:
            return []

    def _list_as_relay(self) -> None:
        """Publish this public node's addresses as a relay (renewed by the watch thread)."""
        addrs = [a for a in self.reach.direct if observed_ip(a) is not None][:4]
        if not addrs:
            addrs = [a.rsplit("/p2p/", 1)[0] for a in self._direct_maddrs() if observed_ip(a) is not None][:4]
        if addrs:
            try:
                self.store(relays_key(), RelayRecord([f"{a}/p2p/{self.peer_id}" for a in addrs]), RELAY_TTL_S)
                self._relay_listed = time.monotonic()
            except SwarmError:  # the DHT is slow now: the watch thread tries again
                pass

    def _back_behind_relays(self) -> None:
        """With no relay reservation left, look for a relay that answers (a plain TCP connect, so the p2p
        daemon's own back-off, up to an hour for a relay it failed to reach, does not count), and if one
        does, restart the p2p daemon behind the relays that answer, as at the start."""
        relays = pick_relays(self.initial_peers, self._listed_relays() if not self._pending_restart else [])
        relays += [a for a in self._relays_seen if a not in relays]
        alive = [a for a in relays if _answers(a)]
        if not alive:
            return
        # Join through what answers: the initial peers may be the relays that died.
        cfg = dataclasses.replace(self._cfg, initial_peers=alive)
        with self._lock:
            if not self._pending_restart:
                self.dht.shutdown()
            self._pending_restart = True  # until a new DHT runs, the watch does only this
            try:
                self.dht = self._start(cfg, relays=alive)
            except SwarmError as e:
                print(f"could not restart behind relays: {e}; trying again", file=sys.stderr, flush=True)
                return
            self._pending_restart = False
        for hook in self._restart_hooks:
            try:
                hook(self.dht)
            except Exception as e:  # one holder failing must not keep the others on the old daemon
                print(f"after a restart: {e}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and (now := self._relay_reach()).kind != "relayed":
            time.sleep(0.5)
        self.reach = now
        print(self.reach_line(), file=sys.stderr, flush=True)

    def reach_line(self) -> str:
        """The one line that tells a user how others reach this node."""
        return start_line(self.reach, announce=bool(self._cfg.announce_maddrs))

    def on_restart(self, hook: Callable[[DHT], None]) -> None:
        """Call ``hook(new_dht)`` whenever this node restarts its DHT process and p2pd (a node behind
        NAT does, once a relay answers again after it had none): what holds a replica of the old
        p2p daemon binds to the new one (:meth:`swarm.blobs.BlobService.rebind`)."""
        self._restart_hooks.append(hook)

    def _watch_reach(self) -> None:
        """Say when a relayed node loses its last relay, or gets one back; keep a relay listed."""
        if self.reach.kind in ("relayed", "unreachable"):
            now = self._relay_reach()
            if (now.kind, now.relays) != (self.reach.kind, self.reach.relays):
                self.reach = now  # a relay gone, another one found, or none left: say so
                self._lost_relays = time.monotonic() if now.kind == "unreachable" else 0.0
                print(self.reach_line(), file=sys.stderr, flush=True)
            if now.kind == "unreachable" and time.monotonic() - self._lost_relays > RELAY_RETRY_S:
                self._lost_relays = time.monotonic()
                self._back_behind_relays()
        if self._cfg.relay and self.reach.kind == "direct" and time.monotonic() - self._relay_listed > RELAY_TTL_S / 3:
            self._list_as_relay()

    # ---------------------------------------------------------------- staying joined
    def routing_peers(self) -> list[str]:
        """Peers in this node's DHT routing table now."""
        return self._wait(self.dht.run_coroutine(_routing_peers, return_future=True))

    def cut_off(self) -> bool:
        """Whether this node has no peer left in its DHT routing table although it had some: what it
        writes now reaches nobody, and what it reads is only its own (a partition, a dead uplink)."""
        try:
            peers = self.routing_peers()
        except SwarmError:
            return True
        self._most = max(self._most, len(peers))
        return self._most > 0 and not peers

    def rejoin(self, why: str) -> int:
        """Ping the initial peers and every peer this node has known, then look up its neighbours
        again; returns how many answered. At most once every few seconds."""
        if time.monotonic() - self._last_rejoin < 5.0:
            return 0
        self._last_rejoin = time.monotonic()
        targets = {m.rsplit("/p2p/", 1)[1]: m.rsplit("/p2p/", 1)[0] for m in self.initial_peers if "/p2p/" in m}
        targets |= {p: targets.get(p, "") for p in self._known if p != self.peer_id}
        if not targets:
            return 0
        answered = self._wait(self.dht.run_coroutine(_Rejoin(targets, self.op_timeout / 2), return_future=True))
        if answered:
            self.rejoins += 1
            print(f"{why}: re-joined through {answered} of {len(targets)} known peer(s)", file=sys.stderr, flush=True)
        elif not self._said_alone:
            print(f"{why}: none of {len(targets)} known peer(s) answered; trying again", file=sys.stderr, flush=True)
        self._said_alone = not answered
        return answered

    def _watch(self, period: float) -> None:
        looked = time.monotonic()
        while not self._halt.wait(min(period, REACH_EVERY_S)):
            if self._pending_restart:  # the last restart failed: there is no DHT until one works
                self._back_behind_relays()
                continue
            try:
                self._watch_reach()  # cheap (one question to p2pd): more often than the routing table
                if time.monotonic() - looked < period:
                    continue
                looked = time.monotonic()
                peers = self.routing_peers()
                now = time.monotonic()
                self._known.update(dict.fromkeys(peers, now))
                self._known = {p: t for p, t in self._known.items() if now - t < KNOWN_S}
                self._most = max(self._most, len(peers))
                if len(peers) < min(self._most, 2) or (self.initial_peers and not peers):
                    self.rejoin(f"this node sees {len(peers)} peer(s) of the {self._most} it saw")
            except Exception:  # the DHT is shutting down, or slow: look again next period
                if not self.dht.is_alive():
                    return

    def maddrs(self, latest: bool = False) -> list[str]:
        """This node's addresses as its p2pd announces them (``latest``: asked again, so relay
        addresses that came or went since the start show)."""
        return [str(a) for a in self.dht.get_visible_maddrs(latest=latest)]

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

    def _key(self, key: str) -> str:
        """``key`` inside the followed run's namespace (global keys as they are)."""
        if is_global(key):
            return key
        if self.ref is None:
            self.run()  # follows the only run the swarm lists, if there is one
        if self.ref is None:
            raise SwarmError("this node follows no run yet: none is published")
        return in_run(key, self.ref)

    def for_run(self, ref: RunRef) -> SwarmNode:
        """This node looking at run ``ref``: the same DHT, key and bans, another run's namespace
        (a status node shows every run the swarm lists; it follows none of them)."""
        view = copy.copy(self)
        view.ref, view._saw_run, view._verdicts = ref, False, {}
        return view

    def follow(self, ref: RunRef) -> None:
        if self.ref is not None and self.ref != ref:
            raise SwarmError(f"this node follows run {self.ref}, not {ref}")
        self.ref = ref

    # ---------------------------------------------------------------- writes
    def store(self, key: str, record, ttl: float) -> bool:
        """Write ``record`` under our owner subkey; False if the swarm refused it.

        The DHT keeps whichever record expires last, so a write never expires before the
        previous one this node made under the same key.
        """
        key = self._key(key)
        if isinstance(record, PeerRecord | ServeRecord) and not record.reach:
            record = dataclasses.replace(record, reach=self.reach.kind)  # every presence says how others reach it
        with self._lock:
            expiration = max(get_dht_time() + ttl, self._expiry.get(key, 0.0) + 1e-3)
            try:
                pending = self.dht.store(key, encode(record), expiration, subkey=self.owner, return_future=True)
            except OSError:  # its pipe is closed: the DHT process is gone, or being restarted
                raise SwarmError("this node's DHT process is not running now") from None
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
        key = self._key(key)
        with self._lock:
            try:
                pending = self.dht.get(key, latest=True, return_future=True)
            except OSError:  # its pipe is closed: the DHT process is gone, or being restarted
                raise SwarmError("this node's DHT process is not running now") from None
            return self._wait(pending)

    def read(self, key: str, cls) -> dict[bytes, object]:
        """Live, well-formed, signed records under ``key`` by owner. A malformed record gets its
        signer banned here for a while; records of banned signers are dropped."""
        found = self.get(key)
        if found is None or not isinstance(found.value, dict):
            return {}
        out = {}
        for owner, item in found.value.items():
            # Only subkeys that name a key are signed (hivemind checks the signature of those).
            if not isinstance(owner, bytes) or not owner.startswith(b"[owner:"):
                continue
            if canonical_owner(owner) is None:
                # One key dressed up as another identity ([owner:KEY]suffix): hivemind checked the
                # signature, so the key's holder wrote it. Its record never counts, and the key is
                # ignored here for a while, under the one fingerprint it really has.
                signer = claimed_owner(owner)
                if signer is not None:
                    self.bans.ban(fingerprint(signer), "a record under a subkey beyond its owner marker")
                continue
            fp = fingerprint(owner)
            if self.bans.banned(fp):
                continue
            rec = decode(cls, getattr(item, "value", None))
            if rec is None:
                self.bans.ban(fp, f"malformed {key.rsplit('_', 2)[-1] if '_' in key else key} record")
                continue
            out[owner] = rec
        return out

    def runs(self) -> dict[RunRef, RunDirRecord]:
        """The runs this DHT lists, by reference."""
        return {RunRef(r.name, fingerprint(o)): r for o, r in self.read(runs_key(), RunDirRecord).items()}

    def run(self) -> RunRecord | None:
        """The run this node follows, as its owner published it; ``None`` while there is none.
        With no run given, the only run the swarm lists is followed; with several, this refuses
        to guess."""
        if self.ref is None:
            listed = self.runs()
            if not listed:
                return None
            if len(listed) > 1:
                raise SwarmError(
                    f"this swarm lists {len(listed)} runs; follow one with --run: "
                    + ", ".join(f"{ref} ({r.manifest_sha256[:12]})" for ref, r in sorted(listed.items(), key=str))
                )
            self.follow(next(iter(listed)))
        owned = self._owned_run()
        if not owned and self._saw_run and self.ref.owner != self.fingerprint:
            # The run was here and is gone from sight: this node may be cut off from the swarm.
            if self.rejoin(f"run {self.ref} is out of sight"):
                owned = self._owned_run()
        self._saw_run = self._saw_run or bool(owned)
        return owned[0] if owned else None

    def _owned_run(self) -> list[RunRecord]:
        return [
            r
            for o, r in self.read(run_key(), RunRecord).items()
            if fingerprint(o) == self.ref.owner and r.name == self.ref.name
        ]

    def publish_verdict(self, job: str, run: RunRecord, *verdicts: Verdict) -> None:
        """Add ``verdicts`` to this node's signed verdicts on ``job``, in one write. It keeps the
        newest accepted and refused ones apart, so a flood of refusals cannot push out the
        progress; a verdict replaces only one on the same thing (the same bytes, or the same
        signer's record of them), so a stranger's record of a hash refused never erases the
        acceptance of that hash at its own step."""
        if not verdicts:
            return

        def same(v: Verdict) -> tuple:
            return (v.sha256, v.step, v.owner if v.about == "record" else "")

        with self._lock:
            new = {same(v) for v in verdicts}
            old = [v for v in self._verdicts.get(job, []) if same(v) not in new]
            fresh = [*old, *verdicts]
            good = [v for v in fresh if v.ok][-MAX_VERDICTS:]
            bad = [v for v in fresh if not v.ok][-MAX_VERDICTS:]
            self._verdicts[job] = good + bad
            entries = list(self._verdicts[job])
        self.store(verdicts_key(job), VerdictsRecord(run.manifest_sha256, entries), VERDICT_TTL_S)

    def snapshot(self, run: RunRecord, jobs: list[str] | None = None, checkpoints: bool = True) -> Snapshot:
        """Claims and (unless ``checkpoints`` is off) checkpoint records with their live providers,
        of ``jobs`` (default: every job of the run). Reading only what a decision needs keeps the
        frequent ones (a claim renewal, a settle re-read) to one DHT read."""
        jobs = run.jobs() if jobs is None else jobs
        ckpts = {j: self.read(ckpt_key(j), CheckpointRecord) for j in jobs} if checkpoints else {}
        hashes = {r.sha256 for recs in ckpts.values() for r in recs.values() if r.run == run.manifest_sha256}
        verdicts = {j: self.read(verdicts_key(j), VerdictsRecord) for j in jobs}
        with self._lock:  # this node's own verdicts count at once, before the DHT returns them
            for j in jobs:
                if self._verdicts.get(j):
                    verdicts[j][self.owner] = VerdictsRecord(run.manifest_sha256, list(self._verdicts[j]))
        return Snapshot(
            run=run,
            claims={j: self.read(claim_key(j), ClaimRecord) for j in jobs},
            ckpts=ckpts,
            providers={h: self.providers(h) for h in hashes},
            verdicts=verdicts,
            now=get_dht_time(),
            owner=self.ref.owner if self.ref else "",
            me=self.fingerprint,
            banned=frozenset(w for w in self.bans.active() if len(w) == 32),
        )

    def providers(self, sha256: str) -> set[str]:
        """Peers (this one included) whose provider record for the blob ``sha256`` is live and
        who are not banned here."""
        return {r.peer for r in self.read(blob_key(sha256), ProviderRecord).values() if not self.bans.banned(r.peer)}

    def servers(self, run: RunRecord, experts: list[int], online_only: bool = True) -> dict[int, list[ServeRecord]]:
        """Serve records of this run per expert (only those online, unless ``online_only`` is off)."""
        out: dict[int, list[ServeRecord]] = {}
        for k in experts:
            recs = [
                replace(r, owner=owner)
                for owner, r in self.read(serve_key(k), ServeRecord).items()
                if r.run == run.manifest_sha256 and (r.state == "online" or not online_only)
            ]
            if recs:
                out[k] = recs
        return out

    def shutdown(self) -> None:
        self._halt.set()
        self.dht.shutdown()


def _answers(maddr: str, timeout: float = 3.0) -> bool:
    """Whether something accepts a TCP connection at ``/ip4/X/tcp/P/...``."""
    parts = maddr.split("/")
    try:
        with socket.create_connection((parts[2], int(parts[4])), timeout=timeout):
            return True
    except (OSError, ValueError, IndexError):
        return False


async def _routing_peers(_dht: DHT, node) -> list[str]:
    return [str(p) for p in node.protocol.routing_table.uid_to_peer_id.values()]


class _Rejoin:
    """Run inside the DHT process (``run_coroutine`` pickles it): dial each peer (at its address
    when one is known), ping it into the routing table, then look up this node's neighbours."""

    def __init__(self, targets: dict[str, str], timeout: float) -> None:
        self.targets, self.timeout = targets, timeout

    async def __call__(self, _dht: DHT, node) -> int:
        async def one(peer: str, addr: str) -> bool:
            pid = PeerID.from_base58(peer)
            try:
                if addr:
                    await asyncio.wait_for(node.p2p._client.connect(pid, [Multiaddr(addr)]), self.timeout)
                return await asyncio.wait_for(node.protocol.call_ping(pid), self.timeout) is not None
            except Exception:  # gone, or not reachable now: the others may be
                return False

        answered = await asyncio.gather(*(one(p, a) for p, a in self.targets.items()))
        if any(answered):
            try:
                await asyncio.wait_for(node.find_nearest_nodes([node.node_id]), self.timeout)
            except Exception:  # the pings already put peers back in the table
                pass
        return sum(answered)
