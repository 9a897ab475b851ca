"""Swarm training with real processes on 127.0.0.1: a preparer that serves its run, trainers
that claim jobs, and a takeover after an owner is SIGKILLed."""

import json
import re
import signal
import time

import pytest

from swarm import claims, ledger
from swarm.dht import SwarmConfig, SwarmNode
from swarm.records import fingerprint
from tests.conftest import descendants, kill_tree, left_behind, node, spawn, wait_for

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
HEARTBEAT = 2.0
LEASE = 3 * HEARTBEAT


def _spawn(args, log):
    return spawn([*args, "--host-maddrs", LOOPBACK], log)


def _start_swarm(tmp_path, procs, nodes, extra=()):
    prep_log = tmp_path / "prep.log"
    procs.append(
        _spawn(
            ["--role", "prepare", "--serve", "--workdir", str(tmp_path / "prep"), "--limit", "160", "--clusters", "2"]
            + list(extra),
            prep_log,
        )
    )

    def ready():
        text = prep_log.read_text()
        return text if "--initial-peers" in text else None

    text = wait_for(ready, 180, "the preparer")
    peers = text.split("--initial-peers", 1)[1].split("\n")[0].split()
    observer = SwarmNode(SwarmConfig(str(tmp_path / "observer"), initial_peers=peers, host_maddrs=[LOOPBACK]))
    nodes.append(observer)
    return peers, observer


@pytest.fixture
def swarm_factory(tmp_path):
    """Starts a preparer serving a 2-cluster run (extra flags: e.g. step targets) and an observer."""
    procs, nodes = [], []
    try:
        yield lambda extra=(): (tmp_path, *_start_swarm(tmp_path, procs, nodes, extra), procs)
    finally:
        for n in nodes:
            n.shutdown()
        for p in procs:
            kill_tree(p)


@pytest.fixture
def swarm(swarm_factory):
    return swarm_factory()


def _peer_of(log):
    m = re.search(r"trainer (\w+) joined the swarm", log.read_text())
    return m.group(1) if m else None


def test_one_owner_per_job_and_takeover_after_sigkill(swarm):
    tmp, peers, observer, procs = swarm
    logs = [tmp / f"t{i}.log" for i in range(4)]
    trainers = []
    for i, log in enumerate(logs):
        trainers.append(
            _spawn(
                [
                    "--role",
                    "trainer",
                    "--workdir",
                    str(tmp / f"t{i}"),
                    "--initial-peers",
                    *peers,
                    "--heartbeat",
                    str(HEARTBEAT),
                    "--batch-size",
                    "8",
                    "--ckpt-every",
                    "10",
                    "--minutes",
                    "10",
                ],
                log,
            )
        )
    procs.extend(trainers)
    run = wait_for(observer.run, 60, "the run record")
    jobs = run.jobs()  # expert_0, expert_1, router

    def settled():
        snap = observer.snapshot(run)
        own = claims.owners(snap)
        return (snap, own) if all(own.values()) else None

    wait_for(settled, 240, "an owner for every job", step=1.0)
    time.sleep(2 * HEARTBEAT)  # losers have withdrawn by now
    for _ in range(3):  # and it stays that way: one live claim per job, three different owners
        snap, own = settled()
        assert all(len(snap.live_claims(j)) == 1 for j in jobs), {j: len(snap.live_claims(j)) for j in jobs}
        assert len(set(own.values())) == len(jobs)
        time.sleep(HEARTBEAT)
    peer_of = {_peer_of(log): (proc, log) for proc, log in zip(trainers, logs, strict=True)}
    owner_peers = {snap.live_claims(j)[own[j]].peer for j in jobs}
    idle = [p for p in peer_of if p not in owner_peers]
    assert len(idle) == 1 and "no free job" in peer_of[idle[0]][1].read_text()

    # The status role sees the same thing: every job's owner, and the idle trainer.
    status = node(
        "--role",
        "status",
        "--json",
        "--workdir",
        str(tmp / "status"),
        "--initial-peers",
        *peers,
        "--host-maddrs",
        LOOPBACK,
        timeout=120,
    )
    (data,) = json.loads(status.stdout)["runs"]
    assert {j["job"]: j["owner"] for j in data["jobs"]} == {j: snap.live_claims(j)[own[j]].peer for j in jobs}
    assert any(p["peer"] == idle[0] and p["state"] == "idle" for p in data["peers"]), (idle, data["peers"])

    # Let expert_0's owner publish a checkpoint that someone else holds, then SIGKILL it.
    victim_peer = snap.live_claims("expert_0")[own["expert_0"]].peer

    def mirrored():
        rec = claims.latest_checkpoint(observer.snapshot(run), "expert_0")
        from swarm.blobs import providers

        return rec if rec and set(providers(observer, rec.sha256)) - {victim_peer} else None

    wait_for(mirrored, 120, "a mirrored checkpoint of expert_0", step=1.0)
    victim, _ = peer_of[victim_peer]
    kill_tree(victim)  # the machine dies: the trainer, its DHT process and its p2p daemon
    killed_at = time.time()
    last = claims.latest_checkpoint(observer.snapshot(run), "expert_0")

    def new_owner():
        snap = observer.snapshot(run)
        w = claims.winner(snap, "expert_0")
        return (w, snap.live_claims("expert_0")[w].peer) if w and w != own["expert_0"] else None

    successor_key, successor = wait_for(new_owner, 60, "a new owner of expert_0", step=0.5)
    took = time.time() - killed_at
    assert took <= 2 * LEASE + HEARTBEAT, f"takeover took {took:.1f}s"
    assert successor == idle[0]
    log = peer_of[successor][1]
    wait_for(
        lambda: f"resumed from step {last.step}" in log.read_text(), 120, f"resume from step {last.step}", logs=(log,)
    )

    def published_past():
        # The record latest_checkpoint picks may be a mirror's copy (same hash, the mirror as its
        # provider), so who holds it is read from the live provider records.
        snap = observer.snapshot(run)
        rec = claims.latest_checkpoint(snap, "expert_0")
        return rec if rec and rec.step > last.step and successor in snap.providers.get(rec.sha256, ()) else None

    # Ten steps of the tiny expert beside three other trainers and a verifier take about a minute
    # on 2 cores; the deadline leaves room for a slower machine.
    wait_for(published_past, 300, "a checkpoint past the resumed step", step=1.0, logs=(log, tmp / "prep.log"))
    _check_ledger(tmp, peers, observer, run, {fingerprint(own["expert_0"]), fingerprint(successor_key)})

    # A clean shutdown releases the claim at once rather than letting it expire.
    proc = peer_of[successor][0]
    helpers = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)  # the main process only: it must shut its own children down
    proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert not left_behind(helpers), "a cleanly stopped trainer left processes behind"
    snap = observer.snapshot(run)
    assert claims.winner(snap, "expert_0") is None, "the claim outlived a clean shutdown"
    assert "released expert_0" in log.read_text()


def _check_ledger(tmp, peers, observer, run, trainers: set[str]) -> None:
    """The preparer's ledger credits both trainers of expert_0, the one killed and the one that took
    over, and every key exactly the steps its accepted checkpoints added (counted here on the file
    the preparer wrote); ``--role status --ledger --json`` fetched that file from the preparer, found
    it agrees with the verdicts it read, and shows the same totals."""

    def file_entries():
        files = list((tmp / "prep" / "ledger").glob("*.jsonl"))
        entries = ledger.parse(files[0].read_bytes(), run) if files else []
        keys = {e.key for e in entries if e.job == "expert_0"}
        return entries if trainers <= keys else None

    wait_for(file_entries, 120, "both trainers of expert_0 in the ledger", logs=(tmp / "prep.log",))
    seen = ledger.from_snapshot(observer.snapshot(run))  # what the verdict records show now
    status = node("--role", "status", "--ledger", "--json", "--workdir", str(tmp / "ledger-status"),
                  "--initial-peers", *peers, "--host-maddrs", LOOPBACK, timeout=120)  # fmt: skip
    (shown,) = json.loads(status.stdout)["runs"]
    book = shown["ledger"]
    assert book["digest"] and book["checked"], book["problems"]
    entries = [ledger.Entry(**e) for e in book["checkpoints"]]
    expected: dict[str, int] = {}
    for job in run.jobs():
        done = 0
        for e in sorted((e for e in entries if e.job == job), key=lambda e: (e.step, e.t)):
            if e.step > done:
                expected[e.key] = expected.get(e.key, 0) + e.step - done
                done = e.step
    got = {c["key"]: c["steps"] for c in book["contributors"]}
    assert got == expected and trainers <= set(got), (got, expected)
    assert book["total_steps"] == sum(expected.values())
    # The status node showed everything the file and the verdict records held before it looked.
    assert {e.ident for e in seen} <= {e.ident for e in entries}


def test_trainers_move_on_at_the_run_target_and_a_client_samples_from_the_swarm(swarm_factory):
    tmp, peers, observer, procs = swarm_factory(["--expert-steps", "12", "--router-steps", "8"])
    for i in range(2):
        procs.append(
            _spawn(
                ["--role", "trainer", "--workdir", str(tmp / f"t{i}"), "--initial-peers", *peers]
                + ["--heartbeat", str(HEARTBEAT), "--batch-size", "8", "--ckpt-every", "5"],
                tmp / f"t{i}.log",
            )
        )
    run = wait_for(observer.run, 60, "the run record")
    assert (run.expert_steps, run.router_steps) == (12, 8)
    # status --until-done returns once every job (2 experts + router, 2 trainers) is at its target.
    node(
        "--role",
        "status",
        "--until-done",
        "--workdir",
        str(tmp / "status"),
        "--initial-peers",
        *peers,
        "--host-maddrs",
        LOOPBACK,
        timeout=400,
    )
    snap = observer.snapshot(run)
    assert claims.run_complete(snap)
    assert {j: claims.latest_checkpoint(snap, j).step for j in run.jobs()} == {
        "expert_0": 12,
        "expert_1": 12,
        "router": 8,
    }
    for i in range(2):  # nobody trains past the target; both say so once everything is done
        wait_for(lambda i=i: "run complete" in (tmp / f"t{i}.log").read_text(), 60, f"trainer {i} to see it")
    # With no server up, a client can fetch router + experts (hash-verified) and run them itself.
    out = tmp / "apple.png"
    result = node(
        "--role",
        "client",
        "red apple",
        "--workdir",
        str(tmp / "client"),
        "--initial-peers",
        *peers,
        "--host-maddrs",
        LOOPBACK,
        "--steps",
        "4",
        "--output",
        str(out),
        "--local-experts",
        "all",
        timeout=300,
    )
    assert out.is_file() and out.stat().st_size > 0, result.stderr
    fetched = sorted(p.parent.name for p in (tmp / "client" / "fetched").glob("*/step_*"))
    assert fetched == ["expert_0", "expert_1", "router"]
