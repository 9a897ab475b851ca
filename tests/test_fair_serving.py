"""Fair serving: the fair queue on its own (caps per peer in images, round-robin between peers,
rows shared within a batch, slices, the quantum's cost model), the request-size bound of the wire
format, and a real adversarial node flooding an expert server while an honest client generates."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from benchmarks.fair_serving import Flooder
from roles.fair_queue import Busy, FairQueue, ForwardCost
from swarm.blobs import BlobService, BlobStore
from swarm.dht import SwarmConfig, SwarmNode
from swarm.protocol import (
    CLIP_TOKENS,
    DenoiseRequest,
    ExpectedInput,
    ProtocolError,
    ServerBusy,
    encode_reply,
    encode_request,
    encoder_tokens,
    frame,
    parse_reply,
    parse_request,
)
from tests.conftest import (
    LOOPBACK,
    kill_tree,
    node,
    spawn,
    start_serving_preparer,
    stream_session,
    wait_for,
    wait_in_log,
)

# ---------------------------------------------------------------- the fair queue on its own


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fq(peer_rows: int = 64, max_requests: int = 64, clock: Clock | None = None) -> FairQueue:
    return FairQueue(peer_rows, max_requests, active_s=2.0, clock=clock or Clock())


def _taken(batch) -> list[tuple[str, int, int]]:
    return [(s.item, s.start, s.stop) for s in batch]


def test_a_peer_over_its_cap_in_images_is_busy_however_many_streams_it_uses():
    q = _fq(peer_rows=64)
    # Eight streams of one peer id count as one peer: two 32-image requests fill its share.
    assert q.put("mallory", "m0", 32, "k") == []
    assert q.put("mallory", "m1", 32, "k") == []
    assert not q.admits("mallory", 1)
    with pytest.raises(Busy, match="64 of your images are waiting"):
        q.put("mallory", "m2", 1, "k")
    # Another peer is not touched by Mallory's load.
    assert q.admits("alice", 1)
    assert q.put("alice", "a0", 1, "k") == []
    assert q.rows("mallory") == 64 and q.rows("alice") == 1 and len(q) == 3
    # A request answered (or timed out) frees its share.
    q.discard("m0")
    assert q.admits("mallory", 32) and q.rows("mallory") == 32


def test_many_small_requests_cannot_fill_the_queue_against_another_peer():
    q = _fq(peer_rows=64, max_requests=8)
    for i in range(8):
        q.put("mallory", f"m{i}", 1, "k")
    # The queue is full, all of it Mallory's: Mallory herself is refused ...
    assert not q.admits("mallory", 1)
    with pytest.raises(Busy, match="8 requests are waiting"):
        q.put("mallory", "m8", 1, "k")
    # ... while Alice's request pushes out Mallory's newest, which is answered busy.
    assert q.admits("alice", 1)
    assert q.put("alice", "a0", 1, "k") == ["m7"]
    assert len(q) == 8 and q.rows("mallory") == 7


def test_the_peer_served_longest_ago_starts_the_next_batch():
    q = _fq()
    for i in range(3):
        q.put("mallory", f"m{i}", 4, "k")
    q.put("alice", "a0", 1, "k")
    # One row per batch: the two peers alternate, whoever queued more.
    order = [q.take(1)[0][0].item for _ in range(5)]
    assert order == ["m0", "a0", "m0", "m0", "m0"]
    # Alice comes back after a while: her request is the next one served, ahead of Mallory's queue.
    q.put("alice", "a1", 1, "k")
    assert _taken(q.take(1)[0]) == [("a1", 0, 1)]


def test_a_batch_shares_its_rows_among_the_waiting_peers():
    q = _fq()
    q.put("mallory", "m0", 32, "k")
    q.put("mallory", "m1", 32, "k")
    q.put("alice", "a0", 1, "k")
    q.put("bob", "b0", 3, "k")
    # 8 rows: Alice and Bob need less than their share, Mallory gets the rest.
    batch = q.take(8)[0]
    assert sorted(_taken(batch)) == [("a0", 0, 1), ("b0", 0, 3), ("m0", 0, 4)]
    assert [s.last for s in sorted(batch, key=lambda s: s.item)] == [True, True, False]
    # Mallory's request is served in slices, each batch as large as allowed, and her second
    # request starts once the first is done.
    slices = [_taken(q.take(16)[0]) for _ in range(3)]
    assert slices == [[("m0", 4, 20)], [("m0", 20, 32), ("m1", 0, 4)], [("m1", 4, 20)]]
    assert q.rows("mallory") == 12


def test_only_requests_for_the_same_checkpoint_share_a_batch():
    q = _fq()
    q.put("alice", "a0", 2, ("expert", 0))
    q.put("bob", "b0", 2, ("expert", 1))
    q.put("alice", "a1", 2, ("expert", 1))
    first = q.take(32)[0]
    assert _taken(first) == [("a0", 0, 2)]
    assert sorted(_taken(q.take(32)[0])) == [("a1", 0, 2), ("b0", 0, 2)]
    assert len(q) == 0 and q.take(32, timeout=0.01) == ([], [])


def test_contended_batches_are_smaller_only_while_several_peers_are_active():
    clock = Clock()
    q = _fq(clock=clock)
    q.put("mallory", "m0", 32, "k")
    q.put("mallory", "m1", 32, "k")
    assert _taken(q.take(32, contended_rows=4)[0]) == [("m0", 0, 32)]  # alone: a full batch
    clock.now = 1.0
    q.put("alice", "a0", 1, "k")
    assert sorted(_taken(q.take(32, contended_rows=4)[0])) == [("a0", 0, 1), ("m1", 0, 3)]
    # Alice is between steps (nothing waiting), but was active a moment ago: batches stay short.
    clock.now = 2.5
    assert _taken(q.take(32, contended_rows=4)[0]) == [("m1", 3, 7)]
    clock.now = 3.5  # Alice has gone quiet for longer than active_s
    assert _taken(q.take(32, contended_rows=4)[0]) == [("m1", 7, 32)]


def test_late_requests_are_dropped_and_handed_back():
    q = _fq()
    q.put("alice", "a0", 1, "k")
    q.put("bob", "b0", 1, "k")
    batch, late = q.take(32, live=lambda item: item != "a0")
    assert late == ["a0"] and _taken(batch) == [("b0", 0, 1)]
    assert len(q) == 0


def test_take_waits_for_a_request_from_another_thread():
    q = _fq()
    threading.Timer(0.1, lambda: q.put("alice", "a0", 1, "k")).start()
    start = time.monotonic()
    batch, _ = q.take(32, timeout=5.0)
    assert _taken(batch) == [("a0", 0, 1)] and time.monotonic() - start < 4.0


def test_forward_cost_fits_the_fixed_and_per_row_cost():
    cpu = ForwardCost()
    assert cpu.rows_within(0.025, 32) == 32  # nothing measured yet
    for rows in (1, 4, 32, 8, 2, 16) * 3:
        cpu.add(rows, 0.003 + 0.005 * rows)  # a CPU: the cost grows with the rows
    a, b = cpu.fit()
    assert a == pytest.approx(0.003, rel=1e-3) and b == pytest.approx(0.005, rel=1e-3)
    assert cpu.rows_within(0.025, 32) == 4
    assert cpu.rows_within(0.001, 32) == 1  # a pass of one row costs little more than a row
    gpu = ForwardCost()
    for rows in (1, 4, 32, 8) * 3:
        gpu.add(rows, 0.060 + 0.0001 * rows)  # a large model on a GPU: a pass costs the same, 1 row or 32
    # One pass is over the budget anyway: never so few rows that a row costs twice its share of a
    # full batch (throughput must not collapse to 1/32).
    assert gpu.rows_within(0.025, 32) == 16
    same = ForwardCost()
    for _ in range(5):
        same.add(32, 0.16)  # only full batches so far: assume the cost is all per row
    assert same.rows_within(0.025, 32) == 5


# ---------------------------------------------------------------- the request-size bound

CKPT = "ab" * 32


def _request(b: int = 1, tokens: int = 16, dim: int = 384) -> DenoiseRequest:
    return DenoiseRequest(
        1, 0, CKPT, torch.randn(b, 3, 16, 16), torch.full((b,), 0.5), 0.4,
        torch.randn(2 * b, tokens, dim), torch.ones(2 * b, tokens), 3.0,
    )  # fmt: skip


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:4], "big")
    return json.loads(raw[4 : 4 + n]), raw[4 + n :]


def test_tokens_beyond_the_encoders_maximum_are_refused_and_bound_the_frame():
    assert encoder_tokens("minilm") == 16 and encoder_tokens("clip:ViT-L-14") == CLIP_TOKENS == 77
    expected = ExpectedInput({0: [CKPT]}, (3, 16, 16), 384, 32, encoder_tokens("minilm"))
    assert parse_request(*_split(encode_request(_request(tokens=16))), expected).states.shape == (2, 16, 384)
    with pytest.raises(ProtocolError, match="17 tokens; its text encoder makes at most 16") as e:
        parse_request(*_split(encode_request(_request(tokens=17))), expected)
    assert not isinstance(e.value, ServerBusy)
    # The largest valid frame is 32 images of 16 tokens; the 32 x 512 frame is far over it.
    biggest = _split(encode_request(_request(b=32, tokens=16)))[0]["nbytes"]
    assert expected.max_payload() == biggest
    assert _split(encode_request(_request(b=32, tokens=512)))[0]["nbytes"] > 20 * biggest


def test_a_busy_reply_is_told_apart_from_a_failure():
    with pytest.raises(ServerBusy, match="busy: 64"):
        parse_reply(*_split(encode_reply(3, error="busy: 64 of your images", busy=True)), (1, 3, 16, 16))
    with pytest.raises(ProtocolError, match="forward failed") as e:
        parse_reply(*_split(encode_reply(3, error="forward failed: oom")), (1, 3, 16, 16))
    assert not isinstance(e.value, ServerBusy)


# ---------------------------------------------------------------- a real adversarial node


class Served:
    """A serving preparer for :func:`small_run`, one server of both experts, an honest observer,
    and strangers' nodes (each with its own key) in the same swarm."""

    def __init__(self, tmp: Path, peers: list[str], observer, procs: list) -> None:
        self.tmp, self.peers, self.observer, self.procs = tmp, peers, observer, procs
        self._strangers: list[tuple[SwarmNode, BlobService]] = []
        log = tmp / "server.log"
        proc = spawn(
            ["--role", "server", "--expert", "0,1", "--workdir", str(tmp / "server"), "--initial-peers", *peers]
            + ["--host-maddrs", LOOPBACK],
            log,
        )
        procs.append(proc)
        text = wait_in_log(proc, log, "serving expert", 180, "the server")
        self.server = text.split("server ", 1)[1].split()[0]
        self.server_log = log
        run = observer.run()

        def both():
            found = observer.servers(run, [0, 1])
            return found if len(found) == 2 else None

        self.rec = wait_for(both, 60, "both experts' serve records")[0][0]
        # The observer's one blob service (the p2p daemon keeps routing a protocol to the first handler).
        self.blobs = BlobService(observer.dht, BlobStore())

    def stranger(self, name: str) -> BlobService:
        node = SwarmNode(SwarmConfig(str(self.tmp / name), initial_peers=self.peers, host_maddrs=[LOOPBACK]))
        self._strangers.append((node, BlobService(node.dht, BlobStore(), bans=node.bans)))
        return self._strangers[-1][1]

    def request(self, b: int, tokens: int) -> bytes:
        c, h, w = self.rec.shape
        x, t = torch.randn(b, c, h, w), torch.full((b,), 0.5)
        states, mask = torch.randn(2 * b, tokens, self.rec.text_dim), torch.ones(2 * b, tokens)
        return encode_request(DenoiseRequest(1, 0, self.rec.ckpt, x, t, 0.4, states, mask, 3.0))

    def close(self) -> None:
        for stranger, blobs in self._strangers:
            blobs.shutdown()
            stranger.shutdown()
        self.blobs.shutdown()


@pytest.fixture(scope="module")
def served(small_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fair")
    procs, observer, swarm = [], None, None
    try:
        peers, observer, _, _ = start_serving_preparer(small_run, tmp, procs)
        swarm = Served(tmp, peers, observer, procs)
        yield swarm
    finally:
        if swarm is not None:
            swarm.close()
        if observer is not None:
            observer.shutdown()
        for p in procs:
            kill_tree(p)


def test_an_honest_client_is_served_while_a_stranger_floods_the_server(served):
    """8 streams of one stranger, each always holding a request of the largest valid size (32
    images of 16 tokens): the stranger gets "busy" replies (and its share of the server), never a
    ban; an honest client's generation meanwhile completes, every step on that server."""
    assert served.rec.max_batch == 32
    flooder = Flooder(served.stranger("flooder"), served.server, served.request(32, 16)).start()
    try:
        wait_for(lambda: flooder.ok >= 1 and flooder.busy >= 1, 90, "the flood to be served and refused")
        out = served.tmp / "honest.png"
        node(
            "--role", "client", "red apple", "--workdir", str(served.tmp / "client"), "--initial-peers",
            *served.peers, "--host-maddrs", LOOPBACK, "--steps", "8", "--mode", "full", "--output", str(out),
            timeout=240,
        )  # fmt: skip
    finally:
        flooder.stop()
    routing = json.loads(out.with_suffix(".json").read_text())
    assert not routing["failovers"] and not routing["reroutes"], routing
    assert len(routing["where"]) == 8
    assert all(set(w.values()) == {served.server} for w in routing["where"])
    # The flood was refused for its load and served its share, never treated as an attack.
    assert flooder.busy > 0 and flooder.ok > 0
    assert flooder.errors == [], flooder.errors[:5]
    assert "malformed" not in served.server_log.read_text()


def test_a_request_with_more_tokens_than_the_encoder_makes_is_refused(served):
    """17 tokens where the run's MiniLM makes 16: refused with the reason (and the sender banned,
    as for any malformed request). The 48 MiB frame of 32 images x 512 tokens is refused from its
    header alone: nothing of its payload is sent here, and the answer comes anyway."""
    mallory = served.stranger("mallory")
    header, _ = stream_session(mallory, served.server, [served.request(1, 17)])[0]
    assert header["ok"] is False and "at most 16" in header["error"], header
    trudy = served.stranger("trudy")
    huge, _ = _split(served.request(32, 512))
    assert huge["nbytes"] > 48 << 20
    header, _ = stream_session(trudy, served.server, [frame(huge, b"")])[0]
    assert header["ok"] is False and "over this server's" in header["error"], header
    # A request of the largest valid size is still answered.
    header, payload = stream_session(served.blobs, served.server, [served.request(32, 16)])[0]
    c, h, w = served.rec.shape
    assert torch.isfinite(parse_reply(header, payload, (32, c, h, w))).all()
