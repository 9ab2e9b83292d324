"""How an owner's audit gets an exact p-value: which of their images are published, with which
pattern, and what the published set is ranked against.

Every design draws the published candidate (a set of the owner's images and the pattern that marks
them) at random from a family of candidates, and the audit ranks its mean loss among other members
of that family. If the model never saw the published images, it cannot tell the published
candidate from the others, so the rank is uniform: an exact p-value.

- `subset` (default): the owner holds P images of their class and publishes a uniformly random
  K-subset S, marked with a pattern derived from the seed and S. The audit draws B more K-subsets
  from a generator independent of the seed, each marked with its own pattern. Candidates differ in
  images and pattern, as the paper's non-member users do, but all come from the owner's class, so
  an easy class lowers every candidate's loss alike. Smallest p-value 1/(B + 1), or more when a
  drawn subset repeats the published one (it ties): with few images, about 1 / (P choose K).
- `groups`: the P images are split into P // K disjoint groups, each with its own pattern, and one
  group is published (the paper's reference population, built from the owner's images).
  Smallest p-value K / P.
- `pattern`: every image is published with one of N secret patterns; the audit re-marks the same
  images with the other N - 1. Smallest p-value 1/N; weak on trained networks, which memorise the
  base images as much as the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field
from pydantic.dataclasses import dataclass as checked_dataclass

from ..config import MAX_DRAWS, MAX_PATTERNS
from ..core.seeds import child_seed
from ..store import StageError

Design = Literal["subset", "groups", "pattern"]
DESIGNS: tuple[Design, ...] = ("subset", "groups", "pattern")
DESIGN_OPTIONS = {"subset": ("publish", "draws"), "groups": ("publish",), "pattern": ("n_patterns",)}  # of DesignParams
# Streams derived from the owner's seed: patterns, the published choice, the groups' partition.
PATTERN_STREAM, CHOICE_STREAM, PARTITION_STREAM, DRAWS_STREAM = 1, 3, 4, 5
PatternCount = Annotated[int, Field(ge=2, le=MAX_PATTERNS)]
DrawCount = Annotated[int, Field(ge=1, le=MAX_DRAWS)]
PublishCount = Annotated[int, Field(ge=1)]


@dataclass(frozen=True)
class Candidate:
    """Some of the owner's images (indices into the key's file list) and the pattern marking them."""

    files: tuple[int, ...]
    pattern_seed: int


@checked_dataclass(frozen=True)
class DesignParams:
    """What `mtrack owner mark` is told: the design, how many images it publishes (subset, groups),
    how many subsets the audit draws (subset) and how many secret patterns there are (pattern).
    Bounds are checked when it is made; `check` adds what depends on the folder."""

    design: Design = "subset"
    publish: PublishCount | None = None  # None: a tenth of the folder
    draws: DrawCount = 999
    n_patterns: PatternCount = 100

    def published_count(self, n_files: int) -> int:
        if self.design == "pattern":
            return n_files
        return self.publish if self.publish is not None else max(1, n_files // 10)

    def check(self, n_files: int) -> None:
        """One-line errors for a design the folder cannot support."""
        k = self.published_count(n_files)
        if self.design == "pattern":
            return
        if not k < n_files:
            if self.publish is None:  # the default share, not a number the owner gave
                raise StageError(
                    f"the folder has {n_files} image(s): too few to publish some and keep others to compare"
                )
            raise StageError(f"--publish {k}: publish fewer than the folder's {n_files} images")
        if self.design == "groups" and n_files // k < 2:
            raise StageError(f"--publish {k}: the {n_files} images make fewer than 2 groups of {k}")


def subset_pattern_seed(seed: int, files: tuple[int, ...]) -> int:
    """The pattern of one subset of the owner's images, derived from the seed and the subset."""
    return child_seed(seed, PATTERN_STREAM, len(files), *sorted(files))


def candidate_pattern_seed(seed: int, index: int) -> int:
    """Pattern seed of candidate `index` (a group, or one of the secret patterns)."""
    return child_seed(seed, PATTERN_STREAM, index)


def groups_of(seed: int, n_files: int, k: int) -> np.ndarray:
    """(P // K, K) file indices: the owner's images split into disjoint groups by the seed."""
    order = np.random.default_rng(child_seed(seed, PARTITION_STREAM)).permutation(n_files)
    return np.sort(order[: n_files // k * k].reshape(-1, k), axis=1)


def draws_check(seed: int, draws: int) -> int:
    """A number only the owner's seed derives from the draws they chose: the key holds it, so a
    `draws` edited afterwards (to try other numbers of candidates) is found."""
    return child_seed(seed, DRAWS_STREAM, draws) % 10**9


def published_candidate(params: DesignParams, seed: int, n_files: int) -> tuple[Candidate, dict[str, Any]]:
    """The candidate the owner publishes, and what the key must hold to find it again."""
    choice = np.random.default_rng(child_seed(seed, CHOICE_STREAM))
    k = params.published_count(n_files)
    if params.design == "subset":
        files = tuple(sorted(int(i) for i in choice.choice(n_files, k, replace=False)))
        return Candidate(files, subset_pattern_seed(seed, files)), {
            "draws": params.draws,
            "draws_check": draws_check(seed, params.draws),
        }
    if params.design == "groups":
        groups = groups_of(seed, n_files, k)
        g = int(choice.integers(len(groups)))
        return Candidate(tuple(int(i) for i in groups[g]), candidate_pattern_seed(seed, g)), {"group": g}
    j = int(choice.integers(params.n_patterns))
    return Candidate(tuple(range(n_files)), candidate_pattern_seed(seed, j)), {
        "n_patterns": params.n_patterns,
        "pattern_index": j,
    }


def published_pattern_seed(key: dict[str, Any]) -> int:
    """The published candidate's pattern, found again from the key."""
    if key["design"] == "subset":
        return subset_pattern_seed(key["seed"], tuple(key["published"]))
    return candidate_pattern_seed(key["seed"], key["group"] if key["design"] == "groups" else key["pattern_index"])


def null_candidates(key: dict[str, Any], draws_seed: int) -> list[Candidate]:
    """What the published candidate is ranked against. Only `subset` uses `draws_seed`, which must
    not depend on the owner's seed: its B subsets are drawn independently of the published one."""
    seed, n_files, k = key["seed"], len(key["files"]), len(key["published"])
    if key["design"] == "subset":
        rng = np.random.default_rng(draws_seed)
        draws = [tuple(sorted(int(i) for i in rng.choice(n_files, k, replace=False))) for _ in range(key["draws"])]
        return [Candidate(files, subset_pattern_seed(seed, files)) for files in draws]
    if key["design"] == "groups":
        return [
            Candidate(tuple(int(i) for i in group), candidate_pattern_seed(seed, g))
            for g, group in enumerate(groups_of(seed, n_files, k))
            if g != key["group"]
        ]
    return [
        Candidate(tuple(range(n_files)), candidate_pattern_seed(seed, j))
        for j in range(key["n_patterns"])
        if j != key["pattern_index"]
    ]


def smallest_p_value(published: Candidate, null: list[Candidate]) -> float:
    """The smallest p-value an audit ranking `published` among `null` can report: even with the
    lowest loss it ties with every null candidate identical to it (the same images, hence the same
    pattern and the same loss). With few images a subset audit draws the published subset again
    and again, so the number of distinct subsets, not the draws, bounds it."""
    return (1 + sum(candidate == published for candidate in null)) / (len(null) + 1)
