"""Tokenization and truncation rules (reference section 1.2) with a real tokenizer."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from pipeline.config import TokenizeConfig
from pipeline.data.tokenize import TokenizerError, encode, pad, special_ids
from tests.conftest import SHARED


@pytest.fixture(scope="module")
def gpt2():
    return PreTrainedTokenizerFast.from_pretrained(str(SHARED / "tokenizers"), gguf_file="ggml-vocab-gpt-2.gguf")


def test_separate_encoding_eos_and_response_start(gpt2):
    enc = encode(gpt2, "Say hi:", " hello there", TokenizeConfig(8, 32))
    p = gpt2.encode("Say hi:", add_special_tokens=False)
    r = gpt2.encode(" hello there", add_special_tokens=False)
    assert enc.ids == p + r + [gpt2.eos_token_id]
    assert enc.response_start == len(p) and enc.n_response == len(r) + 1


def test_prompt_keeps_first_tokens_and_total_is_capped(gpt2):
    prompt = " ".join(f"w{i}" for i in range(50))
    response = " ".join(f"r{i}" for i in range(50))
    cfg = TokenizeConfig(max_prompt_length=10, max_length=16)
    enc = encode(gpt2, prompt, response, cfg)
    assert enc.ids[:10] == gpt2.encode(prompt, add_special_tokens=False)[:10]
    assert len(enc.ids) == 16 and enc.response_start == 10
    # over-long responses lose their tail, including EOS
    assert enc.ids[-1] != gpt2.eos_token_id


def test_no_eos_is_a_clear_error(gpt2):
    tok = PreTrainedTokenizerFast(tokenizer_object=gpt2.backend_tokenizer)
    with pytest.raises(TokenizerError, match="no EOS"):
        special_ids(tok)


def test_teacher_without_eos_or_pad_is_handled(gpt2):
    tok = PreTrainedTokenizerFast(tokenizer_object=gpt2.backend_tokenizer)  # no EOS, no pad
    assert special_ids(tok, require_eos=False) == (None, 0)
    enc = encode(tok, "Say hi:", " hello", TokenizeConfig(8, 32), with_offsets=True, require_eos=False)
    assert enc.ids == tok.encode("Say hi:") + tok.encode(" hello") and not enc.eos_kept
    assert enc.offsets.tolist() == [[0, 6]]


def test_offsets_need_a_fast_tokenizer(gpt2):
    class Slow:
        is_fast, name_or_path, eos_token_id, pad_token_id = False, "slow-one", 0, 0

        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(TokenizerError, match="slow-one.*offsets"):
        encode(Slow(), "p", "r", TokenizeConfig(8, 32), with_offsets=True)


def test_pad_falls_back_to_eos(gpt2):
    eos, pad = special_ids(gpt2)
    assert pad == (gpt2.pad_token_id if gpt2.pad_token_id is not None else eos)


def test_pad_right_and_left():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_truncation_is_counted_and_reported_once(gpt2):
    from pipeline.data.tokenize import Truncation, encode_prompt

    cfg = TokenizeConfig(max_prompt_length=8, max_length=12)
    cut = Truncation()
    long_prompt = "word " * 20_000  # 100k characters
    for row, (prompt, response) in enumerate([("short prompt", "ok"), (long_prompt, "ok"),
                                              ("short prompt", "a much longer response than the twelve tokens that this tiny setting allows")]):
        cut.add_encoded(f"r{row}", encode(gpt2, prompt, response, cfg), cfg)
    assert (cut.rows, cut.prompts, cut.responses, cut.first) == (3, 1, 1, "r1")
    assert cut.longest_prompt >= 20_000
    msg = cut.message(cfg, "teacher-cache")
    assert msg.startswith("teacher-cache: 1 of 3 prompt(s) longer than tokenize.max_prompt_length=8 tokens were cut")
    assert "1 response(s) were cut to fit tokenize.max_length=12" in msg and "row 'r1'" in msg
    assert Truncation().message(cfg) is None  # nothing cut: nothing said
    gen = Truncation()
    assert len(encode_prompt(gpt2, long_prompt, cfg, gen, "g")) == 8 and gen.prompts == 1
