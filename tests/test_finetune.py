"""Fine-tuning from a pretrained network: `train.init_weights` takes a model.pt this pipeline trained,
and `train.finetune: head` trains only the last layer, leaving every other tensor (BatchNorm
statistics included) exactly as pretrained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import mtrack, tiny_config

from pipeline.config import ConfigError, load_config
from pipeline.core.models import Normalized, build_model, load_pretrained, save_weights
from pipeline.store import StageError


def test_a_model_of_ours_seeds_another_label_set(tmp_path: Path) -> None:
    """A 5-class model.pt starts a 10-class network: the backbone is loaded, the head stays new."""
    pretrained = build_model("small_cnn", 5, 8)
    save_weights(Normalized(pretrained, (0.5,), (0.25,)), {"arch": "small_cnn"}, tmp_path / "model.pt")
    net = build_model("small_cnn", 10, 8)
    fresh_head = net[-1].weight.clone()
    load_pretrained(net, tmp_path / "model.pt")
    theirs = pretrained.state_dict()
    for name, tensor in net.state_dict().items():
        if theirs[name].shape == tensor.shape:
            assert torch.equal(tensor, theirs[name]), name
    assert torch.equal(net[-1].weight, fresh_head)

    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(StageError, match="list.pt is not a state_dict"):
        load_pretrained(net, tmp_path / "list.pt")


def test_head_only_needs_weights_to_start_from(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"train": {"finetune": "head"}}))
    with pytest.raises(ConfigError, match="train.finetune 'head' .* set train.init_weights"):
        load_config(config)


def test_head_only_fine_tuning_changes_only_the_head(tiny_run: Path, tmp_path: Path) -> None:
    """Training the tiny run's marked model again, head only: every backbone tensor (BatchNorm running
    statistics included, which a backbone left in train mode would update) equals the pretrained one."""
    run = Path(load_config(tiny_run).run_dir)
    copy = tmp_path / "run"
    for stage in ("plan", "mark", "write"):
        shutil.copytree(run / stage, copy / stage)
    tree = yaml.safe_load(tiny_run.read_text())
    tree["run_dir"] = str(copy)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tree))
    pretrained = run / "train-marked" / "model.pt"
    result = mtrack(
        "train", str(config), "--arm", "marked",
        "--set", f"train.init_weights={pretrained}", "--set", "train.finetune=head", "--set", "train.epochs=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval mode" not in result.stderr  # Lightning's remark on the frozen backbone, which is meant
    before = torch.load(pretrained, weights_only=True)["state_dict"]
    after = torch.load(copy / "train-marked" / "model.pt", weights_only=True)["state_dict"]
    head = [name for name in after if after[name].ndim == 2][-1]  # the only linear layer's weight
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed == {head, head.replace(".weight", ".bias")}


def test_replacing_the_weights_file_reruns_training_not_planning(tmp_path: Path) -> None:
    """The weights to start from are an input of the train stage: new bytes under the same name give
    it (and the audit after it) another hash, so a finished run refuses to mix them in; the stages
    before training keep theirs."""
    from pipeline.stages.contract import Task, config_hash

    weights = tmp_path / "backbone.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    cfg = load_config(tiny_config(tmp_path), [f"train.init_weights={weights}"])
    tasks = [Task("plan"), Task("write"), Task("train", "marked"), Task("audit", "marked")]
    before = {t.name: config_hash(cfg, t) for t in tasks}
    torch.save({"w": torch.ones(4)}, weights)
    after = {t.name: config_hash(cfg, t) for t in tasks}
    assert [name for name in before if before[name] != after[name]] == ["train-marked", "audit-marked"]
