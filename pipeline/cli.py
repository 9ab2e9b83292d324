"""Command line: one subcommand per stage, plus `run` for the whole DAG.

    mtrack run CONFIG [--set section.key=value ...] [--force]
    mtrack run CONFIG --launcher slurm [--dry-run] [--no-wait]   (every stage as SLURM jobs)
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
from pathlib import Path

from .config import ConfigError, MarkConfig, load_config
from .console import stderr_log_handler
from .data.images import ImageError
from .data.sources import DataSourceError
from .launchers import LAUNCHERS, launch
from .stages.dag import ARM_STAGES, RUNNERS, SHARDED_STAGES, Task, run_task
from .owner.designs import DESIGNS
from .store import StageError, write_json

log = logging.getLogger("pipeline")
USER_ERRORS = (ConfigError, StageError, DataSourceError, ImageError)


def _common(parser: argparse.ArgumentParser, optional_config: bool = False) -> None:
    parser.add_argument("config", nargs="?" if optional_config else None, help="run config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--force", action="store_true", help="re-run even if the manifest says done")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtrack", description="Data-use auditing benchmark pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every stage of the DAG, skipping finished ones")
    _common(run)
    run.add_argument("--launcher", choices=LAUNCHERS.names(), default="local",
                     help="where stages run: 'local' runs each stage in its own process here, 'slurm' "
                          "submits them as SLURM jobs through submitit")
    run.add_argument("--dry-run", action="store_true", help="print the jobs that would run, and stop")
    run.add_argument("--no-wait", dest="wait", action="store_false",
                     help="slurm: return once submitted instead of following the jobs to the end")
    experiments = sub.add_parser("experiments", help="run experiment tables (configs/experiments/*.yaml)")
    experiments.add_argument("tables", nargs="+", help="experiment table YAML files")
    experiments.add_argument("--launcher", choices=LAUNCHERS.names(), default="local")
    experiments.add_argument("--base", help="run the tables on this run config instead of their own "
                             "(e.g. configs/cifar10.yaml); results go to results/<table>-<config name>/")
    special = {"audit": "run the audit stage, or audit a model for your own marked images (with --model)",
               "mark": "run the mark stage, or mark a folder of your own images (with --out)"}
    for stage in RUNNERS:
        p = sub.add_parser(stage, help=special.get(stage, f"run the {stage} stage"))
        _common(p, optional_config=stage == "audit")
        if stage in ARM_STAGES:
            p.add_argument("--arm", choices=["marked", "control"], required=stage != "audit")
        if stage in SHARDED_STAGES:
            p.add_argument("--shard", type=int, help="run only this shard of the users (0-based): one array task")
            p.add_argument("--num-shards", type=int, default=1, help="number of shards the users are split into")
        if stage == "audit":
            owner = p.add_argument_group("auditing a model for your own images (CONFIG is then omitted)")
            owner.add_argument("--model", help="checkpoint (weights only) or module:function returning logits")
            owner.add_argument("--arch", help="architecture of a plain state_dict checkpoint")
            owner.add_argument("--num-classes", type=int, help="classes of a plain state_dict checkpoint")
            owner.add_argument("--user", help="your folder of marked images (the --out of mtrack mark)")
            owner.add_argument("--key", help="the key file written when marking (default: in --user)")
            owner.add_argument("--originals", help="the folder of your original images (default: from the key)")
            owner.add_argument("--label", type=int, help="class index of your images (default: from the key)")
            owner.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdict")
            owner.add_argument("--draws-seed", type=int,
                               help="subset design: seed of the audit's random subsets (default: fresh, printed)")
            owner.add_argument("--json", dest="json_out", help="also write the result to this JSON file")
        if stage == "mark":
            owner = p.add_argument_group("marking your own folder (CONFIG is then the input folder)")
            owner.add_argument("--out", help="output folder for the marked copies and the key file")
            owner.add_argument("--seed", type=int, help="secret seed (default: random, saved in the key)")
            owner.add_argument("--noise", choices=["perlin", "uniform", "none"], default="perlin")
            owner.add_argument("--epsilon", type=float, default=8 / 255)
            owner.add_argument("--alpha", type=float, default=0.7)
            owner.add_argument("--pattern", choices=["stripes", "ood_image"], default="stripes")
            owner.add_argument("--ood-folder", help="with --pattern ood_image: folder the pattern image is drawn from")
            owner.add_argument("--max-resolution", type=int,
                               help="shrink so the longer side is at most this (mark on the grid a model will store)")
            owner.add_argument("--design", choices=list(DESIGNS), default="subset",
                               help="subset (default): publish a random K of your images; groups: publish one of "
                                    "P/K disjoint groups; pattern: publish all with one of N secret patterns")
            owner.add_argument("--publish", type=int,
                               help="subset, groups: how many images to publish (default: a tenth of the folder)")
            owner.add_argument("--draws", type=int, default=999,
                               help="subset: random subsets the audit compares with; smallest p-value 1/(draws+1)")
            owner.add_argument("--n-patterns", type=int, default=100,
                               help="pattern: secret candidate patterns; the audit's smallest p-value is 1/N")
            owner.add_argument("--label", type=int, help="class index of these images, saved in the key")
    return parser


def mark_own_folder(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from .owner.designs import DesignParams
    from .owner.key import KEY_NAME
    from .owner.marking import mark_folder

    if not args.out:
        raise ConfigError(f"{args.config}: is a folder; pass --out FOLDER to mark your own images")
    try:
        cfg = MarkConfig(noise=args.noise, epsilon=args.epsilon, alpha=args.alpha, pattern=args.pattern,
                         ood_folder=args.ood_folder)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"--{'-'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}") from None
    params = DesignParams(args.design, args.publish, args.draws, args.n_patterns)
    key = mark_folder(args.config, args.out, cfg, args.seed, args.max_resolution, args.force, args.label, params)
    print(f"marked {len(key['published'])} of {len(key['files'])} images into {args.out} (design {key['design']}): "
          f"publish those; keep {Path(args.out) / KEY_NAME} and the originals private: the audit needs them")


def audit_own_model(args: argparse.Namespace) -> None:
    from .owner.audit import audit_owner, load_predictor
    from .owner.key import KEY_NAME, load_key

    if not args.user:
        raise ConfigError("audit --model: pass --user FOLDER (your marked images)")
    key = load_key(args.key or Path(args.user) / KEY_NAME, args.user)
    result = audit_owner(key, load_predictor(args.model, args.arch, args.num_classes), args.originals, args.label,
                         args.draws_seed)
    used = result["p_value"] <= args.alpha
    print(f"verdict: {'the model was trained on your images' if used else 'no evidence the model used your images'}"
          f" (p = {result['p_value']:.4g}, level {args.alpha}; smallest possible p {result['smallest_possible_p_value']:.4g})")
    redo = f"; repeat with --draws-seed {result['draws_seed']}" if result["draws_seed"] is not None else ""
    print(f"evidence: mean loss on your {result['n_images']} published images {result['published_loss']:.4g}; on the "
          f"{result['n_candidates']} other candidates of design {result['design']}: min "
          f"{result['candidates_loss']['min']:.4g}, median {result['candidates_loss']['median']:.4g}{redo}")
    if args.json_out:
        write_json(args.json_out, result)


def main(argv: list[str] | None = None) -> int:
    handler = stderr_log_handler()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _dispatch(build_parser().parse_args(argv))
    finally:
        log.removeHandler(handler)  # called again in one process (tests, scripts): log each line once


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "experiments":
            from .experiments import run_table

            for table in args.tables:
                run_table(table, args.launcher, base=args.base)
        elif args.command == "run":
            launch(args.config, args.overrides, args.launcher, args.force, args.dry_run, args.wait)
        elif args.command == "mark" and Path(args.config).is_dir():
            mark_own_folder(args)
        elif args.command == "audit" and args.model:
            audit_own_model(args)
        else:
            if args.config is None or (args.command in ARM_STAGES and not args.arm):
                raise ConfigError(f"{args.command}: needs a CONFIG" + (" and --arm" if args.command in ARM_STAGES else ""))
            cfg = load_config(args.config, args.overrides)
            task = Task(args.command, getattr(args, "arm", None), getattr(args, "shard", None),
                        getattr(args, "num_shards", 1))
            run_task(cfg, task, force=args.force)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
