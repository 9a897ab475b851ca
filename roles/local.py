"""A whole swarm on one machine: a bootstrap peer, the preparer serving the run, N trainers, the
live status dashboard and its web page, then expert servers for the trained experts and a client that routes every
denoising step to them and draws a grid — every one a real ``node.py`` process talking over
127.0.0.1. ``make demo`` runs this.

    python -m roles.local --workdir runs/demo --trainers 2 --expert-steps 2000 --router-steps 120 \\
        --output outputs/demo.png "red apple" "rocket"

Each node runs in its own session, logs to ``<workdir>/logs/<name>.log``, and is stopped on exit,
also on Ctrl-C or error; its DHT process and p2p daemon end with it (:mod:`swarm.lifeline`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from router.presets import DEFAULT_ROUTER_PRESET, ROUTER_PRESETS

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


class LocalSwarmError(RuntimeError):
    pass


class NodeProcess:
    """``python node.py ARGS`` in its own process group, output to a log file (or the terminal)."""

    def __init__(self, name: str, args: list[str], log: Path | None, env: dict | None = None) -> None:
        self.name, self.log = name, log
        out = open(log, "w") if log is not None else None  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "node.py"), *args],
            cwd=ROOT,
            env={**ENV, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def wait_for(self, marker: str, timeout: float, poll_s: float = 0.5) -> str:
        """Wait until ``marker`` appears in the log; returns the rest of that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if marker in text:
                return text.split(marker, 1)[1].split("\n", 1)[0]
            if not self.alive():
                raise LocalSwarmError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(poll_s)
        raise LocalSwarmError(f"{self.name} did not print {marker!r} within {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM (a clean stop: save, release claims, say OFFLINE), then SIGKILL the group."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self.signal(signal.SIGKILL)  # a node that did not stop in time; its DHT process and p2pd follow it
        self.proc.wait(timeout=30)


@dataclass
class LocalSwarmConfig:
    workdir: str = "runs/demo"
    trainers: int = 2
    clusters: int = 4
    expert_steps: int = 2000
    router_steps: int = 120
    router_preset: str = DEFAULT_ROUTER_PRESET  # the trainers' router preset (tiny: one that reads only x_t)
    ckpt_every: int = 1000  # steps: each published checkpoint is verified and mirrored (CPU the trainers share)
    prompts: list[str] = field(default_factory=lambda: ["red apple"])
    output: str = "outputs/demo.png"
    client_args: list[str] = field(default_factory=lambda: ["--mode", "topk", "--k", "2", "--steps", "30"])
    timeout_s: float = 3600.0  # the whole training phase
    servers: int = 2  # expert servers started after training (0: the client runs every expert itself)
    web: str = "127.0.0.1:0"  # the web status page's HOST:PORT (port 0: any free one; "": no page)

    @property
    def serve_groups(self) -> list[int]:
        return list(range(self.clusters))


def peers_from(line: str) -> list[str]:
    return line.split()


def run_local_swarm(cfg: LocalSwarmConfig) -> Path:
    """Start the swarm, train every job to its target, serve the experts, sample the grid through
    the servers, stop all."""
    import shutil

    work = Path(cfg.workdir)
    logs = work / "logs"
    for stale in [logs, work / "mirror", work / "client", *work.glob("trainer_*"), *work.glob("server_*")]:
        shutil.rmtree(stale, ignore_errors=True)  # a fresh swarm each time; prepared data is reused
    logs.mkdir(parents=True, exist_ok=True)
    loop = ["--host-maddrs", LOOPBACK]
    threads = max(1, (os.cpu_count() or 2) // cfg.trainers)
    nodes: list[NodeProcess] = []
    try:
        boot = NodeProcess("bootstrap", ["--role", "bootstrap", "--workdir", str(work), *loop], logs / "bootstrap.log")
        nodes.append(boot)
        peers = peers_from(boot.wait_for("--initial-peers", 120))
        print(f"bootstrap peer up; joining with --initial-peers {' '.join(peers)}", flush=True)
        join = ["--initial-peers", *peers, *loop]
        prep = NodeProcess(
            "preparer",
            ["--role", "prepare", "--serve", "--workdir", str(work), "--clusters", str(cfg.clusters), *join]
            + ["--expert-steps", str(cfg.expert_steps), "--router-steps", str(cfg.router_steps)],
            logs / "preparer.log",
        )
        nodes.append(prep)
        print("preparing the data (embed, cluster, write shards)…", flush=True)
        prep.wait_for("serving run", 900)
        for line in prep.text().splitlines():
            if line.startswith(("prepared ", "  cluster ")):
                print(line, flush=True)
        for i in range(cfg.trainers):
            nodes.append(
                NodeProcess(
                    f"trainer_{i}",
                    [
                        "--role",
                        "trainer",
                        "--workdir",
                        str(work / f"trainer_{i}"),
                        "--threads",
                        str(threads),
                        "--router-preset",
                        cfg.router_preset,
                        *join,
                    ]
                    + ["--ckpt-every", str(cfg.ckpt_every)],
                    logs / f"trainer_{i}.log",
                )
            )
        print(f"{cfg.trainers} trainers started ({threads} threads each; logs in {logs}/)", flush=True)
        if cfg.web:
            # The page lives as long as the swarm (servers included); the terminal dashboard below
            # ends with the training.
            page = NodeProcess(
                "status_web",
                ["--role", "status", "--web", cfg.web, "--workdir", str(work / "status_web"), *join],
                logs / "status_web.log",
            )
            nodes.append(page)
            print(f"watch the swarm at {page.wait_for('watch the swarm at ', 120).strip()}", flush=True)
        status = NodeProcess("status", ["--role", "status", "--until-done", "--workdir", str(work), *join], None)
        nodes.append(status)
        deadline = time.monotonic() + cfg.timeout_s
        while status.alive():
            trainers = [n for n in nodes if n.name.startswith("trainer_")]
            if not any(t.alive() for t in trainers):
                raise LocalSwarmError("every trainer exited:\n" + "\n".join(t.tail() for t in trainers))
            if time.monotonic() > deadline:
                raise LocalSwarmError(f"training did not finish within {cfg.timeout_s:.0f}s")
            time.sleep(1)
        if status.proc.returncode != 0:
            raise LocalSwarmError(f"the status dashboard exited {status.proc.returncode}")
        servers = [cfg.serve_groups[i :: cfg.servers] for i in range(cfg.servers)] if cfg.servers else []
        for i, group in enumerate(servers):
            experts = ",".join(str(k) for k in group)
            nodes.append(
                NodeProcess(
                    f"server_{i}",
                    ["--role", "server", "--expert", experts, "--workdir", str(work / f"server_{i}"), *join]
                    + ["--threads", str(threads)],
                    logs / f"server_{i}.log",
                )
            )
        for n in nodes:
            if n.name.startswith("server_"):
                print(f"{n.name}: serving expert{n.wait_for('serving expert', 300)}", flush=True)
        print("every job reached its target; sampling through the expert servers", flush=True)
        client = NodeProcess(
            "client",
            ["--role", "client", "--workdir", str(work / "client"), *join, *cfg.client_args]
            + ([] if cfg.servers else ["--local-experts", "all"])
            + ["--output", cfg.output, *cfg.prompts],
            None,
        )
        nodes.append(client)
        if client.proc.wait(timeout=1800) != 0:
            raise LocalSwarmError(f"the client exited {client.proc.returncode}")
        return Path(cfg.output)
    finally:
        for n in reversed(nodes):
            n.stop()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m roles.local", description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", nargs="+")
    d = LocalSwarmConfig  # one place for the defaults
    p.add_argument("--workdir", default=d.workdir)
    p.add_argument("--trainers", type=int, default=d.trainers)
    p.add_argument("--clusters", type=int, default=d.clusters)
    p.add_argument("--expert-steps", type=int, default=d.expert_steps)
    p.add_argument("--router-steps", type=int, default=d.router_steps)
    p.add_argument("--router-preset", default=d.router_preset, choices=sorted(ROUTER_PRESETS))
    p.add_argument("--servers", type=int, default=d.servers, help="expert servers after training (0: client runs all)")
    p.add_argument("--output", default=d.output)
    p.add_argument("--web", default=d.web, metavar="HOST:PORT", help="web status page (0: any port; '': none)")
    args = p.parse_args(argv)
    if args.trainers < 1 or args.expert_steps < 1 or args.router_steps < 1:
        print("error: --trainers, --expert-steps and --router-steps must be at least 1", file=sys.stderr)
        return 2
    cfg = LocalSwarmConfig(
        workdir=args.workdir,
        trainers=args.trainers,
        clusters=args.clusters,
        expert_steps=args.expert_steps,
        router_steps=args.router_steps,
        router_preset=args.router_preset,
        servers=args.servers,
        prompts=args.prompts,
        output=args.output,
        web=args.web,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # stop every node on SIGTERM too
    t0 = time.time()
    try:
        out = run_local_swarm(cfg)
    except LocalSwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every node was stopped", file=sys.stderr)
        return 130
    print(f"local swarm demo done in {time.time() - t0:.0f}s: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
