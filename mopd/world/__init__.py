"""The quickstart world: synthetic domains, their dense teachers and a warm-started MoE student.

Importing the package registers the `world:` config section (`mopd.world.config`), so any code that loads
a config naming a world (the CLI, the benchmarks, the tests) imports `mopd.world` first.
"""

from mopd.world.config import WorldConfig, has_world, world_config

__all__ = ["WorldConfig", "has_world", "world_config"]
