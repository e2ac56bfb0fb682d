"""Prompt records, the per-domain sampler, and prompt-length errors."""

import json
from collections import Counter

import pytest

from mopd.data import DataError, DomainMixSampler, check_domain_mix, encode_prompt, encode_rows, load_rows
from mopd.world.tokenizer import build_tokenizer


def rows_file(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_load_and_validate(tmp_path):
    rows = load_rows([rows_file(tmp_path, [{"prompt": "a", "domain": "x"}])])
    assert rows[0]["id"] == "d-0"
    with pytest.raises(DataError, match="d.jsonl line 2: needs a 'domain'"):
        load_rows([rows_file(tmp_path, [{"prompt": "a", "domain": "x"}, {"prompt": "b"}])])
    with pytest.raises(DataError, match="not found"):
        load_rows([str(tmp_path / "missing.jsonl")])


def test_sampler_is_a_function_of_seed_and_step():
    rows = [{"domain": d, "id": f"{d}{i}"} for d in "abc" for i in range(50)]
    s1, s2 = DomainMixSampler(rows, {"a": 1, "b": 1, "c": 2}, seed=3), DomainMixSampler(rows, {"a": 1, "b": 1, "c": 2}, seed=3)
    assert s1.batch(7, 16) == s2.batch(7, 16)
    assert s1.batch(7, 16) != s1.batch(8, 16)
    counts = Counter(rows[i]["domain"] for step in range(200) for i in s1.batch(step, 16))
    assert abs(counts["c"] / sum(counts.values()) - 0.5) < 0.03
    with pytest.raises(DataError, match="no rows"):
        DomainMixSampler(rows, {"z": 1}, seed=0)


def test_prompt_too_long_is_an_error():
    tok = build_tokenizer()
    with pytest.raises(DataError, match=r"row 'r1' has 10 tokens, over data.max_prompt_tokens=5"):
        encode_rows(tok, [{"id": "r1", "prompt": "abcdefghij"}], max_prompt_tokens=5)
    assert encode_rows(tok, [{"id": "r1", "prompt": "ab"}], 5) == [tok.encode("ab", add_special_tokens=False)]


def test_jsonl_line_numbers_count_blank_lines_and_a_bom_is_accepted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "domain": "x"}\n\n{"prompt": "b", "domain": "x"}\n\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 5: needs a 'prompt'.*got 3"):
        load_rows([str(p)])
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "domain": "x"}\n\n{"prompt": "b", "domain": "x"}\n')
    assert [r["prompt"] for r in load_rows([str(p)])] == ["a", "b"]


def test_one_empty_file_among_good_ones_is_named(tmp_path):
    good = rows_file(tmp_path, [{"prompt": "a", "domain": "x"}])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl has no rows"):
        load_rows([good, str(tmp_path / "empty.jsonl")])


def test_chat_prompts_encode_through_the_template():
    """transformers 5 returns a BatchEncoding from apply_chat_template: the ids, not its keys, are the prompt."""
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "rev:abc="}]
    with pytest.raises(DataError, match="row 'c1': a chat-message prompt needs a tokenizer with a chat template"):
        encode_rows(tok, [{"id": "c1", "prompt": msgs}], 32)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    want = tok.encode("rev:abc=", add_special_tokens=False)
    assert encode_prompt(tok, msgs) == want
    assert encode_rows(tok, [{"id": "c1", "prompt": msgs}], 32) == [want]
    tok.chat_template = "{{ raise_exception('only one user turn') }}"
    with pytest.raises(DataError, match=r"row 'c1' cannot be encoded.*only one user turn"):
        encode_rows(tok, [{"id": "c1", "prompt": msgs}], 32)


def test_unknown_characters_are_listed_per_row_up_to_a_limit():
    tok = build_tokenizer()
    rows = [{"id": f"r{i}", "prompt": f"ab{chr(ord('A') + i)}"} for i in range(7)] + [{"id": "ok", "prompt": "ab"}]
    with pytest.raises(DataError) as e:
        encode_rows(tok, rows, 32)
    msg = str(e.value)
    assert msg.startswith("7 prompt(s) have characters outside the student's vocabulary")
    assert "row 'r0': ['A'], row 'r1': ['B']" in msg and "row 'r4': ['E']" in msg and "'r5'" not in msg
    assert "and 2 more row(s)" in msg and "'ok'" not in msg


def test_domain_mix_must_name_present_domains():
    rows = [{"domain": "a"}, {"domain": "b"}]
    check_domain_mix(rows, {})
    check_domain_mix(rows, {"a": 1.0})
    with pytest.raises(DataError, match=r"data.domain_mix names domain\(s\) with no rows.*\['c'\].*\['a', 'b'\]"):
        check_domain_mix(rows, {"a": 1.0, "c": 1.0})
    with pytest.raises(DataError, match="every domain weight 0"):
        check_domain_mix(rows, {"a": 0.0})


def _bos_tokenizer():
    """A Llama/Gemma-style tokenizer: its post-processor puts <bos> before every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *"abcdefghijklmnopqrstuvwxyz:="])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_prompts_keep_the_tokenizers_own_special_tokens():
    """Training, evaluation and teacher scoring all see <bos> where the tokenizer adds it (a model trained
    with it and scored without it sees prompts it never saw)."""
    tok = _bos_tokenizer()
    plain = tok("rev:abc=", add_special_tokens=False)["input_ids"]
    assert len(plain) == 8 and tok.bos_token_id not in plain
    assert encode_rows(tok, [{"id": "r", "prompt": "rev:abc="}], 16) == [[tok.bos_token_id, *plain]]
    # data.add_special_tokens=false overrides the tokenizer's default
    assert encode_rows(tok, [{"id": "r", "prompt": "rev:abc="}], 16, add_special_tokens=False) == [plain]


# --------------------------------------------------------------------------------------------------
# data.auto_mix: sampling follows each domain's headroom (its teacher KL)

def _kl(**d: float) -> dict:
    return {f"mopd/teacher_kl/{k}": v for k, v in d.items()}


def test_auto_mix_follows_the_teacher_kl_with_a_floor_and_the_staleness_lag():
    import numpy as np

    from mopd.data import AutoMix

    base = np.array([0.5, 0.25, 0.25])
    am = AutoMix(["add", "rev", "sort"], base, ema=0.5, floor=0.2, staleness=1)
    am.observe(1, _kl(add=3.0, rev=1.0, sort=0.0))
    am.observe(2, _kl(add=1.0, rev=1.0, sort=0.0))  # add's average: 0.5 * 3 + 0.5 * 1 = 2
    # Batch j uses the steps up to j - 2 (k = 1): batches 1 and 2 the static mix, batch 3 step 1's KL.
    assert am.weights_for(1) is base and am.weights_for(2) is base
    np.testing.assert_allclose(am.weights_for(3), 0.2 * base + 0.8 * np.array([0.75, 0.25, 0.0]))
    np.testing.assert_allclose(am.weights_for(4), 0.2 * base + 0.8 * np.array([2 / 3, 1 / 3, 0.0]))
    assert (am.weights_for(4) >= 0.2 * base - 1e-12).all() and am.weights_for(4).sum() == pytest.approx(1)
    with pytest.raises(RuntimeError, match="step 3's teacher KL"):
        am.weights_for(5)
    # A redone step (after a fault) recomputes from the same past.
    am.observe(2, _kl(add=5.0, rev=1.0, sort=1.0))
    np.testing.assert_allclose(am.weights_for(4), 0.2 * base + 0.8 * np.array([4, 1, 0.5]) / 5.5)
    # Resume: replaying the logged records gives the same weights; eval records and later steps are skipped.
    records = [{"step": 0, "eval/x": 1.0}, {"step": 1, "timing_s/step": 0.1, **_kl(add=3.0, rev=1.0, sort=0.0)},
               {"step": 2, "timing_s/step": 0.1, **_kl(add=5.0, rev=1.0, sort=1.0)},
               {"step": 3, "timing_s/step": 0.1, **_kl(add=9.0, rev=9.0, sort=9.0)}]
    again = AutoMix(["add", "rev", "sort"], base, ema=0.5, floor=0.2, staleness=1)
    again.replay(records, upto=2)
    np.testing.assert_allclose(again.weights_for(4), am.weights_for(4))
    # floor 1 is the static mix.
    static = AutoMix(["add", "rev", "sort"], base, ema=0.5, floor=1.0, staleness=0)
    static.observe(1, _kl(add=3.0, rev=1.0, sort=2.0))
    np.testing.assert_allclose(static.weights_for(2), base)


def test_sampler_draws_by_the_given_weights():
    import numpy as np

    rows = [{"id": f"{d}{i}", "domain": d, "prompt": "x"} for d in ("a", "b") for i in range(50)]
    s = DomainMixSampler(rows, None, seed=0)
    counts = Counter(rows[i]["domain"] for step in range(20) for i in s.batch(step, 50, np.array([0.9, 0.1])))
    assert 0.85 < counts["a"] / 1000 < 0.95
    assert s.batch(3, 50, np.array([0.9, 0.1])) == s.batch(3, 50, np.array([0.9, 0.1]))


def test_auto_mix_config_errors():
    from mopd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.auto_mix.floor"):
        load_config("configs/quickstart.yaml", ["data.auto_mix.floor=1.5"])
    # Refused when the config loads (before any cluster starts): the objective measures no teacher KL.
    for objective in ("sft", "orm"):
        with pytest.raises(ConfigError, match=f"data.auto_mix.enabled.*objective={objective}.*teacher KL"):
            load_config("configs/quickstart.yaml", ["data.auto_mix.enabled=true", f"algorithm.objective={objective}",
                                                    "rollout.n=2"])
