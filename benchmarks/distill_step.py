"""What a distillation step spends on its teacher: the routed top-2 experts and the router run
forward (no gradients) for every sample, beside the student's forward and backward.

Each step is timed in two parts on the same inputs, in one run: the teacher's velocity, then the
student's forward, loss, backward and optimizer step. The teacher's share is the first over the
whole. Also reported: a distillation step against an expert's training step at the same batch
(one run, interleaved), the distillation's cost per sample as a multiple of an expert's. Appends
its section to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/distill_step.py [--data-dir runs/demo/data --ckpt-dir runs/demo/mirror] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.results import append_section, machine  # noqa: E402
from data.manifest import load_manifest  # noqa: E402
from data.streaming import DataPosition  # noqa: E402
from experts.objectives import TIMESTEP_SCALE, fm_interpolate, make_training_batch  # noqa: E402
from experts.presets import expert_forward  # noqa: E402
from training.jobs import build_job  # noqa: E402
from training.loop import TrainConfig  # noqa: E402


def timed_steps(data: Path, ckpt: Path, steps: int, warmup: int) -> dict[str, list[float]]:
    """Per step: the teacher's seconds, the student's (forward, backward, AdamW), and an expert's
    whole training step on its own batch, interleaved so load drifts hit all three alike."""
    manifest, digest = load_manifest(data)
    cfg = TrainConfig(ckpt_root="")
    distill = build_job(manifest, digest, "distill", cfg, teacher_root=ckpt)
    expert = build_job(manifest, digest, "expert_0", cfg)
    opts = {j: torch.optim.AdamW(j.model.parameters(), lr=1e-4) for j in (distill, expert)}
    gen = torch.Generator().manual_seed(0)
    d_batches, e_batches = distill.batches(DataPosition()), expert.batches(DataPosition())
    out: dict[str, list[float]] = {"teacher": [], "student": [], "expert": []}
    for i in range(warmup + steps):
        x0, noise, t, states, mask = distill.draw(next(d_batches), gen)
        x_t = fm_interpolate(x0, noise, t)
        t0 = time.perf_counter()
        target = distill.teacher(x_t, t, states, mask)
        t1 = time.perf_counter()
        pred = expert_forward(distill.model, x_t, TIMESTEP_SCALE * t, states, mask)
        torch.nn.functional.mse_loss(pred.float(), target).backward()
        opts[distill].step()
        opts[distill].zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        x0, noise, t, states, mask = expert.draw(next(e_batches), gen)
        tb = make_training_batch(expert.objective, x0, noise, t)
        t3 = time.perf_counter()
        pred = expert_forward(expert.model, tb.x_in, tb.timestep, states, mask)
        torch.nn.functional.mse_loss(pred, tb.target).backward()
        opts[expert].step()
        opts[expert].zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if i >= warmup:
            out["teacher"].append(t1 - t0)
            out["student"].append(t2 - t1)
            out["expert"].append(t4 - t3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="runs/demo/data", help="a prepared run (make demo writes this one)")
    ap.add_argument("--ckpt-dir", default="runs/demo/mirror", help="its trained experts and router: the teacher")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = ap.parse_args()
    data, ckpt = Path(args.data_dir), Path(args.ckpt_dir)
    if not (data / "manifest.json").is_file() or not (ckpt / "router").is_dir():
        raise SystemExit(f"needs a prepared run and its trained experts and router ({data}, {ckpt}): run make demo")
    torch.manual_seed(0)
    s = timed_steps(data, ckpt, args.steps, args.warmup)
    teacher, student, expert = (statistics.median(s[k]) for k in ("teacher", "student", "expert"))
    share = statistics.median(a / (a + b) for a, b in zip(s["teacher"], s["student"], strict=True))
    # the trainers of make eval run one thread each: say so where the figure came from one
    threads = f"OMP_NUM_THREADS={torch.get_num_threads()} " if torch.get_num_threads() == 1 else ""
    text = (
        f"## Distillation step: the teacher's share ({time.strftime('%Y-%m-%d')})\n\n"
        f"Machine: {machine()}. {args.steps} steps at the preset's batch, medians, one process; "
        f"teacher = the top-2 experts and the router forward, student = forward, backward and AdamW.\n\n"
        "| part | ms / step |\n|---|---:|\n"
        f"| teacher | {teacher * 1e3:.1f} |\n| student | {student * 1e3:.1f} |\n"
        f"| an expert's training step (interleaved) | {expert * 1e3:.1f} |\n\n"
        f"The teacher takes **{share:.0%}** of a distillation step; a distillation step costs "
        f"**{(teacher + student) / expert:.2f}×** an expert's. Command: "
        f"`{threads}.venv/bin/python benchmarks/distill_step.py --data-dir {data} --ckpt-dir {ckpt} "
        f"--steps {args.steps}`.\n"
    )
    print(text)
    if not args.no_write:
        append_section(text)


if __name__ == "__main__":
    main()
