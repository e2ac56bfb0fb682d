"""The teacher backend registry decides: a backend registered here, in this one test module, is accepted by the
config, placed (its own bundles, or one shared actor per `actor_group`), started by `start_teachers` through its
own start function and checked by the teachers' preflight, with no other file changed. The toy backend runs
real transformers teachers (`HfTeacher`) in the calling process: what a laptop run of tiny teachers could use."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mopd.config import ConfigError, load_config
from mopd.engine_group import start_teachers
from mopd.placement import Placement, plan_bundles, teacher_roles
from mopd.world.models import build_teacher, save_model
from mopd.world.tokenizer import build_tokenizer
from teachers.backends import TEACHER_BACKENDS, get_teacher_backend, register_teacher_backend
from teachers.hf_teacher import HfTeacher
from teachers.preflight import _reach_hint, format_report, run_preflight
from teachers.registry import TeacherRegistry

STARTED: list[tuple[list[str], int, int]] = []  # (teachers, replicas, strategies) per start call


def start_in_driver(launches, replicas, scheduling):
    """The toy backend's start function: one in-process `HfTeacher` per replica and teacher."""
    STARTED.append(([t.name for t in launches], replicas, len(scheduling or [])))
    return {t.name: [HfTeacher(t.spec.model_path, max_model_len=t.spec.max_model_len) for _ in range(replicas)]
            for t in launches}


@pytest.fixture(scope="module", autouse=True)
def toy_backends():
    register_teacher_backend("in_driver", start="test_teacher_backends:start_in_driver", shares_actor=True,
                             describe="transformers in the driver process",
                             start_hint="teacher {name} did not load in the driver: check teachers.{name}.path")
    register_teacher_backend("toy_remote", start="test_teacher_backends:start_in_driver", remote=True,
                             describe="a toy server", start_hint="start the toy server at {where}")
    yield
    del TEACHER_BACKENDS["in_driver"], TEACHER_BACKENDS["toy_remote"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("backend_teachers")
    tok = build_tokenizer()
    for name, seed in (("student", 0), ("a", 1), ("b", 2)):
        save_model(build_teacher(tok, seed=seed), tok, d / name)
    return d


def config(d, *over):
    return load_config(None, [f"student.path={d}/student", f"data.train_files=[{d}/none.jsonl]",
                              f"data.eval_files=[{d}/none.jsonl]",
                              "rollout.num_cpus_per_engine=0.25", "algorithm.teacher_top_k=8",
                              f"teachers.a.path={d}/a", "teachers.a.domains=[add]", "teachers.a.backend=in_driver",
                              f"teachers.b.path={d}/b", "teachers.b.domains=[rev]", "teachers.b.backend=in_driver",
                              *over])


def test_the_config_asks_the_registry(folders):
    cfg = config(folders, "teachers.a.actor_group=g", "teachers.b.actor_group=g")
    assert cfg.teachers["a"].backend == "in_driver"
    with pytest.raises(ConfigError, match=r"teachers\.a\.backend.*got 'nope'.*in_driver.*register_teacher_backend"):
        config(folders, "teachers.a.backend=nope")
    # Its flags decide what the teacher's keys may be: urls belong to the remote backends only ...
    with pytest.raises(ConfigError, match=r"teachers\.a\.urls.*no urls for backend in_driver.*toy_remote"):
        config(folders, "teachers.a.urls=[http://127.0.0.1:1]")
    # ... and a remote backend needs them, reserves nothing and has one replica per URL.
    with pytest.raises(ConfigError, match=r"teachers\.a\.urls.*one base URL per server replica.*toy_remote"):
        config(folders, "teachers.a.backend=toy_remote")
    remote = config(folders, "teachers.a.backend=toy_remote", "teachers.a.urls=[http://127.0.0.1:1,http://127.0.0.1:2]")
    assert remote.teachers["a"].replicas == 2 and "teacher:a" not in plan_bundles(remote, trainer=False).roles


def test_placement_and_start_follow_the_flags_and_the_preflight_passes(folders):
    """`shares_actor`: the group's teachers fill one role (one bundle per replica) and its start function gets
    them together; the handles it returns pass every preflight check."""
    STARTED.clear()
    cfg = config(folders, "teachers.a.actor_group=g", "teachers.b.actor_group=g", "teachers.a.replicas=2",
                 "teachers.b.replicas=2")
    assert teacher_roles(cfg) == {"in_driver_group:g": ["a", "b"]}
    plan = plan_bundles(cfg, trainer=False)
    assert len(plan.roles["in_driver_group:g"]) == 2
    tok = AutoTokenizer.from_pretrained(folders / "student")
    handles = start_teachers(cfg, TeacherRegistry.from_config(cfg, tok), Placement(None, plan, 0.0))
    assert STARTED == [(["a", "b"], 2, 2)]
    assert {n: len(h) for n, h in handles.items()} == {"a": 2, "b": 2}
    rows = [{"id": "1", "domain": "add", "prompt": "add:12+34="}, {"id": "2", "domain": "rev", "prompt": "rev:abc="}]
    checks = run_preflight(cfg, handles, tok, rows)
    assert all(c.ok for c in checks), format_report(checks)
    # Without a group, each teacher is a role (and a start call) of its own.
    STARTED.clear()
    alone = config(folders)
    start_teachers(alone, TeacherRegistry.from_config(alone, tok), Placement(None, plan_bundles(alone, False), 0.0))
    assert sorted(STARTED) == [(["a"], 1, 1), (["b"], 1, 1)]


def test_the_preflight_hint_is_the_backends(folders):
    cfg = config(folders)
    assert _reach_hint("a", cfg.teachers["a"], "replica 0", 8) == "teacher a did not load in the driver: check teachers.a.path"
    assert get_teacher_backend("vllm_server").remote and not get_teacher_backend("hf").remote
