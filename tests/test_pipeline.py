"""The Python entry point: DiffswarmPipeline built from a small trained run's checkpoints, from its
export, and through diffusers' own DiffusionPipeline.from_pretrained, giving the same images.
(From a live swarm: tests/test_serving.py.)"""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from data.checkpoint import CheckpointError
from diffswarm import DiffswarmOutput, DiffswarmPipeline
from router.sampling import SamplerConfig
from tests.conftest import node


@pytest.fixture(scope="module")
def export(small_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "set"
    node("--role", "export", "--workdir", str(small_run), "--out", str(out))
    return out


def _pixels(output: DiffswarmOutput) -> list[np.ndarray]:
    return [np.asarray(im) for im in output.images]


def test_a_call_gives_pil_images_and_who_served_every_step(export):
    pipe = DiffswarmPipeline.from_pretrained(export)
    out = pipe(["red apple", "rocket"], steps=3, seed=1)
    side = pipe.shape[-1]
    assert [im.size for im in out.images] == [(side, side)] * 2 and out.images[0].mode == "RGB"
    assert len(out.routing) == 3 and [r["step"] for r in out.routing] == [0, 1, 2]
    for step in out.routing:  # top2 of two experts: both, here
        here = {"served_by": "local", "path": "local"}
        assert step["experts"] == {0: here, 1: here}
    assert out.usage == [6, 6] and out.reroutes == [] and out.audit is None
    again = pipe("red apple", steps=3, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(_pixels(again)[0], _pixels(out)[0])  # a generator seeds the noise as seed= does
    top1 = pipe("red apple", mode="top1", steps=3, seed=1)
    assert all(len(step["experts"]) == 1 for step in top1.routing)


def test_export_checkpoints_and_diffusers_load_the_same_set(small_run, export):
    ours = DiffswarmPipeline.from_pretrained(export)("red apple", steps=3, seed=2)
    from_ckpt = DiffswarmPipeline.from_checkpoints(small_run / "checkpoints")("red apple", steps=3, seed=2)
    # diffusers' own entry point, through the pipeline.py written into the export.
    theirs = DiffusionPipeline.from_pretrained(export, trust_remote_code=True)
    assert isinstance(theirs, DiffswarmPipeline) and theirs.num_experts == 2
    via_diffusers = theirs("red apple", steps=3, seed=2)
    assert np.array_equal(_pixels(ours)[0], _pixels(from_ckpt)[0])
    assert np.array_equal(_pixels(ours)[0], _pixels(via_diffusers)[0])
    with pytest.raises(ValueError, match="trust_remote_code"):  # diffusers runs no code it was not allowed to
        DiffusionPipeline.from_pretrained(export)


def test_save_pretrained_round_trips_and_refuses_a_partial_set(small_run, tmp_path):
    pipe = DiffswarmPipeline.from_checkpoints(small_run / "checkpoints")
    saved = pipe.save_pretrained(tmp_path / "again")
    a = pipe("rocket", steps=2, seed=3)
    b = DiffswarmPipeline.from_pretrained(saved)("rocket", steps=2, seed=3)
    assert np.array_equal(_pixels(a)[0], _pixels(b)[0])
    one = DiffswarmPipeline.from_checkpoints(small_run / "checkpoints", experts=[1])
    with pytest.raises(CheckpointError, match=r"experts \[0\] are not held here"):
        one.save_pretrained(tmp_path / "partial")
    out = one("rocket", steps=2)  # one expert: the router's choice renormalised over it
    assert all(set(step["experts"]) == {1} for step in out.routing)


def test_the_step_callback_sees_every_step_and_can_replace_the_latents(export):
    pipe = DiffswarmPipeline.from_pretrained(export)
    seen = []

    def callback(p, step, timestep, kwargs):
        assert p is pipe and kwargs["latents"].shape == (1, *pipe.shape)
        seen.append((step, round(timestep), sorted(kwargs["routing"]["experts"])))
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 2 else {}

    out = pipe("sun", steps=3, seed=0, callback_on_step_end=callback)
    assert [s for s, _, _ in seen] == [0, 1, 2] and seen[-1][1] == 0  # the last step reaches t = 0
    assert (_pixels(out)[0] == 128).all()  # zeros at t = 0 decode to mid-grey: the replacement was used
    with pytest.raises(ValueError, match="shape"):
        pipe("sun", steps=2, callback_on_step_end=lambda *a: {"latents": torch.zeros(1, 3, 8, 8)})


def test_modes_and_bad_calls_are_plain_errors(export):
    pipe = DiffswarmPipeline.from_pretrained(export)
    with pytest.raises(ValueError, match="unknown --mode"):
        pipe("sun", mode="best")
    with pytest.raises(ValueError, match="empty prompt"):
        pipe(["sun", " "], steps=1)
    with pytest.raises(CheckpointError, match="not an exported set"):
        DiffswarmPipeline.from_pretrained(export / "vae")
    with pytest.raises(CheckpointError, match="not a diffswarm export"):
        DiffswarmPipeline.from_pretrained(export / "router")
    tensors, log = pipe.sample(["sun"], SamplerConfig(mode="full", steps=2))
    assert tensors.shape == (1, *pipe.shape) and log.per_step == [[0, 1], [0, 1]]
