"""Teacher registration: domain routing, defaults and tokenizer refusal."""

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mopd.config import load_config
from mopd.world.tokenizer import build_tokenizer
from teachers.registry import TeacherRegistry, TeacherRegistryError, UnknownDomainError


def other_tokenizer(eos="<eos>", chars="abc"):
    vocab = {t: i for i, t in enumerate(["<pad>", eos, "<unk>", *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token=eos, unk_token="<unk>")


def test_routing_and_grouping():
    reg = TeacherRegistry(build_tokenizer())
    tok = build_tokenizer()
    reg.register("math", ["add"], "/m", tokenizer=tok)
    reg.register("strings", ["rev", "sort"], "/s", tokenizer=tok)
    assert reg.teacher_for("sort") == "strings"
    assert reg.domains == ["add", "rev", "sort"]
    assert reg.group(["add", "rev", "add", "sort"]) == {"math": [0, 2], "strings": [1, 3]}


def test_unknown_domain_names_row_and_registered_domains():
    reg = TeacherRegistry()
    reg.register("math", ["add"], "/m")
    with pytest.raises(UnknownDomainError) as e:
        reg.group(["add", "poetry"], ["r0", "r1"])
    msg = str(e.value)
    assert "row 'r1'" in msg and "'poetry'" in msg and "add" in msg and "default_teacher" in msg


def test_default_teacher_takes_unknown_domains():
    reg = TeacherRegistry()
    reg.register("math", ["add"], "/m")
    reg.set_default("math")
    assert reg.teacher_for("poetry") == "math"
    with pytest.raises(TeacherRegistryError, match="not registered"):
        reg.set_default("nobody")


def test_domain_served_twice_is_refused():
    reg = TeacherRegistry()
    reg.register("a", ["add"], "/a")
    with pytest.raises(TeacherRegistryError, match="already served by teacher 'a'"):
        reg.register("b", ["rev", "add"], "/b")
    assert "b" not in reg.teachers  # nothing half-registered


@pytest.mark.parametrize("teacher_tok, fragment", [
    (other_tokenizer(), "vocabulary differs"),
    (other_tokenizer(eos="</s>"), "vocabulary differs"),
])
def test_tokenizer_mismatch_is_refused(teacher_tok, fragment):
    reg = TeacherRegistry(build_tokenizer())
    with pytest.raises(TeacherRegistryError) as e:
        reg.register("bad", ["add"], "/bad", tokenizer=teacher_tok)
    assert fragment in str(e.value) and "teacher 'bad'" in str(e.value)
    assert reg.teachers == {}


def test_special_token_mismatch_is_refused():
    student = build_tokenizer()
    teacher = build_tokenizer()
    teacher.eos_token = "<pad>"
    with pytest.raises(TeacherRegistryError, match="eos_token_id differs"):
        TeacherRegistry(student).register("t", ["add"], "/t", tokenizer=teacher)


def test_teacher_tokenizer_loaded_from_folder(tmp_path):
    other_tokenizer().save_pretrained(tmp_path / "t")
    build_tokenizer().save_pretrained(tmp_path / "ok")
    reg = TeacherRegistry(build_tokenizer())
    reg.register("ok", ["rev"], str(tmp_path / "ok"))
    with pytest.raises(TeacherRegistryError, match="does not share the student's tokenizer"):
        reg.register("t", ["add"], str(tmp_path / "t"))
    with pytest.raises(TeacherRegistryError, match="cannot load a tokenizer"):
        reg.register("gone", ["sort"], str(tmp_path / "missing"))


def test_from_config():
    cfg = load_config("configs/quickstart.yaml", ["data.default_teacher=add_teacher"])
    reg = TeacherRegistry.from_config(cfg)
    assert reg.teacher_for("rev") == "rev_teacher"
    assert reg.teacher_for("other") == "add_teacher"
