"""The owner's key file: what a later audit needs to re-create the marks (plain JSON, nothing in it
is executed).

A key is untrusted input: it may have been edited, truncated or written by another version, and
the audit runs years after marking. It is validated against the schema of its `format` version
before anything is computed from it, and refused by file and field otherwise. Each format version
is one model in `KEY_FORMATS`; a new version adds a model (and keeps reading the old ones).
The bounds of the owner's options live here too, so `mtrack mark`, `mtrack audit` and the key
schema accept exactly the same values.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import MAX_SEED, MarkConfig
from ..core.seeds import child_seed
from ..store import StageError, file_sha256, read_json

KEY_NAME = "membership-key.json"
KEY_FORMAT = "mtrack-key/1"

MIN_SIDE = 8  # smallest marked image side in pixels (the pipeline's smallest grid, data.image_size)
MAX_PATTERNS = 1000  # the audit marks and scores every image once per candidate pattern
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a head this wide for a 2048-wide ResNet is 800 MB

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
PatternCount = Annotated[int, Field(ge=2, le=MAX_PATTERNS)]
ClassLabel = Annotated[int, Field(ge=0, lt=MAX_CLASSES)]
ClassCount = Annotated[int, Field(ge=2, le=MAX_CLASSES)]
Resolution = Annotated[int, Field(ge=MIN_SIDE)]
Side = Annotated[int, Field(ge=MIN_SIDE)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _inside_folder(path: str) -> str:
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or "\\" in path or "\0" in path or ".." in parts or "." in path.split("/"):
        raise ValueError(f"'{path}' is not a plain relative path inside the folder")
    return path


RelativePath = Annotated[str, AfterValidator(_inside_folder)]


def secret_pattern_index(seed: int, n_patterns: int) -> int:
    """Which of the `n_patterns` candidates the seed secretly publishes (format 1)."""
    return int(np.random.default_rng(child_seed(seed, 3)).integers(n_patterns))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FileEntry(_Strict):
    """One published image: its original and marked files (relative to their folders) and hashes."""

    original: RelativePath
    original_sha256: Sha256
    marked: RelativePath
    marked_sha256: Sha256
    height: Side
    width: Side


class KeyV1(_Strict):
    """Format 1: `n_patterns` candidate patterns derived from `seed`; the seed also picks the
    published one, so `pattern_index` is checked against it (an edited index would test a pattern
    that was never published)."""

    format: Literal["mtrack-key/1"]
    created: str
    source_folder: Annotated[str, Field(min_length=1)]
    seed: Seed
    n_patterns: PatternCount
    pattern_index: Annotated[int, Field(ge=0)]
    label: ClassLabel | None
    max_resolution: Resolution | None
    mark: MarkConfig
    files: Annotated[list[FileEntry], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> "KeyV1":
        if self.pattern_index != secret_pattern_index(self.seed, self.n_patterns):
            raise ValueError(f"pattern_index: {self.pattern_index} is not the pattern this seed published "
                             f"among n_patterns {self.n_patterns}")
        for field in ("original", "marked", "original_sha256"):
            seen: set[str] = set()
            for i, entry in enumerate(self.files):
                value = getattr(entry, field)
                if value in seen:  # a file listed twice would count twice in the audit's mean loss
                    raise ValueError(f"files.{i}.{field}: listed twice")
                seen.add(value)
        if self.max_resolution is not None:
            for i, entry in enumerate(self.files):
                if max(entry.height, entry.width) > self.max_resolution:
                    raise ValueError(f"max_resolution: {self.max_resolution} is smaller than files.{i} "
                                     f"({entry.height}x{entry.width})")
        return self


KEY_FORMATS: dict[str, type[_Strict]] = {KEY_FORMAT: KeyV1}


def validate_key(data: Any, where: str | Path) -> dict[str, Any]:
    """`data` checked against the schema of its format (strict types: "4" is not 4), as a plain
    dict; anything else is refused naming `where` and the first offending field."""
    if not isinstance(data, dict) or "format" not in data:
        raise StageError(f"{where}: format: missing, so not a key file (a JSON object with a format field)")
    version = data["format"]
    if not isinstance(version, str) or version not in KEY_FORMATS:
        raise StageError(f"{where}: format: {version!r} is not a key format this version reads "
                         f"(known: {', '.join(KEY_FORMATS)})")
    try:
        key = KEY_FORMATS[version].model_validate(data, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        raise StageError(f"{where}: {field + ': ' if field else ''}{message}") from None
    return key.model_dump(mode="json")


def load_key(key_path: str | Path, marked_folder: str | Path) -> dict[str, Any]:
    """Read a key (plain JSON, nothing executed), validate it, and check it was made for
    `marked_folder`: every marked file it lists is there with the recorded hash."""
    key = validate_key(read_json(key_path), key_path)
    for entry in key["files"]:
        path = Path(marked_folder) / entry["marked"]
        if not path.is_file() or file_sha256(path) != entry["marked_sha256"]:
            raise StageError(f"{key_path}: made for another folder ({path} is missing or differs)")
    return key
