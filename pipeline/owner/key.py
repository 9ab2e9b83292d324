"""The owner's key file: what a later audit needs to re-create the marks (plain JSON, nothing in it
is executed).

A key is untrusted input: it may have been edited, truncated or written by another version, and
the audit runs years after marking. It is validated against the schema of its `format` version
before anything is computed from it, and refused by file and field otherwise. Each format version
is one model in `KEY_FORMATS`; a new version adds a model and keeps reading the old ones (format 1
is read as format 2's `pattern` design).
The bounds of the owner's options live here too, so `mtrack owner mark`, `mtrack owner audit` and
the key schema accept exactly the same values.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import MAX_SEED, MarkConfig, validation_problem
from ..store import StageError, file_sha256, read_json
from .designs import Design, DesignParams, DrawCount, PatternCount, published_candidate

KEY_NAME = "membership-key.json"
KEY_FORMAT = "mtrack-key/2"  # 2: a design, every original listed, only the published ones marked

MIN_SIDE = 8  # smallest marked image side in pixels (the pipeline's smallest grid, data.image_size)
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a head this wide for a 2048-wide ResNet is 800 MB

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
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


def _unique(files: list[Any], fields: tuple[str, ...]) -> None:
    for field in fields:
        seen: set[str] = set()
        for i, entry in enumerate(files):
            value = getattr(entry, field)
            if value is None:
                continue
            if value in seen:  # a file listed twice would count twice in the audit's mean loss
                raise ValueError(f"files.{i}.{field}: listed twice")
            seen.add(value)


def _within(files: list[Any], max_resolution: int | None) -> None:
    if max_resolution is not None:
        for i, entry in enumerate(files):
            if max(entry.height, entry.width) > max_resolution:
                raise ValueError(
                    f"max_resolution: {max_resolution} is smaller than files.{i} ({entry.height}x{entry.width})"
                )


class _Key(_Strict):
    """What every key format holds; each format narrows `format` to its own name and adds its fields."""

    format: str
    created: str
    source_folder: Annotated[str, Field(min_length=1)]
    seed: Seed
    label: ClassLabel | None
    max_resolution: Resolution | None
    mark: MarkConfig


class KeyV1(_Key):
    """Format 1 (before designs): every image published with one of `n_patterns` candidate patterns
    derived from `seed`; the seed also picks the published one, so `pattern_index` is checked against
    it (an edited index would test a pattern that was never published). It is format 2's `pattern`
    design, drawn by the same streams, and is read as such."""

    format: Literal["mtrack-key/1"]
    n_patterns: PatternCount
    pattern_index: Annotated[int, Field(ge=0)]
    files: Annotated[list[FileEntry], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> KeyV1:
        _, chosen = published_candidate(DesignParams("pattern", n_patterns=self.n_patterns), self.seed, len(self.files))
        if self.pattern_index != chosen["pattern_index"]:
            raise ValueError(
                f"pattern_index: {self.pattern_index} is not the pattern_index this seed published "
                f"among n_patterns {self.n_patterns}"
            )
        _unique(self.files, ("original", "marked", "original_sha256"))
        _within(self.files, self.max_resolution)
        return self

    def upgraded(self) -> dict[str, Any]:
        """The same key in format 2: the `pattern` design, every image published."""
        return {
            **self.model_dump(mode="json"),
            "format": KEY_FORMAT,
            "design": "pattern",
            "published": list(range(len(self.files))),
        }


class OriginalEntry(_Strict):
    """One of the owner's images: its original file, and its marked copy if it was published."""

    original: RelativePath
    original_sha256: Sha256
    height: Side
    width: Side
    marked: RelativePath | None = None
    marked_sha256: Sha256 | None = None


# Fields each design needs; the others' must be null.
DESIGN_FIELDS: dict[str, tuple[str, ...]] = {
    "subset": ("draws",),
    "groups": ("group",),
    "pattern": ("n_patterns", "pattern_index"),
}


class KeyV2(_Key):
    """Format 2: a design (`owner.designs`) chose which of the listed originals are `published`, and
    with which pattern, from `seed`; the key is checked to be exactly that choice, so an edited
    field can never make the audit test images or a pattern that were not published."""

    format: Literal["mtrack-key/2"]
    design: Design
    published: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    draws: DrawCount | None = None
    draws_check: Annotated[int, Field(ge=0)] | None = None  # derived from seed and draws (absent in early keys)
    group: Annotated[int, Field(ge=0)] | None = None
    n_patterns: PatternCount | None = None
    pattern_index: Annotated[int, Field(ge=0)] | None = None
    files: Annotated[list[OriginalEntry], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> KeyV2:
        for design, fields in DESIGN_FIELDS.items():
            for field in fields:
                if (getattr(self, field) is None) == (design == self.design):
                    raise ValueError(
                        f"{field}: {'missing' if design == self.design else 'set'} for design {self.design}"
                    )
        _unique(self.files, ("original", "marked", "original_sha256"))
        _within(self.files, self.max_resolution)
        n, k = len(self.files), len(self.published)
        if self.published != sorted(set(self.published)) or self.published[-1] >= n:
            raise ValueError(f"published: not distinct sorted indices of the {n} files")
        for i, entry in enumerate(self.files):
            if (entry.marked is None or entry.marked_sha256 is None) == (i in self.published):
                raise ValueError(
                    f"files.{i}: "
                    + ("no marked copy, yet published" if i in self.published else "a marked copy, yet not published")
                )
        if self.design != "pattern" and not (k < n and (self.design != "groups" or n // k >= 2)):
            raise ValueError(f"published: {k} of {n} files is not a {self.design} design")
        params = DesignParams(self.design, k, self.draws or 1, self.n_patterns or 2)
        expected, fields = published_candidate(params, self.seed, n)
        if self.draws_check is not None and self.draws_check != fields.pop("draws_check", None):
            raise ValueError(f"draws: {self.draws} is not the number of draws this key was made with (an edited key?)")
        fields.pop("draws_check", None)  # an early key has none to compare
        for field, value in fields.items():  # an edited choice would test what was never published
            if getattr(self, field) != value:
                among = f" among n_patterns {self.n_patterns}" if field == "pattern_index" else ""
                raise ValueError(f"{field}: {getattr(self, field)} is not the {field} this seed published{among}")
        if list(expected.files) != self.published:
            raise ValueError(f"published: not the {self.design} this seed published (an edited key?)")
        return self


KEY_FORMATS: dict[str, type[_Key]] = {"mtrack-key/1": KeyV1, KEY_FORMAT: KeyV2}


def validate_key(data: Any, where: str | Path) -> dict[str, Any]:
    """`data` checked against the schema of its format (strict types: "4" is not 4), as a plain
    dict; anything else is refused naming `where` and the first offending field."""
    if not isinstance(data, dict) or "format" not in data:
        raise StageError(f"{where}: format: missing, so not a key file (a JSON object with a format field)")
    version = data["format"]
    if not isinstance(version, str) or version not in KEY_FORMATS:
        raise StageError(
            f"{where}: format: {version!r} is not a key format this version reads (known: {', '.join(KEY_FORMATS)})"
        )
    try:
        key = KEY_FORMATS[version].model_validate(data, strict=True)
    except ValidationError as exc:
        raise StageError(f"{where}: {validation_problem(exc)}") from None
    # fields left out stay out (an unpublished file has no marked copy; a design's fields only in it)
    return key.upgraded() if isinstance(key, KeyV1) else key.model_dump(mode="json", exclude_unset=True)


def load_key(key_path: str | Path, marked_folder: str | Path) -> dict[str, Any]:
    """Read a key (plain JSON, nothing executed), validate it, and check it was made for
    `marked_folder`: every marked file it lists is there with the recorded hash."""
    key = validate_key(read_json(key_path), key_path)
    for entry in (key["files"][i] for i in key["published"]):
        path = Path(marked_folder) / entry["marked"]
        if not path.is_file():
            raise StageError(
                f"{path}: a published image {key_path} lists is missing (moved, renamed, or another folder?)"
            )
        if file_sha256(path) != entry["marked_sha256"]:
            raise StageError(
                f"{path}: not the image {key_path} recorded (edited since it was marked, or the key of another folder?)"
            )
    return key
