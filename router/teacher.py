"""The routed ensemble as a teacher: the velocity a distilled student learns to predict.

At (x_t, t, prompt) the router picks the top-k experts (the router that reads the prompt, when the
set has one), each selected expert predicts its conditional velocity (guidance off: the student
keeps classifier-free guidance of its own, by learning the empty prompt's velocity too), and the
target is their routed sum, v = Σ_k w_k v_k, as at one step of routed sampling (DDM §3.6 distils
its experts the same way). Experts of either objective answer in velocity
(:func:`experts.objectives.velocity_from_output`), so FM and DDPM experts teach one FM student.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from experts.objectives import TIMESTEP_SCALE, network_input, velocity_from_output
from experts.presets import expert_forward
from router.combine import routing_weights
from router.network import pool_text


@dataclass
class Teacher:
    """The routed ensemble's velocity at given points, in fp32, without gradients."""

    router: torch.nn.Module
    experts: dict[int, tuple[torch.nn.Module, str]]  # k → (network, objective)
    k: int = 2
    forwards: int = 0  # expert forwards run so far, one per sample per selected expert

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """v (B, C, H, W) at ``x_t`` (B, C, H, W), ``t`` (B,) in [0, 1], for the prompts' token
        states (B, L, D) and mask (B, L)."""
        probs = torch.softmax(self.router(x_t, TIMESTEP_SCALE * t, pool_text(states, mask)).float(), dim=-1)
        w = routing_weights(probs, "topk", self.k)
        v = torch.zeros_like(x_t, dtype=torch.float32)
        for k, (model, objective) in self.experts.items():
            rows = (w[:, k] > 0).nonzero().flatten()
            if len(rows) == 0:
                continue
            x, tt = x_t[rows], t[rows]
            net_in, timestep = network_input(objective, x, tt)
            out = expert_forward(model, net_in, timestep, states[rows], mask[rows]).float()
            v[rows] += w[rows, k].reshape(-1, 1, 1, 1) * velocity_from_output(objective, out, x, tt)
            self.forwards += len(rows)
        return v

    def to(self, device: str | torch.device) -> Teacher:
        self.router.to(device)
        for model, _ in self.experts.values():
            model.to(device)
        return self

    @classmethod
    def from_checkpoints(cls, ckpt_root: Path, k: int = 2) -> Teacher:
        """The latest experts and router under ``ckpt_root`` (``expert_K/``, ``router/``)."""
        from diffusers import PixArtTransformer2DModel

        from router.ensemble import load_checkpoints, load_router

        found, _ = load_checkpoints(Path(ckpt_root))
        router, _ = load_router(Path(ckpt_root), {j: ck.meta for j, ck in found.items()})
        load = PixArtTransformer2DModel.from_pretrained
        experts = {j: (load(c.model_dir, low_cpu_mem_usage=False), c.meta["objective"]) for j, c in found.items()}
        for model, _ in experts.values():
            model.eval().requires_grad_(False)
        router.requires_grad_(False)
        return cls(router, experts, k)
