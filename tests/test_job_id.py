"""Job names: the canonical forms round-trip, nothing else parses, jobs sort, a job's folder."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from data.job_id import DISTILL_SLOT, MAX_EXPERTS, JobId, slot_shown, swarm_job_names, swarm_jobs
from swarm.records import RunRecord, ckpt_key, claim_key, serve_key, verdicts_key

CANONICAL = ["expert_0", "expert_7", "expert_10", f"expert_{MAX_EXPERTS - 1}", "router", "monolith"]


@pytest.mark.parametrize("name", CANONICAL)
def test_canonical_names_round_trip(name):
    job = JobId.parse(name)
    assert str(job) == name and JobId.parse(str(job)) == job
    assert repr(job) == f"JobId({name!r})"


def test_constructors_and_what_a_job_is():
    e = JobId.expert(3)
    assert (str(e), e.kind, e.expert_index) == ("expert_3", "expert", 3)
    assert e.is_expert and e.is_swarm and not e.is_router and not e.is_monolith
    assert JobId.router() is JobId.ROUTER and JobId.monolith() is JobId.MONOLITH
    assert (str(JobId.ROUTER), JobId.ROUTER.kind) == ("router", "router")
    assert JobId.ROUTER.is_router and JobId.ROUTER.is_swarm and not JobId.ROUTER.is_expert
    assert (str(JobId.MONOLITH), JobId.MONOLITH.kind, JobId.MONOLITH.is_swarm) == ("monolith", "monolith", False)
    assert JobId.parse("expert_3") == e and hash(JobId.parse("expert_3")) == hash(e)
    assert JobId.parse("router") == JobId.ROUTER != JobId.MONOLITH
    for job in (JobId.ROUTER, JobId.MONOLITH):
        with pytest.raises(ValueError, match="no expert index"):
            _ = job.expert_index
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.kind = "router"
    assert JobId.expert(__import__("numpy").int64(5)) == JobId.expert(5)  # an index from an array is fine


@pytest.mark.parametrize(
    "name",
    [
        "",
        "expert",
        "expert_",
        "expert_x",
        "expert_-1",
        "expert_+1",
        "expert_01",
        "expert_00",
        "expert_1.0",
        "expert_ 1",
        " expert_1",
        "expert_1 ",
        "expert_1\n",
        "Expert_1",
        "EXPERT_1",
        "expert-1",
        "expert1",
        "expert_1_2",
        "expert_١",  # an Arabic-Indic digit: int() would take it, the wire format does not
        f"expert_{MAX_EXPERTS}",
        "expert_99999999999999999999",
        "Router",
        "router ",
        "routers",
        "monolith_at_300",
        "monolith@300",
        "step_00000010",
        "x" * 10_000,
    ],
)
def test_anything_else_is_refused_with_one_line(name):
    with pytest.raises(ValueError) as e:
        JobId.parse(name)
    message = str(e.value)
    assert "\n" not in message and len(message) < 200, message
    assert JobId.try_parse(name) is None


def test_a_job_name_is_a_str():
    for value in (3, None, b"router", JobId.ROUTER):
        with pytest.raises(TypeError):
            JobId.parse(value)
        assert JobId.try_parse(value) is None


def test_constructors_refuse_what_names_no_job():
    for k in (-1, MAX_EXPERTS, 1.0, "1", True, None):
        with pytest.raises((ValueError, TypeError)):
            JobId.expert(k)
    with pytest.raises(ValueError):
        JobId("trainer")
    with pytest.raises(ValueError):
        JobId("router", 0)


def test_jobs_sort_experts_by_index_then_the_router_then_the_monolith():
    names = ["router", "expert_10", "monolith", "expert_2", "expert_0", "expert_1"]
    want = ["expert_0", "expert_1", "expert_2", "expert_10", "router", "monolith"]  # a str sort: 10 before 2
    assert [str(j) for j in sorted(map(JobId.parse, names))] == want
    assert JobId.expert(9) < JobId.expert(10) < JobId.ROUTER < JobId.MONOLITH
    assert max(JobId.expert(k) for k in range(MAX_EXPERTS)) < JobId.ROUTER
    assert JobId.ROUTER >= JobId.ROUTER and not JobId.ROUTER < JobId.ROUTER
    with pytest.raises(TypeError):
        JobId.ROUTER < "router"  # noqa: B015


def test_swarm_jobs_are_the_experts_then_the_router():
    assert swarm_job_names(3) == ["expert_0", "expert_1", "expert_2", "router"]
    assert swarm_jobs(3) == sorted(swarm_jobs(3)) and JobId.MONOLITH not in swarm_jobs()
    everything = swarm_job_names()
    assert len(everything) == MAX_EXPERTS + 1 and everything[-2:] == [f"expert_{MAX_EXPERTS - 1}", "router"]
    assert swarm_job_names(0) == ["router"]
    for n in (-1, MAX_EXPERTS + 1):
        with pytest.raises(ValueError):
            swarm_jobs(n)


def test_a_served_slot_reads_as_its_network():
    assert [slot_shown(k) for k in (0, 3, DISTILL_SLOT)] == ["expert 0", "expert 3", "the distilled student"]
    # what a stranger's request may hold instead is shown, never raised on
    assert [slot_shown(k) for k in (-1, DISTILL_SLOT + 1, "0", True, None)] == [
        "slot -1",
        f"slot {DISTILL_SLOT + 1}",
        "slot '0'",
        "slot True",
        "slot None",
    ]


def test_a_jobs_folder_is_its_name_under_the_root(tmp_path):
    assert JobId.expert(4).folder(tmp_path) == tmp_path / "expert_4"
    assert JobId.ROUTER.folder(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "router"
    assert JobId.MONOLITH.folder(Path("ck")) == Path("ck/monolith")
    assert JobId.expert(0).folder("ck") == Path("ck/expert_0")  # a str root is taken as a path


def test_records_keep_the_wire_names():
    """DHT keys and the run's jobs are byte-identical to the names built by hand before."""
    assert claim_key("expert_3") == "diffswarm_claim_expert_3" and ckpt_key("router") == "diffswarm_ckpt_router"
    assert verdicts_key("expert_0") == "diffswarm_verdicts_expert_0" and serve_key(2) == "diffswarm_serve_expert_2"
    run = RunRecord("a" * 64, 3, ["tiny"] * 3, ["fm"] * 3, 1, expert_steps=30, router_steps=10)
    assert run.jobs() == ["expert_0", "expert_1", "expert_2", "router"]
    assert (run.target("expert_2"), run.target("router")) == (30, 10)
    for bad in ("monolith", "expert_01", f"expert_{MAX_EXPERTS}", "nope"):
        with pytest.raises(ValueError):
            claim_key(bad)
    # A server's slots: expert K's is K, the distilled student's the one past every expert's.
    assert serve_key(DISTILL_SLOT) == "diffswarm_serve_distill" and DISTILL_SLOT == MAX_EXPERTS
    assert [JobId.from_slot(j.slot) for j in (JobId.expert(5), JobId.DISTILL)] == [JobId.expert(5), JobId.DISTILL]
    for k in (-1, MAX_EXPERTS + 1, True):
        with pytest.raises(ValueError):
            serve_key(k)
    for job in (JobId.ROUTER, JobId.MONOLITH):
        with pytest.raises(ValueError):
            _ = job.slot


def test_the_module_imports_nothing_heavy():
    """The bootstrap imports swarm.records, which imports this: no torch, no model code."""
    code = "import sys, data.job_id; print(sorted({'torch', 'hivemind', 'numpy'} & set(sys.modules)))"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]", out.stdout
