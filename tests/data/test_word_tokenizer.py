"""The word-level text path: vocabulary from captions, normalisation, saving and loading."""
import os
import pickle

import numpy as np
import pytest
from ml_collections import ConfigDict

from mmjax.config import base_config
from mmjax.data import tokenizer as tokenizers
from mmjax.data.tokenizer import BOS, EOS, PAD, UNK, ByteTokenizer, WordTokenizer

CAPTIONS = ["a small red square on the left", "draw a large blue circle at the top",
            "a red circle, top left", "the blue square is small"] * 2


@pytest.fixture(scope="module")
def words():
    return WordTokenizer.build(CAPTIONS, max_len=16, capacity=64)


def test_rows_are_bos_words_eos_padding(words):
    row = words.encode(["a red square"])[0]
    vocab = words.vocabulary
    assert row.dtype == np.int32 and row.shape == (16,)
    assert [vocab[i] for i in row[:5]] == ["[BOS]", "a", "red", "square", "[EOS]"]
    assert (row[5:] == PAD).all() and (row[0], row[4]) == (BOS, EOS)


def test_unknown_words_read_as_unk_and_known_words_keep_their_ids(words):
    row = words.encode(["please sketch a red square"])[0]
    assert list(row[1:3]) == [UNK, UNK]
    assert list(row[3:6]) == list(words.encode(["a red square"])[0][1:4])


@pytest.mark.parametrize("variant", ["A RED SQUARE", "  a   red\tsquare ", "A Red Square", "ａ red square"])
def test_case_and_whitespace_do_not_matter(words, variant):
    np.testing.assert_array_equal(words.encode([variant]), words.encode(["a red square"]))


def test_without_normalisation_case_matters():
    cased = WordTokenizer.build(CAPTIONS, max_len=16, capacity=64, lowercase=False)
    assert (cased.encode(["RED"])[0][1], cased.encode(["red"])[0][1]) == (UNK, cased.encode(["red"])[0][1])
    assert cased.encode(["red"])[0][1] != UNK


def test_vocabulary_keeps_frequent_words_within_capacity():
    small = WordTokenizer.build(CAPTIONS, max_len=16, capacity=8)
    assert small.vocab_size == 8 and small.vocabulary[:4] == list(tokenizers.SPECIAL_TOKENS)
    once = WordTokenizer.build(["a red square", "a red circle"], max_len=16, capacity=64)
    assert "square" not in once.vocabulary and "red" in once.vocabulary  # used once: UNK
    with pytest.raises(ValueError, match="text.vocab_size"):
        WordTokenizer.build(CAPTIONS, max_len=16, capacity=4)


def test_a_120_character_prompt_reaches_a_word_model_whole():
    prompt = ("Could you please paint one small red square, placed right up in the top left corner "
              "of the picture, on a plain black ground")[:120]
    assert len(prompt) == 120
    config = base_config()
    tokenizer = WordTokenizer.build([prompt, prompt], max_len=config.data.max_len, capacity=config.text.vocab_size)
    tokens, truncated = tokenizer.encode_with_count([prompt])
    assert truncated == 0 and tokenizer.decode(tokens)[0] == tokenizers.normalize(prompt).replace(",", " ,")
    assert ByteTokenizer(config.data.max_len).encode_with_count([prompt])[1] == 1  # bytes would cut it


def test_truncation_is_counted(words, caplog):
    tokens, truncated = words.encode_with_count(["red " * 30])
    assert truncated == 1 and tokens[0, -1] == EOS and words.num_truncated == 1
    assert "Truncating" in caplog.text


def test_save_load_and_pickle_round_trip(words, tmp_path):
    path = words.save(str(tmp_path))
    assert os.path.basename(path) == tokenizers.TOKENIZER_FILE and not any(".tmp" in f for f in os.listdir(tmp_path))
    loaded = WordTokenizer.load(str(tmp_path), 16)
    assert loaded == words and hash(loaded) == hash(words)
    np.testing.assert_array_equal(loaded.encode(CAPTIONS), words.encode(CAPTIONS))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(words)).encode(CAPTIONS), words.encode(CAPTIONS))


def test_missing_or_foreign_vocabulary_is_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        WordTokenizer.load(str(tmp_path), 16)
    (tmp_path / tokenizers.TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable word vocabulary"):
        WordTokenizer.load(str(tmp_path), 16)


def test_word_spans_name_the_prompts_words(words):
    spans = words.word_spans("Please  paint a RED square, on the left")
    assert [w for w, _, _ in spans] == ["Please", "paint", "a", "RED", "square", "on", "the", "left"]
    row = words.encode(["Please  paint a RED square, on the left"])[0]
    red = dict((w, (s, e)) for w, s, e in spans)["RED"]
    assert row[red[0]] == words.encode(["red"])[0][1] and red[1] - red[0] == 1
    assert dict((w, s) for w, s, _ in spans)["on"] == red[0] + 3  # ',' is a token of its own


def test_absent_text_section_means_the_byte_path():
    old = ConfigDict({"data": {"max_len": 64}})  # a config saved before `text` existed
    assert tokenizers.text_settings(old)["tokenizer"] == "byte"
    assert tokenizers.encoder_settings(old) == {"vocab_size": tokenizers.VOCAB_SIZE, "positions": "learned"}
    tok = tokenizers.for_config(old)
    assert isinstance(tok, ByteTokenizer) and not tok.lowercase


def test_shapes_vocabulary_is_deterministic_and_covers_the_attribute_words():
    config = base_config()
    config.text.vocab_records = 1000
    first = tokenizers.build_for(config)
    tokenizers._built.cache_clear()
    assert tokenizers.build_for(config) == first
    from mmjax.data import shapes

    words = {w for values in shapes.ATTRIBUTES.values() for v in values for w in v.split()}
    assert words <= set(first.vocabulary)


def test_source_captions_match_the_records():
    from mmjax.data.shapes import ShapesSource

    source = ShapesSource("train", num_records=20)
    assert tokenizers._source_captions(source, 5) == [source[i]["caption"] for i in range(5)]
