"""The shapes dataset's spec: later evaluation scores generators against these labels."""
import itertools
import math
import re
from collections import Counter

import numpy as np
import pytest

from mmjax.data import shapes
from mmjax.data.shapes import (
    ATTRIBUTES,
    COLOR_NAMES,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesSource,
    caption_for,
    make_example,
    parse_caption,
    render,
)


def _object_mask(image):
    return image.max(axis=-1) > 0


def _coverage(image, color):
    """Per-pixel object coverage in [0, 1], from the channel where the colour is brightest."""
    channel = int(np.argmax(COLORS[color]))
    return image[..., channel].astype(np.float64) / COLORS[color][channel]


def _record(labels, image_size=32, seed=0):
    return make_example(labels, np.random.default_rng(seed), image_size)


def test_constants_match_spec():
    assert SHAPES == ("circle", "square", "triangle")
    assert COLOR_NAMES == ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
    assert COLORS["purple"] == (150, 60, 200) and COLORS["white"] == (235, 235, 235)
    assert SIZES == ("small", "large") and len(POSITIONS) == 9
    assert set(HELDOUT_PAIRS) == {("purple", "triangle"), ("cyan", "square"), ("orange", "circle")}
    # (x, y) of each position's centre at S = 32: a quarter, half or three quarters across.
    assert shapes.position_center("top left", 32) == (8, 8)
    assert shapes.position_center("top", 32) == (16, 8)
    assert shapes.position_center("right", 32) == (24, 16)
    assert shapes.position_center("bottom left", 32) == (8, 24)
    assert shapes.half_extent("small", 100) == pytest.approx(12)
    assert shapes.half_extent("large", 100) == pytest.approx(22)


@pytest.mark.parametrize("color", COLOR_NAMES)
def test_dominant_color_is_palette(color):
    labels = {"shape": "square", "color": color, "size": "large", "position": "center"}
    image = _record(labels)["image"]
    pixels = image[_object_mask(image)]
    dominant, count = Counter(map(tuple, pixels)).most_common(1)[0]
    assert dominant == COLORS[color]
    assert count > 0.5 * len(pixels)
    corner = image[:3, :3].reshape(-1, 3)
    assert (corner == 0).all(), "background must be black"


@pytest.mark.parametrize("shape", SHAPES)
def test_areas_match_geometry(shape):
    s = 64
    areas = {}
    for size in SIZES:
        h = shapes.SIZE_FRACTIONS[size] * s
        image = render(shape, "red", size, (s / 2, s / 2), s)
        areas[size] = _coverage(image, "red").sum()
        expected = {"circle": math.pi * h * h, "square": 4 * h * h, "triangle": 2 * h * h}[shape]
        assert areas[size] == pytest.approx(expected, rel=0.05)
    assert areas["large"] / areas["small"] == pytest.approx((0.22 / 0.12) ** 2, rel=0.08)


def test_edges_are_antialiased():
    image = render("circle", "white", "large", (16.3, 15.8), 32)
    levels = np.unique(image[..., 0])
    assert len(levels) > 4, "box-filtered supersampling should give intermediate edge values"


@pytest.mark.parametrize("image_size", [16, 32, 48])
def test_position_and_containment(image_size):
    rng = np.random.default_rng(1)
    for position, shape, size in itertools.product(range(9), range(3), range(2)):
        labels = {"shape": shape, "color": 0, "size": size, "position": position}
        image = make_example(labels, rng, image_size)["image"]
        ys, xs = np.nonzero(_coverage(image, "red") > 0.5)
        center = np.array([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2])
        expected = np.array(shapes.position_center(position, image_size))
        # Jitter is +-0.04 S per axis; one pixel slack for the rasterised bounding box.
        assert np.abs(center - expected).max() <= 0.04 * image_size + 1.0, (position, shape, size)
        assert not image[[0, -1]].any() and not image[:, [0, -1]].any(), "object touches the border"


@pytest.mark.parametrize("image_size", [16, 17, 100, 256])
def test_wholly_inside_at_many_sizes(image_size):
    source = ShapesSource(image_size=image_size, num_records=40)
    count = 3 if image_size == 256 else 40
    for i in range(count):
        image = source[i]["image"]
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
        assert image.any()
        assert not image[[0, -1]].any() and not image[:, [0, -1]].any()
    # A large object pushed to a corner is clipped, not cut.
    labels = {"shape": "square", "color": "red", "size": "large", "position": "top left"}
    corner = make_example(labels, np.random.default_rng(0), image_size)["image"]
    assert not corner[0].any() and not corner[:, 0].any()


@pytest.mark.parametrize("bad", [15, 257, 0, 32.0, "32"])
def test_invalid_image_size(bad):
    with pytest.raises(ValueError, match="image_size"):
        ShapesSource(image_size=bad)
    with pytest.raises(ValueError, match="image_size"):
        render("circle", "red", "small", (8, 8), bad)


def test_record_format_and_determinism():
    a, b = ShapesSource(seed=5), ShapesSource(seed=5)
    r = a[7]
    assert set(r) == {"image", "caption", "shape", "color", "size", "position", "unseen",
                      "heldout_phrasing", "phrasing"}
    for key in ("shape", "color", "size", "position"):
        assert isinstance(r[key], np.int32)
    assert isinstance(r["caption"], str) and isinstance(r["unseen"], bool)
    assert isinstance(r["heldout_phrasing"], bool) and isinstance(r["phrasing"], str)
    assert r["image"].tobytes() == b[7]["image"].tobytes() and r["caption"] == b[7]["caption"]
    assert r["image"].tobytes() != a[8]["image"].tobytes()
    assert r["image"].tobytes() != ShapesSource(seed=6)[7]["image"].tobytes()
    assert len(ShapesSource()) == 100_000 and len(ShapesSource("test")) == 2_000
    assert len(ShapesSource("test", num_records=10)) == 10
    with pytest.raises(IndexError):
        a[100_000]
    with pytest.raises(ValueError, match="split"):
        ShapesSource("validation")


def test_heldout_pairs_only_in_test():
    heldout = {(COLOR_NAMES.index(c), SHAPES.index(s)) for c, s in HELDOUT_PAIRS}
    train = ShapesSource("train", image_size=16, num_records=3000)
    records = [train[i] for i in range(len(train))]
    train_pairs = Counter((int(r["color"]), int(r["shape"])) for r in records)
    assert not heldout & set(train_pairs)
    assert len(train_pairs) == 24 - 3, "every other pair should occur"
    assert not any(r["unseen"] for r in records)

    test = ShapesSource("test", image_size=16)
    records = [test[i] for i in range(len(test))]
    seen_heldout = {(int(r["color"]), int(r["shape"])) for r in records if r["unseen"]}
    assert seen_heldout == heldout
    for r in records:
        assert r["unseen"] == ((int(r["color"]), int(r["shape"])) in heldout)


def test_train_and_test_are_disjoint():
    # Images alone can coincide (the jitter is quantised by supersampling), so check the
    # random streams: test index i is global index 2**30 + i, beyond every train index.
    train_streams = {shapes.record_rng(0, "train", i).bytes(16) for i in range(5000)}
    for i in range(200):
        stream = shapes.record_rng(0, "test", i)
        assert stream.bytes(16) == np.random.default_rng([0, 2**30 + i]).bytes(16)
    assert not any(shapes.record_rng(0, "test", i).bytes(16) in train_streams for i in range(200))
    train, test = ShapesSource("train", num_records=20), ShapesSource("test", num_records=20)
    assert all(train[i]["caption"] != test[i]["caption"] or
               train[i]["image"].tobytes() != test[i]["image"].tobytes() for i in range(20))
    with pytest.raises(ValueError, match="num_records"):
        ShapesSource("train", num_records=2**30 + 1)


@pytest.mark.parametrize("captions", ["grammar", "templates"])
def test_captions_name_their_labels(captions):
    source = ShapesSource("test", image_size=16, num_records=300, captions=captions)
    for i in range(len(source)):
        r = source[i]
        parsed = parse_caption(r["caption"])
        words = re.findall(r"[a-z]+", r["caption"].lower())
        assert COLOR_NAMES[r["color"]] in words and SHAPES[r["shape"]] in words
        assert parsed["color"] == r["color"] and parsed["shape"] == r["shape"]
        for key in ("size", "position"):
            assert parsed[key] in (None, r[key])


def test_inclusion_frequencies_and_templates():
    rng = np.random.default_rng(0)
    n = 2000
    has = Counter()
    skeletons = set()
    for _ in range(n):
        labels = shapes.sample_labels(rng, allow_heldout=True)
        caption = caption_for(labels, rng)
        parsed = parse_caption(caption)
        has["size"] += parsed["size"] is not None
        has["position"] += parsed["position"] is not None
        skeleton = caption
        for word in sorted(itertools.chain(*ATTRIBUTES.values()), key=len, reverse=True):
            skeleton = re.sub(rf"\b{word}\b", "#", skeleton)
        skeletons.add(re.sub(r"\ban?\b", "a", skeleton))
    assert abs(has["size"] / n - 0.7) < 0.05
    assert abs(has["position"] / n - 0.7) < 0.05
    full = {
        caption_for({"shape": 0, "color": 0, "size": 0, "position": 0}, template=t,
                    include_size=True, include_position=True)
        for t in range(len(shapes.TEMPLATES))
    }
    assert len(full) >= 5
    assert len(skeletons) >= 5 * 2  # templates times optional parts


def test_example_captions_read_naturally():
    labels = {"shape": "circle", "color": "orange", "size": "large", "position": "top left"}
    text = caption_for(labels, template=0, include_size=False, include_position=True)
    assert text == "an orange circle at the top left"
    text = caption_for(labels, template=1, include_size=True, include_position=True)
    assert text == "orange circle, large, top left"
    center = dict(labels, position="center", color="blue", shape="square", size="small")
    assert caption_for(center, template=2, include_size=True, include_position=True) == (
        "there is a small blue square in the center"
    )
    with pytest.raises(ValueError, match="rng"):
        caption_for(labels)


def test_parse_caption_round_trip_exhaustive():
    ranges = (range(len(v)) for v in ATTRIBUTES.values())
    for shape, color, size, position in itertools.product(*ranges):
        labels = {"shape": shape, "color": color, "size": size, "position": position}
        for template, with_size, with_position in itertools.product(
            range(len(shapes.TEMPLATES)), (False, True), (False, True)
        ):
            text = caption_for(labels, template=template, include_size=with_size,
                               include_position=with_position)
            assert parse_caption(text) == {
                "shape": shape,
                "color": color,
                "size": size if with_size else None,
                "position": position if with_position else None,
            }, text


def test_parse_caption_free_text_and_errors():
    assert parse_caption("A BIG Red Triangle in the middle.") == {
        "shape": 2, "color": 0, "size": 1, "position": 4}
    assert parse_caption("green circle towards the bottom")["position"] == POSITIONS.index("bottom")
    with pytest.raises(ValueError, match="color"):
        parse_caption("a large circle")
    with pytest.raises(ValueError, match="shape"):
        parse_caption("something red")
    with pytest.raises(ValueError, match="several"):
        parse_caption("a red and blue circle")


def test_heldout_in_train_option_includes_the_pairs():
    from mmjax.data.shapes import COLOR_NAMES, HELDOUT_PAIRS, SHAPES, ShapesSource

    source = ShapesSource("train", image_size=16, heldout_in_train=True)
    seen = {(COLOR_NAMES[int(r["color"])], SHAPES[int(r["shape"])]) for r in (source[i] for i in range(400))}
    assert set(map(tuple, HELDOUT_PAIRS)) <= seen


# Recorded from the code before the caption grammar existed (16-pixel images, sha1 prefixes):
# captions="templates" must reproduce every old record byte for byte, as the shipped
# pretrained/ldm_shapes and any older workdir were trained on these.
OLD_TEMPLATE_RECORDS = [
    ("train", 0, 0, "purple circle at the top left", "03ddd7c55b8a"),
    ("train", 0, 1, "white square, small", "9e8291176762"),
    ("train", 0, 2, "small white circle on the left", "352284f2a202"),
    ("train", 0, 3, "white triangle, large, top right", "6d1b423946c5"),
    ("train", 0, 4, "at the top right, a yellow triangle", "96082e2e8f3f"),
    ("train", 0, 5, "orange square, large, center", "b954a85ca1e3"),
    ("train", 0, 6, "at the top, a large yellow square", "3def977a1e55"),
    ("train", 0, 7, "a cyan circle", "db1137909e13"),
    ("test", 0, 0, "a large green triangle at the top right", "52f30f8baa2e"),
    ("test", 0, 1, "a picture of a small yellow square in the center", "ffd1b429be45"),
    ("test", 0, 2, "small green circle at the top", "12986dd5a155"),
    ("test", 0, 3, "at the top, a large blue square", "a88c97db19e5"),
    ("train", 3, 100, "a red triangle in the center", "db281e8d6466"),
    ("train", 3, 12345, "a large cyan triangle at the bottom left", "2b7dbb476242"),
]


def test_templates_style_reproduces_the_old_records():
    import hashlib

    for split, seed, index, caption, image_sha1 in OLD_TEMPLATE_RECORDS:
        r = ShapesSource(split, image_size=16, seed=seed, captions="templates")[index]
        assert r["caption"] == caption
        assert hashlib.sha1(r["image"].tobytes()).hexdigest()[:12] == image_sha1
        assert r["heldout_phrasing"] is False and r["phrasing"] == "templates"
        # The grammar draws the caption last: the same image and labels, another caption.
        g = ShapesSource(split, image_size=16, seed=seed, captions="grammar")[index]
        assert g["image"].tobytes() == r["image"].tobytes() and g["caption"] != caption
        assert all(g[a] == r[a] for a in ATTRIBUTES) and g["unseen"] == r["unseen"]


def test_caption_style_arguments():
    with pytest.raises(ValueError, match="captions"):
        ShapesSource(captions="fancy")
    with pytest.raises(ValueError, match="train split"):
        ShapesSource("train", heldout_phrasing_share=0.5)
    with pytest.raises(ValueError, match="templates"):
        ShapesSource("test", captions="templates", heldout_phrasing_share=0.5)
    with pytest.raises(ValueError, match="heldout_phrasing_share"):
        ShapesSource("test", heldout_phrasing_share=1.5)
    assert ShapesSource("test").heldout_phrasing_share == shapes.TEST_HELDOUT_PHRASING_SHARE
    assert ShapesSource("test", captions="templates").heldout_phrasing_share == 0.0
    # A saved config without the key predates the grammar.
    assert shapes.caption_style({"name": "shapes"}) == "templates"
    assert shapes.caption_style({"captions": "grammar"}) == "grammar"
    from mmjax.config import base_config

    assert shapes.caption_style(base_config().data) == "grammar"
