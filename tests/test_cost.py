"""The cost estimate of `mtrack run --launcher slurm --dry-run`: where its numbers come from and that
they follow from images, epochs, throughput and GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import mtrack

from pipeline.config import load_config
from pipeline.launchers.cost import FFCV_RN50, cost_table, estimate_job, load_rates
from pipeline.launchers.jobs import plan_jobs
from pipeline.store import StageError

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "imagenet-rn50.yaml"
N_TRAIN, GPUS = 1_131_167, 8
# configs/imagenet-rn50.yaml crops 160 px until its resize ramp (epochs 65-76, in 32 px steps) reaches 192
EPOCHS_AT = {160: 71, 192: 17}  # FFCV rounding: 192 px from epoch 71 of 88


def _estimates(tmp_path: Path, bench: Path, *overrides: str) -> dict:
    cfg = load_config(RECIPE, [f"run_dir={tmp_path / 'run'}", *overrides])
    rates = load_rates(bench)
    return {job.task.name: estimate_job(cfg, job, rates) for job in plan_jobs(cfg)}


def _gpu_json(bench: Path, device: str = "cuda", **throughput: dict) -> None:
    bench.mkdir(parents=True, exist_ok=True)
    (bench / "gpu.json").write_text(
        json.dumps(
            {"rows": [], "machine": "test", "device": device, "gpu": {"name": "Test GPU"}, "throughput": throughput}
        )
    )


def _marking_json(bench: Path) -> None:
    """A marking benchmark that measured the kernel at 224 px: 500 images per second on one core."""
    row = {"case": "mark 224x224 perlin, 1 core", "ours": 500.0, "baseline": 9.0, "unit": "img/s", "ratio": 55.6}
    (bench / "marking.json").write_text(json.dumps({"machine": "Test CPU, 2 cores", "rows": [row]}))


def test_published_ffcv_rate_reproduces_its_table() -> None:
    # 88 epochs of 1,281,167 images in 77.2 min on 8 A100s: 3,042 img/s per GPU over the run
    assert 88 * 1_281_167 / (77.2 * 60 * 8) == pytest.approx(3042, abs=1)
    rate = FFCV_RN50.images_per_s(160)
    assert rate == pytest.approx(3301, abs=1)
    # its own schedule (71 epochs at 160 px, 17 at 192 px) at these rates takes the published 77.2 min
    minutes = sum(n * 1_281_167 / (FFCV_RN50.images_per_s(res) * 8) for res, n in FFCV_RN50.epochs_at.items()) / 60
    assert minutes == pytest.approx(77.2)


def test_train_gpu_hours_follow_from_epochs_images_rate_and_gpus(tmp_path: Path) -> None:
    estimates = _estimates(tmp_path, tmp_path / "no-bench")
    rate = {160: FFCV_RN50.images_per_s(160), 192: FFCV_RN50.images_per_s(160) * (160 / 192) ** 2}
    wall_s = sum(epochs * N_TRAIN / (rate[res] * GPUS) for res, epochs in EPOCHS_AT.items())
    for arm in ("marked", "control"):
        train = estimates[f"train-{arm}"]
        assert train.gpus == GPUS and train.images == 88 * N_TRAIN
        assert train.wall_s == pytest.approx(wall_s)
        assert train.gpu_hours == pytest.approx(wall_s * GPUS / 3600)  # about 9.1 GPU-hours per arm
        assert train.source.startswith("published: FFCV ResNet-50")
    assert estimates["audit-marked"].gpu_hours is None  # nothing published for scoring
    assert estimates["plan"].gpu_hours == 0.0  # no GPUs asked for


def test_measured_gpu_numbers_replace_published_ones(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    _gpu_json(
        bench,
        train={"per": "GPU", "what": "t", "arch": "resnet50", "images_per_s": {"160": 5000, "192": 3500}},
        audit={"per": "GPU", "what": "a", "arch": "resnet50", "images_per_s": {"256": 8000}},
        write={"per": "worker", "what": "w", "images_per_s": {"500": 100}},
    )
    estimates = _estimates(tmp_path, bench)
    train = estimates["train-marked"]
    assert train.source.startswith("measured: gpu.json on Test GPU")
    wall_s = (EPOCHS_AT[160] * N_TRAIN / 5000 + EPOCHS_AT[192] * N_TRAIN / 3500) / GPUS
    assert train.wall_s == pytest.approx(wall_s)
    audit = estimates["audit-control"]  # 8 array tasks of one GPU, 1500 users x 64 images split over them
    assert (audit.images, audit.gpus) == (96_000, 8)
    assert audit.wall_s == pytest.approx(96_000 / 8 / 8000)
    assert audit.gpu_hours == pytest.approx(96_000 / 8000 / 3600)
    write = estimates["write"]  # the training set once, members' marked records, the audit set, a 50,000-image
    # validation split (data.n_test unset), by 32 writer workers
    assert write.wall_s == pytest.approx((N_TRAIN + 500 * 64 + 96_000 + 50_000) / (100 * 32)) and write.gpu_hours == 0.0


def test_a_cpu_run_of_the_check_or_another_model_is_not_used(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    _gpu_json(
        bench, device="cpu", train={"per": "process", "what": "t", "arch": "resnet50", "images_per_s": {"160": 1e6}}
    )
    assert _estimates(tmp_path, bench)["train-marked"].source.startswith("published")
    swin = _estimates(tmp_path, bench, "train.arch=swin_t")["train-marked"]
    assert swin.wall_s is None and "no throughput for swin_t" in swin.used


def test_marking_rate_per_core_scales_to_the_grid_and_splits_over_shards(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    _marking_json(bench)
    mark = _estimates(tmp_path, bench)["mark"]  # 30 array tasks, one process each, images stored at up to 500 px
    assert mark.wall_s == pytest.approx(96_000 / 30 / (500 * (224 / 500) ** 2))
    assert mark.gpu_hours == 0.0 and mark.source == "measured: marking.json on Test CPU"
    assert "mark_batch only" in mark.used


def test_whole_stage_rates_of_the_scale_benchmark_come_first(tmp_path: Path) -> None:
    """`make scale` measures the mark and write stages whole (decoding, PSNR/SSIM, encoding) per CPU
    core on ImageNet-shaped images; the estimate prefers them to the marking kernel alone."""
    bench = tmp_path / "bench"
    bench.mkdir()
    _marking_json(bench)
    stages = [
        {"stage": stage, "n_images": n, "images_per_s_per_core": rate and rate * n / 52_000}
        for n in (5_200, 52_000)
        for stage, rate in (("mark", 40.0), ("write", 150.0), ("plan", None))
    ]
    (bench / "scale.json").write_text(
        json.dumps(
            {
                "machine": "Scale CPU, 2 cores",
                "rows": [],
                "stages": stages,
                "sizes": {"52000": {"config": {"max_resolution": 500}}},
            }
        )
    )
    estimates = _estimates(tmp_path, bench)
    mark, write = estimates["mark"], estimates["write"]
    assert mark.wall_s == pytest.approx(96_000 / 30 / 40.0) and "mark_batch only" not in mark.used
    assert mark.source.startswith("measured: scale.json, the rehearsal on 52,000 ImageNet-shaped images on Scale CPU")
    assert write.wall_s == pytest.approx((N_TRAIN + 500 * 64 + 96_000 + 50_000) / (150.0 * 32))


def test_dry_run_prints_the_estimate_after_the_job_plan(tmp_path: Path) -> None:
    result = mtrack("run", str(RECIPE), "--launcher", "slurm", "--dry-run", "--set", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    plan, estimate = result.stdout.split("cost estimate", 1)
    assert "array tasks" in plan and "total:" in estimate
    train = next(line.split() for line in estimate.splitlines() if line.startswith("train-marked"))
    # job, images, wall time, GPUs, GPU-hours, then the numbered source: FFCV's, or a committed GPU check's
    assert train[4] == "8" and float(train[5]) > 0 and train[6].startswith("[")
    assert not (tmp_path / "run").exists()


def test_table_lists_each_source_once(tmp_path: Path) -> None:
    cfg = load_config(RECIPE, [f"run_dir={tmp_path / 'run'}"])
    table = cost_table(cfg, plan_jobs(cfg), tmp_path / "no-bench")
    assert table.count("published: FFCV") == 1 and table.count("[1]") == 3  # two train rows and the source line


def test_an_unreadable_benchmark_file_is_named(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    _gpu_json(bench, train={"per": "GPU"})  # no rates
    with pytest.raises(StageError, match="gpu.json: not a benchmark result"):
        load_rates(bench)
