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
import time
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

    def start(self, host: str, name: str, *args: str, listen: str = ANY) -> subprocess.Popen:
        out = open(self.log(name), "a")  # a restarted node goes on in the same log
        cmd = [sys.executable, str(ROOT / "node.py"), *args, "--host-maddrs", listen]
        self.procs[name] = self.lab.popen(host, cmd, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        return self.procs[name]

    def run(self, host: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "node.py"), *args, "--host-maddrs", ANY]
        res = self.lab.run(host, cmd, timeout=timeout, cwd=ROOT, env=ENV)
        assert res.returncode == 0, f"node.py {' '.join(args)} in {host} exited {res.returncode}:\n{res.stderr[-3000:]}"
        return res

    def text(self, name: str) -> str:
        return self.log(name).read_text(errors="replace")

    def wait(self, name: str, text: str, timeout: float, after: int = 0) -> str:
        """Wait until ``name``'s log shows ``text`` (past its first ``after`` characters); returns the log."""
        proc = self.procs[name]

        def seen() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{self.text(name)[-3000:]}")
            content = self.text(name)
            return content if text in content[after:] else None

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
    one for the same expert, with the path of each step in the routing JSON; then the relays die one after
    the other: a node behind NAT goes on through the other public relay, says so when none is left, keeps
    running, and is reachable again once a relay is back."""
    for host in ("boot", "owner", "direct", "pub-client", "relay2"):
        lab.add_public(host)
    for host in ("home-server", "home-client"):
        lab.add_home(host)
    swarm.start("boot", "boot", "--role", "bootstrap", "--workdir", str(tmp_path / "boot"))
    peers = swarm.peers("boot")
    assert reach_line(swarm.text("boot")).startswith("reachability unknown")  # the first node: nobody to ask
    relay2 = ("relay2", "relay2", "--role", "bootstrap", "--workdir", str(tmp_path / "relay2"), "--initial-peers")
    swarm.start(*relay2, *peers, listen="/ip4/0.0.0.0/tcp/4001")  # a second public relay, listed in the DHT
    swarm.wait("relay2", "--initial-peers", 120)
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
        # Expert 0 has a direct server: no step of it took a relayed path while that one served.
        assert {p["0"] for p in routing["paths"]} == {"direct"}
        # Expert 1 lives only at home: served there, through the relay or a hole punched through the NATs.
        assert {p["1"] for p in routing["paths"]} <= {"relayed", "direct"}
        assert "(relayed)" in routing["stdout"] or "(direct)" in routing["stdout"]
    # The client at home reaches the home server only through the relay, so every step of expert 0
    # went to the direct server. (A public client may reach the home server over a connection the
    # server opened itself; both replicas are then direct and drawn at random by latency and queue.)
    if {p["1"] for p in home["paths"]} == {"relayed"}:
        assert len({w["0"] for w in home["where"]}) == 1
        assert {w["0"] for w in home["where"]}.isdisjoint({w["1"] for w in home["where"]})
    assert home_peer is None or all(w["1"].startswith(home_peer.group(1)[:8]) for w in home["where"])

    # The direct server is cut off from everyone mid-generation: the client fails over to the relayed
    # replica of expert 0 and the image completes. (Replicas are drawn at random step by step, so the
    # generation is long enough for the cut to fall inside it wherever the direct server is first asked.)
    said = len(swarm.text("direct"))
    out = tmp_path / "cut.png"
    swarm.start(
        "pub-client", "cut", "--role", "client", "red apple", "--workdir", str(tmp_path / "cut"), "--initial-peers",
        *peers, "--steps", "40", "--output", str(out), "--k", "2",
    )  # fmt: skip
    swarm.wait("direct", "session from", 120, after=said)
    lab.partition("direct")
    assert swarm.procs["cut"].wait(timeout=240) == 0, swarm.text("cut")[-3000:]
    cut = json.loads(out.with_suffix(".json").read_text())
    servers_of_0 = [w["0"] for w in cut["where"]]
    # The direct one until the cut, the home one after: the cut may fall before the direct server's first
    # answer has come back (its session is open, the request in flight), and then every step is the home
    # server's.
    assert len(servers_of_0) == 40 and 1 <= len(set(servers_of_0)) <= 2, servers_of_0
    direct_peer = re.search(r"server (\w+) serving", swarm.text("direct"))
    assert direct_peer is None or not servers_of_0[-1].startswith(direct_peer.group(1)[:8]), servers_of_0
    assert any("failed" in f for f in cut["failovers"]), cut["failovers"]
    # (the path to the home server is relayed, or direct where the home server had dialled out to this
    # client itself: libp2p reuses whatever connection is open)
    assert home_peer is None or servers_of_0[-1].startswith(home_peer.group(1)[:8])

    relays = reach_line(swarm.text("home-server")).split("through relay ", 1)[1].split(";")[0].split(", ")
    assert len(relays) == 2, relays  # the bootstrap peer, and the relay it found listed

    # The bootstrap peer dies: the home server goes on through the other relay, and a client at home
    # that knows both generates NAT to NAT through it.
    swarm.kill("boot")
    swarm.wait("home-server", f"behind NAT: reachable through relay {swarm.peers('relay2')[0].rsplit('/', 1)[1]};", 60)
    peers = peers + swarm.peers("relay2")
    again = generate("home-client", "home-client-2")
    assert {w["1"] for w in again["where"]} == {w["1"] for w in home["where"]}

    # The last relay dies: one line, and the node keeps running; when the relay is back, so is the node.
    swarm.kill("relay2")
    swarm.wait("home-server", "behind NAT and no relay answers", 60)
    assert swarm.procs["home-server"].poll() is None
    said = len(swarm.text("home-server"))
    swarm.start(*relay2, *swarm.peers("owner"), listen="/ip4/0.0.0.0/tcp/4001")
    swarm.wait("home-server", "reachable through relay", 120, after=said)


def _status(swarm: Nodes, host: str, peers: list[str], tmp: Path) -> dict:
    """The one run the swarm lists, as ``--role status --json`` shows it."""
    res = swarm.run(host, "--role", "status", "--json", "--workdir", str(tmp / f"status-{host}"),
                    "--initial-peers", *peers, timeout=120)  # fmt: skip
    (run,) = json.loads(res.stdout[res.stdout.index("{") :])["runs"]
    return run


def test_an_owner_at_home_and_trainers_in_other_homes_train_take_over_and_serve(lab, swarm, tmp_path):
    """(e) the run's owner behind NAT, only the bootstrap peer public: trainers in two other homes fetch
    the manifest and shards through the relay, train, and one takes the other's job over after a kill;
    (a) their checkpoints are verified and mirrored by the owner and loaded by a server in a fourth home,
    and a client in a fifth generates through it. All of it with 5 % of the packets lost on every link."""
    lab.add_public("boot")
    for host in ("owner", "t1", "t2", "srv", "cli"):
        lab.add_home(host)
    for host in lab.hosts:
        lab.loss(host, 5)
    swarm.start("boot", "boot", "--role", "bootstrap", "--workdir", str(tmp_path / "boot"))
    peers = swarm.peers("boot")  # the only public address anyone is given
    swarm.start(
        "owner", "owner", "--role", "prepare", "--serve", "--workdir", str(tmp_path / "run"), "--limit", "160",
        "--clusters", "2", "--expert-steps", "40", "--router-steps", "6", "--initial-peers", *peers,
    )  # fmt: skip
    swarm.wait("owner", "trainers join with", 240)
    assert reach_line(swarm.text("owner")).startswith("behind NAT: reachable through relay")
    trainer = ("--role", "trainer", "--heartbeat", "2", "--ckpt-every", "5", "--batch-size", "8")
    # t1 takes expert 1 and stops at step 20, half its target, however fast this machine trains: it holds
    # the claim until a second peer (the owner, once it has verified it) holds that checkpoint.
    swarm.start("t1", "t1", *trainer, "--expert", "1", "--steps", "20", "--workdir", str(tmp_path / "t1"),
                "--initial-peers", *peers)  # fmt: skip
    swarm.wait("t1", "claimed expert_1 ", 240)
    swarm.start("t2", "t2", *trainer, "--workdir", str(tmp_path / "t2"), "--initial-peers", *peers)
    swarm.wait("t2", "claimed ", 240)
    for t in ("t1", "t2"):
        assert reach_line(swarm.text(t)).startswith("behind NAT: reachable through relay")

    # Once the owner has verified (and so holds) a checkpoint of t1's job, t1 is killed (it may have
    # released the claim a moment before); t2 takes the job over from that checkpoint, fetched from the
    # owner at home.
    victim_job = "expert_1"

    def verified_midway() -> int | None:
        steps = [int(m) for m in re.findall(rf"verified {victim_job} step (\d+) ", swarm.text("owner"))]
        return min(steps) if steps and min(steps) < 40 else None

    held = wait_for(verified_midway, 300, f"a verified checkpoint of {victim_job} before its target",
                    logs=(swarm.log("owner"), swarm.log("t1")))  # fmt: skip
    swarm.kill("t1")
    swarm.wait("t2", f"{victim_job}: fetching published checkpoint step", 300)
    assert int(re.search(rf"{victim_job}: fetching published checkpoint step (\d+)", swarm.text("t2")).group(1)) >= held
    swarm.wait("t2", "resumed from step", 120)

    # Every job reaches its target; every checkpoint was verified (none refused) and mirrored by the owner.
    swarm.run("boot", "--role", "status", "--until-done", "--workdir", str(tmp_path / "done"),
              "--initial-peers", *peers, timeout=400)  # fmt: skip
    data = _status(swarm, "boot", peers, tmp_path)
    assert data["complete"]
    owner_peer = re.search(r"serving run \S+ \(\w+\) as (\w+)", swarm.text("owner")).group(1)
    for job in data["jobs"]:
        assert job["checkpoint"]["step"] == job["target"] and not job["refused"], job
        assert owner_peer in job["checkpoint"]["providers"], job
        swarm.wait("owner", f"verified {job['job']} step {job['target']} ", 120)
    reaches = {p["role"]: p["reach"] for p in data["peers"]}
    assert reaches.get("preparer") == "relayed", data["peers"]

    # A server in a fourth home fetches and verifies an expert from the homes and serves it.
    swarm.start("srv", "srv", "--role", "server", "--expert", "0", "--workdir", str(tmp_path / "srv"),
                "--initial-peers", *peers)  # fmt: skip
    swarm.wait("srv", " serving", 240)
    data = _status(swarm, "boot", peers, tmp_path)
    assert [s["reach"] for s in data["servers"] if s["state"] == "online"] == ["relayed"], data["servers"]
    out = tmp_path / "cli.png"
    swarm.run("cli", "--role", "client", "red apple", "--workdir", str(tmp_path / "cli"), "--initial-peers", *peers,
              "--steps", "6", "--output", str(out), "--local-experts", "1", timeout=300)  # fmt: skip
    routing = json.loads(out.with_suffix(".json").read_text())
    assert len(routing["where"]) == 6 and {p.get("0") for p in routing["paths"]} - {None} <= {"relayed", "direct"}
    assert any("0" in w for w in routing["where"]), routing["where"]  # expert 0 came from the home server


def test_a_trainer_cut_off_past_its_claim_loses_the_job_and_publishes_nothing_more_of_it(lab, swarm, tmp_path):
    """A trainer partitioned from everyone for longer than its claim lives: the job is taken over; once the
    partition heals, the old owner sees at once that it lost, stops, and publishes nothing more of the job;
    the verified history of the job is one line of increasing steps."""
    for host in ("prep", "t1", "t2"):
        lab.add_public(host)
    swarm.start(
        "prep", "prep", "--role", "prepare", "--serve", "--workdir", str(tmp_path / "run"), "--limit", "160",
        "--clusters", "2", "--expert-steps", "40", "--router-steps", "6",
    )  # fmt: skip
    peers = swarm.peers("prep")
    trainer = ("--role", "trainer", "--heartbeat", "2", "--batch-size", "8", "--ckpt-every", "5")
    for t in ("t1", "t2"):
        swarm.start(t, t, *trainer, "--workdir", str(tmp_path / t), "--initial-peers", *peers)
    swarm.wait("t1", "claimed ", 240)
    job = re.search(r"claimed (\w+) as", swarm.text("t1")).group(1)
    swarm.wait("prep", f"verified {job} step ", 240)
    said = len(swarm.text("t1"))
    cut = lab.partition("t1")
    cut_at = time.monotonic()
    # Cut off past its claim's lifetime, t1 knows it may have lost the job, whatever its own copy of the DHT
    # says, and stops before the partition heals.
    swarm.wait("t1", f"{job}: cut off from every peer", 120, after=said)
    noticed = time.monotonic() - cut_at
    swarm.wait("t1", f"{job}: lost to another node", 60, after=said)
    swarm.wait("t2", f"claimed {job} as", 300)  # once t2 is free and t1's claim has lapsed for it too
    lab.heal(cut)
    # The step t1 saved as it stopped stays with it: the verifier never sees it.
    kept = re.search(r"lost to another node; step (\d+) stays here", swarm.text("t1")).group(1)
    late = re.findall(rf"checkpoint step {kept} sha256 (\w{{12}})", swarm.text("t1")[said:])
    # The verifier's record of the job: increasing steps, the old owner's none after the new one's first.
    swarm.wait("t2", "run complete", 400)
    steps = [int(s) for s in re.findall(rf"verified {job} step (\d+) ", swarm.text("prep"))]
    assert steps == sorted(set(steps)) and steps[-1] == 40, steps
    assert not re.search(rf"refused {job}", swarm.text("prep")), swarm.text("prep")[-3000:]
    assert late and not any(sha in swarm.text("prep") for sha in late), late
    assert f"claimed {job} as" not in swarm.text("t1")[said:]  # and it never took the job back
    print(f"the old owner stopped {noticed:.1f}s into the partition")
