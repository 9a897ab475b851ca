"""Honest training while strangers attack the run, side by side in one run of this script.

Two phases on the same prepared data, each a serving preparer (the run's owner and verifier) and
one honest trainer training expert 0 for the same wall-clock budget:

* quiet: nobody else;
* attacked: a stranger, with a fresh key every round (a banned key is cheap to replace), tries
  every attack of README's threat-model table again and again: a checkpoint record at step 10⁹
  for every job, a poisoned checkpoint (random weights, valid hash, plausible step), a claim with
  t0 = 0 on the honest trainer's job, a plausible claim that never trains, a run record and a
  directory entry that would redirect the run, junk bytes announced under a shard's hash.

An observer following the run checks every second whether any attack was accepted: a refused or
bogus checkpoint counted as a job's latest, a squatter owning a job (the t0 = 0 one at once, the
plausible one after the grace period), the run redirected. Reported: attacks tried, accepted
(goal 0), and the honest trainer's samples/s attacked ÷ quiet.

    .venv/bin/python benchmarks/adversarial.py [--minutes 2]
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

import torch  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

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
    RunDirRecord,
    RunRecord,
    RunRef,
    ckpt_key,
    claim_key,
    run_key,
    runs_key,
)

GRACE_S = 30.0  # the run's claim grace, short so the plausible squat must expire within a phase


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
                self.halt.wait(10.0)
            finally:
                blobs.shutdown()
                node.shutdown()


def watch(
    observer: SwarmNode, run: RunRecord, attacker: Attacker | None, halt: threading.Event, accepted: set[str]
) -> None:
    while not halt.wait(1.0):
        try:
            if observer.run().manifest_sha256 != run.manifest_sha256:
                accepted.add("run redirected")
            if attacker is None:
                continue
            snap = observer.snapshot(run)
            for job in run.jobs():
                ck = claims.latest_checkpoint(snap, job)
                if ck is not None and ck.sha256 in attacker.bad_hashes:
                    accepted.add(f"bad checkpoint counted for {job}")
                owner = claims.winner(snap, job)
                squat = attacker.squatters.get(job)
                if owner in attacker.keys and (squat is None or owner != squat[0]):
                    accepted.add(f"t0 = 0 squat owns {job}")
                if squat and owner == squat[0] and get_dht_time() - squat[1] > GRACE_S + 15:
                    accepted.add(f"plausible squat still owns {job} after the grace")
        except Exception as e:  # a slow read under load: the next second tries again
            print(f"observer: {e!r}", flush=True)


def phase(tmp: Path, data: Path, minutes: float, attacked: bool) -> dict:
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
        if attacked:
            attacker = Attacker(tmp, peers, ref, run, tmp / "run")
            attacker.start()
        watcher = threading.Thread(target=watch, args=(observer, run, attacker, halt, accepted), daemon=True)
        watcher.start()
        honest = NodeProcess(
            "honest",
            ["--role", "trainer", "--workdir", str(tmp / "t"), "--run", str(ref), "--expert", "0", "--threads", "1"]
            + ["--minutes", str(minutes), "--initial-peers", *peers, "--host-maddrs", LOOPBACK],
            tmp / "t.log",
        )
        nodes.append(honest)
        honest.proc.wait(timeout=minutes * 60 + 600)
        halt.set()
        if attacker is not None:
            attacker.halt.set()
            attacker.join(timeout=60)
        meta = latest_checkpoint(tmp / "t" / "swarm" / "checkpoints" / "expert_0").meta
        lost = "another node now wins" in (tmp / "t.log").read_text()
        return {
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.0, help="the honest trainer's budget per phase")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        tmp = Path(d)
        data = prepare(tmp)
        quiet = phase(tmp / "quiet", data, args.minutes, attacked=False)
        print("quiet:", json.dumps(quiet), flush=True)
        attacked = phase(tmp / "attacked", data, args.minutes, attacked=True)
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
        "",
        f"Command: `.venv/bin/python benchmarks/adversarial.py --minutes {args.minutes:g}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    append_section(text, args.out)


if __name__ == "__main__":
    main()
