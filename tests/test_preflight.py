"""The SLURM pre-flight check and the follower's reading of SLURM, without a cluster: scontrol's
records, time and GRES formats, requests against partitions, stuck reasons, and Lightning's CSV log."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.config import load_config
from pipeline.launchers.follow import Follower, JobRecord, JobState, RecordedJob, epoch_metrics, stuck_reason
from pipeline.launchers.jobs import plan_jobs
from pipeline.launchers.preflight import Node, Partition, gres_gpus, minutes, parse_record, preflight_against
from pipeline.launchers.slurm import slurm_parameters
from pipeline.store import StageError

NODE_LINE = (
    "NodeName=gpu01 Arch=x86_64 CoresPerSocket=32  CPUAlloc=0 CPUEfctv=64 CPUTot=64 CPULoad=0.01 "
    "AvailableFeatures=a100,ib ActiveFeatures=a100,ib Gres=gpu:a100:8(S:0-1) NodeAddr=gpu01 "
    "OS=Linux 5.14.0 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=1000000 State=IDLE Reason=maintenance by admin "
    "Partitions=gpu"
)


def test_scontrol_records_times_and_gres_are_read_as_slurm_writes_them() -> None:
    node = parse_record(NODE_LINE)
    assert node["OS"] == "Linux 5.14.0 #1 SMP PREEMPT_DYNAMIC @0" and node["Reason"] == "maintenance by admin"
    assert node["CPUEfctv"] == "64" and node["Gres"] == "gpu:a100:8(S:0-1)" and node["Partitions"] == "gpu"
    assert [minutes(t) for t in ("30", "30:00", "4:00:00", "2-00:00:00", "1-12", "UNLIMITED")] == [
        30,
        30,
        240,
        2880,
        2160,
        None,
    ]
    assert gres_gpus("gpu:a100:4(S:0-1),gpu:v100:2,mps:100") == 6
    assert gres_gpus("gpu:2") == 2 and gres_gpus("(null)") == 0


def _partition(*nodes: Node, max_time: float | None = None, max_nodes: int | None = None) -> Partition:
    return Partition("gpu", "UP", max_time, max_nodes, None, None, None, None, None, None, nodes)


def _node(name: str, cpus: int = 128, mem_gb: int = 1000, gpus: int = 8, features: tuple[str, ...] = ()) -> Node:
    return Node(name, cpus, mem_gb * 1024, gpus, frozenset(features))


def _imagenet_problems(part: Partition, *overrides: str) -> dict[str, list[str]]:
    cfg = load_config(REPO / "configs" / "imagenet-rn50.yaml", ["data.root=/nonexistent", *overrides])
    result = preflight_against(cfg, [(job, slurm_parameters(cfg, job.task)) for job in plan_jobs(cfg)], part)
    return {name: [str(p) for p in problems] for name, problems in result.problems.items() if problems}


def test_the_imagenet_recipe_fits_a_gpu_node_and_is_refused_where_it_does_not(tmp_path: Path) -> None:
    assert _imagenet_problems(_partition(_node("gpu01"))) == {}
    small = _imagenet_problems(_partition(_node("gpu01", gpus=4, mem_gb=256)))
    assert small["train-marked"] == [
        "launch.slurm.stages.train.gpus_per_node: train-marked asks for 8 GPUs per node; partition gpu's largest "
        "node has 4 GPUs",
        "launch.slurm.stages.train.mem_gb: train-marked asks for 480 GB per node (491520 MB); partition gpu's "
        "largest node has 262144 MB",
    ]
    assert list(small) == ["train-marked", "train-control"]  # audit (1 GPU, 64 GB) fits
    limited = _imagenet_problems(_partition(_node("gpu01"), max_time=720, max_nodes=1), "train.num_nodes=2")
    assert (
        "launch.slurm.stages.train.time_min: train-marked asks for 1440 min; partition gpu allows 720 min "
        "(MaxTime)" in limited["train-marked"]
    )
    assert (
        "train.num_nodes: train-marked asks for 2 nodes; partition gpu allows 1 (MaxNodes)" in limited["train-marked"]
    )
    # every resource exists somewhere, but no node has 8 GPUs and 480 GB together
    split = _imagenet_problems(_partition(_node("fat", gpus=0), _node("thin", mem_gb=128)))
    assert split["train-marked"] == [
        "train.num_nodes: train-marked asks for 1 node with 96 CPUs, 491520 MB, 8 GPUs; partition gpu has 0 such nodes"
    ]
    constrained = _imagenet_problems(_partition(_node("gpu01", features=("a100",))), "launch.slurm.constraint=h100")
    assert any(
        "asks for nodes with 'h100'; no node of partition gpu has it (features: a100)" in p for p in constrained["plan"]
    )
    assert _imagenet_problems(_partition(_node("gpu01", features=("a100",))), "launch.slurm.constraint=h100|a100") == {}


def test_an_unfit_request_is_refused_in_one_line_naming_every_key_to_change() -> None:
    cfg = load_config(REPO / "configs" / "imagenet-rn50.yaml", ["data.root=/nonexistent"])
    result = preflight_against(
        cfg,
        [(job, slurm_parameters(cfg, job.task)) for job in plan_jobs(cfg)],
        _partition(_node("cpu01", cpus=2, mem_gb=22, gpus=0)),
    )
    with pytest.raises(StageError) as refused:
        result.raise_if_unfit()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        "launch.slurm.default.cpus_per_task: plan asks for 8 CPUs per node; partition gpu's "
        "largest node has 2 CPUs; also: launch.slurm.default.mem_gb, "
    )
    assert "launch.slurm.stages.train.gpus_per_node" in message and message.endswith(
        "nothing submitted (--dry-run shows each job against the partition)"
    )


def test_reasons_that_cannot_resolve_end_the_run_and_others_wait() -> None:
    assert stuck_reason("PartitionConfig") == "its request exceeds what the partition allows"
    assert stuck_reason("DependencyNeverSatisfied") and stuck_reason("BadConstraints")
    assert stuck_reason("QOSMaxGRESPerJob") == "it exceeds a per-job limit of its QOS or association"
    for waiting in (
        "Priority",
        "Resources",
        "Dependency",
        "QOSGrpCpuLimit",
        "ReqNodeNotAvail, Reserved for maintenance",
    ):
        assert stuck_reason(waiting) is None, waiting


def test_state_lines_follow_the_order_things_happened(tmp_path: Path) -> None:
    """Not the DAG's order; array tasks that changed alike share a line; within a second an ending
    precedes a start; a state SLURM passes through (COMPLETING) is not reported."""
    jobs = [
        RecordedJob("train-marked", None, "5", str(tmp_path)),
        RecordedJob("train-control", None, "6", str(tmp_path)),
        RecordedJob("mark", 0, "7_0", str(tmp_path)),
        RecordedJob("mark", 1, "7_1", str(tmp_path)),
        RecordedJob("write", None, "8", str(tmp_path)),
    ]
    follower = Follower(JobRecord(tmp_path / "record.json", str(tmp_path / "%j"), jobs=jobs))
    mark_done = JobState("COMPLETED", "None", "n1", "2026-01-01T10:00:00", "2026-01-01T10:00:05")
    lines = follower.update(
        {
            "5": JobState("COMPLETED", "None", "n1", "2026-01-01T09:59:00", "2026-01-01T09:59:58"),
            "6": JobState("COMPLETED", "None", "n1", "2026-01-01T09:59:00", "2026-01-01T09:59:50"),
            "8": JobState("RUNNING", "None", "n2", "2026-01-01T10:00:05", ""),
            "7_0": mark_done,
            "7_1": mark_done,
        }
    )
    assert lines == [
        "train-control (job 6): completed after 50s",
        "train-marked (job 5): completed after 58s",
        "mark shards 0-1 (job 7): completed after 5s",
        "write (job 8): running on n2",
    ]
    assert follower.update({"8": JobState("COMPLETING", "None", "n2", "2026-01-01T10:00:05", "")}) == []
    follower.record.jobs.append(RecordedJob("report", None, "9", str(tmp_path)))
    assert follower.update({"9": JobState("PENDING", "Dependency")}) == ["report (job 9): pending (Dependency)"]
    quick = JobState("COMPLETED", "None", "n1", "2026-01-01T10:00:06", "2026-01-01T10:00:06")  # between two polls
    assert follower.update({"9": quick}) == ["report (job 9): running on n1", "report (job 9): completed after 0s"]
    assert follower.update({"8": JobState("FAILED", "None", "n2", "2026-01-01T10:00:05", "2026-01-01T10:01:05")}) == [
        "write (job 8): failed after 1m00s"
    ]
    fresh = Follower(JobRecord(tmp_path / "record.json", str(tmp_path / "%j"), jobs=jobs[:1]), just_submitted=True)
    assert fresh.update({"5": quick}) == [
        "train-marked (job 5): running on n1",
        "train-marked (job 5): completed after 0s",
    ]
    assert JobState("PENDING", "Priority").describe() == "pending (Priority)"
    assert JobState("PENDING", "None", start="N/A").event_time() <= datetime.now()


def test_training_progress_is_read_from_lightnings_csv_log(tmp_path: Path) -> None:
    """Complete rows of every log version (a resumed run writes a new one); a half-written row waits."""
    from lightning.pytorch.loggers import CSVLogger

    for version, epochs in ((0, (0,)), (1, (1, 2))):
        logger = CSVLogger(tmp_path, name="logs", version=version)
        for epoch in epochs:
            logger.log_metrics({"val_acc": 0.5 + epoch / 10, "epoch": epoch}, step=epoch)
            logger.log_metrics({"train_loss": 1.0 / (epoch + 1), "train_acc": 0.9, "epoch": epoch}, step=epoch)
        logger.save()
    log = tmp_path / "logs" / "version_1" / "metrics.csv"
    log.write_text(log.read_text() + "3,3,0.9")  # the writer is half-way through a row
    written, epochs = epoch_metrics(tmp_path)
    assert sorted(epochs) == [0, 1, 2] and written == log.stat().st_mtime
    assert epochs[2] == {"step": 2.0, "val_acc": 0.7, "train_loss": 1 / 3, "train_acc": 0.9}


def test_a_submission_killed_part_way_is_shown_as_such_and_earlier_jobs_are_kept(tmp_path: Path) -> None:
    """The record names the tasks a submission meant to submit before the first sbatch: a follower
    killed after two of them leaves a run that is never 'all completed', with the command that
    submits the rest; the record, saved and read back, keeps the earlier submissions' jobs."""
    from pipeline.launchers.follow import follow

    done = JobState("COMPLETED", "None", "n1", "2026-01-01T10:00:00", "2026-01-01T10:00:05")
    record = JobRecord(
        tmp_path / "launch" / "slurm-jobs.json",
        str(tmp_path / "%j"),
        jobs=[RecordedJob("plan", None, "11", str(tmp_path)), RecordedJob("mark", 0, "12_0", str(tmp_path))],
        planned=["plan", "mark", "write", "train-marked"],
        command="mtrack run cfg.yaml --launcher slurm",
        earlier=[RecordedJob("plan", None, "3", str(tmp_path))],
    )
    record.save()
    again = JobRecord.load(record.path)
    assert again == record and again.unsubmitted == ["write", "train-marked"]

    class Settled(Follower):
        def poll(self) -> list[str]:
            return self.update({"11": done, "12_0": done})

    lines: list[str] = []
    with pytest.raises(StageError, match=r"completed, but the submission stopped part-way: write, train-marked never"):
        follow(again, lines.append, Settled(again))
    assert "submit the rest with `mtrack run cfg.yaml --launcher slurm`" in again.unsubmitted_line()
    assert not any("all 2 job(s) completed" in line for line in lines)


def test_resumes_reach_the_follower_with_their_step_and_requeue(tmp_path: Path) -> None:
    """What the train stage writes when Lightning restores its checkpoint (`resumes.json`) becomes one
    line each in the follower and `mtrack status`, once."""
    from pipeline.store import write_json

    write_json(tmp_path / "resumes.json", [{"step": 40, "epoch": 2, "requeues": 1, "at": 1.0}])
    record = JobRecord(
        tmp_path / "r.json", str(tmp_path / "%j"), jobs=[RecordedJob("train-marked", None, "5", str(tmp_path), 6)]
    )
    follower = Follower(record)
    running = JobState("RUNNING", "None", "n1", "2026-01-01T10:00:00", "")
    lines = follower.update({"5": running})
    assert "train-marked: resumed (1) from its checkpoint at step 40, epoch 2, after SLURM requeue 1" in lines
    assert not any("resumed" in line for line in follower.update({"5": running}))
