"""Router presets by name: a table the command line reads without importing torch or diffusers."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RouterPreset:
    name: str
    hidden: int
    layers: int
    heads: int
    patch: int
    batch_size: int
    lr: float
    warmup_steps: int = 0  # linear LR warm-up

    def to_dict(self) -> dict:
        return asdict(self)


ROUTER_PRESETS: dict[str, RouterPreset] = {
    p.name: p
    for p in (
        RouterPreset("tiny", 128, 4, 4, 4, batch_size=128, lr=1e-3),
        RouterPreset("B/2", 768, 12, 12, 2, batch_size=64, lr=1e-4),
    )
}
