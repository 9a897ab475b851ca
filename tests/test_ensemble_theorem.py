"""The ensemble is exact: analytic Gaussian-component experts combined by the exact posterior
router give the velocity of the mixture (docs/design.md §4). The mixture velocity is computed
independently, from the score of the mixture density by autograd (Tweedie)."""

import math

import torch

from experts.objectives import TIMESTEP_SCALE, euler_step
from router.combine import routing_weights
from router.sampling import SamplerConfig, routed_step

D = 6
PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MU = torch.tensor([[1.0] * D, [-1.0] * D, [0.0, 2.0, -2.0, 0.5, 0.0, 1.0]], dtype=torch.float64)
SIG = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)


def component_velocity(k: int, x: torch.Tensor, t: float) -> torch.Tensor:
    """Exact FM velocity of component k: E[ε − x0 | x_t] for x0 ~ N(μ_k, σ_k² I)."""
    s = 1 - t
    var = s**2 * SIG[k] ** 2 + t**2
    r = x - s * MU[k]
    ex0 = MU[k] + s * SIG[k] ** 2 / var * r
    eeps = t / var * r
    return eeps - ex0


def log_component_density(x: torch.Tensor, t: float) -> torch.Tensor:
    """(B, K) log π_k N(x; (1−t) μ_k, ((1−t)² σ_k² + t²) I)."""
    s = 1 - t
    var = s**2 * SIG**2 + t**2  # (K,)
    diff = x.unsqueeze(1) - s * MU.unsqueeze(0)  # (B, K, D)
    return torch.log(PI) - 0.5 * (diff**2).sum(-1) / var - 0.5 * D * torch.log(2 * math.pi * var)


def mixture_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """v = (E[ε|x_t] − x_t)/(1 − t), E[ε|x_t] = −t ∇ log p_t(x_t)."""
    x = x.detach().requires_grad_(True)
    logp = torch.logsumexp(log_component_density(x, t), dim=-1).sum()
    (score,) = torch.autograd.grad(logp, x)
    return (-t * score - x.detach()) / (1 - t)


class PosteriorRouter(torch.nn.Module):
    """The exact posterior p(k | x_t) as logits; reads t back from the timestep."""

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        t = float(timestep[0]) / TIMESTEP_SCALE
        return log_component_density(x_t.reshape(len(x_t), -1).double(), t)


def test_full_ensemble_equals_mixture_velocity():
    gen = torch.Generator().manual_seed(0)
    for t in (0.05, 0.3, 0.5, 0.7, 0.95):
        x = torch.randn(64, D, generator=gen, dtype=torch.float64) * 1.5
        probs = torch.softmax(log_component_density(x, t), dim=-1)
        w = routing_weights(probs, "full")
        combined = sum(w[:, k : k + 1] * component_velocity(k, x, t) for k in range(3))
        assert torch.allclose(combined, mixture_velocity(x, t), atol=1e-8), t


def analytic_expert(k: int):
    """An ExpertRunner for component k (guidance is irrelevant for an unconditional expert)."""

    def run(x, tt, states, mask, guidance, t_next=None):
        return component_velocity(k, x.reshape(len(x), -1), float(tt[0])).reshape(x.shape)

    return run


def test_routed_step_with_analytic_experts_takes_the_mixture_step():
    experts = {k: analytic_expert(k) for k in range(3)}
    x = torch.randn(16, 1, 1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    states, mask = torch.zeros(32, 1, 1), torch.ones(32, 1)
    cfg = SamplerConfig(mode="full", guidance=1.0)
    out = routed_step(x, 0.6, 0.55, PosteriorRouter(), experts, states, mask, cfg)
    expected = euler_step(x, mixture_velocity(x.reshape(16, D), 0.6).reshape(x.shape), 0.6, 0.55)
    assert torch.allclose(out, expected, atol=1e-8)


def test_top1_is_not_the_mixture_where_components_overlap():
    """Sanity check that the test above can fail: a hard choice differs from the mixture."""
    x = torch.zeros(1, D, dtype=torch.float64)
    t = 0.9
    probs = torch.softmax(log_component_density(x, t), dim=-1)
    w = routing_weights(probs, "top1")
    top1 = sum(w[:, k : k + 1] * component_velocity(k, x, t) for k in range(3))
    assert not torch.allclose(top1, mixture_velocity(x, t), atol=1e-3)
