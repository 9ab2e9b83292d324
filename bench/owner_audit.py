"""The owner's audit end to end on trained networks, one run per design.

Each data owner holds a folder of images of one class and marks it with their own tool (the code
`mtrack owner mark` runs, with their seed and key); the trained-on owners' published images replace
training images through the normal plan / mark / write / train stages (`plan.owners`), other owners'
are never trained on. Then `mtrack owner audit --model <model.pt> --user <published folder>
--all-draws` is run, as the owner would, for every owner: every draw is scored, so each p-value is
the full test's (the default audit ends early either way once its verdict at 0.05 is clear, which
gives a trained-on owner p = 1/200 at best; `bench.owner_speed` measures what that saves). A
calibrated audit gives the never-trained-on owners p <= 0.05 at a rate inside its binomial 95%
limits; a powerful one gives the trained-on owners small p.
`--arms marked control` also audits every owner against the run's control network (the same recipe
on the clean training set, which holds no owner's image): a calibration check where every owner is
never trained on. `--rekey N` marks each never-trained-on owner's originals N more times with fresh
seeds (other published subsets and patterns): N times as many owners the network never saw, for a
larger calibration check without training another network.

    python -m bench.owner_audit [--config configs/owner-audit.yaml] [--designs subset pattern groups]
                                [--set key=value ...] [--access LEVEL ...] [--arms marked control]
                                [--rekey N] [--pretrain CONFIG] [--out results/owner-audit]

writes <out>/<design>[-<access>][-control].json for every design, access level and arm, results.json
for the first (the tool's default) and README.md comparing them. Each design is one training run of
the config; with --pretrain, each starts from the control-arm network of that config's run
(`train.init_weights`), trained first.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from bench.common import run_reporting_errors
from pipeline.cli import CommandParser, checked
from pipeline.cli import main as mtrack
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.console import track
from pipeline.core.seeds import child_seed
from pipeline.core.stats import binomial_limits
from pipeline.launchers import launch
from pipeline.owner.designs import DESIGNS
from pipeline.owner.key import KEY_NAME
from pipeline.owner.marking import mark_folder
from pipeline.stages.contract import Task
from pipeline.stages.dag import run_task
from pipeline.stages.mark import owner_folder
from pipeline.stages.plan import owner_params
from pipeline.store import read_json, write_json, write_text

RESULTS = Path("results/owner-audit")
RekeyCount = Annotated[int, Field(ge=0, le=100)]


def design_overrides(cfg: RunConfig, design: str, overrides: list[str]) -> list[str]:
    """The config's run for one design: its own run folder; the pattern design publishes every
    image of the owner's folder, so its folder holds just the K published ones."""
    folder = f"{cfg.run_dir}-{design}"
    extra = [f"plan.owners.images={cfg.plan.samples_per_user}"] if design == "pattern" else []
    return [*overrides, f"plan.owners.design={design}", f"run_dir={folder}", f"results_dir={folder}/results", *extra]


def pretrained_backbone(config: str) -> str:
    """Train `config`'s control arm (a network that sees no owner's image) and return its model.pt."""
    cfg = load_config(config)
    if "control" not in cfg.train.arms:
        raise ConfigError(f"--pretrain {config}: train.arms must include control (the unmarked network)")
    launch(config, [], "local")
    return str(Path(cfg.run_dir) / "train-control" / "model.pt")


def row_suffix(access: str, arm: str) -> str:
    """How a row's files are told apart: the access level unless logits, then the arm unless marked."""
    return ("" if access == "logits" else f"-{access.replace(':', '')}") + ("" if arm == "marked" else f"-{arm}")


def planned_owners(cfg: RunConfig) -> list[dict[str, Any]]:
    """The run's owners as the audit sees them: each with the folder they published and a name."""
    run = Path(cfg.run_dir)
    return [
        {**o, "name": f"{o['owner_id']:05d}", "folder": owner_folder(run / "mark", o["owner_id"]) / "published"}
        for o in read_json(run / "plan" / "users.json")["owners"]
    ]


def rekeyed_owners(cfg: RunConfig, owners: list[dict[str, Any]], times: int) -> list[dict[str, Any]]:
    """Each never-trained-on owner's originals (of the run's `planned_owners`) marked `times` more
    times by the owner's tool with seeds of their own: new owners of the same images whose published
    subsets and patterns the network never saw. Given the network, their p-values are independent
    and uniform if the audit is exact, so their count at a level is binomial."""
    run, design = Path(cfg.run_dir), owner_params(cfg)
    rekeyed = []
    for owner in owners:
        originals = owner["folder"].parent / "originals"
        for j in () if owner["trained"] else range(times):
            name = f"{owner['name']}-rekeyed-{j}"
            rekeyed.append(
                {**owner, "name": name, "folder": run / "owner-rekeyed" / name, "originals": originals, "rekeyed": j}
            )
    unmarked = [owner for owner in rekeyed if not (owner["folder"] / KEY_NAME).exists()]
    for owner in track(unmarked, "re-keyed owners marked", len(unmarked), "owners") if unmarked else ():
        seed = child_seed(cfg.seed, 9, owner["owner_id"], owner["rekeyed"])
        mark_folder(
            owner["originals"], owner["folder"], cfg.mark, seed=seed, force=True, label=owner["class"], params=design
        )
    return rekeyed


def audit_every_owner(
    cfg: RunConfig, access: str = "logits", arm: str = "marked", rekey: int = 0
) -> list[dict[str, Any]]:
    """`mtrack owner audit` for each owner of a finished run (and `rekey` re-keyed owners per
    never-trained-on one) against the `arm` network, with draws independent of the owners' seeds,
    seeing of it only what `access` allows (an API at that level)."""
    run = Path(cfg.run_dir)
    model = run / f"train-{arm}" / "model.pt"
    folder = run / f"owner-audit{row_suffix(access, arm)}"
    results = []
    planned = planned_owners(cfg)
    owners = planned + rekeyed_owners(cfg, planned, rekey)
    for owner in track(owners, f"owner audits ({access}, {arm} network)", len(owners), "owners"):
        out = folder / f"{owner['name']}.json"
        seen = {k: owner[k] for k in ("owner_id", "trained", "class")} | {"rekeyed": owner.get("rekeyed")}
        if out.exists() and out.stat().st_mtime > model.stat().st_mtime:  # audited this model already
            results.append({**seen, **read_json(out)})
            continue
        started = time.perf_counter()
        rekeyed = () if owner.get("rekeyed") is None else (owner["rekeyed"],)
        with contextlib.redirect_stdout(io.StringIO()):
            status = mtrack(
                [
                    "owner",
                    "audit",
                    "--model",
                    str(model),
                    "--access",
                    access,
                    "--user",
                    str(owner["folder"]),
                    "--draws-seed",
                    str(child_seed(cfg.seed, 7, owner["owner_id"], *rekeyed)),
                    "--json",
                    str(out),
                    "--all-draws",
                ]
            )
        if status != 0:
            raise SystemExit(f"mtrack owner audit failed for owner {owner['name']} (exit {status})")
        write_json(out, {**read_json(out), "seconds": time.perf_counter() - started})
        results.append({**seen, **read_json(out)})
    return results


def owner_power(trained: list[float] | np.ndarray, never: list[float] | np.ndarray) -> dict[str, Any]:
    """Trained-on owners found at p <= 0.01, and the rate at which never-trained-on owners are
    accused at 0.05 with the binomial 95% limits a calibrated audit's rate falls in (None: none audited)."""
    on, off = np.asarray(trained), np.asarray(never)
    return {
        "trained_on_at_0.01": int((on <= 0.01).sum()),
        "never_trained_on_rate_at_0.05": float(np.mean(off <= 0.05)) if len(off) else None,
        "never_trained_on_limits_at_0.05": binomial_limits(len(off), 0.05) if len(off) else None,
    }


CALIBRATION_LEVELS = (0.05, 0.1)


def calibration(p_values: list[float]) -> dict[str, Any]:
    """How many null p-values lie at or below each level, with the 95% range of that count when
    they are independent and uniform (an exact audit, given the network)."""
    p, n = np.asarray(p_values), len(p_values)
    return {
        "n": n,
        **{
            str(level): {
                "count": int((p <= level).sum()),
                "range": [round(limit * n) for limit in binomial_limits(n, level)] if n else None,
            }
            for level in CALIBRATION_LEVELS
        },
    }


def never_trained_cell(power: dict[str, Any], n_never: int) -> str:
    """The table cell of `owner_power`'s false-accusation rate: "—" when no never-trained-on owner was audited."""
    if not n_never:
        return "—"
    low, high = power["never_trained_on_limits_at_0.05"]
    return f"{power['never_trained_on_rate_at_0.05']:.3f} of {n_never} ({low:.3f}–{high:.3f})"


def summarise(cfg: RunConfig, design: str, audits: list[dict[str, Any]], arm: str = "marked") -> dict[str, Any]:
    o = cfg.plan.owners
    assert o is not None
    # the control network trained on no owner's images: every owner is a null there
    planned = [a for a in audits if a.get("rekeyed") is None]
    trained = [a["p_value"] for a in planned if a["trained"] and arm == "marked"]
    never = [a["p_value"] for a in planned if not (a["trained"] and arm == "marked")]
    rekeyed = [a["p_value"] for a in audits if a.get("rekeyed") is not None]
    k = cfg.plan.samples_per_user
    setting = (
        f"{cfg.name}: {cfg.data.source}, {cfg.data.n_train} training images, {cfg.train.arch} width "
        f"{cfg.train.width}, {cfg.train.epochs} epochs, augmentation {cfg.train.augment}"
        f"{f', fine-tuned ({cfg.train.finetune}) from {cfg.train.init_weights}' if cfg.train.init_weights else ''}"
        f"; {sum(a['trained'] for a in planned)} trained-on and {sum(not a['trained'] for a in planned)} "
        f"never-trained-on owners, each publishing {k} of "
        f"{o.images if design != 'pattern' else k} "
        f"images of one class ({100 * k / cfg.data.n_train:.2f}% of the training set per owner)"
    )
    population = read_json(Path(cfg.run_dir) / f"audit-{arm}" / "metrics.json")
    trained_model = read_json(Path(cfg.run_dir) / f"train-{arm}" / "metrics.json")
    return {
        "design": design,
        "arm": arm,
        "access": audits[0]["access"],
        "queries_per_audit": float(np.median([a["queries"] for a in audits])),
        "trained_on_p": trained,
        "never_trained_on_p": never,
        "n_images_per_owner": k,
        "setting": setting,
        "images_per_owner_folder": o.images if design != "pattern" else k,
        "smallest_possible_p_value": audits[0]["smallest_possible_p_value"],
        **owner_power(trained, never),
        "rekeyed_never_trained_on_p": rekeyed,
        "calibration": {"never-trained-on": calibration(never), "re-keyed": calibration(rekeyed)},
        "audit_seconds_median": float(np.median(timed))
        if (timed := [a["seconds"] for a in audits if "seconds" in a])
        else None,  # the audits that were timed (resumed runs keep earlier results untimed)
        "population_audit": {
            "auc": population["set_based"]["auc"],
            "member_p_values": population["statistics"]["member_p_values"],
            "n_nonmember_users": cfg.plan.n_nonmember_users,
        },
        "classes": {str(a["owner_id"]): a["class"] for a in planned},
        "train_loss": trained_model["train_loss"],  # how deeply the network memorised sets the power
        "test_accuracy": trained_model["test_accuracy"],
    }


def _number(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Owner audit: `mtrack owner mark` / `mtrack owner audit` on trained networks",
        "",
        f"Setting: {rows[0]['setting']}. Regenerate: `{command}` (one training run per design).",
        "",
        "| design | network | access | smallest possible p | trained-on owners at p ≤ 0.01 | "
        "trained-on p (median, max) | never-trained-on owners at p ≤ 0.05 (binomial 95% limits) | "
        "queries per audit | seconds per audit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = np.array(r["trained_on_p"])
        lines.append(
            f"| {r['design']} | {r.get('arm', 'marked')} | {r.get('access', 'logits')} | "
            f"{r['smallest_possible_p_value']:.4g} | {r['trained_on_at_0.01']} of {len(t)} | "
            f"{f'{np.median(t):.4g}, {t.max():.4g}' if len(t) else '—'} | "
            f"{never_trained_cell(r, len(r['never_trained_on_p']))} | {r.get('queries_per_audit', '—')} | "
            f"{_number(r['audit_seconds_median'])} |"
        )
    if any(r.get("rekeyed_never_trained_on_p") for r in rows):
        lines += calibration_table(rows)
    lines += [
        "",
        "The same trained models audited the paper's way (trained-on owners ranked among non-member users "
        "of all classes, the `audit-<network>` stage of each run):",
        "",
        "| design's run | network | training loss | test accuracy | non-member users | AUC | "
        "trained-on owners at p ≤ 0.01 | member p (median, max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("access", "logits") != "logits":
            continue  # one row per network of a design's run
        pop = r["population_audit"]
        p = np.array(pop["member_p_values"])
        lines.append(
            f"| {r['design']} | {r.get('arm', 'marked')} | {_number(r.get('train_loss'), '.2g')} | "
            f"{_number(r.get('test_accuracy'), '.3f')} | "
            f"{pop['n_nonmember_users']} | {pop['auc']:.3f} | {int((p <= 0.01).sum())} of "
            f"{len(p)} | {np.median(p):.4g}, {p.max():.4g} |"
        )
    return "\n".join(lines) + "\n"


def calibration_table(rows: list[dict[str, Any]]) -> list[str]:
    """Null p-values at 0.05 and 0.1 against the range an exact audit's count falls in 95% of the time."""
    levels = " | ".join(f"at p ≤ {level} (95% range if exact)" for level in CALIBRATION_LEVELS)
    lines = [
        "",
        "Calibration: the never-trained-on owners, and each never-trained-on owner's originals marked again "
        "with seeds of their own (`--rekey`: other published subsets and patterns, which the network never "
        "saw; given the network their p-values are independent and uniform if the audit is exact):",
        "",
        f"| design | network | access | owners | {levels} |",
        "|---|---|---|---|" + "---|" * len(CALIBRATION_LEVELS),
    ]
    for r in rows:
        for who, cal in r["calibration"].items():
            if cal["n"]:
                counts = " | ".join(
                    f"{cal[str(level)]['count']} ({cal[str(level)]['range'][0]}–{cal[str(level)]['range'][1]})"
                    for level in CALIBRATION_LEVELS
                )
                lines.append(
                    f"| {r['design']} | {r.get('arm', 'marked')} | {r.get('access', 'logits')} | "
                    f"{cal['n']} {who} | {counts} |"
                )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="python -m bench.owner_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/owner-audit.yaml")
    parser.add_argument(
        "--designs",
        nargs="+",
        choices=DESIGNS,
        default=list(DESIGNS),
        help="designs to run; the first is written to results.json",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every design's run (its run folder is named after run_dir)",
    )
    parser.add_argument(
        "--access",
        nargs="+",
        default=["logits"],
        help="access levels each trained network is audited at (logits, probs, topk:K, label), one row each",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=("marked", "control"),
        default=["marked"],
        help="networks of each run audited, trained if the config's train.arms lacks them: control, trained "
        "on the clean training set, holds no owner's image, so its rows check calibration",
    )
    parser.add_argument(
        "--rekey",
        type=checked(RekeyCount, "N"),
        default=0,
        metavar="N",
        help="also audit each never-trained-on owner's originals marked N more times with seeds of their own: "
        "a calibration check N times larger, without training",
    )
    parser.add_argument(
        "--pretrain",
        metavar="CONFIG",
        help="fine-tune every design's run from this config's control-arm network, trained first",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # audits score small batches: on a shared CPU one thread is several times faster
    if args.pretrain:
        args.overrides.append(f"train.init_weights={pretrained_backbone(args.pretrain)}")
    rows = []
    for design in args.designs:
        overrides = design_overrides(load_config(args.config, args.overrides), design, args.overrides)
        launch(args.config, overrides, "local")
        cfg = load_config(args.config, overrides)
        for arm in dict.fromkeys(args.arms):
            if arm not in cfg.train.arms:  # trained apart from the run, whose report stays as it was
                for stage in ("train", "audit"):
                    run_task(cfg, Task(stage, arm))
            for access in args.access:
                rows.append(summarise(cfg, design, audit_every_owner(cfg, access, arm, args.rekey), arm))
                write_json(args.out / f"{design}{row_suffix(access, arm)}.json", rows[-1])
    write_json(args.out / "results.json", rows[0])
    command = "python -m bench.owner_audit " + " ".join(argv if argv is not None else sys.argv[1:])
    write_text(args.out / "README.md", markdown(rows, command.strip()))
    print(json.dumps({r["design"] + row_suffix(r["access"], r["arm"]): r["trained_on_at_0.01"] for r in rows}))


if __name__ == "__main__":
    run_reporting_errors(main)
