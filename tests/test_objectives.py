"""Pins the diffusion conventions of docs/design.md §4: time direction, targets, Euler, ε→v."""

import math

import torch

from experts.objectives import (
    TIMESTEP_SCALE,
    cosine_alpha_bar,
    ddpm_interpolate,
    euler_step,
    fm_eps_from_v,
    fm_interpolate,
    fm_target,
    fm_time_to_ddpm,
    fm_to_vp_input,
    fm_x0_from_v,
    make_training_batch,
    network_input,
    sampling_times,
    v_from_eps,
    velocity_from_output,
)


def test_t1_is_noise_t0_is_data():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(fm_interpolate(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(fm_interpolate(x0, eps, torch.ones(2)), eps)
    times = sampling_times(10)
    assert times[0] == 1.0 and times[-1] == 0.0 and all(a > b for a, b in zip(times, times[1:], strict=False))
    _, timestep = network_input("fm", x0, torch.tensor(0.25))
    assert torch.allclose(timestep, torch.full((2,), 0.25 * TIMESTEP_SCALE))


def test_fm_target_and_reconstructions():
    x0, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t, v = fm_interpolate(x0, eps, t), fm_target(x0, eps)
    assert torch.allclose(v, eps - x0)
    assert torch.allclose(fm_x0_from_v(x_t, v, t), x0, atol=1e-6)
    assert torch.allclose(fm_eps_from_v(x_t, v, t), eps, atol=1e-6)


def test_euler_is_exact_on_a_straight_path():
    x0, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for steps in (1, 3, 17):
        times = sampling_times(steps, shift=3.0)
        x = eps.clone()
        for t, t_next in zip(times, times[1:], strict=False):
            x = euler_step(x, fm_target(x0, eps), t, t_next)
        assert torch.allclose(x, x0, atol=1e-5)


def test_cosine_schedule_and_snr_match():
    tau = torch.linspace(0, 1, 11, dtype=torch.float64)
    ab = cosine_alpha_bar(tau)
    assert abs(ab[0].item() - 1.0) < 1e-9 and ab[-1].item() < 1e-6 and torch.all(ab[1:] <= ab[:-1])
    t = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.95], dtype=torch.float64)
    ab_t = cosine_alpha_bar(fm_time_to_ddpm(t))
    assert torch.allclose(torch.sqrt(ab_t / (1 - ab_t)), (1 - t) / t, rtol=1e-6)


def test_ddpm_training_input_matches_what_the_sampler_feeds():
    x0, eps, t = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.tensor([0.1, 0.4, 0.6, 0.9])
    batch = make_training_batch("ddpm", x0, eps, t)
    net_in, timestep = network_input("ddpm", fm_interpolate(x0, eps, t), t)
    assert torch.allclose(batch.x_in, net_in, atol=1e-5)
    assert torch.allclose(batch.timestep, timestep, atol=1e-3)
    assert torch.equal(batch.target, eps)


def _gaussian_posterior(x: torch.Tensor, signal: float, noise: float, mu: float, sigma: float):
    """For x = signal·x0 + noise·ε with x0 ~ N(mu, sigma²): E[x0|x], E[ε|x]."""
    var = signal**2 * sigma**2 + noise**2
    r = x - signal * mu
    return mu + signal * sigma**2 / var * r, noise / var * r


def test_eps_to_v_matches_the_analytic_velocity_for_gaussian_data():
    mu, sigma = 0.3, 0.7
    gen = torch.Generator().manual_seed(0)
    for t_val in (0.1, 0.35, 0.6, 0.85):
        t = torch.tensor([t_val], dtype=torch.float64)
        # x_t drawn from its true marginal, so x̂0 stays inside the clamp range as real data does
        x0 = mu + sigma * torch.randn(1, 1, 16, 16, dtype=torch.float64, generator=gen)
        x_t = fm_interpolate(x0, torch.randn(1, 1, 16, 16, dtype=torch.float64, generator=gen), t)
        # Exact FM velocity of the data at (x_t, t).
        ex0, eeps = _gaussian_posterior(x_t, 1 - t_val, t_val, mu, sigma)
        v_exact = eeps - ex0
        # Exact DDPM ε-predictor queried the way the FM sampler queries a DDPM expert.
        net_in, timestep = network_input("ddpm", x_t, t)
        ab = cosine_alpha_bar(timestep / TIMESTEP_SCALE).item()
        _, eps_hat = _gaussian_posterior(net_in, math.sqrt(ab), math.sqrt(1 - ab), mu, sigma)
        v = velocity_from_output("ddpm", eps_hat, x_t, t)
        assert torch.allclose(v, v_exact, atol=1e-5), t_val
        assert torch.allclose(v_from_eps(x_t, eps_hat, t), v)


def test_vp_input_has_the_forward_process_statistics():
    x0, eps = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    vp = fm_to_vp_input(fm_interpolate(x0, eps, t), t)
    assert torch.allclose(vp, ddpm_interpolate(x0, eps, fm_time_to_ddpm(t).float()), atol=1e-4)
