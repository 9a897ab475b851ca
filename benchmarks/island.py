"""Compute islands, measured side by side in one run on the same prepared data and global batch:

* CPU: one job trained by 2 processes × 1 thread (torchrun, gloo) vs 1 process × 2 threads;
* with ``--device cuda``: DDP on 1 GPU (torchrun, one process) vs the plain loop: the wrapper's
  overhead.

Both report the training loop's samples/s from the final checkpoint (samples seen ÷ training
seconds), so start-up and process launch are not counted.

    .venv/bin/python benchmarks/island.py [--steps 200] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import RESULTS, append_section, machine  # noqa: E402
from data.checkpoint import latest_checkpoint  # noqa: E402
from roles.local import NodeProcess  # noqa: E402


def rate(ckpt_root: Path) -> float:
    meta = latest_checkpoint(ckpt_root).meta
    return meta["samples_seen"] / meta["train_seconds"]


def run(name: str, cmd: list[str], log: Path) -> None:
    proc = NodeProcess(name, cmd, log).proc
    if proc.wait(timeout=3600) != 0:
        raise RuntimeError(f"{name} failed:\n{log.read_text()[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        tmp = Path(d)
        work = tmp / "run"
        run(
            "prepare", ["--role", "prepare", "--workdir", str(work), "--limit", "600", "--clusters", "2"], tmp / "p.log"
        )
        job = ["--role", "trainer", "--local", "--workdir", str(work), "--expert", "0", "--steps", str(args.steps)]
        job += ["--device", args.device, "--ckpt-every", str(10 * args.steps)]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        node = str(ROOT / "node.py")
        if args.device == "cpu":
            run(
                "one",
                [*job, "--ckpt-dir", str(tmp / "one"), "--batch-size", str(args.batch), "--threads", "2"],
                tmp / "1.log",
            )
            island = [*torchrun, "--nproc-per-node", "2", "--", node, *job, "--ckpt-dir", str(tmp / "two")]
            run_raw(island + ["--batch-size", str(args.batch // 2), "--threads", "1"], tmp / "2.log")
            a, b = rate(tmp / "one" / "expert_0"), rate(tmp / "two" / "expert_0")
            row = (
                f"| `tiny` expert, global batch {args.batch}, {args.steps} steps | 2 processes × 1 thread "
                f"(torchrun, gloo): {b:.0f} samples/s | 1 process × 2 threads: {a:.0f} samples/s | {b / a:.2f} |"
            )
        else:
            run("plain", [*job, "--ckpt-dir", str(tmp / "plain"), "--batch-size", str(args.batch)], tmp / "1.log")
            island = [*torchrun, "--nproc-per-node", "1", "--", node, *job, "--ckpt-dir", str(tmp / "ddp")]
            # torchrun with one process: WORLD_SIZE=1 is no island, so force the wrapper on
            run_raw(island + ["--batch-size", str(args.batch)], tmp / "2.log", {"DIFFSWARM_ISLAND_OF_ONE": "1"})
            a, b = rate(tmp / "plain" / "expert_0"), rate(tmp / "ddp" / "expert_0")
            row = (
                f"| `tiny` expert, batch {args.batch}, {args.steps} steps, {args.device} | DDP, 1 process: "
                f"{b:.0f} samples/s | plain loop: {a:.0f} samples/s | {b / a:.3f} |"
            )
    lines = [
        f"## Compute islands ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Same prepared data and global batch, side by side in one run.",
        "",
        "| job | island | reference | ratio |",
        "|---|---:|---:|---:|",
        row,
        "",
        f"Command: `.venv/bin/python benchmarks/island.py --steps {args.steps} --device {args.device}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    append_section(text, args.out)


def run_raw(cmd: list[str], log: Path, env: dict | None = None) -> None:
    import subprocess

    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=full, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{cmd[:6]} failed:\n{log.read_text()[-3000:]}")


if __name__ == "__main__":
    main()
