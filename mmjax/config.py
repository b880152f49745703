"""Config loading, command-line overrides and validation.

Configs are Python files with `get_config(arg=None) -> ConfigDict`; `path.py:tiny` passes
"tiny" as `arg`. Overrides come as `key.sub=value` strings and are applied to a locked config,
so a typo or a wrong type is an error that names the key, raised before anything compiles.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Iterable, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key."""


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path/to/config.py[:arg]`, applies `key=value` overrides and validates."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}")
    module_spec = importlib.util.spec_from_file_location(
        f"mmjax_config_{abs(hash(os.path.abspath(path)))}", path
    )
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is the user's to fix: say which one.
        raise ConfigError(f"could not execute config file {path!r}: {e!r}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg=None)")
    try:
        config = module.get_config(arg or None)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e
    config.lock()
    apply_overrides(config, overrides)
    resolve(config)
    validate(config)
    return config


def resolve(config: ConfigDict) -> None:
    """Lets the family fill fields derived from elsewhere (see `Family.resolve`)."""
    from mmjax import zoo

    family = zoo.FAMILIES.get(config.family)
    if family is not None and family.resolve is not None:
        try:
            family.resolve(config)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def split_override_args(args: Sequence[str]) -> list[str]:
    """`--config.a.b=1` / `--config.a.b 1` command-line words -> ["a.b=1"]; others are errors."""
    overrides, i = [], 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--config."):
            raise ConfigError(f"unrecognised argument {word!r} (overrides look like --config.optim.lr=3e-4)")
        key, sep, value = word[len("--config."):].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"override --config.{key} has no value")
            value, i = args[i + 1], i + 1
        overrides.append(f"{key}={value}")
        i += 1
    return overrides


def parse_value(text: str):
    """`3e-4` -> float, `(1, 2)` -> tuple, `true` -> True, anything unparsable -> str."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _known_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, ConfigDict):
            keys.extend(_known_keys(value, full + "."))
    return keys


def apply_overrides(config: ConfigDict, overrides: Iterable[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        set_value(config, key.strip(), parse_value(raw))


def set_value(config: ConfigDict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
        if not isinstance(node, ConfigDict) or part not in node:
            _unknown_key(config, ".".join(parents[: depth + 1]))
        node = node[part]
    if not isinstance(node, ConfigDict) or leaf not in node:
        _unknown_key(config, key)
    old = node[leaf]
    if isinstance(old, ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; override one of its fields")
    # ConfigDict converts int -> float on its own; reject the lossy and the wrong.
    if isinstance(old, bool) != isinstance(value, bool) and old is not None:
        raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {value!r}")
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"config key {key!r} expects {type(old).__name__}, got {value!r}"
        ) from e


def _unknown_key(config: ConfigDict, key: str):
    close = difflib.get_close_matches(key, _known_keys(config), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}")


def validate(config: ConfigDict) -> None:
    """Checks that need no devices: run before any directory is made or anything compiles."""
    from mmjax import zoo  # zoo imports families; keep config importable on its own

    if config.family not in zoo.FAMILIES:
        raise ConfigError(
            f"config key 'family': unknown family {config.family!r}; known: {sorted(zoo.FAMILIES)}"
        )
    family = zoo.FAMILIES[config.family]
    if config.variant not in family.variants:
        raise ConfigError(
            f"config key 'variant': family {config.family!r} has no variant {config.variant!r}; "
            f"known: {sorted(family.variants)}"
        )
    if config.dtype not in DTYPES:
        raise ConfigError(f"config key 'dtype' must be one of {DTYPES}, got {config.dtype!r}")
    from mmjax.data import pipeline

    if config.data.name not in pipeline.SOURCES:
        raise ConfigError(
            f"config key 'data.name': unknown dataset {config.data.name!r}; "
            f"known: {sorted(pipeline.SOURCES)}"
        )
    _validate_data(config, pipeline)
    _validate_text(config)
    positive = {
        "train.batch_size": config.train.batch_size,
        "train.num_steps": config.train.num_steps,
        "train.log_every": config.train.log_every,
        "train.grad_accum": config.train.grad_accum,
        "data.max_len": config.data.max_len,
    }
    for key, value in positive.items():
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config key {key!r} must be a positive integer, got {value!r}")
    if config.train.batch_size % config.train.grad_accum:
        raise ConfigError(
            f"config key 'train.batch_size' ({config.train.batch_size}) must be divisible by "
            f"'train.grad_accum' ({config.train.grad_accum})"
        )
    from mmjax.sharding import PARAM_SHARDINGS

    if config.train.param_sharding not in PARAM_SHARDINGS:
        raise ConfigError(f"config key 'train.param_sharding' must be one of {PARAM_SHARDINGS}, "
                          f"got {config.train.param_sharding!r}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' must be in [0, 1), got {config.train.ema_decay}")
    if config.optim.lr <= 0:
        raise ConfigError(f"config key 'optim.lr' must be positive, got {config.optim.lr}")
    if config.optim.schedule not in ("constant", "cosine"):
        raise ConfigError(
            f"config key 'optim.schedule' must be 'constant' or 'cosine', got {config.optim.schedule!r}"
        )
    if not 16 <= config.data.image_size <= 256:
        raise ConfigError(f"config key 'data.image_size' must be in [16, 256], got {config.data.image_size}")
    if family.validate is not None:
        try:
            family.validate(config)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def _validate_text(config: ConfigDict) -> None:
    from mmjax.data.tokenizer import SPECIAL_TOKENS, TOKENIZER_KINDS
    from mmjax.models.text import POSITIONS

    text = config.text
    if text.tokenizer not in TOKENIZER_KINDS:
        raise ConfigError(f"config key 'text.tokenizer' must be one of {TOKENIZER_KINDS}, got {text.tokenizer!r}")
    if text.positions not in POSITIONS:
        raise ConfigError(f"config key 'text.positions' must be one of {POSITIONS}, got {text.positions!r}")
    if not isinstance(text.normalize, bool):
        raise ConfigError(f"config key 'text.normalize' must be True or False, got {text.normalize!r}")
    if not isinstance(text.vocab_size, int) or text.vocab_size <= len(SPECIAL_TOKENS):
        raise ConfigError(f"config key 'text.vocab_size' must be an integer above {len(SPECIAL_TOKENS)} "
                          f"(the special tokens), got {text.vocab_size!r}")
    if not isinstance(text.vocab_records, int) or text.vocab_records <= 0:
        raise ConfigError(f"config key 'text.vocab_records' must be a positive integer, got {text.vocab_records!r}")


def _validate_data(config: ConfigDict, pipeline) -> None:
    from mmjax.data import real

    data = config.data
    if data.channels != 3:
        raise ConfigError(f"config key 'data.channels' is {data.channels}, but the {data.name} "
                          "dataset's images are RGB (3 channels)")
    if data.name in pipeline.PATH_DATASETS:
        if not data.path:
            raise ConfigError(f"config key 'data.path' must name the {data.name} dataset's directory "
                              f"(--config.data.path=DIR)")
        if not os.path.isdir(data.path):
            raise ConfigError(f"config key 'data.path': {data.path!r} is not a directory")
    if data.crop not in ("center", "random"):
        raise ConfigError(f"config key 'data.crop' must be 'center' or 'random', got {data.crop!r}")
    from mmjax.data import shapes

    if data.captions not in shapes.CAPTION_STYLES:
        raise ConfigError(f"config key 'data.captions' must be one of {shapes.CAPTION_STYLES}, "
                          f"got {data.captions!r}")
    try:
        real.check_caption_template(data.caption_template)
    except ValueError as e:
        raise ConfigError(f"config key 'data.caption_template': {e}") from e
    if not 0.0 < data.test_fraction < 1.0:
        raise ConfigError(f"config key 'data.test_fraction' must be in (0, 1), got {data.test_fraction}")
    if not 0.0 <= data.max_bad_fraction <= 1.0:
        raise ConfigError(f"config key 'data.max_bad_fraction' must be in [0, 1], got {data.max_bad_fraction}")
    if not isinstance(data.max_image_pixels, int) or data.max_image_pixels <= 0:
        raise ConfigError(f"config key 'data.max_image_pixels' must be a positive integer, "
                          f"got {data.max_image_pixels!r}")
    for key in ("num_train", "num_test"):
        value = data[key]
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"config key 'data.{key}' must be None or a positive integer, got {value!r}")
    if data.balance not in real.BALANCE_MODES:
        raise ConfigError(f"config key 'data.balance' must be one of {real.BALANCE_MODES}, got {data.balance!r}")
    if data.balance and data.name not in pipeline.PATH_DATASETS:
        raise ConfigError(f"config key 'data.balance': the {data.name} dataset cannot be rebalanced "
                          f"(only {pipeline.PATH_DATASETS})")
    words = data.balance_words
    if not isinstance(words, tuple) or not all(isinstance(w, str) and w.strip() for w in words):
        raise ConfigError(f"config key 'data.balance_words' must be a tuple of words, got {words!r}")
    if data.balance == "caption_words" and not words:
        raise ConfigError("config key 'data.balance_words' must list words when data.balance is "
                          "'caption_words', e.g. --config.data.balance_words=\"('cat', 'dog')\"")
    # A model with one classifier head per shapes attribute (the CNN judge) would train on -1
    # targets from any other dataset; say so now instead of training on garbage.
    from mmjax import zoo

    variant = zoo.FAMILIES[config.family].variants[config.variant]
    kwargs = {**getattr(variant, "keywords", {}), **config.model}
    heads = kwargs.get("head_names", getattr(getattr(variant, "func", variant), "head_names", ()))
    shapes_heads = [h for h in heads if h in pipeline.LABEL_KEYS]
    if shapes_heads and data.name != "shapes":
        raise ConfigError(
            f"config key 'data.name': family {config.family!r} (variant {config.variant!r}) trains "
            f"classifier heads on the shapes attributes {tuple(shapes_heads)}, which only the shapes "
            f"dataset has; {data.name!r} records carry a class 'label' instead")


def base_config() -> ConfigDict:
    """Fields every family shares; a family's config file fills in and overrides."""
    c = ConfigDict()
    c.family = ""
    c.variant = ""
    c.model = ConfigDict()  # fields passed to the model constructor: Model(**config.model)
    c.dtype = "float32"  # compute dtype; parameters are always stored in float32
    c.loss = ConfigDict()  # family objective settings

    c.data = ConfigDict()
    c.data.name = "shapes"
    c.data.image_size = 32
    c.data.channels = 3  # image channels (the shapes data are RGB)
    c.data.seed = 0
    c.data.num_train = None
    c.data.num_test = None
    c.data.max_len = 64
    c.data.worker_count = 0
    c.data.augment = False  # train split: random horizontal flips (shapes captions name left/right)
    # shapes: also train on the held-out (color, shape) pairs. Only the judge does this.
    c.data.heldout_in_train = False
    # shapes captions: "grammar" (many phrasings, some held out of training: mmjax/data/captions.py)
    # or "templates" (the seven fixed templates, which a saved config without this key used).
    c.data.captions = "grammar"
    # Real data (folder, cifar10, mnist): the directory holding the dataset's files.
    c.data.path = ""
    c.data.caption_template = "a photo of a {class}"  # captions from class names
    c.data.crop = "center"  # "center" or "random" (train split; test is always centred)
    c.data.test_fraction = 0.1  # folder without a test/ folder: share hashed into test
    c.data.max_bad_fraction = 0.01  # more unreadable images than this stops the run
    c.data.max_image_pixels = 8192 * 8192  # larger images count as bad (decompression bombs)
    # Train split only: "" (off), "label" (every class drawn equally often) or
    # "caption_words" (every word in balance_words equally often, other captions as one group).
    c.data.balance = ""
    c.data.balance_words = ()

    # The text path (mmjax/data/tokenizer.py), chosen by measurement (RESULTS.md#text-path).
    # A saved config without this section read bytes as written with learned positions.
    c.text = ConfigDict()
    c.text.tokenizer = "word"  # "word" (vocabulary of the train captions, tokenizer.json) or "byte"
    c.text.normalize = True  # NFKC and lower case before tokenizing (whitespace never counts)
    c.text.positions = "rotary"  # text encoder positions: "rotary", "learned" or "none"
    c.text.vocab_size = 512  # word: the embedding table's rows, the vocabulary's capacity
    c.text.vocab_records = 5000  # word: how many train captions the vocabulary is built from

    c.train = ConfigDict()
    c.train.seed = 0
    c.train.batch_size = 64
    c.train.num_steps = 1000
    c.train.grad_accum = 1
    # "replicated": every device holds the whole state (data parallel); "fsdp": parameters,
    # optimizer state and EMA are split over the devices (large arrays only). Either restores
    # a checkpoint written under the other, or on another number of devices.
    c.train.param_sharding = "replicated"
    c.train.ema_decay = 0.999
    c.train.log_every = 50
    c.train.sample_every = 500
    c.train.eval_every = 500
    c.train.eval_batches = 4
    c.train.checkpoint_every = 500
    c.train.keep_latest = 3
    c.train.keep_best = 1
    c.train.max_nonfinite = 0  # non-finite steps tolerated (skipped) before the run halts
    c.train.compilation_cache = ""  # "" = <workdir>/../.jax_cache; "off" disables
    c.train.progress = True

    c.optim = ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.schedule = "cosine"  # warm-up then cosine decay to lr * min_lr_ratio
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.1

    c.sample = ConfigDict()
    c.sample.num = 16

    # Generators, scored in the loop at every evaluation (train.py): images from the first
    # `num_generated` test captions, judged by a CNN judge and/or scored by a CLIP model.
    c.eval = ConfigDict()
    c.eval.judge = ""  # workdir of a trained judge (configs/cnn_shapes.py); "" = off
    c.eval.clip = ""  # workdir of a trained CLIP (configs/clip_shapes.py); "" = off
    c.eval.num_generated = 256
    return c


def tiny(c: ConfigDict) -> ConfigDict:
    """The settings every config's `:tiny` variant shares: 16-pixel images, 20 steps of batch 16,
    something logged, evaluated, sampled and saved every few steps. A CPU smoke run."""
    c.data.image_size = 16
    c.data.num_test = 256
    c.train.batch_size = 16
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.sample_every = 10
    c.train.eval_every = 10
    c.train.eval_batches = 1
    c.train.checkpoint_every = 10
    c.optim.warmup_steps = 2
    return c
