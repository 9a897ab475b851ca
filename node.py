"""diffswarm node: one command line for every role (DESIGN.md §2). CLI only: parse flags, build
configs, call into the packages. Errors a user can cause end in one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROLES = ("prepare", "trainer", "client", "export", "bootstrap", "server", "status", "eval")


class UsageError(ValueError):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from experts.presets import EXPERT_PRESETS
    from router.combine import MODES
    from router.network import ROUTER_PRESETS

    p = argparse.ArgumentParser(prog="node.py", description="diffswarm: decentralized diffusion experts")
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("prompts", nargs="*", help="client: one or more prompts")
    p.add_argument(
        "--initial-peers",
        nargs="*",
        default=os.environ.get("DIFFSWARM_INITIAL_PEERS", "").split() or None,
        help="multiaddrs of swarm peers (env DIFFSWARM_INITIAL_PEERS)",
    )
    p.add_argument(
        "--workdir",
        default=os.environ.get("DIFFSWARM_WORKDIR", "runs/default"),
        help="holds data/ and checkpoints/ of a run",
    )
    p.add_argument("--data-dir", help="default: <workdir>/data")
    p.add_argument("--ckpt-dir", help="default: <workdir>/checkpoints")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-encoder", default="minilm", help="minilm (default) or clip:PATH[@ARCH]")
    p.add_argument("--vae", default="", help="diffusers AutoencoderKL folder for latent presets")
    g = p.add_argument_group("swarm")
    g.add_argument("--identity", help="folder with this node's keys (default <workdir>/identity/<role>)")
    g.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], help="addresses to listen on")
    g.add_argument("--announce-maddrs", nargs="*", default=[], help="addresses to tell other peers")
    g.add_argument("--join-timeout", type=float, default=30.0, help="seconds to reach the initial peers")
    g.add_argument("--once", action="store_true", help="status: print one snapshot and exit")
    g.add_argument("--json", action="store_true", help="status: print one snapshot as JSON")
    g.add_argument("--until-done", action="store_true", help="status: exit once every job reached its target")
    g = p.add_argument_group("prepare")
    g.add_argument("--source", default="twemoji", help="twemoji | folder:PATH | shard paths/URLs (.tar, braces ok)")
    g.add_argument("--clusters", type=int, default=4)
    g.add_argument("--preset", default="tiny", choices=sorted(EXPERT_PRESETS))
    g.add_argument("--objective", default="fm", choices=("fm", "ddpm", "mixed"))
    g.add_argument("--image-size", type=int, default=0)
    g.add_argument("--holdout-fraction", type=float, default=0.05)
    g.add_argument("--embed", default="caption", help="caption | image:PATH[@ARCH]")
    g.add_argument("--limit", type=int, default=0, help="use at most N items")
    g.add_argument("--serve", action="store_true", help="after preparing, publish the run and provide its data")
    g.add_argument("--expert-steps", type=int, default=0, help="--serve: an expert is done at this step (0: never)")
    g.add_argument("--router-steps", type=int, default=0, help="--serve: the router is done at this step (0: never)")
    g.add_argument(
        "--publish-local", action="store_true", help="--serve: also publish checkpoints trained here (--ckpt-dir)"
    )
    g = p.add_argument_group("trainer")
    g.add_argument("--local", action="store_true", help="train/sample on this machine without a swarm")
    g.add_argument("--expert", help="trainer: cluster id; server: id or list")
    g.add_argument(
        "--job",
        choices=("expert", "router", "monolith"),
        default="expert",
        help="monolith: the baseline on all clusters at the experts' total compute (--local)",
    )
    g.add_argument("--steps", type=int, default=None, help="trainer: total steps; client: denoising steps")
    g.add_argument("--minutes", type=float, default=0.0)
    g.add_argument("--batch-size", type=int, default=0)
    g.add_argument("--lr", type=float, default=0.0)
    g.add_argument("--router-preset", default="tiny", choices=sorted(ROUTER_PRESETS))
    g.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps")
    g.add_argument("--ckpt-minutes", type=float, default=5.0, help="and at least every M minutes")
    g.add_argument("--heartbeat", type=float, default=5.0, help="swarm: claim renewal period in seconds")
    g.add_argument(
        "--run-timeout",
        type=float,
        default=0.0,
        help="swarm: give up if no run appears (0: wait; 0 makes a server wait 60 s for its run and checkpoints)",
    )
    g = p.add_argument_group("client")
    g.add_argument("--mode", default="topk", choices=MODES)
    g.add_argument("--k", type=int, default=2)
    g.add_argument("--tau", type=float, default=0.2)
    g.add_argument("--guidance", type=float, default=3.0)
    g.add_argument("--local-experts", help="client: experts to run here: 0,3 or all (swarm default: none)")
    g.add_argument("--from-export", help="client: load an exported folder instead of checkpoints")
    g.add_argument("--output", help="client: PNG path (default outputs/<prompt>.png); eval: report folder")
    g.add_argument("--out", default="exports/diffswarm", help="export: destination folder")
    g = p.add_argument_group("eval")
    g.add_argument("--eval-n", type=int, default=0, help="held-out images to compute FID on (0: all)")
    g.add_argument(
        "--eval-rows",
        default="top-1,top-2,threshold,full,monolith",
        help="what to evaluate: routing modes and/or monolith, comma-separated",
    )
    g = p.add_argument_group("server")
    g.add_argument("--follow", action="store_true", help="load newer published checkpoints while serving")
    g.add_argument("--device", default="cpu", help="server: where forward passes run (cpu, cuda, cuda:1)")
    g.add_argument("--max-batch", type=int, default=32, help="images per forward pass and per request")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting before 'busy' replies")
    g.add_argument("--request-timeout", type=float, default=30.0, help="seconds a request may take")
    return p.parse_args(argv)


def _dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    work = Path(args.workdir)
    return Path(args.data_dir or work / "data"), Path(args.ckpt_dir or work / "checkpoints")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes integers like 0 or 0,3; got {text!r}") from None


def run_prepare(args: argparse.Namespace) -> None:
    from data.prepare import PrepareConfig, prepare

    if args.expert_steps < 0 or args.router_steps < 0:
        raise UsageError("--expert-steps and --router-steps take a step count >= 0")
    data_dir, _ = _dirs(args)
    cfg = PrepareConfig(
        source=args.source,
        out_dir=str(data_dir),
        clusters=args.clusters,
        preset=args.preset,
        objective=args.objective,
        image_size=args.image_size,
        holdout_fraction=args.holdout_fraction,
        embed=args.embed,
        text_encoder=args.text_encoder,
        limit=args.limit,
        seed=args.seed,
    )
    t0 = time.time()
    manifest, digest = prepare(cfg)
    print(
        f"prepared {sum(c.samples for c in manifest.clusters)} training images in {manifest.num_clusters} clusters "
        f"({time.time() - t0:.0f}s); run {digest[:12]}"
    )
    for c in manifest.clusters:
        print(f"  cluster {c.id}: {c.samples:5d} images, {c.objective}, e.g. {', '.join(c.examples[:3])}")
    print(f"manifest: {data_dir / 'manifest.json'}\ncontact sheet: {data_dir / 'clusters.png'}", flush=True)
    if args.serve:
        from swarm.dht import SwarmNode
        from swarm.preparer import serve_run

        stop = _stop_on_signals()
        node = SwarmNode(_swarm_config(args))
        print(
            f"serving run {digest[:12]} as {node.peer_id}; trainers join with:\n  {node.initial_peers_line()}",
            flush=True,
        )
        try:
            published = _dirs(args)[1] if args.publish_local else None
            serve_run(node, data_dir, stop, args.expert_steps, args.router_steps, ckpt_dir=published)
        finally:
            node.shutdown()


def _stop_on_signals():
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_swarm_trainer(args: argparse.Namespace) -> None:
    from swarm.dht import SwarmNode
    from swarm.trainer import SwarmTrainer, SwarmTrainerConfig
    from training.loop import TrainConfig

    wanted = None
    if args.job == "monolith":
        raise UsageError("the monolith baseline is trained on one machine: --role trainer --local --job monolith")
    if args.job == "router":
        wanted = "router"
    elif args.expert is not None:
        k = _int_list(args.expert, "--expert")
        if len(k) != 1:
            raise UsageError("a trainer trains one job: --expert K")
        wanted = f"expert_{k[0]}"
    tcfg = TrainConfig(
        ckpt_root="",
        minutes=60.0,  # the budget is set per job by the swarm trainer
        batch_size=args.batch_size,
        lr=args.lr,
        ckpt_every_steps=args.ckpt_every,
        seed=args.seed,
        ckpt_every_minutes=args.ckpt_minutes,
    )
    cfg = SwarmTrainerConfig(
        work_dir=str(Path(args.workdir) / "swarm"),
        wanted=wanted,
        heartbeat_s=args.heartbeat,
        text_encoder=args.text_encoder,
        vae=args.vae,
        router_preset=args.router_preset,
        minutes=args.minutes,
        steps=args.steps or 0,
        train=tcfg,
        run_timeout_s=args.run_timeout,
    )
    stop = _stop_on_signals()
    node = SwarmNode(_swarm_config(args))
    if not args.initial_peers:
        print(f"started a new swarm; other nodes join with:\n  {node.initial_peers_line()}", flush=True)
    print(f"trainer {node.peer_id} joined the swarm", flush=True)
    trainer = SwarmTrainer(node, cfg, stop)
    try:
        last = trainer.run()
        if last is not None:
            print(f"trained up to step {last.step}; last checkpoint sha256 {last.sha256[:12]}", flush=True)
    finally:
        trainer.shutdown()
        node.shutdown()


def run_trainer(args: argparse.Namespace) -> None:
    if not args.local:
        return run_swarm_trainer(args)
    from data.manifest import load_manifest
    from experts.text_encoder import TextEncoderConfig
    from router.ensemble import expert_dir, router_dir
    from training.loop import TrainConfig, train
    from training.router_job import build_job

    data_dir, ckpt = _dirs(args)
    manifest, digest = load_manifest(data_dir)
    minutes = args.minutes if (args.minutes or args.steps) else 5.0
    steps = args.steps or 0
    if args.job == "router":
        job_name, root, seed = "router", router_dir(ckpt), args.seed
    elif args.job == "monolith":
        from experts.presets import get_preset
        from training.monolith import MONOLITH, equal_compute_steps, experts_samples_seen

        job_name, root, seed = MONOLITH, ckpt / MONOLITH, args.seed
        if not (args.steps or args.minutes):
            seen = experts_samples_seen(ckpt, manifest.num_clusters)
            batch = args.batch_size or get_preset(manifest.clusters[0].preset).batch_size
            steps, minutes = equal_compute_steps(seen, manifest.num_clusters, batch), 0.0
            print(
                f"monolith: {steps} steps of {batch} = the {sum(seen.values())} samples the "
                f"{manifest.num_clusters} experts saw together",
                flush=True,
            )
    else:
        if args.expert is None:
            raise UsageError("--local training needs --expert K (or --job router)")
        k = _int_list(args.expert, "--expert")
        if len(k) != 1:
            raise UsageError("--local trains one expert at a time: --expert K")
        encoder_cfg = TextEncoderConfig.parse(args.text_encoder)
        if encoder_cfg.name != manifest.text_encoder and args.text_encoder != "minilm":
            print(
                f"note: data was embedded with {manifest.text_encoder}, conditioning with {encoder_cfg.name}",
                file=sys.stderr,
            )
        if not 0 <= k[0] < manifest.num_clusters:
            raise UsageError(f"unknown expert {k[0]}; this run has experts 0..{manifest.num_clusters - 1}")
        job_name, root, seed = f"expert_{k[0]}", expert_dir(ckpt, k[0]), args.seed + k[0]
    cfg = TrainConfig(
        ckpt_root=str(root),
        steps=steps,
        minutes=minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        ckpt_every_steps=args.ckpt_every,
        ckpt_every_minutes=args.ckpt_minutes,
        seed=seed,
    )
    job = build_job(manifest, digest, job_name, cfg, args.text_encoder, args.vae, args.router_preset)
    result = train(job, cfg)
    if job_name == "router":
        acc = result.meta.get("heldout_accuracy", {})
        print(
            f"router: step {result.step}, held-out accuracy "
            f"({acc.get('split')}, {acc.get('samples')} images) by noise level:"
        )
        print(
            "  "
            + "  ".join(f"{k} {v:.2f}" for k, v in acc.items() if k.startswith("t="))
            + f"  (chance {1 / manifest.num_clusters:.2f})"
        )
    else:
        print(
            f"{job_name.replace('_', ' ')}: step {result.step}, loss {result.meta.get('loss')}, "
            f"{result.meta['samples_seen']} samples seen, checkpoint {result.path} sha256 {result.sha256[:12]}"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "image"


def run_client(args: argparse.Namespace) -> None:
    from_swarm = not args.local and not args.from_export
    if from_swarm and not args.initial_peers:
        raise UsageError("the client needs --initial-peers of a swarm (or --local / --from-export FOLDER)")
    prompts = args.prompts
    if not prompts:
        raise UsageError('give a prompt, e.g. python node.py --role client --local "a red apple"')
    if any(not p.strip() for p in prompts):
        raise UsageError("empty prompt; give some text")
    from router.sampling import SamplerConfig

    cfg = SamplerConfig(
        mode=args.mode, k=args.k, tau=args.tau, guidance=args.guidance, steps=args.steps or 30, seed=args.seed
    )
    if args.local_experts == "all":
        subset = "all" if from_swarm else None
    else:
        subset = _int_list(args.local_experts, "--local-experts") if args.local_experts else None
    if from_swarm:
        return _client_from_swarm(args, prompts, cfg, subset)
    from router.ensemble import load_ensemble, load_export

    if args.from_export:
        ens, encoder, space = load_export(Path(args.from_export), vae=args.vae)
        if subset is not None:
            ens.experts = {k: v for k, v in ens.experts.items() if k in subset}
    else:
        _, ckpt = _dirs(args)
        ens, encoder, space = load_ensemble(ckpt, subset, vae=args.vae)
    objectives = {k: m["objective"] for k, m in ens.expert_meta.items() if k in ens.experts}
    served_by = dict.fromkeys(ens.experts, "local")
    _sample(args, prompts, cfg, ens.router, ens.experts, objectives, served_by, encoder, space, ens.shape, [])


def _client_from_swarm(args: argparse.Namespace, prompts: list[str], cfg, subset) -> None:
    from swarm.blobs import BlobService, BlobStore
    from swarm.client import swarm_ensemble
    from swarm.dht import SwarmNode

    node = SwarmNode(_swarm_config(args))
    blobs = BlobService(node.dht, BlobStore())
    ens = None
    try:
        folder = Path(args.ckpt_dir or Path(args.workdir) / "fetched")
        ens = swarm_ensemble(node, blobs, folder, subset, vae=args.vae)
        events = ens.pool.events if ens.pool else []
        _sample(
            args,
            prompts,
            cfg,
            ens.router,
            ens.experts,
            ens.objectives,
            ens.served_by,
            ens.encoder,
            ens.space,
            ens.shape,
            events,
        )
    finally:
        if ens is not None and ens.pool is not None:
            ens.pool.close()
        blobs.shutdown()
        node.shutdown()


def _sample(args, prompts, cfg, router, experts, objectives, served_by, encoder, space, shape, events) -> None:
    """Generate, write the PNG and a routing JSON beside it, print the routing summary."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from router.grid import save_images
    from router.sampling import ExpertUnavailable, generate

    num_experts = int(router.config.num_experts)
    missing = sorted(set(range(num_experts)) - set(experts))
    if missing:
        print(
            f"note: experts {missing} are not available; the router's choice is renormalised over the others",
            file=sys.stderr,
        )
    console = Console(stderr=True)
    t0 = time.time()
    with Progress(
        TextColumn("[bold]sampling"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("", total=cfg.steps)

        def progress(i: int, log) -> None:
            who = ", ".join(f"{k}@{w[:10]}" for k, w in sorted(log.where[-1].items()))
            bar.update(task, completed=i + 1, description=f"step {i + 1}/{cfg.steps}  experts {who}")

        try:
            images, log = generate(prompts, router, experts, encoder, space, shape, cfg, progress=progress)
        except ExpertUnavailable as e:
            raise RuntimeError(f"no expert can serve any more ({e.reason}); stopping") from None
    dt = time.time() - t0
    out = Path(args.output or f"outputs/{_slug(prompts[0]) if len(prompts) == 1 else 'grid'}.png")
    save_images(images, prompts, out)
    table = Table(
        title=f"routing ({cfg.mode}{'' if cfg.mode != 'topk' else f', k={cfg.k}'}), "
        f"{cfg.steps} steps x {len(prompts)} images"
    )
    for col in ("expert", "objective", "served by", "(image, step) pairs"):
        table.add_column(col, justify="right" if col.startswith("(") else "left")
    for k in range(num_experts):
        if k not in experts:
            table.add_row(str(k), "-", "unavailable", "0")
            continue
        peers = sorted((w, n) for (kk, w), n in log.by_peer.items() if kk == k)
        table.add_row(
            str(k),
            objectives.get(k, "-"),
            "\n".join(w[:16] for w, _ in peers) or served_by[k],
            "\n".join(str(n) for _, n in peers) or "0",
        )
    Console().print(table)
    for step, k, reason in log.reroutes:
        print(f"rerouted at step {step + 1}: expert {k} dropped ({reason}); renormalised over the others")
    for event in events:
        print(f"failover: {event}")
    routing = {
        "prompts": prompts,
        "mode": cfg.mode,
        "k": cfg.k,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "usage": log.usage,
        "per_step": log.per_step,
        "where": [{str(k): w for k, w in step.items()} for step in log.where],
        "reroutes": [{"step": s, "expert": k, "reason": r} for s, k, r in log.reroutes],
        "failovers": events,
    }
    out.with_suffix(".json").write_text(json.dumps(routing, indent=1))
    print(f"wrote {out} ({dt:.1f}s, {dt / len(prompts):.2f}s per image); routing: {out.with_suffix('.json')}")


def _swarm_config(args: argparse.Namespace):
    from swarm.dht import SwarmConfig

    identity = args.identity or str(Path(args.workdir) / "identity" / args.role)
    return SwarmConfig(
        identity_dir=identity,
        initial_peers=list(args.initial_peers or []),
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        join_timeout=args.join_timeout,
    )


def run_bootstrap(args: argparse.Namespace) -> None:
    """A long-lived DHT entry point; its identity folder keeps its peer id across restarts."""
    from swarm.dht import SwarmNode

    node = SwarmNode(_swarm_config(args))
    stop = _stop_on_signals()
    print(f"bootstrap peer {node.peer_id} is up; other nodes join with:", flush=True)
    print(f"  {node.initial_peers_line()}", flush=True)
    try:
        while not stop.wait(60):
            pass
    finally:
        node.shutdown()
        print("bootstrap peer stopped", flush=True)


def run_status(args: argparse.Namespace) -> None:
    from swarm.dht import SwarmNode
    from swarm.status import run_status as show

    if not args.initial_peers:
        raise UsageError("status needs --initial-peers of a swarm to look at")
    stop = _stop_on_signals()
    node = SwarmNode(_swarm_config(args))
    try:
        show(node, once=args.once or args.json, as_json=args.json, stop=stop, until_done=args.until_done)
    finally:
        node.shutdown()


def _device(name: str) -> str:
    """A torch device this machine has, or a usage error."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device takes cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device takes cpu, cuda or cuda:N; got {name!r}")
    return str(device)


def run_server(args: argparse.Namespace) -> None:
    """Serve the denoising forward pass of the published checkpoint(s) of ``--expert K[,K...]``."""
    from swarm.dht import SwarmNode
    from swarm.server import ExpertServer, ServerConfig

    if args.expert is None:
        raise UsageError("a server serves one or more experts: --expert K or --expert 0,3")
    experts = _int_list(args.expert, "--expert")
    if not experts or len(set(experts)) != len(experts) or min(experts) < 0:
        raise UsageError(f"--expert takes distinct expert ids like 0 or 0,3; got {args.expert!r}")
    if args.max_batch < 1 or args.max_queue < 1 or args.request_timeout <= 0:
        raise UsageError("--max-batch, --max-queue and --request-timeout must be positive")
    device = _device(args.device)
    cfg = ServerConfig(
        experts=experts,
        work_dir=str(Path(args.workdir) / "served"),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        follow=args.follow,
        run_timeout_s=args.run_timeout or 60.0,
        device=device,
    )
    stop = _stop_on_signals()
    node = SwarmNode(_swarm_config(args))
    if not args.initial_peers:
        print(f"started a new swarm; other nodes join with:\n  {node.initial_peers_line()}", flush=True)
    try:
        server = ExpertServer(node, cfg, stop)
        try:
            steps = ", ".join(f"expert {k} step {server.served[k][0].ckpt.step}" for k in experts)
            print(f"server {node.peer_id} serving {steps}", flush=True)
            server.run()
        finally:
            server.shutdown()
    finally:
        node.shutdown()
    print("server stopped", flush=True)


def run_eval(args: argparse.Namespace) -> None:
    from data.manifest import load_manifest
    from evaluation.evaluate import EvalConfig, run_eval
    from router.ensemble import load_ensemble

    data_dir, ckpt = _dirs(args)
    manifest, digest = load_manifest(data_dir)
    cfg = EvalConfig(
        ckpt_dir=str(ckpt),
        out_dir=args.output or "outputs/eval",
        n=args.eval_n,
        steps=args.steps or 30,
        guidance=args.guidance,
        tau=args.tau,
        seed=args.seed,
        rows=[r.strip() for r in args.eval_rows.split(",") if r.strip()],
    )
    ensemble, encoder, space = load_ensemble(ckpt, vae=args.vae)
    if ensemble.router_meta.get("manifest_sha256") != digest:
        raise UsageError(f"the checkpoints under {ckpt} were not trained on the run in {data_dir}")
    report = run_eval(cfg, manifest, digest, ensemble, encoder, space)
    out = Path(cfg.out_dir)
    print((out / "eval.md").read_text())
    print(f"wrote {out}/eval.md, eval.json, fid.png, usage.png, samples.png ({report['heldout_images']} images)")


def run_export(args: argparse.Namespace) -> None:
    from router.ensemble import export_paris

    _, ckpt = _dirs(args)
    weights = args.text_encoder[5:].partition("@")[0] if args.text_encoder.startswith("clip:") else ""
    out = export_paris(ckpt, Path(args.out), vae=args.vae, text_weights=weights)
    print(f"exported to {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub on the default path
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        roles = {
            "prepare": run_prepare,
            "trainer": run_trainer,
            "client": run_client,
            "export": run_export,
            "bootstrap": run_bootstrap,
            "status": run_status,
            "server": run_server,
            "eval": run_eval,
        }
        roles[args.role](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:  # ours subclass these
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
