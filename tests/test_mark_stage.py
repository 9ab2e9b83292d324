"""The mark stage: sharded marking gives the same marks as one process (bit-identical for a seed)
and reports their quality against the originals; shards are idempotent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from skimage.metrics import structural_similarity

from pipeline.config import load_config
from pipeline.data.sources import StoredImages, load_source
from pipeline.stages.contract import Task, stage_for
from pipeline.stages.dag import run_task
from pipeline.stages.mark import load_marked, user_images
from pipeline.store import file_sha256, read_json


def _config(tmp_path: Path, repo: Path, name: str) -> Path:
    tree = yaml.safe_load((repo / "configs" / "tiny.yaml").read_text())
    tree["run_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_shards_match_a_single_process(tmp_path: Path, repo: Path) -> None:
    whole = load_config(_config(tmp_path, repo, "whole"))
    split = load_config(_config(tmp_path, repo, "split"))
    for cfg in (whole, split):
        run_task(cfg, Task("plan"))
    run_task(whole, Task("mark"))
    for shard in (2, 0):
        assert run_task(split, Task("mark", shard=shard, num_shards=3))
    assert not stage_for(split, Task("mark")).path("manifest.json").exists()  # shard 1 still missing
    run_task(split, Task("mark", shard=1, num_shards=3))  # the last shard finishes the stage
    assert stage_for(split, Task("mark")).done()
    users = read_json(Path(whole.run_dir) / "plan" / "users.json")["users"]
    a = load_marked(Path(whole.run_dir) / "mark" / "manifest.json", users)
    b = load_marked(Path(split.run_dir) / "mark" / "manifest.json", users)
    for key in ("user_ids", "sample_ids", "labels"):
        assert np.array_equal(a[key], b[key]), key
    assert np.array_equal(np.stack(list(a["images"])), np.stack(list(b["images"])))
    # two runs with one seed write byte-identical plans and mark summaries, however the marking was split
    for rel in (
        "plan/users.json",
        "plan/train_ids.npz",
        "mark/quality.json",
        "mark/survival.json",
        "mark/marked_examples.png",
    ):
        assert file_sha256(Path(whole.run_dir) / rel) == file_sha256(Path(split.run_dir) / rel), rel
    # each user's quality is that of its marked images against the stored originals, recomputed here
    stored = StoredImages(load_source(split.data).train_images, split.data.max_resolution)
    marked = user_images(b, users)
    quality = {q["user_id"]: q for q in read_json(Path(split.run_dir) / "mark" / "quality.json")["per_user"]}
    assert quality.keys() == {u["user_id"] for u in users}
    for user in users:
        pairs = list(zip(stored.take(user["sample_ids"]), marked[user["user_id"]]))
        mse = np.array([np.mean((o.astype(float) - m.astype(float)) ** 2) for o, m in pairs])
        psnr = 10 * np.log10(255**2 / mse)
        ssim = np.array([structural_similarity(o, m, channel_axis=-1, data_range=255) for o, m in pairs])
        q = quality[user["user_id"]]
        assert (q["psnr_mean"], q["psnr_min"]) == pytest.approx((psnr.mean(), psnr.min())), user["user_id"]
        assert (q["ssim_mean"], q["ssim_min"]) == pytest.approx((ssim.mean(), ssim.min())), user["user_id"]


def test_finished_shard_is_a_no_op(tmp_path: Path, repo: Path) -> None:
    cfg = load_config(_config(tmp_path, repo, "again"))
    run_task(cfg, Task("plan"))
    stage = stage_for(cfg, Task("mark"))
    assert run_task(cfg, Task("mark", shard=0, num_shards=2))
    shard_file = stage.path("shard-0000-of-0002.npz")
    mtime = shard_file.stat().st_mtime_ns
    run_task(cfg, Task("mark", shard=0, num_shards=2))
    assert shard_file.stat().st_mtime_ns == mtime
