"""Experiment tables: every row a real pipeline run, the table and the overview written from them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.experiments import defense_notes, load_table, on_base, planned_rows, run_table


def _table(folder: Path, repo: Path, **changes: object) -> Path:
    spec = {"table": "tiny-ablation", "title": "Tiny ablation", "base": str(repo / "configs" / "tiny.yaml"),
            "claim": "both parts of the mark help", "set": {"train.arms": ["marked"], "train.epochs": 1},
            "rows": [{"name": "stripes + noise"}, {"name": "none", "set": {"mark.noise": "none", "mark.alpha": 1.0}}]}
    spec.update(changes)
    path = folder / "table.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_table_runs_each_row_and_writes_results(tmp_path: Path, repo: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows = run_table(_table(tmp_path, repo), results=tmp_path / "results")
    assert [r["name"] for r in rows] == ["stripes + noise", "none"]
    saved = json.loads((tmp_path / "results" / "tiny-ablation" / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["claim"] == "both parts of the mark help"
    marked, unmarked = rows
    assert marked["psnr"] < 40 < unmarked["psnr"]  # the unmarked row really left the images alone
    report = json.loads((tmp_path / marked["run_dir"] / "results" / "metrics.json").read_text())
    assert marked["auc"] == report["set_based"]["auc"]  # the row is its run's report
    assert marked["tpr_at_fpr_below_0.001"] == report["set_based"]["tpr_at_fpr_below"]["0.001"]
    assert marked["largest_member_p_value"] >= marked["smallest_possible_p_value"]
    table = (tmp_path / "results" / "tiny-ablation" / "README.md").read_text()
    assert "| stripes + noise |" in table and "| none |" in table
    overview = (tmp_path / "results" / "README.md").read_text()
    assert "## Tiny ablation\n\nPaper: both parts of the mark help. Ours ([table](tiny-ablation/README.md))" in overview
    assert overview.count("- none: AUC") == 1
    assert (tmp_path / unmarked["run_dir"] / "report" / "manifest.json").exists()
    again = run_table(_table(tmp_path, repo, table="same-rows", title="Same rows",
                             averages={"both rows": ["stripes + noise", "none"]}), results=tmp_path / "results")
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in rows] and again[1]["auc"] == unmarked["auc"]
    overview = (tmp_path / "results" / "README.md").read_text()
    assert overview.count("## Tiny ablation") == 1 and overview.count("- none: AUC") == 2  # both tables listed
    (mean,) = json.loads((tmp_path / "results" / "same-rows" / "results.json").read_text())["averages"]
    assert mean["rows"] == 2 and mean["auc"] == pytest.approx((marked["auc"] + unmarked["auc"]) / 2)
    assert f"- mean over both rows (2 runs): AUC {mean['auc']:.3f}" in overview
    assert "| both rows | 2 |" in (tmp_path / "results" / "same-rows" / "README.md").read_text()


def test_table_errors_name_the_file_and_key(tmp_path: Path, repo: Path) -> None:
    with pytest.raises(ConfigError, match=r"table.yaml: rows\.0\.name"):
        load_table(_table(tmp_path, repo, rows=[{"set": {}}]))
    with pytest.raises(ConfigError, match="not found"):
        load_table(tmp_path / "missing.yaml")


def test_averages_must_name_rows_of_the_table(tmp_path: Path, repo: Path) -> None:
    with pytest.raises(ConfigError, match="averages 'all': no row named 'missing'"):
        load_table(_table(tmp_path, repo, averages={"all": ["none", "missing"]}))


def test_a_bad_row_fails_before_any_row_runs(tmp_path: Path, repo: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = [{"name": "fine"}, {"name": "typo", "set": {"train.defence.mix": "mixup"}}]
    with pytest.raises(ConfigError, match="row 'typo'.*defence"):
        run_table(_table(tmp_path, repo, rows=bad), results=tmp_path / "results")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_defense_notes_say_what_each_countermeasure_did() -> None:
    assert defense_notes({"train_loss": 0.1}) == ""
    notes = defense_notes({"dp_epsilon": 7.123, "sparsity": 0.5, "stopped_epoch": 12,
                           "outliers": {"dropped": 100, "marked": 100, "marked_dropped": 37}})
    assert notes == ("DP epsilon 7.12; 50% of weights zero; filter dropped 100 images, 37 of 100 marked; "
                     "stopped after 12 epochs")


def test_a_table_runs_on_another_base_config_into_its_own_folder(tmp_path: Path, repo: Path) -> None:
    table = load_table(_table(tmp_path, repo, title="Tiny ablation (default setting)"))
    other = on_base(table, str(repo / "configs" / "cifar10.yaml"))
    assert other.table == "tiny-ablation-cifar10" and other.title == "Tiny ablation (cifar10 wrn28-4)"
    assert other.rows == table.rows and other.set == table.set


def _jpeg_base(folder: Path, repo: Path) -> Path:
    """configs/demo.yaml with every image stored as JPEG at its own size (longer side 24 px)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "demo-jpeg.yaml"
    base.write_text(yaml.safe_dump({"extends": str(repo / "configs" / "demo.yaml"), "name": "demo jpeg",
                                    "data": {"clean_write_mode": "jpg", "max_resolution": 24},
                                    "train": {"resolution": 24}}))
    return base


def test_every_table_validates_on_a_base_with_jpeg_storage(tmp_path: Path, repo: Path) -> None:
    base = _jpeg_base(tmp_path, repo)
    tables = sorted((repo / "configs" / "experiments").glob("*.yaml"))
    assert tables
    for path in tables:
        table, base_file, runs = planned_rows(path, str(base))
        assert base_file == str(base.resolve()) and table.table.endswith("-demo-jpeg")
        own = {folder for _, folder, _, _ in planned_rows(path)[2]}
        assert runs and not own & {folder for _, folder, _, _ in runs}  # never mixed with the demo's own runs
        for _, _, _, cfg in runs:
            assert cfg.data.clean_write_mode == "jpg" and cfg.data.max_resolution == 24


@pytest.mark.slow
def test_a_table_runs_on_an_image_folder_stored_as_jpeg(tmp_path: Path, repo: Path, monkeypatch) -> None:
    """The whole DAG on images of varying size stored as JPEG: marked at their stored size, trained
    on random-resized crops, audited on the evaluation crop, and the storage shown in the tables."""
    from bench.common import write_jpeg_folder

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "folder"
    write_jpeg_folder(root, "train", n_classes=2, per_class=20, sizes=((40, 30), (24, 36), (18, 22)), seed=0)
    write_jpeg_folder(root, "val", n_classes=2, per_class=4, sizes=((30, 30),), seed=1)
    base = tmp_path / "folder-jpeg.yaml"
    base.write_text(yaml.safe_dump({
        "name": "folder jpeg",
        "data": {"source": "imagefolder", "root": str(root), "image_size": 16, "n_train": 24, "max_resolution": 24,
                 "clean_write_mode": "jpg", "jpeg_quality": 75},
        "plan": {"n_member_users": 2, "n_nonmember_users": 4, "samples_per_user": 2},
        "mark": {"examples_users": 2},
        "train": {"width": 4, "batch_size": 8, "resolution": 16, "augment": "none", "num_workers": 1},
        "audit": {"batch_size": 8, "num_workers": 1}}))
    rows = run_table(_table(tmp_path, repo, rows=[{"name": "stripes + noise"}]), results=tmp_path / "results",
                     base=str(base))
    (row,) = rows
    assert row["notes"].startswith("members' images 100% JPEG q75, noise part kept ")
    assert row["notes"] in (tmp_path / "results" / "tiny-ablation-folder-jpeg" / "README.md").read_text()
    report = (tmp_path / row["run_dir"] / "results" / "report.md").read_text()
    assert "100% of the member users' training images as JPEG (quality 75)" in report
    assert "| as stored by this run |" in report
    losses = np.load(tmp_path / row["run_dir"] / "audit-marked" / "losses.npz")
    assert len(losses["loss"]) == 6 * 2 and np.isfinite(losses["loss"]).all()
