"""What the web status page costs the node that serves it: the status node's CPU with 5 browser
windows open on its page ÷ the same node with none, taken side by side on one live swarm.

A small swarm on 127.0.0.1 (bootstrap peer, a preparer serving a 2-cluster run, one trainer that
keeps training and publishing checkpoints, so the snapshot and the chart change all the time) and
a ``--role status --web`` node. The node's CPU time (the node, its DHT process and its p2p daemon,
from /proc) is measured over alternating windows: no page open, then 5 visible headless Chromium
windows each polling the page, and again. Chromium's own CPU is not counted: it is the visitors'.

    python benchmarks/status_web.py [--window 60] [--rounds 2] [--tabs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import append_section, machine  # noqa: E402
from roles.local import LOOPBACK, NodeProcess  # noqa: E402
from swarm.lifeline import descendants  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every process under it, as /proc has them now."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone between the listing and the read
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15 of stat)
    return total


def measure(pid: int, seconds: float) -> float:
    """The process tree's CPU use over ``seconds`` of wall-clock, in % of one core."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def open_windows(url: str, n: int, profile: Path):
    """One headless Chromium with ``n`` windows on ``url`` (windows, not tabs: each is visible, so
    none stops polling the way a hidden tab does; this is the page's most expensive case)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))
    driver.get(url)
    for _ in range(n - 1):
        driver.switch_to.new_window("window")
        driver.get(url)
    return driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=60.0, help="seconds per measurement window")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of windows (none, then open)")
    ap.add_argument("--tabs", type=int, default=5, help="browser windows open on the page")
    ap.add_argument("--no-report", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="diffswarm-bench-web-"))
    logs = work / "logs"
    logs.mkdir()
    nodes: list[NodeProcess] = []
    try:
        boot = NodeProcess("bootstrap", ["--role", "bootstrap", "--workdir", str(work), "--host-maddrs", LOOPBACK],
                           logs / "bootstrap.log")  # fmt: skip
        nodes.append(boot)
        join = ["--initial-peers", *boot.wait_for("--initial-peers", 120).split(), "--host-maddrs", LOOPBACK]
        prep = NodeProcess("preparer", ["--role", "prepare", "--serve", "--workdir", str(work), "--limit", "160",
                                        "--clusters", "2", *join], logs / "preparer.log")  # fmt: skip
        nodes.append(prep)
        prep.wait_for("serving run", 900)
        train = ["--role", "trainer", "--workdir", str(work / "trainer"), "--threads", "1", "--batch-size", "8"]
        trainer = NodeProcess("trainer", [*train, "--ckpt-every", "20", *join], logs / "trainer.log")
        nodes.append(trainer)
        trainer.wait_for("claimed ", 300)
        web = NodeProcess("status_web", ["--role", "status", "--web", "127.0.0.1:0", "--workdir",
                                         str(work / "status"), *join], logs / "status.log")  # fmt: skip
        nodes.append(web)
        url = web.wait_for("watch the swarm at ", 120).strip()
        time.sleep(20)  # its first ledger fetch and the trainer's first checkpoints are behind it
        rows: list[tuple[str, float]] = []
        for r in range(args.rounds):
            rows.append(("none", measure(web.pid, args.window)))
            driver = open_windows(url, args.tabs, work / f"profile-{r}")
            try:
                time.sleep(5)  # every window has loaded the page and its chart
                rows.append(("open", measure(web.pid, args.window)))
            finally:
                driver.quit()
            print(f"round {r + 1}: none {rows[-2][1]:.1f} %, {args.tabs} windows {rows[-1][1]:.1f} %", flush=True)
    finally:
        for n in reversed(nodes):
            n.stop()
        shutil.rmtree(work, ignore_errors=True)

    none = [v for k, v in rows if k == "none"]
    opened = [v for k, v in rows if k == "open"]
    ratio = (sum(opened) / len(opened)) / (sum(none) / len(none))
    result = {"window_s": args.window, "rounds": args.rounds, "tabs": args.tabs, "none": none, "open": opened}
    print(json.dumps(result | {"ratio": ratio}))
    if not args.no_report:
        append_section(
            "## The web status page's cost to its node\n\n"
            f"Machine: {machine()}. A live 2-cluster swarm on 127.0.0.1 with one trainer publishing "
            f"checkpoints; the `--role status --web` node's CPU (node, DHT process and p2pd) over "
            f"{args.window:.0f} s windows, alternating no page open and {args.tabs} visible headless Chromium "
            "windows polling it (`python benchmarks/status_web.py`).\n\n"
            "| window | status node CPU, % of a core |\n|---|---|\n"
            + "".join(f"| {k} | {v:.1f} |\n" for k, v in rows)
            + f"\n{args.tabs} windows ÷ none: **{ratio:.2f}**.\n"
        )


if __name__ == "__main__":
    main()
