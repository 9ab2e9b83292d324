"""The run directory: atomic writes and stage manifests.

Every file appears whole or not at all (written to a temporary name in the same folder, flushed,
then renamed). A stage is done when its `manifest.json` exists and records the hash of the config
it was built from; a re-run with the same config skips it, a different config is refused rather
than silently mixing outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .usage import cpu_seconds, start_sampling, usage_since

MANIFEST = "manifest.json"
STARTED = "started.json"
# Bounds on what a config, key, table or record file may hold: far beyond any real one, well inside
# what the interpreter survives (its recursion limit, its 4300-digit integer conversion limit).
MAX_NESTING = 64
MAX_INT_DIGITS = 100


class StageError(RuntimeError):
    """A stage cannot run: one line saying which file or setting is wrong."""


class AlreadyReported(Exception):
    """A failure whose one-line error a child process has printed already: the command exits with
    `status` and adds no second error line."""

    def __init__(self, status: int) -> None:
        super().__init__(f"exit status {status}")
        self.status = status


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty: error
    messages built from a failure must not fail themselves."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def atomic_path(target: str | Path, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it over `target` only if the block succeeds.

    The file is created with `mode` less the umask (as `open` would), so outputs get the usual
    permissions and a private file (mode 0o600) is never readable by others, not even briefly."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(target: str | Path, obj: Any, mode: int = 0o666) -> None:
    with atomic_path(target, mode) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def copy_file(src: str | Path, target: str | Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(src, tmp)


class TooLarge(ValueError):
    """Structured text nested deeper than MAX_NESTING or with an integer longer than MAX_INT_DIGITS."""


NESTING_PROBLEM = f"nested deeper than {MAX_NESTING} levels"


def _int_problem(text: str) -> str:
    return f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})"


class _BoundedYamlError(yaml.MarkedYAMLError):
    """A YAML document refused for its nesting or integer size (valid YAML, but not a sane input)."""


class BoundedYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing, with a position, nesting and integers that would otherwise run
    into the interpreter's limits (RecursionError, int-conversion ValueError) as tracebacks."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self._depth >= MAX_NESTING and self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            raise _BoundedYamlError(problem=NESTING_PROBLEM, problem_mark=self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_INT_DIGITS:
            raise _BoundedYamlError(problem=_int_problem(node.value), problem_mark=node.start_mark)
        return super().construct_yaml_int(node)


BoundedYamlLoader.add_constructor("tag:yaml.org,2002:int", BoundedYamlLoader.construct_yaml_int)


def parse_yaml(text: str) -> Any:
    """YAML text as Python values (safe tags only), bounded in nesting and integer size; raises
    yaml.YAMLError (see `yaml_problem`)."""
    return yaml.load(text, Loader=BoundedYamlLoader)  # noqa: S506 (a SafeLoader subclass)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong in YAML text and where (1-based line and column), in one line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{'' if isinstance(exc, _BoundedYamlError) else 'not valid YAML: '}{problem}{where}"


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise TooLarge(_int_problem(text.lstrip("-")))
    return int(text)


def parse_json(text: str) -> Any:
    """JSON text as Python values, bounded in nesting and integer size; raises json.JSONDecodeError
    or TooLarge."""
    try:
        data = json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise TooLarge(NESTING_PROBLEM) from None
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth >= MAX_NESTING:
                raise TooLarge(NESTING_PROBLEM)
            stack += [(child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)]
    return data


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return parse_json(regular_file(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: missing (run the stage that writes it first)") from None
    except OSError as exc:
        raise StageError(f"{path}: cannot be read ({exc.strerror or first_line(exc)})") from None
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise StageError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except TooLarge as exc:
        raise StageError(f"{path}: {exc}") from None


def regular_file(path: Path) -> Path:
    """`path`, refused unless it is a regular file: a folder, a device (/dev/zero would be read for
    ever) or a pipe is named rather than read. A missing path is left to the reader to report."""
    if path.is_dir():
        raise StageError(f"{path}: is a folder, not a file")
    if path.exists() and not path.is_file():
        raise StageError(f"{path}: not a regular file (a device, pipe or socket)")
    return path


def writable_folder(path: str | Path, what: str) -> None:
    """Refuse, before anything is written, a folder that cannot be created or written: an existing
    file, a path under a file, a read-only or virtual file system (/proc, /sys). It is probed by
    creating what is missing and a file in it, then removing everything the probe created."""
    path = Path(path).absolute()
    missing = [p for p in [path, *path.parents] if not p.exists()]
    blocked = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        where = "is a file" if blocked == path else f"lies under the file {blocked}"
        raise StageError(f"{what}: {path} {where}, not a folder")
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        probe = path / f".write-probe.{secrets.token_hex(4)}.tmp"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise StageError(f"{what}: cannot write into {path} ({exc.strerror or first_line(exc)})") from None
    finally:
        for folder in reversed(created):
            folder.rmdir()


def write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a file."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def save_npz(target: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise StageError(f"{path}: missing (run the stage that writes it first)") from None
    except (ValueError, OSError) as exc:
        raise StageError(f"{path}: unreadable array file ({exc})") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Stage:
    """One stage's folder in the run directory and its completion record."""

    run_dir: Path
    name: str
    config_hash: str
    started: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    started_cpu: float = field(default_factory=cpu_seconds)

    @property
    def dir(self) -> Path:
        return self.run_dir / self.name

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def tracking_id(self) -> str:
        """Fixed by the stage folder and config: a re-run or requeued job logs to the same W&B run."""
        return hashlib.sha256(f"{self.dir.resolve()}:{self.config_hash}".encode()).hexdigest()[:16]

    def output_path(self, rel: str, manifest_path: Path) -> Path:
        """The file a manifest names, refused unless it lies inside this stage's folder (a manifest
        edited or copied from elsewhere must not make a stage read or trust files outside its run)."""
        out = self.path(rel)
        if Path(rel).is_absolute() or not out.resolve().is_relative_to(self.dir.resolve()):
            raise StageError(f"{manifest_path}: output '{rel}' lies outside {self.dir}")
        return out

    def done(self, verify_hashes: bool = False) -> bool:
        """True when a manifest for this exact config exists and every output it lists is intact:
        present with the recorded size, and with the recorded SHA-256 when `verify_hashes` (used for
        the stages another stage is about to read, so a file replaced by another run is caught)."""
        manifest_path = self.path(MANIFEST)
        if not manifest_path.exists():
            return False
        manifest = read_json(manifest_path)
        if manifest.get("config_hash") != self.config_hash:
            raise StageError(
                f"{manifest_path}: stage '{self.name}' was built from a different config "
                f"(hash {manifest.get('config_hash')} != {self.config_hash}); use a new run_dir or --force"
            )
        for rel, digest in manifest.get("outputs", {}).items():
            out = self.output_path(rel, manifest_path)
            if not out.is_file():
                raise StageError(f"{out}: listed in {manifest_path} but missing; re-run the stage with --force")
            if out.stat().st_size != manifest.get("sizes", {}).get(rel, out.stat().st_size):
                raise StageError(f"{out}: size differs from {manifest_path}; re-run the stage with --force")
            if verify_hashes and file_sha256(out) != digest:
                raise StageError(
                    f"{out}: content differs from {manifest_path} (replaced since the stage ran?); "
                    "re-run the stage with --force"
                )
        return True

    def finish(self, outputs: list[str], **extra: Any) -> dict[str, Any]:
        """Record the stage as done; written last, so a killed stage is never taken as finished.
        Its `usage` is this process's since the stage started (for a sharded stage: since the shards
        were all done, i.e. the merge; each shard's record holds that shard's); its `seconds` are the
        stage's work, a sharded stage's shards summed (array tasks may run them at once) with the merge."""
        records = [
            self.path(shard_record(rel)) for rel in outputs if SHARD_FILE.fullmatch(rel) and rel.endswith(".npz")
        ]
        shard_seconds = sum(read_json(record)["usage"]["seconds"] for record in records if record.exists())
        hashes = {rel: file_sha256(self.path(rel)) for rel in outputs}  # hashing is the stage's work too
        usage = usage_since(
            self.started,
            self.started_cpu,  # shard files are counted in their records
            [self.path(rel) for rel in outputs if not SHARD_FILE.fullmatch(rel)],
        )
        manifest = {
            "stage": self.name,
            "status": "done",
            "config_hash": self.config_hash,
            "seconds": round(usage["seconds"] + shard_seconds, 3),  # the same clock reading as `usage`
            "outputs": hashes,
            "sizes": {rel: self.path(rel).stat().st_size for rel in outputs},
            "usage": usage,
            **extra,
        }
        write_json(self.path(MANIFEST), manifest)
        self.remove_stale_temporaries()
        return manifest

    def remove_stale_temporaries(self) -> None:
        """Delete temporary files that killed runs of this stage left behind (a SIGKILL skips the
        cleanup in `atomic_path`); only ones older than this run, so no live writer loses its file."""
        for tmp in self.dir.glob(".*.tmp"):
            if tmp.stat().st_mtime < self.started_at:
                tmp.unlink(missing_ok=True)

    def manifest(self) -> dict[str, Any]:
        return read_json(self.path(MANIFEST))

    def begin(self) -> None:
        """Claim the folder for this config before any work, so that partial state a killed run left
        (shards, training checkpoints) is resumed only by the same config, never by another."""
        start_sampling()  # the peak memory the finished stage records is sampled from here on
        record = self.path(STARTED)
        if record.exists() and read_json(record).get("config_hash") != self.config_hash:
            raise StageError(
                f"{self.dir}: holds partial work of stage '{self.name}' from a different config; "
                "use a new run_dir or --force"
            )
        try:
            self.dir.resolve().mkdir(parents=True, exist_ok=True)  # a shared stage's folder is a link (experiments)
        except OSError as exc:
            raise StageError(f"run_dir: cannot create {self.dir} ({exc.strerror or first_line(exc)})") from None
        if not record.exists():
            write_json(record, {"stage": self.name, "config_hash": self.config_hash})

    def invalidate(self) -> None:
        """Delete the stage's folder (used by --force): a forced run starts from nothing, not from
        the shards or checkpoints of the run it replaces."""
        shutil.rmtree(self.dir.resolve(), ignore_errors=True)  # through the link of a shared stage, keeping it


SHARD_FILE = re.compile(r"shard-\d+-of-\d+\.\w+")


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:04d}-of-{num_shards:04d}.npz"


def shard_record(name: str) -> str:
    """The record written next to a finished shard file, holding the stage's config hash."""
    return name.replace(".npz", ".json")


def shard_done(stage: Stage, name: str) -> bool:
    """A shard is done when its file and a record holding this stage's config hash exist."""
    record = stage.path(shard_record(name))
    return record.exists() and stage.path(name).exists() and read_json(record).get("config_hash") == stage.config_hash


def missing_shards(stage: Stage, num_shards: int) -> list[int]:
    """Shards of a sharded stage still to run: what a launcher submits as array tasks."""
    return [i for i in range(num_shards) if not shard_done(stage, shard_name(i, num_shards))]


def run_shards(
    stage: Stage, num_shards: int, only_shards: Sequence[int] | None, write_shard: Callable[[int, Path], None]
) -> list[str] | None:
    """Run a sharded stage's missing shards (all of them, or only `only_shards`: one array task's).

    `write_shard(i, path)` writes shard i to `path` (atomically), then its record; re-running a
    finished shard is a no-op. Returns the shard file names once every shard is done, else None
    (other array tasks still owe theirs). Each task writes its record before checking the others,
    so of several tasks finishing together at least one sees every shard and merges."""
    outside = [i for i in only_shards or () if not 0 <= i < num_shards]
    if num_shards < 1 or outside:
        raise StageError(f"{stage.name}: --shard {outside[0] if outside else ''} is outside 0..{num_shards - 1}")
    names = [shard_name(i, num_shards) for i in range(num_shards)]
    for shard in only_shards if only_shards is not None else range(num_shards):
        if not shard_done(stage, names[shard]):
            started, started_cpu = time.perf_counter(), cpu_seconds()
            write_shard(shard, stage.path(names[shard]))
            written = [p for p in stage.dir.glob(f"{Path(names[shard]).stem}.*") if not p.name.endswith(".json")]
            write_json(
                stage.path(shard_record(names[shard])),
                {
                    "config_hash": stage.config_hash,
                    "shard": shard,
                    "num_shards": num_shards,
                    "usage": usage_since(started, started_cpu, written),
                },
            )
    if missing_shards(stage, num_shards):
        return None
    stage.started, stage.started_cpu = time.perf_counter(), cpu_seconds()  # the manifest's usage: the merge's
    return names
