"""`make gpu-check` on CPU at tiny sizes: every part it drives on a GPU runs here too, so none of them
can rot unnoticed; its JSON has the benchmark schema and feeds the cost estimate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.common import machine
from bench.gpu_check import GPU_JSON, PARTS
from pipeline.config import load_config
from pipeline.launchers.cost import estimate_job, load_rates
from pipeline.launchers.jobs import plan_jobs

REPO = Path(__file__).resolve().parents[1]


def gpu_check(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.slow
def test_every_part_passes_on_cpu_and_feeds_the_cost_estimate(tmp_path: Path) -> None:
    before = GPU_JSON.stat().st_mtime_ns if GPU_JSON.exists() else None
    out = tmp_path / "gpu-cpu.json"
    result = gpu_check("--device", "cpu", "--tiny", "--work", str(tmp_path / "work"), "--out", str(out))
    report = json.loads(out.read_text())
    failed = {name: part.get("error") for name, part in report["parts"].items() if part["status"] != "passed"}
    assert result.returncode == 0 and not failed, (failed, result.stdout[-2000:])
    assert list(report["parts"]) == list(PARTS)
    assert report["device"] == "cpu" and report["scale"] == "tiny"  # the machine and GPU fields: see below
    for row in report["rows"]:
        assert set(row) >= {"case", "ours", "baseline", "unit", "ratio"}, row
        assert row["ours"] > 0 and row["baseline"] > 0 and row["ratio"] == pytest.approx(row["ours"] / row["baseline"])
    cases = " | ".join(row["case"] for row in report["rows"])
    for expected in (
        "mark 32x32",
        "mark 16x16",
        "Lightning Classifier vs plain PyTorch loop",
        "FFCV's published",
        "score_samples vs bare forward",
        "DDP over 2 devices",
        "gloo",
    ):
        assert expected in cases
    assert set(report["throughput"]) == {"write", "mark", "train", "audit"}
    dag = report["parts"]["dag"]["details"]
    assert dag["train"]["marked"]["precision"] == "bf16-mixed" and "audit-marked" in dag["stage_seconds"]
    assert (GPU_JSON.stat().st_mtime_ns if GPU_JSON.exists() else None) == before  # CPU numbers stay out of results/

    # the estimate reads what the check measured once it comes from CUDA (a CPU run is ignored)
    bench = tmp_path / "bench"
    bench.mkdir()
    shutil.copy(out, bench / "gpu.json")
    cfg = load_config(REPO / "configs" / "imagenet-rn50.yaml", [f"run_dir={tmp_path / 'run'}", "train.arch=small_cnn"])
    train = next(job for job in plan_jobs(cfg) if job.task.stage == "train")
    assert estimate_job(cfg, train, load_rates(bench)).wall_s is None
    (bench / "gpu.json").write_text(json.dumps({**report, "device": "cuda"}))
    estimate = estimate_job(cfg, train, load_rates(bench))
    assert estimate.source.startswith("measured: gpu.json") and estimate.gpu_hours > 0


def test_a_failed_part_is_recorded_and_the_next_part_runs(tmp_path: Path) -> None:
    out = tmp_path / "gpu-cpu.json"
    result = gpu_check(
        "--device",
        "cpu",
        "--tiny",
        "--work",
        str(tmp_path),
        "--out",
        str(out),
        "--parts",
        "mark,prepare,train",
        "--time-box",
        "mark=1",
        "--time-box",
        "train=1",
    )
    parts = json.loads(out.read_text())["parts"]
    assert result.returncode == 1
    assert parts["mark"]["status"] == "failed" and "timed out after 1 s" in parts["mark"]["error"]
    assert parts["prepare"]["status"] == "passed" and (tmp_path / "prepared.json").is_file()
    assert parts["train"]["status"] == "failed"

    # a rerun of one part keeps the others' results in the same file
    gpu_check(
        "--device", "cpu", "--tiny", "--work", str(tmp_path), "--out", str(out), "--parts", "ddp", "--time-box", "ddp=1"
    )
    rerun = json.loads(out.read_text())["parts"]
    assert rerun["prepare"] == parts["prepare"] and rerun["ddp"]["status"] == "failed"


def test_parts_needing_data_are_skipped_without_it(tmp_path: Path) -> None:
    out = tmp_path / "gpu-cpu.json"
    result = gpu_check("--device", "cpu", "--tiny", "--work", str(tmp_path), "--out", str(out), "--parts", "audit")
    assert result.returncode == 0
    report = json.loads(out.read_text())
    assert report["parts"]["audit"] == {"status": "skipped", "reason": "needs the prepare part, which has not passed"}
    # what the numbers are compared by: this machine, as every benchmark names it, and no GPU on --device cpu
    assert report["machine"] == machine()
    assert report["gpu"] == {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "count": 0}


@pytest.mark.parametrize(
    "args",
    [
        ["--device", "cpu", "--out", str(GPU_JSON)],
        ["--tiny", "--out", str(GPU_JSON)],
        ["--device", "cpu", "--parts", "mark,bogus"],
        ["--device", "cpu", "--time-box", "x"],
    ],
)
def test_bad_arguments_are_one_line_errors(args: list[str]) -> None:
    result = gpu_check(*args, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
