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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.train_throughput import machine  # noqa: E402
from experts.checkpoint import latest_checkpoint, save_checkpoint  # noqa: E402
from experts.presets import build_expert, get_preset  # noqa: E402
from swarm.blobs import BlobService, BlobStore  # noqa: E402
from swarm.dht import SwarmConfig, SwarmNode  # noqa: E402

LOOP = ["/ip4/127.0.0.1/tcp/0"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


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


def node(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "node.py"), *args],
        cwd=ROOT,
        env=ENV,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def rate(meta: dict) -> float:
    return meta["samples_seen"] / meta["train_seconds"]


def training(tmp: Path, steps: int) -> tuple[float, float]:
    """(bare local samples/s, swarm samples/s) for expert 0 of the same prepared data."""
    tmp.mkdir(parents=True, exist_ok=True)
    prep = node(
        "--role",
        "prepare",
        "--serve",
        "--workdir",
        str(tmp / "prep"),
        "--limit",
        "1200",
        "--clusters",
        "2",
        "--host-maddrs",
        LOOP[0],
        log=tmp / "prep.log",
    )
    try:
        deadline = time.time() + 300
        while "--initial-peers" not in (tmp / "prep.log").read_text():
            if time.time() > deadline or prep.poll() is not None:
                raise RuntimeError((tmp / "prep.log").read_text()[-2000:])
            time.sleep(1)
        peers = (tmp / "prep.log").read_text().split("--initial-peers", 1)[1].split("\n")[0].split()
        common = ["--expert", "0", "--steps", str(steps), "--ckpt-every", "100"]
        local = node(
            "--role",
            "trainer",
            "--local",
            "--workdir",
            str(tmp / "prep"),
            "--ckpt-dir",
            str(tmp / "local_ckpt"),
            *common,
            log=tmp / "local.log",
        )
        local.wait(timeout=1800)
        swarm = node(
            "--role",
            "trainer",
            "--workdir",
            str(tmp / "t"),
            "--initial-peers",
            *peers,
            "--host-maddrs",
            LOOP[0],
            *common,
            log=tmp / "swarm.log",
        )
        swarm.wait(timeout=1800)
        local_meta = latest_checkpoint(tmp / "local_ckpt" / "expert_0").meta
        swarm_meta = latest_checkpoint(tmp / "t" / "swarm" / "checkpoints" / "expert_0").meta
        return rate(local_meta), rate(swarm_meta)
    finally:
        prep.send_signal(signal.SIGTERM)
        try:
            prep.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prep.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        p2p, local_copy, size = transfer(tmp / "xfer")
        print(f"transfer: P2P {p2p:.0f} MB/s, local copy {local_copy:.0f} MB/s, {size / 1e6:.0f} MB", flush=True)
        bare, swarm = training(tmp / "train", args.steps)
    lines = [
        f"## Swarm overheads ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Loopback, both sides on the same machine, measured side by side in one run.",
        "",
        "| measurement | value | side-by-side reference | ratio |",
        "|---|---:|---:|---:|",
        f"| P2P checkpoint transfer, `B/2` expert ({size / 1e6:.0f} MB, sha256-verified) | {p2p:.0f} MB/s "
        f"| local copy {local_copy:.0f} MB/s | {p2p / local_copy:.2f} |",
        f"| swarm trainer, `tiny` expert, {args.steps} steps | {swarm:.0f} samples/s | bare local loop {bare:.0f} "
        f"samples/s | {swarm / bare:.3f} |",
        "",
        "Command: `.venv/bin/python benchmarks/swarm.py`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"p2p_MBps": p2p, "local_copy_MBps": local_copy, "bare": bare, "swarm": swarm}))
    out = Path(args.out)
    out.write_text((out.read_text() if out.exists() else "# Benchmark results\n\n") + text + "\n")


if __name__ == "__main__":
    main()
