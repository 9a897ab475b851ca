"""The result of one ``--role eval``, as a dataclass: what ``eval.json`` holds (a key per field),
what ``eval.md`` is written from, and what ``evaluation.budgets`` reads back. No torch here: the
budget summary reads reports without loading any model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class EvalReport:
    """What one evaluation measured; ``eval.json`` holds it as a dict, a key per field."""

    run: str  # the run's manifest sha256
    reference: str  # "holdout" or "train": the real images the FIDs are against
    heldout_images: int  # images generated (one per reference caption) and compared
    heldout_by_cluster: dict[str, int]  # cluster → images drawn from it
    heldout_available_by_cluster: dict[str, int]  # cluster → images it has in the reference split
    heldout_reference_images: int | None  # against the training split: the held-out images beside it
    steps: int
    guidance: float
    tau: float
    seed: int
    bootstrap: dict  # resamples, the method, and how far an interval's ends move between draws
    checkpoints: dict[str, dict]  # job → its step, samples seen and sha256
    train_flops: dict[str, float | None]  # row → training FLOPs behind it
    rows: list[dict]  # a Row each, as a dict
    comparisons: list[dict]  # paired differences between rows, with intervals and a verdict
    router_accuracy: dict  # the router's top-1 accuracy by noise level
    second_router_accuracy: dict | None = None  # the same for the router of the +text / +xt rows
    second_router: dict | None = None  # its step, sha256 and preset
    usage_by_noise: dict | None = None  # row → which experts were selected at each noise level
    routing_by_step: dict | None = None  # along the top-1 path: own-cluster picks, expert disagreement

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        """A report read back from eval.json (older reports name the second router text_router)."""
        d = {"second_router": d.get("text_router"), "second_router_accuracy": d.get("text_router_accuracy"), **d}
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})  # what an older report lacks is None
