"""Streams to peers behind NAT, carried by their relay's stream proxy.

p2pd's circuit relay holds every relayed connection to go-libp2p's default limits, 128 KiB each way
and two minutes, whatever its flags say: it sets its relay service up twice, and the second one,
with the defaults, is the one that answers (``benchmarks/RESULTS.md`` shows the transfers it cuts).
That is enough for what a relayed connection is used for here (a dial-back probe, opening a stream)
and far too little for a shard, a checkpoint or a denoising session. So a stream to a peer that is
reachable only through a relay goes through that relay's proxy instead (:func:`open_stream`): the
relay opens the same protocol to the peer over the peer's own direct connection to it (the one its
relay reservation keeps open) and copies bytes both ways, with no limit but an idle timeout.

What this costs and trusts:
- The relay carries the bytes, as a libp2p relay would; a public node offers it only when it relays
  (a bootstrap peer by default, any other node with ``--relay``).
- libp2p's encryption ends at the relay, so the relay could alter what it carries. A blob is
  verified by sha256 at the receiver, so it cannot be forged; a denoising reply through a proxy is as
  good as the relay, which is one more reason a client prefers a server it reaches directly.
- A server sees a proxied client as the relay's peer id: the clients behind one relay share one fair
  share at a server, and a ban of one is a ban of the relay.
- A relay carries only this swarm's bulk protocols, only to a peer connected to it directly, at most
  :data:`MAX_PER_ASKER` streams per asker and :data:`MAX_STREAMS` in all.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections import Counter

from hivemind.p2p import PeerID

from swarm.reach import is_relayed, relay_peers

PROTOCOL = "diffswarm-proxy-v1"
# The protocols a relay carries: blob transfer (swarm.blobs) and denoising sessions (swarm.protocol).
CARRIED = ("diffswarm-blob-v1", "diffswarm-denoise-v1")
MAX_HEADER = 512
MAX_PER_ASKER = 8
MAX_STREAMS = 64
IDLE_S = 120.0  # a proxied stream with no byte either way for this long is closed
COPY_CHUNK = 1 << 16

_via: dict[str, str] = {}  # peer → the relay its streams go through (learned from the first stream's address)


def proxy_header(peer: str, protocol: str) -> bytes:
    body = json.dumps({"peer": peer, "protocol": protocol}).encode()
    return struct.pack(">H", len(body)) + body


def parse_header(body: bytes) -> tuple[str, str] | None:
    """(peer, protocol) of a proxy request, or None when it is not one this relay carries."""
    try:
        req = json.loads(body.decode())
        peer, protocol = req["peer"], req["protocol"]
        PeerID.from_base58(peer)
    except Exception:  # not JSON, no such fields, not a peer id: not a request
        return None
    if not isinstance(protocol, str) or protocol not in CARRIED:
        return None
    return peer, protocol


async def _answer(writer: asyncio.StreamWriter, body: dict) -> None:
    data = json.dumps(body).encode()
    writer.write(struct.pack(">H", len(data)) + data)
    await writer.drain()


async def _read_json(reader: asyncio.StreamReader, timeout: float) -> bytes:
    (n,) = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), timeout))
    if n > MAX_HEADER:
        raise ConnectionError(f"a header of {n} bytes")
    return await asyncio.wait_for(reader.readexactly(n), timeout)


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, seen: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while chunk := await src.read(COPY_CHUNK):
        seen[0] = loop.time()
        dst.write(chunk)
        await dst.drain()


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def pipe(a: Stream, b: Stream, idle_s: float = IDLE_S) -> None:
    """Copy bytes both ways between two streams until one side ends or both are idle for ``idle_s``."""
    loop = asyncio.get_running_loop()
    seen = [loop.time()]
    tasks = [asyncio.ensure_future(_copy(a[0], b[1], seen)), asyncio.ensure_future(_copy(b[0], a[1], seen))]
    try:
        while True:
            done, _ = await asyncio.wait(tasks, timeout=min(5.0, idle_s), return_when=asyncio.FIRST_COMPLETED)
            if done or loop.time() - seen[0] > idle_s:
                return
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, w in (a, b):
            w.close()


class ServeProxy:
    """Installed in a relay's DHT process (``run_coroutine`` pickles it): carry streams of
    :data:`CARRIED` protocols to peers connected to this relay directly."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout

    async def __call__(self, _dht, node) -> None:
        active: Counter[str] = Counter()

        async def handle(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            asker = str(info.peer_id)
            try:  # the request first, even to refuse it: an asker writes it before it reads the answer
                body = await _read_json(reader, self.timeout)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError, struct.error):
                writer.close()
                return
            if sum(active.values()) >= MAX_STREAMS or active[asker] >= MAX_PER_ASKER:
                await _refuse(writer, "busy")
                return
            active[asker] += 1
            try:
                req = parse_header(body)
                if req is None:
                    await _refuse(writer, "not a stream this relay carries")
                    return
                peer, protocol = req
                if peer in (asker, str(node.peer_id)):
                    await _refuse(writer, "not a peer to carry a stream to")
                    return
                try:
                    there, r2, w2 = await asyncio.wait_for(
                        node.p2p.call_binary_stream_handler(PeerID.from_base58(peer), protocol), self.timeout
                    )
                except Exception:  # not connected here, or it does not speak that protocol
                    await _refuse(writer, f"peer {peer[:12]}… is not reachable from this relay")
                    return
                if is_relayed(str(there.addr)):  # it is not connected here directly: no relay chains
                    w2.close()
                    await _refuse(writer, f"peer {peer[:12]}… is not connected to this relay")
                    return
                await _answer(writer, {"ok": True})
                await pipe((reader, writer), (r2, w2))
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError, struct.error):
                pass  # one side went away
            finally:
                active[asker] -= 1
                if not active[asker]:
                    del active[asker]
                writer.close()

        await node.p2p.add_binary_stream_handler(PROTOCOL, handle)


async def _refuse(writer: asyncio.StreamWriter, why: str) -> None:
    try:
        await _answer(writer, {"ok": False, "error": why})
    finally:
        writer.close()


async def open_stream(p2p, peer: str, protocol: str, timeout: float) -> tuple[str, *Stream]:
    """A stream of ``protocol`` to ``peer``: ``("direct", reader, writer)``, or, when the peer is
    reachable only through a relay, ``("relayed", ...)`` carried by that relay's proxy."""
    relay = _via.get(peer)
    if relay is None:
        try:
            opening = p2p.call_binary_stream_handler(PeerID.from_base58(peer), protocol)
            info, reader, writer = await asyncio.wait_for(opening, timeout)
        except Exception:  # a dial that lost a race to another ("concurrent active dial succeeded"), or a
            await asyncio.sleep(0.5)  # lost SYN: the connection is often there a moment later
            opening = p2p.call_binary_stream_handler(PeerID.from_base58(peer), protocol)
            info, reader, writer = await asyncio.wait_for(opening, timeout)
        if not is_relayed(str(info.addr)):
            return "direct", reader, writer
        writer.close()  # a relayed connection would be cut after 128 KiB: ask its relay to carry the stream
        relay = relay_peers([str(info.addr)])[0]
        _via[peer] = relay
    try:
        opening = p2p.call_binary_stream_handler(PeerID.from_base58(relay), PROTOCOL)
        _, reader, writer = await asyncio.wait_for(opening, timeout)
        writer.write(proxy_header(peer, protocol))
        await writer.drain()
        answer = json.loads(await _read_json(reader, timeout))
    except Exception as e:
        _via.pop(peer, None)  # the relay is gone, or never was one: look again next time
        why = str(e) or type(e).__name__
        raise ConnectionError(f"relay {relay[:12]}… of peer {peer[:12]}… did not answer ({why})") from None
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        _via.pop(peer, None)
        why = answer.get("error", "no reason") if isinstance(answer, dict) else "a malformed answer"
        writer.close()
        raise ConnectionError(f"relay {relay[:12]}… would not carry a stream to peer {peer[:12]}…: {str(why)[:120]}")
    return "relayed", reader, writer
