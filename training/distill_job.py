"""The distill job: one network trained on the routed ensemble's velocity (``router.teacher``).

x_t is drawn from the forward process on the run's data, over all clusters in proportion (as the
monolith's batches), at the experts' training times; the target is the teacher's velocity at that
point for the sample's prompt. ~10 % of the prompts are dropped to "" for the student and the
teacher alike, so the student learns the ensemble's unconditional velocity too and keeps a
classifier-free guidance of its own. The student is an FM network of the run's expert preset (or
another preset); it starts from scratch, or from the expert whose weights already match the
teacher best (``init="expert"``).
"""

from __future__ import annotations

import torch

from data.manifest import Manifest
from experts.objectives import TIMESTEP_SCALE, fm_interpolate
from experts.presets import ExpertPreset, expert_forward
from experts.text_encoder import TextEncoder
from router.teacher import Teacher
from training.loop import TrainConfig
from training.monolith import MonolithJob

DISTILL = "distill"
INITS = ("scratch", "expert")


class DistillJob(MonolithJob):
    """Train a student of ``preset`` to predict ``teacher``'s velocity on every cluster's data."""

    def __init__(
        self,
        manifest: Manifest,
        manifest_sha256: str,
        encoder: TextEncoder,
        space_name: str,
        encode_space,
        cfg: TrainConfig,
        teacher: Teacher,
        teacher_hashes: dict[str, str],
        preset: ExpertPreset | None = None,
    ) -> None:
        super().__init__(manifest, manifest_sha256, encoder, space_name, encode_space, cfg, preset)
        self.objective = "fm"  # it predicts the ensemble's velocity
        self.name = "distill"
        self.teacher, self.teacher_hashes = teacher, dict(teacher_hashes)

    def loss(self, batch, generator: torch.Generator) -> torch.Tensor:
        x0, noise, t, states, mask = self.draw(batch, generator)  # as an expert draws: same order
        x_t = fm_interpolate(x0, noise, t)
        target = self.teacher(x_t, t, states, mask)
        pred = expert_forward(self.model, x_t, TIMESTEP_SCALE * t, states, mask)
        return torch.nn.functional.mse_loss(pred.float(), target)

    def start_from_expert(self, probe_batch, generator_seed: int = 0) -> int | None:
        """Copy the weights of the FM expert (of the student's preset) whose velocity is nearest the
        teacher's on ``probe_batch``; returns its index (None if no expert fits)."""
        best, best_loss = None, float("inf")
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        for k, (model, objective) in self.teacher.experts.items():
            if objective != "fm" or model.config.num_layers != self.model.config.num_layers:
                continue
            try:
                self.model.load_state_dict(model.state_dict())
            except RuntimeError:  # another shape of network
                continue
            with torch.no_grad():
                loss = self.loss(probe_batch, torch.Generator().manual_seed(generator_seed)).item()
            if loss < best_loss:
                best, best_loss = k, loss
        if best is None:
            self.model.load_state_dict(state)
        else:
            self.model.load_state_dict(self.teacher.experts[best][0].state_dict())
        return best

    def start_from_nearest_expert(self) -> str:
        """A new student's start: the weights of the expert nearest the teacher on the first batch
        of the run's data (every process of an island draws the same one). Returns what it did, in words."""
        from data.streaming import DataPosition

        k = self.start_from_expert(next(iter(self.batches(DataPosition()))))
        if k is None:
            return "distill: starting from scratch (no expert of the student's shape and objective)"
        return f"distill: starting from expert {k}'s weights (the nearest to the teacher)"

    def meta(self) -> dict:
        return super().meta() | {"kind": DISTILL, "objective": "fm", "teacher": self.teacher_hashes}
