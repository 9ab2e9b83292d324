"""A data owner's audit: exact p-values for owners whose images a model never saw, the smallest p
for models that memorised the published images (a 1-nearest-neighbour memoriser and a small CNN
trained on Fashion-MNIST), for every design, as callables and on the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import binom

from pipeline.config import DataConfig, MarkConfig
from pipeline.core.models import Normalized, build_model, save_weights
from pipeline.core.stats import binomial_limits, sequential_p_value
from pipeline.data.images import read_rgb
from pipeline.data.sources import load_source
from pipeline.owner import audit as owner_audit
from pipeline.owner.access import Access
from pipeline.owner.audit import audit_owner, candidate_mean_losses
from pipeline.owner.designs import DESIGNS, Candidate, DesignParams, published_candidate, published_pattern_seed
from pipeline.owner.key import KEY_NAME, load_key, validate_key
from pipeline.owner.marking import mark_folder
from pipeline.stages.mark import owner_folder
from pipeline.store import StageError

# Each design publishes 6 images (subset and groups: of 60); small candidate families keep the tests fast
PARAMS = {
    "subset": DesignParams("subset", publish=6, draws=19),
    "groups": DesignParams("groups", publish=6),
    "pattern": DesignParams("pattern", n_patterns=20),
}


def _write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An owner's 60 synthetic images of class 0 (6 of them for the pattern design), marked under each
    design; other data of 4 classes."""
    tmp = tmp_path_factory.mktemp("owner")
    data = load_source(
        DataConfig(source="synthetic", image_size=16, n_train=10, synthetic_per_class=200, synthetic_classes=4)
    )
    owner_ids = np.flatnonzero(data.train_labels == 0)[:60]
    originals = _write_folder(tmp / "originals", data.train_images[owner_ids])
    six = _write_folder(tmp / "six", data.train_images[owner_ids[:6]])  # the pattern design publishes every image
    keys = {
        d: mark_folder(six if d == "pattern" else originals, tmp / d, MarkConfig(), seed=11, label=0, params=p)
        for d, p in PARAMS.items()
    }
    others = np.setdiff1d(np.arange(len(data.train_labels)), owner_ids)
    return tmp, data, keys, others


class NearestNeighbour:
    """A 1-nearest-neighbour classifier as a black-box model: the purest memoriser (every training
    image is recalled exactly), logits = minus the mean squared pixel distance to each class's nearest image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, n_classes: int = 4) -> None:
        self.train = torch.from_numpy(images).permute(0, 3, 1, 2).reshape(len(images), -1).float() / 255
        self.labels, self.n_classes = torch.from_numpy(labels), n_classes

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        dist = torch.cdist(batch.reshape(len(batch), -1).float() / 255, self.train) ** 2 / self.train.shape[1]
        return torch.stack([-dist[:, self.labels == c].min(dim=1).values for c in range(self.n_classes)], dim=1) * 200


def _published(folder: Path, key: dict[str, Any]) -> np.ndarray:
    return np.stack([read_rgb(folder / key["files"][i]["marked"]) for i in key["published"]])


@pytest.mark.parametrize("design", DESIGNS)
def test_model_that_memorised_the_published_images_gets_the_smallest_p(world, design: str) -> None:
    tmp, data, keys, others = world
    published = _published(tmp / design, keys[design])
    model = NearestNeighbour(
        np.concatenate([data.train_images[others[:300]], published]),
        np.concatenate([data.train_labels[others[:300]], np.zeros(len(published), np.int64)]),
    )
    result = audit_owner(load_key(tmp / design / KEY_NAME, tmp / design), model, draws_seed=0)
    assert result["p_value"] == pytest.approx(result["smallest_possible_p_value"])
    assert result["published_loss"] < result["candidates_loss"]["min"]


def _another_owner(key: dict[str, Any], seed: int, params: DesignParams | None = None) -> dict[str, Any]:
    """The key another owner with the same originals would hold: what mark_folder writes, with its
    published files' marked copies named but never written (the audit scores the originals)."""
    params = params or PARAMS[key["design"]]
    published, fields = published_candidate(params, seed, len(key["files"]))
    originals = [{k: e[k] for k in ("original", "original_sha256", "height", "width")} for e in key["files"]]
    for i in published.files:
        originals[i].update(marked=f"{i}.png", marked_sha256=originals[i]["original_sha256"])
    return {**key, "seed": seed, "published": list(published.files), **fields, "files": originals}


@pytest.mark.parametrize("design", DESIGNS)
def test_owners_the_model_never_saw_get_uniform_p_values(world, design: str) -> None:
    """200 owners with their own secrets and a model that never saw any of them (a memoriser of
    other images, so losses differ a lot between images): every level's rejection rate stays
    inside its binomial 95% limits (p is uniform on {1/N, ..., 1} for N candidates)."""
    tmp, data, keys, others = world
    model = NearestNeighbour(data.train_images[others[:300]], data.train_labels[others[:300]])
    results = [audit_owner(_another_owner(keys[design], 1000 + s), model, draws_seed=s) for s in range(200)]
    p = np.array([r["p_value"] for r in results])
    for level in (results[0]["smallest_possible_p_value"], 0.2, 0.5):
        lo, hi = binomial_limits(len(p), level)
        assert lo <= (p <= level + 1e-9).mean() <= hi, (level, (p <= level + 1e-9).mean())
    assert binom.sf((p <= 0.5).sum() - 1, len(p), 0.5) > 1e-3  # not piled up at small values


def test_the_audit_stops_early_for_owners_the_model_never_saw_and_decides_as_scoring_all(world) -> None:
    """At the CLI's level the audit scores candidates a round at a time and stops once p must lie
    above it: never-trained-on owners get the verdict and (where p <= level) the p-value that scoring
    all 49 draws gives, for a fraction of the queries (validity at every level: test_stats); a
    memoriser's owner is scored in full and gets the smallest p."""
    tmp, data, keys, others = world
    params = DesignParams("subset", publish=6, draws=49)
    model = NearestNeighbour(data.train_images[others[:300]], data.train_labels[others[:300]])
    scored, queries = [], []
    for s in range(16):
        key = _another_owner(keys["subset"], 3000 + s, params)
        quick = audit_owner(key, owner_audit.Predictor(model, "m"), draws_seed=s, alpha=0.05, batch_size=30)
        full = audit_owner(key, owner_audit.Predictor(model, "m"), draws_seed=s, alpha=0.05, all_draws=True)
        assert (quick["p_value"] <= 0.05) == (full["p_value"] <= 0.05) and full["n_scored"] == 49
        assert quick["p_value"] == full["p_value"] or (quick["stopped"] and quick["p_value"] > 0.05)
        scored.append(quick["n_scored"])
        queries.append(quick["queries"] / full["queries"])
    assert np.mean(scored) < 30 and np.mean(queries) < 0.7, (scored, np.mean(queries))
    memorised = _published(tmp / "subset", keys["subset"])
    memoriser = NearestNeighbour(
        np.concatenate([data.train_images[others[:300]], memorised]),
        np.concatenate([data.train_labels[others[:300]], np.zeros(len(memorised), np.int64)]),
    )
    seen = audit_owner(keys["subset"], memoriser, draws_seed=0, alpha=0.05)
    assert seen["n_scored"] == 19 and not seen["stopped"]
    assert seen["p_value"] == pytest.approx(seen["smallest_possible_p_value"])


def test_a_memorised_owners_audit_ends_at_the_early_look(world) -> None:
    """With 999 draws at level 0.05, a model that recalls the published copies is found after the 199
    candidates of the early look (p = 1/200, a tenth of the level), about a fifth of the queries that
    scoring every draw for p = 1/1000 takes."""
    tmp, data, keys, others = world
    key = _another_owner(keys["subset"], 77, DesignParams("subset", publish=6, draws=999))
    images, hashes = owner_audit.read_originals(key, Path(key["source_folder"]))
    published = Candidate(tuple(key["published"]), published_pattern_seed(key))
    copies = owner_audit.marked_candidate(published, images, hashes, MarkConfig.model_validate(key["mark"]), None, None)
    memoriser = NearestNeighbour(
        np.concatenate([data.train_images[others[:300]], np.stack(copies)]),
        np.concatenate([data.train_labels[others[:300]], np.zeros(len(copies), np.int64)]),
    )
    quick = audit_owner(key, owner_audit.Predictor(memoriser, "m"), draws_seed=0, alpha=0.05)
    full = audit_owner(key, owner_audit.Predictor(memoriser, "m"), draws_seed=0, alpha=0.05, all_draws=True)
    assert quick["decided_early"] and not quick["stopped"] and quick["n_scored"] == quick["early_look"] == 199
    assert quick["p_value"] == 1 / 200 and full["p_value"] == pytest.approx(1 / 1000) and not full["decided_early"]
    assert quick["queries"] < full["queries"] / 4


def _fashion(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`per_class` Fashion-MNIST training images of each class, and the rest's ids."""
    data = load_source(DataConfig(source="fashion_mnist", image_size=28, n_train=10))
    rng = np.random.default_rng(seed)
    ids = np.concatenate([rng.permutation(np.flatnonzero(data.train_labels == c))[:per_class] for c in range(10)])
    return data.train_images, data.train_labels, ids


def _train_cnn(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int = 0) -> torch.nn.Module:
    """A small CNN trained to memorise (no weight decay, no augmentation), as the demo trains."""
    torch.manual_seed(seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels)
    model = Normalized(build_model("small_cnn", 10, 16), (0.29,) * 3, (0.35,) * 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    steps = epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - 63, 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@pytest.mark.slow
def test_owner_audit_detects_a_trained_cnn(tmp_path: Path) -> None:
    """Three owners of Fashion-MNIST images publish 10 of their 100 with the default design; a small
    CNN trains on 2,000 other images plus the first owner's published ones. The trained-on owner gets
    a small p-value, the two others do not (their p-values are uniform, so each is small only rarely)."""
    torch.set_num_threads(1)  # small batches on a shared CPU: one thread is fastest
    images, labels, ids = _fashion(200, seed=0)
    rest = np.setdiff1d(np.flatnonzero(labels == 4), ids)  # coat: neither easy nor the hardest class
    keys, folders = [], []
    for owner in range(3):
        folder = _write_folder(tmp_path / f"originals{owner}", images[rest[owner * 100 : (owner + 1) * 100]])
        keys.append(
            mark_folder(
                folder,
                tmp_path / f"published{owner}",
                MarkConfig(),
                seed=owner,
                label=4,
                params=DesignParams(publish=10, draws=99),
            )
        )
        folders.append(tmp_path / f"published{owner}")
    published = _published(folders[0], keys[0])
    model = _train_cnn(
        np.concatenate([images[ids], published]), np.concatenate([labels[ids], np.full(10, 4)]), epochs=30
    )
    p = [audit_owner(key, model, draws_seed=7)["p_value"] for key in keys]
    assert p[0] <= 0.02, p
    assert min(p[1:]) > 0.02, p


def test_command_line_verdict_json_and_wrong_key(world, tmp_path: Path) -> None:
    tmp, data, keys, others = world
    model = Normalized(build_model("small_cnn", 4, 16), (0.5,) * 3, (0.25,) * 3).eval()
    weights = tmp_path / "model.pt"
    save_weights(
        model, {"arch": "small_cnn", "width": 16, "num_classes": 4, "mean": [0.5] * 3, "std": [0.25] * 3}, weights
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "owner",
            "audit",
            "--model",
            str(weights),
            "--user",
            str(tmp / "subset"),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "verdict:" in result.stdout and "p = " in result.stdout and "--draws-seed" in result.stdout
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["design"] == "subset" and saved["n_candidates"] == 19 and saved["n_images"] == 6
    again = audit_owner(keys["subset"], model, draws_seed=saved["draws_seed"], alpha=0.05)  # the CLI's default level
    assert again["p_value"] == saved["p_value"] and again["published_loss"] == pytest.approx(saved["published_loss"])
    assert (saved["n_scored"] < 19) == saved["stopped"] == (f"stopped early: {saved['stop_after']} of" in result.stdout)
    other = tmp_path / "elsewhere"
    other.mkdir()
    first = keys["subset"]["files"][keys["subset"]["published"][0]]["marked"]
    (other / first).write_bytes((tmp / "subset" / first).read_bytes()[:-10])
    with pytest.raises(StageError, match=f"{first}: not the image .* recorded"):
        load_key(tmp / "subset" / KEY_NAME, other)


def test_owner_benchmark_runs_owners_through_the_pipeline(tmp_path: Path, monkeypatch, capfd) -> None:
    """`make owner-audit` on the tiny synthetic run: owners' folders marked by their own tool replace
    training images through plan/mark/write/train, `mtrack owner audit` runs for every owner, and each
    reported p-value is the full test's (`--all-draws`: every draw scored), counted
    here from the losses the audit scored (power is the trained-CNN test's and the benchmark's job).
    With `--arms marked control`, every owner is audited again against the control network, where
    each is a null: their rows hold no trained-on owner. With `--rekey 1`, each never-trained-on
    owner's originals are marked again by the owner's tool with a seed of their own (another
    published subset) and audited too, counted apart in the calibration table."""
    from bench.common import run_reporting_errors
    from bench.owner_audit import main as owner_benchmark

    scored: list[list[np.ndarray]] = [[]]  # per audit, the losses of each round it scored

    def recording(*args: Any, **kwargs: Any) -> np.ndarray:
        scored[-1].append(candidate_mean_losses(*args, **kwargs))
        return scored[-1][-1]

    def deciding(*args: Any) -> tuple[float, int] | None:
        if (decided := sequential_p_value(*args)) is not None:
            scored.append([])  # the audit ends here
        return decided

    monkeypatch.setattr(owner_audit, "candidate_mean_losses", recording)
    monkeypatch.setattr(owner_audit, "sequential_p_value", deciding)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as finished:  # as a command: its console, its exit status
        run_reporting_errors(
            lambda: owner_benchmark(
                [
                    "--config",
                    "configs/tiny.yaml",
                    "--designs",
                    "subset",
                    "--out",
                    str(tmp_path / "results"),
                    "--set",
                    f"run_dir={run}",
                    "--set",
                    "train.arms=[marked]",  # the control arm is trained for --arms alone
                    "--set",
                    "plan.n_member_users=3",
                    "--set",
                    "plan.owners={images: 16, never_trained: 2, draws: 19}",
                    "--set",
                    "train.epochs=1",
                    "--access",
                    "logits",
                    "label",
                    "--arms",
                    "marked",
                    "control",
                    "--rekey",
                    "1",
                ]
            )
        )
    assert finished.value.code in (0, None)
    printed = capfd.readouterr().err
    done = set(re.findall(r"pipeline: (owner audits \(\w+, \w+ network\)): 7/7 owners \(100%\)", printed))
    assert done == {f"owner audits ({a}, {n} network)" for a in ("logits", "label") for n in ("marked", "control")}
    assert len(re.findall(r"pipeline: re-keyed owners marked: 2/2 owners \(100%\)", printed)) == 1  # marked once
    result = json.loads((tmp_path / "results" / "results.json").read_text())
    label_only = json.loads((tmp_path / "results" / "subset-label.json").read_text())
    assert label_only["access"] == "label"
    for audit in map(json.loads, map(Path.read_text, Path(f"{run}-subset").glob("owner-audit-label/*.json"))):
        # 8 views of the probe image, then of K = 8 images per candidate scored
        assert audit["queries"] == 8 * (1 + 8 * (1 + audit["n_scored"]))
    assert (
        len(label_only["trained_on_p"]) == 3
        and "| subset | marked | label |" in (tmp_path / "results" / "README.md").read_text()
    )
    scored = [np.concatenate(rounds) for rounds in scored[:5]]  # the logits audits; the label-only ones follow
    assert result["design"] == "subset" and result["n_images_per_owner"] == 8
    folder = Path(f"{run}-subset")
    plan = json.loads((folder / "plan" / "users.json").read_text())
    assert len(scored) == len(plan["owners"]) == 5  # one audit per owner, in the plan's order
    p = {}
    for owner, losses in zip(plan["owners"], scored):
        audit = json.loads((folder / "owner-audit" / f"{owner['owner_id']:05d}.json").read_text())
        published, draws = losses[0], losses[1:]
        assert len(draws) == audit["n_scored"] and audit["published_loss"] == pytest.approx(published)
        expected, used = sequential_p_value(draws <= published, 19, stop=None)  # --all-draws: the full test
        assert (audit["p_value"], used) == (pytest.approx(expected), len(draws)), owner
        p.setdefault(owner["trained"], []).append(audit["p_value"])
    assert (result["trained_on_p"], result["never_trained_on_p"]) == (p[True], p[False])
    assert len(p[True]) == 3 and len(p[False]) == 2
    owner = plan["owners"][0]
    published = folder / "mark" / "owners" / f"{owner['owner_id']:05d}" / "published"
    key = load_key(published / KEY_NAME, published)
    assert [int(Path(key["files"][i]["original"]).stem) for i in key["published"]] == owner["published"]
    member = next(u for u in plan["users"] if u.get("owner") == owner["owner_id"])
    assert member["sample_ids"] == owner["published"]  # the published images are what the model trained on
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "| subset | marked | logits |" in readme and "| subset | control | label |" in readme
    control = json.loads((tmp_path / "results" / "subset-control.json").read_text())
    assert control["arm"] == "control" and control["trained_on_p"] == [] and control["trained_on_at_0.01"] == 0

    def audits(folder_name: str) -> list[dict[str, Any]]:
        return [json.loads((folder / folder_name / f"{o['owner_id']:05d}.json").read_text()) for o in plan["owners"]]

    assert control["never_trained_on_p"] == [a["p_value"] for a in audits("owner-audit-control")]
    never = [o for o in plan["owners"] if not o["trained"]]
    rekeyed = [folder / "owner-rekeyed" / f"{o['owner_id']:05d}-rekeyed-0" for o in never]
    again = [load_key(f / KEY_NAME, f) for f in rekeyed]
    published_folders = [owner_folder(folder / "mark", o["owner_id"]) / "published" for o in never]
    first = [load_key(f / KEY_NAME, f) for f in published_folders]
    for new, old in zip(again, first):  # the same originals, published under another seed
        assert [f["original_sha256"] for f in new["files"]] == [f["original_sha256"] for f in old["files"]]
        assert new["seed"] != old["seed"] and new["published"] != old["published"]
    assert result["rekeyed_never_trained_on_p"] == [
        json.loads((folder / "owner-audit" / f"{f.name}.json").read_text())["p_value"] for f in rekeyed
    ]
    assert result["calibration"]["re-keyed"]["n"] == 2 and result["calibration"]["never-trained-on"]["n"] == 2
    for level in ("0.05", "0.1"):
        counted = result["calibration"]["re-keyed"][level]
        assert counted["count"] == sum(p <= float(level) for p in result["rekeyed_never_trained_on_p"])
        assert counted["range"] == [binom.ppf(0.025, 2, float(level)), binom.ppf(0.975, 2, float(level))]
    assert control["calibration"]["never-trained-on"]["n"] == 5  # every owner is a null on the control network
    assert "| subset | control | label | 2 re-keyed |" in readme
    # scored by the control network, not the marked one
    assert [a["published_loss"] for a in audits("owner-audit-control")] != [
        a["published_loss"] for a in audits("owner-audit")
    ]


def test_score_benchmark_p_values_are_the_audits(tmp_path: Path) -> None:
    """bench.owner_scores on the tiny run: its default score's p-value for each owner is the one
    `mtrack owner audit --all-draws` reports with the same draws, and every score gives each owner a
    p-value among those the design can reach, the scores calibrated by the run's control model too."""
    from bench.owner_scores import main as score_benchmark
    from bench.owner_scores import scores
    from pipeline.core.models import load_weights
    from pipeline.core.seeds import child_seed

    run = tmp_path / "run"
    overrides = [f"run_dir={run}", "train.arms=[marked]", "plan.n_member_users=2"]
    overrides += ["plan.owners={images: 16, never_trained: 2, draws: 19}", "train.epochs=1"]
    score_benchmark(
        ["--name", "tiny", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "results"), "--reference"]
        + [arg for override in overrides for arg in ("--set", override)]
    )
    result = json.loads((tmp_path / "results" / "scores-tiny.json").read_text())
    assert [row["score"] for row in result["rows"]] == list(scores(with_reference=True))
    assert "## tiny: augment none" in (tmp_path / "results" / "scores.md").read_text()
    folder = Path(f"{run}-subset")
    model, _ = load_weights(folder / "train-marked" / "model.pt")
    assert len(result["owners"]) == 4
    for owner in result["owners"]:
        published = folder / "mark" / "owners" / f"{owner['owner_id']:05d}" / "published"
        audit = audit_owner(
            load_key(published / KEY_NAME, published),
            model.eval(),
            published.parent / "originals",
            draws_seed=child_seed(0, 7, owner["owner_id"]),
            all_draws=True,
        )
        assert owner["p"]["loss"] == pytest.approx(audit["p_value"]), owner
        assert all(p * 20 == pytest.approx(round(p * 20)) and p > 0 for p in owner["p"].values()), owner


@pytest.mark.parametrize("design", ["subset", "groups"])
def test_a_key_naming_other_published_images_is_refused(world, design: str) -> None:
    """Moving the published marks to other images of the folder would audit images that were never
    published: the key must name exactly the choice its seed made."""
    _, _, keys, _ = world
    key = json.loads(json.dumps(keys[design]))
    moved = sorted(set(range(len(key["files"]))) - set(key["published"]))[: len(key["published"])]
    for old, new in zip(key["published"], moved):
        for field in ("marked", "marked_sha256"):
            key["files"][new][field] = key["files"][old].pop(field)
    key["published"] = moved
    with pytest.raises(StageError, match=f"published: not the {design} this seed published"):
        validate_key(key, "edited key")


def test_few_images_report_the_true_smallest_p_and_an_unreachable_level_is_said_up_front(world, tmp_path: Path) -> None:
    """Three images, one published: only 3 distinct subsets exist, so 19 draws repeat the published
    one about 6 times and the smallest p-value is far above 1/20; an audit at a level below it says so
    before it scores anything."""
    tmp, data, _, _ = world
    folder = _write_folder(tmp_path / "three", data.train_images[np.flatnonzero(data.train_labels == 1)[:3]])
    key = mark_folder(folder, tmp_path / "out", MarkConfig(), seed=2, label=1, params=DesignParams(publish=1, draws=19))
    scored: list[int] = []

    def model(batch: torch.Tensor) -> torch.Tensor:
        scored.append(len(batch))
        return torch.zeros(len(batch), 4)

    result = audit_owner(key, model, draws_seed=0)
    repeats = sum(c.files == tuple(key["published"]) for c in owner_audit.null_candidates(key, 0))
    assert repeats >= 2 and result["smallest_possible_p_value"] == pytest.approx((1 + repeats) / 20)
    scored.clear()
    said: list[tuple[str, int]] = []
    audit_owner(key, model, draws_seed=0, alpha=0.05, notify=lambda text: said.append((text, len(scored))))
    ((text, scored_before),) = said
    assert scored_before == 0 and re.match(
        r"the smallest p-value this audit can reach is 0\.\d+, above the level 0\.05", text
    )


@pytest.mark.parametrize("field, value", [("mark.alpha", 0.5), ("mark.noise", "uniform"), ("mark.epsilon", 0.0)])
def test_a_key_whose_marks_were_edited_is_refused_before_scoring(world, field: str, value: Any) -> None:
    """A key edited after marking (here `field`) would score marks that were never published: the
    audit re-marks the published originals under the key and compares them with the published copies."""
    tmp, _, keys, _ = world
    key = json.loads(json.dumps(keys["groups"]))
    section, _, name = field.rpartition(".")
    (key[section] if section else key)[name] = value
    scored: list[int] = []

    def model(batch: torch.Tensor) -> torch.Tensor:
        scored.append(len(batch))
        return torch.zeros(len(batch), 4)

    with pytest.raises(StageError, match="its settings do not make .* was edited"):
        audit_owner(key, model, draws_seed=0, marked_folder=tmp / "groups")
    assert scored == [1]  # the probe of the model's classes only
    assert audit_owner(keys["groups"], model, draws_seed=0, marked_folder=tmp / "groups")["p_value"] > 0


def test_a_label_outside_the_model_is_refused_after_one_image(world) -> None:
    tmp, _, keys, _ = world
    scored: list[int] = []

    def model(batch: torch.Tensor) -> torch.Tensor:
        scored.append(len(batch))
        return torch.zeros(len(batch), 4)

    with pytest.raises(StageError, match="label 9: outside the model's 4 classes"):
        audit_owner(keys["subset"], model, label=9, draws_seed=0)
    assert scored == [1]


def test_a_key_whose_draws_were_edited_is_refused(world) -> None:
    """The number of draws is part of the test the owner committed to: the key holds a number the
    seed derives from it, so an edited `draws` is refused naming the field; an early key without
    that number is still read."""
    _, _, keys, _ = world
    edited = {**keys["subset"], "draws": keys["subset"]["draws"] + 1}
    with pytest.raises(StageError, match=r"the key: draws: 20 is not the number of draws this key was made with"):
        validate_key(edited, "the key")
    early = {k: v for k, v in keys["subset"].items() if k != "draws_check"}
    assert validate_key(early, "the key")["draws"] == 19


LEVELS = ("probs", "topk:2", "topk:1", "label")


class ExactRecall:
    """Class 0 for exactly the memorised images, else what `fallback` says of the other classes: in
    pixel space every marked image lies nearest to a marked one, so a nearest-neighbour memoriser
    labels any marked image 0, and a label-only audit needs a model whose label depends on recall."""

    def __init__(self, memorised: np.ndarray, fallback: NearestNeighbour) -> None:
        self.memorised = torch.from_numpy(memorised).permute(0, 3, 1, 2).reshape(len(memorised), -1).float()
        self.fallback = fallback

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.fallback(batch)
        recalled = torch.cdist(batch.reshape(len(batch), -1).float(), self.memorised).min(1).values < 1e-3
        logits[:, 0] = torch.where(recalled, logits.max(1).values + 1, logits[:, 1:].min(1).values - 1)
        return logits


@pytest.mark.parametrize("level", LEVELS)
def test_every_access_level_detects_a_memoriser_and_stays_exact_without_one(world, level: str) -> None:
    """A memoriser that knows of the owner's class only the published images, seen through an API at
    each level: they still rank first (the subset design), 30 owners it never saw get p-values that
    do not pile up at small values, and the queries are counted (the label level asks 8 views)."""
    tmp, data, keys, others = world
    key = keys["subset"]
    published = _published(tmp / "subset", key)
    other_classes = others[data.train_labels[others] != 0][:300]  # all it knows of class 0 is what it memorised
    memoriser = NearestNeighbour(
        np.concatenate([data.train_images[other_classes], published]),
        np.concatenate([data.train_labels[other_classes], np.zeros(len(published), np.int64)]),
    )
    if level == "label":  # every marked image is nearest to a marked one: only exact recall keeps the label
        memoriser = ExactRecall(published, memoriser)
    seen = audit_owner(key, owner_audit.Predictor(memoriser, "api", Access.parse(level), restrict=True), draws_seed=0)
    assert seen["p_value"] == pytest.approx(seen["smallest_possible_p_value"]) and seen["access"] == level
    per_image = 8 if level == "label" else 1
    assert seen["queries"] == per_image * (1 + 6 * 20)  # the probe, then K images of B + 1 candidates
    never = NearestNeighbour(data.train_images[others[:300]], data.train_labels[others[:300]])
    api = owner_audit.Predictor(never, "api", Access.parse(level), restrict=True)
    p = np.array([audit_owner(_another_owner(key, 2000 + s), api, draws_seed=s)["p_value"] for s in range(30)])
    for alpha in (0.2, 0.5):  # never piled up at small values (the owners share their images: not independent)
        assert binom.sf((p <= alpha + 1e-9).sum() - 1, len(p), alpha) > 1e-3, (alpha, np.sort(p))


@pytest.mark.parametrize(
    "level, returns, says",
    [
        ("probs", lambda b: torch.randn(len(b), 4), "probabilities in [0, 1]"),
        ("probs", lambda b: torch.full((len(b), 4), 0.5), "summing to 1, found 2"),
        ("topk:2", lambda b: torch.rand(len(b), 4).softmax(1), "a pair (classes, probabilities), found Tensor"),
        ("topk:2", lambda b: (torch.zeros(len(b), 3, dtype=torch.long), torch.full((len(b), 3), 0.1)), "(1, 2)"),
        ("topk:2", lambda b: (torch.zeros(len(b), 2), torch.full((len(b), 2), 0.1)), "whole-number classes"),
        ("label", lambda b: torch.randn(len(b), 4), "(1,) whole-number classes, found (1, 4)"),
        ("logits", lambda b: torch.zeros(len(b)), "shape (1, classes)"),
    ],
)
def test_a_callable_not_answering_its_level_is_refused_in_one_line(world, level: str, returns, says: str) -> None:
    _, _, keys, _ = world
    with pytest.raises(StageError) as refused:
        audit_owner(keys["subset"], owner_audit.Predictor(returns, "--model api:f", Access.parse(level)), draws_seed=0)
    message = str(refused.value)
    assert message.startswith(f"--model api:f: for --access {level}, expected") and says in message, message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["topk", "topk:0", "topk:x", "probabilities", "topk:-1", ""])
def test_an_unknown_access_level_is_refused(text: str) -> None:
    with pytest.raises(StageError, match=f"--access {text}: expected one of logits, probs, topk:K, label"):
        Access.parse(text)


def test_label_scores_count_the_views_that_keep_the_label() -> None:
    """A model that is right on the image and its mirror only: 6 of the 8 views lose the label."""
    access = Access.parse("label")
    batch = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).reshape(2, 3, 6, 6)
    outs = [torch.tensor([1, 0]) if i < 2 else torch.tensor([0, 0]) for i in range(len(access.views))]
    assert access.scores(outs, 1).tolist() == [pytest.approx(6 / 8), 1.0]
    assert [tuple(view(batch).shape) for view in access.views] == [(2, 3, 6, 6)] * 8
    censored = Access.parse("topk:2").scores([(torch.tensor([[2, 3]]), torch.tensor([[0.5, 0.3]]))], 1)
    assert censored[0] == pytest.approx(-np.log(0.2))  # the label could have at most 1 - 0.8


def test_candidates_are_marked_in_order_a_few_ahead() -> None:
    """The audit marks candidates on several threads: results come back in the candidates' order,
    at most 2 x threads + 1 are started before the consumer takes the first (memory stays a few
    candidates' images), and what a candidate's marking raises reaches the caller."""
    started: list[int] = []

    def square(i: int) -> int:
        started.append(i)
        if i == 30:
            raise StageError("candidate 30")
        return i * i

    results = owner_audit.in_parallel(square, list(range(40)), 2)
    assert next(results) == 0
    time.sleep(0.5)  # whatever was submitted has run by now
    assert len(started) <= 5
    assert [next(results) for _ in range(29)] == [i * i for i in range(1, 30)]
    with pytest.raises(StageError, match="candidate 30"):
        next(results)
    assert list(owner_audit.in_parallel(square, list(range(5)), 1)) == [0, 1, 4, 9, 16]
