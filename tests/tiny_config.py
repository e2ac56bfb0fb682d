"""A tiny-world experiment YAML for tests that drive the CLI (`mopd teachers check`, `mopd train`)."""

from __future__ import annotations

from pathlib import Path

import yaml

# The core keys without a default, for configs built from `key=value` overrides alone by tests that never read
# them (a test that does names its own, after these).
REQUIRED_OVERRIDES = ["student.path=/nonexistent/student", "data.train_files=[/nonexistent/train.jsonl]",
                      "data.eval_files=[/nonexistent/eval.jsonl]"]


def write_config(path: Path, world: dict, teachers: dict, experiment: str = "test", **sections) -> str:
    """Write a config over the `tiny_world` fixture (a cache hit: its whole world config is repeated)."""
    cfg = {"experiment": experiment, "world": {**world["config"], "dir": world["dir"]},
           "student": {"path": f"{world['dir']}/student"}, "teachers": teachers,
           "data": {"train_files": [f"{world['dir']}/data/train.jsonl"],
                    "eval_files": [f"{world['dir']}/data/eval.jsonl"], "eval_size_per_domain": 16},
           "rollout": {"max_tokens": 12, "num_cpus_per_engine": 0.25},
           "algorithm": {"objective": "reverse_kl", "teacher_top_k": -1},
           "trainer": {"prompts_per_step": 8, "eval_every": 0},
           "logging": {"progress_bar": False, "dashboard_every": 0}}
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)
