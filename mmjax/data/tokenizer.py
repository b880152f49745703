"""Byte-level tokenizer: no vocabulary file to ship, and any UTF-8 text round-trips."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


def _fit_utf8(data: bytes, limit: int) -> bytes:
    """Cuts at most `limit` bytes without splitting a multi-byte character, so a truncated
    caption still decodes to valid text."""
    if len(data) <= limit:
        return data
    end = limit
    # 0b10xxxxxx bytes continue a character; back off to the start of that character.
    while end > 0 and (data[end] & 0xC0) == 0x80:
        end -= 1
    return data[:end]


def encode_texts(texts: Sequence[str], max_len: int) -> tuple[np.ndarray, int]:
    """Pure encoding: (tokens int32 [B, max_len], number of texts truncated).

    Kept free of logging and counters so that grain worker processes can call it and the
    consuming process does the counting.
    """
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 to hold BOS, one byte and EOS, got {max_len}")
    if isinstance(texts, str):
        raise TypeError("encode takes a sequence of strings, not a single string")
    tokens = np.full((len(texts), max_len), PAD, np.int32)
    room = max_len - 2
    truncated = 0
    for row, text in enumerate(texts):
        data = text.encode("utf-8")
        kept = _fit_utf8(data, room)
        truncated += len(kept) < len(data)
        ids = np.frombuffer(kept, np.uint8).astype(np.int32) + BYTE_OFFSET
        tokens[row, 0] = BOS
        tokens[row, 1 : 1 + len(ids)] = ids
        tokens[row, 1 + len(ids)] = EOS
    return tokens, truncated


class ByteTokenizer:
    """PAD=0, BOS=1, EOS=2, byte b -> b + 3; rows are BOS + bytes + EOS, padded with PAD.

    Text that does not fit is truncated, never dropped, and counted in `num_truncated`;
    the first truncation logs a warning, because silently shortened captions are a
    training-data bug that is otherwise invisible.
    """

    vocab_size = VOCAB_SIZE
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self, max_len: int):
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 to hold BOS, one byte and EOS, got {max_len}")
        self.max_len = int(max_len)
        self.num_truncated = 0

    def encode_with_count(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        tokens, truncated = encode_texts(texts, self.max_len)
        self.record_truncated(truncated)
        return tokens, truncated

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_with_count(texts)[0]

    def record_truncated(self, count: int) -> None:
        """Adds truncations counted elsewhere (e.g. in a worker process)."""
        if count and not self.num_truncated:
            logger.warning(
                "Truncating captions longer than max_len=%d tokens (%d bytes); "
                "raise max_len if this is frequent.",
                self.max_len,
                self.max_len - 2,
            )
        self.num_truncated += int(count)

    def decode(self, tokens: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """Text of each row up to its first EOS, without special tokens."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
            raise ValueError(
                f"token ids must be in [0, {VOCAB_SIZE}), got {tokens.min()}..{tokens.max()}"
            )
        texts = []
        for row in tokens:
            ends = np.flatnonzero(row == EOS)
            row = row[: ends[0]] if ends.size else row
            data = bytes((row[row >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tolist())
            texts.append(data.decode("utf-8", errors="replace"))
        return texts
