"""Experiment tables: every row a real pipeline run, the table and the overview written from them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.core.stats import t_interval
from pipeline.experiments import defense_notes, load_table, on_base, planned_rows, run_table
from pipeline.experiments.render import OVERVIEW_HEADER, overview_header
from pipeline.experiments.summary import SPREAD, spread, summarise


def _table(folder: Path, repo: Path, **changes: object) -> Path:
    spec = {
        "table": "tiny-ablation",
        "title": "Tiny ablation",
        "base": str(repo / "configs" / "tiny.yaml"),
        "claim": "both parts of the mark help",
        "set": {"train.arms": ["marked"], "train.epochs": 1},
        "rows": [{"name": "stripes + noise"}, {"name": "none", "set": {"mark.noise": "none", "mark.alpha": 1.0}}],
    }
    spec.update(changes)
    path = folder / "table.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_a_table_repeats_rows_over_seeds_and_shares_stages(
    tmp_path: Path, repo: Path, tiny_run: Path, monkeypatch, capfd, caplog
) -> None:
    """Two rows (the second changes only training) over two seeds: each seed draws its own plan, a
    stage both rows need runs once, the same seed gives the same numbers as an independent run
    (the session's tiny run), and the table reports each row's spread and its paired difference."""
    monkeypatch.chdir(tmp_path)
    rows = [{"name": "plain"}, {"name": "smoothed", "set": {"train.label_smoothing": 0.2}}]
    table = _table(
        tmp_path,
        repo,
        set={"train.arms": ["marked"]},
        seeds=[0, 1],
        rows=rows,
        averages={"both rows": ["plain", "smoothed"]},
    )
    caplog.set_level(logging.INFO, logger="pipeline")
    plain, smoothed = run_table(table, results=tmp_path / "results")
    log = capfd.readouterr().err  # what the stages' processes printed
    assert log.count("write: running") == 2 and log.count("train-marked: running") == 4  # write once per seed
    assert caplog.text.count("write: done already, skipped") == 2  # the second row found it done
    (p0, p1), (s0, s1) = ([tmp_path / run["run_dir"] for run in row["runs"]] for row in (plain, smoothed))
    assert (p0 / "write").resolve() == (s0 / "write").resolve() != (p1 / "write").resolve()
    assert (p0 / "train-marked").resolve() != (s0 / "train-marked").resolve()
    users = [json.loads((run / "plan" / "users.json").read_text())["users"] for run in (p0, p1)]
    assert [u["sample_ids"] for u in users[0]] != [u["sample_ids"] for u in users[1]]  # seeds draw other users
    # seed 0 of the plain row is the tiny config's own run: the same losses, to the bit
    ours, theirs = (np.load(run / "audit-marked" / "losses.npz") for run in (p0, tiny_run.parent / "run"))
    assert np.array_equal(ours["loss"], theirs["loss"]) and np.array_equal(ours["user"], theirs["user"])

    saved = json.loads((tmp_path / "results" / "tiny-ablation" / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps([plain, smoothed])) and saved["baseline"] == "plain"
    aucs = [run["auc"] for run in plain["runs"]]
    assert plain["n_seeds"] == 2 and plain["seeds"] == [0, 1] and plain["mean"]["auc"] == pytest.approx(np.mean(aucs))
    lo, hi = plain["interval"]["auc"]
    half = 12.7062047 * np.std(aucs, ddof=1) / np.sqrt(2)  # t(0.975) with 1 degree of freedom
    assert lo == pytest.approx(max(np.mean(aucs) - half, 0), abs=1e-6)  # cut to AUC's range
    assert hi == pytest.approx(min(np.mean(aucs) + half, 1), abs=1e-6)
    assert "vs_baseline" not in plain
    diff = smoothed["vs_baseline"]["auc"]
    expected = np.mean([s["auc"] - p["auc"] for s, p in zip(smoothed["runs"], plain["runs"])])
    assert diff["seeds_paired"] == 2 and diff["difference"] == pytest.approx(expected)
    assert diff["beyond_noise"] == (diff["interval"][0] > 0 or diff["interval"][1] < 0)
    report = json.loads((p0 / "results" / "metrics.json").read_text())
    assert plain["runs"][0]["auc"] == report["set_based"]["auc"]  # each run's numbers are its report's
    assert plain["n_nonmember_users"] == report["set_based"]["n_nonmembers"] == 20
    (mean,) = saved["averages"]
    assert mean["n_runs"] == 4 and mean["mean"]["auc"] == pytest.approx(
        np.mean(aucs + [r["auc"] for r in smoothed["runs"]])
    )

    text = (tmp_path / "results" / "tiny-ablation" / "README.md").read_text()
    assert "| plain | 2 |" in text and "| smoothed | 2 |" in text and "| baseline |" in text
    assert "| smoothed | 0 |" in text and "| smoothed | 1 |" in text  # every run, by seed
    assert (tmp_path / "results" / "tiny-ablation" / "spread.png").stat().st_size > 1000
    overview = (tmp_path / "results" / "README.md").read_text()
    assert "## Tiny ablation\n\nPaper: both parts of the mark help. Ours ([table](tiny-ablation/README.md)" in overview
    assert overview.count("- smoothed (2 seeds): AUC") == 1
    assert ("Standing out from seed noise" in overview) or ("Within seed noise of the baseline: smoothed" in overview)


def test_intervals_stay_inside_the_range_a_number_can_take() -> None:
    """A t-interval of a rate near 1 over few seeds would reach past 1 (and of differences past ±1);
    it is cut to the range, while the mean and the noise verdict stay those of the uncut interval."""
    runs = [
        {"seed": s, **dict.fromkeys(SPREAD, v), "psnr": 10 * v, "n_nonmember_users": 9}
        for s, v in enumerate([1.0, 1.0, 0.0])
    ]
    base = [{"seed": s, **dict.fromkeys(SPREAD, 0.0), "psnr": 0.0, "n_nonmember_users": 9} for s in range(3)]
    got = spread(runs)
    uncut = t_interval([1.0, 1.0, 0.0])
    assert uncut is not None and uncut[0] < 0 and uncut[1] > 1
    assert got["interval"]["tpr_at_fpr_below_0.001"] == [0.0, 1.0] and got["mean"]["auc"] == pytest.approx(2 / 3)
    assert got["interval"]["train_loss"] == [0.0, uncut[1]]  # a loss has no upper bound
    assert got["interval"]["psnr"] == pytest.approx([10 * uncut[0], 10 * uncut[1]])  # PSNR has no range
    plain, row = summarise([{"name": "b", "runs": base}, {"name": "r", "runs": runs}], "b")
    diff = row["vs_baseline"]["auc"]
    assert diff["interval"][0] == pytest.approx(uncut[0]) and diff["interval"][1] == 1.0
    assert diff["beyond_noise"] is False


def test_every_committed_table_is_repeated_over_seeds_at_paper_scale(repo: Path) -> None:
    """The bar every table under results/ meets (issue 22): 3 seeds per row, 5 for the baseline
    (the row without a difference from the baseline), at least 1,000 non-member users, every seed's
    numbers and an interval kept."""
    tables = [path for path in sorted((repo / "results").glob("*/results.json")) if path.parent.name != "owner-audit"]
    assert len(tables) >= 8
    for path in tables:
        rows = json.loads(path.read_text())["rows"]
        assert sum("vs_baseline" not in row for row in rows) == 1, path
        for row in rows:
            where = f"{path.parent.name}: {row['name']}"
            assert row["n_seeds"] >= (3 if "vs_baseline" in row else 5), where
            assert row["n_seeds"] == len(row["runs"]) == len({run["seed"] for run in row["runs"]}), where
            assert row["n_nonmember_users"] >= 1000 and {"auc", "fpr_at_tpr_1"} <= set(row["interval"]), where


def test_the_overview_names_the_tables_still_made_by_one_run() -> None:
    entries = {
        "Old table": "Old table\n\nPaper: x. Ours ([table](old/README.md)):\n\n- a: AUC 0.9\n",
        "New table": "New table\n\nPaper: y. Ours ([table](new/README.md), [figure](new/spread.png); M = 2,500 "
        "non-member users; mean [95% t-interval] over seeds):\n\n- a (3 seeds): AUC 0.9 [0.8, 1.0]\n",
        "Reproduction: the demo run": "Reproduction: the demo run\n\nOurs, Fashion-MNIST: AUC 0.97\n",
    }
    header = overview_header(entries)
    assert header.startswith(OVERVIEW_HEADER) and header.rstrip().endswith("*Old table*.")
    assert "New table" not in header and "Reproduction" not in header
    del entries["Old table"]
    assert overview_header(entries) == OVERVIEW_HEADER


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


@pytest.mark.parametrize(
    "second, names",
    [
        (None, "two.yaml: experiment table not found"),
        ({"rows": [{"name": "typo", "set": {"data.classes": ["class-1", 1]}}]}, "names class 1 (class-1) a second"),
        ({"rows": [{"name": "big", "set": {"plan.samples_per_user": 150}}]}, "need plan.samples_per_user=150"),
    ],
)
def test_every_table_is_checked_before_the_first_starts(
    second: dict | None, names: str, tmp_path: Path, repo: Path, monkeypatch, capsys
) -> None:
    """`mtrack experiments ONE TWO`: a missing second table, or one whose row the plan would refuse,
    stops the command before the first table trains anything (it used to find out after)."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    first = _table(tmp_path, repo)
    (tmp_path / "two").mkdir()
    if second is not None:
        _table(tmp_path / "two", repo, table="two", **second).rename(tmp_path / "two.yaml")
    assert main(["experiments", str(first), str(tmp_path / "two.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and names in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_defense_notes_say_what_each_countermeasure_did() -> None:
    assert defense_notes({"train_loss": 0.1}) == ""
    notes = defense_notes(
        {
            "dp_epsilon": 7.123,
            "sparsity": 0.5,
            "stopped_epoch": 12,
            "outliers": {"dropped": 100, "marked": 100, "marked_dropped": 37},
        }
    )
    assert notes == (
        "DP epsilon 7.12; 50% of weights zero; filter dropped 100 images, 37 of 100 marked; stopped after 12 epochs"
    )


def test_a_table_runs_on_another_base_config_into_its_own_folder(tmp_path: Path, repo: Path) -> None:
    table = load_table(_table(tmp_path, repo, title="Tiny ablation (default setting)"))
    other = on_base(table, str(repo / "configs" / "cifar10.yaml"))
    assert other.table == "tiny-ablation-cifar10" and other.title == "Tiny ablation (cifar10 wrn28-4)"
    assert other.rows == table.rows and other.set == table.set


def _jpeg_base(folder: Path, repo: Path) -> Path:
    """configs/demo.yaml with every image stored as JPEG at its own size (longer side 24 px)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "demo-jpeg.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "extends": str(repo / "configs" / "demo.yaml"),
                "name": "demo jpeg",
                "data": {"clean_write_mode": "jpg", "max_resolution": 24},
                "train": {"resolution": 24},
            }
        )
    )
    return base


def test_every_table_validates_on_a_base_with_jpeg_storage(tmp_path: Path, repo: Path) -> None:
    base = _jpeg_base(tmp_path, repo)
    tables = sorted((repo / "configs" / "experiments").glob("*.yaml"))
    assert tables
    for path in tables:
        table, base_file, runs = planned_rows(path, str(base))
        assert base_file == str(base.resolve()) and table.table.endswith("-demo-jpeg")
        own = {run.folder for run in planned_rows(path)[2]}
        assert runs and not own & {run.folder for run in runs}  # never mixed with the demo's own runs
        for run in runs:
            assert run.config.data.clean_write_mode == "jpg" and run.config.data.max_resolution == 24


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
    base.write_text(
        yaml.safe_dump(
            {
                "name": "folder jpeg",
                "data": {
                    "source": "imagefolder",
                    "root": str(root),
                    "image_size": 16,
                    "n_train": 24,
                    "max_resolution": 24,
                    "clean_write_mode": "jpg",
                    "jpeg_quality": 75,
                },
                "plan": {"n_member_users": 2, "n_nonmember_users": 4, "samples_per_user": 2},
                "mark": {"examples_users": 2},
                "train": {"width": 4, "batch_size": 8, "resolution": 16, "augment": "none", "num_workers": 1},
                "audit": {"batch_size": 8, "num_workers": 1},
            }
        )
    )
    rows = run_table(
        _table(tmp_path, repo, rows=[{"name": "stripes + noise"}]), results=tmp_path / "results", base=str(base)
    )
    ((run,),) = (row["runs"] for row in rows)
    assert run["notes"].startswith("members' images 100% JPEG q75, noise part kept ")
    assert run["notes"] in (tmp_path / "results" / "tiny-ablation-folder-jpeg" / "README.md").read_text()
    report = (tmp_path / run["run_dir"] / "results" / "report.md").read_text()
    assert "100% of the member users' training images as JPEG (quality 75)" in report
    assert "| as stored by this run |" in report
    losses = np.load(tmp_path / run["run_dir"] / "audit-marked" / "losses.npz")
    assert len(losses["loss"]) == 6 * 2 and np.isfinite(losses["loss"]).all()
