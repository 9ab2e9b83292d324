"""W&B logging through Lightning's logger: offline by default, one run per stage with a fixed id, and
the API key never written anywhere in the run directory or the results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import mtrack

from pipeline.config import load_config
from pipeline.stages.contract import stage_for, tasks
from pipeline.stages.dag import run_task
from pipeline.stages.tracking import publish_run

# a setting of each stage's declared config, as its W&B run records it
DECLARED = {
    "plan": b"plan.samples_per_user",
    "mark": b"mark.alpha",
    "write": b"write.num_workers",
    "train": b"train.label_smoothing",
    "audit": b"audit.batch_size",
    "report": b"results_dir",
}
SENTINEL = "mtrack-test-key-0123456789abcdef0123456789abcdef01234567"  # shaped like a 40-character key


@pytest.mark.slow
def test_offline_wandb_run_with_stable_id_and_no_key_on_disk(tmp_path: Path, repo: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    tree = yaml.safe_load((repo / "configs" / "tiny.yaml").read_text())
    tree.update(run_dir=str(tmp_path / "run"), results_dir=str(tmp_path / "results"), wandb={"enabled": True})
    tree["train"].update(epochs=1, arms=["marked"])
    path = tmp_path / "wb.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    for task in tasks(cfg):
        run_task(cfg, task)
    train = next(t for t in tasks(cfg) if t.stage == "train")
    for task in tasks(cfg):  # one offline run per stage
        runs = list((stage_for(cfg, task).dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and any(runs[0].glob("*.wandb")), task.name
    audit = stage_for(cfg, next(t for t in tasks(cfg) if t.stage == "audit")).dir / "wandb"
    (table,) = audit.glob("offline-run-*/files/media/table/users_*.table.json")  # one row per user
    assert len(json.loads(table.read_text())["data"]) == cfg.plan.n_member_users + cfg.plan.n_nonmember_users
    assert b"set_based/auc" in next(audit.glob("offline-run-*/*.wandb")).read_bytes()
    report = stage_for(cfg, tasks(cfg)[-1]).dir / "wandb"
    assert {p.name.split("_0_")[0] for p in report.glob("offline-run-*/files/media/images/*.png")} >= {
        "roc",
        "p_values",
    }
    written = [p for folder in (tmp_path / "run", tmp_path / "results") for p in folder.rglob("*") if p.is_file()]
    assert len(written) > 20
    leaked = [p for p in written if SENTINEL.encode() in p.read_bytes()]
    assert not leaked, f"the W&B API key was written to {leaked}"
    # logging settings are not part of any stage's hash: turning W&B off keeps the run valid
    tree["wandb"] = {"enabled": False}
    path.write_text(yaml.safe_dump(tree))
    assert stage_for(load_config(path), train).done()


@pytest.mark.slow
def test_every_run_carries_its_config_and_a_finished_run_can_be_published(tmp_path: Path, tiny_run: Path) -> None:
    """A run that finished with W&B off is published afterwards (`publish_run`, `mtrack publish`): one
    offline run per stage, each carrying the config its outputs depend on as dotted keys (a dashboard
    groups and filters by them) and the run's labels; the report's run has the audit's numbers and
    the training settings upstream of it."""
    run_dir = tmp_path / "run"
    shutil.copytree(load_config(tiny_run).run_dir, run_dir)
    labels = {"table": "tiny-table", "row": "smoothed", "seed": 3}
    cfg = load_config(
        tiny_run,
        [f"run_dir={run_dir}", "wandb.enabled=true", "wandb.group=tiny-table", f"wandb.labels={json.dumps(labels)}"],
    )
    published = publish_run(cfg)
    assert published == [task.name for task in tasks(cfg)]
    for task in tasks(cfg):
        (log,) = (stage_for(cfg, task).dir / "wandb").glob("offline-run-*/*.wandb")
        data = log.read_bytes()
        assert b"tiny-table/smoothed/3/" + task.name.encode() in data, task.name  # the run's name
        assert b"config_hash" in data and b"smoothed" in data
        assert DECLARED[task.stage] in data, task.name  # a key of the stage's own config, dotted
    train = next(stage_for(cfg, t).dir for t in tasks(cfg) if t.stage == "train")
    assert b"train.defense.mix" in next((train / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
    report = stage_for(cfg, tasks(cfg)[-1]).dir
    report_log = next((report / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
    assert b"set_based/auc" in report_log and b"train.label_smoothing" in report_log  # upstream settings too


def test_publishing_a_run_without_finished_stages_is_one_line(tmp_path: Path, repo: Path) -> None:
    result = mtrack("publish", str(repo / "configs" / "tiny.yaml"), "--set", f"run_dir={tmp_path / 'none'}")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {tmp_path / 'none'}: no finished stage to publish (run it first: mtrack run CONFIG)"
    )
