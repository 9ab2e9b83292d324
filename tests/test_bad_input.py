"""Bad input through the command line: exit status 2, one `error: ...` line on stderr naming the file
or key, no traceback, and every output that existed before is byte-for-byte unchanged. Unusual but
valid images (grey, RGBA, 16-bit, palette, ...) are accepted, not refused."""
from __future__ import annotations

import json
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import Payload
from PIL import Image

from pipeline.cli import main
from pipeline.config import MarkConfig, load_config
from pipeline.stages.dag import Task, run_task, stage_for
from pipeline.data.images import read_rgb
from pipeline.core.models import Normalized, build_model, save_weights
from pipeline.owner.designs import DesignParams
from pipeline.owner.key import KEY_NAME
from pipeline.owner.marking import mark_folder
from pipeline.store import file_sha256

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def snapshot(*folders: Path) -> dict[Path, str]:
    return {p: file_sha256(p) for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(capsys, argv: list, names: str, untouched: dict[Path, str]) -> None:
    """The command exits 2 with one error line containing `names`, and changes none of `untouched`.
    With `capsys` None it runs in its own process (Lightning's log handlers outlive one test's capture)."""
    if capsys is None:
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, argv)], cwd=REPO,
                                capture_output=True, text=True)
        code, err = result.returncode, result.stderr
    else:
        code, err = main([str(a) for a in argv]), capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert names in errors[0], errors[0]
    assert {p: file_sha256(p) for p in untouched if p.exists()} == untouched, "an earlier output changed"


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
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


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
    save_weights(model, {"arch": "small_cnn", "width": 8, "num_classes": 4, "mean": [0.5] * 3, "std": [0.25] * 3},
                 root / "model.pt")
    torch.save(model.net.state_dict(), root / "plain_small_cnn.pt")
    return root


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _copy_first_image(src: Path, name: str) -> None:
    shutil.copyfile(src / "img0.png", src / name)


MARK_CASES: list[tuple[str, Callable[[Path], None], list[str], str]] = [
    ("truncated png", lambda s: (_image(s / "bad.png", size=(64, 64)), _truncate(s / "bad.png")), ["--force"], "bad.png"),
    ("truncated jpeg", lambda s: (_image(s / "bad.jpg", size=(64, 64)), _truncate(s / "bad.jpg")), ["--force"], "bad.jpg"),
    ("garbage bytes", lambda s: (s / "noise.png").write_bytes(np.random.default_rng(0).bytes(500)), ["--force"],
     "noise.png"),
    ("text named .jpg", lambda s: (s / "notes.jpg").write_text("shopping list"), ["--force"], "notes.jpg"),
    ("empty file", lambda s: (s / "empty.webp").write_bytes(b""), ["--force"], "empty.webp"),
    ("decompression bomb", lambda s: _png_header(s / "huge.png", 30_000, 30_000), ["--force"], "huge.png: too large"),
    ("duplicate file", lambda s: _copy_first_image(s, "img0-copy.png"), ["--force"], "img0-copy.png"),
    ("same target name", lambda s: _image(s / "img1.jpg"), ["--force"], "img1"),
    ("empty folder", lambda s: [p.unlink() for p in list(s.iterdir())], ["--force"], "no image files"),
    ("only non-images", lambda s: [p.rename(p.with_suffix(".txt")) for p in list(s.iterdir())], ["--force"],
     "no image files"),
    ("already-marked folder", lambda s: (s / KEY_NAME).write_text("{}"), ["--force"], "already marked"),
    ("existing key, no --force", lambda s: None, [], KEY_NAME),
    ("alpha zero", lambda s: None, ["--force", "--alpha", "0"], "--alpha"),
    ("alpha above one", lambda s: None, ["--force", "--alpha", "1.5"], "--alpha"),
    ("negative epsilon", lambda s: None, ["--force", "--epsilon", "-0.01"], "--epsilon"),
    ("one pattern", lambda s: None, ["--force", "--design", "pattern", "--n-patterns", "1"], "--n-patterns"),
    ("publish nothing", lambda s: None, ["--force", "--publish", "0"], "--publish 0"),
    ("publish everything", lambda s: None, ["--force", "--publish", "3"], "--publish 3"),
    ("groups of more than half", lambda s: None, ["--force", "--design", "groups", "--publish", "2"], "--publish 2"),
    ("no draws", lambda s: None, ["--force", "--draws", "0"], "--draws 0"),
    ("ood without folder", lambda s: None, ["--force", "--pattern", "ood_image"], "ood_folder"),
    ("ood folder missing", lambda s: None, ["--force", "--pattern", "ood_image", "--ood-folder", "/nonexistent/ood"],
     "/nonexistent/ood"),
]


@pytest.mark.parametrize("make, args, names", [c[1:] for c in MARK_CASES], ids=[c[0] for c in MARK_CASES])
def test_owner_mark_refuses(make, args: list[str], names: str, owner: Path, tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "photos", tmp_path / "published"
    shutil.copytree(owner / "originals", src)
    shutil.copytree(owner / "marked", out)  # an earlier marking that a failed one must leave alone
    make(src)
    assert_refused(capsys, ["mark", src, "--out", out, *args], names, snapshot(src, out))


ACCEPTED_MODES = ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16", "palette+transparency"]


@pytest.mark.parametrize("mode", ACCEPTED_MODES)
def test_owner_mark_accepts_unusual_images(mode: str, tmp_path: Path, capsys) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    if mode == "I;16":
        Image.fromarray(np.random.default_rng(0).integers(0, 65535, (12, 16), dtype=np.uint16)).save(src / "a.png")
    elif mode == "palette+transparency":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).convert("P").save(
            src / "a.png", transparency=0)
    else:
        _image(src / ("a.jpg" if mode == "CMYK" else "a.png"), mode)
    assert main(["mark", str(src), "--out", str(tmp_path / "out"), "--seed", "3", "--design", "pattern"]) == 0, \
        capsys.readouterr().err
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
    save_weights(model, {"arch": "small_cnn", "width": 16, "num_classes": 4, "mean": [0.5] * 3, "std": [0.25] * 3},
                 root / "wrong-width.pt")
    return root / "wrong-width.pt"


def _truncated_model(root: Path) -> Path:
    shutil.copyfile(root / "model.pt", root / "cut.pt")
    _truncate(root / "cut.pt", 0.6)
    return root / "cut.pt"


def _drop_marked(root: Path) -> Path:
    (root / "marked" / "img1.png").unlink()
    return root / "model.pt"


def _drop_original(root: Path) -> Path:
    (root / "originals" / "img2.png").unlink()
    return root / "model.pt"


def _key_file(text: str) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        (root / "marked" / KEY_NAME).write_text(text)
        return root / "model.pt"

    return write


AUDIT_CASES: list[tuple[str, Callable[[Path], Path], list[str], str]] = [
    ("truncated checkpoint", _truncated_model, [], "cut.pt"),
    ("malicious pickle", _malicious, [], "evil.pt: refused"),
    ("weights of another width", _inconsistent, [], "wrong-width.pt"),
    ("state_dict of another arch", lambda r: r / "plain_small_cnn.pt", ["--arch", "resnet18_cifar", "--num-classes", "4"],
     "does not fit --arch resnet18_cifar"),
    ("plain state_dict without --arch", lambda r: r / "plain_small_cnn.pt", [], "--arch"),
    ("missing checkpoint", lambda r: r / "nope.pt", [], "nope.pt"),
    ("unimportable callable", lambda r: Path("no_such_module:predict"), [], "no_such_module"),
    ("key for another folder", lambda r: r / "model.pt", ["--key", "{root}/other-marked/" + KEY_NAME], "another folder"),
    ("key not JSON", _key_file("{ truncated"), [], KEY_NAME),
    ("key of another format", _key_file('{"format": "mtrack-key/1"}'), [], "not a mtrack-key/2"),
    ("missing key", lambda r: r / "model.pt", ["--key", "{root}/absent.json"], "absent.json"),
    ("fewer marked images than the key", _drop_marked, [], "img1.png"),
    ("fewer originals than the key", _drop_original, [], "img2.png"),
    ("no label", lambda r: r / "model.pt", ["--user", "{root}/other-marked"], "--label"),
]


@pytest.mark.parametrize("make, args, names", [c[1:] for c in AUDIT_CASES], ids=[c[0] for c in AUDIT_CASES])
def test_owner_audit_refuses(make, args: list[str], names: str, owner: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "owner"
    shutil.copytree(owner, root)
    key = json.loads((root / "marked" / KEY_NAME).read_text())
    key["source_folder"] = str(root / "originals")
    (root / "marked" / KEY_NAME).write_text(json.dumps(key))
    model = make(root)
    args = [a.format(root=root) for a in args]
    user = [] if "--user" in args else ["--user", root / "marked"]
    assert_refused(capsys, ["audit", "--model", model, *user, *args], names, snapshot(root))
    assert not (root / "executed").exists(), "loading the checkpoint ran code"


def test_audit_without_user_folder(owner: Path, capsys) -> None:
    assert_refused(capsys, ["audit", "--model", owner / "model.pt"], "--user", snapshot(owner))


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
]


@pytest.mark.parametrize("overrides, names", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_refused_before_anything_runs(overrides: list[str], names: str, base_run: Path, capsys) -> None:
    sets = [a for o in [f"run_dir={base_run}", *overrides] for a in ("--set", o)]
    assert_refused(capsys, ["mark", TINY, *sets, "--force"], names, snapshot(base_run))


def test_unreadable_config_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "broken.yaml").write_text("plan: [unclosed\n")
    assert_refused(capsys, ["plan", tmp_path / "broken.yaml"], "broken.yaml", {})
    assert_refused(capsys, ["plan", tmp_path / "absent.yaml"], "absent.yaml", {})


def _idx_folder(root: Path) -> str:
    """Fashion-MNIST's four IDX files, the training images truncated."""
    root.mkdir()
    header = {"train-images-idx3-ubyte": (3, [60, 28, 28]), "train-labels-idx1-ubyte": (1, [60]),
              "t10k-images-idx3-ubyte": (3, [10, 28, 28]), "t10k-labels-idx1-ubyte": (1, [10])}
    for name, (ndim, dims) in header.items():
        body = bytes(int(np.prod(dims)) // (2 if name.startswith("train-images") else 1))
        (root / name).write_bytes(bytes([0, 0, 8, ndim]) + struct.pack(f">{ndim}I", *dims) + body)
    return str(root)


PLAN_CASES = [
    ("K larger than a class", lambda tmp: ["plan.n_member_users=1", "plan.samples_per_user=250"],
     "plan.samples_per_user=250"),
    ("no held-out images", lambda tmp: ["data.n_train=1600"], "data.n_train=1600"),
    ("missing dataset path", lambda tmp: ["data.source=fashion_mnist", f"data.root={tmp}/nowhere"], "nowhere"),
    ("truncated dataset file", lambda tmp: ["data.source=fashion_mnist", f"data.root={_idx_folder(tmp / 'fm')}"],
     "train-images-idx3-ubyte"),
]


@pytest.mark.parametrize("overrides, names", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_plan_refuses_data_it_cannot_use(overrides, names: str, base_run: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir, ignore=lambda d, names: ["plan"] if Path(d) == base_run else [])
    sets = [a for o in [f"run_dir={run_dir}", *overrides(tmp_path)] for a in ("--set", o)]
    assert_refused(capsys, ["plan", TINY, *sets], names, snapshot(run_dir))
    assert not (run_dir / "plan" / "manifest.json").exists()


def _edit_manifest(stage: str, outputs: dict[str, str]) -> Callable[[Path], None]:
    def edit(run_dir: Path) -> None:
        path = run_dir / stage / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["outputs"].update(outputs)
        path.write_text(json.dumps(manifest))

    return edit


def _flip_class(run_dir: Path) -> None:
    path = run_dir / "plan" / "users.json"
    text = path.read_text()
    path.write_text(text.replace('"class": 1', '"class": 2', 1))


RUN_DIR_CASES = [
    ("manifest lists a missing output", lambda r: (r / "write" / "test.beton").unlink(), ["train", "--arm", "marked"],
     "test.beton"),
    ("truncated output", lambda r: _truncate(r / "write" / "train_marked.beton"), ["train", "--arm", "marked"],
     "train_marked.beton: size differs"),
    ("beton written for another arm", lambda r: shutil.copyfile(r / "write" / "train_clean.beton",
                                                                r / "write" / "train_marked.beton"),
     ["train", "--arm", "marked"], "train_marked.beton: content differs"),
    ("edited plan", _flip_class, ["mark", "--force"], "users.json: content differs"),
    ("lost mark shard", lambda r: (r / "mark" / "shard-0000-of-0001.npz").unlink(), ["write", "--force"],
     "shard-0000-of-0001.npz"),
    ("manifest not JSON", lambda r: _truncate(r / "plan" / "manifest.json"), ["mark", "--force"], "plan/manifest.json"),
    ("manifest path escapes the run", _edit_manifest("plan", {"../../outside.txt": "0"}), ["mark", "--force"],
     "'../../outside.txt' lies outside"),
    ("manifest absolute path", _edit_manifest("mark", {"/etc/hostname": "0"}), ["write", "--force"],
     "'/etc/hostname' lies outside"),
    ("stage before its input", lambda r: shutil.rmtree(r / "write"), ["train", "--arm", "marked"],
     "needs stage 'write'"),
    ("changed config on a finished stage", lambda r: None, ["mark", "--set", "mark.alpha=0.5"], "different config"),
    ("shard outside the range", lambda r: shutil.rmtree(r / "mark"), ["mark", "--shard", "3", "--num-shards", "2"],
     "--shard 3"),
]


@pytest.mark.parametrize("breaks, command, names", [c[1:] for c in RUN_DIR_CASES], ids=[c[0] for c in RUN_DIR_CASES])
def test_run_dir_problems_are_named(breaks, command: list[str], names: str, base_run: Path, tmp_path: Path,
                                    capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    breaks(run_dir)
    stage, *rest = command
    argv = [stage, TINY, "--set", f"run_dir={run_dir}", *rest]
    assert_refused(capsys, argv, names, snapshot(run_dir))


@pytest.mark.parametrize("make, names", [
    (lambda path, marker: path.write_bytes(pickle.dumps({"state_dict": Payload(marker)})), "last.ckpt: refused"),
    (lambda path, marker: path.write_bytes(b"PK\x03\x04 cut short"), "last.ckpt: not a loadable checkpoint"),
], ids=["malicious resume checkpoint", "truncated resume checkpoint"])
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
