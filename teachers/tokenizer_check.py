"""Teachers must tokenize exactly like the student: the dense reward compares log-probs of the same
token ids, so a different vocabulary would silently reward the wrong tokens."""

from __future__ import annotations

from typing import Any


def tokenizer_fingerprint(tok: Any) -> dict:
    return {
        "vocab": tok.get_vocab(),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
    }


def tokenizer_mismatch(student: Any, teacher: Any) -> str | None:
    """A readable description of how two tokenizers differ, or None if they are identical."""
    s, t = tokenizer_fingerprint(student), tokenizer_fingerprint(teacher)
    problems = []
    if s["vocab"] != t["vocab"]:
        sv, tv = s["vocab"], t["vocab"]
        only_s = sorted(set(sv) - set(tv))[:3]
        only_t = sorted(set(tv) - set(sv))[:3]
        moved = [k for k in sv if k in tv and sv[k] != tv[k]][:3]
        detail = [f"sizes {len(sv)} vs {len(tv)}"]
        if only_s:
            detail.append(f"only in student: {only_s}")
        if only_t:
            detail.append(f"only in teacher: {only_t}")
        if moved:
            detail.append("different ids: " + ", ".join(f"{k!r} {sv[k]} vs {tv[k]}" for k in moved))
        problems.append("vocabulary differs (" + "; ".join(detail) + ")")
    for key in ("special", "eos_token_id", "pad_token_id", "bos_token_id"):
        if s[key] != t[key]:
            problems.append(f"{key} differs: student {s[key]!r} vs teacher {t[key]!r}")
    return "; ".join(problems) if problems else None
