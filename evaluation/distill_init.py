"""Where a distilled student should start: from scratch, or from the expert nearest its teacher.

Both students learn from the same teacher (the experts and router under ``--ckpt-dir``) with the
same seed and data order, through the real trainer (``node.py --role trainer --local --job
distill``), the two side by side, one thread each. At every ``--every`` steps each one's held-out
loss against the teacher's targets is measured as verifiers measure it (fixed batches, noise and
times), for its sampling (EMA) weights and its raw ones. Writes ``distill_init.md`` and
``distill_init.png`` under ``--out``.

    python -m evaluation.distill_init --data-dir runs/eval/data --ckpt-dir runs/eval/seed_0/checkpoints \\
        --steps 1000 --every 250 --out outputs/distill_init
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
INITS = ("scratch", "expert")


def teacher_view(ckpt_dir: Path, work: Path) -> Path:
    """A checkpoint folder for one student: the teacher's experts and router linked in (read-only
    use), the student's own ``distill/`` beside them."""
    work.mkdir(parents=True, exist_ok=True)
    for job in sorted(ckpt_dir.iterdir()):
        if job.name == "router" or job.name.startswith("expert_"):
            link = work / job.name
            if not link.exists():
                link.symlink_to(job.resolve(), target_is_directory=True)
    return work


def train_both(data_dir: Path, ckpt_dir: Path, out: Path, steps: int, every: int, seed: int) -> dict[str, Path]:
    """Train the two students side by side; returns init → its checkpoint folder."""
    milestones = ",".join(str(s) for s in range(every, steps + 1, every))
    procs, roots = {}, {}
    for init in INITS:
        root = teacher_view(ckpt_dir, out / init)
        roots[init] = root
        cmd = [
            sys.executable, str(ROOT / "node.py"), "--role", "trainer", "--local", "--job", "distill",
            "--distill-init", init, "--data-dir", str(data_dir), "--ckpt-dir", str(root), "--seed", str(seed),
            "--steps", str(steps), "--keep-steps", milestones, "--threads", "1",
        ]  # fmt: skip
        log = (out / f"{init}.log").open("w")
        procs[init] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        for init, p in procs.items():
            if p.wait() != 0:
                raise SystemExit(f"the {init} student's training failed; see {out / (init + '.log')}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 15)
    return roots


def losses(data_dir: Path, roots: dict[str, Path], batches: int) -> dict[str, list[tuple[int, float, float]]]:
    """init → [(step, held-out loss of the sampling weights, of the raw weights)] at every kept step."""
    from data.checkpoint import list_checkpoints, verify_checkpoint
    from data.manifest import load_manifest
    from training.heldout import checkpoint_losses
    from training.jobs import build_job
    from training.loop import TrainConfig

    manifest, digest = load_manifest(data_dir)
    out: dict[str, list[tuple[int, float, float]]] = {}
    for init, root in roots.items():
        job = build_job(manifest, digest, "distill", TrainConfig(ckpt_root=""), teacher_root=root)
        kept = [verify_checkpoint(path) for path in list_checkpoints(root / "distill")]
        out[init] = [(ck.step, *checkpoint_losses(job, ck, batches)) for ck in kept]
    return out


def plot(curves: dict[str, list[tuple[int, float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for init, rows in curves.items():
        steps = [r[0] for r in rows]
        ax.plot(steps, [r[1] for r in rows], marker="o", label=f"{init}: sampling (EMA) weights")
        ax.plot(steps, [r[2] for r in rows], marker="x", linestyle="--", label=f"{init}: raw weights")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("held-out loss against the teacher")
    ax.set_title("distilled student: scratch vs expert init")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(curves: dict[str, list[tuple[int, float, float]]], seconds: float) -> str:
    lines = [
        "# Distilled student: scratch vs expert init",
        "",
        "Held-out loss against the teacher's targets, every cluster, as verifiers measure it; "
        f"trained side by side in {seconds:.0f} s.",
        "",
        "| step | scratch, EMA | scratch, raw | expert, EMA | expert, raw |",
        "|---:|---:|---:|---:|---:|",
    ]
    by_step = {init: {r[0]: r for r in rows} for init, rows in curves.items()}
    for step in sorted(set(by_step["scratch"]) & set(by_step["expert"])):
        s, e = by_step["scratch"][step], by_step["expert"][step]
        lines.append(f"| {step} | {s[1]:.4f} | {s[2]:.4f} | {e[1]:.4f} | {e[2]:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="the prepared run (manifest.json)")
    ap.add_argument("--ckpt-dir", required=True, help="the teacher: the run's experts and router")
    ap.add_argument("--out", default="outputs/distill_init")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=250, help="measure at every this many steps")
    ap.add_argument("--batches", type=int, default=8, help="held-out batches of 32 per measurement")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps < 1 or not 1 <= args.every <= args.steps or args.batches < 1:
        raise SystemExit("--steps, --every and --batches must be positive, --every at most --steps")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    roots = train_both(Path(args.data_dir), Path(args.ckpt_dir), out, args.steps, args.every, args.seed)
    seconds = time.perf_counter() - t0
    curves = losses(Path(args.data_dir), roots, args.batches)
    (out / "distill_init.json").write_text(json.dumps(curves, indent=1))
    (out / "distill_init.md").write_text(report(curves, seconds))
    plot(curves, out / "distill_init.png")
    print(report(curves, seconds))
    print(f"wrote {out / 'distill_init.md'} and {out / 'distill_init.png'}")


if __name__ == "__main__":
    main()
