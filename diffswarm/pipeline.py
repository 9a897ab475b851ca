"""The diffswarm pipeline: K experts and a router sampled as one model, wherever the experts run.

:class:`DiffswarmPipeline` is a diffusers ``DiffusionPipeline``. It is built from

- an export (:meth:`DiffswarmPipeline.from_pretrained`, the folder ``--role export`` and
  :meth:`DiffswarmPipeline.save_pretrained` write; diffusers' own
  ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads the same folder
  through the ``pipeline.py`` written into it),
- a run's checkpoints (:meth:`DiffswarmPipeline.from_checkpoints`), or
- a live swarm (:meth:`DiffswarmPipeline.from_swarm`): the router is fetched and runs here, every
  expert runs on the swarm's servers (their answers audited) unless asked to run here.

Calling it samples: at every step the router weighs the experts, the chosen ones predict a
velocity each, and their weighted sum takes one step (:mod:`router.sampling`). The output has the
images and, per step, which experts served and who served them. The pipeline prints nothing and
writes no file: progress goes through ``callback_on_step_end`` as in diffusers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from diffusers import DiffusionPipeline, PixArtTransformer2DModel
from diffusers.utils import BaseOutput

from data.checkpoint import CheckpointError, latest_checkpoint
from data.job_id import JobId
from experts.latent_space import LatentSpace, VaeSpace, tensor_to_pil
from experts.text_encoder import TextEncoder
from router.ensemble import (
    check_compatible,
    encoder_for,
    expert_dir,
    expert_shape,
    load_checkpoints,
    read_distilled,
    read_export,
    router_dir,
    space_for,
    write_export,
)
from router.network import RouterNet
from router.sampling import ExpertRunner, LocalExpert, RoutingLog, SamplerConfig, StepEnd, generate

# callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict, as in diffusers: the
# kwargs hold "latents" (x after the step) and "routing" (that step's entry of the output's
# routing); returning {"latents": tensor} continues from that tensor instead.
StepCallback = Callable[["DiffswarmPipeline", int, float, dict], dict | None]


@dataclass
class DiffswarmOutput(BaseOutput):
    """What a call returns.

    images: one PIL image per prompt.
    routing: per step, ``{"step": i, "experts": {k: {"served_by": who, "path": how}}}``: the
        experts that denoised any image at that step, who answered ("local", or a server's peer
        id) and how it was reached ("local", "direct" or "relayed").
    usage: per expert, how many (image, step) pairs it denoised.
    reroutes: experts dropped mid-generation (``{"step", "expert", "reason"}``); the router's
        choice was renormalised over the others.
    failovers: what remote experts did when a server failed (one line each).
    audit: the audit of the servers' answers (``router.audit.summarize``), None when nothing was audited.
    """

    images: list[PIL.Image.Image]
    routing: list[dict] = field(default_factory=list)
    usage: list[int] = field(default_factory=list)
    reroutes: list[dict] = field(default_factory=list)
    failovers: list[str] = field(default_factory=list)
    audit: dict | None = None


def sampler_config(mode: str, k: int, steps: int, guidance: float, seed: int = 0, tau: float = 0.2) -> SamplerConfig:
    """``mode`` as users write it: ``top1``, ``top2`` (any ``topN``: the N most likely experts),
    ``topk`` (with ``k``), ``threshold`` (with ``tau``) or ``full``."""
    if m := re.fullmatch(r"top(\d+)", mode):
        mode, k = "topk", int(m.group(1))
    return SamplerConfig(mode=mode, k=k, tau=tau, guidance=guidance, steps=steps, seed=seed)


class DiffswarmPipeline(DiffusionPipeline):
    """K experts + a router, sampled as one text-to-image model.

    Built by :meth:`from_pretrained`, :meth:`from_checkpoints` or :meth:`from_swarm` (or from its
    parts). ``experts`` maps expert id → a runner: a :class:`router.sampling.LocalExpert` in this
    process or a remote one; an expert missing from it is left out and the router's choice is
    renormalised over the others.
    """

    config_name = "model_index.json"

    def __init__(
        self,
        router: torch.nn.Module,
        experts: dict[int, ExpertRunner],
        expert_meta: dict[int, dict],
        router_meta: dict,
        text_encoder: TextEncoder,
        space: LatentSpace,
        served_by: dict[int, str] | None = None,
    ) -> None:
        super().__init__()
        self._set_parts(router, experts, expert_meta, router_meta, text_encoder, space, served_by)

    def _set_parts(self, router, experts, expert_meta, router_meta, text_encoder, space, served_by=None) -> None:
        self.router = router.eval()
        self.experts = dict(experts)
        self.expert_meta = dict(expert_meta)
        self.router_meta = dict(router_meta)
        self.text_encoder = text_encoder
        self.space = space
        self.served_by = dict(served_by or dict.fromkeys(self.experts, "local"))
        self.shape = expert_shape(next(iter(self.expert_meta.values())))
        self.failovers: list[str] = []  # remote experts append what they did when a server failed
        self.audit = None  # remote experts' audit counts (router.audit.AuditStats), when they audit
        self.published: list = []  # proofs against lying servers this pipeline published (swarm.proof)
        self._close: list[Callable[[], None]] = []
        self.register_to_config(num_experts=self.num_experts)

    def _init_from_components(
        self,
        router: torch.nn.Module,
        experts: Sequence[torch.nn.Module],
        objectives: Sequence[str],
        text_encoder_name: str,
        space: str,
        vae: torch.nn.Module | None,
    ) -> None:
        """The constructor behind diffusers' loader: an export's components, as diffusers loads them
        (see ``router.ensemble.write_export``); the export's text encoder ships with its package."""
        DiffusionPipeline.__init__(self)
        if len(objectives) != len(experts):
            raise CheckpointError(f"this export names {len(objectives)} objectives for {len(experts)} experts")
        metas = {
            k: {"objective": objectives[k], "text_encoder": text_encoder_name, "space": space, "shape": _shape_of(m)}
            for k, m in enumerate(experts)
        }
        if space == "pixel":
            latent = LatentSpace()
        elif vae is not None:
            latent = VaeSpace(space.removeprefix("vae:"), vae=vae)
        else:
            raise CheckpointError(f"this set works in {space!r} and its export holds no VAE")
        runners = {k: LocalExpert(m, objectives[k]) for k, m in enumerate(experts)}
        router_meta = {"space": space, "num_experts": len(experts)}
        self._set_parts(router, runners, metas, router_meta, encoder_for(text_encoder_name), latent)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pretrained(
        cls,
        export_dir: str | Path,
        vae: str = "",
        text_encoder_weights: str = "",
        device: str = "cpu",
        precision: str = "fp32",
        experts: Sequence[int] | None = None,
    ) -> DiffswarmPipeline:
        """An export (the folder ``--role export`` or :meth:`save_pretrained` writes). ``vae`` and
        ``text_encoder_weights`` point to weights the export does not hold; ``experts`` loads a
        subset; experts run on ``device`` in ``precision`` (fp32 or bf16)."""
        ex = read_export(Path(export_dir))
        wanted = range(len(ex.expert_meta)) if experts is None else experts
        runners = {}
        for k in wanted:
            if k not in ex.expert_meta:
                raise CheckpointError(f"unknown expert {k}; this set has experts 0..{len(ex.expert_meta) - 1}")
            model = PixArtTransformer2DModel.from_pretrained(expert_dir(ex.folder, k), low_cpu_mem_usage=False)
            runners[k] = LocalExpert(model, ex.expert_meta[k]["objective"], device, precision)
        router = RouterNet.from_pretrained(router_dir(ex.folder), low_cpu_mem_usage=False)
        metas = {k: ex.expert_meta[k] for k in runners}
        encoder = encoder_for(ex.text_encoder, text_encoder_weights or ex.text_weights)
        space = space_for(ex.config["space"], vae or ex.vae)
        return cls(router, runners, metas, ex.router_meta, encoder, space)

    @classmethod
    def from_checkpoints(
        cls,
        ckpt_root: str | Path,
        experts: Sequence[int] | None = None,
        vae: str = "",
        text_encoder_weights: str = "",
        device: str = "cpu",
        precision: str = "fp32",
        text_encoder: TextEncoder | None = None,
    ) -> DiffswarmPipeline:
        """The latest hash-verified checkpoint of the router and of each expert under a run's
        checkpoint folder (``runs/NAME/checkpoints``); ``experts``: a subset."""
        found, router_ckpt = load_checkpoints(Path(ckpt_root), None if experts is None else list(experts))
        metas = {k: {**c.meta, "sha256": c.sha256} for k, c in found.items()}
        enc_name = check_compatible(router_ckpt.meta, metas)
        runners = {k: LocalExpert.from_checkpoint(c, device, precision) for k, c in found.items()}
        for k, c in found.items():
            runners[k].source = c.model_dir  # an export copies these folders as they are
        router = RouterNet.from_pretrained(router_ckpt.model_dir, low_cpu_mem_usage=False)
        router.source = router_ckpt.model_dir
        encoder = text_encoder or encoder_for(enc_name, text_encoder_weights)
        space = space_for(router_ckpt.meta["space"], vae)
        return cls(router, runners, metas, {**router_ckpt.meta, "sha256": router_ckpt.sha256}, encoder, space)

    @classmethod
    def distilled(
        cls,
        ckpt_root: str | Path,
        vae: str = "",
        text_encoder_weights: str = "",
        device: str = "cpu",
        precision: str = "fp32",
    ) -> DiffswarmPipeline:
        """The distilled student under a run's checkpoint folder (``distill/``), or in an export:
        one network, one forward per step (two with guidance, in one batch), no router."""
        from training.monolith import SingleExpertRouter

        root = Path(ckpt_root)
        exported = read_distilled(root) if (root / "config.json").is_file() else None
        if exported is not None:
            model_dir, meta = exported
            ex = read_export(root)
            text_encoder_weights, vae = text_encoder_weights or ex.text_weights, vae or ex.vae
        else:
            ck = latest_checkpoint(JobId.DISTILL.folder(root))
            if ck is None:
                raise CheckpointError(
                    f"no distilled student under {JobId.DISTILL.folder(root)}; train it with --role trainer --local "
                    "--job distill, or in a swarm whose run has --distill-steps (an export holds it once exported)"
                )
            model_dir, meta = ck.model_dir, {**ck.meta, "sha256": ck.sha256}
        model = PixArtTransformer2DModel.from_pretrained(model_dir, low_cpu_mem_usage=False)
        runner = LocalExpert(model, "fm", device, precision)
        runner.source = model_dir
        router_meta = {"space": meta["space"], "num_experts": 1, "kind": "distill", "sha256": meta["sha256"]}
        encoder = encoder_for(meta["text_encoder"], text_encoder_weights)
        return cls(SingleExpertRouter(), {0: runner}, {0: meta}, router_meta, encoder, space_for(meta["space"], vae))

    @classmethod
    def from_swarm(
        cls,
        initial_peers: Sequence[str],
        run: str = "",
        local_experts: Sequence[int] | str = (),
        cache_dir: str | Path = "runs/swarm-client",
        audit: float | None = None,
        vae: str = "",
        device: str = "cpu",
        precision: str = "fp32",
        wait_s: float = 30.0,
        host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
        distilled: bool = False,
    ) -> DiffswarmPipeline:
        """Join a swarm and sample with its run: the router (fetched, hash-verified) runs here, every
        expert on the swarm's servers, except ``local_experts`` (ids, or "all"), fetched and run here.

        ``run``: NAME@FINGERPRINT of the run to follow ("": the only one the swarm lists).
        ``cache_dir`` keeps this node's identity and the fetched checkpoints. ``audit``: the share
        of server answers recomputed to check them (default ``router.audit.DEFAULT_RATE``; 0 trusts
        the servers). Waits up to ``wait_s`` for a server when none is up. ``host_maddrs``: where
        this node listens. ``distilled``: the run's distilled student alone (fetched and verified,
        every step on its servers, audited; here with none up or ``local_experts="all"``). Call
        :meth:`close` (or use the pipeline in a ``with`` block) to leave the swarm."""
        from diffswarm.remote import RemoteConfig, hand_over_proofs, swarm_distilled, swarm_ensemble
        from router.audit import DEFAULT_RATE
        from swarm.blobs import BlobService, BlobStore
        from swarm.dht import SwarmConfig, SwarmNode

        if not initial_peers:
            raise ValueError("from_swarm needs the initial peers of a swarm (the multiaddrs its bootstrap prints)")
        cache = Path(cache_dir)
        where = SwarmConfig(str(cache / "identity"), list(initial_peers), list(host_maddrs), run=run)
        node = SwarmNode(where)
        blobs = pool = None
        try:
            blobs = BlobService(node.dht, BlobStore(), bans=node.bans)
            node.on_restart(blobs.rebind)
            remote_cfg = RemoteConfig(rediscover_s=wait_s, audit_rate=DEFAULT_RATE if audit is None else audit)
            if distilled:
                here = local_experts == "all"
                pipe, pool = swarm_distilled(node, blobs, cache / "fetched", remote_cfg, device, precision, here, vae)
            else:
                pipe, pool = swarm_ensemble(
                    node, blobs, cache / "fetched", local_experts, vae, remote_cfg, device, precision, wait_s
                )
        except BaseException:
            for part in (pool, blobs, node):
                _quietly(getattr(part, "close", None) or getattr(part, "shutdown", None))
            raise
        handover = lambda: hand_over_proofs(node, pipe.published)  # noqa: E731
        pipe._close = [c for c in (handover, pool.close if pool else None, blobs.shutdown, node.shutdown) if c]
        pipe.node = node
        return pipe

    # ------------------------------------------------------------------ properties
    @property
    def num_experts(self) -> int:
        return int(self.router.config.num_experts)

    @property
    def objectives(self) -> dict[int, str]:
        return {k: m["objective"] for k, m in self.expert_meta.items() if k in self.experts}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # inputs and outputs stay on the CPU; each local expert has its own device

    def to(self, device: str | torch.device) -> DiffswarmPipeline:
        """Run the experts held here (and the VAE) on ``device``; remote experts are not moved."""
        for runner in self.experts.values():
            if isinstance(runner, LocalExpert):
                runner.device = torch.device(device)
                runner.model.to(runner.device)
        self.space.to(device)
        return self

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        prompts: list[str],
        sampler: SamplerConfig,
        router: torch.nn.Module | None = None,
        generator: torch.Generator | None = None,
        step_end: StepEnd | None = None,
        experts: dict[int, ExpertRunner] | None = None,
    ) -> tuple[torch.Tensor, RoutingLog]:
        """RGB (B, 3, H, W) in [-1, 1] and the routing log: the tensors behind :meth:`__call__`.
        ``router`` and ``experts`` replace the pipeline's own for this call (an evaluation's oracle
        router, or a monolith sampled as a one-expert set in the same text encoder and space)."""
        return generate(
            prompts,
            router if router is not None else self.router,
            experts if experts is not None else self.experts,
            self.text_encoder,
            self.space,
            self.shape,
            sampler,
            progress=step_end,
            generator=generator,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        mode: str = "top2",
        k: int = 2,
        steps: int = 30,
        guidance: float = 3.0,
        generator: torch.Generator | None = None,
        seed: int = 0,
        callback_on_step_end: StepCallback | None = None,
    ) -> DiffswarmOutput:
        """Sample one image per prompt.

        ``mode``: which experts each step uses — ``top1``, ``top2`` (``topN``), ``topk`` (the ``k``
        most likely), ``threshold`` or ``full`` (all, weighted by the router). ``guidance``: the
        classifier-free guidance scale of each expert. The starting noise is drawn from
        ``generator`` (default: one seeded with ``seed``)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("give at least one prompt")
        sampler = sampler_config(mode, k, steps, guidance, seed)

        def step_end(i: int, t: float, x: torch.Tensor, log: RoutingLog) -> torch.Tensor | None:
            if callback_on_step_end is None:
                return None
            out = callback_on_step_end(self, i, t * 1000.0, {"latents": x, "routing": _routing(log)[-1]})
            return (out or {}).get("latents")

        images, log = self.sample(prompts, sampler, generator=generator, step_end=step_end)
        return self.output(images, log)

    def output(self, images: torch.Tensor, log: RoutingLog) -> DiffswarmOutput:
        """The output of a call from its tensors and routing log."""
        from router.audit import summarize

        report = summarize(self.audit, log.notes, len(images), sum(log.usage)) if self.audit is not None else None
        return DiffswarmOutput(
            images=[tensor_to_pil(x) for x in images],
            routing=_routing(log),
            usage=list(log.usage),
            reroutes=[{"step": s, "expert": k, "reason": r} for s, k, r in log.reroutes],
            failovers=list(self.failovers),
            audit=report,
        )

    # ------------------------------------------------------------------ saving and closing
    def save_pretrained(self, save_directory: str | Path, vae: str = "", text_encoder_weights: str = "") -> Path:
        """Write the set as an export: every expert must be held here. ``vae`` and
        ``text_encoder_weights``: the weights to copy in (a latent-space set; a CLIP encoder)."""
        missing = sorted(k for k in range(self.num_experts) if not isinstance(self.experts.get(k), LocalExpert))
        if missing:
            raise CheckpointError(f"cannot export: experts {missing} are not held here (no checkpoint, or remote)")
        parts = {
            k: (getattr(self.experts[k], "source", None) or self.experts[k].model, self.expert_meta[k])
            for k in range(self.num_experts)
        }
        router = (getattr(self.router, "source", None) or self.router, self.router_meta)
        enc = self.text_encoder.name
        return write_export(
            Path(save_directory), parts, router, enc, self.router_meta["space"], vae, text_encoder_weights
        )

    def close(self) -> None:
        """Leave the swarm (a pipeline from :meth:`from_swarm`); nothing to do otherwise."""
        for close in self._close:
            _quietly(close)
        self._close = []

    def __enter__(self) -> DiffswarmPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _routing(log: RoutingLog) -> list[dict]:
    return [
        {"step": i, "experts": {k: {"served_by": who, "path": paths.get(k, "local")} for k, who in where.items()}}
        for i, (where, paths) in enumerate(zip(log.where, log.paths, strict=True))
    ]


def _shape_of(model: torch.nn.Module) -> list[int]:
    c = model.config
    return [int(c.in_channels), int(c.sample_size), int(c.sample_size)]


def _quietly(close: Callable[[], None] | None) -> None:
    if close is None:
        return
    try:
        close()
    except Exception:  # already gone: closing must not hide what went wrong before
        pass
