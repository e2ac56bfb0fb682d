"""The quickstart world: domains, verifiers, tokenizer, and a tiny end-to-end build."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.world.build import MANIFEST, build_student_for, build_world, config_hash
from mopd.world.config import WorldConfig
from mopd.world.models import num_params
from mopd.world.report import world_table
from mopd.world.sft import _batches, collate, encode_sft_examples, lr_factor
from mopd.world.tasks import (
    DIGIT_WORDS,
    GENERATORS,
    SOLUTIONS,
    SWAP_ITEMS,
    SWAP_STEPS,
    apply_swap,
    final_answer,
    gen_add,
    gen_rev,
    gen_sort,
    gen_spell,
    gen_swap,
    make_rows,
    make_splits,
    read_jsonl,
    sft_target,
    swap_solution,
)
from mopd.world.tokenizer import (
    CHARS,
    EOS,
    MAX_LEN,
    build_tokenizer,
    encode_answer,
    encode_prompt,
    padded_vocab_size,
)
from rewards.verifiers import DOMAIN_VERIFIERS, verify

# ---------------------------------------------------------------- domains and verifiers


def test_generators_produce_correct_short_rows():
    rng = random.Random(0)
    for _ in range(300):
        p, a = gen_add(rng)
        x, y = p.removeprefix("add:").removesuffix("=").split("+")
        assert int(a) == int(x) + int(y) and len(x) == len(y) == len(a) - 1 and len(p) <= 20 and len(a) <= 10
        p, a = gen_rev(rng)
        assert p.startswith("rev:") and p.endswith("=") and a == p[4:-1][::-1]
        p, a = gen_sort(rng)
        assert p.startswith("sort:") and a == "".join(sorted(p[5:-1])) and len(p) <= 20
        p, a = gen_spell(rng)
        words = a.split(" ")
        assert p.startswith("spell:") and p.endswith("=") and 3 <= len(words) <= 6
        assert "".join(str(DIGIT_WORDS.index(w)) for w in words) == p[6:-1]
        assert len(p) + len(a) + 1 <= MAX_LEN  # prompt, answer and EOS fit the models' positions
        p, a = GENERATORS["max"](rng)
        assert p.startswith("max:") and p.endswith("=") and a == max(p[4:-1]) and 3 <= len(p[4:-1]) <= 6
        p, a = GENERATORS["rot"](rng)
        assert p.startswith("rot:") and len(a) == len(p) - 5
        assert all((ord(y) - ord(x)) % 26 == 1 for x, y in zip(p[4:-1], a, strict=True))
    assert set(GENERATORS) == {"add", "rev", "sort", "spell", "swap", "carry", "mul", "max", "rot"} <= set(DOMAIN_VERIFIERS)


def _swaps_by_hand(state: str, swaps: list[str]) -> str:
    """Follow the swaps with an explicit position table (not tasks.apply_swap)."""
    where = {c: i for i, c in enumerate(state)}
    for x, y in swaps:
        where[x], where[y] = where[y], where[x]
    return "".join(sorted(where, key=where.get))


def test_swap_rows_answer_the_arrangement_after_every_swap():
    rng = random.Random(0)
    for _ in range(300):
        p, a = gen_swap(rng)
        assert p.startswith("swap:(") and p.endswith("=") and len(p) == 37
        cells = p[5:-1].split(",")
        state, swaps = cells[0], cells[1:]
        assert state[0] == "(" and state[-1] == ")" and sorted(state[1:-1]) == list(SWAP_ITEMS)
        assert len(swaps) == SWAP_STEPS and all(len(set(s)) == 2 and set(s) <= set(SWAP_ITEMS) for s in swaps)
        assert a == _swaps_by_hand(state[1:-1], swaps)
    assert apply_swap("abcde", "eb") == "aecdb" and apply_swap("abcde", "be") == "aecdb"


def test_swap_solution_is_the_tape_after_every_swap_then_the_answer():
    prompt = "swap:(abcde),ab,cd,ea,bc,ab,de,ca,eb="
    sol = swap_solution(prompt)
    steps, answer = sol.split("|")
    tapes = steps.split(" ")
    assert answer == _swaps_by_hand("abcde", ["ab", "cd", "ea", "bc", "ab", "de", "ca", "eb"]) == "adbce"
    assert tapes[0] == "ab,(bacde),cd,ea,bc,ab,de,ca,eb"
    assert tapes[1] == "ab,cd,(badce),ea,bc,ab,de,ca,eb"
    assert tapes[-1] == "ab,cd,ea,bc,ab,de,ca,eb,(adbce)"
    # A fixed format: every step as wide as the prompt's tape, so each character is a fixed distance from what
    # it is computed from; 261 characters in all (+ EOS: the 262 response tokens of the world's swap teacher).
    assert len(tapes) == SWAP_STEPS and {len(t) for t in tapes} == {len(prompt) - len("swap:=")}
    assert len(sol) == 261 and all(c in CHARS for c in sol)
    assert len(prompt) + len(sol) + 1 <= 320 - 20  # fits world.max_positions of quickstart_reason with room
    rng = random.Random(1)
    for _ in range(100):  # the final arrangement of the worked solution is the row's answer
        p, a = gen_swap(rng)
        assert final_answer(swap_solution(p)) == a


def test_swap_rows_carry_their_solution_and_teachers_learn_it():
    rows = make_rows("swap", 5, "train", seed=0)
    assert set(rows[0]) == {"id", "prompt", "domain", "answer", "solution", "verifier"}
    assert set(SOLUTIONS) == {"swap", "carry"}
    assert rows[0]["verifier"] == "world_final"
    r = rows[0]
    assert r["solution"] == swap_solution(r["prompt"]) and final_answer(r["solution"]) == r["answer"]
    assert sft_target(r)["answer"] == r["solution"] and r["answer"] != r["solution"]  # the row is not changed
    short = make_rows("add", 1, "train", seed=0)[0]
    assert "solution" not in short and sft_target(short) == short


@pytest.mark.parametrize("text,score", [
    ("ab,(bacde)|dceab", 1.0),
    ("ab,(bacde) ab,(badce)|dceab<eos>", 1.0),
    ("dceab", 1.0),  # an answer without a chain of thought is still an answer
    ("dceab<eos>|abcde", 1.0),  # what follows <eos> is not the response
    ("x|y|dceab", 1.0),  # the last mark decides
    ("ab,(bacde)|dceab|", 0.0),
    ("ab,(dceab)|abcde", 0.0),  # the trace is not scored, the final answer is
    ("ab,(bacde)|dceabx", 0.0),
    ("ab,(bacde) ab,(badce)", 0.0),  # cut off before the answer
])
def test_swap_verifier_scores_the_final_answer_only(text, score):
    assert DOMAIN_VERIFIERS["swap"] == "world_final"
    assert verify("swap", text, "dceab") == score


def test_splits_are_disjoint_deterministic_and_well_formed():
    train, evals = make_splits(["add", "rev"], 50, 20, seed=3)
    again = make_splits(["add", "rev"], 50, 20, seed=3)
    assert (train, evals) == again
    assert make_splits(["add", "rev"], 50, 20, seed=4)[0] != train
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert train[0]["id"] == "add-train-00000" and evals[-1]["id"] == "rev-eval-00019"
    assert set(train[0]) == {"id", "prompt", "domain", "answer"}
    assert len({r["id"] for r in train + evals}) == 140


@pytest.mark.parametrize(
    "domain,text,answer,score",
    [
        ("add", "579", "579", 1.0),
        ("add", " 579 \n", "579", 1.0),
        ("add", "579<eos>", "579", 1.0),
        ("add", "579<eos>123<pad><pad>", "579", 1.0),
        ("add", "578", "579", 0.0),
        ("add", "5790", "579", 0.0),  # no eos: rambling past the answer is wrong
        ("add", "57<eos>9", "579", 0.0),
        ("add", "", "579", 0.0),
        ("rev", "dcba<eos>", "dcba", 1.0),
        ("rev", "abcd", "dcba", 0.0),
        ("sort", "abcd<eos>", "abcd", 1.0),
        ("sort", "abdc", "abcd", 0.0),
    ],
)
def test_verify_hand_examples(domain, text, answer, score):
    assert verify(domain, text, answer) == score


def test_other_domains_get_exact_match_and_unknown_verifier_names_known_ones():
    assert verify("chess", " e4 ", "e4") == 1.0 and verify("chess", "e4 e5", "e4") == 0.0
    with pytest.raises(ValueError, match=r"'regex'.*'exact_match'"):
        verify("chess", "e4", "e4", name="regex")


# ---------------------------------------------------------------- tokenizer and SFT batching


def test_tokenizer_roundtrip_and_reload(tmp_path):
    tok = build_tokenizer()
    text = CHARS + "add:123+456=579 rev:abc="
    ids = encode_prompt(tok, text)
    assert len(ids) == len(text) and tok.eos_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(encode_answer(tok, "579"), skip_special_tokens=False) == "579" + EOS
    assert tok.decode(encode_answer(tok, "579"), skip_special_tokens=True) == "579"
    assert padded_vocab_size(tok) % 64 == 0 and padded_vocab_size(tok) >= len(tok)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(text, add_special_tokens=False) == ids
    assert again.decode(ids) == text
    assert (again.eos_token, again.eos_token_id, again.pad_token_id) == (EOS, tok.eos_token_id, tok.pad_token_id)


def test_sft_labels_cover_only_answer_and_eos():
    tok = build_tokenizer()
    batch = collate(encode_sft_examples(tok, [{"prompt": "rev:ab=", "answer": "ba"},
                                      {"prompt": "add:1+1=", "answer": "2"}]), tok.pad_token_id)
    labels = batch["labels"]
    assert tok.decode(labels[0][labels[0] != -100], skip_special_tokens=True) == "ba"
    assert labels[0][labels[0] != -100].tolist()[-1] == tok.eos_token_id
    assert tok.decode(labels[1][labels[1] != -100], skip_special_tokens=False) == "2" + EOS
    assert batch["attention_mask"].sum().item() == len("rev:ab=ba") + 1 + len("add:1+1=2") + 1


def test_lr_schedule_and_weighted_batches():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "constant") == 1.0
    # Epochs: every row once per epoch. Weights: rows drawn in proportion (3 : 1 here).
    epoch = next(_batches(8, 8, torch.Generator().manual_seed(0)))
    assert sorted(epoch) == list(range(8))
    draws = next(_batches(4, 4000, torch.Generator().manual_seed(0), weights=[3, 0, 1, 0]))
    assert set(draws) == {0, 2} and 0.7 < draws.count(0) / len(draws) < 0.8


# ---------------------------------------------------------------- a tiny end-to-end build


def tiny(path: Path, **kw) -> WorldConfig:
    # One thread: two OpenMP threads spinning on a shared 2-core machine make tiny ops 10x slower.
    base = dict(num_threads=1, dir=str(path), seed=0, train_rows_per_domain=24, eval_rows_per_domain=6, teacher_steps=2,
                student_steps=2, batch_size=8, warmup_steps=0, teacher_steps_by_domain={})
    return WorldConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("w") / "world")
    return cfg, build_world(cfg, log=lambda _: None)


def test_tiny_build_writes_everything_loadable(world):
    cfg, info = world
    root = Path(info["dir"])
    for rel in ["world.json", "data/train.jsonl", "data/eval.jsonl", "tokenizer/tokenizer.json",
                "student/config.json", "student/model.safetensors", "student/generation_config.json",
                "student/tokenizer.json", *(f"teachers/{d}/model.safetensors" for d in cfg.domains)]:
        assert (root / rel).is_file(), rel
    assert len(read_jsonl(root / "data/train.jsonl")) == 24 * len(cfg.domains)
    assert set(info["accuracy"]) == {"student", *(f"teacher/{d}" for d in cfg.domains)}
    assert all(set(v) == set(cfg.domains) for v in info["accuracy"].values())
    assert {"data", "student", "total"} <= set(info["timings"])

    tok = AutoTokenizer.from_pretrained(root / "student")
    student = AutoModelForCausalLM.from_pretrained(root / "student")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teachers" / "add")
    assert student.config.model_type == "qwen3_moe" and teacher.config.model_type == "qwen3"
    assert student.config.num_experts_per_tok == 2 and student.config.num_experts >= 4
    assert student.config.eos_token_id == teacher.config.eos_token_id == tok.eos_token_id
    assert student.generation_config.eos_token_id == tok.eos_token_id
    assert student.config.vocab_size == teacher.config.vocab_size == padded_vocab_size(tok)
    ids = torch.tensor([encode_prompt(tok, "add:12+3=")])
    assert student(ids).logits.shape == (1, ids.shape[1], student.config.vocab_size)


def test_tiny_build_is_cached(world):
    cfg, info = world
    t = time.perf_counter()
    again = build_world(cfg, log=lambda _: None)
    assert time.perf_counter() - t < 1.0
    assert again == info  # same timings too: nothing was rebuilt
    assert config_hash(tiny(Path("elsewhere"))) == config_hash(cfg)  # location is not content
    assert config_hash(tiny(Path(cfg.dir), seed=1)) != config_hash(cfg)


def test_tiny_build_is_deterministic(world, tmp_path):
    cfg, info = world
    other = build_world(tiny(tmp_path / "again"), log=lambda _: None)
    a, b = Path(info["dir"]), Path(other["dir"])
    for rel in ["data/train.jsonl", "data/eval.jsonl", "tokenizer/tokenizer.json"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for rel in ["student/model.safetensors", "teachers/rev/model.safetensors"]:
        wa, wb = load_file(a / rel), load_file(b / rel)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), rel
    assert other["accuracy"] == info["accuracy"]


def test_worlds_built_before_the_size_keys_keep_their_hash():
    # The quickstart's hash as it was before world.max_positions / teacher_size / student_size existed: their
    # defaults reproduce those worlds, so a cached quickstart world is not rebuilt for them.
    assert config_hash(WorldConfig()) == "1b03740058d35530"
    assert len({config_hash(WorldConfig(**kw)) for kw in [{}, {"max_positions": 320}, {"teacher_size": {"hidden_size": 64}},
                                                          {"student_size": {"num_experts": 4}}]}) == 4


def test_size_and_position_keys_are_checked():
    with pytest.raises(ValueError, match=r"world.student_size': got keys \['hiden_size'\]; allowed: keys of .*hidden_size"):
        WorldConfig(student_size={"hiden_size": 64})
    with pytest.raises(ValueError, match=r"world.teacher_size.hidden_size"):
        WorldConfig(teacher_size={"hidden_size": 0})
    with pytest.raises(ValueError, match=r"world.max_positions"):
        WorldConfig(max_positions=4)


def test_tiny_reasoning_world_builds_with_its_positions_and_sizes(tmp_path):
    cfg = tiny(tmp_path / "w", domains=["swap"], max_positions=320, train_rows_per_domain=16, eval_rows_per_domain=4,
               teacher_size={"num_hidden_layers": 1}, student_size={"num_hidden_layers": 1, "num_experts": 4})
    info = build_world(cfg, log=lambda _: None)
    root = Path(info["dir"])
    row = read_jsonl(root / "data/train.jsonl")[0]
    assert row["domain"] == "swap" and row["solution"].endswith("|" + row["answer"])
    teacher = AutoModelForCausalLM.from_pretrained(root / "teachers" / "swap")
    student = AutoModelForCausalLM.from_pretrained(root / "student")
    assert teacher.config.max_position_embeddings == student.config.max_position_embeddings == 320
    assert teacher.config.num_hidden_layers == student.config.num_hidden_layers == 1
    assert student.config.num_experts == 4 and student.config.hidden_size == 128  # the rest as the quickstart's
    assert AutoTokenizer.from_pretrained(root / "student").model_max_length == 320
    assert set(info["accuracy"]) == {"teacher/swap", "student"} and set(info["accuracy"]["student"]) == {"swap"}

    # Another student for the same world (the peer benchmark's bigger one): the world's data and recipe.
    big = dataclasses.replace(cfg, student_size={"num_hidden_layers": 2, "num_experts": 4}, student_steps=1)
    made = build_student_for(big, tmp_path / "big", log=lambda _: None)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "big")
    assert (again.config.num_hidden_layers, again.config.max_position_embeddings) == (2, 320)
    assert made["num_params"] == num_params(again) and set(made["accuracy"]) == {"swap"}
    assert build_student_for(big, tmp_path / "big", log=lambda _: None) == made  # cached by config hash
    with pytest.raises(ValueError, match="may differ"):
        build_student_for(dataclasses.replace(big, teacher_lr=1.0), tmp_path / "other")


def test_interrupted_build_leaves_no_world(tmp_path):
    def fail_on_teacher(msg: str) -> None:
        if "teacher" in msg:
            raise KeyboardInterrupt

    cfg = tiny(tmp_path / "world")
    with pytest.raises(KeyboardInterrupt):
        build_world(cfg, log=fail_on_teacher)
    assert not (tmp_path / "world" / MANIFEST).exists()
    assert list(tmp_path.iterdir()) == []  # the temporary build folder is gone too


def test_foreign_folder_is_never_replaced(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        build_world(tiny(tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_unknown_domain_is_refused(tmp_path):
    with pytest.raises(ValueError, match="known domains"):
        build_world(tiny(tmp_path / "w", domains=["add", "chess"]))


def test_world_table_lists_every_model_on_every_domain():
    info = {"dir": "/w", "domains": ["add", "rev"], "timings": {"total": {"wall_s": 12.4}},
            "accuracy": {"teacher/add": {"add": 0.99, "rev": 0.0}, "teacher/rev": {"add": 0.01, "rev": 0.98},
                         "student": {"add": 0.2, "rev": 0.3}}}
    lines = world_table(info).splitlines()
    assert lines[0] == "quickstart world in /w (built in 12 s)"
    assert lines[2:] == ["| model | add | rev |", "|---|---|---|", "| teacher/add | 0.990 | 0.000 |",
                         "| teacher/rev | 0.010 | 0.980 |", "| student | 0.200 | 0.300 |"]
