"""Expert training on a CUDA GPU: samples/s, MFU and peak memory of B/2 and XL/2, side by side in one run.

Random data of the real shapes (latents (B, 4, 32, 32), CLIP-shaped text states (B, 77, 768) with
their mask, timesteps in [0, 1000)): a step's cost depends on shapes only. Per preset:

* the bare loop (forward, backward and AdamW step on tensors already on the GPU, fp32 master
  weights) in fp32 (TF32 matmuls), bf16 autocast, and bf16 autocast + ``model.compile()``;
  samples/s after warm-up, peak memory, and MFU (model FLOPs of ``experts/flops.py``) against the
  GPU's dense bf16 peak and against a bf16 matmul measured in the same run;
* the whole trainer (``training.loop.train`` with a job whose batches are random latents on the
  CPU, bf16) divided by the bare bf16 loop.

Appends its tables to benchmarks/RESULTS_GPU.md with the machine they ran on. Without a CUDA
device it says so in one line and measures nothing.

    .venv/bin/python benchmarks/train_gpu.py [--presets B/2 XL/2] [--steps 100] [--batch-size N] [--no-compile]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import append_section, machine  # noqa: E402
from data.streaming import Batch, DataPosition  # noqa: E402
from experts.device import autocast, enable_fast_matmul  # noqa: E402
from experts.flops import peak_bf16_flops, train_flops_per_sample  # noqa: E402
from experts.objectives import make_training_batch, sample_train_times  # noqa: E402
from experts.presets import ExpertPreset, build_expert, count_parameters, expert_forward, get_preset  # noqa: E402
from training.loop import TrainConfig, train  # noqa: E402

RESULTS_GPU = Path(__file__).resolve().parent / "RESULTS_GPU.md"
TEXT_TOKENS, TEXT_DIM = 77, 768  # CLIP ViT-L/14 token states
DEFAULT_PEAK = 989e12  # H100 SXM / H200 dense bf16, for devices the table does not know
TARGET_MFU = 0.40  # spec: B/2 in bf16 at >= 40 % MFU on an H100
TARGET_MFU_PRESET = "B/2"
TARGET_RATIO = 0.95  # spec: the whole trainer at >= 95 % of the bare loop's samples/s
TRAINER_LOG_EVERY = 50  # the trainer is timed between its step-50 log and its last one
SHOWN = {"fp32": "fp32 (TF32 matmuls)"}  # what each bare-loop run is called in the table


@dataclass
class Run:
    label: str
    samples_per_s: float | None  # None: out of memory
    peak_bytes: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh(device: torch.device) -> None:
    """Free what the previous run left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


class RandomLatentJob:
    """A ``training.loop.TrainJob`` like ``training.expert_job.ExpertJob`` (FM loss, noise and times
    from the loop's CPU generator), but its batches are random latents on the CPU and its text
    states are precomputed random tensors (moved to the device once) instead of a text encoder."""

    def __init__(
        self, preset: ExpertPreset, batch_size: int, text_tokens: int = TEXT_TOKENS, text_dim: int = TEXT_DIM
    ) -> None:
        self.preset = preset
        self.name = f"{preset.name} random latents"
        self.model = build_expert(preset, text_dim)
        self.batch_size = batch_size
        self.lr = preset.lr
        self.warmup_steps = preset.warmup_steps
        g = torch.Generator().manual_seed(0)
        shape = (batch_size, preset.channels, preset.sample_size, preset.sample_size)
        self._images = [torch.randn(shape, generator=g) for _ in range(4)]
        self._text = (torch.randn(batch_size, text_tokens, text_dim, generator=g), torch.ones(batch_size, text_tokens))
        self._text_on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def batches(self, start: DataPosition) -> Iterator[Batch]:
        index = start.index
        captions = ["random latents"] * self.batch_size
        labels = torch.zeros(self.batch_size, dtype=torch.long)
        for k in itertools.count():
            index += self.batch_size
            yield Batch(self._images[k % len(self._images)], captions, labels, DataPosition(start.epoch, index))

    def text_states(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._text_on:
            self._text_on[device] = tuple(a.to(device) for a in self._text)
        return self._text_on[device]

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        x0 = batch.images
        device = x0.device
        states, mask = self.text_states(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = sample_train_times(len(x0), generator).to(device)
        tb = make_training_batch("fm", x0, noise, t)
        pred = expert_forward(self.model, tb.x_in, tb.timestep, states, mask)
        return F.mse_loss(pred, tb.target)

    def meta(self) -> dict:
        return {
            "kind": "benchmark",
            "objective": "fm",
            "preset": self.preset.to_dict(),
            "batch_size": self.batch_size,
            "lr": self.lr,
        }


def bare_loop(
    preset: ExpertPreset,
    batch: int,
    precision: str,
    compile_model: bool,
    steps: int,
    warmup: int,
    device: torch.device,
) -> Run:
    """Forward, backward and AdamW step on tensors already on ``device``; nothing else."""
    label = precision + (" + compile" if compile_model else "")
    _fresh(device)
    if compile_model:
        torch._dynamo.reset()  # each compiled run compiles its own model from scratch
    try:
        torch.manual_seed(0)
        model = build_expert(preset, TEXT_DIM).to(device).train()
        if compile_model:
            model.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=preset.lr)
        shape = (batch, preset.channels, preset.sample_size, preset.sample_size)
        x, target = torch.randn(shape, device=device), torch.randn(shape, device=device)
        timestep = torch.rand(batch, device=device) * 1000  # uniform in [0, 1000)
        states = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, device=device)
        mask = torch.ones(batch, TEXT_TOKENS, device=device)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = F.mse_loss(expert_forward(model, x, timestep, states, mask), target)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rate = steps * batch / (time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        rate = None
    return Run(label, rate, _peak(device))


def whole_trainer(preset: ExpertPreset, batch: int, steps: int, device: torch.device, precision: str = "bf16") -> Run:
    """``training.loop.train`` on a :class:`RandomLatentJob`, timed between two of its logs."""
    _fresh(device)
    job = RandomLatentJob(preset, batch)
    stamps: list[tuple[int, float]] = []

    def on_log(step: int, loss: float, rate: float) -> None:
        _sync(device)
        stamps.append((step, time.perf_counter()))

    log_every = min(TRAINER_LOG_EVERY, steps)
    total = log_every + log_every * max(1, math.ceil(steps / log_every))  # the first log_every warm up
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                ckpt_root=tmp,
                steps=total,
                batch_size=batch,
                device=str(device),
                precision=precision,
                ckpt_every_steps=10**9,
                ckpt_every_minutes=1e9,
                log_every=log_every,
            )
            train(job, cfg, on_log=on_log)
        (s0, t0), (s1, t1) = next(s for s in stamps if s[0] >= log_every), stamps[-1]
        rate = (s1 - s0) * batch / (t1 - t0)
    except RuntimeError as e:  # the loop turns a CUDA OOM into a RuntimeError naming the batch to try
        if not isinstance(e, torch.OutOfMemoryError) and "out of GPU memory" not in str(e):
            raise
        rate = None
    peak = _peak(device)
    job.model = None
    return Run(f"trainer {precision}", rate, peak)


def matmul_flops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """bf16 FLOP/s of an n x n x n matmul on ``device``, measured now."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def _mark(ok: bool) -> str:
    return "met" if ok else "missed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["B/2", "XL/2"])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per measurement (after warm-up)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before each bare-loop measurement")
    ap.add_argument("--batch-size", type=int, default=0, help="0: each preset's")
    ap.add_argument("--no-compile", action="store_true", help="skip the bf16 + model.compile() run")
    ap.add_argument("--out", default=str(RESULTS_GPU))
    args = ap.parse_args(argv)
    presets = [get_preset(name) for name in args.presets]  # unknown names fail before any work

    if not torch.cuda.is_available():
        print("train_gpu: this machine has no CUDA device (torch.cuda.is_available() is False); nothing was measured")
        return 0

    device = torch.device("cuda")
    enable_fast_matmul(device)  # as the trainer does: fp32 matmuls outside autocast run in TF32
    gpu = torch.cuda.get_device_name(device)
    table_peak = peak_bf16_flops(gpu)
    peak = table_peak or DEFAULT_PEAK
    measured_peak = matmul_flops(device)
    print(f"bf16 8192^3 matmul: {measured_peak / 1e12:.0f} TFLOP/s", file=sys.stderr)
    configs = [("fp32", False), ("bf16", False)] + ([] if args.no_compile else [("bf16", True)])

    rows, ratio_rows = [], []
    for preset in presets:
        batch = args.batch_size or preset.batch_size
        flops = train_flops_per_sample(preset, TEXT_TOKENS, TEXT_DIM)
        bare = {}
        for precision, comp in configs:
            run = bare_loop(preset, batch, precision, comp, args.steps, args.warmup, device)
            bare[run.label] = run
            print(f"{preset.name} {run.label}: {run.samples_per_s or 0:.0f} samples/s", file=sys.stderr)
            if run.samples_per_s is None:
                rows.append(f"| {preset.name} | {run.label} | {batch} | out of memory | | | | | |")
                continue
            sps = run.samples_per_s
            achieved = sps * flops
            target = ""
            if preset.name == TARGET_MFU_PRESET and precision == "bf16":
                target = f"≥ {TARGET_MFU:.0%} MFU on an H100: {_mark(achieved / peak >= TARGET_MFU)}"
            rows.append(
                f"| {preset.name} | {SHOWN.get(run.label, run.label)} | {batch} | {sps:.0f} | {achieved / 1e12:.0f} | "
                f"{achieved / peak:.1%} | {achieved / measured_peak:.1%} | {run.peak_bytes / 2**30:.1f} GiB | "
                f"{target} |"
            )
        trainer = whole_trainer(preset, batch, args.steps, device)
        print(f"{preset.name} {trainer.label}: {trainer.samples_per_s or 0:.0f} samples/s", file=sys.stderr)
        ref = bare["bf16"].samples_per_s
        if trainer.samples_per_s is None or ref is None:
            bare_txt = "out of memory" if ref is None else f"{ref:.0f}"
            trainer_txt = "out of memory" if trainer.samples_per_s is None else f"{trainer.samples_per_s:.0f}"
            ratio_rows.append(f"| {preset.name} | {batch} | {bare_txt} | {trainer_txt} | | | |")
        else:
            ratio = trainer.samples_per_s / ref
            ratio_rows.append(
                f"| {preset.name} | {batch} | {ref:.0f} | {trainer.samples_per_s:.0f} | {ratio:.3f} | "
                f"{trainer.peak_bytes / 2**30:.1f} GiB | ≥ {TARGET_RATIO}: {_mark(ratio >= TARGET_RATIO)} |"
            )

    peak_note = (
        f"the {gpu} dense bf16 peak, {peak / 1e12:.0f} TFLOP/s"
        if table_peak
        else f"{peak / 1e12:.0f} TFLOP/s (the H100 SXM dense bf16 peak: {gpu} is not in experts/flops.py's table)"
    )
    with torch.device("meta"):  # parameter counts without initialising 600M weights
        params = {p.name: count_parameters(build_expert(p, TEXT_DIM)) for p in presets}
    flops_note = ", ".join(
        f"{p.name} {train_flops_per_sample(p, TEXT_TOKENS, TEXT_DIM) / 1e9:.1f} GFLOP "
        f"({params[p.name] / 1e6:.0f}M parameters)"
        for p in presets
    )
    lines = [
        f"## Expert training on a GPU ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Random data of the real shapes: latents (B, 4, 32, 32), text states "
        f"(B, {TEXT_TOKENS}, {TEXT_DIM}) and mask, timesteps in [0, 1000); AdamW on fp32 master weights; "
        f"{args.warmup} warm-up steps, then {args.steps} timed steps between two torch.cuda.synchronize(); "
        "every run one after another in this process, the peak memory counter reset between runs. "
        f"Model FLOPs per training sample (matmuls at 2 per multiply-add, training = 3x forward; "
        f"experts/flops.py): {flops_note}. MFU is against {peak_note}, and against a bf16 8192³ matmul "
        f"measured in this run: {measured_peak / 1e12:.0f} TFLOP/s.",
        "",
        "| preset | precision | batch | samples/s | model TFLOP/s | MFU (peak) | MFU (measured matmul) "
        "| peak memory | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        "Whole trainer ÷ bare loop, both bf16 without compile: the trainer is `training.loop.train` "
        "(data position, CPU generator noise and times moved to the GPU each step, loss.item() each step, "
        "gradient clipping, EMA, progress) on random latents from the CPU and precomputed text states "
        f"(no text encoder), timed from its step-{TRAINER_LOG_EVERY} log to its last; the bare loop is "
        "forward, backward and AdamW only, on tensors already on the GPU.",
        "",
        "| preset | batch | bare loop samples/s | whole trainer samples/s | trainer ÷ bare | trainer peak memory "
        "| target |",
        "|---|---:|---:|---:|---:|---:|---|",
        *ratio_rows,
        "",
        "Command: `.venv/bin/python benchmarks/train_gpu.py" + (" --no-compile" if args.no_compile else "") + "`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    append_section(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
