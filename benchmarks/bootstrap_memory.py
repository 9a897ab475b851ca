"""Memory of a bootstrap (and relay) peer, side by side with hivemind's own ``hivemind-dht``.

Each one is started alone on loopback, left to settle, and measured over its whole process tree (the
node, its DHT process, its p2pd and anything else it started): resident memory (RSS, what ``top``
shows, counting shared pages in every process) and proportional memory (PSS, shared pages split
between the processes that share them: what the tree really costs a small machine). The two are
measured alternately, ``--rounds`` times each; medians.

    python -m benchmarks.bootstrap_memory [--rounds 3] [--settle 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import append_section, machine

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            out += tree(int(child))
    return out


def _field(path: str, name: str) -> float:
    for line in Path(path).read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1]) / 1024  # kB → MiB
    return 0.0


def measure(cmd: list[str], settle: float) -> tuple[float, float, list[str]]:
    """(PSS MiB, RSS MiB, the processes) of ``cmd``'s tree after ``settle`` seconds."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        time.sleep(settle)
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} while settling")
        pids = tree(proc.pid)
        pss = sum(_field(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
        rss = sum(_field(f"/proc/{p}/status", "VmRSS:") for p in pids)
        names = [Path(f"/proc/{p}/comm").read_text().strip() for p in pids]
        return pss, rss, names
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=20.0, help="seconds each peer runs before it is measured")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    dht = str(Path(sys.executable).with_name("hivemind-dht"))
    ours, theirs, names = [], [], {}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            order = [("ours", True), ("hivemind-dht", False)][:: 1 if r % 2 == 0 else -1]
            for name, is_ours in order:
                cmd = (
                    [sys.executable, "node.py", "--role", "bootstrap", "--workdir", work, "--host-maddrs", LOOPBACK]
                    if is_ours
                    else [dht, "--host_maddrs", LOOPBACK]
                )
                pss, rss, procs = measure(cmd, args.settle)
                (ours if is_ours else theirs).append((pss, rss))
                names[name] = procs
                print(f"round {r + 1}: {name}: PSS {pss:.0f} MiB, RSS {rss:.0f} MiB ({', '.join(procs)})", flush=True)
    med = {
        k: (statistics.median(p for p, _ in v), statistics.median(r for _, r in v))
        for k, v in (("ours", ours), ("dht", theirs))
    }
    ratio_pss, ratio_rss = med["ours"][0] / med["dht"][0], med["ours"][1] / med["dht"][1]
    print(f"bootstrap ÷ hivemind-dht: PSS {ratio_pss:.2f}x, RSS {ratio_rss:.2f}x")
    if args.no_write:
        return
    append_section(
        f"## A bootstrap peer's memory ({time.strftime('%Y-%m-%d')})\n\n"
        f"Machine: {machine()}. `node.py --role bootstrap` (it relays by default) and hivemind's own `hivemind-dht`, "
        f"each alone on loopback for {args.settle:.0f} s, measured over its whole process tree, alternately, "
        f"{args.rounds} rounds; medians.\n\n"
        "| | PSS | RSS | processes |\n|---|---:|---:|---|\n"
        f"| `node.py --role bootstrap` | {med['ours'][0]:.0f} MiB | {med['ours'][1]:.0f} MiB "
        f"| {', '.join(names['ours'])} |\n"
        f"| `hivemind-dht` | {med['dht'][0]:.0f} MiB | {med['dht'][1]:.0f} MiB | {', '.join(names['hivemind-dht'])} |\n"
        f"| ratio | {ratio_pss:.2f} | {ratio_rss:.2f} | |\n\n"
        "The bootstrap imports only the swarm's mechanisms (`swarm/`), no model, data or training code. What both "
        "hold is hivemind's: importing `hivemind.dht` runs hivemind's package `__init__`, which imports torch, so "
        "either peer carries torch (and its shared-memory manager) although neither uses it.\n\n"
        "Command: `.venv/bin/python -m benchmarks.bootstrap_memory "
        f"--rounds {args.rounds} --settle {args.settle:.0f}`\n"
    )


if __name__ == "__main__":
    main()
