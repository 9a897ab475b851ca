"""Honest training while strangers attack the run, side by side in one run of this script.

Two phases on the same prepared data, each a serving preparer (the run's owner and verifier) and
one honest trainer training expert 0 for the same wall-clock budget:

* quiet: nobody else;
* attacked: a stranger, with a fresh key every round (a banned key is cheap to replace), tries
  every attack of README's threat-model table again and again: a checkpoint record at step 10⁹
  for every job, a poisoned checkpoint (random weights, valid hash, plausible step), a claim with
  t0 = 0 on the honest trainer's job, a plausible claim that never trains, a run record and a
  directory entry that would redirect the run, junk bytes announced under a shard's hash, the
  honest trainer's latest hash republished under step 10⁹ (to get the honest key banned) and
  under the next step without the claim, claims under one key's many subkeys. Once, early on, it
  floods the DHT: ``--flood`` claims on the honest trainer's job from as many keys, and a fifth as
  many presence records.

A third phase attacks serving: a run with a small trained set, an honest server of expert 0 and,
beside it, a stranger's server announcing the same verified checkpoint that answers every step
with a constant velocity, signed as an honest server signs (:class:`LyingServer`). A client draws
images quiet (the liar not yet up), then with the liar up, then a second client (a new identity)
after the first has published its proof. Reported: the liar's answers used (goal 0), how many of
its answers the first client took before catching it, the audit's extra expert forwards per image,
seconds per image attacked ÷ quiet, and how often the second client asked the liar (goal 0).

An observer following the run checks every second whether any attack was accepted: a refused or
bogus checkpoint counted as a job's latest, a squatter owning a job (the t0 = 0 one at once, the
plausible one after the grace period), the run redirected, the honest trainer's key banned by
the preparer, a republished record counted. Reported: attacks tried, accepted (goal 0), whether
the honest trainer lost its claim, its samples/s attacked ÷ quiet, and the time of an honest
``--role status --once`` during the flood ÷ quiet.

    .venv/bin/python benchmarks/adversarial.py [--minutes 2] [--images 4] [--serving-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncio  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
from dataclasses import astuple, replace  # noqa: E402

import torch  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from hivemind.dht import DHT  # noqa: E402
from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.utils import MSGPackSerializer, get_dht_time  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402

from benchmarks.results import RESULTS, append_section, machine  # noqa: E402
from data.checkpoint import latest_checkpoint, save_checkpoint  # noqa: E402
from data.manifest import load_manifest, sha256_file  # noqa: E402
from experts.presets import build_expert, get_preset  # noqa: E402
from roles.local import LOOPBACK, NodeProcess  # noqa: E402
from swarm import claims  # noqa: E402
from swarm.blobs import BlobService, BlobStore, announce  # noqa: E402
from swarm.dht import SwarmConfig, SwarmNode  # noqa: E402
from swarm.records import (  # noqa: E402
    CKPT_TTL_S,
    CheckpointRecord,
    ClaimRecord,
    PeerRecord,
    RunDirRecord,
    RunRecord,
    RunRef,
    ckpt_key,
    claim_key,
    encode,
    fingerprint,
    in_run,
    peers_key,
    run_key,
    runs_key,
)

GRACE_S = 60.0  # the run's claim grace, short so the plausible squat must expire within a phase


class ManyKeys(RSASignatureValidator):
    """A stranger's signer holding many keys: it signs each record with the key its subkey names
    (hivemind's own signs only with one). 1024-bit keys: identities are cheap to make."""

    def __init__(self, n: int) -> None:
        super().__init__(RSAPrivateKey())
        self.keys: dict[bytes, RSAPrivateKey] = {}
        for _ in range(n):
            key = RSAPrivateKey.__new__(RSAPrivateKey)
            key._private_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
            self.keys[b"[owner:" + key.get_public_key().to_bytes() + b"]"] = key

    def sign_value(self, record) -> bytes:
        found = re.search(rb"\[owner:.+?\]", record.subkey)
        key = self.keys.get(found.group(0)) if found else None
        if key is None:
            return super().sign_value(record)
        signature = key.sign(MSGPackSerializer.dumps(astuple(record)))
        return record.value + self.SIGNATURE_FORMAT.replace(b"_value_", signature)

    def validate(self, record) -> bool:
        return True  # the stranger's node keeps whatever it is sent


BATCH = 50  # records per call into the DHT process (a larger message overruns its non-blocking pipe)


class _StoreMany:
    """Run in the stranger's DHT process: store a batch of records in one go."""

    def __init__(self, keys: list[str], values: list[dict], subkeys: list[bytes], ttl: float) -> None:
        self.keys, self.values, self.subkeys, self.ttl = keys, values, subkeys, ttl

    async def __call__(self, _dht, node) -> int:
        exp = get_dht_time() + self.ttl
        ok = await node.store_many(self.keys, self.values, [exp] * len(self.keys), subkeys=self.subkeys)
        return sum(bool(v) for v in ok.values())


def flood(signer: ManyKeys, peers: list[str], ref: RunRef, run: RunRecord, job: str, ttl: float = 300.0) -> dict:
    """A claim on ``job`` from each of the signer's keys (t0 now: later than the honest owner's, so
    none may win), presence records from a fifth of them, and claims under one key's many subkeys
    (t0 at the run's start: each would win, were it counted). Returns what was stored."""
    n = len(signer.keys)
    dht = DHT(initial_peers=peers, host_maddrs=[LOOPBACK], record_validators=[signer], start=True)
    try:
        now = float(get_dht_time())
        subkeys = list(signer.keys)
        claim = in_run(claim_key(job), ref)
        values = [encode(ClaimRecord(run.manifest_sha256, f"flood{i}", now)) for i in range(n)]
        stored = 0
        for i in range(0, n, BATCH):
            stored += dht.run_coroutine(
                _StoreMany([claim] * len(values[i : i + BATCH]), values[i : i + BATCH], subkeys[i : i + BATCH], ttl)
            )
        presence = [encode(PeerRecord(f"flood{i}", "trainer", "training", job, 10**6)) for i in range(n // 5)]
        for i in range(0, n // 5, BATCH):
            part = presence[i : i + BATCH]
            stored += dht.run_coroutine(
                _StoreMany([in_run(peers_key(), ref)] * len(part), part, subkeys[i : i + len(part)], ttl)
            )
        me = signer.local_public_key
        early = encode(ClaimRecord(run.manifest_sha256, "one-key", run.started))
        stored += dht.run_coroutine(_StoreMany([claim] * 8, [early] * 8, [me + b"%d" % i for i in range(8)], ttl))
        return {"records": n + n // 5 + 8, "stored": stored, "subkey_owner": fingerprint(me)}
    finally:
        dht.shutdown()


def status_seconds(peers: list[str], ref: RunRef, tmp: Path) -> float:
    """Wall-clock seconds of an honest ``--role status --once --json`` (a new node joining, reading
    every record of the run, leaving)."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "node.py"), "--role", "status", "--once", "--json", "--run", str(ref)]
        + ["--workdir", str(tmp), "--initial-peers", *peers, "--host-maddrs", LOOPBACK],
        cwd=ROOT,
        capture_output=True,
        timeout=600,
        check=True,
    )
    return time.perf_counter() - t0


def prepare(tmp: Path) -> Path:
    work = tmp / "prepared"
    NodeProcess(
        "prepare",
        ["--role", "prepare", "--workdir", str(work), "--limit", "300", "--clusters", "2"],
        tmp / "prepare.log",
    ).proc.wait(timeout=1800)
    return work


class Attacker(threading.Thread):
    """Every attack, again and again, each round from a fresh key, until stopped."""

    def __init__(self, tmp: Path, peers: list[str], ref: RunRef, run: RunRecord, data: Path) -> None:
        super().__init__(name="attacker", daemon=True)
        self.tmp, self.peers, self.ref, self.run_rec, self.data = tmp, peers, ref, run, data
        self.halt = threading.Event()
        self.tried: dict[str, int] = {}
        self.bad_hashes: set[str] = set()  # checkpoints that must never count
        self.squatters: dict[str, tuple[bytes, float]] = {}  # job → (key, when its squat began)
        self.keys: set[bytes] = set()
        self.bad_records: set[tuple[str, int]] = set()  # (hash, step) republished: must never count

    def _try(self, what: str) -> None:
        self.tried[what] = self.tried.get(what, 0) + 1

    def run(self) -> None:
        manifest, digest = load_manifest(self.data / "data")
        shard = manifest.resolve(manifest.clusters[0].shards[0].url)
        junk = self.tmp / "junk.tar"
        junk.write_bytes(b"\0" * Path(shard).stat().st_size)
        preset = get_preset("tiny")
        r = 0
        while not self.halt.is_set():
            r += 1
            node = SwarmNode(
                SwarmConfig(
                    str(self.tmp / f"stranger{r}"), initial_peers=self.peers, host_maddrs=[LOOPBACK], run=str(self.ref)
                )
            )
            blobs = BlobService(node.dht, BlobStore())
            self.keys.add(node.owner)
            try:
                run = self.run_rec
                for job in run.jobs():
                    fake = f"{r:064x}"[:60] + f"{hash(job) & 0xFFFF:04x}"
                    self.bad_hashes.add(fake)
                    rec = CheckpointRecord(
                        run.manifest_sha256,
                        10**9,
                        fake,
                        1,
                        "router" if job == "router" else "fm",
                        "tiny",
                        0.0,
                        [node.peer_id],
                    )
                    node.store(ckpt_key(job), rec, CKPT_TTL_S)
                    self._try("checkpoint record at step 1e9")
                torch.manual_seed(r)
                model = build_expert(preset, 384)
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(0).add_(torch.randn_like(p) * 3)
                meta = {"kind": "expert", "cluster": 0, "objective": run.objectives[0], "preset": preset.to_dict()}
                meta |= {"text_encoder": "minilm", "space": "pixel", "manifest_sha256": digest}
                tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
                poison = save_checkpoint(self.tmp / f"poison{r}", 1, model, meta, tensors)
                blobs.store.add_checkpoint(poison)
                announce(node, blobs.store)
                self.bad_hashes.add(poison.sha256)
                size = sum(p.stat().st_size for p in poison.path.rglob("*") if p.is_file())
                node.store(
                    ckpt_key("expert_0"),
                    CheckpointRecord(
                        run.manifest_sha256, 1, poison.sha256, size, run.objectives[0], "tiny", 0.01, [node.peer_id]
                    ),
                    CKPT_TTL_S,
                )
                self._try("poisoned checkpoint (valid hash)")
                node.store(claim_key("expert_0"), ClaimRecord(run.manifest_sha256, node.peer_id, 0.0), 3600)
                self._try("claim with t0 = 0")
                if "expert_1" not in self.squatters:
                    now = float(get_dht_time())
                    node.store(claim_key("expert_1"), ClaimRecord(run.manifest_sha256, node.peer_id, now), 3600)
                    self.squatters["expert_1"] = (node.owner, now)
                    self._try("plausible claim that never trains")
                fake_run = RunRecord("f" * 64, 2, ["tiny"] * 2, ["fm"] * 2, 1, name=self.ref.name, started=1.0)
                node.store(run_key(), fake_run, 600)
                node.store(runs_key(), RunDirRecord(self.ref.name, "f" * 64), 600)
                self._try("run record / directory entry (hijack)")
                blobs.store.add_file(junk, sha256_file(Path(shard)))
                announce(node, blobs.store, only={sha256_file(Path(shard))})
                self._try("junk bytes under a shard's hash")
                honest = claims.latest_checkpoint(node.snapshot(run, ["expert_0"]), "expert_0")
                if honest is not None:
                    # Under a bogus step (to get its honest signer banned), and under the next step
                    # without the claim (to count someone else's work as one's own).
                    node.store(ckpt_key("expert_0"), replace(honest, step=10**9, providers=[node.peer_id]), CKPT_TTL_S)
                    self._try("honest hash republished at step 1e9")
                    self.halt.wait(3.0)
                    nxt = replace(honest, step=honest.step + 1, providers=[node.peer_id])
                    self.bad_records.add((nxt.sha256, nxt.step))
                    node.store(ckpt_key("expert_0"), nxt, CKPT_TTL_S)
                    self._try("checkpoint published without the claim")
                self.halt.wait(10.0)
            finally:
                blobs.shutdown()
                node.shutdown()


def watch(
    observer: SwarmNode,
    run: RunRecord,
    attacker: Attacker | None,
    halt: threading.Event,
    accepted: set[str],
    honest_log: Path,
    flood_owner: list[str],
) -> None:
    while not halt.wait(1.0):
        try:
            if observer.run().manifest_sha256 != run.manifest_sha256:
                accepted.add("run redirected")
            if attacker is None:
                continue
            snap = observer.snapshot(run)
            text = honest_log.read_text(errors="replace") if honest_log.is_file() else ""
            key = re.search(r"this trainer's key: ([0-9a-f]{32})", text)
            bans = {ln.split(":")[0] for p in observer.read(peers_key(), PeerRecord).values() for ln in p.bans}
            if key and key.group(1)[:16] in bans:
                accepted.add("honest trainer banned")
            for job in run.jobs():
                ck = claims.latest_checkpoint(snap, job)
                if ck is not None and ck.sha256 in attacker.bad_hashes:
                    accepted.add(f"bad checkpoint counted for {job}")
                if ck is not None and (ck.sha256, ck.step) in attacker.bad_records:
                    accepted.add(f"record published without the claim counted for {job}")
                if any(fingerprint(o) in flood_owner for o in snap.claims.get(job, {})):
                    accepted.add(f"a claim under one key's extra subkey counted for {job}")
                owner = claims.winner(snap, job)
                squat = attacker.squatters.get(job)
                if owner in attacker.keys and (squat is None or owner != squat[0]):
                    accepted.add(f"t0 = 0 squat owns {job}")
                if squat and owner == squat[0] and get_dht_time() - squat[1] > GRACE_S + 15:
                    accepted.add(f"plausible squat still owns {job} after the grace")
        except Exception as e:  # a slow read under load: the next second tries again
            print(f"observer: {e!r}", flush=True)


def phase(tmp: Path, data: Path, minutes: float, signer: ManyKeys | None) -> dict:
    attacked = signer is not None
    shutil.copytree(data, tmp / "run")
    prep = NodeProcess(
        "preparer",
        ["--role", "prepare", "--serve", "--workdir", str(tmp / "run"), "--limit", "300", "--clusters", "2"]
        + ["--host-maddrs", LOOPBACK, "--claim-grace", str(GRACE_S), "--run", "attacked" if attacked else "quiet"],
        tmp / "prep.log",
    )
    nodes = [prep]
    observer = attacker = None
    halt, accepted = threading.Event(), set()
    try:
        line = prep.wait_for("--run ", 300)
        ref = RunRef.parse(line.split()[0])
        peers = line.split("--initial-peers", 1)[1].split()
        observer = SwarmNode(
            SwarmConfig(str(tmp / "observer"), initial_peers=peers, host_maddrs=[LOOPBACK], run=str(ref))
        )
        run = observer.run()
        honest = NodeProcess(
            "honest",
            ["--role", "trainer", "--workdir", str(tmp / "t"), "--run", str(ref), "--expert", "0", "--threads", "1"]
            + ["--minutes", str(minutes), "--initial-peers", *peers, "--host-maddrs", LOOPBACK],
            tmp / "t.log",
        )
        nodes.append(honest)
        honest.wait_for("claimed expert_0", 300)
        stored = {}
        if attacked:  # the flood first, then every other attack, round after round
            stored = flood(signer, peers, ref, run, "expert_0")
            attacker = Attacker(tmp, peers, ref, run, tmp / "run")
            attacker.start()
        extra = [stored["subkey_owner"]] if stored else []
        threading.Thread(
            target=watch, args=(observer, run, attacker, halt, accepted, tmp / "t.log", extra), daemon=True
        ).start()
        status_s = status_seconds(peers, ref, tmp / "status")
        honest.proc.wait(timeout=minutes * 60 + 600)
        halt.set()
        if attacker is not None:
            attacker.halt.set()
            attacker.join(timeout=60)
        meta = latest_checkpoint(tmp / "t" / "swarm" / "checkpoints" / "expert_0").meta
        log = (tmp / "t.log").read_text()
        lost = "another node now wins" in log or "claim has lapsed" in log
        return {
            "status_s": status_s,
            "flood": stored,
            "samples_per_s": meta["samples_seen"] / meta["train_seconds"],
            "tried": dict(attacker.tried) if attacker else {},
            "accepted": sorted(accepted) + (["honest trainer lost its claim"] if lost else []),
        }
    finally:
        halt.set()
        if observer is not None:
            observer.shutdown()
        for n in reversed(nodes):
            n.stop()


class LyingServer:
    """A stranger's node serving the denoising protocol: it announces a serve record for expert 0
    copied from an honest server's (the verified checkpoint's hash, an empty queue) and answers every
    request with a constant velocity, at once, signed with its own key as an honest server signs
    its answers (an unsigned answer is not even used)."""

    def __init__(self, tmp: Path, peers: list[str], honest) -> None:
        from swarm.protocol import PROTOCOL
        from swarm.records import serve_key

        self.node = SwarmNode(SwarmConfig(str(tmp / "liar"), initial_peers=peers, host_maddrs=[LOOPBACK]))
        self.blobs = BlobService(self.node.dht, BlobStore(), bans=self.node.bans)
        self.answered = 0
        self.blobs.add_stream_handler(PROTOCOL, self._serve)
        self.record = replace(honest, peer=self.node.peer_id, queue=0, rps=0.0, owner=b"")
        assert self.node.store(serve_key(0), self.record, 600)  # a long TTL stands in for renewals

    async def _serve(self, _info, reader, writer) -> None:
        from swarm import proof
        from swarm.protocol import encode_reply, read_frame

        try:
            while True:
                header, payload = await read_frame(reader, 1 << 26)
                self.answered += 1
                v = torch.full(tuple(header["x"]), 0.5)  # no forward pass at all: instant and wrong
                digest = proof.request_digest(header, payload)
                sign = lambda data, shape, d=digest: proof.sign(self.node.key, d, data, shape)  # noqa: E731
                writer.write(encode_reply(header["id"], v, timing={"forward_ms": 0.0, "server_ms": 0.1}, sign=sign))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.blobs.shutdown()
        self.node.shutdown()


PROMPTS = ["red apple", "rocket", "sun", "dog face", "red heart", "grinning face", "woman", "flag: Japan"]


def serving_phase(tmp: Path, data: Path, images: int) -> dict:
    """A lying server beside an honest one: what the audit costs and what the liar gets."""
    work = tmp / "run"
    shutil.copytree(data, work)
    for job in (["--expert", "0"], ["--expert", "1"], ["--job", "router"]):
        NodeProcess("train", ["--role", "trainer", "--local", "--workdir", str(work), *job, "--steps", "30"],
                    tmp / "train.log").proc.wait(timeout=1800)  # fmt: skip
    nodes, liar, observer = [], None, None
    try:
        prep = NodeProcess(
            "preparer",
            ["--role", "prepare", "--serve", "--publish-local", "--workdir", str(work), "--limit", "300"]
            + ["--clusters", "2", "--host-maddrs", LOOPBACK],
            tmp / "prep.log",
        )
        nodes.append(prep)
        peers = prep.wait_for("--initial-peers", 300).split()
        prep.wait_for("publishing local checkpoint of router", 120)
        server = NodeProcess(
            "server",
            ["--role", "server", "--expert", "0,1", "--workdir", str(tmp / "server"), "--initial-peers", *peers]
            + ["--host-maddrs", LOOPBACK, "--threads", "1"],
            tmp / "server.log",
        )
        nodes.append(server)
        server.wait_for("serving expert", 300)
        observer = SwarmNode(SwarmConfig(str(tmp / "observer"), initial_peers=peers, host_maddrs=[LOOPBACK]))
        run = observer.run()
        deadline = time.monotonic() + 60
        while not (honest := observer.servers(run, [0, 1])).keys() >= {0, 1} and time.monotonic() < deadline:
            time.sleep(1)

        def client(name: str) -> dict:
            out = tmp / f"{name}.png"
            t0 = time.perf_counter()
            NodeProcess(
                name,
                ["--role", "client", *PROMPTS[:images], "--workdir", str(tmp / name), "--initial-peers", *peers]
                + ["--host-maddrs", LOOPBACK, "--steps", "20", "--mode", "top1", "--output", str(out)],
                tmp / f"{name}.log",
            ).proc.wait(timeout=900)
            routing = json.loads(out.with_suffix(".json").read_text())
            routing["seconds_per_image"] = (time.perf_counter() - t0) / images
            return routing

        quiet = client("quiet")
        liar = LyingServer(tmp, peers, honest[0][0])
        while len(observer.servers(run, [0]).get(0, [])) < 2 and time.monotonic() < deadline + 60:
            time.sleep(1)
        lied = client("lied")
        asked = liar.answered
        prep.wait_for("holding a proof against", 60)
        second = client("second")
        used = sum(w.get("0") == liar.record.peer for r in (lied, second) for w in r["where"])
        caught = lied["audit"]["caught"]
        return {
            "quiet_s": quiet["seconds_per_image"],
            "lied_s": lied["seconds_per_image"],
            "liar_answers": asked,
            "liar_answers_used": used,
            "served_before_caught": caught[0]["steps_served_before_caught"] if caught else None,
            "caught": len(caught),
            "extra_forwards_per_image": lied["audit"]["extra_forwards_per_image"],
            "forwards_per_image": lied["audit"]["forwards_per_image"],
            "second_asked_liar": liar.answered - asked,
            "second_caught": len(second["audit"]["caught"]),
        }
    finally:
        if liar is not None:
            liar.close()
        if observer is not None:
            observer.shutdown()
        for n in reversed(nodes):
            n.stop()


def serving_lines(s: dict, images: int) -> list[str]:
    return [
        f"Serving, a lying server beside an honest one (expert 0; {images} images per client, 20 steps, top-1,"
        " default audit): the liar answered "
        f"{s['liar_answers']} request(s); its answers used in an image: {s['liar_answers_used']}; answers it "
        f"got accepted before it was caught: {s['served_before_caught']}. The audit cost "
        f"{s['extra_forwards_per_image']:.1f} extra expert forwards per image on top of "
        f"{s['forwards_per_image']:.0f}. Client seconds per image with the liar up "
        f"{s['lied_s']:.2f}, before it was up {s['quiet_s']:.2f}: ratio {s['lied_s'] / s['quiet_s']:.2f}. "
        f"A second client (a new identity) checked the published proof: it asked the liar "
        f"{s['second_asked_liar']} time(s). Seconds per image are whole client processes (join, fetch, draw, "
        "leave) divided by the images; the client that caught the liar also waited at exit until the run's "
        "preparer held its proof.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.0, help="the honest trainer's budget per phase")
    ap.add_argument("--flood", type=int, default=5000, help="claims in the DHT flood, one key each")
    ap.add_argument("--images", type=int, default=4, help="images per client in the serving phase")
    ap.add_argument("--serving-only", action="store_true", help="only the lying-server phase")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        tmp = Path(d)
        data = prepare(tmp)
        serving = serving_phase(tmp / "serving", data, args.images)
        print("serving:", json.dumps(serving), flush=True)
        if args.serving_only:
            n = args.images
            text = "\n".join(
                [f"## A lying server ({time.strftime('%Y-%m-%d')})", "", f"Machine: {machine()}. Loopback.", ""]
                + serving_lines(serving, args.images)
                + ["", f"Command: `.venv/bin/python benchmarks/adversarial.py --serving-only --images {n}`", ""]
            )
            print(text)
            append_section(text, args.out)
            return
        t0 = time.perf_counter()
        signer = ManyKeys(args.flood)  # made before the phases: key making is the stranger's own cost
        print(f"{args.flood} keys made in {time.perf_counter() - t0:.0f}s", flush=True)
        quiet = phase(tmp / "quiet", data, args.minutes, None)
        print("quiet:", json.dumps(quiet), flush=True)
        attacked = phase(tmp / "attacked", data, args.minutes, signer)
        print("attacked:", json.dumps(attacked), flush=True)
    tried = sum(attacked["tried"].values())
    a_rate, q_rate = attacked["samples_per_s"], quiet["samples_per_s"]
    rows = [f"| {what} | {n} |" for what, n in sorted(attacked["tried"].items())]
    lines = [
        f"## Honest training under attack ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Loopback, every node on the same machine (the stranger's nodes and the",
        "preparer's verification share the two cores with the honest trainer).",
        "",
        "| attack (a fresh key each round) | tried |",
        "|---|---:|",
        *rows,
        "",
        f"Attacks tried: {tried}; accepted: {len(attacked['accepted'])}"
        + (f" ({', '.join(attacked['accepted'])})" if attacked["accepted"] else "")
        + ".",
        f"Honest trainer (`tiny` expert 0, one thread, {args.minutes:g} min): {a_rate:.0f} samples/s "
        f"attacked, {q_rate:.0f} quiet: ratio {a_rate / q_rate:.2f}.",
        f"DHT flood: {attacked['flood'].get('records', 0)} records ({args.flood} claims on the honest trainer's job,"
        f" one key each, {args.flood // 5} presence records, 8 claims under one key's extra subkeys), "
        f"{attacked['flood'].get('stored', 0)} of them stored by some peer. Honest `--role status --once` during "
        f"the flood {attacked['status_s']:.1f}s, quiet {quiet['status_s']:.1f}s: ratio "
        f"{attacked['status_s'] / quiet['status_s']:.2f}.",
        "",
        *serving_lines(serving, args.images),
        "",
        f"Command: `.venv/bin/python benchmarks/adversarial.py --minutes {args.minutes:g} --flood {args.flood}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    append_section(text, args.out)


if __name__ == "__main__":
    main()
