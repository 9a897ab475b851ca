"""Where a network runs and in which precision: device and precision choice, autocast, TF32.

Weights stay fp32 (the optimizer's master copy and the EMA are fp32); ``bf16`` runs the forward
and backward passes under autocast, which is what the tensor cores of current GPUs are fast at.
CPU autocast supports bf16 as well, so the same code path is tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str = "") -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine has; "" picks cuda when there is one."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device takes cpu, cuda or cuda:N; got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device takes cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``; "" picks bf16 on CUDA and fp32 on the CPU (where bf16 is slower)."""
    if not name:
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise ValueError(f"--precision takes {' or '.join(PRECISIONS)}; got {name!r}")
    return name


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """bf16 autocast for ``precision == "bf16"``; a no-op for fp32."""
    device = torch.device(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def enable_fast_matmul(device: torch.device) -> None:
    """TF32 for the fp32 matmuls and convolutions that remain (outside autocast, or in fp32 runs)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
