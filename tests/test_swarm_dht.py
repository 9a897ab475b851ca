"""Real hivemind peers on 127.0.0.1: signed records, schema validation, persistent identity,
and a clear error for unreachable peers."""

import functools
import signal
import time

import pytest
from hivemind.utils import ValueWithExpiration, get_dht_time

from swarm.claims import winner
from swarm.dht import SwarmConfig, SwarmError, SwarmNode
from swarm.records import ClaimRecord, RunRecord, RunRef, claim_key, encode, fingerprint, in_run, run_key
from tests.conftest import descendants, kill_tree, left_behind, node, spawn

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
RUN = RunRecord("a" * 64, 2, ["tiny", "tiny"], ["fm", "ddpm"], 100)


@pytest.fixture
def two_nodes(tmp_path):
    a = SwarmNode(SwarmConfig(str(tmp_path / "a"), host_maddrs=LOOPBACK, own_run="default"))
    b = None
    try:
        b = SwarmNode(SwarmConfig(str(tmp_path / "b"), initial_peers=a.maddrs(), host_maddrs=LOOPBACK, run=str(a.ref)))
        yield a, b
    finally:
        for n in (b, a):
            if n is not None:
                n.shutdown()


def test_records_are_owned_and_validated(two_nodes):
    a, b = two_nodes
    assert a.store(run_key(), RUN, ttl=60)
    claim = ClaimRecord(RUN.manifest_sha256, a.peer_id, 1.0)
    assert a.store(claim_key("expert_0"), claim, ttl=60)
    assert b.run() == RUN
    assert b.read(claim_key("expert_0"), ClaimRecord) == {a.owner: claim}

    # b forges a record under a's owner subkey: its own validator refuses to sign for a's key,
    # and the record a wrote stays what a wrote.
    forged = encode(ClaimRecord(RUN.manifest_sha256, b.peer_id, 0.0))
    assert not b.dht.store(claim_key("expert_0"), forged, get_dht_time() + 60, subkey=a.owner)
    assert a.read(claim_key("expert_0"), ClaimRecord) == {a.owner: claim}

    # a value that breaks the schema is refused even under one's own key (keys live in the run's
    # namespace, whose schema every node following the run checks)
    key = in_run(claim_key("expert_0"), a.ref)
    assert not b.dht.store(key, {"run": "nope"}, get_dht_time() + 60, subkey=b.owner)
    assert set(a.read(claim_key("expert_0"), ClaimRecord)) == {a.owner}
    # and one that got in anyway (a node that does not follow the run stored it) is dropped when
    # read, its signer banned here for a while
    found = a.get(claim_key("expert_0"))
    bad = ValueWithExpiration(
        {b.owner: ValueWithExpiration({"run": "nope"}, found.expiration_time)}, found.expiration_time
    )
    a.get = lambda _key: bad
    assert a.read(claim_key("expert_0"), ClaimRecord) == {}
    assert a.bans.banned(fingerprint(b.owner)) and not a.bans.banned(fingerprint(a.owner))
    del a.get

    # withdrawing makes the claim vanish
    assert a.withdraw_claim("expert_0", claim)
    snap = b.snapshot(RUN)
    assert winner(snap, "expert_0") is None and not snap.live_claims("expert_0")


def _start_bootstrap(identity, port_maddr="/ip4/127.0.0.1/tcp/0"):
    log = identity.parent / f"{identity.name}-{time.time_ns()}.log"
    proc = spawn(["--role", "bootstrap", "--identity", str(identity), "--host-maddrs", port_maddr], log)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        lines = log.read_text().splitlines()
        peer = next((ln.split()[2] for ln in lines if ln.startswith("bootstrap peer ")), None)
        maddrs = next((ln.split()[1:] for ln in lines if ln.strip().startswith("--initial-peers")), None)
        if peer and maddrs:
            return proc, peer, maddrs
        time.sleep(0.3)
    kill_tree(proc)
    raise AssertionError(f"bootstrap did not start: {log.read_text()[-2000:]}")


def _stop(proc):
    """SIGTERM to the main process: a clean shutdown must take its DHT and p2p daemon with it."""
    helpers = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0
        assert not left_behind(helpers), "a stopped bootstrap peer left processes behind"
    finally:
        kill_tree(proc)


def test_restarted_bootstrap_keeps_its_peer_id_and_peers_reconnect(tmp_path):
    proc, peer_id, maddrs = _start_bootstrap(tmp_path / "boot")
    try:
        port = maddrs[0].split("/tcp/")[1].split("/")[0]
    finally:
        _stop(proc)
    proc, again, maddrs2 = _start_bootstrap(tmp_path / "boot", f"/ip4/127.0.0.1/tcp/{port}")
    try:
        assert again == peer_id and maddrs2 == maddrs
        joined = SwarmNode(
            SwarmConfig(str(tmp_path / "t"), initial_peers=maddrs2, host_maddrs=LOOPBACK, own_run="default")
        )
        try:
            assert joined.store(run_key(), RUN, ttl=30) and joined.run() == RUN
        finally:
            joined.shutdown()
    finally:
        _stop(proc)


def test_unreachable_initial_peers_fail_with_one_line_in_bounded_time(tmp_path):
    bad = "/ip4/127.0.0.1/tcp/9/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    t0 = time.time()
    proc = node(
        "--role",
        "bootstrap",
        "--identity",
        str(tmp_path / "x"),
        "--initial-peers",
        bad,
        "--host-maddrs",
        LOOPBACK[0],
        "--join-timeout",
        "8",
        check=False,
        timeout=120,
    )
    assert time.time() - t0 < 90
    assert proc.returncode != 0
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("error: could not join the swarm"), proc.stderr[-2000:]
    with pytest.raises(SwarmError):
        SwarmNode(SwarmConfig(str(tmp_path / "y"), initial_peers=[bad], host_maddrs=LOOPBACK, join_timeout=8))


def test_a_node_whose_initial_peer_comes_up_late_joins_it(tmp_path, capfd):
    """hivemind pings the initial peers once; an initial peer that is not up yet (restarting here; a
    lossy link that drops the first packets does the same) is asked again until join_timeout."""
    import threading

    proc, _, maddrs = _start_bootstrap(tmp_path / "boot")
    port = maddrs[0].split("/tcp/")[1].split("/")[0]
    _stop(proc)  # its address and peer id are known; nothing listens there now
    joined: list = []
    cfg = SwarmConfig(str(tmp_path / "t"), maddrs, LOOPBACK, join_timeout=60, own_run="default")
    joiner = threading.Thread(target=lambda: joined.append(SwarmNode(cfg)), daemon=True)
    joiner.start()
    proc = None
    try:
        time.sleep(4)
        proc, _, _ = _start_bootstrap(tmp_path / "boot", f"/ip4/127.0.0.1/tcp/{port}")
        joiner.join(timeout=90)
        assert joined, "the node did not join once its initial peer was up"
        assert "no initial peer answered yet" in capfd.readouterr().err
        assert joined[0].store(run_key(), RUN, ttl=30) and joined[0].run() == RUN
    finally:
        for n in joined:
            n.shutdown()
        if proc is not None:
            _stop(proc)


def test_simultaneous_claims_by_six_peers_never_give_two_owners(tmp_path):
    """6 real peers race for 3 expert jobs (no router job in this run record: K=3 and the router
    is claimed last), repeatedly. After one settle period each job has exactly one node that
    believes it owns it, and the swarm agrees."""
    import threading

    from roles.trainer import try_claim
    from swarm.claims import owners

    first = SwarmNode(SwarmConfig(str(tmp_path / "n0"), host_maddrs=LOOPBACK))
    nodes = [first]
    try:
        for i in range(1, 6):
            nodes.append(
                SwarmNode(SwarmConfig(str(tmp_path / f"n{i}"), initial_peers=first.maddrs(), host_maddrs=LOOPBACK))
            )
        for n in nodes:
            n.follow(RunRef("race", first.fingerprint))
        for trial in range(3):
            run = RunRecord(f"{trial + 1:x}" * 64, 3, ["tiny"] * 3, ["fm"] * 3, 10)
            results: dict[int, tuple | None] = {}
            barrier = threading.Barrier(len(nodes))

            def racer(i: int, run=run, results=results, barrier=barrier) -> None:
                barrier.wait()
                results[i] = try_claim(nodes[i], run, None, ttl_s=30, settle_s=1.5)

            threads = [threading.Thread(target=racer, args=(i,)) for i in range(len(nodes))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            won = [r[0] for r in results.values() if r]
            assert won and len(won) == len(set(won)), f"trial {trial}: two nodes won the same job: {won}"
            snap = first.snapshot(run)
            agreed = owners(snap)
            for i, r in results.items():
                if r:
                    assert agreed[r[0]] == nodes[i].owner
            # nobody who lost still holds a live claim
            live = sum(len(snap.live_claims(j)) for j in run.jobs())
            assert live == len(won)
    finally:
        for n in reversed(nodes):
            n.shutdown()


def test_a_stopping_trainer_waits_for_replicas_but_not_for_a_refused_checkpoint(two_nodes, tmp_path):
    """A trainer leaving its job waits until a mirror holds its last checkpoint (mirrors hold only
    accepted ones), and gives up at once when a trusted verifier refused that checkpoint."""
    from data.checkpoint import Checkpoint
    from roles.trainer import SwarmTrainer, SwarmTrainerConfig
    from swarm.records import PeerRecord, Verdict, peers_key

    owner, b = two_nodes
    run = RunRecord("a" * 64, 2, ["tiny", "tiny"], ["fm", "fm"], 100, name=owner.ref.name)
    assert owner.store(run_key(), run, ttl=60)
    assert owner.store(peers_key(), PeerRecord(owner.peer_id, "preparer", "mirroring"), 60)
    trainer = SwarmTrainer(b, SwarmTrainerConfig(str(tmp_path / "t"), replica_timeout_s=6.0))
    try:
        ckpt = Checkpoint(tmp_path, {"step": 40}, "d" * 64)
        start = time.monotonic()
        assert trainer.await_replicas("expert_0", ckpt, run) == 1  # nobody mirrors it: the timeout
        assert time.monotonic() - start >= 6.0
        no = Verdict(ckpt.sha256, 40, fingerprint(b.owner), False, get_dht_time(), 9.0, "held-out loss 9.0")
        owner.publish_verdict("expert_0", run, no)
        trainer.cfg.replica_timeout_s = 120.0
        start = time.monotonic()
        assert trainer.await_replicas("expert_0", ckpt, run) == 1
        assert time.monotonic() - start < 30.0, "it waited for a checkpoint no mirror will hold"
    finally:
        trainer.stop.set()
        trainer.blobs.shutdown()


async def _forget(_dht, node, peers):
    """Drop ``peers`` (every peer, when None) from this node's routing table: what a flood that made
    peers time out on each other, or a cut network, leaves behind."""
    table = node.protocol.routing_table
    for uid, pid in list(table.uid_to_peer_id.items()):
        if peers is None or str(pid) in peers:
            del table[uid]
    return len(table.uid_to_peer_id)


def test_a_node_cut_off_from_the_swarm_rejoins_by_itself(tmp_path):
    """b's routing table is emptied, and the others forget b: nobody would ever contact it again.
    Within a few of its checks it re-joins through its initial peer and reads what was written
    while it was cut off."""
    a = SwarmNode(SwarmConfig(str(tmp_path / "a"), host_maddrs=LOOPBACK, own_run="default"))
    nodes = [a]
    try:
        b = SwarmNode(
            SwarmConfig(str(tmp_path / "b"), initial_peers=a.maddrs(), host_maddrs=LOOPBACK, run=str(a.ref), rejoin_s=1)
        )
        nodes.append(b)
        c = SwarmNode(SwarmConfig(str(tmp_path / "c"), initial_peers=a.maddrs(), host_maddrs=LOOPBACK, run=str(a.ref)))
        nodes.append(c)
        assert a.store(run_key(), RUN, ttl=120)
        assert b.run() == RUN
        time.sleep(3)  # b's watch has seen its peers
        before = b.rejoins
        for n in (a, c):
            n.dht.run_coroutine(functools.partial(_forget, peers={b.peer_id}))
        assert b.dht.run_coroutine(functools.partial(_forget, peers=None)) == 0
        claim = ClaimRecord(RUN.manifest_sha256, c.peer_id, 5.0)
        assert c.store(claim_key("expert_1"), claim, ttl=120)
        deadline = time.time() + 60
        while time.time() < deadline and not b.read(claim_key("expert_1"), ClaimRecord):
            time.sleep(1)
        assert b.rejoins > before
        assert b.read(claim_key("expert_1"), ClaimRecord) == {c.owner: claim}
    finally:
        for n in reversed(nodes):
            n.shutdown()
