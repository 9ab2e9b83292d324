"""Nothing read from disk can run code or reach outside the run: checkpoints load weights-only, keys
are plain JSON, and manifests cannot name files outside their stage's folder."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from conftest import Payload

from pipeline.core.models import load_weights
from pipeline.owner.key import KEY_NAME, load_key
from pipeline.store import Stage, StageError, file_sha256, write_json


def test_malicious_checkpoint_is_refused_without_running(tmp_path: Path) -> None:
    evil, marker = tmp_path / "model.pt", tmp_path / "executed"
    evil.write_bytes(pickle.dumps({"state_dict": Payload(marker), "meta": "{}"}))
    with pytest.raises(StageError, match="model.pt: refused"):
        load_weights(evil)
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the control: an ordinary unpickler does run it
    assert marker.exists()


def test_key_file_is_plain_json(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    (tmp_path / KEY_NAME).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(StageError, match=f"{KEY_NAME}: not valid JSON"):
        load_key(tmp_path / KEY_NAME, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("rel", ["../x", "../../etc/hostname", "sub/../../x", "/etc/hostname"])
def test_manifest_cannot_name_files_outside_the_stage(rel: str, tmp_path: Path) -> None:
    stage = Stage(tmp_path / "run", "plan", "hash")
    (tmp_path / "run" / "x").parent.mkdir(parents=True)
    (tmp_path / "run" / "x").write_text("outside the stage")
    write_json(stage.path("manifest.json"), {"config_hash": "hash", "outputs": {rel: "0"}, "sizes": {}})
    with pytest.raises(StageError, match="lies outside"):
        stage.done(verify_hashes=True)


def test_manifest_may_name_files_in_subfolders(tmp_path: Path) -> None:
    stage = Stage(tmp_path / "run", "audit", "hash")
    write_json(stage.path("sub/scores.json"), {"ok": True})
    write_json(
        stage.path("manifest.json"),
        {"config_hash": "hash", "outputs": {"sub/scores.json": file_sha256(stage.path("sub/scores.json"))}},
    )
    assert stage.done(verify_hashes=True)
    assert json.loads(stage.path("sub/scores.json").read_text()) == {"ok": True}
