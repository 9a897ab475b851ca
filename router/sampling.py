"""Routed sampling: at every step the router picks experts, each selected expert predicts a
velocity (with its own classifier-free guidance), and their weighted sum takes one Euler step.

A step is a pure function of (x_t, t, t_next, text states): nothing is carried between steps
but x, so any step can be served by a local expert or a remote one through the same
``ExpertRunner`` interface. A runner may also say what happened while it served a step (a remote
one: a server caught answering wrong, the step redone elsewhere): the routing log keeps those notes
with the step they belong to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from experts.device import autocast
from experts.objectives import TIMESTEP_SCALE, euler_step, network_input, sampling_times, velocity_from_output
from experts.presets import expert_forward
from router.combine import MODES, routing_weights
from router.network import pool_text


@dataclass
class SamplerConfig:
    mode: str = "topk"  # top1 | topk | threshold | full
    k: int = 2  # experts per step for topk
    tau: float = 0.2  # probability threshold for threshold mode
    guidance: float = 3.0  # classifier-free guidance scale per expert (1 = off)
    steps: int = 30
    seed: int = 0
    shift: float = 1.0  # >1 spends more steps at high noise

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown --mode {self.mode!r}; choose one of {MODES}")
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.k < 1:
            raise ValueError(f"--k must be at least 1, got {self.k}")


# An expert runner maps (x_t (B,C,H,W), t (B,), states (2B,L,D), mask (2B,L), guidance, t_next) → v (B,C,H,W).
# It raises ExpertUnavailable when it cannot serve (a remote expert with no replica left). It may
# have ``where`` (who served its last call) and ``take_notes()`` (what happened since it was last
# asked, as dicts; see RoutingLog.notes).
ExpertRunner = Callable[..., torch.Tensor]


# Called after each step with (step index, the time reached, x at that time, the routing log so far);
# it may return a tensor of x's shape to continue from instead.
StepEnd = Callable[[int, float, torch.Tensor, "RoutingLog"], "torch.Tensor | None"]


class ExpertUnavailable(RuntimeError):
    """Expert ``expert`` cannot serve this step; the router's choice is renormalised over the rest."""

    def __init__(self, expert: int, reason: str) -> None:
        super().__init__(f"expert {expert}: {reason}")
        self.expert, self.reason = expert, reason


class LocalExpert:
    """An expert loaded in this process; cond and uncond go through one batched forward."""

    def __init__(self, model: torch.nn.Module, objective: str, device: str = "cpu", precision: str = "fp32") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.objective = objective
        self.precision = precision  # bf16: the forward under autocast; the velocity math stays fp32
        self.where = "local"

    @classmethod
    def from_checkpoint(cls, ckpt, device: str = "cpu", precision: str = "fp32") -> LocalExpert:
        from diffusers import PixArtTransformer2DModel

        model = PixArtTransformer2DModel.from_pretrained(ckpt.model_dir, low_cpu_mem_usage=False)
        return cls(model, ckpt.meta["objective"], device, precision)

    @torch.no_grad()
    def __call__(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        states: torch.Tensor,
        mask: torch.Tensor,
        guidance: float | torch.Tensor,
        t_next: float | None = None,
    ) -> torch.Tensor:
        if self.device.type == "cpu":
            with autocast(self.device, self.precision):
                return guided_velocity(self.model, self.objective, x_t, t, states, mask, guidance)
        # Inputs and the answer stay on the CPU (the sampler, the router and the wire live there).
        d = self.device
        if isinstance(guidance, torch.Tensor):
            guidance = guidance.to(d)
        with autocast(d, self.precision):
            v = guided_velocity(self.model, self.objective, x_t.to(d), t.to(d), states.to(d), mask.to(d), guidance)
        return v.float().cpu()


def guided_velocity(
    model: torch.nn.Module,
    objective: str,
    x_t: torch.Tensor,
    t: torch.Tensor,
    states: torch.Tensor,
    mask: torch.Tensor,
    guidance: float | torch.Tensor,
) -> torch.Tensor:
    """v = v(∅) + s (v(c) − v(∅)); ``states``/``mask`` hold the B cond rows, then the B uncond rows.
    ``guidance`` is one scale, or one per row (B,) when a server batches several requests."""
    b = x_t.shape[0]
    x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])  # (2B, C, H, W), (2B,)
    net_in, timestep = network_input(objective, x2, t2)
    out = expert_forward(model, net_in, timestep, states, mask).float()  # fp32 even under autocast
    v = velocity_from_output(objective, out, x2, t2)  # (2B, C, H, W)
    v_cond, v_uncond = v[:b], v[b:]
    if isinstance(guidance, torch.Tensor):
        guidance = guidance.reshape(-1, 1, 1, 1).to(v.dtype)
    return v_uncond + guidance * (v_cond - v_uncond)


@dataclass
class RoutingLog:
    """Which experts served which steps: ``usage[k]`` counts (sample, step) pairs served by k,
    ``by_peer[(k, where)]`` the same per server ("local" for an expert in this process)."""

    num_experts: int
    steps: int
    usage: list[int] = field(default_factory=list)
    per_step: list[list[int]] = field(default_factory=list)  # experts used at each step (any sample)
    weights: list[torch.Tensor] = field(default_factory=list)  # (B, K) weights at each step
    by_peer: dict[tuple[int, str], int] = field(default_factory=dict)
    where: list[dict[int, str]] = field(default_factory=list)  # per step: expert → who served it
    paths: list[dict[int, str]] = field(default_factory=list)  # per step: expert → local, direct or relayed
    reroutes: list[tuple[int, int, str]] = field(default_factory=list)  # (step, expert, reason)
    unavailable: set[int] = field(default_factory=set)  # experts that could not serve (kept out)
    notes: list[dict] = field(default_factory=list)  # runners' notes, each with its "step" and "expert"

    def __post_init__(self) -> None:
        self.usage = [0] * self.num_experts


def routed_step(
    x_t: torch.Tensor,
    t: float,
    t_next: float,
    router: torch.nn.Module,
    experts: dict[int, ExpertRunner],
    states: torch.Tensor,
    mask: torch.Tensor,
    cfg: SamplerConfig,
    log: RoutingLog | None = None,
) -> torch.Tensor:
    """One denoising step of the routed ensemble, from t to t_next.

    An expert that raises :class:`ExpertUnavailable` is dropped and the step is routed again
    over the others (the router's probabilities renormalised); it stays out for later steps.
    """
    b = x_t.shape[0]
    tt = torch.full((b,), float(t))
    with torch.no_grad():
        text = pool_text(states[:b], mask[:b])  # the prompts (cond rows); a router without text ignores it
        probs = torch.softmax(router(x_t, TIMESTEP_SCALE * tt, text).float(), dim=-1)  # (B, K)
    log = log if log is not None else RoutingLog(probs.shape[-1], 0)
    step = len(log.per_step)
    while True:
        available = torch.zeros(probs.shape[-1], dtype=torch.bool)
        available[[k for k in experts if k not in log.unavailable]] = True
        if not bool(available.any()):
            raise ExpertUnavailable(-1, "no expert at all can serve this step")
        w = routing_weights(probs, cfg.mode, cfg.k, cfg.tau, available)  # (B, K)
        v = torch.zeros_like(x_t)
        served: dict[int, tuple[int, str, str]] = {}
        try:
            for k in sorted(experts):
                rows = (w[:, k] > 0).nonzero().flatten()
                if len(rows) == 0:
                    continue
                idx = torch.cat([rows, rows + b])  # the cond and the uncond row of each selected sample
                try:
                    v_k = experts[k](x_t[rows], tt[rows], states[idx], mask[idx], cfg.guidance, t_next=t_next)
                finally:  # what the runner saw is kept even when it could not serve
                    _take_notes(experts[k], step, k, log)
                v[rows] += w[rows, k].reshape(-1, 1, 1, 1).to(v.dtype) * v_k
                served[k] = (len(rows), getattr(experts[k], "where", "local"), getattr(experts[k], "path", "local"))
        except ExpertUnavailable as e:
            log.unavailable.add(e.expert)
            log.reroutes.append((step, e.expert, e.reason))
            continue
        break
    for k, (n, where, _) in served.items():
        log.usage[k] += n
        log.by_peer[(k, where)] = log.by_peer.get((k, where), 0) + n
    log.per_step.append(sorted(served))
    log.where.append({k: where for k, (_, where, _) in served.items()})
    log.paths.append({k: path for k, (_, _, path) in served.items()})
    log.weights.append(w)
    return euler_step(x_t, v, t, t_next)


def _take_notes(runner: ExpertRunner, step: int, expert: int, log: RoutingLog) -> None:
    take = getattr(runner, "take_notes", None)
    if take is not None:
        log.notes.extend({**note, "step": step, "expert": expert} for note in take())


def generate(
    prompts: list[str],
    router: torch.nn.Module,
    experts: dict[int, ExpertRunner],
    encoder,
    space,
    shape: tuple[int, int, int],
    cfg: SamplerConfig,
    progress: StepEnd | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, RoutingLog]:
    """Sample one image per prompt; returns RGB (B, 3, H, W) in [-1, 1] and the routing log.

    The starting noise comes from ``generator`` (default: one seeded with ``cfg.seed``).
    ``progress(i, t_next, x, log)`` is called after step ``i``; a tensor it returns replaces x."""
    if not experts:
        raise ValueError("no expert is available to sample with")
    for p in prompts:
        if not p.strip():
            raise ValueError('empty prompt; give some text, e.g. "a red apple"')
    b = len(prompts)
    cond, cmask = encoder.encode(prompts)
    uncond, umask = encoder.encode([""] * b)
    states, mask = torch.cat([cond, uncond]), torch.cat([cmask, umask])  # (2B, L, D), (2B, L)
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    x = torch.randn((b, *shape), generator=gen)  # (B, C, H, W) at t = 1
    num_experts = router.config.num_experts
    log = RoutingLog(num_experts, cfg.steps)
    times = sampling_times(cfg.steps, cfg.shift)
    for i in range(cfg.steps):
        x = routed_step(x, times[i], times[i + 1], router, experts, states, mask, cfg, log)
        if progress is not None and (replaced := progress(i, times[i + 1], x, log)) is not None:
            if replaced.shape != x.shape:
                got, want = tuple(replaced.shape), tuple(x.shape)
                raise ValueError(f"a step callback returned latents of shape {got}, not {want}")
            x = replaced
    return space.decode(x), log
