"""Reachability: whether other peers can dial this node, and what a node does when they cannot.

A node behind NAT can dial out and nobody can dial in. To find out which kind it is, a node that
joins asks one of its initial peers to dial it back (:class:`Probe`): the peer takes the address
this node's connection came from (so it can only be made to dial the asker itself, never a third
party), tries each listening port the node names, and reports which answered with a libp2p
handshake. Every node serves these probes (:class:`ServeProbes`), a few at a time.

- Answered: the node is **direct**, reachable at those addresses.
- Not answered: the node restarts its p2p daemon behind relays: auto-relay with the swarm's public
  relays as static relays (its initial peers first, then relays listed in the DHT), forced private
  reachability (so it does not wait for libp2p's own AutoNAT to make up its mind), and DHT client mode:
  a peer that others cannot dial must not hold DHT keys, or every key it holds is lost to them. It is
  then **relayed**: others reach it through ``/p2p-circuit`` addresses, and a client sees in each
  stream's address which path it took.
- Relayed but with no relay reservation left (every relay gone): **unreachable**; it says so once
  and libp2p keeps trying the relays it was given.

Public peers relay for the others: a bootstrap peer by default, any other public node started with
``--relay``. A libp2p relayed connection carries only 128 KiB each way (p2pd keeps go-libp2p's
default limits whatever its flags say), enough for a probe or a DHT request; blobs and denoising
sessions to a relayed peer go through its relay's stream proxy (:mod:`swarm.proxy`).
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
from dataclasses import dataclass

from hivemind.p2p import PeerID

PROTOCOL = "diffswarm-reach-v1"
MAX_PORTS = 4  # listening ports one probe may ask to be dialled on
MAX_REQUEST = 512  # bytes of a probe request
DIAL_TIMEOUT_S = 3.0  # a NAT drops the dial-back's SYN: this is what a node behind one waits
HANDSHAKE = b"/multistream/1.0.0"  # what a libp2p listener says first on every new connection
CONCURRENT_PROBES = 4  # a peer answers this many probes at once and tells the rest it is busy
MAX_RELAYS = 6  # static relays a relayed node is given: its initial peers first, then listed ones


@dataclass(frozen=True)
class Reach:
    """How other peers reach this node now."""

    kind: str  # "direct", "relayed", "unreachable" (relayed, with no relay left) or "unknown"
    direct: tuple[str, ...] = ()  # addresses a peer dialled back
    relays: tuple[str, ...] = ()  # peer ids of the relays this node holds a reservation with
    ports: tuple[int, ...] = ()  # its listening TCP ports


def is_relayed(maddr: str) -> bool:
    return "/p2p-circuit" in maddr


def listen_ports(maddrs: list[str]) -> list[int]:
    """TCP ports this node listens on, from its visible addresses (relay addresses aside)."""
    ports = []
    for a in maddrs:
        if is_relayed(a) or "/tcp/" not in a:
            continue
        port = int(a.split("/tcp/", 1)[1].split("/", 1)[0])
        if port not in ports:
            ports.append(port)
    return ports


def relay_peers(maddrs: list[str]) -> list[str]:
    """Peer ids of the relays named in this node's ``/p2p-circuit`` addresses."""
    out = []
    for a in maddrs:
        if is_relayed(a):
            relay = a.split("/p2p-circuit", 1)[0].rsplit("/p2p/", 1)[-1]
            if relay not in out:
                out.append(relay)
    return out


def observed_ip(remote: str) -> str | None:
    """The IPv4 address a connection came from (``/ip4/X/tcp/P``), or None for a relayed one."""
    parts = remote.split("/")
    if is_relayed(remote) or len(parts) < 3 or parts[1] != "ip4":
        return None
    return parts[2]


def probe_request(ports: list[int]) -> bytes:
    body = json.dumps({"ports": [int(p) for p in ports[:MAX_PORTS]]}).encode()
    return struct.pack(">H", len(body)) + body


def parse_probe_request(body: bytes) -> list[int]:
    """The ports a probe asks for: at most :data:`MAX_PORTS` valid TCP ports; anything else is dropped."""
    try:
        ports = json.loads(body.decode()).get("ports", [])
    except (ValueError, UnicodeDecodeError, AttributeError):
        return []
    if not isinstance(ports, list):
        return []
    ok = [p for p in ports if isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536]
    return list(dict.fromkeys(ok))[:MAX_PORTS]


def parse_probe_reply(body: bytes, ip: str | None = None) -> list[str] | None:
    """The addresses a prober reached, or None when it was busy or said nothing usable. Only
    ``/ip4/X/tcp/P`` addresses are kept (a prober cannot make this node announce anything else)."""
    try:
        reply = json.loads(body.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(reply, dict) or reply.get("busy") or not isinstance(reply.get("reachable"), list):
        return None
    out = []
    for a in reply["reachable"][:MAX_PORTS]:
        if isinstance(a, str) and observed_ip(a) is not None and len(a) < 64 and a.count("/") == 4:
            out.append(a)
    return out


def start_line(reach: Reach, announce: bool = False) -> str:
    """The one line a node prints at start (and again when it changes)."""
    if reach.kind == "direct":
        return f"reachable at {', '.join(reach.direct)}"
    port = reach.ports[0] if reach.ports else 0
    advice = f"for direct connections open TCP port {port} or pass --announce-maddrs"
    if announce:
        advice = "the addresses given to --announce-maddrs did not answer a dial-back"
    if reach.kind == "relayed":
        return f"behind NAT: reachable through relay {', '.join(reach.relays)}; {advice}"
    if reach.kind == "unreachable":
        return f"behind NAT and no relay answers: other peers cannot reach this node now (retrying); {advice}"
    return (
        "reachability unknown: no peer could be asked to dial this node back "
        "(the first node of a swarm: others join through it, so it must be reachable at an address below)"
    )


def pick_relays(initial_peers: list[str], listed: list[str], limit: int = MAX_RELAYS) -> list[str]:
    """Static relays for a relayed node: its initial peers first (the user chose them), then relays
    the DHT lists, drawn at random so that many listings by one stranger do not decide which."""
    out = [a for a in initial_peers if "/p2p/" in a and not is_relayed(a)]
    rest = [a for a in dict.fromkeys(listed) if "/p2p/" in a and not is_relayed(a) and a not in out]
    random.shuffle(rest)
    return (out + rest)[:limit]


# ------------------------------------------------------------------ run inside the DHT process


async def _dial_back(ip: str, port: int) -> bool:
    """Whether a new TCP connection to ``ip:port`` is taken by a listener that does not turn out to be
    something other than libp2p. Behind a NAT the connection itself never opens (the router drops the
    SYN). A listener that stays silent counts: a busy p2pd may be slow to say its handshake first."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), DIAL_TIMEOUT_S)
    except (TimeoutError, OSError):
        return False
    try:
        said = await asyncio.wait_for(reader.read(64), 2 * DIAL_TIMEOUT_S)
        return HANDSHAKE in said
    except TimeoutError:
        return True
    except OSError:
        return False
    finally:
        writer.close()


class ServeProbes:
    """Installed in the DHT process (``run_coroutine`` pickles it): answer dial-back probes."""

    async def __call__(self, _dht, node) -> None:
        busy = asyncio.Semaphore(CONCURRENT_PROBES)

        async def handle(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                if busy.locked():
                    await _reply(writer, {"busy": True})
                    return
                async with busy:
                    (n,) = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), DIAL_TIMEOUT_S))
                    if n > MAX_REQUEST:
                        return
                    ports = parse_probe_request(await asyncio.wait_for(reader.readexactly(n), DIAL_TIMEOUT_S))
                    ip = observed_ip(str(info.addr))
                    reached = []
                    if ip is not None:
                        ok = await asyncio.gather(*(_dial_back(ip, p) for p in ports))
                        reached = [f"/ip4/{ip}/tcp/{p}" for p, good in zip(ports, ok, strict=True) if good]
                    await _reply(writer, {"reachable": reached, "seen": ip or ""})
            except (TimeoutError, OSError, asyncio.IncompleteReadError, struct.error):
                pass  # the asker went away
            finally:
                writer.close()

        await node.p2p.add_binary_stream_handler(PROTOCOL, handle)


async def _reply(writer: asyncio.StreamWriter, body: dict) -> None:
    data = json.dumps(body).encode()
    writer.write(struct.pack(">H", len(data)) + data)
    await writer.drain()


class Probe:
    """Run in the DHT process: ask ``peers`` in turn to dial this node back on ``ports``; the first
    usable answer wins (None: nobody answered)."""

    def __init__(self, peers: list[str], ports: list[int], timeout: float) -> None:
        self.peers, self.ports, self.timeout = peers, ports, timeout

    async def __call__(self, _dht, node) -> list[str] | None:
        for peer in self.peers:
            try:
                _, reader, writer = await asyncio.wait_for(
                    node.p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROTOCOL), self.timeout
                )
            except Exception:  # that peer is gone or does not speak this protocol: the next one
                continue
            try:
                writer.write(probe_request(self.ports))
                await writer.drain()
                (n,) = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), self.timeout))
                if n <= MAX_REQUEST:
                    got = parse_probe_reply(await asyncio.wait_for(reader.readexactly(n), self.timeout))
                    if got is not None:
                        return got
            except Exception:  # a broken or slow answer: ask the next peer
                pass
            finally:
                writer.close()
        return None
