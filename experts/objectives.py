"""Diffusion math as small pure functions: flow matching (FM) and DDPM-ε on a cosine schedule.

Conventions (docs/design.md §4): time t ∈ [0, 1], t = 1 is pure noise, t = 0 is data; networks see
``timestep = 1000 * t``. Every function here is stateless so a denoising step can run on a
remote peer given only (x_t, t, t_next).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Objective = Literal["fm", "ddpm"]
OBJECTIVES: tuple[str, ...] = ("fm", "ddpm")
TIMESTEP_SCALE = 1000.0  # networks are fed timestep = 1000 * t
COSINE_S = 0.008  # offset of the improved-DDPM cosine schedule
X0_RANGE = 3.0  # x̂0 is clamped to [-X0_RANGE, X0_RANGE]; data lives in [-1, 1]


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample time vector (B,) so it broadcasts against x (B, C, H, W)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() > 0 else t


# ---------------------------------------------------------------- flow matching
def fm_interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t ε."""
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * noise


def fm_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The FM velocity target v = ε − x0 (constant along a straight path)."""
    return noise - x0


def euler_step(x_t: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step of dx/dt = v from t to t_next (t_next < t when sampling)."""
    return x_t + (t_next - t) * v


def fm_x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_t − t v."""
    return x_t - _bcast(t, x_t) * v


def fm_eps_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε̂ = x_t + (1 − t) v."""
    return x_t + (1 - _bcast(t, x_t)) * v


def sampling_times(steps: int, shift: float = 1.0) -> list[float]:
    """Decreasing times 1 → 0 for ``steps`` Euler steps.

    ``shift`` > 1 spends more steps at high noise (the SD3 time shift); 1 keeps them uniform.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    times = []
    for i in range(steps + 1):
        u = 1.0 - i / steps
        times.append(shift * u / (1 + (shift - 1) * u))
    return times


# ---------------------------------------------------------------- DDPM-ε, cosine schedule
def cosine_alpha_bar(tau: torch.Tensor) -> torch.Tensor:
    """ᾱ(τ) of the cosine schedule, τ ∈ [0, 1] (the continuous form of ``squaredcos_cap_v2``)."""
    f = torch.cos((tau + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    f0 = math.cos(COSINE_S / (1 + COSINE_S) * math.pi / 2) ** 2
    return (f / f0).clamp(1e-8, 1.0)


def cosine_tau_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`cosine_alpha_bar`."""
    f0 = math.cos(COSINE_S / (1 + COSINE_S) * math.pi / 2) ** 2
    c = torch.sqrt((alpha_bar * f0).clamp(0.0, 1.0))
    return (torch.arccos(c) * 2 / math.pi * (1 + COSINE_S) - COSINE_S).clamp(0.0, 1.0)


def ddpm_interpolate(x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Variance-preserving forward process x_τ = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε."""
    ab = _bcast(cosine_alpha_bar(tau), x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def fm_time_to_ddpm(t: torch.Tensor) -> torch.Tensor:
    """τ with the same signal-to-noise ratio as FM time t: sqrt(ᾱ/(1 − ᾱ)) = (1 − t)/t."""
    t = torch.as_tensor(t, dtype=torch.float64)
    alpha_bar = (1 - t) ** 2 / ((1 - t) ** 2 + t**2)
    return cosine_tau_from_alpha_bar(alpha_bar)


def fm_to_vp_input(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_vp = x_t / sqrt((1 − t)² + t²): the VP point with the same SNR as the FM point."""
    tb = _bcast(t, x_t)
    return x_t / torch.sqrt((1 - tb) ** 2 + tb**2)


def v_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Turn a DDPM ε̂ into an FM velocity at FM time t (docs/design.md §4).

    x̂0 = (x_t − t ε̂) / max(1 − t, 1e-2), clamped to a sane range; v = ε̂ − x̂0.
    """
    tb = _bcast(t, x_t)
    x0 = (x_t - tb * eps) / (1 - tb).clamp(min=1e-2)
    x0 = x0.clamp(-X0_RANGE, X0_RANGE)
    return eps - x0


# ---------------------------------------------------------------- training losses
@dataclass(frozen=True)
class TrainingBatch:
    """What a network sees for one training step, whatever the objective."""

    x_in: torch.Tensor  # network input (B, C, H, W)
    timestep: torch.Tensor  # (B,) = 1000 * (FM t or DDPM τ)
    target: torch.Tensor  # regression target, same shape as x_in


def sample_train_times(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal times (SD3): more weight on the middle of the path, where it is hardest."""
    return torch.sigmoid(torch.randn(batch, generator=generator))


def make_training_batch(objective: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> TrainingBatch:
    """Forward-process a clean batch for ``objective`` ('fm': v-target, 'ddpm': ε-target)."""
    if objective == "fm":
        return TrainingBatch(fm_interpolate(x0, noise, t), TIMESTEP_SCALE * t, fm_target(x0, noise))
    if objective == "ddpm":
        # The same t distribution is mapped through the SNR match so both objectives spend their
        # capacity on the same noise levels the FM sampler will visit.
        tau = fm_time_to_ddpm(t).to(x0.dtype)
        return TrainingBatch(ddpm_interpolate(x0, noise, tau), TIMESTEP_SCALE * tau, noise)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def network_input(objective: str, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What to feed an expert of ``objective`` at FM time t: (input, timestep)."""
    t = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1).expand(x_t.shape[0])
    if objective == "fm":
        return x_t, TIMESTEP_SCALE * t
    if objective == "ddpm":
        return fm_to_vp_input(x_t, t), TIMESTEP_SCALE * fm_time_to_ddpm(t).to(x_t.dtype)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def velocity_from_output(objective: str, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Turn an expert's raw output at FM time t into an FM velocity."""
    if objective == "fm":
        return out
    if objective == "ddpm":
        t = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1).expand(x_t.shape[0])
        return v_from_eps(x_t, out, t)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
