"""The CLIP BPE tokenizer against transformers' CLIPTokenizer (ids recorded in tests/fixtures)."""

import json
import os
import shutil

import numpy as np
import pytest

from mmjax.interop.clip_tokenizer import BOS, EOS, ClipTokenizer

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "clip_tokenizer")


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(FIXTURE, "expected.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json+merges.txt"])
def test_ids_match_transformers(layout, expected, tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    names = ["tokenizer.json"] if layout == "tokenizer.json" else ["vocab.json", "merges.txt"]
    for name in names:
        shutil.copy(os.path.join(FIXTURE, name), folder / name)
    tok = ClipTokenizer.from_folder(str(folder))
    ids, cut = tok.encode_with_count(expected["strings"])
    assert ids.dtype == np.int32 and ids.shape == (len(expected["strings"]), 77)
    for text, got, want in zip(expected["strings"], ids.tolist(), expected["input_ids"]):
        assert got == want, text
    assert cut == 1  # the twelve-times repeated caption


def test_rows_case_whitespace_and_decode():
    tok = ClipTokenizer.from_folder(FIXTURE)
    rows = tok.encode(["A Small  RED square", "a small red square", ""])
    np.testing.assert_array_equal(rows[0], rows[1])
    assert rows[0, 0] == tok.bos_id and tok.eos_id in rows[0, 1:] and rows[2, 1] == tok.eos_id
    assert tok.decode(rows[:1]) == ["a small red square"]
    assert tok.pad_id == tok.eos_id  # SD 1.x pads with the end token


def test_padding_token_and_length_from_the_config(tmp_path):
    folder = tmp_path / "sd2"
    shutil.copytree(FIXTURE, folder)
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump({"pad_token": {"content": "!", "lstrip": False}, "model_max_length": 16}, f)
    tok = ClipTokenizer.from_folder(str(folder))
    rows = tok.encode(["a red square"])
    assert rows.shape == (1, 16) and tok.pad_id == tok._tok.token_to_id("!") and rows[0, -1] == tok.pad_id


def test_bad_folders_and_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer folder"):
        ClipTokenizer.from_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json, or vocab.json and merges.txt"):
        ClipTokenizer.from_folder(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(os.path.join(FIXTURE, "vocab.json"), bad / "vocab.json")
    (bad / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="merges.txt:2: a merge is two symbols"):
        ClipTokenizer.from_folder(str(bad))
    vocab = json.load(open(os.path.join(FIXTURE, "vocab.json")))
    del vocab[BOS]
    (bad / "vocab.json").write_text(json.dumps(vocab))
    (bad / "merges.txt").write_text("")
    with pytest.raises(ValueError, match="no '<\\|startoftext\\|>' token"):
        ClipTokenizer.from_folder(str(bad))
    with pytest.raises(TypeError, match="list of prompts"):
        ClipTokenizer.from_folder(FIXTURE).encode("a red square")
    assert EOS in vocab


def test_word_spans_cover_each_words_bpe_tokens():
    tok = ClipTokenizer.from_files(os.path.join(FIXTURE, "vocab.json"), os.path.join(FIXTURE, "merges.txt"))
    prompt = "Please paint a RED square-ish thing; it's café"
    spans = tok.word_spans(prompt)
    assert [w for w, _, _ in spans] == ["Please", "paint", "a", "RED", "square-ish", "thing", "it's", "café"]
    row = tok.encode([prompt])[0]
    text = {w: tok._tok.decode([int(i) for i in row[a:b]]).replace("</w>", "") for w, a, b in spans}
    assert text["RED"] == "red" and text["square-ish"].replace(" ", "") == "square-ish"
    assert text["it's"].replace(" ", "") == "it's"
    short = ClipTokenizer.from_files(os.path.join(FIXTURE, "vocab.json"), os.path.join(FIXTURE, "merges.txt"),
                                     max_len=5)
    assert [w for w, _, _ in short.word_spans(prompt)] == ["Please", "paint", "a"]  # the rest is cut off
