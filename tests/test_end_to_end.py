"""The whole DAG on the synthetic source, through the command line, as a user runs it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import mtrack

from pipeline.config import load_config
from pipeline.stages.contract import stage_for, tasks
from pipeline.stages.mark import load_marked

pytestmark = pytest.mark.slow

SCHEMA_KEYS = {
    "dataset",
    "n_train",
    "n_member_users",
    "n_nonmember_users",
    "samples_per_user",
    "marked_fraction",
    "test_accuracy",
    "fpr_resolution",
    "seconds",
    "set_based",
    "instance_based",
    "control_unmarked",
}
BLOCK_KEYS = {"auc", "fpr_at_tpr_1", "tpr_at_fpr"}


def test_every_stage_finished_with_its_outputs(tiny_run: Path) -> None:
    cfg = load_config(tiny_run)
    for task in tasks(cfg):
        stage = stage_for(cfg, task)
        assert stage.done(), task.name
        for rel in stage.manifest()["outputs"]:
            assert stage.path(rel).stat().st_size > 0
    run = Path(cfg.run_dir)
    users = json.loads((run / "plan" / "users.json").read_text())["users"]
    marked = load_marked(run / "mark" / "manifest.json", users)
    assert len(marked["images"]) == 24 * 8 and {image.shape for image in marked["images"]} == {(16, 16, 3)}
    losses = np.load(run / "audit-marked" / "losses.npz")
    assert sorted(losses["sample"].tolist()) == sorted(marked["sample_ids"].tolist())
    assert np.isfinite(losses["loss"]).all()
    trained = json.loads((run / "train-marked" / "metrics.json").read_text())
    assert (run / "train-marked" / "checkpoints" / trained["best_val_checkpoint"]).is_file()  # best-val kept


def test_metrics_file_schema(tiny_run: Path) -> None:
    cfg = load_config(tiny_run)
    results = Path(cfg.results_dir)
    for name in (
        "metrics.json",
        "report.md",
        "roc.png",
        "loss_hist.png",
        "p_values.png",
        "classes.png",
        "marked_examples.png",
    ):
        assert (results / name).stat().st_size > 0, name
    metrics = json.loads((results / "metrics.json").read_text())
    assert SCHEMA_KEYS <= metrics.keys()
    assert metrics["n_member_users"] == 4 and metrics["n_nonmember_users"] == 20
    assert metrics["fpr_resolution"] == pytest.approx(1 / 20)
    assert metrics["marked_fraction"] == pytest.approx(8 / 800)
    assert metrics["test_accuracy"] > 0.9  # the synthetic task is learnt
    for block in ("set_based", "instance_based", "control_unmarked"):
        assert BLOCK_KEYS <= metrics[block].keys()
        assert set(metrics[block]["tpr_at_fpr"]) == {"0", "0.0001", "0.001", "0.01"}
        assert set(metrics[block]["tpr_at_fpr_below"]) == {"0.0001", "0.001", "0.01"}
    assert sum(row["n_member_users"] for row in metrics["per_class"].values()) == 4
    assert len(metrics["per_member"]) == 4 and len(metrics["training"]["marked"]) >= 5
    assert set(metrics["seconds"]) >= {"plan", "mark", "write", "train-marked", "train-control"}
    for stage in ("mark", "audit-marked"):  # sharded: the shards' work counts, not only the merge's
        folder = Path(cfg.run_dir) / stage
        merge = json.loads((folder / "manifest.json").read_text())["usage"]["seconds"]
        shards = [json.loads(r.read_text())["usage"]["seconds"] for r in folder.glob("shard-*.json")]
        rounding = 0.0005 * (len(shards) + 2)  # each figure is rounded to the millisecond
        assert shards and metrics["seconds"][stage] == pytest.approx(merge + sum(shards), abs=rounding)
    assert "| set-based, marked model" in (results / "report.md").read_text()


def test_rerun_skips_finished_stages(tiny_run: Path) -> None:
    cfg = load_config(tiny_run)
    before = {t.name: stage_for(cfg, t).manifest()["outputs"] for t in tasks(cfg)}
    result = mtrack("plan", str(tiny_run))
    assert result.returncode == 0 and "skipped" in result.stderr
    assert {t.name: stage_for(cfg, t).manifest()["outputs"] for t in tasks(cfg)} == before


def test_changed_config_is_refused_not_mixed(tiny_run: Path) -> None:
    result = mtrack("mark", str(tiny_run), "--set", "mark.alpha=0.5")
    assert result.returncode == 2
    assert "different config" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _without_marked_audit(tiny_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny run whose marked audit is still to do, and its config."""
    copy = tmp_path / "run"
    shutil.copytree(load_config(tiny_run).run_dir, copy)
    shutil.rmtree(copy / "audit-marked")
    tree = yaml.safe_load(tiny_run.read_text())
    tree["run_dir"] = str(copy)
    config = tmp_path / "copy.yaml"
    config.write_text(yaml.safe_dump(tree))
    return copy, config


def test_sharded_audit_matches_and_checks_coverage(tiny_run: Path, tmp_path: Path) -> None:
    """Three array tasks of the audit give the same losses as one process, each sample exactly once."""
    from pipeline.stages.contract import Task
    from pipeline.stages.dag import run_task
    from pipeline.store import StageError

    cfg = load_config(tiny_run)
    copy, config = _without_marked_audit(tiny_run, tmp_path)
    sharded = load_config(config)
    for shard in (2, 0, 1):
        run_task(sharded, Task("audit", "marked", shard=shard, num_shards=3))
    ours = np.load(copy / "audit-marked" / "losses.npz")
    reference = np.load(Path(cfg.run_dir) / "audit-marked" / "losses.npz")
    order, ref_order = np.lexsort((ours["sample"], ours["user"])), np.lexsort((reference["sample"], reference["user"]))
    assert np.allclose(ours["loss"][order], reference["loss"][ref_order], rtol=1e-5, atol=1e-7)
    sharded_auc = json.loads((copy / "audit-marked" / "metrics.json").read_text())["set_based"]["auc"]
    assert sharded_auc == pytest.approx(
        json.loads((Path(cfg.run_dir) / "audit-marked" / "metrics.json").read_text())["set_based"]["auc"]
    )
    # a shard scored twice (wrong shard count mixed in) is caught at the merge
    stage = stage_for(sharded, Task("audit", "marked"))
    shard_file = stage.path("shard-0000-of-0003.npz")
    scores = dict(np.load(shard_file))
    np.savez(shard_file, **{k: np.concatenate([v, v[:1]]) for k, v in scores.items()})
    from pipeline.stages.audit import merge_scores
    from pipeline.store import read_json as _read

    users = _read(copy / "plan" / "users.json")["users"]
    with pytest.raises(StageError, match="exactly once"):
        merge_scores(stage, [f"shard-{i:04d}-of-0003.npz" for i in range(3)], users)


def test_audit_split_over_processes_scores_every_sample_once(tiny_run: Path, tmp_path: Path) -> None:
    """Two processes started by torchrun (as on two GPUs) each score their own users of each of the
    two shards; the merged losses equal the single-process audit's, with no sample counted twice."""
    import subprocess
    import sys

    cfg = load_config(tiny_run)
    copy, config = _without_marked_audit(tiny_run, tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node=2",
            "-m",
            "pipeline.cli",
            "audit",
            str(config),
            "--arm",
            "marked",
            "--num-shards",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (copy / "audit-marked").glob("shard-*.npz")) == [
        f"shard-{i:04d}-of-0004.npz" for i in range(4)
    ]
    ours, reference = (
        np.load(copy / "audit-marked" / "losses.npz"),
        np.load(Path(cfg.run_dir) / "audit-marked" / "losses.npz"),
    )
    order, ref_order = np.lexsort((ours["sample"], ours["user"])), np.lexsort((reference["sample"], reference["user"]))
    assert len(order) == len(ref_order)
    assert np.array_equal(ours["user"][order], reference["user"][ref_order])
    # torchrun runs each process on one thread (OMP_NUM_THREADS=1): sums round differently, no more
    assert np.allclose(ours["loss"][order], reference["loss"][ref_order], rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def real_images_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny-fmnist.yaml run once through the CLI: the tiny DAG on Fashion-MNIST."""
    folder = tmp_path_factory.mktemp("tiny-fmnist")
    tree = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny-fmnist.yaml").read_text())
    tree.update(
        extends=str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"),
        run_dir=str(folder / "run"),
        results_dir=str(folder / "results"),
    )
    config = folder / "tiny-fmnist.yaml"
    config.write_text(yaml.safe_dump(tree))
    result = mtrack("run", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return config


def test_the_mark_is_what_makes_members_detectable(real_images_run: Path) -> None:
    """The marked model's set-based audit separates member users far better than the same audit of
    the control model, trained on the same data with the members left unmarked."""
    metrics = json.loads((Path(load_config(real_images_run).results_dir) / "metrics.json").read_text())
    marked, control = metrics["set_based"]["auc"], metrics["control_unmarked"]["auc"]
    assert marked >= 0.8 and marked - control >= 0.25, (marked, control)
    assert metrics["mean_user_loss"]["marked"]["member"] < metrics["mean_user_loss"]["marked"]["nonmember"] / 5
