"""A relay's stream proxy (swarm/proxy.py) between real peers on loopback: it carries a blob stream to a
peer connected to it, and refuses what it must not carry. Across NAT it is exercised in tests/test_nat.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from pathlib import Path

import pytest
from hivemind.p2p import PeerID

from swarm import blobs as blob_protocol
from swarm import protocol as denoise_protocol
from swarm.blobs import BlobService, BlobStore
from swarm.dht import SwarmConfig, SwarmNode
from swarm.proxy import CARRIED, MAX_PER_ASKER, PROTOCOL, open_stream, parse_header, proxy_header

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def test_a_relay_carries_exactly_the_swarms_bulk_protocols():
    assert set(CARRIED) == {blob_protocol.PROTOCOL, denoise_protocol.PROTOCOL}
    peer = "QmTKDKu2gjMJBESMLPZ97qms7FmRQm616jEK9rBgJgrrbL"
    assert parse_header(proxy_header(peer, blob_protocol.PROTOCOL)[2:]) == (peer, blob_protocol.PROTOCOL)
    for junk in (
        proxy_header(peer, "diffswarm-reach-v1")[2:],  # not a bulk protocol
        proxy_header("not-a-peer", blob_protocol.PROTOCOL)[2:],
        b'{"peer": 1}',
        b"\xff\xfe",
    ):
        assert parse_header(junk) is None


@pytest.fixture
def trio(tmp_path: Path):
    """A relay, a provider holding a 300 KB blob (more than a libp2p relayed connection carries) and an asker."""
    nodes, services = [], []
    try:
        relay = SwarmNode(SwarmConfig(str(tmp_path / "relay"), host_maddrs=[LOOPBACK], relay=True))
        nodes.append(relay)
        peers = relay.maddrs()
        for name in ("provider", "asker"):
            nodes.append(SwarmNode(SwarmConfig(str(tmp_path / name), initial_peers=peers, host_maddrs=[LOOPBACK])))
        store = BlobStore()
        blob = tmp_path / "blob"
        blob.write_bytes(bytes(range(256)) * 1200)
        digest = store.add_file(blob)
        services = [BlobService(nodes[1].dht, store), BlobService(nodes[2].dht, BlobStore())]
        yield nodes, services[1], digest, blob.read_bytes()
    finally:
        for s in services:
            s.shutdown()
        for n in reversed(nodes):
            n.shutdown()


async def _ask(p2p, relay: str, peer: str, protocol: str) -> tuple[dict, asyncio.StreamReader, asyncio.StreamWriter]:
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(relay), PROTOCOL)
    writer.write(proxy_header(peer, protocol))
    await writer.drain()
    (n,) = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 30))
    return json.loads(await reader.readexactly(n)), reader, writer


async def _blob_through(p2p, relay: str, provider: str, digest: str) -> bytes:
    answer, reader, writer = await _ask(p2p, relay, provider, blob_protocol.PROTOCOL)
    assert answer == {"ok": True}
    writer.write(bytes.fromhex(digest) + struct.pack(">Q", 0))
    await writer.drain()
    status, size = struct.unpack(">BQ", await asyncio.wait_for(reader.readexactly(9), 30))
    assert status == blob_protocol.OK
    data = await asyncio.wait_for(reader.readexactly(size), 30)
    writer.close()
    return data


def test_a_relay_carries_a_blob_stream_and_refuses_the_rest(trio):
    (relay, provider, asker), service, digest, content = trio
    p2p = service.p2p
    got = service.call(_blob_through(p2p, relay.peer_id, provider.peer_id, digest), timeout=60)
    assert hashlib.sha256(got).hexdigest() == digest and got == content

    async def refusals() -> list[str]:
        out = []
        for peer, protocol in (
            (provider.peer_id, "diffswarm-reach-v1"),  # not a protocol it carries
            (asker.peer_id, blob_protocol.PROTOCOL),  # back to the asker itself
            (relay.peer_id, blob_protocol.PROTOCOL),  # to the relay itself
        ):
            answer, _, writer = await _ask(p2p, relay.peer_id, peer, protocol)
            writer.close()
            out.append(answer.get("error", ""))
        return out

    assert service.call(refusals(), timeout=60) == [
        "not a stream this relay carries",
        "not a peer to carry a stream to",
        "not a peer to carry a stream to",
    ]

    # A node that does not relay has no proxy; on loopback everyone is direct, so open_stream never asks one.
    async def not_a_relay() -> str:
        try:
            await _ask(p2p, provider.peer_id, relay.peer_id, blob_protocol.PROTOCOL)
        except Exception as e:
            return type(e).__name__
        return "answered"

    assert service.call(not_a_relay(), timeout=60) != "answered"
    path, _, writer = service.call(open_stream(p2p, provider.peer_id, blob_protocol.PROTOCOL, 10), timeout=30)
    writer.close()
    assert path == "direct"


def test_a_relay_carries_a_bounded_number_of_streams_per_asker(trio):
    (relay, provider, _), service, _, _ = trio

    async def hog() -> str:
        held = []
        for _ in range(MAX_PER_ASKER):
            answer, _, writer = await _ask(service.p2p, relay.peer_id, provider.peer_id, blob_protocol.PROTOCOL)
            assert answer == {"ok": True}
            held.append(writer)
        answer, _, writer = await _ask(service.p2p, relay.peer_id, provider.peer_id, blob_protocol.PROTOCOL)
        for w in [*held, writer]:
            w.close()
        return answer.get("error", "")

    assert service.call(hog(), timeout=60) == "busy"
