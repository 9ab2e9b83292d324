"""Command line: one subcommand per stage, plus `run` for the whole DAG.

    mtrack run CONFIG [--set section.key=value ...] [--force]
    mtrack run CONFIG --launcher slurm [--dry-run] [--no-wait]   (every stage as SLURM jobs)
    mtrack status RUN_DIR [--follow]                        (the SLURM jobs of a run, as they stand)
    mtrack experiments TABLE.yaml ... [--launcher slurm]           (experiment tables, results/<table>/)
    mtrack plan|write|report CONFIG [--set ...] [--force]
    mtrack mark CONFIG [--shard I] [--num-shards N]         (stage; one shard of an array job)
    mtrack mark FOLDER --out FOLDER [--publish K] [--design D]  (a data owner marking their own images)
    mtrack audit --model M --user FOLDER                     (... and later testing a model for them)
    mtrack train|audit CONFIG --arm marked|control [--set ...] [--force]
    mtrack audit CONFIG --arm marked --shard I --num-shards N  (one array task of the audit)

Errors in configs, data or the run directory end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_args

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from .config import MAX_SHARDS, ConfigError, MarkConfig, load_config
from .console import attach_console
from .data.images import ImageError
from .data.sources import DataSourceError
from .launchers import LAUNCHERS, launch, status
from .owner.designs import DESIGN_OPTIONS, DESIGNS, DesignParams, DrawCount, PatternCount, PublishCount
from .owner.key import KEY_NAME, ClassCount, ClassLabel, Resolution, Seed
from .stages.contract import ARMS, STAGES, Task
from .stages.dag import run_task
from .store import AlreadyReported, StageError, writable_folder, write_json

log = logging.getLogger("pipeline")
USER_ERRORS = (ConfigError, StageError, DataSourceError, ImageError)

ShardCount = Annotated[int, Field(ge=1, le=MAX_SHARDS)]
ShardIndex = Annotated[int, Field(ge=0, lt=MAX_SHARDS)]
SeedCount = Annotated[int, Field(ge=1, le=1000)]  # experiments --seeds: runs per row
Level = Annotated[float, Field(gt=0.0, lt=1.0)]
DEFAULT_LEVEL = 0.05  # the owner's audit: significance level of the verdict
MarkAlpha = Annotated[float, MarkConfig.model_fields["alpha"]]
MarkEpsilon = Annotated[float, MarkConfig.model_fields["epsilon"]]

# The owner's flags of `mark` and `audit`, by attribute; their defaults are applied only in the
# owner's mode, so a flag given to the wrong mode is refused by name instead of silently ignored.
OWNER_MARK_FLAGS = (
    "out",
    "seed",
    "noise",
    "epsilon",
    "alpha",
    "pattern",
    "ood_folder",
    "max_resolution",
    "design",
    "publish",
    "draws",
    "n_patterns",
    "label",
)
OWNER_AUDIT_FLAGS = (
    "model",
    "arch",
    "num_classes",
    "user",
    "key",
    "originals",
    "label",
    "alpha",
    "draws_seed",
    "json_out",
)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the pipeline's one line (no usage block) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = message.removeprefix("argument ")
        raise ConfigError(message if message.startswith("-") else f"{self.prog}: {message}")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # Before Python 3.13, argparse drops the value of `--seed=--` and stores [] unchecked;
        # take "--" as the value it is, so the option's type refuses it.
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def bounds(kind: Any, name: str = "x") -> str:
    """The range an Annotated number allows, as `2 <= N <= 1000`: what --help states and errors repeat."""
    lower = upper = ""
    for constraint in get_args(kind)[1].metadata:
        for attr, sign, side in (
            ("ge", "<=", "lower"),
            ("gt", "<", "lower"),
            ("le", "<=", "upper"),
            ("lt", "<", "upper"),
        ):
            if getattr(constraint, attr, None) is not None:
                value = getattr(constraint, attr)
                if isinstance(value, int) and value >= 2**32 and (value + 1).bit_count() == 1:
                    value = f"2**{value.bit_length()} - 1"
                if side == "lower":
                    lower = f"{value} {sign} "
                else:
                    upper = f" {sign} {value}"
    return f"{lower}{name}{upper}"


def checked(kind: Any, name: str) -> Callable[[str], Any]:
    """An argparse `type` that parses a number and holds it to the bounds of `kind` (pydantic), so
    an option out of range is refused while the command line is read, before anything else."""
    base = get_args(kind)[0]
    adapter = TypeAdapter(kind, config=ConfigDict(allow_inf_nan=False))

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(base(text))
        except ValueError:  # not a number, or out of bounds (pydantic's ValidationError is a ValueError)
            what = "an integer" if base is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what} with {bounds(kind, name)} (got {text!r})") from None

    return parse


def _common(parser: argparse.ArgumentParser, optional_config: bool = False) -> None:
    parser.add_argument("config", nargs="?" if optional_config else None, help="run config (YAML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="re-run even if the manifest says done")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mtrack", description="Data-use auditing benchmark pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every stage of the DAG, skipping finished ones")
    _common(run)
    run.add_argument(
        "--launcher",
        choices=LAUNCHERS.names(),
        default="local",
        help="where stages run: 'local' runs each stage in its own process here, 'slurm' "
        "submits them as SLURM jobs through submitit",
    )
    run.add_argument("--dry-run", action="store_true", help="print the jobs that would run, and stop")
    run.add_argument(
        "--rehearse",
        action="store_true",
        help="rehearse the recipe on CPUs before spending GPU-hours: every stage, storage, shard and "
        "job array as configured, with a small network for 2 epochs and sizes that follow the "
        "data folder (docs/cluster.md, 'Rehearsing a recipe')",
    )
    run.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="slurm: return once submitted instead of following the jobs to the end",
    )
    status = sub.add_parser("status", help="the SLURM jobs of a run: state, reason, node, training progress")
    status.add_argument("run_dir", help="the run_dir of a run submitted with --launcher slurm")
    status.add_argument("--follow", action="store_true", help="keep following until the jobs end, as `run` does")
    experiments = sub.add_parser("experiments", help="run experiment tables (configs/experiments/*.yaml)")
    experiments.add_argument("tables", nargs="+", help="experiment table YAML files")
    experiments.add_argument("--launcher", choices=LAUNCHERS.names(), default="local")
    experiments.add_argument(
        "--base",
        help="run the tables on this run config instead of their own "
        "(e.g. configs/cifar10.yaml); results go to results/<table>-<config name>/",
    )
    experiments.add_argument(
        "--seeds",
        type=checked(SeedCount, "N"),
        metavar="N",
        help="repeat every row (the baseline too) over seeds 0..N-1 instead of the table's seeds",
    )
    special = {
        "audit": "run the audit stage, or audit a model for your own marked images (with --model)",
        "mark": "run the mark stage, or mark a folder of your own images (with --out)",
    }
    owner_only = argparse.SUPPRESS  # absent unless given: see OWNER_MARK_FLAGS
    for stage, spec in STAGES.items():
        p = sub.add_parser(stage, help=special.get(stage, f"run the {stage} stage"))
        _common(p, optional_config=stage == "audit")
        if spec.arms:
            p.add_argument("--arm", choices=ARMS, required=stage != "audit")
        if spec.sharded:
            p.add_argument(
                "--shard",
                type=checked(ShardIndex, "I"),
                metavar="I",
                help="run only this shard of the users (0-based, I < N): one array task",
            )
            p.add_argument(
                "--num-shards",
                type=checked(ShardCount, "N"),
                metavar="N",
                help=f"number of shards the users are split into ({bounds(ShardCount, 'N')}; default 1)",
            )
        if stage == "audit":
            owner = p.add_argument_group("auditing a model for your own images (CONFIG is then omitted)")
            owner.add_argument(
                "--model",
                default=owner_only,
                help="checkpoint file (loaded as weights only), or module:function returning logits "
                "for uint8 NCHW images; the module is imported as `python -m` would, from the "
                "current directory first, then PYTHONPATH and installed packages",
            )
            owner.add_argument("--arch", default=owner_only, help="architecture of a plain state_dict checkpoint")
            owner.add_argument(
                "--num-classes",
                type=checked(ClassCount, "C"),
                metavar="C",
                default=owner_only,
                help=f"classes of a plain state_dict checkpoint ({bounds(ClassCount, 'C')})",
            )
            owner.add_argument(
                "--user", default=owner_only, help="your folder of marked images (the --out of mtrack mark)"
            )
            owner.add_argument(
                "--key", default=owner_only, help=f"the key file written when marking (default: {KEY_NAME} in --user)"
            )
            owner.add_argument(
                "--originals", default=owner_only, help="the folder of your original images (default: from the key)"
            )
            owner.add_argument(
                "--label",
                type=checked(ClassLabel, "L"),
                metavar="L",
                default=owner_only,
                help=f"class index of your images ({bounds(ClassLabel, 'L')}, and below the model's "
                "classes; default: from the key)",
            )
            owner.add_argument(
                "--alpha",
                type=checked(Level, "A"),
                metavar="A",
                default=owner_only,
                help=f"significance level of the verdict ({bounds(Level, 'A')}; default {DEFAULT_LEVEL})",
            )
            owner.add_argument(
                "--draws-seed",
                type=checked(Seed, "S"),
                metavar="S",
                default=owner_only,
                help="subset design: seed of the audit's random subsets (default: fresh, printed, "
                "so the audit can be repeated exactly)",
            )
            owner.add_argument(
                "--json", dest="json_out", default=owner_only, help="also write the result to this JSON file"
            )
        if stage == "mark":
            mark = MarkConfig()
            owner = p.add_argument_group("marking your own folder (CONFIG is then the input folder)")
            owner.add_argument("--out", default=owner_only, help="output folder for the marked copies and the key file")
            owner.add_argument(
                "--seed",
                type=checked(Seed, "S"),
                metavar="S",
                default=owner_only,
                help=f"secret seed ({bounds(Seed, 'S')}; default: random, saved in the key)",
            )
            owner.add_argument(
                "--noise", choices=["perlin", "uniform", "none"], default=owner_only, help=f"default {mark.noise}"
            )
            owner.add_argument(
                "--epsilon",
                type=checked(MarkEpsilon, "E"),
                metavar="E",
                default=owner_only,
                help=f"noise amplitude ({bounds(MarkEpsilon, 'E')}; default {mark.epsilon:.4g})",
            )
            owner.add_argument(
                "--alpha",
                type=checked(MarkAlpha, "A"),
                metavar="A",
                default=owner_only,
                help=f"weight of the image in the blend with the pattern ({bounds(MarkAlpha, 'A')}; "
                f"default {mark.alpha})",
            )
            owner.add_argument(
                "--pattern", choices=["stripes", "ood_image"], default=owner_only, help=f"default {mark.pattern}"
            )
            owner.add_argument(
                "--ood-folder",
                default=owner_only,
                help="with --pattern ood_image: folder the pattern image is drawn from",
            )
            owner.add_argument(
                "--max-resolution",
                type=checked(Resolution, "R"),
                metavar="R",
                default=owner_only,
                help=f"shrink so the longer side is at most R ({bounds(Resolution, 'R')}), to mark "
                "on the grid a model will store; every side must keep at least 8 pixels",
            )
            owner.add_argument(
                "--design",
                choices=list(DESIGNS),
                default=owner_only,
                help="subset (default): publish a random K of your images; groups: publish one of "
                "P/K disjoint groups; pattern: publish all with one of N secret patterns",
            )
            owner.add_argument(
                "--publish",
                type=checked(PublishCount, "K"),
                metavar="K",
                default=owner_only,
                help="subset, groups: how many images to publish (fewer than the folder holds; "
                "default: a tenth of the folder)",
            )
            owner.add_argument(
                "--draws",
                type=checked(DrawCount, "B"),
                metavar="B",
                default=owner_only,
                help=f"subset: random subsets the audit compares with ({bounds(DrawCount, 'B')}; default "
                "999): the smallest p-value is 1/(B+1), and the audit marks and scores K(B+1) images",
            )
            owner.add_argument(
                "--n-patterns",
                type=checked(PatternCount, "N"),
                metavar="N",
                default=owner_only,
                help=f"pattern: secret candidate patterns ({bounds(PatternCount, 'N')}; default 100): the "
                f"audit's smallest p-value is 1/N, and it marks and scores every image N times",
            )
            owner.add_argument(
                "--label",
                type=checked(ClassLabel, "L"),
                metavar="L",
                default=owner_only,
                help=f"class index of these images ({bounds(ClassLabel, 'L')}), saved in the key",
            )
    return parser


def _flag(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def _given(args: argparse.Namespace, attrs: tuple[str, ...]) -> list[str]:
    return [a for a in attrs if hasattr(args, a)]


def _refuse_stage_flags(args: argparse.Namespace, mode: str) -> None:
    """A stage's flags given to the owner's command are refused by name, not silently ignored."""
    stray = [
        flag
        for flag, used in (
            ("--set", args.overrides),
            ("--shard", args.shard is not None),
            ("--num-shards", args.num_shards is not None),
            ("--arm", getattr(args, "arm", None) is not None),
        )
        if used
    ]
    if stray:
        raise ConfigError(f"{stray[0]}: belongs to the stage of a run config, not to {mode}")


def _is_owner_mark(args: argparse.Namespace) -> bool:
    """`mtrack mark FOLDER --out ...` (the owner) rather than `mtrack mark CONFIG` (the stage)."""
    path = Path(args.config)
    given = _given(args, OWNER_MARK_FLAGS)
    if path.is_dir():
        return True
    if path.exists():
        if given and "out" not in given:
            raise ConfigError(
                f"{_flag(given[0])}: only for marking your own folder (mtrack mark FOLDER --out "
                f"FOLDER); {path} is a file, so it is read as a run config"
            )
        return "out" in given
    if not given:
        raise ConfigError(f"{path}: not found (neither a run config nor a folder of images)")
    return True


def mark_own_folder(args: argparse.Namespace) -> None:
    from .owner.marking import mark_folder

    _refuse_stage_flags(args, "marking your own folder")
    if not hasattr(args, "out"):
        raise ConfigError(f"{args.config}: is a folder; pass --out FOLDER to mark your own images")
    chosen = {
        name: getattr(args, name)
        for name in ("noise", "epsilon", "alpha", "pattern", "ood_folder")
        if hasattr(args, name)
    }
    if chosen.get("pattern") == "ood_image" and "ood_folder" not in chosen:
        raise ConfigError("--pattern ood_image: needs --ood-folder FOLDER (the images patterns are drawn from)")
    if "ood_folder" in chosen and chosen.get("pattern") != "ood_image":
        raise ConfigError("--ood-folder: only used with --pattern ood_image")
    try:
        cfg = MarkConfig(**chosen)
    except ValidationError as exc:  # the flags were range-checked already; this names any other rule
        err = exc.errors()[0]
        where = ", ".join(_flag(str(p)) for p in err["loc"]) or ", ".join(_flag(name) for name in chosen)
        raise ConfigError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
    given = {name: getattr(args, name) for name in ("seed", "max_resolution", "label") if hasattr(args, name)}
    design = {name: getattr(args, name) for name in ("design", "publish", "draws", "n_patterns") if hasattr(args, name)}
    chosen_design = design.get("design", "subset")
    for name in sorted(design.keys() - {"design"} - set(DESIGN_OPTIONS[chosen_design])):
        raise ConfigError(f"{_flag(name)}: not an option of --design {chosen_design}")
    key = mark_folder(args.config, args.out, cfg, force=args.force, params=DesignParams(**design), **given)
    print(
        f"marked {len(key['published'])} of {len(key['files'])} images into {args.out} (design {key['design']}): "
        f"publish those; keep {Path(args.out) / KEY_NAME} and the originals private: the audit needs them"
    )


def audit_own_model(args: argparse.Namespace) -> None:
    from .owner.audit import audit_owner, load_predictor
    from .owner.key import load_key

    _refuse_stage_flags(args, "auditing a model with --model")
    if args.config is not None:
        raise ConfigError(f"{args.config}: audit --model takes no CONFIG (it audits your own images)")
    if not hasattr(args, "model"):
        raise ConfigError(
            f"{_flag(_given(args, OWNER_AUDIT_FLAGS)[0])}: auditing your own images needs "
            "--model MODEL (a checkpoint or module:function)"
        )
    if not hasattr(args, "user"):
        raise ConfigError("audit --model: pass --user FOLDER (your marked images)")
    user = Path(args.user)
    if not user.is_dir():
        raise StageError(f"--user {user}: {'not a folder' if user.exists() else 'folder not found'}")
    key_path = Path(args.key) if hasattr(args, "key") else user / KEY_NAME
    if not key_path.exists():
        raise StageError(
            f"{key_path}: no key file here"
            + ("" if hasattr(args, "key") else f"; is {user} the --out folder of mtrack mark? Otherwise pass --key")
        )
    key = load_key(key_path, user)
    predict = load_predictor(args.model, getattr(args, "arch", None), getattr(args, "num_classes", None))
    json_out = getattr(args, "json_out", None)
    if json_out is not None:
        if Path(json_out).is_dir():
            raise StageError(f"--json {json_out}: is a folder; name a file")
        writable_folder(Path(json_out).absolute().parent, "--json")
    result = audit_owner(
        key,
        predict,
        getattr(args, "originals", None),
        getattr(args, "label", None),
        getattr(args, "draws_seed", None),
        key_source=str(key_path),
    )
    alpha = getattr(args, "alpha", DEFAULT_LEVEL)
    used = result["p_value"] <= alpha
    print(
        f"verdict: {'the model was trained on your images' if used else 'no evidence the model used your images'}"
        f" (p = {result['p_value']:.4g}, level {alpha}; smallest possible p {result['smallest_possible_p_value']:.4g})"
    )
    redo = f"; repeat with --draws-seed {result['draws_seed']}" if result["draws_seed"] is not None else ""
    print(
        f"evidence: mean loss on your {result['n_images']} published images {result['published_loss']:.4g}; on the "
        f"{result['n_candidates']} other candidates of design {result['design']}: min "
        f"{result['candidates_loss']['min']:.4g}, median {result['candidates_loss']['median']:.4g}{redo}"
    )
    if json_out is not None:
        write_json(json_out, result)


def main(argv: list[str] | None = None) -> int:
    handler = attach_console()
    try:
        return _dispatch(argv)
    finally:
        logging.getLogger().removeHandler(handler)  # called again in one process (tests, scripts): log each line once


def _dispatch(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "experiments":
            from .experiments import run_table

            for table in args.tables:
                run_table(table, args.launcher, base=args.base, seeds=args.seeds)
        elif args.command == "run":
            overrides = args.overrides
            if args.rehearse:
                from .rehearsal import plan_rehearsal

                rehearsal = plan_rehearsal(args.config, overrides, args.launcher)
                overrides = [*rehearsal.overrides(), *overrides]
                log.info("%s", rehearsal.summary(load_config(args.config, overrides)))
            launch(args.config, overrides, args.launcher, args.force, args.dry_run, args.wait)
        elif args.command == "status":
            status(args.run_dir, args.follow)
        elif args.command == "mark" and _is_owner_mark(args):
            mark_own_folder(args)
        elif args.command == "audit" and _given(args, OWNER_AUDIT_FLAGS):
            audit_own_model(args)
        else:
            spec = STAGES[args.command]
            if args.config is None or (spec.arms and not args.arm):
                raise ConfigError(f"{args.command}: needs a CONFIG" + (" and --arm" if spec.arms else ""))
            num_shards = getattr(args, "num_shards", None) or 1
            shard = getattr(args, "shard", None)
            if shard is not None and shard >= num_shards:
                raise ConfigError(f"--shard {shard}: outside 0..{num_shards - 1} (--num-shards {num_shards})")
            cfg = load_config(args.config, args.overrides)
            if "results_dir" in spec.config:  # a stage that publishes there: refused before it runs
                writable_folder(cfg.results_dir, "results_dir")
            run_task(cfg, Task(args.command, getattr(args, "arm", None), shard, num_shards), force=args.force)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AlreadyReported as exc:
        return exc.status
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
