"""Reachability (swarm/reach.py): the pure parts, and the dial-back probe between real peers on loopback.

Across real NATs and relays it is tested in tests/test_nat.py.
"""

from __future__ import annotations

import asyncio
import json
import struct

import pytest

from swarm.reach import (
    MAX_PORTS,
    Reach,
    listen_ports,
    observed_ip,
    parse_probe_reply,
    parse_probe_request,
    pick_relays,
    probe_request,
    relay_peers,
    start_line,
)
from swarm.records import RelayRecord, decode, encode

BOOT = "QmTKDKu2gjMJBESMLPZ97qms7FmRQm616jEK9rBgJgrrbL"
ME = "QmX63sFJnZzugxKQJHK723CTHoxws77gHddD4vtn4Fx5At"
MADDRS = [
    f"/ip4/11.99.0.1/tcp/31337/p2p/{BOOT}/p2p-circuit/p2p/{ME}",
    f"/ip4/192.168.1.2/tcp/45223/p2p/{ME}",
    f"/ip4/127.0.0.1/tcp/45223/p2p/{ME}",
]


def test_addresses_are_told_apart():
    assert listen_ports(MADDRS) == [45223]
    assert relay_peers(MADDRS) == [BOOT]
    assert observed_ip("/ip4/11.99.0.3/tcp/40245") == "11.99.0.3"
    assert observed_ip(f"/ip4/11.99.0.1/tcp/1/p2p/{BOOT}/p2p-circuit") is None  # relayed: nothing to dial back
    assert observed_ip("/ip6/::1/tcp/5") is None


def test_a_probe_request_names_a_few_ports_and_nothing_else():
    assert parse_probe_request(probe_request([1, 2, 3, 4, 5, 6])[2:]) == [1, 2, 3, 4][:MAX_PORTS]
    assert parse_probe_request(json.dumps({"ports": [0, 70000, True, "22", 22, 22, -1]}).encode()) == [22]
    for junk in (b"\xff", b"[]", b'{"ports": 5}', b"null"):
        assert parse_probe_request(junk) == []


def test_a_probe_reply_only_ever_yields_plain_tcp_addresses():
    ok = json.dumps({"reachable": ["/ip4/11.99.0.2/tcp/4001"], "seen": "11.99.0.2"}).encode()
    assert parse_probe_reply(ok) == ["/ip4/11.99.0.2/tcp/4001"]
    assert parse_probe_reply(json.dumps({"reachable": []}).encode()) == []  # asked, and not reachable
    assert parse_probe_reply(json.dumps({"busy": True}).encode()) is None  # not an answer
    lies = {"reachable": [f"/ip4/1.2.3.4/tcp/1/p2p/{BOOT}/p2p-circuit", "/dns4/evil/tcp/1", 5, "/ip4/1.2.3.4/tcp/9"]}
    assert parse_probe_reply(json.dumps(lies).encode()) == ["/ip4/1.2.3.4/tcp/9"]
    assert parse_probe_reply(b"\x00garbage") is None


def test_the_start_line_says_how_others_reach_this_node():
    assert start_line(Reach("direct", ("/ip4/11.99.0.2/tcp/31337",))) == "reachable at /ip4/11.99.0.2/tcp/31337"
    relayed = start_line(Reach("relayed", relays=(BOOT,), ports=(45223,)))
    assert relayed.startswith(f"behind NAT: reachable through relay {BOOT}")
    assert "open TCP port 45223 or pass --announce-maddrs" in relayed
    assert "no relay answers" in start_line(Reach("unreachable", ports=(1,)))
    assert "first node of a swarm" in start_line(Reach("unknown"))


def test_relays_are_the_initial_peers_first_then_a_random_few_of_those_listed():
    initial = [f"/ip4/11.99.0.1/tcp/31337/p2p/{BOOT}", "/ip4/11.99.0.1/tcp/31337"]  # the second names no peer
    listed = [f"/ip4/11.99.0.{i}/tcp/1/p2p/{ME}" for i in range(2, 40)] + [MADDRS[0]]
    relays = pick_relays(initial, listed, limit=6)
    assert relays[0] == initial[0] and len(relays) == 6
    assert MADDRS[0] not in relays  # a relayed address is no relay
    assert len({tuple(pick_relays(initial, listed)) for _ in range(20)}) > 1  # not always the same listed ones


def test_a_relay_record_holds_dialable_relay_addresses_only():
    good = RelayRecord([f"/ip4/11.99.0.1/tcp/31337/p2p/{BOOT}"])
    assert decode(RelayRecord, encode(good)) == good
    for bad in ([], [MADDRS[0]], ["/dns4/x/tcp/1/p2p/" + BOOT], [good.addrs[0]] * 5):
        assert decode(RelayRecord, {"addrs": bad}) is None


@pytest.fixture
def two_nodes(tmp_path):
    from swarm.dht import SwarmConfig, SwarmNode

    first = SwarmNode(SwarmConfig(str(tmp_path / "a"), host_maddrs=["/ip4/127.0.0.1/tcp/0"], relay=True))
    second = None
    try:
        second = SwarmNode(
            SwarmConfig(str(tmp_path / "b"), initial_peers=first.maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        )
        yield first, second
    finally:
        for node in (second, first):
            if node is not None:
                node.shutdown()


def test_a_peer_dials_a_joining_node_back_and_a_public_relay_lists_itself(two_nodes):
    first, second = two_nodes
    assert first.reach.kind == "unknown"  # the first node had nobody to ask
    assert second.reach.kind == "direct"
    assert second.reach.direct == tuple(f"/ip4/127.0.0.1/tcp/{p}" for p in second.reach.ports)
    assert second.reach_line().startswith("reachable at /ip4/127.0.0.1/tcp/")
    # The first node relays but could not be dialled back by anyone: it does not list itself.
    from swarm.records import RelayRecord, relays_key

    assert second.read(relays_key(), RelayRecord) == {}


class _RawProbes:
    """Run in the asking node's DHT process: a plain probe (a closed port and the asker's own), and a
    request that announces more bytes than a probe may have."""

    def __init__(self, target: str) -> None:
        self.target = target

    async def ask(self, p2p, body: bytes) -> bytes:
        from hivemind.p2p import PeerID

        from swarm.reach import PROTOCOL

        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(self.target), PROTOCOL)
        writer.write(body)
        await writer.drain()
        try:
            (n,) = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 10))
            return await reader.readexactly(n)
        except asyncio.IncompleteReadError:
            return b""
        finally:
            writer.close()

    async def __call__(self, _dht, node) -> tuple[bytes, bytes]:
        mine = listen_ports([str(a) for a in await node.p2p.get_visible_maddrs()])
        plain = await self.ask(node.p2p, probe_request([1, *mine]))  # nothing listens on port 1
        huge = await self.ask(node.p2p, struct.pack(">H", 60000) + b"x" * 100)
        return plain, huge


def test_a_probe_dials_only_the_asker_and_refuses_junk(two_nodes):
    """A raw probe over the wire: a port nothing listens on is not reported, the answer names the
    asker's own address only, and a request too large is dropped unanswered."""
    first, second = two_nodes
    plain, huge = second.dht.run_coroutine(_RawProbes(first.peer_id))
    reply = json.loads(plain)
    assert reply["seen"] == "127.0.0.1"
    assert reply["reachable"] == list(second.reach.direct)
    assert huge == b""
