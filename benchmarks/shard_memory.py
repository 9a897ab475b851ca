"""Training state held per process, DDP vs ``--shard`` (FSDP), side by side in one run.

Each island is started with torchrun (gloo on the CPU, NCCL on GPUs). Every rank builds the
preset's expert, wraps it as the loop does (DistributedDataParallel, or
:func:`training.shard.shard`), makes AdamW and the EMA, and takes one optimizer step on zero
gradients, which allocates every piece of training state at its real size without a forward
pass. Then it counts the bytes it holds: weights, gradients, AdamW moments and EMA shadows
(for a sharded tensor, this rank's shard). Activations come on top and depend on the batch.

    .venv/bin/python benchmarks/shard_memory.py [--preset B/2] [--nproc 2] [--device cpu]

A DDP rank holds what one plain process holds; on a machine without the memory for N of those,
``--reference plain`` measures one plain process instead of the DDP island.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 1024**3


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if t is None:
        return 0
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def worker(preset_name: str, shard: bool, device_name: str) -> None:
    """One rank (or the one plain process): allocate the training state, print what it holds."""
    import resource

    import torch
    from diffusers.training_utils import EMAModel

    from benchmarks.train_gpu import TEXT_DIM  # CLIP ViT-L/14 token states, as the Paris experts take
    from experts.presets import build_expert, get_preset
    from training.island import Island
    from training.shard import shard as shard_model

    island = Island.from_env()
    device = torch.device(island.device(device_name) if island else device_name)
    torch.manual_seed(0)
    model = build_expert(get_preset(preset_name), TEXT_DIM)
    n_params = sum(p.numel() for p in model.parameters())
    model = model.to(device)
    if island is not None:
        island.join(device)
        if shard:
            shard_model(model, device)
        else:
            island.wrap(model, device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ema = EMAModel(params, foreach=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    ema.step(params)
    held = {
        "weights": sum(_local_bytes(p) for p in params),
        "gradients": sum(_local_bytes(p.grad) for p in params),
        "adamw": sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
        "ema": sum(_local_bytes(s) for s in ema.shadow_params),
    }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    if island is None or island.main:
        print("RESULT " + json.dumps({"params": n_params, "held": held, "peak": peak}), flush=True)
    if island is not None:
        island.barrier()
        island.leave()


def measure(preset: str, nproc: int, shard: bool, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--preset", preset, "--device", device]
    if nproc > 0:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "--"]
        cmd += [__file__, "--worker", "--preset", preset, "--device", device] + (["--shard"] if shard else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[-8:])} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return json.loads(lines[0][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="B/2")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference", choices=("ddp", "plain"), default="ddp")
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.preset, args.shard, args.device)

    from benchmarks.results import RESULTS, append_section, machine

    ref = measure(args.preset, args.nproc if args.reference == "ddp" else 0, False, args.device)
    sharded = measure(args.preset, args.nproc, True, args.device)
    name = f"DDP, {args.nproc} processes" if args.reference == "ddp" else "one plain process (= a DDP rank)"
    peak = "peak GPU memory allocated" if args.device != "cpu" else "peak resident memory (rank 0)"
    rows = []
    for part in ("weights", "gradients", "adamw", "ema"):
        a, b = sharded["held"][part], ref["held"][part]
        rows.append(f"| {part} | {a / GIB:.2f} GiB | {b / GIB:.2f} GiB | {a / b:.2f} |")
    a, b = sum(sharded["held"].values()), sum(ref["held"].values())
    rows.append(f"| **training state per process** | **{a / GIB:.2f} GiB** | **{b / GIB:.2f} GiB** | **{a / b:.2f}** |")
    rows.append(
        f"| {peak} | {sharded['peak'] / GIB:.2f} GiB | {ref['peak'] / GIB:.2f} GiB | "
        f"{sharded['peak'] / ref['peak']:.2f} |"
    )
    lines = [
        f"## Sharded training state, `{args.preset}` expert ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. `{args.preset}`: {ref['params'] / 1e6:.1f}M parameters, fp32 master weights. "
        "Each island takes one AdamW step on zero gradients, so every piece of state exists at its real "
        "size; activations (batch-dependent) are not included.",
        "",
        f"| held per process | `--shard`, {args.nproc} processes | {name} | ratio |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"Command: `.venv/bin/python benchmarks/shard_memory.py --preset {args.preset} --nproc {args.nproc} "
        f"--device {args.device} --reference {args.reference}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    append_section(text, args.out or RESULTS)


if __name__ == "__main__":
    main()
