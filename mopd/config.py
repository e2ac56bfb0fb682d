"""Experiment config: one structured schema, YAML files, and `key=value` overrides.

The schema is the single source of truth for keys, types and defaults; `load_config` turns every
OmegaConf error and every out-of-range value into a `ConfigError` that names the key, the value given
and what is allowed, so a typo in a 40-line YAML is a one-line fix rather than a stack trace.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem the user can fix; the message says which key and how."""


@dataclass
class StudentConfig:
    path: str = "${world.dir}/student"  # Hugging Face model folder
    dtype: str = "float32"  # trainer and engine dtype


@dataclass
class TeacherConfig:
    path: str = MISSING  # Hugging Face model folder (vllm backend)
    domains: list[str] = field(default_factory=list)
    backend: str = "vllm"
    replicas: int = 1
    dtype: str = "float32"
    # Each replica's placement-group bundle; null: rollout.num_cpus_per_engine / num_gpus_per_engine.
    num_cpus: float | None = None
    num_gpus: float | None = None
    # backend vllm_server: a `vllm serve` you run; `path` stays the tokenizer source for the tokenizer check.
    urls: list[str] = field(default_factory=list)  # one base URL per replica, e.g. http://127.0.0.1:8100
    served_model: str | None = None  # null: the one model the server lists at /v1/models
    timeout_s: float = 120.0  # per HTTP request
    api_key_env: str | None = None  # NAME of the env var holding the server's API key (never the key)
    max_retries: int = 3  # per request, on connection errors and 5xx, with exponential backoff
    max_concurrency: int = 4  # requests in flight per replica
    request_batch_size: int = 16  # sequences per /v1/completions request
    # Alignment mode for tokenizers that differ from the student's; only "none" (identical
    # tokenizers required) exists today.
    tokenizer_alignment: str = "none"


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["${world.dir}/data/train.jsonl"])
    eval_files: list[str] = field(default_factory=lambda: ["${world.dir}/data/eval.jsonl"])
    # Sampling weight per domain; empty means proportional to the rows in the train files.
    domain_mix: dict[str, float] = field(default_factory=dict)
    max_prompt_tokens: int = 32
    # Teacher name used for rows whose domain no teacher serves; null makes that an error.
    default_teacher: str | None = None
    eval_size_per_domain: int = 200


@dataclass
class RolloutConfig:
    n: int = 4  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    num_engines: int = 1
    kv_cache_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE (whole GiB) on CPU
    dtype: str | None = None  # engine dtype; null = student.dtype (bf16 engines + fp32 trainer = real mismatch)
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    num_cpus_per_engine: float = 1.0
    num_gpus_per_engine: float = 0.0
    omp_threads: int = 1
    # Evaluation rounds: accuracy from greedy decoding, teacher KL from samples at temperature 1.
    eval_temperature: float = 0.0


@dataclass
class AlgorithmConfig:
    # pg: sampled-token MOPD advantage (MiMo Eq. 7); reverse_kl: top-k reverse KL to the teacher;
    # mixed: pg + kl_coef * reverse_kl; orm: outcome-only RL (GRPO advantages, no teacher);
    # sft: off-policy SFT on teacher samples (baseline).
    objective: str = "pg"
    alpha_orm: float = 0.0  # weight of the group-normalised outcome advantage
    kl_coef: float = 1.0
    teacher_top_k: int = 0  # 0: sampled token only; -1: the whole vocabulary
    correction: str = "icepop"  # none | icepop | tis | seq_mask
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    tis_cap: float = 2.0
    ppo_epochs: int = 1
    ppo_clip: float = 0.2
    r3: bool = False  # replay the engine's routed experts in every trainer forward
    r3_capture: bool = False  # have the engine return routed experts even with r3 off (r3/* metrics)


@dataclass
class TrainerConfig:
    backend: str = "accelerate"  # accelerate | deepspeed
    zero_stage: int = 2
    steps: int = 20
    prompts_per_step: int = 16
    micro_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0
    seed: int = 0
    max_wallclock_s: float = 0.0  # 0: no limit
    # The trainer actor's placement-group bundle, and its torch threads (0: max(1, round(num_cpus))).
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_threads: int = 0


@dataclass
class LoggingConfig:
    run_dir: str = "runs/${experiment}"
    sinks: list[str] = field(default_factory=lambda: ["jsonl"])
    progress_bar: bool = True
    dashboard_every: int = 10  # re-render RUN_DIR/dashboard.html every N steps (0: only at the end)
    # Optional sinks (tensorboard | wandb | mlflow in `sinks`): W&B project and MLflow experiment name.
    project: str = "mopd"
    wandb_mode: str = "offline"  # offline (RUN_DIR/wandb, no login) | online (key from WANDB_API_KEY) | disabled
    wandb_entity: str | None = None
    mlflow_tracking_uri: str | None = None  # null: SQLite store in RUN_DIR/mlflow; or e.g. http://127.0.0.1:5000


@dataclass
class WorldConfig:
    """The quickstart world: synthetic domains, their teachers and the warm-started student."""

    dir: str = ".cache/world"
    seed: int = 0
    domains: list[str] = field(default_factory=lambda: ["add", "rev", "sort"])
    train_rows_per_domain: int = 4000
    eval_rows_per_domain: int = 200
    teacher_steps: int = 250  # SFT steps per teacher ...
    # ... unless overridden here: addition has carries and needs more.
    teacher_steps_by_domain: dict[str, int] = field(default_factory=lambda: {"add": 400})
    teacher_lr: float = 2e-3  # peak AdamW lr; linear warmup, cosine decay to 10%
    student_steps: int = 300  # the student's short mixed warm-start
    student_lr: float = 2e-3
    # Share of each domain in the student's warm-start batches (missing domains: 1). Skewed to the slow
    # domains so that the student ends weak but not hopeless everywhere, leaving MOPD room on each.
    student_mix: dict[str, float] = field(default_factory=lambda: {"add": 5.0, "rev": 2.0, "sort": 1.0})
    batch_size: int = 64
    warmup_steps: int = 30
    # Torch threads while building; the weights depend on it. One thread is no slower for models this
    # small (the whole build took 159 s with one thread, 189 s with two, both on a loaded machine).
    num_threads: int = 1


@dataclass
class RuntimeEnvConfig:
    """What `mopd submit` ships with a job: the code and configs in `working_dir` (minus `excludes`,
    gitignore-style patterns relative to it) and environment variables."""

    working_dir: str = "."
    excludes: list[str] = field(default_factory=lambda: [
        "/.venv", "/runs", "/.cache", "/.git", "/build", "/.whl", "/.pytest_cache", "/.ruff_cache",
        "__pycache__", "*.egg-info"])
    env_vars: dict[str, str] = field(default_factory=dict)  # literal values; they end up in RUN_DIR/config.yaml
    # Names whose values are copied from the submitting shell (API keys): the config holds names only.
    env_vars_from_env: list[str] = field(default_factory=list)


@dataclass
class RayConfig:
    # null: start a local cluster on loopback; or a running cluster's GCS address (127.0.0.1:6379, auto).
    # `mopd submit` reads a dashboard URL here (http://127.0.0.1:8265).
    address: str | None = None
    num_cpus: int = 2
    host: str = "127.0.0.1"
    log_to_driver: bool = False  # engine actors' own logs (vLLM start-up chatter); errors always propagate
    placement_strategy: str = "PACK"  # how the placement group spreads engine and trainer bundles over nodes
    placement_timeout_s: float = 120.0  # wait for a cluster's resources this long (a private cluster: no wait)
    runtime_env: RuntimeEnvConfig = field(default_factory=RuntimeEnvConfig)


@dataclass
class MopdConfig:
    experiment: str = "quickstart"
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# Allowed values for string choices, checked after merging.
CHOICES: dict[str, tuple[str, ...]] = {
    "student.dtype": ("float32", "bfloat16", "float16"),
    "rollout.dtype": (None, "float32", "bfloat16", "float16"),
    "algorithm.objective": ("pg", "reverse_kl", "mixed", "orm", "sft"),
    "algorithm.correction": ("none", "icepop", "tis", "seq_mask"),
    "trainer.backend": ("accelerate", "deepspeed"),
    "trainer.lr_schedule": ("constant", "cosine", "linear"),
    "trainer.precision": ("fp32", "bf16"),
    "teachers.*.backend": ("vllm", "vllm_server"),
    "teachers.*.dtype": ("float32", "bfloat16", "float16"),
    "teachers.*.tokenizer_alignment": ("none",),
    "logging.sinks[]": ("jsonl", "tensorboard", "wandb", "mlflow"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "ray.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': got {value!r}; allowed: {allowed}")


def _validate(cfg: MopdConfig) -> None:
    for key, allowed in CHOICES.items():
        if key.startswith("teachers.*."):
            attr = key.split(".")[-1]
            for name, t in cfg.teachers.items():
                v = getattr(t, attr)
                _check(v in allowed, f"teachers.{name}.{attr}", v, " | ".join(allowed))
        elif key.endswith("[]"):
            section, attr = key[:-2].split(".")
            for v in getattr(getattr(cfg, section), attr):
                _check(v in allowed, key[:-2], v, " | ".join(allowed))
        else:
            section, attr = key.split(".")
            v = getattr(getattr(cfg, section), attr)
            _check(v in allowed, key, v, " | ".join(map(str, allowed)))

    positive_ints = [
        "rollout.n", "rollout.max_tokens", "rollout.num_engines", "rollout.omp_threads",
        "trainer.steps", "trainer.prompts_per_step", "trainer.micro_batch_size",
        "algorithm.ppo_epochs", "data.max_prompt_tokens", "data.eval_size_per_domain",
        "ray.num_cpus",
    ]
    for key in positive_ints:
        section, attr = key.split(".")
        v = getattr(getattr(cfg, section), attr)
        _check(v >= 1, key, v, "an integer >= 1")
    for key in ["trainer.lr", "rollout.temperature", "rollout.kv_cache_gb", "algorithm.tis_cap"]:
        section, attr = key.split(".")
        v = getattr(getattr(cfg, section), attr)
        _check(v > 0, key, v, "a number > 0")
    a = cfg.algorithm
    _check(0 < a.icepop_low < 1 < a.icepop_high, "algorithm.icepop_low/icepop_high",
           (a.icepop_low, a.icepop_high), "0 < icepop_low < 1 < icepop_high (default 0.5, 5.0)")
    _check(0 < cfg.rollout.top_p <= 1, "rollout.top_p", cfg.rollout.top_p, "0 < top_p <= 1")
    _check(a.teacher_top_k >= -1, "algorithm.teacher_top_k", a.teacher_top_k,
           "-1 (whole vocabulary), 0 (sampled token only) or k >= 1")
    _check(a.objective not in ("reverse_kl", "mixed") or a.teacher_top_k != 0, "algorithm.teacher_top_k",
           a.teacher_top_k, f"-1 or k >= 1 when algorithm.objective={a.objective} (the KL needs the teacher's top-k)")
    _check(cfg.trainer.zero_stage in (1, 2, 3), "trainer.zero_stage", cfg.trainer.zero_stage, "1 | 2 | 3")
    for name, t in cfg.teachers.items():
        _check(bool(t.domains), f"teachers.{name}.domains", t.domains, "a non-empty list of domain names")
        _check(t.replicas >= 1, f"teachers.{name}.replicas", t.replicas, "an integer >= 1")
        _validate_teacher_server(name, t)
    seen: dict[str, str] = {}
    for name, t in cfg.teachers.items():
        for d in t.domains:
            _check(d not in seen, f"teachers.{name}.domains", d,
                   f"each domain served by one teacher; '{d}' is already served by teacher '{seen.get(d)}'")
            seen[d] = name
    if cfg.data.default_teacher is not None:
        _check(cfg.data.default_teacher in cfg.teachers, "data.default_teacher", cfg.data.default_teacher,
               f"null or one of the configured teachers: {sorted(cfg.teachers)}")
    for d, w in cfg.data.domain_mix.items():
        _check(w >= 0, f"data.domain_mix.{d}", w, "a weight >= 0")
    _validate_placement(cfg)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)


def _validate_placement(cfg: MopdConfig) -> None:
    """Bundle sizes and the job's runtime env: a bad value fails here, not after an upload."""
    r, t = cfg.rollout, cfg.trainer
    bundles = [("rollout.num_cpus_per_engine", "rollout.num_gpus_per_engine", r.num_cpus_per_engine,
                r.num_gpus_per_engine), ("trainer.num_cpus", "trainer.num_gpus", t.num_cpus, t.num_gpus)]
    for name, tc in cfg.teachers.items():
        bundles.append((f"teachers.{name}.num_cpus", f"teachers.{name}.num_gpus",
                        r.num_cpus_per_engine if tc.num_cpus is None else tc.num_cpus,
                        r.num_gpus_per_engine if tc.num_gpus is None else tc.num_gpus))
    for cpu_key, gpu_key, cpus, gpus in bundles:
        _check(cpus >= 0, cpu_key, cpus, "a number >= 0")
        _check(gpus >= 0, gpu_key, gpus, "a number >= 0")
        _check(cpus + gpus > 0, f"{cpu_key}/{gpu_key}", (cpus, gpus),
               "at least one > 0 (a placement-group bundle cannot be empty)")
    _check(t.num_threads >= 0, "trainer.num_threads", t.num_threads, "0 (from trainer.num_cpus) or an integer >= 1")
    _check(cfg.ray.placement_timeout_s > 0, "ray.placement_timeout_s", cfg.ray.placement_timeout_s, "seconds > 0")
    env = cfg.ray.runtime_env
    for name in [*env.env_vars, *env.env_vars_from_env]:
        _check(bool(_ENV_NAME.fullmatch(name)), "ray.runtime_env.env_vars", name,
               "environment variable names (letters, digits, underscore)")
    for name in env.env_vars:
        _check(not _SECRET_NAME.search(name), f"ray.runtime_env.env_vars.{name}", "<value hidden>",
               f"no secrets here (values are written to RUN_DIR/config.yaml); list the name in "
               f"ray.runtime_env.env_vars_from_env instead and export {name} in the submitting shell")


def _validate_teacher_server(name: str, t: TeacherConfig) -> None:
    """A `vllm_server` teacher's replicas are its URLs; an in-cluster teacher has none."""
    import re

    key = f"teachers.{name}"
    if t.backend != "vllm_server":
        _check(not t.urls, f"{key}.urls", t.urls, f"no urls for backend {t.backend} (urls are for backend vllm_server)")
        return
    _check(bool(t.urls), f"{key}.urls", t.urls,
           "one base URL per `vllm serve` replica, e.g. [http://127.0.0.1:8100], for backend vllm_server")
    for u in t.urls:
        _check(bool(re.fullmatch(r"https?://[^/\s]+(/\S*)?", u)), f"{key}.urls", u,
               "base URLs like http://127.0.0.1:8100 (scheme http or https, host, port)")
    _check(len(set(t.urls)) == len(t.urls), f"{key}.urls", t.urls, "distinct URLs (one per server)")
    _check(t.replicas in (1, len(t.urls)), f"{key}.replicas", t.replicas,
           f"{len(t.urls)} (one replica per URL) or leave it out: a vllm_server teacher has one replica per URL")
    t.replicas = len(t.urls)
    if t.api_key_env is not None:
        _check(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t.api_key_env)), f"{key}.api_key_env", "<hidden>",
               "the NAME of an environment variable that holds the key (e.g. MATH_TEACHER_API_KEY), never the key")
    _check(t.timeout_s > 0, f"{key}.timeout_s", t.timeout_s, "a number of seconds > 0")
    _check(t.max_retries >= 0, f"{key}.max_retries", t.max_retries, "an integer >= 0")
    _check(t.max_concurrency >= 1, f"{key}.max_concurrency", t.max_concurrency, "an integer >= 1")
    _check(t.request_batch_size >= 1, f"{key}.request_batch_size", t.request_batch_size, "an integer >= 1")


def _friendly(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = getattr(err, "msg", str(err)).split("\n")[0]
    hint = ""
    if "not in struct" in msg or ("Key '" in msg and "not in" in msg):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _keys_at(parent)
        hint = f"; allowed keys{' under ' + repr(parent) if parent else ''}: {', '.join(allowed)}"
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    return ConfigError(f"{source}: config key '{key}': {msg}{hint}")


def _keys_at(path: str) -> list[str]:
    """Field names of the schema node at a dotted path (teacher entries under `teachers.<name>`)."""
    node: Any = MopdConfig
    for part in [p for p in path.split(".") if p]:
        if node is dict:
            node = TeacherConfig
            continue
        hint = typing.get_type_hints(node).get(part)
        node = typing.get_origin(hint) or hint
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MopdConfig:
    """Merge schema <- YAML <- `key=value` overrides, validate, and return a typed, resolved config."""
    base = OmegaConf.structured(MopdConfig)
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p} (pass a YAML file, e.g. configs/quickstart.yaml)")
            base = OmegaConf.merge(base, OmegaConf.load(p))
    except OmegaConfBaseException as e:
        raise _friendly(e, str(path)) from None
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value (e.g. trainer.steps=10)")
        try:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([ov]))
        except OmegaConfBaseException as e:
            raise _friendly(e, f"override {ov!r}") from None
    try:
        OmegaConf.resolve(base)
        missing = sorted(OmegaConf.missing_keys(base))
        if missing:
            raise ConfigError(f"config keys without a value: {', '.join(missing)} (set them in the YAML or as key=value)")
        cfg: MopdConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _friendly(e, str(path or "config")) from None
    _validate(cfg)
    return cfg


def to_yaml(cfg: MopdConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: MopdConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
