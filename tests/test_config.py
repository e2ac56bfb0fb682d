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
    compose_config,
    load_config,
    to_dict,
    to_yaml,
)
from mopd.world import WorldConfig, has_world, world_config

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
        ("rollout.weight_sync=nccl", ["rollout.weight_sync", "'nccl'", "collective | object_store"]),
        ("rollout.weight_sync_bucket_mb=0", ["rollout.weight_sync_bucket_mb", "got 0", "> 0", "MB per broadcast"]),
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


def test_a_compiled_cpu_engine_with_routing_capture_is_refused_before_it_starts():
    """A compiled engine never calls the CPU capture's Python hooks (the engine would fail at its first step)."""
    with pytest.raises(ConfigError, match=r"rollout\.enforce_eager.*got False.*true with algorithm\.r3=False / "
                                          r"r3_capture=True on CPU engines"):
        load_config(QS, ["rollout.enforce_eager=false", "algorithm.r3_capture=true"])
    assert not load_config(QS, ["rollout.enforce_eager=false"]).rollout.enforce_eager  # compiled, no capture: fine
    load_config(QS, ["rollout.enforce_eager=false", "algorithm.r3=true", "rollout.num_gpus_per_engine=1"])


def test_a_tempered_kl_needs_a_whole_vocabulary_kl_objective_untempered_by_chunks():
    ok = ["algorithm.objective=reverse_kl", "algorithm.teacher_top_k=-1", "algorithm.kl_temperature=0.7"]
    assert load_config(QS, ok).algorithm.kl_temperature == 0.7
    for bad, fragment in [(["algorithm.objective=pg", "algorithm.teacher_top_k=0", "algorithm.kl_temperature=0.7"],
                           "objective=pg / teacher_top_k=0"),
                          (ok[:1] + ["algorithm.teacher_top_k=20", ok[2]], "teacher_top_k=20"),
                          (ok + ["trainer.logits_chunk_tokens=64"], "trainer.logits_chunk_tokens=64"),
                          (["algorithm.kl_temperature=0"], "> 0")]:
        with pytest.raises(ConfigError, match="algorithm.kl_temperature") as e:
            load_config(QS, bad)
        assert fragment in str(e.value), (bad, str(e.value))


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
    return compose_config(QS, list(overrides))


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


@pytest.mark.parametrize("path", sorted(p for p in Path("configs").glob("*.yaml") if not p.name.startswith("compare")))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    served = {d for t in cfg.teachers.values() for d in t.domains}
    world = world_config(cfg) if has_world(cfg) else None
    if world is not None and cfg.student.path.startswith(world.dir):  # a quickstart world: a teacher per domain
        assert served == set(world.domains), path


@pytest.mark.parametrize("path", ["configs/compare.yaml", "configs/compare_agent.yaml"])
def test_compare_spec_runs_all_load(path):
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(path))
    for name, over in spec["runs"].items():
        assert load_config(spec["base"], over).algorithm.objective in name  # each run trains what it is named for


# -- configs that inherit: base: ---------------------------------------------------------------------------
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _changes(variant: str) -> dict:
    """What a shipped variant's resolved config changes relative to the quickstart's, key by key."""
    base, var = _flat(to_dict(load_config(QS))), _flat(to_dict(load_config(f"configs/{variant}")))
    return {k: var.get(k, "<absent>") for k in base.keys() | var.keys()
            if base.get(k, "<absent>") != var.get(k, "<absent>")}


def test_base_chain_merges_in_order_with_paths_relative_to_each_file(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    qs = Path(QS).resolve()
    (tmp_path / "root.yaml").write_text(f"base: {qs}\ntrainer: {{steps: 11, lr: 0.5}}\nrollout: {{n: 2}}\n")
    (tmp_path / "a" / "mid.yaml").write_text("base: ../root.yaml\ntrainer: {steps: 12}\nexperiment: mid\n")
    (tmp_path / "a" / "b" / "leaf.yaml").write_text("base: ../mid.yaml\nrollout: {n: 3}\n")
    cfg = load_config(tmp_path / "a" / "b" / "leaf.yaml")
    assert (cfg.trainer.steps, cfg.trainer.lr, cfg.rollout.n) == (12, 0.5, 3)  # the nearer file wins
    assert cfg.experiment == "mid" and cfg.logging.run_dir == "runs/mid"  # interpolations see the merged tree
    assert cfg.teachers["add_teacher"].domains == ["add"] and cfg.trainer.warmup_steps == 50  # from quickstart
    assert "base" not in yaml.safe_load(to_yaml(cfg))
    # key=value overrides win over every file of the chain.
    over = load_config(tmp_path / "a" / "b" / "leaf.yaml", ["trainer.steps=5", "rollout.n=7", "experiment=o"])
    assert (over.trainer.steps, over.rollout.n, over.logging.run_dir) == (5, 7, "runs/o")


def test_a_base_that_is_a_cycle_is_refused_naming_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: ./a.yaml\ntrainer: {steps: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "a.yaml")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert str(e.value).startswith(f"config file {a}: base: chain {a} -> {b} -> {a} is a cycle"), str(e.value)
    assert "\n" not in str(e.value)
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"chain .*self.yaml -> .*self.yaml is a cycle"):
        load_config(tmp_path / "self.yaml")


def test_a_missing_or_malformed_base_names_the_file_that_refers_to_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "top.yaml").write_text("base: sub/mid.yaml\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "top.yaml")
    assert str(e.value).startswith(f"config file {tmp_path / 'sub' / 'mid.yaml'}: base: nope.yaml not found "
                                   f"(looked for {tmp_path / 'sub' / 'nope.yaml'}"), str(e.value)
    (tmp_path / "list.yaml").write_text("base: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError, match=r"list.yaml: base: got \['a.yaml', 'b.yaml'\]; allowed: a path"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text(f"base: {Path(QS).resolve()}\ntrainer: {{stpes: 1}}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'trainer.stpes'; did you mean"):
        load_config(tmp_path / "typo.yaml")


@pytest.mark.parametrize("variant, changes", [
    ("quickstart_bf16.yaml", {"rollout.dtype": "bfloat16", "algorithm.r3_capture": True}),
    ("quickstart_topk.yaml", {"algorithm.objective": "mixed", "algorithm.teacher_top_k": 16,
                              "algorithm.advantage_norm": "center", "algorithm.kl_coef": 4.0}),
    ("remote_teacher.yaml", {"teachers.rev_teacher.backend": "vllm_server",
                             "teachers.rev_teacher.urls": ["http://127.0.0.1:8100"]}),
])
def test_variants_change_only_what_they_say(variant, changes):
    name = variant.removesuffix(".yaml")
    assert _changes(variant) == {**changes, "experiment": name, "logging.run_dir": f"runs/{name}"}
    assert "base:" in Path("configs", variant).read_text()


def test_the_four_domain_variant_is_a_world_of_its_own():
    cfg = load_config("configs/quickstart_4domain.yaml")
    changed = _changes("quickstart_4domain.yaml")
    assert {k for k in changed if not k.startswith("teachers.spell_teacher.")} == {
        "experiment", "logging.run_dir", "world.dir", "world.domains", "world.student_mix.spell", "student.path",
        "teachers.add_teacher.path", "teachers.rev_teacher.path", "teachers.sort_teacher.path", "data.train_files",
        "data.eval_files", "data.domain_mix.spell", "data.domain_mix.add", "data.domain_mix.rev",
        "data.max_prompt_tokens", "rollout.max_tokens", "rollout.num_cpus_per_engine"}
    paths = [cfg.student.path, *cfg.data.train_files, *cfg.data.eval_files, *(t.path for t in cfg.teachers.values())]
    assert all(p.startswith(".cache/world4/") for p in paths), paths
    assert cfg.data.domain_mix == {"add": 1.0, "rev": 1.0, "sort": 1.0, "spell": 1.0}
    assert cfg.teachers["spell_teacher"].domains == ["spell"] and world_config(cfg).student_mix["spell"] == 1.0
    assert (cfg.data.max_prompt_tokens, cfg.rollout.max_tokens, cfg.rollout.num_cpus_per_engine) == (16, 32, 0.2)
    # The recipe is the quickstart's.
    assert (cfg.algorithm.objective, cfg.trainer.steps, cfg.trainer.max_staleness) == ("reverse_kl", 1200, 1)


def test_a_variant_drops_inherited_mapping_entries_with_null(tmp_path):
    qs = Path(QS).resolve()
    (tmp_path / "v.yaml").write_text(f"base: {qs}\nteachers: {{rev_teacher: null, sort_teacher: null}}\n"
                                     "data: {domain_mix: {rev: null, sort: null, add: 3.0}}\n")
    cfg = load_config(tmp_path / "v.yaml")
    assert list(cfg.teachers) == ["add_teacher"] and cfg.data.domain_mix == {"add": 3.0}
    assert "rev_teacher" not in yaml.safe_load(to_yaml(cfg))["teachers"]
    # Only entries of plain mappings go; a section's own key set to null is validated as before.
    (tmp_path / "bad.yaml").write_text(f"base: {qs}\ntrainer: {{steps: null}}\n")
    with pytest.raises(ConfigError, match=r"trainer.steps"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "new.yaml").write_text(f"base: {qs}\nteachers: {{nobody: null}}\n")  # nothing inherited to drop
    with pytest.raises(ConfigError):
        load_config(tmp_path / "new.yaml")


def test_the_reasoning_variant_is_a_world_of_its_own():
    cfg = load_config("configs/quickstart_reason.yaml")
    world = world_config(cfg)
    assert (world.dir, world.domains, world.max_positions) == (".cache/world_reason", ["swap"], 320)
    assert list(cfg.teachers) == ["swap_teacher"] and cfg.teachers["swap_teacher"].domains == ["swap"]
    paths = [cfg.student.path, *cfg.data.train_files, *cfg.data.eval_files, cfg.teachers["swap_teacher"].path]
    assert all(p.startswith(".cache/world_reason/") for p in paths), paths
    assert cfg.data.domain_mix == {"swap": 1.0}
    # The longest sequence fits the models' positions: prompt + max_tokens + 1 <= world.max_positions.
    assert cfg.data.max_prompt_tokens + cfg.rollout.max_tokens + 1 <= world.max_positions
    assert cfg.rollout.max_tokens >= 262  # the teacher's 261 characters + EOS
    assert (cfg.algorithm.objective, cfg.trainer.max_staleness) == ("reverse_kl", 1)  # the quickstart's recipe


# -- sections registered above the core: world: ------------------------------------------------------------
def test_the_world_section_is_validated_interpolated_and_written_back(tmp_path):
    cfg = load_config(QS, ["world.dir=/tmp/w", "world.train_rows_per_domain=10"])
    world = world_config(cfg)
    assert isinstance(world, WorldConfig) and cfg.sections == {"world": world}
    assert (world.dir, world.train_rows_per_domain, world.seed) == ("/tmp/w", 10, 0)
    assert cfg.student.path == "/tmp/w/student" and cfg.data.train_files == ["/tmp/w/data/train.jsonl"]
    assert not hasattr(cfg, "world")  # only through the accessor: the core schema has no such field
    text = to_yaml(cfg)
    assert yaml.safe_load(text)["world"]["train_rows_per_domain"] == 10
    assert to_dict(cfg)["world"]["dir"] == "/tmp/w"
    p = tmp_path / "config.yaml"
    p.write_text(text)
    assert load_config(p) == cfg  # RUN_DIR/config.yaml round-trips, section included
    for override, fragments in [
        ("world.sead=1", ["unknown config key 'world.sead'", "did you mean 'world.seed'", "train_rows_per_domain"]),
        ("world.seed=abc", ["config key 'world.seed'", "'abc'", "an integer"]),
        ("world.batch_size=0", ["config key 'world.batch_size'", "an integer >= 1"]),
        ("world.teacher_steps_by_domain.add=0", ["'world.teacher_steps_by_domain.add'", "an integer >= 1"]),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(QS, [override])
        assert all(f in str(e.value) for f in fragments), (override, str(e.value))


def test_a_config_without_a_world_section_has_none(tmp_path):
    cfg = load_config("configs/gpu_cluster.yaml")
    assert cfg.sections == {} and "world" not in yaml.safe_load(to_yaml(cfg))
    with pytest.raises(ConfigError, match="has no world: section"):
        world_config(cfg)
    # An override alone brings the section in, with its defaults.
    assert world_config(load_config("configs/gpu_cluster.yaml", ["world.seed=3"])).dir == ".cache/world"
    (tmp_path / "c.yaml").write_text("student: {path: '${world.dir}/s'}\ndata: {train_files: [a], eval_files: [b]}\n")
    with pytest.raises(ConfigError, match=r"'student.path'.*world.dir"):
        load_config(tmp_path / "c.yaml", ["teachers.t.path=x", "teachers.t.domains=[a]"])


def test_the_core_schema_keys_are_required_where_the_world_used_to_fill_them(tmp_path):
    (tmp_path / "c.yaml").write_text("teachers: {t: {path: /t, domains: [a]}}\n")
    with pytest.raises(ConfigError, match=r"^config keys without a value: data.eval_files, data.train_files, "
                                          r"student.path \(set them"):
        load_config(tmp_path / "c.yaml")


def test_a_world_section_without_mopd_world_imported_is_refused_in_one_line():
    code = ("from mopd.config import ConfigError, load_config\n"
            "try:\n    load_config('configs/quickstart.yaml')\nexcept ConfigError as e:\n    print(e)\n"
            "import sys; print(sorted(m for m in sys.modules if m.startswith('mopd.world')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    msg, imported = out.splitlines()
    assert msg.startswith("configs/quickstart.yaml: unknown config key 'world'"), msg
    assert "register_section" in msg and imported == "[]"


def test_the_core_schema_does_not_mention_the_world():
    """Issue 19's contract: the world sits above the core (import-linter holds the imports, this the text)."""
    source = Path("mopd/config.py").read_text()
    assert "world" not in source.lower(), [ln for ln in source.splitlines() if "world" in ln.lower()]
