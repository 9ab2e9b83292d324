"""W&B logging through Lightning's logger: offline by default, one run per stage with a fixed id."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import load_config
from pipeline.dag import Task, run_task, stage_for


def test_offline_wandb_run_with_stable_id(tmp_path: Path, repo: Path) -> None:
    tree = yaml.safe_load((repo / "configs" / "tiny.yaml").read_text())
    tree.update(run_dir=str(tmp_path / "run"), wandb={"enabled": True})
    tree["train"].update(epochs=1, arms=["marked"])
    path = tmp_path / "wb.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    for task in (Task("plan"), Task("mark"), Task("write"), Task("train", "marked")):
        run_task(cfg, task)
    runs = list((stage_for(cfg, Task("train", "marked")).dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    # logging settings are not part of any stage's hash: turning W&B off keeps the run valid
    tree["wandb"] = {"enabled": False}
    path.write_text(yaml.safe_dump(tree))
    assert stage_for(load_config(path), Task("train", "marked")).done()
