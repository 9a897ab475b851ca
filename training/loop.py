"""The training loop: one explicit function that trains any job (an expert or the router).

Each job supplies its network, its loss on a batch and its metadata; the loop owns what they
share: resume from the latest checkpoint (weights, EMA, optimizer, data position), AdamW with
gradient clipping, EMA, rich progress (step, loss, samples/s), a time or step budget,
periodic checkpoints and a loss-curve PNG.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from data.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_train_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from data.streaming import Batch, DataPosition
from experts.device import PRECISIONS, autocast, enable_fast_matmul
from training.island import Island, IslandError, forward_through
from training.loader import load_batches
from training.shard import full, like, shard, shard_optimizer_state

if TYPE_CHECKING:  # diffusers loads in seconds; the command line checks its flags before that
    from diffusers.training_utils import EMAModel

console = Console(stderr=True, markup=False)  # logged errors hold multiaddrs like [/ip4/...]


@dataclass
class TrainConfig:
    """How long and how to train; the same for every job."""

    ckpt_root: str  # checkpoints of this job go in <ckpt_root>/step_<N>/
    steps: int = 0  # stop at this total step (0: no step limit)
    minutes: float = 0.0  # stop after this many minutes of this process (0: no time limit)
    batch_size: int = 0  # 0: the preset's
    lr: float = 0.0  # 0: the preset's
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_max_decay: float = 0.9999  # with warm-up, so short CPU runs still get a useful EMA
    cond_dropout: float = 0.1  # fraction of captions replaced by "" (for guidance)
    ckpt_every_steps: int = 1000
    ckpt_every_minutes: float = 5.0
    log_every: int = 50
    keep: int = 3  # checkpoints kept on disk
    keep_steps: tuple[int, ...] = ()  # also saved and never pruned (milestones a later comparison needs)
    seed: int = 0
    resume: bool = True
    device: str = "cpu"  # cpu, cuda, cuda:N (the command line picks cuda when there is one)
    precision: str = "fp32"  # fp32 or bf16 (autocast; master weights and EMA stay fp32)
    compile: bool = False  # torch.compile the network (the first steps pay for compiling)
    workers: int = 0  # processes decoding batches (0: the training process itself); resume stays exact
    accum: int = 1  # micro-batches of batch_size per optimizer step: global batch = batch_size x accum
    warmup_steps: int = -1  # linear LR warm-up over this many optimizer steps (-1: the preset's)
    shard: bool = False  # in an island: FSDP (each rank holds 1/N of weights, gradients, AdamW, EMA)

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError("--workers must be at least 0")
        if any(s < 1 for s in self.keep_steps):
            raise ValueError("--keep-steps takes positive step numbers")
        if self.accum < 1 or self.warmup_steps < -1:
            raise ValueError("--accum must be at least 1 and --warmup-steps at least 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision takes {' or '.join(PRECISIONS)}; got {self.precision!r}")


class TrainJob(Protocol):
    """What the loop needs from a job."""

    name: str
    model: torch.nn.Module
    batch_size: int  # one micro-batch
    lr: float
    warmup_steps: int

    def batches(self, start: DataPosition, decode: bool = True) -> Iterator[Batch]: ...

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor: ...

    def meta(self) -> dict: ...


def _save(
    job: TrainJob,
    cfg: TrainConfig,
    ema: EMAModel,
    opt: torch.optim.Optimizer,
    step: int,
    samples: int,
    position: DataPosition,
    history: list[list[float]],
    elapsed: float,
    plain: torch.nn.Module | None = None,
    write: bool = True,
) -> Checkpoint | None:
    """Write a checkpoint of the job. With a sharded network every rank calls this, since
    gathering the whole tensors is collective; rank 0 (``write``) writes, evaluating and saving
    the sampling weights in ``plain``, its unsharded copy of the network."""
    whole = functools.partial(full, keep=write)  # whole and on the CPU: it resumes on any device
    opt_tensors, groups = optimizer_to_tensors(opt, whole)
    tensors = {f"model.{k}": whole(v) for k, v in job.model.state_dict().items()}
    tensors.update({f"ema.{i}": whole(p) for i, p in enumerate(ema.shadow_params)})
    tensors.update(opt_tensors)
    if not write:
        return None
    # The sampling weights are the EMA weights; evaluate and save those.
    trained, params = job.model, list(job.model.parameters())
    if plain is None:
        ema.store(params)
        ema.copy_to(params)
    else:
        plain.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        with torch.no_grad():
            for i, p in enumerate(plain.parameters()):
                p.copy_(tensors[f"ema.{i}"])
        job.model = plain.to(params[0].device)
    try:
        if hasattr(job, "evaluate"):
            job.evaluate()
        meta = {
            **job.meta(),
            "samples_seen": samples,
            "data_position": position.to_dict(),
            "optimizer_groups": groups,
            "ema_optimization_step": ema.optimization_step,
            "loss": history[-1][1] if history else None,
            "loss_history": history,
            "train_seconds": elapsed,
        }
        return save_checkpoint(
            Path(cfg.ckpt_root), step, job.model, meta, tensors, keep=cfg.keep, keep_steps=cfg.keep_steps
        )
    finally:
        if plain is None:
            ema.restore(params)
        else:
            job.model = trained
            plain.to("cpu")


def _resume(job: TrainJob, ema: EMAModel, opt: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Load a checkpoint's whole tensors into the job's network, EMA and optimizer, each laid out
    as the live one is (this rank's shard of it in a sharded island)."""
    expected = job.meta()
    for key in ("kind", "manifest_sha256", "cluster", "objective"):
        if key in expected and ckpt.meta.get(key) != expected[key]:
            raise CheckpointError(
                f"checkpoint {ckpt.path} was trained with {key}={ckpt.meta.get(key)!r}, this job has "
                f"{expected[key]!r}; move it away or use another --ckpt-dir"
            )
    name = lambda meta: (meta.get("router_preset") or {}).get("name")  # noqa: E731
    if "router_preset" in expected and name(ckpt.meta) != name(expected):
        raise CheckpointError(
            f"checkpoint {ckpt.path} is a router of preset {name(ckpt.meta)!r}, this job's is {name(expected)!r}; "
            "pass that --router-preset or use another --ckpt-dir"
        )
    tensors = load_train_tensors(ckpt)
    live = job.model.state_dict()
    saved = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    job.model.load_state_dict({k: like(v, live[k]) if k in live else v for k, v in saved.items()})
    shadows = [tensors[f"ema.{i}"] for i in range(len(ema.shadow_params))]
    ema.shadow_params = [like(s, p) for s, p in zip(shadows, ema.shadow_params, strict=True)]
    ema.optimization_step = int(ckpt.meta.get("ema_optimization_step", ckpt.step))
    optimizer_from_tensors(opt, tensors, ckpt.meta["optimizer_groups"])
    shard_optimizer_state(opt)


def plot_loss(history: list[list[float]], path: Path, title: str) -> None:
    """Loss curve as a PNG (smoothed), next to the checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(history) < 2:
        return
    steps, losses = zip(*history, strict=False)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
    ax.plot(steps, smooth, label="smoothed")
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_rate(base: float, step: int, warmup_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant."""
    return base if warmup_steps <= 0 else base * min(1.0, (step + 1) / warmup_steps)


def _out_of_memory(job: TrainJob, cfg: TrainConfig) -> RuntimeError:
    b, a = job.batch_size, cfg.accum
    hint = f"--batch-size {b // 2} --accum {a * 2}" if b > 1 else "a smaller preset"
    if not cfg.shard:
        hint += "; with several GPUs, torchrun with --shard"
    return RuntimeError(
        f"{job.name}: out of GPU memory at batch size {b} x --accum {a} on {cfg.device}; "
        f"try {hint} (same global batch); the last checkpoint is intact"
    )


class LossCurve:
    """The smoothed loss of every step, kept on the training device until it is read.

    Reading a GPU tensor waits for the GPU; doing that at every step would stop the CPU from
    queueing the next step's work. So the running loss stays a device tensor, and the curve is
    read (one wait) only when it is logged or saved; a non-finite loss is caught then, before any
    checkpoint could hold it.
    """

    def __init__(self, history: list[list[float]], name: str) -> None:
        self.history, self.name = history, name
        self.running: torch.Tensor | None = None
        self._pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.running = loss if self.running is None else 0.95 * self.running + 0.05 * loss
        self._pending.append((step, self.running))

    def flush(self) -> float | None:
        """Move pending values into ``history``; returns the latest smoothed loss."""
        if self._pending:
            values = torch.stack([v for _, v in self._pending]).tolist()
            for (step, _), value in zip(self._pending, values, strict=True):
                if not math.isfinite(value):
                    raise FloatingPointError(f"{self.name}: loss became {value} at step {step}; lower --lr")
                self.history.append([step, round(value, 6)])
            self._pending.clear()
            if len(self.history) > HISTORY_MAX:
                self.history[:] = thin_history(self.history, HISTORY_MAX // 2)
        return self.history[-1][1] if self.history else None


HISTORY_MAX = 2000  # points of the loss curve a checkpoint keeps; thinned to half when exceeded


def thin_history(history: list[list[float]], keep: int) -> list[list[float]]:
    """At most about ``keep`` points of a loss curve, evenly spread over its steps: the last point of
    each of ``keep`` equal step intervals. (Dropping every other point instead would thin the early
    steps again at every call, and a long or resumed run would keep almost nothing of its start.)"""
    if len(history) <= keep:
        return list(history)
    first, last = history[0][0], history[-1][0]
    width = max((last - first) / keep, 1e-9)
    buckets: dict[int, list[float]] = {}
    for point in history:
        buckets[min(int((point[0] - first) / width), keep - 1)] = point
    kept = list(buckets.values())
    if kept[0] is not history[0]:  # the first point too: the curve starts where the run did
        kept.insert(0, history[0])
    return kept


def train(
    job: TrainJob,
    cfg: TrainConfig,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    on_log: Callable[[int, float, float], None] | None = None,
    island: Island | None = None,
) -> Checkpoint | None:
    """Train ``job`` until its budget is spent or ``should_stop()``; returns the last checkpoint.

    A step is one optimizer update over ``cfg.accum`` micro-batches of ``job.batch_size``.
    ``on_checkpoint`` is called with every checkpoint written (a swarm trainer publishes it);
    ``on_log`` with (step, smoothed loss, samples/s) every ``log_every`` steps. In an ``island``
    (:mod:`training.island`) every rank trains its slice of each global batch; only rank 0 writes
    checkpoints, logs and calls back, and the other ranks return ``None``.
    """
    if cfg.steps <= 0 and cfg.minutes <= 0:
        raise ValueError("give a training budget: --steps N and/or --minutes M")
    try:
        return _train(job, cfg, should_stop, on_checkpoint, on_log, island)
    except torch.OutOfMemoryError:
        raise _out_of_memory(job, cfg) from None
    except RuntimeError as e:  # inside DDP's gradient sync: a rank is gone
        lost = isinstance(e, torch.distributed.DistError) or any(
            w in str(e) for w in ("gloo", "NCCL", "Connection reset", "Broken pipe")
        )
        if island is None or isinstance(e, IslandError) or not lost:
            raise
        raise IslandError(
            f"rank {island.rank} of {island.world}: another rank of the island is gone, stopping "
            f"({str(e).splitlines()[0][:160]})"
        ) from None


def _island_batch(job: TrainJob, cfg: TrainConfig, island: Island) -> None:
    """Make ``job``'s stream yield global micro-batches: ``--batch-size`` per process times N, or
    with none given the preset's batch split over the N processes (so the global batch, and the
    preset's learning rate with it, stay the preset's)."""
    per = cfg.batch_size or job.batch_size // island.world
    if per < 1:
        raise ValueError(f"a batch of {job.batch_size} does not split over {island.world} processes; give --batch-size")
    job.batch_size = per * island.world


def _train(job, cfg, should_stop, on_checkpoint, on_log, island=None) -> Checkpoint | None:
    torch.manual_seed(cfg.seed)
    device = torch.device(island.device(cfg.device) if island else cfg.device)
    main = island is None or island.main
    if cfg.shard and island is None:
        raise ValueError("--shard splits a network over an island: start it with torchrun --nproc-per-node N")
    sharded = cfg.shard
    part = (island.rank, island.world) if island else (0, 1)
    if island is not None:
        island.join(device)
        _island_batch(job, cfg, island)
    enable_fast_matmul(device)
    # Rank 0 of a sharded island keeps a whole copy in host memory to evaluate and save from.
    plain = copy.deepcopy(job.model).cpu() if sharded and main else None
    model = job.model.to(device).train()
    if sharded:  # each rank keeps its shard of rank 0's network
        shard(model, device)
    if cfg.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay as they are
    # DDP syncs the ranks' weights from rank 0; a sharded network runs its forward as it is
    wrapped = island.wrap(model, device) if island and not sharded else None
    params = list(model.parameters())
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=cfg.weight_decay, fused=(cuda and not sharded) or None)
    # foreach: one kernel per step for all shadow weights, not one per tensor (~1,800 for XL/2)
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=cfg.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3, foreach=True)

    step, samples, position, history, elapsed0 = 0, 0, DataPosition(), [], 0.0
    last = latest_checkpoint(Path(cfg.ckpt_root)) if cfg.resume else None
    if last is not None:
        _resume(job, ema, opt, last)
        step, samples = last.step, int(last.meta.get("samples_seen", 0))
        position = DataPosition(**last.meta.get("data_position", {}))
        history = [list(h) for h in last.meta.get("loss_history", [])]
        elapsed0 = float(last.meta.get("train_seconds", 0.0))
        console.log(f"{job.name}: resumed from step {step} ({last.path.name}, sha256 {last.sha256[:12]})")
        was = last.meta.get("batch_size")
        if was and was != job.batch_size:  # e.g. an old run's checkpoints under a preset whose batch changed
            console.log(
                f"note: {job.name}: its checkpoint trained at batch {was}, this run at batch {job.batch_size}; "
                "a step is another number of samples from here on (samples_seen stays exact)"
            )

    curve = LossCurve(history, job.name)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)  # differs after a resume
    t_start = time.monotonic()
    t_ckpt = t_start
    rate_t, rate_n = t_start, 0
    ckpt = last
    done_steps = lambda: cfg.steps > 0 and step >= cfg.steps  # noqa: E731
    out_of_time = lambda: cfg.minutes > 0 and time.monotonic() - t_start >= cfg.minutes * 60  # noqa: E731

    saved_step = last.step if last is not None else None

    def save() -> Checkpoint | None:
        nonlocal saved_step
        curve.flush()  # raises on a non-finite loss before anything is written
        saved_step = step
        if not (main or sharded):
            return None  # rank 0 writes the island's checkpoints (sharded: after all gather)
        elapsed = elapsed0 + time.monotonic() - t_start
        saved = _save(job, cfg, ema, opt, step, samples, position, curve.history, elapsed, plain, main)
        if saved is not None and on_checkpoint is not None:
            on_checkpoint(saved)
        return saved

    columns = (TextColumn(f"[bold]{job.name}"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not main) as progress:
        task = progress.add_task("starting", total=cfg.steps or None, completed=step)
        batches = load_batches(job, position, cfg.workers, pin_memory=cuda, part=part)
        while not (done_steps() or out_of_time()):
            for group in opt.param_groups:
                group["lr"] = learning_rate(job.lr, step, job.warmup_steps)
            opt.zero_grad(set_to_none=True)
            step_loss, micro = None, 0
            for batch in itertools.islice(batches, cfg.accum):
                with autocast(device, cfg.precision), forward_through(job, wrapped):
                    loss = job.loss(batch.to(device), gen)
                (loss / cfg.accum).backward()  # in an island, DDP averages the gradients here
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
                micro += 1
                seen = batch.total or len(batch.captions)  # the island's whole global batch
                samples += seen
                rate_n += seen
                position = batch.position
            if micro == 0:
                break  # a finite stream ran out
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            ema.step(params)
            step += 1
            step_loss = step_loss / micro
            curve.add(step, island.mean(step_loss) if island else step_loss)
            if step % cfg.log_every == 0 or step == 1:
                running = curve.flush()
                now = time.monotonic()
                rate = rate_n / max(now - rate_t, 1e-9)
                rate_t, rate_n = now, 0
                progress.update(
                    task, completed=step, description=f"step {step}  loss {running:.4f}  {rate:.0f} samples/s"
                )
                if on_log is not None and main:
                    on_log(step, running, rate)
            stop = done_steps() or out_of_time() or (should_stop is not None and should_stop())
            due = (
                step % cfg.ckpt_every_steps == 0
                or step in cfg.keep_steps
                or time.monotonic() - t_ckpt >= cfg.ckpt_every_minutes * 60
            )
            if island is not None:  # a stop any rank sees (signal, lost claim, time) is every rank's,
                stop, due = island.any_of([stop, due], device)  # and so is a save (sharded: collective)
            if due or stop:
                saved = save()
                t_ckpt = time.monotonic()
                if main:
                    ckpt = saved
                    progress.console.log(f"{job.name}: checkpoint step {step} sha256 {ckpt.sha256[:12]}")
            if stop:
                break
        progress.update(task, completed=step, description=f"step {step}  loss {curve.flush() or 0:.4f}  done")
    if saved_step != step:  # the same on every rank: the island's flags and steps are shared
        saved = save()
        ckpt = saved if main else ckpt
    if not main:
        return None
    plot_loss(curve.history, Path(cfg.ckpt_root) / "loss.png", job.name)
    return ckpt
