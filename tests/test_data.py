"""Prompt records, the per-domain sampler, and prompt-length errors."""

import json
from collections import Counter

import pytest

from mopd.data import DataError, DomainMixSampler, encode_rows, load_rows
from mopd.world.tokenizer import build_tokenizer


def rows_file(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_load_and_validate(tmp_path):
    rows = load_rows([rows_file(tmp_path, [{"prompt": "a", "domain": "x"}])])
    assert rows[0]["id"] == "d-0"
    with pytest.raises(DataError, match="row 2: needs a 'domain'"):
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
