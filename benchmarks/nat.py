"""What NAT costs the swarm: relayed ÷ direct, side by side in one run, in the network lab (tests/netlab.py).

Every host is a Linux network namespace on a small lab internet; a home host sits behind a NAT router that
drops every new inbound connection, so the only way in is through the bootstrap peer's relay. Three figures,
each a ratio of two measurements taken in this run:

1. Serving, per step. A run's owner (a worker here) publishes 4 random-weight ``tiny`` experts and a router; two
   ``node.py --role server`` processes serve all four, one on a public host, one in a home. A client in a
   third home (this benchmark's worker: the swarm client's own :class:`diffswarm.remote.RemotePool` and sampler, the
   router fetched from the swarm) draws the same prompts with the same seeds through each server in turn (a pool
   that lists only that server, so no direct server can take a relayed step), alternating which goes first:
   median round trip of one denoising request, and seconds per image, home server ÷ public server. The address
   of every stream is checked: each step to the home server went over ``/p2p-circuit``, none to the public one.
   Then a client on a public host draws the same way, and the report says which path its steps to the home
   server took (a home server that has dialled out to a public peer is reached over that connection).
2. Checkpoint transfer. A fetcher in a home takes a synthetic blob (``--blob-mb`` of random bytes) by sha256
   with :class:`swarm.blobs.BlobService`, as a checkpoint file travels, from a provider on a public host
   (direct) and from a provider in another home (NAT to NAT, through the relay), alternately: MB/s relayed ÷
   direct. The connection is opened (and its path read) before the clock starts, so the figure is the
   transfer's.
3. A trainer's first verified checkpoint. A fresh ``node.py --role prepare --serve`` (160 Twemoji, 2 clusters)
   and a fresh ``node.py --role trainer`` with an empty workdir, on a public host, then again with the trainer
   in a home (``--trainer-rounds`` times each, alternating which goes first): seconds from the trainer's start
   until the preparer logs ``verified`` for its first checkpoint, home ÷ public (and where the time went:
   joined, claimed, first checkpoint written).

Each phase is a lab of its own with a ``node.py --role bootstrap`` (the relay); every node listens on
``/ip4/0.0.0.0/tcp/0`` and is given only ``--initial-peers``. The lab has no latency or bandwidth knob (the
kernel has no netem), and every host shares this machine's cores: what a relay costs here is its extra hop's
work (a second encrypted connection, a copy through the relay's daemon), not a far-away relay's round trip.
Needs root, ``ip`` and ``nft``. ``--quick`` is a smoke run of every phase (about 2 minutes on 2 cores); the
default takes about 5 and appends its section to ``benchmarks/RESULTS.md``.

    .venv/bin/python -m benchmarks.nat [--quick] [--rounds 6] [--blob-mb 256] [--trainer-rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from benchmarks.results import RESULTS, append_section, machine  # noqa: E402

ANY = "/ip4/0.0.0.0/tcp/0"  # a lab host binds its own address; loopback would be only itself
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
PROMPTS = ["red apple", "green leaf", "blue whale", "yellow star"]
MARK = "@@"  # a worker's machine-readable lines start with this


class BenchError(RuntimeError):
    """A node or worker did not get where the benchmark needs it."""


# ------------------------------------------------------------------------------------------ processes in the lab


class Procs:
    """``node.py`` and worker processes in lab hosts, each with its log in ``tmp``; killed at :meth:`close` (the
    lab kills whatever is left in its namespaces too)."""

    def __init__(self, lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def _start(self, host: str, name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(self.log(name), "w")  # noqa: SIM115 (the child owns it)
        self.procs[name] = self.lab.popen(host, cmd, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        return self.procs[name]

    def node(self, host: str, name: str, *args: str) -> subprocess.Popen:
        return self._start(host, name, [sys.executable, str(ROOT / "node.py"), *args, "--host-maddrs", ANY])

    def worker(self, host: str, name: str, kind: str, spec: dict) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "benchmarks.nat", "--worker", kind, "--spec", json.dumps(spec)]
        return self._start(host, name, cmd)

    def text(self, name: str) -> str:
        path = self.log(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self, name: str, n: int = 25) -> str:
        return "\n".join(self.text(name).splitlines()[-n:])

    def wait(self, name: str, text: str, timeout: float, step: float = 0.25) -> str:
        """Wait until ``text`` is in ``name``'s log; returns the log. Fails at once if the process exits first."""
        proc, deadline = self.procs[name], time.monotonic() + timeout
        while True:
            content = self.text(name)
            if text in content:
                return content
            if proc.poll() is not None:
                raise BenchError(f"{name} exited {proc.returncode} before printing {text!r}:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{name} did not print {text!r} within {timeout:.0f}s:\n{self.tail(name)}")
            time.sleep(step)

    def marks(self, name: str) -> list[dict]:
        """The JSON lines a worker printed after :data:`MARK`."""
        return [json.loads(line[len(MARK) :]) for line in self.text(name).splitlines() if line.startswith(MARK)]

    def mark(self, name: str, key: str, timeout: float) -> dict:
        """The first of a worker's marks that has ``key``, waiting for it."""
        proc, deadline = self.procs[name], time.monotonic() + timeout
        while True:
            found = [m for m in self.marks(name) if key in m]
            if found:
                return found[0]
            if proc.poll() is not None:
                raise BenchError(f"{name} exited {proc.returncode} before reporting {key!r}:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{name} did not report {key!r} within {timeout:.0f}s:\n{self.tail(name)}")
            time.sleep(0.25)

    def peers(self, name: str) -> list[str]:
        """The ``--initial-peers`` a bootstrap printed, without its loopback addresses."""
        line = self.wait(name, "--initial-peers", 120).split("--initial-peers", 1)[1].split("\n")[0]
        peers = [a for a in line.split() if "/127.0.0.1/" not in a]
        if not peers:
            raise BenchError(f"{name} printed no address but loopback:\n{self.tail(name)}")
        return peers

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


def reach_line(text: str) -> str:
    """The line a node prints about how others reach it."""
    for line in text.splitlines():
        if line.startswith(("reachable at", "behind NAT", "reachability")):
            return line
    return "(no reachability line)"


def expect_reach(procs: Procs, name: str, kind: str) -> str:
    """``name``'s reachability line, which must say ``kind`` (direct: "reachable at"; relayed: "behind NAT")."""
    want = {"direct": "reachable at", "relayed": "behind NAT: reachable through relay"}[kind]
    text = procs.wait(name, want, 60)
    return reach_line(text[text.index(want) :])


# ------------------------------------------------------------------------------------------ workers (in lab hosts)


def say(**fields) -> None:
    print(MARK + json.dumps(fields), flush=True)


def _join(spec: dict, **extra):
    from swarm.dht import SwarmConfig, SwarmNode

    node = SwarmNode(SwarmConfig(spec["dir"], initial_peers=spec["peers"], host_maddrs=[ANY], **extra))
    print(node.reach_line(), flush=True)
    say(reach=node.reach.kind, peer=node.peer_id)
    return node


async def _path_to(p2p, peer: str) -> str:
    """Open a blob stream to ``peer`` (asking for a blob nobody has) and say which path it took."""
    from hivemind.p2p import PeerID

    from swarm.blobs import PROTOCOL
    from swarm.reach import is_relayed

    info, reader, writer = await asyncio.wait_for(
        p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROTOCOL), 30
    )
    try:
        writer.write(bytes(32) + struct.pack(">Q", 0))
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(9), 30)
    finally:
        writer.close()
    return "relayed" if is_relayed(str(info.addr)) else "direct"


def worker_provide(spec: dict) -> None:
    """Hold a blob of ``mb`` random megabytes and provide it until killed."""
    from swarm.blobs import BlobService, BlobStore, announce

    node = _join(spec)
    path = Path(spec["dir"]) / "blob.bin"
    with open(path, "wb") as f:
        for _ in range(spec["mb"]):
            f.write(os.urandom(1 << 20))
    blobs = BlobService(node.dht, BlobStore())
    digest = blobs.store.add_file(path)
    announce(node, blobs.store)
    say(ready=True, peer=node.peer_id, digest=digest, size=path.stat().st_size)
    while True:
        time.sleep(60)


def worker_fetch(spec: dict) -> None:
    """Fetch each provider's blob ``rounds`` times, alternating which goes first; each fetch from a fresh store
    (so nothing is copied locally) into a file removed after. The path of each provider's connection is read
    before and after each fetch."""
    from swarm.blobs import BlobService, BlobStore

    node = _join(spec)
    blobs = BlobService(node.dht, BlobStore(), timeout=900.0, connect_timeout=30.0)
    dest = Path(spec["dir"]) / "fetched.bin"
    provs = spec["providers"]  # [{"name", "peer", "digest", "size"}]
    for p in provs:  # the first dial (through the relay, for one in a home) is not timed
        for attempt in range(5):
            try:
                say(warm=p["name"], path=blobs.call(_path_to(blobs.p2p, p["peer"]), timeout=60))
                break
            except Exception as e:  # noqa: BLE001 (a relayed peer's address may not be known yet)
                if attempt == 4:
                    raise
                say(retry=p["name"], error=repr(e))
                time.sleep(3)
    for r in range(spec["rounds"]):
        for p in provs if r % 2 == 0 else provs[::-1]:
            before = blobs.call(_path_to(blobs.p2p, p["peer"]), timeout=60)
            blobs.store = BlobStore()
            t0 = time.perf_counter()
            blobs.fetch(p["digest"], [p["peer"]], dest, p["size"])
            dt = time.perf_counter() - t0
            after = blobs.call(_path_to(blobs.p2p, p["peer"]), timeout=60)
            size = dest.stat().st_size
            dest.unlink()
            say(fetch=p["name"], round=r, seconds=dt, mb_s=size / 1e6 / dt, before=before, after=after)
    say(done=True)
    blobs.shutdown()
    node.shutdown()


def worker_publish(spec: dict) -> None:
    """The run's owner: publish a random-weight set of ``tiny`` experts and a router, provide them until killed."""
    from benchmarks.serving import publish_random_set, text_encoder
    from swarm.blobs import BlobService, BlobStore

    node = _join(spec, own_run="bench")
    blobs = BlobService(node.dht, BlobStore())
    publish_random_set(Path(spec["dir"]) / "set", node, blobs.store, text_encoder().dim)
    say(published=True)
    while True:
        time.sleep(60)


def worker_serve_client(spec: dict) -> None:
    """Wait for a direct and a relayed server of every expert, then draw the same images through each in turn
    (``rounds`` x ``images``, alternating which goes first), as the swarm client does: the router fetched from
    the swarm, one stream per server."""
    import torch

    from benchmarks.serving import K, text_encoder
    from diffswarm.remote import RemotePool
    from experts.latent_space import load_space
    from experts.presets import get_preset
    from router.network import RouterNet
    from router.sampling import SamplerConfig, generate
    from swarm.blobs import BlobService, BlobStore
    from swarm.mirror import fetch_published

    torch.set_num_threads(1)
    node = _join(spec)
    blobs = BlobService(node.dht, BlobStore())
    encoder = text_encoder()
    run = node.run()
    got = fetch_published(node, blobs, run, Path(spec["dir"]) / "ckpt", ["router"])
    router = RouterNet.from_pretrained(got["router"].model_dir, low_cpu_mem_usage=False).eval()
    experts = list(range(K))
    deadline = time.monotonic() + spec["wait_s"]
    while True:
        listed = node.servers(run, experts)
        by_kind: dict[str, dict[str, list]] = {"direct": {}, "relayed": {}}
        for k in experts:
            for rec in listed.get(k, []):
                if rec.reach in by_kind:
                    by_kind[rec.reach].setdefault(rec.peer, []).append((k, rec))
        full = {kind: [p for p, recs in peers.items() if len(recs) == K] for kind, peers in by_kind.items()}
        if all(full.values()):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"no direct and relayed server of every expert within {spec['wait_s']}s: {by_kind}")
        time.sleep(1.0)
    chosen = {kind: full[kind][0] for kind in ("direct", "relayed")}
    # What this node's p2p daemon is already connected to (by whom it was dialled, before any request of ours).
    known = {str(info.peer_id): [str(a) for a in info.addrs] for info in blobs.call(blobs.p2p.list_peers(), 30)}
    say(connected_before={kind: known.get(peer) for kind, peer in chosen.items()})
    pools = {kind: RemotePool(blobs, {k: [rec] for k, rec in by_kind[kind][peer]}) for kind, peer in chosen.items()}
    say(servers=chosen)
    preset = get_preset("tiny")
    shape = (preset.channels, preset.sample_size, preset.sample_size)
    space = load_space("")

    failures: dict[str, list[str]] = {"direct": [], "relayed": []}

    def image(kind: str, i: int) -> float:
        """Seconds for one image; an image that fails (its server banned by the pool after a failed request) is
        said, counted, and drawn again once with the ban lifted."""
        cfg = SamplerConfig(mode="top1", steps=spec["steps"], seed=i)
        pool = pools[kind]
        for attempt in range(2):
            seen = len(pool.events)
            t0 = time.perf_counter()
            try:
                generate([PROMPTS[i % len(PROMPTS)]], router, pool.experts(), encoder, space, shape, cfg)
                return time.perf_counter() - t0
            except Exception as e:
                failures[kind].append(f"{e}; " + " | ".join(pool.events[seen:]))
                say(failed=kind, error=str(e), events=pool.events[seen:], paths=pool.paths)
                if attempt:
                    raise
                pool.banned.clear()
        raise AssertionError("unreachable")

    for kind in pools:  # warm-up: the first stream (through the relay, for one), the first allocations
        image(kind, 0)
        pools[kind].latency.clear()
    seconds: dict[str, list[float]] = {"direct": [], "relayed": []}
    order = ["direct", "relayed"]
    for r in range(spec["rounds"]):
        for kind in order if r % 2 == 0 else order[::-1]:
            for i in range(spec["images"]):
                seconds[kind].append(image(kind, i))
            say(round=r, kind=kind, seconds=seconds[kind][-spec["images"] :])
    out = {}
    for kind, pool in pools.items():
        out[kind] = {
            "server": chosen[kind],
            "paths": dict(pool.paths),
            "image_s": seconds[kind],
            "request_s": [rtt for rtt, _ in pool.latency],
            "server_ms": [t.get("server_ms", 0.0) for _, t in pool.latency],
            "steps": len(pool.latency),
            "failovers": list(pool.events),
            "failed_images": failures[kind],
        }
        pool.close()
    say(result=out)
    blobs.shutdown()
    node.shutdown()


WORKERS = {
    "publish": worker_publish,
    "provide": worker_provide,
    "fetch": worker_fetch,
    "serve-client": worker_serve_client,
}


# ------------------------------------------------------------------------------------------ the three phases


def lab_unavailable() -> str | None:
    from tests.netlab import unavailable

    return unavailable()


def bootstrap(procs: Procs, tmp: Path) -> list[str]:
    procs.lab.add_public("boot")
    procs.node("boot", "boot", "--role", "bootstrap", "--workdir", str(tmp / "boot"))
    return procs.peers("boot")


def measure_serving(tmp: Path, rounds: int, images: int, steps: int, clients: list[str], bump) -> dict:
    """Two servers of the same four experts, one public, one in a home; each of ``clients`` ("home": a client in
    a third home, "public": one on a public host) in turn draws through each server alternately."""
    from tests.netlab import NetLab

    with NetLab() as lab:
        procs = Procs(lab, tmp)
        try:
            peers = bootstrap(procs, tmp)
            for host in ("owner", "pub-server"):
                lab.add_public(host)
            lab.add_home("home-server")
            procs.worker("owner", "owner", "publish", {"dir": str(tmp / "owner"), "peers": peers})
            procs.mark("owner", "published", 180)
            for host in ("pub-server", "home-server"):
                procs.node(host, host, "--role", "server", "--expert", "0,1,2,3", "--threads", "1",
                           "--workdir", str(tmp / host), "--initial-peers", *peers)  # fmt: skip
            for host in ("pub-server", "home-server"):
                procs.wait(host, " serving expert", 300)  # "server PEER serving expert 0 step 1, ..."
            lines = {
                "pub-server": expect_reach(procs, "pub-server", "direct"),
                "home-server": expect_reach(procs, "home-server", "relayed"),
            }
            server_peers = {
                {"pub-server": "direct", "home-server": "relayed"}[h]: m.group(1)
                for h in ("pub-server", "home-server")
                if (m := re.search(r"server (\w+) serving", procs.text(h)))
            }
            bump()
            results = {}
            for where in clients:
                name = f"{where}-client"
                (lab.add_home if where == "home" else lab.add_public)(name)
                spec = {"dir": str(tmp / name), "peers": peers, "rounds": rounds, "images": images, "steps": steps}
                procs.worker(name, name, "serve-client", spec | {"wait_s": 300})
                lines[name] = expect_reach(procs, name, "relayed" if where == "home" else "direct")
                done = 0
                deadline = time.monotonic() + 600
                while not (found := [m for m in procs.marks(name) if "result" in m]):
                    got = sum(1 for m in procs.marks(name) if "round" in m)
                    if got > done:
                        bump(got - done)
                        done = got
                    if procs.procs[name].poll() is not None or time.monotonic() > deadline:
                        raise BenchError(f"the {where} client did not finish:\n{procs.tail(name)}")
                    time.sleep(0.5)
                bump(2 * rounds - done)
                before = [m["connected_before"] for m in procs.marks(name) if "connected_before" in m]
                results[where] = found[0]["result"] | {"connected_before": before[0] if before else {}}
                procs.kill(name)
        finally:
            procs.close()
    return {"clients": results, "lines": lines, "server_peers": server_peers}


def measure_blobs(tmp: Path, rounds: int, mb: int, bump) -> dict:
    from tests.netlab import NetLab

    with NetLab() as lab:
        procs = Procs(lab, tmp)
        try:
            peers = bootstrap(procs, tmp)
            lab.add_public("pub-prov")
            lab.add_home("home-prov")
            lab.add_home("fetcher")
            for host in ("pub-prov", "home-prov"):
                procs.worker(host, host, "provide", {"dir": str(tmp / host), "peers": peers, "mb": mb})
            ready = {host: procs.mark(host, "ready", 240) for host in ("pub-prov", "home-prov")}
            provs = [
                {
                    "name": kind,
                    "peer": ready[host]["peer"],
                    "digest": ready[host]["digest"],
                    "size": ready[host]["size"],
                }
                for kind, host in (("direct", "pub-prov"), ("relayed", "home-prov"))
            ]
            procs.worker("fetcher", "fetcher", "fetch", {"dir": str(tmp / "fetcher"), "peers": peers,
                                                         "providers": provs, "rounds": rounds})  # fmt: skip
            bump()
            lines = {
                "pub-prov": expect_reach(procs, "pub-prov", "direct"),
                "home-prov": expect_reach(procs, "home-prov", "relayed"),
                "fetcher": expect_reach(procs, "fetcher", "relayed"),
            }
            done = 0
            deadline = time.monotonic() + 900
            while not any("done" in m for m in procs.marks("fetcher")):
                got = sum(1 for m in procs.marks("fetcher") if "fetch" in m)
                if got > done:
                    bump(got - done)
                    done = got
                if procs.procs["fetcher"].poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"the fetcher did not finish:\n{procs.tail('fetcher')}")
                time.sleep(0.5)
            marks = procs.marks("fetcher")
            bump(2 * rounds - done)
        finally:
            procs.close()
    return {
        "fetches": [m for m in marks if "fetch" in m],
        "warm": [m for m in marks if "warm" in m],
        "retries": [m for m in marks if "retry" in m],
        "lines": lines,
    }


TRAINER_MARKS = {"joined": "joined run", "claimed": "claimed ", "checkpoint": "checkpoint step"}


def measure_trainer(tmp: Path, kind: str, timeout: float) -> dict:
    """A fresh serving preparer and a fresh trainer (on a public host, or in a home): seconds from the trainer's
    start to each of its milestones and to the preparer's first ``verified`` line."""
    from tests.netlab import NetLab

    with NetLab() as lab:
        procs = Procs(lab, tmp)
        try:
            peers = bootstrap(procs, tmp)
            lab.add_public("prep")
            (lab.add_public if kind == "public" else lab.add_home)("trainer")
            procs.node("prep", "prep", "--role", "prepare", "--serve", "--workdir", str(tmp / "prep"), "--limit", "160",
                       "--clusters", "2", "--expert-steps", "10", "--router-steps", "6",
                       "--initial-peers", *peers)  # fmt: skip
            procs.wait("prep", "serving run", 300)
            t0 = time.monotonic()
            procs.node("trainer", "trainer", "--role", "trainer", "--workdir", str(tmp / "trainer"),
                       "--initial-peers", *peers, "--heartbeat", "2", "--batch-size", "8",
                       "--ckpt-every", "5")  # fmt: skip
            at: dict[str, float] = {}
            deadline = t0 + timeout
            verified = None
            while verified is None:
                text = procs.text("trainer")
                for key, marker in TRAINER_MARKS.items():
                    if key not in at and marker in text:
                        at[key] = time.monotonic() - t0
                verified = re.search(r"verified (\S+) step (\d+)", procs.text("prep"))
                if verified:
                    at["verified"] = time.monotonic() - t0
                elif procs.procs["trainer"].poll() is not None or time.monotonic() > deadline:
                    raise BenchError(
                        f"no checkpoint of the {kind} trainer was verified within {timeout:.0f}s:\n"
                        f"trainer:\n{procs.tail('trainer')}\npreparer:\n{procs.tail('prep')}"
                    )
                else:
                    time.sleep(0.2)
            line = expect_reach(procs, "trainer", "direct" if kind == "public" else "relayed")
            trainer_log, prep_log = procs.text("trainer"), procs.text("prep")
        finally:
            procs.close()
    problems = [
        ln.strip()
        for ln in (trainer_log + prep_log).splitlines()
        if re.search(r"failed|could not|cannot|refused|error|Traceback", ln, re.IGNORECASE)
    ]
    return {
        "seconds": at,
        "job": verified.group(1),
        "step": int(verified.group(2)),
        "line": line,
        "problems": problems,
    }


# ------------------------------------------------------------------------------------------ the report


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize_serving(got: dict, where: str) -> dict:
    """The figures of one client: medians relayed and direct, their ratios, and whether every step took the path
    its server was meant to be reached by (and went to that server, with no failover)."""
    res = got["clients"][where]
    why = []
    for kind in ("direct", "relayed"):
        paths = set(res[kind]["paths"].values())
        if paths != {kind}:
            why.append(f"every step to the {kind} server went {'/'.join(sorted(paths))}")
        if res[kind]["server"] != got["server_peers"].get(kind):
            why.append(f"the {kind} steps went to {res[kind]['server'][:12]}, not the intended server")
    d, r = res["direct"], res["relayed"]
    return {
        "ok": not why,
        "why": why,
        "request_ms": {k: 1e3 * _median(res[k]["request_s"]) for k in ("direct", "relayed")},
        "server_ms": {k: _median(res[k]["server_ms"]) for k in ("direct", "relayed")},
        "image_s": {k: _median(res[k]["image_s"]) for k in ("direct", "relayed")},
        "steps": {k: res[k]["steps"] for k in ("direct", "relayed")},
        "request_ratio": _median(r["request_s"]) / _median(d["request_s"]),
        "image_ratio": _median(r["image_s"]) / _median(d["image_s"]),
        "connected_before": res.get("connected_before", {}),
        "failovers": {k: res[k]["failovers"] for k in ("direct", "relayed")},
    }


def summarize_blobs(got: dict) -> dict:
    rates = {k: [f["mb_s"] for f in got["fetches"] if f["fetch"] == k] for k in ("direct", "relayed")}
    paths = {k: {p for f in got["fetches"] if f["fetch"] == k for p in (f["before"], f["after"])} for k in rates}
    why = [f"the {k} provider's connection went {sorted(p)}" for k, p in paths.items() if p != {k}]
    return {
        "ok": not why,
        "why": why,
        "mb_s": {k: _median(v) for k, v in rates.items()},
        "all": rates,
        "ratio": _median(rates["relayed"]) / _median(rates["direct"]),
    }


def summarize_trainers(got: dict[str, list[dict]]) -> dict:
    keys = ("joined", "claimed", "checkpoint", "verified")
    med = {kind: {k: _median([t["seconds"][k] for t in trials if k in t["seconds"]]) for k in keys}
           for kind, trials in got.items()}  # fmt: skip
    return {
        "median_s": med,
        "verified_s": {kind: [t["seconds"]["verified"] for t in trials] for kind, trials in got.items()},
        "ratio": med["home"]["verified"] / med["public"]["verified"],
        "problems": sorted({p for trials in got.values() for t in trials for p in t["problems"]}),
    }


def _values(xs: list[float], fmt: str = ".1f") -> str:
    return ", ".join(format(x, fmt) for x in xs)


def report(args, serving: dict | None, blobs: dict | None, trainers: dict | None, minutes: float) -> str:
    lines = [
        f"## Across NAT: relayed ÷ direct ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. The network lab (`tests/netlab.py`): every host a network namespace on one lab "
        "internet, a home behind a NAT router that drops every new inbound connection; a `node.py --role "
        "bootstrap` on a public host is the relay; every node is given only `--initial-peers`. Each pair is "
        "measured in the same run, alternating which goes first; medians. The lab has no latency (no netem) and "
        "every host shares the same cores: a relay costs here its extra hop's work, not a distant relay's round "
        f"trip. {minutes:.1f} minutes in all.",
        "",
        "| measurement | relayed (NAT) | direct (public) | ratio |",
        "|---|---:|---:|---:|",
    ]
    notes = []
    if serving and "home" in serving["clients"]:
        s = summarize_serving(serving, "home")
        flag = "" if s["ok"] else " (**paths not as intended**: " + "; ".join(s["why"]) + ")"
        lines += [
            f"| a denoising step's round trip, client in a home → server in another home vs on a public host{flag} "
            f"| {s['request_ms']['relayed']:.1f} ms | {s['request_ms']['direct']:.1f} ms | {s['request_ratio']:.2f} |",
            f"| seconds per image, same client ({args.steps} steps, top-1, 4 `tiny` experts, same prompts and seeds) "
            f"| {s['image_s']['relayed']:.3f} s | {s['image_s']['direct']:.3f} s | {s['image_ratio']:.2f} |",
        ]
        notes.append(
            f"Serving: {s['steps']['relayed']} relayed and {s['steps']['direct']} direct steps timed ({args.rounds} "
            f"rounds of {args.images} images through each server, after a warm-up image each); the client's pool "
            "for each server lists only that server, and the address of each stream says `/p2p-circuit` for every "
            f"step to the home server and not for any step to the public one: {'yes' if s['ok'] else 'no'}. "
            f"Relayed minus direct: {s['request_ms']['relayed'] - s['request_ms']['direct']:.1f} ms per step; time "
            f"in the server per step {s['server_ms']['relayed']:.1f} ms (home) and {s['server_ms']['direct']:.1f} ms "
            "(public); each server on 1 torch thread, the client on 1."
            + "".join(
                f" Failed requests to the {k} server (the pool bans it, the image is drawn again): {len(v)}, "
                f"e.g. `{v[0]}`."
                for k, v in s["failovers"].items()
                if v
            )
        )
    if serving and "public" in serving["clients"]:
        s = summarize_serving(serving, "public")
        res = serving["clients"]["public"]
        paths = set(res["relayed"]["paths"].values())
        before = s["connected_before"].get("relayed") or []
        if not before:
            held = "before the client's first request its p2p daemon held no connection to the home server"
        else:
            kinds = ", ".join(
                f"`{a}` ("
                + ("through the relay" if "/p2p-circuit" in a else "direct: the home router's WAN address, dialled out")
                + ")"
                for a in before
            )
            held = f"before the client's first request its p2p daemon already held a connection to the server: {kinds}"
        how = (
            "directly, never through the relay"
            if paths == {"direct"}
            else "through the relay"
            if paths == {"relayed"}
            else "/".join(sorted(paths))
        )
        notes.append(
            f"A client on a public host, same servers, same draws: every step to the home server went {how}; "
            f"{held}. Round trip per step, home server ÷ public server: {s['request_ms']['relayed']:.1f} ÷ "
            f"{s['request_ms']['direct']:.1f} ms = {s['request_ratio']:.2f}."
            + "".join(
                f" Failed requests to the {k} server: {len(v)}, e.g. `{v[0]}`." for k, v in s["failovers"].items() if v
            )
        )
    if blobs:
        b = summarize_blobs(blobs)
        flag = "" if b["ok"] else " (**paths not as intended**: " + "; ".join(b["why"]) + ")"
        lines.append(
            f"| blob transfer by sha256 ({args.blob_mb} MB, as a checkpoint file travels) into a home, from another "
            f"home vs from a public host{flag} | {b['mb_s']['relayed']:.1f} MB/s | {b['mb_s']['direct']:.1f} MB/s "
            f"| {b['ratio']:.2f} |"
        )
        notes.append(
            f"Blobs: {args.rounds} fetches each way, MB/s from the home {_values(b['all']['relayed'])}; from the "
            f"public host {_values(b['all']['direct'])}. The connection to the home provider was a `/p2p-circuit` "
            "one before and after every fetch, the one to the public provider never was: "
            f"{'yes' if b['ok'] else 'no'}. The clock starts with the connection open."
        )
    if trainers:
        t = summarize_trainers(trainers)
        lines.append(
            "| a fresh trainer's start → its first checkpoint verified by the preparer, trainer in a home vs on a "
            f"public host | {t['median_s']['home']['verified']:.1f} s | {t['median_s']['public']['verified']:.1f} s "
            f"| {t['ratio']:.2f} |"
        )

        def where(kind: str) -> str:
            m = t["median_s"][kind]
            return ", ".join(f"{k} {m[k]:.1f} s" for k in ("joined", "claimed", "checkpoint", "verified"))

        n = len(trainers["home"])
        notes.append(
            f"Trainer: {n} fresh preparer + trainer pair(s) each way (160 Twemoji, 2 clusters, `--batch-size 8 "
            "--ckpt-every 5 --heartbeat 2`, empty workdirs). Seconds from the trainer's start, medians: in a home "
            f"{where('home')}; on a public host {where('public')}. Every trial: home "
            f"{_values(t['verified_s']['home'])} s, public {_values(t['verified_s']['public'])} s."
            + (f" Lines that said something failed: {'; '.join(t['problems'][:5])}." if t["problems"] else "")
        )
    lines += ["", *(f"{n}\n" for n in notes)]
    flags = (
        " --quick"
        if args.quick
        else f" --rounds {args.rounds} --images {args.images} --steps {args.steps} --blob-mb {args.blob_mb} "
        f"--trainer-rounds {args.trainer_rounds}"
    )
    lines += [f"Command: `.venv/bin/python -m benchmarks.nat{flags}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run: 1 round each, 16 MB, 8 steps")
    ap.add_argument("--rounds", type=int, default=6, help="alternations per serving and blob pair")
    ap.add_argument("--images", type=int, default=4, help="images per serving round and server")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    ap.add_argument("--blob-mb", type=int, default=256, help="size of the synthetic blob")
    ap.add_argument("--trainer-rounds", type=int, default=3, help="fresh trainers on a public host and in a home")
    ap.add_argument("--only", default="serving,blobs,trainer", help="the phases to run (a section needs all three)")
    ap.add_argument("--keep", help="keep every node's log and workdir in this folder (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec))
        return
    if args.quick:
        args.rounds, args.images, args.steps, args.blob_mb, args.trainer_rounds = 1, 1, 8, 16, 1
    if reason := lab_unavailable():
        raise SystemExit(f"cannot build the network lab here: {reason}")
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(phases) - {"serving", "blobs", "trainer"}
    if unknown:
        raise SystemExit(f"--only: unknown phase(s) {sorted(unknown)}")
    started = time.monotonic()
    serving = blobs = None
    trainers: dict[str, list[dict]] = {"public": [], "home": []}
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with (
        Progress(*columns, TimeElapsedColumn()) as progress,
        tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP"), prefix="nat-") as d,
    ):
        tmp = Path(args.keep or d)
        tmp.mkdir(parents=True, exist_ok=True)

        def bumper(task):
            return lambda n=1: progress.advance(task, n)

        if "serving" in phases:
            clients = ["home", "public"]
            task = progress.add_task("serving: home vs public server", total=1 + 2 * args.rounds * len(clients))
            serving = measure_serving(tmp / "serving", args.rounds, args.images, args.steps, clients, bumper(task))
            for where in clients:
                progress.console.print(where, "client:", json.dumps(summarize_serving(serving, where)))
        if "blobs" in phases:
            task = progress.add_task("blobs: from a home vs a public host", total=1 + 2 * args.rounds)
            blobs = measure_blobs(tmp / "blobs", args.rounds, args.blob_mb, bumper(task))
            progress.console.print(json.dumps(summarize_blobs(blobs)))
        if "trainer" in phases:
            task = progress.add_task("trainer: first verified checkpoint", total=2 * args.trainer_rounds)
            for r in range(args.trainer_rounds):
                for kind in ("public", "home") if r % 2 == 0 else ("home", "public"):
                    got = measure_trainer(tmp / f"trainer-{kind}-{r}", kind, 400)
                    trainers[kind].append(got)
                    progress.console.print(kind, "trainer:", json.dumps(got["seconds"]))
                    progress.advance(task)
    minutes = (time.monotonic() - started) / 60
    print(json.dumps({"serving": serving, "blobs": blobs, "trainers": trainers, "minutes": minutes}), flush=True)
    text = report(args, serving, blobs, trainers if trainers["home"] else None, minutes)
    print(text)
    if set(phases) == {"serving", "blobs", "trainer"} and not args.quick:
        out = Path(args.out)
        lead = "\n" if out.exists() and not out.read_text().endswith("\n\n") else ""  # a blank line before it
        append_section(lead + text, out)


if __name__ == "__main__":
    main()
