"""Sharded training within an island (``--shard``): FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under DDP every rank holds the whole network, its gradients, the AdamW moments and the EMA
(20 bytes per parameter before activations: 11.3 GiB for XL/2, measured). Sharded, each rank holds
1/N of each, and a block's full weights exist only while that block computes. Gradients are
averaged over the ranks as under DDP, so a sharded island follows the same trajectory.

Checkpoints stay the single-process format: every rank gathers the full tensors (a collective),
rank 0 writes them. A resume gives every rank the full tensors and each keeps its own shard, so a
checkpoint moves freely between one process, a DDP island and a sharded one, of any size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` (on ``device``) in place over the island's ranks: each block of every
    ``ModuleList`` (the transformer blocks) is one unit, gathered for its own forward and
    backward only; the rest (embeddings, head) is one more."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh puts each rank on its current GPU
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    with torch.no_grad():  # every rank starts from rank 0's weights, as DDP does
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    units: list[str] = []  # the outermost blocks only: a block's inner lists shard with it
    for name, module in model.named_modules():
        inside = any(name.startswith(u + ".") for u in units)
        if isinstance(module, torch.nn.ModuleList) and not inside:
            for i, block in enumerate(module):
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
                    units.append(f"{name}.{i}")
    fully_shard(model, mesh=mesh)
    return model


def full(t: torch.Tensor, keep: bool = True) -> torch.Tensor:
    """``t`` whole on the CPU. For a shard every rank must call this, in the same order; the ranks
    that write nothing pass ``keep=False`` and get an empty tensor (no host copy)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True) if keep else t.new_empty(0)


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor (from a checkpoint) laid out as ``ref``: this rank's shard of it when ``ref``
    is sharded (every rank holds the same whole tensor, so no communication), else on its device."""
    if isinstance(ref, DTensor):
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"a saved tensor of shape {tuple(value.shape)} does not fit {tuple(ref.shape)}")
        local = value.to(ref.to_local().device, dtype=ref.dtype)
        return distribute_tensor(local, ref.device_mesh, ref.placements, src_data_rank=None)
    return value.to(ref.device, copy=True)


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of whole tensors: lay each parameter-shaped state (AdamW's
    moments) out as its parameter is; scalar states (the step count) stay as they are."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = opt.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and tuple(v.shape) == tuple(p.shape):
                    state[k] = like(v, p)
