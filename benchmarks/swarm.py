"""Swarm overheads, each measured side by side in one run and reported as a ratio:

1. checkpoint transfer over hivemind P2P on loopback (a ``B/2``-sized expert checkpoint,
   fetched and hash-verified) vs copying the same files on the local disk;
2. swarm trainer samples/s (claim, heartbeats, presence, publishing) ÷ the bare local loop,
   same preset and data, both as ``node.py`` subprocesses for the same number of steps.

    .venv/bin/python benchmarks/swarm.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.results import RESULTS, append_section, machine  # noqa: E402
from data.checkpoint import latest_checkpoint, save_checkpoint  # noqa: E402
from experts.presets import build_expert, get_preset  # noqa: E402
from roles.local import LOOPBACK, NodeProcess  # noqa: E402
from swarm import claims  # noqa: E402
from swarm.blobs import BlobService, BlobStore  # noqa: E402
from swarm.dht import SwarmConfig, SwarmNode  # noqa: E402
from swarm.records import HEARTBEAT_S  # noqa: E402

LOOP = [LOOPBACK]


def transfer(tmp: Path) -> tuple[float, float, int]:
    """(P2P MB/s, local copy MB/s, bytes) for a B/2 expert checkpoint."""
    with torch.device("cpu"):
        model = build_expert(get_preset("B/2"), 768)
    ckpt = save_checkpoint(tmp / "src", 1, model, {"kind": "expert"})
    del model
    size = sum(p.stat().st_size for p in ckpt.path.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    shutil.copytree(ckpt.path, tmp / "copy")
    local = size / (time.perf_counter() - t0) / 1e6
    a = SwarmNode(SwarmConfig(str(tmp / "a"), host_maddrs=LOOP))
    b = SwarmNode(SwarmConfig(str(tmp / "b"), initial_peers=a.maddrs(), host_maddrs=LOOP))
    sa, sb = BlobService(a.dht, BlobStore()), BlobService(b.dht, BlobStore())
    try:
        sa.store.add_checkpoint(ckpt)
        t0 = time.perf_counter()
        sb.fetch_checkpoint(ckpt.sha256, [a.peer_id], tmp / "fetched")  # includes the sha256 checks
        p2p = size / (time.perf_counter() - t0) / 1e6
    finally:
        sa.shutdown(), sb.shutdown(), b.shutdown(), a.shutdown()
    return p2p, local, size


def rate(meta: dict) -> float:
    return meta["samples_seen"] / meta["train_seconds"]


def serve(tmp: Path, extra: list[str] = ()) -> tuple[NodeProcess, list[str]]:
    """A preparer serving a 2-cluster run; returns it and the --initial-peers to join it."""
    tmp.mkdir(parents=True, exist_ok=True)
    prep = NodeProcess(
        "preparer",
        ["--role", "prepare", "--serve", "--workdir", str(tmp / "prep"), "--limit", "1200", "--clusters", "2"]
        + ["--host-maddrs", LOOPBACK, *extra],
        tmp / "prep.log",
    )
    return prep, prep.wait_for("--initial-peers", 300).split()


def training(tmp: Path, steps: int) -> tuple[float, float]:
    """(bare local samples/s, swarm samples/s) for expert 0 of the same prepared data."""
    prep, peers = serve(tmp)
    try:
        common = ["--expert", "0", "--steps", str(steps), "--ckpt-every", "100"]
        local = NodeProcess(
            "local",
            ["--role", "trainer", "--local", "--workdir", str(tmp / "prep"), "--ckpt-dir", str(tmp / "local_ckpt")]
            + common,
            tmp / "local.log",
        )
        local.proc.wait(timeout=1800)
        swarm = NodeProcess(
            "swarm",
            ["--role", "trainer", "--workdir", str(tmp / "t"), "--initial-peers", *peers, "--host-maddrs", LOOPBACK]
            + common,
            tmp / "swarm.log",
        )
        swarm.proc.wait(timeout=1800)
        swarm.stop()
        local_meta = latest_checkpoint(tmp / "local_ckpt" / "expert_0").meta
        swarm_meta = latest_checkpoint(tmp / "t" / "swarm" / "checkpoints" / "expert_0").meta
        return rate(local_meta), rate(swarm_meta)
    finally:
        prep.stop()


def takeover(tmp: Path, heartbeat: float) -> dict:
    """Seconds from SIGKILL of an expert's owner (its whole process group: the machine is gone) to
    another trainer owning the job, and to that trainer having loaded the last published checkpoint
    and training again. Two trainers ask for expert 0; the second waits and mirrors."""
    prep, peers = serve(tmp)
    nodes = [prep]
    observer = SwarmNode(SwarmConfig(str(tmp / "observer"), initial_peers=peers, host_maddrs=[LOOPBACK]))
    try:
        join = ["--initial-peers", *peers, "--host-maddrs", LOOPBACK]
        flags = ["--expert", "0", "--heartbeat", str(heartbeat), "--ckpt-every", "50", "--threads", "1", *join]
        owner = NodeProcess("owner", ["--role", "trainer", "--workdir", str(tmp / "a"), *flags], tmp / "a.log")
        nodes.append(owner)
        owner.wait_for("claimed expert_0", 300)
        waiting = NodeProcess("waiting", ["--role", "trainer", "--workdir", str(tmp / "b"), *flags], tmp / "b.log")
        nodes.append(waiting)
        run = observer.run()
        deadline = time.monotonic() + 600
        while True:  # until the waiting trainer holds a mirror of the owner's latest checkpoint
            rec = claims.latest_checkpoint(observer.snapshot(run), "expert_0")
            mirror = tmp / "b" / "swarm" / "mirror" / "expert_0" / f"step_{rec.step:08d}" if rec else None
            if mirror is not None and (mirror / "meta.json").is_file():
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the waiting trainer never mirrored a checkpoint:\n" + waiting.tail())
            time.sleep(0.2)
        owner.signal(signal.SIGKILL)
        killed = time.monotonic()
        waiting.wait_for("claimed expert_0", 300, poll_s=0.05)
        owned = time.monotonic() - killed
        step = int(waiting.wait_for("resumed from step", 300, poll_s=0.05).split()[0])
        resumed = time.monotonic() - killed
        return {"heartbeat_s": heartbeat, "owned_s": owned, "resumed_s": resumed, "step": step, "published": rec.step}
    finally:
        observer.shutdown()
        for n in reversed(nodes):
            n.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--heartbeat", type=float, default=HEARTBEAT_S, help="claim renewal period of the takeover run")
    ap.add_argument("--only", choices=("transfer", "training", "takeover"), help="run one measurement")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    want = lambda name: args.only in (None, name)  # noqa: E731
    rows, data = [], {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        tmp = Path(d)
        if want("transfer"):
            p2p, local_copy, size = transfer(tmp / "xfer")
            data |= {"p2p_MBps": p2p, "local_copy_MBps": local_copy}
            rows.append(
                f"| P2P checkpoint transfer, `B/2` expert ({size / 1e6:.0f} MB, sha256-verified) | {p2p:.0f} MB/s "
                f"| local copy {local_copy:.0f} MB/s | {p2p / local_copy:.2f} |"
            )
            print(rows[-1], flush=True)
        if want("training"):
            bare, swarm = training(tmp / "train", args.steps)
            data |= {"bare": bare, "swarm": swarm}
            rows.append(
                f"| swarm trainer, `tiny` expert, {args.steps} steps | {swarm:.0f} samples/s | bare local loop "
                f"{bare:.0f} samples/s | {swarm / bare:.3f} |"
            )
            print(rows[-1], flush=True)
        if want("takeover"):
            t = takeover(tmp / "takeover", args.heartbeat)
            data["takeover"] = t
            lease = 3 * t["heartbeat_s"]
            rows += [
                f"| SIGKILLed owner → another trainer owns the expert | {t['owned_s']:.1f} s | claim lease "
                f"{lease:.0f} s (heartbeat {t['heartbeat_s']:.0f} s) | {t['owned_s'] / lease:.2f} |",
                f"| SIGKILLed owner → training again from the last published step ({t['step']}; published "
                f"{t['published']}) | {t['resumed_s']:.1f} s | claim lease {lease:.0f} s "
                f"| {t['resumed_s'] / lease:.2f} |",
            ]
            print("\n".join(rows[-2:]), flush=True)
    lines = [
        f"## Swarm overheads ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Loopback, every node on the same machine, measured side by side in one run.",
        "",
        "| measurement | value | side-by-side reference | ratio |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"Command: `.venv/bin/python benchmarks/swarm.py{f' --only {args.only}' if args.only else ''}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(json.dumps(data))
    append_section(text, args.out)


if __name__ == "__main__":
    main()
