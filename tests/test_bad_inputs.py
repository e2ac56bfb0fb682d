"""Bad config inputs through the real CLI: exit code 2 and one line `mopd: error: ...` that names the key and
says what is allowed; never a traceback. None of these needs Ray or a built world."""

from __future__ import annotations

from pathlib import Path

import pytest

from mopd.cli import main

QS = "configs/quickstart.yaml"

# (overrides on the quickstart config, fragments the one-line message must contain)
OVERRIDES: list[tuple[list[str], list[str]]] = [
    # unknown keys, with a suggestion
    (["trainer.stpes=3"], ["unknown config key 'trainer.stpes'", "did you mean 'trainer.steps'"]),
    (["trainr.steps=3"], ["unknown config key 'trainr'", "did you mean 'trainer'"]),
    (["teachers.add_teacher.domanis=[x]"], ["'teachers.add_teacher.domanis'", "did you mean "
                                            "'teachers.add_teacher.domains'"]),
    (["algorithm.objetive=pg"], ["'algorithm.objetive'", "did you mean 'algorithm.objective'"]),
    # malformed overrides and wrong types
    (["trainer.steps"], ["not of the form key=value", "trainer.steps=10"]),
    (["trainer.steps=[1,"], ["override 'trainer.steps=[1,'", "not valid YAML"]),
    (["trainer.steps=abc"], ["'trainer.steps'", "'abc'", "allowed: an integer"]),
    (["trainer.steps=1.5"], ["'trainer.steps'", "1.5", "allowed: an integer"]),
    (["trainer.lr=fast"], ["'trainer.lr'", "'fast'", "allowed: a number"]),
    (["logging.progress_bar=maybe"], ["'logging.progress_bar'", "'maybe'", "true | false"]),
    (["trainer=5"], ["'trainer'", "a mapping with keys", "grad_clip"]),
    # choices (enums)
    (["algorithm.objective=kl"], ["'algorithm.objective'", "'kl'", "pg | reverse_kl | mixed | orm | sft"]),
    (["algorithm.correction=clip"], ["'algorithm.correction'", "none | icepop | tis | seq_mask"]),
    (["logging.sinks=[jsonl,foo]"], ["'logging.sinks[1]'", "'foo'", "jsonl | tensorboard | wandb | mlflow"]),
    (["logging.sinks=[jsonl,jsonl]"], ["'logging.sinks'", "each sink once"]),
    (["rollout.dtype=fp8"], ["'rollout.dtype'", "'fp8'", "float32 | bfloat16 | float16, or null"]),
    (["ray.placement_strategy=pack"], ["'ray.placement_strategy'", "PACK | SPREAD"]),
    (["trainer.lr_schedule=exponential"], ["'trainer.lr_schedule'", "constant | cosine | linear"]),
    (["logging.wandb_mode=cloud"], ["'logging.wandb_mode'", "offline | online | disabled"]),
    # ranges: trainer
    (["trainer.grad_clip=-1"], ["'trainer.grad_clip'", "-1", "a number > 0"]),
    (["trainer.grad_clip=0"], ["'trainer.grad_clip'", "got 0", "a number > 0"]),
    (["trainer.max_wallclock_s=-5"], ["'trainer.max_wallclock_s'", "-5", ">= 0", "0: no limit"]),
    (["trainer.save_every=-1"], ["'trainer.save_every'", "-1", "an integer >= 0"]),
    (["trainer.warmup_steps=-10"], ["'trainer.warmup_steps'", "-10", "an integer >= 0"]),
    (["trainer.weight_decay=-0.1"], ["'trainer.weight_decay'", "-0.1", "a number >= 0"]),
    (["trainer.eval_every=-1"], ["'trainer.eval_every'", "an integer >= 0"]),
    (["trainer.lr=nan"], ["'trainer.lr'", "nan", "a number > 0"]),
    (["trainer.lr=0"], ["'trainer.lr'", "a number > 0"]),
    (["trainer.lr_min_ratio=1.5"], ["'trainer.lr_min_ratio'", "1.5", "in [0, 1]"]),
    (["trainer.keep_checkpoints=-1"], ["'trainer.keep_checkpoints'", "an integer >= 0", "0: keep all"]),
    (["trainer.schedule_horizon=wallclock", "trainer.max_wallclock_s=0"], ["'trainer.schedule_horizon'", "max_wallclock_s > 0"]),
    (["trainer.schedule_horizon=epochs"], ["trainer.schedule_horizon", "steps", "wallclock"]),
    (["trainer.zero_stage=4"], ["'trainer.zero_stage'", "got 4", "1 | 2 | 3"]),
    (["trainer.seed=-1"], ["'trainer.seed'", "an integer >= 0"]),
    (["trainer.steps=0"], ["'trainer.steps'", "an integer >= 1"]),
    (["trainer.num_cpus=0"], ["trainer.num_cpus/trainer.num_gpus", "cannot be empty"]),
    # ranges: algorithm
    (["algorithm.kl_coef=-1"], ["'algorithm.kl_coef'", "-1", "a number >= 0"]),
    (["algorithm.alpha_orm=-0.5"], ["'algorithm.alpha_orm'", "-0.5", "a number >= 0"]),
    (["algorithm.ppo_clip=0"], ["'algorithm.ppo_clip'", "a number > 0"]),
    (["algorithm.teacher_top_k=-2"], ["'algorithm.teacher_top_k'", "-2", "-1: whole vocabulary"]),
    (["algorithm.teacher_top_k=0"], ["'algorithm.teacher_top_k'", "-1 or k >= 1", "objective=reverse_kl"]),
    (["algorithm.advantage_clip=0"], ["'algorithm.advantage_clip'", "a number > 0", "or null"]),
    (["algorithm.icepop_high=0.9"], ["'algorithm.icepop_high'", "a number > 1"]),
    (["algorithm.alpha_orm=1"], ["'rollout.n'", "got 1", ">= 2", "algorithm.alpha_orm"]),
    (["algorithm.objective=orm"], ["'rollout.n'", ">= 2", "objective=orm"]),
    # ranges: rollout
    (["rollout.gpu_memory_utilization=5"], ["'rollout.gpu_memory_utilization'", "5", "in (0, 1]"]),
    (["rollout.gpu_memory_utilization=0"], ["'rollout.gpu_memory_utilization'", "in (0, 1]"]),
    (["rollout.eval_temperature=-1"], ["'rollout.eval_temperature'", "-1", "a number >= 0"]),
    (["rollout.temperature=0"], ["'rollout.temperature'", "a number > 0", "rollout.eval_temperature"]),
    (["rollout.top_p=0"], ["'rollout.top_p'", "in (0, 1]"]),
    (["rollout.n=0"], ["'rollout.n'", "an integer >= 1"]),
    # ranges: experiment, data, logging, world, ray
    (["experiment=../escape"], ["'experiment'", "'../escape'", "runs/<experiment>"]),
    (["experiment=a/b"], ["'experiment'", "'a/b'", "letters, digits"]),
    (["data.eval_size_per_domain=0"], ["'data.eval_size_per_domain'", "an integer >= 1"]),
    (["data.max_prompt_tokens=0"], ["'data.max_prompt_tokens'", "an integer >= 1"]),
    (["data.domain_mix.add=-1"], ["'data.domain_mix.add'", "a sampling weight >= 0"]),
    (["data.dedupe=maybe"], ["'data.dedupe'", "'maybe'", "true | false"]),
    # auto-mix follows the teacher KL: an objective that never measures it is refused before anything starts
    (["data.auto_mix.enabled=true", "algorithm.objective=sft"],
     ["'data.auto_mix.enabled'", "false with algorithm.objective=sft", "never measures"]),
    (["data.train_files=[]"], ["'data.train_files'", "a non-empty list"]),
    (["logging.dashboard_every=-2"], ["'logging.dashboard_every'", "an integer >= 0"]),
    (["world.batch_size=0"], ["'world.batch_size'", "an integer >= 1"]),
    (["world.teacher_lr=0"], ["'world.teacher_lr'", "a number > 0"]),
    (["world.student_lr=-0.001"], ["'world.student_lr'", "a number > 0"]),
    (["world.num_threads=0"], ["'world.num_threads'", "an integer >= 1"]),
    (["world.train_rows_per_domain=0"], ["'world.train_rows_per_domain'", "an integer >= 1"]),
    (["ray.num_cpus=0"], ["'ray.num_cpus'", "an integer >= 1"]),
    (["ray.placement_timeout_s=-1"], ["'ray.placement_timeout_s'", "a number > 0"]),
    # teachers
    (["teachers.add_teacher.domains=[]"], ["'teachers.add_teacher.domains'",
                                           "a non-empty list of domain names"]),
    (["teachers.rev_teacher.domains=[add]"], ["'teachers.rev_teacher.domains'", "'add'",
                                              "already served by teacher 'add_teacher'"]),
    (["data.default_teacher=nobody"], ["'data.default_teacher'", "'nobody'", "add_teacher", "rev_teacher"]),
    (["teachers.add_teacher.replicas=0"], ["'teachers.add_teacher.replicas'", "an integer >= 1"]),
    (["teachers.add_teacher.connect_timeout_s=0"], ["'teachers.add_teacher.connect_timeout_s'",
                                                    "a number > 0"]),
    (["teachers.add_teacher.timeout_s=-1"], ["'teachers.add_teacher.timeout_s'", "a number > 0"]),
    (["teachers.add_teacher.max_retries=-1"], ["'teachers.add_teacher.max_retries'", "an integer >= 0"]),
    (["teachers.add_teacher.backend=http"], ["'teachers.add_teacher.backend'", "vllm | vllm_server"]),
    (["teachers.add_teacher.urls=[http://127.0.0.1:1]"], ["'teachers.add_teacher.urls'",
                                                          "urls are for backend vllm_server"]),
    (["ray.runtime_env.env_vars.HF_TOKEN=abc"], ["'ray.runtime_env.env_vars.HF_TOKEN'", "env_vars_from_env"]),
]

# The keys without a default (the files below each get one thing wrong).
REQUIRED = "student: {path: /s}\ndata: {train_files: [/t.jsonl], eval_files: [/e.jsonl]}\n"

# (file name, file text, fragments): config files that are not valid configs
FILES: list[tuple[str, str, list[str]]] = [
    ("unclosed.yaml", "trainer:\n  steps: [1, 2\n  lr: 0.1\n", ["unclosed.yaml", "not valid YAML", "line"]),
    ("badindent.yaml", "trainer:\n  steps: 1\n lr: 0.1\n", ["badindent.yaml", "not valid YAML", "line 3"]),
    ("dupkey.yaml", "trainer:\n  steps: 1\n  steps: 2\n", ["dupkey.yaml", "duplicate key"]),
    ("list.yaml", "- trainer\n- steps\n", ["list.yaml", "top level", "a mapping of sections", "trainer"]),
    ("typo.yaml", "rollout:\n  temprature: 0.5\n", ["unknown config key 'rollout.temprature'",
                                                     "did you mean 'rollout.temperature'"]),
    ("nopath.yaml", "teachers:\n  t:\n    domains: [a]\n", ["teachers.t.path", "without a value"]),
    ("nodomains.yaml", REQUIRED + "teachers:\n  t:\n    path: /x\n",
     ["'teachers.t.domains'", "a non-empty list"]),
    ("badname.yaml", REQUIRED + "teachers:\n  my teacher:\n    path: /x\n    domains: [a]\n",
     ["'teachers.my teacher'", "teacher names of letters"]),
    ("noteachers.yaml", REQUIRED + "experiment: x\n", ["'teachers'", "at least one teacher", "objective=pg"]),
    ("nodata.yaml", "experiment: x\n", ["config keys without a value: data.eval_files, data.train_files, "
                                        "student.path"]),
]


def run_cli(capsys, config: str, overrides: list[str]) -> tuple[int, str]:
    code = main(["config", "show", config, *overrides])
    out, err = capsys.readouterr()
    if code != 0:
        assert out == "", out
    return code, err


def assert_one_line_error(code: int, err: str, fragments: list[str]) -> None:
    assert code == 2, err
    assert err.startswith("mopd: error: "), err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)


@pytest.mark.parametrize("overrides, fragments", OVERRIDES, ids=[" ".join(o) for o, _ in OVERRIDES])
def test_bad_override(capsys, overrides, fragments):
    assert_one_line_error(*run_cli(capsys, QS, overrides), fragments)


@pytest.mark.parametrize("name, text, fragments", FILES, ids=[n for n, _, _ in FILES])
def test_bad_config_file(capsys, tmp_path, name, text, fragments):
    p = tmp_path / name
    p.write_text(text)
    assert_one_line_error(*run_cli(capsys, str(p), []), fragments)


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(*run_cli(capsys, str(missing), []), ["config file not found", str(missing),
                                                                 "configs/quickstart.yaml"])


def test_not_utf8(capsys, tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("experiment: caf\xe9\n".encode("latin-1"))
    assert_one_line_error(*run_cli(capsys, str(p), []), ["latin1.yaml", "not UTF-8"])


def test_good_input_still_works(capsys):
    assert main(["config", "show", QS, "trainer.grad_clip=0.5", "algorithm.advantage_clip=null"]) == 0
    out = capsys.readouterr().out
    assert "grad_clip: 0.5" in out and "advantage_clip: null" in out and "objective: reverse_kl" in out


def test_overrides_may_follow_the_flags(capsys):
    """`mopd compare SPEC --only X k=v` reaches the spec (here: its clear error for an unknown run name);
    a stray flag or a bare word after the flags is still refused by argparse."""
    assert main(["compare", "configs/compare.yaml", "--only", "nope", "trainer.steps=3"]) == 2
    assert "unknown run names ['nope']" in capsys.readouterr().err
    for extra in (["--bogus"], ["bogus"]):
        with pytest.raises(SystemExit) as e:
            main(["compare", "configs/compare.yaml", "--only", "nope", *extra])
        assert e.value.code == 2 and f"unrecognized arguments: {extra[0]}" in capsys.readouterr().err


def test_at_least_thirty_cases():
    assert len(OVERRIDES) + len(FILES) + 2 >= 30
    assert Path(QS).is_file()
