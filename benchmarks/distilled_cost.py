"""The distilled student's inference cost per image against the ensemble's (top-2 with the run's
router), both run in this process from one run's checkpoints: expert forwards per image (counted
from the routing log) and wall-clock seconds per image, the two pipelines alternated round by
round on the same prompts, so any drift in load hits both alike. Appends its section to
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/distilled_cost.py --ckpt-dir runs/eval/seed_0/checkpoints [--rounds 5] [--images 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import append_section, machine  # noqa: E402
from diffswarm import DiffswarmPipeline  # noqa: E402

PROMPTS = ["red apple", "grinning face", "red heart", "flag: Japan", "dog face", "woman", "sun", "rocket"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt-dir", required=True, help="a run's checkpoints: experts, router and distill/")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = ap.parse_args()
    prompts = (PROMPTS * (args.images // len(PROMPTS) + 1))[: args.images]
    pipes = {
        "top-2": (DiffswarmPipeline.from_checkpoints(args.ckpt_dir), "top2"),
        "distilled": (DiffswarmPipeline.distilled(args.ckpt_dir), "top1"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in pipes}
    forwards: dict[str, float] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (pipe, mode) in pipes.items():
            t0 = time.perf_counter()
            out = pipe(prompts, mode=mode, steps=args.steps, seed=r)
            dt = time.perf_counter() - t0
            if r:
                seconds[name].append(dt / len(prompts))
            # usage: (image, step) pairs per expert; each is one forward of that image (cond and uncond batched)
            forwards[name] = sum(out.usage) / len(prompts)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    ratio = statistics.median(d / t for d, t in zip(seconds["distilled"], seconds["top-2"], strict=True))
    text = (
        f"## Inference: the distilled student against the ensemble ({time.strftime('%Y-%m-%d')})\n\n"
        f"Machine: {machine()}. {len(prompts)} images a batch, "
        f"{args.steps} Euler steps, guidance 3, {args.rounds} rounds alternated after a warm-up, "
        f"checkpoints `{args.ckpt_dir}`.\n\n"
        "| | expert forwards / image | router forwards / image | s / image (median) |\n|---|---:|---:|---:|\n"
        f"| top-2 (the run's router) | {forwards['top-2']:.0f} | {args.steps} | {med['top-2']:.3f} |\n"
        f"| distilled student | {forwards['distilled']:.0f} | 0 | {med['distilled']:.3f} |\n\n"
        f"Distilled ÷ top-2: **{forwards['distilled'] / forwards['top-2']:.2f}** in expert forwards, "
        f"**{ratio:.2f}** in wall-clock (median of the rounds' ratios). Command: "
        f"`.venv/bin/python benchmarks/distilled_cost.py --ckpt-dir {args.ckpt_dir} --rounds {args.rounds}`.\n"
    )
    print(text)
    if not args.no_write:
        append_section(text)


if __name__ == "__main__":
    main()
