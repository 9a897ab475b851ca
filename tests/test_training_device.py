"""The training loop's device and precision code, on the CPU: bf16 autocast, checkpoints that resume
in another precision (and on another device, where CUDA exists), gradient accumulation, the
learning-rate warm-up and the out-of-memory message."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import node
from data.checkpoint import latest_checkpoint
from data.streaming import Batch, DataPosition
from experts.device import autocast, resolve_device, resolve_precision
from experts.presets import build_expert, expert_forward, get_preset
from training.loop import TrainConfig, learning_rate, train

TEXT_DIM = 8


class FixedJob:
    """A real tiny expert on a fixed pool of samples, with a loss that draws nothing at random, so
    two runs that see the same samples must end with the same weights."""

    def __init__(self, batch_size: int, pool: int = 32, warmup_steps: int = 0, oom_at: int = -1) -> None:
        torch.manual_seed(0)
        self.name, self.batch_size, self.lr, self.warmup_steps = "fixed", batch_size, 1e-3, warmup_steps
        self.model = build_expert(get_preset("tiny"), TEXT_DIM)
        gen = torch.Generator().manual_seed(1)
        self.images = torch.randn(pool, 3, 32, 32, generator=gen)
        self.calls, self.oom_at = 0, oom_at

    def batches(self, start: DataPosition) -> Iterator[Batch]:
        i = start.index
        while True:
            idx = [(i + j) % len(self.images) for j in range(self.batch_size)]
            i += self.batch_size
            yield Batch(self.images[idx], ["x"] * len(idx), torch.zeros(len(idx), dtype=torch.long), DataPosition(0, i))

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        b = len(batch.images)
        states = torch.ones(b, 4, TEXT_DIM, device=batch.images.device)
        mask = torch.ones(b, 4, device=batch.images.device)
        t = torch.full((b,), 500.0, device=batch.images.device)
        return torch.nn.functional.mse_loss(expert_forward(self.model, batch.images, t, states, mask), batch.images)

    def meta(self) -> dict:
        preset = get_preset("tiny").to_dict()
        return {
            "kind": "expert",
            "preset": preset,
            "objective": "fm",
            "text_encoder": "none",
            "batch_size": self.batch_size,
        }


def _cfg(root: Path, **kw) -> TrainConfig:
    return TrainConfig(ckpt_root=str(root), ckpt_every_steps=10**6, ckpt_every_minutes=1e6, log_every=1, **kw)


def _weights(job: FixedJob) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float().cpu() for p in job.model.parameters()])


def test_bf16_autocast_trains_on_the_cpu_and_resumes_in_fp32(tmp_path: Path) -> None:
    job = FixedJob(batch_size=8)
    ck = train(job, _cfg(tmp_path, steps=3, precision="bf16"))
    assert ck.step == 3 and ck.meta["samples_seen"] == 24 and ck.meta["loss"] > 0
    # master weights stay fp32 under autocast, and so does the checkpoint
    assert all(p.dtype == torch.float32 for p in job.model.parameters())
    with autocast("cpu", "bf16"):
        out = job.model.proj_out(torch.randn(2, job.model.proj_out.in_features))
    assert out.dtype == torch.bfloat16  # autocast did take effect on the CPU
    resumed = FixedJob(batch_size=8)
    ck2 = train(resumed, _cfg(tmp_path, steps=5, precision="fp32"))
    assert ck2.step == 5 and ck2.meta["samples_seen"] == 40
    assert ck2.meta["data_position"]["index"] == 40  # the data position carried across precisions


def test_resuming_at_another_batch_says_so(tmp_path: Path, capsys) -> None:
    train(FixedJob(batch_size=8), _cfg(tmp_path, steps=2))
    train(FixedJob(batch_size=8), _cfg(tmp_path, steps=3))
    assert "note:" not in capsys.readouterr().err
    ck = train(FixedJob(batch_size=4), _cfg(tmp_path, steps=4))
    err = capsys.readouterr().err
    assert "trained at batch 8" in err and "at batch 4;" in err, err  # rich wraps the line
    assert ck.meta["samples_seen"] == 3 * 8 + 4


def test_gradient_accumulation_equals_one_large_batch(tmp_path: Path) -> None:
    small = FixedJob(batch_size=8)
    train(small, _cfg(tmp_path / "a", steps=2, accum=2))
    large = FixedJob(batch_size=16)
    train(large, _cfg(tmp_path / "b", steps=2))
    half = FixedJob(batch_size=8)
    train(half, _cfg(tmp_path / "c", steps=2))  # half the data per step: must differ
    torch.testing.assert_close(_weights(small), _weights(large), atol=2e-5, rtol=1e-4)
    assert (_weights(half) - _weights(large)).abs().max() > 1e-4
    assert latest_checkpoint(tmp_path / "a").meta["samples_seen"] == 32


def test_warmup_is_linear_and_saved_with_the_optimizer(tmp_path: Path) -> None:
    assert [learning_rate(1.0, s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate(3e-4, 0, 0) == 3e-4
    ck = train(FixedJob(batch_size=4, warmup_steps=10), _cfg(tmp_path, steps=2))
    assert ck.meta["optimizer_groups"][0]["lr"] == pytest.approx(1e-3 * 2 / 10)


def test_out_of_memory_is_one_line_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    before = train(FixedJob(batch_size=8), _cfg(tmp_path, steps=2))
    files = sorted(p.name for p in before.path.iterdir())
    with pytest.raises(RuntimeError) as e:
        train(FixedJob(batch_size=8, oom_at=2), _cfg(tmp_path, steps=4, accum=2))
    msg = str(e.value)
    assert "\n" not in msg and "batch size 8 x --accum 2" in msg and "--batch-size 4 --accum 4" in msg
    after = latest_checkpoint(tmp_path)
    assert after.step == 2 and after.sha256 == before.sha256 and sorted(p.name for p in after.path.iterdir()) == files


def test_pixart_attention_uses_pytorch_sdpa() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = build_expert(get_preset("tiny"), TEXT_DIM)
    processors = model.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_device_and_precision_choice() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("", torch.device("cpu")) == "fp32"
    assert resolve_precision("", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="--precision takes fp32 or bf16"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="--device takes cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_trainer_flags_reach_the_train_config() -> None:
    args = node.parse_args(
        ["--role", "trainer", "--local", "--expert", "0", "--device", "cpu", "--precision", "bf16", "--accum", "4"]
        + ["--warmup-steps", "7", "--compile", "--steps", "9"]
    )
    cfg = node._train_config(args, steps=args.steps, minutes=args.minutes)
    assert (cfg.device, cfg.precision, cfg.accum, cfg.warmup_steps, cfg.compile, cfg.steps) == (
        "cpu",
        "bf16",
        4,
        7,
        True,
        9,
    )
    assert dataclasses.replace(cfg, ckpt_root="x").precision == "bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_checkpoint_trained_on_cuda_resumes_on_the_cpu(tmp_path: Path) -> None:
    train(FixedJob(batch_size=8), _cfg(tmp_path, steps=2, device="cuda", precision="bf16"))
    ck = train(FixedJob(batch_size=8), _cfg(tmp_path, steps=3, device="cpu"))
    assert ck.step == 3


def test_a_non_finite_loss_stops_training_before_any_checkpoint_holds_it(tmp_path: Path) -> None:
    """The loss is read (a GPU wait) only when logged or saved; a NaN must still never be saved."""

    class NanJob(FixedJob):
        def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
            loss = super().loss(batch, generator)
            return loss * float("nan") if self.calls >= 3 else loss  # steps 2, 3, then 4: NaN

    good = train(FixedJob(batch_size=4), _cfg(tmp_path, steps=1))
    cfg = dataclasses.replace(_cfg(tmp_path, steps=6), log_every=100, ckpt_every_steps=4)
    with pytest.raises(FloatingPointError, match="loss became nan at step 4"):
        train(NanJob(batch_size=4), cfg)
    assert latest_checkpoint(tmp_path).sha256 == good.sha256
