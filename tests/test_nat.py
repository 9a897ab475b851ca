"""The swarm across NAT, in the network lab (tests/netlab.py): real ``node.py`` processes on public hosts
and in homes behind NAT routers that drop every new inbound connection, started exactly as the README
says, with nothing but ``--initial-peers``.

- Serving: a client on a public host and a client in a home generate through a server in another home
  (relayed), and where a direct server holds the same expert the client takes that one.
- Training: the run's owner at home, only the bootstrap peer public; trainers in two other homes fetch
  the run, train, take a killed one's job over; their checkpoints are verified and mirrored by the owner
  and loaded by a server in yet another home.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ENV, ROOT, wait_for
from tests.netlab import NetLab, lab_fixture  # noqa: F401 (the `lab` fixture)

ANY = "/ip4/0.0.0.0/tcp/0"  # a lab host binds its own address; loopback would be only itself


class Nodes:
    """``node.py`` processes in lab hosts, each with its log in ``tmp``; the lab kills them at its close."""

    def __init__(self, lab: NetLab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def start(self, host: str, name: str, *args: str) -> subprocess.Popen:
        out = open(self.log(name), "w")
        cmd = [sys.executable, str(ROOT / "node.py"), *args, "--host-maddrs", ANY]
        self.procs[name] = self.lab.popen(host, cmd, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        return self.procs[name]

    def run(self, host: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "node.py"), *args, "--host-maddrs", ANY]
        res = self.lab.run(host, cmd, timeout=timeout, cwd=ROOT, env=ENV)
        assert res.returncode == 0, f"node.py {' '.join(args)} in {host} exited {res.returncode}:\n{res.stderr[-3000:]}"
        return res

    def text(self, name: str) -> str:
        return self.log(name).read_text(errors="replace")

    def wait(self, name: str, text: str, timeout: float) -> str:
        proc = self.procs[name]

        def seen() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{self.text(name)[-3000:]}")
            content = self.text(name)
            return content if text in content else None

        return wait_for(seen, timeout, f"{name} to print {text!r}", logs=(self.log(name),))

    def peers(self, name: str) -> list[str]:
        """The ``--initial-peers`` a node printed, without its loopback addresses."""
        line = self.wait(name, "--initial-peers", 240).split("--initial-peers", 1)[1].split("\n")[0]
        return [a for a in line.split() if "/127.0.0.1/" not in a]

    def kill(self, name: str) -> None:
        try:
            import os

            os.killpg(self.procs[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[name].wait(timeout=30)


def reach_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(("reachable at", "behind NAT", "reachability")))


@pytest.fixture
def swarm(lab, tmp_path):
    return Nodes(lab, tmp_path)


def test_clients_generate_through_a_server_behind_nat_and_prefer_a_direct_one(lab, swarm, small_run, tmp_path):
    """(b) NAT to NAT, (c) public client to a server behind NAT, (d) a direct server preferred to a relayed
    one for the same expert, with the path of each step in the routing JSON."""
    for host in ("boot", "owner", "direct", "pub-client"):
        lab.add_public(host)
    for host in ("home-server", "home-client"):
        lab.add_home(host)
    swarm.start("boot", "boot", "--role", "bootstrap", "--workdir", str(tmp_path / "boot"))
    peers = swarm.peers("boot")
    assert reach_line(swarm.text("boot")).startswith("reachability unknown")  # the first node: nobody to ask
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    swarm.start(
        "owner", "owner", "--role", "prepare", "--serve", "--workdir", str(run), "--limit", "300", "--clusters", "2",
        "--objective", "mixed", "--publish-local", "--initial-peers", *peers,
    )  # fmt: skip
    swarm.wait("owner", "publishing local checkpoint of router", 240)
    assert reach_line(swarm.text("owner")).startswith(f"reachable at /ip4/{lab.addr('owner')}/tcp/")
    # Two servers of expert 0: one public, one at home (which also serves expert 1, alone).
    swarm.start("direct", "direct", "--role", "server", "--expert", "0", "--workdir", str(tmp_path / "sd"),
                "--initial-peers", *peers)  # fmt: skip
    swarm.start("home-server", "home-server", "--role", "server", "--expert", "0,1", "--workdir",
                str(tmp_path / "sh"), "--initial-peers", *peers)  # fmt: skip
    for name in ("direct", "home-server"):
        swarm.wait(name, "serving", 240)
    line = reach_line(swarm.text("home-server"))
    assert line.startswith("behind NAT: reachable through relay "), line
    assert "open TCP port" in line
    assert reach_line(swarm.text("direct")).startswith(f"reachable at /ip4/{lab.addr('direct')}/tcp/")
    home_peer = re.search(r"server (\w+) serving", swarm.text("home-server"))

    def generate(host: str, name: str) -> dict:
        out = tmp_path / f"{name}.png"
        res = swarm.run(
            host, "--role", "client", "red apple", "green leaf", "--workdir", str(tmp_path / name),
            "--initial-peers", *peers, "--steps", "4", "--output", str(out), "--k", "2", timeout=300,
        )  # fmt: skip
        assert out.is_file() and out.stat().st_size > 0, res.stderr
        return json.loads(out.with_suffix(".json").read_text()) | {"stdout": res.stdout}

    public = generate("pub-client", "pub-client")
    home = generate("home-client", "home-client")
    for routing in (public, home):
        assert len(routing["where"]) == 4 and all(sorted(w) == ["0", "1"] for w in routing["where"])
        # Expert 0 has a direct server: every step went there, directly.
        assert {p["0"] for p in routing["paths"]} == {"direct"}
        assert len({w["0"] for w in routing["where"]}) == 1
        # Expert 1 lives only at home: served there, through the relay or a hole punched through the NATs.
        assert {p["1"] for p in routing["paths"]} <= {"relayed", "direct"}
        assert {w["0"] for w in routing["where"]}.isdisjoint({w["1"] for w in routing["where"]})
        assert "(relayed)" in routing["stdout"] or "(direct)" in routing["stdout"]
    assert home_peer is None or all(w["1"].startswith(home_peer.group(1)[:8]) for w in home["where"])
