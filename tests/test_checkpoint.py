"""Checkpoints: hash-verified loading, refusal of corrupt files, exact optimizer round trip, the
milestones that pruning leaves alone."""

import json

import pytest
import torch

from data.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_train_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    verify_checkpoint,
)
from router.network import RouterNet
from tests.test_training_device import FixedJob
from training.loop import HISTORY_MAX, LossCurve, TrainConfig, thin_history, train


def _tiny_model() -> RouterNet:
    return RouterNet(num_experts=2, in_channels=3, sample_size=8, hidden=16, layers=1, heads=2, patch=4)


def test_save_verify_and_prune(tmp_path):
    model = _tiny_model()
    for step in (1, 2, 3, 4):
        ck = save_checkpoint(tmp_path, step, model, {"kind": "router"}, {"x": torch.ones(3)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    again = latest_checkpoint(tmp_path)
    assert again.sha256 == ck.sha256 and again.step == 4
    assert torch.equal(load_train_tensors(again)["x"], torch.ones(3))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(ck.path, expected_sha256="0" * 64)


def test_milestone_steps_are_never_pruned(tmp_path):
    model = _tiny_model()
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, model, {"kind": "router"}, keep=2, keep_steps=(2,))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000005"]
    assert latest_checkpoint(tmp_path).step == 5  # a milestone is not where training resumes


def test_the_loop_saves_a_milestone_between_its_regular_checkpoints(tmp_path):
    cfg = TrainConfig(ckpt_root=str(tmp_path), steps=6, batch_size=8, ckpt_every_steps=2, keep=1, keep_steps=(3,))
    train(FixedJob(batch_size=8), cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006"]


def test_flipped_byte_is_refused(tmp_path):
    ck = save_checkpoint(tmp_path, 1, _tiny_model(), {"kind": "router"})
    weights = next((ck.path / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        verify_checkpoint(ck.path)


def test_tampered_meta_changes_identity(tmp_path):
    ck = save_checkpoint(tmp_path, 1, _tiny_model(), {"kind": "router"})
    meta = json.loads((ck.path / "meta.json").read_text())
    meta["step"] = 99
    (ck.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        verify_checkpoint(ck.path, expected_sha256=ck.sha256)


def test_optimizer_round_trip_is_exact():
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 3, 8, 8), torch.rand(2) * 1000).sum().backward()
        opt.step()
    tensors, groups = optimizer_to_tensors(opt)
    groups = json.loads(json.dumps(groups))  # as it is stored
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer_from_tensors(opt2, tensors, groups)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid in s1["state"]:
        for key in s1["state"][pid]:
            assert torch.equal(torch.as_tensor(s1["state"][pid][key]), torch.as_tensor(s2["state"][pid][key]))


def test_a_long_resumed_loss_curve_keeps_its_start_evenly():
    """A curve thinned again and again, across resumes, still covers its early steps as densely
    as its late ones, and starts at its first point."""
    history: list[list[float]] = []
    for resume in range(4):  # four segments of 5,000 steps, each resuming the last one's history
        curve = LossCurve([list(h) for h in history], "x")
        for step in range(resume * 5000 + 1, (resume + 1) * 5000 + 1):
            curve.add(step, torch.tensor(1.0 / step))
            if step % 50 == 0:
                curve.flush()
        history = curve.history
    steps = [s for s, _ in history]
    assert steps[0] == 1 and steps[-1] == 20000 and steps == sorted(steps)
    assert HISTORY_MAX // 2 <= len(steps) <= HISTORY_MAX
    # (every other point dropped at each thinning would leave [1, 1, 59, 1890]; the newest steps stay
    # denser until the next thinning)
    quarters = [sum(1 for s in steps if q * 5000 < s <= (q + 1) * 5000) for q in range(4)]
    assert max(quarters[:3]) <= 1.5 * min(quarters[:3]) and min(quarters) >= HISTORY_MAX // 20, quarters
    assert thin_history(history[:10], 100) == history[:10]
