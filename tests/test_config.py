from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "mark:\n  alpah: 0.5\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: mark.alpah: not a known key"):
        load_config(path)


@pytest.mark.parametrize(
    "text, key",
    [
        ("mark:\n  alpha: 1.5\n", "mark.alpha"),
        ("mark:\n  alpha: 0\n", "mark.alpha"),
        ("mark:\n  epsilon: -0.1\n", "mark.epsilon"),
        ("train:\n  epochs: many\n", "train.epochs"),
        ("data:\n  source: imagenet21k\n", "data.source"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_write(tmp_path, text))


INTERNAL = ("instance of", "Value error", "Config", "Table", "dict_type", "model_type")


@pytest.mark.parametrize(
    "override, says",
    [
        ("audit.fdr_nonmembers=true", "audit.fdr_nonmembers: should be a number, found true"),
        ("train.lr=false", "train.lr: should be a number, found false"),
        ("train.milestones=[10, true]", "train.milestones: should be a number, found true"),
        ("train.devices=true", "train.devices: should be a number, found true"),
        ("wandb.enabled=1", "wandb.enabled: should be true or false, found 1"),
        ("plan.owners=3", "plan.owners: should be a section of key: value settings, found 3"),
        ("data=[1]", "data: should be a section of key: value settings, found a list"),
        (
            "train.epochs=many",
            "train.epochs: Input should be a valid integer, unable to parse string as an integer, found 'many'",
        ),
        ("mark.pattern=ood_image", "mark: pattern 'ood_image' needs exactly one of mark.ood_folder or"),
        ("plan.owners={images: 4, bogus: 1}", "plan.owners.bogus: not a known key"),
    ],
)
def test_errors_name_the_key_in_the_users_words(tmp_path: Path, override: str, says: str) -> None:
    """Booleans are not numbers (pydantic would take true as 1), and no class name or pydantic
    prefix ("instance of OwnersConfig", "Value error,") reaches the user."""
    path = _write(tmp_path, "seed: 1\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, [override])
    message = str(refused.value).removeprefix(f"{path}: ")
    assert message.startswith(says.split(":")[0]) and says in message, message
    assert not any(word in message for word in INTERNAL), message


def test_overrides_and_missing_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "seed: 3\n"), ["train.epochs=7", "mark.noise=uniform"])
    assert cfg.train.epochs == 7 and cfg.mark.noise == "uniform" and cfg.seed == 3
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_members_must_fit_training_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exceeds data.n_train"):
        load_config(_write(tmp_path, "data:\n  n_train: 50\nplan:\n  n_member_users: 10\n  samples_per_user: 10\n"))


def test_imagenet_recipe_plans_at_full_scale(repo: Path) -> None:
    """The ImageNet config's users fit ImageNet's class sizes (732 to 1300 images per class): every
    non-member user finds K held-out images of its class."""
    import numpy as np

    from pipeline.data.sources import ImageSplits
    from pipeline.stages.plan import make_plan

    cfg = load_config(repo / "configs" / "imagenet-rn50.yaml", ["data.root=/nonexistent"])
    sizes = np.full(1000, 1300)
    sizes[:300] = np.linspace(732, 1299, 300).astype(int)
    sizes[-1] += 1_281_167 - sizes.sum()
    labels = np.repeat(np.arange(1000), sizes)
    data = ImageSplits(
        "imagenet",
        tuple(f"n{i:08d}" for i in range(1000)),
        np.zeros(0),
        labels,
        np.zeros(0),
        np.zeros(50_000, np.int64),
    )
    body, train_ids = make_plan(cfg, data)
    assert len(train_ids) == 1_131_167 and len(body["users"]) == 1500
    assert {len(u["sample_ids"]) for u in body["users"]} == {64}


def test_every_shipped_config_loads(repo: Path) -> None:
    paths = sorted((repo / "configs").glob("*.yaml"))
    assert len(paths) >= 5, paths  # a moved folder must not leave nothing to check
    for path in paths:
        load_config(path)


def test_extends_starts_from_the_named_config(repo: Path, tmp_path: Path) -> None:
    swin, rn50 = (
        load_config(repo / "configs" / "imagenet-swint.yaml"),
        load_config(repo / "configs" / "imagenet-rn50.yaml"),
    )
    assert (swin.train.arch, swin.train.optimizer, swin.train.epochs) == ("swin_t", "adamw", 300)
    assert swin.data == rn50.data and swin.plan == rn50.plan and swin.launch == rn50.launch
    assert swin.train.label_smoothing == rn50.train.label_smoothing  # inherited inside a section
    loop = _write(tmp_path, "extends: cfg.yaml\nseed: 1\n")  # _write names it cfg.yaml
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(loop)


@pytest.mark.parametrize("text", ["0", "[]", "false", "''", "- seed: 1\n"])
def test_a_config_that_is_no_mapping_is_refused(tmp_path: Path, text: str) -> None:
    """Found by the fuzz test: "0" used to load as an empty config and run every default."""
    with pytest.raises(ConfigError, match="cfg.yaml: expected a mapping at the top level"):
        load_config(_write(tmp_path, text))


def test_an_empty_config_is_every_default(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "# nothing set\n")) == load_config(_write(tmp_path, ""))


def test_yaml_errors_name_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg.yaml: not valid YAML: found character '\\t' .* at line 3, column 1$"):
        load_config(_write(tmp_path, "seed: 1\ntrain:\n\tepochs: 2\n"))
    with pytest.raises(ConfigError, match=r"--set train.epochs: not valid YAML: .* at column 2$"):
        load_config(_write(tmp_path, "seed: 1\n"), ["train.epochs={"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=.inf", "train.lr"),
        ("mark.epsilon=.nan", "mark.epsilon"),
        ("seed=-1", "seed"),
        (f"seed={2**63}", "seed"),
        ("launch.audit_shards=20000", "launch.audit_shards"),
    ],
)
def test_numbers_a_generator_or_launcher_cannot_take(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"cfg.yaml: {key.replace('.', '[.]')}: "):
        load_config(_write(tmp_path, "seed: 1\n"), [override])
