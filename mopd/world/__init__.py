"""The quickstart world: synthetic domains, their dense teachers and a warm-started MoE student.

Importing the package registers the `world:` config section (`mopd.world.config`) and the world's verifiers
(`mopd.world.tasks`: the `swap` domain's final-answer check), so any code that loads a config naming a world
(the CLI, the benchmarks, the tests) imports `mopd.world` first. Both are cheap: no torch.
"""

import mopd.world.tasks  # noqa: F401 - registers the world's verifiers for its domains
from mopd.world.config import WorldConfig, has_world, world_config

__all__ = ["WorldConfig", "has_world", "world_config"]
