"""`mopd teachers list|check` and the teacher preflight: the config checks of a server teacher, the
table of who serves which domain, fast failure on an unreachable server (also for `mopd train`), and
in-cluster replicas (checked like training starts them; scoring split over replicas equals one replica)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tiny_config import write_config as write_tiny_config
from transformers import AutoTokenizer

from mopd.cli import main
from mopd.config import ConfigError, load_config
from mopd.data import encode_rows, load_rows
from mopd.round import ScoredSample, score_with_teachers
from mopd.world.tasks import read_jsonl
from rollout.types import Sample
from teachers.cli_commands import _teacher_handles
from teachers.preflight import format_report, run_preflight
from teachers.registry import TeacherRegistry


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens once the socket is closed


def write_config(path: Path, world: dict, teachers: dict, **sections) -> str:
    return write_tiny_config(path, world, teachers, experiment="preflight_test", **sections)


def test_server_teacher_config_errors_name_key_and_fix(tmp_path):
    base = ["teachers.t.path=/x", "teachers.t.domains=[rev]", "teachers.t.backend=vllm_server"]
    with pytest.raises(ConfigError, match=r"teachers\.t\.urls.*one base URL per `vllm serve` replica"):
        load_config(None, base)
    with pytest.raises(ConfigError, match=r"teachers\.t\.urls.*'127\.0\.0\.1:8100'.*http://127\.0\.0\.1:8100"):
        load_config(None, [*base, "teachers.t.urls=[127.0.0.1:8100]"])
    with pytest.raises(ConfigError, match=r"teachers\.t\.replicas.*got 3.*2 \(one replica per URL\)"):
        load_config(None, [*base, "teachers.t.urls=[http://127.0.0.1:1,http://127.0.0.1:2]", "teachers.t.replicas=3"])
    # A pasted key instead of a variable name is refused without echoing it.
    with pytest.raises(ConfigError, match=r"api_key_env.*NAME of an environment variable") as e:
        load_config(None, [*base, "teachers.t.urls=[http://127.0.0.1:1]", "teachers.t.api_key_env=sk-live/4a5b"])
    assert "sk-live" not in str(e.value)
    with pytest.raises(ConfigError, match=r"teachers\.t\.urls.*backend vllm_server"):
        load_config(None, ["teachers.t.path=/x", "teachers.t.domains=[rev]", "teachers.t.urls=[http://127.0.0.1:1]"])
    cfg = load_config(None, [*base, "teachers.t.urls=[http://127.0.0.1:1,http://127.0.0.1:2]"])
    assert cfg.teachers["t"].replicas == 2


def test_list_shows_teachers_domains_and_flags_unserved(tiny_world, tmp_path, capsys):
    d = tiny_world["dir"]
    cfg = write_config(tmp_path / "c.yaml", tiny_world, {
        "add_teacher": {"path": f"{d}/teachers/add", "domains": ["add"], "replicas": 2},
        "rev_teacher": {"path": f"{d}/teachers/rev", "domains": ["rev"], "backend": "vllm_server",
                        "urls": ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]},
    })
    assert main(["teachers", "list", cfg]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    add = next(ln for ln in lines if ln.startswith("add_teacher")).split()
    assert add[:5] == ["add_teacher", "add", "vllm", f"{d}/teachers/add", "2"]
    rev = next(ln for ln in lines if ln.startswith("rev_teacher"))
    assert "vllm_server" in rev and "http://127.0.0.1:8100, http://127.0.0.1:8101" in rev and rev.split()[-1] == "2"
    n = tiny_world["config"]["train_rows_per_domain"]
    assert next(ln for ln in lines if ln.startswith("rev ")).split() == ["rev", str(n), "rev_teacher"]
    assert "NONE: no teacher serves it" in next(ln for ln in lines if ln.startswith("sort "))
    assert "FLAG: 1 domain(s) with no teacher: sort" in out
    # With a default teacher the same domain is served, and says by whom.
    assert main(["teachers", "list", cfg, "data.default_teacher=add_teacher"]) == 0
    out = capsys.readouterr().out
    assert "FLAG" not in out and "add_teacher (data.default_teacher)" in out
    assert next(ln for ln in out.splitlines() if ln.startswith("add_teacher")).split()[-1] == "yes"


def test_unreachable_server_fails_check_naming_teacher_and_url(tiny_world, tmp_path, capsys):
    url = closed_port_url()
    cfg = write_config(tmp_path / "c.yaml", tiny_world, {
        "rev_teacher": {"path": f"{tiny_world['dir']}/teachers/rev", "domains": ["rev"], "backend": "vllm_server",
                        "urls": [url], "max_retries": 1}})
    assert main(["teachers", "check", cfg]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "FAIL  reachable" in ln)
    assert url in line and "teacher 'rev_teacher'" in line and "unreachable" in line
    assert "--max-logprobs 64" in out and "teachers.rev_teacher.urls" in out  # how to start it, or fix the URL
    assert "ok    tokenizer" in out  # the checks that need no server still ran


def test_train_refuses_to_start_with_unreachable_teacher(tiny_world, ray_local, tmp_path, capsys):
    url = closed_port_url()
    d = tiny_world["dir"]
    cfg = write_config(tmp_path / "c.yaml", tiny_world, {
        "rev_teacher": {"path": f"{d}/teachers/rev", "domains": ["rev"], "backend": "vllm_server", "urls": [url],
                        "max_retries": 0}}, data={"default_teacher": "rev_teacher"},
        logging={"run_dir": str(tmp_path / "run")})
    assert main(["train", cfg, "trainer.steps=2"]) == 2
    err = capsys.readouterr().err
    msg = err[err.index("mopd: error: "):]  # (after any engine-actor logs Ray forwards)
    assert msg.startswith("mopd: error: teacher preflight failed") and url in msg and "rev_teacher" in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "actor/grad_norm" not in (
        tmp_path / "run" / "metrics.jsonl").read_text()


def test_in_cluster_replicas_check_and_split_scoring(tiny_world, ray_local, tmp_path):
    """The engines `mopd teachers check` starts for replicas=2 pass every check (replicas agree), and a
    batch split over both scores exactly as on one replica."""
    d = tiny_world["dir"]
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_world, {
        "rev_teacher": {"path": f"{d}/teachers/rev", "domains": ["rev"], "replicas": 2}}))
    tok = AutoTokenizer.from_pretrained(f"{d}/student")
    rows = [r for r in read_jsonl(f"{d}/data/eval.jsonl") if r["domain"] == "rev"][:9]
    prompts = encode_rows(tok, rows, 32)

    def samples() -> list[ScoredSample]:
        return [ScoredSample(row=r, group=i, sample=Sample(
            prompt_ids=p, response_ids=tok(str(r["answer"]), add_special_tokens=False)["input_ids"],
            rollout_logprobs=[], finish_reason="stop")) for i, (r, p) in enumerate(zip(rows, prompts, strict=True))]

    registry = TeacherRegistry.from_config(cfg, tok)
    with _teacher_handles(cfg) as teachers:  # what `mopd teachers check` runs on
        reps = teachers["rev_teacher"]
        assert len(reps) == 2
        checks = run_preflight(cfg, teachers, tok, load_rows(cfg.data.train_files))
        out = format_report(checks)
        for line in ["ok    reachable      [replica 0]", "ok    reachable      [replica 1]",
                     "ok    max_logprobs   [replica 1] 64 >= 64", "vs replica 0: 0", "ok    normalised"]:
            assert line in out, (line, out)
        assert all(c.ok for c in checks), out
        one, two = samples(), samples()
        score_with_teachers({"rev_teacher": reps[:1]}, registry, one, top_k=-1)
        score_with_teachers({"rev_teacher": reps}, registry, two, top_k=-1)
    for a, b in zip(one, two, strict=True):
        assert len(a.teacher_logprobs) == len(a.sample.response_ids) > 0
        assert a.teacher_logprobs == b.teacher_logprobs
        assert a.teacher_topk_ids == b.teacher_topk_ids and a.teacher_topk_logprobs == b.teacher_topk_logprobs
