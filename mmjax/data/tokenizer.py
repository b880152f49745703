"""Tokenizers: how a caption becomes the int32 token row a text encoder reads.

Two kinds, chosen by the config's `text.tokenizer`:

- "word": a word-level vocabulary built with the `tokenizers` library from the train split's
  captions (`build`), saved as `tokenizer.json` in the workdir and in every export. Text is
  normalised first (Unicode NFKC, lower case when `text.normalize`; whitespace never matters,
  it only separates words), words and punctuation are tokens, and a word the train captions
  never used reads as `[UNK]`. A 120-character prompt is some 25 tokens.
- "byte": one token per UTF-8 byte (no vocabulary file; any text round-trips), optionally
  normalised the same way. Every model saved before `text.tokenizer` existed uses it, without
  normalisation.

Both write rows as BOS, tokens, EOS, then PAD (ids 0, 1, 2 in both), and truncate text that
does not fit `max_len`, counting (and once warning about) every truncation.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import unicodedata
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


def normalize(text: str) -> str:
    """NFKC, lower case, runs of whitespace as one space, no leading or trailing space."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def encode_texts(texts: Sequence[str], max_len: int, lowercase: bool = False) -> tuple[np.ndarray, int]:
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
        data = (normalize(text) if lowercase else text).encode("utf-8")
        kept = _fit_utf8(data, room)
        truncated += len(kept) < len(data)
        ids = np.frombuffer(kept, np.uint8).astype(np.int32) + BYTE_OFFSET
        tokens[row, 0] = BOS
        tokens[row, 1 : 1 + len(ids)] = ids
        tokens[row, 1 + len(ids)] = EOS
    return tokens, truncated


class _Counting:
    """Truncation counting shared by both tokenizers."""

    max_len: int
    num_truncated: int = 0

    def encode_with_count(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        tokens, truncated = self.encode_texts(texts)
        self.record_truncated(truncated)
        return tokens, truncated

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_with_count(texts)[0]

    def record_truncated(self, count: int) -> None:
        """Adds truncations counted elsewhere (e.g. in a worker process)."""
        if count and not self.num_truncated:
            logger.warning("Truncating captions longer than max_len=%d tokens (%s); raise data.max_len "
                           "if this is frequent.", self.max_len, self._room())
        self.num_truncated += int(count)

    def _room(self) -> str:
        return f"{self.max_len - 2} {self.unit}s"

    def _checked_rows(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {tokens.min()}..{tokens.max()}")
        return tokens


class ByteTokenizer(_Counting):
    """PAD=0, BOS=1, EOS=2, byte b -> b + 3; rows are BOS + bytes + EOS, padded with PAD.

    `lowercase` normalises text first (`normalize`). Text that does not fit is truncated,
    never dropped, and counted in `num_truncated`; the first truncation logs a warning,
    because silently shortened captions are a training-data bug that is otherwise invisible.
    """

    kind = "byte"
    unit = "byte"
    vocab_size = VOCAB_SIZE
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self, max_len: int, lowercase: bool = False):
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 to hold BOS, one byte and EOS, got {max_len}")
        self.max_len = int(max_len)
        self.lowercase = bool(lowercase)
        self.num_truncated = 0

    def __eq__(self, other):
        return isinstance(other, ByteTokenizer) and (self.max_len, self.lowercase) == (other.max_len, other.lowercase)

    def __hash__(self):
        return hash((self.kind, self.max_len, self.lowercase))

    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Pure (no counting, no logging: grain workers call it): (tokens, number truncated)."""
        return encode_texts(texts, self.max_len, self.lowercase)

    def decode(self, tokens: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """Text of each row up to its first EOS, without special tokens."""
        texts = []
        for row in self._checked_rows(tokens):
            ends = np.flatnonzero(row == EOS)
            row = row[: ends[0]] if ends.size else row
            data = bytes((row[row >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tolist())
            texts.append(data.decode("utf-8", errors="replace"))
        return texts

    def word_spans(self, prompt: str) -> list[tuple[str, int, int]]:
        """`(word, start, end)`: the token range of each word of `prompt`, as encoded."""
        from mmjax.sampling.attention_maps import word_spans

        return word_spans(normalize(prompt) if self.lowercase else prompt, bos=1, max_len=self.max_len)


# ----------------------------------------------------------------------------- word level

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
UNK = 3


def _new_word_tokenizer(lowercase: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words (\w+) and runs of punctuation
    return tok


class WordTokenizer(_Counting):
    """A word-level vocabulary (`tokenizers` library): PAD=0, BOS=1, EOS=2, UNK=3, then the
    words and punctuation of the captions it was built from, most frequent first.

    Built by `build` from a list of captions, stored as the library's `tokenizer.json`
    (`save`, `load`). Pickles as its JSON (grain worker processes tokenize with it).
    """

    kind = "word"
    unit = "token"
    pad_id, bos_id, eos_id, unk_id = PAD, BOS, EOS, UNK

    def __init__(self, spec: str, max_len: int):
        from tokenizers import Tokenizer

        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 to hold BOS, one token and EOS, got {max_len}")
        self.spec = spec
        self.max_len = int(max_len)
        self.num_truncated = 0
        self._tok = Tokenizer.from_str(spec)
        vocab = self._tok.get_vocab()
        for i, name in enumerate(SPECIAL_TOKENS):
            if vocab.get(name) != i:
                raise ValueError(f"not an mmjax word vocabulary: token {name!r} must have id {i}")
        self.vocab_size = len(vocab)

    def __getstate__(self):
        return {"spec": self.spec, "max_len": self.max_len, "num_truncated": self.num_truncated}

    def __setstate__(self, state):
        self.__init__(state["spec"], state["max_len"])
        self.num_truncated = state["num_truncated"]

    def __eq__(self, other):
        return isinstance(other, WordTokenizer) and (self.spec, self.max_len) == (other.spec, other.max_len)

    def __hash__(self):
        return hash((self.kind, self.spec, self.max_len))

    @property
    def vocabulary(self) -> list[str]:
        """The tokens in id order."""
        return [w for w, _ in sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])]

    @classmethod
    def build(cls, texts: Sequence[str], max_len: int, capacity: int, lowercase: bool = True,
              min_count: int = 2) -> WordTokenizer:
        """The vocabulary of `texts`: every word used at least `min_count` times, most
        frequent first, up to `capacity` ids in all (the special tokens included)."""
        from tokenizers import trainers

        if capacity <= len(SPECIAL_TOKENS):
            raise ValueError(f"text.vocab_size must exceed {len(SPECIAL_TOKENS)} (the special tokens), got {capacity}")
        tok = _new_word_tokenizer(lowercase)
        trainer = trainers.WordLevelTrainer(vocab_size=capacity, min_frequency=min_count,
                                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        tok.train_from_iterator(list(texts), trainer)
        return cls(tok.to_str(), max_len)

    @classmethod
    def load(cls, directory: str, max_len: int) -> WordTokenizer:
        path = os.path.join(directory, TOKENIZER_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                spec = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{directory}: its config uses text.tokenizer='word' but {TOKENIZER_FILE} is missing; "
                "copy it from the run that trained the model (exports and workdirs hold it)") from None
        try:
            return cls(spec, max_len)
        except Exception as e:  # the library's own error names no file
            raise ValueError(f"{path} is not a readable word vocabulary: {e}") from e

    def save(self, directory: str) -> str:
        """Writes `directory/tokenizer.json` through a temporary file (never half-written)."""
        path = os.path.join(directory, TOKENIZER_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.spec)
        os.replace(tmp, path)
        return path

    def _ids(self, text: str):
        return self._tok.encode(text, add_special_tokens=False)

    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Pure (no counting, no logging: grain workers call it): (tokens, number truncated)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings, not a single string")
        tokens = np.full((len(texts), self.max_len), PAD, np.int32)
        room = self.max_len - 2
        truncated = 0
        for row, text in enumerate(texts):
            # One text at a time: encode_batch's thread pool gains nothing on caption batches
            # and is unsafe across the fork of grain's worker processes.
            ids = self._ids(text).ids
            truncated += len(ids) > room
            ids = ids[:room]
            tokens[row, 0] = BOS
            tokens[row, 1 : 1 + len(ids)] = ids
            tokens[row, 1 + len(ids)] = EOS
        return tokens, truncated

    def decode(self, tokens: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """The (normalised) tokens of each row up to its first EOS, joined by spaces."""
        texts = []
        for row in self._checked_rows(tokens):
            ends = np.flatnonzero(row == EOS)
            row = row[: ends[0]] if ends.size else row
            texts.append(self._tok.decode([int(t) for t in row if t > EOS], skip_special_tokens=False))
        return texts

    def word_spans(self, prompt: str) -> list[tuple[str, int, int]]:
        """`(word, start, end)` for each word of `prompt` with a token in the row: tokens
        `start:end` (row positions, BOS at 0) are the ones whose text lies in the word."""
        from mmjax.sampling.attention_maps import spans_from_offsets  # words as attention maps name them

        return spans_from_offsets(prompt, self._ids(prompt).offsets[: self.max_len - 2])


# ----------------------------------------------------------------------------- from a config

TOKENIZER_KINDS = ("word", "byte")
# What a saved config without `text` meant: it was trained before the choice existed.
ABSENT_TEXT = {"tokenizer": "byte", "normalize": False, "positions": "learned", "vocab_size": VOCAB_SIZE}
VOCAB_RECORDS = 20_000  # default number of train captions a word vocabulary is built from


def text_settings(config) -> dict:
    """The config's `text` section, with the meaning of absent keys filled in."""
    section = config.get("text") or {}
    return {key: section.get(key, default) for key, default in ABSENT_TEXT.items()} | {
        "vocab_records": section.get("vocab_records", VOCAB_RECORDS)}


def encoder_settings(config) -> dict:
    """The text encoder's vocabulary size and position scheme for `config`."""
    text = text_settings(config)
    vocab = VOCAB_SIZE if text["tokenizer"] == "byte" else int(text["vocab_size"])
    return {"vocab_size": vocab, "positions": text["positions"]}


def _source_captions(source, limit: int) -> list[str]:
    count = min(len(source), limit)
    if hasattr(source, "caption"):
        return [source.caption(i) for i in range(count)]
    captions = getattr(source, "captions", None)
    if captions is not None:
        return list(captions[:count])
    return [source[i]["caption"] for i in range(count)]


@functools.lru_cache(maxsize=8)
def _built(data_json: str, max_len: int, capacity: int, lowercase: bool, records: int) -> WordTokenizer:
    from ml_collections import ConfigDict

    from mmjax.data import pipeline

    source = pipeline.make_source(ConfigDict(json.loads(data_json)), "train")
    return WordTokenizer.build(_source_captions(source, records), max_len, capacity, lowercase)


def build_for(config) -> WordTokenizer:
    """The word vocabulary of `config`'s train split (deterministic: the same config builds
    the same vocabulary, on every host)."""
    text = text_settings(config)
    return _built(json.dumps(config.data.to_dict(), sort_keys=True, default=str), int(config.data.max_len),
                  int(text["vocab_size"]), bool(text["normalize"]), int(text["vocab_records"]))


def for_config(config, directory: str | None = None):
    """The tokenizer a model of `config` reads: a byte tokenizer, or the word vocabulary
    saved in `directory` (a workdir or an export), or, with no directory, the one the train
    split builds."""
    text = text_settings(config)
    if text["tokenizer"] == "byte":
        return ByteTokenizer(config.data.max_len, lowercase=bool(text["normalize"]))
    if text["tokenizer"] != "word":
        raise ValueError(f"config key 'text.tokenizer' must be one of {TOKENIZER_KINDS}, got {text['tokenizer']!r}")
    if directory is not None:
        return WordTokenizer.load(directory, config.data.max_len)
    return build_for(config)
