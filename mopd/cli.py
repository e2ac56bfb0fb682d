"""`mopd` command line: config inspection, the quickstart world, evaluation and training."""

from __future__ import annotations

import argparse
import sys

from mopd.config import ConfigError, load_config, to_yaml

DEFAULT_CONFIG = "configs/quickstart.yaml"


def _cfg(args: argparse.Namespace):
    # `mopd config show key=value` (no YAML) means the default config with overrides.
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], DEFAULT_CONFIG
    return load_config(args.config, args.overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    print(to_yaml(_cfg(args)), end="")
    return 0


def cmd_world_build(args: argparse.Namespace) -> int:
    from mopd.world.build import build_world

    cfg = _cfg(args)
    from mopd.report import world_table

    print(world_table(build_world(cfg.world, force=args.force)))
    return 0


def cmd_round(args: argparse.Namespace) -> int:
    from mopd.quickstart import run_round

    run_round(_cfg(args))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mopd.train import main_train

    return main_train(_cfg(args), resume=args.resume)


def cmd_submit(args: argparse.Namespace) -> int:
    from mopd.submit import job_status, stop_job, submit

    cfg = _cfg(args)  # validated here: a bad key fails before anything is uploaded
    if args.status:
        return job_status(args.status, args.address, cfg)
    if args.stop:
        return stop_job(args.stop, args.address, cfg)
    return submit(cfg, args.config, args.overrides, args.address, wait=not args.no_wait, resume=args.resume)


def cmd_compare(args: argparse.Namespace) -> int:
    from mopd.compare import compare

    compare(args.spec, args.overrides, args.only.split(",") if args.only else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mopd", description=__doc__)
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
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("submit", help="run `mopd train` on a running Ray cluster as a Ray job")
    with_config(sp)
    sp.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS, then ray.address)")
    sp.add_argument("--no-wait", action="store_true", help="print the job id and return instead of streaming its log")
    sp.add_argument("--resume", action="store_true", help="the job continues from the run's last checkpoint")
    jobs = sp.add_mutually_exclusive_group()
    jobs.add_argument("--status", metavar="JOB_ID", help="print a submitted job's status")
    jobs.add_argument("--stop", metavar="JOB_ID", help="stop a submitted job")
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("compare", help="several objectives at equal wall-clock, one table per domain")
    sp.add_argument("spec", nargs="?", default="configs/compare.yaml")
    sp.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    sp.add_argument("--only", help="comma-separated run names")
    sp.set_defaults(fn=cmd_compare)

    from stability.cli_commands import add_parsers as add_stability_parsers

    add_stability_parsers(sub)
    from teachers.cli_commands import add_parsers as add_teacher_parsers

    add_teacher_parsers(sub)

    args = p.parse_args(argv)
    from mopd.data import DataError
    from mopd.submit import SubmitError
    from mopd.trainer import NonFiniteError
    from teachers.preflight import PreflightError
    from teachers.registry import TeacherRegistryError

    try:
        return args.fn(args)
    except (ConfigError, DataError, TeacherRegistryError, NonFiniteError, PreflightError, SubmitError) as e:
        print(f"mopd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
