"""A data owner marking their own folder: formats, the key file, and never touching originals."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import MarkConfig
from pipeline.data.images import ImageError, read_rgb
from pipeline.owner.designs import DesignParams
from pipeline.owner.key import KEY_NAME
from pipeline.owner.marking import mark_folder, mark_images
from pipeline.store import StageError, file_sha256


def _folder(root: Path) -> Path:
    src = root / "photos"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(src / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(src / "grey.png")
    Image.fromarray(rng.integers(0, 256, (16, 24, 4), dtype=np.uint8), mode="RGBA").save(src / "sub" / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (18, 18), dtype=np.uint16)).save(src / "deep16.png")
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert("P").save(src / "palette.gif")
    rotated = Image.fromarray(rng.integers(0, 256, (10, 30, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rotated.save(src / "phone.jpg", exif=exif, quality=95)
    (src / "notes.txt").write_text("not an image, ignored")
    return src


def test_marks_every_format_losslessly_with_a_key(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    before = {p: file_sha256(p) for p in src.rglob("*") if p.is_file()}
    everything = DesignParams(design="pattern")  # publishes every image, so every format is marked
    key = mark_folder(src, tmp_path / "out", MarkConfig(), seed=42, params=everything)
    assert {p: file_sha256(p) for p in src.rglob("*") if p.is_file()} == before  # originals untouched
    assert len(key["files"]) == 6 and key["published"] == list(range(6))
    entries = {e["original"]: e for e in key["files"]}
    assert entries["phone.jpg"]["height"] == 30 and entries["phone.jpg"]["width"] == 10  # EXIF applied
    for entry in key["files"]:
        marked = read_rgb(tmp_path / "out" / entry["marked"])
        assert marked.shape == (entry["height"], entry["width"], 3)
        assert file_sha256(tmp_path / "out" / entry["marked"]) == entry["marked_sha256"]
    on_disk = json.loads((tmp_path / "out" / KEY_NAME).read_text())
    assert on_disk["seed"] == 42 and on_disk["mark"]["alpha"] == 0.7
    assert (tmp_path / "out" / KEY_NAME).stat().st_mode & 0o077 == 0  # private
    # same seed, same marks
    again = mark_folder(src, tmp_path / "out2", MarkConfig(), seed=42, params=everything)
    assert [e["marked_sha256"] for e in again["files"]] == [e["marked_sha256"] for e in key["files"]]


def test_resizes_to_the_stored_grid(tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    Image.fromarray(np.zeros((300, 150, 3), np.uint8)).save(src / "a.png")
    key = mark_folder(src, tmp_path / "out", MarkConfig(), seed=1, max_resolution=100, params=DesignParams("pattern"))
    assert (key["files"][0]["height"], key["files"][0]["width"]) == (100, 50)


@pytest.mark.parametrize("out", ["photos", "photos/marked"])
def test_refuses_to_write_into_the_originals(tmp_path: Path, out: str) -> None:
    src = _folder(tmp_path)
    with pytest.raises(StageError, match="separate from the input folder"):
        mark_folder(src, tmp_path / out, MarkConfig(), seed=1)


def test_refuses_an_existing_key_and_names_corrupt_files(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    mark_folder(src, tmp_path / "out", MarkConfig(), seed=1)
    with pytest.raises(StageError, match="key already exists"):
        mark_folder(src, tmp_path / "out", MarkConfig(), seed=2)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageError, match="broken.jpg"):
        mark_folder(src, tmp_path / "out3", MarkConfig(), seed=1)


def test_command_line(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "owner",
            "mark",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--seed",
            "3",
            "--alpha",
            "0.8",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "o" / KEY_NAME).read_text())["mark"]["alpha"] == 0.8
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "owner",
            "mark",
            str(src),
            "--out",
            str(tmp_path / "p"),
            "--alpha",
            "1.5",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "alpha" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# Every option of the owner's commands, with the bounds docs/owner.md gives for the numbers.
OWNER_HELP = {
    "mark": {
        "--out": "",
        "--force": "",
        "--seed": "(0 <= S <= 2**63 - 1;",
        "--noise": "",
        "--epsilon": "(0.0 <= E <= 1.0;",
        "--alpha": "(0.0 < A <= 1.0;",
        "--pattern": "",
        "--ood-folder": "",
        "--max-resolution": "(8 <= R)",
        "--design": "",
        "--publish": "",
        "--draws": "(1 <= B <= 9999;",
        "--n-patterns": "(2 <= N <= 1000;",
        "--label": "(0 <= L < 100000)",
    },
    "audit": {
        "--model": "",
        "--access": "",
        "--user": "",
        "--arch": "",
        "--num-classes": "(2 <= C <= 100000)",
        "--key": "",
        "--originals": "",
        "--label": "(0 <= L < 100000,",
        "--alpha": "(0.0 < A < 1.0;",
        "--draws-seed": "",
        "--all-draws": "",
        "--json": "",
    },
}


@pytest.mark.parametrize("command", OWNER_HELP)
def test_help_lists_every_option_with_its_bounds(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["owner", command, "--help"])
    assert done.value.code == 0
    entries = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:")[1])[1:]  # one per option
    described = {entry.split()[0]: " ".join(entry.split()) for entry in entries if not entry.startswith("-h")}
    assert described.keys() == OWNER_HELP[command].keys()
    for flag, bounds in OWNER_HELP[command].items():
        assert bounds in described[flag], described[flag]


def test_publishes_a_secret_subset_and_lists_every_original(tmp_path: Path) -> None:
    """The subset design publishes K of the folder's images, chosen by the seed; the key lists all
    originals (the audit re-marks the others) and the marked copies of the published ones only."""
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(30):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            src / f"{i:02d}.png"
        )
    key = mark_folder(src, tmp_path / "out", MarkConfig(), seed=5, params=DesignParams(publish=4))
    assert key["design"] == "subset" and len(key["files"]) == 30 and len(key["published"]) == 4
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        key["files"][i]["marked"] for i in key["published"]
    ]
    assert all(("marked" in e) == (i in key["published"]) for i, e in enumerate(key["files"]))
    other = mark_folder(src, tmp_path / "out2", MarkConfig(), seed=6, params=DesignParams(publish=4))
    assert other["published"] != key["published"]  # the seed chooses (a clash has probability 1 / C(30, 4))
    default = mark_folder(src, tmp_path / "out3", MarkConfig(), seed=5)
    assert len(default["published"]) == 3  # a tenth of the folder


def test_mark_images_channels_first() -> None:
    """Images of two sizes, each marked (3, H, W) with `channels_first`: the transpose of (H, W, 3)."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((20, 30, 3), (16, 16, 3), (20, 30, 3))]
    shas = [f"{i:064x}" for i in (11, 12, 13)]
    last = mark_images(images, shas, 7, MarkConfig(), None, None)
    first = mark_images(images, shas, 7, MarkConfig(), None, None, channels_first=True)
    assert [a.shape for a in first] == [(3, 20, 30), (3, 16, 16), (3, 20, 30)]
    assert all(np.array_equal(a, b.transpose(2, 0, 1)) for a, b in zip(first, last))
    assert not np.array_equal(last[0], images[0])
