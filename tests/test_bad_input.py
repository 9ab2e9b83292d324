"""Bad input through the command line: exit status 2, one `error: ...` line on stderr naming the file
or key, no traceback, and every output that existed before is byte-for-byte unchanged. Unusual but
valid images (grey, RGBA, 16-bit, palette, ...) are accepted, not refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import Payload
from PIL import Image

from pipeline.cli import main
from pipeline.config import MarkConfig, load_config
from pipeline.core.models import Normalized, build_model, save_weights
from pipeline.data.images import read_rgb
from pipeline.owner.designs import DesignParams
from pipeline.owner.key import KEY_NAME
from pipeline.owner.marking import mark_folder
from pipeline.stages.contract import Task, stage_for
from pipeline.stages.dag import run_task
from pipeline.store import file_sha256

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _digest(path: Path) -> str:
    return file_sha256(path) if path.is_file() else "folder"


def snapshot(*folders: Path) -> dict[Path, str]:
    """Every file (by content) and folder under `folders`: comparing two snapshots catches a file
    changed, removed or left behind."""
    return {p: _digest(p) for folder in folders for p in sorted(folder.rglob("*"))}


def assert_refused(capsys, argv: list, names: str, untouched: dict[Path, str]) -> str:
    """The command exits 2 with one error line containing `names`, and changes none of `untouched`.
    With `capsys` None it runs in its own process (Lightning's log handlers outlive one test's capture)."""
    if capsys is None:
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *map(str, argv)], cwd=REPO, capture_output=True, text=True
        )
        code, err = result.returncode, result.stderr
    else:
        code, err = main([str(a) for a in argv]), capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert names in errors[0], errors[0]
    assert {p: _digest(p) for p in untouched if p.exists()} == untouched, "an earlier output changed"
    return err


# --- a data owner marking a folder ----------------------------------------------------------------


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (16, 12), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    rgb.save(path) if mode == "RGB" else rgb.convert(mode).save(path)


def _png_header(path: Path, width: int, height: int) -> None:
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def owner(tmp_path_factory) -> Path:
    """originals/ (three images), marked/ (their marked copies and key), model.pt (4 classes)."""
    root = tmp_path_factory.mktemp("owner")
    for i in range(3):
        _image(root / "originals" / f"img{i}.png", seed=i)
    every = DesignParams(design="pattern", n_patterns=4)  # every image published: each one's loss is checked
    mark_folder(root / "originals", root / "marked", MarkConfig(), seed=1, label=0, params=every)
    mark_folder(root / "originals", root / "other-marked", MarkConfig(), seed=2, params=every)
    model = Normalized(build_model("small_cnn", 4, 8), (0.5,) * 3, (0.25,) * 3)
    save_weights(
        model,
        {"arch": "small_cnn", "width": 8, "num_classes": 4, "mean": [0.5] * 3, "std": [0.25] * 3},
        root / "model.pt",
    )
    torch.save(model.net.state_dict(), root / "plain_small_cnn.pt")
    (root / "owner_models.py").write_text(OWNER_MODELS)
    (root / "owner_broken.py").write_text("raise RuntimeError('cannot start: no licence server')\n")
    (root / "owner_typo.py").write_text("def predict(images:\n")
    (root / "owner_exits.py").write_text("import sys\n\nsys.exit(3)\n")
    torch.save(build_model("small_cnn", 5).state_dict(), root / "plain_5_classes.pt")
    return root


OWNER_MODELS = '''"""Black-box models for the audit's bad-input tests, imported from the current directory."""
from pathlib import Path

import torch


def uniform(images):  # well-behaved: equal logits for 4 classes; leaves a trace that it ran
    Path("model-was-called").touch()
    return torch.zeros(len(images), 4)


def raises(images):
    raise ValueError("the service is down")


def wrong_type(images):
    return "cat"


def wrong_shape(images):
    return torch.zeros(len(images))


def wrong_batch(images):
    return torch.zeros(1, 4)


def one_class(images):
    return torch.zeros(len(images), 1)


def nan_logits(images):
    return torch.full((len(images), 4), float("nan"))


def exits(images):  # a script's habit: ends the process instead of raising
    import sys

    sys.exit(3)


def needs_32_pixels(images):  # a network whose first layer is larger than the owner's 12x16 images
    return torch.nn.Conv2d(3, 4, 32)(images.float()).flatten(1)


not_callable = 3
'''


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _copy_first_image(src: Path, name: str) -> None:
    shutil.copyfile(src / "img0.png", src / name)


MARK_CASES: list[tuple[str, Callable[[Path], None], list[str], str]] = [
    (
        "truncated png",
        lambda s: (_image(s / "bad.png", size=(64, 64)), _truncate(s / "bad.png")),
        ["--force"],
        "bad.png",
    ),
    (
        "truncated jpeg",
        lambda s: (_image(s / "bad.jpg", size=(64, 64)), _truncate(s / "bad.jpg")),
        ["--force"],
        "bad.jpg",
    ),
    (
        "garbage bytes",
        lambda s: (s / "noise.png").write_bytes(np.random.default_rng(0).bytes(500)),
        ["--force"],
        "noise.png",
    ),
    ("text named .jpg", lambda s: (s / "notes.jpg").write_text("shopping list"), ["--force"], "notes.jpg"),
    ("empty file", lambda s: (s / "empty.webp").write_bytes(b""), ["--force"], "empty.webp"),
    ("decompression bomb", lambda s: _png_header(s / "huge.png", 30_000, 30_000), ["--force"], "huge.png: too large"),
    ("duplicate file", lambda s: _copy_first_image(s, "img0-copy.png"), ["--force"], "img0-copy.png"),
    ("same target name", lambda s: _image(s / "img1.jpg"), ["--force"], "img1"),
    ("empty folder", lambda s: [p.unlink() for p in list(s.iterdir())], ["--force"], "no image files"),
    (
        "only non-images",
        lambda s: [p.rename(p.with_suffix(".txt")) for p in list(s.iterdir())],
        ["--force"],
        "no image files",
    ),
    ("already-marked folder", lambda s: (s / KEY_NAME).write_text("{}"), ["--force"], "already marked"),
    ("existing key, no --force", lambda s: None, [], KEY_NAME),
    ("alpha zero", lambda s: None, ["--force", "--alpha", "0"], "--alpha"),
    ("alpha above one", lambda s: None, ["--force", "--alpha", "1.5"], "--alpha"),
    ("negative epsilon", lambda s: None, ["--force", "--epsilon", "-0.01"], "--epsilon"),
    ("one pattern", lambda s: None, ["--force", "--design", "pattern", "--n-patterns", "1"], "--n-patterns"),
    (
        "patterns without the pattern design",
        lambda s: None,
        ["--force", "--n-patterns", "5"],
        "--n-patterns: not an option of --design subset",
    ),
    (
        "draws with the groups design",
        lambda s: None,
        ["--force", "--design", "groups", "--draws", "5"],
        "--draws: not an option of --design groups",
    ),
    (
        "one image, no --publish given",
        lambda s: [(s / f"img{i}.png").unlink() for i in (1, 2)],
        ["--force"],
        "the folder has 1 image(s): too few",
    ),
    ("publish nothing", lambda s: None, ["--force", "--publish", "0"], "--publish"),
    ("publish everything", lambda s: None, ["--force", "--publish", "3"], "--publish 3"),
    ("groups of more than half", lambda s: None, ["--force", "--design", "groups", "--publish", "2"], "--publish 2"),
    ("no draws", lambda s: None, ["--force", "--draws", "0"], "--draws"),
    ("draws beyond the audit's bound", lambda s: None, ["--force", "--draws", "10000"], "--draws"),
    ("ood without folder", lambda s: None, ["--force", "--pattern", "ood_image"], "--ood-folder"),
    (
        "ood folder missing",
        lambda s: None,
        ["--force", "--pattern", "ood_image", "--ood-folder", "/nonexistent/ood"],
        "/nonexistent/ood",
    ),
    (
        "ood folder without images",
        lambda s: (s.parent / "ood").mkdir(),
        ["--force", "--pattern", "ood_image", "--ood-folder", "{tmp}/ood"],
        "no image files to draw OOD patterns from",
    ),
    ("ood folder without ood pattern", lambda s: None, ["--force", "--ood-folder", "{tmp}/photos"], "--ood-folder"),
    ("max resolution zero", lambda s: None, ["--force", "--max-resolution", "0"], "--max-resolution"),
    ("max resolution one pixel", lambda s: None, ["--force", "--max-resolution", "1"], "--max-resolution"),
    (
        "thin image shrunk to nothing",
        lambda s: _image(s / "banner.png", size=(300, 9)),
        ["--force", "--max-resolution", "16"],
        "banner.png: 9x300 pixels (0x16 after --max-resolution 16) is too small",
    ),
    ("image too small to mark", lambda s: _image(s / "icon.png", size=(4, 4)), ["--force"], "icon.png: 4x4 pixels"),
    ("no patterns", lambda s: None, ["--force", "--n-patterns", "0"], "--n-patterns"),
    ("negative patterns", lambda s: None, ["--force", "--n-patterns", "-5"], "--n-patterns"),
    ("patterns beyond the audit's bound", lambda s: None, ["--force", "--n-patterns", "1001"], "--n-patterns"),
    ("absurd pattern count", lambda s: None, ["--force", "--n-patterns", str(10**12)], "--n-patterns"),
    ("negative label", lambda s: None, ["--force", "--label", "-1"], "--label"),
    ("huge label", lambda s: None, ["--force", "--label", str(10**30)], "--label"),
    ("label one past the bound", lambda s: None, ["--force", "--label", "100000"], "--label"),
    ("max resolution one below the bound", lambda s: None, ["--force", "--max-resolution", "7"], "--max-resolution"),
    ("negative seed", lambda s: None, ["--force", "--seed", "-1"], "--seed"),
    ("seed beyond 63 bits", lambda s: None, ["--force", "--seed", str(2**63)], "--seed"),
    ("seed not a number", lambda s: None, ["--force", "--seed", "abc"], "--seed"),
    ("seed '--' (argparse used to drop it)", lambda s: None, ["--force", "--seed=--", "--seed=3"], "--seed"),
    ("alpha not a number", lambda s: None, ["--force", "--alpha", "nan"], "--alpha"),
    ("infinite epsilon", lambda s: None, ["--force", "--epsilon", "inf"], "--epsilon"),
    ("stage option --shard", lambda s: None, ["--force", "--shard", "1"], "--shard"),
    ("stage option --set", lambda s: None, ["--force", "--set", "mark.alpha=0.5"], "--set"),
    ("flag that does not exist", lambda s: None, ["--force", "--colour", "red"], "--colour"),
]


@pytest.mark.parametrize("make, args, names", [c[1:] for c in MARK_CASES], ids=[c[0] for c in MARK_CASES])
def test_owner_mark_refuses(make, args: list[str], names: str, owner: Path, tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "photos", tmp_path / "published"
    shutil.copytree(owner / "originals", src)
    shutil.copytree(owner / "marked", out)  # an earlier marking that a failed one must leave alone
    make(src)
    before = snapshot(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    assert_refused(capsys, ["owner", "mark", src, "--out", out, *args], names, before)
    assert snapshot(tmp_path) == before, "a refused marking left something behind"


def _a_file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("a file, not a folder")
    return tmp / "notes.txt"


def _under_file(tmp: Path) -> Path:
    return _a_file(tmp) / "marked"


OUT_CASES = [
    ("an existing file", _a_file, "it is the file"),
    ("a path under a file", _under_file, "lies under the file"),
    ("a virtual file system (/proc)", lambda tmp: Path("/proc/mtrack-marked"), "/proc/mtrack-marked: cannot write"),
    (
        "a read-only virtual file system (/sys)",
        lambda tmp: Path("/sys/mtrack-marked"),
        "/sys/mtrack-marked: cannot write",
    ),
    ("a new folder under /proc", lambda tmp: Path("/proc/mtrack/a/b"), "/proc/mtrack/a/b: cannot write"),
]


@pytest.mark.parametrize("make_out, names", [c[1:] for c in OUT_CASES], ids=[c[0] for c in OUT_CASES])
def test_owner_mark_refuses_an_output_it_cannot_write(
    make_out, names: str, owner: Path, tmp_path: Path, capsys
) -> None:
    src = tmp_path / "photos"
    shutil.copytree(owner / "originals", src)
    out = make_out(tmp_path)
    before = snapshot(tmp_path)
    assert_refused(capsys, ["owner", "mark", src, "--out", out], names, before)
    assert snapshot(tmp_path) == before and not out.is_dir()


def test_owner_mark_names_a_missing_input_folder(tmp_path: Path, capsys) -> None:
    assert_refused(
        capsys,
        ["owner", "mark", tmp_path / "my-photos", "--out", tmp_path / "out"],
        "my-photos: input folder not found",
        {},
    )
    assert_refused(capsys, ["owner", "mark", tmp_path / "my-photos"], "required: --out", {})
    assert not (tmp_path / "out").exists()


def test_stage_refuses_the_owners_flags(tmp_path: Path, capsys) -> None:
    """`mtrack mark CONFIG --seed 3` would otherwise run the stage and silently ignore --seed: the
    stage refuses an owner's flag, or a folder, in one line naming the owner's command (no notice:
    without --out or --model it is not the owner's old spelling)."""
    run_dir = tmp_path / "run"
    for argv, line in (
        (
            ["mark", TINY, "--set", f"run_dir={run_dir}", "--seed", "3"],
            "--seed: not an option of mtrack mark; marking your own folder is mtrack owner mark FOLDER --out FOLDER",
        ),
        (
            ["audit", TINY, "--arm", "marked", "--set", f"run_dir={run_dir}", "--label=1"],
            "--label: not an option of mtrack audit; auditing a model for your own images is mtrack owner audit "
            "--model M --user FOLDER",
        ),
        (
            ["mark", tmp_path, "--set", f"run_dir={run_dir}"],
            f"{tmp_path}: is a folder, not a run config; marking your own folder is mtrack owner mark FOLDER --out "
            "FOLDER",
        ),
    ):
        assert main([str(a) for a in argv]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {line}"]
    assert not run_dir.exists()


OLD_SPELLING = "notice: 'mtrack {0}' is now 'mtrack owner {0}'; the old spelling goes in the next release"


def test_old_owner_spellings_run_the_owners_tool_after_one_notice(owner: Path, tmp_path: Path, capsys) -> None:
    """`mtrack mark FOLDER --out ...` and `mtrack audit --model ...`, the spellings before `mtrack
    owner`, still do what `mtrack owner mark|audit` does, after exactly one notice line on stderr."""
    marked = {}
    for spelling, notice in ((["mark"], [OLD_SPELLING.format("mark FOLDER ...")]), (["owner", "mark"], [])):
        out = tmp_path / "-".join(spelling)
        assert main([*spelling, str(owner / "originals"), "--out", str(out), "--seed", "4"]) == 0
        assert capsys.readouterr().err.splitlines() == notice
        marked[spelling[0]] = [e.get("marked_sha256") for e in json.loads((out / KEY_NAME).read_text())["files"]]
    assert marked["mark"] == marked["owner"]
    verdicts = {}
    for spelling, notice in ((["audit"], [OLD_SPELLING.format("audit --model ...")]), (["owner", "audit"], [])):
        argv = [*spelling, "--model", str(owner / "model.pt"), "--user", str(owner / "marked"), "--alpha", "0.3"]
        assert main(argv) == 0  # 4 patterns: p >= 0.25, so a level that can be reached (no note)
        captured = capsys.readouterr()
        assert captured.err.splitlines() == notice
        verdicts[spelling[0]] = captured.out
    assert verdicts["audit"] == verdicts["owner"] and "verdict:" in verdicts["owner"]


def test_owner_mark_failing_midway_publishes_nothing(owner: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """The disk fills up while the second marked copy is written: no marked file and no key appear,
    neither in a new output folder nor in one that holds an earlier marking."""
    import errno

    from pipeline.owner import marking

    real_write_png, written = marking.write_png, []

    def disk_fills_up(path: Path, rgb: np.ndarray) -> None:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_png(path, rgb)
        written.append(path)

    monkeypatch.setattr(marking, "write_png", disk_fills_up)
    src = tmp_path / "photos"
    shutil.copytree(owner / "originals", src)
    shutil.copytree(owner / "marked", tmp_path / "earlier")
    for out, extra in ((tmp_path / "new" / "marked", []), (tmp_path / "earlier", ["--force"])):
        written.clear()
        before = snapshot(tmp_path)
        assert_refused(
            capsys,
            ["owner", "mark", src, "--out", out, "--seed", "5", "--design", "pattern", *extra],
            "No space left on device",
            before,
        )
        assert written, "the failure was not midway"
        assert snapshot(tmp_path) == before, "a failed marking left files behind"


KILLED_AFTER_FIRST_IMAGE = """
import os, signal, sys
from pipeline.owner import marking
from pipeline.cli import main
real = marking.write_png
def killed(path, rgb):
    real(path, rgb)
    os.kill(os.getpid(), signal.SIGKILL)
marking.write_png = killed
main(sys.argv[1:])
"""


def test_owner_mark_removes_what_a_killed_run_left(owner: Path, tmp_path: Path, capsys) -> None:
    """SIGKILL leaves the hidden staging folder (no cleanup runs); the next run into the same
    output folder removes it, but not the staging folder of a run still marking there."""
    import fcntl

    src, new, earlier = tmp_path / "photos", tmp_path / "new", tmp_path / "earlier"
    shutil.copytree(owner / "originals", src)
    shutil.copytree(owner / "marked", earlier)  # an existing output folder: staging is made inside it
    argv = ["owner", "mark", str(src), "--seed", "5", "--design", "pattern", "--force", "--out"]
    for out in (new, earlier):
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_AFTER_FIRST_IMAGE, *argv, str(out)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
        )
        assert killed.returncode == -9, killed.stderr
    left = sorted(tmp_path.rglob(".*.marking-*"))
    assert {p.parent for p in left} == {earlier, tmp_path} and all(any(p.iterdir()) for p in left), left
    live = tmp_path / ".new.marking-0123abcd"
    live.mkdir()
    held = os.open(live, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a run still marking into the same folder holds its own
    try:
        for out in (new, earlier):
            assert main([*argv, str(out)]) == 0, capsys.readouterr().err
        assert sorted(tmp_path.rglob(".*.marking-*")) == [live]
    finally:
        os.close(held)
    assert (new / KEY_NAME).is_file() and (earlier / KEY_NAME).is_file()


def test_published_files_are_not_private(owner: Path, tmp_path: Path, capsys) -> None:
    """The marked copies and their folder get the usual permissions; only the key is 0600."""
    old = os.umask(0o022)
    try:
        assert main(["owner", "mark", str(owner / "originals"), "--out", str(tmp_path / "pub"), "--seed", "1"]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "pub"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.glob("*.png")} == {0o644}
    assert stat.S_IMODE((out / KEY_NAME).stat().st_mode) == 0o600
    assert not [p for p in tmp_path.rglob(".*")], "a staging folder or temporary file was left"


def test_owner_mark_accepts_the_bounds(owner: Path, tmp_path: Path, capsys) -> None:
    """The largest values --help allows are accepted, not refused (the refusals above start one past them)."""
    argv = [
        "owner",
        "mark",
        str(owner / "originals"),
        "--out",
        str(tmp_path / "out"),
        "--design",
        "pattern",
        "--n-patterns",
        "1000",
        "--seed",
        str(2**63 - 1),
        "--label",
        "99999",
        "--max-resolution",
        "16",
        "--alpha",
        "1",
        "--epsilon",
        "0",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    key = json.loads((tmp_path / "out" / KEY_NAME).read_text())
    assert (key["n_patterns"], key["seed"], key["label"], key["max_resolution"]) == (1000, 2**63 - 1, 99999, 16)


ACCEPTED_MODES = ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16", "palette+transparency"]


@pytest.mark.parametrize("mode", ACCEPTED_MODES)
def test_owner_mark_accepts_unusual_images(mode: str, tmp_path: Path, capsys) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    if mode == "I;16":
        Image.fromarray(np.random.default_rng(0).integers(0, 65535, (12, 16), dtype=np.uint16)).save(src / "a.png")
    elif mode == "palette+transparency":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).convert("P").save(
            src / "a.png", transparency=0
        )
    else:
        _image(src / ("a.jpg" if mode == "CMYK" else "a.png"), mode)
    argv = ["owner", "mark", str(src), "--out", str(tmp_path / "out"), "--seed", "3", "--design", "pattern"]
    assert main(argv) == 0, capsys.readouterr().err
    key = json.loads((tmp_path / "out" / KEY_NAME).read_text())
    assert len(key["files"]) == 1
    assert read_rgb(tmp_path / "out" / key["files"][0]["marked"]).shape == (12, 16, 3)


# --- a data owner auditing a model ----------------------------------------------------------------


def _malicious(root: Path) -> Path:
    with open(root / "evil.pt", "wb") as fh:
        pickle.dump({"state_dict": Payload(root / "executed")}, fh)
    return root / "evil.pt"


def _inconsistent(root: Path) -> Path:
    """This pipeline's format, but the weights are of another architecture than the metadata says."""
    model = Normalized(build_model("small_cnn", 4, 8), (0.5,) * 3, (0.25,) * 3)
    save_weights(
        model,
        {"arch": "small_cnn", "width": 16, "num_classes": 4, "mean": [0.5] * 3, "std": [0.25] * 3},
        root / "wrong-width.pt",
    )
    return root / "wrong-width.pt"


def _truncated_model(root: Path) -> Path:
    shutil.copyfile(root / "model.pt", root / "cut.pt")
    _truncate(root / "cut.pt", 0.6)
    return root / "cut.pt"


def _drop_marked(root: Path) -> Path:
    (root / "marked" / "img1.png").unlink()
    return root / "model.pt"


def _edit_marked(root: Path) -> Path:
    _image(root / "marked" / "img1.png", seed=99)
    return root / "model.pt"


def _drop_original(root: Path) -> Path:
    (root / "originals" / "img2.png").unlink()
    return root / "model.pt"


def _key_file(text: str) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        (root / "marked" / KEY_NAME).write_text(text)
        return root / "model.pt"

    return write


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _loose_folder(root: Path) -> Path:
    """Marked images copied elsewhere without their key."""
    shutil.copytree(root / "marked", root / "loose", ignore=shutil.ignore_patterns(KEY_NAME))
    return root / "model.pt"


def _key_edit(edit: Callable[[dict], object]) -> Callable[[Path], str]:
    """Edit the key in place; the model is a callable that leaves a trace if it is ever called."""

    def make(root: Path) -> str:
        key = json.loads((root / "marked" / KEY_NAME).read_text())
        edit(key)
        (root / "marked" / KEY_NAME).write_text(json.dumps(key))
        return "owner_models:uniform"

    return make


AUDIT_CASES: list[tuple[str, Callable[[Path], Path | str], list[str], str]] = [
    ("truncated checkpoint", _truncated_model, [], "cut.pt"),
    ("malicious pickle", _malicious, [], "evil.pt: refused"),
    (
        "weights of another width",
        _inconsistent,
        [],
        "wrong-width.pt: not a usable checkpoint (tensor net.0.0.weight has shape (8, 3, 3, 3) in the file, "
        "(16, 3, 3, 3) in the model)",
    ),
    (
        "state_dict of another class count",
        lambda r: r / "plain_5_classes.pt",
        ["--arch", "small_cnn", "--num-classes", "10"],
        "does not fit --arch small_cnn --num-classes 10: tensor 10.weight has shape (5, 128) in the file, (10, 128)",
    ),
    (
        "state_dict of another arch",
        lambda r: r / "plain_small_cnn.pt",
        ["--arch", "resnet18_cifar", "--num-classes", "4"],
        "does not fit --arch resnet18_cifar",
    ),
    ("plain state_dict without --arch", lambda r: r / "plain_small_cnn.pt", [], "--arch"),
    (
        "--arch beside this pipeline's model",
        lambda r: r / "model.pt",
        ["--arch", "resnet50", "--num-classes", "1000"],
        "--arch resnet50: ",
    ),
    (
        "--num-classes beside this pipeline's model",
        lambda r: r / "model.pt",
        ["--num-classes", "10"],
        "of --num-classes 4",
    ),
    ("missing checkpoint", lambda r: r / "nope.pt", [], "nope.pt"),
    ("unimportable callable", lambda r: Path("no_such_module:predict"), [], "no_such_module"),
    (
        "key for another folder",
        lambda r: r / "model.pt",
        ["--key", "{root}/other-marked/" + KEY_NAME],
        "or the key of another folder",
    ),
    ("key not JSON", _key_file("{ truncated"), [], KEY_NAME),
    ("key a JSON list", _key_file("[1, 2]"), [], f"{KEY_NAME}: format: missing"),
    ("key of another format", _key_file('{"format": "something/2"}'), [], "format: 'something/2' is not a key format"),
    ("missing key", lambda r: r / "model.pt", ["--key", "{root}/absent.json"], "absent.json"),
    ("fewer marked images than the key", _drop_marked, [], "img1.png: a published image"),
    ("an edited marked image", _edit_marked, [], "img1.png: not the image"),
    ("fewer originals than the key", _drop_original, [], "img2.png"),
    ("no label", lambda r: r / "model.pt", ["--user", "{root}/other-marked"], "--label"),
    (
        "empty checkpoint file",
        lambda r: _bytes(r / "empty.pt", b""),
        [],
        "empty.pt: not a loadable checkpoint: an empty file",
    ),
    (
        "random bytes",
        lambda r: _bytes(r / "noise.pt", np.random.default_rng(0).bytes(4000)),
        [],
        "noise.pt: not a loadable checkpoint: unrecognised binary data",
    ),
    (
        "an image as the model",
        lambda r: r / "originals" / "img0.png",
        [],
        "img0.png: not a loadable checkpoint: a PNG image",
    ),
    ("a config as the model", lambda r: TINY, [], "tiny.yaml: not a loadable checkpoint: a text file"),
    ("a folder as the model", lambda r: r / "originals", [], "originals: a folder, not a checkpoint file"),
    (
        "callable that raises",
        lambda r: "owner_models:raises",
        [],
        "owner_models:raises: failed on 1 image of 12x16 pixels (ValueError: the service is down)",
    ),
    (
        "callable returning a string",
        lambda r: "owner_models:wrong_type",
        [],
        "for --access logits, expected tensors or arrays, found str",
    ),
    (
        "callable returning one value per image",
        lambda r: "owner_models:wrong_shape",
        [],
        "expected shape (1, classes) with at least 2 classes, found (1,)",
    ),
    (
        "callable returning another batch size",
        lambda r: "owner_models:wrong_batch",
        [],
        "expected shape (6, classes) with at least 2 classes, found (1, 4)",  # first round: published + 1 draw
    ),
    ("callable with one class", lambda r: "owner_models:one_class", [], "at least 2 classes"),
    (
        "callable returning NaN",
        lambda r: "owner_models:nan_logits",
        [],
        "expected finite logits, found NaN or infinite values",
    ),
    ("not callable", lambda r: "owner_models:not_callable", [], "owner_models:not_callable: not callable"),
    (
        "image too small for the network",
        lambda r: "owner_models:needs_32_pixels",
        [],
        "needs_32_pixels: failed on 1 image of 12x16 pixels (RuntimeError",
    ),
    ("module failing on import", lambda r: "owner_broken:predict", [], "cannot import the callable (RuntimeError"),
    ("callable calling sys.exit", lambda r: "owner_models:exits", [], "pixels (it called sys.exit(3))"),
    (
        "module calling sys.exit",
        lambda r: "owner_exits:predict",
        [],
        "cannot import the callable (it called sys.exit(3))",
    ),
    ("module with a syntax error", lambda r: "owner_typo:predict", [], "cannot import the callable (SyntaxError"),
    ("callable without a module", lambda r: ":predict", [], "expected a checkpoint file or module:function"),
    ("label outside the model", lambda r: r / "model.pt", ["--label", "4"], "--label 4: outside the model's 4 classes"),
    (
        "label in the key outside the model",
        lambda r: _key_edit(lambda k: k.update(label=7))(r) and r / "model.pt",
        [],
        f"{KEY_NAME}: label 7: outside the model's 4 classes",
    ),
    ("negative label", lambda r: r / "model.pt", ["--label", "-1"], "--label"),
    ("level zero", lambda r: r / "model.pt", ["--alpha", "0"], "--alpha"),
    ("level one", lambda r: r / "model.pt", ["--alpha", "1"], "--alpha"),
    ("level not a number", lambda r: r / "model.pt", ["--alpha", "nan"], "--alpha"),
    ("no classes", lambda r: r / "plain_small_cnn.pt", ["--arch", "small_cnn", "--num-classes", "0"], "--num-classes"),
    ("one class", lambda r: r / "plain_small_cnn.pt", ["--arch", "small_cnn", "--num-classes", "1"], "--num-classes"),
    (
        "classes past the bound",
        lambda r: r / "plain_small_cnn.pt",
        ["--arch", "resnet50", "--num-classes", "100001"],
        "--num-classes",
    ),
    (
        "unknown architecture",
        lambda r: r / "plain_small_cnn.pt",
        ["--arch", "nonet", "--num-classes", "4"],
        "--arch nonet: unknown architecture",
    ),
    (
        "user folder missing",
        lambda r: r / "model.pt",
        ["--user", "{root}/nowhere"],
        "--user {root}/nowhere: folder not found",
    ),
    ("user folder without a key", lambda r: _loose_folder(r), ["--user", "{root}/loose"], "no key file here"),
    ("key is a folder", lambda r: r / "model.pt", ["--key", "{root}/originals"], "originals: is a folder, not a file"),
    ("key is a device", lambda r: r / "model.pt", ["--key", "/dev/zero"], "/dev/zero: not a regular file"),
    (
        "originals folder missing",
        lambda r: r / "model.pt",
        ["--originals", "{root}/gone"],
        "--originals {root}/gone: folder not found",
    ),
    (
        "originals a file",
        lambda r: r / "model.pt",
        ["--originals", "{root}/model.pt"],
        "--originals {root}/model.pt: not a",
    ),
    ("a config next to --model", lambda r: r / "model.pt", [str(TINY)], "tiny.yaml: not an argument of mtrack owner"),
    ("a stage flag next to --model", lambda r: r / "model.pt", ["--arm", "marked"], "--arm"),
]


@pytest.mark.parametrize("make, args, names", [c[1:] for c in AUDIT_CASES], ids=[c[0] for c in AUDIT_CASES])
def test_owner_audit_refuses(
    make, args: list[str], names: str, owner: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    root = _owner_copy(owner, tmp_path)
    monkeypatch.chdir(root)  # module:function is imported from the current directory first
    model = make(root)
    args = [a.format(root=root) for a in args]
    user = [] if "--user" in args else ["--user", root / "marked"]
    before = snapshot(root)
    assert_refused(capsys, ["owner", "audit", "--model", model, *user, *args], names.format(root=root), before)
    assert not (root / "executed").exists(), "loading the checkpoint ran code"
    assert snapshot(root) == before


def _owner_copy(owner: Path, tmp_path: Path) -> Path:
    root = tmp_path / "owner"
    shutil.copytree(owner, root)
    key = json.loads((root / "marked" / KEY_NAME).read_text())
    key["source_folder"] = str(root / "originals")
    (root / "marked" / KEY_NAME).write_text(json.dumps(key))
    return root


def _drop(path: str) -> Callable[[dict], None]:
    def edit(key: dict) -> None:
        *parents, leaf = path.split(".")
        node = key
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[leaf]

    return edit


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(key: dict) -> None:
        *parents, leaf = path.split(".")
        node = key
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(leaf) if isinstance(node, list) else leaf] = value(key) if callable(value) else value

    return edit


KEY_CASES = [
    ("another format version", _set("format", "mtrack-key/9"), "format: 'mtrack-key/9' is not a key format"),
    ("no format", _drop("format"), "format: missing"),
    ("empty object", lambda k: k.clear(), "format: missing"),
    ("seed as text", _set("seed", "12"), "seed: Input should be a valid integer"),
    ("negative seed", _set("seed", -1), "seed:"),
    ("fractional seed", _set("seed", 1.5), "seed:"),
    ("one pattern", _set("n_patterns", 1), "n_patterns:"),
    ("a billion patterns (would run for ever)", _set("n_patterns", 10**9), "n_patterns:"),
    ("negative pattern index", _set("pattern_index", -1), "pattern_index:"),
    (
        "unpublished pattern index",
        _set("pattern_index", lambda k: (k["pattern_index"] + 1) % k["n_patterns"]),
        "pattern_index: ",
    ),
    (
        "pattern index beyond the patterns",
        _set("pattern_index", 4),
        "pattern_index: 4 is not the pattern_index this seed",
    ),
    ("negative label", _set("label", -1), "label:"),
    ("label as a boolean", _set("label", True), "label:"),
    ("max_resolution of a few pixels", _set("max_resolution", 4), "max_resolution:"),
    ("max_resolution below the images", _set("max_resolution", 8), "max_resolution: 8 is smaller than files.0 (12x16)"),
    ("mark alpha out of range", _set("mark.alpha", 2), "mark.alpha:"),
    ("mark alpha as text", _set("mark.alpha", "0.7"), "mark.alpha:"),
    ("unknown mark parameter", _set("mark.strength", 1), "mark.strength:"),
    ("unknown noise", _set("mark.noise", "pink"), "mark.noise:"),
    ("mark section missing", _drop("mark"), "mark: missing"),
    ("no files", _set("files", []), "files:"),
    ("files not a list", _set("files", {}), "files:"),
    ("file entry not an object", _set("files.0", None), "files.0:"),
    ("original hash missing", _drop("files.0.original_sha256"), "files.0.original_sha256: missing"),
    ("marked hash not hex", _set("files.1.marked_sha256", "xyz"), "files.1.marked_sha256:"),
    ("original outside the folder", _set("files.0.original", "../../etc/hostname"), "files.0.original:"),
    ("absolute marked path", _set("files.0.marked", "/etc/hostname"), "files.0.marked:"),
    ("file listed twice", lambda k: k["files"].append(k["files"][0]), "files.3.original: listed twice"),
    ("zero height", _set("files.0.height", 0), "files.0.height:"),
    ("unknown field", _set("comment", "mine"), "comment: not a known key"),
    ("empty source folder", _set("source_folder", ""), "source_folder:"),
    ("source folder not text", _set("source_folder", 3), "source_folder:"),
]


@pytest.mark.parametrize("edit, names", [c[1:] for c in KEY_CASES], ids=[c[0] for c in KEY_CASES])
def test_key_file_refused_by_field(edit, names: str, owner: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A key that does not validate is refused naming the file and the field, before the model is
    loaded or called: nothing is computed from it."""
    root = _owner_copy(owner, tmp_path)
    monkeypatch.chdir(root)
    model = _key_edit(edit)(root)
    before = snapshot(root)
    argv = ["owner", "audit", "--model", model, "--user", root / "marked"]
    assert_refused(capsys, argv, f"{KEY_NAME}: {names}", before)
    assert not (root / "model-was-called").exists(), "the model was run on an invalid key"
    assert snapshot(root) == before


def test_valid_key_runs_the_model(owner: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """The control for the cases above: the same callable on the unedited key is called, and passes."""
    root = _owner_copy(owner, tmp_path)
    monkeypatch.chdir(root)
    assert main(["owner", "audit", "--model", _key_edit(lambda k: None)(root), "--user", str(root / "marked")]) == 0
    assert (root / "model-was-called").exists() and "verdict:" in capsys.readouterr().out


def test_audit_without_user_folder(owner: Path, capsys) -> None:
    assert_refused(capsys, ["owner", "audit", "--model", owner / "model.pt"], "required: --user", snapshot(owner))


# --- configs, data and the run directory ----------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml with plan, mark and write finished."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    cfg = load_config(TINY, [f"run_dir={run_dir}"])
    for task in (Task("plan"), Task("mark"), Task("write")):
        run_task(cfg, task)
    return run_dir


CONFIG_CASES = [
    ("unknown top-level key", ["colour=red"], "colour"),
    ("misspelt key", ["mark.alpah=0.5"], "mark.alpah"),
    ("misspelt section", ["trian.epochs=3"], "trian"),
    ("wrong type", ["train.epochs=many"], "train.epochs"),
    ("float for an int", ["plan.samples_per_user=2.5"], "plan.samples_per_user"),
    ("alpha zero", ["mark.alpha=0"], "mark.alpha"),
    ("alpha above one", ["mark.alpha=1.2"], "mark.alpha"),
    ("negative epsilon", ["mark.epsilon=-0.01"], "mark.epsilon"),
    ("members exceed the training set", ["plan.samples_per_user=300"], "data.n_train"),
    ("unknown data source", ["data.source=imagenet21k"], "data.source"),
    ("unknown arm", ["train.arms=[marked, teacher]"], "train.arms"),
    ("override without a value", ["train.epochs"], "train.epochs"),
    ("override into a value", ["seed.x=1"], "seed"),
    ("override value not YAML", ["train.epochs=[1,"], "--set train.epochs: not valid YAML"),
    ("override value an unclosed mapping", ["mark={alpha: 0.5"], "--set mark: not valid YAML"),
    ("override without a key", ["=3"], "--set =3"),
    ("override with an empty section", ["train..epochs=3"], "--set train..epochs=3"),
    ("infinite learning rate", ["train.lr=.inf"], "train.lr"),
    ("negative seed", ["seed=-1"], "seed"),
    ("seed beyond 63 bits", [f"seed={2**63}"], "seed"),
    ("absurd shard count", ["launch.mark_shards=1000000000"], "launch.mark_shards"),
]


@pytest.mark.parametrize("overrides, names", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_refused_before_anything_runs(overrides: list[str], names: str, base_run: Path, capsys) -> None:
    sets = [a for o in [f"run_dir={base_run}", *overrides] for a in ("--set", o)]
    assert_refused(capsys, ["mark", TINY, *sets, "--force"], names, snapshot(base_run))


def test_a_source_smaller_than_the_config_is_refused_before_any_sbatch(tmp_path: Path, capsys) -> None:
    """The data sizes are checked against the source before anything is submitted: a folder smaller
    than data.n_train is refused in one line, with no job, no run folder and no SLURM call (it used
    to be submitted and fail in the plan job)."""
    config = _config(tmp_path)
    before = snapshot(tmp_path)
    err = assert_refused(
        capsys, ["run", config, "--launcher", "slurm", "--set", "data.n_train=1600"], "n_train", before
    )
    assert "leaves no held-out images in the 1600-image train split" in err
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_unreadable_config_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "broken.yaml").write_text("seed: 1\nplan: [unclosed\n")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "configs").mkdir()
    (tmp_path / "tabs.yaml").write_text("plan:\n\tn_member_users: 3\n")
    for command in ("plan", "run"):
        assert_refused(capsys, [command, tmp_path / "broken.yaml"], "broken.yaml: not valid YAML", {})
        assert_refused(capsys, [command, tmp_path / "absent.yaml"], "absent.yaml: config file not found", {})
        assert_refused(capsys, [command, tmp_path / "configs"], "configs: is a folder, not a config file", {})
        assert_refused(capsys, [command, tmp_path / "latin1.yaml"], "latin1.yaml: not a text (UTF-8) file", {})
        assert_refused(capsys, [command, "/dev/zero"], "/dev/zero: not a regular file", {})  # read for ever before
    assert_refused(capsys, ["run", tmp_path / "broken.yaml"], "at line 3, column 1", {})
    assert_refused(capsys, ["run", tmp_path / "tabs.yaml"], "tabs.yaml: not valid YAML: found character '\\t'", {})
    assert_refused(capsys, ["run", tmp_path / "tabs.yaml"], "at line 2, column 1", {})


def _config(tmp: Path, **top: object) -> Path:
    tree = yaml.safe_load(TINY.read_text())
    tree.update(run_dir=str(tmp / "run"), results_dir=str(tmp / "results"), **top)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(tree))
    return tmp / "cfg.yaml"


RUN_CASES = [
    (
        "run_dir under a file",
        lambda t: ["--set", f"run_dir={_a_file(t)}/run"],
        "run_dir: {tmp}/notes.txt/run lies under the file {tmp}/notes.txt",
    ),
    (
        "run_dir on /proc",
        lambda t: ["--set", "run_dir=/proc/mtrack-run"],
        "run_dir: cannot write into /proc/mtrack-run",
    ),
    (
        "results_dir on /sys",
        lambda t: ["--set", "results_dir=/sys/mtrack-results"],
        "results_dir: cannot write into /sys/mtrack-results",
    ),
    (
        "results_dir is a file",
        lambda t: ["--set", f"results_dir={_a_file(t)}"],
        "results_dir: {tmp}/notes.txt is a file",
    ),
    ("unknown architecture", lambda t: ["--set", "train.arch=resnet9000"], "train.arch: unknown 'resnet9000'"),
    ("negative seed", lambda t: ["--set", "seed=-1"], "seed: Input should be greater than or equal to 0"),
    ("unknown launcher", lambda t: ["--launcher", "kubernetes"], "--launcher: invalid choice: 'kubernetes'"),
    (
        "missing weights to fine-tune from",
        lambda t: ["--set", f"train.init_weights={t}/resnet.pt"],
        "train.init_weights: {tmp}/resnet.pt is not a file",
    ),
    (
        "weights to fine-tune from that are text",
        lambda t: ["--set", f"train.init_weights={_a_file(t)}"],
        "train.init_weights: {tmp}/notes.txt: not a loadable checkpoint: a text file",
    ),
    (
        "missing OOD folder",
        lambda t: ["--set", "mark.pattern=ood_image", "--set", f"mark.ood_folder={t}/ood"],
        "mark.ood_folder: {tmp}/ood is not a folder",
    ),
    # what only the plan stage used to see, after "plan: running" and its started.json
    (
        "unknown class name",
        lambda t: ["--set", "data.classes=[nope, class-1]"],
        "data.classes: 'nope' is not a class of synthetic",
    ),
    ("class named twice", lambda t: ["--set", "data.classes=[class-1, 1]"], "data.classes: 1 names class 1 (class-1)"),
    ("negative class index", lambda t: ["--set", "data.classes=[-1, 2]"], "data.classes: -1 is not a class"),
    ("class index out of range", lambda t: ["--set", "data.classes=[0, 99]"], "data.classes: 99 is not a class"),
    (
        "owners' folders larger than a class",
        lambda t: ["--set", "plan.owners={images: 5000}"],
        "need plan.owners.images=5000",
    ),
]


@pytest.mark.parametrize("extra, names", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_run_refuses_before_any_stage(extra, names: str, tmp_path: Path, capsys) -> None:
    """`mtrack run` checks what the config names before the first stage: nothing is created, and
    nothing but the error is printed."""
    config = _config(tmp_path)
    args = extra(tmp_path)
    before = snapshot(tmp_path)
    err = assert_refused(capsys, ["run", config, *args], names.format(tmp=tmp_path), before)
    assert len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_run_reports_a_stage_refusal_once(tmp_path: Path) -> None:
    """A stage refusing bad input inside `mtrack run` prints its one error line; the launcher adds
    no second one (it used to add 'stage plan failed')."""
    config = _config(tmp_path, data={"source": "fashion_mnist", "root": str(tmp_path / "no-data")})
    assert_refused(None, ["run", config], "no-data", {})


def _idx_folder(root: Path) -> str:
    """Fashion-MNIST's four IDX files, the training images truncated."""
    root.mkdir()
    header = {
        "train-images-idx3-ubyte": (3, [60, 28, 28]),
        "train-labels-idx1-ubyte": (1, [60]),
        "t10k-images-idx3-ubyte": (3, [10, 28, 28]),
        "t10k-labels-idx1-ubyte": (1, [10]),
    }
    for name, (ndim, dims) in header.items():
        body = bytes(int(np.prod(dims)) // (2 if name.startswith("train-images") else 1))
        (root / name).write_bytes(bytes([0, 0, 8, ndim]) + struct.pack(f">{ndim}I", *dims) + body)
    return str(root)


PLAN_CASES = [
    (
        "K larger than a class",
        lambda tmp: ["plan.n_member_users=1", "plan.samples_per_user=250"],
        "plan.samples_per_user=250",
    ),
    ("no held-out images", lambda tmp: ["data.n_train=1600"], "data.n_train=1600"),
    ("missing dataset path", lambda tmp: ["data.source=fashion_mnist", f"data.root={tmp}/nowhere"], "nowhere"),
    (
        "truncated dataset file",
        lambda tmp: ["data.source=fashion_mnist", f"data.root={_idx_folder(tmp / 'fm')}"],
        "train-images-idx3-ubyte",
    ),
    ("class named twice", lambda tmp: ["data.classes=[3, class-3]"], "data.classes: 'class-3' names class 3"),
    ("owners' folders larger than a class", lambda tmp: ["plan.owners={images: 500}"], "plan.owners.images=500"),
]


@pytest.mark.parametrize("overrides, names", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_plan_refuses_data_it_cannot_use(overrides, names: str, base_run: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir, ignore=lambda d, names: ["plan"] if Path(d) == base_run else [])
    sets = [a for o in [f"run_dir={run_dir}", *overrides(tmp_path)] for a in ("--set", o)]
    assert_refused(capsys, ["plan", TINY, *sets], names, snapshot(run_dir))
    assert not (run_dir / "plan").exists()  # refused before the stage claimed its folder (started.json)


def _edit_manifest(stage: str, outputs: dict[str, str]) -> Callable[[Path], None]:
    def edit(run_dir: Path) -> None:
        path = run_dir / stage / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["outputs"].update(outputs)
        path.write_text(json.dumps(manifest))

    return edit


def _swap_arms(run_dir: Path) -> None:
    """The marked arm's records given to the control arm and back: same size, other content."""
    path = run_dir / "write" / "arms.npz"
    with np.load(path) as loaded:
        arms = dict(loaded)
    with open(path, "wb") as fh:
        np.savez(fh, control=arms["marked"], marked=arms["control"])


def _flip_class(run_dir: Path) -> None:
    path = run_dir / "plan" / "users.json"
    text = path.read_text()
    path.write_text(text.replace('"class": 1', '"class": 2', 1))


RUN_DIR_CASES = [
    (
        "manifest lists a missing output",
        lambda r: (r / "write" / "test.beton").unlink(),
        ["train", "--arm", "marked"],
        "test.beton",
    ),
    (
        "truncated output",
        lambda r: _truncate(r / "write" / "train.beton"),
        ["train", "--arm", "marked"],
        "train.beton: size differs",
    ),
    ("arms swapped", _swap_arms, ["train", "--arm", "marked"], "arms.npz: content differs"),
    ("edited plan", _flip_class, ["mark", "--force"], "users.json: content differs"),
    (
        "lost mark shard",
        lambda r: (r / "mark" / "shard-0000-of-0001.npz").unlink(),
        ["write", "--force"],
        "shard-0000-of-0001.npz",
    ),
    ("manifest not JSON", lambda r: _truncate(r / "plan" / "manifest.json"), ["mark", "--force"], "plan/manifest.json"),
    (
        "manifest path escapes the run",
        _edit_manifest("plan", {"../../outside.txt": "0"}),
        ["mark", "--force"],
        "'../../outside.txt' lies outside",
    ),
    (
        "manifest absolute path",
        _edit_manifest("mark", {"/etc/hostname": "0"}),
        ["write", "--force"],
        "'/etc/hostname' lies outside",
    ),
    (
        "stage before its input",
        lambda r: shutil.rmtree(r / "write"),
        ["train", "--arm", "marked"],
        "needs stage 'write'",
    ),
    ("changed config on a finished stage", lambda r: None, ["mark", "--set", "mark.alpha=0.5"], "different config"),
    (
        "shard outside the range",
        lambda r: shutil.rmtree(r / "mark"),
        ["mark", "--shard", "3", "--num-shards", "2"],
        "--shard 3",
    ),
]


@pytest.mark.parametrize("breaks, command, names", [c[1:] for c in RUN_DIR_CASES], ids=[c[0] for c in RUN_DIR_CASES])
def test_run_dir_problems_are_named(
    breaks, command: list[str], names: str, base_run: Path, tmp_path: Path, capsys
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    breaks(run_dir)
    stage, *rest = command
    argv = [stage, TINY, "--set", f"run_dir={run_dir}", *rest]
    assert_refused(capsys, argv, names, snapshot(run_dir))


def test_train_refuses_a_batch_larger_than_the_training_set(base_run: Path, tmp_path: Path) -> None:
    """With fewer images than one batch per device there is no step to train: one line, not a
    ZeroDivisionError from the learning-rate schedule."""
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    assert_refused(
        None,
        ["train", TINY, "--set", f"run_dir={run_dir}", "--set", "train.batch_size=4096", "--arm", "marked"],
        "train.batch_size: 4096 images per device on 1 device(s)",
        snapshot(run_dir / "write"),
    )


@pytest.mark.parametrize(
    "make, names",
    [
        (lambda path, marker: path.write_bytes(pickle.dumps({"state_dict": Payload(marker)})), "last.ckpt: refused"),
        (lambda path, marker: path.write_bytes(b"PK\x03\x04 cut short"), "last.ckpt: not a loadable checkpoint"),
    ],
    ids=["malicious resume checkpoint", "truncated resume checkpoint"],
)
def test_train_refuses_a_checkpoint_it_cannot_resume(make, names: str, base_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    stage = stage_for(load_config(TINY, [f"run_dir={run_dir}"]), Task("train", "marked"))
    last = stage.path("checkpoints") / "last.ckpt"
    last.parent.mkdir(parents=True)
    make(last, tmp_path / "executed")
    assert_refused(None, ["train", TINY, "--set", f"run_dir={run_dir}", "--arm", "marked"], names, snapshot(run_dir))
    assert not (tmp_path / "executed").exists(), "loading the checkpoint ran code"
    assert not stage.path("model.pt").exists()


@pytest.mark.parametrize("bench", ["owner_audit", "owner_scores"])
def test_owner_benchmarks_refuse_a_bad_key_in_one_line(bench: str) -> None:
    """The owner benchmarks are commands too: a misspelt --set key is one error line, exit 2."""
    name = ["--name", "x"] if bench == "owner_scores" else []
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{bench}", *name, "--set", "train.nope=1"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.splitlines() == [
        "error: configs/owner-audit.yaml: train.nope: not a known key (misspelt, or in the wrong section?)"
    ]


def test_owner_benchmark_refuses_a_backbone_config_without_a_control_arm() -> None:
    """--pretrain trains the unmarked control arm of its config; one without it is refused up front."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.owner_audit", "--pretrain", "configs/owner-audit.yaml"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.splitlines() == [
        "error: --pretrain configs/owner-audit.yaml: train.arms must include control (the unmarked network)"
    ]


def test_a_benchmark_that_cannot_write_its_output_says_where_in_one_line(tmp_path: Path) -> None:
    """A path a benchmark cannot write (here: a folder under a file) is one error line naming it, exit 2."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = subprocess.run(
        [sys.executable, "-m", "bench.imagenet_like", str(blocker / "out"), "--images", "2", "--per-class", "1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.splitlines() == [f"error: {blocker}/out/train/n00000000: Not a directory"]
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            ["bench.owner_audit", "--arms", "nope"],
            "error: --arms: invalid choice: 'nope' (choose from 'marked', 'control')",
        ),
        (["bench.imagenet_like"], "error: python -m bench.imagenet_like: the following arguments are required: out"),
        (["bench.scale", "--sizes", "x"], "error: --sizes: invalid int value: 'x'"),
    ],
)
def test_a_benchmark_refuses_a_bad_flag_in_one_line(command: list[str], expected: str) -> None:
    """The benchmark commands parse as the pipeline's do: a bad flag is one error line, no usage block."""
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr.splitlines()) == (2, "", [expected])
