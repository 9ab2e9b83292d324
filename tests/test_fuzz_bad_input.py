"""Random bad input thrown at the three commands a person types by hand: the owner's `mtrack owner
mark` and `mtrack owner audit` (options and every field of the key file) and `mtrack run` (`--set` values and
whole config files). Every case must end in exit status 2 and exactly one line on stderr, the
`error:` line, naming what is wrong; no traceback; and the file tree exactly as it was.

The values are drawn by hypothesis (derandomized, so every run tries the same cases) and are bad
by an oracle written here from the bounds the docs and --help state, not taken from the code
under test. Calls are in-process (`pipeline.cli.main`); a few go through the installed `mtrack`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel

from pipeline.cli import main
from pipeline.config import MarkConfig, RunConfig
from pipeline.core.models import Normalized, build_model, save_weights
from pipeline.owner.designs import DesignParams
from pipeline.owner.key import KEY_NAME
from pipeline.owner.marking import mark_folder
from pipeline.store import file_sha256

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# Cases tried per test (docs/configuration.md's *When things go wrong* states their sum).
N_MARK, N_AUDIT, N_KEY, N_SET, N_CONFIG = 150, 100, 250, 150, 50

MAX_SEED = 2**63 - 1
INT_OPTIONS = {  # flag: (lowest, highest) allowed, as --help states them
    "mark": {"--seed": (0, MAX_SEED), "--n-patterns": (2, 1000), "--label": (0, 99_999), "--max-resolution": (8, None)},
    "audit": {"--label": (0, 99_999), "--num-classes": (2, 100_000)},
}
FLOAT_OPTIONS = {  # flag: (low, high, low allowed, high allowed)
    "mark": {"--alpha": (0.0, 1.0, False, True), "--epsilon": (0.0, 1.0, True, True)},
    "audit": {"--alpha": (0.0, 1.0, False, False)},
}
CHOICE_OPTIONS = {"mark": {"--noise": {"perlin", "uniform", "none"}, "--pattern": {"stripes", "ood_image"}}}


def snapshot(root: Path) -> dict[Path, str]:
    return {p: file_sha256(p) if p.is_file() else "folder" for p in sorted(root.rglob("*"))}


def refused(argv: list[str], root: Path, names: str) -> str:
    """The property: exit 2, stderr exactly one `error:` line naming `names`, no traceback, and
    nothing under `root` created, changed or removed."""
    before = snapshot(root)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    lines = err.getvalue().splitlines()
    assert code == 2, (argv, code, err.getvalue())
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err.getvalue())
    assert names in lines[0], (argv, names, lines[0])
    assert "Traceback" not in err.getvalue() and not out.getvalue()
    assert snapshot(root) == before, (argv, "the file tree changed")
    return lines[0]


@pytest.fixture(scope="module")
def owner(tmp_path_factory) -> Path:
    """originals/ (three 12x16 images), published/ (their marked copies and key), model.pt."""
    root = tmp_path_factory.mktemp("fuzz-owner")
    for i in range(3):
        (root / "originals").mkdir(exist_ok=True)
        rgb = np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "originals" / f"img{i}.png")
    mark_folder(
        root / "originals",
        root / "published",
        MarkConfig(),
        seed=1,
        label=0,
        params=DesignParams("pattern", n_patterns=4),
    )
    model = Normalized(build_model("small_cnn", 4, 8), (0.5,) * 3, (0.25,) * 3)
    save_weights(
        model,
        {"arch": "small_cnn", "width": 8, "num_classes": 4, "mean": [0.5] * 3, "std": [0.25] * 3},
        root / "model.pt",
    )
    return root


# --- oracles and strategies -----------------------------------------------------------------------


def _int_ok(text: str, low: int, high: int | None) -> bool:
    try:
        value = int(text)
    except ValueError:
        return False
    return low <= value and (high is None or value <= high)


def _float_ok(text: str, low: float, high: float, low_ok: bool, high_ok: bool) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return (
        math.isfinite(value)
        and (low <= value if low_ok else low < value)
        and (value <= high if high_ok else value < high)
    )


def bad_int(low: int, high: int | None) -> st.SearchStrategy[str]:
    outside = st.integers(max_value=low - 1) | (st.integers(min_value=high + 1) if high is not None else st.nothing())
    junk = st.sampled_from(["", " ", "1.5", "1e3", "0x10", "nan", "inf", "ten", "--", "2**8", "١٢"]) | st.text(
        max_size=12
    )
    return (outside.map(str) | junk).filter(lambda t: not _int_ok(t, low, high))


def bad_float(low: float, high: float, low_ok: bool, high_ok: bool) -> st.SearchStrategy[str]:
    numbers = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    junk = st.sampled_from(["", "nan", "-inf", "inf", "1/2", "0,5", "half"]) | st.text(max_size=12)
    return (numbers | junk).filter(lambda t: not _float_ok(t, low, high, low_ok, high_ok))


def bad_option(command: str) -> st.SearchStrategy[tuple[str, str]]:
    """(flag, value) with the value outside what the flag accepts."""
    options = [st.tuples(st.just(f), bad_int(*b)) for f, b in INT_OPTIONS.get(command, {}).items()]
    options += [st.tuples(st.just(f), bad_float(*b)) for f, b in FLOAT_OPTIONS.get(command, {}).items()]
    options += [
        st.tuples(st.just(f), st.text(max_size=10).filter(lambda t, c=c: t not in c))
        for f, c in CHOICE_OPTIONS.get(command, {}).items()
    ]
    return st.one_of(options)


def good_options(command: str) -> st.SearchStrategy[list[str]]:
    """Valid options to mix in, so a bad one is caught whatever comes with it."""
    pool = {
        "mark": [
            ("--seed", st.integers(0, MAX_SEED)),
            ("--n-patterns", st.integers(2, 1000)),
            ("--label", st.integers(0, 99_999)),
            ("--noise", st.sampled_from(["perlin", "uniform", "none"])),
        ],
        "audit": [("--label", st.integers(0, 3)), ("--alpha", st.floats(0.001, 0.999))],
    }[command]
    chosen = st.lists(st.sampled_from(range(len(pool))), unique=True, max_size=len(pool))
    return chosen.flatmap(
        lambda idx: st.tuples(*(pool[i][1].map(lambda v, f=pool[i][0]: f"{f}={v}") for i in idx))
    ).map(list)


NOT_INT = st.one_of(
    st.text(max_size=8),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
NOT_STR = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(), st.lists(st.text(max_size=3), max_size=2)
)
NOT_NUMBER = st.one_of(st.text(max_size=8), st.none(), st.booleans(), st.lists(st.floats(), max_size=2))


def ints_outside(low: int, high: int | None) -> st.SearchStrategy[int]:
    return st.integers(max_value=low - 1) | (st.integers(min_value=high + 1) if high is not None else st.nothing())


def floats_outside(low: float, high: float, low_ok: bool, high_ok: bool) -> st.SearchStrategy[float]:
    return st.floats().filter(lambda v: not _float_ok(repr(v), low, high, low_ok, high_ok))


BAD_PATHS = st.one_of(
    st.sampled_from(["", "/etc/hostname", "../img0.png", "a/../../b.png", "./img0.png", "a\\b.png", "img\0.png"]),
    NOT_STR,
)
BAD_HASHES = st.one_of(
    st.text(max_size=70).filter(lambda t: not (len(t) == 64 and set(t) <= set("0123456789abcdef"))), NOT_STR
)
# key field -> strategy of values that field must refuse (the key's images are 12x16 and 4 patterns)
KEY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "format": st.one_of(st.text(max_size=20).filter(lambda t: t != "mtrack-key/1"), NOT_STR),
    "created": NOT_STR,
    "source_folder": st.one_of(st.just(""), NOT_STR),
    "seed": st.one_of(ints_outside(0, MAX_SEED), NOT_INT),
    "n_patterns": st.one_of(ints_outside(2, 1000), NOT_INT),
    "pattern_index": st.one_of(st.integers(), NOT_INT),  # any index but the published one: see _mutate
    "label": st.one_of(ints_outside(0, 99_999), NOT_INT.filter(lambda v: v is not None)),
    "max_resolution": st.one_of(st.integers(max_value=15), NOT_INT.filter(lambda v: v is not None)),
    "mark.alpha": st.one_of(floats_outside(0, 1, False, True), ints_outside(1, 1), NOT_NUMBER),
    "mark.epsilon": st.one_of(floats_outside(0, 1, True, True), ints_outside(0, 1), NOT_NUMBER),
    "mark.noise": st.one_of(st.text(max_size=8).filter(lambda t: t not in {"perlin", "uniform", "none"}), NOT_STR),
    "mark.pattern": st.one_of(st.text(max_size=8).filter(lambda t: t not in {"stripes", "ood_image"}), NOT_STR),
    "mark.n_stripes": st.one_of(ints_outside(1, 256), NOT_INT),
    "mark.ood_folder": st.one_of(st.text(max_size=8), st.integers()),  # the key's pattern is stripes
    "files": st.one_of(st.just([]), NOT_INT.filter(lambda v: not isinstance(v, list) or v)),
    "files.0.original": BAD_PATHS,
    "files.1.marked": BAD_PATHS,
    "files.2.original_sha256": BAD_HASHES,
    "files.0.marked_sha256": BAD_HASHES,
    "files.1.height": st.one_of(st.integers(max_value=7), NOT_INT),
    "files.2.width": st.one_of(st.integers(max_value=7), NOT_INT),
}


def _mutate(key: dict, field: str, value: Any) -> dict:
    key = json.loads(json.dumps(key))
    *parents, leaf = field.split(".")
    node = key
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if field == "pattern_index" and value == key["pattern_index"]:
        value = key["pattern_index"] + 1  # any index but the published one (or a non-integer)
    node[leaf] = value
    return key


def _config_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, field info) of every field of the run config that has numeric bounds."""
    out = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += _config_fields(info.annotation, f"{prefix}{name}.")
        elif any(getattr(m, a, None) is not None for m in info.metadata for a in ("ge", "gt", "le", "lt")):
            out.append((f"{prefix}{name}", info))
    return out


def _outside(info: Any) -> st.SearchStrategy[str]:
    """YAML text of a value outside a numeric field's bounds (and NaN or infinity for a float)."""
    whole = "float" not in str(info.annotation)
    step = (lambda b, d: b + d) if whole else (lambda b, d: math.nextafter(b, d * math.inf))
    choices = [] if whole else [st.sampled_from([".nan", ".inf", "-.inf"])]
    for m in info.metadata:
        if getattr(m, "ge", None) is not None:
            choices.append(_numbers(whole, high=step(m.ge, -1)))
        if getattr(m, "gt", None) is not None:
            choices.append(_numbers(whole, high=m.gt))
        if getattr(m, "le", None) is not None:
            choices.append(_numbers(whole, low=step(m.le, 1)))
        if getattr(m, "lt", None) is not None:
            choices.append(_numbers(whole, low=m.lt))
    return st.one_of(choices)


def _numbers(whole: bool, low: float | None = None, high: float | None = None) -> st.SearchStrategy[str]:
    if whole:
        return st.integers(min_value=low, max_value=high).map(str)
    return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False).map(repr)


SET_FIELDS = _config_fields(RunConfig)
YAML_BREAKERS = [
    "[",
    "{",
    "'",
    '"',
    "]",
    "}",
    "*undefined",
    "!!python/object:os.system",
    "a: b: c",
    "- [",
    "{a: [}",
    "&x",
    "%YAML 1.1",
    "\t",
    "@",
    "`",
]


def bad_set() -> st.SearchStrategy[tuple[str, str]]:
    """(--set text, what the error must name)."""
    out_of_range = st.sampled_from(SET_FIELDS).flatmap(lambda f: _outside(f[1]).map(lambda v: (f"{f[0]}={v}", f[0])))
    broken_yaml = (
        st.tuples(st.sampled_from(SET_FIELDS), st.sampled_from(YAML_BREAKERS), st.text(max_size=5))
        .filter(lambda t: not _yaml_ok(t[1] + t[2]))
        .map(lambda t: (f"{t[0][0]}={t[1]}{t[2]}", f"--set {t[0][0]}"))
    )
    unknown = (
        st.tuples(
            st.sampled_from(["", "data.", "plan.", "mark.", "train.", "audit.", "launch."]),
            st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True),
        )
        .filter(lambda t: t[1] not in _known(t[0]))
        .map(lambda t: (f"{t[0]}{t[1]}=1", f"{t[0]}{t[1]}"))
    )
    malformed = st.sampled_from(["train.epochs", "=3", ".=1", "train..lr=1", "train.=1", " =2"]).map(
        lambda t: (t, "--set")
    )
    return st.one_of(out_of_range, broken_yaml, unknown, malformed)


def _yaml_ok(text: str) -> bool:
    try:
        yaml.safe_load(text)
        return True
    except yaml.YAMLError:
        return False


def _known(section: str) -> set[str]:
    model = RunConfig if not section else RunConfig.model_fields[section.rstrip(".")].annotation
    return set(model.model_fields) | ({"extends"} if not section else set())


def _not_a_config(text: str) -> bool:
    """True unless `text` is YAML whose top level could pass as a run config (so it must be refused)."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return True
    return not (tree is None or (isinstance(tree, dict) and set(map(str, tree)) <= _known("")))


# --- the properties -------------------------------------------------------------------------------

FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


def _run(check: Callable[..., None], strategy: st.SearchStrategy[Any], n: int) -> int:
    tried = []

    @settings(FUZZ, max_examples=n)
    @given(strategy)
    def each(case: Any) -> None:
        tried.append(case)
        check(case)

    each()
    return len(tried)


def test_mark_refuses_random_bad_options(owner: Path, tmp_path: Path) -> None:
    root = tmp_path / "owner"
    shutil.copytree(owner, root)

    def check(case: tuple[tuple[str, str], list[str], int]) -> None:
        (flag, value), others, at = case
        others.insert(min(at, len(others)), f"{flag}={value}")
        argv = ["owner", "mark", str(root / "originals"), "--out", str(root / "published"), "--force", *others]
        refused(argv, root, flag)

    assert _run(check, st.tuples(bad_option("mark"), good_options("mark"), st.integers(0, 4)), N_MARK) >= N_MARK


def test_audit_refuses_random_bad_options(owner: Path, tmp_path: Path) -> None:
    root = tmp_path / "owner"
    shutil.copytree(owner, root)

    def check(case: tuple[tuple[str, str], list[str], int]) -> None:
        (flag, value), others, at = case
        others.insert(min(at, len(others)), f"{flag}={value}")
        argv = ["owner", "audit", "--model", str(root / "model.pt"), "--user", str(root / "published"), *others]
        refused(argv, root, flag)

    assert _run(check, st.tuples(bad_option("audit"), good_options("audit"), st.integers(0, 2)), N_AUDIT) >= N_AUDIT


def test_audit_refuses_random_bad_key_fields(owner: Path, tmp_path: Path) -> None:
    root = tmp_path / "owner"
    shutil.copytree(owner, root)
    key = json.loads((root / "published" / KEY_NAME).read_text())
    key["source_folder"] = str(root / "originals")
    edited = root / "edited-key.json"
    field_values = st.sampled_from(sorted(KEY_FIELDS)).flatmap(lambda f: st.tuples(st.just(f), KEY_FIELDS[f]))
    extra = st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda n: n not in key).map(lambda n: ("extra", n))
    dropped = st.sampled_from(sorted(key)).map(lambda n: ("drop", n))
    garbage = st.one_of(
        st.binary(max_size=64),
        st.text(max_size=30).map(str.encode),
        st.lists(st.integers(), max_size=3).map(lambda v: json.dumps(v).encode()),
    ).map(lambda b: ("raw", b))

    def check(case: tuple[str, Any]) -> None:
        kind, value = case
        if kind == "raw":
            edited.write_bytes(value)
            names = edited.name
        elif kind == "extra":
            edited.write_text(json.dumps({**key, value: 1}))
            names = f"{edited.name}: {value}"
        elif kind == "drop":
            edited.write_text(json.dumps({k: v for k, v in key.items() if k != value}))
            names = f"{edited.name}: {value}"
        else:
            edited.write_text(json.dumps(_mutate(key, kind, value)))
            names = f"{edited.name}: {kind.split('.')[0]}"
        refused(
            [
                "owner",
                "audit",
                "--model",
                str(root / "model.pt"),
                "--user",
                str(root / "published"),
                "--key",
                str(edited),
            ],
            root,
            names,
        )

    strategy = st.one_of(field_values, field_values, field_values, extra, dropped, garbage)
    assert _run(check, strategy, N_KEY) >= N_KEY


def test_run_refuses_random_bad_overrides(tmp_path: Path, monkeypatch) -> None:
    """--dry-run: what is refused is the config (what `run` checks beyond it has its own tests), and a
    value wrongly accepted prints a job plan instead of running the pipeline for minutes."""
    monkeypatch.chdir(tmp_path)  # a config wrongly accepted with a relative run_dir lands in the tree checked
    tree = yaml.safe_load(TINY.read_text())
    tree.update(run_dir=str(tmp_path / "run"), results_dir=str(tmp_path / "results"))
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tree))

    def check(case: tuple[str, str]) -> None:
        override, names = case
        refused(["run", str(config), "--dry-run", "--set", override], tmp_path, names)

    assert _run(check, bad_set(), N_SET) >= N_SET


def _bytes_not_a_config(data: bytes) -> bool:
    try:
        return _not_a_config(data.decode("utf-8"))
    except UnicodeDecodeError:
        return True


def test_run_refuses_random_config_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "cfg.yaml"
    lines = st.lists(
        st.sampled_from(YAML_BREAKERS + ["seed: 1", "train:", "  epochs: 2", "x", "- 1"]), min_size=1, max_size=5
    ).map(lambda parts: "\n".join(parts).encode())
    texts = st.one_of(
        st.binary(min_size=1, max_size=80), st.text(min_size=1, max_size=80).map(str.encode), lines
    ).filter(_bytes_not_a_config)

    def check(data: bytes) -> None:
        config.write_bytes(data)
        refused(["run", str(config), "--dry-run"], tmp_path, config.name)

    assert _run(check, texts, N_CONFIG) >= N_CONFIG


ENTRY_POINT_CASES = [
    ("mark", ["--n-patterns", "0"], "--n-patterns"),
    ("mark", ["--seed", "-1"], "--seed"),
    ("audit", ["--label", "nan"], "--label"),
    ("run", ["--set", "train.epochs=[1,"], "--set train.epochs"),
]


@pytest.mark.parametrize(
    "command, extra, names", ENTRY_POINT_CASES, ids=[" ".join([c[0], *c[1]]) for c in ENTRY_POINT_CASES]
)
def test_installed_entry_point(command: str, extra: list[str], names: str, owner: Path, tmp_path: Path) -> None:
    """The same property through the `mtrack` script pip installed, in its own process."""
    mtrack = shutil.which("mtrack", path=str(Path(sys.executable).parent))
    assert mtrack, "the mtrack entry point is not installed"
    root = tmp_path / "owner"
    shutil.copytree(owner, root)
    argv = {
        "mark": ["owner", "mark", str(root / "originals"), "--out", str(root / "new")],
        "audit": ["owner", "audit", "--model", str(root / "model.pt"), "--user", str(root / "published")],
        "run": ["run", str(TINY), "--set", f"run_dir={root / 'run'}"],
    }[command] + extra
    before = snapshot(root)
    result = subprocess.run([mtrack, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and not result.stdout, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], result.stderr
    assert snapshot(root) == before


# --- files built to hurt a parser: nesting, huge integers, and what only looks like a record or table ---

DEEP_YAML = {"a list": "[" * 20_000 + "]" * 20_000, "a mapping": "{a: " * 20_000 + "1" + "}" * 20_000}
DEEP_JSON = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000
RECORD = {
    "folder": "slurm/%j",
    "poll_s": 10,
    "summary_every_s": 300,
    "submitted_at": 1.7e9,
    "jobs": [{"task": "plan", "shard": None, "job_ids": ["12"], "stage_dir": "run/plan", "epochs": None}],
}
# its base config does not exist: a table wrongly accepted fails at once rather than running a pipeline
TABLE = "table: t\ntitle: T\nbase: missing.yaml\nclaim: c\nseeds: [0]\nrows: [{name: a}]\n"


def _record(**changes: Any) -> str:
    return json.dumps({**RECORD, **changes})


def _job(**changes: Any) -> str:
    return json.dumps({**RECORD, "jobs": [{**RECORD["jobs"][0], **changes}]})


# (command, file name, file text (None: a folder; bytes: written as they are), what the error names)
HOSTILE_FILES = [
    *[("run", "cfg.yaml", f"seed: 0\ntrain: {text}\n", "nested deeper than 64") for text in DEEP_YAML.values()],
    ("run", "cfg.yaml", f"seed: {HUGE}\n", "an integer of 5000 digits"),
    ("run", "cfg.yaml", "train:\n  epochs: 0x" + "f" * 5000 + "\n", "an integer of 5002 digits"),
    ("key", "key.json", DEEP_JSON, "nested deeper than 64"),
    ("key", "key.json", '{"format": "mtrack-key/2", "seed": ' + HUGE + "}", "an integer of 5000 digits"),
    ("key", "key.json", "{" * 50_000 + "}" * 50_000, "key.json: not valid JSON"),
    ("status", "slurm-jobs.json", DEEP_JSON, "nested deeper than 64"),
    ("status", "slurm-jobs.json", '{"poll_s": -' + HUGE + "}", "an integer of 5000 digits"),
    ("status", "slurm-jobs.json", _record(submitted_at="yesterday"), "submitted_at: Input should be a valid number"),
    ("status", "slurm-jobs.json", _job(job_ids=["1;touch x"]), "'1;touch x' is not a SLURM job id"),
    ("status", "slurm-jobs.json", _job(job_ids=["12", "-1"]), "jobs.0.job_ids.1"),
    ("status", "slurm-jobs.json", _record(poll_s=True), "poll_s: should be a number, found true"),
    ("status", "slurm-jobs.json", _job(shard="0"), "jobs.0.shard"),
    ("status", "slurm-jobs.json", _record(jobs={}), "jobs: "),
    ("status", "slurm-jobs.json", "[]", "should be a section"),
    *[("experiments", "t.yaml", f"{TABLE}set: {text}\n", "nested deeper than 64") for text in DEEP_YAML.values()],
    ("experiments", "t.yaml", TABLE.replace("[0]", f"[{HUGE}]"), "an integer of 5000 digits"),
    ("experiments", "t.yaml", TABLE.replace("[0]", "[true]"), "seeds: should be a number, found true"),
    ("experiments", "t.yaml", "import os\nrows = {1: [\n", "t.yaml: not valid YAML"),
    ("experiments", "t.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff", "t.yaml: not a text (UTF-8) file"),
    ("experiments", "t.yaml", None, "t.yaml: is a folder, not an experiment table"),
    ("experiments", "t.yaml", "- a\n- b\n", "t.yaml: should be a section of key: value settings, found a list"),
    ("experiments", "t.yaml", TABLE.replace("table: t", "table: ../../escape"), "table: '../../escape' is not"),
    ("experiments", "t.yaml", TABLE.replace("table: t", "table: /tmp/x"), "table: '/tmp/x' is not"),
]


@pytest.mark.parametrize(
    "command, name, text, names", HOSTILE_FILES, ids=[f"{c[0]}-{i}" for i, c in enumerate(HOSTILE_FILES)]
)
def test_files_built_to_hurt_a_parser_are_refused(
    command: str, name: str, text: str | bytes | None, names: str, owner: Path, tmp_path: Path, monkeypatch
) -> None:
    """Nesting past the interpreter's recursion limit, integers past its 4300-digit conversion limit,
    job records and tables that are not what they claim: one line naming the file, exit 2."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / {"run": "cfg", "key": "owner", "status": "run/launch", "experiments": "tables"}[command]
    if command == "key":
        shutil.copytree(owner, folder)
    folder.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cfg.yaml").write_text(TINY.read_text())
    path = folder / name
    if text is None:
        path.mkdir()
    else:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = {
        "run": ["run", str(path), "--dry-run"],
        "key": ["owner", "audit", "--model", str(folder / "model.pt"), "--user", str(folder / "published")]
        + ["--key", str(path)],
        "status": ["status", str(tmp_path / "run")],
        "experiments": ["experiments", str(path)],
    }[command]
    line = refused(argv, tmp_path, names)
    assert line.startswith(f"error: {path}: "), line


def test_set_values_built_to_hurt_a_parser_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for value, names in [
        (DEEP_YAML["a list"], "--set train.milestones: nested deeper than 64"),
        (DEEP_YAML["a mapping"], "--set train.milestones: nested deeper than 64"),
        (HUGE, "--set train.milestones: an integer of 5000 digits"),
        ("[1, true]", "train.milestones: should be a number, found true"),
    ]:
        refused(["run", str(TINY), "--dry-run", "--set", f"train.milestones={value}"], tmp_path, names)
