"""diffswarm from Python: :class:`DiffswarmPipeline` samples with K experts and a router, held
here (an export or a run's checkpoints) or served by a swarm.

    from diffswarm import DiffswarmPipeline

    pipe = DiffswarmPipeline.from_pretrained("exports/demo")
    pipe("red apple").images[0].save("red_apple.png")
"""

from diffswarm.pipeline import DiffswarmOutput, DiffswarmPipeline

__all__ = ["DiffswarmOutput", "DiffswarmPipeline"]
