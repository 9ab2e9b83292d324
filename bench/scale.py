"""How the pipeline's cost grows with the data: the ImageNet recipe rehearsed (`mtrack run --rehearse`)
on ImageNet-shaped folders of several sizes, on the SLURM cluster, stage by stage and job by job.

For each size the folder is made by `bench.imagenet_like` (1,300 images per class, as ImageNet), the
rehearsal runs with the recipe's storage, shard counts and job arrays, and every stage's manifest
and shard records give what it cost (seconds, CPU-seconds, peak memory, bytes written; see
`pipeline.usage`), sacct the jobs' wall time on the cluster. Also measured once, beside the stages:
- the training and evaluation loaders, FFCV from the run's own `train.beton` against torchvision's
  ImageFolder + DataLoader on the same JPEG files, with the recipe's decoders and the same workers;
- what one training file for both arms saves: the write stage's training file against writing the
  clean training set a second time (what one file per arm cost).

    python -m bench.scale --sizes 5200 20800 52000 [--partition debug] [--launcher slurm]

Each size is merged into results/bench/scale.json (other sizes kept), so sizes can run one at a time;
`python -m bench.scale` without --sizes redraws scale.png and scale.md from what the file holds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, comparison, interleaved_medians, machine, run_reporting_errors, update_bench_readme
from bench.imagenet_like import generate
from pipeline.cli import CommandParser
from pipeline.config import load_config
from pipeline.launchers.follow import JobRecord
from pipeline.store import read_json, write_json

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "imagenet-rn50.yaml"
OUT = RESULTS / "bench" / "scale.json"
PER_CLASS = 1300
IMAGENET_IMAGES = 1_281_167
LOADER_IMAGES, LOADER_REPEATS, LOADER_BATCH = 3000, 3, 64


def run_rehearsal(root: Path, run_dir: Path, launcher: str, partition: str | None) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        str(RECIPE),
        "--rehearse",
        "--launcher",
        launcher,
        f"--set=data.root={root}",
        f"--set=run_dir={run_dir}",
        f"--set=results_dir={run_dir}/results",
        "--set=wandb.enabled=true",
        "--set=wandb.mode=offline",
    ]
    cmd += [f"--set=launch.slurm.partition={partition}"] if partition else []
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"})


def job_times(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per task of the run, from sacct: the seconds its jobs (array tasks each) ran together
    (`job_seconds`) and from the first one's start to the last one's end (`wall_seconds`)."""
    from datetime import datetime

    path = JobRecord.path_for(run_dir)
    if not path.exists():
        return {}
    record = JobRecord.load(path)
    ids = ",".join(sorted({j.job_id.split("_")[0] for j in record.jobs}))
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-j", ids, "-o", "JobID,ElapsedRaw,Start,End"], capture_output=True, text=True
    ).stdout
    rows = {r[0]: r[1:] for r in (line.split("|") for line in out.splitlines()) if len(r) == 4}
    times = {}
    for task in {j.task for j in record.jobs}:
        bases = {j.job_id.split("_")[0] for j in record.jobs if j.task == task}
        mine = [v for k, v in rows.items() if k.split("_")[0] in bases and "[" not in k]
        if not mine:
            continue
        starts, ends = ([datetime.fromisoformat(v[i]).timestamp() for v in mine] for i in (1, 2))
        times[task] = {"job_seconds": float(sum(int(v[0]) for v in mine)), "wall_seconds": max(ends) - min(starts)}
    return times


def images_through(stage: str, manifest: dict[str, Any], plan: dict[str, Any], cfg_epochs: int) -> int:
    """The images a stage pushes through its main loop (what its rate per core is per)."""
    users = plan["users"]
    marked = sum(len(u["sample_ids"]) for u in users)
    if stage == "mark" or stage.startswith("audit"):
        return marked
    if stage == "write":
        return manifest["n_train"] + manifest["n_marked_records"] + manifest["n_test"] + manifest["n_audit"]
    if stage.startswith("train"):
        return cfg_epochs * manifest.get("n_train", 0)
    return len(users) if stage == "report" else plan["n_images"]


def measure_size(n: int, data_dir: Path, runs: Path, launcher: str, partition: str | None) -> dict[str, Any]:
    """Generate the folder, rehearse on it, and read back every stage's and job's cost."""
    root = data_dir / f"imagenet-like-{n}"
    generated = generate(root, n, PER_CLASS, 50, workers=os.cpu_count() or 1)
    run_dir = runs / f"scale-{n}"
    started = time.perf_counter()
    run_rehearsal(root, run_dir, launcher, partition)
    total = time.perf_counter() - started
    cfg = load_config(RECIPE, [f"data.root={root}"])
    plan = {**read_json(run_dir / "plan" / "users.json"), "n_images": generated["train_images"]}
    written = read_json(run_dir / "write" / "manifest.json")
    times = job_times(run_dir)
    stages, jobs = [], []
    for folder in sorted(p for p in run_dir.iterdir() if (p / "manifest.json").is_file()):
        manifest = read_json(folder / "manifest.json")
        name = folder.name
        parts = [
            (f"{name}[{json.loads(r.read_text())['shard']}]", read_json(r)["usage"])
            for r in sorted(folder.glob("shard-*-of-*.json"))
        ]
        parts.append((name if not parts else f"{name} (merge)", manifest["usage"]))
        images = images_through(name, written if name.startswith("train") else manifest, plan, 2)
        cpu = sum(u["cpu_seconds"] for _, u in parts)
        stages.append(
            {
                "stage": name,
                "n_images": generated["train_images"],
                "seconds": round(sum(u["seconds"] for _, u in parts), 2),
                **times.get(name, {"job_seconds": None, "wall_seconds": None}),
                "cpu_seconds": round(cpu, 2),
                "peak_rss_mb": max(u["peak_rss_mb"] for _, u in parts),
                "peak_anon_mb": max(u["peak_anon_mb"] for _, u in parts),
                "bytes_written": sum(u["bytes_written"] for _, u in parts),
                "images": images,
                "images_per_s_per_core": round(images / cpu, 2) if cpu else None,
                "jobs": len(parts),
            }
        )
        jobs += [{"job": job, "stage": name, "n_images": generated["train_images"], **usage} for job, usage in parts]
    return {
        "n_images": generated["train_images"],
        "data": generated,
        "rehearsal_seconds": round(total, 1),
        "config": {
            "n_train": written["n_train"],
            "users": len(plan["users"]),
            "K": len(plan["users"][0]["sample_ids"]),
            "mark_shards": cfg.launch.mark_shards,
            "audit_shards": cfg.launch.audit_shards,
            "storage": written["storage"],
            "max_resolution": cfg.data.max_resolution,
        },
        "stages": stages,
        "jobs": jobs,
        "run_dir": str(run_dir),
    }


def loader_rows(run_dir: Path, root: Path) -> list[dict[str, Any]]:
    """FFCV on the run's train.beton against torchvision ImageFolder + DataLoader on its JPEGs: the
    recipe's training crop (random-resized 192 px + flip) and evaluation crop (224/256 centre, 256 px)."""
    import torch
    import torchvision
    from torchvision.transforms import v2

    from pipeline.data.betons import EVAL_CROP_RATIO, make_loader

    cfg = load_config(RECIPE, [f"data.root={root}"])
    workers = min(cfg.train.num_workers, os.cpu_count() or 1)
    beton = run_dir / "write" / "train.beton"
    rng = np.random.default_rng(0)
    count = min(LOADER_IMAGES, read_json(run_dir / "write" / "manifest.json")["n_train"])
    chosen = np.sort(rng.choice(len(torchvision.datasets.ImageFolder(str(root / "train"))), count, replace=False))
    train_res, eval_res = cfg.train.resolution, cfg.train.eval_resolution
    transforms = {
        "train": v2.Compose([v2.RandomResizedCrop(train_res), v2.RandomHorizontalFlip(), v2.PILToTensor()]),
        "eval": v2.Compose([v2.Resize(round(eval_res / EVAL_CROP_RATIO)), v2.CenterCrop(eval_res), v2.PILToTensor()]),
    }
    sides: dict[str, Iterable] = {}
    for kind, train in (("train", True), ("eval", False)):
        dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transforms[kind])
        sides[f"torchvision {kind}"] = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, chosen.tolist()),
            batch_size=LOADER_BATCH,
            shuffle=train,
            num_workers=workers,
            drop_last=train,
        )
        sides[f"ffcv {kind}"] = make_loader(
            beton,
            LOADER_BATCH,
            workers,
            train=train,
            augment="flip" if train else "none",
            resolution=train_res if train else eval_res,
            indices=np.arange(count, dtype=np.uint64),
        )

    def rate(loader: Iterable) -> float:
        start, count = time.perf_counter(), 0
        for images, *_ in loader:
            count += len(images)
        return count / (time.perf_counter() - start)

    for loader in sides.values():  # warm-up: numba compilation, page cache
        rate(loader)
    median = interleaved_medians(
        {name: (lambda loader=loader: rate(loader)) for name, loader in sides.items()}, LOADER_REPEATS
    )
    where = (
        f"{count} ImageNet-shaped images, batch {LOADER_BATCH}, {workers} workers; FFCV from the rehearsal's "
        f"train.beton ({cfg.data.clean_write_mode}: {cfg.data.compress_probability:.0%} JPEG q{cfg.data.jpeg_quality}, "
        f"the rest raw, longer side <= {cfg.data.max_resolution}), torchvision from the JPEG files"
    )
    return [
        comparison(
            f"training loader, random-resized crop {train_res} + flip: FFCV vs torchvision ImageFolder; {where}",
            median["ffcv train"],
            median["torchvision train"],
        ),
        comparison(
            f"evaluation loader, 224/256 centre crop at {eval_res}: FFCV vs torchvision ImageFolder; {where}",
            median["ffcv eval"],
            median["torchvision eval"],
        ),
    ]


def one_file_rows(run_dir: Path, root: Path) -> list[dict[str, Any]]:
    """The training set written once for both arms, against writing it a second time (the clean copy
    the control arm had its own file for): seconds and bytes, measured by writing that copy."""
    from pipeline.data.betons import write_beton
    from pipeline.data.sources import StoredImages, load_source
    from pipeline.stages.write import TrainingRecords, image_storage
    from pipeline.store import load_npz

    cfg = load_config(RECIPE, [f"data.root={root}"])
    written = read_json(run_dir / "write" / "manifest.json")
    train_ids = load_npz(run_dir / "plan" / "train_ids.npz")["train_ids"]
    data = load_source(cfg.data)
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        start = time.perf_counter()
        clean = TrainingRecords(
            StoredImages(data.train_images, cfg.data.max_resolution), train_ids, None, np.zeros(0, np.int64)
        )
        write_beton(
            Path(tmp) / "clean.beton",
            clean,
            data.train_labels[train_ids],
            train_ids,
            num_workers=min(cfg.write.num_workers, os.cpu_count() or 1),
            storage=image_storage(cfg),
        )
        copy_seconds, copy_bytes = time.perf_counter() - start, (Path(tmp) / "clean.beton").stat().st_size
    ours_bytes = written["sizes"]["train.beton"]
    n = written["n_train"]
    write_seconds = written["usage"]["seconds"]
    return [
        comparison(
            f"write stage, {n:,} training images: one training file for both arms vs one per arm "
            f"(the clean copy written again: {copy_seconds:.0f} s)",
            n / write_seconds,
            n / (write_seconds + copy_seconds),
            "training images/s",
        ),
        comparison(
            f"training data on disk, {n:,} images: one file ({ours_bytes / 1e9:.2f} GB) vs one per arm "
            f"({(ours_bytes + copy_bytes) / 1e9:.2f} GB)",
            n / (ours_bytes / 1e9),
            n / ((ours_bytes + copy_bytes) / 1e9),
            "training images/GB",
        ),
    ]


def slope(ns: list[float], values: list[float]) -> float | None:
    """Log-log slope of values against sizes (1: linear growth); None with fewer than two points."""
    points = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v and v > 0]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def fits(stages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stage over the sizes: log-log slopes of wall and CPU seconds against images (<= 1.1: time
    per image flat), and the growth of peak memory between the two largest sizes."""
    out = {}
    for name in sorted({s["stage"] for s in stages}):
        rows = sorted((s for s in stages if s["stage"] == name), key=lambda s: s["n_images"])
        ns = [r["n_images"] for r in rows]
        last, before = rows[-1], rows[-2] if len(rows) > 1 else None
        out[name] = {
            "sizes": ns,
            "seconds_slope": slope(ns, [r["job_seconds"] or r["seconds"] for r in rows]),
            "cpu_seconds_slope": slope(ns, [r["cpu_seconds"] for r in rows]),
            "anon_growth": None if before is None else round(last["peak_anon_mb"] / before["peak_anon_mb"], 3),
            "rss_growth": None if before is None else round(last["peak_rss_mb"] / before["peak_rss_mb"], 3),
        }
    return out


def imagenet_estimates(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each CPU stage extrapolated from the largest size to the ImageNet recipe (its users, shards and
    resources), next to what `mtrack run configs/imagenet-rn50.yaml --dry-run` estimates."""
    from pipeline.launchers.cost import estimate_job, load_rates
    from pipeline.launchers.jobs import plan_jobs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(RECIPE, ["data.root=/imagenet", f"run_dir={tmp}/run"])
        dry = {job.task.name: estimate_job(cfg, job, load_rates(OUT.parent)) for job in plan_jobs(cfg)}
    largest = max(s["n_images"] for s in result["stages"])
    at = {s["stage"]: s for s in result["stages"] if s["n_images"] == largest}
    users = (cfg.plan.n_member_users + cfg.plan.n_nonmember_users) * cfg.plan.samples_per_user
    images = {
        "plan": IMAGENET_IMAGES,
        "mark": users,
        "report": cfg.plan.n_member_users + cfg.plan.n_nonmember_users,
        "write": cfg.data.n_train + cfg.plan.n_member_users * cfg.plan.samples_per_user + 50_000 + users,
    }
    parallel = {
        "mark": min(cfg.launch.mark_shards, cfg.launch.slurm.array_parallelism),
        "write": cfg.write.num_workers,
        "plan": 1,
        "report": 1,
    }
    rows = []
    for stage, n in images.items():
        s = at[stage]
        per_image = 1 / s["images_per_s_per_core"]  # shards only for a sharded stage; its merge is fixed
        merge = s.get("merge_cpu_seconds", 0.0)
        cpu_hours = (per_image * n + merge) / 3600
        estimate = dry.get(stage)
        rows.append(
            {
                "stage": stage,
                "images": n,
                "cpu_seconds_per_image": per_image,
                "cpu_hours": cpu_hours,
                "wall_hours": (per_image * n / parallel[stage] + merge) / 3600,
                "parallel": parallel[stage],
                "dry_run_wall_hours": None if estimate is None or estimate.wall_s is None else estimate.wall_s / 3600,
                "dry_run_used": None if estimate is None else estimate.used,
            }
        )
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.store import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    names = sorted({s["stage"] for s in result["stages"]})
    for name in names:
        rows = sorted((s for s in result["stages"] if s["stage"] == name), key=lambda s: s["n_images"])
        ns = [r["n_images"] for r in rows]
        axes[0].plot(ns, [r["cpu_seconds"] for r in rows], "o-", label=name)
        axes[1].plot(ns, [r["peak_anon_mb"] for r in rows], "o-", label=name)
        axes[2].plot(ns, [r["peak_rss_mb"] for r in rows], "o-", label=name)
    ns = sorted({s["n_images"] for s in result["stages"]})
    for ax, what in zip(
        axes,
        (
            "CPU seconds (all jobs of the stage)",
            "peak anonymous memory, MB (largest job)",
            "peak RSS incl. mapped files, MB (largest job)",
        ),
    ):
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("images in the folder"), ax.set_title(what, fontsize=10), ax.grid(alpha=0.3, which="both")
    reference = np.array([ns[0], ns[-1]], dtype=float)
    start = min(s["cpu_seconds"] for s in result["stages"] if s["n_images"] == ns[0] and s["cpu_seconds"] > 0)
    axes[0].plot(reference, start * reference / reference[0], "k--", lw=1, label="linear (slope 1)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("The ImageNet recipe rehearsed on ImageNet-shaped folders (log-log)", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    sizes = sorted({s["n_images"] for s in result["stages"]})
    head = (
        "| stage | "
        + " | ".join(f"{n:,} images: CPU s / job s / anon MB / RSS MB / GB written" for n in sizes)
        + " | CPU-s slope | job-s slope | anon growth (last two) |\n"
        + "|---" * (len(sizes) + 4)
        + "|\n"
    )
    lines = []
    for name, fit in result["fits"].items():
        cells = []
        for n in sizes:
            s = next((s for s in result["stages"] if s["stage"] == name and s["n_images"] == n), None)
            cells.append(
                "—"
                if s is None
                else f"{s['cpu_seconds']:.0f} / {s['job_seconds'] or s['seconds']:.0f} / "
                f"{s['peak_anon_mb']:.0f} / "
                f"{s['peak_rss_mb']:.0f} / {s['bytes_written'] / 1e9:.2f}"
            )
        fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {fmt(fit['cpu_seconds_slope'], '.2f')} | "
            f"{fmt(fit['seconds_slope'], '.2f')} | {fmt(fit['anon_growth'], '.2f')} |"
        )
    text = (
        "# Scale: the ImageNet recipe rehearsed at growing sizes\n\n"
        "Regenerate: `make scale` (`python -m bench.scale`); machine: " + result["machine"] + ".\n\n"
        "Per stage (all its jobs together; memory of its largest job): CPU seconds, seconds its SLURM jobs ran "
        "(sacct; array tasks summed, start-up included), peak "
        "anonymous memory (what the job must have), peak RSS (including pages of memory-mapped files, which the "
        "page cache can drop), bytes written; then the log-log slope of time against images (1 = linear) and "
        "the growth of peak anonymous memory between the two largest sizes.\n\n" + head + "\n".join(lines) + "\n"
    )
    text += (
        "\n## Extrapolated to ImageNet-1k (the recipe: its users, shards and workers)\n\n"
        "| stage | images | CPU s per image (largest size) | CPU-hours | wall hours at | dry-run estimate (wall) |\n"
        "|---|---|---|---|---|---|\n"
    )
    for e in result["imagenet"]:
        dry = "—" if e["dry_run_wall_hours"] is None else f"{e['dry_run_wall_hours']:.2f} h ({e['dry_run_used']})"
        text += (
            f"| {e['stage']} | {e['images']:,} | {e['cpu_seconds_per_image']:.4f} | {e['cpu_hours']:.1f} | "
            f"{e['wall_hours']:.2f} h with {e['parallel']} in parallel | {dry} |\n"
        )
    text += (
        "\n## Loaders and one training file\n\n"
        + "\n".join(
            f"- {r['case']}: ours {r['ours']:.1f}, baseline {r['baseline']:.1f} {r['unit']} (×{r['ratio']:.2f})"
            for r in result["rows"]
        )
        + "\n"
    )
    return text


def split_merges(result: dict[str, Any]) -> None:
    """For a sharded stage, its rate per core from its shards alone (the work that grows with the
    images) and the CPU seconds of its merge apart (a fixed cost: the mark stage's survival check on
    at most 50 users, the examples grid; the audit's statistics)."""
    for stage in result["stages"]:
        jobs = [j for j in result["jobs"] if j["stage"] == stage["stage"] and j["n_images"] == stage["n_images"]]
        shards = [j for j in jobs if "[" in j["job"]]
        if not shards:
            continue
        shard_cpu = sum(j["cpu_seconds"] for j in shards)
        stage["merge_cpu_seconds"] = round(stage["cpu_seconds"] - shard_cpu, 2)
        stage["images_per_s_per_core"] = round(stage["images"] / shard_cpu, 2) if shard_cpu else None


def report(result: dict[str, Any]) -> None:
    from pipeline.store import write_text

    split_merges(result)
    result["fits"] = fits(result["stages"])
    write_json(OUT, result)  # first: the dry-run estimate beside the extrapolation reads these rates from it
    result["imagenet"] = imagenet_estimates(result)
    write_json(OUT, result)
    plot(result, OUT.with_suffix(".png"))
    write_text(OUT.with_suffix(".md"), markdown(result))
    worst = max((f["cpu_seconds_slope"] or 0 for f in result["fits"].values()), default=0)
    growth = max((f["anon_growth"] or 0 for f in result["fits"].values()), default=0)
    sizes = sorted({s["n_images"] for s in result["stages"]})
    update_bench_readme(
        "scale.json",
        (
            f"- `scale.json` — the ImageNet recipe rehearsed on {', '.join(f'{n:,}' for n in sizes)} "
            "ImageNet-shaped images "
            f"on the SLURM cluster ([scale.md](scale.md), [scale.png](scale.png)): steepest CPU-time slope {worst:.2f} "
            f"(log-log), largest growth of a job's peak anonymous memory between the two largest sizes ×{growth:.2f}"
            + "".join(f"; {r['case'].split(':')[0]} ×{r['ratio']:.2f}" for r in result["rows"])
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help="folder sizes to (re)measure")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data", help="where the generated folders go")
    parser.add_argument("--runs", type=Path, default=REPO / "runs", help="where the rehearsals' run folders go")
    parser.add_argument("--launcher", default="slurm", choices=("slurm", "local"))
    parser.add_argument("--partition", default=None)
    parser.add_argument(
        "--loaders-at",
        type=int,
        help="size whose run the loader and one-file rows are measured on (default: the largest measured here)",
    )
    args = parser.parse_args(argv)
    result = read_json(OUT) if OUT.exists() else {"rows": [], "stages": [], "jobs": [], "sizes": {}}
    result["machine"] = machine()
    for n in args.sizes:
        measured = measure_size(n, args.data_dir, args.runs, args.launcher, args.partition)
        size = measured["n_images"]
        result["stages"] = [s for s in result["stages"] if s["n_images"] != size] + measured["stages"]
        result["jobs"] = [j for j in result["jobs"] if j["n_images"] != size] + measured["jobs"]
        result["sizes"][str(size)] = {k: measured[k] for k in ("data", "config", "rehearsal_seconds", "run_dir")}
        write_json(OUT, result)  # each size is kept as soon as it is measured
    if args.sizes:
        at = args.loaders_at or max(args.sizes)
        size = str(at if str(at) in result["sizes"] else max(int(k) for k in result["sizes"]))
        run_dir, root = Path(result["sizes"][size]["run_dir"]), args.data_dir / f"imagenet-like-{at}"
        result["rows"] = loader_rows(run_dir, root) + one_file_rows(run_dir, root)
    if not result["stages"]:
        print("error: nothing measured yet: give --sizes", file=sys.stderr)
        return 2
    report(result)
    print(OUT.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    run_reporting_errors(main)
