"""Compute islands on the CPU: one job trained by two processes through ``torchrun`` (gloo),
locally and in a swarm, against one process given the same global batch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from data.checkpoint import latest_checkpoint
from swarm import claims
from swarm.records import ClaimRecord, claim_key
from tests.conftest import (
    LOOPBACK,
    descendants,
    kill_tree,
    left_behind,
    node,
    spawn,
    start_serving_preparer,
    wait_for,
    wait_in_log,
)

_ISLANDS: list[subprocess.Popen] = []


def torchrun(n: int, args: list[str], log: Path) -> subprocess.Popen:
    _ISLANDS.append(spawn([*args, "--threads", "1"], log, island=n))
    return _ISLANDS[-1]


@pytest.fixture(autouse=True)
def _no_island_left():
    yield
    while _ISLANDS:
        kill_tree(_ISLANDS.pop())


def _history(ckpt_root: Path) -> list:
    return latest_checkpoint(ckpt_root).meta["loss_history"]


def _weights(ckpt_root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(next((latest_checkpoint(ckpt_root).model_dir).glob("*.safetensors")))


def test_two_processes_follow_one_process_and_resume_with_any_count(small_run, tmp_path):
    data = ["--role", "trainer", "--local", "--workdir", str(small_run), "--expert", "0"]
    one, two, mixed, sharded = (tmp_path / d for d in ("one", "two", "mixed", "sharded"))
    node(*data, "--ckpt-dir", str(one), "--steps", "6", "--batch-size", "16", "--threads", "1")
    proc = torchrun(2, [*data, "--ckpt-dir", str(two), "--steps", "6", "--batch-size", "8"], tmp_path / "two.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "two.log").read_text()[-3000:]
    a, b = _history(one / "expert_0"), _history(two / "expert_0")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) < 1e-4, (a, b)
    ma, mb = latest_checkpoint(one / "expert_0").meta, latest_checkpoint(two / "expert_0").meta
    assert ma["samples_seen"] == mb["samples_seen"] == 96 and ma["data_position"] == mb["data_position"]
    text = (tmp_path / "two.log").read_text()
    assert text.count("checkpoint step 6") == 1  # rank 0 alone writes

    # The island's checkpoint resumes in one process (and vice versa): the same trajectory as
    # training straight through, so the data position and the random draws carry over exactly.
    shutil.copytree(two, mixed)
    shutil.copytree(one, sharded)
    node(*data, "--ckpt-dir", str(mixed), "--steps", "10", "--batch-size", "16", "--threads", "1")
    node(*data, "--ckpt-dir", str(one), "--steps", "10", "--batch-size", "16", "--threads", "1")
    a, m = _history(one / "expert_0"), _history(mixed / "expert_0")
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, m, strict=True)) < 1e-4, (a, m)

    # --shard (FSDP: each process holds half of the weights, gradients, moments and EMA) resumes
    # the one-process checkpoint and follows the same trajectory; its checkpoint is the same
    # format, with the same sampling weights.
    args = [*data, "--ckpt-dir", str(sharded), "--steps", "10", "--batch-size", "8", "--shard"]
    proc = torchrun(2, args, tmp_path / "sharded.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "sharded.log").read_text()[-3000:]
    s = _history(sharded / "expert_0")
    assert [st for st, _ in s] == list(range(1, 11))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, s, strict=True)) < 1e-4, (a, s)
    wa, ws = _weights(one / "expert_0"), _weights(sharded / "expert_0")
    assert wa.keys() == ws.keys() and max((wa[k] - ws[k]).abs().max().item() for k in wa) < 1e-4


def test_a_dead_rank_makes_the_others_exit_with_one_line(small_run, tmp_path):
    args = ["--role", "trainer", "--local", "--workdir", str(small_run), "--expert", "1"]
    log = tmp_path / "island.log"
    budget = ["--steps", "100000", "--batch-size", "8", "--ckpt-every", "5"]
    proc = torchrun(2, [*args, "--ckpt-dir", str(tmp_path / "c"), *budget], log)
    wait_in_log(proc, log, "checkpoint step 5", 120, "the island training")
    os.kill(_workers(proc)[-1], signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert "another rank of the island is gone" in log.read_text()
    assert not left_behind(descendants(proc.pid) + [proc.pid], timeout=10)


def _workers(proc: subprocess.Popen) -> list[int]:
    return sorted(
        p for p in descendants(proc.pid) if "node.py" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")
    )


def test_swarm_island_rank0_claims_a_lost_claim_stops_every_rank_and_sigterm_saves_once(small_run, tmp_path):
    """Sharded (FSDP), so stopping also runs the collective save: every rank gathers, rank 0 writes."""
    procs: list = []
    observer = None
    try:
        peers, observer, prep, _ = start_serving_preparer(small_run, tmp_path, procs)
        run = observer.run()
        log = tmp_path / "island.log"
        proc = torchrun(
            2,
            ["--role", "trainer", "--workdir", str(tmp_path / "t"), "--expert", "0", "--batch-size", "8", "--shard"]
            + ["--ckpt-every", "20", "--heartbeat", "2", "--initial-peers", *peers, "--host-maddrs", LOOPBACK],
            log,
        )
        wait_in_log(proc, log, "claimed expert_0", 180, "the island")
        wait_in_log(proc, log, "checkpoint step", 120, "the island's first checkpoint")
        assert log.read_text().count("this trainer's key") == 1  # one DHT node: rank 0's

        # Another key takes the job with an earlier t0: rank 0 sees it at its next heartbeat and
        # every rank stops training (they agree on the step); rank 0 then waits for the job.
        mine = claims.winner(observer.snapshot(run, ["expert_0"]), "expert_0")
        t0 = observer.snapshot(run, ["expert_0"]).claims["expert_0"][mine].t0
        thief = ClaimRecord(run.manifest_sha256, observer.peer_id, t0 - 1.0)
        observer.store(claim_key("expert_0"), thief, 600)
        wait_in_log(proc, log, "another node now wins", 60, "the island losing its claim")
        observer.withdraw_claim("expert_0", thief)
        # Freed again: the island claims it back and trains on, every rank following rank 0.
        wait_for(lambda: log.read_text().count("claimed expert_0") >= 2, 120, "the island to claim again")
        before = log.read_text().count("checkpoint step")
        wait_for(lambda: log.read_text().count("checkpoint step") > before, 120, "training again")

        helpers = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        text = log.read_text()
        assert text.count("stopping on SIGTERM") == 2  # both ranks heard it
        after = text.split("stopping on SIGTERM", 1)[1]
        assert after.count("checkpoint step") == 1, after[-3000:]  # saved once, by rank 0
        assert "released expert_0" in after
        assert claims.winner(observer.snapshot(run, ["expert_0"]), "expert_0") is None
        assert not left_behind(helpers + [proc.pid], timeout=15), "the island left processes behind"
    finally:
        if observer is not None:
            observer.shutdown()
        for p in procs:
            kill_tree(p)
