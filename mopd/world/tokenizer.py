"""The one character-level tokenizer shared by every model of the quickstart world.

MOPD scores the student's own tokens with each teacher, so teachers and student must agree on the
vocabulary id for id. A fixed character vocabulary (not learned from data) guarantees that, and makes
decoding exact: `decoders.Fuse()` joins the characters back with no spaces inserted. It is saved with
`save_pretrained` so `AutoTokenizer.from_pretrained` and vLLM both load it from a model folder.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mopd import data

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]  # ids 0, 1, 2
CHARS = string.digits + string.ascii_lowercase + "+-*=:,.|() "
MAX_LEN = 64  # prompt + response tokens; the quickstart sequences are far shorter


def build_tokenizer(max_len: int = MAX_LEN) -> PreTrainedTokenizerFast:
    """A fresh tokenizer: specials first, then one token per character in `CHARS`; `max_len` is its
    model_max_length, the positions of the world's models (`world.max_positions`)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; specials are matched before splitting.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    return tok


def padded_vocab_size(tok: PreTrainedTokenizerFast, multiple: int = 64) -> int:
    """Embedding rows: the tokenizer size rounded up, as real checkpoints do (vLLM pads the same way)."""
    return -(-len(tok) // multiple) * multiple


def encode_prompt(tok: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Token ids of a prompt, through the one encoder training, evaluation and scoring use (this tokenizer
    adds no special tokens, so: its characters)."""
    return data.encode_prompt(tok, prompt)


def encode_answer(tok: PreTrainedTokenizerFast, answer: str) -> list[int]:
    """Token ids of a target response: the answer's characters followed by `<eos>`."""
    return tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | Path) -> None:
    tok.save_pretrained(str(path))
