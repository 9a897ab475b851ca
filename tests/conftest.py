"""Shared fixtures: a small Twemoji run prepared and trained through real ``node.py`` subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def node(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python node.py ARGS`` in a subprocess, killed if it outlives ``timeout``."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "node.py"), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"node.py {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """300 Twemoji images, 2 clusters (one FM, one DDPM expert), a few steps each, a router."""
    work = tmp_path_factory.mktemp("run")
    node("--role", "prepare", "--workdir", str(work), "--limit", "300", "--clusters", "2", "--objective", "mixed")
    for k in ("0", "1"):
        node(
            "--role", "trainer", "--local", "--workdir", str(work), "--expert", k, "--steps", "6", "--batch-size", "16"
        )
    node(
        "--role", "trainer", "--local", "--workdir", str(work), "--job", "router", "--steps", "6", "--batch-size", "32"
    )
    return work


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same random state, so a failure reproduces."""
    import torch

    torch.manual_seed(0)
