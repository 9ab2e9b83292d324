"""How much power each per-image score gives the owner's audit on a trained network.

The subset design's p-value is exact for any score that is a function of the candidate alone (the
published candidate and the drawn ones are scored alike), so a score may be chosen for power. For
every owner of the owner-audit run of a recipe (bench.owner_audit's subset run, trained or reused
through the stage store), every candidate (the published one and the B drawn ones) is marked and
queried once per view of `owner.access.VIEWS` (the image, its mirror and 2-pixel shifts: what a
trainer's flip + translate makes of it), and every score below gives every owner the full test's
p-value from the same logits. Recipes that do not train to zero loss (flip + translate, weight
decay) are where the default's power is in doubt.

    python -m bench.owner_scores --name flip-translate --set train.augment=flip_translate
                                 [--config configs/owner-audit.yaml] [--never-trained N] [--reference]

writes results/owner-audit/scores-<name>.json and rewrites results/owner-audit/scores.md from every
scores-*.json there (one table per recipe).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from bench.common import run_reporting_errors
from bench.owner_audit import RESULTS, design_overrides, never_trained_cell, owner_power
from pipeline.cli import CommandParser
from pipeline.cli import main as mtrack
from pipeline.config import MarkConfig, load_config
from pipeline.core.marking import resolve_device
from pipeline.core.models import load_weights
from pipeline.core.scoring import logit_margin
from pipeline.core.seeds import child_seed
from pipeline.core.stats import sequential_p_value
from pipeline.data.ood import ood_pool
from pipeline.launchers import launch
from pipeline.owner.access import VIEWS
from pipeline.owner.audit import marked_candidate, read_originals
from pipeline.owner.designs import Candidate, null_candidates, published_pattern_seed
from pipeline.owner.key import KEY_NAME, load_key
from pipeline.stages.mark import owner_folder
from pipeline.store import read_json, write_json, write_text


@dataclass(frozen=True)
class Queried:
    """What the scores see of one owner's candidates: the audited model's logit margins of the label
    per view, (views, images), for every candidate's images in order (`marked`) and for the owner's
    unmarked originals (`originals`, (views, P)); each candidate image's index among the originals
    (`index`); and a reference model's margins for the candidates' images (`reference`: a model of
    the same recipe that trained on no owner's image, None without one)."""

    marked: np.ndarray
    originals: np.ndarray
    index: np.ndarray
    reference: np.ndarray | None


# A score: what was queried -> per-image score, lower meaning better known. Candidates are ranked by
# the mean over their images.
Score = Callable[[Queried], np.ndarray]


def _loss(margins: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, -margins)  # cross-entropy = softplus(-margin), exact for confident models


SCORES: dict[str, tuple[str, int, Score]] = {  # name: (meaning, views queried per image, score)
    "loss": ("cross-entropy of the image (the audit's default)", 1, lambda q: _loss(q.marked[0])),
    "confidence": ("-log(p / (1 - p)) of the label: the loss without its saturation at 0", 1, lambda q: -q.marked[0]),
    "loss, mirrored": (
        "cross-entropy averaged over the image and its mirror",
        2,
        lambda q: _loss(q.marked[:2]).mean(0),
    ),
    "loss, 8 views": ("cross-entropy averaged over the 8 views", 8, lambda q: _loss(q.marked).mean(0)),
    "confidence, 8 views": ("-log(p / (1 - p)) averaged over the 8 views", 8, lambda q: -q.marked.mean(0)),
    "confidence - original's": (
        "-log(p / (1 - p)) minus that of the same image unmarked (its difficulty), 8 views each",
        8,
        lambda q: -q.marked.mean(0) + q.originals.mean(0)[q.index],
    ),
    "confidence rank, 8 views": (
        "rank of 'confidence, 8 views' among every candidate's images (robust to a few hard images; "
        "needs every candidate scored, so no early stop)",
        8,
        lambda q: rankdata(-q.marked.mean(0)),
    ),
}
# Scores calibrated by a reference model (`--reference`): the image's difficulty, as a model of the
# same recipe that never saw it rates it, taken off (difficulty calibration, as LiRA's offline test).
REFERENCE_SCORES: dict[str, tuple[str, int, Score]] = {
    "loss - reference's": (
        "cross-entropy minus the reference model's cross-entropy of the same image",
        1,
        lambda q: _loss(q.marked[0]) - _loss(q.reference[0]),
    ),
    "loss - reference's, 8 views": (
        "the same, each averaged over the 8 views",
        8,
        lambda q: _loss(q.marked).mean(0) - _loss(q.reference).mean(0),
    ),
    "confidence - reference's, 8 views": (
        "-log(p / (1 - p)) minus the reference model's, each averaged over the 8 views",
        8,
        lambda q: -q.marked.mean(0) + q.reference.mean(0),
    ),
}


@torch.no_grad()
def view_margins(model: torch.nn.Module, images: np.ndarray, label: int, batch_size: int = 2048) -> np.ndarray:
    """(views, images) logit margins of `label` for (N, H, W, 3) uint8 images."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).contiguous()
        labels = torch.full((len(batch),), label)
        out.append(torch.stack([logit_margin(model(view(batch)), labels) for view in VIEWS]).numpy())
    return np.concatenate(out, axis=1)


def owner_p_values(
    model: torch.nn.Module, folder: Path, draws_seed: int, reference: torch.nn.Module | None = None
) -> dict[str, float]:
    """Each score's full-test p-value for one owner (every draw scored; ties count against, as in the audit)."""
    published_dir = folder / "published"
    key = load_key(published_dir / KEY_NAME, published_dir)
    images, hashes = read_originals(key, folder / "originals")
    cfg = MarkConfig.model_validate(key["mark"])
    pool, device = ood_pool(cfg, 224), resolve_device(cfg.device)
    candidates = [Candidate(tuple(key["published"]), published_pattern_seed(key)), *null_candidates(key, draws_seed)]
    marked = np.stack([image for c in candidates for image in marked_candidate(c, images, hashes, cfg, pool, device)])
    queried = Queried(
        view_margins(model, marked, key["label"]),
        view_margins(model, np.stack(images), key["label"]),
        np.concatenate([c.files for c in candidates]),
        None if reference is None else view_margins(reference, marked, key["label"]),
    )
    k = len(candidates[0].files)
    p_values = {}
    for name, (_, _, score) in scores(reference is not None).items():
        means = score(queried).reshape(len(candidates), k).mean(1)
        p_values[name], _ = sequential_p_value(means[1:] <= means[0], len(candidates) - 1, stop=None)
    return p_values


def scores(with_reference: bool) -> dict[str, tuple[str, int, Score]]:
    return {**SCORES, **REFERENCE_SCORES} if with_reference else SCORES


def score_recipe(config: str, overrides: list[str], never_trained: int | None, reference: bool) -> dict[str, Any]:
    """Train (or reuse) the recipe's subset-design run and every score's p-values for its owners;
    with `reference`, the run's control arm too (the recipe on the clean training set, which holds no
    owner's image: the owners' images are held out, and the published ones replace training images
    only in the marked arm), whose independence of every owner's choice keeps the test exact."""
    overrides = design_overrides(load_config(config, overrides), "subset", overrides)
    launch(config, overrides, "local")
    if reference:  # the control arm's stage alone: a report of both arms would clash with bench.owner_audit's
        both = [f"--set={o}" for o in [*overrides, "train.arms=[marked, control]"]]  # arms are not hashed
        if mtrack(["train", config, *both, "--arm", "control"]) != 0:
            raise SystemExit("training the reference (control arm) failed")
    cfg = load_config(config, overrides)
    run = Path(cfg.run_dir)
    model = load_weights(run / "train-marked" / "model.pt")[0].eval()
    control = load_weights(run / "train-control" / "model.pt")[0].eval() if reference else None
    owners = read_json(run / "plan" / "users.json")["owners"]
    never = [o for o in owners if not o["trained"]][:never_trained]
    audited = [o for o in owners if o["trained"]] + never
    per_owner = []
    for n, owner in enumerate(audited, 1):
        draws_seed = child_seed(cfg.seed, 7, owner["owner_id"])  # the draws bench.owner_audit's audits use
        p = owner_p_values(model, owner_folder(run / "mark", owner["owner_id"]), draws_seed, control)
        per_owner.append({"owner_id": owner["owner_id"], "trained": owner["trained"], "class": owner["class"], "p": p})
        print(f"owner {n}/{len(audited)} scored", file=sys.stderr, flush=True)
    trained = read_json(run / "train-marked" / "metrics.json")
    rows = []
    for name, (meaning, views, _) in scores(reference).items():
        on = np.array([o["p"][name] for o in per_owner if o["trained"]])
        off = np.array([o["p"][name] for o in per_owner if not o["trained"]])
        rows.append(
            {
                "score": name,
                "meaning": meaning,
                **owner_power(on, off),
                "trained_on_at_0.05": int((on <= 0.05).sum()),
                "trained_on_p_median": float(np.median(on)),
                "trained_on_p_max": float(on.max()),
                "n_trained_on": len(on),
                "n_never_trained_on": len(off),
                "queries_per_image": views,  # and, for the difficulty, 8 per original once per audit
            }
        )
    return {
        "overrides": overrides,
        "train_loss": trained["train_loss"],
        "test_accuracy": trained["test_accuracy"],
        "augment": cfg.train.augment,
        "weight_decay": cfg.train.weight_decay,
        "epochs": cfg.train.epochs,
        "draws": cfg.plan.owners.draws if cfg.plan.owners else None,
        "rows": rows,
        "owners": per_owner,
    }


def markdown(recipes: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Owner audit: power of each per-image score (subset design, full test)",
        "",
        "Each table: one network of the owner-audit setting trained by the recipe named, its trained-on "
        "and never-trained-on owners audited with every score from the same queries; each score's p-value "
        "is exact (the never-trained-on column only checks it). Regenerate a table with the command "
        "under it.",
    ]
    for name, r in sorted(recipes.items()):
        lines += [
            "",
            f"## {name}: augment {r['augment']}, weight decay {r['weight_decay']:g}, {r['epochs']} epochs "
            f"(training loss {r['train_loss']:.3g}, test accuracy {r['test_accuracy']:.3f})",
            "",
            "| score | trained-on owners at p ≤ 0.01 | at p ≤ 0.05 | trained-on p (median, max) | "
            "never-trained-on at p ≤ 0.05 (a calibrated test's 95% range) | queries per image |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['score']} | {row['trained_on_at_0.01']} of {row['n_trained_on']} | "
                f"{row['trained_on_at_0.05']} | {row['trained_on_p_median']:.3g}, {row['trained_on_p_max']:.3g} | "
                f"{never_trained_cell(row, row['n_never_trained_on'])} | "
                f"{row['queries_per_image']} |"
            )
        lines += ["", f"`{r['command']}`"]
    lines += ["", "Scores:", ""] + [f"- **{name}**: {meaning}" for name, (meaning, _, _) in scores(True).items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="python -m bench.owner_scores", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the recipe's name in the results")
    parser.add_argument("--config", default="configs/owner-audit.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--never-trained", type=int, help="score only the first N never-trained-on owners (0: none, power only)"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also scores calibrated by the run's control model (trains it if needed): the recipe without any owner",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = score_recipe(args.config, args.overrides, args.never_trained, args.reference)
    result["command"] = "python -m bench.owner_scores " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(args.out / f"scores-{args.name}.json", result)
    recipes = {path.stem.removeprefix("scores-"): read_json(path) for path in args.out.glob("scores-*.json")}
    write_text(args.out / "scores.md", markdown(recipes))
    print(markdown({args.name: result}))


if __name__ == "__main__":
    run_reporting_errors(main)
