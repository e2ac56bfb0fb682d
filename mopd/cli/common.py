"""What every `mopd` command shares: reading CONFIG plus `key=value` overrides from its arguments.

The quickstart world's `world:` section is registered here (importing `mopd.world`, cheap: no torch), so every
command reads the shipped configs."""

from __future__ import annotations

import argparse

import mopd.world  # noqa: F401 - registers the world: config section
from mopd.config import MopdConfig, load_config

DEFAULT_CONFIG = "configs/quickstart.yaml"


def config_from_args(args: argparse.Namespace) -> MopdConfig:
    """The resolved config; `mopd config show key=value` (no YAML) means the default config with overrides."""
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], DEFAULT_CONFIG
    return load_config(args.config, args.overrides)
