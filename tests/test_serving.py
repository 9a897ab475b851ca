"""Serving experts over P2P with real processes on 127.0.0.1: a preparer publishing a small
trained run, expert servers, and clients that route every step to them."""

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from swarm.blobs import BlobService, BlobStore
from swarm.protocol import PROTOCOL, DenoiseRequest, encode_request, parse_reply, read_frame
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


class Swarm:
    def __init__(self, tmp, peers, observer, procs):
        self.tmp, self.peers, self.observer, self.procs = tmp, peers, observer, procs
        self.servers: dict[str, tuple] = {}
        # One blob service for the observer's whole life: the p2p daemon keeps routing a protocol to
        # the first handler registered for it, so a second service after a shutdown would not serve.
        self.blobs = BlobService(observer.dht, BlobStore())

    def server(self, name: str, experts: str, *extra: str):
        log = self.tmp / f"{name}.log"
        proc = spawn(
            ["--role", "server", "--expert", experts, "--workdir", str(self.tmp / name), "--initial-peers"]
            + [*self.peers, "--host-maddrs", LOOPBACK, *extra],
            log,
        )
        self.procs.append(proc)
        text = wait_in_log(proc, log, "serving expert", 180, f"server {name}")
        peer = text.split("server ", 1)[1].split()[0]
        self.servers[name] = (proc, log, peer)
        return peer

    def background_client(self, name: str, prompts: list[str], steps: int, *extra: str):
        """A client generating with the full ensemble in the background; returns (process, png, log)."""
        out, log = self.tmp / f"{name}.png", self.tmp / f"{name}.log"
        proc = spawn(
            ["--role", "client", *prompts, "--workdir", str(self.tmp / "client"), "--initial-peers", *self.peers]
            + ["--host-maddrs", LOOPBACK, "--steps", str(steps), "--mode", "full", "--output", str(out), *extra],
            log,
        )
        return proc, out, log

    def client(self, out, *extra: str, check=True, timeout=300):
        return node(
            "--role", "client", "--workdir", str(self.tmp / "client"), "--initial-peers", *self.peers,
            "--host-maddrs", LOOPBACK, "--output", str(out), *extra, timeout=timeout, check=check,
        )  # fmt: skip


@pytest.fixture(scope="module")
def swarm(small_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    procs, observer = [], None
    try:
        peers, observer, _, _ = start_serving_preparer(small_run, tmp, procs)
        yield Swarm(tmp, peers, observer, procs)
    finally:
        if observer is not None:
            observer.shutdown()  # its blob service goes with the DHT
        for p in procs:
            kill_tree(p)


def _pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_no_server_for_any_expert_is_one_clear_line(swarm):
    result = swarm.client(swarm.tmp / "none.png", "red apple", "--server-timeout", "2", check=False, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: no server is up for any expert"), result.stderr[-500:]
    assert "Traceback" not in result.stderr


def test_two_servers_route_every_step_and_match_local_experts(swarm):
    p0 = swarm.server("s0", "0", "--max-batch", "4")
    p1 = swarm.server("s1", "1")
    run = swarm.observer.run()
    wait_for(lambda: len(swarm.observer.servers(run, [0, 1])) == 2, 60, "both serve records")
    prompts, steps = ["red apple", "rocket"], "8"
    remote = swarm.client(swarm.tmp / "remote.png", *prompts, "--steps", steps, "--k", "1")
    assert "Traceback" not in remote.stderr
    routing = json.loads((swarm.tmp / "remote.json").read_text())
    # Every step went to the expert the router chose, on that expert's server.
    server_of = {"0": p0, "1": p1}
    assert len(routing["where"]) == 8
    for experts, where in zip(routing["per_step"], routing["where"], strict=True):
        assert sorted(int(k) for k in where) == experts
        assert all(server_of[k] == peer for k, peer in where.items())
    # The same seed with every expert in this process: same routing, same image.
    local = swarm.client(swarm.tmp / "local.png", *prompts, "--steps", steps, "--k", "1", "--local-experts", "all")
    assert "Traceback" not in local.stderr
    local_routing = json.loads((swarm.tmp / "local.json").read_text())
    assert local_routing["per_step"] == routing["per_step"]
    assert all(set(w.values()) == {"local"} for w in local_routing["where"])
    assert np.abs(_pixels(swarm.tmp / "remote.png") - _pixels(swarm.tmp / "local.png")).max() <= 2


def test_the_python_pipeline_samples_through_the_swarm(swarm, small_run):
    """DiffswarmPipeline.from_swarm: the router fetched and run here, every step on the servers of
    the test above, the same images as the same set held locally."""
    from diffswarm import DiffswarmPipeline

    servers = {"0": swarm.servers["s0"][2], "1": swarm.servers["s1"][2]}
    with DiffswarmPipeline.from_swarm(
        swarm.peers, cache_dir=swarm.tmp / "python", host_maddrs=[LOOPBACK], wait_s=30
    ) as pipe:
        out = pipe(["red apple", "rocket"], mode="top1", steps=6, seed=4)
        assert pipe.served_by == {0: "1 server(s)", 1: "1 server(s)"}
    assert len(out.routing) == 6
    for step in out.routing:
        assert all(e["served_by"] == servers[str(k)] and e["path"] == "direct" for k, e in step["experts"].items())
    assert out.audit is not None and out.audit["caught"] == []  # honest servers, audited
    here = DiffswarmPipeline.from_checkpoints(small_run / "checkpoints")(
        ["red apple", "rocket"], mode="top1", steps=6, seed=4
    )
    for a, b in zip(out.images, here.images, strict=True):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 2


def test_concurrent_clients_are_batched_and_refusals_keep_the_stream(swarm):
    if "s0" not in swarm.servers:
        swarm.server("s0", "0", "--max-batch", "4")
    run = swarm.observer.run()
    rec = wait_for(lambda: swarm.observer.servers(run, [0]).get(0), 60, "expert 0's server")[0]
    c, h, w = rec.shape
    blobs = swarm.blobs

    def request(b=1, shape=None, nan=False, ckpt=None, rid=0):
        x = torch.randn(b, *(shape or (c, h, w)))
        if nan:
            x[0, 0, 0, 0] = float("nan")
        states, mask = torch.randn(2 * b, 8, rec.text_dim), torch.ones(2 * b, 8)
        req = DenoiseRequest(rid, 0, ckpt or rec.ckpt, x, torch.full((b,), 0.5), 0.4, states, mask, 3.0)
        return encode_request(req)

    # Concurrent clients are batched together by the server: every one is answered.
    async def one_client(i: int):
        from hivemind.p2p import PeerID

        _, reader, writer = await blobs.p2p.call_binary_stream_handler(PeerID.from_base58(rec.peer), PROTOCOL)
        try:
            out = []
            for r in range(5):
                writer.write(request(b=1 + i % 2, rid=100 * i + r))
                await writer.drain()
                out.append(await asyncio.wait_for(read_frame(reader, 1 << 24), 60))
            return out
        finally:
            writer.close()

    async def many():
        return await asyncio.gather(*(one_client(i) for i in range(6)))

    for i, answers in enumerate(blobs.call(many(), timeout=180)):
        assert [h["id"] for h, _ in answers] == [100 * i + r for r in range(5)]
        assert all(h["ok"] for h, _ in answers), [h.get("error") for h, _ in answers]
    # Requests an honest client may send (over the limit, an older checkpoint) are refused with a
    # reason and the stream goes on; malformed ones get their sender banned (tests/test_adversarial.py).
    replies = stream_session(
        blobs,
        rec.peer,
        [
            request(b=rec.max_batch + 1, rid=3),  # over the batch limit
            request(ckpt="0" * 64, rid=4),  # a checkpoint the server does not serve
            request(b=2, rid=6),  # and then a valid one, on the same stream
        ],
    )
    errors = [h.get("error", "") for h, _ in replies[:2]]
    assert [h["id"] for h, _ in replies] == [3, 4, 6]
    assert all(h["ok"] is False for h, _ in replies[:2]), errors
    assert "over this server's limit" in errors[0] and "served from checkpoint" in errors[1]
    header, payload = replies[2]
    v = parse_reply(header, payload, (2, c, h, w))
    assert torch.isfinite(v).all()


def _kill_when_connected(swarm, names):
    """Kill the first server of ``names`` that a client opens a new session with from now on."""
    before = {n: swarm.servers[n][1].read_text().count("session from") for n in names}

    def connected():
        return next((n for n in names if swarm.servers[n][1].read_text().count("session from") > before[n]), None)

    name = wait_for(connected, 120, "a client session", step=0.05)
    kill_tree(swarm.servers[name][0])  # the machine dies: server, DHT process and p2p daemon
    return name


def test_killed_server_with_a_replica_fails_over_and_the_image_completes(swarm):
    for name, expert in (("s0", "0"), ("s1", "1"), ("s0b", "0")):
        if name not in swarm.servers:
            swarm.server(name, expert)
    run = swarm.observer.run()
    wait_for(lambda: len(swarm.observer.servers(run, [0]).get(0, [])) == 2, 60, "two servers of expert 0")
    client, out, log = swarm.background_client("failover", ["red apple", "rocket"], 400)
    try:
        killed = _kill_when_connected(swarm, ["s0", "s0b"])
        assert client.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(client)
    routing = json.loads(out.with_suffix(".json").read_text())
    dead, alive = swarm.servers[killed][2], swarm.servers["s0b" if killed == "s0" else "s0"][2]
    served_0 = [w["0"] for w in routing["where"] if "0" in w]
    assert len(served_0) == 400 and served_0[-1] == alive  # expert 0 served every step, the replica at the end
    assert routing["failovers"] and dead[:12] in routing["failovers"][0]
    assert not routing["reroutes"]


def test_killed_server_without_a_replica_reroutes_and_the_image_completes(swarm):
    for name, expert in (("s0b", "0"), ("s1", "1")):
        if name not in swarm.servers or swarm.servers[name][0].poll() is not None:
            swarm.server(name, expert)
    # A short wait for expert 1's server to come back before its step is rerouted (default 30 s).
    client, out, log = swarm.background_client("reroute", ["red apple"], 400, "--server-timeout", "3")
    try:
        _kill_when_connected(swarm, ["s1"])
        assert client.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(client)
    routing = json.loads(out.with_suffix(".json").read_text())
    assert [r["expert"] for r in routing["reroutes"]] == [1]
    step = routing["reroutes"][0]["step"]
    assert all(sorted(w) == ["0"] for w in routing["where"][step:])  # expert 0 alone after the reroute
    assert "rerouted at step" in log.read_text()


def test_follow_loads_a_newer_checkpoint_without_dropping_a_generation_in_flight(swarm):
    from data.checkpoint import latest_checkpoint
    from swarm.mirror import publish_checkpoint

    if not any(n in swarm.servers and swarm.servers[n][0].poll() is None for n in ("s0", "s0b")):
        swarm.server("s0", "0")  # expert 0 too, so the full ensemble has both
    follower = swarm.server("sf", "1", "--follow")
    run = swarm.observer.run()
    alive = {peer for proc, _, peer in swarm.servers.values() if proc.poll() is None}

    def only_alive_servers():  # records of servers killed by earlier tests expire within SERVE_TTL_S
        found = swarm.observer.servers(run, [0, 1])
        peers = {r.peer for recs in found.values() for r in recs}
        return follower in peers and peers <= alive and len(found) == 2

    wait_for(only_alive_servers, 90, "only live servers in the DHT")
    # Train expert 1 two more steps in a copy of the run, then publish that checkpoint to the swarm.
    work = swarm.tmp / "more"
    shutil.copytree(swarm.tmp / "run", work, dirs_exist_ok=True)
    node("--role", "trainer", "--local", "--workdir", str(work), "--expert", "1", "--steps", "8", "--batch-size", "16")
    newer = latest_checkpoint(work / "checkpoints" / "expert_1")
    assert newer.step == 8
    client, out, log = swarm.background_client("follow", ["red apple"], 600)
    try:
        sf_log = swarm.servers["sf"][1]
        wait_for(lambda: "session from" in sf_log.read_text(), 120, "the client's session with sf", step=0.05)
        # Published as a trainer would: only while holding the job's claim does a checkpoint add steps.
        from hivemind.utils import get_dht_time

        from swarm import claims
        from swarm.records import ClaimRecord, claim_key

        mine = ClaimRecord(run.manifest_sha256, swarm.observer.peer_id, float(get_dht_time()))
        swarm.observer.store(claim_key("expert_1"), mine, 120)
        wait_for(
            lambda: claims.winner(swarm.observer.snapshot(run, ["expert_1"]), "expert_1") == swarm.observer.owner,
            30,
            "the observer to hold expert_1's claim",
        )
        publish_checkpoint(swarm.observer, swarm.blobs.store, run, "expert_1", newer)
        wait_in_log(swarm.servers["sf"][0], sf_log, "expert 1: serving step 8", 90, "sf")
        assert client.poll() is None, "the generation should still be in flight during the reload"
        assert client.wait(timeout=300) == 0, log.read_text()[-3000:]
        # The new checkpoint is announced, and the status dashboard lists the servers.
        recs = wait_for(
            lambda: [r for r in swarm.observer.servers(run, [1])[1] if r.peer == follower and r.step == 8],
            60,
            "sf's record with step 8",
        )
        assert recs[0].ckpt == newer.sha256
        status = json.loads(
            node(
                "--role",
                "status",
                "--json",
                "--workdir",
                str(swarm.tmp / "status"),
                "--initial-peers",
                *swarm.peers,
                "--host-maddrs",
                LOOPBACK,
            ).stdout  # fmt: skip
        )
        (run,) = status["runs"]
        sf = [s for s in run["servers"] if s["peer"] == follower]
        assert sf and sf[0]["expert"] == 1 and sf[0]["state"] == "online" and sf[0]["step"] == 8
    finally:
        kill_tree(client)
    routing = json.loads(out.with_suffix(".json").read_text())
    # Nothing in flight was dropped: expert 1 served every step from sf, no failover, no reroute.
    assert not routing["failovers"] and not routing["reroutes"]
    assert all(w.get("1") == follower for w in routing["where"])


def test_a_restarted_server_is_found_again_mid_generation(swarm):
    """The only server of expert 1 dies mid-generation and comes back (same identity): the client
    waits for it, and the generation finishes with expert 1 instead of rerouting its steps."""
    for name, expert in (("s0b", "0"), ("s1", "1")):
        if name not in swarm.servers or swarm.servers[name][0].poll() is not None:
            swarm.server(name, expert)
    if "sf" in swarm.servers:  # expert 1's other server, from the test before: s1 must be its only one
        kill_tree(swarm.servers["sf"][0])
    run, s1 = swarm.observer.run(), swarm.servers["s1"][2]
    wait_for(lambda: [r.peer for r in swarm.observer.servers(run, [1]).get(1, [])] == [s1], 60, "s1 alone")
    client, out, log = swarm.background_client("restart", ["red apple"], 400, "--server-timeout", "120")
    try:
        _kill_when_connected(swarm, ["s1"])
        swarm.server("s1", "1")  # restarted with the same workdir, so the same peer id
        assert client.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(client)
    routing = json.loads(out.with_suffix(".json").read_text())
    assert not routing["reroutes"], routing["reroutes"]
    assert any("found again" in e for e in routing["failovers"]), routing["failovers"]
    assert all("1" in w for w in routing["where"])  # expert 1 served every step


def test_client_waits_for_the_routers_checkpoint_while_its_providers_restart(monkeypatch, capsys):
    """With no router checkpoint to be had (its owner killed before a mirror held it), the client
    retries for ``--server-timeout`` rather than failing the image at once, and says so once."""
    import diffswarm.remote as client
    from swarm.dht import SwarmError

    calls = []

    def fetch(node, blobs, run, folder, jobs):
        calls.append(jobs)
        if len(calls) < 3:
            raise SwarmError("the router's checkpoint could not be had: none is published yet")
        return {"router": "ckpt"}

    monkeypatch.setattr(client, "fetch_published", fetch)
    monkeypatch.setattr(client.time, "sleep", lambda s: None)
    assert client._fetch_router(None, None, None, None, ["router"], wait_s=60) == {"router": "ckpt"}
    assert len(calls) == 3
    assert capsys.readouterr().err.count("waiting up to 60s") == 1
    calls.clear()
    with pytest.raises(SwarmError, match="none is published yet"):
        client._fetch_router(None, None, None, None, ["router"], wait_s=0)
    assert len(calls) == 1
