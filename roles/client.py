"""The ``client`` role, wherever its experts run: sample with a :class:`DiffswarmPipeline` under a
progress bar, write the PNG and a routing JSON beside it, and print which expert (and which server)
denoised how many steps. ``run_local_client`` samples from a run's checkpoints or an export on this
machine; ``run_swarm_client`` builds the pipeline with the swarm's experts
(:func:`diffswarm.remote.swarm_ensemble`; with ``--mode distilled`` the run's distilled student
on its servers, :func:`diffswarm.remote.swarm_distilled`) and calls :func:`draw`, which then also reports the
audit of the servers' answers (:mod:`router.audit`): its cost in extra expert forwards per image,
every server caught answering wrong (marked in the routing table, with how many steps it served
first) and every step redone.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffswarm.pipeline import DiffswarmPipeline
from diffswarm.remote import RemoteConfig, hand_over_proofs, swarm_distilled, swarm_ensemble
from router.audit import DEFAULT_RATE, TOLERANCE, report_lines
from router.grid import save_images
from router.sampling import ExpertUnavailable, RoutingLog, SamplerConfig
from swarm.blobs import BlobService, BlobStore
from swarm.dht import SwarmNode


@dataclass
class ClientConfig:
    """One client invocation: what to draw, how to route, and where the experts come from."""

    prompts: list[str]
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    output: str = ""  # PNG path ("": outputs/<prompt>.png, or outputs/grid.png for several prompts)
    local_experts: list[int] | str | None = None  # ids or "all" to run here (None: all locally, none in a swarm)
    ckpt_dir: str = "runs/default/checkpoints"  # local: the run's checkpoints; swarm: where fetched ones go
    from_export: str = ""  # load an exported folder instead of checkpoints
    vae: str = ""  # the VAE folder of a latent-space set
    device: str = "cpu"  # where the experts run here run their forward passes
    precision: str = "fp32"  # fp32 or bf16 (autocast)
    server_wait_s: float = 30.0  # swarm: wait this long for a server or the router when none is up (restarting)
    audit_rate: float = DEFAULT_RATE  # swarm: share of server answers recomputed to check them (0: trust servers)
    audit_tolerance: float = TOLERANCE  # swarm: relative L2 difference per image an audited answer may have
    audit_seed: int | None = None  # swarm: seed of replica choice and audited steps (None: unpredictable)
    distilled: bool = False  # the run's distilled student alone (local: under ckpt_dir; swarm: fetched)

    def __post_init__(self) -> None:
        if not 0 <= self.audit_rate <= 1:
            raise ValueError(f"--audit is a share of steps in [0, 1], got {self.audit_rate}")
        if not self.audit_tolerance > 0:
            raise ValueError(f"--audit-tolerance must be positive, got {self.audit_tolerance}")
        if not self.prompts:
            raise ValueError('give a prompt, e.g. python node.py --role client --local "a red apple"')
        if any(not p.strip() for p in self.prompts):
            raise ValueError("empty prompt; give some text")


def local_pipeline(cfg: ClientConfig) -> DiffswarmPipeline:
    """The router and experts of a run's checkpoints (or of an export), all run in this process."""
    subset = None if cfg.local_experts in (None, "all") else list(cfg.local_experts)
    if cfg.distilled:
        where = cfg.from_export or cfg.ckpt_dir
        return DiffswarmPipeline.distilled(where, vae=cfg.vae, device=cfg.device, precision=cfg.precision)
    where = dict(experts=subset, vae=cfg.vae, device=cfg.device, precision=cfg.precision)
    if cfg.from_export:
        return DiffswarmPipeline.from_pretrained(cfg.from_export, **where)
    return DiffswarmPipeline.from_checkpoints(cfg.ckpt_dir, **where)


def run_local_client(cfg: ClientConfig) -> Path:
    """Draw ``cfg.prompts`` with the experts of a local run or export; returns the PNG's path."""
    return draw(local_pipeline(cfg), cfg)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "image"


def output_path(cfg: ClientConfig) -> Path:
    if cfg.output:
        return Path(cfg.output)
    return Path(f"outputs/{_slug(cfg.prompts[0]) if len(cfg.prompts) == 1 else 'grid'}.png")


def draw(pipe: DiffswarmPipeline, cfg: ClientConfig) -> Path:
    """Generate, write the PNG and a routing JSON beside it, print the routing summary."""
    sampler, prompts = cfg.sampler, cfg.prompts
    missing = sorted(set(range(pipe.num_experts)) - set(pipe.experts))
    if missing:
        print(
            f"note: experts {missing} are not available; the router's choice is renormalised over the others",
            file=sys.stderr,
        )
    t0 = time.time()
    columns = (TextColumn("[bold]sampling"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("", total=sampler.steps)

        def progress(i: int, _t: float, _x: torch.Tensor, log: RoutingLog) -> None:
            who = ", ".join(f"{k}@{w[:10]}" for k, w in sorted(log.where[-1].items()))
            bar.update(task, completed=i + 1, description=f"step {i + 1}/{sampler.steps}  experts {who}")

        try:
            images, log = pipe.sample(prompts, sampler, step_end=progress)
        except ExpertUnavailable as e:
            for event in pipe.failovers:  # what happened before, so the one error line can be explained
                print(f"failover: {event}", file=sys.stderr)
            raise RuntimeError(f"no expert can serve any more ({e.reason}); stopping") from None
    dt = time.time() - t0
    out = output_path(cfg)
    save_images(images, prompts, out)
    result = pipe.output(images, log)
    report = result.audit
    Console().print(_routing_table(pipe, sampler, len(prompts), log, report))
    for step, k, reason in log.reroutes:
        print(f"rerouted at step {step + 1}: expert {k} dropped ({reason}); renormalised over the others")
    for event in result.failovers:
        print(f"failover: {event}")
    for line in report_lines(report) if report is not None else []:
        print(line)
        if line.startswith("CAUGHT"):  # worth a line where warnings go, too
            print(f"warning: {line}", file=sys.stderr)
    routing = {
        "prompts": prompts,
        "mode": sampler.mode,
        "k": sampler.k,
        "steps": sampler.steps,
        "seed": sampler.seed,
        "usage": log.usage,
        "per_step": log.per_step,
        "where": [{str(k): w for k, w in step.items()} for step in log.where],
        "paths": [{str(k): w for k, w in step.items()} for step in log.paths],
        "reroutes": [{"step": s, "expert": k, "reason": r} for s, k, r in log.reroutes],
        "failovers": result.failovers,
        "audit": report,
    }
    out.with_suffix(".json").write_text(json.dumps(routing, indent=1))
    print(f"wrote {out} ({dt:.1f}s, {dt / len(prompts):.2f}s per image); routing: {out.with_suffix('.json')}")
    return out


def _routing_table(pipe: DiffswarmPipeline, sampler: SamplerConfig, images: int, log, report: dict | None) -> Table:
    """Per expert: its objective, who served it, and how many (image, step) pairs it denoised; a
    server caught answering wrong is listed as such, with the pairs it served before."""
    mode = sampler.mode if sampler.mode != "topk" else f"topk, k={sampler.k}"
    table = Table(title=f"routing ({mode}), {sampler.steps} steps x {images} images")
    for col in ("expert", "objective", "served by", "(image, step) pairs"):
        table.add_column(col, justify="right" if col.startswith("(") else "left")
    for k in range(pipe.num_experts):
        if k not in pipe.experts:
            table.add_row(str(k), "-", "unavailable", "0")
            continue
        caught = {c["peer"] for c in (report or {}).get("caught", []) if c["expert"] == k}
        served = {w: n for (kk, w), n in log.by_peer.items() if kk == k}
        peers = sorted({**dict.fromkeys(caught, 0), **served}.items())
        path = {}  # server → the path (direct or relayed) its latest step took
        for step_w, step_p in zip(log.where, log.paths, strict=True):
            if k in step_w and step_p.get(k, "local") != "local":
                path[step_w[k]] = step_p[k]
        table.add_row(
            str(k),
            pipe.objectives.get(k, "-"),
            "\n".join(
                w[:16] + (f" ({path[w]})" if w in path else "") + (" CAUGHT" if w in caught else "") for w, _ in peers
            )
            or pipe.served_by[k],
            "\n".join(str(n) for _, n in peers) or "0",
        )
    return table


def run_swarm_client(node: SwarmNode, cfg: ClientConfig) -> Path:
    """Draw ``cfg.prompts`` with the swarm's router and experts: the ones in ``cfg.local_experts``
    run here, every other one on its servers. Returns the PNG's path."""
    blobs = BlobService(node.dht, BlobStore(), bans=node.bans)
    node.on_restart(blobs.rebind)
    pool = pipe = None
    try:
        remote = RemoteConfig(
            rediscover_s=cfg.server_wait_s,
            audit_rate=cfg.audit_rate,
            tolerance=cfg.audit_tolerance,
            seed=cfg.audit_seed,
        )
        if cfg.distilled:  # one network: on its servers (audited), or here with none up or --local-experts all
            pipe, pool = swarm_distilled(
                node, blobs, Path(cfg.ckpt_dir), remote, cfg.device, cfg.precision, cfg.local_experts == "all", cfg.vae
            )
            return draw(pipe, cfg)
        pipe, pool = swarm_ensemble(
            node,
            blobs,
            Path(cfg.ckpt_dir),
            cfg.local_experts,
            cfg.vae,
            remote,
            device=cfg.device,
            precision=cfg.precision,
            server_wait_s=cfg.server_wait_s,
        )
        return draw(pipe, cfg)
    finally:
        if pipe is not None:
            hand_over_proofs(node, pipe.published)
        if pool is not None:
            pool.close()
        blobs.shutdown()
