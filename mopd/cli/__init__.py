"""`mopd` command line: config inspection, the quickstart world, evaluation and training.

Command modules are imported when their command runs: importing the training stack (torch, Ray,
transformers) costs about 3 s here, which `mopd config show`, `mopd check` and `mopd dashboard` should not pay.
"""

from __future__ import annotations

import argparse
import os
import sys

from mopd.cli.common import DEFAULT_CONFIG
from mopd.cli.common import config_from_args as _cfg
from mopd.cli.errors import describe_chain, error_line
from mopd.config import to_yaml
from mopd.world import world_config


def cmd_config_show(args: argparse.Namespace) -> int:
    print(to_yaml(_cfg(args)), end="")
    return 0


def cmd_world_build(args: argparse.Namespace) -> int:
    from mopd.world.build import build_world
    from mopd.world.report import world_table

    print(world_table(build_world(world_config(_cfg(args)), force=args.force)))
    return 0


def cmd_round(args: argparse.Namespace) -> int:
    from mopd.evaluate import run_round
    from mopd.world.prepare import prepare_world
    from teachers.preflight import check_model_folders

    cfg = _cfg(args)
    prepare_world(cfg)
    check_model_folders(cfg, log=print)
    run_round(cfg)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mopd.logger import check_logger_packages
    from mopd.run_dir import hold_run_dir, prepare_run_dir
    from mopd.train import main_train
    from mopd.world.prepare import prepare_world

    cfg = _cfg(args)
    # Cheap checks before a world build that takes minutes (train repeats the run-dir one: it is idempotent).
    # The run dir's lock is taken first and held through the world build and the run (the session re-enters it).
    check_logger_packages(cfg.logging.sinks, cfg)
    run_dir = Path(cfg.logging.run_dir)
    resume = args.resume or args.resume_from is not None
    with hold_run_dir(run_dir, resume, args.overwrite, log=print):
        # Its refusals raise here; its notes (a checkpoint skipped as corrupt) the session prints, once.
        prepare_run_dir(run_dir, resume, args.overwrite, log=lambda _line: None, resume_from=args.resume_from)
        world = prepare_world(cfg)
        rc = main_train(cfg, resume=resume, overwrite=False, resume_from=args.resume_from,
                        allow_teacher_change=args.allow_teacher_change)
    if world:
        from mopd.world.report import plain_teacher_table

        note = plain_teacher_table(world)
        if note:
            print("\n" + note)
    return rc


def cmd_submit(args: argparse.Namespace) -> int:
    from mopd.submit import job_status, stop_job, submit

    if args.status or args.stop:  # a job id and the cluster's address: a config only when one is given
        cfg = _cfg(args) if args.config is not None else None
        return (job_status if args.status else stop_job)(args.status or args.stop, args.address, cfg)
    if args.config is None:
        args.config = DEFAULT_CONFIG
    cfg = _cfg(args)  # validated here: a bad key fails before anything is uploaded
    flags = [*(["--resume-from", args.resume_from] if args.resume_from else []),
             *(["--allow-teacher-change"] if args.allow_teacher_change else [])]
    return submit(cfg, args.config, args.overrides, args.address, wait=not args.no_wait, resume=args.resume,
                  train_flags=flags)


def cmd_compare(args: argparse.Namespace) -> int:
    from mopd.compare import compare
    from mopd.world.prepare import prepare_world

    compare(args.spec, args.overrides, args.only.split(",") if args.only else None, prepare=prepare_world,
            overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mopd", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (or MOPD_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="experiment YAML")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.steps=5")

    config = sub.add_parser("config", help="inspect experiment configs").add_subparsers(dest="sub", required=True)
    sp = config.add_parser("show", help="print the resolved config")
    with_config(sp)
    sp.set_defaults(fn=cmd_config_show)

    world = sub.add_parser("world", help="the quickstart world").add_subparsers(dest="sub", required=True)
    sp = world.add_parser("build", help="build (or reuse) the quickstart world")
    with_config(sp)
    sp.add_argument("--force", action="store_true", help="rebuild even if a matching world is cached")
    sp.set_defaults(fn=cmd_world_build)

    sp = sub.add_parser("round", help="one rollout + teacher-scoring round through Ray actors, per-domain table")
    with_config(sp)
    sp.set_defaults(fn=cmd_round)

    sp = sub.add_parser("train", help="MOPD training: rollout, teacher scoring, update, sync, metrics")
    with_config(sp)
    sp.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    sp.add_argument("--resume-from", metavar="step_N",
                    help="continue from this checkpoint of the run (implies --resume)")
    sp.add_argument("--allow-teacher-change", action="store_true",
                    help="resume although a teacher differs from the checkpoint's manifest (files, path, domains)")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace the run already in the run dir (its metrics, checkpoints and results)")
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("submit", help="run `mopd train` on a running Ray cluster as a Ray job")
    with_config(sp)
    sp.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS, then ray.address)")
    sp.add_argument("--no-wait", action="store_true", help="print the job id and return instead of streaming its log")
    sp.add_argument("--resume", action="store_true", help="the job continues from the run's last checkpoint")
    sp.add_argument("--resume-from", metavar="step_N", help="the job continues from this checkpoint")
    sp.add_argument("--allow-teacher-change", action="store_true",
                    help="the job resumes although a teacher differs from the checkpoint's manifest")
    jobs = sp.add_mutually_exclusive_group()
    jobs.add_argument("--status", metavar="JOB_ID", help="print a submitted job's status")
    jobs.add_argument("--stop", metavar="JOB_ID", help="stop a submitted job")
    sp.set_defaults(fn=cmd_submit, config=None)  # --status / --stop need no config (default: quickstart.yaml)

    sp = sub.add_parser("compare", help="several objectives at equal wall-clock, one table per domain")
    sp.add_argument("spec", nargs="?", default="configs/compare.yaml")
    sp.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    sp.add_argument("--only", help="comma-separated run names")
    sp.add_argument("--overwrite", action="store_true", help="replace earlier runs of the same names")
    sp.set_defaults(fn=cmd_compare)

    from mopd.cli.stability import add_parsers as add_stability_parsers

    add_stability_parsers(sub)
    from mopd.cli.teachers import add_parsers as add_teacher_parsers

    add_teacher_parsers(sub)
    from mopd.cli.plan import add_parsers as add_plan_parsers

    add_plan_parsers(sub)

    # `key=value` overrides may follow the flags (`mopd train CFG --overwrite trainer.steps=5`): argparse
    # stops filling a positional list at the first flag and would refuse them.
    args, extra = p.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    debug = args.debug or os.environ.get("MOPD_DEBUG", "") not in ("", "0")
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - every failure a user sees is one line; --debug shows the traceback
        line, code = error_line(e)
        if debug:
            print(f"mopd: error: {line}\nmopd: the error's chain, outermost first:\n{describe_chain(e)}",
                  file=sys.stderr)
            raise
        print(f"mopd: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
