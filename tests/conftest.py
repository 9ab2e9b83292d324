"""Shared fixtures: small deterministic data that every test can afford."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def repo() -> Path:
    return REPO


class Payload:
    """Unpickling this runs `touch <path>`: a stand-in for what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def mtrack(*args: str, cwd: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """The command line as a user runs it, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=timeout,
    )


def tiny_config(folder: Path, **overrides: object) -> Path:
    """configs/tiny.yaml with its run and results under `folder` (and top-level overrides)."""
    tree = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    tree.update(run_dir=str(folder / "run"), results_dir=str(folder / "results"), **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(tree))
    return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DAG run once locally through the CLI; its config path (tests must not modify it). What
    the run printed is kept next to it, in console.log."""
    config = tiny_config(tmp_path_factory.mktemp("tiny"))
    result = mtrack("run", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    (config.parent / "console.log").write_text(result.stdout + result.stderr)
    return config


def _slurm_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """A real SLURM cluster (slurm/setup-local-slurm.sh starts one). Skips without one, unless
    MTRACK_REQUIRE_SLURM=1 (set by .ci/run, which starts the cluster): there it is a failure."""
    if _slurm_answers():
        return
    if os.environ.get("MTRACK_REQUIRE_SLURM") == "1":
        pytest.fail("no SLURM cluster answers; start one with `sudo bash slurm/setup-local-slurm.sh`")
    pytest.skip("no SLURM cluster (start one with `sudo bash slurm/setup-local-slurm.sh`)")


SHARED = {"tiny_run", "slurm_cluster"}  # the session's tiny run; the cluster's two CPUs


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs `-n auto --dist loadgroup`): a module's tests stay on one
    worker, so its module fixtures are built once; every test using the tiny run or the SLURM
    cluster shares one worker, so the run is made once and cluster jobs never queue behind each other."""
    for item in items:
        shared = SHARED & set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.xdist_group("shared" if shared else item.nodeid.split("::")[0]))
