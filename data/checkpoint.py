"""Checkpoints: a diffusers folder (safetensors) plus our ``meta.json``, identified by one sha256.

Layout of ``<dir>/step_<N>/``::

    model/               save_pretrained() of the weights used for sampling (EMA)
    train_state.safetensors   raw weights + optimizer tensors, to resume training exactly
    meta.json            our metadata, including the sha256 of every other file

The checkpoint's sha256 is the sha256 of ``meta.json``'s bytes: since meta lists every file's
hash, that one digest pins the whole folder (a two-level Merkle tree). Loading re-hashes every
file and refuses a mismatch, so a flipped byte is never loaded. Nothing here unpickles.
A checkpoint's size follows from its network's shapes (:func:`max_checkpoint_bytes`), so a peer
that claims or sends more than that for one is lying.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.manifest import sha256_file

META_NAME = "meta.json"
MODEL_DIR = "model"
TRAIN_STATE = "train_state.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or not what the caller expected."""


@dataclass
class Checkpoint:
    path: Path
    meta: dict
    sha256: str

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR


def _hash_files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != META_NAME
    }


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def optimizer_to_tensors(
    opt: torch.optim.Optimizer, whole: Callable[[torch.Tensor], torch.Tensor] = _to_cpu
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten an optimizer's state into named tensors + JSON-able param groups (no pickle);
    ``whole`` turns each state tensor into the one to save (a sharded one is gathered)."""
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            tensors[f"opt.{pid}.{k}"] = whole(torch.as_tensor(v))
    return tensors, sd["param_groups"]


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    root: Path,
    step: int,
    sampling_model: torch.nn.Module,
    meta: dict,
    train_tensors: dict[str, torch.Tensor] | None = None,
    keep: int = 3,
    keep_steps: Collection[int] = (),
) -> Checkpoint:
    """Write ``root/step_<step>`` atomically (temp folder + rename) and prune old ones: all but the
    last ``keep``, except the steps in ``keep_steps`` (milestones a later comparison needs)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sampling_model.save_pretrained(tmp / MODEL_DIR, safe_serialization=True)
    if train_tensors:
        save_file({k: v.contiguous() for k, v in train_tensors.items()}, str(tmp / TRAIN_STATE))
    full_meta = {**meta, "step": step, "saved_at": time.time(), "files": _hash_files(tmp)}
    raw = json.dumps(full_meta, indent=1, sort_keys=True).encode()
    (tmp / META_NAME).write_bytes(raw)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        if int(old.name.removeprefix("step_")) not in keep_steps:
            shutil.rmtree(old, ignore_errors=True)
    return Checkpoint(final, full_meta, hashlib.sha256(raw).hexdigest())


def max_checkpoint_bytes(network: torch.nn.Module) -> int:
    """An upper bound on the bytes of a checkpoint of ``network`` as the training loop saves it,
    from its tensors' counts and shapes alone: a network built on the ``meta`` device will do.

    A checkpoint holds, in float32 at most: the sampling weights (``model/``, its state dict) and,
    in ``train_state.safetensors``, the raw state dict, one EMA copy and AdamW's two moments of
    every parameter, plus each parameter's step count. The rest is small and bounded: a header
    entry per tensor (its name, dtype, shape and offsets), the model's config.json and meta.json
    (hashes, optimizer groups, a loss curve the loop thins to at most ~4,000 points).
    """
    state = network.state_dict()
    params = list(network.parameters())
    state_numel = sum(t.numel() for t in state.values())
    param_numel = sum(p.numel() for p in params)
    tensors = 2 * len(state) + 4 * len(params)  # entries in the safetensors headers
    data = 4 * (2 * state_numel + 3 * param_numel + len(params))
    # A header entry is ~150 bytes (a name of up to ~60 characters, dtype, shape, offsets); config.json
    # and meta.json are tens of kilobytes (a tiny router's checkpoint fits with 4% to spare).
    return data + 256 * tensors + (1 << 20)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / META_NAME).is_file())


def verify_checkpoint(path: Path, expected_sha256: str | None = None) -> Checkpoint:
    """Check every file against ``meta.json`` (and meta against ``expected_sha256``)."""
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {META_NAME}")
    raw = meta_path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise CheckpointError(f"checkpoint {path} has sha256 {digest[:12]}, expected {expected_sha256[:12]}")
    try:
        meta = json.loads(raw)
        files = dict(meta["files"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {META_NAME}: {e}") from None
    actual = _hash_files(path)
    for name, h in files.items():
        if name not in actual:
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if actual[name] != h:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} does not match its sha256; refusing to load it"
            )
    extra = set(actual) - set(files)
    if extra:
        raise CheckpointError(f"checkpoint {path} holds unlisted files: {sorted(extra)[:3]}")
    return Checkpoint(path, meta, digest)


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest checkpoint under ``root``, verified; ``None`` if there is none."""
    found = list_checkpoints(root)
    return verify_checkpoint(found[-1]) if found else None


def load_train_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    path = ckpt.path / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt.path} has no training state to resume from")
    return load_file(str(path))
