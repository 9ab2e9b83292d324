"""Command line: the data owner's tool as `mtrack owner`, and for benchmarks one subcommand per
stage plus `run` for the whole DAG.

    mtrack owner mark FOLDER --out FOLDER [--publish K] [--design D]  (a data owner marking their own images)
    mtrack owner audit --model M --user FOLDER               (... and later testing a model for them)
    mtrack run CONFIG [--set section.key=value ...] [--force]
    mtrack run CONFIG --launcher slurm [--dry-run] [--no-wait]   (every stage as SLURM jobs)
    mtrack status RUN_DIR [--follow]                        (the SLURM jobs of a run, as they stand)
    mtrack experiments TABLE.yaml ... [--launcher slurm]           (experiment tables, results/<table>/)
    mtrack plan|write|report CONFIG [--set ...] [--force]
    mtrack mark CONFIG [--shard I] [--num-shards N]         (stage; one shard of an array job)
    mtrack train|audit CONFIG --arm marked|control [--set ...] [--force]
    mtrack audit CONFIG --arm marked --shard I --num-shards N  (one array task of the audit)

The owner's spellings before `mtrack owner` (`mtrack mark FOLDER --out ...`, `mtrack audit --model
...`) still run the owner's tool until the next release, after a one-line notice.
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

from .config import MAX_SHARDS, ConfigError, MarkConfig, load_config, problem_text
from .console import console
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

# The owner's spellings before `mtrack owner`, recognised by the flag each needed (and what the
# notice shows after the command): they run the owner's tool, with a notice, until the next release.
OLD_OWNER_SPELLINGS = {"mark": ("--out", "FOLDER ..."), "audit": ("--model", "--model ...")}
# Where an option refused by a command belongs when it is the other audience's command of that name.
ELSEWHERE = {
    "mark": "marking your own folder is mtrack owner mark FOLDER --out FOLDER",
    "audit": "auditing a model for your own images is mtrack owner audit --model M --user FOLDER",
    "owner mark": "the mark stage of a run config is mtrack mark CONFIG",
    "owner audit": "the audit stage of a run config is mtrack audit CONFIG --arm marked|control",
}
DESCRIPTION = f"""Data-use auditing: a data owner's tool, and the benchmark pipeline that measures it.

  for data owners:             mtrack owner mark FOLDER --out FOLDER, later
                               mtrack owner audit --model M --user FOLDER  (mtrack owner --help)
  for benchmarks and clusters: run, status, experiments, publish, and one command per stage
                               ({", ".join(STAGES)}), each on a run config"""


class CommandParser(argparse.ArgumentParser):
    """argparse, with its errors as the pipeline's one line (no usage block) and exit status 2; the
    benchmark commands parse with it too."""

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


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
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
    parser = CommandParser(prog="mtrack", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _owner_commands(sub)
    _run_command(sub)
    _status_command(sub)
    _experiments_command(sub)
    _publish_command(sub)
    _stage_commands(sub)
    return parser


def _owner_commands(sub: Any) -> None:
    owner = sub.add_parser(
        "owner",
        help="for data owners: mark your own images, later audit a model for them",
        description="A data owner's tool: mark a folder of your own images before publishing them, and keep "
        "the key it writes; later, audit a model for them (docs/owner.md).",
    )
    tools = owner.add_subparsers(dest="owner_command", metavar="{mark,audit}", required=True)
    _owner_mark_command(tools)
    _owner_audit_command(tools)


def _owner_mark_command(tools: Any) -> None:
    # Options stay absent from the namespace unless given, so MarkConfig's and DesignParams'
    # defaults apply and an option of another design is told apart from a default.
    p = tools.add_parser(
        "mark", help="mark a folder of your own images and write the secret key", argument_default=argparse.SUPPRESS
    )
    mark = MarkConfig()
    p.add_argument("folder", metavar="FOLDER", help="the folder of your original images (read, never changed)")
    p.add_argument(
        "--out", required=True, metavar="FOLDER", help="output folder for the marked copies and the key file"
    )
    p.add_argument("--force", action="store_true", default=False, help="overwrite an earlier marking in --out")
    p.add_argument(
        "--seed",
        type=checked(Seed, "S"),
        metavar="S",
        help=f"secret seed ({bounds(Seed, 'S')}; default: random, saved in the key)",
    )
    p.add_argument("--noise", choices=["perlin", "uniform", "none"], help=f"default {mark.noise}")
    p.add_argument(
        "--epsilon",
        type=checked(MarkEpsilon, "E"),
        metavar="E",
        help=f"noise amplitude ({bounds(MarkEpsilon, 'E')}; default {mark.epsilon:.4g})",
    )
    p.add_argument(
        "--alpha",
        type=checked(MarkAlpha, "A"),
        metavar="A",
        help=f"weight of the image in the blend with the pattern ({bounds(MarkAlpha, 'A')}; default {mark.alpha})",
    )
    p.add_argument("--pattern", choices=["stripes", "ood_image"], help=f"default {mark.pattern}")
    p.add_argument(
        "--ood-folder", metavar="FOLDER", help="with --pattern ood_image: folder the pattern image is drawn from"
    )
    p.add_argument(
        "--max-resolution",
        type=checked(Resolution, "R"),
        metavar="R",
        help=f"shrink so the longer side is at most R ({bounds(Resolution, 'R')}), to mark on the grid a model "
        "will store; every side must keep at least 8 pixels",
    )
    p.add_argument(
        "--design",
        choices=list(DESIGNS),
        help="subset (default): publish a random K of your images; groups: publish one of P/K disjoint groups; "
        "pattern: publish all with one of N secret patterns",
    )
    p.add_argument(
        "--publish",
        type=checked(PublishCount, "K"),
        metavar="K",
        help="subset, groups: how many images to publish (fewer than the folder holds; default: a tenth of the folder)",
    )
    p.add_argument(
        "--draws",
        type=checked(DrawCount, "B"),
        metavar="B",
        help=f"subset: random subsets the audit compares with ({bounds(DrawCount, 'B')}; default 999): the "
        "smallest p-value is 1/(B+1), and the audit marks and scores K(B+1) images",
    )
    p.add_argument(
        "--n-patterns",
        type=checked(PatternCount, "N"),
        metavar="N",
        help=f"pattern: secret candidate patterns ({bounds(PatternCount, 'N')}; default 100): the audit's "
        "smallest p-value is 1/N, and it marks and scores every image N times",
    )
    p.add_argument(
        "--label",
        type=checked(ClassLabel, "L"),
        metavar="L",
        help=f"class index of these images ({bounds(ClassLabel, 'L')}), saved in the key",
    )


def _owner_audit_command(tools: Any) -> None:
    p = tools.add_parser("audit", help="audit a model for your own marked images: a verdict and its p-value")
    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="checkpoint file (loaded as weights only), or module:function returning what --access says for "
        "uint8 NCHW images; the module is imported as `python -m` would, from the current directory first, "
        "then PYTHONPATH and installed packages",
    )
    p.add_argument(
        "--access",
        default="logits",
        metavar="LEVEL",
        help="what the model gives: logits (default), probs (every class's probability), topk:K (a pair: the K "
        "best classes and their probabilities) or label (the predicted class; 8 queries per image); a "
        "checkpoint is audited as an API at that level would answer",
    )
    p.add_argument(
        "--user", required=True, metavar="FOLDER", help="your folder of marked images (the --out of mtrack owner mark)"
    )
    p.add_argument("--arch", help="architecture of a plain state_dict checkpoint")
    p.add_argument(
        "--num-classes",
        type=checked(ClassCount, "C"),
        metavar="C",
        help=f"classes of a plain state_dict checkpoint ({bounds(ClassCount, 'C')})",
    )
    p.add_argument("--key", metavar="FILE", help=f"the key file written when marking (default: {KEY_NAME} in --user)")
    p.add_argument("--originals", metavar="FOLDER", help="the folder of your original images (default: from the key)")
    p.add_argument(
        "--label",
        type=checked(ClassLabel, "L"),
        metavar="L",
        help=f"class index of your images ({bounds(ClassLabel, 'L')}, and below the model's classes; "
        "default: from the key)",
    )
    p.add_argument(
        "--alpha",
        type=checked(Level, "A"),
        metavar="A",
        default=DEFAULT_LEVEL,
        help=f"significance level of the verdict ({bounds(Level, 'A')}; default {DEFAULT_LEVEL})",
    )
    p.add_argument(
        "--draws-seed",
        type=checked(Seed, "S"),
        metavar="S",
        help="subset design: seed of the audit's random subsets (default: fresh, printed, so the audit can be "
        "repeated exactly)",
    )
    p.add_argument(
        "--all-draws",
        action="store_true",
        help="score every candidate of the design, for the p-value to full resolution (default: stop once "
        "enough candidates score at least as low for p to lie above --alpha; the verdict is the same)",
    )
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the result to this JSON file")


def _run_command(sub: Any) -> None:
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


def _status_command(sub: Any) -> None:
    status = sub.add_parser("status", help="the SLURM jobs of a run: state, reason, node, training progress")
    status.add_argument("run_dir", help="the run_dir of a run submitted with --launcher slurm")
    status.add_argument("--follow", action="store_true", help="keep following until the jobs end, as `run` does")


def _experiments_command(sub: Any) -> None:
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
    experiments.add_argument(
        "--wandb",
        choices=("offline", "online"),
        help="log every row x seed to W&B, in a group per table, labelled with table, row and seed",
    )


def _publish_command(sub: Any) -> None:
    publish = sub.add_parser(
        "publish", help="publish the finished stages of a run to W&B (a run that finished with W&B off)"
    )
    publish.add_argument("config", help="the run's config (YAML)")
    publish.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the run's overrides, as given to `mtrack run` (and wandb.* settings, e.g. wandb.mode=online)",
    )


def _stage_commands(sub: Any) -> None:
    for stage, spec in STAGES.items():
        p = sub.add_parser(stage, help=f"run the {stage} stage of a run config")
        _common(p)
        if spec.arms:
            p.add_argument("--arm", choices=ARMS, required=True)
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


def _flag(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def mark_own_folder(args: argparse.Namespace) -> None:
    from .owner.marking import mark_folder

    given = vars(args)
    chosen = {name: given[name] for name in ("noise", "epsilon", "alpha", "pattern", "ood_folder") if name in given}
    if chosen.get("pattern") == "ood_image" and "ood_folder" not in chosen:
        raise ConfigError("--pattern ood_image: needs --ood-folder FOLDER (the images patterns are drawn from)")
    if "ood_folder" in chosen and chosen.get("pattern") != "ood_image":
        raise ConfigError("--ood-folder: only used with --pattern ood_image")
    try:
        cfg = MarkConfig(**chosen)
    except ValidationError as exc:  # the flags were range-checked already; this names any other rule
        err = exc.errors()[0]
        where = ", ".join(_flag(str(p)) for p in err["loc"]) or ", ".join(_flag(name) for name in chosen)
        raise ConfigError(f"{where}: {problem_text(err)}") from None
    options = {name: given[name] for name in ("seed", "max_resolution", "label") if name in given}
    design = {name: given[name] for name in ("design", "publish", "draws", "n_patterns") if name in given}
    chosen_design = design.get("design", "subset")
    for name in sorted(design.keys() - {"design"} - set(DESIGN_OPTIONS[chosen_design])):
        raise ConfigError(f"{_flag(name)}: not an option of --design {chosen_design}")
    key = mark_folder(args.folder, args.out, cfg, force=args.force, params=DesignParams(**design), **options)
    print(
        f"marked {len(key['published'])} of {len(key['files'])} images into {args.out} (design {key['design']}): "
        f"publish those; keep {Path(args.out) / KEY_NAME} and the originals private: the audit needs them"
    )


def audit_own_model(args: argparse.Namespace) -> None:
    from .owner.audit import audit_owner, load_predictor
    from .owner.key import load_key

    user = Path(args.user)
    if not user.is_dir():
        raise StageError(f"--user {user}: {'not a folder' if user.exists() else 'folder not found'}")
    key_path = user / KEY_NAME if args.key is None else Path(args.key)
    if not key_path.exists():
        raise StageError(
            f"{key_path}: no key file here"
            + (f"; is {user} the --out folder of mtrack owner mark? Otherwise pass --key" if args.key is None else "")
        )
    key = load_key(key_path, user)
    predict = load_predictor(args.model, args.arch, args.num_classes, args.access)
    if args.json_out is not None:
        if Path(args.json_out).is_dir():
            raise StageError(f"--json {args.json_out}: is a folder; name a file")
        writable_folder(Path(args.json_out).absolute().parent, "--json")
    result = audit_owner(
        key,
        predict,
        args.originals,
        args.label,
        args.draws_seed,
        key_source=str(key_path),
        alpha=args.alpha,
        marked_folder=user,
        notify=lambda text: print(f"note: {text}", file=sys.stderr),
        all_draws=args.all_draws,
    )
    used = result["p_value"] <= args.alpha
    print(
        f"verdict: {'the model was trained on your images' if used else 'no evidence the model used your images'}"
        f" (p = {result['p_value']:.4g}, level {args.alpha}; smallest possible p "
        f"{result['smallest_possible_p_value']:.4g})"
    )
    redo = f"; repeat with --draws-seed {result['draws_seed']}" if result["draws_seed"] is not None else ""
    n, used = result["n_candidates"], result["n_scored"]
    print(
        f"evidence: mean {'loss' if result['access'] == 'logits' else 'score'} on your {result['n_images']} "
        f"published images {result['published_loss']:.4g}; on {'the' if used == n else f'{used} of the'} {n} other "
        f"candidates of design {result['design']}: min {result['candidates_loss']['min']:.4g}, median "
        f"{result['candidates_loss']['median']:.4g} ({result['queries']:,} queries at access {result['access']}){redo}"
    )
    if result["stopped"]:
        print(
            f"stopped early: {result['stop_after']} of the first {result['n_scored']} candidates scored at least as "
            f"low as yours, so p lies above the level whatever the rest would score (--all-draws scores every one)"
        )
    if result["decided_early"]:
        print(
            f"stopped early: none of the first {result['n_scored']} candidates scored as low as yours, so p = "
            f"1/{result['n_scored'] + 1}, a tenth of the level or less (--all-draws scores all {n} for the full p)"
        )
    if args.json_out is not None:
        write_json(args.json_out, result)


def main(argv: list[str] | None = None) -> int:
    with console():
        return _dispatch(argv)


def _old_owner_spelling(argv: list[str]) -> list[str]:
    """`mtrack mark FOLDER --out ...` and `mtrack audit --model ...`, the owner's spellings before
    `mtrack owner`, told by the flag each needed: run as `mtrack owner ...` after a one-line notice."""
    if argv and argv[0] in OLD_OWNER_SPELLINGS:
        flag, rest = OLD_OWNER_SPELLINGS[argv[0]]
        if any(arg.split("=", 1)[0] == flag for arg in argv[1:]):
            print(
                f"notice: 'mtrack {argv[0]} {rest}' is now 'mtrack owner {argv[0]} {rest}'; the old spelling goes "
                "in the next release",
                file=sys.stderr,
            )
            return ["owner", *argv]
    return argv


def _not_taken(args: argparse.Namespace, stray: str) -> str:
    """The error for an argument the command does not take, saying where it belongs when the other
    audience has a command of that name (`--seed` on `mtrack mark CONFIG`, `--shard` on `mtrack owner mark`)."""
    command = " ".join(filter(None, (args.command, getattr(args, "owner_command", None))))
    elsewhere = f"; {ELSEWHERE[command]}" if command in ELSEWHERE else ""
    name, what = (stray.split("=", 1)[0], "an option") if stray.startswith("-") else (stray, "an argument")
    return f"{name}: not {what} of mtrack {command}{elsewhere}"


def _dispatch(argv: list[str] | None) -> int:
    try:
        args, stray = build_parser().parse_known_args(_old_owner_spelling(sys.argv[1:] if argv is None else argv))
        if stray:
            raise ConfigError(_not_taken(args, stray[0]))
        if args.command == "owner":
            (mark_own_folder if args.owner_command == "mark" else audit_own_model)(args)
        elif args.command == "experiments":
            from .experiments import run_tables

            run_tables(args.tables, args.launcher, base=args.base, seeds=args.seeds, wandb=args.wandb)
        elif args.command == "publish":
            from .stages.tracking import publish_run

            cfg = load_config(args.config, [*args.overrides, "wandb.enabled=true"])
            published = publish_run(cfg)
            if not published:
                raise StageError(f"{cfg.run_dir}: no finished stage to publish (run it first: mtrack run CONFIG)")
            print(
                f"published {len(published)} finished stage(s) of {cfg.run_dir} to W&B ({cfg.wandb.mode})"
                + (f": {', '.join(published)}" if published else "")
            )
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
        else:
            spec = STAGES[args.command]
            num_shards = getattr(args, "num_shards", None) or 1
            shard = getattr(args, "shard", None)
            if shard is not None and shard >= num_shards:
                raise ConfigError(f"--shard {shard}: outside 0..{num_shards - 1} (--num-shards {num_shards})")
            if args.command in ELSEWHERE and Path(args.config).is_dir():
                raise ConfigError(f"{args.config}: is a folder, not a run config; {ELSEWHERE[args.command]}")
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
