"""The built-in procedural `shapes` dataset: one coloured shape on black, with a caption.

Every record is a pure function of (seed, split, index), so the dataset needs no files,
is identical on every host, and supports exact resume. The labels are known exactly, which
lets evaluation score a generator by classifying its images against the prompt's labels.

Compositional hold-out: the (color, shape) pairs in `HELDOUT_PAIRS` never occur in the
train split; the test split contains them and flags them with `unseen=True`, so a model can
be tested on combinations of attributes it only ever saw separately.

Captions come from one of two styles (`data.captions`): "grammar", the caption grammar of
`mmjax.data.captions` (many phrasings; some, the held-out phrasings, occur only in the test split,
which flags them with `heldout_phrasing=True`), or "templates", the seven fixed templates below,
which every model trained before the grammar existed saw.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "white": (235, 235, 235),
}
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
ATTRIBUTES = {"shape": SHAPES, "color": COLOR_NAMES, "size": SIZES, "position": POSITIONS}
HELDOUT_PAIRS = (("purple", "triangle"), ("cyan", "square"), ("orange", "circle"))

# Circle radius, square half-side and triangle half-height, as a fraction of the image side.
SIZE_FRACTIONS = {"small": 0.12, "large": 0.22}
# Object centres sit on a 3x3 grid; `position` id p is row p // 3, column p % 3.
GRID_FRACTIONS = (0.25, 0.5, 0.75)
JITTER_FRACTION = 0.04
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 256
SUPERSAMPLE = 4
DEFAULT_NUM_RECORDS = {"train": 100_000, "test": 2_000}
# Test records use their own index range, so no test record shares a train random stream.
SPLIT_OFFSETS = {"train": 0, "test": 2**30}
INCLUDE_PROBABILITY = 0.7
CAPTION_STYLES = ("grammar", "templates")
DEFAULT_CAPTIONS = "grammar"
# A saved config without `data.captions` predates the grammar: its model saw the templates.
ABSENT_CAPTIONS = "templates"
# Grammar test split: the share of records phrased with a held-out construction.
TEST_HELDOUT_PHRASING_SHARE = 0.25

_HELDOUT_IDS = frozenset(
    (COLOR_NAMES.index(color), SHAPES.index(shape)) for color, shape in HELDOUT_PAIRS
)


def attribute_id(attribute: str, value: int | str) -> int:
    """Accepts an attribute as its id or its name, so callers can use either."""
    names = ATTRIBUTES[attribute]
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f"unknown {attribute} {value!r}; expected one of {names}")
        return names.index(value)
    value = int(value)
    if not 0 <= value < len(names):
        raise ValueError(f"{attribute} id {value} out of range [0, {len(names)})")
    return value


def is_heldout(color: int | str, shape: int | str) -> bool:
    return (attribute_id("color", color), attribute_id("shape", shape)) in _HELDOUT_IDS


def check_captions(captions: str) -> str:
    if captions not in CAPTION_STYLES:
        raise ValueError(f"shapes captions must be one of {CAPTION_STYLES}, got {captions!r}")
    return captions


def caption_style(data_cfg) -> str:
    """`data.captions` of a config, current or saved; absent means a config saved before the key
    existed, whose model was trained on the templates."""
    if hasattr(data_cfg, "get"):  # a ConfigDict or a dict read from a saved config.json
        return data_cfg.get("captions", ABSENT_CAPTIONS)
    return getattr(data_cfg, "captions", ABSENT_CAPTIONS)


def check_image_size(image_size: int) -> int:
    if not isinstance(image_size, (int, np.integer)) or not (
        MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
    ):
        raise ValueError(
            f"shapes image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], "
            f"got {image_size!r}"
        )
    return int(image_size)


# ----------------------------------------------------------------------------- rendering


def half_extent(size: int | str, image_size: int) -> float:
    """Distance from the object's centre to its bounding box edge, in pixels."""
    return SIZE_FRACTIONS[SIZES[attribute_id("size", size)]] * image_size


def position_center(position: int | str, image_size: int) -> tuple[float, float]:
    row, col = divmod(attribute_id("position", position), 3)
    return GRID_FRACTIONS[col] * image_size, GRID_FRACTIONS[row] * image_size


def sample_center(
    position: int | str, size: int | str, image_size: int, rng: np.random.Generator
) -> tuple[float, float]:
    """The grid centre plus jitter, clipped so the object and its anti-aliased edge stay
    inside with at least one black pixel of border."""
    x, y = position_center(position, image_size)
    jitter = rng.uniform(-JITTER_FRACTION, JITTER_FRACTION, size=2) * image_size
    lo = half_extent(size, image_size) + 1.0
    hi = image_size - lo
    return float(np.clip(x + jitter[0], lo, hi)), float(np.clip(y + jitter[1], lo, hi))


def render(
    shape: int | str,
    color: int | str,
    size: int | str,
    center_xy: tuple[float, float],
    image_size: int,
) -> np.ndarray:
    """Draws one object on black as uint8 [S, S, 3].

    Coordinates are continuous: pixel i covers [i, i + 1). Coverage is sampled at the
    centres of a SUPERSAMPLE x SUPERSAMPLE grid per pixel and box-averaged, so edges are
    anti-aliased while interior pixels carry the exact palette colour. The geometry is
    tested in numpy rather than drawn with PIL.ImageDraw, whose polygon fill grows shapes
    by up to half a pixel and so breaks the exact areas and the black border.
    """
    image_size = check_image_size(image_size)
    shape_name = SHAPES[attribute_id("shape", shape)]
    rgb = np.asarray(COLORS[COLOR_NAMES[attribute_id("color", color)]], np.float32)
    h = half_extent(size, image_size)
    k = SUPERSAMPLE
    samples = (np.arange(image_size * k, dtype=np.float32) + 0.5) / k
    dx = np.abs(samples - center_xy[0])[None, :]
    dy = (samples - center_xy[1])[:, None]
    if shape_name == "circle":
        inside = dx**2 + dy**2 <= h * h
    elif shape_name == "square":
        inside = (dx <= h) & (np.abs(dy) <= h)
    else:
        # Isosceles, apex up at dy = -h, base of width 2h at dy = +h.
        inside = (dy <= h) & (dx <= (dy + h) / 2)
    coverage = inside.reshape(image_size, k, image_size, k).mean(axis=(1, 3))
    return np.round(coverage[..., None] * rgb).astype(np.uint8)


# ----------------------------------------------------------------------------- captions

_POSITION_PHRASES = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}


def _noun_phrase(color: str, shape: str, size: str | None) -> str:
    words = [w for w in (size, color, shape) if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


def _where(position: str | None) -> str | None:
    return _POSITION_PHRASES[position] if position else None


def _join(*parts: str | None, sep: str = " ") -> str:
    return sep.join(p for p in parts if p)


# Each template takes attribute names, with size and position None when omitted.
def _template_article(color, shape, size, position):
    return _join(_noun_phrase(color, shape, size), _where(position))


def _template_list(color, shape, size, position):
    return _join(f"{color} {shape}", size, position, sep=", ")


def _template_there_is(color, shape, size, position):
    return "there is " + _template_article(color, shape, size, position)


def _template_picture(color, shape, size, position):
    return "a picture of " + _template_article(color, shape, size, position)


def _template_position_first(color, shape, size, position):
    return _join(_where(position), _noun_phrase(color, shape, size), sep=", ")


def _template_is(color, shape, size, position):
    return _join(f"the {shape} is {color}", size and f"and {size}", _where(position))


def _template_bare(color, shape, size, position):
    return _join(size, color, shape, _where(position))


TEMPLATES = (
    _template_article,
    _template_list,
    _template_there_is,
    _template_picture,
    _template_position_first,
    _template_is,
    _template_bare,
)


def caption_for(
    labels: Mapping[str, int | str],
    rng: np.random.Generator | None = None,
    *,
    include_size: bool | None = None,
    include_position: bool | None = None,
    template: int | None = None,
) -> str:
    """A caption naming the labels' color and shape, and optionally size and position.

    Unset choices are drawn from `rng`: each of size and position is included with
    probability 0.7, and the template is uniform. With every choice set, `rng` may be None,
    which is how a generator is prompted with a caption for given labels.
    """
    def draw(value, sampler):
        if value is not None:
            return value
        if rng is None:
            raise ValueError("caption_for needs an rng unless every choice is given")
        return sampler()

    include_size = draw(include_size, lambda: bool(rng.random() < INCLUDE_PROBABILITY))
    include_position = draw(include_position, lambda: bool(rng.random() < INCLUDE_PROBABILITY))
    template = draw(template, lambda: int(rng.integers(len(TEMPLATES))))
    names = {a: ATTRIBUTES[a][attribute_id(a, labels[a])] for a in ("shape", "color")}
    size = SIZES[attribute_id("size", labels["size"])] if include_size else None
    position = POSITIONS[attribute_id("position", labels["position"])] if include_position else None
    return TEMPLATES[template](names["color"], names["shape"], size, position)


_WORD = re.compile(r"[a-z]+")
_SYNONYMS = {"centre": "center", "middle": "center", "big": "large", "little": "small"}


def parse_caption(text: str) -> dict[str, int | None]:
    """Recovers label ids from a caption: `shape` and `color` always, `size` and `position`
    or None where the caption does not say. Raises ValueError if shape or color is missing
    or ambiguous, so a garbled prompt is never scored as if it named something."""
    words = [_SYNONYMS.get(w, w) for w in _WORD.findall(text.lower())]
    found: dict[str, int | None] = {}
    for attribute in ("shape", "color", "size"):
        hits = {ATTRIBUTES[attribute].index(w) for w in words if w in ATTRIBUTES[attribute]}
        if len(hits) > 1:
            raise ValueError(f"caption names several {attribute}s: {text!r}")
        found[attribute] = hits.pop() if hits else None
    for attribute in ("shape", "color"):
        if found[attribute] is None:
            raise ValueError(f"caption names no {attribute}: {text!r}")

    vertical = [w for w in words if w in ("top", "bottom")]
    horizontal = [w for w in words if w in ("left", "right")]
    if len(set(vertical)) > 1 or len(set(horizontal)) > 1:
        raise ValueError(f"caption names several positions: {text!r}")
    parts = vertical[:1] + horizontal[:1]
    if parts:
        found["position"] = POSITIONS.index(" ".join(parts))
    elif "center" in words:
        found["position"] = POSITIONS.index("center")
    else:
        found["position"] = None
    return found


# ----------------------------------------------------------------------------- records


def sample_labels(rng: np.random.Generator, *, allow_heldout: bool) -> dict[str, int]:
    """Uniform labels; without `allow_heldout`, (color, shape) is uniform over the pairs
    outside HELDOUT_PAIRS (redrawn from the same rng, so still deterministic)."""
    while True:
        color = int(rng.integers(len(COLOR_NAMES)))
        shape = int(rng.integers(len(SHAPES)))
        if allow_heldout or (color, shape) not in _HELDOUT_IDS:
            break
    return {
        "shape": shape,
        "color": color,
        "size": int(rng.integers(len(SIZES))),
        "position": int(rng.integers(len(POSITIONS))),
    }


def make_example(
    labels: Mapping[str, int | str],
    rng: np.random.Generator,
    image_size: int = 32,
    *,
    include_size: bool | None = None,
    include_position: bool | None = None,
    captions: str = DEFAULT_CAPTIONS,
    heldout_phrasing_share: float = 0.0,
    draw: bool = True,
) -> dict:
    """Renders a record for given labels; jitter and caption choices come from `rng`, the
    caption last, so a record's image does not depend on the caption style.

    With `captions="grammar"` the caption is phrased with a held-out construction with
    probability `heldout_phrasing_share` (always drawn, so the other records' captions do not
    depend on the share); `phrasing` names the grammar's rules ("templates" otherwise).
    `draw=False` skips rendering (`image` is None) and makes the same caption.
    """
    ids = {a: attribute_id(a, labels[a]) for a in ATTRIBUTES}
    center = sample_center(ids["position"], ids["size"], image_size, rng)
    image = render(ids["shape"], ids["color"], ids["size"], center, image_size) if draw else None
    if check_captions(captions) == "grammar":
        from mmjax.data import captions as grammar  # captions imports this module

        heldout = bool(rng.random() < heldout_phrasing_share)
        drawn = grammar.caption(ids, rng, include_size=include_size, include_position=include_position,
                                heldout=heldout)
        caption, phrasing = drawn.text, " ".join(drawn.rules)
    else:
        if heldout_phrasing_share:
            raise ValueError("the templates captions have no held-out phrasings; heldout_phrasing_share "
                             "needs captions='grammar'")
        caption = caption_for(ids, rng, include_size=include_size, include_position=include_position)
        heldout, phrasing = False, "templates"
    record = {"image": image, "caption": caption}
    record.update({a: np.int32(v) for a, v in ids.items()})
    record["unseen"] = is_heldout(ids["color"], ids["shape"])
    record["heldout_phrasing"] = heldout
    record["phrasing"] = phrasing
    return record


def record_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLIT_OFFSETS[split] + int(index)])


class ShapesSource:
    """Grain random-access source: `len(source)` records, `source[i]` is a dict with
    `image` uint8 [S, S, 3], `caption` str, `shape`/`color`/`size`/`position` np.int32,
    `unseen` bool (a held-out color-shape pair), `heldout_phrasing` bool (a held-out
    construction of the caption grammar) and `phrasing` str (the grammar's rules, or
    "templates"). Picklable and stateless, so grain worker processes can share it.

    `captions`: "grammar" or "templates" (see the module docstring). `heldout_phrasing_share`:
    the test split's share of held-out phrasings (grammar only; default
    TEST_HELDOUT_PHRASING_SHARE); the train split never has any."""

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        seed: int = 0,
        num_records: int | None = None,
        heldout_in_train: bool = False,
        captions: str = DEFAULT_CAPTIONS,
        heldout_phrasing_share: float | None = None,
    ):
        if split not in SPLIT_OFFSETS:
            raise ValueError(
                f"unknown shapes split {split!r}; expected one of {tuple(SPLIT_OFFSETS)}"
            )
        self.split = split
        self.image_size = check_image_size(image_size)
        self.seed = int(seed)
        # Only for the judge: its job is to measure every combination, not to generalise.
        self.heldout_in_train = bool(heldout_in_train)
        self.num_records = DEFAULT_NUM_RECORDS[split] if num_records is None else int(num_records)
        # Beyond 2**30 train indices would run into the test range.
        if not 0 < self.num_records <= 2**30:
            raise ValueError(f"num_records must be in [1, 2**30], got {num_records}")
        self.captions = check_captions(captions)
        if heldout_phrasing_share is None:
            heldout_phrasing_share = TEST_HELDOUT_PHRASING_SHARE if (
                split == "test" and captions == "grammar") else 0.0
        if not 0.0 <= heldout_phrasing_share <= 1.0:
            raise ValueError(f"heldout_phrasing_share must be in [0, 1], got {heldout_phrasing_share}")
        if heldout_phrasing_share and split == "train":
            raise ValueError("held-out phrasings never occur in the train split (heldout_phrasing_share > 0)")
        if heldout_phrasing_share and captions != "grammar":
            raise ValueError("the templates captions have no held-out phrasings; heldout_phrasing_share "
                             "needs captions='grammar'")
        self.heldout_phrasing_share = float(heldout_phrasing_share)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        return self._record(index, draw=True)

    def caption(self, index: int) -> str:
        """Record `index`'s caption, without rendering its image (building a vocabulary)."""
        return self._record(index, draw=False)["caption"]

    def _record(self, index: int, draw: bool) -> dict:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} out of range for {len(self)} {self.split} records")
        rng = record_rng(self.seed, self.split, index)
        labels = sample_labels(rng, allow_heldout=self.split != "train" or self.heldout_in_train)
        return make_example(labels, rng, self.image_size, captions=self.captions,
                            heldout_phrasing_share=self.heldout_phrasing_share, draw=draw)

    def __repr__(self) -> str:
        return (
            f"ShapesSource(split={self.split!r}, image_size={self.image_size}, "
            f"seed={self.seed}, num_records={self.num_records}, captions={self.captions!r})"
        )


# ----------------------------------------------------------------------------- prompt tables

def label_index(labels: Mapping[str, Any]):
    """One integer per example for its (shape, color, size, position) tuple, in the order of
    `full_captions()`; works on numpy and jax arrays alike."""
    index = labels["shape"]
    for attribute in ("color", "size", "position"):
        index = index * len(ATTRIBUTES[attribute]) + labels[attribute]
    return index


def full_captions() -> list[str]:
    """The caption naming all four attributes (first template) of every label tuple, indexed
    by `label_index`."""
    return [caption_for({"shape": s, "color": c, "size": z, "position": p},
                        include_size=True, include_position=True, template=0)
            for s in SHAPES for c in COLOR_NAMES for z in SIZES for p in POSITIONS]


def attribute_prompts(attribute: str) -> list[list[str]]:
    """Zero-shot prompts for one attribute: per class, the captions that name that value with
    every value of the attributes a caption must name (color, shape), e.g. for `color` red:
    "a red circle", "a red square", "a red triangle". A model classifies by the mean of a
    class's prompt embeddings (prompt ensembling)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {tuple(ATTRIBUTES)}")
    prompts = []
    for value in ATTRIBUTES[attribute]:
        per_class = []
        for shape in SHAPES:
            for color in COLOR_NAMES:
                labels = {"shape": shape, "color": color, "size": "small", "position": "center"}
                if attribute in ("shape", "color") and labels[attribute] != value:
                    continue
                labels[attribute] = value
                per_class.append(caption_for(labels, include_size=attribute == "size",
                                             include_position=attribute == "position", template=0))
        prompts.append(per_class)
    return prompts
