"""Training samples/s of each CPU-sized expert preset (and the tiny router), side by side in one run.

Each job trains on the same prepared Twemoji data for the same wall-clock budget through the real
training loop; the table gives samples/s and the ratio to the ``tiny`` expert. Results are
appended to benchmarks/RESULTS.md with the machine they ran on.

    .venv/bin/python benchmarks/train_throughput.py [--seconds 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from benchmarks.results import RESULTS, append_section, machine  # noqa: E402
from data.manifest import load_manifest  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402
from experts.presets import count_parameters, get_preset  # noqa: E402
from experts.text_encoder import TextEncoderConfig, load_text_encoder  # noqa: E402
from training.expert_job import ExpertJob  # noqa: E402
from training.loop import TrainConfig, train  # noqa: E402
from training.router_job import RouterJob  # noqa: E402


def measure(job, cfg: TrainConfig, warmup_steps: int = 5) -> tuple[float, int]:
    """samples/s over the timed part (a short warm-up run first fills caches)."""
    warm = TrainConfig(**{**cfg.__dict__, "steps": warmup_steps, "minutes": 0.0, "ckpt_every_steps": 10**9})
    train(job, warm)
    t0 = time.perf_counter()
    ck = train(job, cfg)
    dt = time.perf_counter() - t0
    return (ck.meta["samples_seen"] - warmup_steps * job.batch_size) / dt, ck.step - warmup_steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(PrepareConfig(out_dir=f"{tmp}/data", clusters=2, limit=1200))
        manifest, digest = load_manifest(f"{tmp}/data")
        enc = load_text_encoder(TextEncoderConfig())
        rows = []
        for name, stored in (("tiny", True), ("tiny", False), ("small", True)):
            preset = get_preset(name)
            cfg = TrainConfig(ckpt_root=f"{tmp}/{name}{stored}", minutes=args.seconds / 60, ckpt_every_steps=10**9)
            job = ExpertJob(manifest, digest, 0, enc, "pixel", lambda x: x, cfg, preset=preset)
            job.captions.stored = stored  # False: the encoder at every step (its per-caption cache warm)
            rate, steps = measure(job, cfg)
            how = "text states from the shards" if stored else "text from the encoder, cached per caption"
            rows.append((f"expert `{name}`, {how}", count_parameters(job.model), job.batch_size, steps, rate))
        cfg = TrainConfig(ckpt_root=f"{tmp}/router", minutes=args.seconds / 60, ckpt_every_steps=10**9)
        job = RouterJob(manifest, digest, "pixel", lambda x: x, cfg, "tiny")
        job.evaluate = lambda: None  # time the training steps only
        rate, steps = measure(job, cfg)
        rows.append(("router `tiny`", count_parameters(job.model), job.batch_size, steps, rate))
    base = rows[0][4]
    lines = [
        f"## Training throughput ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Each job trained {args.seconds:.0f} s through the real training loop "
        "(streaming shards, text states, AdamW, EMA), one after another in one run.",
        "",
        "| job | parameters | batch | steps | samples/s | ratio to tiny expert |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {n} | {p / 1e6:.2f}M | {b} | {s} | {r:.0f} | {r / base:.2f} |" for n, p, b, s, r in rows],
        "",
        "Command: `.venv/bin/python benchmarks/train_throughput.py`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    append_section(text, args.out)


if __name__ == "__main__":
    main()
