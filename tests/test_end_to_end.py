"""End to end through real ``node.py`` subprocesses on a small Twemoji subset: prepare → train
two experts (FM and DDPM) → router → routed sampling → export → reload, plus resume."""

import json

import numpy as np
from PIL import Image

from data.checkpoint import latest_checkpoint
from data.manifest import load_manifest
from tests.conftest import node


def test_prepare_writes_clusters_manifest_and_contact_sheet(small_run):
    manifest, digest = load_manifest(small_run / "data")
    assert manifest.num_clusters == 2 and len(digest) == 64
    assert [c.objective for c in manifest.clusters] == ["fm", "ddpm"]
    assert (
        sum(c.samples for c in manifest.clusters) + sum(s.samples for c in manifest.clusters for s in c.holdout) == 300
    )
    assert (small_run / "data" / "clusters.png").is_file()
    shard = small_run / "data" / manifest.clusters[0].shards[0].url
    import tarfile

    names = tarfile.open(shard).getnames()
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".txt") for n in names)
    assert any(n.endswith(".json") for n in names)


def test_sample_export_and_reload_give_identical_images(small_run, tmp_path):
    out1 = tmp_path / "a.png"
    proc = node(
        "--role",
        "client",
        "--local",
        "--workdir",
        str(small_run),
        "--steps",
        "4",
        "--seed",
        "3",
        "--output",
        str(out1),
        "red apple",
        "flag: France",
    )
    assert "routing" in proc.stdout
    img = np.asarray(Image.open(out1))
    assert img.ndim == 3 and np.isfinite(img).all() and img.std() > 0

    export = tmp_path / "export"
    node("--role", "export", "--workdir", str(small_run), "--out", str(export))
    index = json.loads((export / "model_index.json").read_text())
    assert {"expert_0", "expert_1", "router", "vae", "text_encoder_name"} <= set(index)
    assert index["_class_name"] == ["pipeline", "DiffswarmPipeline"] and (export / "pipeline.py").is_file()
    assert (export / "expert_0" / "diffusion_pytorch_model.safetensors").is_file()

    out2 = tmp_path / "b.png"
    node(
        "--role",
        "client",
        "--from-export",
        str(export),
        "--steps",
        "4",
        "--seed",
        "3",
        "--output",
        str(out2),
        "red apple",
        "flag: France",
    )
    assert np.array_equal(np.asarray(Image.open(out2)), img)


def test_routing_summary_counts_every_step(small_run, tmp_path):
    proc = node(
        "--role",
        "client",
        "--local",
        "--workdir",
        str(small_run),
        "--steps",
        "5",
        "--mode",
        "top1",
        "--output",
        str(tmp_path / "c.png"),
        "grinning face",
    )
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    served = [int(r.split("│")[4]) for r in rows]  # expert │ objective │ served by │ pairs
    assert sum(served) == 5  # top-1: one expert per (image, step)
    routing = json.loads((tmp_path / "c.json").read_text())
    assert routing["usage"] == served and all(len(step) == 1 for step in routing["per_step"])
    assert all(set(w.values()) == {"local"} for w in routing["where"])


def test_training_resumes_from_the_latest_checkpoint(small_run):
    root = small_run / "checkpoints" / "expert_0"
    before = latest_checkpoint(root)
    node(
        "--role",
        "trainer",
        "--local",
        "--workdir",
        str(small_run),
        "--expert",
        "0",
        "--steps",
        "9",
        "--batch-size",
        "16",
    )
    after = latest_checkpoint(root)
    assert before.step == 6 and after.step == 9
    assert after.meta["samples_seen"] == before.meta["samples_seen"] + 3 * 16
    pos0, pos1 = before.meta["data_position"], after.meta["data_position"]
    assert (pos1["epoch"], pos1["index"]) > (pos0["epoch"], pos0["index"])
    assert (root / "loss.png").is_file()
