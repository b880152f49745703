import logging

import numpy as np
import pytest

from mmjax.data.tokenizer import BOS, EOS, PAD, ByteTokenizer


def test_layout_and_dtype():
    tok = ByteTokenizer(8)
    tokens = tok.encode(["ab", ""])
    assert tokens.dtype == np.int32 and tokens.shape == (2, 8)
    assert tokens[0].tolist() == [BOS, ord("a") + 3, ord("b") + 3, EOS, PAD, PAD, PAD, PAD]
    assert tokens[1].tolist() == [BOS, EOS] + [PAD] * 6
    assert tok.vocab_size == 259 and (PAD, BOS, EOS) == (0, 1, 2)
    assert tok.num_truncated == 0


def test_round_trip_including_unicode():
    texts = ["a large red circle at the top left", "héllo ✓ 日本", "", "x" * 30]
    tok = ByteTokenizer(40)
    assert tok.decode(tok.encode(texts)) == texts
    assert tok.num_truncated == 0
    assert tok.decode(tok.encode(texts)[0]) == [texts[0]]


def test_truncation_is_counted_and_warned_once(caplog):
    tok = ByteTokenizer(6)
    with caplog.at_level(logging.WARNING, logger="mmjax.data.tokenizer"):
        tokens, n = tok.encode_with_count(["abcdefg", "abc", "abcd"])
        tok.encode(["zzzzzzzz"])
    assert n == 1 and tok.num_truncated == 2
    assert tokens[0].tolist() == [BOS] + [ord(c) + 3 for c in "abcd"] + [EOS]
    assert tokens[2, -1] == EOS  # exactly fits: not truncated
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "max_len=6" in warnings[0].getMessage()


def test_truncation_keeps_whole_characters():
    tok = ByteTokenizer(6)  # 4 bytes of room; "é" is 2 bytes
    assert tok.decode(tok.encode(["aaaé"])) == ["aaa"]
    assert tok.num_truncated == 1


def test_decode_ignores_padding_and_rejects_bad_ids():
    tok = ByteTokenizer(5)
    assert tok.decode(np.array([[BOS, 3 + 65, EOS, 3 + 66, PAD]])) == ["A"]
    with pytest.raises(ValueError):
        tok.decode(np.array([[BOS, 300]]))


@pytest.mark.parametrize("max_len", [0, 2])
def test_max_len_too_small(max_len):
    with pytest.raises(ValueError, match="max_len"):
        ByteTokenizer(max_len)
