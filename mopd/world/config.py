"""The quickstart world's config section, `world:`: what `mopd world build` makes (synthetic domains, their
dense teachers, the warm-started student). It sits above the core: importing `mopd.world` registers it with
`mopd.config.register_section`, and the experiment's paths reach the world by interpolation
(`student.path: ${world.dir}/student`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mopd.config import Checker, ConfigError, MopdConfig, register_section
from mopd.world.sizes import STUDENT_SIZE, TEACHER_SIZE

SECTION = "world"
_DOMAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class WorldConfig:
    """The quickstart world: synthetic domains, their teachers and the warm-started student."""

    dir: str = ".cache/world"
    seed: int = 0  # >= 0
    domains: list[str] = field(default_factory=lambda: ["add", "rev", "sort"])
    train_rows_per_domain: int = 4000  # >= 1
    eval_rows_per_domain: int = 200  # >= 1
    teacher_steps: int = 250  # >= 1; SFT steps per teacher ...
    # ... unless overridden here: addition has carries and needs more.
    teacher_steps_by_domain: dict[str, int] = field(default_factory=lambda: {"add": 400})
    teacher_lr: float = 2e-3  # > 0; peak AdamW lr; linear warmup, cosine decay to 10%
    student_steps: int = 300  # >= 1; the student's short mixed warm-start
    student_lr: float = 2e-3  # > 0
    # Share (>= 0) of each domain in the student's warm-start batches (missing domains: 1). Skewed to the
    # slow domains so that the student ends weak but not hopeless everywhere, leaving MOPD room on each.
    student_mix: dict[str, float] = field(default_factory=lambda: {"add": 5.0, "rev": 2.0, "sort": 1.0})
    batch_size: int = 64  # >= 1
    warmup_steps: int = 30  # >= 0
    # Torch threads while building; the weights depend on it. One thread is no slower for models this
    # small (the whole build took 159 s with one thread, 189 s with two, both on a loaded machine).
    num_threads: int = 1  # >= 1
    # Positions of every model (max_position_embeddings) and the tokenizer's model_max_length: prompt +
    # response + EOS must fit. 64 holds the short domains; a reasoning domain (swap: 37 + 261 + 1) needs more.
    max_positions: int = 64  # >= 8
    # Overrides of the models' sizes (mopd.world.sizes.TEACHER_SIZE / STUDENT_SIZE keys, integers >= 1),
    # e.g. {hidden_size: 256, num_hidden_layers: 6} for a bigger student; empty: the quickstart's sizes.
    teacher_size: dict[str, int] = field(default_factory=dict)
    student_size: dict[str, int] = field(default_factory=dict)
    # Domains (of `domains`) whose teacher is also trained on the bare answer, without its tool or its chain of
    # thought, at the same steps (saved as teachers/<d>-plain): the world table's evidence that the tool or the
    # chain is what makes the teacher good. Empty: none (the quickstart).
    plain_teachers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        c = Checker(SECTION, self)
        c.text("dir", "a directory path")
        c.count("seed", 0)
        c.names("domains", _DOMAIN, "synthetic domain names (add, rev, sort)")
        c.count("train_rows_per_domain", 1)
        c.count("eval_rows_per_domain", 1)
        c.count("teacher_steps", 1)
        c.counts("teacher_steps_by_domain", 1)
        c.num("teacher_lr", gt=0)
        c.count("student_steps", 1)
        c.num("student_lr", gt=0)
        c.weights("student_mix", "a share >= 0")
        c.count("batch_size", 1)
        c.count("warmup_steps", 0)
        c.count("num_threads", 1)
        c.count("max_positions", 8)
        c.names("plain_teachers", _DOMAIN, "domain names of world.domains", nonempty=False)
        stray = sorted(set(self.plain_teachers) - set(self.domains))
        if stray:
            raise ConfigError(f"config key '{SECTION}.plain_teachers': got {stray}, not in world.domains "
                              f"{list(self.domains)}; list only domains the world builds")
        for name, known in (("teacher_size", TEACHER_SIZE), ("student_size", STUDENT_SIZE)):
            c.counts(name, 1)
            unknown = sorted(set(getattr(self, name)) - set(known))
            if unknown:
                raise ConfigError(f"config key '{SECTION}.{name}': got keys {unknown}; allowed: keys of "
                                  f"{', '.join(sorted(known))}")


# `dir` is a cache outside the uploaded working dir: a submitted job reads the world where it was built.
register_section(SECTION, WorldConfig, dirs=("dir",))


def world_config(cfg: MopdConfig) -> WorldConfig:
    """The config's `world:` section; a config without one describes no quickstart world."""
    world = cfg.sections.get(SECTION)
    if world is None:
        raise ConfigError(f"config of experiment {cfg.experiment!r} has no {SECTION}: section: it describes no "
                          "quickstart world to build (start from configs/quickstart.yaml, or add "
                          f"{SECTION}: {{dir: .cache/world}} and point student.path, the teachers and data.*_files "
                          "into it)")
    return world


def has_world(cfg: MopdConfig) -> bool:
    return SECTION in cfg.sections
