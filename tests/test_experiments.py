"""Experiment tables: every row a real pipeline run, the table and the overview written from them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.experiments import defense_notes, load_table, on_base, run_table


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
