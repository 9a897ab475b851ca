"""Errors a user can cause end in one clear line on stderr and a non-zero exit."""

import shutil

import pytest

from tests.conftest import node


def _one_line_error(proc, pattern: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert pattern in lines[-1], lines[-1]


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--role", "prepare", "--source", "nowhere-source"], "unknown source"),
        (["--role", "prepare", "--clusters", "1"], "at least 2"),
        (["--role", "prepare", "--balance", "0.5"], "--balance must be 0"),
        (["--role", "prepare", "--embed", "pixels"], "--embed must be image"),
        (["--role", "prepare", "--embed", "image:/no/such/weights.safetensors@ViT-B-32", "--limit", "8"], "not found"),
        (["--role", "prepare", "--source", "folder:/does/not/exist"], "not found"),
        (["--role", "client", "--local", "   "], "empty prompt"),
        (["--role", "trainer", "--local", "--expert", "0", "--steps", "1"], "no manifest"),
        (["--role", "server", "--expert", "0", "--device", "nonsense"], "--device takes cpu, cuda or cuda:N"),
        (["--role", "server", "--expert", "0", "--device", "cuda:99"], "--device cuda:99: this machine has"),
        (["--role", "trainer", "--run", "demo"], "--run takes NAME@FINGERPRINT"),
        (["--role", "server", "--expert", "0", "--run", "demo@xyz"], "--run takes NAME@FINGERPRINT"),
        (["--role", "prepare", "--serve", "--run", "a b"], "a run name has"),
        (["--role", "prepare", "--serve", "--allow", "/does/not/exist.txt"], "cannot read the allowlist"),
    ],
)
def test_bad_arguments(tmp_path, args, pattern):
    _one_line_error(node(*args, "--workdir", str(tmp_path), check=False, timeout=120), pattern)


def test_missing_checkpoints(tmp_path):
    _one_line_error(
        node("--role", "client", "--local", "--workdir", str(tmp_path), "a red apple", check=False),
        "no router checkpoint",
    )


def test_debug_shows_the_traceback_the_one_line_error_hides(tmp_path):
    args = ("--role", "export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x"))
    _one_line_error(node(*args, check=False), "no router checkpoint")
    proc = node(*args, "--debug", check=False)
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
    assert "no router checkpoint" in proc.stderr.strip().splitlines()[-1]


def test_unknown_expert(small_run):
    proc = node(
        "--role", "trainer", "--local", "--workdir", str(small_run), "--expert", "7", "--steps", "1", check=False
    )
    _one_line_error(proc, "unknown expert 7")


def test_corrupted_checkpoint_is_refused_and_nothing_is_lost(small_run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(small_run, work)
    ckpt = sorted((work / "checkpoints" / "expert_1").glob("step_*"))[-1]
    weights = ckpt / "model" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = node("--role", "client", "--local", "--workdir", str(work), "a red apple", check=False)
    _one_line_error(proc, "corrupt")
    proc = node("--role", "trainer", "--local", "--workdir", str(work), "--expert", "1", "--steps", "20", check=False)
    _one_line_error(proc, "corrupt")
    assert weights.read_bytes() == bytes(data)  # the bad checkpoint is left for the user to inspect
