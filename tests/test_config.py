"""Config errors must name the key, the value given and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mopd.config import (
    AlgorithmConfig,
    ConfigError,
    Correction,
    DataConfig,
    Dtype,
    LoggingConfig,
    LrSchedule,
    MopdConfig,
    PlacementStrategy,
    RayConfig,
    RolloutConfig,
    RuntimeEnvConfig,
    Sink,
    StudentConfig,
    TrainerBackend,
    TrainerConfig,
    WorldConfig,
    load_config,
    to_dict,
    to_yaml,
)

QS = "configs/quickstart.yaml"


def test_quickstart_config_resolves():
    cfg = load_config(QS)
    assert cfg.teachers["add_teacher"].domains == ["add"]
    assert cfg.student.path == ".cache/world/student"
    assert cfg.logging.run_dir == "runs/quickstart"


def test_override_changes_value_and_interpolation():
    cfg = load_config(QS, ["trainer.steps=3", "world.dir=/tmp/w", "experiment=x"])
    assert cfg.trainer.steps == 3
    assert cfg.student.path == "/tmp/w/student"
    assert cfg.logging.run_dir == "runs/x"


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("trainer.stpes=3", ["unknown config key 'trainer.stpes'", "steps", "prompts_per_step"]),
        ("nokey=1", ["unknown config key 'nokey'", "trainer", "rollout"]),
        ("teachers.add_teacher.domanis=[x]", ["teachers.add_teacher.domanis", "domains"]),
        ("trainer.steps=abc", ["trainer.steps", "'abc'", "an integer"]),
        ("algorithm.correction=foo", ["algorithm.correction", "'foo'", "icepop", "tis"]),
        ("rollout.n=0", ["rollout.n", "got 0", ">= 1"]),
        ("trainer.lr=-1", ["trainer.lr", "-1.0", "> 0"]),
        ("logging.sinks=[jsonl,foo]", ["logging.sinks", "'foo'", "tensorboard"]),
        ("teachers.rev_teacher.domains=[add]", ["teachers.rev_teacher.domains", "'add'", "add_teacher"]),
        ("data.default_teacher=nobody", ["data.default_teacher", "'nobody'", "add_teacher"]),
        ("algorithm.icepop_low=2", ["algorithm.icepop_low", "2.0", "in (0, 1)"]),
        ("trainer.steps", ["not of the form key=value"]),
    ],
)
def test_bad_overrides_are_refused_with_a_clear_message(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(QS, [override])
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_bad_yaml_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout.temprature'.*temperature"):
        load_config(p)


def test_missing_teacher_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teachers:\n  t:\n    domains: [a]\n")
    with pytest.raises(ConfigError, match=r"teachers.t.path"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.yaml")


def test_cli_config_show_and_error():
    ok = subprocess.run([sys.executable, "-m", "mopd.cli", "config", "show", QS, "trainer.steps=7"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "steps: 7" in ok.stdout and "add_teacher" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mopd.cli", "config", "show", QS, "trainer.stpes=7"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown config key 'trainer.stpes'" in bad.stderr
    assert "Traceback" not in bad.stderr


# -- choices are enums; ranges are checked where each section is built ------------------------------------
def test_choices_are_enum_members_that_compare_as_strings():
    cfg = load_config(QS, ["algorithm.objective=mixed", "logging.sinks=[jsonl,tensorboard]",
                           "rollout.dtype=bfloat16"])
    a = cfg.algorithm
    assert a.objective == "mixed"  # a registry name: a plain string
    assert cfg.rollout.dtype == "bfloat16" and {"bfloat16": 1}[cfg.rollout.dtype] == 1
    assert f"{cfg.rollout.dtype}" == "bfloat16" and repr(cfg.rollout.dtype) == "'bfloat16'"
    assert cfg.logging.sinks == [Sink.jsonl, Sink.tensorboard]
    assert cfg.logging.sinks == ["jsonl", "tensorboard"]
    assert cfg.rollout.dtype is Dtype.bfloat16 and cfg.trainer.lr_schedule is LrSchedule.cosine
    assert cfg.teachers["add_teacher"].backend == "vllm"  # a registry name (teachers.backends): a plain string
    assert cfg.trainer.backend is TrainerBackend.accelerate
    assert cfg.ray.placement_strategy is PlacementStrategy.PACK
    assert load_config(QS).rollout.dtype is None


def test_yaml_and_dict_write_plain_strings():
    cfg = load_config(QS, ["algorithm.objective=mixed", "logging.sinks=[jsonl,wandb]"])
    text = to_yaml(cfg)
    assert "objective: mixed" in text and "- wandb" in text and "lr_schedule: cosine" in text
    assert "ObjectiveName" not in text and "Sink" not in text
    again = yaml.safe_load(text)
    assert again["algorithm"]["objective"] == "mixed"
    d = to_dict(cfg)
    assert type(d["algorithm"]["objective"]) is str and [type(s) for s in d["logging"]["sinks"]] == [str, str]
    yaml.safe_dump(d)  # plain Python values only


def test_written_config_reloads_identically(tmp_path):
    cfg = load_config(QS, ["algorithm.objective=pg", "trainer.lr_min_ratio=0.1",
                           "algorithm.advantage_clip=null"])
    p = tmp_path / "config.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg


def test_new_keys_and_defaults():
    cfg = load_config(QS)
    t, a = cfg.trainer, cfg.algorithm
    assert (t.keep_checkpoints, t.lr_min_ratio, t.schedule_horizon) == (0, 0.0, "steps")
    assert a.advantage_clip == 10.0 and cfg.data.add_special_tokens is None
    assert cfg.teachers["add_teacher"].connect_timeout_s == 5.0
    cfg = load_config(QS, ["algorithm.advantage_clip=null", "data.add_special_tokens=true",
                           "trainer.keep_checkpoints=2", "teachers.rev_teacher.connect_timeout_s=0.5"])
    assert cfg.algorithm.advantage_clip is None and cfg.data.add_special_tokens is True
    assert cfg.trainer.keep_checkpoints == 2 and cfg.teachers["rev_teacher"].connect_timeout_s == 0.5


def _merged(*overrides: str):
    return OmegaConf.merge(OmegaConf.structured(MopdConfig), OmegaConf.load(QS),
                           OmegaConf.from_dotlist(list(overrides)))


@pytest.mark.parametrize("override, key", [
    ("trainer.grad_clip=-1", "trainer.grad_clip"),
    ("rollout.gpu_memory_utilization=5", "rollout.gpu_memory_utilization"),
    ("ray.runtime_env.env_vars.MY_TOKEN=x", "ray.runtime_env.env_vars.MY_TOKEN"),
    ("teachers.add_teacher.timeout_s=0", "teachers.add_teacher.timeout_s"),
    ("teachers.sort_teacher.domains=[]", "teachers.sort_teacher.domains"),
    ("experiment=../../etc", "experiment"),
    ("world.teacher_steps_by_domain.add=0", "world.teacher_steps_by_domain.add"),
])
def test_post_init_errors_surface_from_to_object_as_config_errors_with_the_full_key(override, key):
    with pytest.raises(ConfigError) as e:
        OmegaConf.to_object(_merged(override))
    assert type(e.value) is ConfigError and not isinstance(e.value, OmegaConfBaseException)
    assert f"config key '{key}'" in str(e.value), str(e.value)


def test_direct_construction_validates_and_coerces():
    a = AlgorithmConfig(objective="reverse_kl", teacher_top_k=-1, correction="tis")
    assert a.objective == "reverse_kl" and a.correction is Correction.tis
    assert LoggingConfig(sinks=["jsonl", "mlflow"]).sinks == [Sink.jsonl, Sink.mlflow]
    with pytest.raises(ConfigError, match=r"'algorithm.objective': got 'kl'; allowed: pg \| reverse_kl"):
        AlgorithmConfig(objective="kl")
    with pytest.raises(ConfigError, match=r"'trainer.grad_clip': got 0; allowed: a number > 0"):
        TrainerConfig(grad_clip=0)
    with pytest.raises(ConfigError, match=r"'world.batch_size'"):
        WorldConfig(batch_size=0)
    for cls in (MopdConfig, StudentConfig, DataConfig, RolloutConfig, AlgorithmConfig, TrainerConfig,
                LoggingConfig, WorldConfig, RayConfig, RuntimeEnvConfig):
        cls()  # the defaults are valid


def test_vllm_server_teachers_reserve_no_bundle():
    cfg = load_config(QS, ["teachers.rev_teacher.backend=vllm_server",
                           "teachers.rev_teacher.urls=[http://127.0.0.1:1]",
                           "teachers.rev_teacher.num_cpus=0", "teachers.rev_teacher.num_gpus=0"])
    assert cfg.teachers["rev_teacher"].replicas == 1


def test_objectives_registered_in_code_are_accepted_by_the_config():
    import torch

    from mopd.objectives import OBJECTIVES, register_objective

    with pytest.raises(ConfigError, match="algorithm.objective.*pg | reverse_kl.*register_objective"):
        load_config(QS, ["algorithm.objective=my_kl"])
    register_objective("my_kl", advantage="mopd")(lambda x, a: (torch.zeros(()), {}))
    try:
        assert load_config(QS, ["algorithm.objective=my_kl"]).algorithm.objective == "my_kl"
    finally:
        del OBJECTIVES["my_kl"]


@pytest.mark.parametrize("path", sorted(p for p in Path("configs").glob("*.yaml") if p.name != "compare.yaml"))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    served = {d for t in cfg.teachers.values() for d in t.domains}
    if cfg.student.path.startswith(cfg.world.dir):  # a quickstart world: a teacher for each of its domains
        assert served == set(cfg.world.domains), path


def test_compare_spec_runs_all_load():
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load("configs/compare.yaml"))
    for name, over in spec["runs"].items():
        assert load_config(spec["base"], over).algorithm.objective in name  # each run trains what it is named for
