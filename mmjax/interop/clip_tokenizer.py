"""The CLIP byte-level BPE tokenizer of Stable Diffusion checkpoints, read from their own files.

A checkpoint folder's `tokenizer/` holds either `tokenizer.json` (what transformers 5 writes) or
`vocab.json` with `merges.txt` (older folders), and usually `tokenizer_config.json` or
`special_tokens_map.json` naming the padding token (SD 1.x pads with `<|endoftext|>`, SD 2.x with
`!`). Both layouts become one `tokenizers.Tokenizer` that reads text the way CLIP does: NFC,
runs of whitespace to one space, lower case; split into contractions, letter runs, single digits
and punctuation runs; each piece as bytes, merged by BPE with `</w>` marking a word's end. A row is
`<|startoftext|>`, the tokens, `<|endoftext|>`, then padding to `max_len` (77); a longer prompt
keeps its first `max_len - 2` tokens. Ids match transformers' `CLIPTokenizer`
(tests/fixtures/clip_tokenizer, made by tests/fixtures/make_clip_tokenizer.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Special tokens first, then CLIP's pieces: contractions, letter runs, one digit, punctuation runs.
SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
MAX_LEN = 77


def build(vocab: dict[str, int], merges: Sequence[tuple[str, str]]):
    """A `tokenizers.Tokenizer` with CLIP's normalisation, split, BPE and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    for special in (BOS, EOS):
        if special not in vocab:
            raise ValueError(f"the CLIP vocabulary has no {special!r} token")
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], unk_token=EOS,
                               continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                      trim_offsets=False, add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return tok


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class ClipTokenizer:
    """Prompts -> int32 `[B, max_len]` ids, as a Stable Diffusion text encoder reads them."""

    kind = "clip_bpe"

    def __init__(self, tokenizer, max_len: int = MAX_LEN, pad_token: str = EOS):
        self._tok = tokenizer
        self.max_len = int(max_len)
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold the start and end tokens, got {max_len}")
        ids = {name: tokenizer.token_to_id(name) for name in (BOS, EOS, pad_token)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the CLIP vocabulary has no {missing[0]!r} token")
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[pad_token]
        self.pad_token = pad_token
        self.num_truncated = 0

    @classmethod
    def from_files(cls, vocab_file: str, merges_file: str, **kwargs) -> ClipTokenizer:
        vocab = _read_json(vocab_file)
        merges = []
        with open(merges_file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line or line.startswith("#version"):
                    continue
                parts = line.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"{merges_file}:{number}: a merge is two symbols separated by one "
                                     f"space, got {line!r}")
                merges.append((parts[0], parts[1]))
        return cls(build(vocab, merges), **kwargs)

    @classmethod
    def from_folder(cls, folder: str, max_len: int | None = None) -> ClipTokenizer:
        """A checkpoint's `tokenizer/` folder: `tokenizer.json`, or `vocab.json` + `merges.txt`.
        The padding token and length come from `tokenizer_config.json` or
        `special_tokens_map.json` when present (default `<|endoftext|>`, 77)."""
        from tokenizers import Tokenizer

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no tokenizer folder {folder!r}")
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(folder, name)
            if os.path.exists(path):
                config.update(_read_json(path))
        pad = _token_text(config.get("pad_token")) or EOS
        length = max_len or config.get("model_max_length") or MAX_LEN
        if not isinstance(length, int) or length > 10_000:  # transformers writes a huge int for "none"
            length = MAX_LEN
        path = os.path.join(folder, "tokenizer.json")
        if os.path.exists(path):
            return cls(Tokenizer.from_file(path), max_len=length, pad_token=pad)
        vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if not (os.path.exists(vocab) and os.path.exists(merges)):
            raise FileNotFoundError(f"{folder}: a CLIP tokenizer needs tokenizer.json, or vocab.json and "
                                    "merges.txt; none of them is there")
        return cls.from_files(vocab, merges, max_len=length, pad_token=pad)

    def _content(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of prompts, not one string")
        encodings = self._tok.encode_batch([str(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_with_count(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """(ids `[len(texts), max_len]` int32, how many prompts were cut)."""
        rows = np.full((len(texts), self.max_len), self.pad_id, np.int32)
        cut = 0
        for row, ids in enumerate(self._content(texts)):
            room = self.max_len - 2
            cut += len(ids) > room
            ids = [self.bos_id] + ids[:room] + [self.eos_id]
            rows[row, :len(ids)] = ids
        self.num_truncated += cut
        return rows, cut

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_with_count(texts)[0]

    def word_spans(self, prompt: str) -> list[tuple[str, int, int]]:
        """`(word, start, end)` for each word of `prompt` with a token in the row: row positions
        `start:end` (the start token at 0) hold the BPE tokens whose text lies in the word. A
        word cut off by the row's length is dropped, one cut short keeps what survives."""
        from mmjax.sampling.attention_maps import spans_from_offsets

        encoding = self._tok.encode(str(prompt), add_special_tokens=False)
        return spans_from_offsets(prompt, encoding.offsets[: self.max_len - 2])

    def decode(self, rows) -> list[str]:
        """Each row's text up to its end token (lower-cased, whitespace as CLIP normalised it)."""
        texts = []
        for row in np.asarray(rows):
            ids = [int(i) for i in row[1:]]
            ids = ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids
            texts.append(self._tok.decode(ids, skip_special_tokens=True).replace("</w>", " ").strip())
        return texts
