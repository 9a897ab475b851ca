"""Every long-lived role stops when told and leaves nothing behind, with real processes on 127.0.0.1.

Ctrl-C in a terminal signals the whole foreground process group; ``kill`` or a service manager
signals the main pid. Either way a node must exit 0 within 10 s, having saved and released what
it holds. SIGKILL runs no cleanup at all, yet the node's DHT process and p2pd must still end.
These tests signal only what a user would signal, never the helpers themselves.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from swarm import claims
from swarm.records import SERVE_PERIOD_S, ServeRecord, serve_key
from tests.conftest import LOOPBACK, descendants, kill_tree, left_behind, spawn, start_serving_preparer, wait_in_log

STOP_S = 10.0  # the promise: a requested stop ends the node within this many seconds


@pytest.fixture(scope="module")
def swarm(small_run, tmp_path_factory):
    """A preparer serving the small trained run (its checkpoints published), and an observer."""
    tmp = tmp_path_factory.mktemp("stop")
    procs, observer = [], None
    try:
        peers, observer, prep, log = start_serving_preparer(small_run, tmp, procs)
        yield tmp, peers, observer, prep, log
    finally:
        if observer is not None:
            observer.shutdown()
        for p in procs:
            kill_tree(p)


def _start(swarm, name: str, role_args: list[str], ready: str):
    tmp, peers = swarm[0], swarm[1]
    log = tmp / f"{name}-{time.time_ns()}.log"
    args = [*role_args, "--workdir", str(tmp / name), "--host-maddrs", LOOPBACK]
    if role_args[1] != "bootstrap":
        args += ["--initial-peers", *peers]
    proc = spawn(args, log)
    wait_in_log(proc, log, ready, 180, name)
    helpers = descendants(proc.pid)
    assert helpers, f"{name} has no DHT process to watch"
    return proc, log, helpers


def _stop(proc, how: str) -> float:
    """Send the stop a user would send; returns the seconds until the node exited."""
    t0 = time.monotonic()
    if how == "ctrl-c":  # what a terminal does: SIGINT to the foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    else:  # what kill(1) or a service manager does: SIGTERM to the main pid
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except Exception:
        kill_tree(proc)
        raise AssertionError(f"still running 60 s after {how}") from None
    return time.monotonic() - t0


def _serve_states(observer, run, expert: int) -> dict[str, str]:
    """Server peer → its announced state, for ``expert`` in ``run``."""
    records = observer.read(serve_key(expert), ServeRecord).values()
    return {r.peer: r.state for r in records if r.run == run.manifest_sha256}


def _assert_clean_stop(proc, log, helpers, took: float) -> str:
    text = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{text[-2000:]}"
    assert took < STOP_S, f"took {took:.1f}s to stop:\n{text[-2000:]}"
    assert not left_behind(helpers), f"left processes behind: {left_behind(helpers, 0)}"
    return text


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_bootstrap_stops_within_10s_and_leaves_nothing(swarm, how):
    proc, log, helpers = _start(swarm, "boot", ["--role", "bootstrap"], "is up")
    _assert_clean_stop(proc, log, helpers, _stop(proc, how))
    assert "bootstrap peer stopped" in log.read_text()


def test_training_trainer_saves_and_releases_on_ctrl_c(swarm):
    _, _, observer, _, _ = swarm
    run = observer.run()
    proc, log, helpers = _start(
        swarm, "trainer", ["--role", "trainer", "--expert", "0", "--ckpt-every", "1000"], "expert 0 (fm): resumed"
    )
    text = _assert_clean_stop(proc, log, helpers, _stop(proc, "ctrl-c"))
    assert "stopping on SIGINT" in text and "released expert_0" in text, text[-2000:]
    snap = observer.snapshot(run)
    assert claims.winner(snap, "expert_0") is None, "the claim outlived the stop"
    rec = claims.latest_checkpoint(snap, "expert_0")
    assert rec is not None and rec.step > 6, "the steps trained before the stop were not saved and published"
    me = text.split("trainer ", 1)[1].split()[0]
    assert observer.providers(rec.sha256) - {me}, "the trainer left before another peer held its last checkpoint"
    assert "is held by 2 peers" in text, text[-2000:]


def test_server_says_offline_on_sigterm(swarm):
    _, _, observer, _, _ = swarm
    run = observer.run()
    proc, log, helpers = _start(swarm, "server", ["--role", "server", "--expert", "1"], "serving expert")
    text = _assert_clean_stop(proc, log, helpers, _stop(proc, "sigterm"))
    assert "server stopped" in text
    states = _serve_states(observer, run, 1)
    assert "offline" in states.values() and "online" not in states.values(), states


def test_server_stops_cleanly_when_every_process_of_it_gets_sigterm(swarm):
    """What ``pkill -f node.py`` or a service manager signalling a whole unit does. p2pd dies at
    once, so the OFFLINE record may not get out; the node must still exit 0 in time, leave
    nothing behind, and drop out of clients' view when its record expires."""
    _, _, observer, _, _ = swarm
    run = observer.run()
    proc, log, helpers = _start(swarm, "server-all", ["--role", "server", "--expert", "0"], "serving expert")
    t0 = time.monotonic()
    for pid in [proc.pid, *helpers]:
        os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=60)
    text = _assert_clean_stop(proc, log, helpers, time.monotonic() - t0)
    peer = text.split("server ", 1)[1].split()[0]
    while _serve_states(observer, run, 0).get(peer) == "online" and time.monotonic() - t0 < SERVE_PERIOD_S + 2:
        time.sleep(0.5)
    assert _serve_states(observer, run, 0).get(peer) != "online", "the stopped server is still listed online"


def test_live_status_stops_on_ctrl_c(swarm):
    proc, log, helpers = _start(swarm, "status", ["--role", "status"], "expert_0")
    _assert_clean_stop(proc, log, helpers, _stop(proc, "ctrl-c"))


@pytest.mark.parametrize(
    ("role_args", "ready"),
    [
        (["--role", "bootstrap"], "is up"),
        (["--role", "trainer", "--expert", "1"], ": resumed from step"),
        (["--role", "server", "--expert", "0"], "serving expert"),
        (["--role", "status"], "expert_0"),
    ],
    ids=["bootstrap", "trainer", "server", "status"],
)
def test_sigkilled_node_takes_its_dht_process_and_p2pd_with_it(swarm, role_args, ready):
    proc, log, helpers = _start(swarm, f"killed-{role_args[1]}", role_args, ready)
    killed = time.monotonic()
    proc.send_signal(signal.SIGKILL)  # the main pid only: no cleanup runs in it
    proc.wait(timeout=10)
    assert not left_behind(helpers, timeout=10), "a SIGKILLed node left its helpers running"
    if role_args[1] == "server":  # it said nothing on its way out, yet leaves clients' view in time
        observer = swarm[2]
        peer = log.read_text().split("server ", 1)[1].split()[0]
        run = observer.run()
        listed = lambda: any(r.peer == peer for recs in observer.servers(run, [0]).values() for r in recs)  # noqa: E731
        while listed() and time.monotonic() - killed < SERVE_PERIOD_S + 2:
            time.sleep(0.5)
        assert not listed(), f"a killed server was still listed {time.monotonic() - killed:.0f}s later"


def test_serving_preparer_stops_last_within_10s(swarm):
    """Runs last in this module: the preparer that served everything above stops cleanly too."""
    _, _, _, prep, log = swarm
    helpers = descendants(prep.pid)
    _assert_clean_stop(prep, log, helpers, _stop(prep, "sigterm"))
