"""Experiment tables: every row a real pipeline run, the table and the overview written from them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.experiments import load_table, run_table


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
    assert 0 <= marked["auc"] <= 1 and marked["largest_member_p_value"] >= marked["smallest_possible_p_value"]
    table = (tmp_path / "results" / "tiny-ablation" / "README.md").read_text()
    assert "| stripes + noise |" in table and "| none |" in table
    overview = (tmp_path / "results" / "README.md").read_text()
    assert "## Tiny ablation\n\nPaper: both parts of the mark help. Ours ([table](tiny-ablation/README.md))" in overview
    assert overview.count("- none: AUC") == 1
    assert (tmp_path / unmarked["run_dir"] / "report" / "manifest.json").exists()
    again = run_table(_table(tmp_path, repo, table="same-rows", title="Same rows"), results=tmp_path / "results")
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in rows] and again[1]["auc"] == unmarked["auc"]
    overview = (tmp_path / "results" / "README.md").read_text()
    assert overview.count("## Tiny ablation") == 1 and overview.count("- none: AUC") == 2  # both tables listed


def test_table_errors_name_the_file_and_key(tmp_path: Path, repo: Path) -> None:
    with pytest.raises(ConfigError, match=r"table.yaml: rows\.0\.name"):
        load_table(_table(tmp_path, repo, rows=[{"set": {}}]))
    with pytest.raises(ConfigError, match="not found"):
        load_table(tmp_path / "missing.yaml")
