"""`mopd teachers list|check` and the teacher preflight: the config checks of a server teacher, the
table of who serves which domain, fast failure on an unreachable server (also for `mopd train`), and
in-cluster replicas (checked like training starts them; scoring split over replicas equals one replica)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tiny_config import REQUIRED_OVERRIDES
from tiny_config import write_config as write_tiny_config
from tiny_models import save_tiny_models, set_weight
from transformers import AutoTokenizer

from mopd.cli import main
from mopd.cli.teachers import _teacher_handles
from mopd.config import ConfigError, load_config
from mopd.data import encode_rows, load_rows
from mopd.producer import ScoredSample, score_with_teachers
from mopd.world.tasks import read_jsonl
from rollout.types import Sample
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
    base = [*REQUIRED_OVERRIDES, "teachers.t.path=/x", "teachers.t.domains=[rev]",
            "teachers.t.backend=vllm_server"]
    with pytest.raises(ConfigError, match=r"teachers\.t\.urls.*one base URL per server replica.*for backend vllm_server"):
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
        load_config(None, [*REQUIRED_OVERRIDES, "teachers.t.path=/x", "teachers.t.domains=[rev]",
                           "teachers.t.urls=[http://127.0.0.1:1]"])
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
        assert (a.teacher_topk_ids == b.teacher_topk_ids).all()
        assert (a.teacher_topk_logprobs == b.teacher_topk_logprobs).all()


# -- model folders and weights: checked before any engine starts (no Ray here) ----------------------------
class TransformersTeacher:
    """A teacher handle (`ready`/`score`, the interface the preflight checks) backed by a real transformers
    forward of the model folder, so a NaN weight gives the NaN log-probs a real engine would."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.vocab = self.model.config.vocab_size

    def ready(self) -> dict:
        return {"max_logprobs": self.vocab, "vocab_size": self.vocab}

    def score(self, sequences, prompt_lens, top_k=0):
        from rollout.scoring import TokenScores

        out = []
        for seq, plen in zip(sequences, prompt_lens, strict=True):
            with self.torch.no_grad():
                lp = self.model(self.torch.tensor([seq])).logits[0].float().log_softmax(-1)
            rows = range(plen - 1, len(seq) - 1)
            s = TokenScores([lp[i, seq[i + 1]].item() for i in rows])
            if top_k:
                top = [lp[i].topk(self.vocab if top_k < 0 else top_k) for i in rows]
                s.topk_ids = self.torch.stack([t.indices for t in top]).numpy()
                s.topk_logprobs = self.torch.stack([t.values for t in top]).numpy()
            out.append(s)
        return out


def _set_nan(folder: Path, name: str, value: float = float("nan")) -> None:
    set_weight(folder, name, value, index=5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    import shutil

    d = tmp_path_factory.mktemp("preflight_models")
    tok = save_tiny_models(d)
    from mopd.world.models import build_teacher, save_model

    save_model(build_teacher(tok, seed=2, vocab_size=128), tok, d / "wide_teacher")  # same tokenizer, wider embedding
    shutil.copytree(d / "teacher", d / "nan_teacher")
    _set_nan(d / "nan_teacher", "model.layers.1.mlp.down_proj.weight")
    shutil.copytree(d / "student", d / "inf_student")
    _set_nan(d / "inf_student", "model.layers.2.mlp.experts.3.up_proj.weight", float("inf"))
    return d


def test_first_nonfinite_weight_names_the_tensor(folders):
    from teachers.preflight import first_nonfinite_weight

    assert first_nonfinite_weight(folders / "teacher") is None
    assert first_nonfinite_weight(folders / "student") is None
    assert first_nonfinite_weight(folders / "nan_teacher") == (
        "model.safetensors", "model.layers.1.mlp.down_proj.weight", "NaN")
    assert first_nonfinite_weight(folders / "inf_student") == (
        "model.safetensors", "model.layers.2.mlp.experts.3.up_proj.weight", "inf")


def test_truncated_or_sharded_weights_are_refused(folders, tmp_path):
    import json
    import shutil

    from teachers.preflight import WeightReadError, first_nonfinite_weight, model_folder_problem

    cut = tmp_path / "cut"
    shutil.copytree(folders / "teacher", cut)
    w = cut / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(WeightReadError, match="cannot read model.safetensors"):
        first_nonfinite_weight(cut)
    (cut / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert "lacks 1 weight shard(s)" in model_folder_problem(cut) and "model-00002-of-00002" in model_folder_problem(cut)
    assert model_folder_problem(folders / "teacher") is None


def test_check_model_folders_on_resume_names_the_checkpoint(folders):
    from teachers.preflight import ModelCheckError, check_model_folders

    cfg = load_config(None, [*REQUIRED_OVERRIDES, f"student.path={folders}/student",
                             f"teachers.t.path={folders}/teacher",
                             "teachers.t.domains=[rev]"])
    assert check_model_folders(cfg, weights=False)[0].endswith("config.json and weights present")
    ck = str(folders / "inf_student")  # as if checkpoints/step_N/model held it
    with pytest.raises(ModelCheckError, match=r"checkpoint weight model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight "
                                              r"has inf.*resume from an earlier checkpoint.*--overwrite"):
        check_model_folders(cfg, student_path=ck)
    check_model_folders(cfg, student_path=ck, weights=False)  # the folder itself is fine
    cfg.student.path = str(folders / "gone")  # the tokenizer source of a resumed run must still exist
    with pytest.raises(ModelCheckError, match=r"student.path='.*gone' does not exist"):
        check_model_folders(cfg, student_path=ck, weights=False)


def test_hub_ids_are_left_to_the_hub_unless_offline(folders, monkeypatch):
    from teachers.preflight import ModelCheckError, check_model_folders

    cfg = load_config(None, [*REQUIRED_OVERRIDES, "student.path=no-such-org/no-such-model",
                             f"teachers.t.path={folders}/teacher",
                             "teachers.t.domains=[rev]"])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert "treated as a Hugging Face hub id" in check_model_folders(cfg, weights=False)[0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelCheckError, match="not in the Hugging Face cache"):
        check_model_folders(cfg, weights=False)


def test_nonfinite_teacher_logprobs_say_so_first_and_point_at_the_weight(folders):
    """A NaN weight used to fail as "not deterministic" (speculative decoding advice) and "not normalised"
    (raw log-probs advice); the preflight now reports non-finite log-probs and the bad weight instead."""
    from mopd.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    rows = [{"prompt": "rev:abc=", "answer": "cba", "domain": "rev", "id": "r0"}]
    for folder, ok in [("teacher", True), ("nan_teacher", False)]:
        cfg = load_config(None, [*REQUIRED_OVERRIDES, f"teachers.t.path={folders}/{folder}",
                                 "teachers.t.domains=[rev]",
                                 "algorithm.teacher_top_k=-1"])
        checks = run_preflight(cfg, {"t": [TransformersTeacher(folders / folder)]}, tok, rows)
        report = format_report(checks)
        if ok:
            assert all(c.ok for c in checks), report
            assert "ok    finite         [replica 0] all " in report and "ok    normalised" in report
            continue
        failed = [c for c in checks if not c.ok]
        assert [c.name for c in failed] == ["finite"], report  # nothing about determinism or normalisation
        assert failed[0].figure.startswith("non-finite log-probs: ")
        assert failed[0].hint.startswith("check the weights: teacher weight model.layers.1.mlp.down_proj.weight "
                                         "has NaN"), failed[0].hint
        assert "speculative" not in report and "raw_logprobs" not in report


def test_pytorch_bin_weights_are_checked_too(tmp_path):
    import torch

    from teachers.preflight import first_nonfinite_weight

    (tmp_path / "config.json").write_text("{}")
    state = {"a.weight": torch.ones(3, 4), "b.weight": torch.ones(5), "steps": torch.tensor([1, 2])}
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert first_nonfinite_weight(tmp_path) is None
    state["b.weight"][2] = float("-inf")
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert first_nonfinite_weight(tmp_path) == ("pytorch_model.bin", "b.weight", "inf")
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # legacy format
    assert first_nonfinite_weight(tmp_path) == ("pytorch_model.bin", "b.weight", "inf")


def test_a_teacher_vocabulary_wider_than_the_students_fails_the_preflight(folders):
    """It used to pass every check (identical tokenizer) and fail at step 1 in the loss; the engine's reported
    vocabulary is compared with the student's config.json now (the only place a vllm_server teacher's is known)."""
    from mopd.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    rows = [{"prompt": "rev:abc=", "answer": "cba", "domain": "rev", "id": "r0"}]

    def checks(teacher: str, *over: str):
        cfg = load_config(None, [*REQUIRED_OVERRIDES, f"student.path={folders}/student", f"teachers.t.path={folders}/{teacher}",
                                 "teachers.t.domains=[rev]", *over])
        return run_preflight(cfg, {"t": [TransformersTeacher(folders / teacher)]}, tok, rows)

    wide = checks("wide_teacher", "algorithm.teacher_top_k=-1")
    report = format_report(wide)
    assert [c.name for c in wide if not c.ok] == ["vocabulary"], report
    assert "FAIL  vocabulary     [replica 0] vocab_size 128, the student's 64" in report, report
    assert "algorithm.teacher_top_k=0" in report and "FAILED" in report.splitlines()[-1]
    same = checks("teacher", "algorithm.teacher_top_k=-1")
    assert all(c.ok for c in same) and any(c.name == "vocabulary" for c in same), format_report(same)
    sampled_only = checks("wide_teacher", "algorithm.objective=pg", "algorithm.teacher_top_k=0")
    assert all(c.ok for c in sampled_only), format_report(sampled_only)
    assert "(larger: only the sampled token is scored" in format_report(sampled_only)
