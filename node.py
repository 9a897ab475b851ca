"""diffswarm node: one command line for every role (docs/design.md §2).

CLI only: one parser per role (``python node.py --role trainer --help`` lists what a trainer
takes), parse flags, build the role's config, call into the packages. A flag the chosen role does
not take, and every error a user can cause, ends in one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from data.job_id import JobId
from swarm.lifeline import interrupt_on_signals, stop_on_signals

# role → what it does (the lines of `python node.py --help`)
ROLES = {
    "bootstrap": "a long-lived DHT entry point with a persistent identity",
    "prepare": "embed, cluster and shard a dataset into K clusters; --serve publishes the run to a swarm",
    "trainer": "claim a free job in a swarm and train it; --local trains one job on this machine",
    "server": "serve the denoising forward pass of published experts to clients",
    "client": "generate images for prompts, routing every denoising step to the experts",
    "status": "a live dashboard of a swarm: jobs, checkpoints, servers, peers",
    "eval": "FID of every routing mode and of the monolith on the run's held-out split",
    "export": "write the trained set as one folder (Paris layout) that --from-export loads",
}


class UsageError(ValueError):
    pass


class RoleParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr and exit 2."""

    def error(self, message: str):  # argparse's own: usage block + message
        self.exit(2, f"error: {self.prog}: {message} (see python {self.prog} --help)\n")


# ----------------------------------------------------------------------------- flag groups


def _common(p: argparse.ArgumentParser, dirs: tuple[str, ...] = ()) -> None:
    p.add_argument(
        "--workdir",
        default=os.environ.get("DIFFSWARM_WORKDIR", "runs/default"),
        help="holds data/ and checkpoints/ of a run (env DIFFSWARM_WORKDIR)",
    )
    if "data" in dirs:
        p.add_argument("--data-dir", help="the prepared run (default: <workdir>/data)")
    if "ckpt" in dirs:
        p.add_argument("--ckpt-dir", help="checkpoints (default: <workdir>/checkpoints)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument(
        "--debug", action="store_true", help="on an error, show the whole traceback instead of its one-line summary"
    )


def _seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)


def _swarm(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("swarm")
    g.add_argument(
        "--initial-peers",
        nargs="*",
        default=os.environ.get("DIFFSWARM_INITIAL_PEERS", "").split() or None,
        metavar="MULTIADDR",
        help="multiaddrs of swarm peers (env DIFFSWARM_INITIAL_PEERS); none: start a new swarm",
    )
    g.add_argument("--identity", help="folder with this node's keys (default <workdir>/identity/<role>)")
    g.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], help="addresses to listen on")
    g.add_argument("--announce-maddrs", nargs="*", default=[], help="addresses to tell other peers")
    g.add_argument("--join-timeout", type=float, default=30.0, help="seconds to reach the initial peers")
    if p.prog.endswith("bootstrap"):
        g.add_argument("--no-relay", action="store_true", help="do not relay for peers behind NAT")
    else:
        g.add_argument("--relay", action="store_true", help="relay for peers behind NAT (a public node)")
    if p.prog.endswith(("trainer", "server", "client", "status")):
        g.add_argument(
            "--run",
            default=os.environ.get("DIFFSWARM_RUN", ""),
            metavar="NAME@FINGERPRINT",
            help="the run to follow, as the preparer prints it (env DIFFSWARM_RUN); none: the only run listed",
        )


def _text_encoder(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-encoder", default="minilm", help="minilm (default) or clip:PATH[@ARCH]")


def _vae(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", default="", help="diffusers AutoencoderKL folder (latent presets)")


def _device_flags(g) -> None:
    g.add_argument("--device", default="", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    g.add_argument("--precision", default="", help="fp32 or bf16 (default: bf16 on CUDA, fp32 on the CPU)")


def _sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=30, help="denoising steps")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale per expert")
    g.add_argument("--tau", type=float, default=0.2, help="threshold routing: keep experts with p >= tau")


# ----------------------------------------------------------------------------- one parser per role


def _parser(role: str) -> RoleParser:
    p = RoleParser(prog=f"node.py --role {role}", description=ROLES[role], allow_abbrev=False)
    if role == "bootstrap":
        _common(p)
        _swarm(p)
    elif role == "prepare":
        from experts.presets import EXPERT_PRESETS

        _common(p, ("data", "ckpt"))
        _seed(p)
        _text_encoder(p)
        _vae(p)
        g = p.add_argument_group("prepare")
        g.add_argument(
            "--source", default="twemoji", help="twemoji | twemoji:all | folder:PATH | .tar shards (paths, URLs)"
        )
        g.add_argument("--clusters", type=int, default=4, help="K: experts to train")
        g.add_argument("--preset", default="tiny16", choices=sorted(EXPERT_PRESETS), help="expert size, image size")
        g.add_argument("--objective", default="fm", choices=("fm", "ddpm", "mixed"), help="mixed: alternating, HDDM")
        g.add_argument("--image-size", type=int, default=0, help="0: the preset's")
        g.add_argument("--holdout-fraction", type=float, default=0.05, help="per cluster, kept out of training")
        g.add_argument(
            "--embed", default="image", help="image (Inception) | image:PATH@ARCH (open_clip, DINOv2) | caption"
        )
        g.add_argument("--balance", type=float, default=1.2, help="largest cluster, x the mean size (0: no cap)")
        g.add_argument("--limit", type=int, default=0, help="use at most N items (0: all)")
        g = p.add_argument_group("serving the run")
        g.add_argument("--serve", action="store_true", help="after preparing, publish the run and provide its data")
        g.add_argument("--expert-steps", type=int, default=0, help="an expert is done at this step (0: never)")
        g.add_argument("--router-steps", type=int, default=0, help="the router is done at this step (0: never)")
        g.add_argument(
            "--distill-steps",
            type=int,
            default=0,
            help="a distill job (one network trained on the routed ensemble, once the experts and router are done) "
            "is done at this step (0: the run has none)",
        )
        g.add_argument("--distill-preset", default="", help="the distilled student's preset (default: the experts')")
        g.add_argument(
            "--publish-local", action="store_true", help="also publish checkpoints trained here (--ckpt-dir)"
        )
        g.add_argument("--run", default="default", help="the run's name; its owner is this node's key")
        g.add_argument(
            "--allow",
            metavar="FILE",
            help="admit only the trainer key fingerprints listed in FILE (re-read while serving; 'open' admits all)",
        )
        g.add_argument(
            "--claim-grace",
            type=float,
            default=1200.0,
            help="seconds a claim may go without a verified checkpoint before it expires for everyone",
        )
        _swarm(p)
    elif role == "trainer":
        from router.presets import DEFAULT_ROUTER_PRESET, ROUTER_PRESETS

        _common(p, ("data", "ckpt"))
        _seed(p)
        _text_encoder(p)
        _vae(p)
        g = p.add_argument_group("trainer")
        g.add_argument("--local", action="store_true", help="train one job on this machine, without a swarm")
        g.add_argument("--expert", help="train expert K (swarm: only this job)")
        g.add_argument(
            "--job",
            choices=("expert", "router", "distill", "monolith"),
            default="expert",
            help="monolith: the baseline on all clusters at the experts' total compute (--local); distill: one "
            "network trained on the routed ensemble's velocity (--local: the experts and router in --ckpt-dir)",
        )
        g.add_argument("--distill-preset", default="", help="distill: the student's preset (default: the experts')")
        g.add_argument(
            "--distill-init",
            default="expert",
            choices=("scratch", "expert"),
            help="distill --local: start from the expert whose weights match the teacher best (as a swarm's "
            "trainer does), or from scratch",
        )
        g.add_argument("--steps", type=int, default=0, help="stop at this total step (swarm: before the run's target)")
        g.add_argument("--minutes", type=float, default=0.0, help="budget of this process (--local default 5)")
        g.add_argument("--batch-size", type=int, default=0, help="0: the preset's")
        g.add_argument("--lr", type=float, default=0.0, help="0: the preset's")
        g.add_argument(
            "--router-preset",
            default=DEFAULT_ROUTER_PRESET,
            choices=sorted(ROUTER_PRESETS),
            help="the router job's network (default: one that reads the prompt; tiny: x_t only, as in Paris)",
        )
        g.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps")
        g.add_argument("--ckpt-minutes", type=float, default=5.0, help="and at least every M minutes")
        g.add_argument(
            "--keep-steps",
            type=_step_list,
            default=(),
            help="also checkpoint these steps and never prune them, comma-separated (e.g. 2000,8000)",
        )
        g.add_argument("--accum", type=int, default=1, help="micro-batches per step: global batch = batch x accum")
        g.add_argument("--workers", type=int, default=0, help="processes decoding batches (0: this one)")
        g.add_argument("--warmup-steps", type=int, default=-1, help="linear LR warm-up (-1: the preset's)")
        _device_flags(g)
        g.add_argument("--compile", action="store_true", help="torch.compile the network")
        g.add_argument(
            "--shard", action="store_true", help="under torchrun: FSDP, each process holds 1/N of the training state"
        )
        g.add_argument("--heartbeat", type=float, default=5.0, help="swarm: claim renewal period in seconds")
        g.add_argument("--run-timeout", type=float, default=0.0, help="swarm: give up if no run appears (0: wait)")
        g.add_argument(
            "--replicas",
            type=int,
            default=2,
            help="swarm: peers (this one included) that must hold a job's last checkpoint before this node "
            "releases it or stops (1 when no mirroring peer is up)",
        )
        _swarm(p)
    elif role == "server":
        _common(p)
        g = p.add_argument_group("server")
        g.add_argument(
            "--expert",
            required=True,
            help="what to serve: expert K, a list like 0,3, or distilled (the run's distilled student)",
        )
        g.add_argument("--follow", action="store_true", help="load newer published checkpoints while serving")
        g.add_argument("--device", default="cpu", help="where forward passes run (cpu, cuda, cuda:1)")
        g.add_argument("--precision", default="", help="fp32 or bf16 (default: bf16 on CUDA, fp32 on the CPU)")
        g.add_argument("--max-batch", type=int, default=32, help="images per forward pass and per request")
        g.add_argument("--max-queue", type=int, default=64, help="requests waiting before 'busy' replies")
        g.add_argument("--request-timeout", type=float, default=30.0, help="seconds a request may take")
        g.add_argument("--run-timeout", type=float, default=60.0, help="seconds to wait for the run and checkpoints")
        _swarm(p)
    elif role == "client":
        from router.audit import DEFAULT_RATE, TOLERANCE
        from router.combine import MODES

        _common(p, ("ckpt",))
        _seed(p)
        _vae(p)
        p.add_argument("prompts", nargs="*", help="one or more prompts")
        g = p.add_argument_group("client")
        g.add_argument("--local", action="store_true", help="sample from this machine's checkpoints, no swarm")
        g.add_argument("--from-export", help="load an exported folder instead of checkpoints")
        g.add_argument("--local-experts", help="experts to run here: 0,3 or all (swarm default: none)")
        g.add_argument(
            "--server-timeout",
            type=float,
            default=30.0,
            help="swarm: seconds to wait for a server, or for the router's checkpoint, while none is up",
        )
        g.add_argument(
            "--audit",
            type=float,
            default=DEFAULT_RATE,
            metavar="RATE",
            help="swarm: share of the servers' answers recomputed here from the experts' public checkpoints "
            f"(each server's first answer always; 0: trust servers; default {DEFAULT_RATE})",
        )
        g.add_argument(
            "--audit-tolerance",
            type=float,
            default=TOLERANCE,
            help=f"swarm: relative L2 difference per image an audited answer may have (default {TOLERANCE}: "
            "room for bf16 servers; fp32 ones differ by about 1e-6)",
        )
        g.add_argument("--output", help="PNG path (default outputs/<prompt>.png)")
        g.add_argument(
            "--mode",
            default="topk",
            choices=(*MODES, "distilled"),
            help="how the router's experts are combined; distilled: the run's distilled student alone, one network "
            "and no router (in a swarm on its servers, or here with none up or --local-experts all; --local: "
            "from --ckpt-dir)",
        )
        g.add_argument("--k", type=int, default=2, help="topk: experts per step")
        _device_flags(g)  # for the experts run here
        _sampling(p)
        _swarm(p)
    elif role == "status":
        _common(p)
        g = p.add_argument_group("status")
        g.add_argument("--once", action="store_true", help="print one snapshot and exit")
        g.add_argument("--json", action="store_true", help="print one snapshot as JSON")
        g.add_argument("--until-done", action="store_true", help="exit once every job reached its target")
        g.add_argument(
            "--web",
            metavar="HOST:PORT",
            default="",
            help="also serve a read-only web page and JSON API of the swarm (PORT alone: on 127.0.0.1; 0: any port)",
        )
        g.add_argument(
            "--ledger", action="store_true", help="print each run's contribution ledger (with --json: for scripts)"
        )
        _swarm(p)
    elif role == "eval":
        from evaluation.evaluate import ALL_ROWS, ROW_NAMES

        _common(p, ("data", "ckpt"))
        _seed(p)
        _vae(p)
        g = p.add_argument_group("eval")
        g.add_argument("--eval-n", type=int, default=0, help="images to compute FID on (0: all of the reference)")
        g.add_argument(
            "--eval-reference",
            default="holdout",
            choices=("holdout", "train"),
            help="FID against held-out images, or training images (with held-out FID beside)",
        )
        g.add_argument(
            "--eval-rows",
            default=",".join(ROW_NAMES),
            help=f"what to evaluate, comma-separated: {', '.join(ALL_ROWS)}",
        )
        g.add_argument(
            "--eval-second-router",
            "--eval-text-router",
            dest="eval_second_router",
            default="",
            metavar="DIR",
            help="checkpoints holding a second router/ for the +xt rows (one that reads only x_t, --router-preset "
            "tiny) or the +text rows (one that reads the prompt)",
        )
        g.add_argument("--output", default="outputs/eval", help="report folder")
        _device_flags(g)
        _sampling(p)
    elif role == "export":
        _common(p, ("ckpt",))
        _text_encoder(p)
        _vae(p)
        p.add_argument("--out", default="exports/diffswarm", help="destination folder")
    return p


def _top_parser() -> RoleParser:
    lines = "\n".join(f"  {role:<10} {what}" for role, what in ROLES.items())
    return RoleParser(
        prog="node.py",
        usage="python node.py --role ROLE [flags of that role]",
        description="diffswarm: decentralized diffusion experts, trained and served by a swarm of peers.",
        epilog=f"roles:\n{lines}\n\nflags of one role: python node.py --role ROLE --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``--role R`` picks the parser; the rest of the line must be flags of role R."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not any(a == "--role" or a.startswith("--role=") for a in argv):
        if any(a in ("-h", "--help") for a in argv):
            top.print_help()
            top.exit(0)
        top.error(f"give a role: --role {{{','.join(ROLES)}}}")
    top.add_argument("--role", choices=list(ROLES), required=True)
    known, _ = top.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    role_argv = _without_role(argv)
    args, extra = _parser(known.role).parse_known_args(role_argv)
    if extra:
        flags = [a for a in extra if a.startswith("-")]
        what = f"does not take {flags[0]}" if flags else f"takes no argument {extra[0]!r}"
        _parser(known.role).error(what)
    args.role = known.role
    if known.role == "client":
        _split_prompts(args)
    bad = [a for a in getattr(args, "initial_peers", None) or [] if not a.startswith("/")]
    if bad:
        _parser(known.role).error(
            f"--initial-peers takes multiaddrs like /ip4/10.0.0.1/tcp/31337/p2p/Qm...; got {bad[0]!r}"
        )
    return args


def _without_role(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--role":
            skip = True
        elif not a.startswith("--role="):
            out.append(a)
    return out


def _split_prompts(args: argparse.Namespace) -> None:
    """A prompt typed after ``--initial-peers /ip4/...`` lands in that list; multiaddrs start with '/'."""
    peers = args.initial_peers or []
    args.prompts = list(args.prompts) + [a for a in peers if not a.startswith("/")]
    args.initial_peers = [a for a in peers if a.startswith("/")] or None


# ----------------------------------------------------------------------------- role bodies


def _dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    work = Path(args.workdir)
    data = getattr(args, "data_dir", None) or work / "data"
    ckpt = getattr(args, "ckpt_dir", None) or work / "checkpoints"
    return Path(data), Path(ckpt)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes integers like 0 or 0,3; got {text!r}") from None


def _step_list(text: str) -> tuple[int, ...]:
    """``--keep-steps``: positive step numbers, comma-separated."""
    try:
        steps = tuple(_int_list(text, "--keep-steps"))
    except UsageError:
        steps = ()
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"takes positive steps like 2000 or 2000,8000; got {text!r}")
    return steps


def _served_slots(text: str) -> list[int]:
    """``--expert`` of a server: expert ids and/or ``distilled``, as the slots served (data.job_id)."""
    from data.job_id import DISTILL_SLOT, MAX_EXPERTS

    words = [w.strip() for w in text.split(",") if w.strip()]
    try:
        experts = [int(w) for w in words if w != "distilled"]  # "64" is no expert's id, whatever its slot
    except ValueError:
        experts = words = []
    slots = experts + [DISTILL_SLOT] * words.count("distilled")
    if not slots or len(set(slots)) != len(slots) or not all(0 <= k < MAX_EXPERTS for k in experts):
        raise UsageError(f"--expert takes distinct expert ids like 0 or 0,3, or distilled; got {text!r}")
    return slots


def _one_expert(args: argparse.Namespace) -> int:
    k = _int_list(args.expert, "--expert")
    if len(k) != 1:
        raise UsageError("a trainer trains one job at a time: --expert K")
    return k[0]


def _swarm_node(args: argparse.Namespace, say_join: bool = True):
    """Join (or start) the swarm; with no initial peers, print the flag other nodes join with."""
    from swarm.dht import SwarmConfig, SwarmNode

    node = SwarmNode(
        SwarmConfig(
            identity_dir=args.identity or str(Path(args.workdir) / "identity" / args.role),
            initial_peers=list(args.initial_peers or []),
            host_maddrs=args.host_maddrs,
            announce_maddrs=args.announce_maddrs,
            join_timeout=args.join_timeout,
            run=getattr(args, "run", "") if args.role != "prepare" else "",
            own_run=args.run if args.role == "prepare" else "",
            relay=not args.no_relay if args.role == "bootstrap" else args.relay,
        )
    )
    print(node.reach_line(), file=sys.stderr, flush=True)  # stdout stays the role's own (status --json)
    if say_join and not args.initial_peers:
        print(f"started a new swarm; other nodes join with:\n  {node.initial_peers_line()}", flush=True)
    return node


def run_bootstrap(args: argparse.Namespace) -> None:
    """A long-lived DHT entry point; its identity folder keeps its peer id across restarts."""
    node = _swarm_node(args, say_join=False)
    stop = stop_on_signals(args.role)
    print(f"bootstrap peer {node.peer_id} is up; other nodes join with:", flush=True)
    print(f"  {node.initial_peers_line()}", flush=True)
    try:
        while not stop.wait(60):
            pass
    finally:
        node.shutdown()
        print("bootstrap peer stopped", flush=True)


def run_prepare(args: argparse.Namespace) -> None:
    from data.prepare import PrepareConfig, prepare_and_report

    if args.expert_steps < 0 or args.router_steps < 0 or args.distill_steps < 0:
        raise UsageError("--expert-steps, --router-steps and --distill-steps take a step count >= 0")
    if args.distill_steps and not (args.expert_steps and args.router_steps):
        raise UsageError("--distill-steps needs --expert-steps and --router-steps: it starts once they are done")
    if args.distill_preset:
        from experts.presets import get_preset, student_preset

        try:
            student_preset(args.distill_preset, get_preset(args.preset))
        except ValueError as e:
            raise UsageError(str(e)) from None
    data_dir, ckpt_dir = _dirs(args)
    cfg = PrepareConfig(
        source=args.source,
        out_dir=str(data_dir),
        clusters=args.clusters,
        preset=args.preset,
        objective=args.objective,
        image_size=args.image_size,
        holdout_fraction=args.holdout_fraction,
        embed=args.embed,
        balance=args.balance,
        text_encoder=args.text_encoder,
        vae=args.vae,
        limit=args.limit,
        seed=args.seed,
    )
    if args.serve:
        from roles.preparer import read_admission
        from swarm.records import check_run_name

        if args.claim_grace <= 0:
            raise UsageError("--claim-grace takes seconds > 0")
        check_run_name(args.run)
        if args.allow:
            read_admission(Path(args.allow))  # a bad allowlist fails now, not after preparing
    digest = prepare_and_report(cfg)
    if not args.serve:
        return
    from roles.preparer import ServeRunConfig, serve_run

    stop = stop_on_signals(args.role)
    node = _swarm_node(args, say_join=False)
    print(f"serving run {node.ref} ({digest[:12]}) as {node.peer_id}; trainers join with:", flush=True)
    print(f"  --run {node.ref} {node.initial_peers_line()}", flush=True)
    try:
        serve_cfg = ServeRunConfig(
            expert_steps=args.expert_steps,
            router_steps=args.router_steps,
            distill_steps=args.distill_steps,
            distill_preset=args.distill_preset,
            ckpt_dir=ckpt_dir if args.publish_local else None,
            allow=Path(args.allow) if args.allow else None,
            grace_s=args.claim_grace,
            text_encoder=args.text_encoder,
            vae=args.vae,
        )
        serve_run(node, data_dir, stop, serve_cfg)
    finally:
        node.shutdown()


def _device_and_precision(args: argparse.Namespace, default_device: str = "") -> tuple[str, str]:
    """The role's ``--device`` (this machine must have it) and ``--precision`` (default: by device)."""
    from experts.device import resolve_device, resolve_precision

    device = resolve_device(args.device or default_device)
    return str(device), resolve_precision(args.precision, device)


def _train_config(args: argparse.Namespace, steps: int, minutes: float):
    from training.loop import TrainConfig

    if args.shard and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError("--shard splits a network over an island: start it with torchrun --nproc-per-node N")
    device, precision = _device_and_precision(args)
    return TrainConfig(
        ckpt_root="",  # set per job
        steps=steps,
        minutes=minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        ckpt_every_steps=args.ckpt_every,
        ckpt_every_minutes=args.ckpt_minutes,
        seed=args.seed,
        device=device,
        precision=precision,
        compile=args.compile,
        accum=args.accum,
        workers=args.workers,
        warmup_steps=args.warmup_steps,
        shard=args.shard,
        keep_steps=args.keep_steps,
    )


def run_trainer(args: argparse.Namespace) -> None:
    if args.local:
        return run_local_trainer(args)
    if args.job == "monolith":
        raise UsageError("the monolith baseline is trained on one machine: --role trainer --local --job monolith")
    if args.replicas < 1:
        raise UsageError("--replicas takes a count >= 1 (this node's own copy counts)")
    wanted = "router" if args.job == "router" else None
    if args.expert is not None and wanted is None:
        wanted = str(JobId.expert(_one_expert(args)))
    train = _train_config(args, steps=0, minutes=0.0)  # bad flags fail before the heavy imports
    from roles.trainer import SwarmTrainer, SwarmTrainerConfig

    cfg = SwarmTrainerConfig(
        work_dir=str(Path(args.workdir) / "swarm"),
        wanted=wanted,
        heartbeat_s=args.heartbeat,
        text_encoder=args.text_encoder,
        vae=args.vae,
        router_preset=args.router_preset,
        minutes=args.minutes,
        steps=args.steps,
        train=train,  # the swarm trainer sets the budget per job
        run_timeout_s=args.run_timeout,
        replicas=args.replicas,
    )
    stop = stop_on_signals(args.role)
    island = _island(cfg.train.device)
    if island is not None and not island.main:
        from roles.trainer import follow_island

        try:
            follow_island(island, stop)  # swarm duties are rank 0's alone
        finally:
            island.leave()
        return
    node = _swarm_node(args)
    print(f"this trainer's key: {node.fingerprint} (an allowlist run admits it by this)", flush=True)
    print(f"trainer {node.peer_id} joined the swarm", flush=True)
    trainer = SwarmTrainer(node, cfg, stop, island=island)
    try:
        last = trainer.run()
        if last is not None:
            print(f"trained up to step {last.step}; last checkpoint sha256 {last.sha256[:12]}", flush=True)
    finally:
        trainer.shutdown()
        node.shutdown()
        if island is not None:
            try:
                island.tell(None)  # the other ranks exit
            finally:
                island.leave()


def _island(device: str):
    """The compute island torchrun started this trainer in (joined), or None."""
    import torch

    from training.island import Island

    island = Island.from_env()
    if island is not None:
        island.join(torch.device(island.device(device)))
        if island.main:
            print(f"compute island of {island.world} processes: rank 0 does the swarm's work", flush=True)
    return island


def run_local_trainer(args: argparse.Namespace) -> None:
    if args.job == "expert":
        if args.expert is None:
            raise UsageError("--local training needs --expert K (or --job router / --job monolith)")
        job = str(JobId.expert(_one_expert(args)))
    else:
        job = args.job
    data_dir, ckpt_dir = _dirs(args)
    train = _train_config(args, steps=args.steps, minutes=args.minutes)  # bad flags fail before the heavy imports
    from training.local import LocalTrainConfig, train_local

    cfg = LocalTrainConfig(
        data_dir=str(data_dir),
        ckpt_dir=str(ckpt_dir),
        job=job,
        train=train,
        text_encoder=args.text_encoder,
        vae=args.vae,
        router_preset=args.router_preset,
        distill_preset=args.distill_preset,
        distill_init=args.distill_init,
    )
    # Ctrl-C / SIGTERM: finish the step, save, exit 0 (in an island, every rank at the same step)
    stop = stop_on_signals(args.role)
    train_local(cfg, should_stop=stop.is_set)


def run_server(args: argparse.Namespace) -> None:
    """Serve the denoising forward pass of the published checkpoint(s) of ``--expert K[,K...]``."""
    from roles.server import ExpertServer, ServerConfig

    experts = _served_slots(args.expert)
    if args.max_batch < 1 or args.max_queue < 1 or args.request_timeout <= 0 or args.run_timeout <= 0:
        raise UsageError("--max-batch, --max-queue, --request-timeout and --run-timeout must be positive")
    device, precision = _device_and_precision(args, default_device="cpu")
    cfg = ServerConfig(
        experts=experts,
        work_dir=str(Path(args.workdir) / "served"),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        follow=args.follow,
        run_timeout_s=args.run_timeout,
        device=device,
        precision=precision,
    )
    stop = stop_on_signals(args.role)
    node = _swarm_node(args)
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


def run_client(args: argparse.Namespace) -> None:
    from roles.client import ClientConfig, run_local_client
    from router.sampling import SamplerConfig

    from_swarm = not args.local and not args.from_export
    if from_swarm and not args.initial_peers:
        raise UsageError("the client needs --initial-peers of a swarm (or --local / --from-export FOLDER)")
    if args.local_experts == "all":
        subset = "all"
    else:
        subset = _int_list(args.local_experts, "--local-experts") if args.local_experts else None
    _, ckpt = _dirs(args)
    device, precision = _device_and_precision(args)
    distilled = args.mode == "distilled"
    if distilled and args.local_experts and args.local_experts != "all":
        raise UsageError(
            "--mode distilled runs the distilled student alone: --local-experts all runs it here, nothing else applies"
        )
    cfg = ClientConfig(
        prompts=args.prompts,
        sampler=SamplerConfig(
            mode="top1" if distilled else args.mode,
            k=args.k,
            tau=args.tau,
            guidance=args.guidance,
            steps=args.steps,
            seed=args.seed,
        ),  # fmt: skip
        distilled=distilled,
        output=args.output or "",
        local_experts=subset,
        ckpt_dir=str(args.ckpt_dir or Path(args.workdir) / "fetched") if from_swarm else str(ckpt),
        from_export=args.from_export or "",
        vae=args.vae,
        device=device,
        precision=precision,
        server_wait_s=args.server_timeout,
        audit_rate=args.audit,
        audit_tolerance=args.audit_tolerance,
    )
    if not from_swarm:
        run_local_client(cfg)
        return
    from roles.client import run_swarm_client

    node = _swarm_node(args, say_join=False)
    try:
        run_swarm_client(node, cfg)
    finally:
        node.shutdown()


def run_status(args: argparse.Namespace) -> None:
    from roles.status import parse_web
    from roles.status import run_status as show

    if not args.initial_peers:
        raise UsageError("status needs --initial-peers of a swarm to look at")
    try:
        web = parse_web(args.web) if args.web else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    once = args.once or args.json or args.ledger
    if web is not None and once:
        raise UsageError("--web serves a live page: it goes without --once, --json and --ledger")
    stop = stop_on_signals(args.role)
    node = _swarm_node(args, say_join=False)
    try:
        show(
            node,
            once=once,
            as_json=args.json,
            stop=stop,
            until_done=args.until_done,
            web=web,
            with_ledger=args.ledger,
            only=node.ref,
        )
    finally:
        node.shutdown()


def run_eval(args: argparse.Namespace) -> None:
    from evaluation.evaluate import EvalConfig, evaluate

    data_dir, ckpt = _dirs(args)
    device, precision = _device_and_precision(args)
    cfg = EvalConfig(
        ckpt_dir=str(ckpt),
        data_dir=str(data_dir),
        vae=args.vae,
        device=device,
        precision=precision,
        out_dir=args.output,
        n=args.eval_n,
        reference=args.eval_reference,
        steps=args.steps,
        guidance=args.guidance,
        tau=args.tau,
        seed=args.seed,
        rows=[r.strip() for r in args.eval_rows.split(",") if r.strip()],
        second_router=args.eval_second_router,
    )
    report = evaluate(cfg)
    out = Path(cfg.out_dir)
    print((out / "eval.md").read_text())
    print(
        f"wrote {out}/eval.md, eval.json, fid.png, usage.png, routing.png, samples.png ({report.heldout_images} images)"
    )


def run_export(args: argparse.Namespace) -> None:
    from data.checkpoint import latest_checkpoint
    from diffswarm import DiffswarmPipeline

    _, ckpt = _dirs(args)
    weights = args.text_encoder[5:].partition("@")[0] if args.text_encoder.startswith("clip:") else ""
    pipe = DiffswarmPipeline.from_checkpoints(ckpt, vae=args.vae, text_encoder_weights=weights)
    out = pipe.save_pretrained(Path(args.out), vae=args.vae, text_encoder_weights=weights)
    student = latest_checkpoint(JobId.DISTILL.folder(ckpt))
    if student is not None:  # the distilled student goes along: it samples alone (--mode distilled)
        from router.ensemble import write_distilled

        write_distilled(Path(out), student.model_dir, {**student.meta, "sha256": student.sha256})
    print(f"exported to {out}" + (f" (with the distilled student, step {student.step})" if student else ""))


RUN: dict[str, Callable[[argparse.Namespace], None]] = {
    "bootstrap": run_bootstrap,
    "prepare": run_prepare,
    "trainer": run_trainer,
    "server": run_server,
    "client": run_client,
    "status": run_status,
    "eval": run_eval,
    "export": run_export,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub on the default path
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    interrupt_on_signals()  # long-lived roles replace this with a clean stop once they hold something
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        RUN[args.role](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except InterruptedError as e:  # a stop that was asked for, before there was anything to save
        print(f"{args.role}: {e}", file=sys.stderr)
        return 0
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:  # ours subclass these
        if args.debug:  # a bug in the code looks like a user error otherwise: show where it was
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
