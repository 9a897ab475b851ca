"""The distill job: a student trained on the routed ensemble's velocity, on one machine and by a
swarm (claimed only once every expert and the router are done, verified against its teacher,
used by a client with no router)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from data.checkpoint import latest_checkpoint
from router.ensemble import load_checkpoints
from router.teacher import Teacher
from tests.conftest import LOOPBACK, kill_tree, node, spawn, wait_in_log


def test_the_teacher_is_the_routed_top2_velocity(small_run):
    """The teacher's target equals a routed step's velocity with guidance off: the top-2 experts'
    velocities (the DDPM expert's turned into one) weighted by the renormalised router."""
    from experts.objectives import TIMESTEP_SCALE, network_input, velocity_from_output
    from experts.presets import expert_forward
    from experts.text_encoder import TextEncoderConfig, load_text_encoder
    from router.network import pool_text

    teacher = Teacher.from_checkpoints(small_run / "checkpoints")
    assert {o for _, o in teacher.experts.values()} == {"fm", "ddpm"}
    states, mask = load_text_encoder(TextEncoderConfig.parse("minilm")).encode(["red apple", "dog face", ""])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.5, 0.9])
    v = teacher(x, t, states, mask)
    probs = torch.softmax(teacher.router(x, TIMESTEP_SCALE * t, pool_text(states, mask)), -1)
    want = torch.zeros_like(x)
    for k, (model, objective) in teacher.experts.items():  # two experts: top-2 is all of them
        net_in, ts = network_input(objective, x, t)
        want += probs[:, k].reshape(-1, 1, 1, 1) * velocity_from_output(
            objective, expert_forward(model, net_in, ts, states, mask), x, t
        )
    assert torch.allclose(v, want, atol=1e-5) and teacher.forwards == 6


def test_distill_on_one_machine_then_sample_with_the_student_alone(small_run, tmp_path):
    ckpt = shutil.copytree(small_run / "checkpoints", tmp_path / "checkpoints")
    data = str(small_run / "data")
    out = node("--role", "trainer", "--local", "--job", "distill", "--data-dir", data, "--ckpt-dir", str(ckpt),
               "--steps", "3", "--batch-size", "8", "--distill-init", "expert")  # fmt: skip
    assert "starting from expert 0's weights" in out.stdout  # expert 1 is DDPM: not a velocity network
    ck = latest_checkpoint(ckpt / "distill")
    found, router = load_checkpoints(ckpt)
    assert ck.step == 3 and ck.meta["kind"] == "distill" and ck.meta["objective"] == "fm"
    assert ck.meta["teacher"] == {"expert_0": found[0].sha256, "expert_1": found[1].sha256, "router": router.sha256}
    png = tmp_path / "distilled.png"
    out = node("--role", "client", "--local", "--mode", "distilled", "--ckpt-dir", str(ckpt), "--steps", "4",
               "--output", str(png), "red apple", "dog face")  # fmt: skip
    assert png.is_file()
    routing = json.loads(png.with_suffix(".json").read_text())
    assert routing["usage"] == [8], routing["usage"]  # one network served every (image, step)
    # An export takes the student along, and it draws the same images from there.
    export = tmp_path / "export"
    out = node("--role", "export", "--ckpt-dir", str(ckpt), "--out", str(export))
    assert "with the distilled student, step 3" in out.stdout
    again = tmp_path / "from-export.png"
    node("--role", "client", "--from-export", str(export), "--mode", "distilled", "--steps", "4",
         "--output", str(again), "red apple", "dog face")  # fmt: skip
    assert again.read_bytes() == png.read_bytes()


def test_a_swarm_distills_once_the_experts_and_router_are_done(small_run, tmp_path):
    """The preparer publishes the trained experts and router at their targets; the only free job is
    then distill: a trainer claims it, fetches its teacher peer to peer, trains the student, the
    preparer verifies it against that teacher, and a client generates with it alone: here while no
    server of it is up, then with every step sent to a ``--role server --expert distilled`` and
    audited against the verified student it fetched."""
    run = shutil.copytree(small_run, tmp_path / "run")
    procs = []
    try:
        log = tmp_path / "prep.log"
        prep = spawn(["--role", "prepare", "--serve", "--workdir", str(run), "--limit", "300", "--clusters", "2",
                      "--objective", "mixed", "--publish-local", "--expert-steps", "6", "--router-steps", "6",
                      "--distill-steps", "4", "--host-maddrs", LOOPBACK], log)  # fmt: skip
        procs.append(prep)
        text = wait_in_log(prep, log, "--initial-peers", 240, "the preparer")
        peers = text.split("--initial-peers", 1)[1].split("\n")[0].split()
        t_log = tmp_path / "trainer.log"
        trainer = spawn(["--role", "trainer", "--workdir", str(tmp_path / "t"), "--batch-size", "8",
                         "--ckpt-every", "2", "--heartbeat", "2", "--initial-peers", *peers,
                         "--host-maddrs", LOOPBACK], t_log)  # fmt: skip
        procs.append(trainer)
        wait_in_log(trainer, t_log, "claimed distill", 180, "the trainer")
        wait_in_log(prep, log, "verified distill step 4", 300, "the preparer")
        assert "distill: starting from expert 0's" in t_log.read_text()  # expert 1 is DDPM
        status = node("--role", "status", "--json", "--workdir", str(tmp_path / "status"), "--initial-peers",
                      *peers, "--host-maddrs", LOOPBACK, timeout=120)  # fmt: skip
        (shown,) = json.loads(status.stdout)["runs"]
        assert shown["complete"] and [j["job"] for j in shown["jobs"]][-1] == "distill"
        client = ["--role", "client", "--mode", "distilled", "--workdir", str(tmp_path / "client"), "--steps", "3",
                  "--initial-peers", *peers, "--host-maddrs", LOOPBACK]  # fmt: skip
        png = tmp_path / "swarm-distilled.png"
        out = node(*client, "--output", str(png), "sun")
        assert "no server of the distilled student is up: it runs here" in out.stderr
        assert json.loads(png.with_suffix(".json").read_text())["where"] == [{"0": "local"}] * 3
        s_log = tmp_path / "server.log"
        server = spawn(["--role", "server", "--expert", "distilled", "--workdir", str(tmp_path / "s"),
                        "--initial-peers", *peers, "--host-maddrs", LOOPBACK], s_log)  # fmt: skip
        procs.append(server)
        wait_in_log(server, s_log, "the distilled student: serving step 4", 120, "the server")
        for _ in range(3):  # its first announcement follows the load by a moment
            status = node("--role", "status", "--json", "--workdir", str(tmp_path / "status"), "--initial-peers",
                          *peers, "--host-maddrs", LOOPBACK, timeout=120)  # fmt: skip
            (shown,) = json.loads(status.stdout)["runs"]
            if shown["servers"]:
                break
        assert [(s["expert"], s["step"]) for s in shown["servers"]] == [("distilled", 4)], shown["servers"]
        served = tmp_path / "served.png"
        node(*client, "--audit", "1", "--output", str(served), "sun", "red apple", timeout=180)
        routing = json.loads(served.with_suffix(".json").read_text())
        (who,) = {w for step in routing["where"] for w in step.values()}
        assert who != "local" and routing["usage"] == [6], routing  # one network, every (image, step) on the server
        assert routing["audit"]["audited"] == 3 and not routing["audit"]["caught"], routing["audit"]
        # The same from Python: the student on its server, the images those of the student run here.
        from diffswarm import DiffswarmPipeline

        with DiffswarmPipeline.from_swarm(
            peers, cache_dir=tmp_path / "python", host_maddrs=[LOOPBACK], distilled=True
        ) as pipe:
            out = pipe(["sun", "red apple"], steps=3, seed=2)
            assert pipe.served_by == {0: "1 server(s)"} and out.audit["caught"] == []
        assert {e["served_by"] for step in out.routing for e in step["experts"].values()} == {who}
        here = DiffswarmPipeline.distilled(tmp_path / "python" / "fetched")(["sun", "red apple"], steps=3, seed=2)
        for a, b in zip(out.images, here.images, strict=True):
            assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 2
    finally:
        for p in procs:
            kill_tree(p)


def test_a_students_heldout_loss_covers_every_cluster(small_run):
    """Verifiers hold a student to its held-out loss on every cluster's held-out images, as they
    hold an expert to its own cluster's (a job of every cluster says so with cluster -1)."""
    from data.manifest import load_manifest
    from training.heldout import heldout_loss
    from training.jobs import build_job
    from training.loop import TrainConfig

    manifest, digest = load_manifest(small_run / "data")
    seen = {}
    for job_name in ("distill", "expert_1"):
        job = build_job(manifest, digest, job_name, TrainConfig(ckpt_root=""), teacher_root=small_run / "checkpoints")
        labels = seen[job_name] = set()
        job.loss = lambda batch, _gen, labels=labels: labels.update(batch.labels.tolist()) or torch.tensor(0.0)
        heldout_loss(job, batches=2, batch_size=32)
    assert seen == {"distill": {0, 1}, "expert_1": {1}}, seen


def test_a_student_preset_must_draw_the_experts_samples():
    """The student learns the teacher's velocity on the teacher's x_t: a preset of another sample
    shape is refused in one line (the preparer's --distill-preset too), one of the same is taken."""
    import pytest

    from experts.presets import get_preset, student_preset

    assert student_preset("tiny16", get_preset("tiny16")).name == "tiny16"
    with pytest.raises(ValueError, match="3x32² pixel samples, the experts' tiny16 on 3x16²"):
        student_preset("small", get_preset("tiny16"))
    out = node("--role", "prepare", "--workdir", "/nonexistent/never-made", "--expert-steps", "5", "--router-steps",
               "5", "--distill-steps", "5", "--distill-preset", "small", check=False)  # fmt: skip
    assert out.returncode == 2 and "pick a preset of the experts' sample shape" in out.stderr
