"""The quality report: a representative held-out subset, per-cluster FID, bootstrap intervals, the
oracle row, the monolith at equal wall-clock and the routing diagnostics along the sampling path.

Pure functions are tested on their own (no network, no files); the report end to end on the
``small_run`` fixture through real ``node.py`` subprocesses, trained and evaluated once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint, verify_checkpoint
from data.job_id import JobId
from evaluation.evaluate import (
    OracleRouter,
    RecordingRouter,
    expert_spread,
    interval_end_sd,
    oracle_logits,
    own_cluster_rate,
    proportional_allocation,
)
from evaluation.fid import (
    FeatureStats,
    bootstrap_fids,
    bootstrap_interval,
    fid_from_features,
    frechet_distance,
    stratified_resamples,
)
from router.combine import routing_weights
from router.sampling import SamplerConfig, generate
from tests.conftest import node
from training.monolith import equal_wallclock_steps, keep_checkpoint

# --- the held-out subset ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "n", "expected"),
    [
        ([24, 3], 12, [11, 1]),  # quotas 10.67 / 1.33: the larger remainder gets the extra image
        ([10, 10, 10], 7, [3, 2, 2]),  # equal remainders: the lower cluster id first
        ([100, 1, 1], 5, [3, 1, 1]),  # at least one each, even below the quota
        ([5, 0, 7], 12, [5, 0, 7]),  # everything; an empty cluster gives nothing
    ],
)
def test_proportional_allocation_examples(sizes, n, expected):
    assert proportional_allocation(sizes, n) == expected


def test_proportional_allocation_is_exact_and_within_one_image_of_the_quota():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(1, 60, size=rng.integers(1, 7)).tolist()
        total = sum(sizes)
        n = int(rng.integers(len(sizes), total + 1))
        counts = proportional_allocation(sizes, n)
        assert sum(counts) == n and all(1 <= c <= s for c, s in zip(counts, sizes, strict=True))
        if all(n * s >= total for s in sizes):  # every quota >= 1: the at-least-one rule never binds
            assert all(abs(c - n * s / total) < 1 for c, s in zip(counts, sizes, strict=True))


def test_proportional_allocation_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="--eval-n 30 is more than the 27 held-out images"):
        proportional_allocation([24, 3], 30)
    with pytest.raises(ValueError, match="below the 3 clusters"):
        proportional_allocation([5, 5, 5], 2)


# --- FID from features, the bootstrap ---------------------------------------------------------


def test_fid_from_features_matches_the_covariance_formula():
    rng = np.random.default_rng(3)
    for n1, n2, d in [(30, 40, 6), (9, 12, 40)]:  # more images than dimensions, and fewer
        f1 = rng.normal(size=(n1, d))
        f2 = rng.normal(size=(n2, d)) * 1.5 + 0.3
        a, b = FeatureStats.of(f1), FeatureStats.of(f2)
        assert fid_from_features(f1, f2) == pytest.approx(frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-6)
    assert fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_stratified_resamples_keep_every_clusters_count():
    labels = np.array([0, 1, 0, 2, 0, 1])
    r = stratified_resamples(labels, 50, seed=1)
    assert r.shape == (50, 6)
    assert (labels[r] == labels).all()  # position i always draws from image i's cluster
    assert len(np.unique(r[:, 0])) == 3  # and really resamples (cluster 0 has images 0, 2, 4)
    assert np.array_equal(r, stratified_resamples(labels, 50, seed=1))


def test_bootstrap_pairs_each_real_image_with_its_generated_one():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(20, 8))
    shift = np.arange(8.0) / 4
    resamples = stratified_resamples(np.arange(20) % 2, 40, seed=0)
    # The generated set is the real one shifted: every paired resample has FID = |shift|² exactly,
    # an unpaired one would not.
    boot = bootstrap_fids(real, real + shift, resamples)
    assert np.allclose(boot, (shift**2).sum(), rtol=1e-9)
    with pytest.raises(ValueError, match="one size"):
        bootstrap_fids(real, real[:10], resamples)


def test_bootstrap_interval_is_the_resamples_spread_around_the_estimate():
    boot = np.linspace(10.0, 20.0, 1001)  # mean 15, quantiles 2.5 % / 97.5 %: 10.25 / 19.75
    assert bootstrap_interval(12.0, boot) == pytest.approx((12 - 4.75, 12 + 4.75))
    assert bootstrap_interval(3.0, boot) == pytest.approx((0.0, 3 + 4.75))  # a FID never goes below 0
    assert bootstrap_interval(-1.0, boot - 10.0, floor=None) == pytest.approx((-1 - 4.75, -1 + 4.75))
    skewed = np.concatenate([np.full(900, 10.0), np.linspace(10, 40, 100)])  # a long upper tail stays long
    lo, hi = bootstrap_interval(10.0, skewed)
    assert hi - 10.0 > 10.0 - lo


def test_bootstrap_interval_covers_the_expected_fid_of_a_small_set():
    # Gaussian "features" whose two sets differ by a small shift; FID on n = 30 images is biased far
    # above the true one, and every bootstrap distribution sits above the estimate. The interval
    # must still cover E[FID_30] (estimated from 400 fresh draws) about 95 % of the time.
    rng = np.random.default_rng(5)
    d, n = 16, 30
    draw = lambda: (rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.3)  # noqa: E731
    target = np.mean([fid_from_features(*draw()) for _ in range(400)])
    covered, above = 0, 0
    for k in range(60):
        a, b = draw()
        point = fid_from_features(a, b)
        boot = bootstrap_fids(a, b, stratified_resamples(np.zeros(n, int), 200, k))
        lo, hi = bootstrap_interval(point, boot)
        covered += lo <= target <= hi
        above += boot.mean() > point
    assert above >= 55  # the bias the resamples add, which the percentile interval would keep
    assert covered >= 51  # 0.85 of 60; 0.95 expected


def test_interval_end_sd_estimates_how_much_the_ends_move_between_resample_sets():
    rng = np.random.default_rng(6)
    rows = 40
    # Each row's "bootstrap FIDs" are a skewed distribution; 300 fresh sets of 200 give the truth.
    draw = lambda scale: 100 + scale * rng.gamma(3.0, 1.0, 200)  # noqa: E731
    scales = rng.uniform(2, 6, rows)
    truth = np.sqrt(np.mean([np.var([bootstrap_interval(100.0, draw(s)) for _ in range(300)], 0) for s in scales]))
    estimate = interval_end_sd([(100.0, draw(s)) for s in scales])
    assert estimate == pytest.approx(truth, rel=0.25)
    assert interval_end_sd([(1.0, np.ones(3))]) is None  # too few resamples to split


# --- the oracle, the recorded path, the diagnostics --------------------------------------------


class _Encoder:
    def encode(self, prompts):
        return torch.zeros(len(prompts), 3, 4), torch.ones(len(prompts), 3)


class _Space:
    def decode(self, x):
        return x


class _ConstantExpert:
    """v = value everywhere: after Euler from t = 1 to 0, x moves by −value."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, x_t, t, states, mask, guidance, t_next=None):
        assert states.shape[0] == 2 * x_t.shape[0]  # cond and uncond rows of the same images
        return torch.full_like(x_t, self.value)


def test_oracle_weights_are_one_hot_on_the_label():
    labels = torch.tensor([2, 0, 1, 2])
    probs = torch.softmax(oracle_logits(labels, 3), -1)
    assert torch.equal(probs, torch.nn.functional.one_hot(labels, 3).float())
    assert torch.equal(routing_weights(probs, "top1"), probs)


def test_oracle_router_denoises_each_image_with_its_own_clusters_expert():
    labels = [1, 0, 2, 1, 0]
    experts = {k: _ConstantExpert(float(k + 1)) for k in range(3)}
    cfg = SamplerConfig("top1", 1, steps=5, seed=7)
    out, log = generate(["a"] * 5, OracleRouter(labels, 3), experts, _Encoder(), _Space(), (1, 2, 2), cfg)
    noise = torch.randn((5, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    expected = torch.tensor([-(k + 1.0) for k in labels]).reshape(-1, 1, 1, 1)
    assert torch.allclose(out - noise, expected.expand_as(out), atol=1e-6)
    assert log.usage == [2 * 5, 2 * 5, 1 * 5]  # (image, step) pairs: every step by the label's expert
    with pytest.raises(ValueError, match="holds 5 labels"):
        OracleRouter(labels, 3)(torch.zeros(4, 1, 2, 2), torch.zeros(4))


def test_recording_router_keeps_the_real_sampling_path():
    class Half(torch.nn.Module):  # routes every image to expert 0 with p = 1
        config = type("C", (), {"num_experts": 2})()

        def forward(self, x_t, timestep, text=None):
            return torch.tensor([[0.0, float("-inf")]]).expand(len(x_t), 2)

    rec = RecordingRouter(Half(), keep=2)
    cfg = SamplerConfig("top1", 1, steps=4, seed=3)
    generate(["a"] * 3, rec, {0: _ConstantExpert(2.0), 1: _ConstantExpert(-1.0)}, _Encoder(), _Space(), (1, 2, 2), cfg)
    noise = torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    assert len(rec.path) == 4 and rec.path[0].shape == (2, 1, 2, 2)
    for i, x in enumerate(rec.path):  # x_t at t = 1 − i/4 after i Euler steps of v = 2
        assert torch.allclose(x, noise[:2] - 2.0 * i / 4, atol=1e-6)


def test_own_cluster_rate_per_step():
    labels = [0, 1, 1, 0]
    steps = [
        torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0]]),  # all four right
        torch.tensor([[0.0, 1], [0, 1], [1, 0], [1, 0]]),  # two right
        torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]),  # none (argmax of soft weights)
    ]
    assert own_cluster_rate(steps, labels).tolist() == [1.0, 0.5, 0.0]


def test_expert_spread_is_the_mean_pairwise_l2_distance():
    v = torch.zeros(3, 2, 1, 1, 2)  # 3 experts, 2 images, 2 numbers each
    v[1, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5 from expert 0 on both images
    v[2, 0, 0, 0] = torch.tensor([3.0, 4.0])  # image 0: same as expert 1; image 1: same as expert 0
    dist, norm = expert_spread(v)
    # pairs (0,1): 5, 5; (0,2): 5, 0; (1,2): 0, 5 → mean 10/3. Norms: 0,0, 5,5, 5,0 → mean 15/6.
    assert dist == pytest.approx(10 / 3) and norm == pytest.approx(2.5)
    assert expert_spread(v[:1])[0] == 0.0


# --- the monolith at the experts' step ------------------------------------------------------


def test_equal_wallclock_steps_is_the_slowest_experts_steps():
    assert equal_wallclock_steps({0: 9600, 1: 9600}, 64) == 150
    assert equal_wallclock_steps({0: 9600, 1: 6400, 2: 9601}, 64) == 151  # the longest job, rounded up


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def save_pretrained(self, path, safe_serialization=True):
        Path(path).mkdir(parents=True)
        (Path(path) / "weights.bin").write_bytes(self.w.detach().numpy().tobytes())


def test_a_kept_checkpoint_survives_pruning(tmp_path):
    root, model = tmp_path / "monolith", _Model()
    first = save_checkpoint(root, 6, model, {"kind": "monolith"}, {"x": torch.ones(3)}, keep=1)
    kept = keep_checkpoint(first, tmp_path / "monolith_at_6")
    for step in (8, 10):
        with torch.no_grad():
            model.w += 1
        save_checkpoint(root, step, model, {"kind": "monolith"}, {"x": torch.ones(3)}, keep=1)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000010"]  # step 6 pruned there
    again = verify_checkpoint(kept.path, first.sha256)  # and intact here, every file re-hashed
    assert again.step == 6 and kept.path == tmp_path / "monolith_at_6" / "step_00000006"


# --- the report end to end on the small run ----------------------------------------------------

EVAL_N = 12
STEPS = 4


@pytest.fixture(scope="module")
def report_run(small_run, tmp_path_factory) -> tuple[Path, dict, Path]:
    """The small run with a monolith (checkpoints every 2 steps, so pruning reaches the experts'
    step), evaluated once: (workdir, eval.json, report folder)."""
    work = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(small_run, work, ignore=shutil.ignore_patterns("monolith*"))
    out = node(
        "--role", "trainer", "--local", "--workdir", str(work), "--job", "monolith",
        "--batch-size", "16", "--ckpt-every", "2",
    )  # fmt: skip
    report_dir = work.parent / "eval"
    node(
        "--role", "eval", "--workdir", str(work), "--eval-n", str(EVAL_N), "--steps", str(STEPS),
        "--output", str(report_dir),
    )  # fmt: skip
    assert "monolith: kept step" in out.stdout
    return work, json.loads((report_dir / "eval.json").read_text()), report_dir


def _heldout_sizes(work: Path) -> list[int]:
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    return [sum(s["samples"] for s in c["holdout"]) for c in manifest["clusters"]]


def _expert_samples(work: Path) -> list[int]:
    return [latest_checkpoint(JobId.expert(k).folder(work / "checkpoints")).meta["samples_seen"] for k in (0, 1)]


def _expert_steps(work: Path) -> int:
    """S at the monolith's batch of 16: the experts' step count (the longest, as another test may
    have trained one expert of the shared run further)."""
    return -(-max(_expert_samples(work)) // 16)


def test_the_monolith_keeps_its_checkpoint_at_the_experts_step(report_run):
    work, report, _ = report_run
    s = _expert_steps(work)
    kept = latest_checkpoint(work / "checkpoints" / f"monolith_at_{s}")
    last = latest_checkpoint(work / "checkpoints" / "monolith")
    assert kept.step == s and last.step > s  # the equal-compute budget is K x the experts' steps
    assert not (work / "checkpoints" / "monolith" / f"step_{s:08d}").exists()  # pruned there, kept here
    assert kept.meta["samples_seen"] == s * 16 and last.meta["samples_seen"] == sum(_expert_samples(work))
    assert report["checkpoints"][f"monolith@{s}"]["sha256"] == kept.sha256


def test_the_subset_is_drawn_from_every_cluster_in_proportion(report_run):
    work, report, _ = report_run
    sizes = _heldout_sizes(work)
    assert EVAL_N < sum(sizes)  # a real subset
    drawn = report["heldout_by_cluster"]
    assert sum(drawn.values()) == report["heldout_images"] == EVAL_N
    for c, size in enumerate(sizes):
        assert drawn[str(c)] >= 1
        assert abs(drawn[str(c)] - EVAL_N * size / sum(sizes)) <= 1
    assert "drawn from every cluster in proportion" in (report_run[2] / "eval.md").read_text()


def test_every_row_has_an_interval_and_per_cluster_fids(report_run):
    work, report, _ = report_run
    s = _expert_steps(work)
    names = [r["name"] for r in report["rows"]]
    assert names == ["top-1", "top-2", "threshold", "full", "oracle", "monolith", f"monolith@{s}"]
    drawn = report["heldout_by_cluster"]
    for r in report["rows"]:
        lo, hi = r["fid_ci95"]
        assert 0 <= lo <= hi and np.isfinite(hi) and hi > 0
        assert set(r["fid_by_cluster"]) == set(drawn)
        for c, e in r["fid_by_cluster"].items():
            assert e["n"] == drawn[c]
            if e["n"] >= 2:
                assert np.isfinite(e["fid"]) and e["fid"] > 0 and e["fid_ci95"][0] <= e["fid_ci95"][1]
            else:
                assert e["fid"] is None
    by = {r["name"]: r for r in report["rows"]}
    assert by["oracle"]["expert_forwards_per_image"] == STEPS  # one expert per step, no router
    # The oracle serves each image by its own cluster's expert at every step.
    assert by["oracle"]["usage"] == [drawn[str(k)] * STEPS for k in range(2)]
    assert by[f"monolith@{s}"]["checkpoint_step"] == s
    assert report["bootstrap"]["resamples"] == 200 and report["bootstrap"]["end_sd"] > 0


def test_the_three_comparisons_are_stated(report_run):
    work, report, report_dir = report_run
    s = _expert_steps(work)
    by = {(c["comparison"], c["a"], c["b"]): c for c in report["comparisons"]}
    fids = {r["name"]: r["fid"] for r in report["rows"]}
    for key in [
        ("equal total compute", "top-1", "monolith"),
        ("equal wall-clock on K machines", "top-1", f"monolith@{s}"),
        ("what the router loses", "top-1", "oracle"),
        ("what the experts give", "oracle", "monolith"),
        ("what the experts give at equal steps", "oracle", f"monolith@{s}"),
    ]:
        c = by[key]
        assert c["delta"] == pytest.approx(fids[key[1]] - fids[key[2]])
        assert c["delta_ci95"][0] <= c["delta_ci95"][1]
    md = (report_dir / "eval.md").read_text()
    for text in ("equal total compute", "equal wall-clock on K machines", "what the router loses", "biased upward"):
        assert text in md
    assert f"| monolith@{s} |" in md and "| oracle |" in md


def test_routing_diagnostics_along_the_top1_path(report_run):
    _, report, report_dir = report_run
    r = report["routing_by_step"]
    assert len(r["t"]) == STEPS and r["t"][0] == 1.0 and r["t"] == sorted(r["t"], reverse=True)
    assert r["images"] == EVAL_N and r["distance_images"] == EVAL_N  # fewer than 32: all of them
    for key in ("top1_own_cluster", "expert_distance", "expert_distance_rel"):
        assert len(r[key]) == STEPS
    assert all(0 <= v <= 1 for v in r["top1_own_cluster"])
    assert all(v > 0 for v in r["expert_distance"])  # two differently trained experts disagree
    # The per-cluster rates average to the overall one, weighted by cluster size.
    drawn = report["heldout_by_cluster"]
    for s in range(STEPS):
        mix = sum(drawn[c] * v[s] for c, v in r["top1_own_cluster_by_cluster"].items()) / EVAL_N
        assert mix == pytest.approx(r["top1_own_cluster"][s], abs=1e-3)
    # Top-1's usage agrees with the recorded weights: at each step the share of images sent to expert 0.
    usage = np.array(report["usage_by_noise"]["top-1"]["fraction"])
    assert usage.shape == (STEPS, 2)
    for f in ("routing.png", "fid.png", "samples.png"):
        assert (report_dir / f).stat().st_size > 0


def test_eval_n_beyond_the_heldout_split_is_one_line(small_run, tmp_path):
    total = sum(_heldout_sizes(small_run))
    out = node("--role", "eval", "--workdir", str(small_run), "--eval-n", str(total + 1), check=False)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"error: --eval-n {total + 1} is more than the {total} held-out images of this run"


def test_unknown_row_is_one_line(small_run):
    out = node("--role", "eval", "--workdir", str(small_run), "--eval-rows", "top-1,monolith@x", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown evaluation row(s) ['monolith@x']")


def test_missing_monolith_at_the_experts_step_says_which_command_trains_it(report_run, tmp_path):
    work, _, _ = report_run
    s = _expert_steps(work)
    copy = tmp_path / "run"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns(f"monolith_at_{s}"))
    out = node("--role", "eval", "--workdir", str(copy), "--eval-rows", "top-1,monolith@S", check=False)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no monolith checkpoint at the experts' step {s}")
    assert "--role trainer --local --job monolith" in last


def test_fid_against_the_training_split_with_held_out_beside_and_the_flops_figure(report_run, tmp_path):
    """``--eval-reference train``: generated from training captions, FID against those training
    images and, beside it, against the held-out split; each row's training FLOPs; and the budgets
    summary (FID against FLOPs) read from seed_S/budget_B folders."""
    from evaluation import budgets

    work, _, _ = report_run
    out = tmp_path / "eval" / "seed_0" / "budget_1"
    node(
        "--role", "eval", "--workdir", str(work), "--eval-reference", "train", "--eval-n", "10",
        "--steps", str(STEPS), "--eval-rows", "top-1,oracle,monolith,monolith@S", "--output", str(out),
    )  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    assert report["reference"] == "train" and report["heldout_images"] == 10
    assert report["heldout_reference_images"] == sum(_heldout_sizes(work))
    assert all(r["fid_heldout"] is not None and r["fid_heldout"] > 0 for r in report["rows"])
    flops = report["train_flops"]
    # Same preset, same total samples: the monolith costs what the experts cost; the router adds a little.
    experts_only = flops["monolith"] * sum(_expert_samples(work)) / report["checkpoints"]["monolith"]["samples_seen"]
    assert 1.0 < flops["top-1"] / experts_only < 1.5
    assert "training images" in (out / "eval.md").read_text()
    assert budgets.main([str(tmp_path / "eval")]) == 0
    table = (tmp_path / "eval" / "budgets.md").read_text()
    assert "| 1x | top-1 | 10 |" in table and "| 1x | monolith | 10 |" in table
    assert "| 1x | oracle | 10 |" in table and "| 1x | monolith@S | 10 |" in table
    # the gap split into the router's part and the experts' at equal compute and at equal steps
    s = _expert_steps(work)
    for what, pair in (
        ("what the router loses", "top-1 − oracle"),
        ("the experts at equal compute", "oracle − monolith"),
        ("the experts at equal steps", f"oracle − monolith@{s}"),
    ):
        assert f"| 1x | 0 | {what} | {pair} |" in table, table
    assert (tmp_path / "eval" / "fid_flops.png").stat().st_size > 1000
    assert budgets.main([str(tmp_path / "nothing")]) == 2


def _comparison(a: str, b: str, delta: float) -> dict:
    return {"comparison": "", "a": a, "b": b, "fid_a": 40 + delta, "fid_b": 40.0, "delta": delta,
            "delta_ci95": [delta - 1, delta + 1], "verdict": ""}  # fmt: skip


def test_budgets_state_the_goal_per_seed_and_name_the_seeds_in_the_figure():
    """The goal (top-2 at or below the monolith at equal compute) is its own line of the gap table for
    each seed, with either router; the figure's title says which seeds its points are."""
    from evaluation import budgets
    from evaluation.eval_report import EvalReport

    found = [
        (seed, 4.0, EvalReport.from_dict({"comparisons": [_comparison("top-2", "monolith", 20.0 + seed),
                                                          _comparison("top-2+text", "monolith", -1.5 + seed),
                                                          _comparison("top-2", "monolith@8000", -5.0)]}))
        for seed in (1, 0)
    ]  # fmt: skip
    gaps = budgets.gap(found)
    goal = [(g["seed"], g["a"], g["delta"]) for g in gaps if g["what"].startswith("the goal")]
    assert goal == [(0, "top-2", 20.0), (0, "top-2+text", -1.5), (1, "top-2", 21.0), (1, "top-2+text", -0.5)]
    table = budgets.markdown([], gaps)
    line = "| 4x | 1 | the goal, with the router that reads the prompt | top-2+text − monolith | -0.5 [-1.5, +0.5] |"
    assert line in table, table
    entry = {"budget": 4.0, "row": "top-2", "fids": [60.0], "mean": 60.0, "low": 60.0, "high": 60.0}
    assert budgets.seeds_label([{**entry, "seeds": [1]}]) == "seed 1"
    two = [{**entry, "seeds": [0, 1]}, {**entry, "row": "monolith", "seeds": [0]}]
    assert budgets.seeds_label(two) == "mean over seeds 0, 1, bars: range"
    assert "against the held-out split beside it; seed 1." in budgets.markdown(
        [{**entry, "seeds": [1], "images": 8, "heldout_mean": None, "flops": None}]
    )


def test_one_budget_draws_the_rows_side_by_side_and_several_draw_fid_against_flops():
    """With one budget every point of FID against FLOPs would sit on one vertical line: the figure
    then shows each row's FID side by side; with two budgets it is DDM's figure."""
    from evaluation import budgets

    def entry(row: str, budget: float, fid: float) -> dict:
        flops = budget * (1e13 if row == "monolith@S" else 4e13)
        return {"budget": budget, "row": row, "seeds": [0], "mean": fid, "low": fid - 1, "high": fid + 1,
                "flops": flops}  # fmt: skip

    one = [entry("monolith", 4.0, 45.0), entry("top-2", 4.0, 67.0), entry("monolith@S", 4.0, 73.0)]
    fig = budgets.figure(one)
    ax = fig.axes[0]
    rows = ["top-2", "monolith", "monolith at the experts' steps"]
    assert [t.get_text() for t in ax.get_yticklabels()] == rows
    assert ax.get_xlabel().startswith("FID") and "4x" in ax.get_title()
    fig = budgets.figure(one + [entry("monolith", 2.0, 70.0), entry("top-2", 2.0, 90.0)])
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylabel().startswith("FID")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == rows


def test_labels_are_drawn_with_a_font_that_has_accents():
    """Twemoji's names have accents ("flag: St. Barthélemy"): the label font draws them."""
    from PIL import Image, ImageDraw, ImageFont

    from data.fonts import label_font

    font = label_font()
    assert isinstance(font, ImageFont.FreeTypeFont)

    def ink(text: str) -> tuple[int, int, int, int] | None:
        im = Image.new("L", (40, 30), 0)
        ImageDraw.Draw(im).text((5, 5), text, fill=255, font=font)
        return im.getbbox()

    e, acute, missing = ink("e"), ink("é"), ink("\ue000")  # a private-use code point: no glyph
    assert acute is not None and acute[1] < e[1], "the accent stands above the letter"
    assert acute != missing
