"""A caption grammar for `shapes`: many surface forms over the dataset's own attribute words.

Only the words of `shapes.ATTRIBUTES` name anything (8 colors, 3 shapes, 2 sizes, 9 positions);
everything around them varies: where color and size sit around the noun, where the position
goes, leading phrases, imperative and request forms, list and key-value styles, punctuation,
articles and letter case. A caption is one rule from each slot it uses (frame, lead, noun,
place, order) plus a letter case; rules are named, so a whole construction can be held out.

Held-out phrasings: the rules named in `HELDOUT` never occur in train captions. The test split
phrases a share of its captions with one of them (`caption(..., heldout=True)`) and flags those
records `heldout_phrasing=True`, beside `unseen` for the held-out (color, shape) pairs. A model
that reads the attribute words, not the wording it memorised around them, scores the same on
both.

Every caption fits `MAX_BYTES` (62: `data.max_len` 64 minus BOS and EOS). A drawn surface form
that is longer is redrawn from the same rng, and after `MAX_ATTEMPTS` the compact form (the
first option of every choice) is used, so a caption stays a pure function of its rng.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple

import numpy as np

from mmjax.data.shapes import ATTRIBUTES, INCLUDE_PROBABILITY, attribute_id

MAX_BYTES = 62
MAX_ATTEMPTS = 20
# Whole constructions that train captions never use (see the module docstring).
HELDOUT = frozenset({"key_value", "relative", "would_like", "sketch"})


class Words(NamedTuple):
    """The attribute words a caption names; size and position None when it leaves them open."""
    color: str
    shape: str
    size: str | None
    position: str | None


class Caption(NamedTuple):
    text: str
    rules: tuple[str, ...]  # the rules used, in slot order, then the letter case

    @property
    def heldout(self) -> bool:
        return not HELDOUT.isdisjoint(self.rules)

    @property
    def construction(self) -> str:
        """The rules without the letter case: what a held-out phrasing is made of."""
        return "/".join(self.rules[:-1])


class _Choices:
    """The grammar's randomness: the caption's rng, or (rng None) the compact form: always the
    first option and no optional extras, which every rule keeps short."""

    def __init__(self, rng: np.random.Generator | None):
        self.rng = rng

    def pick(self, options, weights=None):
        if self.rng is None:
            return options[0]
        if weights is None:
            return options[int(self.rng.integers(len(options)))]
        p = np.asarray(weights, np.float64)
        return options[int(self.rng.choice(len(options), p=p / p.sum()))]

    def chance(self, probability: float) -> bool:
        return self.rng is not None and bool(self.rng.random() < probability)


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    weight: float
    build: Callable


def _article(ch: _Choices, text: str) -> str:
    """An optional article: a/an, none, "one" or "the"."""
    article = ch.pick(("a", "", "one", "the"), (0.6, 0.25, 0.075, 0.075))
    if article == "a" and text[0] in "aeiou":
        article = "an"
    return f"{article} {text}" if article else text


# ----------------------------------------------------------------------------- nouns
# How color and size sit around the shape noun.


def _noun_adjectives(ch, w: Words) -> str:  # "a small red square"
    if w.size is None:
        return _article(ch, f"{w.color} {w.shape}")
    first, second = ch.pick(((w.size, w.color), (w.color, w.size)), (0.85, 0.15))
    return _article(ch, f"{first} {second} {w.shape}")


def _noun_postposed(ch, w: Words) -> str:  # "a square, red"
    if w.size is None:
        return _article(ch, f"{w.shape}, {w.color}")
    form = ch.pick(("{size} {shape}, {color}", "{shape}, {color}, {size}", "{shape}, {color} and {size}",
                    "{shape}, {size} and {color}"))
    return _article(ch, form.format(**w._asdict()))


def _noun_in_color(ch, w: Words) -> str:  # "a small square in red"
    noun = w.shape if w.size is None else f"{w.size} {w.shape}"
    return _article(ch, f"{noun} {ch.pick(('in', 'painted'))} {w.color}")


def _noun_relative(ch, w: Words) -> str:  # held out: "a square that is red"
    that = ch.pick(("that is", "which is", "that's"))
    if w.size is None:
        return _article(ch, f"{w.shape} {that} {w.color}")
    form = ch.pick(("{shape} {that} {size} and {color}", "{size} {shape} {that} {color}",
                    "{shape} {that} {color} and {size}"))
    return _article(ch, form.format(that=that, **w._asdict()))


NOUNS = (
    Rule("adjectives", 4.0, _noun_adjectives),
    Rule("postposed", 1.0, _noun_postposed),
    Rule("in_color", 1.0, _noun_in_color),
    Rule("relative", 1.0, _noun_relative),
)

# ----------------------------------------------------------------------------- places
# How a position is said. The first preposition of each is the compact form's.

_PREPOSITIONS = {
    "top left": ("at", "in"), "top": ("at", "along", "near"), "top right": ("at", "in"),
    "left": ("on", "at", "to"), "center": ("in", "at"), "right": ("on", "at", "to"),
    "bottom left": ("at", "in"), "bottom": ("at", "along", "near"), "bottom right": ("at", "in"),
}


def _place_prep(ch, position: str) -> str:  # "at the top left", "on the left", "in center"
    the = "" if ch.chance(0.15) else "the "
    return f"{ch.pick(_PREPOSITIONS[position])} {the}{position}"


def _place_region(ch, position: str) -> str:  # "in the top left corner", "on the left side"
    if position == "center":
        return "in the center"
    if " " in position:
        return f"in the {position} corner"
    if position in ("left", "right"):
        return f"on the {position} side"
    return f"{ch.pick(('at', 'along'))} the {position} edge"


def _place_of_image(ch, position: str) -> str:  # "at the top of the picture"
    return f"{ch.pick(_PREPOSITIONS[position])} the {position} of the {ch.pick(('image', 'picture', 'canvas', 'frame'))}"


def _place_bare(ch, position: str) -> str:  # "top left" (always set off by a comma)
    return position


PLACES = (
    Rule("prep", 4.0, _place_prep),
    Rule("region", 1.5, _place_region),
    Rule("of_image", 1.0, _place_of_image),
    Rule("bare_place", 1.0, _place_bare),
)
ORDERS = (Rule("position_last", 3.0, None), Rule("position_first", 1.0, None))

# ----------------------------------------------------------------------------- leads
# A lead gives (words before the object, words after it and its place, possible endings).

_VERBS = ("draw", "paint", "make", "render", "create", "generate", "produce")


def _lead_bare(ch):
    return "", "", ("", ".")


def _lead_there_is(ch):
    return ch.pick(("there is ", "there's ")), "", ("", ".")


def _lead_depiction(ch):
    noun = ch.pick(("a picture", "an image", "a drawing", "a photo", "an illustration", "a render"))
    return f"{noun} of ", "", ("", ".")


def _lead_imperative(ch):
    verb = ch.pick(_VERBS)
    if ch.chance(0.25):
        return f"please {verb} ", "", ("", ".", "!")
    return f"{verb} ", ", please" if ch.chance(0.1) else "", ("", ".", "!")


def _lead_question(ch):
    please = "please " if ch.chance(0.2) else ""
    return f"{ch.pick(('can', 'could', 'would', 'will'))} you {please}{ch.pick(_VERBS)} ", "", ("?",)


def _lead_show_me(ch):
    return ch.pick(("show me ", "give me ")), "", ("", ".", "!")


def _lead_want(ch):
    return ch.pick(("i want ", "i need ", "we need ", "i want to see ")), "", ("", ".")


def _lead_would_like(ch):  # held out
    return ch.pick(("i'd like ", "i would like ", "i'd love ", "i'd like to see ")), "", ("", ".")


def _lead_sketch(ch):  # held out: the request verb "sketch", in every request form
    return ch.pick(("sketch ", "please sketch ", "could you sketch ", "can you sketch ")), "", ("", ".")


LEADS = (
    Rule("plain", 3.0, _lead_bare),
    Rule("there_is", 1.0, _lead_there_is),
    Rule("depiction", 1.5, _lead_depiction),
    Rule("imperative", 2.0, _lead_imperative),
    Rule("question", 1.5, _lead_question),
    Rule("show_me", 1.0, _lead_show_me),
    Rule("want", 1.0, _lead_want),
    Rule("would_like", 1.0, _lead_would_like),
    Rule("sketch", 1.0, _lead_sketch),
)

# ----------------------------------------------------------------------------- frames


def _choose(ch: _Choices, rules: tuple[Rule, ...], forced: str | None) -> Rule:
    """The forced (held-out) rule if it belongs to this slot, else a training rule by weight."""
    for rule in rules:
        if rule.name == forced:
            return rule
    allowed = [r for r in rules if r.name not in HELDOUT]
    return ch.pick(allowed, [r.weight for r in allowed])


def _placed(ch, w: Words, forced, rules: list, head: str, tail: str = "") -> str:
    """`head` (+ `tail`) with the position before or after it, when the caption names one."""
    if w.position is None:
        return head + tail
    place, order = _choose(ch, PLACES, forced), _choose(ch, ORDERS, forced)
    rules += [place.name, order.name]
    where = place.build(ch, w.position)
    if order.name == "position_last":
        return head + (", " if place.name == "bare_place" or ch.chance(0.15) else " ") + where + tail
    return where + (" " if place.name != "bare_place" and ch.chance(0.3) else ", ") + head + tail


def _frame_phrase(ch, w: Words, forced, rules: list) -> str:  # "could you draw a red square on the left?"
    lead, noun = _choose(ch, LEADS, forced), _choose(ch, NOUNS, forced)
    rules += [lead.name, noun.name]
    before, after, endings = lead.build(ch)
    return _placed(ch, w, forced, rules, before + noun.build(ch, w), after) + ch.pick(endings)


def _frame_copula(ch, w: Words, forced, rules: list) -> str:  # "the square is small and red, on the left"
    if w.size is None:
        predicate = w.color
    else:
        predicate = ch.pick(("{color} and {size}", "{size} and {color}")).format(**w._asdict())
    head = f"{ch.pick(('the', 'this'))} {w.shape} is {predicate}"
    return _placed(ch, w, forced, rules, head) + ch.pick(("", "."))


def _frame_list(ch, w: Words, forced, rules: list) -> str:  # "red square; small; top left"
    noun = ch.pick((f"{w.color} {w.shape}", f"{w.shape}, {w.color}"), (0.75, 0.25))
    rest = [v for v in (w.size, w.position) if v]
    if len(rest) == 2 and ch.chance(0.3):
        rest.reverse()
    return ch.pick((", ", "; ", " / ", " - ")).join([noun, *rest]) + ch.pick(("", "."), (0.8, 0.2))


def _frame_key_value(ch, w: Words, forced, rules: list) -> str:  # held out: "color: red, shape: square"
    keys = {"color": ch.pick(("color", "colour")), "shape": "shape", "size": "size",
            "position": ch.pick(("pos", "position", "location"))}
    items = [a for a in ("color", "shape", "size", "position") if getattr(w, a) is not None]
    if ch.chance(0.5):
        items = [items[i] for i in ch.rng.permutation(len(items))]
    assign = ch.pick(("=", ": ", ":"))
    return ch.pick((", ", "; ", " | ")).join(f"{keys[a]}{assign}{getattr(w, a)}" for a in items)


FRAMES = (
    Rule("phrase", 8.0, _frame_phrase),
    Rule("copula", 1.0, _frame_copula),
    Rule("list", 1.5, _frame_list),
    Rule("key_value", 1.0, _frame_key_value),
)
# Frames that build an object phrase from a lead and a noun: a held-out lead or noun uses one.
_PHRASE_SLOTS = {r.name for r in LEADS + NOUNS}

CASES = ("lower", "sentence", "title", "upper")
CASE_WEIGHTS = (0.45, 0.25, 0.15, 0.15)


def _in_case(text: str, case: str) -> str:
    if case == "upper":
        return text.upper()
    if case == "sentence":
        return text[:1].upper() + text[1:]
    if case == "title":  # not str.title(), which makes "i'd" "I'D"
        return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))
    return text


RULE_NAMES = tuple(r.name for slot in (FRAMES, LEADS, NOUNS, PLACES, ORDERS) for r in slot)
if len(set(RULE_NAMES)) != len(RULE_NAMES) or not HELDOUT <= set(RULE_NAMES):
    raise AssertionError("grammar rule names must be unique and HELDOUT must name rules")


def _build(ch: _Choices, w: Words, forced: str | None) -> Caption:
    if forced in _PHRASE_SLOTS:
        frame = FRAMES[0]
    else:
        frame = _choose(ch, FRAMES, forced)
    rules = [frame.name]
    text = frame.build(ch, w, forced, rules)
    case = ch.pick(CASES, CASE_WEIGHTS)
    return Caption(_in_case(text, case), (*rules, case))


def caption(
    labels: Mapping[str, int | str],
    rng: np.random.Generator,
    *,
    include_size: bool | None = None,
    include_position: bool | None = None,
    heldout: bool | str = False,
) -> Caption:
    """A caption from the grammar naming the labels' color and shape, and optionally size and
    position (each drawn with probability INCLUDE_PROBABILITY unless given, as in the templates).

    `heldout=False` uses training rules only; True phrases the caption with one of the rules in
    `HELDOUT`, drawn uniformly; a rule's name forces that one. Draws only from `rng`.
    """
    if include_size is None:
        include_size = bool(rng.random() < INCLUDE_PROBABILITY)
    if include_position is None:
        include_position = bool(rng.random() < INCLUDE_PROBABILITY)
    names = {a: ATTRIBUTES[a][attribute_id(a, labels[a])] for a in ATTRIBUTES}
    words = Words(names["color"], names["shape"], names["size"] if include_size else None,
                  names["position"] if include_position else None)
    if heldout is True:
        forced = sorted(HELDOUT)[int(rng.integers(len(HELDOUT)))]
    elif heldout:
        if heldout not in HELDOUT:
            raise ValueError(f"heldout={heldout!r} names no held-out rule; expected one of {sorted(HELDOUT)}")
        forced = heldout
    else:
        forced = None
    for _ in range(MAX_ATTEMPTS):
        drawn = _build(_Choices(rng), words, forced)
        if len(drawn.text.encode("utf-8")) <= MAX_BYTES:
            return drawn
    return _build(_Choices(None), words, forced)


def heldout_attribute_prompts(attribute: str, seed: int = 0) -> list[list[str]]:
    """Zero-shot prompts for one attribute in held-out phrasings: per class, the label sets of
    `shapes.attribute_prompts` (that value with every color and shape a caption must name), each
    phrased once with every held-out rule. Deterministic in `seed`."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {tuple(ATTRIBUTES)}")
    rng = np.random.default_rng([int(seed), list(ATTRIBUTES).index(attribute)])
    prompts = []
    for value in ATTRIBUTES[attribute]:
        per_class = []
        for shape in ATTRIBUTES["shape"]:
            for color in ATTRIBUTES["color"]:
                labels = {"shape": shape, "color": color, "size": "small", "position": "center"}
                if attribute in ("shape", "color") and labels[attribute] != value:
                    continue
                labels[attribute] = value
                for rule in sorted(HELDOUT):
                    per_class.append(caption(labels, rng, include_size=attribute == "size",
                                             include_position=attribute == "position", heldout=rule).text)
        prompts.append(per_class)
    return prompts
