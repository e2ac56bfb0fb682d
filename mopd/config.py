"""Experiment config: one structured schema, YAML files, and `key=value` overrides.

The schema is the single source of truth for keys, types, defaults and ranges:

- string choices are `StrEnum` fields, so OmegaConf itself refuses a value outside the set and names
  the key; users write the same plain strings in YAML (`objective: reverse_kl`), `OmegaConf.to_object`
  returns enum members (which compare equal to those strings), and `to_yaml` writes the strings back;
- each section dataclass checks its own values in `__post_init__` (the verl pattern,
  `verl/workers/config/*.py`), raising `ConfigError` with the full key, the value and the allowed range;
- checks that span sections (teacher bundles fall back to rollout's, the default teacher must exist, ...)
  run once more in `validate` after the whole config is built.

A YAML file may start from another (`base: quickstart.yaml`, relative to the file) and say only what it
changes. Layers above the core add top-level sections of their own (`register_section`): the core knows
data files and model paths, not what builds them, and its schema names no such section.

`load_config` turns every OmegaConf error, YAML syntax error and out-of-range value into a one-line
`ConfigError` that names the key, the value given and what is allowed, so a typo in a 40-line YAML is a
one-line fix rather than a stack trace.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mopd.objectives import OBJECTIVES
from teachers.backends import TEACHER_BACKENDS


class ConfigError(ValueError):
    """A config problem the user can fix; the message says which key and how."""


# ---------------------------------------------------------------------------------------------- choices
class _Choice(StrEnum):
    """A string choice: equal to (and hashing like) its plain string value, and printed as it."""

    def __repr__(self) -> str:  # f"{x!r}" in messages reads 'wandb', as it did for plain strings
        return repr(self.value)


class Dtype(_Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TokenizerAlignment(_Choice):
    none = "none"  # identical tokenizers required (the only mode today)


class LossAggMode(_Choice):
    """`algorithm.loss_agg_mode`; the same strings as `mopd.losses.AGG_MODES` (first two: verl's)."""

    seq_mean_token_mean = "seq-mean-token-mean"
    token_mean = "token-mean"
    domain_balanced = "domain-balanced"


class AdvantageNorm(_Choice):
    """`algorithm.advantage_norm`; the same strings as `rewards.advantages.ADVANTAGE_NORMS`."""

    none = "none"
    center = "center"
    whiten = "whiten"


class Correction(_Choice):
    none = "none"
    icepop = "icepop"
    tis = "tis"
    seq_mask = "seq_mask"


class WeightSync(_Choice):
    """`rollout.weight_sync`: how the trainer's weights reach the student engines."""

    collective = "collective"  # a torch.distributed broadcast from trainer rank 0 (gloo on CPU, NCCL on GPU)
    object_store = "object_store"  # rank 0 puts the state dict in Ray's object store; every engine pulls it


class TrainerBackend(_Choice):
    accelerate = "accelerate"
    deepspeed = "deepspeed"


class LrSchedule(_Choice):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class ScheduleHorizon(_Choice):
    steps = "steps"
    wallclock = "wallclock"


class Precision(_Choice):
    fp32 = "fp32"
    bf16 = "bf16"


class Sink(_Choice):
    jsonl = "jsonl"
    tensorboard = "tensorboard"
    wandb = "wandb"
    mlflow = "mlflow"


class WandbMode(_Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class PoolPolicy(_Choice):
    """`teacher_pools.<pool>.policy`: which engine a non-resident teacher swaps into."""

    lru = "lru"  # the least recently used engine


class PlacementStrategy(_Choice):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


# ---------------------------------------------------------------------------------------------- checks
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # experiment: the run dir must stay inside runs/
_TEACHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # addressable as teachers.<name>.key=value
_DOMAIN = re.compile(r"[^\s/]+")  # domains appear in metric names (mopd/teacher_kl/<domain>)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
_URL = re.compile(r"https?://[^/\s]+(/\S*)?")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': got {value!r}; allowed: {allowed}")


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class Checker:
    """Range checks for one section: `Checker("trainer", self).num("lr", gt=0)`; sections that upper layers
    register (`register_section`) use it too, so their errors read like the core's."""

    def __init__(self, prefix: str, obj: Any) -> None:
        self.prefix, self.obj = prefix, obj

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def num(self, name: str, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None, integer: bool = False, null: str | None = None, note: str = "") -> None:
        """A finite number in the given range; `null`: what null means, if null is allowed."""
        v = getattr(self.obj, name)
        kind = "an integer" if integer else "a number"
        lo = f"({_fmt(gt)}" if gt is not None else f"[{_fmt(ge)}" if ge is not None else None
        hi = f"{_fmt(lt)})" if lt is not None else f"{_fmt(le)}]" if le is not None else None
        if lo and hi:
            allowed = f"{kind} in {lo}, {hi}"
        elif lo:
            allowed = f"{kind} {'>' if gt is not None else '>='} {lo[1:]}"
        elif hi:
            allowed = f"{kind} {'<' if lt is not None else '<='} {hi[:-1]}"
        else:
            allowed = kind
        if null:
            allowed += f", or null ({null})"
        if note:
            allowed += f" ({note})"
        if v is None:
            _check(null is not None, self.key(name), v, allowed)
            return
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (not integer or isinstance(v, int))
        ok = ok and (gt is None or v > gt) and (ge is None or v >= ge)
        ok = ok and (lt is None or v < lt) and (le is None or v <= le)
        _check(ok, self.key(name), v, allowed)

    def count(self, name: str, ge: int, note: str = "") -> None:
        self.num(name, ge=ge, integer=True, note=note)

    def choice(self, name: str, enum: type[_Choice], nullable: str | None = None) -> None:
        """Coerce a plain string (direct construction) to the enum member; refuse anything else."""
        setattr(self.obj, name, _coerce(self.key(name), getattr(self.obj, name), enum, nullable))

    def text(self, name: str, what: str = "a non-empty string", null: str | None = None) -> None:
        v = getattr(self.obj, name)
        if v is None and null is not None:
            return
        _check(isinstance(v, str) and bool(v.strip()), self.key(name), v,
               what + (f", or null ({null})" if null is not None else ""))

    def names(self, name: str, pattern: re.Pattern[str], what: str, nonempty: bool = True) -> None:
        v = list(getattr(self.obj, name))
        if nonempty:
            _check(bool(v), self.key(name), v, f"a non-empty list of {what}")
        for x in v:
            _check(isinstance(x, str) and bool(pattern.fullmatch(x)), self.key(name), x, what)
        dup = sorted({x for x in v if v.count(x) > 1})
        _check(not dup, self.key(name), v, f"each entry once (repeated: {', '.join(map(str, dup))})")

    def weights(self, name: str, what: str = "a weight >= 0") -> None:
        for k, w in getattr(self.obj, name).items():
            ok = isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            _check(ok, f"{self.key(name)}.{k}", w, what)

    def counts(self, name: str, ge: int) -> None:
        """Every value of the mapping `name` an integer >= `ge`."""
        for k, n in getattr(self.obj, name).items():
            _check(isinstance(n, int) and not isinstance(n, bool) and n >= ge, f"{self.key(name)}.{k}", n,
                   f"an integer >= {ge}")


def _coerce(key: str, value: Any, enum: type[_Choice], nullable: str | None = None) -> Any:
    if value is None and nullable is not None:
        return None
    try:
        return enum(value)
    except ValueError:
        allowed = " | ".join(enum) + (f", or null ({nullable})" if nullable is not None else "")
        raise ConfigError(f"config key '{key}': got {value!r}; allowed: {allowed}") from None


# ---------------------------------------------------------------------------------------------- schema
@dataclass
class StudentConfig:
    path: str = MISSING  # Hugging Face model folder or hub id; required
    dtype: Dtype = Dtype.float32  # trainer and engine dtype: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        c = Checker("student", self)
        c.text("path", "a Hugging Face model folder or hub id")
        c.choice("dtype", Dtype)


@dataclass
class TeacherConfig:
    """One entry of `teachers.<name>`; its checks run from `MopdConfig`, which knows the name."""

    path: str = MISSING  # Hugging Face model folder (vllm backend)
    domains: list[str] = field(default_factory=list)  # non-empty; each domain served by one teacher
    # A registered teacher backend (teachers.backends): vllm | hf | vllm_server, or one registered in code.
    backend: str = "vllm"
    replicas: int = 1  # >= 1; vllm_server: one per URL
    dtype: Dtype = Dtype.float32
    # Each replica's placement-group bundle; null: rollout.num_cpus_per_engine / num_gpus_per_engine.
    num_cpus: float | None = None  # >= 0
    num_gpus: float | None = None  # >= 0
    # backend vllm_server: a `vllm serve` you run; `path` stays the tokenizer source for the tokenizer check.
    urls: list[str] = field(default_factory=list)  # one base URL per replica, e.g. http://127.0.0.1:8100
    served_model: str | None = None  # null: the one model the server lists at /v1/models
    timeout_s: float = 120.0  # > 0; per HTTP request
    connect_timeout_s: float = 5.0  # > 0; to open a connection to a server (a dead URL fails this fast)
    api_key_env: str | None = None  # NAME of the env var holding the server's API key (never the key)
    max_retries: int = 3  # >= 0; per request, on connection errors and 5xx, with exponential backoff
    max_concurrency: int = 4  # >= 1; requests in flight per replica
    request_batch_size: int = 16  # >= 1; sequences per /v1/completions request
    # backend hf: teachers naming the same group share one actor per replica (one process, models side by side);
    # null: an actor of its own. A group's bundle is the largest of its teachers' num_cpus/num_gpus.
    actor_group: str | None = None
    # A small teacher of a backend whose teachers can share an actor (hf) held in the trainer's actor (rank 0),
    # beside the student: no process, bundle or object-store hop of its own. One replica.
    colocate: bool = False
    # Alignment mode for tokenizers that differ from the student's; only "none" (identical
    # tokenizers required) exists today.
    tokenizer_alignment: TokenizerAlignment = TokenizerAlignment.none
    # A `teacher_pools.<pool>` whose engines serve this teacher by loading its weights in place (teachers of one
    # architecture; teachers/pool.py); null: engines of its own (replicas).
    pool: str | None = None
    # > 0 and dividing the bundle's GPUs: the vLLM engine's tensor_parallel_size; null: rollout.tensor_parallel_size.
    tensor_parallel_size: int | None = None

    def __post_init__(self) -> None:
        # Coerce plain strings (direct construction); the ranges need the name: see `check`.
        self.dtype = _coerce("teachers.<name>.dtype", self.dtype, Dtype)
        self.tokenizer_alignment = _coerce("teachers.<name>.tokenizer_alignment", self.tokenizer_alignment,
                                           TokenizerAlignment)

    def check(self, key: str) -> None:
        """Validate this teacher as `key` (`teachers.<name>`); a vllm_server teacher's replicas = its URLs."""
        c = Checker(key, self)
        _check(self.backend in TEACHER_BACKENDS, f"{key}.backend", self.backend,
               " | ".join(TEACHER_BACKENDS) + " (register others with teachers.backends.register_teacher_backend)")
        backend = TEACHER_BACKENDS[self.backend]
        c.text("path", "a Hugging Face model folder (for a remote backend such as vllm_server: the tokenizer "
                       "source)")
        c.names("domains", _DOMAIN, "domain names (no spaces or '/')")
        c.count("replicas", 1)
        c.num("num_cpus", ge=0, null="rollout.num_cpus_per_engine")
        c.num("num_gpus", ge=0, null="rollout.num_gpus_per_engine")
        c.text("served_model", null="the one model the server lists")
        c.num("timeout_s", gt=0, note="seconds per HTTP request")
        c.num("connect_timeout_s", gt=0, note="seconds to open a connection")
        c.count("max_retries", 0)
        c.count("max_concurrency", 1)
        c.count("request_batch_size", 1)
        if self.tensor_parallel_size is not None:
            c.count("tensor_parallel_size", 1, note="null: rollout.tensor_parallel_size")
        if self.pool is not None:
            poolable = " | ".join(n for n, b in TEACHER_BACKENDS.items() if b.poolable)
            _check(backend.poolable and isinstance(self.pool, str) and bool(_TEACHER_NAME.fullmatch(self.pool)),
                   f"{key}.pool", self.pool, f"null, or with backend {poolable} the name of a teacher_pools entry")
            _check(self.replicas == 1 and not self.colocate, f"{key}.pool", self.pool,
                   f"null with replicas {self.replicas} / colocate {self.colocate}: a pooled teacher runs on its "
                   "pool's engines (teacher_pools.<pool>.engines), drop replicas and colocate")
        if self.colocate:
            sharing = " | ".join(n for n, b in TEACHER_BACKENDS.items() if b.shares_actor)
            _check(backend.shares_actor and not backend.remote, f"{key}.colocate", True,
                   f"false for backend {self.backend}; a teacher in the trainer's actor needs backend {sharing}")
            _check(self.replicas == 1 and self.actor_group is None, f"{key}.colocate", True,
                   f"false with replicas {self.replicas} / actor_group {self.actor_group}: a colocated teacher is "
                   "one replica in the trainer's actor (drop replicas and actor_group)")
        if self.actor_group is not None:
            sharing = " | ".join(n for n, b in TEACHER_BACKENDS.items() if b.shares_actor)
            _check(backend.shares_actor and isinstance(self.actor_group, str)
                   and bool(_TEACHER_NAME.fullmatch(self.actor_group)), f"{key}.actor_group", self.actor_group,
                   f"null, or with backend {sharing} a group name of letters, digits, '_' and '-' (teachers naming "
                   "the same group share one actor)")
        if self.api_key_env is not None:
            _check(bool(_ENV_NAME.fullmatch(self.api_key_env)), f"{key}.api_key_env", "<hidden>",
                   "the NAME of an environment variable that holds the key (e.g. MATH_TEACHER_API_KEY), "
                   "never the key")
        if not backend.remote:
            remote = " | ".join(n for n, b in TEACHER_BACKENDS.items() if b.remote)
            _check(not self.urls, f"{key}.urls", self.urls,
                   f"no urls for backend {self.backend} (urls are for backend {remote})")
            return
        _check(bool(self.urls), f"{key}.urls", self.urls,
               f"one base URL per server replica, e.g. [http://127.0.0.1:8100], for backend {self.backend}")
        for u in self.urls:
            _check(isinstance(u, str) and bool(_URL.fullmatch(u)), f"{key}.urls", u,
                   "base URLs like http://127.0.0.1:8100 (scheme http or https, host, port)")
        _check(len(set(self.urls)) == len(self.urls), f"{key}.urls", self.urls,
               "distinct URLs (one per server)")
        _check(self.replicas in (1, len(self.urls)), f"{key}.replicas", self.replicas,
               f"{len(self.urls)} (one replica per URL) or leave it out: a {self.backend} teacher has one "
               "replica per URL")
        self.replicas = len(self.urls)


@dataclass
class TeacherPoolConfig:
    """One entry of `teacher_pools.<pool>`: `engines` vLLM engines serve every teacher naming the pool
    (`teachers.<name>.pool`, one architecture), a teacher that is not resident swapping in by an in-place weight
    load. Each engine's bundle is the largest of its teachers' (teachers.<name>.num_cpus/num_gpus)."""

    engines: int = 1  # >= 1 and at most the pool's teachers
    policy: PoolPolicy = PoolPolicy.lru

    def __post_init__(self) -> None:
        self.policy = _coerce("teacher_pools.<pool>.policy", self.policy, PoolPolicy)


@dataclass
class AutoMixConfig:
    """`data.auto_mix`: move sampling toward the domains with the most headroom left, measured by each
    domain's teacher KL on the student's own samples (`mopd/teacher_kl/<domain>`, an EMA over steps)."""

    enabled: bool = False
    ema: float = 0.9  # [0, 1): weight of the past in the per-domain KL average
    # [0, 1]: this share of every batch follows data.domain_mix (or the rows' proportions), the rest goes by
    # headroom; 1 is the static mix. A floor keeps a domain that has caught up from vanishing (it would drift).
    floor: float = 0.3

    def __post_init__(self) -> None:
        c = Checker("data.auto_mix", self)
        c.num("ema", ge=0, lt=1)
        c.num("floor", ge=0, le=1, note="1: the static data.domain_mix")


@dataclass
class DataConfig:
    train_files: list[str] = MISSING  # required, non-empty: JSONL or Parquet rows {"prompt", "domain", ...}
    eval_files: list[str] = MISSING  # required, non-empty
    # Sampling weight (>= 0) per domain; empty means proportional to the rows in the train files.
    domain_mix: dict[str, float] = field(default_factory=dict)
    max_prompt_tokens: int = 32  # >= 1
    # Teacher name used for rows whose domain no teacher serves; null makes that an error.
    default_teacher: str | None = None
    eval_size_per_domain: int = 200  # >= 1
    # add_special_tokens when encoding prompts (BOS etc.); null: the tokenizer's own default.
    add_special_tokens: bool | None = None
    # Rows repeating an earlier row's id: false refuses them naming both rows; true drops every later one (logged).
    dedupe: bool = False
    auto_mix: AutoMixConfig = field(default_factory=AutoMixConfig)

    def __post_init__(self) -> None:
        c = Checker("data", self)
        for name in ("train_files", "eval_files"):
            if getattr(self, name) == MISSING:  # direct construction; `load_config` refuses a missing value
                continue
            files = list(getattr(self, name))
            _check(bool(files) and all(isinstance(f, str) and f.strip() for f in files), c.key(name), files,
                   "a non-empty list of JSONL or Parquet file paths")
        c.weights("domain_mix", "a sampling weight >= 0")
        if self.domain_mix:
            _check(any(w > 0 for w in self.domain_mix.values()), "data.domain_mix", dict(self.domain_mix),
                   "at least one weight > 0 (or {} for proportional to the rows)")
        c.count("max_prompt_tokens", 1)
        c.text("default_teacher", "a configured teacher's name", null="rows of unserved domains are an error")
        c.count("eval_size_per_domain", 1)


@dataclass
class RolloutConfig:
    n: int = 4  # >= 1; samples per prompt (>= 2 when a group-normalised outcome advantage is used)
    temperature: float = 1.0  # > 0 (on-policy samples; greedy decoding is for evaluation)
    top_p: float = 1.0  # (0, 1]
    max_tokens: int = 16  # >= 1
    num_engines: int = 1  # >= 1
    # >= 1: each vLLM engine's tensor_parallel_size (student engines, and teachers without their own); its GPUs
    # come from the engine's bundle (num_gpus_per_engine must be a multiple on GPU nodes).
    tensor_parallel_size: int = 1
    # > 0; each vLLM engine's KV cache on CPU in GiB (allocated whole at start; on GPU
    # gpu_memory_utilization sizes it). 0.125 holds ~90k tokens of the quickstart's models.
    kv_cache_gb: float = 1.0
    # Engine dtype; null = student.dtype (bf16 engines + fp32 trainer = real mismatch).
    dtype: Dtype | None = None
    gpu_memory_utilization: float = 0.5  # (0, 1]: share of each GPU's memory a vLLM engine may take
    # false: vLLM compiles the engine's model (torch.compile; on CPU ~1.5x the decode tokens/s of the peer
    # benchmark's students, ~20 s more start-up); CPU routing capture (R3) needs eager.
    enforce_eager: bool = True
    num_cpus_per_engine: float = 1.0  # >= 0 (with num_gpus_per_engine, not both 0)
    num_gpus_per_engine: float = 0.0  # >= 0
    omp_threads: int = 1  # >= 1
    # Evaluation rounds: accuracy from greedy decoding (0), teacher KL from samples at temperature 1.
    eval_temperature: float = 0.0  # >= 0
    # collective: trainer rank 0 and the engines form a torch.distributed group of their own and the weights are
    # broadcast bucket by bucket into the engines' parameters; object_store: through Ray's object store (also
    # what collective falls back to, with a warning, when its group cannot be formed).
    weight_sync: WeightSync = WeightSync.collective
    # The student engine lives in the trainer's actor (one accelerate worker, one engine): a weight update is an
    # in-process copy, and the engine's process, bundle and sync traffic are gone; rollouts and training take
    # turns in that actor (verl's hybrid engine; on GPU the engine shares the trainer's GPU,
    # rollout.gpu_memory_utilization of it).
    colocate: bool = False
    # > 0; collective: MB per broadcast (a larger tensor goes alone). 16 measured best on CPU (gloo, loopback):
    # 1-16 MB within 5% of each other, 64 MB 20-25% slower (README, "Weight sync over a collective").
    weight_sync_bucket_mb: float = 16.0
    # Multi-turn rows (a row naming an `env`, see rollout/envs.py; rows without one are single-turn and these
    # keys do not touch them): at most `max_turns` student turns per trajectory, each at most `max_tokens`
    # long, and at most `max_total_tokens` response tokens in all (student + observation tokens; 0: the same
    # as max_tokens). An environment step gets `env_timeout_s` seconds and may answer at most
    # `env_max_observation_chars` characters (or token ids); past either the trajectory ends as
    # env_timeout / env_flood, the run goes on.
    max_turns: int = 4  # >= 1
    max_total_tokens: int = 0  # >= 0
    env_timeout_s: float = 10.0  # > 0
    env_max_observation_chars: int = 4096  # >= 1

    @property
    def response_budget(self) -> int:
        """The most response tokens one sample may hold (single-turn: max_tokens; multi-turn: the total)."""
        return max(self.max_tokens, self.max_total_tokens)

    def __post_init__(self) -> None:
        c = Checker("rollout", self)
        c.count("n", 1)
        c.num("temperature", gt=0, note="0 (greedy) is for evaluation: rollout.eval_temperature")
        c.num("top_p", gt=0, le=1)
        c.count("max_tokens", 1)
        c.count("num_engines", 1)
        c.count("tensor_parallel_size", 1)
        c.num("kv_cache_gb", gt=0, note="GiB of KV cache per engine on CPU")
        c.choice("dtype", Dtype, nullable="student.dtype")
        c.num("gpu_memory_utilization", gt=0, le=1, note="a share of each GPU's memory, e.g. 0.5")
        c.num("num_cpus_per_engine", ge=0)
        c.num("num_gpus_per_engine", ge=0)
        c.count("omp_threads", 1)
        c.num("eval_temperature", ge=0, note="0: greedy")
        c.choice("weight_sync", WeightSync)
        c.num("weight_sync_bucket_mb", gt=0, note="MB per broadcast of rollout.weight_sync=collective")
        c.count("max_turns", 1)
        c.count("max_total_tokens", 0)
        c.num("env_timeout_s", gt=0, note="seconds one environment step may take")
        c.count("env_max_observation_chars", 1)


@dataclass
class AlgorithmConfig:
    # pg: sampled-token MOPD advantage (MiMo Eq. 7); reverse_kl: top-k reverse KL to the teacher;
    # mixed: pg + kl_coef * reverse_kl; orm: outcome-only RL (GRPO advantages, no teacher);
    # sft: off-policy SFT on teacher samples (baseline); or any name registered with
    # `mopd.objectives.register_objective` by code imported before the config is loaded.
    objective: str = "pg"
    alpha_orm: float = 0.0  # >= 0; weight of the group-normalised outcome advantage
    kl_coef: float = 1.0  # >= 0; weight of the reverse-KL term in `mixed`
    teacher_top_k: int = 0  # 0: sampled token only; -1: the whole vocabulary; k >= 1: top-k
    correction: Correction = Correction.icepop  # none | icepop | tis | seq_mask
    icepop_low: float = 0.5  # 0 < icepop_low < 1 < icepop_high
    icepop_high: float = 5.0
    tis_cap: float = 2.0  # > 0
    ppo_epochs: int = 1  # >= 1
    ppo_clip: float = 0.2  # > 0
    r3: bool = False  # replay the engine's routed experts in every trainer forward
    r3_capture: bool = False  # have the engine return routed experts even with r3 off (r3/* metrics)
    # Clamp of the per-token k1 MOPD advantage (the teacher log-ratio) to [-c, c], like verl's +-10
    # clamp of log-ratios; null: no clamp. > 0.
    advantage_clip: float | None = 10.0
    # none | center | whiten: the batch's teacher log-ratio advantage minus its mean over valid tokens (and
    # divided by its std), before the outcome term is added (`rewards.advantages.normalize_advantage`).
    advantage_norm: AdvantageNorm = AdvantageNorm.none
    # How per-token losses become the step's loss (`mopd.losses.agg_loss`): seq-mean-token-mean (each
    # sample weighs the same), token-mean (each token; verl's), domain-balanced (each domain present).
    loss_agg_mode: LossAggMode = LossAggMode.seq_mean_token_mean
    # The KL objectives' temperature: 1 compares the student's and the teacher's own distributions (MOPD's
    # objective, whatever rollout.temperature samples with); T compares both tempered, softmax(logits / T), as
    # TRL's distillation loss does at sampling temperature T. > 0; not 1 needs teacher_top_k -1.
    kl_temperature: float = 1.0

    def __post_init__(self) -> None:
        c = Checker("algorithm", self)
        _check(self.objective in OBJECTIVES, "algorithm.objective", self.objective,
               " | ".join(OBJECTIVES) + " (register others with mopd.objectives.register_objective)")
        c.num("alpha_orm", ge=0, note="0: pure on-policy distillation")
        c.num("kl_coef", ge=0)
        c.num("teacher_top_k", ge=-1, integer=True,
              note="-1: whole vocabulary, 0: sampled token only, k >= 1")
        c.choice("correction", Correction)
        c.num("icepop_low", gt=0, lt=1)
        c.num("icepop_high", gt=1)
        c.num("tis_cap", gt=0)
        c.count("ppo_epochs", 1)
        c.num("ppo_clip", gt=0)
        c.num("advantage_clip", gt=0, null="no clamp")
        c.choice("advantage_norm", AdvantageNorm)
        c.choice("loss_agg_mode", LossAggMode)
        c.num("kl_temperature", gt=0, note="1: the models' own distributions")
        if self.kl_temperature != 1:
            _check(OBJECTIVES[self.objective].needs_teacher_topk and self.teacher_top_k == -1,
                   "algorithm.kl_temperature", self.kl_temperature,
                   f"1 with algorithm.objective={self.objective} / teacher_top_k={self.teacher_top_k}: a tempered "
                   "KL needs a KL objective (reverse_kl, mixed) over the whole vocabulary (teacher_top_k -1)")
        _check(not OBJECTIVES[self.objective].needs_teacher_topk or self.teacher_top_k != 0,
               "algorithm.teacher_top_k", self.teacher_top_k,
               f"-1 or k >= 1 when algorithm.objective={self.objective} (the KL needs the teacher's top-k)")


@dataclass
class TrainerConfig:
    backend: TrainerBackend = TrainerBackend.accelerate  # accelerate | deepspeed
    zero_stage: int = 2  # 1 | 2 | 3 (deepspeed)
    steps: int = 20  # >= 1
    prompts_per_step: int = 16  # >= 1
    micro_batch_size: int = 64  # >= 1: rows per micro-batch (per worker) when max_tokens_per_micro_batch is 0
    # > 0: micro-batches are formed by tokens (prompt + response of every row) instead of rows, balanced across
    # the workers (verl's dynamic batch size); a row longer than the budget gets a micro-batch of its own.
    max_tokens_per_micro_batch: int = 0
    # > 0: per-token log-probs, entropy and KL are computed over chunks of this many response positions,
    # each chunk's [chunk, vocabulary] logits recomputed in the backward, so [tokens, vocabulary] never exists.
    logits_chunk_tokens: int = 0
    # Data-parallel trainer workers: N Ray actors forming one torch.distributed group (gloo on CPU, NCCL on
    # GPU), each with a trainer.num_cpus/num_gpus bundle; the batch is split across them by tokens.
    num_workers: int = 1
    # Bounded-staleness pipeline: rollouts and teacher scoring of the next batches run while the trainer steps,
    # each sample drawn by a policy at most this many optimizer steps older than the one that trains on it
    # (0: the synchronous loop; 1: one-step-off, as verl's async recipes). IcePop/TIS correct the staleness.
    max_staleness: int = 0
    # Parameters not trained (fnmatch patterns over the student's parameter names, e.g. "*.mlp.gate.weight":
    # the MoE routers, a common stability choice in MoE RL). They never change, so weight syncs send only the
    # trained tensors and the engines re-prepare only the expert layers they received.
    freeze: list[str] = field(default_factory=list)
    lr: float = 1e-3  # > 0
    weight_decay: float = 0.0  # >= 0
    # constant | cosine | linear, after a linear warm-up over warmup_steps: cosine and linear decay from
    # lr to lr * lr_min_ratio over trainer.steps (`mopd.schedules.make_lr_scheduler`).
    lr_schedule: LrSchedule = LrSchedule.constant
    warmup_steps: int = 0  # >= 0
    lr_min_ratio: float = 0.0  # [0, 1]: the cosine/linear decay floor as a fraction of lr
    # steps: the schedule runs over trainer.steps; wallclock: over trainer.max_wallclock_s of step time
    # (warm-up and decay as fractions warmup_steps/steps of it), so a run stopped by its time budget
    # still completes its schedule: what equal-time comparisons need. The run then ends by time alone.
    schedule_horizon: ScheduleHorizon = ScheduleHorizon.steps
    grad_clip: float = 1.0  # > 0: max global gradient norm
    precision: Precision = Precision.fp32  # fp32 | bf16
    save_every: int = 0  # >= 0; 0: only at the end
    # >= 0; 0 keeps every checkpoint; K >= 1 keeps the last K plus any marked best.
    keep_checkpoints: int = 0
    eval_every: int = 0  # >= 0; 0: only before and after training
    seed: int = 0  # >= 0
    max_wallclock_s: float = 0.0  # >= 0; 0: no limit
    # The trainer actor's placement-group bundle, and its torch threads (0: max(1, round(num_cpus))).
    num_cpus: float = 1.0  # >= 0
    num_gpus: float = 0.0  # >= 0
    num_threads: int = 0  # >= 0

    def __post_init__(self) -> None:
        c = Checker("trainer", self)
        c.choice("backend", TrainerBackend)
        _check(self.zero_stage in (1, 2, 3) and not isinstance(self.zero_stage, bool), "trainer.zero_stage",
               self.zero_stage, "1 | 2 | 3")
        c.count("steps", 1)
        c.count("prompts_per_step", 1)
        c.count("micro_batch_size", 1)
        c.count("max_tokens_per_micro_batch", 0, "0: micro-batches of trainer.micro_batch_size rows")
        c.count("logits_chunk_tokens", 0, "0: the whole micro-batch at once")
        c.count("num_workers", 1, "data-parallel trainer workers")
        c.count("max_staleness", 0, "0: synchronous; 1: one-step-off")
        _check(all(isinstance(x, str) and x.strip() for x in self.freeze), "trainer.freeze", self.freeze,
               "a list of parameter-name patterns, e.g. ['*.mlp.gate.weight'] (the routers)")
        c.num("lr", gt=0)
        c.num("weight_decay", ge=0)
        c.choice("lr_schedule", LrSchedule)
        c.count("warmup_steps", 0)
        c.num("lr_min_ratio", ge=0, le=1, note="the decay floor as a fraction of trainer.lr")
        c.num("grad_clip", gt=0, note="the max global gradient norm, e.g. 1.0")
        c.choice("precision", Precision)
        c.count("save_every", 0, "0: only at the end")
        c.count("keep_checkpoints", 0, "0: keep all; K: the last K plus any marked best")
        c.count("eval_every", 0, "0: only before and after training")
        c.count("seed", 0)
        c.num("max_wallclock_s", ge=0, note="seconds; 0: no limit")
        c.num("num_cpus", ge=0)
        c.num("num_gpus", ge=0)
        c.count("num_threads", 0, "0: from trainer.num_cpus")
        c.choice("schedule_horizon", ScheduleHorizon)
        _check(self.schedule_horizon != ScheduleHorizon.wallclock or self.max_wallclock_s > 0,
               "trainer.schedule_horizon", str(self.schedule_horizon),
               "steps, or wallclock together with trainer.max_wallclock_s > 0 (the budget the schedule spans)")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/${experiment}"
    sinks: list[Sink] = field(default_factory=lambda: [Sink.jsonl])  # jsonl | tensorboard | wandb | mlflow
    progress_bar: bool = True
    # > 0: with stderr not a terminal (a log file), one plain progress line at most every this many seconds
    # instead of the bar's redraws.
    progress_every_s: float = 30.0
    dashboard_every: int = 10  # >= 0; re-render RUN_DIR/dashboard.html every N steps (0: only at the end)
    # Optional sinks (tensorboard | wandb | mlflow in `sinks`): W&B project and MLflow experiment name.
    project: str = "mopd"
    # offline (RUN_DIR/wandb, no login) | online (key from WANDB_API_KEY) | disabled
    wandb_mode: WandbMode = WandbMode.offline
    wandb_entity: str | None = None
    # null: SQLite store in RUN_DIR/mlflow; or e.g. http://127.0.0.1:5000
    mlflow_tracking_uri: str | None = None

    def __post_init__(self) -> None:
        c = Checker("logging", self)
        c.text("run_dir", "a directory path")
        self.sinks = [_coerce("logging.sinks", s, Sink) for s in self.sinks]
        dup = sorted({s.value for s in self.sinks if self.sinks.count(s) > 1})
        _check(not dup, "logging.sinks", [s.value for s in self.sinks], f"each sink once (repeated: {dup})")
        c.count("dashboard_every", 0, "0: only at the end")
        c.num("progress_every_s", gt=0, note="seconds between progress lines in a log file")
        c.text("project")
        c.choice("wandb_mode", WandbMode)
        c.text("wandb_entity", null="your default W&B entity")
        c.text("mlflow_tracking_uri", "a tracking URI", null="SQLite store in RUN_DIR/mlflow")


@dataclass
class RuntimeEnvConfig:
    """What `mopd submit` ships with a job: the code and configs in `working_dir` (minus `excludes`,
    gitignore-style patterns relative to it) and environment variables."""

    working_dir: str = "."
    excludes: list[str] = field(default_factory=lambda: [
        "/.venv", "/runs", "/.cache", "/.git", "/build", "/.whl", "/.pytest_cache", "/.ruff_cache",
        "__pycache__", "*.egg-info"])
    # Literal values; they end up in RUN_DIR/config.yaml.
    env_vars: dict[str, str] = field(default_factory=dict)
    # Names whose values are copied from the submitting shell (API keys): the config holds names only.
    env_vars_from_env: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        c = Checker("ray.runtime_env", self)
        c.text("working_dir", "a directory path")
        for p in self.excludes:
            _check(isinstance(p, str) and bool(p.strip()), "ray.runtime_env.excludes", p,
                   "gitignore-style patterns (non-empty strings)")
        for name in [*self.env_vars, *self.env_vars_from_env]:
            _check(bool(_ENV_NAME.fullmatch(name)), "ray.runtime_env.env_vars", name,
                   "environment variable names (letters, digits, underscore)")
        for name in self.env_vars:
            _check(not _SECRET_NAME.search(name), f"ray.runtime_env.env_vars.{name}", "<value hidden>",
                   f"no secrets here (values are written to RUN_DIR/config.yaml); list the name in "
                   f"ray.runtime_env.env_vars_from_env instead and export {name} in the submitting shell")


@dataclass
class RayConfig:
    # null: start a local cluster on loopback; or a running cluster's GCS address (127.0.0.1:6379, auto).
    # `mopd submit` reads a dashboard URL here (http://127.0.0.1:8265).
    address: str | None = None
    num_cpus: int = 2  # >= 1; the private local cluster's CPUs
    host: str = "127.0.0.1"
    log_to_driver: bool = False  # engine actors' own logs (vLLM start-up chatter); errors always propagate
    # How the placement group spreads engine and trainer bundles over nodes: PACK | SPREAD | STRICT_*.
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK
    # > 0; wait for a cluster's resources this long (a private cluster: no wait).
    placement_timeout_s: float = 120.0
    # >= 0; how often Ray restarts a dead engine actor, and how often a dead trainer is rebuilt from the
    # last checkpoint; the failed step is redone from the same inputs and seed each time.
    max_restarts: int = 3
    runtime_env: RuntimeEnvConfig = field(default_factory=RuntimeEnvConfig)

    def __post_init__(self) -> None:
        c = Checker("ray", self)
        c.text("address", "a cluster address (127.0.0.1:6379, auto) or dashboard URL",
               null="a private local cluster")
        c.count("num_cpus", 1)
        c.text("host", "an interface address, e.g. 127.0.0.1")
        c.choice("placement_strategy", PlacementStrategy)
        c.num("placement_timeout_s", gt=0, note="seconds")
        c.count("max_restarts", 0, "0: a dead actor ends the run")


@dataclass
class MopdConfig:
    # Names RUN_DIR (runs/<experiment>) and the job: letters, digits, '.', '_', '-'; no '/' or '..'.
    experiment: str = "quickstart"
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    # Pools of vLLM engines shared by teachers of one architecture (teachers.<name>.pool names one).
    teacher_pools: dict[str, TeacherPoolConfig] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # The typed extension sections this config has (`register_section`), by name; top-level keys in YAML.
    sections: dict[str, Any] = field(default_factory=dict, metadata={"omegaconf_ignore": True})

    def __post_init__(self) -> None:
        _check(isinstance(self.experiment, str) and bool(_NAME.fullmatch(self.experiment))
               and ".." not in self.experiment, "experiment", self.experiment,
               "a name of letters, digits, '.', '_' and '-' starting with a letter or digit, no '..' "
               "(it names the run directory runs/<experiment>)")
        seen: dict[str, str] = {}
        for name, t in self.teachers.items():
            _check(bool(_TEACHER_NAME.fullmatch(name)), f"teachers.{name}", name,
                   "teacher names of letters, digits, '_' and '-' (e.g. math_teacher)")
            t.check(f"teachers.{name}")
            for d in t.domains:
                _check(d not in seen, f"teachers.{name}.domains", d, f"each domain served by one teacher; "
                       f"'{d}' is already served by teacher '{seen.get(d)}'")
                seen[d] = name
        groups: dict[str, tuple[str, int]] = {}
        for name, t in self.teachers.items():  # a shared hf actor has one replica count for all its teachers
            if t.actor_group is not None:
                first, reps = groups.setdefault(t.actor_group, (name, t.replicas))
                _check(t.replicas == reps, f"teachers.{name}.replicas", t.replicas,
                       f"{reps}, as teachers.{first}.replicas: teachers in actor_group '{t.actor_group}' share "
                       "one actor per replica")
        self._check_pools()

    def _check_pools(self) -> None:
        """Every pool named exists, holds at least as many teachers as engines, and runs one dtype."""
        members: dict[str, list[str]] = {p: [] for p in self.teacher_pools}
        for name, t in self.teachers.items():
            if t.pool is None:
                continue
            _check(t.pool in self.teacher_pools, f"teachers.{name}.pool", t.pool,
                   f"one of teacher_pools: {sorted(self.teacher_pools) or '(none: add teacher_pools.' + t.pool + ')'}")
            members[t.pool].append(name)
        for pool, p in self.teacher_pools.items():
            key = f"teacher_pools.{pool}"
            _check(bool(_TEACHER_NAME.fullmatch(pool)), key, pool, "pool names of letters, digits, '_' and '-'")
            names = members[pool]
            _check(bool(names), key, pool, f"a pool some teacher names (teachers.<name>.pool: {pool}), or remove it")
            Checker(key, p).count("engines", 1)
            _check(p.engines <= len(names), f"{key}.engines", p.engines,
                   f"at most {len(names)}, the pool's teachers ({', '.join(names)}): more engines than teachers "
                   "leaves engines idle")
            dtypes = {str(self.teachers[n].dtype) for n in names}
            tps = {self.teachers[n].tensor_parallel_size for n in names}
            _check(len(dtypes) == 1 and len(tps) == 1, f"{key}", pool,
                   f"teachers of one dtype and tensor_parallel_size (one engine serves them all); got dtypes "
                   f"{sorted(dtypes)}, tensor_parallel_size {sorted(tps, key=str)} for {', '.join(names)}")


# ---------------------------------------------------------------------------------------------- extensions
@dataclass(frozen=True)
class Section:
    """A top-level config section that a layer above the core defines (`register_section`)."""

    schema: type  # a dataclass validating its values in __post_init__, as the core's sections do
    # Keys of the section that name local directories a job on a cluster must reach by their absolute path
    # (a cache outside the uploaded working dir): `mopd submit` pins them, as it pins logging.run_dir.
    dirs: tuple[str, ...] = ()


_SECTIONS: dict[str, Section] = {}


def register_section(name: str, schema: type, dirs: tuple[str, ...] = ()) -> None:
    """Let configs hold a top-level `name:` section validated by the dataclass `schema`.

    The core knows data files and model paths; what builds them (a synthetic task generator, a recipe) sits
    above it and registers its own section here when imported. `load_config` then validates the section like a core
    one (unknown keys, types, ranges), lets the core's values interpolate it (`${name.key}`), keeps the typed
    object in `cfg.sections[name]` and `to_yaml` writes it back. A config that names no such section has none.
    """
    core = {f.name for f in dataclasses.fields(MopdConfig)}
    if name in core or name == "base" or not _TEACHER_NAME.fullmatch(name):
        raise ValueError(f"config section name {name!r}: taken by the core schema or not a plain name")
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"config section {name!r}: the schema must be a dataclass, got {schema!r}")
    unknown = [k for k in dirs if k not in {f.name for f in dataclasses.fields(schema)}]
    if unknown:
        raise ValueError(f"config section {name!r}: dirs {unknown} are not keys of {schema.__name__}")
    old = _SECTIONS.get(name)
    if old is not None and (old.schema.__module__, old.schema.__qualname__) != (schema.__module__,
                                                                                 schema.__qualname__):
        raise ValueError(f"config section {name!r} is already registered by {old.schema.__module__}")
    _SECTIONS[name] = Section(schema, tuple(dirs))


def section_dirs(cfg: MopdConfig) -> dict[str, str]:
    """`section.key` -> value of every directory key the config's registered sections declare."""
    return {f"{name}.{key}": getattr(sec, key) for name, sec in cfg.sections.items()
            for key in _SECTIONS[name].dirs}


def _core_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(MopdConfig) if not f.metadata.get("omegaconf_ignore")]


# ---------------------------------------------------------------------------------------------- cross-section
def validate(cfg: MopdConfig) -> None:
    """Checks that span sections; each section's own ranges ran in its `__post_init__`."""
    a = cfg.algorithm
    objective = OBJECTIVES[a.objective]
    if objective.needs_teachers:
        alone = [n for n, o in OBJECTIVES.items() if not o.needs_teachers]
        _check(bool(cfg.teachers), "teachers", {},
               f"at least one teacher (teachers.<name>.path and .domains) for "
               f"algorithm.objective={a.objective}; only {' | '.join(alone) or 'no objective'} trains without teachers")
    if objective.estimator.uses_outcome(a):
        what = (f"algorithm.alpha_orm={a.alpha_orm}" if a.alpha_orm > 0 and objective.advantage == "mopd"
                else f"algorithm.objective={a.objective}")
        _check(cfg.rollout.n >= 2, "rollout.n", cfg.rollout.n,
               f"an integer >= 2 with {what}: the outcome advantage is normalised within each prompt's group "
               "of samples, so one sample per prompt gives it zero")
    if cfg.data.auto_mix.enabled:
        _check(objective.needs_teacher_scores, "data.auto_mix.enabled", True,
               f"false with algorithm.objective={a.objective}: auto-mix follows each domain's teacher KL, which "
               "that objective never measures")
    if cfg.data.default_teacher is not None:
        _check(cfg.data.default_teacher in cfg.teachers, "data.default_teacher", cfg.data.default_teacher,
               f"null or one of the configured teachers: {sorted(cfg.teachers)}")
    r, t = cfg.rollout, cfg.trainer
    _check(a.kl_temperature == 1 or not t.logits_chunk_tokens, "algorithm.kl_temperature", a.kl_temperature,
           f"1 with trainer.logits_chunk_tokens={t.logits_chunk_tokens} (the chunked KL is untempered), or set "
           "trainer.logits_chunk_tokens=0")
    # A CPU engine captures routing with Python hooks on the MoE layers, which a torch.compile'd model never calls
    # (vLLM's native capture, CUDA + Triton, works compiled).
    _check(r.enforce_eager or not (a.r3 or a.r3_capture) or r.num_gpus_per_engine > 0, "rollout.enforce_eager",
           r.enforce_eager, f"true with algorithm.r3={a.r3} / r3_capture={a.r3_capture} on CPU engines: routing "
           "capture there hooks the MoE layers, which a compiled (enforce_eager=false) engine skips")
    if r.colocate:
        # The in-process vLLM engine forms its own one-process torch.distributed group in the trainer's process, which a
        # data-parallel or DeepSpeed process group there would clash with: one accelerate worker for now.
        _check(t.num_workers == 1 and t.backend == "accelerate", "rollout.colocate", True,
               f"false with trainer.num_workers={t.num_workers} / trainer.backend={t.backend}: a colocated engine "
               "runs beside one accelerate trainer worker (num_workers 1, backend accelerate)")
        _check(r.num_engines == 1, "rollout.num_engines", r.num_engines,
               "1 with rollout.colocate: the one student engine lives in the trainer's actor")
    _validate_placement(cfg)


def _validate_placement(cfg: MopdConfig) -> None:
    """Bundle sizes: a bad value fails here, not after an upload."""
    r, t = cfg.rollout, cfg.trainer
    bundles = [("trainer.num_cpus", "trainer.num_gpus", t.num_cpus, t.num_gpus)]
    if not r.colocate:  # colocated, the engine has no bundle of its own
        bundles.append(("rollout.num_cpus_per_engine", "rollout.num_gpus_per_engine", r.num_cpus_per_engine,
                        r.num_gpus_per_engine))
    for name, tc in cfg.teachers.items():
        if TEACHER_BACKENDS[tc.backend].remote or tc.colocate:
            continue  # its replicas run elsewhere (or in the trainer's actor): nothing is reserved for them
        bundles.append((f"teachers.{name}.num_cpus", f"teachers.{name}.num_gpus",
                        r.num_cpus_per_engine if tc.num_cpus is None else tc.num_cpus,
                        r.num_gpus_per_engine if tc.num_gpus is None else tc.num_gpus))
    for cpu_key, gpu_key, cpus, gpus in bundles:
        _check(cpus + gpus > 0, f"{cpu_key}/{gpu_key}", (cpus, gpus),
               "at least one > 0 (a placement-group bundle cannot be empty)")
    # A tensor-parallel engine on GPUs splits its model over its bundle's GPUs: it needs that many.
    engines = [("rollout", r.tensor_parallel_size, r.num_gpus_per_engine)] if not r.colocate else []
    engines += [(f"teachers.{n}", tc.tensor_parallel_size or r.tensor_parallel_size,
                 r.num_gpus_per_engine if tc.num_gpus is None else tc.num_gpus)
                for n, tc in cfg.teachers.items() if not (TEACHER_BACKENDS[tc.backend].remote or tc.colocate)]
    for key, tp, gpus in engines:
        gpu_key = "rollout.num_gpus_per_engine" if key == "rollout" or gpus == r.num_gpus_per_engine else f"{key}.num_gpus"
        _check(tp == 1 or gpus == 0 or tp <= gpus, f"{key}.tensor_parallel_size", tp,
               f"at most {gpu_key}={gpus:g}: a tensor-parallel engine splits its model over its bundle's GPUs")


# ---------------------------------------------------------------------------------------------- loading
def _schema_type(key: str) -> Any:
    """The annotated type at a dotted key (`logging.sinks[1]`: the list's element type), or None."""
    t: Any = MopdConfig
    parts = [p for p in key.split(".") if p]
    for i, part in enumerate(parts):
        m = re.fullmatch(r"([^\[]*)((?:\[\d+\])*)", part)
        name, index = (m.group(1), m.group(2)) if m else (part, "")
        t = _strip_optional(t)
        if i == 0 and name in _SECTIONS:
            t = _SECTIONS[name].schema
        elif dataclasses.is_dataclass(t):
            hints = typing.get_type_hints(t)
            if name not in hints:
                return None
            t = hints[name]
        elif typing.get_origin(t) is dict:
            t = typing.get_args(t)[1]
        else:
            return None
        for _ in range(index.count("[")):
            args = typing.get_args(_strip_optional(t))
            t = args[0] if args else None
    return t


def _strip_optional(t: Any) -> Any:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _describe(t: Any) -> str:
    """Plain words for a schema type: what a value there may be."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        inner = _strip_optional(t)
        return f"{_describe(inner)}, or null" if inner is not t else "a value"
    if isinstance(t, type) and issubclass(t, Enum):
        return " | ".join(str(m.value) for m in t)
    if t is bool:
        return "true | false"
    if t is int:
        return "an integer"
    if t is float:
        return "a number"
    if t is str:
        return "a string"
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of names to {_describe(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(t):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(t))}"
    return "a value of the schema's type"


def _keys_at(path: str) -> list[str]:
    """Field names of the schema node at a dotted path (teacher entries under `teachers.<name>`)."""
    if not path:
        return [*_core_keys(), *_SECTIONS]
    node = _strip_optional(_schema_type(path))
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _friendly(err: OmegaConfBaseException, source: str, key_hint: str = "",
              value_hint: Any = None) -> ConfigError:
    """`key_hint`/`value_hint`: the override's own key and value, for errors that carry none (merges)."""
    key = getattr(err, "full_key", None) or key_hint
    msg = " ".join(str(getattr(err, "msg", None) or err).split("\n")[0].split())
    if isinstance(err, ConfigKeyError) or "not in struct" in msg:
        parent, _, leaf = key.rpartition(".")
        allowed = _keys_at(parent)
        close = difflib.get_close_matches(leaf, allowed, n=1, cutoff=0.6)
        hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ";"
        where = f" under '{parent}'" if parent else ""
        # A top-level section may belong to a layer above the core that registers it when imported.
        extension = "" if parent or close else (" (a section that code above the core adds is known once that "
                                                "code is imported: mopd.config.register_section)")
        return ConfigError(f"{source}: unknown config key '{key}'{hint} allowed keys{where}: "
                           f"{', '.join(allowed)}{extension}")
    t = _schema_type(key) if key and isinstance(err, ValidationError) else None
    if t is not None:
        got = getattr(err, "value", None) if getattr(err, "full_key", None) else value_hint
        if isinstance(got, DictConfig | ListConfig):
            got = OmegaConf.to_container(got)
        return ConfigError(f"{source}: config key '{key}': got {got!r} ({type(got).__name__}); "
                           f"allowed: {_describe(t)}")
    return ConfigError(f"{source}: config key '{key or '?'}': {msg}")


def _yaml_error(e: Exception, source: str, positions: bool = True) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None and positions else ""
    problem = getattr(e, "problem", None) or str(e).split("\n")[0]
    context = getattr(e, "context", None)
    what = f"{context}: {problem}" if context else problem
    return ConfigError(f"{source} not valid YAML{where}: {' '.join(str(what).split())} "
                       "(check brackets, quotes, indentation and repeated keys)")


def _load_file(p: Path) -> DictConfig:
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass a YAML file, e.g. configs/quickstart.yaml)")
    try:
        loaded = OmegaConf.load(p)
    except yaml.YAMLError as e:
        raise _yaml_error(e, f"config file {p}:") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p}: not UTF-8 text ({e.reason} at byte {e.start}); allowed: a YAML "
                          "file") from None
    except OmegaConfBaseException as e:
        raise _friendly(e, f"config file {p}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {p}: the top level is a {type(loaded).__name__}; allowed: a mapping "
                          f"of sections ({', '.join(_keys_at(''))}) and base:")
    return loaded


def _config_chain(p: Path, named_by: list[Path] | None = None) -> list[tuple[str, DictConfig]]:
    """`p` and the files it inherits from (`base:`), base first, each without its `base` key.

    A variant says only what it changes: `base: quickstart.yaml` (relative to the file that names it, or
    absolute) is loaded first, recursively, and the file merged on top of it (mappings merge key by key,
    lists and values replace; `name: null` removes an entry it inherited from a mapping such as `teachers`
    or `data.domain_mix`: `_drop_nulled`).
    """
    chain = [*(named_by or []), p]
    node = _load_file(p)
    if "base" not in node:
        return [(str(p), node)]
    if OmegaConf.is_interpolation(node, "base"):
        raise ConfigError(f"config file {p}: base: {node._get_node('base')._value()!r} is an interpolation; "
                          "allowed: a path to a YAML file (relative to this file, or absolute)")
    ref = node.base
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"config file {p}: base: got {ref!r}; allowed: a path to a YAML file (relative to "
                          "this file, or absolute)")
    with open_dict(node):
        del node["base"]
    target = Path(ref).expanduser()
    target = Path(os.path.normpath(target if target.is_absolute() else p.parent / target))
    seen = [q.resolve() for q in chain]
    if target.resolve() in seen:
        names = " -> ".join(str(q) for q in [*chain, target])
        raise ConfigError(f"config file {chain[0]}: base: chain {names} is a cycle (each file's base: names "
                          "the next); a base must not inherit from a file that names it: remove one of those "
                          "base: lines")
    if not target.is_file():
        raise ConfigError(f"config file {p}: base: {ref} not found (looked for {target}; a base path is relative "
                          "to the file that names it, or absolute)")
    return [*_config_chain(target, chain), (str(p), node)]


def _drop_nulled(tree: DictConfig, layer: DictConfig) -> None:
    """Remove from `tree` (and from `layer`, before it is merged) every entry of a plain mapping that `layer`
    sets to null and `tree` has: how a variant drops an inherited teacher (`teachers: {rev_teacher: null}`) or
    domain weight (`data: {domain_mix: {rev: null}}`). Keys of sections (dataclasses) are not removable; a
    null there is merged and validated as before."""
    for key in list(layer.keys()):
        if key not in tree or OmegaConf.is_interpolation(layer, key):
            continue
        if layer._get_node(key)._is_none():
            if OmegaConf.get_type(tree) is dict:
                del tree[key]
                del layer[key]
        elif isinstance(layer[key], DictConfig) and isinstance(tree[key], DictConfig):
            _drop_nulled(tree[key], layer[key])


def compose_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The merged tree, unresolved: schema (plus the registered sections the config names) <- base YAML(s)
    <- YAML <- `key=value` overrides, every merge error a one-line `ConfigError`. `load_config` builds on it."""
    layers = _config_chain(Path(path)) if path is not None else []
    overrides = list(overrides or [])
    for ov in overrides:
        if "=" not in ov or not ov.split("=", 1)[0].strip():
            raise ConfigError(f"override {ov!r} is not of the form key=value (e.g. trainer.steps=10)")
    named = {str(k) for _, layer in layers for k in layer} | {ov.split("=", 1)[0].strip().split(".")[0]
                                                              for ov in overrides}
    tree = OmegaConf.structured(MopdConfig)
    with open_dict(tree):  # in the same tree, so that `${section.key}` interpolations resolve
        for name in (n for n in _SECTIONS if n in named):
            tree[name] = OmegaConf.structured(_SECTIONS[name].schema)
    for source, layer in layers:
        try:
            _drop_nulled(tree, layer)
            tree = OmegaConf.merge(tree, layer)
        except OmegaConfBaseException as e:
            raise _friendly(e, source) from None
    for ov in overrides:
        key, value = ov.split("=", 1)[0].strip(), ov.split("=", 1)[1]
        try:
            tree = OmegaConf.merge(tree, OmegaConf.from_dotlist([ov]))
        except yaml.YAMLError as e:
            raise _yaml_error(e, f"override {ov!r}: the value is", positions=False) from None
        except OmegaConfBaseException as e:
            raise _friendly(e, f"override {ov!r}", key, value) from None
    return tree  # type: ignore[return-value]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MopdConfig:
    """Merge schema <- base YAML(s) <- YAML <- `key=value` overrides, validate, and return a typed, resolved
    config; registered sections the config names are in `cfg.sections`."""
    tree = compose_config(path, overrides)
    try:
        OmegaConf.resolve(tree)
        missing = sorted(OmegaConf.missing_keys(tree))
        if missing:
            raise ConfigError(f"config keys without a value: {', '.join(missing)} (set them in the YAML or "
                              "as key=value)")
        # The sections' __post_init__ checks run here and raise ConfigError (a ValueError) unwrapped.
        sections = {name: OmegaConf.to_object(tree[name]) for name in _SECTIONS if name in tree}
        with open_dict(tree):
            for name in sections:
                del tree[name]
        cfg: MopdConfig = OmegaConf.to_object(tree)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _friendly(e, str(path or "config")) from None
    cfg.sections = sections
    validate(cfg)
    return cfg


def _tree(cfg: MopdConfig) -> DictConfig:
    """The config with its registered sections at top level, as a YAML file holds them."""
    tree = OmegaConf.structured(cfg)
    with open_dict(tree):
        for name, section in cfg.sections.items():
            tree[name] = OmegaConf.structured(section)
    return tree


def to_yaml(cfg: MopdConfig) -> str:
    """The resolved config as YAML; choices are written as their plain strings."""
    return OmegaConf.to_yaml(_tree(cfg))


def to_dict(cfg: MopdConfig) -> dict[str, Any]:
    """Plain Python values (choices as str), e.g. for a metrics sink's run config."""
    out = OmegaConf.to_container(_tree(cfg), resolve=True, enum_to_str=True)
    return out  # type: ignore[return-value]
