"""The quickstart world: domains, verifiers, tokenizer, and a tiny end-to-end build."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.world.build import MANIFEST, build_world, config_hash
from mopd.world.config import WorldConfig
from mopd.world.report import world_table
from mopd.world.sft import _batches, collate, encode_sft_examples, lr_factor
from mopd.world.tasks import (
    DIGIT_WORDS,
    GENERATORS,
    gen_add,
    gen_rev,
    gen_sort,
    gen_spell,
    make_splits,
    read_jsonl,
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
    assert set(GENERATORS) == {"add", "rev", "sort", "spell"} <= set(DOMAIN_VERIFIERS)


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
