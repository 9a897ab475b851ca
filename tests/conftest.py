"""Shared fixtures: a small Twemoji run prepared and trained through real ``node.py`` subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from swarm.lifeline import descendants, is_alive

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
# One image-feature cache for the whole session (every test's prepare embeds the same Twemoji),
# kept out of the user's own cache.
os.environ.setdefault("DIFFSWARM_CACHE", tempfile.mkdtemp(prefix="diffswarm-test-cache-"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def node(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python node.py ARGS`` to completion; its whole process group is killed if it
    outlives ``timeout``."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "node.py"), *args],
        cwd=ROOT,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"node.py {' '.join(args)} ran past {timeout}s:\n{err[-3000:]}") from None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"node.py {' '.join(args)} exited {proc.returncode}:\n{err[-3000:]}")
    return result


def wait_for(pred, timeout: float, what: str, step: float = 0.5, logs: tuple[Path, ...] = ()):
    """Poll ``pred`` until it returns something truthy (returned) or fail after ``timeout`` s,
    showing the end of each of ``logs`` so a CI failure says where the nodes were."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    tails = "".join(f"\nthe end of {log.name}:\n{log.read_text(errors='replace')[-2000:]}" for log in logs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tails}")


def wait_in_log(proc: subprocess.Popen, log: Path, text: str, timeout: float, what: str, step: float = 0.5) -> str:
    """Wait until ``text`` appears in the log of the background node ``proc``; returns the log.
    Fails at once if the node exits first, and either way shows the end of its log, so a CI
    failure says why the node never got there."""
    deadline = time.time() + timeout
    while True:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        if proc.poll() is not None:
            problem = f"{what} exited with {proc.returncode} before printing {text!r}"
            break
        if time.time() > deadline:
            problem = f"timed out after {timeout}s waiting for {what} to print {text!r}"
            break
        time.sleep(step)
    raise AssertionError(f"{problem}; the end of {log.name}:\n{content[-4000:]}")


def left_behind(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The processes of ``pids`` still alive after ``timeout`` s (zombies count as gone)."""
    deadline = time.time() + timeout
    while True:
        alive = [p for p in pids if is_alive(p)]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


_SPAWNED: list[subprocess.Popen] = []


def spawn(args: list[str], log: Path, island: int = 0) -> subprocess.Popen:
    """Start ``node.py ARGS`` in the background, in its own process group (with its DHT child
    and p2pd), output to ``log``; with ``island=N``, as N processes through ``torchrun`` (the
    ``--`` keeps torchrun from reading node.py's flags: it has a ``--role`` of its own). Stop it
    with :func:`kill_tree`."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(island), "--"]
    proc = subprocess.Popen(
        [*(launcher if island else [sys.executable]), str(ROOT / "node.py"), *args],
        cwd=ROOT,
        env=ENV,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    _SPAWNED.append(proc)
    return proc


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a spawned node's process group, then kill whatever it left below it: cleanup after
    a test, so it does not rely on the node's own lifeline (tests/test_stop.py checks that)."""
    below = descendants(proc.pid)
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for pid in left_behind(below, timeout=5.0):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session", autouse=True)
def _kill_leftover_nodes():
    """Whatever a test left running is killed, group and all, when the session ends."""
    yield
    for proc in _SPAWNED:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """300 Twemoji images, 2 clusters (one FM, one DDPM expert), a few steps each, a router."""
    work = tmp_path_factory.mktemp("run")
    node("--role", "prepare", "--workdir", str(work), "--limit", "300", "--clusters", "2", "--objective", "mixed")
    for k in ("0", "1"):
        node(
            "--role", "trainer", "--local", "--workdir", str(work), "--expert", k, "--steps", "6", "--batch-size", "16"
        )
    node(
        "--role", "trainer", "--local", "--workdir", str(work), "--job", "router", "--steps", "6", "--batch-size", "32"
    )
    return work


def start_serving_preparer(small_run: Path, tmp: Path, procs: list) -> tuple[list[str], object, subprocess.Popen, Path]:
    """A preparer serving a copy of :func:`small_run` with its checkpoints published, and an
    observer node in that swarm: (peers, observer, preparer, its log). The preparer is appended to
    ``procs``; the caller kills ``procs`` and shuts the observer down."""
    import shutil

    from swarm.dht import SwarmConfig, SwarmNode

    run = tmp / "run"
    shutil.copytree(small_run, run)  # the preparer re-prepares (identically) and publishes its checkpoints
    log = tmp / "prep.log"
    prep = spawn(
        ["--role", "prepare", "--serve", "--workdir", str(run), "--limit", "300", "--clusters", "2"]
        + ["--objective", "mixed", "--publish-local", "--host-maddrs", LOOPBACK],
        log,
    )
    procs.append(prep)
    text = wait_in_log(prep, log, "--initial-peers", 240, "the preparer")
    peers = text.split("--initial-peers", 1)[1].split("\n")[0].split()
    observer = SwarmNode(SwarmConfig(str(tmp / "observer"), initial_peers=peers, host_maddrs=[LOOPBACK]))
    try:
        wait_in_log(prep, log, "publishing local checkpoint of router", 60, "the preparer")
    except BaseException:
        observer.shutdown()
        raise
    return peers, observer, prep, log


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same random state, so a failure reproduces."""
    import torch

    torch.manual_seed(0)


def stream_session(blobs, peer: str, frames: list[bytes]) -> list[tuple[dict, bytes]]:
    """Send ``frames`` to ``peer``'s serving protocol on one stream, reading a reply after each."""
    import asyncio

    from hivemind.p2p import PeerID

    from swarm.protocol import PROTOCOL, read_frame

    async def go():
        _, reader, writer = await blobs.p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROTOCOL)
        replies = []
        try:
            for f in frames:
                writer.write(f)
                await writer.drain()
                replies.append(await asyncio.wait_for(read_frame(reader, 1 << 24), 30))
        finally:
            writer.close()
        return replies

    # Under load the p2p daemon has handed back a stream already closed, before the server's
    # handler ever ran (its log showed no session): open a new one, as a client would on failover.
    for attempt in range(3):
        try:
            return blobs.call(go(), timeout=120)
        except asyncio.IncompleteReadError as e:
            if e.partial or attempt == 2:
                raise
