"""Churn soak: a local swarm that keeps training and generating while its nodes are killed.

A bootstrap peer, the preparer serving a small trained run, 3 trainers (2 experts + the router:
every job has an owner), 2 servers that both serve both experts (with ``--follow``), and a client
that generates one image after another. Every 30–60 s a random trainer or server gets SIGKILL
or SIGTERM (to its main pid, as ``kill`` would) and is restarted with the same command line.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--kill-every 30 60] [--seed 0]

Reported (and appended to ``benchmarks/RESULTS.md``):

- images requested and completed, and the failures;
- per trainer kill: the step it had reached, the step the job was resumed from, and how long
  until it trained again (a takeover, by another trainer or by the restarted one);
- how long SIGTERMed nodes took to stop; processes left behind at the end;
- resident memory of the long-lived nodes (bootstrap, preparer, and the main process plus the
  DHT process and p2pd) from after start-up to the end.

The step a SIGKILLed trainer had reached is read from its presence record, which trails the
truth by up to ``log_every`` steps or one heartbeat; "published progress lost" compares the
last checkpoint published before the kill with the step the job resumed from, which is exact.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from roles.local import LOOPBACK, NodeProcess  # noqa: E402
from swarm import claims  # noqa: E402
from swarm.lifeline import descendants, is_alive, rss_bytes  # noqa: E402
from swarm.records import PeerRecord, peers_key  # noqa: E402

CLAIMED = re.compile(r"claimed (\S+) as")


@dataclass
class SoakConfig:
    workdir: str = "runs/soak"
    minutes: float = 30.0
    kill_every: tuple[float, float] = (30.0, 60.0)
    # The churn goes on past `minutes` until this many kills: a SIGTERMed node that takes long to
    # save and publish on a loaded machine pushes every later kill back (bounded by 3x `minutes`).
    min_kills: int = 0
    trainers: int = 3
    servers: int = 2
    limit: int = 300  # images in the run (2 clusters)
    warm_steps: int = 6  # trained locally before the swarm starts, so servers have checkpoints
    ckpt_every: int = 20
    client_steps: int = 8
    seed: int = 0
    prepared: str = ""  # a prepared and locally trained run to copy instead (tests reuse theirs)


@dataclass
class Kill:
    t: float  # seconds since the churn began
    node: str
    signal: str
    stop_s: float | None = None  # SIGTERM: seconds until the node exited
    job: str = ""  # trainers: the job it owned
    step: int = 0  # ... the step it had reached (presence record)
    published: int = 0  # ... the last checkpoint of that job published before the kill
    resumed: int | None = None  # ... the step the job resumed from afterwards
    takeover_s: float | None = None  # ... seconds from the kill until it trained again
    at: float = field(default=0.0, repr=False)  # time.monotonic() of the kill


@dataclass
class SoakReport:
    minutes: float  # the churn's length as run
    kill_every: tuple[float, float] = (30.0, 60.0)
    requested: int = 0
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    left_behind: list[int] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # nodes that exited without being told (restarted)
    rss_mb: dict[str, tuple[float, float]] = field(default_factory=dict)  # node → (after start, end)


class LogWatcher:
    """Follows trainer logs for "claimed J" / "resumed from step N" lines, with the time seen."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, int]] = []  # (monotonic, job, step)
        self._read: dict[Path, int] = {}
        self._job: dict[Path, str] = {}

    def poll(self, logs: list[Path]) -> None:
        now = time.monotonic()
        for log in logs:
            if not log.exists():
                continue
            text = log.read_text(errors="replace")
            new, self._read[log] = text[self._read.get(log, 0) :], len(text)
            for line in new.splitlines():
                if m := CLAIMED.search(line):
                    self._job[log] = m.group(1)
                elif "resumed from step" in line and log in self._job:
                    step = int(line.split("resumed from step", 1)[1].split()[0])
                    self.events.append((now, self._job[log], step))


class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.work = Path(cfg.workdir)
        self.logs = self.work / "logs"
        self.rng = random.Random(cfg.seed)
        self.nodes: dict[str, NodeProcess] = {}
        self.commands: dict[str, list[str]] = {}
        self.helpers: set[int] = set()
        self.report = SoakReport(cfg.minutes, tuple(cfg.kill_every))
        self.watcher = LogWatcher()
        self.observer = None
        self._stop = threading.Event()

    # ---------------------------------------------------------------- nodes
    def start(self, name: str, args: list[str]) -> NodeProcess:
        self.commands[name] = args
        n = NodeProcess(name, args, self.logs / f"{name}-{len(list(self.logs.glob(name + '-*')))}.log")
        self.nodes[name] = n
        return n

    def note_helpers(self) -> None:
        for n in self.nodes.values():
            if n.alive():
                self.helpers.update(descendants(n.pid))

    def setup(self) -> list[str]:
        shutil.rmtree(self.work, ignore_errors=True)
        self.logs.mkdir(parents=True)
        run = self.work / "run"
        py = [sys.executable, str(ROOT / "node.py")]
        data = ["--limit", str(self.cfg.limit), "--clusters", "2", "--objective", "mixed"]
        if self.cfg.prepared:
            shutil.copytree(self.cfg.prepared, run)
        else:
            subprocess.run([*py, "--role", "prepare", "--workdir", str(run), *data], check=True, cwd=ROOT)
            for job in (["--expert", "0"], ["--expert", "1"], ["--job", "router"]):
                subprocess.run(
                    [*py, "--role", "trainer", "--local", "--workdir", str(run), *job]
                    + ["--steps", str(self.cfg.warm_steps), "--batch-size", "16"],
                    check=True,
                    cwd=ROOT,
                )
        loop = ["--host-maddrs", LOOPBACK]
        boot = self.start("bootstrap", ["--role", "bootstrap", "--workdir", str(self.work / "boot"), *loop])
        peers = boot.wait_for("--initial-peers", 120).split()
        join = ["--initial-peers", *peers, *loop]
        prep = self.start(
            "preparer", ["--role", "prepare", "--serve", "--publish-local", "--workdir", str(run)] + data + join
        )
        prep.wait_for("publishing local checkpoint of router", 600)
        from swarm.dht import SwarmConfig, SwarmNode

        self.observer = SwarmNode(SwarmConfig(str(self.work / "observer"), initial_peers=peers, host_maddrs=[LOOPBACK]))
        serve = ["--role", "server", "--expert", "0,1", "--follow", "--threads", "1", *join]
        for i in range(self.cfg.servers):
            self.start(f"server_{i}", [*serve, "--workdir", str(self.work / f"server_{i}")])
        for i in range(self.cfg.trainers):
            self.start(
                f"trainer_{i}",
                ["--role", "trainer", "--workdir", str(self.work / f"trainer_{i}"), "--threads", "1", *join]
                + ["--ckpt-every", str(self.cfg.ckpt_every), "--batch-size", "16"],
            )
        for i in range(self.cfg.servers):
            self.nodes[f"server_{i}"].wait_for("serving expert", 300)
        for i in range(self.cfg.trainers):
            self.nodes[f"trainer_{i}"].wait_for("claimed ", 300)
        self.note_helpers()
        return join

    # ---------------------------------------------------------------- the client
    def client_loop(self, join: list[str]) -> None:
        prompts = ["red apple", "grinning face", "red heart", "sun", "rocket", "dog face"]
        i = 0
        while not self._stop.is_set():
            out = self.work / "images" / f"{i:04d}.png"
            out.parent.mkdir(exist_ok=True)
            self.report.requested += 1
            args = ["--role", "client", prompts[i % len(prompts)], "--workdir", str(self.work / "client"), *join]
            args += ["--steps", str(self.cfg.client_steps), "--mode", "topk", "--k", "2", "--seed", str(i)]
            # A killed node takes up to a minute to be back when 8 share 2 cores: wait that long for
            # a server or the router's checkpoint rather than the default 30 s.
            args += ["--server-timeout", "120"]
            client = NodeProcess("client", [*args, "--output", str(out)], self.logs / f"client-{i:04d}.log")
            try:
                rc = client.proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                client.stop()
                rc = "timeout"
            if rc == 0 and out.exists():
                self.report.completed += 1
            else:
                self.report.failures.append(f"image {i}: exit {rc}: {client.tail(1)[-300:]}")
            i += 1

    # ---------------------------------------------------------------- churn
    def presence(self, log: Path) -> PeerRecord | None:
        m = re.search(r"trainer (\w+) joined the swarm", log.read_text(errors="replace"))
        if m is None:
            return None
        return next((p for p in self.observer.read(peers_key(), PeerRecord).values() if p.peer == m.group(1)), None)

    def kill_one(self, t: float) -> Kill:
        name = self.rng.choice([n for n in self.nodes if n.startswith(("trainer_", "server_"))])
        sig = self.rng.choice([signal.SIGKILL, signal.SIGTERM])
        node = self.nodes[name]
        kill = Kill(round(t, 1), name, sig.name)
        if name.startswith("trainer_") and (p := self.presence(node.log)) is not None and p.job:
            kill.job, kill.step = p.job, p.step
            run = self.observer.run()
            rec = claims.latest_checkpoint(self.observer.snapshot(run), p.job) if run else None
            kill.published = rec.step if rec else 0
        self.note_helpers()
        killed_at = time.monotonic()
        node.proc.send_signal(sig)
        try:
            node.proc.wait(timeout=60)
            if sig == signal.SIGTERM:
                kill.stop_s = round(time.monotonic() - killed_at, 1)
        except subprocess.TimeoutExpired:
            node.stop()
        kill.at = killed_at
        self.start(name, self.commands[name])
        return kill

    def settle_takeovers(self) -> None:
        for k in self.report.kills:
            if not k.job or k.takeover_s is not None:
                continue
            after = [(t, step) for t, job, step in self.watcher.events if job == k.job and t > k.at]
            if after:
                k.takeover_s, k.resumed = round(after[0][0] - k.at, 1), after[0][1]

    def run(self) -> SoakReport:
        join = self.setup()
        rss0: dict[str, int] = {}
        client = threading.Thread(target=self.client_loop, args=(join,), daemon=True)
        client.start()
        t0 = time.monotonic()
        end = t0 + self.cfg.minutes * 60
        hard_end = t0 + 3 * self.cfg.minutes * 60
        next_kill = t0 + self.rng.uniform(*self.cfg.kill_every)
        try:
            while time.monotonic() < end or (
                len(self.report.kills) < self.cfg.min_kills and time.monotonic() < hard_end
            ):
                self.watcher.poll(sorted(self.logs.glob("trainer_*.log")))
                self.settle_takeovers()
                if not rss0 and time.monotonic() - t0 > 30:  # after start-up
                    rss0 = self.rss()
                for name, n in list(self.nodes.items()):
                    if not n.alive():  # not killed by us (kill_one restarts at once): a crash
                        self.report.crashes.append(f"{name} exited {n.proc.returncode}: {n.tail(1)[-300:]}")
                        self.start(name, self.commands[name])
                if time.monotonic() >= next_kill:
                    self.report.kills.append(self.kill_one(time.monotonic() - t0))
                    next_kill = time.monotonic() + self.rng.uniform(*self.cfg.kill_every)
                time.sleep(0.5)
            self.report.minutes = round((time.monotonic() - t0) / 60, 1)
            self._stop.set()
            client.join(timeout=600)
            self.watcher.poll(sorted(self.logs.glob("trainer_*.log")))
            self.settle_takeovers()
            rss1 = self.rss()
            self.report.rss_mb = {
                n: (round(rss0[n] / 2**20, 1), round(rss1[n] / 2**20, 1)) for n in rss0 if n in rss1 and rss1[n]
            }
        finally:
            self._stop.set()
            self.note_helpers()
            for name in reversed(list(self.nodes)):
                n = self.nodes[name]
                if n.alive():
                    n.proc.send_signal(signal.SIGTERM)
            for n in self.nodes.values():
                try:
                    n.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    n.stop()
            if self.observer is not None:
                self.observer.shutdown()
            deadline = time.monotonic() + 15
            while any(is_alive(p) for p in self.helpers) and time.monotonic() < deadline:
                time.sleep(0.5)
            self.report.left_behind = sorted(p for p in self.helpers if is_alive(p))
        return self.report

    def rss(self) -> dict[str, int]:
        """Memory of the nodes never restarted: main process with its DHT process and p2pd."""
        out = {}
        for name, n in self.nodes.items():
            if n.alive() and not any(k.node == name for k in self.report.kills):
                out[name] = rss_bytes([n.pid, *descendants(n.pid)])
        return out


def markdown(r: SoakReport, machine: str) -> str:
    trainer_kills = [k for k in r.kills if k.job]
    lines = [
        f"## Churn soak ({r.minutes:g} min, `benchmarks/soak.py`)",
        "",
        f"Machine: {machine}. Bootstrap, preparer, 3 trainers (2 experts + router), 2 servers (both experts, "
        "`--follow`), a client generating one image after another; every "
        f"{r.kill_every[0]:g}–{r.kill_every[1]:g} s a random trainer or server "
        "gets SIGKILL or SIGTERM on its main pid and is restarted.",
        "",
        f"- images: {r.completed} of {r.requested} completed ({100 * r.completed / max(r.requested, 1):.0f} %), "
        f"{len(r.failures)} failed",
        f"- kills: {len(r.kills)} ({sum(k.signal == 'SIGKILL' for k in r.kills)} SIGKILL, "
        f"{sum(k.signal == 'SIGTERM' for k in r.kills)} SIGTERM); SIGTERM stop times: "
        f"{', '.join(f'{k.stop_s:g}s' for k in r.kills if k.stop_s is not None) or '-'}",
        f"- processes left behind at the end: {len(r.left_behind)}; nodes that exited on their own "
        f"(and were restarted): {len(r.crashes)}",
        "",
        "| t (s) | node | signal | job | step reached | last published | resumed from | steps lost "
        "| published steps lost | takeover (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in trainer_kills:
        lost = "-" if k.resumed is None else str(max(0, k.step - k.resumed))
        published_lost = "-" if k.resumed is None else str(max(0, k.published - k.resumed))
        resumed = "-" if k.resumed is None else k.resumed
        takeover = "-" if k.takeover_s is None else k.takeover_s
        lines.append(
            f"| {k.t:g} | {k.node} | {k.signal} | {k.job} | {k.step} | {k.published} | "
            f"{resumed} | {lost} | {published_lost} | {takeover} |"
        )
    lines += [
        "",
        "Step reached: the trainer's presence record, renewed every 50 steps, so a lower bound; steps it had "
        f"trained since its last checkpoint are at most `--ckpt-every` ({SoakConfig.ckpt_every}) by construction. "
        "Published steps lost: the last checkpoint published before the kill minus the step the job resumed "
        "from (exact). Takeover: from the kill until a trainer (another one, or the restarted one) resumed the "
        "job.",
    ]
    if r.rss_mb:
        lines += ["", "| long-lived node | RSS after start-up (MB) | RSS at end (MB) | growth |", "|---|---|---|---|"]
        for name, (a, b) in r.rss_mb.items():
            lines.append(f"| {name} | {a:g} | {b:g} | {100 * (b - a) / max(a, 1e-9):+.0f} % |")
    if r.failures:
        lines += ["", "Failures:", *[f"- {f}" for f in r.failures[:10]]]
    if r.crashes:
        lines += ["", "Exits on their own:", *[f"- {c}" for c in r.crashes[:10]]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/soak")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--kill-every", type=float, nargs=2, default=(30.0, 60.0), metavar=("MIN_S", "MAX_S"))
    ap.add_argument("--min-kills", type=int, default=0, help="go on past --minutes until this many kills")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    cfg = SoakConfig(
        workdir=args.workdir,
        minutes=args.minutes,
        kill_every=tuple(args.kill_every),
        min_kills=args.min_kills,
        seed=args.seed,
    )
    report = Soak(cfg).run()
    from benchmarks.results import append_section, machine

    text = markdown(report, machine())
    print(text)
    (Path(cfg.workdir) / "soak.json").write_text(json.dumps(asdict(report), indent=1, default=str))
    if not args.no_results:
        append_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
