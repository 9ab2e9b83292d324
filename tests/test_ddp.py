"""Two-process DDP training (gloo, CPU) on a JPEG image folder through FFCV, launched as a user does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench.common import write_jpeg_folder
from pipeline.config import load_config
from pipeline.stages.contract import Task, stage_for
from pipeline.stages.dag import run_task
from pipeline.store import read_json

pytestmark = pytest.mark.slow

N_TRAIN, BATCH = 40, 8


def test_two_ranks_train_disjoint_shards_and_resume(tmp_path: Path, repo: Path) -> None:
    root = tmp_path / "folder"
    write_jpeg_folder(root, "train", n_classes=4, per_class=16, sizes=((20, 16), (16, 24)))
    write_jpeg_folder(root, "val", n_classes=4, per_class=2, sizes=((16, 16),), seed=1)
    tree = {
        "run_dir": str(tmp_path / "run"),
        "results_dir": str(tmp_path / "results"),
        "data": {
            "source": "imagefolder",
            "root": str(root),
            "image_size": 16,
            "n_train": N_TRAIN,
            "clean_write_mode": "proportion",
        },
        "plan": {"n_member_users": 2, "n_nonmember_users": 2, "samples_per_user": 2},
        "train": {
            "width": 4,
            "epochs": 2,
            "batch_size": BATCH,
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "precision": "32-true",
            "num_workers": 1,
            "threads": 1,
            "augment": "flip",
            "record_samples": True,
            "schedule": "constant",
        },
    }
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(tree))
    cfg = load_config(config)
    for stage in ("plan", "mark", "write"):
        run_task(cfg, Task(stage))
    for arm in ("marked", "control"):
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "train", str(config), "--arm", arm],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, result.stderr[-3000:]

    # both arms read the one training file: the marked arm each member's marked record, the control
    # arm the clean one, in the same order; the two ranks never share a record
    users = read_json(tmp_path / "run" / "plan" / "users.json")["users"]
    owner = {sid: u["user_id"] for u in users if u["role"] == "member" for sid in u["sample_ids"]}
    train_ids = set(np.load(tmp_path / "run" / "plan" / "train_ids.npz")["train_ids"].tolist())
    per_rank_steps = (N_TRAIN // 2) // BATCH  # DistributedSampler halves the set, then full batches only
    order = {}
    for arm in ("marked", "control"):
        folder = stage_for(cfg, Task("train", arm)).path("seen")
        for epoch in range(2):
            seen = [np.load(folder / f"rank{rank}-epoch{epoch}.npz") for rank in (0, 1)]
            assert [len(s["sample"]) for s in seen] == [per_rank_steps * BATCH] * 2
            assert not set(seen[0]["sample"]) & set(seen[1]["sample"]), (
                f"epoch {epoch}: ranks trained on the same samples"
            )
            assert set(seen[0]["sample"]) | set(seen[1]["sample"]) <= train_ids
            for s in seen:
                expected = [owner.get(int(sid), -1) if arm == "marked" else -1 for sid in s["sample"]]
                assert s["user"].tolist() == expected, f"{arm}: a member's record is not the arm's"
            order[arm, epoch] = [s["sample"].tolist() for s in seen]
    assert any(sid in owner for rank in order["marked", 0] for sid in rank)  # members were in the batches
    assert all(order["marked", epoch] == order["control", epoch] for epoch in range(2))  # same images, same order
    stage = stage_for(cfg, Task("train", "marked"))
    metrics = read_json(stage.path("metrics.json"))
    checkpoint = torch.load(stage.path("checkpoints") / "last.ckpt", map_location="cpu", weights_only=False)
    assert metrics["global_step"] == checkpoint["global_step"] == 2 * per_rank_steps

    # the DDP checkpoint resumes at its step: one more epoch on one process continues from there
    import lightning as L

    from pipeline.stages.train import arm_indices
    from pipeline.training.module import BetonData, Classifier

    class FirstStep(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            self.step = trainer.global_step

    write = read_json(tmp_path / "run" / "write" / "manifest.json")
    single = cfg.train.model_copy(update={"devices": 1, "strategy": "auto", "epochs": 3})
    module = Classifier(
        single.arch, write["num_classes"], single.width, write["mean"], write["std"], single.model_dump(mode="json")
    )
    first = FirstStep()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        callbacks=[first],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    written = tmp_path / "run" / "write"
    trainer.fit(
        module,
        datamodule=BetonData(
            written / "train.beton",
            written / "test.beton",
            single,
            seed=0,
            indices=arm_indices(written / "arms.npz", "marked"),
        ),
        ckpt_path=str(stage.path("checkpoints") / "last.ckpt"),
    )
    assert first.step == 2 * per_rank_steps
    assert trainer.global_step == 2 * per_rank_steps + N_TRAIN // BATCH
