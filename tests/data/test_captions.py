"""The caption grammar: variety, labels, length, and held-out phrasings that stay held out."""
import itertools
import json
import os
import re
from collections import Counter

import numpy as np
import pytest

from mmjax.data import captions as grammar
from mmjax.data import shapes
from mmjax.data.shapes import ATTRIBUTES, ShapesSource, parse_caption
from tests.helpers import REPO

# The held-out constructions as surface forms, written independently of the grammar's tags: a
# key-value pair, a relative clause, "I'd like ...", the request verb "sketch".
HELDOUT_SURFACE = re.compile(
    r"\b(colou?r|shape|size|pos|position|location)\s*[:=]"
    r"|\b(that|which)\b"
    r"|\b(like|love)\b"
    r"|\bsketch\b",
    re.IGNORECASE,
)
ATTRIBUTE_WORDS = sorted({w for values in ATTRIBUTES.values() for v in values for w in v.split()})


def _labels(record):
    return {a: int(record[a]) for a in ATTRIBUTES}


def _skeleton(text):
    """The caption with its attribute words blanked: its phrasing alone."""
    return re.sub(rf"\b({'|'.join(ATTRIBUTE_WORDS)})\b", "#", text.lower())


@pytest.fixture(scope="module")
def train_records():
    source = ShapesSource("train", image_size=16, seed=0, num_records=20_000)
    return [source[i] for i in range(len(source))]


def test_deterministic_per_seed_and_index():
    a, b = ShapesSource("train", image_size=16, seed=4), ShapesSource("train", image_size=16, seed=4)
    for i in (0, 1, 99, 12345):
        assert a[i]["caption"] == b[i]["caption"] and a[i]["phrasing"] == b[i]["phrasing"]
    assert [a[i]["caption"] for i in range(50)] != [ShapesSource("train", image_size=16, seed=5)[i]["caption"]
                                                    for i in range(50)]
    assert len({a[i]["caption"] for i in range(50)}) > 40
    test = ShapesSource("test", image_size=16, seed=4)
    assert [test[i]["caption"] for i in range(20)] == [ShapesSource("test", image_size=16, seed=4)[i]["caption"]
                                                       for i in range(20)]
    # The caption is a pure function of its rng, held-out or not.
    labels = {"shape": 0, "color": 1, "size": 0, "position": 8}
    for heldout in (False, True, "relative"):
        one, two = (grammar.caption(labels, np.random.default_rng(7), heldout=heldout) for _ in range(2))
        assert one == two


def test_variety(train_records):
    sample = train_records[:5000]
    texts = [r["caption"] for r in sample]
    constructions = Counter(r["phrasing"].rsplit(" ", 1)[0] for r in sample)
    cases = Counter(r["phrasing"].rsplit(" ", 1)[1] for r in sample)
    assert len(constructions) >= 120, len(constructions)
    assert len({_skeleton(t) for t in texts}) >= 1000
    assert set(cases) == set(grammar.CASES) and min(cases.values()) > 500
    # The letter cases as they read, not as tagged.
    assert any(t.isupper() for t in texts) and any(t.islower() for t in texts)
    assert any(t[0].isupper() and not t.isupper() and t[1:].islower() for t in texts)  # sentence case
    assert any(len(t.split()) > 2 and all(w[0].isupper() for w in t.split()) and not t.isupper() for t in texts)
    used = Counter(rule for r in sample for rule in r["phrasing"].split())
    training_rules = set(grammar.RULE_NAMES) - grammar.HELDOUT
    assert training_rules <= set(used), training_rules - set(used)
    lower = [t.lower() for t in texts]
    for phrase in ("draw ", "please ", "could you ", "show me ", "i want ", "there is ", "a picture of ",
                   "; ", " is ", " in the ", " corner"):
        assert any(phrase in t for t in lower), phrase
    assert any(t.endswith("?") for t in texts) and any(t.endswith(".") for t in texts)
    # Attributes before and after the noun; the position first and last.
    assert any(re.search(r"\b(square|circle|triangle), (red|green|blue|yellow|purple|orange|cyan|white)\b", t)
               for t in lower)
    assert any(re.search(r"\b(red|green|blue|yellow|purple|orange|cyan|white) (square|circle|triangle)\b", t)
               for t in lower)
    assert 0.1 < sum(r["phrasing"].split()[-2] == "position_first" for r in sample) / len(sample) < 0.25
    assert any(t.startswith(("square", "circle", "triangle", "red", "small", "large")) for t in lower)  # no article
    # Size and position stay optional, as in the templates.
    parsed = [parse_caption(t) for t in texts]
    assert abs(np.mean([p["size"] is not None for p in parsed]) - shapes.INCLUDE_PROBABILITY) < 0.03
    assert abs(np.mean([p["position"] is not None for p in parsed]) - shapes.INCLUDE_PROBABILITY) < 0.03


def test_every_caption_parses_to_its_labels(train_records):
    test = ShapesSource("test", image_size=16, heldout_phrasing_share=0.5, num_records=2000)
    for r in train_records[:5000] + [test[i] for i in range(len(test))]:
        parsed, labels = parse_caption(r["caption"]), _labels(r)
        assert parsed["color"] == labels["color"] and parsed["shape"] == labels["shape"], r["caption"]
        assert parsed["size"] in (None, labels["size"]) and parsed["position"] in (None, labels["position"])
    # Exhaustively: every construction, every label tuple, with and without size and position.
    rng = np.random.default_rng(0)
    for forced in (False, *sorted(grammar.HELDOUT)):
        for ids in itertools.product(*(range(len(v)) for v in ATTRIBUTES.values())):
            labels = dict(zip(ATTRIBUTES, ids))
            for with_size, with_position in itertools.product((False, True), repeat=2):
                text = grammar.caption(labels, rng, include_size=with_size, include_position=with_position,
                                       heldout=forced).text
                assert parse_caption(text) == {
                    "shape": labels["shape"], "color": labels["color"],
                    "size": labels["size"] if with_size else None,
                    "position": labels["position"] if with_position else None}, text


def test_heldout_constructions_never_occur_in_training(train_records):
    assert len(train_records) == 20_000
    for r in train_records:
        assert not grammar.HELDOUT & set(r["phrasing"].split()), r["phrasing"]  # by the grammar's tag
        assert not HELDOUT_SURFACE.search(r["caption"]), r["caption"]  # by the surface alone
        assert r["heldout_phrasing"] is False
    # The surface pattern is not vacuous: it finds every held-out construction.
    rng = np.random.default_rng(1)
    for rule in sorted(grammar.HELDOUT):
        for _ in range(300):
            drawn = grammar.caption(shapes.sample_labels(rng, allow_heldout=True), rng, heldout=rule)
            assert rule in drawn.rules and drawn.heldout
            assert HELDOUT_SURFACE.search(drawn.text), drawn.text


def test_test_split_flags_heldout_phrasings():
    n = 2000
    default = ShapesSource("test", image_size=16, num_records=n)
    none = ShapesSource("test", image_size=16, num_records=n, heldout_phrasing_share=0.0)
    every = ShapesSource("test", image_size=16, num_records=n, heldout_phrasing_share=1.0)
    flagged = 0
    rules = Counter()
    for i in range(n):
        r, plain, phrased = default[i], none[i], every[i]
        assert r["heldout_phrasing"] == bool(HELDOUT_SURFACE.search(r["caption"])), r["caption"]
        assert r["heldout_phrasing"] == bool(grammar.HELDOUT & set(r["phrasing"].split()))
        flagged += r["heldout_phrasing"]
        if not r["heldout_phrasing"]:
            assert r["caption"] == plain["caption"]  # the share changes only the flagged captions
        assert not plain["heldout_phrasing"] and phrased["heldout_phrasing"]
        assert HELDOUT_SURFACE.search(phrased["caption"]) and not HELDOUT_SURFACE.search(plain["caption"])
        assert phrased["image"].tobytes() == plain["image"].tobytes()
        assert _labels(phrased) == _labels(plain) and phrased["unseen"] == plain["unseen"]
        rules.update(grammar.HELDOUT & set(phrased["phrasing"].split()))
    assert abs(flagged / n - shapes.TEST_HELDOUT_PHRASING_SHARE) < 0.03
    assert set(rules) == grammar.HELDOUT and min(rules.values()) > n / 8
    # Held-out phrasings on the held-out pairs: both hold-outs at once.
    assert sum(every[i]["unseen"] for i in range(n)) > n / 16


def test_captions_fit_the_tokenizer(train_records):
    lengths = [len(r["caption"].encode()) for r in train_records]
    assert max(lengths) <= grammar.MAX_BYTES == 64 - 2
    assert np.mean(lengths) > 25  # real sentences, not only the compact fallback
    # The compact form (taken after MAX_ATTEMPTS long draws) fits every label tuple and rule.
    for forced in (None, *sorted(grammar.HELDOUT)):
        for names in itertools.product(*ATTRIBUTES.values()):
            shape, color, size, position = names
            for with_size, with_position in itertools.product((False, True), repeat=2):
                words = grammar.Words(color, shape, size if with_size else None, position if with_position else None)
                text = grammar._build(grammar._Choices(None), words, forced).text
                assert len(text.encode()) <= grammar.MAX_BYTES, text


def test_function_words_never_contain_attribute_words(train_records):
    """Code that finds attribute words by substring (e.g. an edit swapping the color word) must
    not hit a function word: "colored" would hide a "red"."""
    rng = np.random.default_rng(2)
    texts = [r["caption"] for r in train_records[:5000]]
    texts += [grammar.caption(shapes.sample_labels(rng, allow_heldout=True), rng, heldout=True).text
              for _ in range(3000)]
    vocabulary = {w for t in texts for w in re.findall(r"[a-z']+", t.lower())} - set(ATTRIBUTE_WORDS)
    for word in vocabulary:
        assert not any(a in word for a in ATTRIBUTE_WORDS), word


def test_heldout_attribute_prompts():
    for attribute in ATTRIBUTES:
        prompts = grammar.heldout_attribute_prompts(attribute)
        assert prompts == grammar.heldout_attribute_prompts(attribute)
        assert len(prompts) == len(ATTRIBUTES[attribute])
        builtin = shapes.attribute_prompts(attribute)
        for value, per_class, plain in zip(range(len(prompts)), prompts, builtin):
            assert len(per_class) == len(plain) * len(grammar.HELDOUT)
            for text in per_class:
                assert HELDOUT_SURFACE.search(text), text
                assert parse_caption(text)[attribute] == value, text
                assert len(text.encode()) <= grammar.MAX_BYTES
    with pytest.raises(ValueError, match="attribute"):
        grammar.heldout_attribute_prompts("texture")
    with pytest.raises(ValueError, match="held-out rule"):
        grammar.caption({"shape": 0, "color": 0, "size": 0, "position": 0}, np.random.default_rng(0),
                        heldout="adjectives")


def test_config_key_and_its_validation():
    from mmjax.config import ConfigError, load_config

    path = os.path.join(REPO, "configs", "vae_shapes.py:tiny")
    assert load_config(path).data.captions == "grammar"
    assert load_config(path, ["data.captions=templates"]).data.captions == "templates"
    with pytest.raises(ConfigError, match="data.captions.*'fancy'"):
        load_config(path, ["data.captions=fancy"])
    with pytest.raises(ConfigError, match="data.captions"):
        load_config(path, ["data.captions=1"])


def test_saved_configs_without_the_key_mean_templates():
    import ml_collections

    from mmjax.config import base_config
    from mmjax.data import pipeline

    with open(os.path.join(REPO, "pretrained", "ldm_shapes", "config.json")) as f:
        saved = json.load(f)
    assert "captions" not in saved["data"]
    data_cfg = ml_collections.ConfigDict(saved["data"])
    assert shapes.caption_style(data_cfg) == "templates"
    assert pipeline.make_source(data_cfg, "train")[3]["caption"] == "white triangle, large, top right"
    new = base_config().data
    new.num_train = 10
    assert pipeline.make_source(new, "train")[3]["caption"] != "white triangle, large, top right"
    assert pipeline.make_source(new, "train").captions == "grammar"


def test_resume_across_caption_styles():
    """An older workdir (no data.captions: templates) resumes only with data.captions=templates;
    the new default, grammar, is refused with a message naming the key."""
    import copy

    from mmjax.train.loop import ResumeMismatchError, check_resume_compatible

    with open(os.path.join(REPO, "pretrained", "ldm_shapes", "config.json")) as f:
        saved = json.load(f)
    current = copy.deepcopy(saved)
    current["data"]["captions"] = "grammar"
    with pytest.raises(ResumeMismatchError, match=r"data.captions: checkpoint has 'templates', config has 'grammar'"):
        check_resume_compatible(saved, current)
    current["data"]["captions"] = "templates"
    check_resume_compatible(saved, current)
    check_resume_compatible(saved, saved)
    check_resume_compatible(current, saved)
    grammar_run = copy.deepcopy(current)
    grammar_run["data"]["captions"] = "grammar"
    check_resume_compatible(grammar_run, grammar_run)
    with pytest.raises(ResumeMismatchError, match="data.captions"):
        check_resume_compatible(grammar_run, current)
