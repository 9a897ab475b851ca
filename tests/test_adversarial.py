"""An open swarm that strangers cannot break: every attack here is made by a real adversarial node
on 127.0.0.1 against a live run (a serving preparer, trainers and servers as subprocesses), and
each test checks that the attack is refused while honest work goes on. README's threat-model table
lists them."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from data.checkpoint import latest_checkpoint, load_train_tensors, save_checkpoint
from data.job_id import JobId
from swarm import claims
from swarm.blobs import BlobService, BlobStore, announce
from swarm.dht import SwarmConfig, SwarmError, SwarmNode
from swarm.protocol import DenoiseRequest, encode_request, frame, parse_reply
from swarm.records import (
    CKPT_TTL_S,
    CheckpointRecord,
    ClaimRecord,
    RunDirRecord,
    RunRecord,
    RunRef,
    ckpt_key,
    claim_key,
    run_key,
    runs_key,
)
from tests.conftest import LOOPBACK, kill_tree, node, spawn, stream_session, wait_for, wait_in_log

GRACE_S = 20.0  # the run's claim grace: a claim with no verified checkpoint for this long expires


class Attacked:
    """A live run (its preparer is the owner and the trusted verifier), an honest observer
    following it by name and owner, and Mallory: a stranger's node in the same swarm."""

    def __init__(self, tmp: Path, peers: list[str], ref: RunRef, run_dir: Path, procs: list) -> None:
        self.tmp, self.peers, self.ref, self.run_dir, self.procs = tmp, peers, ref, run_dir, procs
        self.observer = SwarmNode(
            SwarmConfig(str(tmp / "observer"), initial_peers=peers, host_maddrs=[LOOPBACK], run=str(ref))
        )
        self.observer_blobs = BlobService(self.observer.dht, BlobStore(), bans=self.observer.bans)
        self._strangers: list[tuple[SwarmNode, BlobService]] = []
        self.mallory, self.mallory_blobs = self.stranger("mallory")
        self.run = wait_for(self.observer.run, 60, "the run record")

    def stranger(self, name: str) -> tuple[SwarmNode, BlobService]:
        """Another adversarial node with a key of its own (a banned key is cheap to replace)."""
        n = SwarmNode(
            SwarmConfig(str(self.tmp / name), initial_peers=self.peers, host_maddrs=[LOOPBACK], run=str(self.ref))
        )
        self._strangers.append((n, BlobService(n.dht, BlobStore(), bans=n.bans)))
        return self._strangers[-1]

    def snap(self, jobs=None) -> claims.Snapshot:
        return self.observer.snapshot(self.run, jobs)

    def spawn(self, name: str, args: list[str]):
        log = self.tmp / f"{name}.log"
        proc = spawn(
            [*args, "--workdir", str(self.tmp / name), "--initial-peers", *self.peers, "--host-maddrs", LOOPBACK], log
        )
        self.procs.append(proc)
        return proc, log

    def close(self) -> None:
        for n, b in [*self._strangers, (self.observer, self.observer_blobs)]:
            b.shutdown()
            n.shutdown()


def start_preparer(src: Path, tmp: Path, procs: list, *extra: str) -> tuple[list[str], RunRef, Path, object, Path]:
    run_dir = tmp / "run"
    shutil.copytree(src, run_dir)
    log = tmp / "prep.log"
    prep = spawn(
        ["--role", "prepare", "--serve", "--workdir", str(run_dir), "--limit", "300", "--clusters", "2"]
        + ["--objective", "mixed", "--publish-local", "--host-maddrs", LOOPBACK, *extra],
        log,
    )
    procs.append(prep)
    text = wait_in_log(prep, log, "--initial-peers", 240, "the preparer")
    line = text.split("trainers join with:", 1)[1].strip().splitlines()[0]
    ref = RunRef.parse(line.split("--run", 1)[1].split()[0])
    peers = line.split("--initial-peers", 1)[1].split()
    return peers, ref, run_dir, prep, log


@pytest.fixture(scope="module")
def attacked(small_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacked")
    procs: list = []
    swarm = None
    try:
        peers, ref, run_dir, prep, log = start_preparer(small_run, tmp, procs, "--claim-grace", str(GRACE_S))
        wait_in_log(prep, log, "verified router", 120, "the preparer verifying its own checkpoints")
        swarm = Attacked(tmp, peers, ref, run_dir, procs)
        swarm.prep_log = log
        yield swarm
    finally:
        if swarm is not None:
            swarm.close()
        for p in procs:
            kill_tree(p)


def _poisoned(honest_root: Path, dest: Path, step: int):
    """A checkpoint with the honest one's metadata and garbage weights: its hash is valid."""
    from diffusers import PixArtTransformer2DModel

    honest = latest_checkpoint(honest_root)
    model = PixArtTransformer2DModel.from_pretrained(honest.model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 3)
    tensors = {
        k: torch.randn_like(v) * 3 if k.startswith("model.") else v for k, v in load_train_tensors(honest).items()
    }
    meta = {k: v for k, v in honest.meta.items() if k not in ("step", "files", "saved_at")}
    return save_checkpoint(dest, step, model, meta, tensors)


def test_a_stranger_cannot_redirect_the_run(attacked):
    """Hijack: a run record with a larger manifest hash under the run's own name, and a second
    run listed under the same name. Followers by name and owner ignore both; a node told no run
    refuses to guess between two."""
    fake = RunRecord("f" * 64, 2, ["tiny"] * 2, ["fm", "fm"], 1, name=attacked.ref.name, started=1.0)
    assert attacked.mallory.store(run_key(), fake, 600)
    assert attacked.mallory.store(runs_key(), RunDirRecord(attacked.ref.name, "f" * 64), 600)
    assert attacked.observer.run().manifest_sha256 == attacked.run.manifest_sha256
    assert len(attacked.observer.runs()) == 2
    lost = SwarmNode(SwarmConfig(str(attacked.tmp / "lost"), initial_peers=attacked.peers, host_maddrs=[LOOPBACK]))
    try:
        with pytest.raises(SwarmError, match="follow one with --run"):
            lost.run()
    finally:
        lost.shutdown()


def test_bogus_and_poisoned_checkpoints_are_refused_and_never_served(attacked):
    """A checkpoint record at step 1e9 with a hash nobody holds, and a poisoned checkpoint (valid
    hash, garbage weights, a plausible step), each published by a stranger holding the job's claim
    (without one, neither would even be looked at): both refused with a reason, the poisoner
    banned, and a new server loads the honest checkpoint."""
    from hivemind.utils import get_dht_time

    m, run = attacked.mallory, attacked.run
    honest = claims.latest_checkpoint(attacked.snap(["expert_0"]), "expert_0")
    assert honest is not None
    m.store(claim_key("expert_0"), ClaimRecord(run.manifest_sha256, m.peer_id, float(get_dht_time())), 30)
    bogus = CheckpointRecord(
        run.manifest_sha256, 10**9, "b" * 64, 1, run.objectives[0], run.presets[0], 0.0, [m.peer_id]
    )
    m.store(ckpt_key("expert_0"), bogus, CKPT_TTL_S)

    def refused(sha):
        return next((v for v in claims.refused(attacked.snap(["expert_0"]), "expert_0") if v.sha256 == sha), None)

    assert "steps/s" in wait_for(lambda: refused(bogus.sha256), 60, "the bogus record's refusal").reason

    # The preparer banned Mallory's key for that record: the poisoner comes with a fresh key.
    t, t_blobs = attacked.stranger("trudy")
    t.store(claim_key("expert_0"), ClaimRecord(run.manifest_sha256, t.peer_id, float(get_dht_time())), 60)
    poison = _poisoned(
        attacked.run_dir / "checkpoints" / "expert_0", attacked.tmp / "poison" / "expert_0", honest.step + 1
    )
    t_blobs.store.add_checkpoint(poison)
    announce(t, t_blobs.store)
    size = sum(p.stat().st_size for p in poison.path.rglob("*") if p.is_file())
    rec = CheckpointRecord(
        run.manifest_sha256, poison.step, poison.sha256, size, run.objectives[0], run.presets[0], 0.01, [t.peer_id]
    )
    t.store(ckpt_key("expert_0"), rec, CKPT_TTL_S)
    verdict = wait_for(lambda: refused(poison.sha256), 120, "the poisoned checkpoint's refusal")
    assert "held-out loss" in verdict.reason or "NaN" in verdict.reason, verdict.reason
    assert claims.latest_checkpoint(attacked.snap(["expert_0"]), "expert_0").sha256 == honest.sha256

    # A server started now loads the honest checkpoint, never the poisoned one.
    proc, log = attacked.spawn("server0", ["--role", "server", "--expert", "0", "--run", str(attacked.ref)])
    text = wait_in_log(proc, log, "serving expert", 180, "the server")
    assert f"({honest.sha256[:12]})" in text and poison.sha256[:12] not in text

    # The dashboard says what was refused and why, and who banned the poisoner.
    status = node(
        "--role", "status", "--once", "--json", "--workdir", str(attacked.tmp / "status"),
        "--initial-peers", *attacked.peers, "--host-maddrs", LOOPBACK, "--run", str(attacked.ref),
    )  # fmt: skip
    (data,) = json.loads(status.stdout)["runs"]
    job = next(j for j in data["jobs"] if j["job"] == "expert_0")
    assert {r["sha256"] for r in job["refused"]} >= {bogus.sha256, poison.sha256}
    assert job["checkpoint"]["sha256"] == honest.sha256
    preparer = next(p for p in data["peers"] if p["role"] == "preparer")
    assert {m.fingerprint[:16], t.fingerprint[:16]} <= {line.split(":")[0] for line in preparer["bans"]}

    # Malformed requests get the stranger banned by the server; an honest client is still served.
    server_peer = text.split("server ", 1)[1].split()[0]
    first = stream_session(attacked.mallory_blobs, server_peer, [frame({"op": "denoise", "id": 1, "nbytes": 0}, b"")])
    assert first[0][0]["ok"] is False
    again = stream_session(attacked.mallory_blobs, server_peer, [frame({"op": "denoise", "id": 2, "nbytes": 0}, b"")])
    assert "banned" in again[0][0]["error"]
    served = wait_for(lambda: attacked.observer.servers(run, [0]).get(0), 60, "the server's record")[0]
    c, h, w = served.shape
    x, states, mask = torch.randn(1, c, h, w), torch.randn(2, 8, served.text_dim), torch.ones(2, 8)
    req = encode_request(DenoiseRequest(7, 0, served.ckpt, x, torch.full((1,), 0.5), 0.4, states, mask, 3.0))
    header, payload = stream_session(attacked.observer_blobs, server_peer, [req])[0]
    assert torch.isfinite(parse_reply(header, payload, (1, c, h, w))).all()


def test_squatted_claims_lose_and_an_honest_trainer_trains(attacked):
    """Squats: a claim with t0 = 0 (which would win forever under min(t0)) and a plausible claim
    that never shows progress. The first never counts; the second expires after the grace period;
    an honest trainer takes the job and its verified checkpoints keep it."""
    m, run = attacked.mallory, attacked.run
    m.store(claim_key("expert_1"), ClaimRecord(run.manifest_sha256, m.peer_id, 0.0), 3600)
    from hivemind.utils import get_dht_time

    m.store(claim_key("router"), ClaimRecord(run.manifest_sha256, m.peer_id, float(get_dht_time())), 3600)
    assert claims.winner(attacked.snap(["expert_1"]), "expert_1") is None
    assert claims.winner(attacked.snap(["router"]), "router") == m.owner  # plausible, for now
    start = time.monotonic()
    wait_for(lambda: claims.winner(attacked.snap(["router"]), "router") is None, 3 * GRACE_S, "the squat to expire")
    assert time.monotonic() - start < 2 * GRACE_S

    before = claims.latest_checkpoint(attacked.snap(["expert_1"]), "expert_1").step
    target = str(before + 8)
    proc, log = attacked.spawn(
        "honest",
        ["--role", "trainer", "--run", str(attacked.ref), "--expert", "1", "--steps", target]
        + ["--batch-size", "16", "--ckpt-every", "4"],
    )
    wait_in_log(proc, log, "claimed expert_1", 120, "the honest trainer")
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    wait_for(
        lambda: claims.latest_checkpoint(attacked.snap(["expert_1"]), "expert_1").step == int(target),
        60,
        "the honest checkpoint to be verified",
    )


def test_bad_blobs_get_their_sender_banned(attacked):
    """A stranger announces a blob of the run (a shard) and sends other bytes for it: the
    receiver refuses them, bans the sender, and gets the blob from an honest provider."""
    shard = next(p for p in sorted((attacked.run_dir / "data").rglob("*.tar")))
    from data.manifest import sha256_file

    digest = sha256_file(shard)
    junk = attacked.tmp / "junk.tar"
    junk.write_bytes(b"\0" * shard.stat().st_size)
    attacked.mallory_blobs.store.add_file(junk, digest)
    announce(attacked.mallory, attacked.mallory_blobs.store, only={digest})
    honest = sorted(attacked.observer.providers(digest) - {attacked.mallory.peer_id})
    dest = attacked.tmp / "fetched" / shard.name
    attacked.observer_blobs.fetch(digest, [attacked.mallory.peer_id, *honest], dest)
    assert sha256_file(dest) == digest
    assert attacked.observer.bans.banned(attacked.mallory.peer_id)
    assert attacked.mallory.peer_id not in attacked.observer.providers(digest)


def test_two_runs_share_one_dht_and_an_allowlist_admits_only_listed_trainers(attacked, small_run, tmp_path_factory):
    """A second run on the same DHT (same data, another name and owner) whose owner admits only
    listed trainer keys: an unlisted trainer waits while the first run goes on, is admitted when
    the owner lists its key, and the owner can open the run again."""
    tmp = tmp_path_factory.mktemp("second")
    allow = tmp / "allow.txt"
    allow.write_text("# nobody yet\n")
    procs: list = []
    try:
        second = spawn(
            [
                "--role",
                "prepare",
                "--serve",
                "--workdir",
                str(shutil.copytree(small_run, tmp / "run")),
                "--limit",
                "300",
            ]
            + ["--clusters", "2", "--objective", "mixed", "--run", "second", "--allow", str(allow)]
            + ["--initial-peers", *attacked.peers, "--host-maddrs", LOOPBACK],
            tmp / "prep.log",
        )
        procs.append(second)
        text = wait_in_log(second, tmp / "prep.log", "--initial-peers", 240, "the second preparer")
        ref2 = RunRef.parse(text.split("--run ", 1)[1].split()[0])
        assert ref2.name == "second" and ref2 != attacked.ref
        both = {str(attacked.ref), str(ref2)}  # the join line is printed as the run record is stored
        wait_for(lambda: {str(r) for r in attacked.observer.runs()} >= both, 60, "both runs in the runs record")

        trainer = spawn(
            ["--role", "trainer", "--run", str(ref2), "--workdir", str(tmp / "t"), "--expert", "0", "--steps", "10"]
            + [
                "--batch-size",
                "16",
                "--ckpt-every",
                "4",
                "--initial-peers",
                *attacked.peers,
                "--host-maddrs",
                LOOPBACK,
            ],
            tmp / "t.log",
        )
        procs.append(trainer)
        text = wait_in_log(trainer, tmp / "t.log", "not admitted", 120, "the unlisted trainer")
        fp = text.split("this trainer's key: ", 1)[1].split()[0]
        # Its claims would be ignored by every node anyway; it does not even make one.
        assert "claimed" not in (tmp / "t.log").read_text()
        allow.write_text(f"{fp}  # the trainer\n")
        wait_in_log(trainer, tmp / "t.log", "claimed expert_0", 60, "the listed trainer")
        assert trainer.wait(timeout=240) == 0
        # The owner opens the run again while it lives; the first run was never disturbed.
        allow.write_text("open\n")
        wait_in_log(second, tmp / "prep.log", "admission is now open", 30, "the second preparer")
        assert attacked.observer.run().manifest_sha256 == attacked.run.manifest_sha256
        # The status node names both runs (and not the stranger's listing of a run it never published).
        status = node("--role", "status", "--once", "--json", "--workdir", str(tmp / "status"),
                      "--initial-peers", *attacked.peers, "--host-maddrs", LOOPBACK)  # fmt: skip
        shown = {r["ref"]: r for r in json.loads(status.stdout)["runs"]}
        assert set(shown) == both, set(shown)
        assert shown[str(ref2)]["admission"] == "open" and shown[str(ref2)]["jobs"][0]["checkpoint"]["step"] == 10
    finally:
        for p in procs:
            kill_tree(p)


def _heldout(run_dir: Path, job: str):
    """The job as a verifier builds it, and a function giving a checkpoint's sampling loss as the
    verifier measures it (same held-out batches, same seed)."""
    from data.manifest import load_manifest
    from training.heldout import checkpoint_losses
    from training.jobs import build_job
    from training.loop import TrainConfig

    manifest, digest = load_manifest(run_dir / "data")
    torch.manual_seed(0)
    built = build_job(manifest, digest, job, TrainConfig(ckpt_root="", batch_size=32, seed=0))
    return lambda ck: checkpoint_losses(built, ck, 2, 32, 0)[0]


def _noisier(base, dest: Path, step: int, loss_of, factor: float):
    """``base`` with noise in its sampling weights, scaled (by bisection) until its held-out loss
    is about ``factor`` times ``base``'s: inside the verifier's margin of the one before."""
    from diffusers import PixArtTransformer2DModel

    want, lo, hi = loss_of(base) * factor, 0.0, 1.0
    meta = {k: v for k, v in base.meta.items() if k not in ("step", "files", "saved_at")}
    tensors = load_train_tensors(base)
    best = None
    for i in range(10):
        sigma = (lo + hi) / 2
        model = PixArtTransformer2DModel.from_pretrained(base.model_dir)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * sigma * (p.std() if p.numel() > 1 else p.abs()))
        shutil.rmtree(dest, ignore_errors=True)
        ck = save_checkpoint(dest, step, model, meta, tensors)
        loss = loss_of(ck)
        if abs(loss / want - 1) < 0.02:
            return ck, loss
        lo, hi = (sigma, hi) if loss < want else (lo, sigma)
        best = (ck, loss)
    return best


def _publish(node_, blobs, ck, run, job: str) -> CheckpointRecord:
    """Provide a checkpoint and publish its record under ``node_``'s key, as a trainer would."""
    blobs.store.add_checkpoint(ck)
    announce(node_, blobs.store)
    size = sum(p.stat().st_size for p in ck.path.rglob("*") if p.is_file())
    k = JobId.parse(job).expert_index
    rec = CheckpointRecord(
        run.manifest_sha256, ck.step, ck.sha256, size, run.objectives[k], run.presets[k], 0.1, [node_.peer_id]
    )
    assert node_.store(ckpt_key(job), rec, CKPT_TTL_S)
    return rec


def _verdict_on(attacked, job: str, sha: str, step: int):
    """The trusted verifiers' verdict on (hash, step) of ``job``, once there is one."""
    s = attacked.snap([job])
    return next((v for v in claims.verdicts(s, job) if v.sha256 == sha and v.step == step), None)


def _preparer_bans(attacked) -> set[str]:
    from swarm.records import PeerRecord, peers_key

    recs = attacked.observer.read(peers_key(), PeerRecord).values()
    return {line.split(":")[0] for p in recs if p.role == "preparer" for line in p.bans}


@pytest.mark.timeout(900)  # trains a checkpoint and judges four
def test_a_slow_poisoning_ratchet_is_refused_by_its_second_step_and_republishing_harms_only_the_republisher(
    attacked,
):
    """Checkpoint authority and the quality bar. Rat holds expert_0's claim and publishes a truly
    trained checkpoint (accepted), then the same with noise at 1.2x its held-out loss (inside the
    margin: accepted), then that again at 1.2x (1.44x the best): refused by the second link. Eve,
    holding no claim, republishes rat's hash under step 1e9: the refusal lands on Eve's record
    alone; rat is not banned and its checkpoint stays accepted. A copy of the checkpoint Eve
    publishes at a plausible step, without the claim, is refused too."""
    from hivemind.utils import get_dht_time

    run, job = attacked.run, "expert_0"
    rat, rat_blobs = attacked.stranger("rat")
    assert rat.store(claim_key(job), ClaimRecord(run.manifest_sha256, rat.peer_id, float(get_dht_time())), 600)
    wait_for(lambda: claims.winner(attacked.snap([job]), job) == rat.owner, 30, "rat to hold the claim")

    # A real checkpoint, trained 18 steps past the run's published one on this machine.
    work = attacked.tmp / "rat_run"
    shutil.copytree(attacked.run_dir, work, ignore=shutil.ignore_patterns("identity", "mirror"))
    node("--role", "trainer", "--local", "--workdir", str(work), "--expert", "0", "--steps", "24")
    trained = latest_checkpoint(work / "checkpoints" / job)
    assert trained.step == 24
    base = _publish(rat, rat_blobs, trained, run, job)
    ok = wait_for(lambda: _verdict_on(attacked, job, base.sha256, 24), 120, "the trained checkpoint's verdict")
    assert ok.ok, ok.reason

    loss_of = _heldout(attacked.run_dir, job)
    link1, loss1 = _noisier(trained, attacked.tmp / "ratchet" / "1", 61, loss_of, 1.2)
    _publish(rat, rat_blobs, link1, run, job)
    v1 = wait_for(lambda: _verdict_on(attacked, job, link1.sha256, 61), 120, "the first link's verdict")
    assert v1.ok, v1.reason  # 1.2x: inside the margin of the best
    link2, loss2 = _noisier(link1, attacked.tmp / "ratchet" / "2", 62, loss_of, 1.2)
    assert loss2 > 1.3 * ok.loss  # within 1.25x of the last accepted, far from the best
    _publish(rat, rat_blobs, link2, run, job)
    v2 = wait_for(lambda: _verdict_on(attacked, job, link2.sha256, 62), 120, "the second link's verdict")
    assert not v2.ok and "worse than" in v2.reason and "untrained" not in v2.reason, v2
    wait_for(
        lambda: claims.latest_checkpoint(attacked.snap([job]), job).sha256 == link1.sha256,
        60,
        "the first link (mirrored) to be the job's latest",
    )

    # Eve republishes rat's accepted hash under a bogus step, and a copy of it without the claim.
    eve, eve_blobs = attacked.stranger("eve")
    bogus = replace_step(base, 10**9, eve.peer_id)
    assert eve.store(ckpt_key(job), bogus, CKPT_TTL_S)
    no = wait_for(lambda: _verdict_on(attacked, job, base.sha256, 10**9), 60, "the republished record's refusal")
    assert not no.ok and no.about == "record" and no.owner == eve.fingerprint, no
    assert rat.fingerprint[:16] not in _preparer_bans(attacked)
    assert _verdict_on(attacked, job, base.sha256, 24).ok
    copy = _resaved(trained, attacked.tmp / "eve" / "copy", 63)
    _publish(eve, eve_blobs, copy, run, job)
    no = wait_for(lambda: _verdict_on(attacked, job, copy.sha256, 63), 60, "the unclaimed copy's refusal")
    assert not no.ok and "does not hold" in no.reason and no.about == "record", no


def _resaved(base, dest: Path, step: int):
    """``base``'s weights saved again under another step: a new hash, the same quality."""
    from diffusers import PixArtTransformer2DModel

    meta = {k: v for k, v in base.meta.items() if k not in ("step", "files", "saved_at")}
    model = PixArtTransformer2DModel.from_pretrained(base.model_dir)
    return save_checkpoint(dest, step, model, meta, load_train_tensors(base))


def replace_step(rec: CheckpointRecord, step: int, peer: str) -> CheckpointRecord:
    from dataclasses import replace

    return replace(rec, step=step, providers=[peer])


def test_one_key_cannot_sign_as_many_identities(attacked):
    """A stranger's own DHT node (signatures only, none of the swarm's other checks) writes claims
    under [owner:KEY]1, [owner:KEY]2, ...: hivemind's signature check passes each, but no honest
    node stores them and none reads them as a claim: one key is one identity."""
    from hivemind.dht import DHT
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils import get_dht_time
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm.records import encode, in_run

    rsa = RSASignatureValidator(RSAPrivateKey())
    raw = DHT(initial_peers=attacked.peers, host_maddrs=[LOOPBACK], record_validators=[rsa], start=True)
    try:
        key = in_run(claim_key("expert_1"), attacked.ref)
        value = encode(ClaimRecord(attacked.run.manifest_sha256, str(raw.peer_id), float(get_dht_time())))
        for i in range(3):
            raw.store(key, value, get_dht_time() + 60, subkey=rsa.local_public_key + b"%d" % i)
        time.sleep(2)
        found = attacked.observer.get(claim_key("expert_1"))
        subkeys = set(found.value) if found is not None and isinstance(found.value, dict) else set()
        assert not [s for s in subkeys if isinstance(s, bytes) and s.startswith(rsa.local_public_key)]
        assert not [o for o in attacked.observer.read(claim_key("expert_1"), ClaimRecord) if rsa.local_public_key in o]
    finally:
        raw.shutdown()
