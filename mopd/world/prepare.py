"""Build (or reuse) the quickstart world before a command that uses it; the core never builds worlds."""

from __future__ import annotations

from pathlib import Path

from mopd.config import MopdConfig
from mopd.world.build import build_world
from mopd.world.config import has_world, world_config


def prepare_world(cfg: MopdConfig) -> dict | None:
    """Build the quickstart world when the config has one and points into it (cached after the first build)."""
    if not has_world(cfg):
        return None
    world = world_config(cfg)
    paths = [cfg.student.path, *(t.path for t in cfg.teachers.values())]
    if not any(Path(p).resolve().is_relative_to(Path(world.dir).resolve()) for p in paths):
        return None
    return build_world(world)
