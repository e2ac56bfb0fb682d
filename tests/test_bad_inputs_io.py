"""Bad inputs outside the config, through the real CLI in-process: data files and rows, model folders (student
and teachers: missing, without weights, a NaN weight, teacher_top_k over the vocabulary), rules files of
`mopd check`, run dirs and the command line itself. Each is refused with exit code 2 and one line on stderr
(`mopd: error: ...`, or `mopd check: error: ...`) that names the file, row or key and the fix; never a
traceback. Every input is refused before Ray starts: `init_ray` is a tripwire here (reaching it fails the
test), so none of these starts a cluster or an engine.

The models are tiny real ones (`mopd.world.models`) and the configs have no `world:` section, so `mopd train`
never builds the quickstart world.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import save_tiny_models, set_weight

import mopd.ray_cluster
import mopd.session
from mopd.cli import main
from mopd.world.models import build_teacher, save_model
from mopd.world.tokenizer import build_tokenizer

NAN_STUDENT_WEIGHT = "model.layers.0.mlp.gate.weight"  # the first MoE router
NAN_TEACHER_WEIGHT = "model.layers.0.mlp.down_proj.weight"
GOOD_ROWS = [{"prompt": "rev:abc=", "domain": "rev", "answer": "cba"},
             {"prompt": "rev:hello=", "domain": "rev", "answer": "olleh"}]


def _reached_ray(*args, **kwargs):
    raise AssertionError("the bad input reached init_ray: it must be refused before Ray starts")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """A tripwire, not a stand-in: every case here must fail before the run needs Ray."""
    monkeypatch.setattr(mopd.session, "init_ray", _reached_ray)
    monkeypatch.setattr(mopd.ray_cluster, "init_ray", _reached_ray)


def set_weight_nan(folder: Path, name: str) -> None:
    set_weight(folder, name, float("nan"), index=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """student/ and teacher/ (real tiny models), their broken variants, all outside any world.dir."""
    d = tmp_path_factory.mktemp("models")
    save_tiny_models(d)
    for src, dst in [("student", "nan_student"), ("teacher", "nan_teacher"), ("student", "student_no_weights"),
                     ("teacher", "teacher_no_weights"), ("teacher", "teacher_no_config")]:
        shutil.copytree(d / src, d / dst)
    tok = build_tokenizer()
    save_model(build_teacher(tok, seed=2, vocab_size=128), tok, d / "wide_teacher")  # same tokenizer, 128 ids
    save_model(build_teacher(tok, seed=3, vocab_size=32), tok, d / "narrow_teacher")
    set_weight_nan(d / "nan_student", NAN_STUDENT_WEIGHT)
    set_weight_nan(d / "nan_teacher", NAN_TEACHER_WEIGHT)
    (d / "student_no_weights" / "model.safetensors").unlink()
    (d / "teacher_no_weights" / "model.safetensors").unlink()
    (d / "teacher_no_config" / "config.json").unlink()
    (d / "weights_file.bin").write_bytes(b"not a folder")
    return d


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_config(tmp_path: Path, models: Path, *, train: str | None = None, eval_: str | None = None,
                 **sections) -> str:
    train = train or write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    cfg = {"experiment": "bad_io",
           "student": {"path": str(models / "student")},
           "teachers": {"t": {"path": str(models / "teacher"), "domains": ["rev"]}},
           "data": {"train_files": [train], "eval_files": [eval_ or train]},
           "algorithm": {"objective": "reverse_kl", "teacher_top_k": -1},
           "logging": {"run_dir": str(tmp_path / "run"), "progress_bar": False, "dashboard_every": 0}}
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def assert_one_line_error(code: int, err: str, fragments: list[str], prefix: str = "mopd: error: ") -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.startswith(prefix), err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    for f in fragments:
        assert f in err, (f, err)


def run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# -- data: (file name, bytes, fragments) for train files through `mopd train` -------------------------------
def _lines(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


DATA_FILES: list[tuple[str, str, bytes, list[str]]] = [
    ("row is a JSON array", "train.jsonl", _lines(GOOD_ROWS[0], ["rev:abc=", "rev"]),
     ["train.jsonl line 2", "each row must be a JSON object", '{"prompt": "...", "domain": "..."}',
      "got a JSON array"]),
    ("Latin-1 byte", "train.jsonl", _lines(GOOD_ROWS[0]) + '{"prompt": "caf\xe9", "domain": "rev"}\n'.encode("latin-1"),
     ["train.jsonl line 2", "not UTF-8", "0xe9", "save the file as UTF-8"]),
    ("invalid JSON line", "train.jsonl", _lines(GOOD_ROWS[0], '{"prompt": "abc", "domain": rev}'),
     ["train.jsonl line 2", "not valid JSON", "column", "one object like"]),
    ("pretty-printed JSON array", "train.jsonl", json.dumps(GOOD_ROWS, indent=1).encode(),
     ["train.jsonl line 1", "not valid JSON", "is not JSONL: write one object per line"]),
    ("missing prompt", "train.jsonl", _lines(GOOD_ROWS[0], {"question": "abc", "domain": "rev"}),
     ["train.jsonl line 2", "needs a 'prompt'", "'question'", "chat messages"]),
    ("missing domain", "train.jsonl", _lines({"prompt": "rev:abc=", "answer": "cba"}),
     ["train.jsonl line 1", "needs a 'domain'", "teachers.<name>.domains"]),
    ("chat message without role", "train.jsonl", _lines({"prompt": [{"content": "hi"}], "domain": "rev"}),
     ["train.jsonl line 1", "chat message 1", "'role' and a 'content'"]),
    ("empty file", "train.jsonl", b"", ["train.jsonl has no rows", "one {\"prompt\""]),
    ("blank lines only", "train.jsonl", b"\n\n  \n", ["train.jsonl has no rows"]),
    ("Parquet that is not Parquet", "train.parquet", _lines(GOOD_ROWS[0]),
     ["train.parquet: not a readable Parquet file", "to_parquet"]),
    ("prompt characters outside the vocabulary", "train.jsonl",
     _lines(GOOD_ROWS[0], {"prompt": "rev:ABC=", "domain": "rev"}, {"prompt": "rev:caf\xe9=", "domain": "rev"}),
     ["2 prompt(s) have characters outside the student's vocabulary", "row 'train-1': ['A', 'B', 'C']",
      "row 'train-2': ['\xe9']", "<unk>"]),
    ("prompt over data.max_prompt_tokens", "train.jsonl", _lines({"prompt": "rev:" + "a" * 40 + "=", "domain": "rev"}),
     ["row 'train-0' has 45 tokens", "data.max_prompt_tokens=32", "raise data.max_prompt_tokens"]),
    ("chat messages without a chat template", "train.jsonl",
     _lines({"prompt": [{"role": "user", "content": "rev:abc="}], "domain": "rev"}),
     ["row 'train-0'", "needs a tokenizer with a chat template", "chat_template"]),
    ("domain no teacher serves", "train.jsonl", _lines(GOOD_ROWS[0], {"prompt": "sort:cab=", "domain": "sort"}),
     ["row 'train-1' has domain 'sort'", "registered domains: rev", "data.default_teacher"]),
    ("duplicate row ids", "train.jsonl",
     _lines({**GOOD_ROWS[0], "id": "a"}, {**GOOD_ROWS[1], "id": "b"}, {**GOOD_ROWS[1], "id": "a"},
            {**GOOD_ROWS[0], "id": 7}, {**GOOD_ROWS[0], "id": "7"}),
     ["2 row(s) repeat an earlier row's id", "id 'a' at ", "train.jsonl line 3 repeats ", "train.jsonl line 1",
      "id '7' at ", "train.jsonl line 5 repeats", "give each row its own id", "data.dedupe=true"]),
    ("id null", "train.jsonl", _lines({**GOOD_ROWS[0], "id": "x"}, {**GOOD_ROWS[1], "id": None}),
     ["train.jsonl line 2", "'id' is null", "a non-empty string or an integer", "drop the key"]),
    ("id that is a list", "train.jsonl", _lines({**GOOD_ROWS[0], "id": ["x"]}),
     ["train.jsonl line 1", "'id' is [\"x\"]", "a non-empty string or an integer"]),
    ("NaN answer", "train.jsonl", _lines(GOOD_ROWS[0], '{"prompt": "rev:ab=", "domain": "rev", "answer": NaN}'),
     ["train.jsonl line 2", "'answer' is nan", "written as NaN", "give the answer as a string", "(null)"]),
]


@pytest.mark.parametrize("name, fname, content, fragments", DATA_FILES, ids=[c[0] for c in DATA_FILES])
def test_bad_train_file(capsys, tmp_path, models, name, fname, content, fragments):
    f = tmp_path / fname
    f.write_bytes(content)
    eval_ = write_jsonl(tmp_path / "eval.jsonl", GOOD_ROWS)
    assert_one_line_error(*run(capsys, ["train", write_config(tmp_path, models, train=str(f), eval_=eval_)]),
                          fragments)


def test_bad_eval_rows_are_refused_before_ray(capsys, tmp_path, models):
    """Evaluation rows are encoded only after the engines start unless training checks them up front."""
    eval_ = write_jsonl(tmp_path / "eval.jsonl", [GOOD_ROWS[0], {"prompt": "rev:XY=", "domain": "rev"}])
    assert_one_line_error(*run(capsys, ["train", write_config(tmp_path, models, eval_=eval_)]),
                          ["row 'eval-1': ['X', 'Y']", "outside the student's vocabulary"])


def test_missing_and_folder_data_files(capsys, tmp_path, models):
    missing = tmp_path / "nope.jsonl"
    assert_one_line_error(*run(capsys, ["train", write_config(tmp_path, models, train=str(missing))]),
                          ["data file not found", str(missing), "data.train_files"])
    (tmp_path / "data_dir").mkdir()
    assert_one_line_error(*run(capsys, ["train", write_config(tmp_path, models, train=str(tmp_path / "data_dir"))]),
                          ["data_dir is a folder", "JSONL or Parquet files"])


def test_ids_repeated_across_files_and_in_parquet(capsys, tmp_path, models):
    """Generated ids of two files with one stem collide too; a Parquet id column with a null is refused."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = write_jsonl(tmp_path / "a" / "train.jsonl", GOOD_ROWS), write_jsonl(tmp_path / "b" / "train.jsonl", GOOD_ROWS)
    cfg = write_config(tmp_path, models, eval_=write_jsonl(tmp_path / "eval.jsonl", GOOD_ROWS),
                       data={"train_files": [a, b]})
    assert_one_line_error(*run(capsys, ["train", cfg]),
                          ["2 row(s) repeat", "id 'train-0' at ", "b/train.jsonl line 1 repeats ", "a/train.jsonl line 1"])
    p = tmp_path / "ids.parquet"
    pq.write_table(pa.Table.from_pylist([{**GOOD_ROWS[0], "id": "p0"}, {**GOOD_ROWS[1], "id": None}]), p)
    assert_one_line_error(*run(capsys, ["train", write_config(tmp_path, models, train=str(p))]),
                          ["ids.parquet row 2", "'id' is null"])


def test_dedupe_drops_later_repeats_and_says_so(tmp_path):
    from mopd.data import load_rows

    f = write_jsonl(tmp_path / "t.jsonl", [{**GOOD_ROWS[0], "id": "a"}, {**GOOD_ROWS[1], "id": "a"},
                                           {**GOOD_ROWS[1], "id": "b"}])
    log: list[str] = []
    rows = load_rows([f], dedupe=True, log=log.append)
    assert [(r["id"], r["answer"]) for r in rows] == [("a", "cba"), ("b", "olleh")]  # the first of each id is kept
    assert len(log) == 1 and log[0].startswith("data.dedupe: dropped 1 row(s)") and "t.jsonl line 2" in log[0], log


def test_dedupe_reaches_the_run(capsys, tmp_path, models, monkeypatch):
    """`data.dedupe=true` in a config: the repeated row no longer stops `mopd train` at the data (it gets as far as
    the cluster, the tripwire here), and the run's log says what it dropped."""
    f = tmp_path / "train.jsonl"
    f.write_bytes(_lines({**GOOD_ROWS[0], "id": "a"}, {**GOOD_ROWS[1], "id": "a"}))
    cfg = write_config(tmp_path, models, train=str(f), eval_=write_jsonl(tmp_path / "eval.jsonl", GOOD_ROWS),
                       data={"dedupe": True})
    with pytest.raises(AssertionError, match="reached init_ray"):
        main(["--debug", "train", cfg])
    out = capsys.readouterr().out
    assert "data.dedupe: dropped 1 row(s) whose id repeats an earlier row's: id 'a' at " in out, out


def test_domain_mix_naming_an_absent_domain(capsys, tmp_path, models):
    cfg = write_config(tmp_path, models, data={"domain_mix": {"rev": 1.0, "revv": 2.0}})
    assert_one_line_error(*run(capsys, ["train", cfg]), ["data.domain_mix", "['revv']", "['rev']", "fix the name"])


def test_working_parquet_file_loads(capsys, tmp_path, models):
    """pyarrow is a dependency: a real Parquet train file (plain and chat prompts) loads like its JSONL twin."""
    from mopd.data import load_rows

    rows = [*GOOD_ROWS, {"prompt": "sort:cba=", "domain": "sort", "answer": "abc"}]
    p = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    loaded = load_rows([str(p)])
    assert [{k: r[k] for k in ("prompt", "domain", "answer")} for r in loaded] == rows
    assert [r["id"] for r in loaded] == ["train-0", "train-1", "train-2"]
    assert main(["teachers", "list", write_config(tmp_path, models, train=str(p))]) == 0
    out = capsys.readouterr().out
    assert f"train data ({p}): 3 rows" in out
    assert next(ln for ln in out.splitlines() if ln.startswith("rev ")).split() == ["rev", "2", "t"]


# -- model folders: through `mopd train` and `mopd teachers check`, both before any engine -------------------
MODELS: list[tuple[str, list[str], list[str]]] = [
    ("student path does not exist", ["student.path={m}/no_such_student"],
     ["student.path=", "no_such_student", "does not exist", "Hugging Face model folder"]),
    ("student path is a file", ["student.path={m}/weights_file.bin"], ["student.path=", "is a file"]),
    ("student folder without weights", ["student.path={m}/student_no_weights"],
     ["student_no_weights", "holds no weights", "save_pretrained"]),
    ("teacher folder without weights", ["teachers.t.path={m}/teacher_no_weights"],
     ["teachers.t.path=", "teacher_no_weights", "holds no weights"]),
    ("teacher folder without config.json", ["teachers.t.path={m}/teacher_no_config"],
     ["teachers.t.path=", "has no config.json", "save_pretrained"]),
    ("teacher_top_k above the vocabulary", ["algorithm.teacher_top_k=1000"],
     ["algorithm.teacher_top_k=1000", "above the vocabulary size 64", "at most 64", "-1 for the whole vocabulary"]),
    ("student weight is NaN", ["student.path={m}/nan_student"],
     [f"student weight {NAN_STUDENT_WEIGHT} has NaN", "model.safetensors", "the checkpoint is corrupt",
      "re-export it or resume from an earlier checkpoint"]),
    ("teacher weight is NaN", ["teachers.t.path={m}/nan_teacher"],
     [f"teacher 't' weight {NAN_TEACHER_WEIGHT} has NaN", "teachers.t.path=", "re-export it"]),
    # The same tokenizer, but the teacher's embedding is wider: the preflight passed it and step 1 failed.
    ("teacher vocabulary larger than the student's", ["teachers.t.path={m}/wide_teacher"],
     ["teachers.t.path=", "wide_teacher", "config.json vocab_size 128", "larger than the student's (64)",
      "algorithm.teacher_top_k=-1", "has no logit for", "algorithm.objective=pg with algorithm.teacher_top_k=0",
      "has vocab_size 64"]),
    ("teacher vocabulary smaller than the student's", ["teachers.t.path={m}/narrow_teacher"],
     ["teachers.t.path=", "narrow_teacher", "vocab_size 32", "smaller than the student's (64)",
      "cannot score", "vocab_size equals the student's"]),
]


@pytest.mark.parametrize("command", [["train"], ["teachers", "check"]], ids=["train", "teachers-check"])
@pytest.mark.parametrize("name, overrides, fragments", MODELS, ids=[c[0] for c in MODELS])
def test_bad_model_folder(capsys, tmp_path, models, command, name, overrides, fragments):
    cfg = write_config(tmp_path, models)
    code, err = run(capsys, [*command, cfg, *(o.format(m=models) for o in overrides)])
    assert_one_line_error(code, err, fragments)


FREEZE: list[tuple[str, list[str], list[str]]] = [
    ("pattern matching nothing", ["trainer.freeze=[model.layers.*.mlp.router.*]"],
     ["config key 'trainer.freeze'", "pattern 'model.layers.*.mlp.router.*' matches no parameter of the student",
      "fix the pattern", "its parameters include: ", "model.layers.0.mlp.gate.weight"]),
    ("pattern matching everything", ["trainer.freeze=['*']"],
     ["config key 'trainer.freeze'", "freezes every parameter; nothing would train", "leave some out"]),
    # The checkpoint stores experts one tensor each; the trainer's parameter is the fused one, and that is
    # what a pattern must match (a pattern of the stored names is a typo for the trainer).
    ("pattern of the checkpoint's per-expert names", ["trainer.freeze=[model.layers.0.mlp.experts.0.*]"],
     ["pattern 'model.layers.0.mlp.experts.0.*' matches no parameter", "model.layers.0.mlp.experts.gate_up_proj"]),
]


@pytest.mark.parametrize("name, overrides, fragments", FREEZE, ids=[c[0] for c in FREEZE])
def test_bad_freeze_patterns_are_refused_before_ray(capsys, tmp_path, models, name, overrides, fragments):
    """These used to reach the user from the trainer actor, after the cluster and engines had started."""
    assert_one_line_error(*run(capsys, ["train", write_config(tmp_path, models), *overrides]), fragments)


def test_freeze_names_are_the_trainers(models):
    """The pre-cluster names (model on the meta device) are exactly the loaded model's parameter names."""
    from transformers import AutoModelForCausalLM

    from mopd.trainer import check_freeze, frozen_names

    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(models / "student").named_parameters()]
    check_freeze(["*.mlp.gate.*", "*.experts.gate_up_proj"], str(models / "student"))
    assert frozen_names(names, ["*.mlp.gate.*"]) == {n for n in names if ".mlp.gate." in n}


def test_wider_teacher_passes_when_only_the_sampled_token_is_scored(tmp_path, models):
    from mopd.config import load_config
    from teachers.preflight import check_model_folders

    cfg = load_config(write_config(tmp_path, models), [f"teachers.t.path={models}/wide_teacher",
                                                       "algorithm.objective=pg", "algorithm.teacher_top_k=0"])
    assert check_model_folders(cfg, weights=False)[-1].startswith("models checked")


def test_good_models_pass_the_model_check(tmp_path, models):
    from mopd.config import load_config
    from teachers.preflight import check_model_folders

    lines = check_model_folders(load_config(write_config(tmp_path, models), ["algorithm.teacher_top_k=64"]))
    assert any(ln.startswith("student: ") and "every weight finite" in ln for ln in lines), lines
    assert any(ln.startswith("teacher 't': ") and "every weight finite" in ln for ln in lines), lines


# -- rules of `mopd check` ----------------------------------------------------------------------------------
@pytest.fixture
def run_dir(tmp_path) -> Path:
    d = tmp_path / "done_run"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "rollout_corr/kl": 0.01, "rollout_corr/rollout_is_mean": 1.0, "actor/grad_norm": 0.5}) + "\n"
        for s in (1, 2, 3)))
    return d


def check(capsys, run_dir: Path, rules_text: str | None, tmp_path: Path) -> tuple[int, str]:
    rules = tmp_path / "rules.yaml"
    if rules_text is not None:
        rules.write_text(rules_text)
    return run(capsys, ["check", str(run_dir), "--rules", str(rules)])


RULES: list[tuple[str, str | None, list[str]]] = [
    ("misspelt metric", "rollout_corr/kll: {abs_max: 0.1}\nactor/grad_norm: {}\n",
     ["never logged", "rollout_corr/kll (did you mean rollout_corr/kl?)", "--no-strict"]),
    ("malformed YAML", "rollout_corr/kl: {abs_max: 0.1\nactor/grad_norm: {}\n",
     ["rules.yaml is not valid YAML at line", "column", "check brackets"]),
    ("rule key typo abs_min", "rollout_corr/kl: {abs_min: 0.1}\n",
     ["rule 'rollout_corr/kl'", "unknown key(s) 'abs_min' (did you mean 'abs_max'?)", "allowed: min, max, abs_max"]),
    ("bound that is not a number", "rollout_corr/kl: {abs_max: small}\n",
     ["rule 'rollout_corr/kl'", "abs_max must be a number", "'small'"]),
    ("rules file missing", None, ["rules file", "rules.yaml not found"]),
]


@pytest.mark.parametrize("name, text, fragments", RULES, ids=[c[0] for c in RULES])
def test_bad_rules(capsys, tmp_path, run_dir, name, text, fragments):
    assert_one_line_error(*check(capsys, run_dir, text, tmp_path), fragments, prefix="mopd check: error: ")


def test_good_rules_still_pass(capsys, tmp_path, run_dir):
    assert check(capsys, run_dir, "rollout_corr/kl: {abs_max: 0.1}\n", tmp_path)[0] == 0
    assert check(capsys, run_dir, "rollout_corr/kl: {abs_max: 0.001}\n", tmp_path)[0] == 1  # a violation


def test_check_of_a_folder_without_metrics(capsys, tmp_path):
    (tmp_path / "empty_run").mkdir()
    assert_one_line_error(*check(capsys, tmp_path / "empty_run", "rollout_corr/kl: {}\n", tmp_path),
                          ["empty_run has no metrics.jsonl", "not a run directory"], prefix="mopd check: error: ")
    assert_one_line_error(*check(capsys, tmp_path / "no_run", "rollout_corr/kl: {}\n", tmp_path),
                          ["run dir", "no_run does not exist", "runs/<experiment>"], prefix="mopd check: error: ")


# -- run dirs through `mopd train` ---------------------------------------------------------------------------
def test_run_dir_that_holds_a_run(capsys, tmp_path, models):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert_one_line_error(*run(capsys, ["train", write_config(tmp_path, models)]),
                          ["already holds a run (metrics.jsonl)", "--resume", "--overwrite"])
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing lost


def test_resume_with_nothing_to_resume(capsys, tmp_path, models):
    cfg = write_config(tmp_path, models)
    assert_one_line_error(*run(capsys, ["train", cfg, "--resume"]), ["--resume", "does not exist", "drop --resume"])
    (tmp_path / "run").mkdir()
    assert_one_line_error(*run(capsys, ["train", cfg, "--resume"]), ["--resume: nothing to resume", "--overwrite"])


def test_run_dir_that_is_a_file(capsys, tmp_path, models):
    (tmp_path / "run").write_text("x")
    assert_one_line_error(*run(capsys, ["train", write_config(tmp_path, models)]),
                          ["is a file, not a folder", "logging.run_dir"])


def test_resume_and_overwrite_together(capsys, tmp_path, models):
    assert_one_line_error(*run(capsys, ["train", write_config(tmp_path, models), "--resume", "--overwrite"]),
                          ["--resume", "--overwrite", "give one"])


# -- the command line ----------------------------------------------------------------------------------------
def test_unknown_subcommand_is_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian", "configs/quickstart.yaml"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err and "Traceback" not in err


def test_config_file_that_is_a_folder(capsys, tmp_path):
    d = tmp_path / "conf.yaml"
    d.mkdir()
    assert_one_line_error(*run(capsys, ["train", str(d)]), ["config file", str(d)])


def test_at_least_twenty_five_cases():
    n = len(DATA_FILES) + len(MODELS) + len(RULES) + len(FREEZE) + 14  # + the single tests above
    assert n >= 25, n


def test_nan_helper_really_writes_nan(models):
    """The broken folders are what the cases claim (else a passing case proves nothing)."""
    assert torch.isnan(load_file(str(models / "nan_student" / "model.safetensors"))[NAN_STUDENT_WEIGHT]).any()
    assert torch.isfinite(load_file(str(models / "student" / "model.safetensors"))[NAN_STUDENT_WEIGHT]).all()
