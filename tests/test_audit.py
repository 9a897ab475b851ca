"""Clients check servers: the audit's pure parts (when two answers agree, which steps are audited,
which replica is asked), the pool's audit logic against fake servers (a liar is caught, its step
redone, servers cross-checked when no local copy is held), the tolerance against honest float
differences of a real expert, and a real adversarial node: a stranger announcing the verified
checkpoint's hash and answering a constant velocity, next to an honest server, caught by a client
run whose image equals the honest one."""

from __future__ import annotations

import json
import random
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.adversarial import LyingServer
from data.job_id import JobId
from diffswarm.remote import RemoteConfig, RemotePool
from router.audit import (
    TOLERANCE,
    AuditStats,
    Reference,
    agree,
    disagreement,
    replica_order,
    report_lines,
    should_audit,
    summarize,
)
from router.sampling import ExpertUnavailable
from swarm.bans import Bans
from swarm.records import ServeRecord
from tests.conftest import LOOPBACK, kill_tree, node, spawn, start_serving_preparer, wait_for, wait_in_log

SHAPE = (3, 8, 8)

# ---------------------------------------------------------------------------- pure parts


def test_disagreement_tells_float_noise_from_a_wrong_answer():
    v = torch.randn(4, *SHAPE)
    assert disagreement(v, v) == 0.0
    noisy = v + 1e-5 * torch.randn_like(v)
    assert disagreement(v, noisy) < 1e-4 and agree(v, noisy)
    assert disagreement(v, noisy) == pytest.approx(disagreement(noisy, v))  # symmetric
    assert disagreement(v, torch.full_like(v, 0.5)) > 0.5  # a constant velocity
    assert disagreement(v, torch.zeros_like(v)) == pytest.approx(1.0)
    assert not agree(v, v * 1.5)
    one_wrong = v.clone()
    one_wrong[3] = 0.0  # one image of the batch answered wrong is not diluted by the right ones
    assert disagreement(v, one_wrong) == pytest.approx(1.0)
    assert agree(torch.zeros(2, *SHAPE), torch.zeros(2, *SHAPE))  # no division by zero
    assert disagreement(v, v[:2]) == float("inf")


def test_first_answer_is_always_audited_then_the_rate():
    rng = random.Random(0)
    assert should_audit(rng, 0.25, audited_before=0)
    assert not any(should_audit(rng, 0.0, n) for n in range(50))  # 0: trust servers
    share = sum(should_audit(rng, 0.25, 1) for _ in range(20000)) / 20000
    assert 0.23 < share < 0.27


def test_replica_choice_is_not_won_by_the_peer_id():
    def first_share(replicas, winner, runs=4000):
        return sum(replica_order(random.Random(s), replicas)[0] == winner for s in range(runs)) / runs

    # Equal latency and queue: the peer id that sorts first wins half the time, not always.
    assert 0.45 < first_share([("12D3KooWAAAA", 0.1, 0), ("12D3KooWzzzz", 0.1, 0)], "12D3KooWAAAA") < 0.55
    # Faster and less loaded replicas are asked more often, in proportion to 1 / (latency x (1 + queue)).
    assert 0.8 < first_share([("a", 0.05, 0), ("b", 0.5, 0)], "a") < 0.9
    assert 0.75 < first_share([("a", 0.1, 0), ("b", 0.1, 3)], "a") < 0.85
    # A replica never measured counts as fast as the fastest measured one: it gets tried.
    assert 0.45 < first_share([("new", None, 0), ("old", 0.1, 0)], "new") < 0.55
    # An instant reply earns no unbounded weight (the latency floor).
    assert first_share([("liar", 0.0, 0), ("honest", 0.08, 0)], "liar") < 0.9
    order = replica_order(random.Random(7), [(p, 0.1, 0) for p in "abcde"])
    assert sorted(order) == list("abcde") and order == replica_order(random.Random(7), [(p, 0.1, 0) for p in "abcde"])


def test_summary_reports_cost_catches_and_redone_steps():
    stats = AuditStats(0.25, TOLERANCE, 1, answers=20, audited=6, by_local=6, extra_local=12, extra_remote=2)
    stats.passed(3e-6)
    notes = [
        {"event": "caught", "peer": "liar", "error": 1.9, "checked_by": "the local copy", "served_before": 0}
        | {"unchecked_before": 0, "step": 0, "expert": 0},
        {"event": "redone", "peer": "liar", "by": "honest", "step": 0, "expert": 0},
    ]
    report = summarize(stats, notes, images=2, forwards=40)
    assert report["extra_forwards_per_image"] == 7.0 and report["forwards_per_image"] == 20.0
    assert report["caught"] == [
        {
            "peer": "liar",
            "expert": 0,
            "step": 0,
            "error": 1.9,
            "checked_by": "the local copy",
            "steps_served_before_caught": 0,
            "unchecked_steps_before_caught": 0,
        }
    ]
    assert report["redone"] == [{"step": 0, "expert": 0, "wrong": "liar", "by": "honest"}]
    text = "\n".join(report_lines(report))
    assert "CAUGHT: server liar answered expert 0 wrong at step 1" in text
    assert "7 extra expert forwards per image on top of 20 (+35%)" in text


# ---------------------------------------------------------------------------- the pool against fake servers


def _expert(x, t, states, mask, guidance):
    """A stand-in expert: a deterministic function of the request."""
    return x * 2 + t.reshape(-1, 1, 1, 1) + guidance * states[: len(x)].mean()


def _honest(x, t, states, mask, guidance):
    return _expert(x, t, states, mask, guidance) * (1 + 1e-6)  # another machine's float noise


def _liar(x, t, states, mask, guidance):
    return torch.full_like(x, 0.5)


class FakePool(RemotePool):
    """A :class:`RemotePool` whose servers are functions: the audit logic without a network."""

    def __init__(self, behaviour: dict[str, object], refs: bool = True, fetchable: bool = False, ckpts=None, **cfg):
        self.behaviour, self.asked = behaviour, []
        recs = [_record(p, (ckpts or {}).get(p, "c" * 64)) for p in behaviour]
        ref = Reference("c" * 64, _expert)
        super().__init__(
            None,
            {0: recs},
            RemoteConfig(**{"seed": 0, **cfg}),
            references={0: ref} if refs else None,
            fetch_reference=(lambda k: ref) if fetchable else None,
            bans=Bans(),
        )

    def _ask(self, rec, req):
        self.asked.append(rec.peer)
        return self.behaviour[rec.peer](req.x, req.t, req.states, req.mask, req.guidance)


def _record(peer: str, ckpt: str = "c" * 64) -> ServeRecord:
    return ServeRecord("r" * 64, peer, "online", 0.0, 0, ckpt, 6, "fm", "minilm", 4, list(SHAPE), 8)


def _step(pool: RemotePool, i: int):
    """One step of expert 0 through the pool: (its velocity, the right one, the pool's notes)."""
    g = torch.Generator().manual_seed(i)
    x, states = torch.randn(2, *SHAPE, generator=g), torch.randn(4, 5, 4, generator=g)
    t, mask = torch.full((2,), 1 - i / 100), torch.ones(4, 5)
    v = pool.call(0, x, t, states, mask, 3.0, t_next=0.0)
    return v, _expert(x, t, states, mask, 3.0), pool.take_notes(0)


def _steps(pool: RemotePool, n: int) -> list[dict]:
    """``n`` steps through the pool, each of which must use a right answer; the pool's notes."""
    notes = []
    for i in range(n):
        v, right, got = _step(pool, i)
        assert agree(v, right), f"step {i} used a wrong answer"
        notes += got
    return notes


def test_a_liar_is_caught_at_its_first_answer_and_its_step_redone_on_the_honest_replica():
    pool = FakePool({"liar": _liar, "honest": _honest})
    notes = _steps(pool, 20)
    caught = [n for n in notes if n["event"] == "caught"]
    assert [(c["peer"], c["served_before"], c["checked_by"]) for c in caught] == [("liar", 0, "the local copy")]
    assert [(n["peer"], n["by"]) for n in notes if n["event"] == "redone"] == [("liar", "honest")]
    assert pool.asked.count("liar") == 1  # never asked again this generation
    assert pool.bans.banned("liar") and not pool.bans.banned("honest")  # the node's other roles skip it too
    assert pool.stats.largest_passed < 1e-4 and pool.stats.by_local >= 1 and pool.stats.extra_local >= 2


def test_with_no_replica_left_the_local_copy_redoes_the_step_then_the_expert_is_gone():
    pool = FakePool({"liar": _liar})
    v, right, notes = _step(pool, 0)
    assert agree(v, right) and pool.where[0] == "local"
    assert [(n["event"], n.get("by")) for n in notes] == [("caught", None), ("redone", "local")]
    with pytest.raises(ExpertUnavailable):  # a caught liar is out, like a dead server
        _step(pool, 1)


def test_a_liar_that_waits_is_caught_within_a_few_lies():
    """A liar answering honestly at first (its first answer is always audited) and wrongly from its
    6th answer on: with the default rate a quarter of its lies are checked, so the client takes
    about 3 of them before catching it; every one it took is counted in the summary."""
    lies = []
    for seed in range(200):
        served = [0]

        def patient(*args, served=served):
            served[0] += 1
            return _expert(*args) if served[0] <= 5 else _liar(*args)

        pool = FakePool({"patient": patient}, seed=seed)
        notes = []
        for i in range(200):
            try:
                notes += _step(pool, i)[2]
            except ExpertUnavailable:
                break
        caught = [n for n in notes if n["event"] == "caught"]
        assert caught and caught[0]["served_before"] >= 5
        lies.append(caught[0]["served_before"] - 5)  # wrong answers taken before the one that caught it
    assert 2 < statistics.mean(lies) < 4.5  # geometric: (1 - 0.25) / 0.25 = 3
    assert max(lies) < 40


def test_without_a_local_copy_two_servers_are_compared_and_a_third_decides():
    pool = FakePool({"a": _honest, "b": _honest, "liar": _liar}, refs=False, audit_rate=1.0)
    notes = _steps(pool, 12)
    caught = [n for n in notes if n["event"] == "caught"]
    assert [c["peer"] for c in caught] == ["liar"] and caught[0]["checked_by"].startswith("servers ")
    assert pool.stats.by_servers >= 1 and pool.stats.extra_remote >= 2 and pool.stats.by_local == 0


def test_two_servers_disagreeing_with_no_referee_drop_the_expert_or_the_local_copy_settles_it():
    pool = FakePool({"a": _honest, "liar": _liar}, refs=False)
    with pytest.raises(ExpertUnavailable, match="disagree"):
        _step(pool, 0)
    assert [n["event"] for n in pool.take_notes(0)] == ["unresolved"]
    # With the checkpoint to be had now, the local copy decides: the liar is caught, the honest kept.
    pool = FakePool({"a": _honest, "liar": _liar}, refs=False, fetchable=True)
    v, right, notes = _step(pool, 0)
    assert agree(v, right)
    assert [n["peer"] for n in notes if n["event"] == "caught"] == ["liar"]


def test_a_busy_server_is_skipped_without_a_ban():
    """ "busy" is a valid request refused for the server's load: the next replica answers, and the busy
    one is asked again at the next step (a failing one would be banned for a while)."""
    from swarm.protocol import ServerBusy

    busy = {"n": 0}

    def sometimes_busy(*args):
        busy["n"] += 1
        if busy["n"] == 1:
            raise ServerBusy("busy: your share of this queue is full")
        return _honest(*args)

    pool = FakePool({"a": sometimes_busy, "b": _honest}, audit_rate=0.0)
    for i in range(20):
        _step(pool, i)
    assert "a" not in pool.banned and pool.asked.count("a") >= 2
    assert any("is busy; asked another" in e for e in pool.events)


def test_a_server_naming_another_checkpoint_is_not_asked_while_one_serves_the_verified_one():
    """Naming a made-up hash would make a liar's answers impossible to recompute: such a server is
    left out while a server of the checkpoint held here is up, and said so in the summary."""
    pool = FakePool({"made-up": _liar, "honest": _honest}, ckpts={"made-up": "f" * 64})
    for i in range(10):
        v, right, _ = _step(pool, i)
        assert agree(v, right)
    assert "made-up" not in pool.asked and "made-up" in pool.stats.skipped
    # With no server of the verified checkpoint left, it is asked (and its answers, unverifiable, reported).
    pool = FakePool({"made-up": _honest}, ckpts={"made-up": "f" * 64})
    _step(pool, 0)
    assert pool.asked == ["made-up"] and 0 in pool.stats.unchecked


def test_one_server_and_no_local_copy_is_reported_unchecked():
    pool = FakePool({"a": _honest}, refs=False)
    _step(pool, 0)
    assert 0 in pool.stats.unchecked and pool.stats.audited == 0


# ---------------------------------------------------------------------------- the tolerance, on a real expert


def test_tolerance_is_well_above_honest_float_differences_of_a_real_expert(small_run):
    """Honest recomputations of the run's experts along a trajectory: one image per forward vs two
    requests batched as a server batches them (rows joined, the shorter text padded and masked, one
    guidance scale per row), 1 thread vs 2, bf16 autocast vs fp32. All stay far below the
    tolerance; a constant velocity stays far above it."""
    from data.checkpoint import latest_checkpoint
    from experts.objectives import euler_step, sampling_times
    from router.ensemble import encoder_for
    from router.sampling import LocalExpert

    enc = encoder_for("minilm")
    (cond, cm), (unc, um) = enc.encode(["red apple", "rocket", "a smiling face", "tree"]), enc.encode([""] * 4)
    states, mask = torch.cat([cond, unc]), torch.cat([cm, um])  # 4 cond rows, then 4 uncond rows
    keep = int(mask.amax(0).nonzero().max()) + 1
    states, mask = states[:, :keep], mask[:, :keep]

    def padded(rows: torch.Tensor) -> torch.Tensor:  # text cut to 3 tokens, padded back (masked)
        extra = keep - rows.shape[1]
        return torch.nn.functional.pad(rows, (0, 0, 0, extra) if rows.dim() == 3 else (0, extra))

    short_s, short_m = states[[2, 6], :3], mask[[2, 6], :3]  # image 2's request, with a shorter text
    joined_s = torch.cat([states[[0]], padded(short_s[:1]), states[[4]], padded(short_s[1:])])
    joined_m = torch.cat([mask[[0]], padded(short_m[:1]), mask[[4]], padded(short_m[1:])])
    found = {"batched": 0.0, "threads": 0.0, "bf16": 0.0, "lie": float("inf")}
    for k in (0, 1):  # an FM and a DDPM expert
        ck = latest_checkpoint(JobId.expert(k).folder(small_run / "checkpoints"))
        fp32, bf16 = LocalExpert.from_checkpoint(ck), LocalExpert.from_checkpoint(ck, precision="bf16")
        x, times = torch.randn(4, 3, 32, 32), sampling_times(4)
        for i in range(4):
            t = torch.full((4,), times[i])
            one = fp32(x[:1], t[:1], states[[0, 4]], mask[[0, 4]], 3.0)  # one image per forward
            other = fp32(x[2:3], t[:1], short_s, short_m, 3.0)
            batched = fp32(x[[0, 2]], t[:2], joined_s, joined_m, torch.full((2,), 3.0))
            found["batched"] = max(found["batched"], disagreement(batched, torch.cat([one, other])))
            torch.set_num_threads(1)
            try:
                four = fp32(x, t, states, mask, 3.0)  # four images per forward, on one thread
            finally:
                torch.set_num_threads(2)
            found["threads"] = max(found["threads"], disagreement(four[:1], one))
            found["bf16"] = max(found["bf16"], disagreement(bf16(x, t, states, mask, 3.0), four))
            found["lie"] = min(found["lie"], disagreement(torch.full_like(four, 0.5), four))
            x = euler_step(x, four, times[i], times[i + 1])
    print(f"honest differences (largest relative L2 per image): {found}")
    assert found["batched"] < 1e-4 and found["threads"] < 1e-4
    assert found["bf16"] < TOLERANCE / 2  # a bf16 server against an fp32 audit passes with room
    assert found["lie"] > 4 * TOLERANCE


# ---------------------------------------------------------------------------- a real liar in a live swarm


@pytest.fixture(scope="module")
def lied_to(small_run, tmp_path_factory):
    """A serving preparer, an honest server of expert 0, and a liar beside it."""
    tmp = tmp_path_factory.mktemp("audit")
    procs, observer, liar = [], None, None
    try:
        peers, observer, _, prep_log = start_serving_preparer(small_run, tmp, procs)
        log = tmp / "honest.log"
        args = ["--role", "server", "--expert", "0", "--workdir", str(tmp / "honest"), "--initial-peers", *peers]
        procs.append(spawn([*args, "--host-maddrs", LOOPBACK], log))
        wait_in_log(procs[-1], log, "serving expert", 180, "the honest server")
        run = observer.run()
        honest = wait_for(lambda: observer.servers(run, [0]).get(0), 60, "the honest server's record", logs=(log,))[0]
        liar = LyingServer(tmp, peers, honest)
        wait_for(lambda: len(observer.servers(run, [0]).get(0, [])) == 2, 60, "both serve records of expert 0")
        yield tmp, peers, honest, liar, prep_log
    finally:
        if liar is not None:
            liar.close()
        if observer is not None:
            observer.shutdown()
        for p in procs:
            kill_tree(p)


def test_a_lying_server_is_caught_its_steps_redone_and_the_image_is_the_honest_one(lied_to):
    tmp, peers, honest, liar, prep_log = lied_to
    common = ["--role", "client", "red apple", "--workdir", str(tmp / "client"), "--initial-peers", *peers]
    common += ["--host-maddrs", LOOPBACK, "--steps", "16", "--mode", "full", "--seed", "3"]
    # Expert 1 runs here; expert 0 on its two servers, one of them lying (default audit rate).
    lied = node(*common, "--local-experts", "1", "--output", str(tmp / "lied.png"), timeout=300)
    assert "Traceback" not in lied.stderr
    routing = json.loads((tmp / "lied.json").read_text())
    report = routing["audit"]
    print("\n".join(line for line in lied.stdout.splitlines() if line.startswith(("audit", "CAUGHT", "redone"))))
    assert liar.answered >= 1, "the liar was never asked"
    caught = report["caught"]
    assert [(c["peer"], c["expert"], c["checked_by"]) for c in caught] == [(liar.record.peer, 0, "the local copy")]
    assert caught[0]["steps_served_before_caught"] == 0  # its first answer is always audited
    assert liar.answered == 1  # and it is never asked again
    # Its step was redone on the honest server, and no step of the image holds the liar's answer.
    assert [(r["step"], r["wrong"], r["by"]) for r in report["redone"]] == [
        (caught[0]["step"], liar.record.peer, honest.peer)
    ]
    assert all(w["0"] == honest.peer for w in routing["where"])
    assert report["extra_forwards_per_image"] > 0 and report["largest_honest_difference"] < 1e-3
    # The client says so: in its summary (with the routing table) and as a warning.
    assert f"CAUGHT: server {liar.record.peer}" in lied.stdout and liar.record.peer[:16] in lied.stderr
    assert "CAUGHT" in lied.stdout.split("routing (", 1)[1]
    # The same seed with every expert in this process: the same routing, the same image.
    local = node(*common, "--local-experts", "all", "--output", str(tmp / "local.png"), timeout=300)
    assert "Traceback" not in local.stderr
    assert json.loads((tmp / "local.json").read_text())["per_step"] == routing["per_step"]
    pixels = [np.asarray(Image.open(tmp / f"{name}.png")).astype(int) for name in ("lied", "local")]
    assert np.abs(pixels[0] - pixels[1]).max() <= 2

    # The catch was published as a proof (the request and the signed answer, as blobs).
    answered = liar.answered
    # The run's preparer keeps the proof's blobs available after the client that caught the liar is gone.
    wait_for(lambda: "holding a proof against" in prep_log.read_text(), 60, "the preparer to mirror the proof")
    # Another client, a new identity: it checks the proof against its own copy of the checkpoint
    # before its first step and never asks the liar, whatever its audit would have drawn.
    other = node(
        *common[:3], "--workdir", str(tmp / "client2"), *common[5:], "--local-experts", "1",
        "--output", str(tmp / "second.png"), timeout=300,
    )  # fmt: skip
    assert "Traceback" not in other.stderr
    assert liar.answered == answered, "the second client asked the convicted liar"
    second = json.loads((tmp / "second.json").read_text())
    assert second["audit"]["caught"] == [] and all(w["0"] == honest.peer for w in second["where"])
    assert any("a published proof convicts it" in e for e in second["failovers"]), second["failovers"]


def test_a_proof_is_the_servers_signature_and_convicts_nobody_else():
    """A server's signature covers the request and its answer: changing either breaks it; a proof
    blob round-trips the request exactly."""
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm import proof
    from swarm.protocol import DenoiseRequest, request_parts

    key, other = RSAPrivateKey(), RSAPrivateKey()
    owner = b"[owner:" + key.get_public_key().to_bytes() + b"]"
    req = DenoiseRequest(7, 0, "c" * 64, torch.ones(1, *SHAPE), torch.full((1,), 0.5), 0.25, torch.ones(2, 3, 4),
                         torch.ones(2, 3), 3.0)  # fmt: skip
    header, payload = request_parts(req)
    reply = torch.zeros(1, *SHAPE).numpy().tobytes()
    digest = proof.request_digest(header, payload)
    sig = proof.sign(key, digest, reply, [1, *SHAPE])
    assert proof.signed_by(owner, digest, reply, [1, *SHAPE], sig)
    assert not proof.signed_by(owner, digest, reply[:-4] + b"\x00\x00\x80\x3f", [1, *SHAPE], sig)  # another answer
    assert not proof.signed_by(
        owner, proof.request_digest({**header, "guidance": 4.0}, payload), reply, [1, *SHAPE], sig
    )
    assert not proof.signed_by(owner, digest, reply, [1, *SHAPE], proof.sign(other, digest, reply, [1, *SHAPE]))
    assert not proof.signed_by(owner, digest, reply, [1, *SHAPE], "not base64!")
    assert not proof.signed_by(b"[owner:junk]", digest, reply, [1, *SHAPE], sig)
    back = proof.parse_request_blob(proof.request_blob(header, payload))
    assert proof.request_digest(*back) == digest
    with pytest.raises(ValueError):
        proof.parse_request_blob(b"\xff\xff\xff\xff{}")
